"""Triton kernels for the multi-resolution fusion step of one HRNet output branch.

    y = ReLU( sum_k Up_k(x_k) * scale_k + shift_k )

Up_k is identity for terms already at the output size, else nearest or bilinear upsampling with
`F.interpolate`'s index rules; (scale_k, shift_k) is an optional per-channel affine map (BN, folded or with
batch statistics), applied after the gather because every Up kernel's weights sum to 1.

Forward: one program per [BLOCK_C channels x BLOCK_P pixels] tile of one image; every term is read once,
the sum stays in fp32 (fp64 for fp64 inputs), y is written once. Strides are arguments, so NCHW and
channels_last need no copies. Up to MAX_TERMS terms per launch; more are chained through an fp32 partial.

Backward: `_fuse_backward_same_kernel` applies the ReLU mask once, writes the gradients of the
output-size terms and, if there are upsampled terms, the masked gradient g. `_upsample_adjoint_kernel`
then runs per upsampled term: the adjoint of Up as a gather (each source pixel sums the output pixels
that read it, with their weights). No atomics anywhere: per-channel gradients are per-tile partial sums
reduced by the launcher in a fixed order, so results are bitwise deterministic.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hrfast.ops.fuse import Term  # noqa: F401  (the launchers' argument type)

from .resample import (BILINEAR, NEAREST, SAME, adjoint_weight, bilinear_ratio, first_reader, load_term,  # noqa: F401
                       tile_offsets)

MAX_TERMS = 4
INT32_LIMIT = 2**31 - 1
# Tests set this (or HRFAST_POISON=1): every buffer a launcher allocates starts as NaN, so an element a
# kernel forgets to write fails the comparison instead of passing with stale memory.
POISON_OUTPUTS = os.environ.get("HRFAST_POISON", "0") == "1"


@triton.jit
def _fuse_forward_kernel(
    out_ptr, C, H, W, so_n, so_c, so_h, so_w,
    x0, scale0, shift0, h0, w0, sn0, sc0, sh0, sw0, ry0, rx0, ryn0, ryd0, rxn0, rxd0,
    x1, scale1, shift1, h1, w1, sn1, sc1, sh1, sw1, ry1, rx1, ryn1, ryd1, rxn1, rxd1,
    x2, scale2, shift2, h2, w2, sn2, sc2, sh2, sw2, ry2, rx2, ryn2, ryd2, rxn2, rxd2,
    x3, scale3, shift3, h3, w3, sn3, sc3, sh3, sw3, ry3, rx3, ryn3, ryd3, rxn3, rxd3,
    NUM_TERMS: tl.constexpr, RELU: tl.constexpr,
    MODE0: tl.constexpr, ALIGN0: tl.constexpr, SCALE0: tl.constexpr, SHIFT0: tl.constexpr,
    MODE1: tl.constexpr, ALIGN1: tl.constexpr, SCALE1: tl.constexpr, SHIFT1: tl.constexpr,
    MODE2: tl.constexpr, ALIGN2: tl.constexpr, SCALE2: tl.constexpr, SHIFT2: tl.constexpr,
    MODE3: tl.constexpr, ALIGN3: tl.constexpr, SCALE3: tl.constexpr, SHIFT3: tl.constexpr,
    F64: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < H * W
    c_mask = c < C
    oy = p // W
    ox = p % W
    acc = load_term(n, c, c_mask, oy, ox, p_mask, x0, scale0, shift0, h0, w0, sn0, sc0, sh0, sw0,
                     ry0, rx0, ryn0, ryd0, rxn0, rxd0, MODE0, ALIGN0, SCALE0, SHIFT0, F64, INT64)
    if NUM_TERMS > 1:
        acc += load_term(n, c, c_mask, oy, ox, p_mask, x1, scale1, shift1, h1, w1, sn1, sc1, sh1, sw1,
                          ry1, rx1, ryn1, ryd1, rxn1, rxd1, MODE1, ALIGN1, SCALE1, SHIFT1, F64, INT64)
    if NUM_TERMS > 2:
        acc += load_term(n, c, c_mask, oy, ox, p_mask, x2, scale2, shift2, h2, w2, sn2, sc2, sh2, sw2,
                          ry2, rx2, ryn2, ryd2, rxn2, rxd2, MODE2, ALIGN2, SCALE2, SHIFT2, F64, INT64)
    if NUM_TERMS > 3:
        acc += load_term(n, c, c_mask, oy, ox, p_mask, x3, scale3, shift3, h3, w3, sn3, sc3, sh3, sw3,
                          ry3, rx3, ryn3, ryd3, rxn3, rxd3, MODE3, ALIGN3, SCALE3, SHIFT3, F64, INT64)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, as torch.relu does
    mask = c_mask[:, None] & p_mask[None, :]
    tl.store(out_ptr + tile_offsets(n, c, oy, ox, so_n, so_c, so_h, so_w, INT64),
             acc.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------- backward


@triton.jit
def _same_term_backward(g, n, c, c_mask, oy, ox, mask, part_ptr, row, R, C,
                        x_ptr, scale_ptr, dx_ptr, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
                        SLOT: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_DX: tl.constexpr,
                        NEED_DSCALE: tl.constexpr, F64: tl.constexpr, INT64: tl.constexpr):
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    if NEED_DX:
        dx = g
        if HAS_SCALE:
            dx = g * tl.load(scale_ptr + c, mask=c_mask, other=0.0).to(acc_t)[:, None]
        tl.store(dx_ptr + tile_offsets(n, c, oy, ox, sdn, sdc, sdh, sdw, INT64), dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
    if NEED_DSCALE:
        x = tl.load(x_ptr + tile_offsets(n, c, oy, ox, sxn, sxc, sxh, sxw, INT64), mask=mask, other=0.0).to(acc_t)
        tl.store(part_ptr + (SLOT * R + row) * C + c, tl.sum(g * x, axis=1), mask=c_mask)


@triton.jit
def _fuse_backward_same_kernel(
    gy_ptr, sgy_n, sgy_c, sgy_h, sgy_w,
    y_ptr, sy_n, sy_c, sy_h, sy_w,
    g_ptr, sg_n, sg_c, sg_h, sg_w,
    part_ptr, R, C, H, W,
    x0, scale0, dx0, sxn0, sxc0, sxh0, sxw0, sdn0, sdc0, sdh0, sdw0,
    x1, scale1, dx1, sxn1, sxc1, sxh1, sxw1, sdn1, sdc1, sdh1, sdw1,
    x2, scale2, dx2, sxn2, sxc2, sxh2, sxw2, sdn2, sdc2, sdh2, sdw2,
    x3, scale3, dx3, sxn3, sxc3, sxh3, sxw3, sdn3, sdc3, sdh3, sdw3,
    NUM_TERMS: tl.constexpr, RELU: tl.constexpr, WRITE_G: tl.constexpr, NEED_SUM_G: tl.constexpr,
    SCALE0: tl.constexpr, DX0: tl.constexpr, DSCALE0: tl.constexpr,
    SCALE1: tl.constexpr, DX1: tl.constexpr, DSCALE1: tl.constexpr,
    SCALE2: tl.constexpr, DX2: tl.constexpr, DSCALE2: tl.constexpr,
    SCALE3: tl.constexpr, DX3: tl.constexpr, DSCALE3: tl.constexpr,
    F64: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """g = grad_y * (y > 0); dx_k = g * scale_k; partials of sum(g * x_k) (slot k) and sum(g) (slot 4)."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < H * W
    c_mask = c < C
    mask = c_mask[:, None] & p_mask[None, :]
    oy = p // W
    ox = p % W
    row = n * tl.num_programs(0) + pid_p
    g = tl.load(gy_ptr + tile_offsets(n, c, oy, ox, sgy_n, sgy_c, sgy_h, sgy_w, INT64), mask=mask, other=0.0)
    g = g.to(acc_t)
    if RELU:
        y = tl.load(y_ptr + tile_offsets(n, c, oy, ox, sy_n, sy_c, sy_h, sy_w, INT64), mask=mask, other=0.0)
        g = tl.where(y > 0.0, g, 0.0)
    if WRITE_G:
        tl.store(g_ptr + tile_offsets(n, c, oy, ox, sg_n, sg_c, sg_h, sg_w, INT64), g.to(g_ptr.dtype.element_ty),
                 mask=mask)
    if NEED_SUM_G:
        tl.store(part_ptr + (4 * R + row) * C + c, tl.sum(g, axis=1), mask=c_mask)
    if NUM_TERMS > 0:
        _same_term_backward(g, n, c, c_mask, oy, ox, mask, part_ptr, row, R, C, x0, scale0, dx0,
                            sxn0, sxc0, sxh0, sxw0, sdn0, sdc0, sdh0, sdw0, 0, SCALE0, DX0, DSCALE0, F64, INT64)
    if NUM_TERMS > 1:
        _same_term_backward(g, n, c, c_mask, oy, ox, mask, part_ptr, row, R, C, x1, scale1, dx1,
                            sxn1, sxc1, sxh1, sxw1, sdn1, sdc1, sdh1, sdw1, 1, SCALE1, DX1, DSCALE1, F64, INT64)
    if NUM_TERMS > 2:
        _same_term_backward(g, n, c, c_mask, oy, ox, mask, part_ptr, row, R, C, x2, scale2, dx2,
                            sxn2, sxc2, sxh2, sxw2, sdn2, sdc2, sdh2, sdw2, 2, SCALE2, DX2, DSCALE2, F64, INT64)
    if NUM_TERMS > 3:
        _same_term_backward(g, n, c, c_mask, oy, ox, mask, part_ptr, row, R, C, x3, scale3, dx3,
                            sxn3, sxc3, sxh3, sxw3, sdn3, sdc3, sdh3, sdw3, 3, SCALE3, DX3, DSCALE3, F64, INT64)


