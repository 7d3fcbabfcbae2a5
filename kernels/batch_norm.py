"""Triton kernels for batch norm's batch statistics and its input gradient (the training fold of a fusion term).

For z [N, C, H, W] the batch norm with batch statistics is, per channel c over the count = N*H*W values,

    mean = sum z / count,   var = sum (z - mean)^2 / count (biased),   r = 1 / sqrt(var + eps)
    scale = w * r,          shift = b - mean * scale                     (the fold: bn(z) = z * scale + shift)

Forward (`batch_stats`): one read of z in its own dtype, fp32 accumulation (fp64 for fp64), no copy.
`_bn_stats_kernel` reduces [BLOCK_C x CHUNK] blocks of IMGS images to (mean, M2) partials: every element slot of
the [BLOCK_C x BLOCK_P] tile accumulates its values shifted by its own first value in registers (shifted sums,
no cross-lane work per tile), and the slots are pooled once per program, centred (`_stats_term`: the error
bound); the partial means are stored less a per-channel reference value (z's first), so no sum of squares of
uncentred values ever forms and the partials' spread survives fp32 (z = 1000 + noise keeps its variance). The
finalize (`_finalize_channels`:
in the statistics launch itself, by the last program of each channel block to finish, found by a ticket counter
(an atomic on the ticket only, the values never go through atomics); `_bn_finalize_kernel`, a second launch, with
MERGED_FINALIZE off) merges the partials in a fixed order (a tile of partials at a time: the pooled mean and the
pooled M2 plus the between-partial term, then Chan's formula across tiles) and writes mean and r (saved for the
backward), scale and shift, and the running-statistics update `running = factor * batch + keep * running`
(unbiased variance) straight into the module's buffers, and `num_batches_tracked += 1` when given the counter
(where the factor is the momentum: the fold saves that add's launch). One launch (two without MERGED_FINALIZE,
the default until a GPU has run the merged one),
the same fixed order whichever program finalizes: bitwise deterministic for a given shape.

Backward (`batch_norm_backward`): given the gradients (g_term, g_scale, g_shift) of the fold's outputs,

    g_b = g_shift,   g_w = r * (g_scale - mean * g_shift),   g_mean = -scale * g_shift,
    g_var = -0.5 * r^3 * w * (g_scale - mean * g_shift),
    dz = g_term + g_mean / count + 2 * g_var * (z - mean) / count

one pass: read g_term and z, write dz, in the accumulation dtype and rounded once to z's dtype (what batch
norm's own backward does; summing two bf16 gradients would round the small statistics part away). Every
program derives the per-channel coefficients from the [C] vectors itself; the program of each channel block
that holds the first pixels also writes g_w (and g_b where the bias's dtype is not g_shift's).

Several folds at once (a fusion step's, every row's: `batch_stats` and `batch_norm_backward` take a list of terms):
one launch of each kernel for up to MAX_TERMS terms. The grid is 1-D; programs [start, end) are term k's, and each
kernel is a static loop over its terms (`tl.static_range`) that runs the one-term code (`_stats_term`,
`_finalize_channels`, `_backward_term`) with term k's tensors, sizes and tile constexprs on the program's local id:
the same arithmetic in the same order as the term alone (one term is the k = 1 case), bitwise equal results. Terms
that cannot share a launch's scalars (accumulation dtype, eps, the running-average factor) or that update the same
buffers go in launches of their own, in order.

Layouts: z is read as [N, C, P] over P = H*W pixels with strides (s_n, s_c, s_p), which covers NCHW and
channels_last (and any layout whose H and W collapse); other layouts are copied contiguous first. Strides equal
to 1 become compile-time constants (Triton's specialisation), so the contiguous axis gets vector loads.
"""
from __future__ import annotations

import os
import struct
from contextlib import nullcontext
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .resample import cdiv, channel_block, launch_grid, next_power_of_2

__all__ = ["StatsTerm", "BackwardTerm", "batch_stats", "batch_norm_backward", "can_launch", "stats_config"]

TILE = 2048  # elements per loaded tile (4 warps: 16 per thread)
STATS_PROGRAMS = 1024  # about this many statistics programs (fixed, not read from the device: deterministic)
PROGRAM_TILES = 16  # at least this many tiles per statistics program where the shape has them
MAX_PARTIALS = 256  # at most this many partials per channel: the finalize loops over them (latency)
MAX_CHANNELS_LAST_BLOCK = 64
MIN_FITTED_BLOCK = 16  # channels_last statistics: a lane-fitted channel block (`stats_config`) from 16 channels
FINALIZE_BLOCK_C = 32
FINALIZE_BLOCK_S = 64
MAX_TERMS = 12  # folds per launch (a fusion step of a 4-branch HRNet stage has 12): each count compiles a variant
# the statistics launch finalizes too (its last program per channel block): one launch per fold, not two. Off
# until a GPU has run it: the Triton interpreter runs programs one at a time, so the tests cannot reach the
# ticket's cross-program memory ordering (HRFAST_BN_MERGED_FINALIZE=1 turns it on; benchmarks/gpu_session.sh
# unverified runs the batch-norm tests with it)
MERGED_FINALIZE = os.environ.get("HRFAST_BN_MERGED_FINALIZE", "0") == "1"


