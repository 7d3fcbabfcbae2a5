"""MAC counts of hrfast's own modules and of patched models (`hrfast.flops`).

The fused `HRNetV2Head` computes the reordered head (`head_reorder_macs`); `hrfast.patch` calls it per forward
without registering it as a submodule, so `count_macs` must see module calls outside ``model.modules()``.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.modules import module as module_mod

import hrfast
from hrfast.flops import count_macs, head_reorder_macs, hrnet_v2_head_macs
from hrfast.models import build_model
from hrfast.nn import HRNetV2Head

CHANNELS = (4, 8, 16, 32)
CLASSES = 5


class Unregistered(nn.Module):
    """Calls a head it holds outside its submodules (as hrfast.patch's head adapter does)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.__dict__["hidden"] = head  # not in self._modules: not in modules() or state_dict()

    def forward(self, x0):
        n, _, h, w = x0.shape
        xs = [x0] + [torch.randn(n, c, -(-h // 2**k), -(-w // 2**k), device=x0.device, dtype=x0.dtype)
                     for k, c in enumerate(CHANNELS[1:], 1)]
        return self.hidden(xs)


class Registered(Unregistered):
    def __init__(self, head: nn.Module):
        nn.Module.__init__(self)
        self.head = head

    @property
    def hidden(self):
        return self.head


def _hooks():
    return len(module_mod._global_forward_hooks), len(module_mod._global_forward_pre_hooks)


@pytest.mark.parametrize("device", ["meta", "cpu"])
@pytest.mark.parametrize("wrapper", [Unregistered, Registered])
def test_head_rule_counts_the_reordered_head(wrapper, device):
    with torch.device(device):  # an unregistered head's weights are not swapped to meta by count_macs
        head = HRNetV2Head.from_channels(list(CHANNELS), CLASSES, backend="reference").eval()
    model = wrapper(head)
    assert (head in list(model.modules())) == (wrapper is Registered)
    size = (13, 22)  # odd: the branches round up
    res = [(-(-size[0] // 2**k), -(-size[1] // 2**k)) for k in range(4)]
    expected = head_reorder_macs(CHANNELS, size, CLASSES, branch_resolutions=res)
    before = _hooks()
    count = count_macs(model, (2, CHANNELS[0], *size), device=device)
    assert _hooks() == before  # the global hooks are gone
    assert count.conv == 0 and count.ruled == count.total == 2 * expected.reordered
    assert count.total < 2 * expected.eager
    assert count.per_module == (("head" if wrapper is Registered else "(unregistered)", "HRNetV2Head",
                                 2 * expected.reordered),)


def test_head_rule_in_a_patched_segmentation_model_w48():
    with torch.device("meta"):  # nothing allocated
        model = build_model("hrnetv2_w48_seg")
    patched = copy.deepcopy(model)
    report = hrfast.patch(patched)
    before = count_macs(model, (1, 3, 1024, 2048))
    after = count_macs(patched, (1, 3, 1024, 2048))
    b, a = before.by_prefix(), after.by_prefix()
    # patched fusion modules run the same convolutions
    assert report.count("patched", "fusion") == 8
    for stage in ("stage2", "stage3", "stage4"):
        assert a[stage] == b[stage] > 0
    head = head_reorder_macs((48, 96, 192, 384), (1024, 2048), 19)
    assert b["last_layer"] == head.eager
    if report.count("patched", "head"):
        # the per-call HRNetV2Head over last_layer's own layers: named after them, the reordered figure
        assert a["last_layer"] == head.reordered == after.ruled
        assert after.total == before.total - head.saved
        assert round(before.gmacs, 1) == 747.5 and round(after.gmacs, 1) == 688.1
    else:  # no head adapter: nothing changes
        assert after.total == before.total


def test_head_rule_counts_the_eager_form_when_the_norm_does_not_fold():
    width = sum(CHANNELS)
    layers = nn.Sequential(nn.Conv2d(width, width, 1), nn.GroupNorm(4, width), nn.ReLU(),
                           nn.Conv2d(width, CLASSES, 1))
    head = HRNetV2Head.from_module(layers, backend="reference")
    size = (16, 24)
    count = count_macs(Unregistered(head), (1, CHANNELS[0], *size), device="cpu")
    assert count.total == head_reorder_macs(CHANNELS, size, CLASSES, branch_resolutions=[
        (16 // 2**k, 24 // 2**k) for k in range(4)]).eager
    assert count.conv == 0  # the convs the eager fallback calls are inside the rule, not counted twice


def test_rule_function_directly():
    head = HRNetV2Head.from_channels(list(CHANNELS), CLASSES)
    xs = [torch.empty(3, c, 8 // 2**k, 8 // 2**k, device="meta") for k, c in enumerate(CHANNELS)]
    width = sum(CHANNELS)
    assert hrnet_v2_head_macs(head, (xs,), None) == 3 * (sum(c * (64 // 4**k) * width for k, c in
                                                              enumerate(CHANNELS)) + 64 * width * CLASSES)


def test_hooks_are_removed_when_the_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    before = _hooks()
    with pytest.raises(RuntimeError, match="boom"):
        count_macs(nn.Sequential(nn.Conv2d(3, 3, 1), Boom()), (1, 3, 4, 4))
    assert _hooks() == before