@triton.jit
def _upsample_adjoint_kernel(
    g_ptr, sg_n, sg_c, sg_h, sg_w, H, W,
    z_ptr, sz_n, sz_c, sz_h, sz_w,
    scale_ptr, dz_ptr, sd_n, sd_c, sd_h, sd_w,
    part_ptr, R, C, h, w,
    ry, rx, ry_num, ry_den, rx_num, rx_den, KH, KW, step_h, step_w, off_h, off_w,
    MODE: tl.constexpr, ALIGN: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_DZ: tl.constexpr,
    NEED_DSCALE: tl.constexpr, NEED_DSHIFT: tl.constexpr,
    F64: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """u = Up^T(g) at the source resolution; dz = u * scale; partials of sum(u * z) (slot 0), sum(u) (slot 1).

    Each source pixel s gathers the output pixels d in a window [first_reader(s), + K) and weighs them with
    the forward's own index rules, so the window only has to be wide enough, never exact.
    """
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    q_mask = q < h * w
    c_mask = c < C
    sy = q // w
    sx = q % w
    if MODE == 2:
        ry = bilinear_ratio(ry, ry_num, ry_den, F64)
        rx = bilinear_ratio(rx, rx_num, rx_den, F64)
    lo_y = first_reader(sy, ry, step_h, off_h, MODE, ALIGN, F64)
    lo_x = first_reader(sx, rx, step_w, off_w, MODE, ALIGN, F64)
    u = tl.zeros([BLOCK_C, BLOCK_P], dtype=acc_t)
    for ky in range(0, KH):
        dy = lo_y + ky
        wy = adjoint_weight(dy, sy, ry, h, H, MODE, ALIGN, F64)
        for kx in range(0, KW):
            dx = lo_x + kx
            wgt = wy * adjoint_weight(dx, sx, rx, w, W, MODE, ALIGN, F64)
            m = c_mask[:, None] & (q_mask & (wgt != 0.0))[None, :]
            gv = tl.load(g_ptr + tile_offsets(n, c, dy, dx, sg_n, sg_c, sg_h, sg_w, INT64), mask=m, other=0.0)
            u += gv.to(acc_t) * wgt.to(acc_t)[None, :]
    mask = c_mask[:, None] & q_mask[None, :]
    row = n * tl.num_programs(0) + pid_p
    if NEED_DZ:
        dz = u
        if HAS_SCALE:
            dz = u * tl.load(scale_ptr + c, mask=c_mask, other=0.0).to(acc_t)[:, None]
        tl.store(dz_ptr + tile_offsets(n, c, sy, sx, sd_n, sd_c, sd_h, sd_w, INT64), dz.to(dz_ptr.dtype.element_ty),
                 mask=mask)
    if NEED_DSCALE:
        z = tl.load(z_ptr + tile_offsets(n, c, sy, sx, sz_n, sz_c, sz_h, sz_w, INT64), mask=mask, other=0.0)
        tl.store(part_ptr + row * C + c, tl.sum(u * z.to(acc_t), axis=1), mask=c_mask)
    if NEED_DSHIFT:
        tl.store(part_ptr + (R + row) * C + c, tl.sum(u, axis=1), mask=c_mask)


# ------------------------------------------------------------------------------------------------ launchers


def _device_context(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def _max_offset(t: Tensor) -> int:
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


def needs_int64(*tensors: Optional[Tensor]) -> bool:
    """True when some tensor's reachable element offset does not fit in int32."""
    return any(t is not None and _max_offset(t) > INT32_LIMIT for t in tensors)


def _tile(C: int, pixels: int, channels_last: bool, budget: int) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_P): wide in the contiguous dimension, about `budget` elements in all."""
    if channels_last:
        block_c = min(triton.next_power_of_2(C), 64)
        block_p = max(1, min(budget // block_c, triton.next_power_of_2(pixels)))
    else:
        block_p = min(triton.next_power_of_2(pixels), 512)
        block_c = max(1, min(budget // block_p, triton.next_power_of_2(C)))
    return block_c, block_p


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.stride(1) == 1 and t.shape[1] > 1


def _poisoned(t: Tensor) -> Tensor:
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


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


def _axis_ratio_f32(ratio: Tuple[int, int]) -> float:
    return ratio[0] / ratio[1]


def _forward_slot_args(term: Term) -> Tuple[list, list]:
    x = term.x
    dummy = x
    args = [x, term.scale if term.scale is not None else dummy, term.shift if term.shift is not None else dummy,
            x.shape[2], x.shape[3], *x.stride(),
            _axis_ratio_f32(term.ratio_h), _axis_ratio_f32(term.ratio_w), *term.ratio_h, *term.ratio_w]
    consts = [term.mode, bool(term.align_corners), term.scale is not None, term.shift is not None]
    return args, consts


def _pad_slots(items: list, filler) -> list:
    return items + [filler] * (MAX_TERMS - len(items))


def fuse_forward(terms: Sequence[Term], out_size: Tuple[int, int], relu: bool = True,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 force_int64: bool = False) -> Tensor:
    """y = ReLU(sum_k Up_k(x_k) * scale_k + shift_k) of shape [N, C, *out_size], in the terms' dtype.

    All terms share batch, channels, dtype and device (the caller validates). More than MAX_TERMS terms
    are summed in chained launches through a partial sum kept in the accumulation dtype.
    """
    x0 = terms[0].x
    N, C = x0.shape[:2]
    H, W = out_size
    acc_dtype = _accumulation_dtype(x0.dtype)
    out = _empty((N, C, H, W), x0.dtype, x0.device, memory_format)
    groups = [list(terms[i:i + MAX_TERMS - (i > 0)]) for i in _group_starts(len(terms))]
    partial = None
    for gi, group in enumerate(groups):
        last = gi == len(groups) - 1
        if partial is not None:
            group = [Term(partial)] + group
        target = out if last else _empty((N, C, H, W), acc_dtype, x0.device, memory_format)
        _launch_forward(group, target, relu=relu and last, force_int64=force_int64)
        partial = target
    return out


def _group_starts(num_terms: int) -> List[int]:
    # the first launch takes MAX_TERMS terms, each later one MAX_TERMS - 1 plus the running partial
    starts, i = [0], MAX_TERMS
    while i < num_terms:
        starts.append(i)
        i += MAX_TERMS - 1
    return starts


def _launch_forward(group: Sequence[Term], out: Tensor, relu: bool, force_int64: bool) -> None:
    N, C, H, W = out.shape
    if out.numel() == 0:
        return
    slot_args, slot_consts = [], []
    for term in group:
        a, k = _forward_slot_args(term)
        slot_args.append(a)
        slot_consts.append(k)
    filler_args, filler_consts = slot_args[0], [SAME, False, False, False]
    slot_args = _pad_slots(slot_args, filler_args)
    slot_consts = _pad_slots(slot_consts, filler_consts)
    block_c, block_p = _tile(C, H * W, _is_channels_last(out), budget=2048)
    int64 = force_int64 or needs_int64(out, *(t.x for t in group))
    grid = (triton.cdiv(H * W, block_p), triton.cdiv(C, block_c), N)
    consts = {}
    for k, (mode, align, has_scale, has_shift) in enumerate(slot_consts):
        consts.update({f"MODE{k}": mode, f"ALIGN{k}": align, f"SCALE{k}": has_scale, f"SHIFT{k}": has_shift})
    with _device_context(out):
        _fuse_forward_kernel[grid](
            out, C, H, W, *out.stride(), *[a for args in slot_args for a in args],
            NUM_TERMS=len(group), RELU=relu, F64=out.dtype == torch.float64 or group[0].x.dtype == torch.float64,
            INT64=int64, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4, **consts)


def window(ratio: Tuple[int, int], mode: int, align_corners: bool, n_out: int) -> Tuple[int, int, int]:
    """(K, step, offset) of the adjoint's gather along one axis: source s visits outputs
    [s * step - offset, + K) when the ratio is exactly 1/step (step a power of 2, so the forward's float
    index math is exact too: HRNet's usual x2^k), else step = 0 and K over-estimates the fan-out
    (1/r nearest, 2/r bilinear) with room for `_first_reader`'s slack."""
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


def fuse_backward(grad_y: Tensor, y: Optional[Tensor], terms: Sequence[Term], needs_grad: Sequence[Tuple[bool, bool, bool]],
                  relu: bool = True, force_int64: bool = False) -> List[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """Gradients (dx, dscale, dshift) of every term, None where `needs_grad[k]` says it is not needed.

    `y` is the forward output (its sign is the ReLU mask); it may be None when relu is False.
    """
    N, C, H, W = grad_y.shape
    acc_dtype = _accumulation_dtype(terms[0].x.dtype)
    results: List[list] = [[None, None, None] for _ in terms]
    same = [k for k, t in enumerate(terms) if t.mode == SAME]
    low = [k for k, t in enumerate(terms) if t.mode != SAME and any(needs_grad[k])]
    need_sum_g = any(needs_grad[k][2] for k in same)
    fmt = torch.channels_last if _is_channels_last(grad_y) else torch.contiguous_format

    if not low and not same:
        return [tuple(r) for r in results]
    int64 = force_int64 or needs_int64(grad_y, y, *(t.x for t in terms))
    g = None
    if low:
        g = grad_y if not relu else _empty(grad_y.shape, grad_y.dtype, grad_y.device, fmt)
    block_c, block_p = _tile(C, H * W, fmt == torch.channels_last, budget=2048)
    grid = (triton.cdiv(H * W, block_p), triton.cdiv(C, block_c), N)
    R = grid[0] * N
    same_groups = [same[i:i + MAX_TERMS] for i in range(0, max(len(same), 1), MAX_TERMS)]
    sum_g = None
    for gi, group in enumerate(same_groups):
        first = gi == 0
        write_g = first and g is not None and relu
        need_g_sum = first and need_sum_g
        parts = _empty((MAX_TERMS + 1, R, C), acc_dtype, grad_y.device)
        slot_args, consts = [], {}
        for slot in range(MAX_TERMS):
            if slot < len(group):
                k = group[slot]
                t = terms[k]
                need_dx, need_dscale, _ = needs_grad[k]
                need_dscale = need_dscale and t.scale is not None
                dx = _empty_grad(t.x, grad_y) if need_dx else None
                results[k][0] = dx
                dxs = dx if dx is not None else t.x
                slot_args += [t.x, t.scale if t.scale is not None else t.x, dxs, *t.x.stride(), *dxs.stride()]
                consts.update({f"SCALE{slot}": t.scale is not None, f"DX{slot}": need_dx, f"DSCALE{slot}": need_dscale})
            else:
                slot_args += [grad_y, grad_y, grad_y, *grad_y.stride(), *grad_y.stride()]
                consts.update({f"SCALE{slot}": False, f"DX{slot}": False, f"DSCALE{slot}": False})
        y_arg = y if y is not None else grad_y
        g_arg = g if write_g else grad_y
        busy = write_g or need_g_sum or any(consts[f"DX{i}"] or consts[f"DSCALE{i}"] for i in range(MAX_TERMS))
        if busy and N * C * H * W > 0:
            with _device_context(grad_y):
                _fuse_backward_same_kernel[grid](
                    grad_y, *grad_y.stride(), y_arg, *y_arg.stride(), g_arg, *g_arg.stride(),
                    parts, R, C, H, W, *slot_args,
                    NUM_TERMS=len(group), RELU=relu, WRITE_G=write_g, NEED_SUM_G=need_g_sum,
                    F64=acc_dtype == torch.float64, INT64=int64, BLOCK_C=block_c, BLOCK_P=block_p,
                    num_warps=4, **consts)
        else:
            parts.zero_()  # empty tensors: the sums are zero
        totals = parts.sum(dim=1)  # fixed-order reduction over tiles: deterministic
        if need_g_sum:
            sum_g = totals[4]
        for slot, k in enumerate(group):
            t = terms[k]
            if needs_grad[k][1] and t.scale is not None:
                results[k][1] = totals[slot].to(t.scale.dtype)
    for k in same:
        if needs_grad[k][2] and terms[k].shift is not None:
            results[k][2] = sum_g.to(terms[k].shift.dtype)

    for k in low:
        results[k] = list(_upsample_adjoint(g, terms[k], needs_grad[k], acc_dtype, int64))
    return [tuple(r) for r in results]


def _upsample_adjoint(g: Tensor, term: Term, needs: Tuple[bool, bool, bool], acc_dtype: torch.dtype,
                      int64: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    z = term.x
    N, C, h, w = z.shape
    H, W = g.shape[2:]
    need_dz, need_dscale, need_dshift = needs
    need_dscale = need_dscale and term.scale is not None
    need_dshift = need_dshift and term.shift is not None
    dz = _empty_grad(z, g) if need_dz else None
    block_c, block_p = _tile(C, h * w, _is_channels_last(z), budget=1024)
    grid = (triton.cdiv(h * w, block_p), triton.cdiv(C, block_c), N)
    R = grid[0] * N
    parts = _empty((2, R, C), acc_dtype, z.device)
    dz_arg = dz if dz is not None else z
    kh, step_h, off_h = window(term.ratio_h, term.mode, term.align_corners, H)
    kw, step_w, off_w = window(term.ratio_w, term.mode, term.align_corners, W)
    if z.numel() > 0:
        with _device_context(z):
            _upsample_adjoint_kernel[grid](
                g, *g.stride(), H, W, z, *z.stride(),
                term.scale if term.scale is not None else z, dz_arg, *dz_arg.stride(),
                parts, R, C, h, w,
                _axis_ratio_f32(term.ratio_h), _axis_ratio_f32(term.ratio_w), *term.ratio_h, *term.ratio_w,
                kh, kw, step_h, step_w, off_h, off_w,
                MODE=term.mode, ALIGN=bool(term.align_corners), HAS_SCALE=term.scale is not None,
                NEED_DZ=need_dz, NEED_DSCALE=need_dscale, NEED_DSHIFT=need_dshift,
                F64=acc_dtype == torch.float64, INT64=int64 or needs_int64(z, dz), BLOCK_C=block_c,
                BLOCK_P=block_p, num_warps=4)
    totals = parts.sum(dim=1)
    dscale = totals[0].to(term.scale.dtype) if need_dscale else None
    dshift = totals[1].to(term.shift.dtype) if need_dshift else None
    return dz, dscale, dshift
