"""hrfast's CUDA C++ backend: the extension built from `csrc/` (see `build`) and its launchers (`fuse`).

Nothing here imports torch's cpp_extension, compiles or queries CUDA at import time.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

from .build import BuildError, toolkit_problem

__all__ = ["BuildError", "cuda_status", "host_path_enabled"]


def host_path_enabled() -> bool:
    """HRFAST_CSRC_ON_CPU=1 lets backend='cuda' run the kernels on CPU tensors through an emulated grid (tests),
    as TRITON_INTERPRET=1 does for the Triton kernels."""
    return os.environ.get("HRFAST_CSRC_ON_CPU", "0") == "1"


def cuda_status() -> Tuple[bool, str]:
    """(usable, reason) of backend='cuda' for CUDA tensors on this machine. Does not compile anything."""
    from .build import _precompiled

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if _precompiled() is not None:
        return True, "ahead-of-time build hrfast._C"
    problem = toolkit_problem()
    if problem:
        return False, problem
    return True, "JIT build from csrc/ (compiled on first use)"
