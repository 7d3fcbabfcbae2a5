"""Triton kernels for the HRNetV2 head, reordered: the 15C-channel full-resolution tensor never reaches memory.

    logits = Wc . ReLU(BN(W0 x0 + sum_j Up(P_j) + b)) + bc,     P_j = W_j x_j at branch j's resolution

(the 1x1 conv commutes with Up, whose weights sum to 1). Every kernel works on the forward's 2-D tiles of
TILE_H x TILE_W pixels of one image, looping over the M head channels in chunks of BLOCK_M and recomputing the
pre-BN chunk s = x0^T W0[m]^T + sum_j U_j patch_j (conv bias excluded: it only shifts BN's mean) with tensor-core
dots: U_j is the tile's interpolation matrix (built once per tile, `_tile_plans`) and patch_j the source pixels
the tile reads (a plain 2-D block per chunk instead of 4 gathers per output element). The dense U multiplies
zero weights by every patch value, so a non-finite value would spread NaN over the tile: a tile whose dense
result holds NaN, or whose patches miss a tap, is redone with ATen's exact per-pixel gathers (a second loop; in
the backward reduce and fp32's ds kernel a second launch, which keeps the dense one spill-free).

- `_head_stats_kernel`: per-tile sum and centred sum of squares of s (BN batch statistics, training);
- `_head_forward_kernel`: logits = Wc . ReLU(s * scale + shift) + bc, accumulated over M chunks;
- `_head_backward_reduce_kernel`: over splits of the tiles, dWc = sum g a^T, sum dA and sum dA * s, where
  dA = g Wc, zeroed where a <= 0 (ReLU's backward: NaN passes), each split adding into its own rows; fp32 on
  sm_90 in transposed chunks (`_reduce_chunk_t`: the loop-invariant operands as wgmma's B, in shared memory);
- `_head_backward_ds_kernel`: over splits of the tiles, ds = dA * scale + alpha + beta * s (alpha, beta: BN's
  batch-statistics terms) per chunk, never written: dx0 = W0^T ds accumulated per tile, dW0 = ds x0^T into
  the split's rows, and per upsampled branch the tile's patch partial U_j^T ds (the transpose of the forward's
  patch dot); `_head_patch_gather_kernel` sums the partials of the tiles whose patches hold each source pixel.
  A tile whose dense chunk held a non-finite value is finished by a second pass over the split's tiles with the
  exact gathers (nothing of the first pass is live there: each pass fits the registers).
  fp32 (3xTF32 dots: the fused chunk would spill kilobytes) writes ds instead, one tile per program, for the
  op's GEMMs and the fusion op's adjoint gather (`upsample_adjoint`).

fp32's 3xTF32 dots split both operands in (hi, lo) tf32 pairs; an interpolation matrix U_j whose weights are
exact in tf32 (`UEXACT`, `_weights_exact_in_tf32`: nearest, and bilinear at power-of-two ratios, HRNet's 2x /
4x / 8x) has lo = 0, so its dots run unsplit (`_dot3_exact`: two dots, not three, the same sums): a third
fewer dots for those branches, and no (hi, lo) pair of U to hold over the chunk loop.

Per-split and per-tile partial sums are reduced in a fixed order (on the host, or by the gather): deterministic,
no atomics.
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hrfast.plan import HeadPlan

from .fuse import _device_context, _empty, needs_int64, relu, relu_backward, upsample_term_backward
from .limits import device_limits, first_fitting
from .resample import (BILINEAR, NEAREST, SAME, bilinear_ratio, cdiv, launch_grid, linear_source,  # noqa: F401
                       nearest_source, next_power_of_2, source_args, upsampled_tile)


@triton.jit
def _tile_pixels(pid, H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Program pid's TILE_H x TILE_W output tile (row-major over the image's tiles): (oy, ox, p_mask) and the
    indices clamped into the image (cy, cx), whose taps lie inside every patch bound."""
    tiles_w = tl.cdiv(W, TILE_W)
    p = tl.arange(0, TILE_H * TILE_W)
    oy = (pid // tiles_w) * TILE_H + p // TILE_W
    ox = (pid % tiles_w) * TILE_W + p % TILE_W
    return oy, ox, (oy < H) & (ox < W), tl.minimum(oy, H - 1), tl.minimum(ox, W - 1)


@triton.jit
def _load_x0_tile(x0_ptr, n, cy, cx, p_mask, C0, strides, INT64: tl.constexpr, C0P: tl.constexpr):
    """x0 on the tile as the dot's A operand, [pixels, C0P] (padded pixels and channels 0)."""
    c = tl.arange(0, C0P)
    return tl.load(x0_ptr + _offsets(n, c, cy, cx, strides, INT64), mask=p_mask[:, None] & (c < C0)[None, :],
                   other=0.0)


@triton.jit
def _tile_plans(n, oy, ox, lows, MODES: tl.constexpr, ALIGNS: tl.constexpr, PATCH_H: tl.constexpr,
                PATCH_W: tl.constexpr, SRC: tl.constexpr, GATHER: tl.constexpr, F64: tl.constexpr,
                INT64: tl.constexpr, DTYPE: tl.constexpr):
    """Per low branch (U_j, patch pixel offsets), built once per tile, and whether every patch covers its taps
    (GATHER: none built, covered)."""
    covered = True
    plans = ()
    if not GATHER:
        for j in tl.static_range(len(lows)):
            if MODES[j] != 0:
                x_ptr, h, w, strides, _, _ = lows[j]
                u, rows, cols, ok = _patch_plan(oy, ox, lows[j], tl.arange(0, SRC[j]), MODES[j], ALIGNS[j],
                                                PATCH_H[j], PATCH_W[j], F64, DTYPE)
                covered = covered & ok
                plans = plans + ((u, _pixel_offsets(n, rows, cols, strides, INT64)),)
            else:
                plans = plans + ((0, 0),)
    return plans, covered


@triton.jit
def _chunk_pre_bn(x0, n, oy, ox, p_mask, m, m_mask, m_c, w0_ptr, w0_strides, C0, plans, lows,
                  MODES: tl.constexpr, ALIGNS: tl.constexpr, UEXACT: tl.constexpr, CL: tl.constexpr,
                  GATHER: tl.constexpr,
                  F64: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr, C0P: tl.constexpr):
    """s [pixels, BLOCK_M] = x0^T W0[m]^T + sum_j Up(P_j)[m] on the tile, in the accumulation dtype: U_j . patch_j
    dots (`_tile_plans`) or, GATHER, ATen's per-pixel taps. (oy, ox) clamped into the image, m_c = m clamped
    to M - 1: padded pixels and channels hold copies of real ones, finite where those are."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    c = tl.arange(0, C0P)
    w0 = tl.load(w0_ptr + c[:, None] * w0_strides[1] + m_c[None, :] * w0_strides[0], mask=(c < C0)[:, None],
                 other=0.0)
    if PRECISION == "tf32x3":
        s, t = _dot3(x0, w0, tl.zeros([x0.shape[0], w0.shape[1]], acc_t), tl.zeros([x0.shape[0], w0.shape[1]], acc_t))
    elif PRECISION == "tf32x3_split":  # x0 and the U_j come as (hi, lo), split once per tile
        zeros = tl.zeros([x0[0].shape[0], w0.shape[1]], acc_t)
        s, t = _dot3_split(x0[0], x0[1], w0, zeros, zeros)
    else:
        s = tl.dot(x0, w0, out_dtype=acc_t, input_precision=PRECISION)
    for j in tl.static_range(len(lows)):
        x_ptr, h, w, strides, _, _ = lows[j]
        if MODES[j] == 0:
            s += tl.load(x_ptr + _offsets(n, m_c, oy, ox, strides, INT64)).to(acc_t)
        elif GATHER:
            s += tl.trans(upsampled_tile(n, m_c, m_mask, oy, ox, p_mask, lows[j], MODES[j], ALIGNS[j], F64, INT64))
        else:
            u, patch_offsets = plans[j]
            if CL[j]:  # channels contiguous: masked, so the copies stay vectorised
                patch = tl.load(x_ptr + (patch_offsets[:, None] + _channel_offsets(m, strides, INT64)[None, :]),
                                mask=m_mask[None, :], other=0.0)
            else:  # scalar loads either way: clamped, no mask to compute
                patch = tl.load(x_ptr + (patch_offsets[:, None] + _channel_offsets(m_c, strides, INT64)[None, :]))
            if UEXACT[j] and ((PRECISION == "tf32x3") or (PRECISION == "tf32x3_split")):
                s, t = _dot3_exact(u, patch, s, t)
            elif PRECISION == "tf32x3":
                s, t = _dot3(u, patch, s, t)
            elif PRECISION == "tf32x3_split":
                s, t = _dot3_split(u[0], u[1], patch, s, t)
            else:
                s = tl.dot(u, patch, acc=s, out_dtype=acc_t, input_precision=PRECISION)
    if (PRECISION == "tf32x3") or (PRECISION == "tf32x3_split"):
        s = _dot3_sum(s, t)
    return s


@triton.jit
def _tf32_split(a):
    """(hi, lo): a rounded to tf32 (10 mantissa bits, ties away from zero, as cvt.rna.tf32.f32: as accurate as
    Triton's own split, 3 integer / float instructions and a NaN select per element) and lo = a - hi, exact;
    the tensor core truncates lo to tf32. inf: hi = inf, lo = NaN (dropped by `_dot3_sum`); NaN stays NaN
    (any payload). A finite |a| within half a tf32 step of the fp32 maximum rounds to inf (not handled)."""
    r = ((a.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    hi = tl.where(a == a, r, a)
    return hi, a - hi


@triton.jit
def _dot3(a, b, big, small):
    """3xTF32 a . b by hand, one split dot at a time: big += hi(a) hi(b) (carries every inf / NaN),
    small += lo(a) hi(b) + hi(a) lo(b) (NaN only where big is non-finite, see `_dot3_sum`)."""
    a_hi, a_lo = _tf32_split(a)
    return _dot3_split(a_hi, a_lo, b, big, small)


@triton.jit
def _dot3_split(a_hi, a_lo, b, big, small):
    """`_dot3` with a given as its split (a_hi, a_lo) = `_tf32_split(a)`: a loop-invariant operand split once,
    outside the loop."""
    b_hi, b_lo = _tf32_split(b)
    small = tl.dot(a_lo, b_hi, acc=small, input_precision="tf32")
    small = tl.dot(a_hi, b_lo, acc=small, input_precision="tf32")
    big = tl.dot(a_hi, b_hi, acc=big, input_precision="tf32")
    return big, small


@triton.jit
def _dot3_exact(a, b, big, small):
    """`_dot3` for an a exact in tf32 (lo(a) = 0: `UEXACT`'s interpolation weights): big += a hi(b), small +=
    a lo(b), the same sums without the dot of zeros and without a's split."""
    b_hi, b_lo = _tf32_split(b)
    small = tl.dot(a, b_lo, acc=small, input_precision="tf32")
    big = tl.dot(a, b_hi, acc=big, input_precision="tf32")
    return big, small


@triton.jit
def _split_plans(plans, MODES: tl.constexpr, UEXACT: tl.constexpr):
    """`_tile_plans`' plans with each U_j as its split (hi, lo) (`_tf32_split`), U_j as is where it is exact in
    tf32 (`UEXACT`)."""
    split = ()
    for j in tl.static_range(len(MODES)):
        if UEXACT[j]:
            split = split + (plans[j],)
        elif MODES[j] != 0:
            u, offsets = plans[j]
            split = split + ((_tf32_split(u), offsets),)
        else:
            split = split + ((0, 0),)
    return split


@triton.jit
def _dot3_sum(big, small):
    """big + small, small's NaN dropped: an inf in a hi times a lo of 0 (or inf - inf among the cross terms)
    happens only where big already holds that inf or NaN, as eager's fp32 dot does."""
    return big + tl.where(small != small, 0.0, small)


# the exact gathers' chunk of M channels (they hold 4 taps per bilinear branch at once)
GATHER_M = tl.constexpr(16)


@triton.jit
def _redo_from(probe, covered, M):
    """Where the exact-gather loop starts: M (no trips) unless the probe (sums of s over the tile) holds NaN or a
    patch missed a tap, then 0."""
    nan_seen = tl.sum(tl.where(probe != probe, 1, 0), axis=0)
    return tl.where((nan_seen > 0) | (covered == 0), 0, M)


@triton.jit
def _stats_chunk(x0, n, cy, cx, p_mask, count, m0, M, w0_ptr, w0_strides, C0, plans, lows, part_ptr, row, R,
                 MODES: tl.constexpr, ALIGNS: tl.constexpr, UEXACT: tl.constexpr, CL: tl.constexpr,
                 GATHER: tl.constexpr,
                 F64: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr, C0P: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Stores the tile's sum and centred sum of squares of s for channels m0 + [0, BLOCK_M); returns the sums
    (NaN where s has one: the caller's probe)."""
    m = m0 + tl.arange(0, BLOCK_M)
    m_mask = m < M
    s = _chunk_pre_bn(x0, n, cy, cx, p_mask, m, m_mask, tl.minimum(m, M - 1), w0_ptr, w0_strides, C0, plans, lows,
                      MODES, ALIGNS, UEXACT, CL, GATHER, F64, INT64, PRECISION, C0P)
    s = tl.where(p_mask[:, None], s, 0.0)
    total = tl.sum(s, axis=0)
    centred = tl.where(p_mask[:, None], s - (total / count)[None, :], 0.0)
    tl.store(part_ptr + row * M + m, total, mask=m_mask)
    tl.store(part_ptr + (R + row) * M + m, tl.sum(centred * centred, axis=0), mask=m_mask)
    return total


@triton.jit
def _stats_chunk_t(x0t, n, cy, cx, p_mask, count, m0, M, w0_ptr, w0_strides, C0, plans, lows, part_ptr, row, R,
                   MODES: tl.constexpr, ALIGNS: tl.constexpr, UEXACT: tl.constexpr, CL: tl.constexpr,
                   GATHER: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr):
    """`_stats_chunk` for fp32 on the transposed chunk (`_chunk_pre_bn_t`)."""
    m = m0 + tl.arange(0, BLOCK_M)
    m_mask = m < M
    s = _chunk_pre_bn_t(x0t, n, cy, cx, p_mask, m, m_mask, tl.minimum(m, M - 1), w0_ptr, w0_strides, C0, plans,
                        lows, MODES, ALIGNS, UEXACT, CL, GATHER, INT64)
    s = tl.where(p_mask[None, :], s, 0.0)
    total = tl.sum(s, axis=1)
    centred = tl.where(p_mask[None, :], s - (total / count)[:, None], 0.0)
    tl.store(part_ptr + row * M + m, total, mask=m_mask)
    tl.store(part_ptr + (R + row) * M + m, tl.sum(centred * centred, axis=1), mask=m_mask)
    return total


@triton.jit
def _head_stats_kernel(
    x0_ptr, x0_strides, C0, H, W,
    w0_ptr, w0_strides, M, part_ptr, R,
    lows, MODES: tl.constexpr, ALIGNS: tl.constexpr, UEXACT: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr,
    SRC: tl.constexpr, CL: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
    C0P: tl.constexpr, BLOCK_M: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    TRANSPOSED: tl.constexpr, C0Q: tl.constexpr,
):
    """Per TILE_H x TILE_W tile (the forward's) and channel: sum of s (slot 0) and sum of (s - tile mean)^2
    (slot 1), for Chan's merge on the host. As in the forward, a tile whose dense s holds NaN (a non-finite
    patch value times a zero weight spreads over the tile; or NaN in the data) or whose patches miss a tap is
    redone with ATen's per-pixel gathers (second loop, 16-channel chunks; no trips on finite inputs)."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    n = tl.program_id(1)
    oy, ox, p_mask, cy, cx = _tile_pixels(pid, H, W, TILE_H, TILE_W)
    count = tl.sum(p_mask.to(tl.float32), axis=0)
    row = n * tl.num_programs(0) + pid
    probe = tl.zeros([BLOCK_M], dtype=acc_t)
    if TRANSPOSED:  # fp32 (sm_90): s^T in 3xTF32, x0^T and the U_j^T as wgmma's B (`_reduce_chunk_t`)
        x0t = _x0t_parts(x0_ptr, n, cy, cx, p_mask, C0, x0_strides, INT64, C0Q)
        plans, covered = _tile_plans(n, cy, cx, lows, MODES, ALIGNS, PATCH_H, PATCH_W, SRC, False, F64, INT64,
                                     tl.float32)
        plans = _transposed_plans(plans, MODES, UEXACT)
        for m0 in range(0, M, BLOCK_M):
            probe += _stats_chunk_t(x0t, n, cy, cx, p_mask, count, m0, M, w0_ptr, w0_strides, C0, plans, lows,
                                    part_ptr, row, R, MODES, ALIGNS, UEXACT, CL, False, INT64, BLOCK_M)
        redo = _redo_from(probe, covered, M)
        for m0 in range(redo, M, GATHER_M):
            _stats_chunk_t(x0t, n, cy, cx, p_mask, count, m0, M, w0_ptr, w0_strides, C0, plans, lows, part_ptr, row,
                           R, MODES, ALIGNS, UEXACT, CL, True, INT64, GATHER_M)
        return
    x0 = _load_x0_tile(x0_ptr, n, cy, cx, p_mask, C0, x0_strides, INT64, C0P)
    plans, covered = _tile_plans(n, cy, cx, lows, MODES, ALIGNS, PATCH_H, PATCH_W, SRC, False, F64, INT64, x0.dtype)
    for m0 in range(0, M, BLOCK_M):
        probe += _stats_chunk(x0, n, cy, cx, p_mask, count, m0, M, w0_ptr, w0_strides, C0, plans, lows, part_ptr,
                              row, R, MODES, ALIGNS, UEXACT, CL, False, F64, INT64, PRECISION, C0P, BLOCK_M)
    redo = _redo_from(probe, covered, M)
    for m0 in range(redo, M, GATHER_M):
        _stats_chunk(x0, n, cy, cx, p_mask, count, m0, M, w0_ptr, w0_strides, C0, plans, lows, part_ptr, row, R,
                     MODES, ALIGNS, UEXACT, CL, True, F64, INT64, PRECISION, C0P, GATHER_M)


@triton.jit
def _axis_taps(d, n_in, ratio, MODE: tl.constexpr, ALIGN: tl.constexpr, F64: tl.constexpr):
    """Per output index d along one axis: the source taps (i0, i1) and weights (l0, l1) `F.interpolate` uses
    (nearest: one tap of weight 1)."""
    if MODE == 1:
        i = nearest_source(d, ratio[0], n_in)
        one = tl.full(d.shape, 1.0, tl.float64 if F64 else tl.float32)
        return i, i, one, one * 0.0
    else:
        return linear_source(d, bilinear_ratio(ratio, F64), n_in, ALIGN, F64)


@triton.jit
def _axis_weights(q, first, i0, i1, l0, l1):
    """[BLOCK_P, SRC] weights with which each output pixel (rows) reads patch index q (columns) along one axis;
    `first` is the patch's first source index. Coinciding taps (an edge) add up, as ATen's sum does."""
    local = q[None, :] + first
    return tl.where(local == i0[:, None], l0[:, None], 0.0) + tl.where(local == i1[:, None], l1[:, None], 0.0)


@triton.jit
def _patch_plan(oy, ox, src, q, MODE: tl.constexpr, ALIGN: tl.constexpr, PATCH_H: tl.constexpr,
                PATCH_W: tl.constexpr, F64: tl.constexpr, DTYPE: tl.constexpr):
    """What a tile needs to upsample one low branch with a dot: the interpolation matrix U [BLOCK_P, SRC]
    (output pixel x flattened PATCH_H x PATCH_W source patch, q = row * PATCH_W + column), the patch's source
    rows and columns per q, and whether the patch holds every tap the tile reads (else the exact gather runs)."""
    _, h, w, _, ratio_h, ratio_w = src
    y0, y1, ly0, ly1 = _axis_taps(oy, h, ratio_h, MODE, ALIGN, F64)
    x0, x1, lx0, lx1 = _axis_taps(ox, w, ratio_w, MODE, ALIGN, F64)
    row0 = tl.min(y0, axis=0)  # taps grow with the output index: the patch starts at the first pixel's
    col0 = tl.min(x0, axis=0)
    q_row = q // PATCH_W
    q_col = q % PATCH_W
    u = _axis_weights(q_row, row0, y0, y1, ly0, ly1) * _axis_weights(q_col, col0, x0, x1, lx0, lx1)
    u = tl.where((q < PATCH_H * PATCH_W)[None, :], u, 0.0)
    covered = (tl.max(y1, axis=0) - row0 < PATCH_H) & (tl.max(x1, axis=0) - col0 < PATCH_W)
    # clamped, not masked: a patch entry past the source (or the padding of SRC) has weight 0 everywhere
    rows = tl.minimum(row0 + q_row, h - 1)
    cols = tl.minimum(col0 + q_col, w - 1)
    return u.to(DTYPE), rows, cols, covered


@triton.jit
def _offsets(n, c, y, x, strides, INT64: tl.constexpr):
    """Element offsets of a [pixels, channels] tile (pixel part [:, None] + channel part [None, :])."""
    s_n, s_c, s_h, s_w = strides
    if INT64:
        n = n.to(tl.int64)
        c = c.to(tl.int64)
        y = y.to(tl.int64)
        x = x.to(tl.int64)
    return (y * s_h + x * s_w)[:, None] + (n * s_n + c * s_c)[None, :]


@triton.jit
def _pixel_offsets(n, y, x, strides, INT64: tl.constexpr):
    s_n, _, s_h, s_w = strides
    if INT64:
        n = n.to(tl.int64)
        y = y.to(tl.int64)
        x = x.to(tl.int64)
    return n * s_n + y * s_h + x * s_w


@triton.jit
def _channel_offsets(c, strides, INT64: tl.constexpr):
    if INT64:
        c = c.to(tl.int64)
    return c * strides[1]


@triton.jit
def _head_forward_kernel(
    x0_ptr, x0_strides, C0, H, W,
    w0_ptr, w0_strides, M, scale_ptr, shift_ptr,
    wc_ptr, wc_strides, K, bc_ptr, out_ptr, out_strides,
    lows, MODES: tl.constexpr, ALIGNS: tl.constexpr, UEXACT: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr,
    SRC: tl.constexpr, CL: tl.constexpr, HAS_BC: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr,
    PRECISION: tl.constexpr,
    C0P: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    """One TILE_H x TILE_W tile of output pixels per program, looping over the M head channels in chunks.

    Per chunk, the pre-BN activation s [pixels, channels] is one chain of tensor-core dots: x0^T W0^T plus,
    per upsampled branch, U_j P_j-patch, where U_j (built once per tile) holds the bilinear / nearest weights
    from the branch's source patch (the PATCH_H x PATCH_W source pixels the tile reads, loaded per chunk as a
    plain 2-D block) to the tile's pixels. BN, ReLU and the classifier dot follow; only the K logits are
    written. The dense U multiplies zero weights by every patch value, so a non-finite value there would spread
    NaN over the tile: a tile whose logits hold NaN, or whose patches miss a tap (a bound the host derived from
    the ratio, checked here), is recomputed with the exact per-pixel gathers, which reproduce ATen's NaN/inf."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    n = tl.program_id(1)
    oy, ox, p_mask, cy, cx = _tile_pixels(tl.program_id(0), H, W, TILE_H, TILE_W)
    x0 = _load_x0_tile(x0_ptr, n, cy, cx, p_mask, C0, x0_strides, INT64, C0P)
    logits, covered = _tile_logits(x0, n, cy, cx, p_mask, w0_ptr, w0_strides, C0, M, scale_ptr, shift_ptr,
                                   wc_ptr, wc_strides, K, lows, MODES, ALIGNS, UEXACT, PATCH_H, PATCH_W, SRC, CL, False,
                                   F64, INT64, PRECISION, C0P, KP, BLOCK_M)
    nan_seen = tl.sum(tl.where(logits != logits, 1, 0), axis=1)
    if (tl.sum(nan_seen, axis=0) > 0) | (covered == 0):
        # (narrow chunks: the gathers hold 4 taps per branch at once, and this loop's registers count too)
        logits, covered = _tile_logits(x0, n, cy, cx, p_mask, w0_ptr, w0_strides, C0, M, scale_ptr, shift_ptr,
                                       wc_ptr, wc_strides, K, lows, MODES, ALIGNS, UEXACT, PATCH_H, PATCH_W, SRC, CL,
                                       True,
                                       F64, INT64, PRECISION, C0P, KP, 16)
    k = tl.arange(0, KP)
    if HAS_BC:
        logits += tl.load(bc_ptr + k, mask=k < K, other=0.0).to(acc_t)[None, :]
    tl.store(out_ptr + _offsets(n, k, oy, ox, out_strides, INT64), logits.to(out_ptr.dtype.element_ty),
             mask=p_mask[:, None] & (k < K)[None, :])


@triton.jit
def _tile_logits(x0, n, oy, ox, p_mask, w0_ptr, w0_strides, C0, M, scale_ptr, shift_ptr,
                 wc_ptr, wc_strides, K, lows, MODES: tl.constexpr, ALIGNS: tl.constexpr, UEXACT: tl.constexpr,
                 PATCH_H: tl.constexpr,
                 PATCH_W: tl.constexpr, SRC: tl.constexpr, CL: tl.constexpr, GATHER: tl.constexpr, F64: tl.constexpr,
                 INT64: tl.constexpr, PRECISION: tl.constexpr, C0P: tl.constexpr, KP: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """The tile's logits [pixels, KP] before the classifier bias, and whether every patch covered its taps.
    GATHER: the low branches through the exact per-pixel gathers instead of the patch dots."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    dtype: tl.constexpr = x0.dtype
    plans, covered = _tile_plans(n, oy, ox, lows, MODES, ALIGNS, PATCH_H, PATCH_W, SRC, GATHER, F64, INT64, dtype)
    k = tl.arange(0, KP)
    k_c = tl.minimum(k, K - 1)
    logits = tl.zeros([x0.shape[0], KP], dtype=acc_t)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_mask = m < M
        # clamped to the last channel / class where that keeps loads unmasked: the padding is zeroed below
        m_c = tl.minimum(m, M - 1)
        s = _chunk_pre_bn(x0, n, oy, ox, p_mask, m, m_mask, m_c, w0_ptr, w0_strides, C0, plans, lows, MODES, ALIGNS,
                          UEXACT,
                          CL, GATHER, F64, INT64, PRECISION, C0P)
        scale = tl.load(scale_ptr + m_c).to(acc_t)
        shift = tl.load(shift_ptr + m_c).to(acc_t)
        # padded channels are 0 (their s duplicates the last channel's; the classifier sums over m)
        a = tl.where(m_mask[None, :], relu(s * scale[None, :] + shift[None, :]), 0.0)
        wc = tl.load(wc_ptr + m[:, None] * wc_strides[1] + k_c[None, :] * wc_strides[0], mask=m_mask[:, None],
                     other=0.0)
        # like eager, the classifier multiplies the activation in the input dtype (fp32 accumulate)
        if PRECISION == "tf32x3":
            big, small = _dot3(a, wc, logits, tl.zeros(logits.shape, acc_t))
            logits = _dot3_sum(big, small)
        else:
            logits = tl.dot(a.to(dtype), wc, acc=logits, out_dtype=acc_t, input_precision=PRECISION)
    return logits, covered


@triton.jit
def _activation_grad(x0, g, n, cy, cx, p_mask, m, m_mask, m_c, w0_ptr, w0_strides, C0, scale_ptr, shift_ptr,
                     wc_ptr, wc_strides, K, plans, lows, MODES: tl.constexpr, ALIGNS: tl.constexpr,
                     UEXACT: tl.constexpr,
                     CL: tl.constexpr, GATHER: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr,
                     PRECISION: tl.constexpr, C0P: tl.constexpr, KP: tl.constexpr):
    """On one tile and M chunk: (s, a_pre = s * scale + shift, dA = ReLU'(a_pre) (g Wc[:, m]), scale), all
    [pixels, BLOCK_M] in the accumulation dtype; g [pixels, KP] is the logits' gradient in Wc's dtype (eager's
    classifier backward multiplies in the input dtype)."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    s = _chunk_pre_bn(x0, n, cy, cx, p_mask, m, m_mask, m_c, w0_ptr, w0_strides, C0, plans, lows, MODES, ALIGNS,
                      UEXACT, CL,
                      GATHER, F64, INT64, PRECISION, C0P)
    scale = tl.load(scale_ptr + m_c).to(acc_t)
    shift = tl.load(shift_ptr + m_c).to(acc_t)
    a_pre = s * scale[None, :] + shift[None, :]
    k = tl.arange(0, KP)
    wc = tl.load(wc_ptr + tl.minimum(k, K - 1)[:, None] * wc_strides[0] + m_c[None, :] * wc_strides[1],
                 mask=(k < K)[:, None], other=0.0)
    if PRECISION == "tf32x3_split":  # g as (hi, lo)
        zeros = tl.zeros([g[0].shape[0], wc.shape[1]], acc_t)
        big, small = _dot3_split(g[0], g[1], wc, zeros, zeros)
        da = relu_backward(a_pre, _dot3_sum(big, small))
    elif PRECISION == "tf32x3":
        zeros = tl.zeros([g.shape[0], wc.shape[1]], acc_t)
        big, small = _dot3(g, wc, zeros, zeros)
        da = relu_backward(a_pre, _dot3_sum(big, small))
    else:
        da = relu_backward(a_pre, tl.dot(g, wc, out_dtype=acc_t, input_precision=PRECISION))
    return s, a_pre, da, scale


@triton.jit
def _pre_bn_grad(x0, g, n, cy, cx, p_mask, m, m_mask, m_c, w0_ptr, w0_strides, C0, scale_ptr, shift_ptr, alpha_ptr,
                 beta_ptr, wc_ptr, wc_strides, K, plans, lows, MODES: tl.constexpr, ALIGNS: tl.constexpr,
                 UEXACT: tl.constexpr,
                 CL: tl.constexpr, GATHER: tl.constexpr, BATCH_STATS: tl.constexpr, F64: tl.constexpr,
                 INT64: tl.constexpr, PRECISION: tl.constexpr, C0P: tl.constexpr, KP: tl.constexpr):
    """(s, ds) on one tile and M chunk: ds = dA * scale, plus alpha + beta * s under batch statistics (BN's
    input gradient, `_head_backward_impl`), both [pixels, BLOCK_M] in the accumulation dtype."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    s, a_pre, da, scale = _activation_grad(x0, g, n, cy, cx, p_mask, m, m_mask, m_c, w0_ptr, w0_strides, C0,
                                           scale_ptr, shift_ptr, wc_ptr, wc_strides, K, plans, lows, MODES, ALIGNS,
                                           UEXACT,
                                           CL, GATHER, F64, INT64, PRECISION, C0P, KP)
    ds = da * scale[None, :]
    if BATCH_STATS:
        alpha = tl.load(alpha_ptr + m_c).to(acc_t)
        beta = tl.load(beta_ptr + m_c).to(acc_t)
        ds += alpha[None, :] + beta[None, :] * s
    return s, ds


@triton.jit
def _load_grad_tile(g_ptr, g_strides, n, oy, ox, p_mask, K, INT64: tl.constexpr, KP: tl.constexpr,
                    DTYPE: tl.constexpr):
    """The logits' gradient on the tile, [pixels, KP] in DTYPE (padded pixels and classes 0)."""
    k = tl.arange(0, KP)
    g = tl.load(g_ptr + _offsets(n, k, oy, ox, g_strides, INT64), mask=p_mask[:, None] & (k < K)[None, :], other=0.0)
    return g.to(DTYPE)


@triton.jit
def _reduce_chunk(x0, g, n, cy, cx, p_mask, m0, M, w0_ptr, w0_strides, C0, scale_ptr, shift_ptr, wc_ptr,
                  wc_strides, K, plans, lows, rows, later, redo, MODES: tl.constexpr, ALIGNS: tl.constexpr,
                  UEXACT: tl.constexpr,
                  CL: tl.constexpr, GATHER: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr,
                  PRECISION: tl.constexpr, C0P: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Adds the tile's dWc[:, chunk], sum_p dA and sum_p dA * s into the split's rows (`later`: rows hold earlier
    tiles' sums, else overwritten). The patch dots (not GATHER) add nothing where the chunk's dWc holds NaN
    (see `_head_stats_kernel`) and return the chunk's start as where the exact gathers must resume; else
    `redo` is returned unchanged."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    dtype: tl.constexpr = tl.float32 if PRECISION == "tf32x3_split" else x0.dtype  # (hi, lo) pairs: fp32
    m = m0 + tl.arange(0, BLOCK_M)
    m_mask = m < M
    s, a_pre, da, _ = _activation_grad(x0, g, n, cy, cx, p_mask, m, m_mask, tl.minimum(m, M - 1), w0_ptr,
                                       w0_strides, C0, scale_ptr, shift_ptr, wc_ptr, wc_strides, K, plans, lows,
                                       MODES, ALIGNS, UEXACT, CL, GATHER, F64, INT64, PRECISION, C0P, KP)
    # padded pixels are 0: their activation relu(shift) may be inf or NaN, and every sum runs over pixels
    a = tl.where(p_mask[:, None], relu(a_pre), 0.0)
    da = tl.where(p_mask[:, None], da, 0.0)
    # a NaN of s reaches dWc's column through a (0 * NaN is NaN in the dot)
    if PRECISION == "tf32x3_split":
        zeros = tl.zeros([KP, BLOCK_M], acc_t)
        big, small = _dot3_split(tl.trans(g[0]), tl.trans(g[1]), a, zeros, zeros)
        dwc = _dot3_sum(big, small)
    else:
        dwc = tl.dot(tl.trans(g), a.to(dtype), out_dtype=acc_t, input_precision=PRECISION)
    clean = True
    if not GATHER:
        clean = tl.sum(tl.sum(tl.where(dwc != dwc, 1, 0), axis=1), axis=0) == 0
    if clean:
        k = tl.arange(0, KP)
        dwc_mask = (k < K)[:, None] & m_mask[None, :]
        dwc_at = rows + k[:, None] * M + m[None, :]
        dwc += tl.load(dwc_at, mask=dwc_mask & later, other=0.0)
        tl.store(dwc_at, dwc, mask=dwc_mask)
        sum_da = tl.sum(da, axis=0) + tl.load(rows + K * M + m, mask=m_mask & later, other=0.0)
        tl.store(rows + K * M + m, sum_da, mask=m_mask)
        sum_das = tl.sum(da * s, axis=0) + tl.load(rows + (K + 1) * M + m, mask=m_mask & later, other=0.0)
        tl.store(rows + (K + 1) * M + m, sum_das, mask=m_mask)
    else:
        redo = m0
    return redo


@triton.jit
def _dot3_b(a, b_hi, b_lo, acc):
    """acc + a . b in 3xTF32 with b given as its split (b_hi, b_lo), the loop-invariant operand as the dot's B (on
    sm_90 wgmma reads B from shared memory, where Triton keeps a loop-invariant one: out of the registers).
    As Triton's own 3xTF32: the small products first (their NaN dropped, `_dot3_sum`), then hi(a) b_hi onto
    them and acc, so only one accumulator lives across a chunk's dots."""
    a_hi, a_lo = _tf32_split(a)
    small = tl.dot(a_lo, b_hi, input_precision="tf32")
    small = tl.dot(a_hi, b_lo, acc=small, input_precision="tf32")
    return tl.dot(a_hi, b_hi, acc=_dot3_sum(acc, small), input_precision="tf32")


@triton.jit
def _dot3_exact_b(a, b, acc):
    """`_dot3_b` for a b exact in tf32 (`UEXACT`'s U_j^T): acc + lo(a) b + hi(a) b."""
    a_hi, a_lo = _tf32_split(a)
    small = tl.dot(a_lo, b, input_precision="tf32")
    return tl.dot(a_hi, b, acc=_dot3_sum(acc, small), input_precision="tf32")


@triton.jit
def _x0t_parts(x0_ptr, n, cy, cx, p_mask, C0, strides, INT64: tl.constexpr, C0Q: tl.constexpr):
    """x0^T on the tile as the transposed dots' B operand, channels [0, C0Q) (C0Q a multiple of 16) in parts of 32
    and a last one of 16 ([part, pixels], padded pixels and channels 0), each as its split (hi, lo)."""
    pixels = _pixel_offsets(n, cy, cx, strides, INT64)
    parts = ()
    for h in tl.static_range((C0Q + 16) // 32):
        c = h * 32 + tl.arange(0, min(32, C0Q - 32 * h))
        offsets = _channel_offsets(c, strides, INT64)[:, None] + pixels[None, :]
        parts = parts + (_tf32_split(tl.load(x0_ptr + offsets, mask=(c < C0)[:, None] & p_mask[None, :],
                                             other=0.0)),)
    return parts


@triton.jit
def _transposed_plans(plans, MODES: tl.constexpr, UEXACT: tl.constexpr):
    """`_split_plans` transposed: each U_j^T [SRC, pixels], as (hi, lo) unless exact in tf32."""
    out = ()
    for j in tl.static_range(len(MODES)):
        if MODES[j] != 0:
            u, offsets = plans[j]
            if UEXACT[j]:
                out = out + ((tl.trans(u), offsets),)
            else:
                hi, lo = _tf32_split(u)
                out = out + (((tl.trans(hi), tl.trans(lo)), offsets),)
        else:
            out = out + ((0, 0),)
    return out


@triton.jit
def _chunk_pre_bn_t(x0t, n, oy, ox, p_mask, m, m_mask, m_c, w0_ptr, w0_strides, C0, plans, lows,
                    MODES: tl.constexpr, ALIGNS: tl.constexpr, UEXACT: tl.constexpr, CL: tl.constexpr,
                    GATHER: tl.constexpr, INT64: tl.constexpr):
    """`_chunk_pre_bn` transposed for fp32: s^T [BLOCK_M, pixels] = W0[m] x0^T + sum_j patch_j^T U_j^T in 3xTF32,
    x0^T (hi, lo) and the U_j^T (`_transposed_plans`) the dots' B operands."""
    s = tl.zeros([m.shape[0], x0t[0][0].shape[1]], tl.float32)
    for part in tl.static_range(len(x0t)):  # in parts of 32 channels (`_x0t_parts`): less of W0 live at once
        c = part * 32 + tl.arange(0, x0t[part][0].shape[0])
        w0 = tl.load(w0_ptr + m_c[:, None] * w0_strides[0] + c[None, :] * w0_strides[1], mask=(c < C0)[None, :],
                     other=0.0)
        s = _dot3_b(w0, x0t[part][0], x0t[part][1], s)
    for j in tl.static_range(len(lows)):
        x_ptr, h, w, strides, _, _ = lows[j]
        if MODES[j] == 0:
            s += tl.trans(tl.load(x_ptr + _offsets(n, m_c, oy, ox, strides, INT64)))
        elif GATHER:
            s += upsampled_tile(n, m_c, m_mask, oy, ox, p_mask, lows[j], MODES[j], ALIGNS[j], False, INT64)
        else:
            ut, patch_offsets = plans[j]
            if CL[j]:
                patch = tl.load(x_ptr + (_channel_offsets(m, strides, INT64)[:, None] + patch_offsets[None, :]),
                                mask=m_mask[:, None], other=0.0)
            else:
                patch = tl.load(x_ptr + (_channel_offsets(m_c, strides, INT64)[:, None] + patch_offsets[None, :]))
            if UEXACT[j]:
                s = _dot3_exact_b(patch, ut, s)
            else:
                s = _dot3_b(patch, ut[0], ut[1], s)
    return s


@triton.jit
def _reduce_chunk_t(x0t, g, gt, n, cy, cx, p_mask, m0, M, w0_ptr, w0_strides, C0, scale_ptr, shift_ptr, wc_ptr,
                    wc_strides, K, plans, lows, rows, later, redo, MODES: tl.constexpr, ALIGNS: tl.constexpr,
                    UEXACT: tl.constexpr, CL: tl.constexpr, GATHER: tl.constexpr, INT64: tl.constexpr,
                    KP: tl.constexpr, BLOCK_M: tl.constexpr):
    """`_reduce_chunk` for fp32, transposed: s^T (`_chunk_pre_bn_t`), dA^T = Wc[:, m]^T g^T and dWc^T = a^T g,
    the gradient tile as (hi, lo) in both orientations (g, gt), always the dots' B operand."""
    m = m0 + tl.arange(0, BLOCK_M)
    m_mask = m < M
    m_c = tl.minimum(m, M - 1)
    k = tl.arange(0, KP)
    wct = tl.load(wc_ptr + m_c[:, None] * wc_strides[1] + tl.minimum(k, K - 1)[None, :] * wc_strides[0],
                  mask=(k < K)[None, :], other=0.0)
    dat = _dot3_b(wct, gt[0], gt[1], tl.zeros([BLOCK_M, gt[0].shape[1]], tl.float32))
    s = _chunk_pre_bn_t(x0t, n, cy, cx, p_mask, m, m_mask, m_c, w0_ptr, w0_strides, C0, plans, lows, MODES, ALIGNS,
                        UEXACT, CL, GATHER, INT64)
    scale = tl.load(scale_ptr + m_c)
    shift = tl.load(shift_ptr + m_c)
    a_pre = s * scale[:, None] + shift[:, None]
    # padded pixels are 0: their activation relu(shift) may be inf or NaN, and every sum runs over pixels
    da = tl.where(p_mask[None, :], relu_backward(a_pre, dat), 0.0)
    sum_da = tl.sum(da, axis=1)  # before the dWc dot: s and dA are dead there
    sum_das = tl.sum(da * s, axis=1)
    a = tl.where(p_mask[None, :], relu(a_pre), 0.0)
    # a NaN of s reaches dWc's column through a (0 * NaN is NaN in the dot)
    dwct = _dot3_b(a, g[0], g[1], tl.zeros([BLOCK_M, KP], tl.float32))
    clean = True
    if not GATHER:
        clean = tl.sum(tl.sum(tl.where(dwct != dwct, 1, 0), axis=1), axis=0) == 0
    if clean:
        dwc_mask = m_mask[:, None] & (k < K)[None, :]
        dwc_at = rows + k[None, :] * M + m[:, None]
        dwct += tl.load(dwc_at, mask=dwc_mask & later, other=0.0)
        tl.store(dwc_at, dwct, mask=dwc_mask)
        sum_da += tl.load(rows + K * M + m, mask=m_mask & later, other=0.0)
        tl.store(rows + K * M + m, sum_da, mask=m_mask)
        sum_das += tl.load(rows + (K + 1) * M + m, mask=m_mask & later, other=0.0)
        tl.store(rows + (K + 1) * M + m, sum_das, mask=m_mask)
    else:
        redo = m0
    return redo


@triton.jit
def _reduce_tile(x0_ptr, x0_strides, C0, H, W, g_ptr, g_strides, K, t, lows, MODES: tl.constexpr,
                 ALIGNS: tl.constexpr, UEXACT: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr,
                 SRC: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
                 TRANSPOSED: tl.constexpr, C0P: tl.constexpr, C0Q: tl.constexpr, KP: tl.constexpr,
                 TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Tile t's pixels and the reduce's loop-invariant operands: x0, the gradient tile, the plans (`_tile_plans`),
    and whether its patches cover every tap. TRANSPOSED: as the transposed chunk's B operands, x0^T in parts
    (`_x0t_parts`), the gradient as (hi, lo) in both orientations; fp32 (row form): each split (hi, lo) once per
    tile (`_dot3_split`: Triton's own split held each in two register layouts, sm_90 W48 1,396 B of spills,
    1,481 us predicted; split once 1,000 B, 915 us; split per chunk 3,092 B)."""
    dtype: tl.constexpr = x0_ptr.dtype.element_ty
    tiles_per_image = tl.cdiv(H, TILE_H) * tl.cdiv(W, TILE_W)
    n = t // tiles_per_image
    _, _, p_mask, cy, cx = _tile_pixels(t % tiles_per_image, H, W, TILE_H, TILE_W)
    g = _load_grad_tile(g_ptr, g_strides, n, cy, cx, p_mask, K, INT64, KP, dtype)
    plans, covered = _tile_plans(n, cy, cx, lows, MODES, ALIGNS, PATCH_H, PATCH_W, SRC, False, F64, INT64, dtype)
    if TRANSPOSED:
        x0 = _x0t_parts(x0_ptr, n, cy, cx, p_mask, C0, x0_strides, INT64, C0Q)
        gs = _tf32_split(g)
        g = (gs, (tl.trans(gs[0]), tl.trans(gs[1])))
        plans = _transposed_plans(plans, MODES, UEXACT)
    else:
        x0 = _load_x0_tile(x0_ptr, n, cy, cx, p_mask, C0, x0_strides, INT64, C0P)
        if PRECISION == "tf32x3":
            x0 = _tf32_split(x0)
            g = _tf32_split(g)
            plans = _split_plans(plans, MODES, UEXACT)
    return n, p_mask, cy, cx, x0, g, plans, covered


@triton.jit
def _reduce_tile_chunk(x0, g, n, cy, cx, p_mask, m0, M, w0_ptr, w0_strides, C0, scale_ptr, shift_ptr, wc_ptr,
                       wc_strides, K, plans, lows, rows, later, redo, MODES: tl.constexpr, ALIGNS: tl.constexpr,
                       UEXACT: tl.constexpr, CL: tl.constexpr, GATHER: tl.constexpr, F64: tl.constexpr,
                       INT64: tl.constexpr, PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr, C0P: tl.constexpr,
                       KP: tl.constexpr, BLOCK_M: tl.constexpr):
    """One M chunk of a tile in its form (`_reduce_chunk_t` or `_reduce_chunk`, operands from `_reduce_tile`)."""
    if TRANSPOSED:
        redo = _reduce_chunk_t(x0, g[0], g[1], n, cy, cx, p_mask, m0, M, w0_ptr, w0_strides, C0, scale_ptr,
                               shift_ptr, wc_ptr, wc_strides, K, plans, lows, rows, later, redo, MODES, ALIGNS,
                               UEXACT, CL, GATHER, INT64, KP, BLOCK_M)
    else:
        dots: tl.constexpr = "tf32x3_split" if PRECISION == "tf32x3" else PRECISION
        redo = _reduce_chunk(x0, g, n, cy, cx, p_mask, m0, M, w0_ptr, w0_strides, C0, scale_ptr, shift_ptr, wc_ptr,
                             wc_strides, K, plans, lows, rows, later, redo, MODES, ALIGNS, UEXACT, CL, GATHER, F64,
                             INT64, dots, C0P, KP, BLOCK_M)
    return redo


@triton.jit
def _redo_pending(redo_ptr, split, SPLITS, TILES, M, VISITS: tl.constexpr):
    """Whether any of split's tiles (split, split + SPLITS, ...; VISITS >= their count, `_visits`) has an exact
    start under M (the dense launch's redo_ptr): one load, so an exact launch runs no loop trip on finite
    inputs."""
    v = split + SPLITS * tl.arange(0, VISITS)
    return tl.min(tl.load(redo_ptr + v, mask=v < TILES, other=M), axis=0) < M


@triton.jit
def _zero_rows(rows, m0, M, K, KP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Zeroes a split's rows [K + 2, M] (`_head_backward_reduce_kernel`) at channels m0 + [0, BLOCK_M)."""
    m = m0 + tl.arange(0, BLOCK_M)
    r = tl.arange(0, 2 * KP)  # K + 2 <= 2 KP (KP >= 16)
    tl.store(rows + r[:, None] * M + m[None, :], tl.zeros([2 * KP, BLOCK_M], rows.dtype.element_ty),
             mask=(r < K + 2)[:, None] & (m < M)[None, :])


@triton.jit
def _head_backward_reduce_kernel(
    x0_ptr, x0_strides, C0, H, W,
    w0_ptr, w0_strides, M, scale_ptr, shift_ptr,
    wc_ptr, wc_strides, K, g_ptr, g_strides, part_ptr, redo_ptr, SPLITS, TILES,
    lows, MODES: tl.constexpr, ALIGNS: tl.constexpr, UEXACT: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr,
    SRC: tl.constexpr, CL: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
    C0P: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    TRANSPOSED: tl.constexpr, C0Q: tl.constexpr, EXACT: tl.constexpr, VISITS: tl.constexpr,
):
    """Program `split` visits the forward's tiles split, split + SPLITS, ... (of the whole batch) and, per
    tile and M chunk, adds into its own rows part[split] = [dWc (K rows); sum_p dA; sum_p dA * s] ([K + 2, M],
    accumulation dtype), dA = ReLU'(a) Wc^T g the gradient at BN's output. Each program owns its rows and
    visits its tiles in a fixed order (the first overwrites them): deterministic, no atomics; the host sums
    the splits. Two launches (`head_backward_reduce`):
    - the patch dots (not EXACT): from the first chunk whose dWc holds NaN (or from 0 when a patch misses a
      tap) a tile commits nothing more (the split's first tile zeroes those rows) and stores that start
      (redo_ptr, [TILES] int32; M: nothing to redo);
    - EXACT: the tiles whose start is under M, their chunks from there with the exact gathers; on finite
      inputs one load of the split's starts (VISITS >= its tiles, a power of 2) and no loop trips.
    With the exact loop inside the tile's own iteration, the tile's values lived across the dense loop and
    spilled (fp32 transposed, sm_90 W48: 44 / 52 B of spill stores NCHW / channels_last, none in the loop);
    the dense launch alone is spill-free there."""
    split = tl.program_id(0)
    rows = part_ptr + split * (K + 2) * M
    if EXACT:
        if _redo_pending(redo_ptr, split, SPLITS, TILES, M, VISITS):
            for t in range(split, TILES, SPLITS):
                redo = tl.load(redo_ptr + t)
                if redo < M:
                    n, p_mask, cy, cx, x0, g, plans, _ = _reduce_tile(
                        x0_ptr, x0_strides, C0, H, W, g_ptr, g_strides, K, t, lows, MODES, ALIGNS, UEXACT, PATCH_H,
                        PATCH_W, SRC, F64, INT64, PRECISION, TRANSPOSED, C0P, C0Q, KP, TILE_H, TILE_W)
                    for m0 in range(redo, M, GATHER_M):
                        _reduce_tile_chunk(x0, g, n, cy, cx, p_mask, m0, M, w0_ptr, w0_strides, C0, scale_ptr,
                                           shift_ptr, wc_ptr, wc_strides, K, plans, lows, rows, True, redo, MODES,
                                           ALIGNS, UEXACT, CL, True, F64, INT64, PRECISION, TRANSPOSED, C0P, KP,
                                           GATHER_M)
    else:
        for t in range(split, TILES, SPLITS):
            n, p_mask, cy, cx, x0, g, plans, covered = _reduce_tile(
                x0_ptr, x0_strides, C0, H, W, g_ptr, g_strides, K, t, lows, MODES, ALIGNS, UEXACT, PATCH_H, PATCH_W,
                SRC, F64, INT64, PRECISION, TRANSPOSED, C0P, C0Q, KP, TILE_H, TILE_W)
            later = t != split  # the first tile overwrites the rows: no zero fill
            redo = tl.where(covered == 0, 0, M)
            for m0 in range(0, M, BLOCK_M):
                if m0 < redo:
                    redo = _reduce_tile_chunk(x0, g, n, cy, cx, p_mask, m0, M, w0_ptr, w0_strides, C0, scale_ptr,
                                              shift_ptr, wc_ptr, wc_strides, K, plans, lows, rows, later, redo,
                                              MODES, ALIGNS, UEXACT, CL, False, F64, INT64, PRECISION, TRANSPOSED,
                                              C0P, KP, BLOCK_M)
                if (m0 >= redo) & (not later):  # rows the exact launch adds into
                    _zero_rows(rows, m0, M, K, KP, BLOCK_M)
            tl.store(redo_ptr + t, redo)


# the exact adjoint's flag of a non-finite value (and the code of a tap of weight 0): any count this large is NaN
NAN_FLAG = tl.constexpr(1048576.0)  # 2^20


@triton.jit
def _tap_codes(l0, l1, MODE: tl.constexpr):
    """Per output index, the codes of its two taps along one axis: 1 for nonzero weight, NAN_FLAG for weight 0
    (ATen's backward adds 0 x gradient there: NaN from a non-finite one); nearest has one tap."""
    c0 = tl.where(l0 != 0.0, 1.0, NAN_FLAG)
    if MODE == 1:
        return c0, c0 * 0.0
    return c0, tl.where(l1 != 0.0, 1.0, NAN_FLAG)


@triton.jit
def _patch_codes(oy, ox, src, q, MODE: tl.constexpr, ALIGN: tl.constexpr, PATCH_H: tl.constexpr,
                 PATCH_W: tl.constexpr, F64: tl.constexpr, DTYPE: tl.constexpr):
    """[pixels, SRC] `_patch_plan`'s U with every tap weight replaced by its code (`_tap_codes`), in DTYPE: a
    product of 1s (at most 2 x 2 where taps coincide on a source edge) where every factor has nonzero weight,
    at least NAN_FLAG where one has weight 0 (also where coinciding taps add a zero weight to a nonzero one,
    as ATen's backward does), else 0."""
    _, h, w, _, ratio_h, ratio_w = src
    y0, y1, ly0, ly1 = _axis_taps(oy, h, ratio_h, MODE, ALIGN, F64)
    x0, x1, lx0, lx1 = _axis_taps(ox, w, ratio_w, MODE, ALIGN, F64)
    cy0, cy1 = _tap_codes(ly0, ly1, MODE)
    cx0, cx1 = _tap_codes(lx0, lx1, MODE)
    codes = (_axis_weights(q // PATCH_W, tl.min(y0, axis=0), y0, y1, cy0, cy1)
             * _axis_weights(q % PATCH_W, tl.min(x0, axis=0), x0, x1, cx0, cx1))
    return tl.where((q < PATCH_H * PATCH_W)[None, :], codes, 0.0).to(DTYPE)


@triton.jit
def _exact_adjoint(u, codes, ds, PRECISION: tl.constexpr):
    """U^T ds [SRC, BLOCK_M] with ATen's non-finite semantics: each pixel adds weight x gradient to its taps only
    (the dense dot would add 0 x NaN from every other pixel), so NaN reaches a source pixel from a NaN tap, or
    a non-finite one of weight 0; +inf and -inf from taps of nonzero weight (both: NaN). One dot counts them:
    `_patch_codes` (1 at a tap of nonzero weight, NAN_FLAG or its square at one of weight 0) times per pixel
    +inf 1, -inf 2^10, NaN NAN_FLAG: below NAN_FLAG the count is exact (a pixel adds at most 4 to a source
    pixel, where its taps coincide on both axes: under 1,024 per kind for tiles under 256 pixels, integers below
    2^20), and it is at least NAN_FLAG exactly where a NaN arrives (rounding of the large terms never takes a
    sum below it). In bf16, fp64, or for fp16 (which has no 2^20) one tf32 pass (exact for these values)."""
    acc_t: tl.constexpr = ds.dtype
    dtype: tl.constexpr = u.dtype
    flag_precision: tl.constexpr = "ieee" if acc_t == tl.float64 else "tf32"
    finite = (ds - ds) == 0.0
    part = tl.dot(tl.trans(u), tl.where(finite, ds, 0.0).to(dtype), out_dtype=acc_t, input_precision=PRECISION)
    flags = tl.where(ds != ds, NAN_FLAG,
                     tl.where(ds == float("inf"), 1.0, tl.where(ds == float("-inf"), 1024.0, 0.0)))
    counts = tl.dot(tl.trans(codes), flags.to(codes.dtype), out_dtype=acc_t, input_precision=flag_precision)
    neg = tl.floor(counts / 1024.0)
    pos = counts - neg * 1024.0
    nan = (counts >= NAN_FLAG) | ((pos > 0.0) & (neg > 0.0))
    part = tl.where(pos > 0.0, float("inf"), tl.where(neg > 0.0, float("-inf"), part))
    return tl.where(nan, float("nan"), part)


@triton.jit
def _grads_chunk(x0, g, t, n, oy, ox, cy, cx, p_mask, m0, M, w0_ptr, w0_strides, C0, scale_ptr, shift_ptr,
                 alpha_ptr, beta_ptr, wc_ptr, wc_strides, K, plans, lows, outs, dx0, rows, later, covered, redo,
                 MODES: tl.constexpr, ALIGNS: tl.constexpr, UEXACT: tl.constexpr, PATCH_H: tl.constexpr,
                 PATCH_W: tl.constexpr,
                 SRC: tl.constexpr, CL: tl.constexpr, GATHER: tl.constexpr, BATCH_STATS: tl.constexpr,
                 F64: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr, C0P: tl.constexpr,
                 KP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Channels m0 + [0, BLOCK_M) of tile t: ds = dA * scale (+ alpha + beta * s) on the tile, never stored;
    returns (dx0 + ds W0[m], redo), having added ds^T x0 into the split's dW0 rows and stored the tile's patch
    partials U_j^T ds (a same-size branch: ds itself, its gradient). The patch dots (not GATHER) commit nothing
    where s or ds holds a non-finite value (the dense U spreads it over the tile: `_head_stats_kernel`) and
    return the chunk's start as where the exact pass resumes; else `redo` comes back unchanged. The exact
    gathers (GATHER) run for every chunk of the tile (dx0) and commit from `redo` on (the dense pass committed
    the chunks before it)."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    dtype: tl.constexpr = x0.dtype
    flag_t: tl.constexpr = tl.float32 if dtype == tl.float16 else dtype  # fp16 has no NAN_FLAG
    m = m0 + tl.arange(0, BLOCK_M)
    m_mask = m < M
    m_c = tl.minimum(m, M - 1)
    s, ds = _pre_bn_grad(x0, g, n, cy, cx, p_mask, m, m_mask, m_c, w0_ptr, w0_strides, C0, scale_ptr, shift_ptr,
                         alpha_ptr, beta_ptr, wc_ptr, wc_strides, K, plans, lows, MODES, ALIGNS, UEXACT, CL, GATHER,
                         BATCH_STATS, F64, INT64, PRECISION, C0P, KP)
    # padded pixels and channels are 0: every dot below sums over pixels or channels
    ds = tl.where(p_mask[:, None] & m_mask[None, :], ds, 0.0)
    clean = True
    commit = True
    if GATHER:
        commit = m0 >= redo
    else:
        clean = tl.sum(tl.sum(s * 0.0 + ds * 0.0, axis=1), axis=0) == 0.0  # inf * 0 and NaN * 0 are NaN
    if clean:
        # the gradients multiply ds in the input dtype, as eager's GEMMs and upsample backward read it
        dsd = ds.to(dtype)
        c = tl.arange(0, C0P)
        c_mask = c < C0
        w0t = tl.load(w0_ptr + m_c[:, None] * w0_strides[0] + c[None, :] * w0_strides[1], mask=c_mask[None, :],
                      other=0.0)
        dx0 = tl.dot(dsd, w0t, acc=dx0, out_dtype=acc_t, input_precision=PRECISION)
        dw0 = tl.dot(tl.trans(dsd), x0, out_dtype=acc_t, input_precision=PRECISION)
        dw0_at = rows + m[:, None] * C0 + c[None, :]
        dw0_mask = m_mask[:, None] & c_mask[None, :] & commit
        dw0 += tl.load(dw0_at, mask=dw0_mask & later, other=0.0)
        tl.store(dw0_at, dw0, mask=dw0_mask)
        for j in tl.static_range(len(lows)):
            out_ptr, out_strides = outs[j]
            if MODES[j] == 0:
                tl.store(out_ptr + _offsets(n, m, oy, ox, out_strides, INT64), dsd.to(out_ptr.dtype.element_ty),
                         mask=p_mask[:, None] & m_mask[None, :] & commit)
            else:
                u, _ = plans[j]
                if GATHER:
                    codes = _patch_codes(cy, cx, lows[j], tl.arange(0, SRC[j]), MODES[j], ALIGNS[j], PATCH_H[j],
                                         PATCH_W[j], F64, flag_t)
                    part = _exact_adjoint(u, codes, ds, PRECISION)
                    # a patch missing a tap (unreachable with the host's bound) cannot hold the tile's sum: NaN
                    # partials, a visible failure rather than a wrong gradient
                    part = tl.where(covered != 0, part, float("nan"))
                else:
                    part = tl.dot(tl.trans(u), dsd, out_dtype=acc_t, input_precision=PRECISION)
                q = tl.arange(0, SRC[j])
                at = t * (PATCH_H[j] * PATCH_W[j]) + q
                if INT64:
                    at = at.to(tl.int64)
                tl.store(out_ptr + (at[:, None] * M + m[None, :]), part.to(out_ptr.dtype.element_ty),
                         mask=(q < PATCH_H[j] * PATCH_W[j])[:, None] & m_mask[None, :] & commit)
    else:
        redo = m0
    return dx0, redo


@triton.jit
def _store_origins(origin_ptr, n, pid, tiles_w, TILES_H, TILES_W, cy, cx, lows, MODES: tl.constexpr,
                   ALIGNS: tl.constexpr, F64: tl.constexpr):
    """The first image's first tile column stores each tile row's patch origin (the first source row it reads,
    as `_patch_plan` finds it), its first tile row each column's: the gather's map from a source pixel to the
    patches that hold it (bitwise this kernel's arithmetic)."""
    for j in tl.static_range(len(lows)):
        if MODES[j] != 0:
            src = lows[j]
            base = origin_ptr + j * (TILES_H + TILES_W)
            if (n == 0) & (pid % tiles_w == 0):
                rows = _axis_taps(cy, src[1], src[4], MODES[j], ALIGNS[j], F64)
                tl.store(base + pid // tiles_w, tl.min(rows[0], axis=0))
            if (n == 0) & (pid < tiles_w):
                cols = _axis_taps(cx, src[2], src[5], MODES[j], ALIGNS[j], F64)
                tl.store(base + TILES_H + pid, tl.min(cols[0], axis=0))


@triton.jit
def _ds_chunk(x0, g, n, oy, ox, cy, cx, p_mask, m0, M, w0_ptr, w0_strides, C0, scale_ptr, shift_ptr, alpha_ptr,
              beta_ptr, wc_ptr, wc_strides, K, plans, lows, ds_ptr, ds_strides, MODES: tl.constexpr,
              ALIGNS: tl.constexpr, UEXACT: tl.constexpr, CL: tl.constexpr, GATHER: tl.constexpr,
              BATCH_STATS: tl.constexpr,
              F64: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr, C0P: tl.constexpr, KP: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """Stores ds for channels m0 + [0, BLOCK_M) of the tile; returns s summed over the chunk (the NaN probe)."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    m = m0 + tl.arange(0, BLOCK_M)
    m_mask = m < M
    m_c = tl.minimum(m, M - 1)
    s, ds = _pre_bn_grad(x0, g, n, cy, cx, p_mask, m, m_mask, m_c, w0_ptr, w0_strides, C0, scale_ptr, shift_ptr,
                         alpha_ptr, beta_ptr, wc_ptr, wc_strides, K, plans, lows, MODES, ALIGNS, UEXACT, CL, GATHER,
                         BATCH_STATS, F64, INT64, PRECISION, C0P, KP)
    tl.store(ds_ptr + _offsets(n, m, oy, ox, ds_strides, INT64), ds.to(ds_ptr.dtype.element_ty),
             mask=p_mask[:, None] & m_mask[None, :])
    return tl.sum(s, axis=1)


@triton.jit
def _ds_tile(x0_ptr, x0_strides, C0, H, W, w0_ptr, w0_strides, M, scale_ptr, shift_ptr, alpha_ptr, beta_ptr,
             wc_ptr, wc_strides, K, g_ptr, g_strides, redo_ptr, t, redo, lows, outs, MODES: tl.constexpr,
             ALIGNS: tl.constexpr, UEXACT: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr,
             SRC: tl.constexpr, CL: tl.constexpr, BATCH_STATS: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr,
             PRECISION: tl.constexpr, C0P: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr,
             TILE_H: tl.constexpr, TILE_W: tl.constexpr, EXACT: tl.constexpr):
    """ds of tile t (of the whole batch) stored in outs[0]: every chunk through the patch dots, then where the
    exact gathers must start stored at redo_ptr + t; EXACT: the chunks from `redo` with the exact gathers."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    tiles_per_image = tl.cdiv(H, TILE_H) * tl.cdiv(W, TILE_W)
    n = t // tiles_per_image
    oy, ox, p_mask, cy, cx = _tile_pixels(t % tiles_per_image, H, W, TILE_H, TILE_W)
    x0 = _load_x0_tile(x0_ptr, n, cy, cx, p_mask, C0, x0_strides, INT64, C0P)
    g = _load_grad_tile(g_ptr, g_strides, n, cy, cx, p_mask, K, INT64, KP, x0_ptr.dtype.element_ty)
    plans, covered = _tile_plans(n, cy, cx, lows, MODES, ALIGNS, PATCH_H, PATCH_W, SRC, False, F64, INT64,
                                 x0_ptr.dtype.element_ty)
    ds_ptr, ds_strides = outs[0]
    if EXACT:
        for m0 in range(redo, M, BLOCK_M):
            _ds_chunk(x0, g, n, oy, ox, cy, cx, p_mask, m0, M, w0_ptr, w0_strides, C0, scale_ptr, shift_ptr,
                      alpha_ptr, beta_ptr, wc_ptr, wc_strides, K, plans, lows, ds_ptr, ds_strides, MODES, ALIGNS,
                      UEXACT, CL, True, BATCH_STATS, F64, INT64, PRECISION, C0P, KP, BLOCK_M)
    else:
        # NaN from the start where a patch misses a tap: nothing but the probe lives across the chunk loop
        probe = tl.zeros([TILE_H * TILE_W], acc_t) + tl.where(covered == 0, float("nan"), 0.0)
        for m0 in range(0, M, BLOCK_M):
            probe += _ds_chunk(x0, g, n, oy, ox, cy, cx, p_mask, m0, M, w0_ptr, w0_strides, C0, scale_ptr,
                               shift_ptr, alpha_ptr, beta_ptr, wc_ptr, wc_strides, K, plans, lows, ds_ptr,
                               ds_strides, MODES, ALIGNS, UEXACT, CL, False, BATCH_STATS, F64, INT64, PRECISION,
                               C0P, KP, BLOCK_M)
        tl.store(redo_ptr + t, _redo_from(probe, 1, M))


@triton.jit
def _head_backward_ds_kernel(
    x0_ptr, x0_strides, C0, H, W,
    w0_ptr, w0_strides, M, scale_ptr, shift_ptr, alpha_ptr, beta_ptr,
    wc_ptr, wc_strides, K, g_ptr, g_strides, dx0_ptr, dx0_strides, dw0_ptr, origin_ptr, redo_ptr, SPLITS, TILES,
    lows, outs, MODES: tl.constexpr, ALIGNS: tl.constexpr, UEXACT: tl.constexpr, PATCH_H: tl.constexpr,
    PATCH_W: tl.constexpr,
    SRC: tl.constexpr, CL: tl.constexpr, BATCH_STATS: tl.constexpr, FUSED: tl.constexpr, F64: tl.constexpr,
    INT64: tl.constexpr, PRECISION: tl.constexpr, C0P: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, EXACT: tl.constexpr, VISITS: tl.constexpr,
):
    """The head's input gradients from ds = dA * scale (+ alpha + beta * s with batch statistics), the gradient
    of the pre-BN activation. Program `split` visits the forward's tiles split, split + SPLITS, ... of the
    whole batch and per tile and M chunk recomputes the ds chunk. FUSED (bf16 / fp64), ds is not written:
    - dx0 = W0^T ds accumulates over the chunks in registers, stored once per tile;
    - dW0 = ds x0^T adds into the split's own [M, C0] rows (the first tile overwrites them; the host sums the
      splits in order: deterministic, no atomics);
    - per upsampled branch the tile's patch partial U_j^T ds (the transpose of the forward's patch dot) is
      stored, [PATCH_H * PATCH_W, M] per tile, summed by `_head_patch_gather_kernel`; a same-size branch's
      gradient, ds itself, is stored as is.
    Else (fp32, whose 3xTF32 dots triple every operand: the fused chunk spills kilobytes) ds is stored, [N, M,
    H, W] in outs[0], for the op's GEMMs and the fusion op's adjoint, in two launches: the patch dots store
    ds and per tile where the exact gathers must start (redo_ptr; M: nowhere), one tile per program, then
    (EXACT, over SPLITS programs as the fused form's) those tiles' chunks again from there with the exact
    gathers (as the backward reduce's launches: with the exact loop after the dense one, a tile value lived
    across the dense loop and spilled, fp32 sm_90 W48: 8 B).
    From the first chunk whose s or ds holds a non-finite value (or from 0 when a patch misses a tap) a tile
    commits nothing more; its start is stored per tile (redo_ptr, [N * tiles] int32) and a second pass over the
    split's tiles (same loop, v >= visits) recomputes such a tile's every chunk with the exact gathers and the
    exact adjoint (dx0, stored by that pass only) and commits dW0 and the partials from there (the first pass
    zeroed the first tile's rows it left): no work on finite inputs. With the exact loop inside the tile's own
    iteration, its operands and the dense chunk's were live together and spilled (sm_90 W48 bf16: 228 B); each
    pass alone fits. The host's patch bound for this kernel holds every tap (`_backward_patch_extent`); a tile
    it would miss stores NaN partials, never a wrong sum."""
    tl.static_assert(TILE_H * TILE_W < 256)  # `_exact_adjoint`'s flag counts
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    dtype: tl.constexpr = x0_ptr.dtype.element_ty
    if not FUSED:  # ds stored; two launches, as the backward reduce's
        if EXACT:  # program `split` redoes its tiles split, split + SPLITS, ... that held NaN, if any
            split = tl.program_id(0)
            if _redo_pending(redo_ptr, split, SPLITS, TILES, M, VISITS):
                for t in range(split, TILES, SPLITS):
                    redo = tl.load(redo_ptr + t)
                    if redo < M:
                        _ds_tile(x0_ptr, x0_strides, C0, H, W, w0_ptr, w0_strides, M, scale_ptr, shift_ptr,
                                 alpha_ptr, beta_ptr, wc_ptr, wc_strides, K, g_ptr, g_strides, redo_ptr, t, redo,
                                 lows, outs, MODES, ALIGNS, UEXACT, PATCH_H, PATCH_W, SRC, CL, BATCH_STATS, F64,
                                 INT64, PRECISION, C0P, KP, GATHER_M, TILE_H, TILE_W, True)
        else:  # one tile per program (grid: tiles, N)
            _ds_tile(x0_ptr, x0_strides, C0, H, W, w0_ptr, w0_strides, M, scale_ptr, shift_ptr, alpha_ptr, beta_ptr,
                     wc_ptr, wc_strides, K, g_ptr, g_strides, redo_ptr,
                     tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), 0, lows, outs, MODES, ALIGNS, UEXACT,
                     PATCH_H, PATCH_W, SRC, CL, BATCH_STATS, F64, INT64, PRECISION, C0P, KP, BLOCK_M, TILE_H,
                     TILE_W, False)
    else:
        tiles_w = tl.cdiv(W, TILE_W)
        tiles_h = tl.cdiv(H, TILE_H)
        tiles_per_image = tiles_h * tiles_w
        split = tl.program_id(0)
        rows = dw0_ptr + split * M * C0
        visits = tl.cdiv(TILES - split, SPLITS)
        c = tl.arange(0, C0P)
        # two passes over the split's tiles: the patch dots (first), then the exact gathers for the tiles whose
        # dense chunk held a non-finite value (second; nothing of the first pass is live there, which keeps
        # both spill-free)
        for v in range(0, 2 * visits):
            t = split + (v % visits) * SPLITS
            dense = v < visits
            redo = M
            if not dense:
                tl.debug_barrier()  # the dense pass's stores (redo, the rows) by other threads: visible after it
                redo = tl.load(redo_ptr + t)
            if dense | (redo < M):
                n = t // tiles_per_image
                pid = t % tiles_per_image
                oy, ox, p_mask, cy, cx = _tile_pixels(pid, H, W, TILE_H, TILE_W)
                dx0 = tl.zeros([TILE_H * TILE_W, C0P], dtype=acc_t)
                if dense:
                    x0 = _load_x0_tile(x0_ptr, n, cy, cx, p_mask, C0, x0_strides, INT64, C0P)
                    g = _load_grad_tile(g_ptr, g_strides, n, cy, cx, p_mask, K, INT64, KP, dtype)
                    plans, covered = _tile_plans(n, cy, cx, lows, MODES, ALIGNS, PATCH_H, PATCH_W, SRC, False, F64,
                                                 INT64, dtype)
                    _store_origins(origin_ptr, n, pid, tiles_w, tiles_h, tiles_w, cy, cx, lows, MODES, ALIGNS, F64)
                    later = t != split  # the first tile overwrites the split's dW0 rows: no zero fill
                    redo = tl.where(covered == 0, 0, M)
                    for m0 in range(0, M, BLOCK_M):
                        if m0 < redo:
                            dx0, redo = _grads_chunk(x0, g, t, n, oy, ox, cy, cx, p_mask, m0, M, w0_ptr, w0_strides,
                                                     C0, scale_ptr, shift_ptr, alpha_ptr, beta_ptr, wc_ptr,
                                                     wc_strides, K, plans, lows, outs, dx0, rows, later, covered,
                                                     redo, MODES, ALIGNS, UEXACT, PATCH_H, PATCH_W, SRC, CL, False,
                                                     BATCH_STATS, F64, INT64, PRECISION, C0P, KP, BLOCK_M)
                        if (m0 >= redo) & (not later):  # rows the exact pass adds into
                            m = m0 + tl.arange(0, BLOCK_M)
                            tl.store(rows + m[:, None] * C0 + c[None, :], tl.zeros([BLOCK_M, C0P], dtype=acc_t),
                                     mask=(m < M)[:, None] & (c < C0)[None, :])
                    tl.store(redo_ptr + t, redo)
                else:
                    x0 = _load_x0_tile(x0_ptr, n, cy, cx, p_mask, C0, x0_strides, INT64, C0P)
                    g = _load_grad_tile(g_ptr, g_strides, n, cy, cx, p_mask, K, INT64, KP, dtype)
                    plans, covered = _tile_plans(n, cy, cx, lows, MODES, ALIGNS, PATCH_H, PATCH_W, SRC, False, F64,
                                                 INT64, dtype)
                    for m0 in range(0, M, GATHER_M):
                        dx0, _ = _grads_chunk(x0, g, t, n, oy, ox, cy, cx, p_mask, m0, M, w0_ptr, w0_strides, C0,
                                              scale_ptr, shift_ptr, alpha_ptr, beta_ptr, wc_ptr, wc_strides, K, plans,
                                              lows, outs, dx0, rows, True, covered, redo, MODES, ALIGNS, UEXACT,
                                              PATCH_H,
                                              PATCH_W, SRC, CL, True, BATCH_STATS, F64, INT64, PRECISION, C0P, KP,
                                              GATHER_M)
                # the pixels again (redo // (M + 1) is 0): recomputed rather than held over the chunk loops
                oy, ox, p_mask, _, _ = _tile_pixels(pid + redo // (M + 1), H, W, TILE_H, TILE_W)
                # a tile the exact pass redoes stores its dx0 there only
                tl.store(dx0_ptr + _offsets(n, c, oy, ox, dx0_strides, INT64), dx0.to(dx0_ptr.dtype.element_ty),
                         mask=p_mask[:, None] & (c < C0)[None, :] & ((redo == M) | (not dense)))


@triton.jit
def _last_origin_at_or_before(origin_ptr, v, count, LOG: tl.constexpr):
    """Per v, the last index i < count whose origin (non-decreasing in i) is <= v (0 where none is: the caller
    checks), by bisection."""
    lo = tl.zeros(v.shape, tl.int32)
    hi = tl.zeros(v.shape, tl.int32) + (count - 1)
    for _ in tl.static_range(LOG):
        mid = (lo + hi + 1) // 2
        ok = tl.load(origin_ptr + mid) <= v
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _head_patch_gather_kernel(
    part_ptr, origin_ptr, out_ptr, out_strides, M, h, w, TILES_H, TILES_W,
    PATCH_H: tl.constexpr, PATCH_W: tl.constexpr, NA: tl.constexpr, NB: tl.constexpr, LOG_H: tl.constexpr,
    LOG_W: tl.constexpr, INT64: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dP [N, M, h, w] of one upsampled branch: per source pixel, the sum of the patch partials of the (at most
    NA x NB) tiles whose patch holds it, in a fixed order (tile rows, then columns, from the last): deterministic,
    no atomics. The tiles are found from the patch origins `_head_backward_ds_kernel` stored."""
    acc_t: tl.constexpr = tl.float64 if part_ptr.dtype.element_ty == tl.float64 else tl.float32
    n = tl.program_id(2)
    blocks_w = tl.cdiv(w, BLOCK_X)
    p = tl.arange(0, BLOCK_Y * BLOCK_X)
    y = (tl.program_id(0) // blocks_w) * BLOCK_Y + p // BLOCK_X
    x = (tl.program_id(0) % blocks_w) * BLOCK_X + p % BLOCK_X
    p_mask = (y < h) & (x < w)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    rows0 = origin_ptr
    cols0 = origin_ptr + TILES_H
    last_a = _last_origin_at_or_before(rows0, y, TILES_H, LOG_H)
    last_b = _last_origin_at_or_before(cols0, x, TILES_W, LOG_W)
    acc = tl.zeros([BLOCK_Y * BLOCK_X, BLOCK_M], dtype=acc_t)
    for da in tl.static_range(NA):
        a = last_a - da
        row0 = tl.load(rows0 + tl.maximum(a, 0))
        in_a = (a >= 0) & (row0 <= y) & (y - row0 < PATCH_H) & p_mask
        for db in tl.static_range(NB):
            b = last_b - db
            col0 = tl.load(cols0 + tl.maximum(b, 0))
            valid = in_a & (b >= 0) & (col0 <= x) & (x - col0 < PATCH_W)
            at = ((n * TILES_H + a) * TILES_W + b) * (PATCH_H * PATCH_W) + (y - row0) * PATCH_W + (x - col0)
            if INT64:
                at = at.to(tl.int64)
            v = tl.load(part_ptr + (at[:, None] * M + m[None, :]), mask=valid[:, None] & m_mask[None, :], other=0.0)
            acc += v.to(acc_t)
    tl.store(out_ptr + _offsets(n, m, y, x, out_strides, INT64), acc.to(out_ptr.dtype.element_ty),
             mask=p_mask[:, None] & m_mask[None, :])


# ------------------------------------------------------------------------------------------------ launchers


class HeadTensors(NamedTuple):
    """Tensors of one head call; weights are 2-D ([M, C0], [K, M]) in x0's dtype."""

    x0: Tensor
    lows: Sequence[Tensor]  # P_j = W_j x_j, [N, M, h_j, w_j]
    w0: Tensor
    wc: Tensor
    bc: Optional[Tensor]


def _precision(dtype: torch.dtype) -> str:
    # fp32 must not silently become tf32 (the 1e-5 contract); low precision uses tensor cores anyway
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _blocks(t: HeadTensors) -> dict:
    """The padded channel counts, and the M chunk the tile configurations start from (`_forward_tile`)."""
    C0, M, K = t.x0.shape[1], t.w0.shape[0], t.wc.shape[0]
    return dict(C0P=max(16, next_power_of_2(C0)), KP=max(16, next_power_of_2(K)),
                BLOCK_M=min(64, max(16, next_power_of_2(M))))


class ForwardTile(NamedTuple):
    """The forward's configuration: output tile, M chunk, pipeline stages, and per low branch the source patch
    (PATCH_H x PATCH_W, padded to SRC >= 16 for the dot) its tile reads."""

    tile_h: int
    tile_w: int
    block_m: int
    num_stages: int
    num_warps: int
    patch_h: Tuple[int, ...]
    patch_w: Tuple[int, ...]
    src: Tuple[int, ...]
    transposed: bool = False  # fp32 backward reduce: the transposed chunk (`_reduce_chunk_t`)


# A candidate's optional sixth entry is a device class: the least shared memory per block (opt-in) of the devices
# it is taken on. The launchers learn the target only through `device_limits` (a GPU's own figure at launch,
# the instrument's `assume` per target: the very figure it records each architecture by, nothing queried at
# import), and that figure tells the classes apart: 232,448 B on sm_90 (H100, H200), 166,912 B on sm_80 (A100),
# 101,376 B on sm_86 / sm_89. Registers per thread are the same (255) everywhere, but ptxas allocates them
# differently for mma.sync (sm_80) and wgmma (sm_90): some configurations spill only on sm_80. Without limits
# (the interpreter, meta tensors without `assume`) the first candidate runs, whatever its class.
SM90_SHARED = 232_448
# a statistics or backward-reduce candidate's optional seventh entry: fp32's transposed chunk (`_reduce_chunk_t`)
TRANSPOSED = "transposed"

# Per element size, in order of preference (tile_h, tile_w, block_m, num_stages, num_warps[, device class]).
# fp16/bf16: 8x16 pixels (a 128-row dot; patches of 6x10 / 4x6 / 3x4 for 2x / 4x / 8x bilinear) over 32-channel
# chunks, two stages (sm_90, W48: 72 us NCHW / 56 us channels_last against 69 / 47 with 64-channel chunks, which
# spill on sm_80). fp32 (3xTF32 dots, three times the operands): 8x8 pixels (with `_dot3`'s hand split, sm_90
# W48: 0 B spills at 2 stages, 278.8 us predicted at 1024x2048; 1 stage also 0 B, 16-channel chunks spill; W18
# spills 56-224 B on both archs: 1 stage 0-152 B, 4x8 tiles 0-40 B outside the loop but 798 us for W48 on sm_90,
# 2.9x slower). Then fewer stages and smaller tiles for smaller devices.
_FORWARD_CANDIDATES = {
    2: ((8, 16, 32, 2, 4), (8, 16, 32, 1, 4), (8, 8, 32, 1, 4), (4, 4, 16, 1, 4)),
    4: ((8, 8, 32, 2, 4), (8, 8, 32, 1, 4), (8, 8, 16, 1, 4), (4, 4, 16, 1, 4)),
    8: ((8, 8, 16, 1, 4), (4, 4, 16, 1, 4)),
}


# The backward kernels hold the logits' gradient tile and two more dot results per chunk. bf16 / fp16: the reduce
# takes the forward's 4 warps on 16-channel chunks, spill-free on sm_80 and sm_90 at W48 since the exact gathers
# run in a launch of their own (`_head_backward_reduce_kernel`; sm_90 W18 NCHW 8 B): predicted W48 bf16 sm_90
# 413.4 / 377.5 -> 295.5 / 272.3 us NCHW / channels_last, sm_80 676.1 -> 437.8 us NCHW (with the exact loop in
# the tile, 4 warps spilled: sm_90 164 B, and the reduce took 8 warps; 32-channel chunks now: 264.1 us but
# 4 B of spills at W48 NCHW, 60-68 B at W18). The fused ds kernel also holds the dx0
# accumulator [pixels, C0P] and the exact adjoint's code: 8 warps, 32 channels (sm_90 W48, predicted 427 us, no
# spills, with the exact gathers in a second pass over the tiles and one flag dot; before: 412 us with 228 B
# spills; 16 channels 697 us, 128 B; 4 warps spill kilobytes). sm_80 still spills 120-272 B, 11-22 spill
# instructions per dense chunk; Triton 3.8, W18 / W48 at 512x1024: 16-channel chunks 0-36 B there (sm_90: 4-12 B,
# W48 no longer spill-free) at 876 us against 710 us for W48 on sm_80; 8x8 tiles spill more (sm_80 20-400 B).
# The statistics kernel takes 16-channel chunks: the forward's 32 spilled 4-24 B in the loop (bf16 sm_80 and
# sm_90 W18; fp16 sm_90 W48 96 B), 16 are spill-free for bf16 and fp16 on both (W48 bf16: sm_90 160.0 -> 179.1
# us NCHW, 140.7 -> 160.4 channels_last; sm_80 250.3 -> 258.6; 8 warps spill-free too but 241 us). The reduce
# kept 32-channel chunks on sm_90 at 8 warps (413.4 us; 16 channels 467.3), 16 on the devices of less shared
# memory (sm_80: 4-84 B at 32 channels, none at 16: 616.9 -> 676.1 us W48), before the exact launch.
# fp32 (before the hand split of `_dot3`, which took stats and ds to sm_90 W48 8 / 88 B) spilled in every
# configuration tried (sm_90: the forward's 8x8 / 32 channels / 4 warps is fastest: reduce 1,481 us against
# 2,857 with 8 warps and 2,001 with 16-channel chunks; ds (writing ds, `_FUSED_DTYPES`) 645 us against 764 with
# 16-channel chunks and 1,816 with 4x8 tiles). The fp32 reduce holds its loop-invariant dot operands (x0, the
# U_j, the gradient tile and its transpose) in registers: with Triton's 3xTF32 split each in two layouts (sm_90
# W48 1,396 B of spill stores, 1,481 us predicted at 512x1024 b8), split by hand once per tile (`_dot3_split`,
# taken) as (hi, lo) pairs: 832 B, 916 us (sm_80 1,196 -> 1,080 B, 2,811 -> 2,101 us). Tried with Triton's
# split on sm_90 W48 (B of spill stores): 4x8 tiles 656, 16-channel chunks 732, 1 stage 1,376, 8 warps 1,364,
# 4x16 tiles 1,504, the gradient tile reloaded per chunk 1,476, the hand split per chunk for s 2,644 (for every
# dot 3,092), dWc in its own chunk loop 1,728; without the dWc dot 632, without the dA dot 1,196. Spill-free
# needs those operands out of the registers: on sm_90 the reduce takes the transposed chunk (`_reduce_chunk_t`, the
# candidate tagged TRANSPOSED): s^T = W0[m] x0^T + patch^T U^T, dA^T = Wc[:, m]^T g^T, dWc^T = a^T g, so x0^T,
# the U_j^T, g and g^T are wgmma's B operands, which Triton keeps in shared memory (each local_alloc hoisted
# out of the chunk loop: TTGIR checked, every wgmma of the loop reads a B allocated outside it). wgmma takes 64
# rows per warpgroup: 64-channel chunks. What stays in registers is a 64-bit shared-memory descriptor per B
# operand and k-step (8x8 tiles: 52, 104 registers), hence small tiles; x0's dot covers C0 rounded up to 16
# (C0Q: 48 at W48, not C0P's 64), in 32-channel parts. sm_90 W48 (B of spill stores NCHW / channels_last,
# predicted us NCHW / channels_last; the transposed SASS has 4 loops, the instrument's trip table 3: issue
# counted by hand, trips [chunks x tiles, 0, tiles, tiles] per program): 8x8 tiles 364 / 396 B, 685 / 650 us;
# **4x8 (taken)** 44 / 52 B, 885 / 849 us (row form: 796 / 660 B, 902 / 854 us), W18 116 / 48 B, 388 / 398 us
# (744 / 748 B, 390 / 395 us); 4x4 spill-free (W48 and W18) but 1,355 / 1,312 us, 1.5x the row form: the
# per-chunk W0 / Wc loads and splits repeat per tile (1,507 SASS per 16-pixel chunk). Since the exact gathers
# run in a launch of their own: 4x8 W48 spill-free, 863.8 / 833.5 us (+ 4.5 us for that launch), W18 0 / 152 B,
# 405.5 / 423.9 us; 8x8 still spills (144-520 B). Before C0Q: 8x8, 2 stages
# 440 / 476 B; 1 stage 264 / 268; 8 warps 772 / 684; 4x4 0 / 8. Spill-free at the row form's time needs fewer
# per-chunk instructions (e.g. W0 and Wc split once on the host) or fewer descriptors.
# sm_80 keeps the row form (mma.sync holds even B in registers: the transposed chunk at 8x8 / 32 spilled
# 3,156 B there): W48 804 / 796 B (1,869 / 1,922 us), W18 848 / 960 B. The fp32 statistics on sm_90 take
# the transposed chunk too (`_stats_chunk_t`; the row form spilled 4 B in the loop at W48): 8x8 tiles, 64
# channels, 2 stages, spill-free, W48 445.1 -> 454.2 us NCHW, 398.4 -> 404.2 channels_last (4 warps per SM by
# shared memory, 126,976 B), W18 193.0 -> 210.0 us; 1 stage 56 / 12 B (387.3 us), 4x8 tiles 516.6, 8 warps 708.0.
# fp32 with U exact in tf32 (`_dot3_exact`; Triton 3.8, W18 / W48 512x1024 b8 training, NCHW and channels_last,
# spill stores, predicted us W48 NCHW): forward sm_90 0-68 B outside the loop (was 0-76 B), sm_80 0-8 B outside
# the loops (8-224 B), 553.5 -> 504.0 us on sm_90; statistics sm_90 W48 4 B in the loop (4-8 B), sm_80 none
# (48-68 B), 466.9 -> 445.1 us; backward reduce sm_90 660-796 B (744-832 B), sm_80 772-1,068 B (900-1,140 B),
# 916.5 -> 901.9 us. The ds kernel (fp32 writes ds) also splits the gradient tile once by hand (`_dot3`) and
# takes one stage: 32 channels on sm_90 (0-92 B, none in the loop; two stages 76-104 B in the loop; 555.3 ->
# 472.2 us; with the exact gathers in a launch of their own W48 spill-free, 450.7 / 425.1 us + 4.2, W18 16 / 20
# B), 16 on smaller devices (sm_80: 0-24 B, W48 channels_last 24 B in the loop, where 32 channels spill 104-136
# B at two stages and 96-252 B at one; 1,506.5 -> 1,272.0 us; since the exact launch: none). The instrument
# counts issued instructions, not the latency a second stage hides: one stage is its prediction, unmeasured. Tried: fp32
# statistics in 16-channel chunks (spill-free on sm_90 but 445 -> 571 us), with 8 warps on 8x16 tiles (W48
# NCHW spill-free, 382 us, channels_last 28 B in the loop), one stage for the forward (sm_90 W18 108 B in the
# loop); in the reduce, dWc^T = a^T g with the gradient tile as the dot's B operand (sm_90 W48 796 -> 736 B, but
# sm_80's SASS gains a loop the trip table does not know), reloading x0 and the gradient tile per chunk (1,900
# B: the pipeliner holds the prefetched tiles).
_TILE_CANDIDATES = {
    "_head_stats_kernel": {**_FORWARD_CANDIDATES, 2: ((8, 16, 16, 2, 4),) + _FORWARD_CANDIDATES[2][1:],
                           4: ((8, 8, 64, 2, 4, SM90_SHARED, TRANSPOSED),) + _FORWARD_CANDIDATES[4]},
    "_head_backward_reduce_kernel": {**_FORWARD_CANDIDATES, 2: ((8, 16, 16, 2, 4),)
                                     + _FORWARD_CANDIDATES[2][1:],
                                     4: ((4, 8, 64, 1, 4, SM90_SHARED, TRANSPOSED),) + _FORWARD_CANDIDATES[4]},
    "_head_backward_ds_kernel": {**_FORWARD_CANDIDATES, 2: ((8, 16, 32, 2, 8),) + _FORWARD_CANDIDATES[2][1:],
                                 4: ((8, 8, 32, 1, 4, SM90_SHARED), (8, 8, 16, 1, 4), (4, 4, 16, 1, 4))},
}


def _patch_extent(mode: int, ratio: Tuple[int, int], tile: int, size: int) -> int:
    """Most source indices one tile of `tile` consecutive output indices reads along an axis: the taps of its
    first and last index lie at most ceil(ratio * (tile - 1)) apart (+1 for the second bilinear tap, +1 for
    the floor); never more than the source has. A tap outside is caught by the kernel (exact fallback)."""
    num, den = ratio
    span = -(-num * (tile - 1) // den) + (2 if mode == BILINEAR else 1)
    return max(1, min(size, span))


def _backward_patch_extent(mode: int, ratio: Tuple[int, int], tile: int, size: int) -> int:
    """`_patch_extent` with a proof that it holds the taps the kernel computes in floating point: the first and
    last index's taps lie floor(b) - floor(a) <= ceil(b - a) apart, and b - a exceeds ratio * (tile - 1) only
    by the rounding of the source coordinates (below (size + tile) * 2^-21 in float32 for ATen's formulas), so
    one more index where ratio * (tile - 1) is that close under an integer. The backward's patch partials cannot
    fall back to gathers (they hold the tile's whole contribution): its patches must hold every tap."""
    num, den = ratio
    rem = num * (tile - 1) % den
    slack = (den - rem) / den if rem else 0.0
    margin = 1 if slack <= (size + tile) * 2.0 ** -21 else 0
    span = -(-num * (tile - 1) // den) + margin + (2 if mode == BILINEAR else 1)
    return max(1, min(size, span))


@functools.lru_cache(maxsize=1024)
def _covering_tiles(mode: int, align: bool, ratio: Tuple[int, int], tile: int, n_out: int, n_in: int,
                    patch: int) -> int:
    """Most tiles (along one axis) whose patch of `patch` source indices, starting at the first tap of the
    tile's first output index, holds one source index: exact rationals, +1 for the kernels' rounding unless the
    ratio's denominator is a power of two (2x, 4x, 8x: every source coordinate is then exact in float32 below
    2^20 outputs). The gather checks each candidate against the origins the kernel stored: a bound too large
    is only slower."""
    r = Fraction(*ratio)
    exact = r.denominator & (r.denominator - 1) == 0 and n_out < 2 ** 20
    origins = []
    for o in range(0, n_out, tile):
        if mode == NEAREST:
            real = o * r
        elif align:
            real = r * o
        else:
            real = max(r * (o + Fraction(1, 2)) - Fraction(1, 2), Fraction(0))
        origins.append(min(math.floor(real), n_in - 1))
    most = max(sum(1 for a in origins if a <= y < a + patch) for y in range(n_in))
    return most + (0 if exact else 1)


def _tile_bound(name: str, elem: int, acc: int, c0p: int, kp: int, srcs: Sequence[int], tile: ForwardTile,
                fused: bool = False) -> int:
    """Upper bound of a tile kernel's shared memory: the loop-invariant dot operands (x0 tile, the U_j; the
    backward's gradient tile, as is and transposed), one buffer per stage for what the loop loads (W0 chunk,
    the patches, the Wc chunk), the activation operand (forward; the backward reduce also a second [pixels,
    BLOCK_M] tile: fp32 W48 needs 129,152 B on sm_80 / sm_90) and accumulator tiles of scratch (the backward
    reduce's dWc chunk besides)."""
    bp, bm = tile.tile_h * tile.tile_w, tile.block_m
    classifier = name != "_head_stats_kernel"
    invariant = elem * bp * (c0p + sum(srcs) + {"_head_stats_kernel": 0, "_head_forward_kernel": bm,
                                                "_head_backward_reduce_kernel": 2 * bm + 2 * kp,
                                                "_head_backward_ds_kernel": kp}[name])
    per_stage = elem * bm * (c0p + sum(srcs) + (kp if classifier else 0))
    scratch = acc * bp * max(bm, kp if classifier else 0)
    if name == "_head_backward_reduce_kernel":  # a second accumulator tile, the dWc chunk (fp32: 98,432 B at C0 32)
        scratch = 2 * scratch + acc * kp * bm
    if (elem, acc) == (4, 4) and name != "_head_backward_reduce_kernel":  # fp32's hand 3xTF32 split: a second
        # accumulator tile (the lo products; W48 ds on sm_90 needs 114,688 B, 8,192 more than without it)
        scratch += acc * bp * max(bm, kp if classifier else 0)
    if fused:  # the transposed operands of dx0, dW0 and the patch partials, and the exact adjoint's 0/1 matrices
        # (bf16 W48 8x16 / 32 channels / 2 stages: 119,040 B on sm_90, 90,368 B on sm_80, bound 157,696 B)
        scratch += elem * bp * (sum(srcs) + c0p + kp + bm)
    return invariant + tile.num_stages * per_stage + scratch


def shared_bound(name: str, params: dict, num_stages: int) -> int:
    """An upper bound of the shared memory (bytes) Triton gives a head kernel launched with `params` (the
    kernel's arguments by name, as `hrfast.perf.record.Launch.params` has them). tests/test_launchability.py
    checks it against the compiler's figure for sm_80 and sm_90."""
    x0 = params["x0_ptr"]
    tile = ForwardTile(params["TILE_H"], params["TILE_W"], params["BLOCK_M"], num_stages, 0, params["PATCH_H"],
                       params["PATCH_W"], params["SRC"])
    return _tile_bound(name, x0.element_size(), 8 if x0.dtype == torch.float64 else 4, params["C0P"],
                       params.get("KP", 0), params["SRC"], tile, bool(params.get("FUSED", False)))


@functools.lru_cache(maxsize=1024)
def _forward_tile(name: str, elem: int, acc: int, c0p: int, kp: int, block_m: int, lows: Tuple, sizes: Tuple,
                  limits) -> ForwardTile:
    """The first tile configuration that fits the device for kernel `name` (cached: the launchers run on every
    call)."""
    def make(candidate):
        th, tw, bm, stages, warps = candidate[:5]
        extent = _backward_patch_extent if name == "_head_backward_ds_kernel" else _patch_extent
        ph = tuple(extent(low.mode, low.ratio_h, th, size[0]) for low, size in zip(lows, sizes))
        pw = tuple(extent(low.mode, low.ratio_w, tw, size[1]) for low, size in zip(lows, sizes))
        src = tuple(max(16, next_power_of_2(h * w)) if low.mode != SAME else 0 for h, w, low in zip(ph, pw, lows))
        return ForwardTile(th, tw, min(bm, block_m), stages, warps, ph, pw, src, candidate[6:] == (TRANSPOSED,))

    candidates = _TILE_CANDIDATES.get(name, _FORWARD_CANDIDATES)[elem]
    if limits is not None:  # a candidate tagged with a device class only where the device is of it
        candidates = [c for c in candidates if len(c) < 6 or limits.shared_per_block >= c[5]]
    tiles = [make(c) for c in candidates]
    fused = name == "_head_backward_ds_kernel" and (elem, acc) != (4, 4)  # bf16, fp64 (fp16: an upper bound)
    return first_fitting(tiles, lambda t: _tile_bound(name, elem, acc, c0p, kp, t.src, t, fused), limits)


def _lows(plan: HeadPlan, t: HeadTensors) -> Tuple[tuple, Dict[str, tuple]]:
    """The low branches as the kernels take them: a tuple of sources and the constexpr tuples MODES, ALIGNS and
    UEXACT (`_weights_exact_in_tf32`)."""
    sources = tuple(source_args(p, low) for p, low in zip(t.lows, plan.lows))
    out = tuple(t.x0.shape[2:])
    return sources, dict(MODES=tuple(low.mode for low in plan.lows),
                         ALIGNS=tuple(bool(low.align_corners) for low in plan.lows),
                         UEXACT=tuple(_weights_exact_in_tf32(low, out, tuple(p.shape[2:]))
                                      for p, low in zip(t.lows, plan.lows)))


def _weights_exact_in_tf32(low, out: Tuple[int, int], size: Tuple[int, int]) -> bool:
    """Whether every entry of the branch's interpolation matrix U (`_patch_plan`: a product of the two axes'
    weights, coinciding taps added) is exact in tf32 (11 significant bits), so that fp32's 3xTF32 dots need no
    split of U (its lo part is 0: `_dot3_exact`, one dot fewer, and U held once). Nearest: weights 1. Bilinear
    without align_corners at a ratio r = 2^-k per axis (k >= 0; a ratio 2^e, e > 0, has k = 0): the source
    coordinate (d + 0.5) r - 0.5 is exact in float32 (below 2^20 indices), so each weight is a multiple of
    2^-(k+1) in [0, 1] (k + 1 bits; coinciding taps add up to 1) and a product has k_h + k_w + 2 bits: exact up
    to 8x in both axes (8 bits), 16x in one. Anything else (align_corners, other ratios): False, the split."""
    if low.mode == SAME:
        return False  # no U
    if max(*out, *size) >= 2 ** 20:
        return False
    if low.mode == NEAREST:
        return True
    if low.align_corners:
        return False
    bits = 0
    for num, den in (low.ratio_h, low.ratio_w):
        r = Fraction(num, den)
        if r.numerator & (r.numerator - 1) or r.denominator & (r.denominator - 1):
            return False  # not a power of two
        bits += r.denominator.bit_length()  # k + 1 for r = 2^-k, 1 for r >= 1
    return bits <= 11


def _common(t: HeadTensors, force_int64: bool) -> Tuple[list, dict]:
    x0 = t.x0
    args = [x0, tuple(x0.stride()), x0.shape[1], x0.shape[2], x0.shape[3], t.w0, tuple(t.w0.stride()), t.w0.shape[0]]
    consts = dict(F64=x0.dtype == torch.float64, INT64=force_int64 or needs_int64(x0, *t.lows),
                  PRECISION=_precision(x0.dtype), **_blocks(t))
    return args, consts


def _tiled(name: str, plan: HeadPlan, t: HeadTensors, consts: dict) -> Tuple[ForwardTile, int]:
    """Sets the tile kernel's constexprs (tile, M chunk, patches, fp32's 3xTF32 dots) in `consts`; returns the
    configuration and the number of tiles per image."""
    H, W = t.x0.shape[2:]
    tile = _forward_tile(name, t.x0.element_size(), _acc_dtype(t).itemsize, consts["C0P"], consts["KP"],
                         consts["BLOCK_M"], plan.lows, tuple(p.shape[2:] for p in t.lows), device_limits(t.x0.device))
    if t.x0.dtype == torch.float32:  # fp32 accuracy from the tensor cores: each operand split in two tf32
        # "tf32x3": the pre-BN chunk and the classifier split by hand, one split dot at a time (`_dot3`); the
        # other dots, and every dot of the backward reduce (`_head_backward_reduce_kernel`), Triton's own.
        consts["PRECISION"] = "tf32x3"
    consts.update(BLOCK_M=tile.block_m, TILE_H=tile.tile_h, TILE_W=tile.tile_w, PATCH_H=tile.patch_h,
                  PATCH_W=tile.patch_w, SRC=tile.src, CL=tuple(p.stride(1) == 1 for p in t.lows))
    return tile, cdiv(H, tile.tile_h) * cdiv(W, tile.tile_w)


def _transposed(tile: ForwardTile, t: HeadTensors, consts: dict) -> dict:
    """The statistics' and backward reduce's TRANSPOSED (fp32's transposed chunk where the configuration asks for
    it) and C0Q: the transposed x0 dot covers C0 rounded up to 16 (W48: 48, not C0P's 64)."""
    return dict(TRANSPOSED=tile.transposed and consts["PRECISION"] == "tf32x3",
                C0Q=min(consts["C0P"], max(16, cdiv(t.x0.shape[1], 16) * 16)))


def _acc_dtype(t: HeadTensors) -> torch.dtype:
    return torch.float64 if t.x0.dtype == torch.float64 else torch.float32


def head_batch_stats(plan: HeadPlan, t: HeadTensors, force_int64: bool = False) -> Tuple[Tensor, Tensor]:
    """(mean, biased var) over (N, H, W) of s = W0 x0 + sum_j Up(P_j), float64, from per-tile partials
    merged with Chan's parallel formula (no E[s^2] - E[s]^2 cancellation), in a fixed order."""
    N, _, H, W = t.x0.shape
    M = t.w0.shape[0]
    common, consts = _common(t, force_int64)
    lows, low_consts = _lows(plan, t)
    tile, tiles = _tiled("_head_stats_kernel", plan, t, consts)
    consts.pop("KP")
    R = tiles * N
    parts = _empty((2, R, M), _acc_dtype(t), t.x0.device)
    with _device_context(t.x0):
        _head_stats_kernel[launch_grid(tiles, N)](*common, parts, R, lows, **consts, **low_consts,
                                                  **_transposed(tile, t, consts), num_warps=tile.num_warps,
                                                  num_stages=tile.num_stages)
    counts = _tile_counts(H, W, tile.tile_h, tile.tile_w, t.x0.device).repeat(N)[:, None]
    sums, m2 = parts[0].double(), parts[1].double()
    total = float(N * H * W)
    mean = sums.sum(0) / total
    tile_means = sums / counts
    var = (m2.sum(0) + (counts * (tile_means - mean) ** 2).sum(0)) / total
    return mean, var


def _tile_counts(H: int, W: int, tile_h: int, tile_w: int, device) -> Tensor:
    """Pixels in each tile of one image (row-major, as `_tile_pixels` numbers them), float64: built on the host
    (the partial edge tiles have fewer), one copy to the device."""
    rows = [min(tile_h, H - y) for y in range(0, H, tile_h)]
    cols = [min(tile_w, W - x) for x in range(0, W, tile_w)]
    counts = torch.tensor(rows, dtype=torch.float64)[:, None] * torch.tensor(cols, dtype=torch.float64)[None, :]
    return counts.reshape(-1).to(device)


def head_forward(plan: HeadPlan, t: HeadTensors, scale: Tensor, shift: Tensor, force_int64: bool = False) -> Tensor:
    """logits [N, K, H, W] = Wc . ReLU(s * scale + shift) + bc, never materialising s."""
    N, _, H, W = t.x0.shape
    K = t.wc.shape[0]
    fmt = torch.channels_last if t.x0.stride(1) == 1 and t.x0.shape[1] > 1 else torch.contiguous_format
    out = _empty((N, K, H, W), t.x0.dtype, t.x0.device, fmt)
    common, consts = _common(t, force_int64)
    lows, low_consts = _lows(plan, t)
    tile, tiles = _tiled("_head_forward_kernel", plan, t, consts)
    with _device_context(t.x0):
        _head_forward_kernel[launch_grid(tiles, N)](*common, scale, shift, t.wc, tuple(t.wc.stride()), K,
                                                    t.bc if t.bc is not None else scale, out, tuple(out.stride()),
                                                    lows, HAS_BC=t.bc is not None, **consts, **low_consts,
                                                    num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out


# splits of the backward reduction: enough programs for every SM of a large device a few times over, few enough
# that the host's sum over their rows stays small (512 x (K + 2) x M floats: 40 MB at W48)
_REDUCE_SPLITS = 512
# the launches of the exact gathers alone (the backward reduce's, fp32 / fp16 ds's) take 8 warps and one stage
# on the dense launch's tiles: their 16-channel chunks hold 4 taps per bilinear branch (bf16 W48 sm_90 at the
# dense launch's 4 warps: 64-72 B of spills; 8 warps: none at W48; sm_80 W18 bf16 / fp16 channels_last 4 B),
# and one stage needs the least shared memory (fp32 sm_80 W48: 81,920 B, 120,960 at two; within 101,376 and
# 49,152 B devices, fp32 / bf16 W18 / W48). They run no loop trip on finite inputs.
_EXACT_WARPS = 8


def _visits(tiles: int, splits: int) -> int:
    """The exact launches' VISITS: the most tiles a split visits, rounded up to a power of 2 (`_redo_pending`)."""
    return next_power_of_2(cdiv(tiles, splits))


def head_backward_reduce(plan: HeadPlan, t: HeadTensors, scale: Tensor, shift: Tensor, grad: Tensor,
                         force_int64: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """(dWc [K, M], sum_p dA, sum_p dA * s) where dA = Wc^T grad, zeroed where a <= 0, is the gradient at BN's
    output; the caller forms scale/shift (or BN weight/bias) gradients and BN's batch-statistics terms from them."""
    N = t.x0.shape[0]
    M, K = t.w0.shape[0], t.wc.shape[0]
    common, consts = _common(t, force_int64)
    lows, low_consts = _lows(plan, t)
    tile, tiles = _tiled("_head_backward_reduce_kernel", plan, t, consts)
    splits = max(1, min(tiles * N, _REDUCE_SPLITS))  # every split visits at least one tile (it writes its rows)
    parts = _empty((splits, K + 2, M), _acc_dtype(t), t.x0.device)
    redo = _empty((N * tiles,), torch.int32, t.x0.device)  # per tile, where the exact gathers start (M: nowhere)
    with _device_context(t.x0):
        for exact in (False, True):  # the patch dots, then the exact gathers where they stopped (none if finite)
            _head_backward_reduce_kernel[launch_grid(splits)](
                *common, scale, shift, t.wc, tuple(t.wc.stride()), K, grad, tuple(grad.stride()), parts, redo,
                splits, tiles * N, lows, **consts, **low_consts, **_transposed(tile, t, consts), EXACT=exact,
                VISITS=_visits(tiles * N, splits), num_warps=_EXACT_WARPS if exact else tile.num_warps,
                num_stages=1 if exact else tile.num_stages)
    total = parts.sum(0)
    return total[:K], total[K], total[K + 1]


# splits of the backward's tiles: each adds its tiles' dW0 into its own [M, C0] rows (the host sums them: 256 x
# M x C0 floats, 35 MB at W48); two programs per SM of an H100 (132 SMs) with a few to spare
_GRAD_SPLITS = 256

# the dtypes whose backward never writes ds (`head_backward_ds`): fp32's 3xTF32 dots triple the fused chunk's
# operands (sm_90, W48: 5 KB spills, 2.2 ms against 0.65 ms for the kernel that writes ds)
# fp16 too: its exact adjoint's flag dots (two then; no 2^16 in fp16) run in tf32 and need 213,248 B of shared memory on
# sm_90, 180,480 B on sm_80 (over the A100's limit): launchability, W48 / W18 training fp16
_FUSED_DTYPES = (torch.bfloat16, torch.float64)

# the gather's tile: 8 x 8 source pixels of 32 channels (a load per candidate patch of 16-byte rows, bf16)
_GATHER_BLOCK = (8, 8, 32)
_GATHER_UNROLLED = 8


def head_backward_ds(plan: HeadPlan, t: HeadTensors, scale: Tensor, shift: Tensor, grad: Tensor,
                     alpha: Optional[Tensor] = None, beta: Optional[Tensor] = None,
                     force_int64: bool = False) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """(dx0 [N, C0, H, W] in x0's dtype and layout, dW0 [M, C0] in the accumulation dtype, dP_j per low branch
    like P_j, a same-size branch's [N, M, H, W] in the logits' layout) from ds = dA * scale (+ alpha + beta * s
    when BN used batch statistics). bf16 / fp64: never materialising ds, `_head_backward_ds_kernel` on
    the forward's tiles, then per upsampled branch `_head_patch_gather_kernel` over the tiles' patch partials.
    fp32 / fp16 (`_FUSED_DTYPES`): the kernel writes ds, then GEMMs (dx0, dW0) and the fusion op's adjoint gather."""
    N, C0, H, W = t.x0.shape
    M, K = t.w0.shape[0], t.wc.shape[0]
    common, consts = _common(t, force_int64)
    lows, low_consts = _lows(plan, t)
    fmt = torch.channels_last if t.x0.stride(1) == 1 and C0 > 1 else torch.contiguous_format
    tile, tiles = _tiled("_head_backward_ds_kernel", plan, t, consts)
    dtype, acc, device = t.x0.dtype, _acc_dtype(t), t.x0.device
    fused = dtype in _FUSED_DTYPES
    splits = max(1, min(tiles * N, _GRAD_SPLITS))  # every split visits at least one tile (it writes its rows)
    redo = _empty((N * tiles,), torch.int32, device)  # per tile, where the exact gathers start (M: nowhere)
    tiles_h, tiles_w = cdiv(H, tile.tile_h), cdiv(W, tile.tile_w)
    if fused:
        dx0 = _empty((N, C0, H, W), dtype, device, fmt)
        dw0 = _empty((splits, M, C0), acc, device)
        origins = torch.empty((len(t.lows), tiles_h + tiles_w), dtype=torch.int32, device=device)  # the kernel's
        # per upsampled branch the tiles' patch partials [tiles, PATCH_H * PATCH_W, M] in x0's dtype (each
        # rounded once, then at most NA x NB of them summed in the accumulation dtype); a same-size branch's
        # gradient is ds
        outs = [_empty((N, M, H, W), p.dtype, device, fmt) if low.mode == SAME
                else _empty((N * tiles, ph * pw, M), dtype, device)
                for p, low, ph, pw in zip(t.lows, plan.lows, tile.patch_h, tile.patch_w)]
    else:
        dx0 = dw0 = origins = scale  # unread
        outs = [_empty((N, M, H, W), dtype, device, fmt)]  # ds
    if needs_int64(*outs):
        consts["INT64"] = True
    with _device_context(t.x0):
        for exact in (False,) if fused else (False, True):  # fp32: the exact gathers in a launch of their own
            _head_backward_ds_kernel[launch_grid(splits) if fused or exact else launch_grid(tiles, N)](
                *common, scale, shift, alpha if alpha is not None else scale, beta if beta is not None else scale,
                t.wc, tuple(t.wc.stride()), K, grad, tuple(grad.stride()), dx0, tuple(dx0.stride()), dw0, origins,
                redo, splits, tiles * N, lows, tuple((o, tuple(o.stride())) for o in outs),
                BATCH_STATS=alpha is not None, FUSED=fused, **consts, **low_consts, EXACT=exact,
                VISITS=_visits(tiles * N, splits) if exact else 1,
                num_warps=_EXACT_WARPS if exact else tile.num_warps, num_stages=1 if exact else tile.num_stages)
        if not fused:
            ds = outs[0]
            return (torch.einsum("mc,nmhw->nchw", t.w0, ds).contiguous(memory_format=fmt),
                    torch.einsum("nmhw,nchw->mc", ds, t.x0), upsample_adjoint(plan, ds, t.lows))
        dlows = []
        by, bx, bm = _GATHER_BLOCK
        for j, (p, low, part) in enumerate(zip(t.lows, plan.lows, outs)):
            if low.mode == SAME:
                dlows.append(part)
                continue
            h, w = p.shape[2:]
            dp = torch.empty_like(p)
            na = _covering_tiles(low.mode, bool(low.align_corners), low.ratio_h, tile.tile_h, H, h, tile.patch_h[j])
            nb = _covering_tiles(low.mode, bool(low.align_corners), low.ratio_w, tile.tile_w, W, w, tile.patch_w[j])
            # every candidate's load is unrolled: past _GATHER_UNROLLED of them, half the channels per program
            # (W18 at 512x1024: 4 x 3 candidates x 32 channels spilled 76-124 B on sm_80 / sm_90)
            block_m = bm if na * nb <= _GATHER_UNROLLED else bm // 2
            _head_patch_gather_kernel[launch_grid(cdiv(h, by) * cdiv(w, bx), cdiv(M, block_m), N)](
                part, origins[j], dp, tuple(dp.stride()), M, h, w, tiles_h, tiles_w,
                PATCH_H=tile.patch_h[j], PATCH_W=tile.patch_w[j], NA=na, NB=nb,
                LOG_H=max(1, (tiles_h - 1).bit_length() + 1), LOG_W=max(1, (tiles_w - 1).bit_length() + 1),
                INT64=force_int64 or needs_int64(part, dp), BLOCK_Y=by, BLOCK_X=bx, BLOCK_M=block_m, num_warps=4)
            dlows.append(dp)
    return dx0, dw0.sum(0), dlows


def upsample_adjoint(plan: HeadPlan, ds: Tensor, lows: Sequence[Tensor]) -> List[Tensor]:
    """dP_j = Up_j^T(ds) with the fusion op's deterministic gather (a same-size branch: a copy of ds)."""
    int64 = needs_int64(ds)
    dz_only = (True, False, False)
    return [ds.clone() if low.mode == SAME else upsample_term_backward(low, ds, p, None, None, dz_only, int64)[0]
            for low, p in zip(plan.lows, lows)]
