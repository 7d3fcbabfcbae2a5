"""hrfast.patch on the HRNetV2 concat head: the official segmentation / facial-landmark models (the toy layouts of
tests/hrnet_layouts.py and hrfast.models), mmseg's FCNHead, and the heads that must be reported and left alone.

As in test_patch.py, "matches the unpatched model" means: the same model (same weights, buffers, input and random
cotangents) run unpatched and patched gives the same outputs, parameter gradients and buffers, in float64 within
FP64_TOL (the reference backend; the fused head reorders the conv over the concat, so not bit for bit); the float32
eval output of the patched model is held to FP32_RTOL against the float64 unpatched one. Every such check also
counts the fused head calls: through `HRNetV2Head.__call__` (seen by a global module forward hook, as
hrfast.flops sees it) and into `hrnet_v2_head`, so a silent fallback to the eager concat fails.
"""
import copy
import io

import hrnet_layouts as layouts
import pytest
import torch
import torch.nn as nn
from conftest import TRITON_DEVICE
from test_patch import (FORWARD_ARGS, _as_list, _check_fp32_eval_output, _compare, _patched_modules, _run,
                        _zero_grad_biases, check_mode_switching)

import hrfast
import hrfast.nn.head as head_module
from hrfast._patch import HeadConfig
from hrfast.nn import HRNetV2Head
from hrfast.testing import assert_rel_close, rel_error

FP64_TOL = 1e-10
ODD = (61, 83)  # stem /4 gives 16x21, then 8x11, 4x6, 2x3: no branch is an exact 2^k multiple of x0
# the fusion modules of these toy models resize in forward without saying how (test_patch.py)
ARGS = {"seg_master": FORWARD_ARGS["seg_master"], "face": FORWARD_ARGS["face"], "openseg": FORWARD_ARGS["openseg"]}
DETAIL = {
    "seg_ocr": "official segmentation head (concat in HighResolutionNet.forward, then last_layer); bilinear "
               "align_corners from hrnet_layouts.ALIGN_CORNERS",
    "seg_master": "bilinear align_corners=False (from the align_corners= argument)",
    "face": "official facial-landmark head (concat in HighResolutionNet.forward, then head); bilinear "
            "align_corners=False (facial layout); trunk: the official stem, layer1, transitions and stages",
    "mmseg": "mmseg FCNHead (resize_concat of in_index (0, 1, 2, 3)), bilinear align_corners from its align_corners",
    "mmseg_ocr": "mmseg FCNHead (resize_concat",
}


@pytest.fixture
def head_calls(monkeypatch):
    """{"module": HRNetV2Head.__call__ calls seen by a global forward hook, "op": hrnet_v2_head calls}."""
    calls = {"module": 0, "op": 0}
    original = head_module.hrnet_v2_head

    def counting(*args, **kwargs):
        calls["op"] += 1
        return original(*args, **kwargs)

    def hook(module, args, output):
        if isinstance(module, HRNetV2Head):
            calls["module"] += 1

    monkeypatch.setattr(head_module, "hrnet_v2_head", counting)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield calls
    handle.remove()


def _head_rows(report):
    return [r for r in report.rows if r.kind == "head"]


def _check(model, x, train, kwargs, heads, calls, fp32_eval_output=False, backend="reference"):
    """`model` (float64) unpatched, then patched, from the same state: outputs, parameter gradients, buffers within
    FP64_TOL, `heads` fused head calls; optionally the float32 eval output. Leaves `model` unpatched, float64, in
    its initial state. Returns the report and the worst relative error of the outputs."""
    state = copy.deepcopy(model.state_dict())
    model.train(train)
    expected = _run(model, x, 0)
    model.load_state_dict(state)
    report = hrfast.patch(model, backend=backend, **kwargs)
    assert report.count("patched", "head") == heads, report
    calls.update(module=0, op=0)
    actual = _run(model, x, 0)
    assert calls == {"module": heads, "op": heads}
    _compare(actual, expected, FP64_TOL, _zero_grad_biases(model))
    if train:  # the head's running statistics moved (an unchanged buffer would compare equal trivially)
        moved = [n for n in state if n.endswith("running_mean") and ("last_layer" in n or "head" in n)]
        assert moved and all(not torch.equal(actual[f"buffer {n}"], state[n]) for n in moved)
    worst = max(rel_error(actual[k], expected[k]) for k in expected if k.startswith("out"))
    if fp32_eval_output:
        assert not train
        _check_fp32_eval_output(model, state, x, expected)
    hrfast.unpatch(model)
    model.load_state_dict(state)
    return report, worst


