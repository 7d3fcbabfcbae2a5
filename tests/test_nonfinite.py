"""NaN and inf reach the same elements through the fused kernels as through eager PyTorch, forward and backward.

For each fused backend (the Triton kernels, here through the interpreter; the CUDA C++ kernels, here through
their host build), in float64 and float32: the fused op's output and every gradient are NaN, +inf and -inf at
exactly the elements where the eager reference's are (`hrfast.ops.reference`, computed in float64 on the same
values), and the finite elements agree within the dtype's tolerance. The eager rules kernels tend to break:
`torch.relu` keeps NaN (`tl.maximum` drops it), and ReLU's backward (ATen's `threshold_backward`) zeroes the
gradient only where y <= 0, so it passes it where y is NaN.

Not covered, by design: inf in a low-resolution head branch. The head projects each branch before upsampling
it (`hrfast.ops.head`), so d(conv_weight) of that branch is (Up^T dh) x^T instead of eager's dh Up(x)^T; with
inf in x, eager's Up(x) has 0 * inf = NaN at the taps of zero weight, the reordered product has none, and the
same gradient comes out as inf where eager has NaN. NaN in a low branch, and NaN or inf in x0, match.
"""
from __future__ import annotations

import pytest
import torch

from hrfast.ops import Resample, fuse, fuse_ref, head_ref, hrnet_v2_head
from hrfast.testing import assert_rel_close, tolerance

from conftest import TRITON_DEVICE
from optest import gradients, leaf_copy

DTYPES = [torch.float64, torch.float32]
BIL = Resample("bilinear", align_corners=False)
NEAR = Resample("nearest")


