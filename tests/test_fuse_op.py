"""`hrfast.ops.fuse` (the fused HRNet fusion step) against its plain PyTorch reference `fuse_ref`.

    y = ReLU( sum_k Up_k(inputs[k] * scales[k] + shifts[k]) )

Every kernel check runs for both fused backends, "triton" and "cuda" (on CPU through their emulations when
there is no GPU: the Triton interpreter and the host build of csrc/, see conftest.py), and compares them
with `fuse_ref` evaluated in float64 on the same values: the output and every gradient (each input, scale
and shift) for a random upstream gradient. fp32 must be within FP32_RTOL, fp64 within
FP64_RTOL, fp16/bf16 within twice the error plain PyTorch itself makes in that dtype (`fuse_ref` on the
low-precision tensors, gradients by autograd through it). Launch buffers start as NaN (conftest), so an
element a kernel forgets to write fails. Shapes stay tiny because the interpreter is slow.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import pytest
import torch

from hrfast import _autotune
from hrfast.ops import Resample, fuse, fuse_ref
from hrfast.testing import FP32_RTOL, FP64_RTOL, assert_low_precision_close, assert_rel_close

from conftest import TRITON_DEVICE
from optest import LOW_PRECISION, assert_matches, gradcheck_named, gradients, leaf_copy, tolerance

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
CL = torch.channels_last


def near(scale_factor=None, recompute=False) -> Resample:
    return Resample("nearest", scale_factor=scale_factor, recompute_scale_factor=recompute)


def bil(scale_factor=None, align_corners=None, recompute=False) -> Resample:
    return Resample("bilinear", align_corners=align_corners, scale_factor=scale_factor,
                    recompute_scale_factor=recompute)


class Case(NamedTuple):
    """One fusion problem: the output size and, per term, (input H x W, resample or None)."""

    size: Tuple[int, int]
    terms: Sequence[Tuple[Tuple[int, int], Optional[Resample]]]
    N: int = 2
    C: int = 3
    affine: str = "full"  # "full" (scale and shift everywhere), "mixed" (some of each missing), "none"
    relu: bool = True
    pass_size: bool = False  # pass size= even when an output-size term gives it


# ---------------------------------------------------------------------------- the harness: bf16 rounding


def test_interpreter_bf16_store_rounds_to_nearest():
    """A Triton float32 -> bfloat16 cast rounds to nearest even like torch: natively on a GPU, and under
    the interpreter (which truncates) through conftest's `interpreter_rounds_bf16_to_nearest`. The bf16
    checks below rely on it: truncation doubles the error of every bf16 store."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(x_ptr, y_ptr, z_ptr, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + o)
        tl.store(y_ptr + o, x.to(tl.bfloat16))
        tl.store(z_ptr + o, x)  # implicit conversion on store

    x = torch.randn(1024, device=TRITON_DEVICE) * torch.logspace(-30, 30, 1024, device=TRITON_DEVICE)
    x[:4] = torch.tensor([1.9999999, 0.99999994, 3.99, 1.0 + 2**-8])  # carries into the exponent, a tie
    y = torch.empty(1024, dtype=BF16, device=TRITON_DEVICE)
    z = torch.empty_like(y)
    cast_kernel[(1,)](x, y, z, BLOCK=1024)
    assert torch.equal(y, x.to(BF16))
    assert torch.equal(z, x.to(BF16))


# ------------------------------------------------------------------------------------------------- helpers

@pytest.fixture
def backend(fused_backend):
    """The fused backend under test (conftest's `fused_backend`)."""
    return fused_backend



def _is_same_size(term, size) -> bool:
    hw, r = term
    return r is None or tuple(hw) == tuple(size)


def _make_input(shape, dtype, layout: str, k: int) -> torch.Tensor:
    """A fresh random leaf tensor with the given layout: "nchw", "channels_last" or "strided" (views that
    are neither: a transposed buffer for even k, every other channel of a wider one for odd k)."""
    N, C, H, W = shape
    dev = TRITON_DEVICE
    if layout == "nchw":
        x = torch.randn(shape, dtype=dtype, device=dev)
    elif layout == "channels_last":
        x = torch.randn(shape, dtype=dtype, device=dev).contiguous(memory_format=CL)
    elif layout == "strided":
        if k % 2 == 0:
            x = torch.randn(N, C, W, H, dtype=dtype, device=dev).transpose(2, 3)
        else:
            x = torch.randn(N, 2 * C, H, W, dtype=dtype, device=dev)[:, ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL) or x.numel() <= 1 or C == 1
    else:
        raise ValueError(layout)
    return x.detach().requires_grad_()


def _nonzero_scale(C, dtype) -> torch.Tensor:
    sign = torch.where(torch.rand(C) < 0.5, -1.0, 1.0)
    return (sign * (0.5 + torch.rand(C))).to(dtype=dtype, device=TRITON_DEVICE).requires_grad_()


def _make_params(case: Case, param_dtype):
    n = len(case.terms)
    scales, shifts = [None] * n, [None] * n
    for k in range(n):
        has_scale = case.affine == "full" or (case.affine == "mixed" and k % 3 != 1)
        has_shift = case.affine == "full" or (case.affine == "mixed" and k % 3 != 2)
        if has_scale:
            scales[k] = _nonzero_scale(case.C, param_dtype)
        if has_shift:
            shifts[k] = torch.randn(case.C, dtype=param_dtype, device=TRITON_DEVICE).requires_grad_()
    return scales, shifts


def _layouts(layout: Union[str, Sequence[str]], n: int) -> list:
    return [layout] * n if isinstance(layout, str) else list(layout)


def _build(case: Case, dtype, layout, param_dtype=None):
    """Fresh inputs, scales and shifts for `case`; returns (inputs, scales, shifts, resamples, size_arg)."""
    layouts = _layouts(layout, len(case.terms))
    xs = [_make_input((case.N, case.C, *hw), dtype, layouts[k], k) for k, (hw, _) in enumerate(case.terms)]
    scales, shifts = _make_params(case, param_dtype or dtype)
    resamples = [r for _, r in case.terms]
    has_same = any(r is None for r in resamples)
    size_arg = tuple(case.size) if (case.pass_size or not has_same) else None
    return xs, scales, shifts, resamples, size_arg


