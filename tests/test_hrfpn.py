"""HRNetV2p's HRFPN neck and mmpose's HRNetV2 neck + head pair: the fused reduction (`hrfast.nn.HRFPNReduction`)
and what `hrfast.patch` does with them, on the replicas of tests/hrfpn_layouts.py (and the real mmdet / mmpose
classes when those packages are importable).

"Equal" means: the same module (same weights, inputs, random cotangents) run unpatched and patched gives outputs,
input gradients, parameter gradients (and BN running statistics) within FP64_TOL in float64. The reference
backend already reorders HRFPN's reduction (per-branch projections, then the fusion op); the V2 head's reference
is the eager concat, so its reordering is checked on the Triton backend. Triton runs through the interpreter on
CPU: one backward and one forward, at tiny sizes.
"""
import copy

import hrfpn_layouts as L
import hrnet_layouts as layouts
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hrfast
import hrfast.nn.head as head_module
import hrfast.nn.hrfpn as hrfpn_module
from hrfast.flops import count_macs, hrfpn_table
from hrfast.nn.hrfpn import HRFPNReduction, hrfpn_reduction
from hrfast.plan import Resample
from hrfast.testing import rel_error

FP64_TOL = 1e-10
CHANNELS = (2, 4, 8, 16)


def _eager_reduction(xs, weight, bias, resample=None):
    size = xs[0].shape[2:]
    ups = [xs[0]] + [F.interpolate(x, scale_factor=2 ** j, mode="bilinear") if resample is None
                     else F.interpolate(x, size=size, mode="bilinear", align_corners=resample.align_corners)
                     for j, x in enumerate(xs) if j]
    return F.conv2d(torch.cat(ups, 1), weight, bias)


