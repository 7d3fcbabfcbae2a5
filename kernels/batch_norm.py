"""Triton kernels for batch norm's batch statistics and its input gradient (the training fold of a fusion term).

For z [N, C, H, W] the batch norm with batch statistics is, per channel c over the count = N*H*W values,

    mean = sum z / count,   var = sum (z - mean)^2 / count (biased),   r = 1 / sqrt(var + eps)
    scale = w * r,          shift = b - mean * scale                     (the fold: bn(z) = z * scale + shift)

Forward (`batch_stats`): one read of z in its own dtype, fp32 accumulation (fp64 for fp64), no copy.
`_bn_stats_kernel` reduces [BLOCK_C x CHUNK] blocks of one image to (mean, M2) partials: each loaded [BLOCK_C x
BLOCK_P] tile is centred on its own mean and merged into the running pair with Chan's formula, so no sum of
squares of uncentred values ever forms (z = 1000 + noise keeps its variance). The finalize (`_finalize_channels`:
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

Layouts: z is read as [N, C, P] over P = H*W pixels with strides (s_n, s_c, s_p), which covers NCHW and
channels_last (and any layout whose H and W collapse); other layouts are copied contiguous first. Strides equal
to 1 become compile-time constants (Triton's specialisation), so the contiguous axis gets vector loads.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .resample import cdiv, launch_grid, next_power_of_2

__all__ = ["batch_stats", "batch_norm_backward", "can_launch", "stats_config"]

TILE = 2048  # elements per loaded tile (4 warps: 16 per thread)
STATS_PROGRAMS = 1024  # about this many statistics programs (fixed, not read from the device: deterministic)
MAX_PARTIALS = 256  # at most this many partials per channel: the finalize loops over them (latency)
MAX_CHANNELS_LAST_BLOCK = 64
FINALIZE_BLOCK_C = 32
FINALIZE_BLOCK_S = 64
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
def _bn_stats_kernel(z_ptr, part_ptr, C, P, s_n, s_c, s_p, S, SPLITS, CHUNK,
                     weight_ptr, bias_ptr, stats_ptr, scale_ptr, shift_ptr, run_mean_ptr, run_var_ptr, counter_ptr,
                     tickets_ptr, eps: tl.float64, factor: tl.float64, keep: tl.float64, unbias: tl.float64,
                     F64: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                     MERGED: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE: tl.constexpr,
                     COUNT: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (channel block, image n, split sp): (mean, M2) of pixels [sp*CHUNK, (sp+1)*CHUNK) of image n,
    stored at row n*SPLITS + sp of the [2, S, C] partials. MERGED: the last of the S programs of a channel block
    to finish (a ticket per channel block, an atomic counter; the values never go through atomics) finalizes
    the block's channels as `_bn_finalize_kernel` does, in the same fixed order, and resets its ticket."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    pid_c = tl.program_id(0)
    sp = tl.program_id(1)
    n = tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, P)
    if INT64:
        base = z_ptr + n.to(tl.int64) * s_n + c.to(tl.int64)[:, None] * s_c
    else:
        base = z_ptr + n * s_n + c[:, None] * s_c
    count = tl.zeros([BLOCK_C], dtype=acc_t)
    mean = tl.zeros([BLOCK_C], dtype=acc_t)
    m2 = tl.zeros([BLOCK_C], dtype=acc_t)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p < end)[None, :]
        if INT64:
            offs = p.to(tl.int64)[None, :] * s_p
        else:
            offs = p[None, :] * s_p
        x = tl.load(base + offs, mask=mask, other=0.0).to(acc_t)
        m = tl.minimum(end - p0, BLOCK_P).to(acc_t)
        t_mean = tl.sum(x, axis=1) / m
        d = tl.where(mask, x - t_mean[:, None], 0.0)
        t_m2 = tl.sum(d * d, axis=1)
        # Chan et al.: merge (count, mean, m2) with the tile's (m, t_mean, t_m2)
        total = count + m
        delta = t_mean - mean
        mean += delta * (m / total)
        m2 += t_m2 + delta * delta * (count * m / total)
        count = total
    row = n * SPLITS + sp
    tl.store(part_ptr + row * C + c, mean, mask=c_mask)
    tl.store(part_ptr + (S + row) * C + c, m2, mask=c_mask)
    if MERGED:
        # every thread's partial stores before the ticket (released at GPU scope); the last program acquires
        # them and reads the partials from L2 (.cg: never a line its SM's L1 cached before)
        tl.debug_barrier()
        ticket = tl.atomic_add(tickets_ptr + pid_c, 1, sem="acq_rel", scope="gpu")
        if ticket == S - 1:
            _finalize_channels(part_ptr, c, c_mask, P, S, SPLITS, CHUNK, C, weight_ptr, bias_ptr, stats_ptr,
                               scale_ptr, shift_ptr, run_mean_ptr, run_var_ptr, eps, factor, keep, unbias,
                               HAS_WEIGHT, HAS_BIAS, UPDATE, F64, BLOCK_C, BLOCK_S, ".cg")
            if COUNT:
                if pid_c == 0:
                    tl.store(counter_ptr, tl.load(counter_ptr) + 1)
            tl.atomic_xchg(tickets_ptr + pid_c, 0, sem="relaxed", scope="gpu")  # ready for the next launch


@triton.jit
def _finalize_channels(part_ptr, c, c_mask, P, S, SPLITS, CHUNK, C, weight_ptr, bias_ptr, stats_ptr, scale_ptr,
                       shift_ptr, run_mean_ptr, run_var_ptr, eps, factor, keep, unbias,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE: tl.constexpr, F64: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CACHE: tl.constexpr):
    """Channels c: merges the S partials in order, BLOCK_S at a time; writes stats [2, C] = (mean, r), scale,
    shift and, with UPDATE, the running statistics (in their own dtype)."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    count = tl.zeros([BLOCK_C], dtype=acc_t)
    mean = tl.zeros([BLOCK_C], dtype=acc_t)
    m2 = tl.zeros([BLOCK_C], dtype=acc_t)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < S
        # values of partial s: pixels of its split, 0 for rows past S
        n_s = tl.where(s_mask, tl.minimum(CHUNK, P - (s % SPLITS) * CHUNK), 0).to(acc_t)
        mask = s_mask[:, None] & c_mask[None, :]
        offs = s[:, None] * C + c[None, :]
        p_mean = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=CACHE)
        p_m2 = tl.load(part_ptr + S * C + offs, mask=mask, other=0.0, cache_modifier=CACHE)
        # the block's pooled (count, mean, M2): centred on its own mean, then merged like one partial
        t_count = tl.sum(n_s, axis=0)
        t_mean = tl.sum(p_mean * n_s[:, None], axis=0) / t_count
        dev = p_mean - t_mean[None, :]
        t_m2 = tl.sum(p_m2 + dev * dev * n_s[:, None], axis=0)
        total = count + t_count
        delta = t_mean - mean
        mean += delta * (t_count / total)
        m2 += t_m2 + delta * delta * (count * t_count / total)
        count = total
    var = m2 / count
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
        f = _as(factor, acc_t, BLOCK_C)
        k = _as(keep, acc_t, BLOCK_C)
        old_mean = tl.load(run_mean_ptr + c, mask=c_mask, other=0.0).to(acc_t)
        old_var = tl.load(run_var_ptr + c, mask=c_mask, other=0.0).to(acc_t)
        new_mean = f * mean + k * old_mean
        new_var = f * (var * _as(unbias, acc_t, BLOCK_C)) + k * old_var
        tl.store(run_mean_ptr + c, new_mean.to(run_mean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(run_var_ptr + c, new_var.to(run_var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _bn_finalize_kernel(part_ptr, C, P, S, SPLITS, CHUNK, weight_ptr, bias_ptr, stats_ptr, scale_ptr, shift_ptr,
                        run_mean_ptr, run_var_ptr, counter_ptr, eps: tl.float64, factor: tl.float64,
                        keep: tl.float64, unbias: tl.float64,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE: tl.constexpr,
                        COUNT: tl.constexpr, F64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """The finalize as a launch of its own (MERGED_FINALIZE off). Program: BLOCK_C channels
    (`_finalize_channels`); with COUNT program 0 adds 1 to the module's num_batches_tracked (batch norm's own
    counter, no launch of its own)."""
    if COUNT:
        if tl.program_id(0) == 0:
            tl.store(counter_ptr, tl.load(counter_ptr) + 1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    _finalize_channels(part_ptr, c, c < C, P, S, SPLITS, CHUNK, C, weight_ptr, bias_ptr, stats_ptr, scale_ptr,
                       shift_ptr, run_mean_ptr, run_var_ptr, eps, factor, keep, unbias,
                       HAS_WEIGHT, HAS_BIAS, UPDATE, F64, BLOCK_C, BLOCK_S, "")


@triton.jit
def _bn_backward_kernel(z_ptr, z_strides, g_ptr, g_strides, dz_ptr, dz_strides, C, P, count: tl.float64,
                        stats_ptr, weight_ptr, g_scale_ptr, g_shift_ptr, g_weight_ptr, g_bias_ptr,
                        HAS_G: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_GSCALE: tl.constexpr,
                        HAS_GSHIFT: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DW: tl.constexpr,
                        NEED_DB: tl.constexpr,
                        F64: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (pixel block, channel block, image): dz on a [BLOCK_C x BLOCK_P] tile; program (0, cb, 0) also
    writes g_w (NEED_DW) and g_b = g_shift in the bias's dtype (NEED_DB) of its channels. Strides are
    (s_n, s_c, s_p) triples."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    pid_p = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2)
    c_mask = c < C
    mean = tl.load(stats_ptr + c, mask=c_mask, other=0.0)
    r = tl.load(stats_ptr + C + c, mask=c_mask, other=0.0)
    w = tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(acc_t) if HAS_WEIGHT else 1.0
    g_shift = tl.load(g_shift_ptr + c, mask=c_mask, other=0.0).to(acc_t) if HAS_GSHIFT else 0.0
    t = -mean * g_shift
    if HAS_GSCALE:
        t += tl.load(g_scale_ptr + c, mask=c_mask, other=0.0).to(acc_t)
    if NEED_DW:
        if (pid_p == 0) & (n == 0):
            tl.store(g_weight_ptr + c, (r * t).to(g_weight_ptr.dtype.element_ty), mask=c_mask)
    if NEED_DB:
        if (pid_p == 0) & (n == 0):
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
            dz = g + dz
        tl.store(dz_ptr + n64 * dz_strides[0] + c64 * dz_strides[1] + p64 * dz_strides[2],
                 dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ launchers


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


def stats_config(N: int, C: int, P: int, s_c: int) -> Tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_P, SPLITS, CHUNK): pixels of an image split into SPLITS chunks of CHUNK (a multiple of
    BLOCK_P), so that about STATS_PROGRAMS programs run and N * SPLITS stays within MAX_PARTIALS where N allows.
    A function of the shape only (deterministic)."""
    block_c, block_p = _tile(C, P, s_c)
    tiles = cdiv(P, block_p)
    splits = max(1, min(tiles, cdiv(STATS_PROGRAMS, cdiv(C, block_c) * N), MAX_PARTIALS // N))
    chunk = cdiv(tiles, splits) * block_p
    return block_c, block_p, cdiv(P, chunk), chunk


def _device_context(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def batch_stats(z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, dtype: torch.dtype,
                running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                factor: float = 0.0, counter: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(stats, scale, shift) of z [N, C, H, W] over (N, H, W), in `dtype` (float32, or float64):
    stats [2, C] = (mean, 1 / sqrt(var + eps)) with the biased variance, scale = weight * r,
    shift = bias - mean * scale (weight / bias None: 1 / 0). With running buffers given, they are updated in
    place as F.batch_norm does: running = factor * batch + (1 - factor) * running, unbiased variance.
    `counter`: a one-element integer tensor (the module's num_batches_tracked) incremented by 1.
    The caller checks that there is more than one value per channel."""
    z = _collapsible(z)
    N, C, H, W = z.shape
    P = H * W
    s_n, s_c, s_p = _pixel_strides(z)
    block_c, block_p, splits, chunk = stats_config(N, C, P, s_c)
    S = N * splits
    f64 = dtype == torch.float64
    count = N * P
    part = torch.empty((2, S, C), dtype=dtype, device=z.device)
    stats = torch.empty((2, C), dtype=dtype, device=z.device)
    scale = torch.empty((C,), dtype=dtype, device=z.device)
    shift = torch.empty((C,), dtype=dtype, device=z.device)
    update = running_mean is not None and running_var is not None
    blocks = cdiv(C, block_c)
    finalize_args = (scale if weight is None else weight, scale if bias is None else bias, stats, scale, shift,
                     running_mean if update else scale, running_var if update else scale,
                     scale if counter is None else counter)
    scalars = (float(eps), float(factor), float(1.0 - factor), float(count / (count - 1)))
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, UPDATE=update, COUNT=counter is not None)
    with _device_context(z):
        if MERGED_FINALIZE:
            _bn_stats_kernel[launch_grid(blocks, splits, N)](
                z, part, C, P, s_n, s_c, s_p, S, splits, chunk, *finalize_args, _tickets(z.device, blocks),
                *scalars, F64=f64, INT64=_int64(z), BLOCK_C=block_c, BLOCK_P=block_p, MERGED=True,
                BLOCK_S=max(1, min(FINALIZE_BLOCK_S, TILE // 2 // block_c)), **flags)
            return stats, scale, shift
        _bn_stats_kernel[launch_grid(blocks, splits, N)](
            z, part, C, P, s_n, s_c, s_p, S, splits, chunk, *([part] * 9), *scalars,
            F64=f64, INT64=_int64(z), BLOCK_C=block_c, BLOCK_P=block_p, MERGED=False, HAS_WEIGHT=False,
            HAS_BIAS=False, UPDATE=False, COUNT=False, BLOCK_S=1)
        _bn_finalize_kernel[(cdiv(C, FINALIZE_BLOCK_C),)](
            part, C, P, S, splits, chunk, *finalize_args, *scalars, F64=f64,
            BLOCK_C=FINALIZE_BLOCK_C, BLOCK_S=FINALIZE_BLOCK_S, **flags)
    return stats, scale, shift


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


def batch_norm_backward(z: Tensor, g_term: Optional[Tensor], stats: Tensor, weight: Optional[Tensor],
                        g_scale: Optional[Tensor], g_shift: Optional[Tensor], need_dz: bool = True,
                        need_dw: bool = False, g_bias: Optional[Tensor] = None,
                        ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(dz, g_weight) of the fold (see the module docstring): dz in z's dtype and layout, g_weight in weight's
    dtype (None where not asked for). `stats` is what `batch_stats` returned; its dtype is the accumulation
    dtype. `g_bias`: a [C] buffer that receives g_shift (0 where None) in its own dtype (saves a conversion
    launch when the bias is bf16/fp16)."""
    N, C, H, W = z.shape
    P = H * W
    dtype = stats.dtype
    z = _collapsible(z)
    if g_term is not None:
        g_term = _collapsible(g_term)
    dz = torch.empty_like(z) if need_dz else None
    g_weight = torch.empty_like(weight) if need_dw and weight is not None else None
    s_c = z.stride(1)
    block_c, block_p = _tile(C, P, s_c)
    if not (need_dz or g_weight is not None or g_bias is not None):
        return dz, g_weight
    grid = launch_grid(cdiv(P, block_p) if need_dz else 1, cdiv(C, block_c), N if need_dz else 1)
    z_strides = _pixel_strides(z)
    stand_in = stats
    with _device_context(z):
        _bn_backward_kernel[grid](
            z, z_strides, stand_in if g_term is None else g_term,
            z_strides if g_term is None else _pixel_strides(g_term),
            stand_in if dz is None else dz, z_strides if dz is None else _pixel_strides(dz), C, P, float(N * P),
            stats, stand_in if weight is None else weight, stand_in if g_scale is None else g_scale,
            stand_in if g_shift is None else g_shift, stand_in if g_weight is None else g_weight,
            stand_in if g_bias is None else g_bias,
            HAS_G=g_term is not None, HAS_WEIGHT=weight is not None, HAS_GSCALE=g_scale is not None,
            HAS_GSHIFT=g_shift is not None, NEED_DZ=need_dz, NEED_DW=g_weight is not None,
            NEED_DB=g_bias is not None,
            F64=dtype == torch.float64, INT64=_int64(*[t for t in (z, g_term, dz) if t is not None]),
            BLOCK_C=block_c, BLOCK_P=block_p)
    return dz, g_weight