def _leaves(xs, scales, shifts):
    """(name, tensor) of every differentiable argument."""
    named = [(f"inputs[{k}]", x) for k, x in enumerate(xs)]
    named += [(f"scales[{k}]", s) for k, s in enumerate(scales) if s is not None]
    named += [(f"shifts[{k}]", b) for k, b in enumerate(shifts) if b is not None]
    return named


def _clone_args(xs, scales, shifts, dtype=None):
    """Detached copies (optionally cast) that are leaves of their own graph."""
    return tuple([leaf_copy(t, dtype) for t in ts] for ts in (xs, scales, shifts))


def _reference(xs, scales, shifts, resamples, size, relu, grad_y, dtype=None):
    """fuse_ref on copies of the arguments (cast to `dtype` if given): (y, grads in `_leaves` order)."""
    rx, rs, rb = _clone_args(xs, scales, shifts, dtype)
    y = fuse_ref(rx, rs, rb, resamples, size, relu)
    return y, gradients(y, _leaves(rx, rs, rb), grad_y)


def _summand_magnitudes(xs, scales, shifts, resamples, size, relu, grad_y, y64):
    """Per gradient, the same sums taken over absolute values: for d scale_k = sum_pixels x_k * Up_k^T(g) and
    d shift_k = sum_pixels Up_k^T(g) (g = grad_y masked by the ReLU), sum |x_k| * Up_k^T(|g|) and
    sum Up_k^T(|g|) (Up^T's weights are >= 0). A float sum of many terms is accurate relative to this, not to
    its own value, which cancellation can make arbitrarily small (seen: one channel of 576 pixels summing to
    1e-4 while its terms are O(1)). Elementwise gradients (d inputs) get their own magnitudes likewise."""
    g = grad_y.double().abs()
    if relu:
        g = g * (y64 > 0)
    ax, as_, ab = ([None if t is None else t.detach().double().abs() for t in ts] for ts in (xs, scales, shifts))
    _, mags = _reference(ax, as_, ab, resamples, size, False, g, F64)
    return mags


def _assert_sum_close(g, g64, magnitude, rtol, name):
    err, scale = (g.double() - g64).norm().item(), magnitude.norm().item()
    assert err <= rtol * scale, f"{name}: error {err:.3e} exceeds {rtol:.0e} x the summands' magnitude {scale:.3e}"


def _expected_memory_format(case: Case, layout) -> Optional[torch.memory_format]:
    """The output's layout: that of the first output-size term (else the first term); None when that term is
    both layouts at once (one channel or one pixel: its strides satisfy either), so either is right."""
    layouts = _layouts(layout, len(case.terms))
    same = [k for k, t in enumerate(case.terms) if _is_same_size(t, case.size)]
    first = same[0] if same else 0
    if case.C == 1 or case.terms[first][0][0] * case.terms[first][0][1] == 1:
        return None
    return CL if layouts[first] == "channels_last" else torch.contiguous_format


def assert_rounded_once(y: torch.Tensor, y64: torch.Tensor, max_fraction: float = 0.01) -> None:
    """fp16/bf16 output: the kernels sum in fp32 (chained launches through an fp32 partial) and round once
    when they store y, so y is the float64 result rounded to nearest almost everywhere (fp32's own error
    moves an element across a rounding boundary with probability ~2**-13 for fp16, ~2**-16 for bf16).
    This is sharper than the 2x-PyTorch budget, which an extra intermediate rounding would still meet."""
    mismatch = (y != y64.to(y.dtype)).double().mean().item()
    assert mismatch <= max_fraction, f"y: {mismatch:.1%} of the elements are not the exact result rounded once"


def check_fuse(case: Case, dtype, layout, param_dtype=None, grad_layout="like_y", backend="triton"):
    """A fused backend vs the float64 reference: output, its layout, and every gradient."""
    xs, scales, shifts, resamples, size_arg = _build(case, dtype, layout, param_dtype)
    y = fuse(xs, scales=scales, shifts=shifts, resample=resamples, size=size_arg, relu=case.relu,
             backend=backend)
    size = tuple(case.size)
    assert y.shape == (case.N, case.C, *size) and y.dtype == dtype and y.device == xs[0].device
    fmt = _expected_memory_format(case, layout)
    assert fmt is None or y.is_contiguous(memory_format=fmt), f"output strides {y.stride()}, expected {fmt}"

    grad_y = torch.randn_like(y)
    if grad_layout == "nchw":
        grad_y = grad_y.contiguous()
    elif grad_layout == "channels_last":
        grad_y = grad_y.contiguous(memory_format=CL)
    named = _leaves(xs, scales, shifts)
    grads = gradients(y, named, grad_y)

    y64, grads64 = _reference(xs, scales, shifts, resamples, size, case.relu, grad_y, F64)
    if dtype in LOW_PRECISION:
        y_pt, grads_pt = _reference(xs, scales, shifts, resamples, size, case.relu, grad_y)
        assert_matches("y", y, y64, y_pt, dtype)
        assert_rounded_once(y, y64)
        for (name, t), g, g64, g_pt in zip(named, grads, grads64, grads_pt):
            assert g.shape == t.shape and g.dtype == t.dtype, name
            # parameters may be fp32 next to low-precision activations: the budget is the activations'
            assert_matches(f"d {name}", g, g64, g_pt, dtype)
    else:
        assert_matches("y", y, y64, None, dtype)
        mags = _summand_magnitudes(xs, scales, shifts, resamples, size, case.relu, grad_y, y64)
        for (name, t), g, g64, mag in zip(named, grads, grads64, mags):
            assert g.shape == t.shape and g.dtype == t.dtype, name
            if name.startswith("inputs"):
                assert_matches(f"d {name}", g, g64, None, dtype)
            else:  # per-channel sums over every pixel: judged against their summands (see _summand_magnitudes)
                _assert_sum_close(g, g64, mag, tolerance(dtype), f"d {name}")


