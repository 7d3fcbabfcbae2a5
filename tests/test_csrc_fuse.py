"""backend="cuda": the CUDA C++ kernels of csrc/ (fuse_kernels.h, fuse_launchers.h), beyond the shared grid.

tests/test_fuse_op.py runs its whole grid (every mode, layout, dtype, shape case, gradcheck, determinism,
NaN/inf, partial gradients) for backend="cuda" as well as "triton". This file adds what is specific to the
C++ kernels or cheap only for them:
- more ratios: non-integer (5 -> 13, 3x, 1.5x), 2^k up to 16x, prime sizes;
- the launch structure: more terms than one launch takes (8: chained forward through the partial buffer,
  several same-size backward launches), channel and pixel counts that end inside a 32 x 8 tile in both
  layouts (the thread mapping, the block reductions and their per-tile partial rows), the grid's limits;
- a scan of many (in, out) size pairs per mode, forward and backward in float64 at FP64_RTOL (the adjoint's
  windows are the part most likely to be off by one);
- bitwise determinism across thread counts (host build) and repeated runs;
- the binding's argument checks;
- `adjoint_window` against the Triton launcher's `window`, and backend "cuda" against "triton" on random
  inputs (`cross_check`; bitwise on CPU, where both run the same float operations in the same order).

Without a GPU everything here runs the host build (HRFAST_CSRC_ON_CPU=1): the CUDA kernels' and launchers'
own code on CPU tensors, through an emulation of the grid (csrc/fuse_cpu.cpp: block by block, each phase of
a block for all its 32 x 8 threads before the next, an array standing in for shared memory). With a GPU it
runs the CUDA kernels.
"""
from __future__ import annotations

import pytest
import torch

import test_fuse_op as base
from conftest import HAS_CUDA, TRITON_DEVICE
from hrfast.ops import fuse, fuse_ref
from hrfast.plan import BILINEAR, NEAREST, SAME, TermPlan
from hrfast.testing import FP32_RTOL, FP64_RTOL, assert_low_precision_close, assert_rel_close
from test_fuse_op import BF16, F16, F32, F64, Case, bil, near

DEVICE = TRITON_DEVICE  # "cuda" with a GPU, else CPU tensors through the host build


@pytest.fixture(autouse=True)
def csrc_on_cpu(monkeypatch):
    """The host path for CPU tensors, and launch buffers that start as NaN (an unwritten element fails)."""
    from hrfast._cuda import fuse as csrc_fuse

    monkeypatch.setenv("HRFAST_CSRC_ON_CPU", "1")
    monkeypatch.setattr(csrc_fuse, "POISON_OUTPUTS", True)


def _ext():
    from hrfast._cuda.build import load

    return load(with_cuda=DEVICE == "cuda")


# ------------------------------------------------------------------------------------ more shapes and ratios

TERMS_5_TO_13 = [((13, 13), None), ((5, 5), bil()), ((5, 5), near()), ((5, 5), bil(align_corners=True))]
TERMS_PRIME = [((11, 17), None), ((6, 9), bil()), ((3, 5), near()), ((4, 7), bil(align_corners=True))]
EXTRA_CASES = [
    pytest.param(Case((13, 13), TERMS_5_TO_13, N=2, C=3), F64, "nchw", None, id="5_to_13_fp64"),
    pytest.param(Case((13, 13), TERMS_5_TO_13, N=1, C=4, affine="mixed"), F32, "channels_last", None,
                 id="5_to_13_fp32_cl"),
    pytest.param(Case((16, 32), [((16, 32), None), ((1, 2), near(16)), ((1, 2), bil(16)), ((2, 4), bil(8)),
                                 ((4, 8), near(4))], N=1, C=2), F64, "channels_last", None, id="pow2_up_to_16x_fp64"),
    pytest.param(Case((9, 12), [((9, 12), None), ((3, 4), near(3)), ((3, 4), bil(3)), ((6, 8), bil(1.5))], N=2, C=2),
                 F64, "nchw", None, id="sf_3_and_1.5_fp64"),
    pytest.param(Case((11, 17), TERMS_PRIME, N=2, C=5, affine="mixed"), F32, "nchw", None, id="prime_sizes_fp32"),
    pytest.param(Case((11, 17), TERMS_PRIME, N=2, C=5), BF16, "channels_last", F32, id="prime_sizes_bf16_cl"),
    pytest.param(Case((7, 9), [((7, 9), None), ((4, 5), bil()), ((2, 3), near()), ((3, 3), bil(align_corners=True))],
                      N=1, C=3), F16, "nchw", F32, id="odd_fp16"),
    # more than one CUDA launch (8 terms each): chained forward, chunked same-size backward
    pytest.param(Case((5, 4), [((5, 4), None)] * 9 + [((3, 2), bil()), ((2, 2), near()), ((1, 1), bil())], N=1,
                      C=2, affine="mixed"), F64, "nchw", None, id="12_terms_9_same_fp64"),
    pytest.param(Case((5, 4), [((5, 4), None), ((3, 2), bil())] * 5, N=2, C=3), F32, "channels_last", None,
                 id="10_terms_fp32_cl"),
    # several CUDA blocks along channels (32 per block in channels_last, 8 in NCHW) and pixels
    pytest.param(Case((9, 40), [((9, 40), None), ((5, 20), bil()), ((3, 10), near())], N=2, C=37), F32,
                 "channels_last", None, id="blocks_c37_cl"),
    pytest.param(Case((9, 40), [((9, 40), None), ((5, 20), bil()), ((3, 10), near())], N=2, C=11), F32, "nchw",
                 None, id="blocks_c11_nchw"),
    pytest.param(Case((6, 10), [((6, 10), None), ((3, 5), bil()), ((6, 10), None), ((2, 4), near())], N=2, C=3,
                      affine="mixed"), F64, "strided", None, id="strided_fp64"),
]


@pytest.mark.parametrize("case, dtype, layout, param_dtype", EXTRA_CASES)
def test_extra_shapes(case, dtype, layout, param_dtype):
    base.check_fuse(case, dtype, layout, param_dtype, backend="cuda")


