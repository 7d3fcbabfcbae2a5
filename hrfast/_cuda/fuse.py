"""Launchers of the fusion op for backend "cuda_cpp": the CUDA C++ kernels in `csrc/` (fuse_kernels.h, fuse.h).

Same contract as `hrfast.kernels.fuse` (the Triton launchers): `fuse_forward`, `fuse_backward`, taking the
`FusePlan`. Its `TermPlan`s go to the extension as they are (the binding converts each tuple into its C++
`TermDesc`), beside the per-term tensors.
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

from torch import Tensor

from ..plan import FusePlan
from .build import load

# Tests set this (or HRFAST_POISON=1): every buffer the extension allocates starts as NaN, so an element a
# kernel forgets to write fails the comparison instead of passing with stale memory.
POISON_OUTPUTS = os.environ.get("HRFAST_POISON", "0") == "1"


def extension(t: Tensor):
    """The compiled module that runs kernels on `t`'s device (built on first use)."""
    return load(with_cuda=t.device.type == "cuda")


def fuse_forward(plan: FusePlan, xs: Sequence[Tensor], scales: Sequence[Optional[Tensor]],
                 shifts: Sequence[Optional[Tensor]], force_int64: bool = False) -> Tensor:
    """y = ReLU(sum_k Up_k(x_k) * scale_k + shift_k) of shape [N, C, *plan.size], in the terms' dtype.

    Any number of terms in one call. `force_int64` is accepted for parity with the Triton launchers; the
    C++ kernels always compute offsets in 64 bits.
    """
    return extension(xs[0]).fuse_forward(plan.terms, xs, scales, shifts, plan.size, plan.relu, plan.channels_last,
                                         POISON_OUTPUTS)


def fuse_backward(plan: FusePlan, grad_y: Tensor, y: Optional[Tensor], xs: Sequence[Tensor],
                  scales: Sequence[Optional[Tensor]], shifts: Sequence[Optional[Tensor]],
                  needs: Sequence[Tuple[bool, bool, bool]], force_int64: bool = False
                  ) -> List[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """Gradients (dx, dscale, dshift) of every term, None where `needs[k]` says it is not needed or the
    term has no scale/shift. `y` is the forward output (its sign is the ReLU mask); None without ReLU."""
    if grad_y.dtype != xs[0].dtype:
        grad_y = grad_y.to(xs[0].dtype)
    return extension(xs[0]).fuse_backward(plan.terms, grad_y, y if plan.relu else None, xs, scales, shifts, needs,
                                          plan.relu, POISON_OUTPUTS)