# ----------------------------------------------------------------- every mode x layout x dtype (the matrix)

MODE_CASES = {
    # several output-size terms: HRNet's downsampled chains D_ij(x_j) plus x_i
    "same": Case((7, 5), [((7, 5), None)] * 3),
    "nearest_sf_2_4_8": Case((8, 8), [((8, 8), None), ((4, 4), near(2)), ((2, 2), near(4)), ((1, 1), near(8))]),
    "nearest_size_odd": Case((7, 5), [((7, 5), None), ((3, 2), near()), ((4, 3), near())]),
    "bilinear_sf_2_4": Case((8, 4), [((8, 4), None), ((4, 2), bil(2)), ((2, 1), bil(4))]),
    "bilinear_size_odd": Case((7, 5), [((7, 5), None), ((4, 3), bil()), ((2, 2), bil())]),
    "bilinear_corners_size_odd": Case((7, 5), [((7, 5), None), ((4, 3), bil(align_corners=True)),
                                               ((1, 2), bil(align_corners=True))]),
}
DTYPES = [F32, F64, F16, BF16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", list(MODE_CASES))
def test_fuse_modes(mode, layout, dtype, backend):
    case = MODE_CASES[mode]
    # relu on for NCHW, off for channels_last: each mode x dtype sees both; BN-style fp32 parameters
    # next to fp16/bf16 activations
    case = case._replace(relu=layout == "nchw")
    check_fuse(case, dtype, layout, param_dtype=F32 if dtype in LOW_PRECISION else dtype, backend=backend)


# ---------------------------------------------------------------------- shapes, term counts, layouts, dtypes

SHAPE_CASES = [
    # size-1 dimensions
    pytest.param(Case((1, 1), [((1, 1), None), ((1, 1), None), ((1, 1), bil())], N=3, C=4, relu=False),
                 F32, "channels_last", None, id="out_1x1"),
    pytest.param(Case((1, 7), [((1, 7), None), ((1, 3), bil()), ((1, 2), near()), ((1, 4), bil(align_corners=True))],
                      N=1, C=2, affine="mixed"), F32, "nchw", None, id="out_1xW"),
    pytest.param(Case((5, 1), [((2, 1), bil()), ((3, 1), near())], C=2), F64, "channels_last", None,
                 id="out_Hx1_all_resampled"),
    pytest.param(Case((5, 7), [((5, 7), None), ((1, 1), near()), ((1, 1), bil()), ((1, 1), bil(align_corners=True))],
                      N=1, C=1, relu=False), F32, "nchw", None, id="source_1x1_C1"),
    # scale factors that are not powers of two, pairs, and recompute_scale_factor
    pytest.param(Case((9, 9), [((9, 9), None), ((3, 3), near(3))], N=1, C=2, affine="none", relu=False),
                 F32, "channels_last", None, id="nearest_sf3"),
    pytest.param(Case((7, 7), [((7, 7), None), ((5, 5), bil(1.5)), ((5, 5), near(1.5))], affine="mixed"),
                 F32, "nchw", None, id="sf_1.5_not_in_over_out"),
    pytest.param(Case((7, 7), [((7, 7), None), ((5, 5), bil(1.5, recompute=True)), ((5, 5), near(1.5, recompute=True))],
                      N=1), F32, "channels_last", None, id="sf_1.5_recompute"),
    pytest.param(Case((4, 8), [((4, 8), None), ((2, 2), bil((2.0, 4.0))), ((1, 4), near((4.0, 2.0)))], N=1),
                 F32, "nchw", None, id="sf_pairs"),
    pytest.param(Case((8, 6), [((8, 6), None), ((4, 3), bil(2, align_corners=True))], relu=False),
                 F32, "channels_last", None, id="bilinear_corners_sf2"),
    pytest.param(Case((6, 4), [((6, 4), None), ((3, 2), near()), ((3, 2), bil())], N=3, C=2),
                 F16, "nchw", F16, id="size_2x_fp16_params"),
    pytest.param(Case((5, 5), [((5, 5), None), ((5, 5), bil()), ((5, 5), near())], pass_size=True, relu=False),
                 F32, "nchw", None, id="resample_to_same_size"),
    pytest.param(Case((7, 5), [((7, 2), bil()), ((3, 5), near()), ((7, 3), bil(align_corners=True)), ((7, 5), None)],
                      N=1, C=2, affine="mixed"), F32, "nchw", None, id="one_axis_same_size"),
    pytest.param(Case((5, 5), [((5, 5), None), ((4, 4), bil(1.3)), ((4, 4), near(1.3))], N=1, C=2), F64,
                 "channels_last", None, id="sf_1.3_big_fraction_fp64"),
    pytest.param(Case((3, 5), [((3, 5), None)], N=2, C=3), F32, "channels_last", None, id="1_term_same"),
    pytest.param(Case((5, 5), [((2, 3), bil())], N=1, C=2, relu=False), F16, "nchw", F16, id="1_term_upsampled"),
    # HRNet-like branches
    pytest.param(Case((4, 4), [((4, 4), None), ((4, 4), None), ((2, 2), near(2)), ((1, 1), near(4))], N=3, C=4),
                 BF16, "channels_last", BF16, id="hrnet_4_terms_bf16_params"),
    pytest.param(Case((9, 7), [((9, 7), None), ((5, 4), bil()), ((3, 2), bil()), ((2, 1), bil())], N=1, C=2),
                 F32, "nchw", None, id="hrnet_odd_input_bilinear_size"),
    # term counts beyond one forward launch (MAX_TERMS = 4): chained forward; backward takes them in one launch
    pytest.param(Case((5, 5), [((5, 5), None)] * 3 + [((3, 3), bil()), ((2, 2), near())], N=1),
                 F32, "channels_last", None, id="5_terms"),
    pytest.param(Case((5, 3), [((5, 3), None)] * 5 + [((2, 2), bil())], affine="mixed", relu=False),
                 F32, "nchw", None, id="6_terms_5_same"),
    pytest.param(Case((7, 5), [((7, 5), None), ((4, 3), bil()), ((2, 2), near()), ((3, 2), bil(align_corners=True)),
                               ((1, 1), near()), ((4, 3), near())], N=1), F32, "channels_last", None,
                 id="6_terms_5_upsampled"),
    pytest.param(Case((7, 5), [((7, 5), None), ((4, 3), bil()), ((2, 2), near()), ((3, 2), bil(align_corners=True)),
                               ((1, 1), near()), ((4, 3), near())], N=1, C=2, affine="mixed"), BF16, "nchw", F32,
                 id="6_terms_5_upsampled_bf16"),
    pytest.param(Case((4, 4), [((4, 4), None)] * 4 + [((2, 2), near(2)), ((2, 2), bil(2)), ((1, 1), bil(4))], N=1,
                      C=2), F64, "nchw", None, id="7_terms_fp64"),
    pytest.param(Case((3, 3), [((3, 3), None), ((2, 2), bil())] * 3, N=1, C=2, relu=False), F16, "channels_last",
                 F32, id="6_terms_fp16"),
    # mixed and strided layouts: the output follows the first output-size input
    pytest.param(Case((6, 4), [((3, 2), near(2)), ((6, 4), None), ((6, 4), None)]), F32,
                 ("nchw", "channels_last", "nchw"), None, id="layout_first_same_size_is_cl"),
    pytest.param(Case((6, 4), [((3, 2), bil()), ((6, 4), None), ((6, 4), None)]), F32,
                 ("channels_last", "nchw", "channels_last"), None, id="layout_first_same_size_is_nchw"),
    pytest.param(Case((6, 4), [((3, 2), near(2)), ((2, 2), bil())]), F32, ("channels_last", "nchw"), None,
                 id="layout_all_resampled_first_cl"),
    pytest.param(Case((7, 5), [((7, 5), None), ((4, 3), bil()), ((7, 5), None), ((2, 2), near())], affine="mixed"),
                 F32, "strided", None, id="strided_views"),
    # more than one tile: channels (BLOCK_C = 64 for channels_last) and pixels (BLOCK_P = 512 for NCHW)
    pytest.param(Case((7, 5), [((7, 5), None), ((4, 3), bil()), ((2, 3), near())], N=1, C=65), F32,
                 "channels_last", None, id="tiles_channels_65"),
    pytest.param(Case((24, 24), [((24, 24), None), ((23, 23), bil()), ((12, 12), near(2))], N=1, C=1), F32,
                 "nchw", None, id="tiles_pixels_576"),
]


@pytest.mark.parametrize("case, dtype, layout, param_dtype", SHAPE_CASES)
def test_fuse_shapes(case, dtype, layout, param_dtype, backend):
    check_fuse(case, dtype, layout, param_dtype, backend=backend)


@pytest.mark.parametrize("grad_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fuse_upstream_grad_layout(layout, grad_layout, backend):
    """The upstream gradient may come in either layout, whatever the output's."""
    case = Case((5, 4), [((5, 4), None), ((3, 2), bil()), ((5, 4), None), ((2, 2), near())], N=2, C=3,
                affine="mixed")
    check_fuse(case, F32, layout, grad_layout=grad_layout, backend=backend)


def test_nearest_index_scan(backend):
    """Forward only, many (in, out) pairs along W: nearest is a pure gather, so the kernel equals
    F.interpolate bit for bit (the float32 index math, ATen's 2x shortcut, clamping)."""
    for n_in in range(1, 8):
        for n_out in range(n_in, 3 * n_in + 3):
            x = torch.randn(1, 2, 2, n_in, device=TRITON_DEVICE)
            size = (2 * n_in if n_in <= 2 else n_in, n_out)  # H: 2x (shortcut) or same size
            r = near()
            y = fuse([x], resample=[r], size=size, relu=False, backend=backend)
            expected = fuse_ref([x], [None], [None], [r], size, relu=False)
            assert torch.equal(y, expected), (n_in, n_out)


@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_index_scan(align_corners, backend):
    """Forward only, many (in, out) pairs along W in float64: the kernel's bilinear taps and weights are
    ATen's (a wrong tap or ratio is an O(1) relative error, far above FP64_RTOL)."""
    for n_in in range(1, 7):
        for n_out in range(n_in, 3 * n_in + 2):
            x = torch.randn(1, 1, 3, n_in, dtype=F64, device=TRITON_DEVICE)
            r = bil(align_corners=align_corners)
            y = fuse([x], resample=[r], size=(5, n_out), relu=False, backend=backend)
            expected = fuse_ref([x], [None], [None], [r], (5, n_out), relu=False)
            assert_rel_close(y, expected, FP64_RTOL, f"y ({n_in} -> {n_out})")


# ------------------------------------------------------------------------------------------------ gradcheck


def _gradcheck(case: Case, layout: str, seed: int, fast_mode: bool, backend: str = "triton"):
    torch.manual_seed(seed)
    xs, scales, shifts, resamples, size_arg = _build(case, F64, layout)
    n = len(xs)
    has_scale = [s is not None for s in scales]
    has_shift = [b is not None for b in shifts]

    def fn(*flat):
        xs_, rest = list(flat[:n]), list(flat[n:])
        sc = [rest.pop(0) if h else None for h in has_scale]
        sh = [rest.pop(0) if h else None for h in has_shift]
        return fuse(xs_, scales=sc, shifts=sh, resample=resamples, size=size_arg, relu=case.relu, backend=backend)

    gradcheck_named(fn, _leaves(xs, scales, shifts), fast_mode)


GRADCHECK_FULL = {
    "same": Case((2, 3), [((2, 3), None), ((2, 3), None)], N=1, C=1),
    "nearest_sf2": Case((4, 2), [((4, 2), None), ((2, 1), near(2))], N=1, C=1, relu=False),
    "nearest_size": Case((3, 3), [((3, 3), None), ((2, 1), near())], N=1, C=1),
    "bilinear_sf2": Case((4, 2), [((4, 2), None), ((2, 1), bil(2))], N=1, C=1),
    "bilinear_size": Case((3, 3), [((3, 3), None), ((2, 2), bil())], N=1, C=1, relu=False),
    "bilinear_corners": Case((3, 3), [((3, 3), None), ((2, 2), bil(align_corners=True))], N=1, C=1),
    "bilinear_size_C2": Case((3, 2), [((3, 2), None), ((2, 1), bil())], N=1, C=2),
}


@pytest.mark.parametrize("name", list(GRADCHECK_FULL))
def test_gradcheck_full(name, backend):
    layout = "channels_last" if name.endswith("C2") else "nchw"
    _gradcheck(GRADCHECK_FULL[name], layout, seed=0, fast_mode=False, backend=backend)


GRADCHECK_FAST = {
    "mixed_modes": Case((5, 4), [((5, 4), None), ((3, 2), bil()), ((2, 2), near()), ((2, 3), bil(align_corners=True))],
                        N=1, C=2),
    "scale_factors": Case((4, 2), [((4, 2), None), ((2, 1), near(2)), ((1, 1), bil((4.0, 2.0)))], N=2, C=2,
                          affine="mixed", relu=False),
    "6_terms": Case((3, 3), [((3, 3), None)] * 4 + [((2, 2), bil()), ((1, 2), near())], N=1, C=2),
}
GRADCHECK_FAST_PARAMS = [
    pytest.param(name, layout, seed, id=f"{name}-{layout}-seed{seed}")
    for name in GRADCHECK_FAST for layout in ("nchw", "channels_last")
    for seed in (range(3) if name == "mixed_modes" else range(1))
]


@pytest.mark.parametrize("name, layout, seed", GRADCHECK_FAST_PARAMS)
def test_gradcheck_fast(name, layout, seed, backend):
    _gradcheck(GRADCHECK_FAST[name], layout, seed, fast_mode=True, backend=backend)


# -------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("dtype, layout", [(F32, "nchw"), (BF16, "channels_last")], ids=["fp32_nchw", "bf16_cl"])
def test_deterministic(dtype, layout, backend):
    case = Case((7, 5), [((7, 5), None), ((4, 3), bil()), ((2, 2), near()), ((3, 2), bil(align_corners=True)),
                         ((7, 5), None), ((1, 1), bil())], N=1, C=3)
    xs, scales, shifts, resamples, size_arg = _build(case, dtype, layout)
    leaves = [t for _, t in _leaves(xs, scales, shifts)]
    runs = []
    grad_y = None
    for _ in range(2):
        y = fuse(xs, scales=scales, shifts=shifts, resample=resamples, size=size_arg, backend=backend)
        grad_y = torch.randn_like(y) if grad_y is None else grad_y
        runs.append((y, torch.autograd.grad(y, leaves, grad_y)))
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------------------- int64 offsets


@pytest.mark.parametrize("size, stride, expected", [
    ((2, 1, 1, 1), (2**31, 1, 1, 1), True),             # (2 - 1) * 2**31 > 2**31 - 1
    ((2, 1, 1, 1), (2**31 - 1, 1, 1, 1), False),         # exactly 2**31 - 1 still fits
    ((2, 3, 4, 5), (2**31 - 22, 1, 5, 1), False),        # 2**31 - 22 + 2 + 15 + 4 = 2**31 - 1
    ((2, 3, 4, 5), (2**31 - 21, 1, 5, 1), True),         # one more
    ((1, 3, 4, 5), (2**40, 20, 5, 1), False),            # a size-1 dimension is never stepped over
    ((0, 3, 4, 5), (2**40, 20, 5, 1), False),            # an empty tensor reaches no offset
    ((1, 2, 2**15, 2**15 + 1), (2**32, 1, 2 * (2**15 + 1), 2), True),  # no single stride is large
    ((1, 2, 2**15, 2**15), (2**32, 2**30, 2**15, 1), False),  # 2**30 + (2**15 - 1) * (2**15 + 1) = 2**31 - 1
    ((3, 2, 2, 2), (2**30, 1, 2**29, 2**28), True),      # 2 * 2**30 + 2**29 + 2**28 + 1
])
def test_needs_int64(size, stride, expected):
    from hrfast.kernels.fuse import INT32_LIMIT, needs_int64

    t = torch.empty_strided(size, stride, device="meta")
    max_offset = sum((s - 1) * st for s, st in zip(size, stride) if s > 0)
    assert (max_offset > INT32_LIMIT) == expected  # the parametrization itself is right
    assert needs_int64(t) is expected
    small = torch.empty(1, 2, 3, 4, device="meta")
    assert needs_int64(small, None, t) is expected
    assert needs_int64(t, small) is expected
    assert needs_int64(None, small) is False


def _kernel_args(xs, scales, shifts, resamples, size, relu, channels_last):
    """(plan, xs, scales, shifts) as the launchers take them."""
    from hrfast.plan import fuse_plan

    plan = fuse_plan(tuple(tuple(x.shape[2:]) for x in xs), tuple(resamples), size, relu, channels_last,
                     tuple(s is not None for s in scales), tuple(b is not None for b in shifts))
    detach = [[None if t is None else t.detach() for t in ts] for ts in (xs, scales, shifts)]
    return (plan, *detach)


@pytest.mark.parametrize("dtype, layout, relu", [(F32, "nchw", True), (BF16, "channels_last", False),
                                                 (F64, "strided", True)], ids=["fp32_nchw", "bf16_cl", "fp64_strided"])
def test_int64_path_matches_int32(dtype, layout, relu):
    """The launchers with force_int64=True (64-bit offsets everywhere) give the int32 path's bits."""
    from hrfast.kernels.fuse import fuse_backward, fuse_forward

    case = Case((5, 4), [((5, 4), None), ((3, 2), bil()), ((2, 2), near()), ((2, 3), bil(align_corners=True)),
                         ((5, 4), None)], N=2, C=3, affine="mixed", relu=relu)
    xs, scales, shifts, resamples, _ = _build(case, dtype, layout)
    size = tuple(case.size)
    plan, kxs, kscales, kshifts = _kernel_args(xs, scales, shifts, resamples, size, relu, layout == "channels_last")
    y32 = fuse_forward(plan, kxs, kscales, kshifts)
    y64 = fuse_forward(plan, kxs, kscales, kshifts, force_int64=True)
    assert torch.equal(y32, y64)
    # and both are right (an all-NaN pair would be "equal" in no case, but check the values too)
    ref = fuse_ref([x.detach().double() for x in xs], [None if s is None else s.detach().double() for s in scales],
                   [None if b is None else b.detach().double() for b in shifts], resamples, size, relu)
    if dtype in LOW_PRECISION:
        assert_low_precision_close(y32, ref, fuse_ref([x.detach() for x in xs], scales, shifts, resamples, size, relu))
    else:
        assert_rel_close(y32, ref, FP64_RTOL if dtype == F64 else FP32_RTOL, "y")

    grad_y = torch.randn_like(y32)
    needs = [(True, True, True)] * len(kxs)
    g32 = fuse_backward(plan, grad_y, y32 if relu else None, kxs, kscales, kshifts, needs)
    g64 = fuse_backward(plan, grad_y, y64 if relu else None, kxs, kscales, kshifts, needs, force_int64=True)
    for k, (a, b) in enumerate(zip(g32, g64)):
        for name, ga, gb in zip(("dx", "dscale", "dshift"), a, b):
            assert (ga is None) == (gb is None), (k, name)
            if ga is not None:
                assert torch.isfinite(ga).all(), (k, name)
                assert torch.equal(ga, gb), (k, name)
    for k in range(len(kxs)):
        assert (g32[k][1] is None) == (scales[k] is None) and (g32[k][2] is None) == (shifts[k] is None)


def test_partial_sums_reduced_in_row_blocks(monkeypatch):
    """One launch reduces every per-channel gradient's partial sums: with a small REDUCE_TILE it loops over
    several BLOCK_R row blocks with a masked tail, and the gradients' row counts differ (2 tiles per image for
    the output-size terms, 1 for the upsampled ones); against autograd through fuse_ref in float64."""
    from hrfast.kernels import fuse as fuse_kernels

    monkeypatch.setattr(fuse_kernels, "REDUCE_TILE", 8)
    case = Case((24, 30), [((24, 30), None), ((12, 15), bil()), ((7, 9), near()), ((24, 30), None)], N=3, C=3,
                affine="mixed")
    xs, scales, shifts, resamples, _ = _build(case, F64, "nchw")
    plan, kxs, kscales, kshifts = _kernel_args(xs, scales, shifts, resamples, case.size, True, False)
    y = fuse_kernels.fuse_forward(plan, kxs, kscales, kshifts)
    grad_y = torch.randn_like(y)
    grads = fuse_kernels.fuse_backward(plan, grad_y, y, kxs, kscales, kshifts, [(True, True, True)] * len(kxs))
    params = [[None if t is None else t.detach().clone().requires_grad_() for t in ts] for ts in (kscales, kshifts)]
    fuse_ref(list(kxs), params[0], params[1], resamples, case.size, True).backward(grad_y)
    checked = 0
    for k, (_, dscale, dshift) in enumerate(grads):
        for got, leaf in ((dscale, params[0][k]), (dshift, params[1][k])):
            assert (got is None) == (leaf is None), k
            if got is not None:
                assert_rel_close(got, leaf.grad, FP64_RTOL, f"term {k}")
                checked += 1
    assert checked >= 4


@pytest.mark.parametrize("ratio, mode, align_corners", [
    ((1, m), mode, False) for m in (1, 2, 4, 8, 16) for mode in ("nearest", "bilinear")
])
def test_exact_adjoint_window_covers_readers(ratio, mode, align_corners):
    """For ratios 1/2^k the adjoint visits outputs [s * step - offset, + K) of source s: every output that
    reads s in the forward (ATen's index rules, float32) must lie in that window. Host-side, larger sizes."""
    from hrfast.kernels.fuse import BILINEAR, NEAREST, window

    m = ratio[1]
    kmode = NEAREST if mode == "nearest" else BILINEAR
    for n_in in range(1, 12):
        n_out = n_in * m
        K, step, offset = window(ratio, kmode, align_corners, n_out)
        assert step == m
        d = torch.arange(n_out, dtype=torch.float32)
        r = torch.tensor(ratio[0] / ratio[1], dtype=torch.float32)
        if mode == "nearest":
            readers = [(torch.clamp(torch.floor(d * r).long(), max=n_in - 1) == s) for s in range(n_in)]
        else:
            real = torch.clamp(r * (d + 0.5) - 0.5, min=0.0)
            i0 = torch.clamp(torch.floor(real).long(), max=n_in - 1)
            l1 = torch.clamp(real - i0.float(), 0.0, 1.0)
            i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
            readers = [((i0 == s) & (l1 < 1)) | ((i1 == s) & (l1 > 0)) for s in range(n_in)]
        for s in range(n_in):
            lo = max(s * step - offset, 0)
            outs = torch.nonzero(readers[s]).flatten().tolist()
            assert outs, (n_in, s)
            assert all(lo <= o < s * step - offset + K for o in outs), (n_in, s, outs, lo, K)


# ------------------------------------------------------------------- autograd edge cases: which grads, strides


@pytest.mark.parametrize("wanted", ["inputs", "scales", "shifts", "one_upsampled_input", "params_only_upsampled"])
def test_partial_requires_grad(wanted, backend):
    """Only some arguments need gradients: the others get none, the wanted ones are right."""
    case = Case((5, 4), [((5, 4), None), ((3, 2), bil()), ((5, 4), None), ((2, 2), near())], N=2, C=3)
    xs, scales, shifts, resamples, _ = _build(case, F32, "nchw")
    for k, t in enumerate(xs + scales + shifts):
        n = len(xs)
        group = "inputs" if k < n else ("scales" if k < 2 * n else "shifts")
        keep = {"inputs": group == "inputs", "scales": group == "scales", "shifts": group == "shifts",
                "one_upsampled_input": k == 1,
                "params_only_upsampled": group != "inputs" and k % n in (1, 3)}[wanted]
        t.requires_grad_(keep)
    named = [(name, t) for name, t in _leaves(xs, scales, shifts) if t.requires_grad]
    assert named
    y = fuse(xs, scales=scales, shifts=shifts, resample=resamples, backend=backend)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for _, t in named], grad_y)
    rx, rs, rb = _clone_args(xs, scales, shifts, F64)
    for t, r in zip(xs + scales + shifts, rx + rs + rb):
        r.requires_grad_(t.requires_grad)
    y64 = fuse_ref(rx, rs, rb, resamples, case.size, True)
    ref_named = [(name, t) for name, t in _leaves(rx, rs, rb) if t.requires_grad]
    grads64 = torch.autograd.grad(y64, [t for _, t in ref_named], grad_y.double())
    assert_rel_close(y, y64, FP32_RTOL, "y")
    for (name, _), g, g64 in zip(named, grads, grads64):
        assert_rel_close(g, g64, FP32_RTOL, f"d {name}")


