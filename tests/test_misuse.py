"""hrfast.patch on models it must not take over silently: submodules that only look like the HRNet ones,
forwards that compute something else, hooks on what the fused step bypasses.

The rule (hrfast/hrnet/fusion.py, `read_fusion_loop`): a module is patched only when its class's forward, run
once on symbolic stand-ins, is the HRNet fusion loop, its fuse activation and upsample modules run their
classes' own forward (nn.ReLU's, nn.Upsample's), and no submodule the fused step computes instead of calling
has a hook. Everything else is skipped with the reason in the report and runs its own forward: the outputs
below are compared with the unpatched model's with torch.equal (the reference backend runs eager's ops).
"""
import copy
import warnings

import hrnet_layouts as layouts
import pytest
import torch
import torch.nn as nn

import hrfast
from hrfast.models import build_model


def _fusion_rows(report, status):
    return [r for r in report.rows if r.kind == "fusion" and r.status == status]


def _same_outputs(model, patched, x):
    with torch.no_grad():
        expected, got = model(x), patched(x)
    for e, g in zip(expected if isinstance(expected, (list, tuple)) else [expected],
                    got if isinstance(got, (list, tuple)) else [got]):
        assert torch.equal(e, g)


class DoublingUpsample(nn.Upsample):
    """An nn.Upsample whose forward does more than upsample."""

    def forward(self, x):
        return 2 * super().forward(x)


class LeakyReLU(nn.ReLU):
    """Passes as an nn.ReLU by class, not by what its forward computes."""

    def forward(self, x):
        return torch.where(x > 0, x, 0.1 * x)


def test_upsample_subclass_with_its_own_forward_is_skipped():
    """Before: the classification W18-small with one such upsample in fuse_layers was patched, its output
    differed from eager by 3.8. Now that module is skipped (the others are patched) and the output is eager's."""
    torch.manual_seed(0)
    model = build_model("hrnet_w18_small_v1_c").eval()
    module = next(m for m in model.modules() if isinstance(getattr(m, "fuse_layers", None), nn.ModuleList))
    module.fuse_layers[0][1][2] = DoublingUpsample(scale_factor=2, mode="nearest")
    patched = copy.deepcopy(model)
    report = hrfast.patch(patched, backend="reference")
    [row] = _fusion_rows(report, "skipped")
    assert "is DoublingUpsample, an nn.Upsample subclass with its own forward" in row.detail
    assert len(_fusion_rows(report, "patched")) > 0
    _same_outputs(model, patched, torch.randn(1, 3, 64, 64))


def test_relu_subclass_as_fuse_activation_is_skipped():
    model = layouts.build("pose").eval()
    for m in layouts.fusion_modules(model):
        m.relu = LeakyReLU()
    patched = copy.deepcopy(model)
    report = hrfast.patch(patched, backend="reference")
    assert not _fusion_rows(report, "patched")
    assert all("LeakyReLU, an nn.ReLU subclass with its own forward" in r.detail
               for r in _fusion_rows(report, "skipped"))
    _same_outputs(model, patched, torch.randn(1, 3, 32, 32))


def _scaled_forward(self, x):
    """The official loop, but the lower-resolution terms are halved."""
    for i in range(self.num_branches):
        x[i] = self.branches[i](x[i])
    x_fuse = []
    for i in range(len(self.fuse_layers)):
        y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
        for j in range(1, self.num_branches):
            y = y + (x[j] if i == j else 0.5 * self.fuse_layers[i][j](x[j]))
        x_fuse.append(self.relu(y))
    return x_fuse


def _forward_without_branches(self, x):
    """The fusion loop alone: the branches run elsewhere."""
    x_fuse = []
    for i in range(len(self.fuse_layers)):
        y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
        for j in range(1, self.num_branches):
            y = y + (x[j] if i == j else self.fuse_layers[i][j](x[j]))
        x_fuse.append(self.relu(y))
    return x_fuse


def _forward_returning_sums(self, x):
    """No activation on the first output."""
    for i in range(self.num_branches):
        x[i] = self.branches[i](x[i])
    out = []
    for i in range(len(self.fuse_layers)):
        y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
        for j in range(1, self.num_branches):
            y = y + (x[j] if i == j else self.fuse_layers[i][j](x[j]))
        out.append(y if i == 0 else self.relu(y))
    return out


