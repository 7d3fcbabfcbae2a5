"""`hrfast.ops.hrnet_v2_head` (the fused HRNetV2 head) against its plain PyTorch reference `head_ref`.

    logits = Cls( ReLU( BN( Conv1x1( cat[x0, Up(x1), Up(x2), Up(x3)] ) ) ) )

The main checks run each fused backend (`fused` fixture): Triton (on CPU through the Triton interpreter when
there is no GPU, see conftest.py) and the CUDA C++ backend (cuBLAS projections + the CUDA fusion kernels; on
CPU its kernels on the host build's emulated CUDA grid, HRFAST_CSRC_ON_CPU=1), and compare it with
`head_ref` evaluated in float64 on the same values: the logits, every gradient (each branch input, conv
weight and bias, BN weight and bias, classifier weight and bias) for a random upstream gradient and, in training, the running statistics after the call. fp32 must be within FP32_RTOL,
fp64 within FP64_RTOL, fp16/bf16 within twice the error plain PyTorch itself makes in that dtype (`head_ref`
on the low-precision tensors, gradients by autograd through it). Launch buffers start as NaN (conftest), so an
element a kernel forgets to write fails. Shapes stay tiny because the interpreter is slow; the cost of a case
is dominated by the backward's upsample adjoint, whose window grows with the resize ratio.

With batch statistics (training, or eval without running statistics) the conv bias only shifts BN's mean, so
its gradient is mathematically zero: the float64 reference yields round-off there and the kernel exact zeros.
That gradient is checked against an absolute bound scaled by the conv weight's gradient, not relatively.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

from hrfast.ops import Resample, head_ref, hrnet_v2_head
from hrfast.ops.reference import resample_ref
from hrfast.testing import FP32_RTOL, assert_rel_close, low_precision_budget

from conftest import TRITON_DEVICE
from optest import (LOW_PRECISION, assert_matches, conv_weight, gradcheck_named, gradients, leaf_copy, small_head,
                    tolerance)


@pytest.fixture
def fused(fused_backend):
    """The fused backend under test (conftest's `fused_backend`)."""
    return fused_backend

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
CL = torch.channels_last
DEV = TRITON_DEVICE


# ---------------------------------------------------------------------------- the harness: bf16 tl.dot


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_interpreter_dot_multiplies_values(dtype):
    """`tl.dot` of bf16/fp16 operands with fp32 accumulation equals the fp32 product of their values (exact
    products; only the fp32 summation order may differ): natively on a GPU, under the interpreter through
    conftest's `interpreter_bf16_dot` for bf16."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, PRECISION: tl.constexpr):
        r = tl.arange(0, 16)
        a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
        b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
        tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b, out_dtype=tl.float32, input_precision=PRECISION))

    a = torch.randn(16, 16, device=DEV).to(dtype)
    b = torch.randn(16, 16, device=DEV).to(dtype)
    c = torch.empty(16, 16, device=DEV)
    dot_kernel[(1,)](a, b, c, PRECISION="tf32")
    assert_rel_close(c, a.double() @ b.double(), 1e-6, "a @ b")


# ------------------------------------------------------------------------------------------------- helpers


def near(scale_factor=None) -> Resample:
    return Resample("nearest", scale_factor=scale_factor)


def bil(scale_factor=None, align_corners=None) -> Resample:
    return Resample("bilinear", align_corners=align_corners, scale_factor=scale_factor)


class Case(NamedTuple):
    """One head problem. `resample` is passed to hrnet_v2_head as is (None: its default)."""

    channels: Tuple[int, ...]
    sizes: Sequence[Tuple[int, int]]
    resample: object = None
    N: int = 1
    M: Optional[int] = None  # head width; None: sum(channels), the 15C of HRNetV2
    K: int = 3
    conv_bias: bool = True
    cls_bias: bool = True
    affine: bool = True  # BN weight and bias (False: both None)
    running: bool = True  # running statistics given (False: batch statistics, also in eval)
    momentum: float = 0.1
    eps: float = 1e-5

    @property
    def width(self) -> int:
        return self.M if self.M is not None else sum(self.channels)


def _resamples(case: Case) -> list:
    """The per-low-branch list that head_ref takes (what hrnet_v2_head makes of `case.resample`)."""
    lows = len(case.channels) - 1
    r = case.resample
    if r is None:
        return [bil(align_corners=False)] * lows
    if isinstance(r, (list, tuple)):
        return list(r)
    return [r] * lows


# ------------------------------------------------------------------------------------------------ builders


def _branch(shape, dtype, layout: str, j: int) -> torch.Tensor:
    """A fresh random leaf: "nchw", "channels_last", or "mixed" (x0 channels_last; the low branches a
    transposed buffer (odd j) or every other channel of a wider tensor (even j), neither layout)."""
    N, C, H, W = shape
    if layout == "nchw":
        x = torch.randn(shape, dtype=dtype, device=DEV)
    elif layout == "channels_last" or (layout == "mixed" and j == 0):
        x = torch.randn(shape, dtype=dtype, device=DEV).contiguous(memory_format=CL)
    elif layout == "mixed":
        if j % 2:
            x = torch.randn(N, C, W, H, dtype=dtype, device=DEV).transpose(2, 3)
        else:
            x = torch.randn(N, 2 * C, H, W, dtype=dtype, device=DEV)[:, ::2]
    else:
        raise ValueError(layout)
    return x.detach().requires_grad_()


def _build(case: Case, dtype, layout: str = "nchw", bn_dtype=None) -> dict:
    """Fresh arguments of hrnet_v2_head. Weights are scaled so that the pre-BN activation is O(1) and the
    ReLU cuts about half of it; BN weights are away from 0 with random signs; running statistics are far
    from (0, 1) so that a kernel ignoring them fails."""
    bn_dtype = bn_dtype or dtype
    M, K, C = case.width, case.K, sum(case.channels)

    def leaf(t, dt=dtype):
        return t.to(dtype=dt, device=DEV).requires_grad_()

    args = {"xs": [_branch((case.N, c, *hw), dtype, layout, j) for j, (c, hw) in enumerate(zip(case.channels,
                                                                                           case.sizes))]}
    args["conv_weight"] = leaf(torch.randn(M, C, 1, 1) / math.sqrt(C))
    args["conv_bias"] = leaf(0.5 * torch.randn(M)) if case.conv_bias else None
    if case.running:
        args["running_mean"] = (0.5 * torch.randn(M)).to(dtype=bn_dtype, device=DEV)
        args["running_var"] = (0.5 + torch.rand(M)).to(dtype=bn_dtype, device=DEV)
    else:
        args["running_mean"] = args["running_var"] = None
    if case.affine:
        sign = torch.where(torch.rand(M) < 0.5, -1.0, 1.0)
        args["bn_weight"] = leaf(sign * (0.5 + torch.rand(M)), bn_dtype)
        args["bn_bias"] = leaf(0.5 * torch.randn(M), bn_dtype)
    else:
        args["bn_weight"] = args["bn_bias"] = None
    args["cls_weight"] = leaf(torch.randn(K, M, 1, 1) / math.sqrt(M))
    args["cls_bias"] = leaf(torch.randn(K)) if case.cls_bias else None
    return args


PARAM_NAMES = ("conv_weight", "conv_bias", "bn_weight", "bn_bias", "cls_weight", "cls_bias")


def _leaves(args: dict) -> list:
    """(name, tensor) of every differentiable argument."""
    named = [(f"xs[{j}]", x) for j, x in enumerate(args["xs"])]
    return named + [(name, args[name]) for name in PARAM_NAMES if args[name] is not None]


def _copy(args: dict, dtype=None) -> dict:
    """Detached copies (cast to `dtype` if given) that are leaves of their own graph; running statistics
    are copied too (they are updated in place)."""
    out = {"xs": [leaf_copy(x, dtype) for x in args["xs"]]}
    for name in PARAM_NAMES:
        out[name] = leaf_copy(args[name], dtype)
    for name in ("running_mean", "running_var"):
        out[name] = leaf_copy(args[name], dtype, grad=False)
    return out


def _call(fn_args: dict, case: Case, training: bool, backend: str = "triton", resample="case"):
    a = fn_args
    return hrnet_v2_head(a["xs"], a["conv_weight"], a["conv_bias"], a["running_mean"], a["running_var"],
                         a["bn_weight"], a["bn_bias"], a["cls_weight"], a["cls_bias"], training=training,
                         momentum=case.momentum, eps=case.eps,
                         resample=case.resample if resample == "case" else resample, backend=backend)


def _reference(args: dict, case: Case, training: bool, grad_y: torch.Tensor, dtype=None):
    """head_ref on copies of the arguments (cast to `dtype` if given): (y, grads in `_leaves` order, copies).
    Without running statistics BN normalises with batch statistics in eval too (nn.BatchNorm2d's rule for
    track_running_stats=False), which F.batch_norm spells training=True."""
    r = _copy(args, dtype)
    batch_stats = training or r["running_mean"] is None
    y = head_ref(r["xs"], r["conv_weight"], r["conv_bias"], r["running_mean"], r["running_var"], r["bn_weight"],
                 r["bn_bias"], r["cls_weight"], r["cls_bias"], [None] + _resamples(case), batch_stats,
                 case.momentum, case.eps)
    return y, gradients(y, _leaves(r), grad_y), r


def _pre_activation(args: dict, case: Case, training: bool, dtype=None) -> torch.Tensor:
    """BN's output, the ReLU's input [N, M, H, W], as head_ref computes it (on copies, in `dtype` if given)."""
    r = _copy(args, dtype)
    size = tuple(r["xs"][0].shape[2:])
    ups = [r["xs"][0]] + [resample_ref(x, rs, size) for x, rs in zip(r["xs"][1:], _resamples(case))]
    hidden = F.conv2d(torch.cat(ups, 1), r["conv_weight"], r["conv_bias"])
    return F.batch_norm(hidden, r["running_mean"], r["running_var"], r["bn_weight"], r["bn_bias"],
                        training or r["running_mean"] is None, case.momentum, case.eps).detach()


def _away_from_kink(args: dict, case: Case, training: bool) -> torch.Tensor:
    """[N, 1, H, W]: pixels where every head channel's pre-ReLU value is farther from 0 than 4x PyTorch's own
    largest low-precision error of it in that channel (the idea of tests/test_fusion_module.py's helper, moved
    inside the head, where the ReLU is).

    Within that band the ReLU decision is decided by rounding, in PyTorch (conv output, upsampled branches and
    BN output rounded to bf16/fp16) as in the kernels (the projections W_j x_j of the low branches are rounded
    to the input dtype). One flipped element changes ds = dL/d(pre-BN) at one pixel by a whole |dA * scale|,
    which then dominates that pixel's dx0 = W0^T ds (seen: bf16, one flip at a pre-activation of 4.6e-4 made
    d xs[0] 6.5e-2 off against a 5.5e-3 budget while every other gradient was within budget). A zero upstream
    gradient at those pixels makes dA = Wc^T g vanish there, so flips there change nothing, in eval and with
    batch statistics alike, for both implementations.
    """
    pre64 = _pre_activation(args, case, training, F64)
    band = 4 * (_pre_activation(args, case, training).double() - pre64).abs().amax(dim=(0, 2, 3), keepdim=True)
    keep = (pre64.abs() > band).all(dim=1, keepdim=True)
    assert keep.double().mean() >= 0.25, f"only {keep.double().mean():.0%} of the pixels are away from the kink"
    return keep


def _expected_format(case: Case, layout: str):
    """The logits' layout: x0's; None when x0 or the hidden tensor [N, M, H, W] is both layouts at once (one
    pixel, or one channel: their strides satisfy either), so either is right."""
    if case.width == 1 or case.sizes[0][0] * case.sizes[0][1] == 1:
        return None
    return CL if layout in ("channels_last", "mixed") and case.channels[0] > 1 else torch.contiguous_format


def _check_zero_bias_grad(g, g64, scale64, tol, name="d conv_bias"):
    """The conv bias's gradient with batch statistics: zero up to round-off, measured against `scale64`
    (the norm of the conv weight's float64 gradient, the same sums over pixels without the mean removed)."""
    ref_abs = g64.double().norm().item()
    err_abs = (g.double() - g64.double()).norm().item()
    assert scale64 > 0
    assert ref_abs <= 1e-12 * scale64, f"{name}: the float64 reference is not ~0 ({ref_abs:.3e} vs {scale64:.3e})"
    assert err_abs <= tol * scale64, f"{name}: {err_abs:.3e} exceeds {tol:.1e} x {scale64:.3e}"


def check_head(case: Case, dtype, layout: str, training: bool, bn_dtype=None, backend: str = "triton"):
    """A fused backend vs the float64 reference: logits (value, dtype, layout), every gradient, running stats."""
    args = _build(case, dtype, layout, bn_dtype)
    before = _copy(args)  # the reference runs on these values, running statistics before the update
    saved_stats = [before["running_mean"], before["running_var"]]
    y = _call(args, case, training, backend)
    N, (H, W) = case.N, case.sizes[0]
    assert y.shape == (N, case.K, H, W) and y.dtype == dtype and y.device == args["xs"][0].device
    fmt = _expected_format(case, layout)
    assert fmt is None or y.is_contiguous(memory_format=fmt), f"logits strides {y.stride()}, expected {fmt}"

    low = dtype in LOW_PRECISION
    grad_y = torch.randn_like(y)
    if low:
        grad_y = grad_y * _away_from_kink(before, case, training).to(dtype)
    named = _leaves(args)
    grads = gradients(y, named, grad_y)
    y64, grads64, r64 = _reference(before, case, training, grad_y, F64)
    batch_stats = training or not case.running
    y_pt, grads_pt, r_pt = _reference(before, case, training, grad_y) if low else (None, None, None)
    assert_matches("logits", y, y64, y_pt, dtype)
    rtol = tolerance(dtype)
    names = [name for name, _ in named]
    dw64 = grads64[names.index("conv_weight")].norm().item()
    for k, (name, t) in enumerate(named):
        g, g64 = grads[k], grads64[k]
        assert g.shape == t.shape and g.dtype == t.dtype, name
        if name == "conv_bias" and batch_stats:
            w = names.index("conv_weight")
            # low precision: the conv weight gradient's budget (PyTorch's own bias gradient is round-off)
            _check_zero_bias_grad(g, g64, dw64, low_precision_budget(grads_pt[w], grads64[w], dtype) if low else rtol)
        else:
            assert_matches(f"d {name}", g, g64, grads_pt[k] if low else None, dtype)

    # running statistics: updated like F.batch_norm in training, untouched in eval
    for name, initial in zip(("running_mean", "running_var"), saved_stats):
        t = args[name]
        if t is None:
            continue
        if training:
            assert not torch.equal(t, initial), f"{name} was not updated"
            assert_matches(name, t, r64[name], r_pt[name] if low else None, dtype)
        else:
            assert torch.equal(t, initial), f"{name} changed in eval mode"


# ------------------------------------------------------------------------------- the grid: fp32 and fp64

C3, C4 = (4, 6, 8), (4, 6, 8, 10)

# every upsample mode, each in eval and in training; other features rotate over them
MODE_CASES = {
    "nearest_size_odd": (Case(C3, [(5, 5), (3, 3), (2, 2)], near(), N=2), "nchw"),
    "nearest_sf_2_4": (Case(C3, [(8, 8), (4, 4), (2, 2)], [near(2), near(4)], conv_bias=False), "channels_last"),
    "bilinear_size_odd": (Case(C3, [(7, 5), (4, 3), (2, 2)], bil(), cls_bias=False), "channels_last"),
    "bilinear_sf_2_4": (Case(C3, [(8, 4), (4, 2), (2, 1)], [bil(2), bil(4)], N=2, affine=False), "nchw"),
    "bilinear_corners_size_odd": (Case(C3, [(5, 7), (3, 4), (2, 2)], bil(align_corners=True), M=11), "nchw"),
    "bilinear_corners_sf_2_4": (Case(C3, [(8, 4), (4, 2), (2, 1)], [bil(2, True), bil(4, True)], K=5,
                                     momentum=0.01, eps=1e-3), "channels_last"),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mode", list(MODE_CASES))
def test_head_modes(mode, training, fused):
    case, layout = MODE_CASES[mode]
    check_head(case, F32, layout, training, backend=fused)


# (case, dtype, layout, training). With batch statistics and batch 1, a 1x1 low branch adds a per-channel
# constant that BN's mean removes: its gradient is then exactly zero, and relative errors meaningless, so such
# cases use batch 2.
SHAPE_CASES = [
    # branch counts
    pytest.param(Case((5,), [(5, 3)], N=2), F32, "nchw", True, id="1_branch_train"),
    pytest.param(Case((5,), [(3, 4)], K=4, conv_bias=False), F32, "channels_last", False, id="1_branch_eval"),
    pytest.param(Case((4, 6), [(6, 5), (3, 3)], N=2), F32, "nchw", False, id="2_branches_eval"),
    pytest.param(Case((4, 6), [(6, 5), (3, 3)], bil(align_corners=True), cls_bias=False), F32, "channels_last", True,
                 id="2_branches_train"),
    pytest.param(Case(C4, [(8, 8), (4, 4), (2, 2), (1, 1)], [near(2), near(4), near(8)], N=2), F32, "channels_last",
                 True, id="4_branches_nearest_sf_train"),
    pytest.param(Case(C4, [(7, 5), (4, 3), (2, 2), (1, 1)], [bil(), near(), bil(align_corners=True)], K=4), F32,
                 "nchw", False, id="4_branches_mixed_modes_eval"),
    # conv / classifier bias, BN affine, running statistics
    pytest.param(Case(C3, [(5, 4), (3, 2), (2, 2)], conv_bias=False, cls_bias=False), F32, "nchw", False,
                 id="no_biases_eval"),
    pytest.param(Case(C3, [(5, 4), (3, 2), (2, 2)], conv_bias=False, cls_bias=False, N=2), F32, "nchw", True,
                 id="no_biases_train"),
    pytest.param(Case(C3, [(4, 5), (2, 3), (1, 2)], near(), affine=False), F32, "channels_last", False,
                 id="bn_not_affine_eval"),
    pytest.param(Case(C3, [(4, 4), (2, 2), (1, 1)], [bil(2), bil(4)], N=2, running=False), F32,
                 "nchw", False, id="no_running_stats_eval_batch_stats"),
    pytest.param(Case(C3, [(5, 4), (3, 2), (2, 2)], running=False, affine=False, N=2), F32, "channels_last", True,
                 id="no_running_stats_not_affine_train"),
    # head width other than sum(C): narrower, and wider than one BLOCK_M chunk (64)
    pytest.param(Case((4, 6), [(4, 4), (2, 2)], near(2), M=7), F32, "nchw", True, id="M_7_narrow_train"),
    pytest.param(Case((4, 6), [(4, 3), (2, 2)], bil(), M=70, K=4), F32, "nchw", False, id="M_70_two_chunks_eval"),
    pytest.param(Case((4, 6), [(3, 4), (2, 2)], bil(), M=70, N=2), F32, "channels_last", True,
                 id="M_70_two_chunks_train"),
    # size-1 dimensions, and low branches already at x0's size (F.interpolate copies: mmseg resizing x0 too)
    # (batch 3: with two values per channel BN's output is +-1 whatever the input, and its input gradient pure
    # cancellation, ~1e-4 relative even for PyTorch's own fp32)
    pytest.param(Case(C3, [(1, 1), (1, 1), (1, 1)], bil(), N=3), F32, "channels_last", True, id="x0_1x1_train"),
    pytest.param(Case(C3, [(1, 1), (1, 1), (1, 1)], near(), N=1), F32, "nchw", False, id="x0_1x1_eval"),
    pytest.param(Case(C4, [(1, 7), (1, 3), (1, 2), (1, 1)], [bil(), near(), bil(align_corners=True)], N=2), F32, "nchw",
                 True, id="x0_1xW_train"),
    pytest.param(Case(C3, [(5, 1), (3, 1), (1, 1)], bil(align_corners=True), N=2), F64, "channels_last", False,
                 id="x0_Hx1_fp64_eval"),
    pytest.param(Case(C3, [(4, 4), (4, 4), (2, 2)], bil(), N=2), F32, "nchw", True, id="low_branch_same_size"),
    pytest.param(Case(C3, [(5, 4), (5, 2), (3, 4)], [bil(), near()]), F32, "nchw", False, id="one_axis_same_size"),
    # layouts: x0 channels_last next to strided low branches
    pytest.param(Case(C3, [(5, 4), (3, 2), (2, 2)], N=2), F32, "mixed", True, id="mixed_layouts_train"),
    pytest.param(Case(C3, [(5, 4), (3, 2), (2, 2)], [near(), bil(align_corners=True)]), F32, "mixed", False,
                 id="mixed_layouts_eval"),
    # float64
    pytest.param(Case(C3, [(7, 5), (4, 3), (2, 2)], bil(), N=2), F64, "nchw", True, id="fp64_bilinear_train"),
    pytest.param(Case(C4, [(8, 8), (4, 4), (2, 2), (1, 1)], [near(2), bil(4), bil(8, True)], conv_bias=False), F64,
                 "channels_last", False, id="fp64_4_branches_eval"),
    pytest.param(Case(C3, [(5, 5), (3, 3), (2, 2)], near(), running=False, cls_bias=False), F64, "nchw", False,
                 id="fp64_no_running_stats_eval"),
    pytest.param(Case((4, 6), [(6, 5), (3, 3)], bil(align_corners=True), M=9, affine=False, momentum=0.3), F64,
                 "channels_last", True, id="fp64_corners_train"),
    # more than one pixel tile (BLOCK_P = 64) per image, the last one partial: per-tile statistics merged with
    # unequal counts, backward splits over tiles (larger than the 8x8 of the rest, but cheap: exact 2x nearest)
    pytest.param(Case((5,), [(9, 8)], N=2), F32, "nchw", True, id="tiles_72px_1_branch_train"),
    pytest.param(Case((4, 6), [(10, 8), (5, 4)], near(2), N=2, M=12), F32, "channels_last", True,
                 id="tiles_80px_train"),
]


@pytest.mark.parametrize("case, dtype, layout, training", SHAPE_CASES)
def test_head_shapes(case, dtype, layout, training, fused):
    check_head(case, dtype, layout, training, backend=fused)


# ------------------------------------------------------------------------------------------ fp16 and bf16

LOW_CASES = [
    pytest.param(Case(C3, [(5, 4), (3, 2), (2, 2)], [bil(), near()], N=2), BF16, "nchw", False, None,
                 id="bf16_eval"),
    pytest.param(Case(C3, [(5, 4), (3, 2), (2, 2)], [bil(), bil(align_corners=True)], N=2), BF16, "channels_last",
                 True, None, id="bf16_train"),
    pytest.param(Case(C3, [(8, 4), (4, 2), (2, 1)], [bil(2), near(4)], N=2), BF16, "nchw", True, F32,
                 id="bf16_train_fp32_bn"),
    pytest.param(Case(C3, [(5, 4), (3, 2), (2, 2)], bil(align_corners=True), N=2), F16, "channels_last", False, F32,
                 id="fp16_eval_fp32_bn"),
    pytest.param(Case(C3, [(5, 4), (3, 2), (2, 2)], [near(), bil()], N=2, conv_bias=False), F16, "nchw", True, None,
                 id="fp16_train"),
]


@pytest.mark.parametrize("case, dtype, layout, training, bn_dtype", LOW_CASES)
def test_head_low_precision(case, dtype, layout, training, bn_dtype, fused):
    """fp16/bf16 activations and weights, BN parameters and running statistics in the same dtype (a
    `.half()` model) or in fp32 (BN kept fp32 as under autocast or HigherHRNet's network_to_half)."""
    check_head(case, dtype, layout, training, bn_dtype, backend=fused)


# ------------------------------------------------------------------------------------------------ gradcheck


def _gradcheck(case: Case, layout: str, training: bool, seed: int, fast_mode: bool, backend: str = "triton"):
    torch.manual_seed(seed)
    args = _build(case, F64, layout)
    n = len(args["xs"])

    def fn(*flat):
        a = dict(args)
        a["xs"] = list(flat[:n])
        rest = iter(flat[n:])
        for name in PARAM_NAMES:
            if args[name] is not None:
                a[name] = next(rest)
        return _call(a, case, training, backend)

    gradcheck_named(fn, _leaves(args), fast_mode)


# full mode: one backward per logit (twice) and two forwards per input element, so the tiniest problems
GRADCHECK_FULL = [
    pytest.param(Case((1, 2), [(2, 2), (1, 1)], near(2), M=2, K=1), "nchw", False, id="eval_nearest_sf2"),
    pytest.param(Case((2, 1), [(3, 2), (2, 1)], bil(), M=2, K=1), "channels_last", True, id="train_bilinear_cl"),
    pytest.param(Case((1, 2), [(2, 3), (1, 2)], bil(align_corners=True), M=2, K=1, running=False), "nchw", False,
                 id="eval_batch_stats_corners"),
]


@pytest.mark.parametrize("case, layout, training", GRADCHECK_FULL)
def test_gradcheck_full(case, layout, training, fused):
    _gradcheck(case, layout, training, seed=0, fast_mode=False, backend=fused)


GRADCHECK_FAST_CASE = Case((2, 3, 3), [(4, 2), (2, 1), (1, 1)], [bil(2), near()], N=2, M=6)


def test_gradcheck_fast_eval():
    _gradcheck(GRADCHECK_FAST_CASE, "channels_last", False, seed=1, fast_mode=True)


def test_gradcheck_fast_four_branches_train():
    case = Case((2, 2, 3, 3), [(4, 4), (2, 2), (2, 1), (1, 1)], [near(2), bil(), bil(align_corners=True)], N=2,
                M=5, conv_bias=False)
    _gradcheck(case, "nchw", True, seed=3, fast_mode=True)


# -------------------------------------------------------------------------------------------- int64 offsets


@pytest.mark.parametrize("dtype, layout", [(F32, "nchw"), (BF16, "channels_last"), (F64, "mixed")],
                         ids=["fp32_nchw", "bf16_cl", "fp64_mixed"])
def test_int64_path_matches_int32(dtype, layout):
    """The launchers with force_int64=True (64-bit offsets everywhere) give the int32 path's bits: the index
    arithmetic of int32-overflowing tensors, tested on a tiny one."""
    from hrfast.kernels.head import (HeadTensors, head_backward_ds, head_backward_reduce, head_batch_stats,
                                     head_forward)
    from hrfast.plan import head_plan

    case = Case(C4, [(5, 4), (3, 2), (2, 2), (1, 1)], [bil(), near(), bil(align_corners=True)], N=2, M=20)
    args = _build(case, dtype, layout)
    xs = [x.detach() for x in args["xs"]]
    weight = args["conv_weight"].detach().reshape(case.width, -1)
    bounds = [0]
    for c in case.channels:
        bounds.append(bounds[-1] + c)
    lows = [F.conv2d(x, weight[:, bounds[j]:bounds[j + 1], None, None]) for j, x in enumerate(xs) if j]
    size = tuple(xs[0].shape[2:])
    plan = head_plan(tuple(tuple(p.shape[2:]) for p in lows), tuple(_resamples(case)), size, False)
    t = HeadTensors(xs[0], lows, weight[:, :bounds[1]], args["cls_weight"].detach().reshape(case.K, -1),
                    args["cls_bias"].detach())
    acc = F64 if dtype == F64 else F32
    stats = [head_batch_stats(plan, t, force_int64=f) for f in (False, True)]
    for a, b in zip(*stats):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    scale = (0.5 + torch.rand(case.width, device=DEV)).to(acc)
    shift = torch.randn(case.width, device=DEV).to(acc)
    y32, y64 = (head_forward(plan, t, scale, shift, force_int64=f) for f in (False, True))
    assert torch.isfinite(y32).all() and torch.equal(y32, y64)
    grad = torch.randn_like(y32)
    reduced = [head_backward_reduce(plan, t, scale, shift, grad, force_int64=f) for f in (False, True)]
    for a, b in zip(*reduced):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    alpha, beta = torch.randn(case.width, device=DEV).to(acc), torch.randn(case.width, device=DEV).to(acc)
    grads = [head_backward_ds(plan, t, scale, shift, grad, alpha, beta, force_int64=f) for f in (False, True)]
    for a, b in zip(*[[dx0, dw0, *dlows] for dx0, dw0, dlows in grads]):
        assert torch.isfinite(a).all() and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_deterministic(training, dtype, fused):
    case = Case(C3, [(5, 4), (3, 2), (2, 2)], [bil(), near()], N=2)
    args = _build(case, dtype, "channels_last" if dtype == BF16 else "nchw")
    named = _leaves(args)
    stats0 = [args[k].clone() for k in ("running_mean", "running_var")]
    runs = []
    grad_y = None
    for _ in range(2):
        for k, s in zip(("running_mean", "running_var"), stats0):
            args[k].copy_(s)
        y = _call(args, case, training, fused)
        grad_y = torch.randn_like(y) if grad_y is None else grad_y
        grads = torch.autograd.grad(y, [t for _, t in named], grad_y)
        runs.append((y, grads, [args[k].clone() for k in ("running_mean", "running_var")]))
    (y1, g1, s1), (y2, g2, s2) = runs
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y2)
    for (name, _), a, b in zip(named, g1, g2):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
    for a, b in zip(s1, s2):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------- partial gradients, sum()


@pytest.mark.parametrize("wanted", ["params_only", "inputs_only", "x0_and_classifier"])
def test_partial_requires_grad(wanted):
    """Only some arguments need gradients (a frozen backbone, a frozen head): the others get none."""
    case = Case(C3, [(5, 4), (3, 2), (2, 2)], [bil(), near()], N=2)
    args = _build(case, F32)
    for name, t in _leaves(args):
        keep = {"params_only": not name.startswith("xs"), "inputs_only": name.startswith("xs"),
                "x0_and_classifier": name in ("xs[0]", "cls_weight", "cls_bias")}[wanted]
        t.requires_grad_(keep)
    named = [(name, t) for name, t in _leaves(args) if t.requires_grad]
    y = _call(args, case, True)
    loss_grad = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for _, t in named], loss_grad)
    r = _copy(args, F64)
    for (name, t), (_, rt) in zip(_leaves(args), _leaves(r)):
        rt.requires_grad_(t.requires_grad)
    y64 = head_ref(r["xs"], r["conv_weight"], r["conv_bias"], r["running_mean"], r["running_var"], r["bn_weight"],
                   r["bn_bias"], r["cls_weight"], r["cls_bias"], [None] + _resamples(case), True)
    grads64 = torch.autograd.grad(y64, [t for _, t in _leaves(r) if t.requires_grad], loss_grad.double())
    assert_rel_close(y, y64, FP32_RTOL, "logits")
    for (name, _), g, g64 in zip(named, grads, grads64):
        if name == "conv_bias":
            continue  # not in any of the three sets
        assert_rel_close(g, g64, FP32_RTOL, f"d {name}")


