"""Resampling helpers shared by hrfast's Triton kernels: `F.interpolate`'s index rules, tile offsets, the
gather of one (optionally affine) term on an output tile, and the adjoint's source-to-output windows.

Index math follows ATen's UpSample.h: nearest `min(floorf(dst * scale), in - 1)` in float32; bilinear
`area_pixel_compute_source_index` in the accumulation type (float32, float64 for float64) with the ratio
given as an exact fraction; mode codes SAME (no resampling), NEAREST, BILINEAR (`hrfast.plan`).

A tensor a term reads (its *source*) reaches the kernels as one tuple, built by `source_args`, so a kernel
takes any number of terms as a tuple of sources and one helper unpacks them:

    (x_ptr, h, w, strides, ratio_h, ratio_w)    strides = (s_n, s_c, s_h, s_w),  ratio = (float32 value, num, den)
"""
import functools
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hrfast.plan import BILINEAR, NEAREST, SAME, TermPlan

_CL = torch.channels_last

__all__ = ["SAME", "NEAREST", "BILINEAR", "source_args", "tile_offsets", "load_term", "upsampled_tile",
           "grid_offsets", "term_grid", "channel_block",
           "bilinear_ratio", "first_reader", "adjoint_weight", "cdiv", "next_power_of_2", "needs_int64", "launch_grid"]

INT32_LIMIT = 2**31 - 1
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's most blocks along a grid's x, y and z


# Host helpers of the launchers, in plain Python: triton.cdiv / next_power_of_2 are constexpr functions whose
# call costs microseconds, and the launchers run on every op call.


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


def launch_grid(x: int, y: int = 1, z: int = 1) -> Tuple[int, int, int]:
    """(x, y, z) as a launch grid, or a ValueError where CUDA could not launch it (the kernels put images and
    channel blocks on y and z: at most 65535 each), raised the same way through the interpreter."""
    for axis, (n, limit) in enumerate(zip((x, y, z), GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"the Triton kernels would launch {n} blocks along the grid's {'xyz'[axis]} axis "
                             f"(one or more per image), where CUDA allows {limit}: split the batch, or use "
                             f"backend='reference'")
    return x, y, z


def needs_int64(*tensors) -> bool:
    """True when some tensor's reachable element offset does not fit in int32. A dense tensor's offsets stay
    below its numel (one C call); only other layouts (expanded, strided views) sum (size - 1) * |stride|."""
    for t in tensors:
        if t is None:
            continue
        if t.numel() <= INT32_LIMIT and (t.is_contiguous() or t.is_contiguous(memory_format=_CL)):
            continue
        if sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0) > INT32_LIMIT:
            return True
    return False


def source_args(x: Tensor, term: TermPlan) -> tuple:
    """The source tuple of `x` read as `term` says (layout in the module docstring). The ratio goes both as a
    float (rounded to float32 at launch: nearest, and bilinear below fp64, use it as ATen does) and as the exact
    fraction (bilinear in fp64 divides it in fp64)."""
    _, _, h, w = x.shape
    return (x, h, w, x.stride(), *_axis_ratios(term))


@functools.lru_cache(maxsize=4096)
def _axis_ratios(term: TermPlan) -> Tuple[Tuple[float, int, int], Tuple[float, int, int]]:
    return tuple((num / den, num, den) for num, den in (term.ratio_h, term.ratio_w))


@triton.jit
def tile_offsets(n, c, y, x, strides, INT64: tl.constexpr):
    """Element offsets of a [BLOCK_C, BLOCK_P] tile: channel part [:, None] + pixel part [None, :]."""
    s_n, s_c, s_h, s_w = strides
    if INT64:  # one return below: the compiler wants one return type whatever the branch
        n = n.to(tl.int64)
        c = c.to(tl.int64)
        y = y.to(tl.int64)
        x = x.to(tl.int64)
    return (n * s_n + c * s_c)[:, None] + (y * s_h + x * s_w)[None, :]


@triton.jit
def nearest_source(d, r, n_in):
    # ATen nearest_neighbor_compute_source_index: min(floorf(dst * scale), in - 1), always in float32
    return tl.minimum((d.to(tl.float32) * r).to(tl.int32), n_in - 1)


