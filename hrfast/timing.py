"""The one timer of hrfast's harnesses: `python -m hrfast bench`, `python -m hrfast demo`, benchmarks/, and the
`backend="auto"` measurement, so that every figure hrfast reports is measured the same way.

A call is timed with CUDA events on a CUDA device (device time of the work it queued, then a synchronisation,
so that one call's work never spills into the next one's span) and with the host clock on any other device.
Several contenders are timed interleaved, round-robin, so that drift (clocks, thermals, other processes) hits
all alike. On CUDA an optional L2 flush (a 256 MB write, outside the timed span) before each call makes every
call start with a cold cache, as a real network layer does: the GPU's L2 (40-50 MB on A100/H100/H200)
would otherwise keep a small benchmark's working set.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

__all__ = ["L2_FLUSH_BYTES", "synchronize", "synced", "time_interleaved", "time_ms", "median_ms"]

L2_FLUSH_BYTES = 256 << 20  # several times any current GPU's L2

Device = Union[torch.device, str]
ErrorHandler = Callable[[str, BaseException], None]


def synchronize(device: Device) -> None:
    """Waits for the device's queued work (CUDA); nothing to wait for elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], object], device: Device) -> Callable[[], object]:
    """fn followed by `synchronize`: what an outside wall-clock timer (pytest-benchmark) must call on CUDA, or it
    would time the launches only."""
    def call():
        out = fn()
        synchronize(device)
        return out
    return call


def _time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) * 1e-6


def _flusher(device: torch.device, flush_l2: bool) -> Callable[[], None]:
    """What runs before each timed call: an L2-sized write on CUDA when asked for, else nothing."""
    if not (flush_l2 and device.type == "cuda"):
        return lambda: None
    buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    return buffer.zero_


def time_interleaved(fns: Mapping[str, Callable[[], object]], device: Device, *, reps: int, warmup: int = 0,
                     min_reps: int = 1, budget_ms: Optional[float] = None, flush_l2: bool = False,
                     on_error: Optional[ErrorHandler] = None) -> Dict[str, List[float]]:
    """Milliseconds per call of each contender: `warmup` untimed (synchronised) rounds, then up to `reps` timed
    rounds, each calling every contender once in the mapping's order.

    budget_ms: stop after the first round at which all timed calls together took this long, but not before
    `min_reps` rounds: a time-boxed measurement, as the autotuner's and triton's do_bench are.
    on_error: when given, a contender that raises (warm-up or timed) is reported to on_error(name, exception)
    and dropped from the rest and from the result; when None, the exception propagates.
    """
    device = torch.device(device)
    live = dict(fns)
    times: Dict[str, List[float]] = {name: [] for name in live}
    flush = _flusher(device, flush_l2)
    spent = 0.0

    def attempt(name: str, run: Callable[[], float]) -> Optional[float]:
        try:
            return run()
        except Exception as exc:
            if on_error is None:
                raise
            del live[name], times[name]
            on_error(name, exc)
            return None

    for _ in range(warmup):
        for name, fn in list(live.items()):
            attempt(name, synced(fn, device))
    for r in range(reps):
        if budget_ms is not None and r >= min_reps and spent >= budget_ms:
            break
        for name, fn in list(live.items()):
            flush()
            ms = attempt(name, lambda fn=fn: _time_call(fn, device))
            if ms is not None:
                times[name].append(ms)
                spent += ms
    return times


def time_ms(fn: Callable[[], object], device: Device, *, reps: int, warmup: int = 0, min_reps: int = 1,
            budget_ms: Optional[float] = None, flush_l2: bool = False) -> List[float]:
    """Milliseconds of each timed call of fn, as `time_interleaved` with one contender (exceptions propagate)."""
    return time_interleaved({"fn": fn}, device, reps=reps, warmup=warmup, min_reps=min_reps, budget_ms=budget_ms,
                            flush_l2=flush_l2)["fn"]


def median_ms(fn: Callable[[], object], device: Device, **options) -> float:
    """The median of `time_ms(fn, device, **options)`: robust to the odd slow call (a GC pause, a clock step)."""
    return statistics.median(time_ms(fn, device, **options))