def test_expanded_upstream_grad():
    """logits.sum() hands the op a stride-0 gradient."""
    case = Case(C3, [(5, 4), (3, 2), (2, 2)], [bil(), near()], N=2)
    args = _build(case, F32, "channels_last")
    named = _leaves(args)
    grads = torch.autograd.grad(_call(args, case, False).sum(), [t for _, t in named])
    r = _copy(args, F64)
    y64 = head_ref(r["xs"], r["conv_weight"], r["conv_bias"], r["running_mean"], r["running_var"], r["bn_weight"],
                   r["bn_bias"], r["cls_weight"], r["cls_bias"], [None] + _resamples(case), False)
    grads64 = torch.autograd.grad(y64.sum(), [t for _, t in _leaves(r)])
    for (name, _), g, g64 in zip(named, grads, grads64):
        assert_rel_close(g, g64, FP32_RTOL, f"d {name}")


# --------------------------------------------------------------------------------------------------- errors
# (the argument checks are listed in test_bad_inputs.py)


_w, _head = conv_weight, small_head


def test_triton_backend_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # resolve_backend reads it on every call
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _head(backend="triton")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("running", [True, False], ids=["running_stats", "no_running_stats"])
def test_single_value_per_channel_raises_like_batch_norm(running, backend):
    """Batch statistics over one value per channel: F.batch_norm (and nn.BatchNorm2d with or without
    running statistics) raise ValueError; so must the fused head, whichever backend."""
    xs = [torch.randn(1, 4, 1, 1, device=DEV), torch.randn(1, 6, 1, 1, device=DEV)]
    stats = (torch.zeros(8, device=DEV), torch.ones(8, device=DEV)) if running else (None, None)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        hrnet_v2_head(xs, _w().to(DEV), None, *stats, None, None, _w(M=3, C=8).to(DEV), training=True,
                      backend=backend)