@triton.jit
def linear_source(d, r, n_in, ALIGN: tl.constexpr, F64: tl.constexpr):
    """ATen's bilinear taps (i0, i1) and weights (l0, l1) of output index d along one axis."""
    if F64:
        df = d.to(tl.float64)
    else:
        df = d.to(tl.float32)
    if ALIGN:
        real = r * df
    else:
        real = tl.maximum(r * (df + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(real.to(tl.int32), n_in - 1)
    l1 = tl.minimum(tl.maximum(real - i0.to(real.dtype), 0.0), 1.0)
    # ATen reads the second tap even at zero weight (so 0 * inf gives NaN, as in F.interpolate), except on an
    # axis that is not resized (ratio exactly 1), where it copies
    resized = (tl.zeros_like(real) + r) != 1.0  # elementwise, so `&` also works in the interpreter
    i1 = tl.where((i0 < n_in - 1) & resized, i0 + 1, i0)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def bilinear_ratio(axis_ratio, F64: tl.constexpr):
    # bilinear computes its ratio in the accumulation type (ATen's opmath); the f64 one from exact integers
    r, num, den = axis_ratio
    if F64:
        r = tl.cast(num, tl.float64) / tl.cast(den, tl.float64)
    return r


@triton.jit
def upsampled_tile(n, c, c_mask, oy, ox, p_mask, src, MODE: tl.constexpr, ALIGN: tl.constexpr, F64: tl.constexpr,
                   INT64: tl.constexpr):
    """Up(x) on an output tile (channels c, output pixels (oy, ox)), in the accumulation dtype."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    x_ptr, h, w, strides, ratio_h, ratio_w = src
    mask = c_mask[:, None] & p_mask[None, :]
    if MODE == 0:
        v = tl.load(x_ptr + tile_offsets(n, c, oy, ox, strides, INT64), mask=mask, other=0.0).to(acc_t)
    elif MODE == 1:
        iy = nearest_source(oy, ratio_h[0], h)
        ix = nearest_source(ox, ratio_w[0], w)
        v = tl.load(x_ptr + tile_offsets(n, c, iy, ix, strides, INT64), mask=mask, other=0.0).to(acc_t)
    else:
        y0, y1, ly0, ly1 = linear_source(oy, bilinear_ratio(ratio_h, F64), h, ALIGN, F64)
        x0, x1, lx0, lx1 = linear_source(ox, bilinear_ratio(ratio_w, F64), w, ALIGN, F64)
        v00 = tl.load(x_ptr + tile_offsets(n, c, y0, x0, strides, INT64), mask=mask, other=0.0).to(acc_t)
        v01 = tl.load(x_ptr + tile_offsets(n, c, y0, x1, strides, INT64), mask=mask, other=0.0).to(acc_t)
        v10 = tl.load(x_ptr + tile_offsets(n, c, y1, x0, strides, INT64), mask=mask, other=0.0).to(acc_t)
        v11 = tl.load(x_ptr + tile_offsets(n, c, y1, x1, strides, INT64), mask=mask, other=0.0).to(acc_t)
        lx0 = lx0[None, :]
        lx1 = lx1[None, :]
        # ATen's order: h0l * (w0l * v00 + w1l * v01) + h1l * (w0l * v10 + w1l * v11)
        v = ly0[None, :] * (lx0 * v00 + lx1 * v01) + ly1[None, :] * (lx0 * v10 + lx1 * v11)
    return v


@triton.jit
def load_term(n, c, c_mask, oy, ox, p_mask, src, scale_ptr, shift_ptr,
              MODE: tl.constexpr, ALIGN: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
              F64: tl.constexpr, INT64: tl.constexpr):
    """One term of the sum on an output tile, Up(x) * scale + shift, in the accumulation dtype."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    v = upsampled_tile(n, c, c_mask, oy, ox, p_mask, src, MODE, ALIGN, F64, INT64)
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + c, mask=c_mask, other=0.0).to(acc_t)[:, None]
    if HAS_SHIFT:
        v = v + tl.load(shift_ptr + c, mask=c_mask, other=0.0).to(acc_t)[:, None]
    return v


def channel_block(C: int, cap: int, min_active: float = 0.9) -> int:
    """The widest power-of-2 channel block up to `cap` whose blocks keep at least `min_active` of their lanes
    on real channels: 16 for C=48 (3 full blocks, where 64 would idle a quarter), 32 for 30, 8 for 36."""
    best = 1
    b = 1
    while b <= cap:
        if C / (cdiv(C, b) * b) >= min_active:
            best = b
        b *= 2
    return best


@triton.jit
def grid_offsets(n, c, y, x, strides, INT64: tl.constexpr):
    """Element offsets of a [BLOCK_C, BLOCK_H, BLOCK_W] tile from its channels c, rows y and columns x: the
    channel and row parts are summed on [BLOCK_C, BLOCK_H, 1] first, so each element costs one add."""
    s_n, s_c, s_h, s_w = strides
    if INT64:
        n = n.to(tl.int64)
        c = c.to(tl.int64)
        y = y.to(tl.int64)
        x = x.to(tl.int64)
    return ((n * s_n + c * s_c)[:, None, None] + (y * s_h)[None, :, None]) + (x * s_w)[None, None, :]


@triton.jit
def term_grid(n, c, oy, ox, src, MODE: tl.constexpr, ALIGN: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr):
    """Up(x) on a [BLOCK_C, BLOCK_H, BLOCK_W] output tile (channels c, rows oy, columns ox), in the accumulation
    dtype. Separable: the source taps and weights are computed once per row and once per column, not per
    element. c, oy and ox must be in range (the caller clamps its tile's tail), so no load needs a mask."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    x_ptr, h, w, strides, ratio_h, ratio_w = src
    if MODE == 0:
        v = tl.load(x_ptr + grid_offsets(n, c, oy, ox, strides, INT64)).to(acc_t)
    elif MODE == 1:
        iy = nearest_source(oy, ratio_h[0], h)
        ix = nearest_source(ox, ratio_w[0], w)
        v = tl.load(x_ptr + grid_offsets(n, c, iy, ix, strides, INT64)).to(acc_t)
    else:
        y0, y1, ly0, ly1 = linear_source(oy, bilinear_ratio(ratio_h, F64), h, ALIGN, F64)
        x0, x1, lx0, lx1 = linear_source(ox, bilinear_ratio(ratio_w, F64), w, ALIGN, F64)
        v00 = tl.load(x_ptr + grid_offsets(n, c, y0, x0, strides, INT64)).to(acc_t)
        v01 = tl.load(x_ptr + grid_offsets(n, c, y0, x1, strides, INT64)).to(acc_t)
        v10 = tl.load(x_ptr + grid_offsets(n, c, y1, x0, strides, INT64)).to(acc_t)
        v11 = tl.load(x_ptr + grid_offsets(n, c, y1, x1, strides, INT64)).to(acc_t)
        lx0 = lx0[None, None, :]
        lx1 = lx1[None, None, :]
        # ATen's order: h0l * (w0l * v00 + w1l * v01) + h1l * (w0l * v10 + w1l * v11)
        v = ly0[None, :, None] * (lx0 * v00 + lx1 * v01) + ly1[None, :, None] * (lx0 * v10 + lx1 * v11)
    return v


@triton.jit
def first_reader(s, r, step, offset, MODE: tl.constexpr, ALIGN: tl.constexpr, F64: tl.constexpr):
    """First output index that may read source s: exact (s * step - offset) when the host found the ratio
    to be exactly 1/step; otherwise a lower bound with 2 indices of slack for rounding."""
    if F64:
        sf = s.to(tl.float64)
    else:
        sf = s.to(tl.float32)
    safe_r = tl.where(r > 0.0, r, 1.0)
    if MODE == 1:
        start = sf / safe_r
    elif ALIGN:
        start = (sf - 1.0) / safe_r
    else:
        start = (sf - 0.5) / safe_r - 0.5
    start = tl.maximum(start, 0.0)  # before the cast: negative values truncate towards zero
    lo = start.to(tl.int32) - 2
    lo = tl.where(r > 0.0, lo, 0)  # r == 0 (align_corners, one source pixel): every output reads it
    lo = tl.where(step > 0, s * step - offset, lo)
    return tl.maximum(lo, 0)


@triton.jit
def adjoint_weight(d, s, r, n_in, n_out, MODE: tl.constexpr, ALIGN: tl.constexpr, F64: tl.constexpr):
    """Weight with which output index d reads source index s, with the forward's exact index rules."""
    if MODE == 1:
        wgt = tl.where(nearest_source(d, r, n_in) == s, 1.0, 0.0)
    else:
        i0, i1, l0, l1 = linear_source(d, r, n_in, ALIGN, F64)
        wgt = tl.where(i0 == s, l0, 0.0) + tl.where(i1 == s, l1, 0.0)
    return tl.where(d < n_out, wgt, 0.0)