# ------------------------------------------------------------------------------------------- patched layouts


@pytest.mark.parametrize("name, align", [("seg_ocr", True), ("seg_ocr", False), ("seg_master", None),
                                         ("face", None), ("mmseg", None), ("mmseg_ocr", None)],
                         ids=["seg_ocr-align_corners", "seg_ocr", "seg_master", "face", "mmseg", "mmseg_ocr"])
def test_layout_matches_unpatched(name, align, head_calls, monkeypatch):
    """Eval and train, a 32-divisible and an odd input: everything equal to the unpatched model; the float32 eval
    output within FP32_RTOL of the float64 unpatched one."""
    if align is not None:
        monkeypatch.setattr(layouts, "ALIGN_CORNERS", align)
    model = layouts.build_net(name).double()
    for hw in ((64, 64), ODD):
        x = torch.randn(2, 3, *hw, dtype=torch.float64)
        for train in (False, True):
            report, _ = _check(model, x, train, ARGS.get(name, {}), 1, head_calls, fp32_eval_output=not train)
    (row,) = [r for r in _head_rows(report) if r.status == "patched"]
    assert DETAIL[name] in row.detail, row.detail
    if align is not None:
        assert f"ALIGN_CORNERS (now {align}" in row.detail


@pytest.mark.parametrize("name, kwargs", [("hrnetv2_w18_small_v1_seg", dict(align_corners=True)),
                                          ("hrnetv2_w18_small_v1_seg", dict(align_corners=False)),
                                          ("hrnetv2_w18_face", {})], ids=["seg-align_corners", "seg", "face"])
def test_hrfast_models(name, kwargs, head_calls):
    """hrfast.models (the trunk runs through their own forward_backbone), 64x64, eval and train."""
    from hrfast.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = build_model(name, **kwargs)
    layouts.randomize_norms(model)
    model = model.double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for train in (False, True):
        report, _ = _check(model, x, train, {}, 1, head_calls, fp32_eval_output=not train)
    (row,) = _head_rows(report)
    assert "trunk: its forward_backbone" in row.detail
    if name.endswith("_seg"):
        assert f"align_corners attribute (now {kwargs['align_corners']}" in row.detail


def test_align_corners_global_is_read_at_every_call(monkeypatch, head_calls):
    """Official seg: the concat follows the module global ALIGN_CORNERS also when it changes after patching."""
    monkeypatch.setattr(layouts, "ALIGN_CORNERS", True)
    model = layouts.build_net("seg_ocr").double().eval()
    ref = copy.deepcopy(model)
    hrfast.patch(model, backend="reference")
    x = torch.randn(2, 3, *ODD, dtype=torch.float64)
    outs = {}
    with torch.no_grad():
        for value in (True, False):
            layouts.set_align_corners(value)
            outs[value] = model(x)
            assert_rel_close(outs[value], ref(x), FP64_TOL, f"ALIGN_CORNERS={value}")
    assert rel_error(outs[True], outs[False]) > 1e-3  # the setting matters on these sizes
    assert head_calls["op"] == 2


def test_head_align_corners_unknown_raises():
    """Seg master: no attribute, no global; without the arguments patch names align_corners and patches nothing."""
    model = layouts.build_net("seg_master")
    with pytest.raises(ValueError, match=r"(?s)\(model\) \(HighResolutionNet\): its forward resizes the branches "
                                         r"for the concat before last_layer.*align_corners=True/False"):
        hrfast.patch(model)
    assert _patched_modules(model) == []
    assert hrfast.patch(model, **ARGS["seg_master"]).count("patched", "head") == 1
    again = hrfast.patch(model)  # patching again without the arguments keeps what they said
    (row,) = _head_rows(again)
    assert row.status == "patched" and "from the arguments of an earlier hrfast.patch" in row.detail
    assert model.forward.config.resample == hrfast.Resample("bilinear", False)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_triton_backend_tiny_head(train, head_calls):
    """The Triton head kernels (the interpreter without a GPU) through a patched mmseg FCNHead: 4 branches of
    2/4/8/16 channels at 8x12 .. 1x2, outputs, gradients (inputs included) and buffers."""
    head = layouts.fcn_head().to(device=TRITON_DEVICE, dtype=torch.float64)
    sizes = ((8, 12), (4, 6), (2, 3), (1, 2))
    xs = [torch.randn(2, c, *hw, dtype=torch.float64, device=TRITON_DEVICE, requires_grad=True)
          for c, hw in zip((2, 4, 8, 16), sizes)]

    class Wrap(nn.Module):  # a leaf input per branch, so _run compares their gradients through the parameters
        def __init__(self):
            super().__init__()
            self.head = head
            self.xs = nn.ParameterList([nn.Parameter(x.detach().clone()) for x in xs])

        def forward(self, _):
            return self.head(list(self.xs))

    model = Wrap()
    _check(model, xs[0], train, {}, 1, head_calls, fp32_eval_output=not train, backend="triton")