# ------------------------------------------------------------------------------------------------- backends


def test_auto_on_cpu_is_the_reference(monkeypatch):
    """backend='auto' on CPU tensors runs head_ref, bit for bit, even with the interpreter on."""
    from hrfast.kernels import head as head_kernels

    def no_kernels(*args, **kwargs):
        raise AssertionError("backend='auto' on CPU must not launch the Triton kernels")

    for name in ("head_batch_stats", "head_forward", "head_backward_reduce", "head_backward_ds"):
        monkeypatch.setattr(head_kernels, name, no_kernels)
    case = Case(C4, [(5, 4), (3, 2), (2, 2), (1, 1)], [bil(), near(), bil(align_corners=True)], N=2)
    for training in (False, True):
        args = _build(case, F32)
        before = _copy(args)
        y = _call(args, case, training, backend="auto")
        grad_y = torch.randn_like(y)
        grads = torch.autograd.grad(y, [t for _, t in _leaves(args)], grad_y)
        ry, rgrads, r = _reference(before, case, training, grad_y)
        assert torch.equal(y, ry)
        for (name, _), a, b in zip(_leaves(args), grads, rgrads):
            assert torch.equal(a, b), name
        # the running statistics were updated exactly as F.batch_norm updates them (in training)
        for k in ("running_mean", "running_var"):
            ref_stats = r[k]
            if training:
                assert not torch.equal(ref_stats, before[k])
            assert torch.equal(args[k], ref_stats), k
        y_ref_backend = _call(_copy(before), case, training, backend="reference")
        assert torch.equal(y_ref_backend, ry)