def _grads(out, tensors, seed=3):
    """Gradients of `tensors` for random cotangents of `out`, by ``backward()`` (reentrant checkpointing, which
    HRFPN's with_cp runs, refuses ``torch.autograd.grad``)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    g = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    for t in tensors:
        t.grad = None
    torch.autograd.backward(outs, cotangents)
    grads = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    return grads


def _assert_all_close(actual, expected, what):
    assert len(actual) == len(expected), what
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), f"{what}[{k}]"
        if a is not None:
            assert rel_error(a, e) <= FP64_TOL, f"{what}[{k}]: {rel_error(a, e):.2e}"


@pytest.fixture
def reductions(monkeypatch):
    """Counts calls of the fused reduction (`hrfpn_reduction`, as HRFPNReduction calls it)."""
    calls = [0]
    original = hrfpn_module.hrfpn_reduction

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(hrfpn_module, "hrfpn_reduction", counting)
    return calls


# ------------------------------------------------------------------------------------- the fused reduction


def _reduction_case(size=(8, 8), batch=1, out=3):
    xs = [x.requires_grad_() for x in L.branches(CHANNELS, size, batch)]
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(out, sum(CHANNELS), 1, 1, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(out, generator=g, dtype=torch.float64).requires_grad_()
    return xs, weight, bias


@pytest.mark.parametrize("resample", [None, Resample("bilinear", align_corners=True)], ids=["hrfpn", "size-corners"])
def test_reduction_equals_conv_over_concat(resample):
    xs, weight, bias = _reduction_case(size=(16, 24), batch=2)
    got = hrfpn_reduction(xs, weight, bias, resample=resample, backend="reference")
    want = _eager_reduction(xs, weight, bias, resample)
    assert rel_error(got, want) <= FP64_TOL
    _assert_all_close(_grads(got, xs + [weight, bias]), _grads(want, xs + [weight, bias]), "grads")


def test_reduction_triton_forward_backward():
    xs, weight, bias = _reduction_case()
    got = hrfpn_reduction(xs, weight, bias, backend="triton")
    want = _eager_reduction(xs, weight, bias)
    assert rel_error(got, want) <= FP64_TOL
    _assert_all_close(_grads(got, xs + [weight, bias]), _grads(want, xs + [weight, bias]), "grads")


def test_reduction_bad_arguments():
    xs, weight, bias = _reduction_case()
    cases = [
        ((xs[0], weight), {}, TypeError, "xs must be a list"),
        ((xs, "w"), {}, TypeError, "weight must be a tensor"),
        ((xs, weight[:, :-1]), {}, ValueError, "weight must be [M, 30, 1, 1]"),
        ((xs, weight, bias[:-1]), {}, ValueError, "bias must have shape [3]"),
        ((xs, weight, bias), dict(resample=3), TypeError, "resample must be None"),
        ((xs, weight, bias), dict(backend="nope"), ValueError, "nope"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message.replace("[", r"\[")):
            hrfpn_reduction(*args, **kwargs)


def test_module_keeps_the_replaced_keys_and_rejects_other_convs():
    for kind, keys in (("mmdet", ["reduction_conv.conv.weight", "reduction_conv.conv.bias"]),
                       ("official", ["reduction_conv.0.weight", "reduction_conv.0.bias"])):
        neck = L.hrfpn(kind).double()
        fused = HRFPNReduction.from_module(neck, backend="reference")
        assert list(fused.state_dict()) == keys == [k for k in neck.state_dict() if k.startswith("reduction_conv")]
        assert all(fused.state_dict()[k].data_ptr() == neck.state_dict()[k].data_ptr() for k in keys)
        xs = L.branches()
        assert rel_error(fused(xs), neck.reduction_conv(torch.cat(
            [xs[0]] + [F.interpolate(x, scale_factor=2 ** j, mode="bilinear") for j, x in enumerate(xs) if j], 1))
        ) <= FP64_TOL
    with pytest.raises(ValueError, match="reduction_conv cannot be fused: .*children \\['conv', 'bn'\\]"):
        HRFPNReduction(L.hrfpn("mmdet", norm_cfg=dict(type="BN")).reduction_conv)
    with pytest.raises(ValueError, match="plain 1x1 conv"):
        HRFPNReduction(nn.Conv2d(30, 5, 3))
    with pytest.raises(TypeError, match="reduction_conv must be an nn.Module"):
        HRFPNReduction("conv")
    with pytest.raises(TypeError, match="xs must be a list or tuple"):
        HRFPNReduction(nn.Conv2d(30, 5, 1))(torch.zeros(1, 30, 4, 4))


# -------------------------------------------------------------------------------------------- patching HRFPN


def _run(neck, xs):
    """Outputs, input gradients and parameter gradients of one forward/backward of `neck` on fresh copies (a
    one-element `xs` is passed as a tensor)."""
    inputs = [x.detach().clone().requires_grad_() for x in xs]
    params = list(neck.parameters())
    outs = neck(inputs if len(inputs) > 1 else inputs[0])
    return list(outs), _grads(outs, inputs + params)


NECKS = {
    "mmdet": ("mmdet", {}),
    "mmdet-max-stride2": ("mmdet", dict(pooling_type="MAX", stride=2, num_outs=4)),  # FCOS-like
    "official": ("official", {}),
    "official-shared": ("official", dict(share_conv=True)),
}


@pytest.mark.parametrize("case", list(NECKS))
def test_patched_hrfpn_equals_the_original(case, reductions):
    kind, kwargs = NECKS[case]
    neck = L.hrfpn(kind, **kwargs).double()
    xs = L.branches()
    keys = {k: v.clone() for k, v in neck.state_dict().items()}
    expected = _run(neck, xs)
    report = hrfast.patch(neck, backend="reference")
    rows = [r for r in report.rows if r.kind == "head"]
    assert len(rows) == 1 and rows[0].status == "patched", report
    assert "reduction MACs per branch-0 pixel 150 -> 18.75 (8.0x fewer)" in rows[0].detail
    actual = _run(neck, xs)
    assert reductions[0] == 1
    _assert_all_close(actual[0], expected[0], "outputs")
    _assert_all_close(actual[1], expected[1], "gradients")
    state = neck.state_dict()
    assert list(state) == list(keys) and all(torch.equal(state[k], v) for k, v in keys.items())
    hrfast.unpatch(neck)
    restored = _run(neck, xs)
    assert all(torch.equal(a, e) for a, e in zip(restored[0] + list(restored[1]), expected[0] + list(expected[1])))


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")  # the replicas call it as upstream does
@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")  # the replicas call it as upstream does
@pytest.mark.parametrize("kind,flag", [("mmdet", "with_cp"), ("official", "with_checkpoint")])
def test_checkpointing_is_kept(kind, flag, reductions):
    neck = L.hrfpn(kind, **{flag: True}).double()
    xs = L.branches()
    expected = _run(neck, xs)
    hrfast.patch(neck, backend="reference")
    actual = _run(neck, xs)
    assert reductions[0] == 2  # the forward, then its recomputation in backward: the checkpoint ran
    _assert_all_close(actual[0], expected[0], "outputs")
    _assert_all_close(actual[1], expected[1], "gradients")
    reductions[0] = 0
    neck(L.branches())[0].sum().backward()  # inputs without grad: the original does not checkpoint either
    assert reductions[0] == 1
    reductions[0] = 0
    setattr(neck, flag, False)  # read at every call, as the original does
    _run(neck, xs)
    assert reductions[0] == 1


def _overriding(neck):
    class Sub(type(neck)):
        def forward(self, inputs):
            return super().forward(inputs)[:1]

    neck.__class__ = Sub
    return neck


def _hooked(neck):
    neck.reduction_conv.conv.register_forward_hook(lambda module, args, out: None)
    return neck


LEFT_ALONE = {
    "fork": (lambda: L.hrfpn("fork"), "its forward is not the upstream mmdet HRFPN forward"),
    "subclass": (lambda: _overriding(L.hrfpn("mmdet")), "Sub overrides HRFPN.forward"),
    "norm": (lambda: L.hrfpn("mmdet", norm_cfg=dict(type="BN")), "has children ['conv', 'bn']"),
    "hooks": (lambda: _hooked(L.hrfpn("mmdet")), "reduction_conv.conv has hooks"),
}


@pytest.mark.parametrize("case", list(LEFT_ALONE))
def test_other_hrfpns_are_reported_and_left_alone(case, reductions):
    neck = LEFT_ALONE[case][0]().double()
    report = hrfast.patch(neck, backend="reference")
    assert len(report.rows) == 1 and report.rows[0].status == "skipped", report
    assert LEFT_ALONE[case][1] in report.rows[0].detail
    assert "forward" not in neck.__dict__
    neck(L.branches())
    assert reductions[0] == 0


class _Detector(nn.Module):
    """An HRNetV2p detector's backbone and neck (HRNet-Object-Detection: the classification-style HRNet, whose
    fusion modules are patched too, then HRFPN)."""

    def __init__(self):
        super().__init__()
        self.backbone = layouts.build("cls", width=2)
        self.neck = L.hrfpn("official")

    def forward(self, x):
        return self.neck(self.backbone(x))


def test_whole_detector_backbone_and_neck(reductions):
    model = _Detector().double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    expected = _run(model, [x])
    report = hrfast.patch(model, backend="reference")
    assert [r.name for r in report.patched] == ["backbone.stage2.0", "backbone.stage3.0", "backbone.stage4.0",
                                                "backbone.stage4.1", "neck"], report
    actual = _run(model, [x])
    assert reductions[0] == 1
    _assert_all_close(actual[0], expected[0], "outputs")
    _assert_all_close(actual[1], expected[1], "gradients")


def test_inputs_the_fusion_cannot_take_run_the_original(reductions):
    neck = L.hrfpn("mmdet").double()
    hrfast.patch(neck, backend="reference")
    odd = L.branches(size=(15, 23))  # 2x upsampling cannot reach branch 0: the original's cat fails
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        neck(odd)
    with pytest.raises(AssertionError):
        neck(L.branches()[:3])
    assert reductions[0] == 0


class _FromImage(nn.Module):
    """An HRFPN fed with branches cut from one tensor, so that `count_macs` can run it."""

    def __init__(self, neck):
        super().__init__()
        self.neck = neck

    def forward(self, x):
        return self.neck([F.avg_pool2d(x[:, :c], 2 ** j) for j, c in enumerate(CHANNELS)])


def test_macs_of_patched_hrfpn_and_table():
    model = _FromImage(L.hrfpn("mmdet", out_channels=8)).double()
    x = torch.randn(1, 16, 16, 16, dtype=torch.float64)
    before = count_macs(model, x, device="cpu")
    hrfast.patch(model, backend="reference")
    after = count_macs(model, x, device="cpu")
    eager = 16 * 16 * 30 * 8
    reordered = 8 * sum(c * (16 >> j) ** 2 for j, c in enumerate(CHANNELS))
    assert before.ruled == 0 and after.ruled == reordered and before.total - after.total == eager - reordered
    table = hrfpn_table()
    assert {k: (round(v.eager / 1e9, 2), round(v.reordered / 1e9, 2)) for k, v in table.items()} == {
        "W18": (4.64, 0.58), "W32": (8.26, 1.03), "W40": (10.32, 1.29)}
    assert table["W18"].sizes[0] == (200, 336) and table["W40"].sizes[-1] == (25, 42)


# ---------------------------------------------------------------------------------------------------- mmpose


@pytest.fixture
def head_calls(monkeypatch):
    calls = [0]
    original = head_module.hrnet_v2_head

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(head_module, "hrnet_v2_head", counting)
    return calls


def _pose_run(model, x, mode):
    """What a mode returns, as a list of tensors, plus the parameter gradients for tensor and loss modes."""
    x = x.detach().clone().requires_grad_(mode != "predict")
    if mode == "tensor":
        outs = [model(x)]
    elif mode == "loss":
        outs = [model(x, L.pose_samples(2), mode="loss")["loss_kpt"]]
    else:
        outs = [t for s in model(x, L.pose_samples(2), mode="predict")
                for t in (s.pred_instances.keypoints, s.pred_instances.keypoint_scores)]
    params = [p for p in model.parameters()]
    grads = _grads(outs, [x] + params) if mode != "predict" else []
    return outs, list(grads), [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("mode,train", [("tensor", True), ("loss", True), ("predict", False)])
def test_pose_estimator_fused_in_every_mode(mode, train, head_calls):
    model = L.pose_estimator("v2", test_cfg=dict(flip_test=True)).double().train(train)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    before = copy.deepcopy(model)
    expected = _pose_run(model, x, mode)
    feats = before.extract_feat(x)
    patched = copy.deepcopy(before)
    report = hrfast.patch(patched, backend="reference")
    rows = {r.name: r for r in report.rows if r.kind == "head"}
    assert rows[""].status == "patched" and "fused as hrfast.nn.HRNetV2Head" in rows[""].detail, report
    assert "head MACs per branch-0 pixel 990 -> 202.5 (4.9x fewer" in rows[""].detail
    assert rows["head"].status == "skipped" and "with the HRNetV2 head layers (30 -> 30 -> 3)" in rows["head"].detail
    assert list(patched.state_dict()) == list(before.state_dict())
    actual = _pose_run(patched, x, mode)
    assert head_calls[0] == (2 if mode == "predict" else 1)  # flip test: the image and its mirror
    for what, a, e in zip(("outputs", "gradients", "buffers"), actual, expected):
        _assert_all_close(a, e, what)
    with torch.no_grad():  # the neck's output stays the concat for every other consumer
        _assert_all_close(patched.extract_feat(x), feats, "extract_feat")
        _assert_all_close(patched.neck(before.backbone(x)), feats, "neck")


def test_pose_unpatch_restores_bitwise():
    model = L.pose_estimator("v2", test_cfg=dict(flip_test=True)).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = _pose_run(model, x, "tensor")
    hrfast.patch(model, backend="reference")
    report = hrfast.unpatch(model)
    assert [r.name for r in report.unpatched] == [""] and "forward" not in model.__dict__
    actual = _pose_run(model, x, "tensor")
    assert all(torch.equal(a, e) for a, e in zip(actual[0] + list(actual[1]), expected[0] + list(expected[1])))


def test_pose_estimator_triton_reorders(head_calls):
    model = L.pose_estimator("v2").double().eval()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        hrfast.patch(model, backend="triton")
        actual = model(x)
    assert head_calls[0] == 1 and 0 < rel_error(actual, expected) <= FP64_TOL


def _overrides_predict(model):
    class MyEstimator(type(model)):
        def predict(self, inputs, data_samples):
            return super().predict(inputs, data_samples)

    model.__class__ = MyEstimator
    return model


POSE_ROWS = {
    "w32": (lambda: L.pose_estimator("w32"), None,
            "mmpose HeatmapHead over one feature map (final_layer only (no conv_layers)): not an HRNetV2 head"),
    "relu-neck": (lambda: L.pose_estimator("v2", neck=dict(apply_relu=True)),
                  "applies a ReLU or rescales after the concat", "with the HRNetV2 head layers"),
    "subclass": (lambda: _overrides_predict(L.pose_estimator("v2")), "MyEstimator overrides predict",
                 "with the HRNetV2 head layers"),
}


@pytest.mark.parametrize("case", list(POSE_ROWS))
def test_pose_rows_say_what_was_found(case, head_calls):
    build, model_reason, head_reason = POSE_ROWS[case]
    model = build().double().eval()
    expected = model(torch.ones(1, 3, 16, 16, dtype=torch.float64))
    report = hrfast.patch(model, backend="reference")
    rows = {r.name: r for r in report.rows if r.kind == "head"}
    assert rows["head"].status == "skipped" and head_reason in rows["head"].detail, report
    if model_reason is None:
        assert "" not in rows or "no HRNetV2 concat head found" in rows[""].detail
    else:
        assert rows[""].status == "skipped" and model_reason in rows[""].detail, report
    assert torch.equal(model(torch.ones(1, 3, 16, 16, dtype=torch.float64)), expected) and head_calls[0] == 0


def test_deferred_concat_reads_as_the_neck_output():
    from hrfast._patch.mmpose import DeferredConcat

    neck = L._FeatureMapProcessor(concat=True)
    xs = L.branches(size=(8, 8))
    deferred = DeferredConcat(neck, xs, xs)
    assert len(deferred) == 1 and torch.equal(deferred[-1], neck(xs)[0])


# ------------------------------------------------------------------------------------------- real packages


def test_real_mmdet_hrfpn():
    necks = pytest.importorskip("mmdet.models.necks")
    neck = necks.HRFPN(list(CHANNELS), 5, with_cp=True).double()
    xs = L.branches()
    expected = _run(neck, xs)
    assert hrfast.patch(neck, backend="reference").count("patched", "head") == 1
    actual = _run(neck, xs)
    _assert_all_close(actual[0], expected[0], "outputs")
    _assert_all_close(actual[1], expected[1], "gradients")


def test_real_mmpose_estimator():
    pytest.importorskip("mmpose")
    from mmpose.models.heads import HeatmapHead
    from mmpose.models.necks import FeatureMapProcessor
    from mmpose.models.pose_estimators import TopdownPoseEstimator

    model = TopdownPoseEstimator(backbone=dict(type="HRNet", extra=dict(
        stage1=dict(num_modules=1, num_branches=1, block="BOTTLENECK", num_blocks=(1,), num_channels=(8,)),
        stage2=dict(num_modules=1, num_branches=2, block="BASIC", num_blocks=(1, 1), num_channels=(2, 4)),
        stage3=dict(num_modules=1, num_branches=3, block="BASIC", num_blocks=(1, 1, 1), num_channels=(2, 4, 8)),
        stage4=dict(num_modules=1, num_branches=4, block="BASIC", num_blocks=(1,) * 4, num_channels=CHANNELS,
                    multiscale_output=True))))
    model.neck = FeatureMapProcessor(concat=True)
    model.head = HeatmapHead(30, 3, deconv_out_channels=None, conv_out_channels=(30,), conv_kernel_sizes=(1,))
    model = model.double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        assert hrfast.patch(model, backend="reference").count("patched", "head") == 1
        assert rel_error(model(x), expected) <= FP64_TOL