# The compiled fast paths (csrc/README.md): a forward mode pack of kForwardPacks runs ForwardTileKernel (2 rows x
# 8 pixels per thread; heights 8 and 6 fill the row pairs, 13 = 6 pairs + 1 row and widths 20 and 13 end inside a
# segment), exact 1/2^k windows the register AdjointKernel (bilinear 2x and 4x, nearest 2x and 4x; the 1x3 ->
# 8x20 term is exact along h only: the generic gather), without the ReLU through the stand-in mask, 32 / KMAX
# source pixels per thread (widths 10, 5, 7 and 4 end inside a segment or fill one); BackwardSameKernel's
# kPB = 16 pixel segments run across rows (13 and 20 are not multiples of 16).
PACK_SBBB = [((8, 20), None), ((4, 10), bil()), ((2, 5), bil()), ((1, 3), bil())]
FAST_PATH_CASES = [
    pytest.param(Case((8, 20), PACK_SBBB, N=2, C=37, affine="mixed"), F64, "channels_last", None, id="sbbb_cl_fp64"),
    pytest.param(Case((8, 20), PACK_SBBB, N=1, C=3, relu=False), F64, "nchw", None, id="sbbb_no_relu_fp64"),
    # every bilinear register window: 2x, 4x and 8x on both axes (KMAX 4, 8, 16)
    pytest.param(Case((8, 24), [((8, 24), None), ((4, 12), bil()), ((2, 6), bil()), ((1, 3), bil())], N=2, C=3,
                      affine="mixed"), F64, "nchw", None, id="sbbb_2x_4x_8x_fp64"),
    pytest.param(Case((13, 13), [((13, 13), None), ((13, 13), None), ((7, 7), bil())], N=2, C=5, affine="mixed"), F32,
                 "nchw", None, id="ssb_odd_fp32"),
    pytest.param(Case((8, 8), [((8, 8), None), ((4, 4), near()), ((2, 2), near())], N=1, C=3, relu=False), F64,
                 "channels_last", None, id="nearest_pow2_no_relu_fp64"),
    pytest.param(Case((8, 20), PACK_SBBB[:3], N=2, C=33, affine="mixed"), BF16, "channels_last", F32,
                 id="sbb_bf16_cl"),
    # channels_last with C a multiple of 16 bytes' worth: ForwardVecKernel (kVec = 8 bf16 / 4 float / 2 double
    # channels x kVPX = 4 pixels per thread; widths 13 and 7 end inside a segment)
    pytest.param(Case((7, 13), [((7, 13), None), ((4, 7), bil()), ((2, 4), bil(align_corners=True)), ((1, 2), bil())],
                      N=2, C=6, affine="mixed"), F64, "channels_last", None, id="sbbb_vec_fp64"),
    pytest.param(Case((5, 7), [((5, 7), None), ((5, 7), None), ((3, 4), bil())], N=1, C=12, relu=False), F32,
                 "channels_last", None, id="ssb_vec_no_relu_fp32"),
    pytest.param(Case((8, 13), [((8, 13), None), ((4, 7), bil()), ((2, 4), bil())], N=2, C=16, affine="mixed"), BF16,
                 "channels_last", F32, id="sbb_vec_bf16"),
]


@pytest.mark.parametrize("case, dtype, layout, param_dtype", FAST_PATH_CASES)
def test_fast_paths(case, dtype, layout, param_dtype):
    base.check_fuse(case, dtype, layout, param_dtype, backend="cuda")


# PhaseKernel (NCHW; every term output-size or nearest / bilinear by 2, 4 or 8 from a source of exactly the output
# size over the factor, some term by 4 or more; kPhasePacks): a G x G output block of one channel per thread,
# G the largest factor. Odd numbers of block rows and columns (16 x 40 at G = 8: 2 x 5 blocks; 12 x 20 at
# G = 4: 3 x 5), a last grid block that is partly past the threads (C = 37: 370 threads, two blocks of 256;
# C = 5: 75), sources of one pixel (every tap clamped at both ends) and of 3 or 5 (odd), the image's first and
# last groups of rows and columns, bilinear and nearest packs of every G, without the ReLU, scales and shifts
# mixed (some terms with neither).
PHASE_SBBB = [((16, 40), None), ((8, 20), bil()), ((4, 10), bil()), ((2, 5), bil())]
PHASE_CASES = [
    pytest.param(Case((16, 40), PHASE_SBBB, N=2, C=37, affine="mixed"), F64, None, id="sbbb_1248_fp64"),
    pytest.param(Case((16, 40), PHASE_SBBB, N=1, C=5, affine="mixed"), F32, None, id="sbbb_1248_fp32"),
    pytest.param(Case((16, 40), PHASE_SBBB, N=2, C=6, affine="mixed"), BF16, F32, id="sbbb_1248_bf16"),
    pytest.param(Case((8, 8), [((8, 8), None), ((4, 4), bil()), ((2, 2), bil()), ((1, 1), bil())], N=2, C=3,
                      relu=False), F64, None, id="sbbb_1x1_source_no_relu_fp64"),
    pytest.param(Case((12, 20), [((12, 20), None), ((12, 20), None), ((6, 10), bil()), ((3, 5), bil())], N=2, C=5,
                      affine="mixed"), F32, None, id="ssbb_1124_fp32"),
    pytest.param(Case((12, 20), [((12, 20), None), ((12, 20), None), ((6, 10), bil()), ((3, 5), bil())], N=1, C=4),
                 BF16, F32, id="ssbb_1124_bf16"),
    pytest.param(Case((8, 12), [((8, 12), None), ((4, 6), bil()), ((2, 3), bil())], N=2, C=3, affine="mixed"), F64,
                 None, id="sbb_124_fp64"),
    pytest.param(Case((16, 24), [((16, 24), None), ((8, 12), near()), ((4, 6), near()), ((2, 3), near())], N=2, C=5,
                      affine="mixed"), F64, None, id="snnn_1248_fp64"),
    pytest.param(Case((16, 24), [((16, 24), None), ((8, 12), near()), ((4, 6), near()), ((2, 3), near())], N=1, C=3),
                 BF16, F32, id="snnn_1248_bf16"),
    pytest.param(Case((12, 8), [((12, 8), None), ((12, 8), None), ((6, 4), near()), ((3, 2), near())], N=2, C=3,
                      affine="mixed", relu=False), F32, None, id="ssnn_1124_fp32"),
    pytest.param(Case((4, 12), [((4, 12), None), ((2, 6), near()), ((1, 3), near())], N=2, C=3, affine="mixed"), F64,
                 None, id="snn_124_fp64"),
]


def _forward_kernel(xs, scales, shifts, resamples, size, relu, channels_last):
    """The forward kernel the C++ launcher runs for these arguments (fuse_launchers.h forward_kernel_name)."""
    plan, kxs, kscales, kshifts = base._kernel_args(xs, scales, shifts, resamples, size, relu, channels_last)
    return _ext().forward_kernel(plan.terms, kxs, kscales, kshifts, plan.size, plan.channels_last)