@triton.jit
def _as(x, acc_t: tl.constexpr, BLOCK: tl.constexpr):
    """A float64-annotated scalar argument as a [BLOCK] vector in acc_t (the interpreter passes a Python float,
    which has no .to(): adding zeros in acc_t works for both)."""
    return (x + tl.zeros([BLOCK], acc_t)).to(acc_t)


@triton.jit
def _stats_term(pid, z_ptr, part_ptr, C, P, z_strides, S, SPLITS, CHUNK, IMGS, unbias_bits, ticket_base,
                weight_ptr, bias_ptr, stats_ptr, scale_ptr, shift_ptr, run_mean_ptr, run_var_ptr, counter_ptr,
                tickets_ptr, eps, factor, keep, F64: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_P: tl.constexpr, MERGED: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                UPDATE: tl.constexpr, COUNT: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program `pid` of one term (channel block fastest, then split, then image group): (mean, M2) of pixels
    [sp*CHUNK, (sp+1)*CHUNK) of images [g*IMGS, (g+1)*IMGS), at row g*SPLITS + sp of the term's [2S + 1, C]
    partials (S means less the channel's reference R, S M2s, then R, stored by the first partial's program).
    MERGED: the last of the S programs of a channel block to finish (a ticket per channel block, an atomic
    counter; the values never go through atomics) finalizes the block's channels as `_bn_finalize_kernel` does,
    in the same fixed order, and resets its ticket.

    Shifted sums per slot: every element slot j of the [BLOCK_C x BLOCK_P] tile keeps its value in the program's
    first tile as its reference K_j (0 where it has none) and accumulates s1_j = sum(x - K_j) and s2_j =
    sum((x - K_j)^2) over the program's other tiles in registers: no cross-lane work per tile. The slots are
    pooled once: mean = sum_j(n_j K_j + s1_j) / n, M2 = sum_j(s2_j + e_j (2 s1_j + n_j e_j)) with e_j = K_j - mean
    (exact algebra: x - mean = (x - K_j) + e_j), everything less R. Error bound: K_j is one of slot j's own n_j
    values, so (K_j - mean_j)^2 <= M2_j and s2_j = M2_j + n_j (K_j - mean_j)^2 <= (1 + n_j) M2_j whatever the
    mean: the rounding error of M2 is at most O(n_j^2 u) relative (a reference that is an outlier; O(n_j u) for
    one near the middle), u the unit roundoff and n_j = IMGS x the chunk's tiles (<= PROGRAM_TILES when the shape
    does not cap the partials), instead of u * mean^2 / var for a sum of squares of uncentred values (z = 1000 +
    noise keeps its variance). A fixed order: deterministic."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    blocks = tl.cdiv(C, BLOCK_C)
    pid_c = pid % blocks
    sp = (pid // blocks) % SPLITS
    g = pid // blocks // SPLITS
    s_n, s_c, s_p = z_strides
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, P)
    if INT64:
        base = z_ptr + (g * IMGS).to(tl.int64) * s_n + c.to(tl.int64)[:, None] * s_c
    else:
        base = z_ptr + g * IMGS * s_n + c[:, None] * s_c
    p = start + tl.arange(0, BLOCK_P)
    mask = c_mask[:, None] & (p < end)[None, :]
    if INT64:
        offs = p.to(tl.int64)[None, :] * s_p
    else:
        offs = p[None, :] * s_p
    # the first tile of the first image: the references (their own shifted values are 0: not accumulated)
    k = tl.load(base + offs, mask=mask, other=0.0).to(acc_t)
    # the channel's own reference R (its first value), the same for all its partials: they hold their mean less
    # R, exact to u * spread rather than u * |mean| (the finalize's between-partials term needs that)
    if INT64:
        ref = tl.load(z_ptr + c.to(tl.int64) * s_c, mask=c_mask, other=0.0).to(acc_t)
    else:
        ref = tl.load(z_ptr + c * s_c, mask=c_mask, other=0.0).to(acc_t)
    s1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=acc_t)
    s2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=acc_t)
    image = base
    for i in range(0, IMGS):
        for p0 in range(start + BLOCK_P * (i == 0), end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = c_mask[:, None] & (p < end)[None, :]
            if INT64:
                offs = p.to(tl.int64)[None, :] * s_p
            else:
                offs = p[None, :] * s_p
            x = tl.load(image + offs, mask=mask, other=0.0).to(acc_t)
            d = tl.where(mask, x - k, 0.0)
            s1 += d
            s2 += d * d
        image += s_n  # a pointer: 64-bit whatever s_n's type
    # values per slot: IMGS x the chunk's tiles, one less tile where the slot is past the end in the last one
    tiles = tl.cdiv(end - start, BLOCK_P)
    last = start + (tiles - 1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n_j = tl.where(last < end, IMGS * tiles, IMGS * (tiles - 1)).to(acc_t)[None, :]
    count = (IMGS * (end - start)).to(acc_t)
    k -= ref[:, None]
    mean = tl.sum(n_j * k + s1, axis=1) / count
    e = k - mean[:, None]
    m2 = tl.sum(s2 + e * (2.0 * s1 + n_j * e), axis=1)
    row = g * SPLITS + sp
    tl.store(part_ptr + row * C + c, mean, mask=c_mask)
    tl.store(part_ptr + (S + row) * C + c, m2, mask=c_mask)
    if (g == 0) & (sp == 0):
        tl.store(part_ptr + 2 * S * C + c, ref, mask=c_mask)
    if MERGED:
        # every thread's partial stores before the ticket (released at GPU scope); the last program acquires
        # them and reads the partials from L2 (.cg: never a line its SM's L1 cached before)
        tl.debug_barrier()
        ticket = tl.atomic_add(tickets_ptr + ticket_base + pid_c, 1, sem="acq_rel", scope="gpu")
        if ticket == S - 1:
            _finalize_channels(part_ptr, c, c_mask, P, S, SPLITS, CHUNK, IMGS, C, unbias_bits, weight_ptr,
                               bias_ptr, stats_ptr, scale_ptr, shift_ptr, run_mean_ptr, run_var_ptr, eps, factor, keep,
                               HAS_WEIGHT, HAS_BIAS, UPDATE, F64, BLOCK_C, BLOCK_S, ".cg")
            if COUNT:
                if pid_c == 0:
                    tl.store(counter_ptr, tl.load(counter_ptr) + 1)
            # ready for the next launch
            tl.atomic_xchg(tickets_ptr + ticket_base + pid_c, 0, sem="relaxed", scope="gpu")


@triton.jit
def _bn_stats_kernel(terms, tickets_ptr, eps: tl.float64, factor: tl.float64, keep: tl.float64,
                     F64: tl.constexpr, INT64: tl.constexpr, MERGED: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_P: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE: tl.constexpr,
                     COUNT: tl.constexpr, BLOCK_S: tl.constexpr):
    """The statistics of up to MAX_TERMS batch norms in one launch: programs [start, end) of the 1-D grid are
    term k's (`terms[k]`: its tensors, sizes and program range; the constexprs are tuples, one entry per term),
    each running `_stats_term` on its own local program id. One term: today's single-fold launch."""
    pid = tl.program_id(0)
    for k in tl.static_range(len(terms)):
        (z_ptr, part_ptr, C, P, z_strides, S, SPLITS, CHUNK, IMGS, unbias_bits, ticket_base, weight_ptr, bias_ptr,
         stats_ptr, scale_ptr, shift_ptr, run_mean_ptr, run_var_ptr, counter_ptr, start, end) = terms[k]
        if (pid >= start) & (pid < end):
            _stats_term(pid - start, z_ptr, part_ptr, C, P, z_strides, S, SPLITS, CHUNK, IMGS, unbias_bits,
                        ticket_base,
                        weight_ptr, bias_ptr, stats_ptr, scale_ptr, shift_ptr, run_mean_ptr, run_var_ptr,
                        counter_ptr, tickets_ptr, eps, factor, keep, F64, INT64, BLOCK_C[k], BLOCK_P[k], MERGED,
                        HAS_WEIGHT[k], HAS_BIAS[k], UPDATE[k], COUNT[k], BLOCK_S[k])


@triton.jit
def _finalize_channels(part_ptr, c, c_mask, P, S, SPLITS, CHUNK, IMGS, C, unbias_bits, weight_ptr, bias_ptr,
                       stats_ptr, scale_ptr, shift_ptr, run_mean_ptr, run_var_ptr, eps, factor, keep,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE: tl.constexpr, F64: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CACHE: tl.constexpr):
    """Channels c: merges the S partials in order, BLOCK_S at a time; writes stats [2, C] = (mean, r), scale,
    shift and, with UPDATE, the running statistics (in their own dtype; the variance made unbiased by
    count / (count - 1), a float64 passed as its bits, an int64: a term's floats sit in a tuple, which Triton
    would type float32)."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    count_c = tl.zeros([BLOCK_C], dtype=acc_t)
    mean = tl.zeros([BLOCK_C], dtype=acc_t)
    m2 = tl.zeros([BLOCK_C], dtype=acc_t)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < S
        # values of partial s: pixels of its split times its images, 0 for rows past S
        n_s = tl.where(s_mask, IMGS * tl.minimum(CHUNK, P - (s % SPLITS) * CHUNK), 0).to(acc_t)
        mask = s_mask[:, None] & c_mask[None, :]
        offs = s[:, None] * C + c[None, :]
        p_mean = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=CACHE)
        p_m2 = tl.load(part_ptr + S * C + offs, mask=mask, other=0.0, cache_modifier=CACHE)
        # the block's pooled (count, mean, M2): centred on its own mean, then merged like one partial
        t_count = tl.sum(n_s, axis=0)
        t_mean = tl.sum(p_mean * n_s[:, None], axis=0) / t_count
        dev = p_mean - t_mean[None, :]
        t_m2 = tl.sum(p_m2 + dev * dev * n_s[:, None], axis=0)
        total = count_c + t_count
        delta = t_mean - mean
        mean += delta * (t_count / total)
        m2 += t_m2 + delta * delta * (count_c * t_count / total)
        count_c = total
    var = m2 / count_c
    # the partials' means are less the channel's reference (stored after them by the first partial's program)
    mean += tl.load(part_ptr + 2 * S * C + c, mask=c_mask, other=0.0, cache_modifier=CACHE)
    if F64:  # fp64 sqrt and division round correctly
        r = 1.0 / tl.sqrt(var + _as(eps, acc_t, BLOCK_C))
    else:  # fp32 `/` and tl.sqrt are approximate in PTX: round as torch.rsqrt's 1 / sqrt does
        r = tl.math.div_rn(tl.full([BLOCK_C], 1.0, acc_t), tl.sqrt_rn(var + _as(eps, acc_t, BLOCK_C)))
    scale = r
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(acc_t) * r
    shift = -mean * scale
    if HAS_BIAS:
        shift = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(acc_t) + shift
    tl.store(stats_ptr + c, mean, mask=c_mask)
    tl.store(stats_ptr + C + c, r, mask=c_mask)
    tl.store(scale_ptr + c, scale, mask=c_mask)
    tl.store(shift_ptr + c, shift, mask=c_mask)
    if UPDATE:
        unbias = unbias_bits.to(tl.float64, bitcast=True)
        f = _as(factor, acc_t, BLOCK_C)
        k = _as(keep, acc_t, BLOCK_C)
        old_mean = tl.load(run_mean_ptr + c, mask=c_mask, other=0.0).to(acc_t)
        old_var = tl.load(run_var_ptr + c, mask=c_mask, other=0.0).to(acc_t)
        new_mean = f * mean + k * old_mean
        new_var = f * (var * unbias.to(acc_t)) + k * old_var
        tl.store(run_mean_ptr + c, new_mean.to(run_mean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(run_var_ptr + c, new_var.to(run_var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _bn_finalize_kernel(terms, eps: tl.float64, factor: tl.float64, keep: tl.float64,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE: tl.constexpr,
                        COUNT: tl.constexpr, F64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """The finalize as a launch of its own (MERGED_FINALIZE off), for the terms of one statistics launch:
    programs [start, end) are term k's, one per BLOCK_C channels (`_finalize_channels`); with COUNT[k] the
    term's first program adds 1 to the module's num_batches_tracked (batch norm's own counter, no launch of its
    own)."""
    pid = tl.program_id(0)
    for k in tl.static_range(len(terms)):
        (part_ptr, C, P, S, SPLITS, CHUNK, IMGS, unbias_bits, weight_ptr, bias_ptr, stats_ptr, scale_ptr, shift_ptr,
         run_mean_ptr, run_var_ptr, counter_ptr, start, end) = terms[k]
        if (pid >= start) & (pid < end):
            if COUNT[k]:
                if pid == start:
                    tl.store(counter_ptr, tl.load(counter_ptr) + 1)
            c = (pid - start) * BLOCK_C + tl.arange(0, BLOCK_C)
            _finalize_channels(part_ptr, c, c < C, P, S, SPLITS, CHUNK, IMGS, C, unbias_bits, weight_ptr, bias_ptr,
                               stats_ptr, scale_ptr, shift_ptr, run_mean_ptr, run_var_ptr, eps, factor, keep,
                               HAS_WEIGHT[k], HAS_BIAS[k], UPDATE[k], F64, BLOCK_C, BLOCK_S, "")


@triton.jit
def _backward_term(pid, z_ptr, z_strides, g_ptr, g_strides, dz_ptr, dz_strides, C, P, count, stats_ptr,
                   weight_ptr, g_scale_ptr, g_shift_ptr, g_weight_ptr, g_bias_ptr,
                   HAS_G: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_GSCALE: tl.constexpr,
                   HAS_GSHIFT: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                   G_SCALED: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    """Program `pid` of one term (pixel block fastest, then channel block, then image; one program per channel
    block without dz): dz on a [BLOCK_C x BLOCK_P] tile; the program of pixel block 0 of image 0 also writes g_w
    (NEED_DW) and g_b = g_shift in the bias's dtype (NEED_DB) of its channels. Strides are (s_n, s_c, s_p).
    G_SCALED: g_term is the gradient of the folded term's scaled value, taken times scale = w * r here (the
    finalize's product, so the fused op's scale bitwise)."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    if NEED_DZ:
        tiles = tl.cdiv(P, BLOCK_P)
        pid_p = pid % tiles
        c = (pid // tiles) % tl.cdiv(C, BLOCK_C) * BLOCK_C + tl.arange(0, BLOCK_C)
        n = pid // tiles // tl.cdiv(C, BLOCK_C)
        first = (pid_p == 0) & (n == 0)
    else:
        c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        first = True
    c_mask = c < C
    mean = tl.load(stats_ptr + c, mask=c_mask, other=0.0)
    r = tl.load(stats_ptr + C + c, mask=c_mask, other=0.0)
    w = tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(acc_t) if HAS_WEIGHT else 1.0
    g_shift = tl.load(g_shift_ptr + c, mask=c_mask, other=0.0).to(acc_t) if HAS_GSHIFT else 0.0
    t = -mean * g_shift
    if HAS_GSCALE:
        t += tl.load(g_scale_ptr + c, mask=c_mask, other=0.0).to(acc_t)
    if NEED_DW:
        if first:
            tl.store(g_weight_ptr + c, (r * t).to(g_weight_ptr.dtype.element_ty), mask=c_mask)
    if NEED_DB:
        if first:
            tl.store(g_bias_ptr + c, (g_shift + tl.zeros([BLOCK_C], acc_t)).to(g_bias_ptr.dtype.element_ty),
                     mask=c_mask)
    if NEED_DZ:
        inv_count = 1.0 / _as(count, acc_t, BLOCK_C)
        # dz = g_term + a + b * (z - mean):  a = g_mean / count,  b = 2 * g_var / count
        a = -(w * r) * g_shift * inv_count
        b = -(r * r * r) * w * t * inv_count
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p < P)[None, :]
        if INT64:
            n64, c64, p64 = n.to(tl.int64), c.to(tl.int64)[:, None], p.to(tl.int64)[None, :]
        else:
            n64, c64, p64 = n, c[:, None], p[None, :]
        z = tl.load(z_ptr + n64 * z_strides[0] + c64 * z_strides[1] + p64 * z_strides[2], mask=mask,
                    other=0.0).to(acc_t)
        dz = a[:, None] + b[:, None] * (z - mean[:, None])
        if HAS_G:
            g = tl.load(g_ptr + n64 * g_strides[0] + c64 * g_strides[1] + p64 * g_strides[2], mask=mask,
                        other=0.0).to(acc_t)
            if G_SCALED:
                g = g * (w * r)[:, None]
            dz = g + dz
        tl.store(dz_ptr + n64 * dz_strides[0] + c64 * dz_strides[1] + p64 * dz_strides[2],
                 dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_backward_kernel(terms, HAS_G: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_GSCALE: tl.constexpr,
                        HAS_GSHIFT: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DW: tl.constexpr,
                        NEED_DB: tl.constexpr, G_SCALED: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The backward of up to MAX_TERMS folds in one launch: programs [start, end) are term k's (`_backward_term`;
    the constexprs are tuples, one entry per term)."""
    pid = tl.program_id(0)
    for k in tl.static_range(len(terms)):
        (z_ptr, z_strides, g_ptr, g_strides, dz_ptr, dz_strides, C, P, count, stats_ptr, weight_ptr, g_scale_ptr,
         g_shift_ptr, g_weight_ptr, g_bias_ptr, start, end) = terms[k]
        if (pid >= start) & (pid < end):
            _backward_term(pid - start, z_ptr, z_strides, g_ptr, g_strides, dz_ptr, dz_strides, C, P, count,
                           stats_ptr, weight_ptr, g_scale_ptr, g_shift_ptr, g_weight_ptr, g_bias_ptr, HAS_G[k],
                           HAS_WEIGHT[k], HAS_GSCALE[k], HAS_GSHIFT[k], NEED_DZ[k], NEED_DW[k], NEED_DB[k],
                           G_SCALED[k], F64, INT64, BLOCK_C[k], BLOCK_P[k])


# ------------------------------------------------------------------------------------------------ launchers


class StatsTerm(NamedTuple):
    """One fold's statistics: z [N, C, H, W] over (N, H, W) in `dtype` (float32, or float64), the module's
    weight / bias (None: 1 / 0), eps, and what to update: the running buffers (None: not tracked) with the
    averaging `factor`, and `counter` (the module's num_batches_tracked, +1)."""

    z: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float
    dtype: torch.dtype
    running_mean: Optional[Tensor] = None
    running_var: Optional[Tensor] = None
    factor: float = 0.0
    counter: Optional[Tensor] = None


class BackwardTerm(NamedTuple):
    """One fold's backward (see `batch_norm_backward`)."""

    z: Tensor
    g_term: Optional[Tensor]
    stats: Tensor
    weight: Optional[Tensor]
    g_scale: Optional[Tensor]
    g_shift: Optional[Tensor]
    need_dz: bool = True
    need_dw: bool = False
    g_bias: Optional[Tensor] = None
    g_scaled: bool = False  # g_term is the gradient of term * scale: dz takes g_term * scale (`_backward_term`)


def can_launch(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device`: CUDA, CPU under the Triton interpreter, or meta
    tensors while `hrfast.perf.record` has replaced the kernels by recorders (no launch happens)."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":  # hrfast.backends.triton_interpreter_enabled's rule (kernels/ imports only the plan)
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "meta":
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        return not isinstance(_bn_stats_kernel, (JITFunction, InterpretedFunction))
    return False


def _pixel_strides(t: Tensor) -> Optional[Tuple[int, int, int]]:
    """(s_n, s_c, s_p) reading t [N, C, H, W] as [N, C, H*W], or None when H and W do not collapse."""
    _, _, h, w = t.shape
    s_n, s_c, s_h, s_w = t.stride()
    if h == 1:
        return s_n, s_c, s_w
    if w == 1 or s_h == w * s_w:
        return s_n, s_c, (s_h if w == 1 else s_w)
    return None


def _collapsible(t: Tensor) -> Tensor:
    return t if _pixel_strides(t) is not None else t.contiguous()


def _max_offset(t: Tensor) -> int:
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


def _int64(*tensors: Tensor) -> bool:
    return any(_max_offset(t) > 2**31 - 1 - TILE for t in tensors)


def _tile(C: int, P: int, s_c: int) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of about TILE elements, wide along the contiguous axis (channels for channels_last)."""
    if s_c == 1 and C > 1:
        block_c = min(next_power_of_2(C), MAX_CHANNELS_LAST_BLOCK)
        return block_c, max(1, min(TILE // block_c, next_power_of_2(P)))
    block_p = min(next_power_of_2(P), TILE // 2)
    return max(1, min(TILE // block_p, next_power_of_2(C))), block_p


def stats_config(N: int, C: int, P: int, s_c: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_C, BLOCK_P, SPLITS, CHUNK, IMGS): a program reduces CHUNK pixels (a multiple of BLOCK_P; SPLITS
    chunks per image) of IMGS images (a divisor of N; more than 1 only for whole-image chunks), at least
    PROGRAM_TILES tiles where the shape has them (its fixed cost, the final cross-lane pooling and the merged
    finalize's code, spread over enough loads), about STATS_PROGRAMS programs where there are more, and at most
    MAX_PARTIALS partials per channel where N allows. A function of the shape only (deterministic), the same
    whether the term is launched alone or grouped."""
    block_c, block_p = _tile(C, P, s_c)
    fitted = channel_block(C, MAX_CHANNELS_LAST_BLOCK)
    if s_c == 1 and C > 1 and fitted >= MIN_FITTED_BLOCK:
        # channels_last: blocks with >= 90% of their lanes on real channels (C = 48: 16, not 64 with a quarter
        # idle), where each pixel's run stays a sector wide
        block_c, block_p = fitted, max(1, min(TILE // fitted, next_power_of_2(P)))
    tiles = cdiv(P, block_p)
    per_program = max(PROGRAM_TILES, cdiv(cdiv(C, block_c) * N * tiles, STATS_PROGRAMS))
    if per_program < tiles:  # chunks of the image
        splits = min(cdiv(tiles, per_program), max(1, MAX_PARTIALS // N))
        chunk = cdiv(tiles, splits) * block_p
        return block_c, block_p, cdiv(P, chunk), chunk, 1
    # whole images, as many as the program takes that divide N
    imgs = max(d for d in range(1, min(N, max(1, per_program // tiles)) + 1) if N % d == 0)
    return block_c, block_p, 1, tiles * block_p, imgs


def _float64_bits(x: float) -> int:
    """x's float64 bits as an int (the kernel bitcasts it back)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _device_context(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def _groups(items: Sequence, joins: Callable[[list, object], bool], buffers) -> List[list]:
    """`items` in launch groups: consecutive items, at most MAX_TERMS per group, a new group where
    joins(group, item) is False or the item shares a buffer it updates with the group (buffers(item): tensors;
    the same module twice must update in order, one launch after the other)."""
    groups: List[list] = []
    seen: set = set()
    for item in items:
        mine = {t.untyped_storage()._cdata for t in buffers(item) if t is not None}
        if not groups or len(groups[-1]) == MAX_TERMS or not joins(groups[-1], item) or mine & seen:
            groups.append([])
            seen = set()
        groups[-1].append(item)
        seen |= mine
    return groups


def _updates(t: "StatsTerm") -> bool:
    return t.running_mean is not None and t.running_var is not None


def batch_stats(terms: Sequence[StatsTerm]) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """(stats, scale, shift) of each term's z [N, C, H, W] over (N, H, W), in its `dtype`: stats [2, C] =
    (mean, 1 / sqrt(var + eps)) with the biased variance, scale = weight * r, shift = bias - mean * scale
    (weight / bias None: 1 / 0). Running buffers given are updated in place as F.batch_norm does:
    running = factor * batch + (1 - factor) * running, unbiased variance; a counter given is incremented by 1.

    The terms go in as few launches as the launch's scalars allow: one statistics launch (and one finalize
    launch without MERGED_FINALIZE) per group of up to MAX_TERMS consecutive terms with the same dtype and eps
    and, among those that update running statistics, the same factor (`_groups`); each term's arithmetic is the
    same as alone (bitwise). The caller checks that there is more than one value per channel."""
    items = list(enumerate(t._replace(z=_collapsible(t.z)) for t in terms))

    def joins(group, item) -> bool:
        t = item[1]
        first = group[0][1]
        if (t.dtype, float(t.eps)) != (first.dtype, float(first.eps)):
            return False
        factors = {float(g.factor) for _, g in group if _updates(g)}
        return not _updates(t) or not factors or factors == {float(t.factor)}

    out: List[Optional[Tuple[Tensor, Tensor, Tensor]]] = [None] * len(terms)
    for group in _groups(items, joins, lambda item: (item[1].running_mean, item[1].running_var, item[1].counter)):
        group_terms = [t for _, t in group]
        # the launch's factor: that of its updating terms (all equal), else any
        factor = next((float(t.factor) for t in group_terms if _updates(t)), 0.0)
        for (i, _), result in zip(group, _batch_stats_launch(group_terms, factor)):
            out[i] = result
    return out


def _batch_stats_launch(terms: Sequence[StatsTerm], factor: float) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """One statistics launch (and one finalize launch without MERGED_FINALIZE) for `terms` (of one dtype and
    eps; `factor` that of those updating running statistics): term k's programs follow term k-1's on the 1-D
    grid, each term with the tile, splits and chunks it would have alone (`stats_config`)."""
    z0 = terms[0].z
    dtype = terms[0].dtype
    f64 = dtype == torch.float64
    device = z0.device
    stats_args, finalize_args, outs, conf = [], [], [], []
    start = finalize_start = blocks_total = 0
    for t in terms:
        z = t.z
        N, C, H, W = z.shape
        P = H * W
        strides = _pixel_strides(z)
        block_c, block_p, splits, chunk, imgs = stats_config(N, C, P, strides[1])
        S = N // imgs * splits
        blocks = cdiv(C, block_c)
        part = torch.empty((2 * S + 1, C), dtype=dtype, device=device)  # means, M2s, the references
        stats = torch.empty((2, C), dtype=dtype, device=device)
        scale = torch.empty((C,), dtype=dtype, device=device)
        shift = torch.empty((C,), dtype=dtype, device=device)
        update = _updates(t)
        # stand-ins for absent tensors: one of the term's own (never read)
        pointers = (scale if t.weight is None else t.weight, scale if t.bias is None else t.bias, stats, scale,
                    shift, t.running_mean if update else scale, t.running_var if update else scale,
                    scale if t.counter is None else t.counter)
        programs = blocks * S
        unbias = _float64_bits(N * P / (N * P - 1))
        if MERGED_FINALIZE:
            stats_args.append((z, part, C, P, strides, S, splits, chunk, imgs, unbias, blocks_total, *pointers,
                               start, start + programs))
        else:
            stats_args.append((z, part, C, P, strides, S, splits, chunk, imgs, unbias, 0, *([part] * 8),
                               start, start + programs))
            finalize_programs = cdiv(C, FINALIZE_BLOCK_C)
            finalize_args.append((part, C, P, S, splits, chunk, imgs, unbias, *pointers, finalize_start,
                                  finalize_start + finalize_programs))
            finalize_start += finalize_programs
        start += programs
        blocks_total += blocks
        outs.append((stats, scale, shift))
        conf.append(dict(BLOCK_C=block_c, BLOCK_P=block_p, HAS_WEIGHT=t.weight is not None,
                         HAS_BIAS=t.bias is not None, UPDATE=update, COUNT=t.counter is not None,
                         BLOCK_S=max(1, min(FINALIZE_BLOCK_S, TILE // 2 // block_c))))
    per_term = {name: tuple(c[name] for c in conf) for name in conf[0]}
    scalars = (float(terms[0].eps), float(factor), float(1.0 - factor))
    int64 = _int64(*[t.z for t in terms])
    with _device_context(z0):
        if MERGED_FINALIZE:
            _bn_stats_kernel[launch_grid(start)](tuple(stats_args), _tickets(device, blocks_total), *scalars,
                                                 F64=f64, INT64=int64, MERGED=True, **per_term)
            return outs
        off = dict(BLOCK_C=per_term["BLOCK_C"], BLOCK_P=per_term["BLOCK_P"], BLOCK_S=(1,) * len(terms),
                   **{name: (False,) * len(terms) for name in ("HAS_WEIGHT", "HAS_BIAS", "UPDATE", "COUNT")})
        _bn_stats_kernel[launch_grid(start)](tuple(stats_args), stats_args[0][1], *scalars, F64=f64, INT64=int64,
                                             MERGED=False, **off)
        _bn_finalize_kernel[launch_grid(finalize_start)](
            tuple(finalize_args), *scalars, HAS_WEIGHT=per_term["HAS_WEIGHT"], HAS_BIAS=per_term["HAS_BIAS"],
            UPDATE=per_term["UPDATE"], COUNT=per_term["COUNT"], F64=f64, BLOCK_C=FINALIZE_BLOCK_C,
            BLOCK_S=FINALIZE_BLOCK_S)
    return outs


# The statistics kernel's per-channel-block tickets: zeroed once per (device, stream), reset by the program that
# finalizes (so zero again when a launch ends); a buffer of its own per stream, as launches on two streams may
# run at once.
_TICKETS: Dict[tuple, Tensor] = {}


def _tickets(device: torch.device, n: int) -> Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    tickets = _TICKETS.get(key)
    if tickets is None or tickets.numel() < n:
        tickets = _TICKETS[key] = torch.zeros((max(n, 1024),), dtype=torch.int32, device=device)
    return tickets


def batch_norm_backward(terms: Sequence[BackwardTerm]) -> List[Tuple[Optional[Tensor], Optional[Tensor]]]:
    """(dz, g_weight) of each fold (see the module docstring): dz in z's dtype and layout (None without
    need_dz), g_weight in weight's dtype (None where not asked for). `stats` is what `batch_stats` returned; its
    dtype is the accumulation dtype. `g_bias`: a [C] buffer that receives g_shift (0 where None) in its own
    dtype (saves a conversion launch when the bias is bf16/fp16).

    One launch per group of up to MAX_TERMS consecutive terms of the same accumulation dtype that have anything
    to compute; each term's arithmetic is the same as alone (bitwise)."""
    out: List[Tuple[Optional[Tensor], Optional[Tensor]]] = []
    work = []
    for t in terms:
        t = t._replace(z=_collapsible(t.z), g_term=None if t.g_term is None else _collapsible(t.g_term))
        dz = torch.empty_like(t.z) if t.need_dz else None
        g_weight = torch.empty_like(t.weight) if t.need_dw and t.weight is not None else None
        out.append((dz, g_weight))
        if t.need_dz or g_weight is not None or t.g_bias is not None:
            work.append((t, dz, g_weight))
    for group in _groups(work, lambda group, w: w[0].stats.dtype == group[0][0].stats.dtype, lambda w: ()):
        _backward_launch(group)
    return out


def _backward_launch(work) -> None:
    """One backward launch for `work`, (BackwardTerm, dz, g_weight) of one accumulation dtype: term k's programs
    follow term k-1's on the 1-D grid, each term with the tile it would have alone."""
    args, conf, tensors = [], [], []
    start = 0
    for t, dz, g_weight in work:
        N, C, H, W = t.z.shape
        P = H * W
        z, g_term = t.z, t.g_term
        block_c, block_p = _tile(C, P, z.stride(1))
        programs = cdiv(C, block_c) * (cdiv(P, block_p) * N if t.need_dz else 1)
        stand_in = t.stats
        if not t.need_dz:  # z and g_term unread: stand-ins (nor do their bytes count in `hrfast.perf`)
            z = g_term = None
        z_strides = (0, 0, 0) if z is None else _pixel_strides(z)
        args.append((stand_in if z is None else z, z_strides, stand_in if g_term is None else g_term,
                     z_strides if g_term is None else _pixel_strides(g_term),
                     stand_in if dz is None else dz, z_strides if dz is None else _pixel_strides(dz), C, P, N * P,
                     t.stats, stand_in if t.weight is None else t.weight,
                     stand_in if t.g_scale is None else t.g_scale, stand_in if t.g_shift is None else t.g_shift,
                     stand_in if g_weight is None else g_weight, stand_in if t.g_bias is None else t.g_bias,
                     start, start + programs))
        start += programs
        conf.append(dict(HAS_G=g_term is not None, HAS_WEIGHT=t.weight is not None, HAS_GSCALE=t.g_scale is not None,
                         HAS_GSHIFT=t.g_shift is not None, NEED_DZ=t.need_dz, NEED_DW=g_weight is not None,
                         NEED_DB=t.g_bias is not None, G_SCALED=g_term is not None and t.g_scaled, BLOCK_C=block_c,
                         BLOCK_P=block_p))
        tensors += [x for x in (z, g_term, dz) if x is not None]
    per_term = {name: tuple(c[name] for c in conf) for name in conf[0]}
    with _device_context(work[0][0].z):
        _bn_backward_kernel[launch_grid(start)](tuple(args), F64=work[0][0].stats.dtype == torch.float64,
                                                INT64=_int64(*tensors), **per_term)
