"""`backend="auto"` on CUDA tensors: the fastest implementation, measured once per call signature.

The first call of an op with a new signature (shapes, strides, dtypes, resampling plan, which inputs need
gradients, ...) runs every candidate that `hrfast.backends.candidates` lists: what can run here without
compiling anything new (the Triton kernels, the CUDA C++ extension when it is already built, ahead of time as
`hrfast._C` or by an earlier JIT build in the cache) and the PyTorch reference, i.e. the eager computation
that the op replaces. Each is timed
(forward, plus backward when a gradient is needed) with `hrfast.timing`: CUDA events, the L2 flushed before
every timed call, interleaved round-robin after one warm-up round, at least MIN_REPS and at most MAX_REPS
rounds (more while under BUDGET_S in all); the smallest median wins (ties go to the earlier candidate). The
choice is kept in a per-process table (`choices()`, least recently used entries dropped beyond 1,024
signatures) and logged on the "hrfast" logger. So
`auto` never keeps running something that measured slower than eager PyTorch on this GPU, for these shapes.

No measurement happens (the static rule of `hrfast.backends.resolve` applies: Triton when importable)
- while torch.compile, torch.export or torch.jit.trace traces (the traced graph fixes the backend),
- while a CUDA graph is being captured (a choice measured earlier for the signature is used),
- with HRFAST_AUTO_MEASURE=0 (for reproducible numerics from run to run, or to avoid the first-call cost),
  or HRFAST_BACKEND=<name>, which makes "auto" mean that backend.

The measurement runs the op on detached copies of the inputs (running statistics are cloned: nothing the
caller holds is modified, and no random numbers are drawn). A candidate that raises is skipped with a warning.
Backends differ only in rounding, but the choice may differ between runs and machines; pass an explicit
backend for bitwise reproducibility.
"""
from __future__ import annotations

import functools
import logging
import os
import statistics
import threading
import warnings
from collections import OrderedDict
from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Sequence

import torch

from . import timing

log = logging.getLogger("hrfast")

# tests set this to measure on CPU tensors too, among the Triton interpreter, the csrc host path and the
# reference (slow test vehicles: on CPU, `auto` otherwise always runs the reference)
measure_on_cpu = False

# repetitions per candidate: at least MIN_REPS, then more while under BUDGET_S of measuring in all
MIN_REPS, MAX_REPS, BUDGET_S = 3, 15, 0.25


class Choice(NamedTuple):
    op: str
    signature: Hashable
    backend: str
    median_ms: Dict[str, float]  # per candidate that ran; a skipped one is absent


_TABLE: "OrderedDict[tuple, Choice]" = OrderedDict()  # least recently used first
_MAX_CHOICES = 1024  # a process that sees ever new shapes forgets the oldest (they are measured again if seen)
_LOCK = threading.RLock()


def choices() -> List[Choice]:
    """The choices `backend="auto"` made in this process, in the order they were measured."""
    with _LOCK:
        return list(_TABLE.values())


def clear() -> None:
    """Forget every choice: the next call of each signature measures again."""
    with _LOCK:
        _TABLE.clear()


def measuring_enabled(device: torch.device) -> bool:
    """Whether `auto` measures for tensors on `device` now (see the module notes)."""
    if os.environ.get("HRFAST_AUTO_MEASURE", "1") == "0":
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and measure_on_cpu


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def applies(device: torch.device) -> bool:
    """Whether a backend="auto" call on `device` is measured now: never while torch.compile, export or
    jit.trace traces (checked first, so nothing below is traced)."""
    return not torch.compiler.is_compiling() and not torch.jit.is_tracing() and measuring_enabled(device)


def choose(op: str, signature: Hashable, device: torch.device, static: str, names: Sequence[str],
           run: Callable[[str], None]) -> str:
    """The backend for one call of `op` with this `signature` on `device` (when `applies`): from the table,
    else measured now by calling `run(backend)` (one forward, and backward when needed, on copies of the
    inputs) for each of the candidate backends `names`; `static` (the static rule's answer) during a CUDA
    graph capture."""
    key = (op, device.type, device.index if device.type == "cuda" else None, signature)
    with _LOCK:
        known = _TABLE.get(key)
        if known is not None:
            _TABLE.move_to_end(key)
            return known.backend
        if _capturing(device):
            return static
        if len(names) == 1:
            return names[0]
        medians = _measure(names, run, device, op)
        if not medians:  # every candidate raised: the real call will say why
            return static
        best = min(medians, key=lambda name: (medians[name], names.index(name)))
        _TABLE[key] = Choice(op, signature, best, medians)
        if len(_TABLE) > _MAX_CHOICES:
            _TABLE.popitem(last=False)
    log.info("hrfast: backend='auto' chose %s for %s %s (median ms: %s)", best, op, _brief(signature),
             ", ".join(f"{name} {ms:.3f}" for name, ms in medians.items()))
    return best


def _measure(names: Sequence[str], run: Callable[[str], None], device: torch.device, op: str) -> Dict[str, float]:
    """Median milliseconds per candidate (`hrfast.timing`: CUDA events on a cold L2 on a GPU), round-robin so
    that drift hits all alike, after one warm-up round (Triton compiles, the extension loads, the allocator
    fills its cache)."""
    def skip(name: str, exc: BaseException) -> None:  # an OOM or a kernel that cannot take these shapes
        warnings.warn(f"hrfast: backend='auto' skips {name} for {op}: {type(exc).__name__}: {exc}",
                      RuntimeWarning, stacklevel=5)

    times = timing.time_interleaved({name: functools.partial(run, name) for name in names}, device, warmup=1,
                                    reps=MAX_REPS, min_reps=MIN_REPS, budget_ms=BUDGET_S * 1e3, flush_l2=True,
                                    on_error=skip)
    return {name: statistics.median(t) for name, t in times.items() if t}


def _brief(signature) -> str:
    text = repr(signature)
    return text if len(text) <= 160 else text[:157] + "..."


# --------------------------------------------------------------------------------------------- helpers


def tensor_signature(t: Optional[torch.Tensor]) -> Hashable:
    """What of a tensor can change an implementation's speed: shape, strides, dtype, whether it needs a grad."""
    if t is None:
        return None
    return (tuple(t.shape), tuple(t.stride()), str(t.dtype).replace("torch.", ""), t.requires_grad)


def detached_like(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A detached alias of `t` that needs a gradient iff `t` does (for a measurement's own graph)."""
    if t is None:
        return None
    return t.detach().requires_grad_(t.requires_grad and t.is_floating_point())


def forward_backward(out: torch.Tensor, leaves: Sequence[Optional[torch.Tensor]]) -> None:
    """The backward of a measurement run, when grad mode is on and some leaf needs a gradient."""
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    if wanted and torch.is_grad_enabled() and out.requires_grad:
        torch.autograd.grad(out, wanted, torch.ones_like(out))