@pytest.mark.parametrize("case, dtype, param_dtype", PHASE_CASES)
def test_phase_kernel(case, dtype, param_dtype):
    xs, scales, shifts, resamples, _ = base._build(case, dtype, "nchw", param_dtype)
    assert _forward_kernel(xs, scales, shifts, resamples, case.size, case.relu, False) == "PhaseKernel"
    base.check_fuse(case, dtype, "nchw", param_dtype, backend="cuda")


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
@pytest.mark.parametrize("terms", ["sbbb", "snnn"])
def test_phase_kernel_matches_the_other_kernels_bitwise(terms, dtype):
    """PhaseKernel computes ForwardTileKernel's (and the generic kernel's) arithmetic in its order: the same
    bits, NaN and inf included, with non-finite values in the image's first and last rows and columns (read at
    weight 0 by the outputs where ATen's source index clamps). The other kernel runs the same values when the
    output-size term is a view whose rows are not whole G-element runs (stride W + 1): ForwardTileKernel for
    the bilinear pack, the generic ForwardKernel for the nearest one (no tile pack)."""
    mode = bil() if terms == "sbbb" else near()
    case = Case((16, 24), [((16, 24), None), ((8, 12), mode), ((4, 6), mode), ((2, 3), mode)], N=2, C=3,
                affine="mixed")
    xs, scales, shifts, resamples, _ = base._build(case, dtype, "nchw")
    xs = [x.detach() for x in xs]
    xs[1][0, 1, 0, 1] = float("inf")  # row 0, column 1: read at weight 0 by output (0, 0)
    xs[1][1, 2, 7, 11] = float("nan")  # last row and column
    xs[2][0, 0, 0, 0] = float("-inf")
    xs[2][1, 1, 3, 0] = float("nan")
    xs[3][0, 2, 1, 2] = float("inf")
    xs[0][1, 0, 15, 23] = float("nan")
    padded = torch.zeros(2, 3, 16, 25, dtype=dtype, device=DEVICE)[..., :24]
    padded.copy_(xs[0])
    args = (scales, shifts, resamples, case.size, case.relu, False)
    assert _forward_kernel(xs, *args) == "PhaseKernel"
    other = "ForwardTileKernel" if terms == "sbbb" else "ForwardKernel"
    assert _forward_kernel([padded] + xs[1:], *args) == other
    with torch.no_grad():
        phased = fuse(xs, scales=scales, shifts=shifts, resample=resamples, relu=case.relu, backend="cuda")
        tiled = fuse([padded] + xs[1:], scales=scales, shifts=shifts, resample=resamples, relu=case.relu,
                     backend="cuda")
    bits = {F64: torch.int64, F32: torch.int32, BF16: torch.int16}[dtype]
    assert torch.equal(phased.view(bits), tiled.view(bits))
    assert torch.isnan(tiled).any() and torch.isinf(tiled).any()
    assert torch.isfinite(tiled).float().mean() > 0.5


@pytest.mark.parametrize("name, case, layout, dtype, kernel", [
    ("phase", Case((16, 40), PHASE_SBBB, N=1, C=8), "nchw", BF16, "PhaseKernel"),
    ("phase_fp32", Case((16, 40), PHASE_SBBB, N=1, C=8), "nchw", F32, "PhaseKernel"),
    # channels_last, ragged sizes, align_corners, an x2-only pack, a strided output-size term: the other kernels
    ("vec_cl", Case((16, 40), PHASE_SBBB, N=1, C=8), "channels_last", BF16, "ForwardVecKernel"),
    ("tile_cl_c3", Case((16, 40), PHASE_SBBB, N=1, C=3), "channels_last", BF16, "ForwardTileKernel"),
    ("tile_ragged", Case((8, 20), PACK_SBBB, N=1, C=8), "nchw", BF16, "ForwardTileKernel"),
    ("tile_corners", Case((16, 40), PHASE_SBBB[:3] + [((2, 5), bil(align_corners=True))], N=1, C=8), "nchw", BF16,
     "ForwardTileKernel"),
    ("tile_x2", Case((16, 40), PHASE_SBBB[:2], N=1, C=8), "nchw", F32, "ForwardTileKernel"),
    ("generic", Case((16, 40), [((16, 40), None), ((8, 20), near()), ((4, 10), bil())], N=1, C=8), "nchw", F32,
     "ForwardKernel"),
])
def test_forward_kernel_choice_matches_the_model(name, case, layout, dtype, kernel):
    """The launcher's choice of forward kernel, and hrfast/perf/cuda_cpp.py's model of it (the instrument
    prices that kernel), for dense tensors from torch's allocator."""
    from hrfast.perf import cuda_cpp
    from hrfast.perf.opcalls import OpCall

    xs, scales, shifts, resamples, _ = base._build(case, dtype, layout)
    cl = layout == "channels_last"
    assert _forward_kernel(xs, scales, shifts, resamples, case.size, case.relu, cl) == kernel
    plan, *_ = base._kernel_args(xs, scales, shifts, resamples, case.size, case.relu, cl)
    call = OpCall(kind="fuse", inputs=[tuple(x.shape) for x in xs], dtype=dtype, plan=plan)
    assert [str(launch.kernel) for launch in cuda_cpp.launches(call, False)] == [kernel]


# The adjoint's phase form (AdjointKernel<KMAX, 3>, fuse_kernels.h adjoint_row_tent): bilinear without
# align_corners by f in 2, 4, 8 on both axes, g exactly f times the source, whole rows of adjoint_ps(KMAX) =
# 8 / 4 / 2 pixels. Several segments per row (the first, middle and last columns), 1-pixel-high sources (the
# first row is the last), sources exactly one segment wide (pixel 0 the first column, pixel PS - 1 the last),
# both layouts, with and without the ReLU, scales and shifts mixed.
ADJ_PHASE_124 = [((16, 32), None), ((8, 16), bil()), ((4, 8), bil()), ((2, 4), bil())]
ADJ_PHASE_CASES = [
    pytest.param(Case((16, 32), ADJ_PHASE_124, N=2, C=5, affine="mixed"), F64, "nchw", None, id="248_fp64"),
    pytest.param(Case((16, 32), ADJ_PHASE_124, N=1, C=37, affine="mixed"), F32, "channels_last", None,
                 id="248_fp32_cl_c37"),
    pytest.param(Case((16, 32), ADJ_PHASE_124, N=2, C=4), BF16, "nchw", F32, id="248_bf16"),
    pytest.param(Case((16, 32), ADJ_PHASE_124, N=1, C=6, relu=False), BF16, "channels_last", F32,
                 id="248_bf16_cl_no_relu"),
    pytest.param(Case((8, 16), [((8, 16), None), ((4, 8), bil()), ((2, 4), bil()), ((1, 2), bil())], N=2, C=3,
                      affine="mixed"), F64, "nchw", None, id="one_segment_rows_h1_fp64"),
    pytest.param(Case((8, 32), [((8, 32), None), ((1, 4), bil()), ((4, 16), bil())], N=2, C=3, relu=False), F32,
                 "nchw", None, id="h1_x8_fp32_no_relu"),
]


def _adjoint_kernels(xs, scales, shifts, resamples, size, relu, channels_last, phase=True, row=True):
    """Per term, the adjoint kernel the C++ backward runs for it (fuse_launchers.h adjoint_kernel_name, or
    adjoint_row_name for the terms of one RowAdjointKernel launch)."""
    plan, kxs, kscales, kshifts = base._kernel_args(xs, scales, shifts, resamples, size, relu, channels_last)
    N, C = kxs[0].shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_y = torch.empty(N, C, *plan.size, dtype=kxs[0].dtype, device=DEVICE).contiguous(memory_format=fmt)
    return _ext().adjoint_kernels(plan.terms, grad_y, grad_y if relu else None, kxs, kscales, kshifts, relu, phase,
                                  row)


