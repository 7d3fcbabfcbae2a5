"""Triton kernels for the HRNetV2 head, reordered: the 15C-channel full-resolution tensor never reaches memory.

    logits = Wc . ReLU(BN(W0 x0 + sum_j Up(P_j) + b)) + bc,     P_j = W_j x_j at branch j's resolution

(the 1x1 conv commutes with Up, whose weights sum to 1). Every kernel works on chunks of BLOCK_M of the M
head channels over a tile of BLOCK_P pixels of one image, recomputing the pre-BN chunk
s = W0[m] . x0 + sum_j Up(P_j)[m] (conv bias excluded: it only shifts BN's mean) from x0 and the
low-resolution projections:

- `_head_stats_kernel`: per-tile sum and centred sum of squares of s (BN batch statistics, training);
- `_head_forward_kernel`: logits = Wc . ReLU(s * scale + shift) + bc over a 2-D pixel tile, accumulated over M
  chunks, every product a tensor-core dot: each low branch is upsampled as U_j . patch_j, U_j the tile's
  interpolation matrix (built once per tile) and patch_j the source pixels the tile reads (a plain 2-D block
  per chunk instead of 4 gathers per output element); exact per-pixel gathers redo a tile only where NaN or a
  missed tap makes the dense product differ from ATen's;
- `_head_backward_reduce_kernel`: over pixel splits, dWc = sum dlogits a^T, sum dA and sum dA * s, where
  dA = Wc^T dlogits, zeroed where a <= 0 (ReLU's backward: NaN passes);
- `_head_backward_ds_kernel`: ds = dA * scale + alpha + beta * s (alpha, beta: BN's batch-statistics terms),
  written once; the launcher turns it into dx0 and dW0 (GEMMs) and dP_j (the fusion op's adjoint gather).

Per-split and per-tile partial sums are reduced on the host in a fixed order: deterministic, no atomics.
"""
from __future__ import annotations

import functools
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hrfast.plan import HeadPlan

from .fuse import _device_context, _empty, needs_int64, relu, relu_backward, upsample_term_backward
from .limits import device_limits, first_fitting
from .resample import (BILINEAR, NEAREST, SAME, bilinear_ratio, cdiv, launch_grid, linear_source, nearest_source,
                       next_power_of_2, source_args, tile_offsets, upsampled_tile)