@pytest.mark.parametrize("forward, reason", [
    (_scaled_forward, "it computes with a term other than by adding it"),
    (_forward_without_branches, "it feeds a module something other than the HRNet loop does"),
    (_forward_returning_sums, "output 0: not the activation of a sum"),
], ids=["scaled", "no_branches", "no_activation"])
def test_forward_that_is_no_fusion_loop_is_skipped(forward, reason):
    """Before: an HRNet-like class (same name, same attributes) whose forward differs was patched by structure
    and computed the standard loop instead. Now its forward is read and, not being the loop, left alone."""
    model = layouts.build("cls").eval()
    for m in layouts.fusion_modules(model):
        m.__class__ = type("HighResolutionModule", (nn.Module,), {"forward": forward})
    patched = copy.deepcopy(model)
    report = hrfast.patch(patched, backend="reference")
    assert not _fusion_rows(report, "patched")
    assert all(f"is not a fusion loop hrfast recognises ({reason}" in r.detail
               for r in _fusion_rows(report, "skipped"))
    _same_outputs(model, patched, torch.randn(1, 3, 32, 32))


def test_forward_resizing_unlike_the_arguments_is_skipped():
    """The facial-landmark layout resizes with align_corners=False in forward; patch arguments that say True
    would have the fused step compute something else: skipped, with both modes named."""
    model = layouts.build("face").eval()
    patched = copy.deepcopy(model)
    report = hrfast.patch(patched, upsample="bilinear", align_corners=True, backend="reference")
    rows = _fusion_rows(report, "skipped")
    assert rows and not _fusion_rows(report, "patched")
    assert all("it resizes with mode='bilinear', align_corners=None, but the fused step would use "
               "bilinear(align_corners=True)" in r.detail for r in rows)
    _same_outputs(model, patched, torch.randn(1, 3, 32, 32))
    assert len(_fusion_rows(hrfast.patch(patched, upsample="bilinear", align_corners=False), "patched")) == len(rows)


@pytest.mark.parametrize("family", ["official", "seg_master", "face", "openseg", "pose", "cls", "mmseg", "mmpose",
                                    "timm"])
def test_users_copies_of_the_official_forwards_are_read_as_the_loop(family):
    """Every upstream spelling of the loop (tests/hrnet_layouts.py's faithful copies, timm's installed class)."""
    from hrfast.hrnet.fusion import FusionLoop, activation_attr, read_fusion_loop

    if family == "timm":
        import timm

        modules = [m for m in timm.create_model("hrnet_w18_small").modules()
                   if isinstance(getattr(m, "fuse_layers", None), nn.ModuleList)]
    else:
        modules = layouts.fusion_modules(layouts.build(family if family != "official" else "seg_ocr"))
    assert modules
    for m in modules:
        assert isinstance(read_fusion_loop(m, activation_attr(m)), FusionLoop)


# ------------------------------------------------------------------------------------------------------ hooks


def _counting_hook(calls):
    def hook(module, args, output):
        calls.append(type(module).__name__)
    return hook


def test_hook_on_a_bypassed_submodule_skips_the_module():
    """A forward hook on a batch norm the fused step folds: the module is skipped and the hook keeps firing."""
    model = layouts.build("pose").eval()
    target = layouts.fusion_modules(model)[0]
    calls = []
    target.fuse_layers[0][1][1].register_forward_hook(_counting_hook(calls))
    report = hrfast.patch(model, backend="reference")
    [row] = [r for r in _fusion_rows(report, "skipped") if "hooks" in r.detail]
    assert row.detail.startswith("fuse_layers.0.1.1 has hooks, which the fused forward would not run")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == ["BatchNorm2d"]


@pytest.mark.parametrize("where", ["upsample", "activation"])
def test_hook_added_after_patching_warns_and_fires(where):
    """Before: a hook added after patching on a fuse-layer submodule never fired, silently. Now the patched
    forward sees it, warns once, and runs the original forward while the hook is there (outputs: eager's)."""
    model = layouts.build("pose").eval()
    reference = copy.deepcopy(model)
    hrfast.patch(model, backend="reference")
    target = layouts.fusion_modules(model)[0]
    submodule = target.fuse_layers[0][1][2] if where == "upsample" else target.relu
    calls = []
    handle = submodule.register_forward_hook(_counting_hook(calls))
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match=r"a hook was added to .* after hrfast.patch"):
        _same_outputs(reference, model, x)
    assert len(calls) == (1 if where == "upsample" else len(target.fuse_layers))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per module
        _same_outputs(reference, model, x)
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same_outputs(reference, model, x)  # the fused forward again
    assert len(calls) == 2 * (1 if where == "upsample" else len(target.fuse_layers))


def test_hook_added_to_a_patched_head_warns_and_fires():
    """The same for the HRNetV2 head of the segmentation model: a hook on its conv after patching."""
    from test_export import tiny_seg

    model = tiny_seg().cpu()
    reference = copy.deepcopy(model)
    assert hrfast.patch(model, backend="reference").count("patched", "head") == 1
    calls = []
    model.last_layer[0].register_forward_hook(_counting_hook(calls))
    with pytest.warns(RuntimeWarning, match=r"a hook was added to last_layer.0 of this patched"):
        _same_outputs(reference, model, torch.randn(1, 3, 64, 64))
    assert calls == ["Conv2d"]
