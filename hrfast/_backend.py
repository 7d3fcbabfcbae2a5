"""Which implementation runs an op: `backend="auto" | "triton" | "cuda" | "reference"`.

An explicit request that cannot run raises and says why. `resolve_backend` is the static rule: "auto" is
Triton for CUDA tensors when Triton is importable and the reference otherwise (warning once when a CUDA
tensor falls back). In eager mode the ops refine "auto" for CUDA tensors by measurement (`hrfast._autotune`):
the fastest of Triton, the CUDA extension (only when already built: "auto" never compiles it) and the
PyTorch reference, per call signature; the static rule applies under torch.compile and with
HRFAST_AUTO_MEASURE=0. No CUDA query, compilation or Triton import happens at import time.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Tuple

import torch

BACKENDS = ("auto", "triton", "cuda", "reference")


@functools.lru_cache(maxsize=None)
def triton_status() -> Tuple[bool, str]:
    """(available, reason) for the Triton backend's import."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"triton cannot be imported ({type(exc).__name__}: {exc})"
    try:
        from hrfast.kernels import fuse  # noqa: F401
    except Exception as exc:
        return False, f"hrfast.kernels failed to import ({type(exc).__name__}: {exc})"
    return True, "ok"


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(reason: str) -> None:
    warnings.warn(f"hrfast: backend='auto' falls back to the PyTorch reference: {reason}", RuntimeWarning,
                  stacklevel=4)


def _resolve_cuda(device: torch.device) -> str:
    from hrfast._cuda import cuda_status, host_path_enabled

    if device.type == "cpu" and host_path_enabled():
        return "cuda"  # the kernels on an emulated grid: a test vehicle, see hrfast._cuda.build
    if device.type != "cuda":
        raise RuntimeError(f"backend='cuda' needs CUDA tensors, got tensors on {device} (HRFAST_CSRC_ON_CPU=1 "
                           "runs the kernels on CPU tensors through an emulated grid, for testing)")
    ok, reason = cuda_status()
    if not ok:
        raise RuntimeError(f"backend='cuda' is unavailable: {reason}")
    return "cuda"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ('triton', 'cuda' or 'reference') for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "cuda":
        return _resolve_cuda(device)
    ok, reason = triton_status()
    runs_here = device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled())
    if backend == "triton":
        if not ok:
            raise RuntimeError(f"backend='triton' is unavailable: {reason}")
        if not runs_here:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, got tensors on {device}; to run the kernels on CPU "
                "through the Triton interpreter (slow, for testing), set TRITON_INTERPRET=1 before importing triton")
        return "triton"
    if device.type == "cuda":
        if ok:
            return "triton"
        _warn_fallback_once(reason)
    return "reference"
