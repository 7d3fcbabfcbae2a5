"""The backend registry: which implementation runs an op, what is available here and why not.

Names (`backend=` of every op, module and `hrfast.patch`):

- "auto" (default): for CUDA tensors, the fastest available implementation, measured once per call
  signature (`hrfast._autotune`); under torch.compile / export / jit.trace, with HRFAST_AUTO_MEASURE=0, or
  when only one candidate exists, the static rule: Triton when importable, else the reference. For CPU
  tensors, the reference. HRFAST_BACKEND=<name> makes "auto" mean that backend (an explicit choice).
- "triton": the Triton kernels (`hrfast.kernels`), on CUDA tensors (or CPU tensors through the Triton
  interpreter when TRITON_INTERPRET=1 was set before triton was imported: for testing).
- "cuda_cpp" (alias "cuda"): the CUDA C++ extension built from `csrc/` (compiled on first use), on CUDA
  tensors (or CPU tensors through its host build's grid emulation with HRFAST_CSRC_ON_CPU=1: for testing).
- "reference": plain PyTorch (`hrfast.ops.reference`), any device; also what every name means while
  torch.onnx.export traces (an ONNX graph holds standard ops only).

An explicit choice that cannot run raises a RuntimeError that says why. Meta tensors are accepted by every
backend (shapes only, through the custom ops' fake implementations: `torch.device("meta")` model setup, and the
static performance instrument `hrfast.perf`). Nothing here imports triton, compiles or queries CUDA at import
time.
"""
from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType
from typing import Callable, Hashable, List, Tuple

import torch

from . import _autotune

__all__ = ["BACKENDS", "ALIASES", "canonical", "resolve", "choose", "launchers", "status_rows",
           "triton_status", "cuda_cpp_status", "auto_rule"]

BACKENDS = ("auto", "triton", "cuda_cpp", "reference")
ALIASES = {"cuda": "cuda_cpp"}
ENV_BACKEND = "HRFAST_BACKEND"


def canonical(backend, argument: str = "backend") -> str:
    """The registry name of `backend` (aliases resolved); a ValueError naming `argument` for anything else."""
    name = ALIASES.get(backend, backend) if isinstance(backend, str) else None
    if name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS} (or the alias 'cuda' for 'cuda_cpp'), got {backend!r}")
    return name


# ---------------------------------------------------------------------------------------------- availability


@functools.lru_cache(maxsize=None)
def triton_status() -> Tuple[bool, str]:
    """(importable, reason) of the Triton kernels."""
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


def csrc_on_cpu() -> bool:
    """HRFAST_CSRC_ON_CPU=1 lets "cuda_cpp" run the kernels on CPU tensors through an emulated grid (tests),
    as TRITON_INTERPRET=1 does for the Triton kernels."""
    return os.environ.get("HRFAST_CSRC_ON_CPU", "0") == "1"


def cuda_cpp_status() -> Tuple[bool, str]:
    """(usable for CUDA tensors, reason) of the CUDA C++ extension. Compiles nothing."""
    from ._cuda.build import precompiled, toolkit_problem

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if precompiled() is not None:
        return True, "ahead-of-time build hrfast._C"
    problem = toolkit_problem()
    if problem:
        return False, problem
    return True, "JIT build from csrc/ (compiled on first use)"


def cuda_cpp_built(device: torch.device) -> bool:
    """The extension for `device` loads without compiling: hrfast._C, or a finished JIT build in the cache."""
    from ._cuda import build

    with_cuda = device.type == "cuda"
    if with_cuda and not cuda_cpp_status()[0]:
        return False
    if build.precompiled() is not None:
        return True
    try:
        folder = build.build_dir(with_cuda)
    except OSError:
        return False
    return (folder / f"{build.extension_name(with_cuda)}.so").exists()


def status_rows() -> List[Tuple[str, bool, str]]:
    """(backend, usable for CUDA tensors on this machine, reason) for every concrete backend."""
    from ._cuda.build import cuda_home, nvcc_version, toolkit_problem

    gpu = torch.cuda.is_available()
    ok, reason = triton_status()
    if ok and not gpu:
        reason = ("importable, but no GPU: runs only through the interpreter (TRITON_INTERPRET=1, "
                  f"{'set' if triton_interpreter_enabled() else 'not set'})")
    rows = [("triton", ok and gpu, reason)]
    ok, reason = cuda_cpp_status()
    problem, home = toolkit_problem(), cuda_home()
    toolkit = f"toolkit: nvcc {nvcc_version(home)} at {home}" if problem is None else f"toolkit: {problem}"
    note = "; HRFAST_CSRC_ON_CPU=1: host build on CPU tensors" if csrc_on_cpu() else ""
    rows.append(("cuda_cpp", ok, f"{reason}; {toolkit}{note}"))
    rows.append(("reference", True, "plain PyTorch, any device"))
    return rows


# ------------------------------------------------------------------------------------------------ resolution


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(reason: str) -> None:
    warnings.warn(f"hrfast: backend='auto' falls back to the PyTorch reference: {reason}", RuntimeWarning,
                  stacklevel=5)


def _check_triton(device: torch.device, asked: str) -> None:
    ok, reason = triton_status()
    if not ok:
        raise RuntimeError(f"backend={asked!r} is unavailable: {reason}")
    if not (device.type in ("cuda", "meta") or (device.type == "cpu" and triton_interpreter_enabled())):
        raise RuntimeError(
            f"backend={asked!r} needs CUDA tensors, got tensors on {device}; to run the kernels on CPU "
            "through the Triton interpreter (slow, for testing), set TRITON_INTERPRET=1 before importing triton")