@pytest.mark.parametrize("reduction", ["sum", "mean_of_slice"])
def test_expanded_upstream_grad(reduction, backend):
    """y.sum().backward() hands the op a stride-0 (expanded) gradient; a slice gives a zero-padded one."""
    case = Case((5, 4), [((5, 4), None), ((3, 2), bil()), ((2, 2), near())], N=2, C=3)
    xs, scales, shifts, resamples, _ = _build(case, F32, "channels_last")
    named = _leaves(xs, scales, shifts)

    def loss(y):
        return y.sum() if reduction == "sum" else y[:, 1:, 1:4].mean()

    y = fuse(xs, scales=scales, shifts=shifts, resample=resamples, backend=backend)
    grads = torch.autograd.grad(loss(y), [t for _, t in named])
    rx, rs, rb = _clone_args(xs, scales, shifts, F64)
    y64 = fuse_ref(rx, rs, rb, resamples, case.size, True)
    grads64 = torch.autograd.grad(loss(y64), [t for _, t in _leaves(rx, rs, rb)])
    for (name, _), g, g64 in zip(named, grads, grads64):
        assert_rel_close(g, g64, FP32_RTOL, f"d {name}")


def test_broadcast_input(backend):
    """An expanded (stride-0) input, e.g. a per-image constant broadcast over the rows."""
    case = Case((5, 4), [((5, 4), None), ((3, 2), bil()), ((5, 4), None)], N=2, C=3)
    xs, scales, shifts, resamples, _ = _build(case, F32, "nchw")
    row = torch.randn(2, 3, 1, 4, device=TRITON_DEVICE, requires_grad=True)
    col = torch.randn(2, 3, 3, 1, device=TRITON_DEVICE, requires_grad=True)
    inputs = [xs[0], col.expand(2, 3, 3, 2), row.expand(2, 3, 5, 4)]
    y = fuse(inputs, scales=scales, shifts=shifts, resample=resamples, backend=backend)
    grad_y = torch.randn_like(y)
    leaves = [xs[0], col, row] + scales + shifts
    grads = torch.autograd.grad(y, leaves, grad_y)
    r_leaves = [t.detach().double().requires_grad_() for t in leaves]
    r_inputs = [r_leaves[0], r_leaves[1].expand(2, 3, 3, 2), r_leaves[2].expand(2, 3, 5, 4)]
    y64 = fuse_ref(r_inputs, r_leaves[3:6], r_leaves[6:9], resamples, case.size, True)
    grads64 = torch.autograd.grad(y64, r_leaves, grad_y.double())
    assert_rel_close(y, y64, FP32_RTOL, "y")
    for k, (g, g64) in enumerate(zip(grads, grads64)):
        assert_rel_close(g, g64, FP32_RTOL, f"d leaf {k}")