def test_reference_backend_eval_without_running_stats_uses_batch_stats():
    """training=False without running statistics means batch statistics for the Triton backend (and for
    nn.BatchNorm2d(track_running_stats=False) in eval); the reference backend must agree rather than raise."""
    case = Case(C3, [(5, 4), (3, 2), (2, 2)], [bil(), near()], N=2, running=False)
    args = _build(case, F32)
    y_triton = _call(args, case, False, backend="triton")
    y_reference = _call(args, case, False, backend="reference")
    assert_rel_close(y_triton, y_reference, FP32_RTOL, "logits")


@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_empty_batch(training, backend):
    case = Case(C3, [(6, 4), (3, 2), (2, 2)], [bil(), near()], N=0)
    for layout in ("nchw", "channels_last"):
        args = _build(case, F32, layout)
        stats = [args[k].clone() for k in ("running_mean", "running_var")]
        y = _call(args, case, training, backend=backend)
        assert y.shape == (0, 3, 6, 4) and y.dtype == F32
        for k, s in zip(("running_mean", "running_var"), stats):
            assert torch.equal(args[k], s), k  # no batch, no statistics
        if training:
            continue  # batch norm's backward over no values is not defined more narrowly than "shapes"
        named = _leaves(args)
        grads = torch.autograd.grad(y, [t for _, t in named], torch.randn_like(y))
        for (name, t), g in zip(named, grads):
            assert g.shape == t.shape, name
            if not name.startswith("xs"):  # a sum over no pixels
                assert torch.equal(g, torch.zeros_like(g)), name


