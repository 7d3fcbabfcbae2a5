"""Helpers for checking hrfast's ops against their references (used by tests/ and benchmarks/).

Errors are relative Frobenius errors ||actual - expected|| / ||expected|| computed in float64. For fp16/bf16
the budget is set by PyTorch's own error in that dtype against the same float64 reference (the
flash-attention rule), not by a hand-picked tolerance.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

FP32_RTOL = 1e-5
FP64_RTOL = 1e-12
LOW_PRECISION_FACTOR = 2.0


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf when actual has NaN/inf that expected lacks."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all() and torch.isfinite(e).all():
        return math.inf
    denom = e.norm().item()
    diff = (a - e).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


def assert_rel_close(actual: Tensor, expected: Tensor, rtol: float, name: str = "tensor") -> None:
    err = rel_error(actual, expected)
    if not err <= rtol:  # also catches NaN
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds {rtol:.1e}")


def low_precision_budget(pytorch_low: Tensor, expected: Tensor, dtype: torch.dtype) -> float:
    """Twice PyTorch's own error in `dtype`, with a floor far below one rounding step of that dtype."""
    floor = torch.finfo(dtype).eps / 64
    return LOW_PRECISION_FACTOR * max(rel_error(pytorch_low, expected), floor)


def assert_low_precision_close(actual: Tensor, expected: Tensor, pytorch_low: Tensor, name: str = "tensor",
                               dtype: Optional[torch.dtype] = None) -> None:
    """actual (kernel, low precision) vs expected (float64 reference): within twice PyTorch's own error."""
    dtype = dtype or actual.dtype
    budget = low_precision_budget(pytorch_low, expected, dtype)
    err = rel_error(actual, expected)
    if not err <= budget:
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds twice PyTorch's own {dtype} error "
                             f"(budget {budget:.3e})")


def tolerance(dtype: torch.dtype) -> float:
    """The fp32/fp64 relative tolerance; low precision uses `assert_low_precision_close` instead."""
    if dtype == torch.float64:
        return FP64_RTOL
    if dtype == torch.float32:
        return FP32_RTOL
    raise ValueError(f"no fixed tolerance for {dtype}: compare against PyTorch's own error")