@pytest.mark.parametrize("param_layout", ["strided_view", "expanded_scalar"])
def test_non_contiguous_scales_and_shifts(param_layout, backend):
    """scales/shifts are any [C] tensors (the docstring asks nothing more): a strided view such as
    `weight[::2]`, or one value broadcast with `.expand(C)` (stride 0), must be read through its stride."""
    case = Case((5, 4), [((5, 4), None), ((3, 2), bil()), ((2, 2), near())], N=2, C=3)
    xs, _, _, resamples, _ = _build(case, F32, "nchw")
    C, n = case.C, len(xs)
    if param_layout == "strided_view":
        bases = [torch.randn(2 * C, device=TRITON_DEVICE, requires_grad=True) for _ in range(2 * n)]

        def views(ts):
            return [t[::2] for t in ts[:n]], [t[1::2] for t in ts[n:]]
    else:
        bases = [torch.randn(1, device=TRITON_DEVICE, requires_grad=True) for _ in range(2 * n)]

        def views(ts):
            return [t.expand(C) for t in ts[:n]], [t.expand(C) for t in ts[n:]]

    scales, shifts = views(bases)
    assert not scales[0].is_contiguous()
    y = fuse(xs, scales=scales, shifts=shifts, resample=resamples, backend=backend)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, xs + bases, grad_y)
    r_xs = [x.detach().double().requires_grad_() for x in xs]
    r_bases = [b.detach().double().requires_grad_() for b in bases]
    r_scales, r_shifts = views(r_bases)
    y64 = fuse_ref(r_xs, r_scales, r_shifts, resamples, case.size, True)
    grads64 = torch.autograd.grad(y64, r_xs + r_bases, grad_y.double())
    assert_rel_close(y, y64, FP32_RTOL, "y")
    for k, (g, g64) in enumerate(zip(grads, grads64)):
        assert_rel_close(g, g64, FP32_RTOL, f"d leaf {k}")