# ------------------------------------------------------------------------------------------- API and lifecycle


def test_state_dict_and_modules_unchanged():
    model = layouts.build_net("seg_ocr")
    ref = copy.deepcopy(model)
    hrfast.patch(model)
    assert "forward" in model.__dict__ and isinstance(model.forward.config, HeadConfig)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]
    assert not any(isinstance(m, HRNetV2Head) for m in model.modules())
    expected, actual = ref.state_dict(), model.state_dict()
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[k], v) for k, v in expected.items())


def test_head_false_patch_twice_and_unpatch(head_calls):
    model = layouts.build_net("face").double().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, *ODD, dtype=torch.float64)
    report = hrfast.patch(model, head=False, backend="reference", **ARGS["face"])
    assert _head_rows(report) == [] and report.count("patched", "fusion") == 4 and "forward" not in model.__dict__
    with torch.no_grad():
        model(x)
    assert head_calls["op"] == 0

    first = hrfast.patch(model, backend="reference", **ARGS["face"])
    with torch.no_grad():
        once = model(x)
    second = hrfast.patch(model, backend="reference", **ARGS["face"])
    assert first.count() == second.count() == 5
    assert _head_rows(second)[0].detail.endswith("was patched already")
    with torch.no_grad():
        assert torch.equal(model(x), once)
        assert_rel_close(once, ref(x), FP64_TOL, "patched")
    assert head_calls["op"] == 2

    off = hrfast.patch(model, head=False, backend="reference", **ARGS["face"])  # re-applied: the head is restored
    assert [(r.name, r.status) for r in _head_rows(off)] == [("", "unpatched")] and "forward" not in model.__dict__
    hrfast.patch(model, backend="reference", **ARGS["face"])
    restored = hrfast.unpatch(model)
    assert restored.count("unpatched") == 5 and _patched_modules(model) == []
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # the original code runs again, bit for bit
    assert head_calls["op"] == 2


@pytest.mark.parametrize("name", ["seg_ocr", "mmseg"])
def test_deepcopy_and_pickle_follow_the_copy(name, head_calls):
    """A deepcopied / torch.save-loaded patched model stays patched and runs on its own weights."""
    model = layouts.build_net(name).double().eval()
    ref = copy.deepcopy(model)
    hrfast.patch(model, backend="reference")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        target = copied if name == "seg_ocr" else copied.decode_head
        assert target.forward.__self__ is target and target.forward.config == (
            model if name == "seg_ocr" else model.decode_head).forward.config
        head_calls.update(op=0)
        with torch.no_grad():
            assert_rel_close(copied(x), ref(x), FP64_TOL, "copy output")
            classifier = copied.last_layer[3] if name == "seg_ocr" else copied.decode_head.conv_seg
            classifier.bias.add_(1.0)  # the copy's own weights: changes the copy, not the original
            changed, original = copied(x), model(x)
        assert head_calls["op"] == 3
        assert_rel_close(original, ref(x), FP64_TOL, "original after changing the copy")
        assert rel_error(changed, original) > 1e-3


def test_to_dtype_and_mode_switching(head_calls):
    """Patched in float32, then .to(float64) and train()/eval() switches: equal to the unpatched model, and the
    running statistics (head BN included) evolve identically."""
    model = layouts.build_net("seg_ocr")
    hrfast.patch(model, backend="reference")
    model = model.to(torch.float64)
    check_mode_switching(model, torch.randn(2, 3, *ODD, dtype=torch.float64))
    assert head_calls["op"] == 4


