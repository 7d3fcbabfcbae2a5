"""The device limits the launchers fit their block configurations to, read at run time.

A block configuration launches only if its shared memory fits the device's per-block maximum (the opt-in one:
Triton opts every kernel in and refuses, with OutOfResources, one that needs more). A launcher whose shared
memory depends on its configuration (the head's pipelined loops) lists candidate configurations in order of
preference, each with an upper bound of its shared memory, and takes the first whose bound fits
(`first_fitting`); `tests/test_launchability.py` checks, for the real HRNet shapes on sm_80 and sm_90, that
every bound holds for what Triton's compiler allocates.

The limit comes from `torch.cuda.get_device_properties` (`shared_memory_per_block_optin`, torch >= 2.7), else
from Triton's own driver query (the very limit Triton checks at launch), else 48 KB, which every CUDA device
gives a block without opting in. It is read on first use per device and cached; nothing is queried at import.
Devices other than CUDA (the Triton interpreter on CPU, meta tensors) have no limit: the first candidate
runs. `assume` stands in a target's limits where no such device exists (`hrfast.perf` records the launches a
GPU of that architecture would get).
"""
from __future__ import annotations

import contextlib
import functools
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, TypeVar

import torch

DEFAULT_SHARED_PER_BLOCK = 48 * 1024  # what any CUDA device gives a block without opting in

C = TypeVar("C")


@dataclass(frozen=True)
class DeviceLimits:
    """What a block may use on one device."""

    shared_per_block: int  # bytes of shared memory, the opt-in maximum


_ASSUMED: ContextVar[Optional[DeviceLimits]] = ContextVar("hrfast_assumed_limits", default=None)


@contextlib.contextmanager
def assume(limits: DeviceLimits) -> Iterator[None]:
    """Inside, the launchers fit their configurations to `limits` whatever the tensors' device."""
    token = _ASSUMED.set(limits)
    try:
        yield
    finally:
        _ASSUMED.reset(token)


def device_limits(device: torch.device) -> Optional[DeviceLimits]:
    """The limits of the device a launch runs on: the assumed ones, a CUDA device's (cached), or None."""
    assumed = _ASSUMED.get()
    if assumed is not None:
        return assumed
    if device.type != "cuda":
        return None
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    return DeviceLimits(shared_per_block=_shared_per_block(torch.cuda.get_device_properties(index), index))


def _shared_per_block(props, index: int) -> int:
    """The opt-in maximum from torch's properties (attribute added in torch 2.7), else from Triton's driver,
    else the limit every CUDA device guarantees."""
    value = getattr(props, "shared_memory_per_block_optin", None)
    return int(value) if value else _triton_shared_per_block(index) or DEFAULT_SHARED_PER_BLOCK


def _triton_shared_per_block(index: int) -> Optional[int]:
    """What Triton checks its kernels against at launch (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
    or None where this Triton's driver does not say."""
    try:
        from triton.runtime import driver
        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # the driver API differs between Triton releases and backends
        return None


def first_fitting(candidates: Sequence[C], shared_bound: Callable[[C], int],
                  limits: Optional[DeviceLimits]) -> C:
    """The first candidate whose shared memory bound fits `limits` (without limits, the first). When none
    does, the last, the smallest: its bound is an upper bound, so it may still fit, and if it does not,
    Triton's OutOfResources names the kernel."""
    if limits is not None:
        for candidate in candidates:
            if shared_bound(candidate) <= limits.shared_per_block:
                return candidate
    return candidates[-1] if limits is not None else candidates[0]