# --------------------------------------------------------------------------------------------------- errors
# (the argument checks are listed in test_bad_inputs.py)


def _x(N=2, C=3, H=4, W=4, **kw):
    return torch.randn(N, C, H, W, **kw)


def test_triton_backend_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # resolve_backend reads it on every call
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fuse([_x(), _x(H=2, W=2)], resample=[None, "bilinear"], backend="triton")


# -------------------------------------------------------------------------------------------------- backends


def _backend_problem(device, dtype=F32):
    case = Case((5, 4), [((5, 4), None), ((3, 2), bil()), ((2, 2), near())], N=2, C=3)
    xs = [torch.randn(case.N, case.C, *hw, dtype=dtype, device=device, requires_grad=True) for hw, _ in case.terms]
    scales = [_nonzero_scale(case.C, dtype).detach().to(device).requires_grad_() for _ in xs]
    shifts = [torch.randn(case.C, dtype=dtype, device=device, requires_grad=True) for _ in xs]
    return xs, scales, shifts, [r for _, r in case.terms], tuple(case.size)


def test_auto_on_cpu_runs_the_reference(monkeypatch):
    """backend='auto' on CPU tensors is the PyTorch reference, bit for bit, even with the interpreter on."""
    from hrfast.kernels import fuse as fuse_kernels

    def no_kernels(*args, **kwargs):
        raise AssertionError("backend='auto' on CPU must not launch the Triton kernels")

    monkeypatch.setattr(fuse_kernels, "fuse_forward", no_kernels)
    monkeypatch.setattr(fuse_kernels, "fuse_backward", no_kernels)
    xs, scales, shifts, resamples, size = _backend_problem("cpu")
    y = fuse(xs, scales=scales, shifts=shifts, resample=resamples, backend="auto")
    leaves = xs + scales + shifts
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad_y)
    ry, rgrads = _reference(xs, scales, shifts, resamples, size, True, grad_y)
    assert torch.equal(y, ry)
    for a, b in zip(grads, rgrads):
        assert torch.equal(a, b)
    y_ref_backend = fuse(xs, scales=scales, shifts=shifts, resample=resamples, backend="reference")
    assert torch.equal(y_ref_backend, ry)


