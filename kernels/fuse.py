"""Triton kernels for the multi-resolution fusion step of one HRNet output branch.

    y = ReLU( sum_k Up_k(x_k) * scale_k + shift_k )

Up_k is identity for terms already at the output size, else nearest or bilinear upsampling with
`F.interpolate`'s index rules; (scale_k, shift_k) is an optional per-channel affine map (BN, folded or with
batch statistics), applied after the gather because every Up kernel's weights sum to 1.

The kernels take the plan's terms as tuples with one entry per term: runtime ones (the sources of
`resample.source_args`, scale / shift / gradient pointers) and constexpr ones from the `TermPlan`s (MODES,
ALIGNS, HAS_SCALE, ...), unrolled with `tl.static_range`; each term count and mix of modes compiles to its
own variant.

Forward: one program per [BLOCK_C channels x BLOCK_H rows x BLOCK_W columns] tile of one image; every term is read
once, the sum stays in fp32 (fp64 for fp64 inputs), y is written once. Resampling is separable: source taps and
weights once per tile row and column (`resample.term_grid`), shared by the tile's channels and the other axis.
Channel blocks fit HRNet's channel counts (`resample.channel_block`). Strides are arguments: NCHW and channels_last
need no copies. Up to MAX_TERMS terms per launch; more chain through a partial sum. bf16 / fp16 / fp32 terms upsampled
by powers of 2 take the phase form (`_fuse_forward_phases`, `_phase_launch`): a thread owns a G x G output block of
one channel, loads each source pixel once, reuses each source row's horizontal interpolation for every output row
that reads it (compile-time taps and weights; same arithmetic, same order), and can write the ReLU's bits (BITS).

Backward: `_fuse_backward_same_kernel` applies the ReLU mask once, writes the gradients of all output-size
terms in one launch and, if there are upsampled terms, the masked gradient g (which is also the gradient of
an unscaled output-size term: that term gets g itself, not a copy). `_upsample_adjoint_kernel` then runs per
upsampled term on [channels x rows x columns] tiles of source pixels: the adjoint of Up as a gather (each
source pixel sums the output pixels that read it, with their weights, computed per tile row and column).
bf16 / fp16 / fp32 terms upsampled bilinearly by 2, 4 or 8 take its phase form instead (`_adjoint_phases`): no loop,
a thread owns a few source pixels of one source row, reads its window of g once per row as vectors (NCHW) or
column by column (channels_last), sums it over the window's rows with compile-time tent weights, then over
each pixel's columns. Where a row has several such terms, `_adjoint_row_kernel` runs them in one launch that
reads g once (a program owns a row of the coarsest term's source pixels and the finer terms' source rows under
it; the same arithmetic per term, so the same bits as one launch per term); a step's rows can share one
`_adjoint_rows_kernel` launch. No atomics anywhere: per-channel gradients are per-tile partial sums, all of a
backward call in one buffer, reduced in a fixed order by one `_reduce_partials_kernel` launch straight into
each gradient's own [C] tensor (no ATen sums or copies), so results are bitwise deterministic.
"""
from __future__ import annotations

import functools
import math
import os
from contextlib import nullcontext
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hrfast.plan import FusePlan, TermPlan

from .resample import (BILINEAR, NEAREST, SAME, INT32_LIMIT, adjoint_weight, bilinear_ratio, cdiv,  # noqa: F401
                       channel_block, first_reader, grid_offsets, launch_grid, load_term, needs_int64,
                       next_power_of_2, source_args, term_grid, tile_offsets)

# Terms per forward launch. The compiler issues every term's loads before summing, so registers grow with the
# terms: for sm_90, C=48 at 256x512, fp32 NCHW, one output-size and 3 bilinear terms take 106 registers; with
# 4 bilinear terms 56 bytes spill, with 17 terms (12 bilinear) in one launch 14 KB. The backward kernel of the
# output-size terms holds one term's values at a time and takes them all in one launch.
MAX_TERMS = 4
# Tests set this (or HRFAST_POISON=1): every buffer a launcher allocates starts as NaN (an integer one as its
# most negative value), so an element a kernel forgets to write fails the comparison instead of passing with
# stale memory.
POISON_OUTPUTS = os.environ.get("HRFAST_POISON", "0") == "1"

Grads = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]  # (dx, dscale, dshift) of one term


@triton.jit
def _fuse_forward_kernel(
    out_ptr, C, H, W, out_strides, sources, scales, shifts, relu_bits, bits_strides,
    MODES: tl.constexpr, ALIGNS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    RELU: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    G: tl.constexpr = 0, FH: tl.constexpr = None, FW: tl.constexpr = None, BITS: tl.constexpr = False,
):
    """One [BLOCK_C, BLOCK_H, BLOCK_W] output tile per program; the tile's tail (rows, columns, channels past
    the tensor) clamped onto the last valid index for every load, masked only at the store; EXACT: the tiles
    cover the output exactly, no mask. G > 0: the phase form (`_fuse_forward_phases`), for terms upsampled by
    powers of 2 (FH / FW: each term's factors), tiles of G rows; BITS: it writes the ReLU's bits too."""
    _fuse_forward_program(tl.program_id(0), tl.program_id(1), tl.program_id(2), out_ptr, C, H, W, out_strides,
                          sources, scales, shifts, relu_bits, bits_strides, MODES, ALIGNS, HAS_SCALE, HAS_SHIFT,
                          RELU, F64, INT64, EXACT, BLOCK_C, BLOCK_H, BLOCK_W, G, FH, FW, BITS)


@triton.jit
def _fuse_forward_rows_kernel(rows, MODES: tl.constexpr, ALIGNS: tl.constexpr, HAS_SCALE: tl.constexpr,
                              HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, EXACT: tl.constexpr, BITS: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, G: tl.constexpr,
                              FH: tl.constexpr, FW: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr):
    """A step's rows in one launch (`fuse_forward_rows`): programs [start, end) of the 1-D grid are row k's
    (`rows[k]` = (out, C, H, W, out strides, sources, scales, shifts, ReLU bits and strides, pixel tiles,
    channel blocks, start, end); its constexprs are entry k of the tuples), each one program of
    `_fuse_forward_kernel`'s grid for that row, pixel tiles fastest, then channel blocks, then images."""
    pid = tl.program_id(0)
    for k in tl.static_range(len(rows)):
        out_ptr, C, H, W, out_strides, sources, scales, shifts, bits, b_strides, tiles_p, tiles_c, start, end = rows[k]
        if (pid >= start) & (pid < end):
            local = pid - start
            _fuse_forward_program(local % tiles_p, local // tiles_p % tiles_c, local // tiles_p // tiles_c,
                                  out_ptr, C, H, W, out_strides, sources, scales, shifts, bits, b_strides,
                                  MODES[k], ALIGNS[k], HAS_SCALE[k], HAS_SHIFT[k], RELU[k], F64, INT64, EXACT[k],
                                  BLOCK_C[k], BLOCK_H[k], BLOCK_W[k], G[k], FH[k], FW[k], BITS[k])


