"""HRNetV2Head (hrfast.nn) against the eager HRNetV2 heads it replaces, built as HRNET_LAYOUTS.md section 4
describes them (the official MSRA and mm* code bases cannot be installed here):

- official segmentation (seg_hrnet.py): `last_layer = Sequential(Conv2d(15C, 15C, 1, bias=True), BatchNorm2d,
  ReLU(inplace=True), Conv2d(15C, K, 1, bias=True))` after a concat done in `HighResolutionNet.forward`
  (bilinear to x0's size, `ALIGN_CORNERS` True or False);
- facial landmarks: the same structure as `head`, BN momentum 0.01, bilinear align_corners=False;
- mmseg `FCNHead(input_transform='resize_concat', num_convs=1, kernel_size=1, concat_input=False,
  dropout_ratio=-1)`: `convs.0.{conv (no bias), bn, activate}`, `conv_seg`; every input, x0 included, is resized;
- mmpose 1.x `HeatmapHead` after the `FeatureMapProcessor(concat=True)` neck: `conv_layers.{0, 1, 2}` and
  `final_layer`.

Every comparison runs the eager module on float64 copies and HRNetV2Head over a deep copy of the same layers
in float64 (FP64_RTOL) or float32 (FP32_RTOL): the logits, the gradients of every branch input and of every
parameter for a random upstream gradient, and every buffer (running statistics, num_batches_tracked) after
the step. In training the conv bias's gradient is zero (BN removes the mean it shifts): eager gives round-off,
the kernel exact zeros, so it is checked against an absolute bound scaled by the conv weight's gradient.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hrfast.nn.head as head_module
from hrfast.nn import HRNetV2Head
from hrfast.ops import Resample
from hrfast.testing import FP32_RTOL, FP64_RTOL, assert_low_precision_close, assert_rel_close, low_precision_budget

from conftest import TRITON_DEVICE
from hrnet_layouts import _HeatmapHead as HeatmapHead  # mmpose 1.x, as in its source

DEVICE = TRITON_DEVICE
BACKENDS = ("reference", "triton", "cuda")
CHANNELS = (4, 6, 8, 10)
# official seg / face: each branch is a 3x3 stride-2 conv of the previous one, so ceil(n / 2) (odd sizes)
ODD_SIZES = ((5, 4), (3, 2), (2, 1), (1, 1))
K = 3


# --------------------------------------------------------------------------------------- the eager heads


def _last_layer(width: int, num_classes: int, momentum: float = 0.1, norm=None, cls_kernel: int = 1):
    """seg_hrnet.py `last_layer` / facial `head`: conv1x1 (bias) - BN - ReLU(inplace) - classifier (bias)."""
    return nn.Sequential(
        nn.Conv2d(width, width, kernel_size=1, stride=1, padding=0, bias=True),
        norm(width) if norm is not None else nn.BatchNorm2d(width, momentum=momentum),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, num_classes, kernel_size=cls_kernel, stride=1, padding=1 if cls_kernel == 3 else 0))


class OfficialSegHead(nn.Module):
    """What `HighResolutionNet.forward` (HRNet-Semantic-Segmentation, HRNet-OCR branch) does after stage 4."""

    def __init__(self, channels, num_classes, align_corners, momentum=0.1, norm=None):
        super().__init__()
        self.align_corners = align_corners  # the module global ALIGN_CORNERS
        self.last_layer = _last_layer(sum(channels), num_classes, momentum, norm)

    def forward(self, x):
        x0_h, x0_w = x[0].size(2), x[0].size(3)
        ups = [x[0]] + [F.interpolate(x[j], size=(x0_h, x0_w), mode="bilinear", align_corners=self.align_corners)
                        for j in range(1, len(x))]
        return self.last_layer(torch.cat(ups, 1))

    def fused(self, backend):
        return HRNetV2Head.from_module(self.last_layer, resample=Resample("bilinear", align_corners=self.align_corners),
                                       backend=backend)


class FacialHead(nn.Module):
    """HRNet-Facial-Landmark-Detection `HighResolutionNet.forward` + `head` (BN momentum 0.01)."""

    def __init__(self, channels, num_joints):
        super().__init__()
        self.head = _last_layer(sum(channels), num_joints, momentum=0.01)

    def forward(self, x):
        h, w = x[0].size(2), x[0].size(3)
        ups = [x[0]] + [F.interpolate(x[j], size=(h, w), mode="bilinear", align_corners=False)
                        for j in range(1, len(x))]
        return self.head(torch.cat(ups, 1))

    def fused(self, backend):
        return HRNetV2Head.from_module(self.head, backend=backend)  # default: bilinear, align_corners=False


class ConvModule(nn.Module):
    """mmcv ConvModule(norm_cfg=BN, act_cfg=ReLU): conv (bias='auto' -> False with a norm), bn, activate."""

    def __init__(self, in_channels, out_channels, momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, momentum=momentum)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class FCNHead(nn.Module):
    """mmseg FCNHead with input_transform='resize_concat' (fcn_hr18.py), BaseDecodeHead's forward path."""

    def __init__(self, in_channels, channels, num_classes, align_corners=False, concat_input=False, dropout=None,
                 input_transform="resize_concat", num_convs=1, momentum=0.1):
        super().__init__()
        self.in_channels = list(in_channels)
        self.channels = channels
        self.in_index = tuple(range(len(in_channels)))
        self.input_transform = input_transform
        self.align_corners = align_corners
        self.concat_input = concat_input
        self.num_classes = num_classes
        self.convs = nn.Sequential(*[ConvModule(sum(in_channels) if k == 0 else channels, channels, momentum)
                                     for k in range(num_convs)])
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = dropout  # None for dropout_ratio=-1, else nn.Dropout2d

    def _transform_inputs(self, inputs):
        inputs = [inputs[i] for i in self.in_index]
        upsampled = [F.interpolate(x, size=inputs[0].shape[2:], mode="bilinear", align_corners=self.align_corners)
                     for x in inputs]  # x0 too: an identity resize
        return torch.cat(upsampled, dim=1)

    def forward(self, inputs):
        feats = self.convs(self._transform_inputs(inputs))
        if self.dropout is not None:
            feats = self.dropout(feats)
        return self.conv_seg(feats)

    def fused(self, backend):
        return HRNetV2Head.from_module(self, backend=backend)  # resampling read from align_corners


