"""Launchers of the fusion op for backend "cuda": the CUDA C++ kernels in `csrc/` (fuse_kernels.h, fuse.h).

Same contract as `hrfast.kernels.fuse` (the Triton launchers): `Term`, `fuse_forward`, `fuse_backward`.
CUDA tensors run the CUDA kernels (the extension's CUDA build); CPU tensors run the host build, the very same
`__host__ __device__` kernels and launchers through an emulation of the CUDA grid: a test vehicle for the
CUDA code on machines without a GPU (enabled for backend="cuda" by HRFAST_CSRC_ON_CPU=1), not a CPU backend.

Backward is deterministic: the adjoint of each upsample is a gather (no atomics), and the per-channel
gradients (dscale, dshift) are per-tile partial sums written by the kernels and reduced over the tiles with
`torch.sum` in a fixed order.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..ops.fuse import Term  # noqa: F401  (the launchers' argument type)
from .build import load

SAME, NEAREST, BILINEAR = 0, 1, 2  # = csrc/fuse.h Mode, = hrfast.kernels.fuse SAME / NEAREST / BILINEAR

# Tests set this (or HRFAST_POISON=1): every buffer the extension allocates starts as NaN, so an element a
# kernel forgets to write fails the comparison instead of passing with stale memory.
POISON_OUTPUTS = os.environ.get("HRFAST_POISON", "0") == "1"


def extension(t: Tensor):
    """The compiled module that runs kernels on `t`'s device (built on first use)."""
    return load(with_cuda=t.device.type == "cuda")


def _term_lists(terms: Sequence[Term]):
    xs, scales, shifts, modes, aligns, ratios = [], [], [], [], [], []
    for t in terms:
        xs.append(t.x)
        scales.append(t.scale)
        shifts.append(t.shift)
        modes.append(int(t.mode))
        aligns.append(bool(t.align_corners))
        ratios += [int(t.ratio_h[0]), int(t.ratio_h[1]), int(t.ratio_w[0]), int(t.ratio_w[1])]
    return xs, scales, shifts, modes, aligns, ratios


def fuse_forward(terms: Sequence[Term], out_size: Tuple[int, int], relu: bool = True,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 force_int64: bool = False) -> Tensor:
    """y = ReLU(sum_k Up_k(x_k) * scale_k + shift_k) of shape [N, C, *out_size], in the terms' dtype.

    Any number of terms in one call. `force_int64` is accepted for parity with the Triton launchers; the
    C++ kernels always compute offsets in 64 bits.
    """
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format}")
    xs, scales, shifts, modes, aligns, ratios = _term_lists(terms)
    return extension(xs[0]).fuse_forward(xs, scales, shifts, modes, aligns, ratios, [int(s) for s in out_size],
                                         bool(relu), memory_format == torch.channels_last, POISON_OUTPUTS)


def fuse_backward(grad_y: Tensor, y: Optional[Tensor], terms: Sequence[Term],
                  needs_grad: Sequence[Tuple[bool, bool, bool]], relu: bool = True,
                  force_int64: bool = False) -> List[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """Gradients (dx, dscale, dshift) of every term, None where `needs_grad[k]` says it is not needed or the
    term has no scale/shift. `y` is the forward output (its sign is the ReLU mask); None when relu is False."""
    xs, scales, shifts, modes, aligns, ratios = _term_lists(terms)
    needs = [bool(v) for k in range(len(terms)) for v in needs_grad[k]]
    if grad_y.dtype != xs[0].dtype:
        grad_y = grad_y.to(xs[0].dtype)
    flat = extension(xs[0]).fuse_backward(grad_y, y if relu else None, xs, scales, shifts, modes, aligns, ratios,
                                          needs, bool(relu), POISON_OUTPUTS)
    return [tuple(flat[3 * k:3 * k + 3]) for k in range(len(terms))]
