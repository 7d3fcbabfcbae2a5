"""Occupancy, launchability and the time prediction of ../shared/PERF_METHOD.md, from compiler facts.

    predicted time = max(compulsory bytes / achievable HBM bandwidth,
                         dynamic warp instructions / issue rate,
                         tensor-core FLOPs / dense peak,
                         CUDA-core FLOPs / FMA peak) + launches x launch cost

with the constants of arch.py for every kernel alike. The result is a prediction, to be checked on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence

from .arch import LATENCY_BOUND_WARPS, LAUNCH_SECONDS, Arch
from .sass import Kernel

WARP_SIZE = 32


@dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    limiter: str  # "registers", "shared memory", "warps" or "blocks"


def _round_up(value: int, unit: int) -> int:
    return math.ceil(value / unit) * unit


def registers_per_warp(arch: Arch, registers: int) -> int:
    """Registers one warp takes: allocated per warp in units of `register_unit` (256 = 8 per thread)."""
    return _round_up(registers * WARP_SIZE, arch.register_unit)


def shared_per_block(arch: Arch, shared: int) -> int:
    """Shared memory one resident block takes from its SM: its own plus the driver's reserve, rounded up."""
    return _round_up(shared + arch.shared_reserved_per_block, arch.shared_unit)


def occupancy(arch: Arch, registers: int, threads_per_block: int, shared: int = 0) -> Occupancy:
    """Resident blocks and warps per SM: the least of the register, shared memory, 64-warp and 32-block limits,
    computed as the CUDA occupancy calculator does (include/cuda_occupancy.h, partitioned caching off)."""
    warps_per_block = math.ceil(threads_per_block / WARP_SIZE)
    partition = arch.registers_per_sm // arch.register_partitions
    warps_by_registers = partition // registers_per_warp(arch, max(registers, 1)) * arch.register_partitions
    limits = {
        "registers": warps_by_registers // warps_per_block,
        "shared memory": arch.shared_per_sm // shared_per_block(arch, shared),
        "warps": arch.max_warps_per_sm // warps_per_block,
        "blocks": arch.max_blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    return Occupancy(limits[limiter], limits[limiter] * warps_per_block, limiter)


def launch_failure(arch: Arch, registers: int, threads_per_block: int, shared: int = 0) -> Optional[str]:
    """Why a block of this kernel cannot launch on `arch`, or None if it can."""
    if shared > arch.shared_per_block:
        return f"needs {shared:,} B of shared memory per block, {arch.name} allows {arch.shared_per_block:,} B"
    if registers > arch.max_registers_per_thread:
        return f"needs {registers} registers per thread, the limit is {arch.max_registers_per_thread}"
    if threads_per_block > arch.max_threads_per_block:
        return f"{threads_per_block} threads per block, the limit is {arch.max_threads_per_block}"
    # the hardware check assumes warps spread over all register partitions (cuda_occupancy.h)
    warps = _round_up(math.ceil(threads_per_block / WARP_SIZE), arch.register_partitions)
    block_registers = registers_per_warp(arch, registers) * warps
    if block_registers > arch.registers_per_block:
        return f"a block needs {block_registers:,} registers, the limit is {arch.registers_per_block:,}"
    return None


def dynamic_warp_instructions(kernel: Kernel, trips: Sequence[float], warps: int) -> float:
    """Warp instructions a launch issues: warps x (straight-line part + each loop's own body x its trips).

    The trip counts cannot be read from SASS: the caller, who knows the launcher's tiling, gives for each of
    `kernel.loops` (same order, innermost first) how often one warp runs that loop's body in all, outer
    iterations included. Mind ptxas's unrolling: a source loop may appear as an unrolled main loop plus a
    remainder loop, each with its own trips. The straight-line part counts as run once per warp (branches
    that skip it are ignored: an upper bound there).
    """
    if len(trips) != len(kernel.loops):
        raise ValueError(f"{kernel.name}: {len(trips)} trip counts for {len(kernel.loops)} loops")
    per_warp = len(kernel.straight) + sum(len(loop.body) * n for loop, n in zip(kernel.loops, trips))
    return per_warp * warps


@dataclass(frozen=True)
class Prediction:
    seconds: float
    limiter: str  # the largest of the terms: "memory", "issue", "tensor" or "fma"
    terms: Dict[str, float]  # each bound in seconds, launch cost excluded
    launch_seconds: float
    latency_exposed: bool  # under LATENCY_BOUND_WARPS warps per SM: the issue term underestimates


def predict(arch: Arch, compulsory_bytes: float, warp_instructions: float = 0.0, tensor_flops: float = 0.0,
            fma_flops: float = 0.0, tensor_precision: str = "bf16", launches: int = 1,
            warps_per_sm: Optional[int] = None) -> Prediction:
    """The predicted time of `launches` kernels doing this work, and which bound limits it.

    `tensor_precision`: "bf16" / "fp16" (dense half-precision peak) or "tf32" (fp32 dots). `warps_per_sm`, when
    known (`occupancy`), flags latency-exposed kernels.
    """
    tensor_peak = {"bf16": arch.tensor_bf16_flops, "fp16": arch.tensor_bf16_flops,
                   "tf32": arch.tensor_tf32_flops}[tensor_precision]
    terms = {
        "memory": compulsory_bytes / arch.achievable_hbm_bytes_per_s,
        "issue": warp_instructions / arch.issue_rate,
        "tensor": tensor_flops / tensor_peak,
        "fma": fma_flops / arch.fma_fp32_flops,
    }
    limiter = max(terms, key=terms.get)
    launch = launches * LAUNCH_SECONDS
    exposed = warps_per_sm is not None and warps_per_sm < LATENCY_BOUND_WARPS
    return Prediction(terms[limiter] + launch, limiter, terms, launch, exposed)


def predict_eager(arch: Arch, op_bytes: Iterable[float]) -> float:
    """Eager PyTorch's time for the same work: each ATen op reads its inputs and writes its output once at the
    achievable bandwidth (`op_bytes`, one entry per op), plus its launch."""
    return sum(b / arch.achievable_hbm_bytes_per_s + LAUNCH_SECONDS for b in op_bytes)