@triton.jit
def _pre_bn_chunk(w0, x0, n, m, m_mask, oy, ox, p_mask, lows, MODES: tl.constexpr, ALIGNS: tl.constexpr,
                  F64: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr):
    """s[m, p] = W0[m, :] . x0[:, p] + sum_j Up(P_j)[m, p] for a [BLOCK_M, BLOCK_P] chunk, in fp32 (fp64);
    `lows`: the sources of the P_j (`resample.source_args`), MODES / ALIGNS: their resampling."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    s = tl.dot(w0, x0, out_dtype=acc_t, input_precision=PRECISION)
    for j in tl.static_range(len(lows)):
        s += upsampled_tile(n, m, m_mask, oy, ox, p_mask, lows[j], MODES[j], ALIGNS[j], F64, INT64)
    return s


@triton.jit
def _load_x0(x0_ptr, n, oy, ox, p_mask, C0, strides, C0P: tl.constexpr, INT64: tl.constexpr):
    c = tl.arange(0, C0P)
    mask = (c < C0)[:, None] & p_mask[None, :]
    return tl.load(x0_ptr + tile_offsets(n, c, oy, ox, strides, INT64), mask=mask, other=0.0)


@triton.jit
def _load_matrix(ptr, rows, cols, n_rows, n_cols, strides):
    s_r, s_c = strides
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows[:, None] * s_r + cols[None, :] * s_c, mask=mask, other=0.0)


@triton.jit
def _pixels(pid_p, H, W, BLOCK_P: tl.constexpr):
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    return p < H * W, p // W, p % W


@triton.jit
def _head_stats_kernel(
    x0_ptr, x0_strides, C0, H, W,
    w0_ptr, w0_strides, M, part_ptr, R,
    lows, MODES: tl.constexpr, ALIGNS: tl.constexpr,
    F64: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
    C0P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per tile and channel: sum of s (slot 0) and sum of (s - tile mean)^2 (slot 1), for Chan's merge."""
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    p_mask, oy, ox = _pixels(pid_p, H, W, BLOCK_P)
    count = tl.sum(p_mask.to(tl.float32), axis=0)
    x0 = _load_x0(x0_ptr, n, oy, ox, p_mask, C0, x0_strides, C0P, INT64)
    row = n * tl.num_programs(0) + pid_p
    for m0 in range(0, M, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_mask = m < M
        w0 = _load_matrix(w0_ptr, m, tl.arange(0, C0P), M, C0, w0_strides)
        s = _pre_bn_chunk(w0, x0, n, m, m_mask, oy, ox, p_mask, lows, MODES, ALIGNS, F64, INT64, PRECISION)
        s = tl.where(p_mask[None, :], s, 0.0)
        total = tl.sum(s, axis=1)
        centred = tl.where(p_mask[None, :], s - (total / count)[:, None], 0.0)
        tl.store(part_ptr + row * M + m, total, mask=m_mask)
        tl.store(part_ptr + (R + row) * M + m, tl.sum(centred * centred, axis=1), mask=m_mask)


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
    lows, MODES: tl.constexpr, ALIGNS: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr,
    SRC: tl.constexpr, CL: tl.constexpr, HAS_BC: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
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
    pid = tl.program_id(0)
    n = tl.program_id(1)
    tiles_w = tl.cdiv(W, TILE_W)
    p = tl.arange(0, TILE_H * TILE_W)
    oy = (pid // tiles_w) * TILE_H + p // TILE_W
    ox = (pid % tiles_w) * TILE_W + p % TILE_W
    p_mask = (oy < H) & (ox < W)
    # taps of the tail pixels from the last row / column: inside every patch bound
    cy = tl.minimum(oy, H - 1)
    cx = tl.minimum(ox, W - 1)
    c = tl.arange(0, C0P)
    x0 = tl.load(x0_ptr + _offsets(n, c, cy, cx, x0_strides, INT64), mask=p_mask[:, None] & (c < C0)[None, :],
                 other=0.0)
    logits, covered = _tile_logits(x0, n, cy, cx, p_mask, w0_ptr, w0_strides, C0, M, scale_ptr, shift_ptr,
                                   wc_ptr, wc_strides, K, lows, MODES, ALIGNS, PATCH_H, PATCH_W, SRC, CL, False,
                                   F64, INT64, PRECISION, C0P, KP, BLOCK_M)
    nan_seen = tl.sum(tl.where(logits != logits, 1, 0), axis=1)
    if (tl.sum(nan_seen, axis=0) > 0) | (covered == 0):
        # (narrow chunks: the gathers hold 4 taps per branch at once, and this loop's registers count too)
        logits, covered = _tile_logits(x0, n, cy, cx, p_mask, w0_ptr, w0_strides, C0, M, scale_ptr, shift_ptr,
                                       wc_ptr, wc_strides, K, lows, MODES, ALIGNS, PATCH_H, PATCH_W, SRC, CL, True,
                                       F64, INT64, PRECISION, C0P, KP, 16)
    k = tl.arange(0, KP)
    if HAS_BC:
        logits += tl.load(bc_ptr + k, mask=k < K, other=0.0).to(acc_t)[None, :]
    tl.store(out_ptr + _offsets(n, k, oy, ox, out_strides, INT64), logits.to(out_ptr.dtype.element_ty),
             mask=p_mask[:, None] & (k < K)[None, :])


@triton.jit
def _tile_logits(x0, n, oy, ox, p_mask, w0_ptr, w0_strides, C0, M, scale_ptr, shift_ptr,
                 wc_ptr, wc_strides, K, lows, MODES: tl.constexpr, ALIGNS: tl.constexpr, PATCH_H: tl.constexpr,
                 PATCH_W: tl.constexpr, SRC: tl.constexpr, CL: tl.constexpr, GATHER: tl.constexpr, F64: tl.constexpr,
                 INT64: tl.constexpr, PRECISION: tl.constexpr, C0P: tl.constexpr, KP: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """The tile's logits [pixels, KP] before the classifier bias, and whether every patch covered its taps.
    GATHER: the low branches through the exact per-pixel gathers instead of the patch dots."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    dtype: tl.constexpr = x0.dtype
    covered = True
    plans = ()
    if not GATHER:
        for j in tl.static_range(len(lows)):
            if MODES[j] != 0:
                x_ptr, h, w, strides, _, _ = lows[j]
                u, rows, cols, ok = _patch_plan(oy, ox, lows[j], tl.arange(0, SRC[j]), MODES[j], ALIGNS[j],
                                                PATCH_H[j], PATCH_W[j], F64, dtype)
                covered = covered & ok
                plans = plans + ((u, _pixel_offsets(n, rows, cols, strides, INT64)),)
            else:
                plans = plans + ((0, 0),)
    c = tl.arange(0, C0P)
    k = tl.arange(0, KP)
    k_c = tl.minimum(k, K - 1)
    logits = tl.zeros([x0.shape[0], KP], dtype=acc_t)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_mask = m < M
        # clamped to the last channel / class where that keeps loads unmasked: the padding is zeroed below
        m_c = tl.minimum(m, M - 1)
        w0 = tl.load(w0_ptr + c[:, None] * w0_strides[1] + m_c[None, :] * w0_strides[0], mask=(c < C0)[:, None],
                     other=0.0)
        s = tl.dot(x0, w0, out_dtype=acc_t, input_precision=PRECISION)
        for j in tl.static_range(len(lows)):
            x_ptr, h, w, strides, _, _ = lows[j]
            if MODES[j] == 0:
                s += tl.load(x_ptr + _offsets(n, m_c, oy, ox, strides, INT64)).to(acc_t)
            elif GATHER:
                s += tl.trans(upsampled_tile(n, m_c, m_mask, oy, ox, p_mask, lows[j], MODES[j], ALIGNS[j], F64,
                                             INT64))
            else:
                u, patch_offsets = plans[j]
                if CL[j]:  # channels contiguous: masked, so the copies stay vectorised
                    patch = tl.load(x_ptr + (patch_offsets[:, None] + _channel_offsets(m, strides, INT64)[None, :]),
                                    mask=m_mask[None, :], other=0.0)
                else:  # scalar loads either way: clamped, no mask to compute
                    patch = tl.load(x_ptr + (patch_offsets[:, None] + _channel_offsets(m_c, strides, INT64)[None, :]))
                s = tl.dot(u, patch, acc=s, out_dtype=acc_t, input_precision=PRECISION)
        scale = tl.load(scale_ptr + m_c).to(acc_t)
        shift = tl.load(shift_ptr + m_c).to(acc_t)
        # padded channels are 0 (their s duplicates the last channel's; the classifier sums over m)
        a = tl.where(m_mask[None, :], relu(s * scale[None, :] + shift[None, :]), 0.0)
        wc = tl.load(wc_ptr + m[:, None] * wc_strides[1] + k_c[None, :] * wc_strides[0], mask=m_mask[:, None],
                     other=0.0)
        # like eager, the classifier multiplies the activation in the input dtype (fp32 accumulate)
        logits = tl.dot(a.to(dtype), wc, acc=logits, out_dtype=acc_t, input_precision=PRECISION)
    return logits, covered


@triton.jit
def _head_backward_reduce_kernel(
    x0_ptr, x0_strides, C0, H, W,
    w0_ptr, w0_strides, M, scale_ptr, shift_ptr,
    wc_ptr, wc_strides, K, g_ptr, g_strides,
    dwc_ptr, part_ptr, SPLITS, TILES,
    lows, MODES: tl.constexpr, ALIGNS: tl.constexpr,
    F64: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
    C0P: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Program (M chunk, split) visits tiles split, split + SPLITS, ...: partial dWc[:, chunk], sum dA, sum dA*s."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    m_mask = m < M
    k = tl.arange(0, KP)
    w0 = _load_matrix(w0_ptr, m, tl.arange(0, C0P), M, C0, w0_strides)
    wc = _load_matrix(wc_ptr, k, m, K, M, wc_strides)
    wc_t = tl.trans(wc)
    scale = tl.load(scale_ptr + m, mask=m_mask, other=0.0).to(acc_t)
    shift = tl.load(shift_ptr + m, mask=m_mask, other=0.0).to(acc_t)
    tiles_per_image = tl.cdiv(H * W, BLOCK_P)
    dwc = tl.zeros([KP, BLOCK_M], dtype=acc_t)
    sum_da = tl.zeros([BLOCK_M], dtype=acc_t)
    sum_das = tl.zeros([BLOCK_M], dtype=acc_t)
    for t in range(split, TILES, SPLITS):
        n = t // tiles_per_image
        p_mask, oy, ox = _pixels(t % tiles_per_image, H, W, BLOCK_P)
        x0 = _load_x0(x0_ptr, n, oy, ox, p_mask, C0, x0_strides, C0P, INT64)
        s = _pre_bn_chunk(w0, x0, n, m, m_mask, oy, ox, p_mask, lows, MODES, ALIGNS, F64, INT64, PRECISION)
        a_pre = s * scale[:, None] + shift[:, None]
        # padded pixels are 0: their activation relu(shift) may be inf or NaN, and dWc sums over pixels
        a = tl.where(p_mask[None, :], relu(a_pre), 0.0)
        g_mask = (k < K)[:, None] & p_mask[None, :]
        g = tl.load(g_ptr + tile_offsets(n, k, oy, ox, g_strides, INT64), mask=g_mask, other=0.0)
        g = g.to(wc.dtype)
        da = tl.dot(wc_t, g, out_dtype=acc_t, input_precision=PRECISION)
        da = tl.where(p_mask[None, :], relu_backward(a_pre, da), 0.0)
        dwc += tl.dot(g, tl.trans(a.to(wc.dtype)), out_dtype=acc_t, input_precision=PRECISION)
        sum_da += tl.sum(da, axis=1)
        sum_das += tl.sum(da * s, axis=1)
    tl.store(dwc_ptr + (split * KP + k[:, None]) * M + m[None, :], dwc, mask=(k < K)[:, None] & m_mask[None, :])
    tl.store(part_ptr + split * M + m, sum_da, mask=m_mask)
    tl.store(part_ptr + (SPLITS + split) * M + m, sum_das, mask=m_mask)


@triton.jit
def _head_backward_ds_kernel(
    x0_ptr, x0_strides, C0, H, W,
    w0_ptr, w0_strides, M, scale_ptr, shift_ptr, alpha_ptr, beta_ptr,
    wc_ptr, wc_strides, K, g_ptr, g_strides, ds_ptr, ds_strides,
    lows, MODES: tl.constexpr, ALIGNS: tl.constexpr, BATCH_STATS: tl.constexpr,
    F64: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
    C0P: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """ds = dA * scale (+ alpha + beta * s with batch statistics), the gradient of the pre-BN activation."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    pid_p = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(2)
    m_mask = m < M
    k = tl.arange(0, KP)
    p_mask, oy, ox = _pixels(pid_p, H, W, BLOCK_P)
    x0 = _load_x0(x0_ptr, n, oy, ox, p_mask, C0, x0_strides, C0P, INT64)
    w0 = _load_matrix(w0_ptr, m, tl.arange(0, C0P), M, C0, w0_strides)
    s = _pre_bn_chunk(w0, x0, n, m, m_mask, oy, ox, p_mask, lows, MODES, ALIGNS, F64, INT64, PRECISION)
    scale = tl.load(scale_ptr + m, mask=m_mask, other=0.0).to(acc_t)
    shift = tl.load(shift_ptr + m, mask=m_mask, other=0.0).to(acc_t)
    a_pre = s * scale[:, None] + shift[:, None]
    wc = _load_matrix(wc_ptr, k, m, K, M, wc_strides)
    g_mask = (k < K)[:, None] & p_mask[None, :]
    g = tl.load(g_ptr + tile_offsets(n, k, oy, ox, g_strides, INT64), mask=g_mask, other=0.0)
    da = tl.dot(tl.trans(wc), g.to(wc.dtype), out_dtype=acc_t, input_precision=PRECISION)
    ds = relu_backward(a_pre, da) * scale[:, None]
    if BATCH_STATS:
        alpha = tl.load(alpha_ptr + m, mask=m_mask, other=0.0).to(acc_t)
        beta = tl.load(beta_ptr + m, mask=m_mask, other=0.0).to(acc_t)
        ds += alpha[:, None] + beta[:, None] * s
    mask = m_mask[:, None] & p_mask[None, :]
    tl.store(ds_ptr + tile_offsets(n, m, oy, ox, ds_strides, INT64), ds.to(ds_ptr.dtype.element_ty),
             mask=mask)


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
    """The padded channel counts, and the M chunk the configurations start from (`_candidates`)."""
    C0, M, K = t.x0.shape[1], t.w0.shape[0], t.wc.shape[0]
    return dict(C0P=max(16, next_power_of_2(C0)), KP=max(16, next_power_of_2(K)),
                BLOCK_M=min(64, max(16, next_power_of_2(M))))


# --------------------------------------------------------------------------------- block configurations


class HeadConfig(NamedTuple):
    """One head kernel's block configuration: M channels and pixels per chunk, software-pipeline stages."""

    BLOCK_M: int
    BLOCK_P: int
    num_stages: int


def _candidates(block_m: int) -> Tuple[HeadConfig, ...]:
    """In order of preference: Triton's default pipelining (3 stages) over 64-pixel tiles, then fewer stages,
    then smaller tiles, each needing less shared memory than the one before; the launchers take the first
    whose `shared_bound` fits the device (`limits.first_fitting`)."""
    return (HeadConfig(block_m, 64, 3), HeadConfig(block_m, 64, 2), HeadConfig(block_m, 64, 1),
            HeadConfig(min(block_m, 32), 32, 1), HeadConfig(16, 16, 1))


_TAPS = {SAME: 1, NEAREST: 1, BILINEAR: 4}  # tiles gathered per low branch and chunk


def _dot_tiles(name: str, c0p: int, kp: int, bm: int, bp: int) -> int:
    """Elements of the tiles the kernel's tl.dots read as operands (staged through shared memory)."""
    pre_bn = bm * c0p + c0p * bp  # W0 chunk, x0 tile
    return pre_bn + {"_head_stats_kernel": 0,
                     "_head_backward_reduce_kernel": kp * bm + 2 * kp * bp + bm * bp,  # Wc^T, g twice, a^T
                     "_head_backward_ds_kernel": kp * bm + kp * bp}[name]


def _loop_tiles(name: str, c0p: int, kp: int, bm: int, bp: int) -> int:
    """Elements the kernel's loop loads anew per iteration besides the gathers (0: no loop)."""
    return {"_head_stats_kernel": bm * c0p,  # the W0 chunk
            "_head_backward_reduce_kernel": c0p * bp + kp * bp,  # the x0 and gradient tiles
            "_head_backward_ds_kernel": 0}[name]


def _bound(name: str, elem: int, acc: int, c0p: int, kp: int, copied_taps: int, config: HeadConfig) -> int:
    bm, bp, stages = config
    scratch = acc * max(bm, kp) * bp  # one accumulator tile for layout conversions and reductions
    base = elem * _dot_tiles(name, c0p, kp, bm, bp) + scratch
    loop = _loop_tiles(name, c0p, kp, bm, bp)
    if not loop:
        return base
    per_stage = elem * (loop + copied_taps * bm * bp)
    return base + (stages - 1) * per_stage


def _copied_taps(modes: Sequence[int], lows: Sequence[tuple], elem: int) -> int:
    """Gathered low-resolution tiles per chunk that the pipeliner can copy asynchronously: cp.async moves 4
    bytes or more, so 2-byte gathers qualify only where the channels (channels_last) or the pixels (a
    same-size branch) are contiguous."""
    return sum(_TAPS[mode] for mode, src in zip(modes, lows)
               if elem >= 4 or mode == SAME or src[3][1] == 1)


def shared_bound(name: str, params: dict, num_stages: int) -> int:
    """An upper bound of the shared memory (bytes) Triton gives a head kernel launched with `params` (the
    kernel's arguments by name, as `hrfast.perf.record.Launch.params` has them): its dot operands, one
    accumulator tile of scratch, and per pipeline stage beyond the first a buffer for what its loop loads.
    tests/test_launchability.py checks it against the compiler's figure for sm_80 and sm_90."""
    x0 = params["x0_ptr"]
    elem = x0.element_size()
    acc = 8 if x0.dtype == torch.float64 else 4
    if name == "_head_forward_kernel":
        tile = ForwardTile(params["TILE_H"], params["TILE_W"], params["BLOCK_M"], num_stages, 0, params["PATCH_H"],
                           params["PATCH_W"], params["SRC"])
        return _forward_bound(elem, acc, params["C0P"], params["KP"], params["SRC"], tile)
    return _bound(name, elem, 8 if x0.dtype == torch.float64 else 4, params["C0P"], params.get("KP", 0),
                  _copied_taps(params["MODES"], params["lows"], elem),
                  HeadConfig(params["BLOCK_M"], params["BLOCK_P"], num_stages))


def _configure(name: str, t: HeadTensors, lows: tuple, consts: dict, low_consts: dict) -> dict:
    """Sets the kernel's BLOCK_M and BLOCK_P in `consts` to the preferred configuration that fits the device
    (`limits.device_limits`) and returns its launch options (num_stages)."""
    elem = t.x0.element_size()
    config = _fitting(name, elem, _acc_dtype(t).itemsize, consts["C0P"], consts.get("KP", 0), consts["BLOCK_M"],
                      _copied_taps(low_consts["MODES"], lows, elem), device_limits(t.x0.device))
    consts.update(BLOCK_M=config.BLOCK_M, BLOCK_P=config.BLOCK_P)
    return dict(num_stages=config.num_stages)


@functools.lru_cache(maxsize=1024)
def _fitting(name: str, elem: int, acc: int, c0p: int, kp: int, block_m: int, copied_taps: int,
             limits) -> HeadConfig:
    """Cached: the launchers run on every op call, so their host time counts."""
    return first_fitting(_candidates(block_m), lambda c: _bound(name, elem, acc, c0p, kp, copied_taps, c), limits)


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


# Per element size, in order of preference (tile_h, tile_w, block_m, num_stages, num_warps). fp16/bf16: 8x16
# pixels (a 128-row dot; patches of 6x10 / 4x6 / 3x4 for 2x / 4x / 8x bilinear) over 32-channel chunks,
# two stages (sm_90, W48: 72 us NCHW / 56 us channels_last against 69 / 47 with 64-channel chunks, which spill
# on sm_80). fp32 (3xTF32 dots, three times the operands): 8x8 pixels. Then fewer stages and smaller tiles
# for smaller devices.
_FORWARD_CANDIDATES = {
    2: ((8, 16, 32, 2, 4), (8, 16, 32, 1, 4), (8, 8, 32, 1, 4), (4, 4, 16, 1, 4)),
    4: ((8, 8, 32, 2, 4), (8, 8, 32, 1, 4), (8, 8, 16, 1, 4), (4, 4, 16, 1, 4)),
    8: ((8, 8, 16, 1, 4), (4, 4, 16, 1, 4)),
}


def _patch_extent(mode: int, ratio: Tuple[int, int], tile: int, size: int) -> int:
    """Most source indices one tile of `tile` consecutive output indices reads along an axis: the taps of its
    first and last index lie at most ceil(ratio * (tile - 1)) apart (+1 for the second bilinear tap, +1 for
    the floor); never more than the source has. A tap outside is caught by the kernel (exact fallback)."""
    num, den = ratio
    span = -(-num * (tile - 1) // den) + (2 if mode == BILINEAR else 1)
    return max(1, min(size, span))


def _forward_bound(elem: int, acc: int, c0p: int, kp: int, srcs: Sequence[int], tile: ForwardTile) -> int:
    """Upper bound of the forward's shared memory: the loop-invariant dot operands (x0 tile, the U_j), one
    buffer per stage for what the loop loads (W0 and Wc chunks, the patches), the activation operand and one
    accumulator tile of scratch."""
    bp, bm = tile.tile_h * tile.tile_w, tile.block_m
    invariant = elem * bp * (c0p + sum(srcs) + bm)
    per_stage = elem * bm * (c0p + sum(srcs) + kp)
    return invariant + tile.num_stages * per_stage + acc * bp * max(bm, kp)


@functools.lru_cache(maxsize=1024)
def _forward_tile(elem: int, acc: int, c0p: int, kp: int, block_m: int, lows: Tuple, sizes: Tuple,
                  limits) -> ForwardTile:
    """The first forward configuration that fits the device (cached: the launcher runs on every call)."""
    def make(candidate):
        th, tw, bm, stages, warps = candidate
        ph = tuple(_patch_extent(low.mode, low.ratio_h, th, size[0]) for low, size in zip(lows, sizes))
        pw = tuple(_patch_extent(low.mode, low.ratio_w, tw, size[1]) for low, size in zip(lows, sizes))
        src = tuple(max(16, next_power_of_2(h * w)) if low.mode != SAME else 0 for h, w, low in zip(ph, pw, lows))
        return ForwardTile(th, tw, min(bm, block_m), stages, warps, ph, pw, src)

    tiles = [make(c) for c in _FORWARD_CANDIDATES[elem]]
    return first_fitting(tiles, lambda t: _forward_bound(elem, acc, c0p, kp, t.src, t), limits)


def _lows(plan: HeadPlan, t: HeadTensors) -> Tuple[tuple, Dict[str, tuple]]:
    """The low branches as the kernels take them: a tuple of sources and the constexpr tuples MODES, ALIGNS."""
    sources = tuple(source_args(p, low) for p, low in zip(t.lows, plan.lows))
    return sources, dict(MODES=tuple(low.mode for low in plan.lows),
                         ALIGNS=tuple(bool(low.align_corners) for low in plan.lows))


def _common(t: HeadTensors, force_int64: bool) -> Tuple[list, dict]:
    x0 = t.x0
    args = [x0, tuple(x0.stride()), x0.shape[1], x0.shape[2], x0.shape[3], t.w0, tuple(t.w0.stride()), t.w0.shape[0]]
    consts = dict(F64=x0.dtype == torch.float64, INT64=force_int64 or needs_int64(x0, *t.lows),
                  PRECISION=_precision(x0.dtype), **_blocks(t))
    return args, consts


def _acc_dtype(t: HeadTensors) -> torch.dtype:
    return torch.float64 if t.x0.dtype == torch.float64 else torch.float32


def head_batch_stats(plan: HeadPlan, t: HeadTensors, force_int64: bool = False) -> Tuple[Tensor, Tensor]:
    """(mean, biased var) over (N, H, W) of s = W0 x0 + sum_j Up(P_j), float64, from per-tile partials
    merged with Chan's parallel formula (no E[s^2] - E[s]^2 cancellation)."""
    N, _, H, W = t.x0.shape
    M = t.w0.shape[0]
    common, consts = _common(t, force_int64)
    lows, low_consts = _lows(plan, t)
    consts.pop("KP")
    options = _configure("_head_stats_kernel", t, lows, consts, low_consts)
    block_p = consts["BLOCK_P"]
    tiles = cdiv(H * W, block_p)
    R = tiles * N
    parts = _empty((2, R, M), _acc_dtype(t), t.x0.device)
    with _device_context(t.x0):
        _head_stats_kernel[launch_grid(tiles, N)](*common, parts, R, lows, **consts, **low_consts, num_warps=4,
                                                  **options)
    counts = torch.full((tiles,), float(block_p), dtype=torch.float64, device=t.x0.device)
    counts[-1] = H * W - (tiles - 1) * block_p
    counts = counts.repeat(N)[:, None]
    sums, m2 = parts[0].double(), parts[1].double()
    total = counts.sum()
    mean = sums.sum(0) / total
    tile_means = sums / counts
    var = (m2.sum(0) + (counts * (tile_means - mean) ** 2).sum(0)) / total
    return mean, var


def head_forward(plan: HeadPlan, t: HeadTensors, scale: Tensor, shift: Tensor, force_int64: bool = False) -> Tensor:
    """logits [N, K, H, W] = Wc . ReLU(s * scale + shift) + bc, never materialising s."""
    N, _, H, W = t.x0.shape
    K = t.wc.shape[0]
    fmt = torch.channels_last if t.x0.stride(1) == 1 and t.x0.shape[1] > 1 else torch.contiguous_format
    out = _empty((N, K, H, W), t.x0.dtype, t.x0.device, fmt)
    common, consts = _common(t, force_int64)
    lows, low_consts = _lows(plan, t)
    tile = _forward_tile(t.x0.element_size(), _acc_dtype(t).itemsize, consts["C0P"], consts["KP"],
                         consts["BLOCK_M"], plan.lows, tuple(p.shape[2:] for p in t.lows),
                         device_limits(t.x0.device))
    if t.x0.dtype == torch.float32:  # fp32 accuracy from the tensor cores: each operand split in two tf32
        consts["PRECISION"] = "tf32x3"
    consts.update(BLOCK_M=tile.block_m, TILE_H=tile.tile_h, TILE_W=tile.tile_w, PATCH_H=tile.patch_h,
                  PATCH_W=tile.patch_w, SRC=tile.src, CL=tuple(p.stride(1) == 1 for p in t.lows))
    grid = launch_grid(cdiv(H, tile.tile_h) * cdiv(W, tile.tile_w), N)
    with _device_context(t.x0):
        _head_forward_kernel[grid](*common, scale, shift, t.wc, tuple(t.wc.stride()), K,
                                   t.bc if t.bc is not None else scale, out, tuple(out.stride()), lows,
                                   HAS_BC=t.bc is not None, **consts, **low_consts, num_warps=tile.num_warps,
                                   num_stages=tile.num_stages)
    return out


def head_backward_reduce(plan: HeadPlan, t: HeadTensors, scale: Tensor, shift: Tensor, grad: Tensor,
                         force_int64: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """(dWc [K, M], sum_p dA, sum_p dA * s) where dA = Wc^T grad, zeroed where a <= 0, is the gradient at BN's
    output; the caller forms scale/shift (or BN weight/bias) gradients and BN's batch-statistics terms from them."""
    N, C0, H, W = t.x0.shape
    M, K = t.w0.shape[0], t.wc.shape[0]
    common, consts = _common(t, force_int64)
    lows, low_consts = _lows(plan, t)
    options = _configure("_head_backward_reduce_kernel", t, lows, consts, low_consts)
    acc = _acc_dtype(t)
    block_m, block_p = consts["BLOCK_M"], consts["BLOCK_P"]
    tiles = cdiv(H * W, block_p) * N
    splits = max(1, min(tiles, 64))
    dwc_parts = _empty((splits, consts["KP"], M), acc, t.x0.device)
    sums = _empty((2, splits, M), acc, t.x0.device)
    with _device_context(t.x0):
        _head_backward_reduce_kernel[launch_grid(cdiv(M, block_m), splits)](
            *common, scale, shift, t.wc, tuple(t.wc.stride()), K, grad, tuple(grad.stride()), dwc_parts, sums, splits,
            tiles, lows, **consts, **low_consts, num_warps=4, **options)
    dwc = dwc_parts.sum(0)[:K]
    sum_da, sum_da_s = sums[0].sum(0), sums[1].sum(0)
    return dwc, sum_da, sum_da_s


def head_backward_ds(plan: HeadPlan, t: HeadTensors, scale: Tensor, shift: Tensor, grad: Tensor,
                     alpha: Optional[Tensor] = None, beta: Optional[Tensor] = None,
                     force_int64: bool = False) -> Tensor:
    """ds [N, M, H, W] (x0's dtype): dA * scale, plus alpha + beta * s when BN used batch statistics."""
    N, C0, H, W = t.x0.shape
    M, K = t.w0.shape[0], t.wc.shape[0]
    common, consts = _common(t, force_int64)
    lows, low_consts = _lows(plan, t)
    fmt = torch.channels_last if t.x0.stride(1) == 1 and C0 > 1 else torch.contiguous_format
    ds = _empty((N, M, H, W), t.x0.dtype, t.x0.device, fmt)
    if needs_int64(ds):
        consts["INT64"] = True
    options = _configure("_head_backward_ds_kernel", t, lows, consts, low_consts)
    grid = launch_grid(cdiv(H * W, consts["BLOCK_P"]), cdiv(M, consts["BLOCK_M"]), N)
    with _device_context(t.x0):
        _head_backward_ds_kernel[grid](
            *common, scale, shift, alpha if alpha is not None else scale, beta if beta is not None else scale,
            t.wc, tuple(t.wc.stride()), K, grad, tuple(grad.stride()), ds, tuple(ds.stride()), lows,
            BATCH_STATS=alpha is not None, **consts, **low_consts, num_warps=4, **options)
    return ds


def upsample_adjoint(plan: HeadPlan, ds: Tensor, lows: Sequence[Tensor]) -> List[Tensor]:
    """dP_j = Up_j^T(ds) with the fusion op's deterministic gather (a same-size branch: a copy of ds)."""
    int64 = needs_int64(ds)
    dz_only = (True, False, False)
    return [ds.clone() if low.mode == SAME else upsample_term_backward(low, ds, p, None, None, dz_only, int64)[0]
            for low, p in zip(plan.lows, lows)]