class FeatureMapProcessor(nn.Module):
    """mmpose neck FeatureMapProcessor(concat=True): every input resized to inputs[0]'s size, then cat."""

    def forward(self, inputs):
        size = inputs[0].shape[-2:]
        return [torch.cat([F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in inputs], 1)]


class PoseModel(nn.Module):
    """neck + head as mmpose's TopdownPoseEstimator chains them."""

    def __init__(self, channels, num_keypoints):
        super().__init__()
        self.neck = FeatureMapProcessor()
        self.head = HeatmapHead(sum(channels), num_keypoints)

    def forward(self, x):
        return self.head(self.neck(x))

    def fused(self, backend):
        return HRNetV2Head.from_module(self.head, backend=backend)


LAYOUTS = {
    "official_seg_corners": lambda c: OfficialSegHead(c, K, align_corners=True),
    "official_seg_no_corners": lambda c: OfficialSegHead(c, K, align_corners=False),
    "facial": lambda c: FacialHead(c, K),
    "mmseg": lambda c: FCNHead(c, sum(c) + 2, K),  # channels != 15C: the head width is free
    "mmpose": lambda c: PoseModel(c, K),
}


def _params_module(eager: nn.Module) -> nn.Module:
    """The module whose parameters HRNetV2Head adopts (same names): last_layer, head, the FCNHead, HeatmapHead."""
    for attr in ("last_layer", "head"):
        if isinstance(getattr(eager, attr, None), nn.Sequential):
            return getattr(eager, attr)
    return eager.head if isinstance(eager, PoseModel) else eager