def test_mmseg_unfusable_inputs_run_the_original(head_calls):
    """in_index whose first input is not the largest (the concat then downsamples): the original forward runs."""
    model = layouts.build_net("mmseg", in_index=(1, 0, 2, 3)).double().eval()
    ref = copy.deepcopy(model)
    report = hrfast.patch(model, backend="reference")
    assert report.count("patched", "head") == 1
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert_rel_close(model(x), ref(x), FP64_TOL, "fallback")
    assert head_calls["op"] == 0


# -------------------------------------------------------------------------------------------- left alone


def _hooked(model):
    model.last_layer.register_forward_hook(lambda *args: None)
    return model


def _extra_child(model):
    model.aux_classifier = nn.Conv2d(60, 3, 1)
    return model


def _flagged(model):
    model.drop_stage4 = True
    return model


def _subclassed(model):
    base = type(model)

    class ResizingNet(base):  # a fork that resizes the logits to the input in forward
        def forward(self, x):
            out = super().forward(x)
            return nn.functional.interpolate(out, size=x.shape[2:], mode="bilinear")

    model.__class__ = ResizingNet
    return model


SKIPPED = {
    "ocr": ("seg_hrnet_ocr", {}, None, "an OCR model (aux_head, conv3x3_ocr, ocr_gather_head, ocr_distri_head)"),
    "openseg": ("openseg", {}, None, "cls_head[0] is a 3x3 conv"),
    "openseg-dropout": ("openseg", {}, None, "cls_head[2] is Dropout2d (dropout)"),
    "mmseg-ocrhead": ("mmseg_ocr", {}, None, "mmseg OCRHead decode head: only FCNHead"),
    "inplace_abn": ("seg_ocr", dict(head_norm=layouts.InPlaceABNSync), None,
                    "last_layer[1] is InPlaceABNSync, a norm the fused head does not take"),
    "leaky_relu": ("seg_ocr", dict(head_act=nn.LeakyReLU(0.01)), None, "last_layer[2] must be nn.ReLU, got LeakyReLU"),
    "3x3-classifier": ("seg_ocr", dict(final_conv_kernel=3), None, "last_layer[3] is a 3x3 conv"),
    "mmseg-dropout": ("mmseg", dict(dropout_ratio=0.1), None, "it applies Dropout2d before the classifier"),
    "mmseg-groupnorm": ("mmseg", dict(norm="GN"), None, "convs[0].gn is GroupNorm, a norm the fused head does not"),
    "mmseg-leaky_relu": ("mmseg", dict(act=nn.LeakyReLU()), None, "convs[0].activate must be nn.ReLU, got LeakyReLU"),
    "hooks": ("seg_ocr", {}, _hooked, "has hooks, which the fused head would bypass"),
    "extra-child": ("seg_ocr", {}, _extra_child, "unexpected children aux_classifier"),
    "drop_stage4": ("seg_ocr", {}, _flagged, "drop_stage4 is set"),
    "fork-forward": ("seg_ocr", {}, _subclassed, "its forward does not call self.last_layer("),
}


@pytest.mark.parametrize("case", list(SKIPPED))
def test_left_alone_and_reported(case, head_calls):
    name, kwargs, edit, reason = SKIPPED[case]
    model = layouts.build_net(name, **kwargs).double().eval()
    if edit is not None:
        model = edit(model)
    ref = copy.deepcopy(model)
    report = hrfast.patch(model, backend="reference", **ARGS.get(name, {}))
    skipped = [r for r in _head_rows(report) if r.status == "skipped"]
    assert len(skipped) == 1 and reason in skipped[0].detail, report
    assert not any(r.status == "patched" and r.name == skipped[0].name for r in report.rows)
    assert "forward" not in model.get_submodule(skipped[0].name).__dict__
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        for a, e in zip(_as_list(model(x)), _as_list(ref(x))):
            assert_rel_close(a, e, FP64_TOL, case)
    if name != "mmseg_ocr":  # there the FCNHead beside the OCRHead is patched
        assert head_calls["op"] == 0


def test_models_without_a_v2_head_get_one_row():
    from hrfast.models import build_model

    for model in (build_model("hrnet_w18_small_v1_c"), layouts.build("pose")):
        rows = _head_rows(hrfast.patch(model))
        assert len(rows) == 1 and rows[0].status == "skipped" and "no HRNetV2 concat head found" in rows[0].detail
        assert _head_rows(hrfast.patch(model, head=False)) == []