def _check_cuda_cpp(device: torch.device, asked: str) -> None:
    if device.type == "cpu" and csrc_on_cpu():
        return  # the kernels on an emulated grid: a test vehicle, see hrfast._cuda.build
    if device.type == "meta":
        return  # shapes only: the custom op's fake implementation
    if device.type != "cuda":
        raise RuntimeError(f"backend={asked!r} needs CUDA tensors, got tensors on {device} (HRFAST_CSRC_ON_CPU=1 "
                           "runs the kernels on CPU tensors through an emulated grid, for testing)")
    ok, reason = cuda_cpp_status()
    if not ok:
        raise RuntimeError(f"backend={asked!r} is unavailable: {reason}")


_CHECKS = {"triton": _check_triton, "cuda_cpp": _check_cuda_cpp, "reference": lambda device, asked: None}


def resolve(backend: str, device: torch.device) -> str:
    """The static rule: the concrete backend ('triton', 'cuda_cpp' or 'reference') for tensors on `device`.
    While torch.onnx.export traces, the reference, whatever the name: an ONNX graph holds standard ops only,
    so the export records the eager computation the fused ops replace."""
    name = canonical(backend)
    if _exporting_onnx():
        return "reference"
    if name == "auto":
        backend = os.environ.get(ENV_BACKEND)
        if not backend:
            return _static_auto(device)
        name = canonical(backend, ENV_BACKEND)
        if name == "auto":
            return _static_auto(device)
    _CHECKS[name](device, backend)  # errors name the backend as the caller spelled it
    return name


def _exporting_onnx() -> bool:
    """Whether torch.onnx.export is tracing this call (it traces with jit.trace or torch.export)."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()) and torch.onnx.is_in_onnx_export()


def _static_auto(device: torch.device) -> str:
    if device.type != "cuda":
        return "reference"
    ok, reason = triton_status()
    if ok:
        return "triton"
    _warn_fallback_once(reason)
    return "reference"


# evaluated once by torch.compile while tracing (its result only depends on the backend name, the device type
# and the environment) instead of tracing its cached import checks; = torch.compiler.assume_constant_result,
# which would import torch._dynamo, and with it triton, at `import hrfast` (torch 2.4 to 2.15 read just this)
resolve._dynamo_marked_constant = True


# backends "auto" never measures for an op, and why (an explicit backend= still runs them)
AUTO_LEAVES_OUT = {
    "head": {"cuda_cpp": "the CUDA C++ head runs the fusion kernel over all M concatenated channels at full "
                         "resolution (W48: 720 channels at 256x512, where the 48-channel fusion row alone is "
                         "predicted at 206 us on sm_90 against the whole eager head's 780 us): slower than eager"},
}


def candidates(device: torch.device, op: str = "fuse") -> List[str]:
    """The concrete backends "auto" may measure for `op` on `device` without compiling anything new."""
    out = []
    if triton_status()[0] and (device.type == "cuda" or triton_interpreter_enabled()):
        out.append("triton")
    if ((device.type == "cuda" or csrc_on_cpu()) and cuda_cpp_built(device)
            and "cuda_cpp" not in AUTO_LEAVES_OUT.get(op, {})):
        out.append("cuda_cpp")
    out.append("reference")
    return out


def choose(op: str, backend: str, device: torch.device, signature: Callable[[], Hashable],
           run: Callable[[str], None]) -> str:
    """The concrete backend for one call of `op`: `resolve`'s answer, refined for "auto" by measurement where
    measuring applies (`hrfast._autotune.choose`, keyed on `signature()`, which calls `run(name)` per
    candidate)."""
    static = resolve(backend, device)
    # applies() first: it is False while torch.compile traces, so nothing below it is traced
    if backend == "auto" and _autotune.applies(device) and not os.environ.get(ENV_BACKEND):
        return _autotune.choose(op, signature(), device, static, candidates(device, op), run)
    return static


def auto_rule(device: torch.device) -> str:
    """What backend="auto" does for tensors on `device`, in words (for `python -m hrfast info`)."""
    static = resolve("auto", device)
    if os.environ.get(ENV_BACKEND):
        return f"{static} ({ENV_BACKEND}={os.environ[ENV_BACKEND]})"
    if not _autotune.measuring_enabled(device):
        return static
    names = candidates(device)
    if len(names) == 1:
        return names[0]
    left_out = "".join(f"; for the {op}, not {name}: {why}" for op, skips in AUTO_LEAVES_OUT.items()
                       for name, why in skips.items() if name in names)
    return (f"the fastest of {', '.join(names)}, measured on the first call with each signature "
            f"({static} under torch.compile or with HRFAST_AUTO_MEASURE=0){left_out}")


def launchers(op: str, backend: str) -> ModuleType:
    """The launcher module of a concrete backend for `op` ("fuse" or "head"), imported on first use."""
    if backend == "triton":
        if op == "fuse":
            from hrfast.kernels import fuse as module
        else:
            from hrfast.kernels import head as module
        return module
    if backend == "cuda_cpp" and op == "fuse":
        from ._cuda import fuse as module
        return module
    raise ValueError(f"no fused {op} launchers for backend {backend!r}")