@triton.jit
def _fuse_forward_program(pid_p, pid_c, n, out_ptr, C, H, W, out_strides, sources, scales, shifts, relu_bits,
                          bits_strides, MODES: tl.constexpr, ALIGNS: tl.constexpr, HAS_SCALE: tl.constexpr,
                          HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr,
                          EXACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                          G: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, BITS: tl.constexpr):
    """Program (pid_p, pid_c, n) of `_fuse_forward_kernel`: the phase form (G > 0) or the general tile."""
    if G > 0:
        _fuse_forward_phases(pid_p, pid_c, n, out_ptr, W, out_strides, sources, scales, shifts, relu_bits,
                             bits_strides, MODES, FH, FW, HAS_SCALE, HAS_SHIFT, RELU, INT64, G, BLOCK_C,
                             BLOCK_W // G, BITS)
    else:  # BITS: the phase form only (`_phase_launch`)
        _fuse_forward_tile(pid_p, pid_c, n, out_ptr, C, H, W, out_strides, sources, scales, shifts, MODES, ALIGNS,
                           HAS_SCALE, HAS_SHIFT, RELU, F64, INT64, EXACT, BLOCK_C, BLOCK_H, BLOCK_W)


@triton.jit
def _fuse_forward_tile(pid_p, pid_c, n, out_ptr, C, H, W, out_strides, sources, scales, shifts,
                       MODES: tl.constexpr, ALIGNS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                       RELU: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr, EXACT: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    tiles_w = tl.cdiv(W, BLOCK_W)
    oy = (pid_p // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    ox = (pid_p % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if EXACT:
        cy, cx, cc = oy, ox, c
    else:
        cy = tl.minimum(oy, H - 1)
        cx = tl.minimum(ox, W - 1)
        cc = tl.minimum(c, C - 1)
    # the first term initialises the sum (not 0 + term: that would turn -0.0 into +0.0)
    acc = _affine_term(n, cc, cy, cx, sources[0], scales[0], shifts[0],
                       MODES[0], ALIGNS[0], HAS_SCALE[0], HAS_SHIFT[0], F64, INT64)
    for k in tl.static_range(1, len(sources)):
        acc += _affine_term(n, cc, cy, cx, sources[k], scales[k], shifts[k],
                            MODES[k], ALIGNS[k], HAS_SCALE[k], HAS_SHIFT[k], F64, INT64)
    if RELU:
        acc = relu(acc)
    offsets = grid_offsets(n, c, oy, ox, out_strides, INT64)
    if EXACT:
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty))
    else:
        mask = ((c < C)[:, None, None] & (oy < H)[None, :, None]) & (ox < W)[None, None, :]
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_term(n, c, oy, ox, src, scale_ptr, shift_ptr, MODE: tl.constexpr, ALIGN: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr):
    """Up(x) * scale + shift on a [BLOCK_C, BLOCK_H, BLOCK_W] tile (c, oy, ox: its channels, rows and columns,
    clamped in range), in the accumulation dtype."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    v = term_grid(n, c, oy, ox, src, MODE, ALIGN, F64, INT64)
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + c).to(acc_t)[:, None, None]
    if HAS_SHIFT:
        v = v + tl.load(shift_ptr + c).to(acc_t)[:, None, None]
    return v


@triton.jit
def relu(v):
    """torch.relu's: NaN stays NaN (tl.maximum would give 0) and -0.0 stays -0.0."""
    return tl.where(v < 0.0, 0.0, v)


@triton.jit
def relu_backward(y, g):
    """ATen's threshold_backward, ReLU's gradient: g zeroed only where y <= 0, so NaN y passes g."""
    return tl.where(y <= 0.0, 0.0, g)


# ------------------------------------------------------------------------------------ forward, phase kernel


@triton.constexpr_function
def _tap_slot(phase, f):
    """Slot (source pixel relative to the group's first, -1 .. G/f) of the first bilinear tap of output phase
    `phase` along a x f axis (f a power of 2): real = (d + 0.5) / f - 0.5 = group start + phase // f + frac."""
    return phase // f - (1 if 2 * (phase % f) < f else 0)


@triton.constexpr_function
def _tap_l1(phase, f):
    """Weight of the second bilinear tap of output phase `phase` along a x f axis, away from the image's first
    pixels: ATen's real - i0, a dyadic fraction, so the float32 constant is exactly ATen's float32 value."""
    b = phase % f
    frac = (b + 0.5) / f - 0.5
    return frac + 1.0 if 2 * b < f else frac


@triton.constexpr_function
def _tap_l0(phase, f):
    b = phase % f
    frac = (b + 0.5) / f - 0.5
    return 1.0 - (frac + 1.0 if 2 * b < f else frac)


@triton.jit
def _phase_index(g, j: tl.constexpr, q: tl.constexpr, n_in):
    """Source index of slot j (-1 .. q) of phase group(s) g (q source pixels per group), clamped into the image.
    Slot -1 of group 0 (ATen's index clamps at 0 there: taps 0 and 1, weights 1 and 0) reads index 1 and gets
    weight 0, the group's slot 0 (index 0) weight 1: the same products, so the same sum, NaN from a non-finite
    value at zero weight included."""
    if j < 0:
        i = tl.where(g == 0, tl.minimum(n_in - 1, 1), g * q - 1)
    else:
        i = tl.minimum(g * q + j, n_in - 1)
    return i


@triton.jit
def _cat_phases(t, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, G: tl.constexpr):
    """The G tensors of t ([BLOCK_C, BLOCK_Q] each, output column phases 0..G-1) as one [BLOCK_C, BLOCK_Q, G]
    tensor, phase p at [..., p] (tl.join interleaves: join(a, b) of [..., k] tensors is a0 b0 a1 b1 ...)."""
    if G == 2:
        v = tl.join(t[0], t[1])
    elif G == 4:
        v = tl.reshape(tl.join(tl.join(t[0], t[2]), tl.join(t[1], t[3])), [BLOCK_C, BLOCK_Q, 4])
    else:
        v = tl.reshape(tl.join(tl.join(tl.join(t[0], t[4]), tl.join(t[2], t[6])),
                               tl.join(tl.join(t[1], t[5]), tl.join(t[3], t[7]))), [BLOCK_C, BLOCK_Q, 8])
    return v


@triton.jit
def _phase_source(chan, gy, gx, src, MODE: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, G: tl.constexpr,
                  INT64: tl.constexpr):
    """What a resampled term's rows of one program need from its source, in the accumulation dtype: per source
    row slot a tuple over the G output column phases of [BLOCK_C, BLOCK_Q] tensors. Bilinear: slots -1 .. G/FH
    (tuple index slot + 1), each the row's horizontal interpolation w0l * v0 + w1l * v1 (ATen's inner sums).
    Nearest: slots 0 .. G/FH - 1, the source values."""
    x_ptr, h, w, strides, ratio_h, ratio_w = src
    s_n, s_c, s_h, s_w = strides
    QH: tl.constexpr = G // FH
    QW: tl.constexpr = G // FW
    LO: tl.constexpr = -1 if MODE == 2 else 0
    HI: tl.constexpr = QW + 1 if MODE == 2 else QW
    HI_H: tl.constexpr = QH + 1 if MODE == 2 else QH
    cols = ()
    for j in tl.static_range(LO, HI):
        ix = _phase_index(gx, j, QW, w)
        if INT64:
            ix = ix.to(tl.int64)
        cols = cols + ((ix * s_w)[None, :],)
    rows = ()
    for jr in tl.static_range(LO, HI_H):
        iy = _phase_index(gy, jr, QH, h)
        if INT64:
            iy = iy.to(tl.int64)
        base = x_ptr + (chan + iy * s_h)
        v = ()
        for j in tl.static_range(HI - LO):
            v = v + (tl.load(base + cols[j]).to(tl.float32),)
        if MODE == 2:
            row = ()
            for p in tl.static_range(G):
                # taps: slots _tap_slot(p, FW) and the next (tuple index slot - LO)
                if 2 * p < FW:  # the image's first columns: (0, 1) at group 0
                    first = (gx == 0)[None, :]
                    l0 = tl.where(first, 0.0, _tap_l0(p, FW))
                    l1 = tl.where(first, 1.0, _tap_l1(p, FW))
                    row = row + (l0 * v[_tap_slot(p, FW) - LO] + l1 * v[_tap_slot(p, FW) - LO + 1],)
                else:
                    row = row + (_tap_l0(p, FW) * v[_tap_slot(p, FW) - LO]
                                 + _tap_l1(p, FW) * v[_tap_slot(p, FW) - LO + 1],)
        else:
            row = ()
            for p in tl.static_range(G):
                row = row + (v[p // FW],)
        rows = rows + (row,)
    return rows


@triton.jit
def _phase_row(rows, r: tl.constexpr, gy, affine, MODE: tl.constexpr, FH: tl.constexpr,
               HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
               G: tl.constexpr):
    """Output row phase r of a resampled term (Up(x) * scale + shift) as a [BLOCK_C, BLOCK_Q, G] tensor."""
    out = ()
    if MODE == 2:
        if 2 * r < FH:  # the image's first rows
            l0 = tl.where(gy == 0, 0.0, _tap_l0(r, FH))
            l1 = tl.where(gy == 0, 1.0, _tap_l1(r, FH))
        else:
            l0 = _tap_l0(r, FH)
            l1 = _tap_l1(r, FH)
        for p in tl.static_range(G):
            # ATen's order: h0l * (w0l * v00 + w1l * v01) + h1l * (w0l * v10 + w1l * v11)
            out = out + (l0 * rows[_tap_slot(r, FH) + 1][p] + l1 * rows[_tap_slot(r, FH) + 2][p],)
    else:
        for p in tl.static_range(G):
            out = out + (rows[r // FH][p],)
    return _phase_affine(_cat_phases(out, BLOCK_C, BLOCK_Q, G), affine, HAS_SCALE, HAS_SHIFT)


@triton.jit
def _phase_affine(v, affine, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    if HAS_SCALE:
        v = v * affine[0]
    if HAS_SHIFT:
        v = v + affine[1]
    return v


@triton.jit
def _fuse_forward_phases(pid_p, pid_c, n, out_ptr, W, out_strides, sources, scales, shifts, relu_bits, bits_strides,
                         MODES: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, HAS_SCALE: tl.constexpr,
                         HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, INT64: tl.constexpr, G: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, BITS: tl.constexpr = False):
    """`_fuse_forward_kernel` for terms upsampled by powers of 2 (bilinear without align_corners, or nearest;
    FH[k] / FW[k] the factors, dividing G) in float32 accumulation: one program per G output rows x
    BLOCK_Q * G columns x BLOCK_C channels, which the launcher made cover the output exactly (no masks). Each
    thread owns G columns of one channel: every source pixel its rows read is loaded and converted once, each
    source row's horizontal interpolation computed once per output column and shared by the output rows that
    read it, taps and weights are constants (phases unrolled), and each output row's G columns are stored (an
    output-size term's read) as one vector. Same arithmetic, in the same order, as `_fuse_forward_kernel`.

    BITS (G = 8, ReLU): also the ReLU's backward mask, a bit per element: bit r of byte (n, c, gy, x) of
    `relu_bits` ([N, C, H / 8, W] uint8) is 0 where output (n, c, 8 gy + r, x) as stored is <= 0 (where
    `relu_backward` zeroes the gradient), else 1 (NaN included). The thread's G rows of a column are one byte,
    gathered in registers; the backward reads 1/16 of y's bytes in bf16 (`_same_row_backward`)."""
    tiles_q = W // (G * BLOCK_Q)
    gy = pid_p // tiles_q
    gx = (pid_p % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    nn = n
    cc = c
    if INT64:
        nn = n.to(tl.int64)
        cc = c.to(tl.int64)
        gxo = gx.to(tl.int64)
    else:
        gxo = gx
    phase = tl.arange(0, G)
    prepared = ()
    affines = ()
    for k in tl.static_range(len(sources)):
        scale = 0.0
        shift = 0.0
        if HAS_SCALE[k]:
            scale = tl.load(scales[k] + c).to(tl.float32)[:, None, None]
        if HAS_SHIFT[k]:
            shift = tl.load(shifts[k] + c).to(tl.float32)[:, None, None]
        affines = affines + ((scale, shift),)
        s_n, s_c, s_h, s_w = sources[k][3]
        chan = (nn * s_n + cc * s_c)[:, None]
        if MODES[k] == 0:
            prepared = prepared + ((chan[:, :, None] + ((G * gxo)[None, :, None] + phase[None, None, :]) * s_w,),)
        else:
            prepared = prepared + (_phase_source(chan, gy, gx, sources[k], MODES[k], FH[k], FW[k], G, INT64),)
    o_n, o_c, o_h, o_w = out_strides
    out_base = (nn * o_n + cc * o_c)[:, None, None] + ((G * gxo)[None, :, None] + phase[None, None, :]) * o_w
    bits = 0
    for r in tl.static_range(G):
        oy = G * gy + r
        if INT64:
            oy = oy.to(tl.int64)
        for k in tl.static_range(len(sources)):
            if MODES[k] == 0:
                x_ptr, h, w, strides, ratio_h, ratio_w = sources[k]
                v = _phase_affine(tl.load(x_ptr + (prepared[k][0] + oy * strides[2])).to(tl.float32), affines[k],
                                  HAS_SCALE[k], HAS_SHIFT[k])
            else:
                v = _phase_row(prepared[k], r, gy, affines[k], MODES[k], FH[k], HAS_SCALE[k], HAS_SHIFT[k],
                               BLOCK_C, BLOCK_Q, G)
            # the first term initialises the sum (not 0 + term: that would turn -0.0 into +0.0)
            if k == 0:
                acc = v
            else:
                acc += v
        if RELU:
            acc = relu(acc)
        y = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + (out_base + oy * o_h), y)
        if BITS:  # from y as stored: a sum that rounds to 0 is masked, as relu_backward(y) masks it
            bits = bits | tl.where(y.to(tl.float32) <= 0.0, 0, 1 << r)
    if BITS:
        tl.static_assert(G == 8 and RELU, "a byte holds the bits of 8 rows")
        b_n, b_c, b_h, b_w = bits_strides
        bits_base = (nn * b_n + cc * b_c)[:, None, None] + ((G * gxo)[None, :, None] + phase[None, None, :]) * b_w
        tl.store(relu_bits + (bits_base + gy * b_h), bits.to(tl.uint8))


# ------------------------------------------------------------------------------------------------- backward


@triton.jit
def _same_term_backward(g, n, c, c_mask, oy, ox, mask, part_ptr, row, R, C, term,
                        SLOT: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_DX: tl.constexpr,
                        NEED_DSCALE: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr):
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    x_ptr, x_strides, scale_ptr, dx_ptr, dx_strides = term
    if NEED_DX:
        dx = g
        if HAS_SCALE:
            dx = g * tl.load(scale_ptr + c, mask=c_mask, other=0.0).to(acc_t)[:, None]
        tl.store(dx_ptr + tile_offsets(n, c, oy, ox, dx_strides, INT64), dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DSCALE:
        x = tl.load(x_ptr + tile_offsets(n, c, oy, ox, x_strides, INT64), mask=mask, other=0.0).to(acc_t)
        tl.store(part_ptr + (SLOT * R + row) * C + c, tl.sum(g * x, axis=1), mask=c_mask)


@triton.jit
def _fuse_backward_same_kernel(rows, HAS_SCALE: tl.constexpr, NEED_DX: tl.constexpr, NEED_DSCALE: tl.constexpr,
                               RELU: tl.constexpr, WRITE_G: tl.constexpr, NEED_SUM_G: tl.constexpr,
                               F64: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_P: tl.constexpr, RELU_BITS: tl.constexpr):
    """The output-size backward of one fusion row, or of a step's rows in one launch: programs [start, end) of
    the 1-D grid are row k's (`rows[k]` = (grad_y, y, g, partial sums, N, C, H, W with strides, its output-size
    terms, start, end); its constexprs are entry k of the tuples), `_same_row_backward` each. RELU_BITS[k]: row
    k's y is its ReLU bits (`_fuse_forward_phases`)."""
    pid = tl.program_id(0)
    for k in tl.static_range(len(rows)):
        (gy_ptr, gy_strides, y_ptr, y_strides, g_ptr, g_strides, part_ptr, N, C, H, W, terms, start,
         end) = rows[k]
        if (pid >= start) & (pid < end):
            _same_row_backward(pid - start, gy_ptr, gy_strides, y_ptr, y_strides, g_ptr, g_strides, part_ptr, N, C,
                               H, W, terms, HAS_SCALE[k], NEED_DX[k], NEED_DSCALE[k], RELU[k], WRITE_G[k],
                               NEED_SUM_G[k], F64, INT64, BLOCK_C[k], BLOCK_P[k], RELU_BITS[k])


@triton.jit
def _same_row_backward(pid, gy_ptr, gy_strides, y_ptr, y_strides, g_ptr, g_strides, part_ptr, N, C, H, W, terms,
                       HAS_SCALE: tl.constexpr, NEED_DX: tl.constexpr, NEED_DSCALE: tl.constexpr,
                       RELU: tl.constexpr, WRITE_G: tl.constexpr, NEED_SUM_G: tl.constexpr, F64: tl.constexpr,
                       INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                       RELU_BITS: tl.constexpr = False):
    """Program `pid` of one row (pixel block fastest, then channel block, then image) on a [BLOCK_C x BLOCK_P]
    tile: g = relu_backward(y, grad_y); per output-size term k = (x, x strides, scale, dx, dx strides): dx_k = g *
    scale_k and partials of sum(g * x_k) (slot k, R = pixel blocks x N rows); partials of sum(g) in the slot after
    the terms'."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    tiles_p = tl.cdiv(H * W, BLOCK_P)
    pid_p = pid % tiles_p
    pid_c = pid // tiles_p % tl.cdiv(C, BLOCK_C)
    n = pid // tiles_p // tl.cdiv(C, BLOCK_C)
    R = tiles_p * N
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < H * W
    c_mask = c < C
    mask = c_mask[:, None] & p_mask[None, :]
    oy = p // W
    ox = p % W
    row = n * tiles_p + pid_p
    g = tl.load(gy_ptr + tile_offsets(n, c, oy, ox, gy_strides, INT64), mask=mask, other=0.0)
    g = g.to(acc_t)
    if RELU_BITS:  # y_ptr: the bits, [N, C, H / 8, W]; bit 0 where y <= 0 (relu_backward's mask)
        # c, contiguous in runs of at most one 128-bit vector of grad_y: 1-byte loads of 16 channels would
        # give the tile another layout than grad_y's (more shuffles in the channel sums)
        VEC: tl.constexpr = 128 // gy_ptr.dtype.element_ty.primitive_bitwidth
        c_vec = (c // VEC) * VEC + c % VEC
        bits = tl.load(y_ptr + tile_offsets(n, c_vec, oy // 8, ox, y_strides, INT64), mask=mask, other=0)
        g = tl.where(((bits.to(tl.int32) >> (oy % 8)[None, :]) & 1) == 0, 0.0, g)
    elif RELU:
        y = tl.load(y_ptr + tile_offsets(n, c, oy, ox, y_strides, INT64), mask=mask, other=0.0)
        g = relu_backward(y, g)
    if WRITE_G:
        tl.store(g_ptr + tile_offsets(n, c, oy, ox, g_strides, INT64), g.to(g_ptr.dtype.element_ty), mask=mask)
    if NEED_SUM_G:
        tl.store(part_ptr + (len(terms) * R + row) * C + c, tl.sum(g, axis=1), mask=c_mask)
    for k in tl.static_range(len(terms)):
        _same_term_backward(g, n, c, c_mask, oy, ox, mask, part_ptr, row, R, C, terms[k],
                            k, HAS_SCALE[k], NEED_DX[k], NEED_DSCALE[k], F64, INT64)


@triton.jit
def _upsample_adjoint_kernel(
    g_ptr, g_strides, H, W, scale_ptr, dz_ptr, dz_strides, part_ptr, R, C, src, window_h, window_w,
    MODE: tl.constexpr, ALIGN: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_DZ: tl.constexpr,
    NEED_DSCALE: tl.constexpr, NEED_DSHIFT: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    PH: tl.constexpr = 0, PW: tl.constexpr = 0, PQ: tl.constexpr = 0, COLS: tl.constexpr = False,
):
    """u = Up^T(g) at the source z's resolution; dz = u * scale; partials of sum(u * z) (slot 0), sum(u) (slot 1).

    One [BLOCK_C, BLOCK_H, BLOCK_W] tile of source pixels per program. Each source pixel s gathers the output
    pixels d in a window [first_reader(s), + K) per axis and weighs them with the forward's own index rules, so
    the window only has to be wide enough, never exact. The weights are separable: computed per tile row (ky)
    and per tile column (kx), multiplied once per pixel, shared by the channels; reads of zero weight are
    skipped (masked), as an output pixel outside the image has weight 0.

    PH, PW > 0: the phase form (`_adjoint_phases`, below) for bilinear (no align_corners) by the powers of 2
    PH x PW, loop-free: one source row of BLOCK_W columns per program, PQ of them per thread (BLOCK_H = 1),
    g's columns read one by one where COLS (channels_last), else as vectors along its rows; window_h /
    window_w unused.
    """
    if PH > 0:
        _adjoint_phases(g_ptr, g_strides, H, scale_ptr, dz_ptr, dz_strides, part_ptr, R, C, src, HAS_SCALE,
                        NEED_DZ, NEED_DSCALE, NEED_DSHIFT, INT64, PH, PW, PQ, COLS, BLOCK_C, BLOCK_W // PQ)
    else:
        _adjoint_gather(g_ptr, g_strides, H, W, scale_ptr, dz_ptr, dz_strides, part_ptr, R, C, src, window_h,
                        window_w, MODE, ALIGN, HAS_SCALE, NEED_DZ, NEED_DSCALE, NEED_DSHIFT, F64, INT64, BLOCK_C,
                        BLOCK_H, BLOCK_W, _is_one(g_strides[1]))


@triton.constexpr_function
def _is_one(x):
    """Whether x is the integer 1 at compile time (a kernel argument Triton specialized; under the interpreter,
    any 1): False for a run-time value. Only a kernel's own arguments: passed on to a @jit function, a
    specialized tuple element arrives as a tensor."""
    return isinstance(x, int) and x == 1


@triton.jit
def _adjoint_gather(g_ptr, g_strides, H, W, scale_ptr, dz_ptr, dz_strides, part_ptr, R, C, src, window_h, window_w,
                    MODE: tl.constexpr, ALIGN: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_DZ: tl.constexpr,
                    NEED_DSCALE: tl.constexpr, NEED_DSHIFT: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, COLS: tl.constexpr):
    """The general `_upsample_adjoint_kernel`: windows [first_reader(s), + K), two loops. COLS: g's channel
    stride is the constant 1 (channels_last)."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    z_ptr, h, w, z_strides, ratio_h, ratio_w = src
    KH, step_h, off_h = window_h
    KW, step_w, off_w = window_w
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    tiles_w = tl.cdiv(w, BLOCK_W)
    qy = (pid_p // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    qx = (pid_p % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    # the tile's tail clamped onto the last source pixel / channel: it computes a valid value, never stored.
    # channels_last: wrapped (c % C), which keeps the channels' contiguity where C is a multiple of 16 (vector
    # loads along them; min(c, C - 1) loses it)
    sy = tl.minimum(qy, h - 1)
    sx = tl.minimum(qx, w - 1)
    if COLS:
        cc = c % C
    else:
        cc = tl.minimum(c, C - 1)
    ry = ratio_h[0]
    rx = ratio_w[0]
    if MODE == 2:
        ry = bilinear_ratio(ratio_h, F64)
        rx = bilinear_ratio(ratio_w, F64)
    lo_y = first_reader(sy, ry, step_h, off_h, MODE, ALIGN, F64)
    lo_x = first_reader(sx, rx, step_w, off_w, MODE, ALIGN, F64)
    s_n, s_c, s_h, s_w = g_strides
    # channels_last (COLS): the tile held as [channels, columns, rows], back to [channels, rows, columns] for the
    # epilogue. Triton spreads a warp over the contiguous channels, then over the last axis, so a thread holds
    # several columns of one row (fp32: 4 channels x 4 columns x 1 row, not 4 rows x 1 column) and computes the
    # inner loop's row weight once, not once per row it holds. The same products and sums per element in the
    # same order: bitwise the same results either way.
    if COLS:
        u = tl.zeros([BLOCK_C, BLOCK_W, BLOCK_H], dtype=acc_t)
    else:
        u = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=acc_t)
    # columns outer: a thread holds many columns of few rows (NCHW: the layout follows the contiguous dz store),
    # so the column weights are the costly ones to compute; here once per kx, not once per (ky, kx)
    for kx in range(0, KW):
        dx = lo_x + kx
        wx = adjoint_weight(dx, sx, rx, w, W, MODE, ALIGN, F64)
        dx = tl.minimum(dx, W - 1)  # where dx >= W the weight is 0: any column in range will do
        for ky in range(0, KH):
            dy = lo_y + ky
            wy = adjoint_weight(dy, sy, ry, h, H, MODE, ALIGN, F64)
            if COLS:
                wgt = (wy[None, :] * wx[:, None]).to(acc_t)[None, :, :]
                offsets = grid_offsets(n, cc, dx, tl.minimum(dy, H - 1), (s_n, s_c, s_w, s_h), INT64)
            else:
                wgt = (wy[:, None] * wx[None, :]).to(acc_t)[None, :, :]
                offsets = grid_offsets(n, cc, tl.minimum(dy, H - 1), dx, g_strides, INT64)
            gv = tl.load(g_ptr + offsets, mask=wgt != 0.0, other=0.0)
            u += gv.to(acc_t) * wgt
    if COLS:
        u = tl.permute(u, (0, 2, 1))
    _adjoint_epilogue(u, n, c, cc, qy, qx, sy, sx, h, w, C, R, z_ptr, z_strides, scale_ptr, dz_ptr, dz_strides,
                      part_ptr, HAS_SCALE, NEED_DZ, NEED_DSCALE, NEED_DSHIFT, F64, INT64)


@triton.constexpr_function
def _tent(k, f):
    """Weight with which source s reads output s * f - f / 2 + k (k in [0, 2f)) along a x f bilinear axis
    (f a power of 2, no align_corners), away from the image's edges: ATen's l1 (k < f) or l0 (k >= f) of that
    output, a dyadic fraction, so the float32 constant is exactly the gather's float32 weight."""
    return (k + 0.5) / f if k < f else (2 * f - k - 0.5) / f


@triton.jit
def _tent_edge(k: tl.constexpr, f: tl.constexpr, first, last):
    """`_tent` at the image's edges: the outputs [0, f/2) read source 0 with weight 1 (ATen's index clamps at
    0: taps (0, 1), weights (1, 0)), the outputs [n f - f/2, n f) the last source with weight l0 + l1 = 1 (both
    taps on it). `first` / `last`: s == 0 / s == n - 1 (tensors or scalars)."""
    if 2 * k < f:
        v = _tent(k, f)
    elif k < f:
        v = tl.where(first, 1.0, _tent(k, f))
    elif 2 * k < 3 * f:
        v = tl.where(last, 1.0, _tent(k, f))
    else:
        v = _tent(k, f)
    return v


@triton.constexpr_function
def _piece(P, f, cols, vec, i=None, field=None):
    """How `_adjoint_phases` reads a thread's output columns [-f, (P + 1) f) (from s0 f, s0 its first source
    column) along a row: the number of pieces (i None), else piece i's (start, width)[field]. Vectors along the
    row (cols False, NCHW): the left group (its upper half used: left of s0's window), the P f middle columns
    in vectors of up to `vec` elements (16 bytes), the right group (its lower half used); where f > vec only
    those used halves (sm_90 W48 stage-4 fp32 row 0, `_adjoint_row_kernel`: issue / bytes 0.70 -> 0.41 against
    8-element fp32 pieces, which Triton splits over two lanes: shuffles in every window sum). cols (channels
    along the contiguous axis): each of the (P + 1) f columns [-f/2, P f + f/2) it uses on its own."""
    middle = min(vec, P * f)
    if cols:
        pieces = [(j - f // 2, 1) for j in range((P + 1) * f)]
    elif f > vec:  # the used halves only, themselves aligned vectors
        pieces = [(-f // 2, f // 2)] + [(m * middle, middle) for m in range(P * f // middle)] + [(P * f, f // 2)]
    else:
        pieces = [(-f, f)] + [(m * middle, middle) for m in range(P * f // middle)] + [(P * f, f)]
    return len(pieces) if i is None else pieces[i][field]


@triton.jit
def _adjoint_phases(g_ptr, g_strides, H, scale_ptr, dz_ptr, dz_strides, part_ptr, R, C, src,
                    HAS_SCALE: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DSCALE: tl.constexpr,
                    NEED_DSHIFT: tl.constexpr, INT64: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                    P: tl.constexpr, COLS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr):
    """`_upsample_adjoint_kernel` for bilinear (no align_corners) by the powers of 2 PH x PW, float32
    accumulation, g exactly PH x PW times z's size: one program per source row sy, BLOCK_Q * P columns and
    BLOCK_C channels, which the launcher made cover the source exactly (no tail); a thread owns P consecutive
    source pixels of one channel. Source s reads the outputs [s f - f/2, s f + 3 f/2) on each axis with the
    tent weights (`_tent`: compile-time constants; `_tent_edge` at the image's edges); outputs outside the image
    are not read (as the gather skips reads of weight 0). Separable, rows first: the thread's output columns
    [(s0 - 1) f, (s0 + P + 1) f) in pieces (`_piece`: aligned vectors, or single columns where COLS), each
    summed over the window's 2 PH rows with the row weights (in row order); then each source pixel's u = its
    window's columns of those sums with the column weights (in column order). A fixed order: deterministic."""
    # 16-byte vectors along a row (`_piece`)
    VEC: tl.constexpr = 128 // g_ptr.dtype.element_ty.primitive_bitwidth
    z_ptr, h, w, z_strides, ratio_h, ratio_w = src
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    tiles_q = w // (BLOCK_Q * P)
    sy = pid_p // tiles_q
    sx0 = ((pid_p % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)) * P
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    first_y = sy == 0
    last_y = sy == h - 1
    nn = n
    cc = c
    sxo = sx0
    syo = sy
    if INT64:
        nn = n.to(tl.int64)
        cc = c.to(tl.int64)
        sxo = sx0.to(tl.int64)
        syo = sy.to(tl.int64)
    g_n, g_c, g_h, g_w = g_strides
    chan = (nn * g_n + cc * g_c)[:, None, None]
    left_ok = (sx0 > 0)[None, :, None]
    right_ok = (sx0 + P < w)[None, :, None]
    # the thread's output columns in pieces (`_piece`), per piece the sum over the window's rows
    acc = ()
    for k in tl.static_range(2 * PH):
        dy = PH * sy - PH // 2 + k
        if INT64:
            dy = dy.to(tl.int64)
        row = g_ptr + (chan + dy * g_h)
        wy = _tent_edge(k, PH, first_y, last_y)
        # rows above (below) the image for the first (last) source row: masked
        if 2 * k < PH:
            row_ok = sy > 0
        else:
            row_ok = sy < h - 1
        vals = ()
        for i in tl.static_range(_piece(P, PW, COLS, VEC)):
            offs = ((PW * sxo + _piece(P, PW, COLS, VEC, i, 0))[None, :, None]
                    + tl.arange(0, _piece(P, PW, COLS, VEC, i, 1))[None, None, :])
            ptrs = row + offs * g_w
            if (2 * k < PH) or (2 * k >= 3 * PH):
                if _piece(P, PW, COLS, VEC, i, 0) < 0:
                    v = tl.load(ptrs, mask=row_ok & left_ok, other=0.0)
                elif _piece(P, PW, COLS, VEC, i, 0) >= P * PW:
                    v = tl.load(ptrs, mask=row_ok & right_ok, other=0.0)
                else:
                    v = tl.load(ptrs, mask=row_ok, other=0.0)
            else:
                if _piece(P, PW, COLS, VEC, i, 0) < 0:
                    v = tl.load(ptrs, mask=left_ok, other=0.0)
                elif _piece(P, PW, COLS, VEC, i, 0) >= P * PW:
                    v = tl.load(ptrs, mask=right_ok, other=0.0)
                else:
                    v = tl.load(ptrs)
            vals = vals + (v,)
        if k == 0:
            for i in tl.static_range(len(vals)):
                acc = acc + (vals[i].to(tl.float32) * wy,)
        else:
            nxt = ()
            for i in tl.static_range(len(vals)):
                nxt = nxt + (acc[i] + vals[i].to(tl.float32) * wy,)
            acc = nxt
    first_x = (sx0 == 0)[None, :, None]
    last_x = (sx0 + P == w)[None, :, None]
    sum_u = tl.zeros([BLOCK_C, BLOCK_Q], dtype=tl.float32)
    sum_uz = tl.zeros([BLOCK_C, BLOCK_Q], dtype=tl.float32)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr + c).to(tl.float32)[:, None]
    z_n, z_c, z_h, z_w = z_strides
    d_n, d_c, d_h, d_w = dz_strides
    for p in tl.static_range(P):
        lo = p * PW - PW // 2  # window of pixel p, columns from s0 PW
        u = tl.zeros([BLOCK_C, BLOCK_Q], dtype=tl.float32)
        for i in tl.static_range(_piece(P, PW, COLS, VEC)):
            start = _piece(P, PW, COLS, VEC, i, 0)
            if (start < lo + 2 * PW) and (start + _piece(P, PW, COLS, VEC, i, 1) > lo):  # the piece meets the window
                u += _window_sum(acc[i], start, lo, PW, p == 0, p == P - 1, first_x, last_x)
        if NEED_DZ:
            tl.store(dz_ptr + ((nn * d_n + cc * d_c)[:, None] + (syo * d_h + (sxo + p) * d_w)[None, :]),
                     (u * scale).to(dz_ptr.dtype.element_ty))
        if NEED_DSCALE:
            z = tl.load(z_ptr + ((nn * z_n + cc * z_c)[:, None] + (syo * z_h + (sxo + p) * z_w)[None, :]))
            sum_uz += u * z.to(tl.float32)
        sum_u += u
    row_id = n * tl.num_programs(0) + pid_p
    if NEED_DSCALE:
        tl.store(part_ptr + row_id * C + c, tl.sum(sum_uz, axis=1))
    if NEED_DSHIFT:
        tl.store(part_ptr + (R + row_id) * C + c, tl.sum(sum_u, axis=1))


@triton.jit
def _window_sum(a, start: tl.constexpr, lo: tl.constexpr, f: tl.constexpr, AT_FIRST: tl.constexpr,
                AT_LAST: tl.constexpr, first_x, last_x):
    """sum over the columns x = start + j of a ([BLOCK_C, BLOCK_Q, V], j < V) inside the window [lo, lo + 2f)
    of a * the column weight _tent(x - lo) (`_tent_edge` at the image's first / last column where AT_FIRST /
    AT_LAST), in column order; columns outside the window are left out (-0.0 adds nothing)."""
    V: tl.constexpr = a.shape[2]
    k = (tl.arange(0, V) + (start - lo)).to(tl.float32)[None, None, :]
    wgt = tl.where(k < f, (k + 0.5) / f, (2 * f - 0.5 - k) / f)
    if AT_FIRST:
        wgt = tl.where(first_x & (k >= f // 2) & (k < f), 1.0, wgt)
    if AT_LAST:
        wgt = tl.where(last_x & (k >= f) & (k < f + f // 2), 1.0, wgt)
    inside = (k >= 0) & (k < 2 * f)
    return tl.sum(tl.where(inside, a * wgt, -0.0), axis=2)


@triton.jit
def _adjoint_epilogue(u, n, c, cc, qy, qx, sy, sx, h, w, C, R, z_ptr, z_strides, scale_ptr, dz_ptr, dz_strides,
                      part_ptr, HAS_SCALE: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DSCALE: tl.constexpr,
                      NEED_DSHIFT: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr):
    """dz = u * scale on the tile, and this tile's per-channel partial sums (row n * programs + program)."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    c_mask = c < C
    inside = ((qy < h)[:, None] & (qx < w)[None, :])[None, :, :]
    row = n * tl.num_programs(0) + tl.program_id(0)
    if NEED_DZ:
        dz = u
        if HAS_SCALE:
            dz = u * tl.load(scale_ptr + cc).to(acc_t)[:, None, None]
        tl.store(dz_ptr + grid_offsets(n, c, qy, qx, dz_strides, INT64), dz.to(dz_ptr.dtype.element_ty),
                 mask=c_mask[:, None, None] & inside)
    if NEED_DSCALE or NEED_DSHIFT:
        u = tl.where(inside, u, 0.0)  # the clamped tail must not count twice
    if NEED_DSCALE:
        z = tl.load(z_ptr + grid_offsets(n, cc, sy, sx, z_strides, INT64)).to(acc_t)
        tl.store(part_ptr + row * C + c, tl.sum(tl.sum(u * z, axis=2), axis=1), mask=c_mask)
    if NEED_DSHIFT:
        tl.store(part_ptr + (R + row) * C + c, tl.sum(tl.sum(u, axis=2), axis=1), mask=c_mask)


@triton.constexpr_function
def _row_piece(L, FM, f, cols, vec, i, field=None):
    """`_adjoint_row_kernel`'s pieces: the loaded pieces of a thread's row are `_piece(L / FM, FM, cols, vec)` (FM
    the widest column factor, L = P f output columns per thread, the same for every term); piece i of a term
    by f (`_piece(L / f, f, cols, vec)`) is loaded piece `index` (field None), whose (start, width)[field] its row
    sums take: in NCHW the same index (the edge pieces' f columns are part of the FM-wide loaded ones, the
    other columns outside every window of the term), in `cols` the same column."""
    j = i + (FM - f) // 2 if cols else i
    return j if field is None else _piece(L // FM, FM, cols, vec, j, field)


@triton.constexpr_function
def _row_start(FM, f, j):
    """First output row (from FM * S - FM / 2, S the program's row of the coarsest term) of the window of the
    term's source row j of the program's FM / f: f j - f / 2 from FM S."""
    return FM // 2 + f * j - f // 2


@triton.constexpr_function
def _acc_slot(FH, FW, L, cols, vec, t, j, i):
    """Index of (term t, its source row j, its piece i) in `_adjoint_row_kernel`'s flat tuple of row sums."""
    FM = max(FH)
    n = 0
    for s in range(t):
        n += (FM // FH[s]) * _piece(L // FW[s], FW[s], cols, vec)
    return n + j * _piece(L // FW[t], FW[t], cols, vec) + i


@triton.constexpr_function
def _cmax(values):
    return max(values)


@triton.jit
def _adjoint_row_kernel(g_ptr, g_strides, W, h0, C, terms,
                        HAS_SCALE: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DSCALE: tl.constexpr,
                        NEED_DSHIFT: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, P: tl.constexpr,
                        COLS: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
                        PAIRS: tl.constexpr = False):
    """`_upsample_adjoint_kernel`'s phase form (`_adjoint_phases`) for all the upsampled terms of a row in one
    launch that reads g once. Term t = (z, z strides, scale, dz, dz strides, partials [2, R_t, C]), bilinear
    (no align_corners) by FH[t] x FW[t] (powers of 2), P[t] source columns per thread with P[t] FW[t] = L the
    same for every term (so a thread covers the same L output columns [X0, X0 + L) in every term).

    A program is one source row S of the coarsest rows (FM = max FH: h0 rows), BLOCK_Q threads x L output
    columns, BLOCK_C channels; it owns FM / FH[t] source rows of term t, whose windows lie inside the
    coarsest one's, output rows [FM S - FM / 2, FM S + 3 FM / 2). Each of those rows is loaded once (the
    pieces of the widest window, `_piece(L / max FW, max FW)`), converted once, and added into the row sums
    of every source row of every term whose window holds it, with that term's row weight; a source row's
    sums complete at its window's last row, and its epilogue (columns, dz, partial sums) runs there. Per
    term and source row: `_adjoint_phases`'s operations in its order on the same values (the same masks, the
    same pieces but for the edge pieces' columns outside the window, which it leaves out too), and its partial
    sums in the rows its own launch would write: the same bits as one `_upsample_adjoint_kernel` launch per
    term."""
    _adjoint_row_program(tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(2), g_ptr,
                         g_strides, W, h0, C, terms, HAS_SCALE, NEED_DZ, NEED_DSCALE, NEED_DSHIFT, FH, FW, P, COLS,
                         INT64, BLOCK_C, BLOCK_Q, PAIRS)


@triton.jit
def _adjoint_rows_kernel(rows, HAS_SCALE: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DSCALE: tl.constexpr,
                         NEED_DSHIFT: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, P: tl.constexpr,
                         COLS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, PAIRS: tl.constexpr,
                         INT64: tl.constexpr):
    """A step's rows' `_adjoint_row_kernel` launches in one (`_adjoint_launch_rows`): programs [start, end) of
    the 1-D grid are row k's (`rows[k]` = (g, g strides, W, h0, C, N, terms, pixel programs, channel blocks,
    start, end); its constexprs are entry k of the tuples, each a tuple over its terms but the scalars COLS,
    BLOCK_C, BLOCK_Q, PAIRS), each one program of that row's `_adjoint_row_kernel` grid, pixel programs fastest,
    then channel blocks, then images. A row may have one term here."""
    pid = tl.program_id(0)
    # the rows' code in reverse order: in row order ptxas gave sm_80 W48 bf16 255 registers and 44 B of spills
    # (row 0 alone 178); in reverse 189, no spills (sm_90 190 -> 194)
    for k in tl.static_range(len(rows) - 1, -1, -1):
        (g_ptr, g_strides, W, h0, C, N, terms, tiles_p, tiles_c, start, end) = rows[k]
        if (pid >= start) & (pid < end):
            local = pid - start
            _adjoint_row_program(local % tiles_p, local // tiles_p % tiles_c, local // tiles_p // tiles_c, N,
                                 g_ptr, g_strides, W, h0, C, terms, HAS_SCALE[k], NEED_DZ[k], NEED_DSCALE[k],
                                 NEED_DSHIFT[k], FH[k], FW[k], P[k], COLS[k], INT64, BLOCK_C[k], BLOCK_Q[k],
                                 PAIRS[k])


@triton.jit
def _adjoint_row_program(pid_p, pid_c, n, N, g_ptr, g_strides, W, h0, C, terms,
                         HAS_SCALE: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DSCALE: tl.constexpr,
                         NEED_DSHIFT: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, P: tl.constexpr,
                         COLS: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
                         PAIRS: tl.constexpr):
    """Program (pid_p, pid_c, n) of `_adjoint_row_kernel` over N images."""
    FM: tl.constexpr = _cmax(FH)
    WM: tl.constexpr = _cmax(FW)
    VEC: tl.constexpr = 128 // g_ptr.dtype.element_ty.primitive_bitwidth
    L: tl.constexpr = P[0] * FW[0]
    tiles_q = W // (BLOCK_Q * L)
    S = pid_p // tiles_q
    tile = pid_p % tiles_q
    q = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    X0 = q * L
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    nn = n
    cc = c
    xo = X0
    if INT64:
        nn = n.to(tl.int64)
        cc = c.to(tl.int64)
        xo = X0.to(tl.int64)
    g_n, g_c, g_h, g_w = g_strides
    chan = (nn * g_n + cc * g_c)[:, None, None]
    left_ok = (X0 > 0)[None, :, None]
    right_ok = (X0 + L < W)[None, :, None]
    first_x = (X0 == 0)[None, :, None]
    last_x = (X0 + L == W)[None, :, None]
    # the row sums of every (term, source row, piece): placeholders until their window's first row
    acc = ()
    for t in tl.static_range(len(FH)):
        for j in tl.static_range(FM // FH[t]):
            for i in tl.static_range(_piece(P[t], FW[t], COLS, VEC)):
                acc = acc + (tl.full([BLOCK_C, BLOCK_Q, _row_piece(L, WM, FW[t], COLS, VEC, i, 1)], -0.0,
                                     dtype=tl.float32),)
    for r in tl.static_range(2 * FM):
        dy = FM * S - FM // 2 + r
        if INT64:
            dy = dy.to(tl.int64)
        row = g_ptr + (chan + dy * g_h)
        # rows above (below) the image for the first (last) coarse row: masked
        if 2 * r < FM:
            row_ok = S > 0
        else:
            row_ok = S < h0 - 1
        vals = ()
        for i in tl.static_range(_piece(L // WM, WM, COLS, VEC)):
            offs = ((xo + _piece(L // WM, WM, COLS, VEC, i, 0))[None, :, None]
                    + tl.arange(0, _piece(L // WM, WM, COLS, VEC, i, 1))[None, None, :])
            ptrs = row + offs * g_w
            if PAIRS:
                # bf16 read as 32-bit words of two columns, widened by bit operations: Triton's conversion
                # moves the high half down (PRMT) before shifting it back up
                ptrs = (row.to(tl.pointer_type(tl.int32), bitcast=True)
                        + ((xo + _piece(L // WM, WM, COLS, VEC, i, 0)) // 2)[None, :, None]
                        + tl.arange(0, _piece(L // WM, WM, COLS, VEC, i, 1) // 2)[None, None, :])
            mask = None
            if (2 * r < FM) or (2 * r >= 3 * FM):
                mask = row_ok
            if _piece(L // WM, WM, COLS, VEC, i, 0) < 0:
                mask = left_ok if mask is None else mask & left_ok
            elif _piece(L // WM, WM, COLS, VEC, i, 0) >= L:
                mask = right_ok if mask is None else mask & right_ok
            if mask is None:
                v = tl.load(ptrs)
            else:
                v = tl.load(ptrs, mask=mask, other=0)
            if PAIRS:
                lo = (v << 16).to(tl.float32, bitcast=True)
                hi = (v & -65536).to(tl.float32, bitcast=True)
                v = tl.reshape(tl.join(lo, hi), (BLOCK_C, BLOCK_Q, _piece(L // WM, WM, COLS, VEC, i, 1)))
            vals = vals + (v.to(tl.float32),)
        # add the row into every source row whose window holds it (term by term, rows in order)
        nxt = ()
        for t in tl.static_range(len(FH)):
            for j in tl.static_range(FM // FH[t]):
                s = (FM // FH[t]) * S + j
                for i in tl.static_range(_piece(P[t], FW[t], COLS, VEC)):
                    nxt = nxt + (_row_add(acc[_acc_slot(FH, FW, L, COLS, VEC, t, j, i)],
                                          vals[_row_piece(L, WM, FW[t], COLS, VEC, i)], r - _row_start(FM, FH[t], j),
                                          FH[t], s == 0, s == (FM // FH[t]) * h0 - 1),)
        acc = nxt
        # the source rows whose window ends here: columns, dz and the partial sums
        for t in tl.static_range(len(FH)):
            for j in tl.static_range(FM // FH[t]):
                if r == _row_start(FM, FH[t], j) + 2 * FH[t] - 1:
                    _adjoint_row_out(acc, _acc_slot(FH, FW, L, COLS, VEC, t, j, 0), terms[t], n, N, nn, c, cc,
                                     (FM // FH[t]) * S + j, (FM // FH[t]) * h0, q, tile, tiles_q, C, first_x,
                                     last_x, HAS_SCALE[t], NEED_DZ[t], NEED_DSCALE[t], NEED_DSHIFT[t], FW[t], P[t],
                                     L, WM, COLS, VEC, INT64)


@triton.jit
def _row_add(a, v, k: tl.constexpr, f: tl.constexpr, first, last):
    """A row sum a after output row k of its window (by f; `_tent_edge`'s weight) when it holds v's row:
    `_adjoint_phases`' v * wy at the window's first row, a + v * wy after; a itself outside the window."""
    if k >= 0 and k < 2 * f:
        wy = _tent_edge(k, f, first, last)
        if k == 0:
            a = v * wy
        else:
            a = a + v * wy
    return a


@triton.jit
def _adjoint_row_out(acc, base: tl.constexpr, term, n, N, nn, c, cc, sy, h, q, tile, tiles_q, C, first_x,
                     last_x, HAS_SCALE: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DSCALE: tl.constexpr,
                     NEED_DSHIFT: tl.constexpr, F: tl.constexpr, P: tl.constexpr, L: tl.constexpr,
                     WM: tl.constexpr, COLS: tl.constexpr, VEC: tl.constexpr, INT64: tl.constexpr):
    """`_adjoint_phases`' epilogue for one source row sy (of h) of one term of `_adjoint_row_kernel`: its row
    sums are acc[base:], piece by piece; each pixel's u from its window's columns, dz = u * scale, and the
    partial sums into the row its own launch would use (image n, source row sy, column tile `tile`)."""
    z_ptr, z_strides, scale_ptr, dz_ptr, dz_strides, part_ptr = term
    sx0 = q * P
    sxo = sx0
    syo = sy
    if INT64:
        sxo = sx0.to(tl.int64)
        syo = sy.to(tl.int64)
    sum_u = tl.zeros([c.shape[0], q.shape[0]], dtype=tl.float32)
    sum_uz = tl.zeros([c.shape[0], q.shape[0]], dtype=tl.float32)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr + c).to(tl.float32)[:, None]
    z_n, z_c, z_h, z_w = z_strides
    d_n, d_c, d_h, d_w = dz_strides
    for p in tl.static_range(P):
        lo = p * F - F // 2
        u = tl.zeros([c.shape[0], q.shape[0]], dtype=tl.float32)
        for i in tl.static_range(_piece(P, F, COLS, VEC)):
            start = _row_piece(L, WM, F, COLS, VEC, i, 0)
            if (start < lo + 2 * F) and (start + _row_piece(L, WM, F, COLS, VEC, i, 1) > lo):
                u += _window_sum(acc[base + i], start, lo, F, p == 0, p == P - 1, first_x, last_x)
        if NEED_DZ:
            tl.store(dz_ptr + ((nn * d_n + cc * d_c)[:, None] + (syo * d_h + (sxo + p) * d_w)[None, :]),
                     (u * scale).to(dz_ptr.dtype.element_ty))
        if NEED_DSCALE:
            z = tl.load(z_ptr + ((nn * z_n + cc * z_c)[:, None] + (syo * z_h + (sxo + p) * z_w)[None, :]))
            sum_uz += u * z.to(tl.float32)
        sum_u += u
    row_id = n * (h * tiles_q) + sy * tiles_q + tile
    R = N * (h * tiles_q)
    if NEED_DSCALE:
        tl.store(part_ptr + row_id * C + c, tl.sum(sum_uz, axis=1))
    if NEED_DSHIFT:
        tl.store(part_ptr + (R + row_id) * C + c, tl.sum(sum_u, axis=1))


@triton.jit
def _reduce_partials_kernel(sources, outs, F64: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    """Program (channel block, output i): outs[i][c] = the sum of the R_i rows [R_i, C_i] of partial sums at
    element `offset_i` of buffer `parts_i` (sources[i] = (parts_i, offset_i, R_i, C_i)), in a fixed order
    (BLOCK_R rows at a time into a [BLOCK_R, BLOCK_C] accumulator, then its rows summed): every per-channel
    gradient of a backward call (or of a fusion step's rows, `reduce_partials`) in one launch, each into its own
    [C] tensor in its own dtype."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    i = tl.program_id(1)
    base = sources[0][0]
    offset = sources[0][1]
    rows = sources[0][2]
    C = sources[0][3]
    for j in tl.static_range(1, len(sources)):
        base = tl.where(i == j, sources[j][0], base)
        offset = tl.where(i == j, sources[j][1], offset)
        rows = tl.where(i == j, sources[j][2], rows)
        C = tl.where(i == j, sources[j][3], C)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    rows = tl.where(tl.program_id(0) * BLOCK_C < C, rows, 0)  # the grid fits the widest output: none to sum
    if INT64:
        base += offset.to(tl.int64)
    else:
        base += offset
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_t)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        if INT64:
            offs = r.to(tl.int64)[:, None] * C + c[None, :]
        else:
            offs = r[:, None] * C + c[None, :]
        acc += tl.load(base + offs, mask=(r < rows)[:, None] & c_mask[None, :], other=0.0).to(acc_t)
    total = tl.sum(acc, axis=0)
    for j in tl.static_range(len(outs)):
        if i == j:
            tl.store(outs[j] + c, total.to(outs[j].dtype.element_ty), mask=c_mask)


# ------------------------------------------------------------------------------------------------ launchers


def _device_context(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def _tile(C: int, pixels: int, channels_last: bool, budget: int) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_P): wide in the contiguous dimension, about `budget` elements in all."""
    if channels_last:
        block_c = min(next_power_of_2(C), 64)
        block_p = max(1, min(budget // block_c, next_power_of_2(pixels)))
    else:
        block_p = min(next_power_of_2(pixels), 512)
        block_c = max(1, min(budget // block_p, next_power_of_2(C)))
    return block_c, block_p


# Output elements per forward program, source pixels per adjoint program (4 warps each).
FORWARD_TILE = 2048
ADJOINT_TILE = 2048
# Widest NCHW tile row: rows are contiguous, so wide rows give long coalesced runs; the rest of the budget goes
# to channels (index math per row and column shared by them) and rows. The adjoint's reads are gathers (a
# stride of the upsampling factor) and each column of a thread needs its own window weights, so there rows are
# narrow and a thread's columns shared by many rows and channels (sm_90, W48 stage 4 at 512x1024 b8, bf16,
# SASS per source pixel for the x2 / x4 / x8 terms: [8 x 8 x 16] tiles 10.5 / 31.9 / 112, [16 x 16 x 8]
# 7.4 / 23.5 / 85).
MAX_BLOCK_W = 64
ADJOINT_MAX_W = 8


def _grid_tile(C: int, H: int, W: int, channels_last: bool, budget: int,
               max_w: int = MAX_BLOCK_W) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_H, BLOCK_W) of a 3-D tile of about `budget` elements: NCHW rows up to `max_w` wide;
    channel blocks fitted to C (`channel_block`: >= 90% of lanes on real channels)."""
    if channels_last:
        block_c = channel_block(C, 64)
        block_w = min(next_power_of_2(W), max(1, budget // block_c), 16)
        # at most 16 rows: [4 x 32 x 16] (C=18, fp16, four terms) spills on sm_90
        block_h = min(next_power_of_2(H), max(1, budget // (block_c * block_w)), 16)
    else:
        block_w = min(next_power_of_2(W), max_w)
        block_c = channel_block(C, max(1, budget // (block_w * 8)))
        block_h = min(next_power_of_2(H), max(1, budget // (block_c * block_w)))
    return block_c, block_h, block_w


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.stride(1) == 1 and t.shape[1] > 1


def _poisoned(t: Tensor) -> Tensor:
    if not POISON_OUTPUTS:
        return t
    return t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min)


def _empty(shape, dtype, device, memory_format=torch.contiguous_format) -> Tensor:
    return _poisoned(torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format))


def _empty_grad(x: Tensor, layout_hint: Tensor) -> Tensor:
    """A gradient buffer in x's layout; x may be a stride-0 stand-in (not saved), then in layout_hint's."""
    if 0 not in x.stride() or x.numel() <= 1:
        return _poisoned(torch.empty_like(x))
    fmt = torch.channels_last if _is_channels_last(layout_hint) else torch.contiguous_format
    return _empty(x.shape, x.dtype, x.device, fmt)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _or(tensor: Optional[Tensor], stand_in: Tensor) -> Tensor:
    """A pointer argument the kernel does not read (its constexpr flag is off): any tensor will do."""
    return tensor if tensor is not None else stand_in


def fuse_forward(plan: FusePlan, xs: Sequence[Tensor], scales: Sequence[Optional[Tensor]],
                 shifts: Sequence[Optional[Tensor]], force_int64: bool = False) -> Tensor:
    """y = ReLU(sum_k Up_k(x_k) * scale_k + shift_k) of shape [N, C, *plan.size], in the terms' dtype and the
    plan's memory format. scales[k] / shifts[k]: a dense [C] vector, or None where the plan has none. All terms
    share batch, channels, dtype and device (the caller validates)."""
    return fuse_forward_rows([(plan, xs, scales, shifts)], force_int64)[0]


def fuse_forward_rows(calls: Sequence[tuple], force_int64: bool = False) -> List[Tensor]:
    """`fuse_forward` of several rows (plan, xs, scales, shifts) (a fusion step's), their last launches shared:
    one `_fuse_forward_rows_kernel` launch for every row (a program range each; a row of more than MAX_TERMS
    terms first runs its chained launches). One row alone takes `_fuse_forward_kernel`. Each row's arithmetic
    is that of its own call."""
    return [y for y, _ in _forward_rows(calls, force_int64, False)]


def fuse_forward_rows_with_bits(calls: Sequence[tuple], force_int64: bool = False
                                ) -> List[Tuple[Tensor, Optional[Tensor]]]:
    """`fuse_forward_rows`, and per row with ReLU whose output is a multiple of 8 rows and columns and whose
    terms the phase form takes (`_phase_launch(bits=True)`: at G = 8) the ReLU's backward mask as bits
    ([N, C, H / 8, W] uint8 in y's memory format; `_fuse_forward_phases`), for `BackwardCall.relu_bits`: the
    backward reads 1/16 of y's bytes (bf16; 1/32 in fp32). (y, bits or None) per row; y has the same bits as
    `fuse_forward_rows` gives."""
    return _forward_rows(calls, force_int64, True)


def _forward_rows(calls: Sequence[tuple], force_int64: bool, bits: bool) -> List[Tuple[Tensor, Optional[Tensor]]]:
    outs, rows = [], []
    for plan, xs, scales, shifts in calls:
        out, relu_bits, row = _forward_row(plan, xs, scales, shifts, force_int64, bits)
        outs.append((out, relu_bits))
        if row is not None:
            rows.append(row)
    if len(rows) == 1:
        row = rows[0]
        with _device_context(row.args[0]):
            _fuse_forward_kernel[launch_grid(*row.grid)](*row.args, F64=row.f64, INT64=row.int64,
                                                          num_warps=row.warps, **row.constexprs)
        return outs
    for key in dict.fromkeys((r.f64, r.warps) for r in rows):
        group = [r for r in rows if (r.f64, r.warps) == key]
        consts = [{"G": 0, "FH": (1,) * len(r.constexprs["MODES"]), "FW": (1,) * len(r.constexprs["MODES"]),
                   "BITS": False, **r.constexprs} for r in group]
        entries, start, per_row = _program_ranges([(*r.args, r.grid[0], r.grid[1]) for r in group],
                                                  [math.prod(r.grid) for r in group], consts)
        with _device_context(group[0].args[0]):
            _fuse_forward_rows_kernel[launch_grid(start)](entries, F64=key[0],
                                                          INT64=any(r.int64 for r in group), num_warps=key[1],
                                                          **per_row)
    return outs


def _program_ranges(args: Sequence[tuple], programs: Sequence[int], constexprs: Sequence[dict]
                    ) -> Tuple[tuple, int, dict]:
    """A grouped launch's (rows, total programs, per-row constexprs): row k's argument tuple gets its program
    range [start, end) of the 1-D grid appended, after row k-1's; each constexpr becomes a tuple, entry k row
    k's."""
    entries, start = [], 0
    for row_args, n in zip(args, programs):
        entries.append((*row_args, start, start + n))
        start += n
    return tuple(entries), start, {name: tuple(c[name] for c in constexprs) for name in constexprs[0]}


class _ForwardRow(NamedTuple):
    """A row's (last) forward launch: `_fuse_forward_kernel`'s arguments, its grid (pixel tiles, channel blocks,
    images) and constexprs but F64 / INT64."""

    args: tuple
    grid: Tuple[int, int, int]
    constexprs: dict
    f64: bool
    int64: bool
    warps: int = 4


def _forward_row(plan: FusePlan, xs: Sequence[Tensor], scales: Sequence[Optional[Tensor]],
                 shifts: Sequence[Optional[Tensor]], force_int64: bool, bits: bool = False
                 ) -> Tuple[Tensor, Optional[Tensor], Optional[_ForwardRow]]:
    """The row's output and (`bits`: where the row can, see `fuse_forward_rows_with_bits`) ReLU bits
    (allocated), and the launch that writes them (None: empty). A row of more than MAX_TERMS terms chains
    launches through a partial sum: those before the last run here."""
    x0 = xs[0]
    N, C = x0.shape[0], x0.shape[1]
    H, W = plan.size
    shape = (N, C, H, W)
    fmt = torch.channels_last if plan.channels_last else torch.contiguous_format
    out = _empty(shape, x0.dtype, x0.device, fmt)
    if out.numel() == 0:
        return out, None, None
    int64 = force_int64 or needs_int64(out, *xs)
    phase = None
    if _phase_sources_fit(plan, xs):  # without a phase form at G = 8 for the bits, y is the row's mask
        phase = (bits and _phase_launch(plan, C, x0.dtype, True)) or _phase_launch(plan, C, x0.dtype)
    if phase is not None:
        consts = {k: v for k, v in phase.items() if k != "F64"}
        relu_bits = _empty((N, C, H // 8, W), torch.uint8, x0.device, fmt) if phase["BITS"] else None
        mask = _or(relu_bits, out)
        args = (out, C, H, W, out.stride(), tuple(source_args(x, t) for x, t in zip(xs, plan.terms)),
                tuple(_or(s, x) for s, x in zip(scales, xs)), tuple(_or(s, x) for s, x in zip(shifts, xs)),
                mask, mask.stride())
        grid = ((H // phase["BLOCK_H"]) * (W // phase["BLOCK_W"]), C // phase["BLOCK_C"], N)
        return out, relu_bits, _ForwardRow(args, grid, consts, False, int64, PHASE_WARPS)
    launches = _forward_launches(plan, C, x0.dtype == torch.float64)
    partial = None
    for i, (group, consts) in enumerate(launches):
        last = i == len(launches) - 1
        target = out if last else _empty(shape, _accumulation_dtype(x0.dtype), x0.device, fmt)
        sources = tuple(source_args(xs[k], plan.terms[k]) for k in group)
        scale_args = tuple(_or(scales[k], xs[k]) for k in group)
        shift_args = tuple(_or(shifts[k], xs[k]) for k in group)
        if partial is not None:  # the sum so far, as a plain output-size term
            sources = (source_args(partial, _PARTIAL),) + sources
            scale_args, shift_args = (partial,) + scale_args, (partial,) + shift_args
        grid = (cdiv(H, consts["BLOCK_H"]) * cdiv(W, consts["BLOCK_W"]), cdiv(C, consts["BLOCK_C"]), N)
        args = (target, C, H, W, target.stride(), sources, scale_args, shift_args, target, target.stride())
        row = _ForwardRow(args, grid, {k: v for k, v in consts.items() if k != "F64"}, consts["F64"], int64)
        if last:
            return out, None, row
        with _device_context(out):
            _fuse_forward_kernel[launch_grid(*grid)](*args, F64=row.f64, INT64=int64, num_warps=4, **row.constexprs)
        partial = target
    raise AssertionError("unreachable: the last launch returns")


# Threads per program of the phase kernel (one [G x G] output block of one channel each) and the widest row of
# blocks per program (columns: BLOCK_Q * G).
PHASE_WARPS = 4
PHASE_MAX_Q = 32


def _power_of_2_factor(ratio: Tuple[int, int], G: int) -> int:
    """f where an axis ratio is exactly 1/f with f a power of 2 up to G, else 0."""
    num, den = ratio
    return den if num == 1 and den & (den - 1) == 0 and den <= G else 0


@functools.lru_cache(maxsize=1024)
def _phase_launch(plan: FusePlan, C: int, dtype: torch.dtype, bits: bool = False) -> Optional[dict]:
    """The constexprs of `_fuse_forward_phase_kernel` for this plan, or None where it does not apply: bf16, fp16
    or fp32 (fp64 keeps the general kernel; fp32 computes the same arithmetic in the same order, W48 branch 0
    issue/bytes 1.03 -> 0.28 on sm_90), one launch's worth of terms, each output-size, nearest or
    bilinear without align_corners by a power-of-2 factor on both axes (bilinear: >= 2), some term by 4 or more
    (sm_90, W48 stage 4 bf16: the x2-only branch issues 2.05 SASS per element this way, 1.76 in tiles), and an
    output whose size is a multiple of the group and whose channels a block divides. Read-only.

    `bits` (with ReLU): at G = 8, so that a thread's rows of a column make a byte of ReLU bits (BITS), for any
    mix of factors, x2 and output-size only included (where G would be 4 or less)."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32) or len(plan.terms) > MAX_TERMS or C == 0:
        return None
    G = 8
    fh, fw = [], []
    for t in plan.terms:
        a, b = _power_of_2_factor(t.ratio_h, G), _power_of_2_factor(t.ratio_w, G)
        if t.mode == SAME:
            a = b = 1
        elif not a or not b or (t.mode == BILINEAR and (t.align_corners or a < 2 or b < 2)):
            return None
        fh.append(a)
        fw.append(b)
    bits = bits and plan.relu
    G = 8 if bits else max(fh + fw)
    H, W = plan.size
    if G < 4 or H % G or W % G:  # x2 at most: 4 outputs per thread, too few to pay for the unrolled form
        return None
    block_c = channel_block(C, 64)
    if C % block_c:
        return None
    threads = 32 * PHASE_WARPS
    block_q = min(PHASE_MAX_Q, threads // min(block_c, threads), next_power_of_2(W // G))
    while block_q > 1 and (W // G) % block_q:
        block_q //= 2
    block_c = min(block_c, max(1, threads // block_q))
    if C % block_c:
        return None
    return dict(MODES=tuple(t.mode for t in plan.terms), ALIGNS=(False,) * len(plan.terms),
                HAS_SCALE=tuple(t.has_scale for t in plan.terms), HAS_SHIFT=tuple(t.has_shift for t in plan.terms),
                RELU=plan.relu, F64=False, EXACT=True, BLOCK_C=block_c, BLOCK_H=G, BLOCK_W=block_q * G, G=G,
                FH=tuple(fh), FW=tuple(fw), BITS=bits)


def _phase_sources_fit(plan: FusePlan, xs: Sequence[Tensor]) -> bool:
    """Whether every source is exactly the output size over its factors (what the ratios 1/f imply for
    F.interpolate's sizes; checked, not assumed)."""
    H, W = plan.size
    for x, t in zip(xs, plan.terms):
        fh = t.ratio_h[1] if t.mode != SAME else 1
        fw = t.ratio_w[1] if t.mode != SAME else 1
        if x.shape[2] * fh != H or x.shape[3] * fw != W:
            return False
    return True


_PARTIAL = TermPlan()  # the running partial sum of a chained forward: an output-size term, no affine


@functools.lru_cache(maxsize=1024)
def _forward_launches(plan: FusePlan, C: int, f64: bool) -> List[Tuple[range, dict]]:
    """Per chained forward launch (MAX_TERMS terms in the first, then MAX_TERMS - 1 besides the running partial
    sum): its term indices and the kernel's constexprs but INT64. Computed once per plan and channel count: the
    launchers run on every op call, so their host time counts. Read-only."""
    n = len(plan.terms)
    starts = [0, *range(MAX_TERMS, n, MAX_TERMS - 1)]
    launches = []
    for i, (a, b) in enumerate(zip(starts, [*starts[1:], n])):
        plans = (() if i == 0 else (_PARTIAL,)) + plan.terms[a:b]
        block_c, block_h, block_w = _grid_tile(C, *plan.size, plan.channels_last and C > 1, budget=FORWARD_TILE)
        exact = C % block_c == 0 and plan.size[0] % block_h == 0 and plan.size[1] % block_w == 0
        launches.append((range(a, b), dict(
            MODES=tuple(t.mode for t in plans), ALIGNS=tuple(bool(t.align_corners) for t in plans),
            HAS_SCALE=tuple(t.has_scale for t in plans), HAS_SHIFT=tuple(t.has_shift for t in plans),
            RELU=plan.relu and b == n, F64=f64, EXACT=exact, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w)))
    return launches


def window(ratio: Tuple[int, int], mode: int, align_corners: bool, n_out: int) -> Tuple[int, int, int]:
    """(K, step, offset) of the adjoint's gather along one axis: source s visits outputs
    [s * step - offset, + K) when the ratio is exactly 1/step (step a power of 2, so the forward's float
    index math is exact too: HRNet's usual x2^k), else step = 0 and K over-estimates the fan-out
    (1/r nearest, 2/r bilinear) with room for `first_reader`'s slack."""
    num, den = ratio
    if num == 1 and den & (den - 1) == 0 and not (mode == BILINEAR and align_corners):
        if mode == NEAREST:
            return den, den, 0
        return 2 * den, den, (den + 1) // 2  # d reads s iff (d + 0.5) / m - 0.5 lies in [s - 1, s + 1)
    r = num / den
    if r <= 0:
        return n_out, 0, 0
    fan_out = 1.0 / r if mode == NEAREST else 2.0 / r
    return min(n_out + 2, math.ceil(fan_out) + 5), 0, 0


class PendingSums(NamedTuple):
    """Per-channel gradients whose per-tile partial sums are written but not summed yet: outs[i] = the sum of the
    [R_i, C] rows at element offset_i of `parts` (sources[i] = (offset_i, R_i))."""

    parts: Tensor
    C: int
    sources: List[Tuple[int, int]]
    outs: List[Tensor]
    int64: bool


class BackwardCall(NamedTuple):
    """One fusion row's backward, `fuse_backward`'s arguments. `scaled_by_caller`: output-size terms with a scale
    whose dx = g * scale_k the caller computes where it reads it (the batch-norm backward of a folded term,
    `hrfast.ops.fuse_step`): their dx slot holds g itself, the gradient behind the ReLU, and no dx is written for
    them (one full-resolution write less per term). `relu_bits`: the row's ReLU bits
    (`fuse_forward_rows_with_bits`), read instead of y (then None)."""

    plan: FusePlan
    grad_y: Tensor
    y: Optional[Tensor]
    xs: Sequence[Tensor]
    scales: Sequence[Optional[Tensor]]
    shifts: Sequence[Optional[Tensor]]
    needs: Sequence[Tuple[bool, bool, bool]]
    scaled_by_caller: Sequence[int] = ()
    force_int64: bool = False
    relu_bits: Optional[Tensor] = None


def fuse_backward(plan: FusePlan, grad_y: Tensor, y: Optional[Tensor], xs: Sequence[Tensor],
                  scales: Sequence[Optional[Tensor]], shifts: Sequence[Optional[Tensor]],
                  needs: Sequence[Tuple[bool, bool, bool]], force_int64: bool = False) -> List[Grads]:
    """Gradients (dx, dscale, dshift) of every term, None where `needs[k]` says it is not needed. `y` is the
    forward output (its sign is the ReLU mask), None without ReLU; xs[k] may be a stride-0 stand-in with x's
    shape (x not kept), then dx takes grad_y's layout.

    Every kernel writes its per-tile partial sums into one buffer; one `_reduce_partials_kernel` launch then
    sums them (fixed order) into every per-channel gradient, each its own tensor in its parameter's dtype."""
    return fuse_backward_rows([BackwardCall(plan, grad_y, y, xs, scales, shifts, needs, (), force_int64)])[0]


def fuse_backward_rows(calls: Sequence[BackwardCall]) -> List[List[Grads]]:
    """`fuse_backward` of several rows (a fusion step's) with their launches shared: one output-size launch for
    every row (`_fuse_backward_same_kernel`, a program range per row), one adjoint-row launch for every row's
    phase-form upsampled terms (`_adjoint_rows_kernel`), the other upsampled terms one launch each, one
    `_reduce_partials_kernel` launch for every row's sums. Each row's arithmetic is that of its own call."""
    rows = [_RowBackward(call) for call in calls]
    _same_launch([row.same for row in rows if row.same is not None])
    # rows that share the adjoint-row launch take a single phase-form term into it too; else a single term keeps
    # `_upsample_adjoint_kernel` and each row's terms their own launch
    shared = _shares_adjoint_launch(rows)
    entries = [e for e in (row.adjoints(1 if shared else 2) for row in rows) if e is not None]
    for group in [entries] if shared else [[e] for e in entries]:
        _adjoint_launch_rows(group)
    reduce_partials([row.pending for row in rows])

    return [row.result() for row in rows]


class _RowBackward:
    """One row's backward between the launches it shares: its buffers (g, dx, partial sums) and output-size
    launch entry first, then its adjoints, then its pending sums."""

    def __init__(self, call: BackwardCall):
        plan, grad_y, y, xs, scales, shifts, needs = call[:7]
        deferred = frozenset(call.scaled_by_caller)
        if any(plan.terms[k].mode != SAME or not plan.terms[k].has_scale for k in deferred):
            raise ValueError("scaled_by_caller: only output-size terms with a scale")
        bits = call.relu_bits
        if plan.relu and y is None and bits is None:
            raise ValueError("y: a plan with ReLU needs the forward output y (or relu_bits) for the ReLU's mask")
        if bits is not None and (not plan.relu or bits.dtype != torch.uint8 or grad_y.shape[2] % 8
                                 or tuple(bits.shape) != (*grad_y.shape[:2], grad_y.shape[2] // 8, grad_y.shape[3])):
            raise ValueError("relu_bits: expected the row's ReLU bits, [N, C, H / 8, W] uint8 "
                             "(fuse_forward_rows_with_bits), and a plan with ReLU")
        self.call = call
        self.upsampled = [k for k, t in enumerate(plan.terms) if t.mode != SAME and any(needs[k])]
        self.int64 = call.force_int64 or needs_int64(grad_y, y, *xs)
        N, C, H, W = grad_y.shape
        self.C, self.same, self.sources, self.outs = C, None, [], []
        self.grads: Dict[int, Grads] = {}
        if not self.upsampled and all(t.mode != SAME for t in plan.terms):
            self.parts = grad_y.new_empty((0,))
            return
        same = [k for k, t in enumerate(plan.terms) if t.mode == SAME]
        same_cfg = _same_config(C, H * W, N, _is_channels_last(grad_y))
        self.adjoint_cfgs = {k: _adjoint_config(xs[k], plan.terms[k], H, W, _is_channels_last(grad_y))
                             for k in self.upsampled}
        # the partial-sum buffer: the output-size kernel's slots (one per output-size term, then sum(g)), then
        # two (sum(u * z), sum(u)) per upsampled term; each kernel gets its [slots, R, C] view
        R0 = same_cfg[3]
        sizes = [(len(same) + 1) * R0 * C] + [2 * self.adjoint_cfgs[k][3] * C for k in self.upsampled]
        self.starts = [sum(sizes[:i + 1]) for i in range(len(self.upsampled))]
        self.parts = _empty((sum(sizes),), _accumulation_dtype(xs[0].dtype), grad_y.device)
        same_parts = self.parts[:sizes[0]].view(len(same) + 1, R0, C)
        self.g, self.grads, self.same = _output_size_backward(plan, grad_y, y, xs, scales, needs,
                                                              bool(self.upsampled), self.int64, same_cfg,
                                                              same_parts, deferred, call.relu_bits)
        for slot, k in enumerate(same):
            need_dscale, need_dshift = needs[k][1] and plan.terms[k].has_scale, needs[k][2] and plan.terms[k].has_shift
            self.grads[k] = (self.grads[k][0], self._reduced(scales[k], slot * R0 * C, R0) if need_dscale else None,
                             self._reduced(shifts[k], len(same) * R0 * C, R0) if need_dshift else None)

    def _reduced(self, param: Optional[Tensor], offset: int, rows: int) -> Optional[Tensor]:
        """The [C] gradient of `param`, summed later from `rows` partial rows at `offset`."""
        if param is None:
            return None
        out = _empty(param.shape, param.dtype, param.device)
        self.sources.append((offset, rows))
        self.outs.append(out)
        return out

    def row_group(self, min_terms: int) -> List[int]:
        """The upsampled terms of this row's adjoint-row entry (`_adjoint_row_group`)."""
        if not self.upsampled:
            return []
        return _adjoint_row_group(self.upsampled, self.adjoint_cfgs, self.call.xs, min_terms)

    def adjoints(self, min_row_terms: int = 2) -> Optional[_AdjointRow]:
        """The upsampled terms' gradients (their launches read g, which the output-size launch wrote): the
        phase-form terms that can share g's reads (`row_group(min_row_terms)`) as this row's entry of one
        `_adjoint_launch_rows` (returned: the caller launches it, with the other rows' entries), each other term
        in its own launch here."""
        if not self.upsampled:
            return None
        plan, _, _, xs, scales, shifts, needs = self.call[:7]
        C, cfgs = self.C, self.adjoint_cfgs
        term_needs = {k: (needs[k][0], needs[k][1] and plan.terms[k].has_scale,
                          needs[k][2] and plan.terms[k].has_shift) for k in self.upsampled}
        term_parts = {k: self.parts[start:start + 2 * cfgs[k][3] * C].view(2, cfgs[k][3], C)
                      for k, start in zip(self.upsampled, self.starts)}
        row = self.row_group(min_row_terms)
        row_dz, entry = _adjoint_row_entry(plan, row, self.g, xs, scales, term_needs, self.int64, cfgs,
                                           term_parts) if row else ({}, None)
        for k, start in zip(self.upsampled, self.starts):
            R = cfgs[k][3]
            _, need_dscale, need_dshift = term_needs[k]
            if k in row_dz:
                dz = row_dz[k]
            else:
                dz = _adjoint_launch(plan.terms[k], self.g, xs[k], scales[k], term_needs[k], self.int64, cfgs[k],
                                     term_parts[k])
            self.grads[k] = (dz, self._reduced(scales[k], start, R) if need_dscale else None,
                             self._reduced(shifts[k], start + R * C, R) if need_dshift else None)
        return entry

    @property
    def pending(self) -> PendingSums:
        return PendingSums(self.parts, self.C, self.sources, self.outs, self.int64)

    def result(self) -> List[Grads]:
        return [self.grads.get(k, (None, None, None)) for k in range(len(self.call.xs))]


# rows x channels per program of `_reduce_partials_kernel` (4 warps)
REDUCE_TILE = 2048
REDUCE_MAX_C = 64


def reduce_partials(pending: Sequence[PendingSums]) -> None:
    """One launch of `_reduce_partials_kernel` for every sum of `pending` (each call's buffer and channel
    count its own; one launch per accumulation dtype of the buffers): writes their `outs`."""
    groups: Dict[torch.dtype, List[PendingSums]] = {}
    for p in pending:
        if p.C and p.outs:
            groups.setdefault(p.parts.dtype, []).append(p)
    for group in groups.values():
        _reduce_launch(group)


def _reduce_launch(pending: Sequence[PendingSums]) -> None:
    sources, outs, int64 = [], [], False
    for p in pending:
        sources += [(p.parts, offset, rows, p.C) for offset, rows in p.sources]
        outs += p.outs
        int64 |= p.int64 or p.parts.numel() > INT32_LIMIT - REDUCE_TILE * p.C
    C = max(s[3] for s in sources)
    block_c = min(next_power_of_2(C), REDUCE_MAX_C)
    block_r = max(1, min(REDUCE_TILE // block_c, next_power_of_2(max(s[2] for s in sources))))
    with _device_context(outs[0]):
        _reduce_partials_kernel[launch_grid(cdiv(C, block_c), len(outs))](
            tuple(sources), tuple(outs), F64=sources[0][0].dtype == torch.float64, INT64=int64, BLOCK_R=block_r,
            BLOCK_C=block_c, num_warps=4)


def _same_config(C: int, pixels: int, N: int, channels_last: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_P, programs, R) of one row of `_fuse_backward_same_kernel`: R = rows of partial sums (one
    per program along pixels and image)."""
    block_c, block_p = _tile(C, pixels, channels_last, budget=2048)
    tiles_p = cdiv(pixels, block_p)
    return block_c, block_p, tiles_p * cdiv(C, block_c) * N, tiles_p * N


class _SameRow(NamedTuple):
    """One row's entry in a `_fuse_backward_same_kernel` launch: its argument tuple (less its program range),
    its program count and constexprs."""

    args: tuple
    programs: int
    constexprs: dict
    f64: bool
    int64: bool


def _same_launch(rows: Sequence[_SameRow]) -> None:
    """One `_fuse_backward_same_kernel` launch for `rows` (one per accumulation dtype): row k's programs follow row
    k-1's on the 1-D grid."""
    for f64 in (False, True):
        group = [r for r in rows if r.f64 == f64]
        if not group:
            continue
        entries, start, per_row = _program_ranges([r.args for r in group], [r.programs for r in group],
                                                  [r.constexprs for r in group])
        with _device_context(group[0].args[0]):
            _fuse_backward_same_kernel[launch_grid(start)](entries, F64=f64,
                                                           INT64=any(r.int64 for r in group), **per_row,
                                                           num_warps=4)


def _output_size_backward(plan: FusePlan, grad_y: Tensor, y: Optional[Tensor], xs: Sequence[Tensor],
                          scales: Sequence[Optional[Tensor]], needs: Sequence[Tuple[bool, bool, bool]],
                          need_g: bool, int64: bool, config, parts: Tensor, deferred: frozenset = frozenset(),
                          relu_bits: Optional[Tensor] = None
                          ) -> Tuple[Optional[Tensor], Dict[int, Grads], Optional[_SameRow]]:
    """The output-size terms' dx by term index (dscale, dshift None: their partial sums go to `parts` [terms +
    1, R, C], slot k for sum(g * x_k), the last for sum(g)), (when `need_g`, for the upsampled terms) g, the
    gradient behind the ReLU (grad_y itself without ReLU), allocated, and the row's entry in the
    `_fuse_backward_same_kernel` launch that writes them (None: nothing to launch). The `deferred` terms' dx
    slot holds g (see `BackwardCall`). `relu_bits`: the ReLU's mask as bits, read instead of y."""
    N, C, H, W = grad_y.shape
    same = [k for k, t in enumerate(plan.terms) if t.mode == SAME]
    deferred = frozenset(k for k in deferred if needs[k][0])
    need_g = need_g or bool(deferred)
    channels_last = _is_channels_last(grad_y)
    write_g = need_g and plan.relu
    g = grad_y if need_g else None
    if write_g:
        g = _empty(grad_y.shape, grad_y.dtype, grad_y.device,
                   torch.channels_last if channels_last else torch.contiguous_format)
    # an output-size term without scale has dx = g: when g is a fresh buffer anyway, it is that term's dx too
    # (one full-resolution write less; only one term, so no two returned gradients share memory)
    g_is_dx = next((k for k in same if write_g and needs[k][0] and not plan.terms[k].has_scale
                    and _grad_layout_of(xs[k], g)), None)
    dxs = [_empty_grad(xs[k], grad_y) if needs[k][0] and k != g_is_dx and k not in deferred else None
           for k in same]
    need_dscale = [needs[k][1] and plan.terms[k].has_scale for k in same]
    need_sum_g = any(needs[k][2] for k in same)
    block_c, block_p, programs, _ = config
    busy = write_g or need_sum_g or any(dx is not None for dx in dxs) or any(need_dscale)
    grads = {k: (g if k == g_is_dx or k in deferred else dx, None, None) for k, dx in zip(same, dxs)}
    if not busy:
        return g, grads, None
    if grad_y.numel() == 0:
        parts.zero_()  # empty tensors: the sums are zero
        return g, grads, None
    y_arg, g_arg = relu_bits if relu_bits is not None else _or(y, grad_y), g if write_g else grad_y
    args = (grad_y, tuple(grad_y.stride()), y_arg, tuple(y_arg.stride()), g_arg, tuple(g_arg.stride()), parts, N,
            C, H, W, tuple(_same_term_args(xs[k], scales[k], dx, read, grad_y)
                           for k, dx, read in zip(same, dxs, need_dscale)))
    constexprs = dict(HAS_SCALE=tuple(plan.terms[k].has_scale for k in same),
                      NEED_DX=tuple(dx is not None for dx in dxs), NEED_DSCALE=tuple(need_dscale), RELU=plan.relu,
                      WRITE_G=write_g, NEED_SUM_G=need_sum_g, BLOCK_C=block_c, BLOCK_P=block_p,
                      RELU_BITS=plan.relu and relu_bits is not None)
    return g, grads, _SameRow(args, programs, constexprs, parts.dtype == torch.float64, int64)


def _grad_layout_of(x: Tensor, g: Tensor) -> bool:
    """Whether g is laid out as `_empty_grad(x, g)` would lay out x's gradient."""
    if 0 in x.stride() and x.numel() > 1:
        return True  # a stand-in: the gradient takes grad_y's layout, as g does
    return x.stride() == g.stride()


def _same_term_args(x: Tensor, scale: Optional[Tensor], dx: Optional[Tensor], read_x: bool,
                    stand_in: Tensor) -> tuple:
    """One output-size term as `_fuse_backward_same_kernel` takes it: (x, x strides, scale, dx, dx strides).
    `stand_in` (grad_y, which the kernel reads anyway) takes the place of what it does not touch: x unless
    `read_x` (for d(scale)), so that counting the launch's tensors counts only what it moves."""
    x = x if read_x else stand_in
    dx = _or(dx, stand_in)
    return (x, tuple(x.stride()), _or(scale, stand_in), dx, tuple(dx.stride()))


def _adjoint_config(z: Tensor, term: TermPlan, H: int, W: int, channels_last: bool
                    ) -> Tuple[int, int, int, int, Tuple[int, int, int], Optional[Tuple[int, int, int, bool]]]:
    """(BLOCK_C, BLOCK_H, BLOCK_W, R, grid, phase) of `_upsample_adjoint_kernel` over source z for a gradient
    of size H x W (channels_last: g's layout): R = rows of partial sums (one per program along pixels and
    image); phase = (PH, PW, PQ, COLS) where the phase form runs (`_adjoint_phase_factors`,
    `_adjoint_phase_tile`), else None."""
    N, C, h, w = z.shape
    phase = _adjoint_phase_factors(term, z, H, W)
    if phase is not None and channels_last and z.dtype == torch.float16:
        # channels_last columns spill for fp16 (sm_90 W48 x8: 696 B)
        phase = None
    if phase is not None:
        cols = channels_last
        block_c, block_q, pq = _adjoint_phase_tile(C, w, phase[1], cols, z.element_size())
        grid = launch_grid(h * (w // (block_q * pq)), C // block_c, N)
        return block_c, 1, block_q * pq, grid[0] * N, grid, (*phase, pq, cols)
    block_c, block_h, block_w = _grid_tile(C, h, w, _is_channels_last(z), budget=ADJOINT_TILE, max_w=ADJOINT_MAX_W)
    grid = launch_grid(cdiv(h, block_h) * cdiv(w, block_w), cdiv(C, block_c), N)
    return block_c, block_h, block_w, grid[0] * N, grid, None


# Threads per program of the adjoint's phase form (one source pixel of one channel each) and the widest row of
# source pixels per program.
ADJOINT_PHASE_THREADS = 128
ADJOINT_PHASE_MAX_Q = 32
ADJOINT_PHASE_PIXELS = 16
# 4-byte floats: half the output columns per thread, so that a row's three upsampled terms fit one
# `_adjoint_row_kernel` (sm_90 W48 stage-4 fp32 row 0: 200 registers, no spills, issue/bytes 0.70; with 16
# columns 255 registers and spills)
ADJOINT_PHASE_PIXELS_WIDE = 8
# channels_last: up to 64 channels per program (contiguous), 2-byte floats 512 elements (4 per thread: 8-byte
# loads of 4 channels; sm_90, W48 stage 4 bf16 x2 / x4 / x8 issue/bytes 0.89 / 0.97 / 1.13 with 128, 0.47 /
# 0.55 / 0.68 with 512 at 95 / 102 / 134 registers), 4-byte floats one per thread, so that a row's x2, x4 and
# x8 terms fit one `_adjoint_row_kernel` (sm_90 W48 stage-4 fp32 row 0: 184 registers, no spills, issue /
# bytes 0.50, 33.1 us against 32.3 + 21.8 us for the x2 / x4 row launch and the x8 gather; 4 per thread spill
# 1,632 B, 2 per thread 136 B)
ADJOINT_PHASE_CL_C = 64
ADJOINT_PHASE_CL_ELEMS = 512


def _adjoint_phase_tile(C: int, w: int, fw: int, cols: bool, itemsize: int) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_Q, PQ) of the phase form: PQ source columns per thread (a thread's share of fixed costs
    against its loads: ADJOINT_PHASE_PIXELS // fw, ADJOINT_PHASE_PIXELS_WIDE // fw for 4-byte floats in NCHW,
    at least 1; cols: half ADJOINT_PHASE_PIXELS // fw, its columns one by one), BLOCK_Q threads along a row (a
    power of 2 up to 32: a warp's loads along a row are contiguous in NCHW), BLOCK_Q * PQ dividing w, BLOCK_C
    channels (a power of 2 dividing C; cols: BLOCK_C x BLOCK_Q up to ADJOINT_PHASE_CL_ELEMS elements for 2-byte
    floats, ADJOINT_PHASE_THREADS for 4-byte ones)."""
    pixels = ADJOINT_PHASE_PIXELS_WIDE if itemsize == 4 and not cols else ADJOINT_PHASE_PIXELS
    pq = max(1, pixels // fw // (2 if cols else 1))
    while pq > 1 and w % pq:
        pq //= 2
    block_q = min(ADJOINT_PHASE_MAX_Q, next_power_of_2(w // pq))
    while block_q > 1 and (w // pq) % block_q:
        block_q //= 2
    if cols:
        block_c = channel_block(C, ADJOINT_PHASE_CL_C)
        elems = ADJOINT_PHASE_CL_ELEMS if itemsize == 2 else ADJOINT_PHASE_THREADS
        block_q = min(block_q, max(1, elems // block_c))
    else:
        block_c = min(channel_block(C, ADJOINT_PHASE_THREADS), max(1, ADJOINT_PHASE_THREADS // block_q))
    while block_c > 1 and C % block_c:
        block_c //= 2
    return block_c, block_q, pq


def _adjoint_phase_factors(term: TermPlan, z: Tensor, H: int, W: int) -> Optional[Tuple[int, int]]:
    """(PH, PW) where `_upsample_adjoint_kernel` takes the phase form: bf16, fp16 or fp32 (fp64, and fp16 with a
    channels_last g, keep the gather: `_adjoint_config`), bilinear without align_corners by
    exactly 1/f on both axes with f a power of 2 in 2..8, g exactly f times z's size; else None."""
    if z.dtype not in (torch.bfloat16, torch.float16, torch.float32) or term.mode != BILINEAR or term.align_corners:
        return None
    factors = []
    for (num, den), n_in, n_out in ((term.ratio_h, z.shape[2], H), (term.ratio_w, z.shape[3], W)):
        if num != 1 or den not in (2, 4, 8) or n_in * den != n_out:
            return None
        factors.append(den)
    return factors[0], factors[1]


def _adjoint_launch(term: TermPlan, g: Tensor, z: Tensor, scale: Optional[Tensor],
                    needs: Tuple[bool, bool, bool], int64: bool, config, parts: Tensor) -> Optional[Tensor]:
    """dz (None unless needs[0]) of one upsampled term; the partials of sum(u * z) and sum(u) into parts
    [2, R, C] where needs[1] / needs[2] ask for them (the caller checked the term has the parameter)."""
    need_dz, need_dscale, need_dshift = needs
    N, C, h, w = z.shape
    H, W = g.shape[2:]
    dz = _empty_grad(z, g) if need_dz else None
    block_c, block_h, block_w, R, grid, phase = config
    dz_arg = _or(dz, z)
    if z.numel() > 0 and (need_dz or need_dscale or need_dshift):
        ph = dict(PH=phase[0], PW=phase[1], PQ=phase[2], COLS=phase[3]) if phase is not None else {}
        with _device_context(z):
            _upsample_adjoint_kernel[grid](
                g, tuple(g.stride()), H, W, _or(scale, z), dz_arg, tuple(dz_arg.stride()), parts, R, C,
                source_args(z, term), window(term.ratio_h, term.mode, term.align_corners, H),
                window(term.ratio_w, term.mode, term.align_corners, W),
                MODE=term.mode, ALIGN=bool(term.align_corners), HAS_SCALE=term.has_scale, NEED_DZ=need_dz,
                NEED_DSCALE=need_dscale, NEED_DSHIFT=need_dshift, F64=parts.dtype == torch.float64,
                INT64=int64 or needs_int64(z, dz), BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w,
                num_warps=4, **ph)
    return dz


# Upsampled terms per `_adjoint_row_kernel` launch (HRNet's rows have at most 3): each term's row sums take
# registers. Three (x2 / x4 / x8) fit where a thread holds one (channel, column group) cell: NCHW (sm_90 W48 stage
# 4: bf16 190 registers, fp32 178 with its half-width rows, ADJOINT_PHASE_PIXELS_WIDE; no spills) and fp32
# channels_last (one channel per thread, 184); bf16 channels_last (4 channels per thread, a row sum per column:
# 796 B spilled) takes two, the rest their own launches.
ADJOINT_ROW_MAX_TERMS = 3
ADJOINT_ROW_MAX_TERMS_WIDE = 2


def _adjoint_row_group(upsampled: Sequence[int], cfgs: dict, xs: Sequence[Tensor], min_terms: int = 2
                       ) -> List[int]:
    """The upsampled terms (indices, in order) that one `_adjoint_row_kernel` launch takes: those in the
    adjoint's phase form whose configurations (`_adjoint_config`) share BLOCK_C, BLOCK_Q, the output columns
    per thread (PQ x PW) and COLS, and whose sources share a dtype, the first such up to ADJOINT_ROW_MAX_TERMS
    (a [BLOCK_C, BLOCK_Q] program of ADJOINT_PHASE_THREADS cells, one per thread) or ADJOINT_ROW_MAX_TERMS_WIDE;
    [] unless at least `min_terms` (one row's single term keeps `_upsample_adjoint_kernel`; a step's rows share
    one launch, single terms included: `fuse_backward_rows`)."""
    def key(k):
        block_c, _, block_w, _, _, phase = cfgs[k]
        return block_c, block_w // phase[2], phase[2] * phase[1], phase[3], xs[k].dtype

    phased = [k for k in upsampled if cfgs[k][5] is not None]
    if not phased:
        return []
    # 3 only where every thread holds one cell (sm_90 W18 bf16 row 0, [2 x 16] on 128 threads: 16 B spilled;
    # bf16 channels_last [16 x 32])
    narrow = _phase_cells(cfgs[phased[0]]) == ADJOINT_PHASE_THREADS
    group = [k for k in phased if key(k) == key(phased[0])]
    group = group[:ADJOINT_ROW_MAX_TERMS if narrow else ADJOINT_ROW_MAX_TERMS_WIDE]
    return group if len(group) >= min_terms else []


# Cells ([channel, column group] pairs) per program of every row in a shared adjoint-row launch: a program of
# fewer cells than threads replicates values across threads and takes more registers, and together such rows
# spilled (W18 training, 4-8 B: sm_80 bf16 channels_last [2 x 32] / [4 x 16] / [8 x 8] programs, sm_90 fp16
# [2 x 16] / [4 x 8]); W48's rows hold one or more per thread.
ADJOINT_ROWS_MIN_CELLS = ADJOINT_PHASE_THREADS


def _shares_adjoint_launch(rows: Sequence[_RowBackward]) -> bool:
    """Whether a step's rows share one `_adjoint_rows_kernel` launch: at least two of them have phase-form terms
    (`_adjoint_row_group`), each on programs of at least ADJOINT_ROWS_MIN_CELLS cells."""
    firsts = [row.adjoint_cfgs[group[0]] for row in rows for group in [row.row_group(1)] if group]
    return len(firsts) >= 2 and all(_phase_cells(cfg) >= ADJOINT_ROWS_MIN_CELLS for cfg in firsts)


def _phase_cells(config) -> int:
    """[channel, column group] cells per program (BLOCK_C x BLOCK_Q) of an adjoint phase-form configuration
    (`_adjoint_config`)."""
    block_c, _, block_w, _, _, phase = config
    return block_c * (block_w // phase[2])


def _reads_pairs(g: Tensor, cols: bool) -> bool:
    """Whether `_adjoint_row_kernel` reads g's rows as 32-bit words of two bf16 columns (PAIRS): bf16 with
    unit column stride (not `cols`), every other stride even and the data 4-byte aligned, so that each of its
    pieces (even starts and widths) is whole words."""
    return (g.dtype == torch.bfloat16 and not cols and g.stride(3) == 1 and all(s % 2 == 0 for s in g.stride()[:3])
            and g.data_ptr() % 4 == 0)


class _AdjointRow(NamedTuple):
    """One row's `_adjoint_row_kernel` launch: its arguments (g, g strides, W, h0, C, terms), grid (pixel
    programs, channel blocks, images) and constexprs but INT64."""

    args: tuple
    grid: Tuple[int, int, int]
    constexprs: dict
    int64: bool


def _adjoint_row_entry(plan: FusePlan, row: Sequence[int], g: Tensor, xs: Sequence[Tensor],
                       scales: Sequence[Optional[Tensor]], needs: Dict[int, Tuple[bool, bool, bool]], int64: bool,
                       cfgs: dict, parts: Dict[int, Tensor]
                       ) -> Tuple[Dict[int, Optional[Tensor]], Optional[_AdjointRow]]:
    """dz by term index (None unless needs[k][0]) of the terms `row` (`_adjoint_row_group`) and the
    `_adjoint_row_kernel` launch that writes them (None: empty), each term's partial sums into parts[k] [2, R,
    C] as its own `_adjoint_launch` would write them. g stands in for what a term does not read (its z without
    d(scale), scale, dz)."""
    N, C, H, W = g.shape
    block_c, _, block_w, _, _, phase = cfgs[row[0]]
    block_q = block_w // phase[2]
    fh = tuple(cfgs[k][5][0] for k in row)
    fw = tuple(cfgs[k][5][1] for k in row)
    pq = tuple(cfgs[k][5][2] for k in row)
    dzs = {k: _empty_grad(xs[k], g) if needs[k][0] else None for k in row}
    if N * C * H * W == 0:
        return dzs, None
    terms = []
    for k in row:
        z = xs[k] if needs[k][1] else g
        dz = _or(dzs[k], g)
        terms.append((z, tuple(z.stride()), _or(scales[k], g), dz, tuple(dz.stride()), parts[k]))
    h0 = H // max(fh)
    grid = launch_grid(h0 * (W // (block_q * phase[2] * phase[1])), C // block_c, N)
    constexprs = dict(HAS_SCALE=tuple(plan.terms[k].has_scale for k in row), NEED_DZ=tuple(needs[k][0] for k in row),
                      NEED_DSCALE=tuple(needs[k][1] for k in row), NEED_DSHIFT=tuple(needs[k][2] for k in row),
                      FH=fh, FW=fw, P=pq, COLS=phase[3], BLOCK_C=block_c, BLOCK_Q=block_q,
                      PAIRS=_reads_pairs(g, phase[3]))
    return dzs, _AdjointRow((g, tuple(g.stride()), W, h0, C, tuple(terms)), grid, constexprs,
                            int64 or any(needs_int64(xs[k], dzs[k]) for k in row))


def _adjoint_launch_rows(rows: Sequence[_AdjointRow]) -> None:
    """One `_adjoint_row_kernel` launch for one row's entry, one `_adjoint_rows_kernel` launch for several (a
    step's rows: row k's programs follow row k-1's on the 1-D grid)."""
    if not rows:
        return
    if len(rows) == 1:
        (row,) = rows
        with _device_context(row.args[0]):
            _adjoint_row_kernel[row.grid](*row.args, INT64=row.int64, **row.constexprs, num_warps=4)
        return
    # (g, g strides, W, h0, C, N, terms, pixel programs, channel blocks)
    args = [(*r.args[:5], r.grid[2], r.args[5], r.grid[0], r.grid[1]) for r in rows]
    entries, start, per_row = _program_ranges(args, [math.prod(r.grid) for r in rows], [r.constexprs for r in rows])
    with _device_context(rows[0].args[0]):
        _adjoint_rows_kernel[launch_grid(start)](entries, INT64=any(r.int64 for r in rows), **per_row, num_warps=4)


def upsample_term_backward(term: TermPlan, g: Tensor, z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                           needs: Tuple[bool, bool, bool], int64: bool = False) -> Grads:
    """(dz, dscale, dshift) of one upsampled term Up(z * scale + shift) from g, the gradient at the output size
    (None where `needs` says so or the plan gives the term no such parameter), through the adjoint of Up as a
    gather. The head's backward (dP_j) uses it; the fusion op's backward launches the same kernel
    (`_adjoint_launch`) and reduces all its partial sums in one launch."""
    C = z.shape[1]
    need_dz, need_dscale, need_dshift = needs
    need_dscale = need_dscale and term.has_scale
    need_dshift = need_dshift and term.has_shift
    config = _adjoint_config(z, term, *g.shape[2:], _is_channels_last(g))
    R = config[3]
    parts = _empty((2, R, C), _accumulation_dtype(z.dtype), z.device)
    dz = _adjoint_launch(term, g, z, scale, (need_dz, need_dscale, need_dshift), int64, config, parts)
    dscale = dshift = None
    if need_dscale or need_dshift:
        totals = parts.sum(dim=1)
        dscale = totals[0].to(scale.dtype) if need_dscale else None
        dshift = totals[1].to(shift.dtype) if need_dshift else None
    return dz, dscale, dshift