def test_reference_and_triton_agree():
    xs, scales, shifts, resamples, size = _backend_problem(TRITON_DEVICE)
    named = _leaves(xs, scales, shifts)
    leaves = [t for _, t in named]
    grad_y = None
    out = {}
    _autotune.clear()
    for backend in ("reference", "triton", "auto"):
        y = fuse(xs, scales=scales, shifts=shifts, resample=resamples, backend=backend)
        grad_y = torch.randn_like(y) if grad_y is None else grad_y
        out[backend] = (y, torch.autograd.grad(y, leaves, grad_y))
    (y_r, g_r), (y_t, g_t), (y_a, g_a) = out["reference"], out["triton"], out["auto"]
    ry, rgrads = _reference(xs, scales, shifts, resamples, size, True, grad_y)
    assert torch.equal(y_r, ry)
    assert_rel_close(y_t, y_r, FP32_RTOL, "y")
    for (name, _), a, b, c in zip(named, g_t, g_r, rgrads):
        assert torch.equal(b, c), name
        assert_rel_close(a, b, FP32_RTOL, f"d {name}")
    # auto: on a GPU the backend it measured fastest for this signature (hrfast._autotune), on CPU the reference
    expected_y, expected_g = y_r, g_r
    if TRITON_DEVICE == "cuda":
        [chosen] = [c.backend for c in _autotune.choices() if c.op == "fuse"]  # cleared above
        y_c = fuse(xs, scales=scales, shifts=shifts, resample=resamples, backend=chosen)
        expected_y, expected_g = y_c, torch.autograd.grad(y_c, leaves, grad_y)
    assert torch.equal(y_a, expected_y)
    for a, b in zip(g_a, expected_g):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- empty batch