# ------------------------------------------------------------- the forward's 2-D tiles and patch dots (issue 14)
#
# The forward kernel upsamples each low branch on a TILE_H x TILE_W pixel tile as one dot with an interpolation
# matrix over the source patch the tile reads; a tile with NaN in its logits or a patch missing a tap is redone
# with exact gathers. These cases span several tiles with partial tails, non-power-of-2 ratios, both layouts.

TILED_CASES = [
    pytest.param(Case(C4, [(19, 37), (10, 19), (5, 10), (3, 5)], [bil(), bil(align_corners=True), near()], K=4),
                 F64, "nchw", id="fp64_odd_ratios_nchw"),
    pytest.param(Case(C4, [(17, 33), (9, 17), (5, 9), (2, 5)], [bil(), near(), bil(align_corners=True)], N=2, M=40),
                 F32, "channels_last", id="fp32_odd_ratios_cl"),
    pytest.param(Case(C4, [(16, 32), (8, 16), (4, 8), (2, 4)], bil(), N=2), F32, "mixed", id="fp32_w48_like_mixed"),
    pytest.param(Case(C3, [(11, 21), (6, 11), (3, 6)], [bil(), bil(align_corners=True)], N=2), BF16, "nchw",
                 id="bf16_odd_ratios"),
]