@pytest.mark.parametrize("case, dtype, layout, param_dtype", ADJ_PHASE_CASES)
def test_adjoint_phase_kernel(case, dtype, layout, param_dtype):
    xs, scales, shifts, resamples, _ = base._build(case, dtype, layout, param_dtype)
    cl = layout == "channels_last"
    factors = [case.size[0] // hw[0] for hw, _ in case.terms[1:]]
    per_term = [""] + [f"AdjointKernel<{2 * f},3>" for f in factors]
    assert _adjoint_kernels(xs, scales, shifts, resamples, case.size, case.relu, cl, row=False) == per_term
    # factors 2, 4, 8 in term order: one RowAdjointKernel launch for them all (8, 2: one launch each)
    row = factors == [2, 4, 8]
    assert _adjoint_kernels(xs, scales, shifts, resamples, case.size, case.relu, cl) == (
        [""] + ["RowAdjointKernel<2,4,8>"] * 3 if row else per_term)
    base.check_fuse(case, dtype, layout, param_dtype, backend="cuda")


# RowAdjointKernel's shapes (factors in term order; each term's blocks of segments inside the row kernel's: a
# row of W / 16 segments, blocks of 32 in NCHW and 8 in channels_last): 16 x 32 (2 segments per row, blocks of
# whole rows; the last block of every term partly past the rows: 2 coarse rows of 2 segments), 8 x 16 (one
# segment: the thread's columns are the image's first and last), 8 x 512 / 8 x 256 (a term block is part of one
# source row: 32 / 16 segments), and x2 x4 alone.
ROW_SHAPES = {"248_16x32": ((16, 32), 3), "248_8x16": ((8, 16), 3), "248_wide": (None, 3), "24_16x32": ((16, 32), 2)}


ROW_BITWISE = [pytest.param(shape, layout, dtype, id=f"{shape}-{layout}-{dtype}".replace("torch.", ""))
               for shape in ROW_SHAPES for layout in ("nchw", "channels_last")
               for dtype in ([F64, F32, BF16] if shape == "248_16x32" else [F32])]  # the others in float32 only


@pytest.mark.parametrize("shape, layout, dtype", ROW_BITWISE)
def test_adjoint_phase_matches_the_register_kernel_bitwise(shape, layout, dtype):
    """The phase form computes the register AdjointKernel<KMAX, BILINEAR>'s arithmetic in its order (its terms
    of weight 0 add +0), and RowAdjointKernel the phase form's per term and source row (its partial sums in
    the rows and the order of the per-term launches): the same bits for dz, dscale and dshift from all three,
    NaN and inf included, with non-finite gradients in the image's first and last rows and columns (outside
    every source's window but the edge ones' where ATen clamps: weight 1) and one NaN y (the mask passes it).
    C = 3 and 2 images: blocks partly past the channels, partial rows of several images."""
    cl = layout == "channels_last"
    (H, W), n_up = ROW_SHAPES[shape][0] or ((8, 256) if cl else (8, 512)), ROW_SHAPES[shape][1]
    terms = [((H, W), None)] + [((H // f, W // f), bil()) for f in (2, 4, 8)[:n_up]]
    N, C = 2, 3
    case = Case((H, W), terms, N=N, C=C, affine="mixed")
    xs, scales, shifts, resamples, _ = base._build(case, dtype, layout)
    plan, kxs, kscales, kshifts = base._kernel_args(xs, scales, shifts, resamples, case.size, True, cl)
    fmt = torch.channels_last if cl else torch.contiguous_format
    gen = torch.Generator().manual_seed(5)
    # a finite gradient (with a non-zero mean: the partial sums do not cancel), and one with non-finite values
    finite = (torch.randn(N, C, H, W, generator=gen, dtype=F64) + 0.5).to(dtype).to(DEVICE)
    finite = finite.contiguous(memory_format=fmt)
    grad_y = torch.randn(N, C, H, W, generator=gen, dtype=F64).to(dtype).to(DEVICE).contiguous(memory_format=fmt)
    y = torch.randn(N, C, H, W, generator=gen, dtype=F64).to(dtype).to(DEVICE).contiguous(memory_format=fmt)
    for n, c, r, col, v in [(0, 0, 0, 0, "inf"), (0, 1, 0, W - 1, "nan"), (1, 2, H - 1, 0, "-inf"),
                            (1, 0, H - 1, W - 1, "nan"), (0, 2, H // 2 - 1, 0, "inf"), (1, 1, 0, W // 2 + 1, "nan"),
                            (0, 0, H // 2 + 1, W - 1, "-inf")]:
        grad_y[n, c, r, col] = float(v)
        y[n, c, r, col] = 1.0
    y_finite = y.clone()
    y[1, 1, H // 2 + 1, 5] = float("nan")
    kmax = [4, 8, 16][:n_up]
    forms = {"row": dict(phase=True, row=True), "tent": dict(phase=True, row=False),
             "register": dict(phase=False, row=False)}
    expected = {"row": [f"RowAdjointKernel<{','.join('248'[:n_up])}>"] * n_up,
                "tent": [f"AdjointKernel<{k},3>" for k in kmax], "register": [f"AdjointKernel<{k},2>" for k in kmax]}
    for form, kw in forms.items():
        assert _adjoint_kernels(xs, scales, shifts, resamples, case.size, True, cl, **kw) == [""] + expected[form]
    every = [(True, True, True)] * (n_up + 1)
    # and some gradients only: a term without dz (its sums only), one with dz only, one with d(shift) only
    some = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)][:n_up + 1]
    bits = {F64: torch.int64, F32: torch.int32, BF16: torch.int16}
    for g, mask, needs in ((finite, y_finite, every), (grad_y, y, every), (finite, y_finite, some)):
        grads = {form: _ext().fuse_backward(plan.terms, g, mask, kxs, kscales, kshifts, needs, True, True, **kw)
                 for form, kw in forms.items()}
        seen = 0
        for other in ("tent", "register"):
            for row_grads, other_grads in zip(grads["row"][1:], grads[other][1:]):
                for a, b in zip(row_grads, other_grads):
                    if a is None:
                        assert b is None
                        continue
                    seen += 1
                    assert a.stride() == b.stride()
                    assert torch.equal(a.view(bits[a.dtype]), b.view(bits[b.dtype]))
        # dz every term; dscale and dshift where the term has them ("mixed": k % 3 == 1 no scale, 2 no shift)
        ks = range(1, n_up + 1)
        assert seen == 2 * sum(need[0] + (need[1] and k % 3 != 1) + (need[2] and k % 3 != 2)
                               for k, need in zip(ks, needs[1:]))
        params = [t for gr in grads["row"][1:] for t in gr[1:] if t is not None]
        if g is finite:
            assert all(torch.isfinite(t).all() for t in params)
        else:
            dz = torch.cat([gr[0].flatten() for gr in grads["row"][1:]])
            assert torch.isnan(dz).any() and torch.isinf(dz).any() and torch.isfinite(dz).float().mean() > 0.5


@pytest.mark.parametrize("name, case, layout, dtype, kernels", [
    ("row", Case((16, 32), ADJ_PHASE_124, N=1, C=8), "nchw", BF16, ["row 2,4,8"] * 3),
    ("row_cl_fp32", Case((16, 32), ADJ_PHASE_124, N=1, C=8), "channels_last", F32, ["row 2,4,8"] * 3),
    ("row_24", Case((16, 32), ADJ_PHASE_124[:3], N=1, C=8), "nchw", F32, ["row 2,4"] * 2),
    # x8 before x2: no compiled pack, the phase form per term; 48 columns: 3 segments per row, not a divisor
    # of the block's 32 (or 8): the same
    ("phase_84", Case((16, 32), [ADJ_PHASE_124[0], ADJ_PHASE_124[3], ADJ_PHASE_124[1]], N=1, C=8), "nchw", BF16,
     ["16,3", "4,3"]),
    ("phase_48_columns", Case((16, 48), [((16, 48), None), ((8, 24), bil()), ((4, 12), bil()), ((2, 6), bil())],
                              N=1, C=8), "channels_last", F32, ["4,3", "8,3", "16,3"]),
    # rows of a ragged number of segments, g not f times the source, align_corners, nearest, 3x: the others
    ("ragged_rows", Case((8, 20), [((8, 20), None), ((4, 10), bil()), ((2, 5), bil())], N=1, C=8), "nchw", BF16,
     ["4,2", "8,2"]),
    ("anisotropic", Case((16, 32), [((16, 32), None), ((8, 8), bil()), ((4, 8), bil())], N=1, C=8), "nchw", F32,
     ["8,2", "8,3"]),
    ("corners_nearest_3x", Case((12, 24), [((12, 24), None), ((6, 12), bil(align_corners=True)),
                                           ((3, 6), near()), ((4, 8), bil())], N=1, C=8), "nchw", F32,
     ["0,0", "4,1", "0,0"]),
])
def test_adjoint_kernel_choice_matches_the_model(name, case, layout, dtype, kernels):
    """The launcher's choice of adjoint kernel per upsampled term, and hrfast/perf/cuda_cpp.py's model of it."""
    from hrfast.perf import cuda_cpp
    from hrfast.perf.opcalls import OpCall

    xs, scales, shifts, resamples, size_arg = base._build(case, dtype, layout)
    cl = layout == "channels_last"
    names = _adjoint_kernels(xs, scales, shifts, resamples, size_arg or case.size, case.relu, cl)
    assert names == [""] + [f"RowAdjointKernel<{k[4:]}>" if k.startswith("row") else f"AdjointKernel<{k}>"
                            for k in kernels]
    plan, *_ = base._kernel_args(xs, scales, shifts, resamples, size_arg or case.size, case.relu, cl)
    call = OpCall(kind="fuse", inputs=[tuple(x.shape) for x in xs], dtype=dtype, plan=plan)
    modelled = {}  # the model's launches by term
    for launch in cuda_cpp.launches(call, True):
        if launch.kernel == "AdjointKernel":
            modelled[launch.params["term"]] = f"{launch.params['kmax']},{launch.params['mode']}"
        elif launch.kernel == "RowAdjointKernel":
            terms = [k for k in range(len(xs)) if launch.params["terms"] >> k & 1]
            for k in terms:
                modelled[k] = "row " + ",".join(str(case.size[1] // xs[j].shape[3]) for j in terms)
    assert [modelled[k] for k in sorted(modelled)] == kernels


# ------------------------------------------------------------------------------------- the launch structure

# More terms than one launch takes (kMaxTerms = 8). 11 terms, 5 of output size: a forward chain of 2 launches
# (8 + 3) through the accumulation-type partial, one same-size backward launch. 17 terms, 10 of output size:
# a forward chain of 3 (8 + 8 + 1; the middle one reads and rewrites the partial), two same-size backward
# launches (8 + 2; the second writes the dscale slots 8 and 9, the first also sum(g)). affine="mixed": terms
# k % 3 == 1 have no scale, k % 3 == 2 no shift.
TERMS_11 = [((6, 7), None), ((3, 4), bil()), ((2, 2), near()), ((6, 7), None), ((3, 3), bil(align_corners=True)),
            ((6, 7), None), ((1, 1), bil()), ((4, 5), near()), ((6, 7), None), ((2, 3), bil()), ((6, 7), None)]
TERMS_17 = [((5, 9), None), ((3, 5), bil()), ((5, 9), None), ((2, 3), near()), ((5, 9), None),
            ((4, 4), bil(align_corners=True)), ((5, 9), None), ((5, 9), None), ((1, 2), bil()), ((5, 9), None),
            ((3, 6), near()), ((5, 9), None), ((5, 9), None), ((2, 7), bil()), ((5, 9), None), ((5, 9), None),
            ((1, 1), near())]
MANY_TERM_CASES = [
    pytest.param(Case((6, 7), TERMS_11, N=3, C=5, affine="mixed"), "nchw", id="11_terms_nchw"),
    pytest.param(Case((6, 7), TERMS_11, N=1, C=9, affine="mixed", relu=False), "channels_last",
                 id="11_terms_cl_no_relu"),
    pytest.param(Case((5, 9), TERMS_17, N=2, C=3, affine="mixed"), "channels_last", id="17_terms_cl"),
    pytest.param(Case((5, 9), TERMS_17, N=1, C=10, affine="mixed"), "nchw", id="17_terms_nchw"),
]


@pytest.mark.parametrize("case, layout", MANY_TERM_CASES)
def test_more_terms_than_one_launch(case, layout):
    """float64, forward and every gradient (each input, scale and shift) against fuse_ref at FP64_RTOL."""
    assert len(case.terms) > 8
    base.check_fuse(case, F64, layout, backend="cuda")


# Channel and pixel counts that end inside a tile, in both layouts. NCHW tiles are 32 pixels x 8 channels,
# channels_last ones 32 channels x 8 pixels: 65 output pixels (5 x 13) are 2 tiles + 1 pixel, 21 and 10
# source pixels (3 x 7, 2 x 5) and 36 (4 x 9) are not multiples of 8 or 32 either. C = 1 is never laid out
# as channels_last (stride 1 of a single channel), so it runs the NCHW mapping in both.
TILE_EDGE_TERMS = [((5, 13), None), ((3, 7), bil()), ((2, 5), near()), ((4, 9), bil(align_corners=True)),
                   ((5, 13), None)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("C, N", [(1, 3), (7, 1), (9, 3), (33, 1), (40, 3)])
def test_tile_edges(C, N, layout):
    case = Case((5, 13), TILE_EDGE_TERMS, N=N, C=C, affine="mixed")
    base.check_fuse(case, F64, layout, backend="cuda")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_tile_edges_low_precision(dtype):
    """The accumulation type's partials and the dtype conversions of dx/dz across tile edges."""
    case = Case((5, 13), TILE_EDGE_TERMS, N=3, C=33, affine="mixed")
    base.check_fuse(case, dtype, "channels_last", F32, backend="cuda")


def _grid_limit_forward(C, N, channels_last):
    # 1 x 2 pixels: a [N, C, 1, 1] tensor has channel stride 1 in either memory format (the kernels take it
    # as channels_last), 1 x 2 tells the two apart
    x = torch.randn(N, C, 1, 2, device=DEVICE)
    return dict(terms=[TermPlan()], xs=[x], scales=[None], shifts=[None], size=[1, 2], relu=False,
                channels_last=channels_last, poison=True)


def test_grid_limits():
    """The launchers' grid has at most 65535 blocks along y (channels: 8 per block in NCHW, 32 in
    channels_last) and z (images): one more raises their error, on CPU tensors too (the host build runs the
    same launchers). The largest valid sizes run."""
    ext = _ext()
    for C, cl, layout in [(65535 * 8, False, "NCHW"), (65535 * 32, True, "channels_last")]:
        y = ext.fuse_forward(**_grid_limit_forward(C, 1, cl))
        assert y.shape == (1, C, 1, 2) and not torch.isnan(y).any()
        with pytest.raises(RuntimeError, match=rf"{C + 1} channels exceed the CUDA kernels' grid \(at most {C} in "
                                               rf"the {layout} layout\)"):
            ext.fuse_forward(**_grid_limit_forward(C + 1, 1, cl))
    with pytest.raises(RuntimeError, match=r"batch 65536 exceeds 65535 images per call"):
        ext.fuse_forward(**_grid_limit_forward(1, 65536, False))


@pytest.mark.parametrize("mode", [SAME, BILINEAR], ids=["same", "adjoint"])
def test_grid_limits_backward(mode):
    """The backward launchers (same-size terms; an upsampled term's adjoint) check the grid as well."""
    C = 65535 * 8 + 1  # NCHW: 1 x 2 source and output pixels (see _grid_limit_forward)
    x = torch.randn(1, C, 1, 2, device=DEVICE)
    grad_y = torch.randn(1, C, 1 if mode == SAME else 2, 2, device=DEVICE)
    term = TermPlan() if mode == SAME else TermPlan(mode, False, (1, 2), (1, 1))
    with pytest.raises(RuntimeError, match=rf"{C} channels exceed the CUDA kernels' grid"):
        _ext().fuse_backward(terms=[term], grad_y=grad_y, y=None, xs=[x], scales=[None], shifts=[None],
                             needs=[(True, False, False)], relu=False, poison=True)


# --------------------------------------------------------------------------------- index and window scans

SCAN_PAIRS = [(n_in, n_out) for n_in in range(1, 7) for n_out in range(n_in, 3 * n_in + 3)]
SCAN_PAIRS += [(n_in, m * n_in) for n_in in (1, 3, 5) for m in (4, 8, 16)]


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bilinear_corners"])
def test_size_pair_scan_forward_backward(mode):
    """Many (in, out) size pairs on both axes at once (H: in -> out, W: out-1 or so), float64, no ReLU (a
    pure adjoint): y and dx at FP64_RTOL. A wrong tap, weight or adjoint window is an O(1) error."""
    r = near() if mode == "nearest" else bil(align_corners=mode == "bilinear_corners")
    for n_in, n_out in SCAN_PAIRS:
        w_in, w_out = max(1, n_in - 1 + n_out % 2), n_out + 1
        x = torch.randn(1, 2, n_in, w_in, dtype=F64, device=DEVICE, requires_grad=True)
        scale = base._nonzero_scale(2, F64)
        size = (n_out, w_out)
        y = fuse([x], scales=[scale], resample=[r], size=size, relu=False, backend="cuda")
        grad_y = torch.randn_like(y)
        dx, ds = torch.autograd.grad(y, [x, scale], grad_y)
        x64 = x.detach().clone().requires_grad_()
        s64 = scale.detach().clone().requires_grad_()
        y64 = fuse_ref([x64], [s64], [None], [r], size, relu=False)
        dx64, ds64 = torch.autograd.grad(y64, [x64, s64], grad_y)
        where = f"{mode} {n_in}x{w_in} -> {n_out}x{w_out}"
        assert_rel_close(y, y64, FP64_RTOL, f"y ({where})")
        assert_rel_close(dx, dx64, FP64_RTOL, f"dx ({where})")
        assert_rel_close(ds, ds64, FP64_RTOL, f"dscale ({where})")


def test_nearest_forward_is_a_pure_gather():
    """Nearest in fp32 and bf16 is a copy of source values: bitwise equal to F.interpolate, odd ratios too."""
    for dtype in (F32, BF16):
        for n_in, n_out in SCAN_PAIRS:
            x = torch.randn(2, 3, n_in, n_in + 1, dtype=dtype, device=DEVICE)
            size = (n_out, n_out + 2)
            y = fuse([x], resample=[near()], size=size, relu=False, backend="cuda")
            assert torch.equal(y, fuse_ref([x], [None], [None], [near()], size, relu=False)), (dtype, n_in, n_out)


@pytest.mark.parametrize("name, case", [
    ("mixed_5_to_13_cl", Case((5, 13), [((5, 13), None), ((2, 5), bil()), ((3, 5), near()),
                                        ((2, 5), bil(align_corners=True))], N=1, C=2, affine="mixed")),
    ("pow2_8x", Case((8, 8), [((8, 8), None), ((1, 1), near(8)), ((2, 1), bil((4.0, 8.0)))], N=2, C=1)),
    ("9_terms", Case((3, 2), [((3, 2), None)] * 8 + [((2, 1), bil())], N=1, C=1)),
])
def test_gradcheck_extra(name, case):
    layout = "channels_last" if name.endswith("_cl") else "nchw"
    base._gradcheck(case, layout, seed=1, fast_mode=False, backend="cuda")


# ------------------------------------------------------------------------------------------------ determinism


def _run(case, xs, scales, shifts, resamples, size_arg, grad_y=None):
    leaves = [t for _, t in base._leaves(xs, scales, shifts)]
    y = fuse(xs, scales=scales, shifts=shifts, resample=resamples, size=size_arg, relu=case.relu, backend="cuda")
    grad_y = torch.randn_like(y) if grad_y is None else grad_y
    return y, torch.autograd.grad(y, leaves, grad_y), grad_y


DETERMINISM_CASES = {
    "6_terms": Case((9, 7), [((9, 7), None), ((5, 4), bil()), ((3, 2), near()), ((4, 3), bil(align_corners=True)),
                             ((9, 7), None), ((1, 1), bil())], N=2, C=5, affine="mixed"),
    # many blocks along every grid axis, and chained / several launches
    "11_terms_c40": Case((6, 7), TERMS_11, N=3, C=40, affine="mixed"),
    # the fast paths: ForwardTileKernel, the register AdjointKernel, BackwardSameKernel's segments
    "sbbb": Case((8, 20), PACK_SBBB, N=2, C=9, affine="mixed"),
    # RowAdjointKernel (x2, x4, x8 in one launch)
    "row_248": Case((16, 32), ADJ_PHASE_124, N=2, C=9, affine="mixed"),
}


@pytest.mark.parametrize("dtype, layout, name", [(F32, "nchw", "6_terms"), (F16, "channels_last", "6_terms"),
                                                 (F64, "strided", "6_terms"), (F32, "channels_last", "11_terms_c40"),
                                                 (F32, "nchw", "11_terms_c40"), (F32, "nchw", "sbbb"),
                                                 (BF16, "channels_last", "row_248")])
def test_bitwise_deterministic(dtype, layout, name):
    """Same inputs, same bits: on a GPU over repeated runs, on CPU also with 1 and 2 threads (the host build
    runs the grid's blocks in parallel; each block writes its own outputs and partial rows, and the partials
    are summed over the rows in a fixed order, whatever the split)."""
    case = DETERMINISM_CASES[name]
    xs, scales, shifts, resamples, size_arg = base._build(case, dtype, layout)
    threads = torch.get_num_threads()
    runs = []
    grad_y = None
    try:
        for n_threads in ([1, 2, 1] if DEVICE == "cpu" else [threads] * 3):
            torch.set_num_threads(n_threads)
            y, grads, grad_y = _run(case, xs, scales, shifts, resamples, size_arg, grad_y)
            runs.append((y, grads))
    finally:
        torch.set_num_threads(threads)
    (y0, g0) = runs[0]
    for y, grads in runs[1:]:
        assert torch.equal(y, y0)
        for a, b in zip(grads, g0):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- the binding's checks

def _terms(**second):
    """_args' term descriptors (same size; bilinear 2x with a scale), fields of the second one replaced."""
    return [TermPlan(), TermPlan(BILINEAR, False, (1, 2), (1, 2), has_scale=True)._replace(**second)]


def _args(**over):
    """Valid fuse_forward arguments (two terms: same size and bilinear 2x), with overrides."""
    x0 = torch.randn(2, 3, 4, 4, device=DEVICE)
    x1 = torch.randn(2, 3, 2, 2, device=DEVICE)
    args = dict(terms=_terms(), xs=[x0, x1], scales=[None, torch.ones(3, device=DEVICE)], shifts=[None, None],
                size=[4, 4], relu=True, channels_last=False, poison=True)
    args.update(over)
    return args


def _bwd_args(**over):
    fwd = _args()
    y = _ext().fuse_forward(**fwd)
    args = dict(terms=fwd["terms"], grad_y=torch.randn_like(y), y=y, xs=fwd["xs"], scales=fwd["scales"],
                shifts=fwd["shifts"], needs=[(True, True, True)] * 2, relu=True, poison=True)
    args.update(over)
    return args


def _x(*shape, **kw):
    return torch.randn(*shape, device=DEVICE, **kw)


FORWARD_ERRORS = [
    (lambda: dict(xs=[]), r"at least one tensor"),
    (lambda: dict(scales=[None]), r"scales has 1 entries but there are 2 terms"),
    (lambda: dict(shifts=[None, None, None]), r"shifts has 3 entries"),
    (lambda: dict(terms=[TermPlan()]), r"terms has 1 entries but there are 2 terms"),
    (lambda: dict(size=[4]), r"size must be \[H, W\]"),
    (lambda: dict(size=[0, 4]), r"output size must be positive"),
    (lambda: dict(size=[2**16, 2**15]), r"2\*\*31 or more pixels"),
    (lambda: dict(xs=[_x(2, 3, 4), _x(2, 3, 2, 2)]), r"xs\[0\] must be 4-D"),
    (lambda: dict(xs=[_x(2, 3, 4, 4), torch.ones(2, 3, 2, 2, dtype=torch.int32, device=DEVICE)]),
     r"xs\[1\] has dtype Int"),
    (lambda: dict(xs=[_x(2, 3, 4, 4), _x(2, 3, 2, 2, dtype=F64)]), r"xs\[1\] has dtype Double but xs\[0\] has Float"),
    (lambda: dict(xs=[_x(2, 3, 4, 4), _x(1, 3, 2, 2)]), r"batch and channels must match"),
    (lambda: dict(xs=[_x(2, 3, 4, 4), _x(2, 4, 2, 2)]), r"batch and channels must match"),
    (lambda: dict(terms=_terms(mode=3)), r"terms\[1\] has mode 3"),
    (lambda: dict(terms=_terms(mode=SAME)), r"xs\[1\] has mode 0 \(same size\) but is 2x2"),
    (lambda: dict(xs=[_x(2, 3, 4, 4), _x(2, 3, 5, 2)]), r"at most the output 4x4"),
    (lambda: dict(terms=_terms(ratio_h=(1, 0))), r"ratios of term 1 must be fractions num/den in \[0, 1\]"),
    (lambda: dict(terms=_terms(ratio_h=(3, 2))), r"ratios of term 1 must be fractions num/den in \[0, 1\]"),
    (lambda: dict(terms=_terms(ratio_h=(-1, 2))), r"ratios of term 1 must be non-negative integers"),
    (lambda: dict(terms=_terms(mode=NEAREST, align_corners=True)), r"terms\[1\] sets align_corners for a nearest "
                                                                   r"term"),
    (lambda: dict(scales=[None, None]), r"scales\[1\] is None but terms\[1\]\.has_scale is true"),
    (lambda: dict(shifts=[None, torch.ones(3, device=DEVICE)]), r"shifts\[1\] is a tensor but "
                                                                r"terms\[1\]\.has_shift is false"),
    (lambda: dict(scales=[None, torch.ones(4, device=DEVICE)]), r"scales\[1\] must have shape \[3\]"),
    (lambda: dict(scales=[None, torch.ones(1, 3, device=DEVICE)]), r"scales\[1\] must have shape \[3\]"),
    (lambda: dict(shifts=[torch.ones(3, dtype=torch.int64, device=DEVICE), None]), r"shifts\[0\] has dtype Long"),
    (lambda: dict(shifts=[torch.ones(3, device="meta"), None]), r"shifts\[0\] is on meta"),
    (lambda: dict(xs=[torch.empty(2, 3, 4, 4, device="meta"), torch.empty(2, 3, 2, 2, device="meta")]),
     r"tensors must be on CPU or CUDA"),
]


@pytest.mark.parametrize("over, match", FORWARD_ERRORS, ids=[m[:40] for _, m in FORWARD_ERRORS])
def test_binding_forward_errors(over, match):
    args = _args(**over())  # built here: no tensors at import time
    with pytest.raises(RuntimeError, match=match):
        _ext().fuse_forward(**args)


# Descriptors pybind11 cannot convert (not a TermPlan-shaped tuple), and needs that are not (dx, dscale,
# dshift) triples: rejected before any check runs, as every argument of the wrong type is.
MALFORMED = [
    ("fuse_forward", lambda a: dict(terms=[TermPlan(), (BILINEAR, False, (1, 2), (1, 2), True)])),
    ("fuse_forward", lambda a: dict(terms=[TermPlan(), _terms()[1]._replace(ratio_h=(1, 2, 1))])),
    ("fuse_forward", lambda a: dict(terms=[TermPlan(), _terms()[1]._replace(ratio_w=(0.5, 1))])),
    ("fuse_backward", lambda a: dict(needs=[(True, True, True), (True, True)])),
]


@pytest.mark.parametrize("fn, over", MALFORMED, ids=["short_term", "ratio_of_3", "float_ratio", "short_needs"])
def test_binding_rejects_malformed_arguments(fn, over):
    args = _args() if fn == "fuse_forward" else _bwd_args()
    args.update(over(args))
    with pytest.raises(TypeError, match="incompatible function arguments"):
        getattr(_ext(), fn)(**args)


BACKWARD_ERRORS = [
    (lambda a: dict(needs=[(True, True, True)]), r"needs has 1 entries \(dx, dscale, dshift\) but there are 2 "
                                                 r"terms"),
    (lambda a: dict(y=None), r"y \(the forward output\) is required when relu is true"),
    (lambda a: dict(y=a["y"][:, :, :3]), r"y has shape \[2, 3, 3, 4\] but grad_y has \[2, 3, 4, 4\]"),
    (lambda a: dict(y=a["y"].double()), r"y has dtype Double but grad_y has Float"),
    (lambda a: dict(grad_y=a["grad_y"][0]), r"grad_y must be a 4-D tensor"),
    (lambda a: dict(grad_y=a["grad_y"][:1]), r"grad_y has shape \[1, 3, 4, 4\] but the terms have batch 2"),
    (lambda a: dict(grad_y=a["grad_y"].double()), r"grad_y has dtype Double but xs have Float"),
    (lambda a: dict(grad_y=a["grad_y"][:, :, :3]), r"xs\[0\] has mode 0 \(same size\) but is 4x4, the output is 3x4"),
]


@pytest.mark.parametrize("over, match", BACKWARD_ERRORS, ids=[m[:40] for _, m in BACKWARD_ERRORS])
def test_binding_backward_errors(over, match):
    args = _bwd_args()
    args.update(over(args))
    with pytest.raises(RuntimeError, match=match):
        _ext().fuse_backward(**args)


def test_binding_backward_without_relu_needs_no_y():
    args = _bwd_args(relu=False, y=None, needs=[(True, False, False), (False, True, False)])
    (dx0, ds0, db0), (dx1, ds1, db1) = _ext().fuse_backward(**args)
    assert ds0 is None and db0 is None and dx1 is None and db1 is None  # not asked, or no such parameter
    assert torch.equal(dx0, args["grad_y"])
    assert ds1.shape == (3,) and torch.isfinite(ds1).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="the host build's message; the CUDA build runs CUDA tensors")
def test_host_build_reports_no_cuda():
    assert _ext().with_cuda is False


# --------------------------------------------------------------------------- against the Triton launchers


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bilinear_corners"])
def test_adjoint_window_matches_triton(mode):
    from hrfast.kernels import fuse as triton_fuse

    kmode = triton_fuse.NEAREST if mode == "nearest" else triton_fuse.BILINEAR
    align = mode == "bilinear_corners"
    for num in range(0, 9):
        for den in range(max(num, 1), 20):
            for n_out in (1, 2, 7, 40):
                expected = triton_fuse.window((num, den), kmode, align, n_out)
                assert tuple(_ext().adjoint_window(num, den, kmode, align, n_out)) == expected, (num, den, n_out)


CROSS_CASES = {
    "modes": Case((7, 5), [((7, 5), None), ((4, 3), bil()), ((2, 2), near()), ((3, 2), bil(align_corners=True)),
                           ((7, 5), None), ((1, 1), bil())], N=2, C=3, affine="mixed"),
    "pow2": Case((8, 8), [((8, 8), None), ((4, 4), near(2)), ((2, 2), bil(4)), ((1, 1), near(8))], N=1, C=2),
    "5_to_13": Case((13, 6), [((5, 3), bil()), ((5, 3), near()), ((13, 6), None)], N=1, C=2, relu=False),
}


def cross_check(case: Case, dtype, layout: str, exact: bool) -> None:
    """backend "cuda" vs "triton" on the same random inputs: y and every gradient. `exact`: y and the
    gradients of the output-size terms bit for bit (CPU: the host build and the Triton interpreter do the same
    float operations in the same order; not on a GPU, where either compiler may contract a * b + c into an
    FMA). The upsampled terms' gradients (the adjoint gathers: row-major taps in CUDA C++, column-major over
    separable weights in Triton since issue 18) and the per-channel gradients sum in other orders: those at
    the dtype's tolerance (each backend is held to the float64 reference in test_fuse_op / test_csrc_fuse)."""
    xs, scales, shifts, resamples, size_arg = base._build(case, dtype, layout, F32 if dtype in (F16, BF16) else dtype)
    named = base._leaves(xs, scales, shifts)
    leaves = [t for _, t in named]
    out, grad_y = {}, None
    for backend in ("cuda", "triton"):
        y = fuse(xs, scales=scales, shifts=shifts, resample=resamples, size=size_arg, relu=case.relu,
                 backend=backend)
        grad_y = torch.randn_like(y) if grad_y is None else grad_y
        out[backend] = (y, torch.autograd.grad(y, leaves, grad_y))
    (y_c, g_c), (y_t, g_t) = out["cuda"], out["triton"]
    assert y_c.stride() == y_t.stride()
    if dtype in (F16, BF16):
        y_pt, g_pt = base._reference(xs, scales, shifts, resamples, tuple(case.size), case.relu, grad_y)
        y64, g64 = base._reference(xs, scales, shifts, resamples, tuple(case.size), case.relu, grad_y, F64)

    def close(a, b, name, k=None):
        if dtype in (F16, BF16):  # both within budget of each other's float64 truth: compare each to it
            ref64, pt = (y64, y_pt) if k is None else (g64[k], g_pt[k])
            assert_low_precision_close(a, ref64, pt, f"{name} (cuda)", dtype)
            assert_low_precision_close(b, ref64, pt, f"{name} (triton)", dtype)
        else:
            assert_rel_close(a, b, FP64_RTOL if dtype == F64 else FP32_RTOL, name)

    if exact:
        assert torch.equal(y_c, y_t)
    close(y_c, y_t, "y")
    for k, ((name, t), a, b) in enumerate(zip(named, g_c, g_t)):
        assert a.shape == b.shape == t.shape and a.dtype == b.dtype == t.dtype, name
        if exact and name.startswith("inputs") and case.terms[int(name[7:-1])][1] is None:
            assert torch.equal(a, b), f"d {name}"
        close(a, b, f"d {name}", k)


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", list(CROSS_CASES))
def test_cuda_matches_triton(name, layout, dtype):
    cross_check(CROSS_CASES[name], dtype, layout, exact=not HAS_CUDA and dtype != BF16)