@pytest.mark.parametrize("backend", ["triton", "cuda", "reference", "auto"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_batch(backend, layout):
    case = Case((6, 4), [((6, 4), None), ((3, 2), bil()), ((3, 2), near(2))], N=0, C=3)
    xs, scales, shifts, resamples, size_arg = _build(case, F32, layout)
    y = fuse(xs, scales=scales, shifts=shifts, resample=resamples, size=size_arg, backend=backend)
    assert y.shape == (0, 3, 6, 4) and y.dtype == F32 and y.device == xs[0].device
    leaves = [t for _, t in _leaves(xs, scales, shifts)]
    grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
    for t, g in zip(leaves, grads):
        assert g.shape == t.shape
        if g.dim() == 1:  # scale / shift: a sum over no elements
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # the interpreter's 0*inf
@pytest.mark.parametrize("resample, size", [
    (Resample("bilinear", scale_factor=2), (4, 4)),
    (Resample("bilinear", align_corners=True), (5, 4)),
    (Resample("bilinear"), (2, 5)),  # H is not resized: ATen copies that axis and reads no second tap
    (Resample("nearest"), (4, 4)),
], ids=["bilinear-x2", "bilinear-corners", "bilinear-one-axis", "nearest"])
def test_non_finite_values_propagate_like_interpolate(resample, size, backend):
    """inf/NaN in a term reach the same outputs as in F.interpolate (0 * inf taps included): NaN never hides."""
    low = torch.randn(1, 2, 2, 2, device=TRITON_DEVICE)
    low[0, 0, 1, 1] = float("inf")
    low[0, 1, 0, 1] = float("nan")
    base = torch.randn(1, 2, *size, device=TRITON_DEVICE)
    y = fuse([base, low], resample=[None, resample], relu=False, backend=backend)
    expected = fuse_ref([base, low], [None, None], [None, None], [None, resample], size, relu=False)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert torch.equal(torch.isinf(y), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert torch.allclose(y[finite], expected[finite], rtol=1e-6, atol=1e-6)