@pytest.mark.parametrize("case, dtype, layout", TILED_CASES)
def test_forward_over_tiles(case, dtype, layout, fused):
    check_head(case, dtype, layout, False, backend=fused)


@pytest.mark.parametrize("case, dtype, layout", [TILED_CASES[0], TILED_CASES[2]])
def test_training_over_tiles_and_splits(case, dtype, layout, monkeypatch, fused):
    """The training kernels on the forward's tiles: partial edge tiles (the statistics' per-tile counts), and
    the backward reduce and the backward's dW0 with fewer splits than tiles, so each split adds several tiles
    (of both images) into its rows after the first overwrote them."""
    from hrfast.kernels import head as KH
    monkeypatch.setattr(KH, "_REDUCE_SPLITS", 3)
    monkeypatch.setattr(KH, "_GRAD_SPLITS", 3)
    check_head(case, dtype, layout, True, backend=fused)


@pytest.mark.parametrize("transposed, layout", [(True, "channels_last"), (False, "nchw")],
                         ids=["transposed_sm90", "rows_sm80"])
def test_fp32_statistics_and_reduce_forms(transposed, layout, monkeypatch):
    """fp32's statistics and backward reduce in both their forms, the reduce over several tiles per split: the
    transposed chunk (s^T, dA^T, dWc^T with x0^T, the U_j^T and the gradient tile as the dots' B operands:
    sm_90's candidates, the interpreter's first) and the row form with the operands split by hand once per tile
    (sm_80's candidates). One branch's weights are not exact in tf32 (align_corners: its U_j as (hi, lo)); M is
    not a multiple of the chunk."""
    from hrfast.kernels import head as KH
    from hrfast.kernels.limits import DeviceLimits, assume
    monkeypatch.setattr(KH, "_REDUCE_SPLITS", 3)
    taken = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                taken.append(kwargs["TRANSPOSED"])
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_head_stats_kernel", "_head_backward_reduce_kernel"):
        monkeypatch.setattr(KH, name, Spy(getattr(KH, name)))
    case = Case(C3, [(10, 8), (5, 4), (3, 2)], [bil(2), bil(align_corners=True)], N=2, M=20)
    with assume(DeviceLimits(shared_per_block=232_448 if transposed else 166_912)):
        check_head(case, F32, layout, True)
    assert taken == [transposed] * 3  # the statistics, the reduce's patch dots and its exact gathers