def assert_same_nonfinite(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """NaN, +inf and -inf at the same elements; the finite elements within the dtype's tolerance."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    for what, test in (("NaN", torch.isnan), ("+inf", lambda t: t == float("inf")),
                       ("-inf", lambda t: t == float("-inf"))):
        wrong = (test(a) != test(e)).nonzero().tolist()
        assert not wrong, f"{name}: {what} differs from eager at {len(wrong)} elements, e.g. {wrong[:4]}"
    finite = torch.isfinite(e)
    if finite.any():
        assert_rel_close(a[finite], e[finite], tolerance(dtype), name)


def _nonfinite_somewhere(named: dict, inf: bool = True) -> None:
    """The case tests what it means to: some expected tensor has NaN, and (`inf`) some has inf."""
    values = [t for t in named.values() if t is not None]
    assert any(torch.isnan(t).any() for t in values)
    assert not inf or any(torch.isinf(t).any() for t in values)


# ------------------------------------------------------------------------------------------------ fusion


def _fuse_inputs(dtype, channels_last: bool):
    """Three terms (same size with BN, bilinear x2 with BN, nearest x4 without), NaN in x0, +inf in the
    bilinear term, -inf in the nearest one."""
    shapes = [(2, 4, 8, 8), (2, 4, 4, 4), (2, 4, 2, 2)]
    xs = [torch.randn(s, dtype=dtype) for s in shapes]
    xs[0][0, 1, 2, 3] = float("nan")
    xs[1][1, 2, 1, 1] = float("inf")
    xs[2][0, 3, 0, 1] = float("-inf")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [x.to(TRITON_DEVICE).contiguous(memory_format=fmt).requires_grad_() for x in xs]
    scales = [(0.5 + torch.rand(4, dtype=dtype)).to(TRITON_DEVICE).requires_grad_() for _ in range(2)] + [None]
    shifts = [torch.randn(4, dtype=dtype).to(TRITON_DEVICE).requires_grad_() for _ in range(2)] + [None]
    return xs, scales, shifts


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0 * inf
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fuse_nan_and_inf_like_eager(dtype, channels_last, fused_backend):
    xs, scales, shifts = _fuse_inputs(dtype, channels_last)
    resample = [None, BIL, NEAR]
    y = fuse(xs, scales=scales, shifts=shifts, resample=resample, backend=fused_backend)
    grad_y = torch.randn(y.shape, dtype=dtype).to(TRITON_DEVICE)
    named = {f"x{k}": x for k, x in enumerate(xs)}
    named.update({f"scale{k}": s for k, s in enumerate(scales) if s is not None})
    named.update({f"shift{k}": s for k, s in enumerate(shifts) if s is not None})
    grads = gradients(y, list(named.items()), grad_y)

    copies = {name: leaf_copy(t, torch.float64) for name, t in named.items()}
    r_xs = [copies[f"x{k}"] for k in range(3)]
    r_scales = [copies.get(f"scale{k}") for k in range(3)]
    r_shifts = [copies.get(f"shift{k}") for k in range(3)]
    expected = fuse_ref(r_xs, r_scales, r_shifts, resample, tuple(xs[0].shape[2:]))
    expected_grads = gradients(expected, list(copies.items()), grad_y)
    _nonfinite_somewhere({"y": expected, **dict(zip(named, expected_grads))})

    assert_same_nonfinite("y", y, expected, dtype)
    for name, g, e in zip(named, grads, expected_grads):
        assert_same_nonfinite(f"d {name}", g, e, dtype)


# -------------------------------------------------------------------------------------------------- head


def _head_args(dtype) -> dict:
    """A four-branch head (M=10, K=3) with NaN and +inf in x0 and NaN in x1, BN with running statistics."""
    xs = [torch.randn(2, c, s, s, dtype=dtype) for c, s in ((4, 8), (6, 4), (8, 2), (5, 1))]
    xs[0][1, 2, 3, 4] = float("nan")
    xs[0][0, 3, 6, 1] = float("inf")
    xs[1][0, 1, 2, 1] = float("nan")
    M, K, C = 10, 3, 23
    args = {"xs": [x.to(TRITON_DEVICE).requires_grad_() for x in xs]}
    for name, t in (("conv_weight", torch.randn(M, C, 1, 1) / C ** 0.5), ("conv_bias", 0.5 * torch.randn(M)),
                    ("bn_weight", torch.where(torch.rand(M) < 0.5, -1.0, 1.0) * (0.5 + torch.rand(M))),
                    ("bn_bias", 0.5 * torch.randn(M)), ("cls_weight", torch.randn(K, M, 1, 1) / M ** 0.5),
                    ("cls_bias", torch.randn(K))):
        args[name] = t.to(dtype=dtype, device=TRITON_DEVICE).requires_grad_()
    args["running_mean"] = (0.5 * torch.randn(M)).to(dtype=dtype, device=TRITON_DEVICE)
    args["running_var"] = (0.5 + torch.rand(M)).to(dtype=dtype, device=TRITON_DEVICE)
    return args


def _head(fn, args: dict, training: bool, **kwargs):
    a = args
    return fn(a["xs"], a["conv_weight"], a["conv_bias"], a["running_mean"], a["running_var"], a["bn_weight"],
              a["bn_bias"], a["cls_weight"], a["cls_bias"], training=training, **kwargs)


def _leaves(args: dict) -> dict:
    named = {f"xs[{j}]": x for j, x in enumerate(args["xs"])}
    named.update((n, args[n]) for n in ("conv_weight", "conv_bias", "bn_weight", "bn_bias", "cls_weight",
                                        "cls_bias"))
    return named


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0 * inf
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_nan_and_inf_like_eager(dtype, training, fused_backend):
    args = _head_args(dtype)
    ref = {"xs": [leaf_copy(x, torch.float64) for x in args["xs"]]}
    ref.update({n: leaf_copy(t, torch.float64, grad=n not in ("running_mean", "running_var"))
                for n, t in args.items() if n != "xs"})
    logits = _head(hrnet_v2_head, args, training, backend=fused_backend)
    grad_y = torch.randn(logits.shape, dtype=dtype).to(TRITON_DEVICE)
    grads = gradients(logits, list(_leaves(args).items()), grad_y)

    expected = _head(head_ref, ref, training, resamples=[None] + [BIL] * 3)
    expected_grads = gradients(expected, list(_leaves(ref).items()), grad_y)
    # batch statistics spread the NaN over every element: no inf is left
    _nonfinite_somewhere({"logits": expected, **dict(zip(_leaves(ref), expected_grads))}, inf=not training)

    assert_same_nonfinite("logits", logits, expected, dtype)
    for name, g, e in zip(_leaves(args), grads, expected_grads):
        assert_same_nonfinite(f"d {name}", g, e, dtype)
    for name in ("running_mean", "running_var"):
        assert_same_nonfinite(name, args[name], ref[name], dtype)