def _randomize(module: nn.Module) -> nn.Module:
    """Non-trivial BN parameters and running statistics (positive variances), num_batches_tracked 7."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.weight is not None:
                sign = torch.where(torch.rand(m.weight.shape) < 0.5, -1.0, 1.0)
                m.weight.copy_(sign * (0.5 + torch.rand(m.weight.shape)))
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    return module


def _make(layout: str, channels=CHANNELS) -> nn.Module:
    return _randomize(LAYOUTS[layout](channels))


def _copy(module: nn.Module, dtype: torch.dtype, train: bool) -> nn.Module:
    return copy.deepcopy(module).to(device=DEVICE, dtype=dtype).train(train)


def _inputs(channels=CHANNELS, sizes=ODD_SIZES, batch=2, dtype=torch.float64):
    # post-ReLU like real branch outputs
    return [torch.randn(batch, c, *hw, device=DEVICE, dtype=dtype).relu() for c, hw in zip(channels, sizes)]


# ----------------------------------------------------------------------------------------------- comparing


def _collect(run, params: nn.Module, xs, grad_seed: int, backward: bool = True, keep=None) -> dict:
    """Logits, input and parameter gradients after run(xs) and a backward of a random cotangent (zero where
    the boolean [N, 1, H, W] `keep` is False), buffers."""
    leaves = [x.detach().clone().requires_grad_(backward) for x in xs]
    out = run(leaves)
    res = {"logits": out.detach()}
    if backward:
        gen = torch.Generator(device="cpu").manual_seed(grad_seed)
        gy = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
        if keep is not None:
            gy = gy * keep.to(gy.dtype)
        out.backward(gy)
        res.update({f"grad xs[{j}]": x.grad for j, x in enumerate(leaves)})
        res.update({f"grad {n}": p.grad for n, p in params.named_parameters()})
    res.update({f"buffer {n}": b.detach().clone() for n, b in params.named_buffers()})
    return res


def _conv_bias_key(fused: HRNetV2Head):
    bias = fused.conv.bias
    if bias is None:
        return None
    return "grad " + next(n for n, p in fused.named_parameters() if p is bias)


def _compare(actual: dict, expected: dict, check, zero_key=None, zero_scale_key=None, zero_tol=None) -> None:
    """Every entry; `zero_key` (the conv bias's gradient with batch statistics) against an absolute bound:
    zero_tol x the norm of expected[zero_scale_key]."""
    assert actual.keys() == expected.keys()
    for name, exp in expected.items():
        act = actual[name]
        assert exp is not None and act is not None, f"{name}: missing"
        assert act.shape == exp.shape, name
        if not exp.is_floating_point():  # num_batches_tracked
            assert torch.equal(act.cpu(), exp.cpu()), f"{name}: {act} != {exp}"
        elif name == zero_key:
            scale = expected[zero_scale_key].double().norm().item()
            assert scale > 0
            assert exp.double().norm().item() <= 1e-12 * scale, f"{name}: the eager float64 gradient is not ~0"
            err = (act.double() - exp.double()).norm().item()
            assert err <= zero_tol * scale, f"{name}: {err:.3e} exceeds {zero_tol:.1e} x {scale:.3e}"
        else:
            check(act, exp, name)


def _check_layout(layout: str, dtype, train: bool, backend: str, channels=CHANNELS, sizes=ODD_SIZES):
    eager = _make(layout, channels)
    ref = _copy(eager, torch.float64, train)
    fast_src = _copy(eager, dtype, train)
    fused = fast_src.fused(backend)
    xs = _inputs(channels, sizes, batch=2 if train else 1)
    expected = _collect(ref, _params_module(ref), xs, grad_seed=1)
    actual = _collect(fused, fused, [x.to(dtype) for x in xs], grad_seed=1)
    assert actual["logits"].dtype == dtype
    rtol = FP64_RTOL if dtype == torch.float64 else FP32_RTOL
    key = _conv_bias_key(fused)
    _compare(actual, expected, lambda a, e, name: assert_rel_close(a, e, rtol, name),
             zero_key=key if train else None, zero_scale_key=key and key.replace("bias", "weight"), zero_tol=rtol)
    bn, initial = fused.norm, _params_module(eager)
    initial_mean = next(m for m in initial.modules() if isinstance(m, nn.BatchNorm2d)).running_mean
    if train:  # the statistics did move (a trivially unchanged buffer would pass the comparison)
        assert bn.num_batches_tracked.item() == 8
        assert not torch.equal(bn.running_mean, initial_mean.to(bn.running_mean))
    else:
        assert bn.num_batches_tracked.item() == 7
        assert torch.equal(bn.running_mean, initial_mean.to(bn.running_mean))


OTHER_LAYOUTS = ["official_seg_no_corners", "facial", "mmseg", "mmpose"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_official_seg(dtype, train, backend):
    """Official seg last_layer, ALIGN_CORNERS True (the default of the HRNet-OCR branch): the full matrix."""
    _check_layout("official_seg_corners", dtype, train, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train, dtype", [(False, torch.float32), (True, torch.float64)],
                         ids=["eval-fp32", "train-fp64"])
@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
def test_layouts(layout, train, dtype, backend):
    _check_layout(layout, dtype, train, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
def test_layouts_train_fp32_eval_fp64(layout, backend):
    """The other two (train, dtype) combinations, on three branches to keep the interpreter quick."""
    _check_layout(layout, torch.float32, True, backend, CHANNELS[:3], ((4, 4), (2, 2), (1, 1)))
    _check_layout(layout, torch.float64, False, backend, CHANNELS[:3], ((3, 5), (2, 3), (1, 2)))


# ------------------------------------------------------------------------------------- state, construction


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_state_dict_is_the_sources(layout):
    eager = _make(layout)
    src = _params_module(eager)
    fused = eager.fused("reference")
    expected, actual = src.state_dict(), fused.state_dict()
    assert list(actual.keys()) == list(expected.keys())
    for k, v in expected.items():
        assert actual[k].data_ptr() == v.data_ptr() and torch.equal(actual[k], v), k
    # the roles are the source's own modules
    for role in ("conv", "norm", "classifier"):
        assert any(getattr(fused, role) is m for m in src.modules()), role
    # and a checkpoint of the original module loads
    other = _params_module(_make(layout))
    fused.load_state_dict(other.state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(src.state_dict()[k], v), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_channels(backend):
    head = HRNetV2Head.from_channels([4, 6, 8], 5, backend=backend)
    assert head.layout == "sequential" and head.backend == backend
    assert head.conv.weight.shape == (18, 18, 1, 1) and head.conv.bias is not None
    assert isinstance(head.norm, nn.BatchNorm2d) and head.norm.momentum == 0.1
    assert head.classifier.weight.shape == (5, 18, 1, 1) and head.classifier.bias is not None
    assert list(head.state_dict().keys()) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                              "1.running_var", "1.num_batches_tracked", "3.weight", "3.bias"]
    other = HRNetV2Head.from_channels((4, 6), 2, conv_bias=False, cls_bias=False, bn_momentum=0.01,
                                      resample="nearest", backend=backend)
    assert other.conv.bias is None and other.classifier.bias is None and other.norm.momentum == 0.01
    assert other.resample == Resample("nearest")
    # it computes what its own layers compute eagerly
    _randomize(head)
    head = head.to(device=DEVICE, dtype=torch.float64).train()
    eager = nn.Sequential(*[copy.deepcopy(m) for m in head.children()])
    xs = _inputs((4, 6, 8), ((4, 3), (2, 2), (1, 2)))

    def run_eager(x):
        size = x[0].shape[2:]
        return eager(torch.cat([x[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False)
                                         for t in x[1:]], 1))

    expected = _collect(run_eager, eager, xs, grad_seed=2)
    actual = _collect(head, head, xs, grad_seed=2)
    _compare(actual, expected, lambda a, e, name: assert_rel_close(a, e, FP64_RTOL, name),
             zero_key="grad 0.bias", zero_scale_key="grad 0.weight", zero_tol=FP64_RTOL)


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.LeakyReLU(), nn.Conv2d(6, 2, 1)),
     r"2 must be nn.ReLU, got LeakyReLU"),
    (lambda: nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.GELU(), nn.Conv2d(6, 2, 1)), r"nn.ReLU"),
    (lambda: _last_layer(6, 2, cls_kernel=3), r"3 must be a plain 1x1 conv"),  # openseg-style 3x3 classifier
    (lambda: nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1)),
     r"0 must be a plain 1x1 conv"),
    # facial head with FINAL_CONV_KERNEL=3: the first conv keeps k=1 but gets padding 1 (latent bug upstream)
    (lambda: nn.Sequential(nn.Conv2d(6, 6, 1, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1)),
     r"0 must be a plain 1x1 conv"),
    (lambda: nn.Sequential(nn.Conv2d(6, 6, 1, stride=2), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1)),
     r"0 must be a plain 1x1 conv"),
    (lambda: nn.Sequential(nn.Conv2d(6, 6, 1, groups=2), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1)),
     r"0 must be a plain 1x1 conv"),
    (lambda: nn.Sequential(nn.Linear(6, 6), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1)),
     r"0 must be an nn.Conv2d"),
    (lambda: FCNHead((2, 4), 6, 2, concat_input=True), r"concat_input=True"),
    (lambda: FCNHead((2, 4), 6, 2, dropout=nn.Dropout2d(0.1)), r"dropout"),
    (lambda: FCNHead((2, 4), 6, 2, input_transform="multiple_select"), r"input_transform='multiple_select'"),
    (lambda: FCNHead((2, 4), 6, 2, num_convs=2), r"exactly one ConvModule"),
    (lambda: nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU()), r"cannot recognise Sequential"),
    (lambda: nn.Conv2d(6, 6, 1), r"cannot recognise Conv2d"),
])
def test_from_module_refuses(make, match):
    with pytest.raises(ValueError, match=match):
        HRNetV2Head.from_module(make())


def test_from_module_accepts_zero_dropout():
    """A Dropout2d(p=0) before conv_seg is an identity (mmseg itself stores None for dropout_ratio <= 0)."""
    head = FCNHead((2, 4), 6, 2, dropout=nn.Dropout2d(0.0))
    assert HRNetV2Head.from_module(head).layout == "mmseg"


def test_constructor_validation():
    seq = _last_layer(6, 2)
    with pytest.raises(ValueError, match=r"layout must be one of"):
        HRNetV2Head(seq, "timm")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        HRNetV2Head(seq, backend="cuda_graphs")
    with pytest.raises(ValueError, match=r"does not have the mmseg head layout"):
        HRNetV2Head(seq, "mmseg")
    with pytest.raises(ValueError, match=r"Resample.mode must be one of"):
        HRNetV2Head(seq, resample="bicubic")
    with pytest.raises(ValueError, match=r"in_channels must be positive ints"):
        HRNetV2Head.from_channels([], 3)
    with pytest.raises(ValueError, match=r"in_channels must be positive ints"):
        HRNetV2Head.from_channels([4, 0], 3)
    with pytest.raises(ValueError, match=r"num_classes must be a positive int"):
        HRNetV2Head.from_channels([4, 6], 0)
    with pytest.raises(TypeError, match=r"xs must be a list or tuple"):
        HRNetV2Head(seq, backend="reference")(torch.randn(1, 6, 2, 2))


def test_extra_repr():
    text = repr(OfficialSegHead((2, 4), 3, align_corners=True).fused("triton"))
    assert "layout='sequential', resample=bilinear(align_corners=True), backend='triton'" in text
    assert FCNHead((2, 4), 6, 2, align_corners=False).fused("auto").extra_repr() == \
        "layout='mmseg', resample=bilinear(align_corners=False), backend='auto'"
    assert PoseModel((2, 4), 3).fused("reference").extra_repr() == \
        "layout='mmpose', resample=bilinear(align_corners=False), backend='reference'"
    assert HRNetV2Head.from_channels([2, 4], 3, resample="nearest").extra_repr() == \
        "layout='sequential', resample=nearest, backend='auto'"


def test_mmseg_align_corners_read_from_head():
    assert FCNHead((2, 4), 6, 2, align_corners=True).fused("reference").resample == \
        Resample("bilinear", align_corners=True)
    explicit = HRNetV2Head.from_module(FCNHead((2, 4), 6, 2, align_corners=True), resample="nearest")
    assert explicit.resample == Resample("nearest")


# ------------------------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_none_cumulative_average(backend):
    """BN momentum=None: running statistics are the cumulative average (factor 1/num_batches_tracked), over
    three training steps with fresh inputs; outputs and buffers after each step."""
    eager = _make("official_seg_no_corners")
    eager.last_layer[1].momentum = None
    ref = _copy(eager, torch.float64, True)
    fast = _copy(eager, torch.float64, True)
    fused = fast.fused(backend)
    for step in range(3):
        xs = _inputs()
        expected = _collect(ref, ref.last_layer, xs, step, backward=False)
        actual = _collect(fused, fused, xs, step, backward=False)
        _compare(actual, expected, lambda a, e, name: assert_rel_close(a, e, FP64_RTOL, name))
    assert fused.norm.num_batches_tracked.item() == 7 + 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["affine_false", "untracked", "momentum_0.3_eps_1e-3"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batch_norm_variants(train, variant, backend):
    """BN without affine parameters, without running statistics (batch statistics in eval too), other
    momentum and eps: the fused head follows nn.BatchNorm2d."""
    def norm(c):
        if variant == "affine_false":
            return nn.BatchNorm2d(c, affine=False)
        if variant == "untracked":
            return nn.BatchNorm2d(c, track_running_stats=False)
        return nn.BatchNorm2d(c, momentum=0.3, eps=1e-3)

    channels, sizes = (4, 6), ((4, 3), (2, 2))
    eager = _randomize(OfficialSegHead(channels, K, align_corners=False, norm=norm))
    ref = _copy(eager, torch.float64, train)
    fused = _copy(eager, torch.float64, train).fused(backend)
    xs = _inputs(channels, sizes)
    expected = _collect(ref, ref.last_layer, xs, grad_seed=3)
    actual = _collect(fused, fused, xs, grad_seed=3)
    batch_stats = train or variant == "untracked"
    _compare(actual, expected, lambda a, e, name: assert_rel_close(a, e, FP64_RTOL, name),
             zero_key="grad 0.bias" if batch_stats else None, zero_scale_key="grad 0.weight", zero_tol=FP64_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
def test_single_value_per_channel_raises_like_bn(track, backend):
    """Training on a 1x1 x0 with batch 1: nn.BatchNorm2d raises ValueError; so does the fused head."""
    eager = OfficialSegHead((4, 6), K, align_corners=False,
                            norm=lambda c: nn.BatchNorm2d(c, track_running_stats=track)).to(DEVICE).train()
    xs = _inputs((4, 6), ((1, 1), (1, 1)), batch=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        eager(xs)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        eager.fused(backend)(xs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_groupnorm_runs_eager(train, backend, monkeypatch):
    """A norm that cannot be folded (GroupNorm) runs the eager concat form with the head's own layers."""
    def no_fused_op(*args, **kwargs):
        raise AssertionError("a GroupNorm head must not call hrnet_v2_head")

    monkeypatch.setattr(head_module, "hrnet_v2_head", no_fused_op)
    channels, sizes = (4, 6, 8), ((5, 4), (3, 2), (2, 1))
    eager = _randomize(OfficialSegHead(channels, K, align_corners=False, norm=lambda c: nn.GroupNorm(3, c)))
    ref = _copy(eager, torch.float64, train)
    fused = _copy(eager, torch.float64, train).fused(backend)
    xs = _inputs(channels, sizes)
    expected = _collect(ref, ref.last_layer, xs, grad_seed=4)
    actual = _collect(fused, fused, xs, grad_seed=4)
    _compare(actual, expected, lambda a, e, name: assert_rel_close(a, e, FP64_RTOL, name))


# -------------------------------------------------------------------------------------- low precision


def _away_from_kink(eager: OfficialSegHead, xs, train: bool) -> torch.Tensor:
    """[N, 1, H, W]: pixels where every channel's pre-ReLU value is farther from 0 than 4x the largest error
    PyTorch's autocast makes of it in that channel (see tests/test_head_op.py's `_away_from_kink`: a ReLU
    decision made by rounding, in either implementation, otherwise dominates that pixel's input gradient)."""
    def pre_relu(dtype, autocast):
        m = _copy(eager, dtype, train)
        with torch.no_grad(), torch.autocast(device_type=DEVICE, dtype=torch.bfloat16, enabled=autocast):
            h, w = xs[0].shape[2:]
            ups = [xs[0].to(dtype)] + [F.interpolate(x.to(dtype), size=(h, w), mode="bilinear",
                                                     align_corners=m.align_corners) for x in xs[1:]]
            return m.last_layer[1](m.last_layer[0](torch.cat(ups, 1))).double()

    pre64 = pre_relu(torch.float64, False)
    band = 4 * (pre_relu(torch.float32, True) - pre64).abs().amax(dim=(0, 2, 3), keepdim=True)
    keep = (pre64.abs() > band).all(dim=1, keepdim=True)
    assert keep.double().mean() >= 0.25, f"only {keep.double().mean():.0%} of the pixels are away from the kink"
    return keep


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_autocast_bf16(train, backend):
    """Under torch.autocast(bfloat16) the fused head runs in bf16 like the eager head's convs, and stays
    within twice PyTorch's own autocast error (logits and every gradient) against float64."""
    channels, sizes = (4, 6, 8), ((5, 4), (3, 2), (2, 1))
    eager = _randomize(OfficialSegHead(channels, K, align_corners=True))
    ref = _copy(eager, torch.float64, train)
    low = _copy(eager, torch.float32, train)
    fused = _copy(eager, torch.float32, train).fused(backend)
    xs = [x.float() for x in _inputs(channels, sizes)]
    keep = _away_from_kink(eager, xs, train)
    expected = _collect(ref, ref.last_layer, [x.double() for x in xs], grad_seed=5, keep=keep)
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):  # CPU autocast without a GPU
        pytorch_low = _collect(low, low.last_layer, xs, grad_seed=5, keep=keep)
        actual = _collect(fused, fused, xs, grad_seed=5, keep=keep)
    assert actual["logits"].dtype == pytorch_low["logits"].dtype == torch.bfloat16
    zero_tol = low_precision_budget(pytorch_low["grad 0.weight"], expected["grad 0.weight"], torch.bfloat16)
    _compare(actual, expected, lambda a, e, name: assert_low_precision_close(a, e, pytorch_low[name], name,
                                                                             dtype=torch.bfloat16),
             zero_key="grad 0.bias" if train else None, zero_scale_key="grad 0.weight", zero_tol=zero_tol)