def _aten_taps(mode: str, align: bool, n_in: int, n_out: int, d: int) -> Tuple[int, int]:
    """ATen's first and last source index read by output index d (float32, as the kernels)."""
    r = torch.tensor(n_in / n_out, dtype=torch.float32)
    if mode == "nearest":
        i = min(int(torch.floor(torch.tensor(float(d), dtype=torch.float32) * r)), n_in - 1)
        return i, i
    if align:
        r = torch.tensor((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0, dtype=torch.float32)
        real = r * d
    else:
        real = torch.clamp(r * (d + 0.5) - 0.5, min=0.0)
    i0 = min(int(real), n_in - 1)
    return i0, min(i0 + 1, n_in - 1)


def test_tile_configuration_per_device_class():
    """A candidate tagged with a device class (`SM90_SHARED`) is taken only on devices with that much shared
    memory per block: the launchers' only view of the target (`device_limits`), the figure the instrument
    records each architecture by. W48 seg at 512x1024, fp32: the backward reduce's transposed chunk (64
    channels on 4x8 tiles) on sm_90, the row form (32 channels on 8x8 tiles) on sm_80; without limits (the
    interpreter) the first candidate; every choice fits, fp32 and bf16."""
    from hrfast.kernels import head as KH
    from hrfast.kernels.limits import DeviceLimits
    from hrfast.plan import head_plan
    bil_ = Resample("bilinear", align_corners=False)
    lows_hw = ((64, 128), (32, 64), (16, 32))
    plan = head_plan(lows_hw, (bil_,) * 3, (128, 256), True)

    def chosen(name, limits, elem=4):
        return KH._forward_tile(name, elem, 4, 64, 32, 64, plan.lows, lows_hw, limits)

    def form(tile):
        return tile.block_m, tile.tile_h, tile.tile_w, tile.transposed

    sm80, sm90 = DeviceLimits(shared_per_block=166_912), DeviceLimits(shared_per_block=232_448)
    reduce = "_head_backward_reduce_kernel"
    assert form(chosen(reduce, sm90)) == (64, 4, 8, True)
    assert form(chosen(reduce, sm80)) == (32, 8, 8, False)
    assert chosen(reduce, None) == chosen(reduce, sm90)
    for name in ("_head_stats_kernel", "_head_forward_kernel", reduce, "_head_backward_ds_kernel"):
        for limits, elem in itertools.product((sm80, sm90), (4, 2)):
            tile = chosen(name, limits, elem)
            fused = name == "_head_backward_ds_kernel" and elem == 2
            assert KH._tile_bound(name, elem, 4, 64, 32, tile.src, tile, fused) <= limits.shared_per_block, name


@pytest.mark.parametrize("mode, align, scale_h, scale_w, exact", [
    ("bilinear", False, 2, 2, True), ("bilinear", False, 8, 8, True), ("bilinear", False, 16, 4, True),
    ("bilinear", False, 32, 2, True), ("bilinear", False, 16, 16, True), ("bilinear", False, 32, 32, False),
    ("bilinear", False, 3, 2, False),
    ("bilinear", True, 2, 2, False), ("nearest", None, 3, 2, True)])
def test_interpolation_weights_exact_in_tf32(mode, align, scale_h, scale_w, exact):
    """`_weights_exact_in_tf32` (fp32's 3xTF32 dots skip the split of U where it holds): where it holds, every
    entry of the interpolation matrix (ATen's fp32 weights of each source pixel at each output pixel, products
    of the two axes' weights) has its low 13 bits zero, which tf32 drops; the rule refuses the ratios where some
    weight would not be exact (32x in both axes: 12 bits; 3x; align_corners), and those cases do hold one."""
    from hrfast.kernels import head as KH
    from hrfast.plan import head_plan
    h, w = 3, 5
    out = (h * scale_h, w * scale_w)
    plan = head_plan(((h, w),), (Resample(mode, align_corners=align),), out, True)
    claim = KH._weights_exact_in_tf32(plan.lows[0], out, (h, w))
    basis = torch.eye(h * w, dtype=F32).reshape(h * w, 1, h, w)  # one source pixel per image
    weights = F.interpolate(basis, size=out, mode=mode, align_corners=align)
    tf32_exact = bool(((weights.view(torch.int32) & 0x1FFF) == 0).all())
    assert claim == exact
    assert tf32_exact == exact


@pytest.mark.parametrize("mode, align", [("bilinear", False), ("bilinear", True), ("nearest", False)])
def test_patch_extent_covers_every_tile(mode, align):
    """The host's patch bound holds for every tile of many sizes (the kernel falls back when it does not, but
    then the fast path would never run)."""
    from hrfast.kernels import head as KH
    from hrfast.plan import term_plan
    code = {"bilinear": KH.BILINEAR, "nearest": KH.NEAREST}[mode]
    for n_out in (7, 16, 33, 64, 100):
        for n_in in sorted({1, 2, 3, n_out // 8 or 1, n_out // 4 or 1, n_out // 2 or 1, n_out - 1, (n_out * 5) // 7}):
            ratio = term_plan(Resample(mode, align_corners=align if mode == "bilinear" else None),
                              (n_in, n_in), (n_out, n_out)).ratio_h
            for tile in (4, 8, 16):
                bound = KH._patch_extent(code, ratio, tile, n_in)
                backward = KH._backward_patch_extent(code, ratio, tile, n_in)
                assert bound <= backward <= bound + 1
                origins = []
                for start in range(0, n_out, tile):
                    last = min(start + tile, n_out) - 1
                    first_tap = _aten_taps(mode, align, n_in, n_out, start)[0]
                    last_tap = _aten_taps(mode, align, n_in, n_out, last)[1]
                    assert last_tap - first_tap < bound, (n_in, n_out, tile, start)
                    origins.append(first_tap)
                # the backward gather's candidates: every tile whose patch holds a source index
                covering = KH._covering_tiles(code, align, ratio, tile, n_out, n_in, backward)
                for y in range(n_in):
                    assert sum(a <= y < a + backward for a in origins) <= covering, (n_in, n_out, tile, y)


def test_exact_fallback_when_a_patch_misses_taps(monkeypatch, fused):
    """Patches too small for their tiles (the bound forced to 1): every tile of the statistics, forward and
    backward reduce kernels takes the exact gathers; logits, statistics and gradients still match the
    reference. (The backward ds kernel's patch partials must hold every tap: its own bound,
    `_backward_patch_extent`, is not forced.)"""
    from hrfast.kernels import head as KH
    monkeypatch.setattr(KH, "_patch_extent", lambda mode, ratio, tile, size: 1)
    KH._forward_tile.cache_clear()
    try:
        check_head(Case(C3, [(9, 18), (5, 9), (3, 5)], [bil(), near()], N=2), F64, "nchw", True, backend=fused)
    finally:
        KH._forward_tile.cache_clear()


def test_forward_nan_in_a_low_branch_stays_local(fused):
    """NaN at one low-resolution pixel reaches exactly the logits eager's upsample spreads it to, also over
    several tiles (the dense patch dot alone would spread it over the whole tile)."""
    case = Case(C3, [(12, 40), (6, 20), (3, 10)], N=1)
    args = _build(case, F64)
    with torch.no_grad():
        args["xs"][1][0, 2, 3, 11] = float("nan")
        args["xs"][2][0, 1, 0, 0] = float("nan")
    with torch.no_grad():
        y = _call(args, case, False, backend=fused)
        expected = _call(args, case, False, backend="reference")
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert 0 < int(torch.isnan(expected).sum()) < expected.numel() // 4
    finite = ~torch.isnan(expected)
    assert_rel_close(y[finite], expected[finite], 1e-12, "finite logits")


def test_forward_fp32_inf_and_nan_as_eager():
    """fp32 (the 3xTF32 split dots of `_dot3`): +inf in x0 (reaching the logits as +inf), -inf in a low branch
    (ReLU makes it 0: finite logits) and NaN in another give eager's fp32 non-finite logits exactly, and the
    finite ones within FP32_RTOL: an inf operand's tf32 remainder (NaN) must not add a NaN of its own (fails
    with `_dot3_sum` returning big + small)."""
    case = Case(C3, [(12, 40), (6, 20), (3, 10)], N=1)
    args = _build(case, torch.float32)
    with torch.no_grad():  # positive weights: an inf reaches the logits as inf (mixed signs would make NaN)
        for name in ("conv_weight", "bn_weight", "cls_weight"):
            args[name].abs_()
        args["xs"][0][0, 1, 10, 35] = float("inf")
        args["xs"][1][0, 2, 3, 11] = float("-inf")
        args["xs"][2][0, 1, 0, 0] = float("nan")
    with torch.no_grad():
        y = _call(args, case, False)
        expected = _call(args, case, False, backend="reference")
    for name, kind in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(kind(y), kind(expected)), name
    finite = torch.isfinite(expected)
    assert 0 < int((~finite).sum()) < expected.numel() // 4
    assert_rel_close(y[finite], expected[finite], FP32_RTOL, "finite logits")


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
def test_backward_nan_in_the_gradient_stays_local(dtype, fused, monkeypatch):
    """NaN at two pixels of the logits' gradient (eval: folded BN) reaches exactly the gradient elements eager's
    backward spreads it to: ds is NaN there, and each branch's patch partial takes it only at that pixel's taps
    (the exact adjoint; the dense U^T ds would spread it over the tile's whole patch), over several tiles. Three
    splits: the NaN tiles are the first and a later tile of one split, so the reduce's exact launch adds into
    rows its dense launch zeroed and into rows it summed (fp32: the transposed reduce, ds written, its own
    exact launch; fp64: the row-form reduce, the fused ds's two passes)."""
    from hrfast.kernels import head as KH
    monkeypatch.setattr(KH, "_REDUCE_SPLITS", 3)
    monkeypatch.setattr(KH, "_GRAD_SPLITS", 3)
    case = Case(C3, [(12, 40), (6, 20), (3, 10)], [bil(), near()], N=1)
    args = _build(case, dtype)
    with torch.no_grad():
        y = _call(args, case, False, backend=fused)
    grad_y = torch.randn_like(y)
    grad_y[0, 1, 2, 20] = float("nan")  # tile 2 of 8 x 8 and of 4 x 8 tiles: split 2's first
    grad_y[0, 1, 10, 30] = float("nan")  # 8 x 8: tile 8, split 2's third; 4 x 8: tile 13, split 1's fifth
    before = _copy(args)
    named = _leaves(args)
    grads = gradients(_call(args, case, False, backend=fused), named, grad_y)
    expected = gradients(_call(before, case, False, backend="reference"), _leaves(before), grad_y)
    spread = 0
    for (name, _), g, e in zip(named, grads, expected):
        assert torch.equal(torch.isnan(g), torch.isnan(e)), name
        finite = ~torch.isnan(e)
        assert_rel_close(g[finite], e[finite], 1e-12 if dtype == F64 else FP32_RTOL, f"finite d {name}")
        if name.startswith("xs["):
            spread += int(torch.isnan(e).any(dim=1).sum())
    assert 0 < spread < sum(x.shape[2] * x.shape[3] for x in args["xs"]) // 4


def test_backward_inf_reaches_the_low_branches_as_eager():
    """+inf and -inf in ds (one class, positive weights: each pixel's ds keeps its sign over the channels) reach
    the upsampled branches' gradients dP_j as ATen's upsample backward gives them: +inf, -inf, NaN where both
    meet, and NaN at a tap of weight 0 (align_corners lands output pixels on source pixels: 0 x inf), also
    where that tap coincides with the other on the source's last pixel, through the fused kernel's exact
    adjoint (float64)."""
    from hrfast.kernels.head import HeadTensors, head_backward_ds
    from hrfast.plan import head_plan

    torch.manual_seed(5)
    M, size = 6, (11, 39)
    resamples = [bil(align_corners=True), bil()]
    x0 = torch.randn(1, 4, *size, device=DEV, dtype=F64)
    lows = [torch.randn(1, M, 6, 20, device=DEV, dtype=F64), torch.randn(1, M, 3, 10, device=DEV, dtype=F64)]
    w0 = torch.randn(M, 4, device=DEV, dtype=F64)
    wc = torch.rand(1, M, device=DEV, dtype=F64) + 0.5
    scale = torch.rand(M, device=DEV, dtype=F64) + 0.5
    shift = torch.rand(M, device=DEV, dtype=F64) + 3.0  # a > 0 almost everywhere: ReLU passes the infs
    plan = head_plan(tuple(tuple(p.shape[2:]) for p in lows), tuple(resamples), size, False)
    grad = torch.randn(1, 1, *size, device=DEV, dtype=F64)
    grad[0, 0, 4, 16] = float("inf")
    grad[0, 0, 4, 18] = float("-inf")
    grad[0, 0, 8, 30] = float("inf")
    grad[0, 0, 2, 2] = float("-inf")
    grad[0, 0, 10, 38] = float("inf")  # on the last source pixel: its second taps coincide with the first, weight 0
    _, _, dlows = head_backward_ds(plan, HeadTensors(x0, lows, w0, wc, None), scale, shift, grad)

    ps = [p.detach().cpu().requires_grad_() for p in lows]
    s = torch.einsum("mc,nchw->nmhw", w0.cpu(), x0.cpu())
    for p, r in zip(ps, resamples):
        s = s + F.interpolate(p, size=size, mode=r.mode, align_corners=r.align_corners)
    a = torch.relu(s * scale.cpu()[:, None, None] + shift.cpu()[:, None, None])
    torch.einsum("km,nmhw->nkhw", wc.cpu(), a).backward(grad.cpu())
    for j, (d, p) in enumerate(zip(dlows, ps)):
        e, d = p.grad, d.cpu()
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(d), kind(e)), (j, kind.__name__)
        finite = torch.isfinite(e)
        assert_rel_close(d[finite], e[finite], 1e-12, f"finite dP_{j}")
    e = ps[0].grad
    assert torch.isnan(e).any() and torch.isposinf(e).any() and torch.isneginf(e).any()


def test_eval_fold_cached_until_the_statistics_change(monkeypatch, fused):
    """An eval call without gradients folds BN once per state of its tensors (`running_affine`): no fold ops
    (and launches) per call; an in-place update of a running statistic folds again."""
    import hrfast.batchnorm as B
    folds = []
    affine = B.affine
    monkeypatch.setattr(B, "affine", lambda *a, **k: folds.append(1) or affine(*a, **k))
    dev = dict(device=TRITON_DEVICE, dtype=torch.float64)
    xs = [torch.randn(2, 4, 4, 4, **dev), torch.randn(2, 6, 2, 2, **dev)]
    params = [torch.randn(8, 10, 1, 1, **dev), torch.randn(8, **dev), torch.randn(8, **dev),
              0.5 + torch.rand(8, **dev), torch.randn(8, **dev), torch.randn(8, **dev), torch.randn(3, 8, 1, 1, **dev),
              torch.randn(3, **dev)]
    cw, cb, rm, rv, bw, bb, kw, kb = [p.requires_grad_() if p.dim() != 1 or i in (1, 4, 5, 7) else p
                                      for i, p in enumerate(params)]

    def call(backend):
        return hrnet_v2_head(xs, cw, cb, rm, rv, bw, bb, kw, kb, resample=[bil()], backend=backend)

    with torch.no_grad():
        first, second = call(fused), call(fused)
        assert len(folds) == 1
        assert torch.equal(first, second)
        rv.mul_(2.0)
        third = call(fused)
        assert len(folds) == 2
        assert_rel_close(third, call("reference"), 1e-12, "logits after the statistics changed")
    call(fused).sum().backward()  # autograd must see the fold: computed afresh
    assert len(folds) == 3 and bw.grad is not None
