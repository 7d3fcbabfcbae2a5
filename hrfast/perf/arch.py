"""The architectures' figures and the performance model's constants: one table, nothing tuned per kernel.

Sources: the datasheets as collected in ../shared/PERF_METHOD.md (SMs, clock, HBM, L2, shared memory, registers,
peaks); the CUDA C++ Programming Guide's compute-capability table for 8.0 and 9.0 (warps, blocks and threads
limits) and the CUDA toolkit's occupancy calculator, include/cuda_occupancy.h (allocation granularities, the 4
register-file sub-partitions, the 1 KB of shared memory the driver reserves per block). The model's constants are
PERF_METHOD.md's.
"""
from __future__ import annotations

from dataclasses import dataclass

# model constants (PERF_METHOD.md "The model"), the same for every kernel and for eager's ops
ACHIEVABLE_HBM_FRACTION = 0.87  # achievable copy bandwidth / datasheet peak (85-90% typical)
ISSUES_PER_SM_PER_CYCLE = 4  # four warp schedulers per SM, one warp instruction each per cycle
LAUNCH_SECONDS = 4e-6  # per kernel launch (batch 1 is host-bound)
CONV_TENSOR_EFFICIENCY = 0.6  # whole-model predictions: every conv at 60% of the dense tensor-core peak
LATENCY_BOUND_WARPS = 8  # below this many warps per SM latency is exposed and the issue term underestimates


@dataclass(frozen=True)
class Arch:
    """One GPU's figures. Rates are per second, sizes in bytes."""

    name: str
    sm: int  # compute capability x 10 (the compile target)
    sms: int
    clock_hz: float  # sustained clock used for the issue rate
    hbm_bytes_per_s: float  # datasheet peak
    l2_bytes: int
    shared_per_block: int  # opt-in maximum per block
    shared_per_sm: int
    tensor_bf16_flops: float  # dense bf16 / fp16 tensor-core peak
    tensor_tf32_flops: float  # dense TF32 tensor-core peak
    fma_fp32_flops: float  # CUDA-core fp32 FMA peak (2 FLOPs per FMA)
    registers_per_sm: int = 65_536
    registers_per_block: int = 65_536
    max_registers_per_thread: int = 255
    max_threads_per_block: int = 1024
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    register_unit: int = 256  # registers are allocated per warp in units of 256 (per thread: multiples of 8)
    register_partitions: int = 4  # the register file is split in 4; a warp's registers come from one part
    shared_unit: int = 128  # shared memory is allocated per block in units of 128 B
    shared_reserved_per_block: int = 1024  # taken from the SM's shared memory for every resident block

    @property
    def achievable_hbm_bytes_per_s(self) -> float:
        return ACHIEVABLE_HBM_FRACTION * self.hbm_bytes_per_s

    @property
    def issue_rate(self) -> float:
        """Warp instructions per second over the whole GPU."""
        return self.sms * ISSUES_PER_SM_PER_CYCLE * self.clock_hz


A100 = Arch("A100 SXM 80GB", sm=80, sms=108, clock_hz=1.41e9, hbm_bytes_per_s=2.04e12, l2_bytes=40 * 10**6,
            shared_per_block=166_912, shared_per_sm=167_936, tensor_bf16_flops=312e12, tensor_tf32_flops=156e12,
            fma_fp32_flops=19.5e12)
H100 = Arch("H100 SXM", sm=90, sms=132, clock_hz=1.755e9, hbm_bytes_per_s=3.35e12, l2_bytes=50 * 10**6,
            shared_per_block=232_448, shared_per_sm=233_472, tensor_bf16_flops=989e12, tensor_tf32_flops=494e12,
            fma_fp32_flops=67e12)
H200 = Arch("H200", sm=90, sms=132, clock_hz=1.755e9, hbm_bytes_per_s=4.8e12, l2_bytes=50 * 10**6,
            shared_per_block=232_448, shared_per_sm=233_472, tensor_bf16_flops=989e12, tensor_tf32_flops=494e12,
            fma_fp32_flops=67e12)

ARCHS = {"a100": A100, "h100": H100, "h200": H200}
# compile targets as names: sm_80 is the A100, sm_90 the H100 (the H200 differs only in HBM bandwidth)
ALIASES = {"sm_80": "a100", "sm_90": "h100"}


def get_arch(name: str) -> Arch:
    """An architecture by short name ("a100", "h100", "h200") or compile target ("sm_80", "sm_90"),
    case-insensitive."""
    key = name.lower()
    try:
        return ARCHS[ALIASES.get(key, key)]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join([*ALIASES, *ARCHS])}") from None
