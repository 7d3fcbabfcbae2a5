"""hrfast.perf: the architecture table, SASS parsing, occupancy and the prediction, launch recording and the
JIT's specialisation, and real compiles of a tiny kernel for sm_90 and sm_80 (in a subprocess: the suite runs
Triton's interpreter, see conftest.py). Run as a script, this file is that subprocess.

`python -m hrfast inspect` without compiling: a patched W18 recorded on meta tensors (launches and ATen ops per
op call), the trip-count table's coverage, the eager / torch.compile byte models on hand-computed cases, the
analysis with a fake compiler, the CLI, and benchmarks/calibrate.py's calls built on CPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from hrfast.perf import arch as A
from hrfast.perf.compile import parse_ptxas_log
from hrfast.perf.model import (Occupancy, dynamic_warp_instructions, launch_failure, occupancy, predict,
                               predict_eager, registers_per_warp)
from hrfast.perf.record import bind, record, specialize_call
from hrfast.perf.sass import classify, counts, parse_sass


@triton.jit
def _tiny_kernel(ptrs, n, scale, steps, BLOCK: tl.constexpr, SHAPE: tl.constexpr):
    """A loop of loads and FMAs over tuple pointers, then a block sum (one fp32 per warp through shared memory)."""
    x_ptr, y_ptr = ptrs
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(steps):
        acc += tl.load(x_ptr + i * n + offs, mask=offs < n, other=0.0) * scale
    tl.store(y_ptr + tl.program_id(0), tl.sum(acc, axis=0) * SHAPE[0])


def _tiny_launcher(x, y, steps, num_warps=4):
    n = x.numel() // steps
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _tiny_kernel[grid]((x, y), n, 0.5, steps, BLOCK=256, SHAPE=(2, 3), num_warps=num_warps)


def _record_tiny(num_warps=4):
    x = torch.empty(4 * 1000, device="meta")
    y = torch.empty(4, device="meta", dtype=torch.bfloat16)
    with record(sys.modules[__name__]) as launches:
        _tiny_launcher(x, y, 4, num_warps)
    return launches


# ------------------------------------------------------------------------------------------------ arch table


def test_arch_table_is_perf_method_s():
    a100, h100, h200 = A.get_arch("A100"), A.get_arch("h100"), A.get_arch("h200")
    assert (a100.sm, h100.sm, h200.sm) == (80, 90, 90)
    assert (a100.sms, h100.sms, h200.sms) == (108, 132, 132)
    assert (a100.clock_hz, h100.clock_hz, h200.clock_hz) == (1.41e9, 1.755e9, 1.755e9)
    assert (a100.hbm_bytes_per_s, h100.hbm_bytes_per_s, h200.hbm_bytes_per_s) == (2.04e12, 3.35e12, 4.8e12)
    assert (a100.l2_bytes, h100.l2_bytes, h200.l2_bytes) == (40e6, 50e6, 50e6)
    assert (a100.shared_per_block, h100.shared_per_block, h200.shared_per_block) == (166_912, 232_448, 232_448)
    assert (a100.shared_per_sm, h100.shared_per_sm, h200.shared_per_sm) == (167_936, 233_472, 233_472)
    assert (a100.tensor_bf16_flops, h100.tensor_bf16_flops, h200.tensor_bf16_flops) == (312e12, 989e12, 989e12)
    assert (a100.tensor_tf32_flops, h100.tensor_tf32_flops) == (156e12, 494e12)
    assert (a100.fma_fp32_flops, h100.fma_fp32_flops) == (19.5e12, 67e12)
    for gpu in (a100, h100, h200):
        assert (gpu.registers_per_sm, gpu.max_registers_per_thread) == (65_536, 255)
        assert (gpu.max_warps_per_sm, gpu.max_blocks_per_sm, gpu.register_unit) == (64, 32, 256)
    assert h200.achievable_hbm_bytes_per_s == pytest.approx(0.87 * 4.8e12)
    assert h100.issue_rate == pytest.approx(132 * 4 * 1.755e9)
    assert (A.LAUNCH_SECONDS, A.CONV_TENSOR_EFFICIENCY) == (4e-6, 0.6)
    with pytest.raises(ValueError, match="unknown architecture"):
        A.get_arch("v100")


# ------------------------------------------------------------------------------------------------------ SASS

# `cuobjdump -sass` of nvcc 13.0 -arch=sm_80 output (the encoding-only lines dropped, NOP padding cut) for
#   for (i = global id; i < n; i += grid size) { tile[tid] = x[i]; sync; y[i] = a * tile[tid + 1] + y[i]; sync; }
SAXPY_SM80 = """
	code for sm_80
	.target	sm_80

		Function : _Z5saxpyifPKfPf
	.headerflags	@"EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                             /* 0x00000a0000017a02 */
        /*0010*/                   S2R R0, SR_CTAID.X ;                               /* 0x0000000000007919 */
        /*0020*/                   S2R R9, SR_TID.X ;                                 /* 0x0000000000097919 */
        /*0030*/                   IMAD R0, R0, c[0x0][0x0], R9 ;                     /* 0x0000000000007a24 */
        /*0040*/                   ISETP.GE.AND P0, PT, R0, c[0x0][0x160], PT ;       /* 0x0000580000007a0c */
        /*0050*/               @P0 EXIT ;                                             /* 0x000000000000094d */
        /*0060*/                   SHF.L.U32 R2, R9, 0x2, RZ ;                        /* 0x0000000209027819 */
        /*0070*/                   ULDC.64 UR4, c[0x0][0x118] ;                       /* 0x0000460000047ab9 */
        /*0080*/                   IADD3 R2, R2, 0x4, RZ ;                            /* 0x0000000402027810 */
        /*0090*/                   LOP3.LUT R6, R2, 0x3fc, RZ, 0xc0, !PT ;            /* 0x000003fc02067812 */
        /*00a0*/                   HFMA2.MMA R5, -RZ, RZ, 0, 2.384185791015625e-07 ;  /* 0x00000004ff057435 */
        /*00b0*/                   IMAD.WIDE R2, R0, R5, c[0x0][0x168] ;              /* 0x00005a0000027625 */
        /*00c0*/                   LDG.E.CONSTANT R2, [R2.64] ;                       /* 0x0000000402027981 */
        /*00d0*/                   WARPSYNC 0xffffffff ;                              /* 0xffffffff00007948 */
        /*00e0*/                   IMAD.WIDE R4, R0, R5, c[0x0][0x170] ;              /* 0x00005c0000047625 */
        /*00f0*/                   STS [R9.X4], R2 ;                                  /* 0x0000000209007388 */
        /*0100*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                      /* 0x0000000000007b1d */
        /*0110*/                   LDG.E R8, [R4.64] ;                                /* 0x0000000404087981 */
        /*0120*/                   MOV R11, c[0x0][0xc] ;                             /* 0x00000300000b7a02 */
        /*0130*/                   LDS R7, [R6] ;                                     /* 0x0000000006077984 */
        /*0140*/                   IMAD R0, R11, c[0x0][0x0], R0 ;                    /* 0x000000000b007a24 */
        /*0150*/                   ISETP.GE.AND P0, PT, R0, c[0x0][0x160], PT ;       /* 0x0000580000007a0c */
        /*0160*/                   FFMA R7, R7, c[0x0][0x164], R8 ;                   /* 0x0000590007077a23 */
        /*0170*/                   STG.E [R4.64], R7 ;                                /* 0x0000000704007986 */
        /*0180*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                      /* 0x0000000000007b1d */
        /*0190*/              @!P0 BRA 0xa0 ;                                         /* 0xffffff0000008947 */
        /*01a0*/                   EXIT ;                                             /* 0x000000000000794d */
        /*01b0*/                   BRA 0x1b0;                                         /* 0xfffffff000007947 */
        /*01c0*/                   NOP;                                               /* 0x0000000000007918 */
        /*01d0*/                   NOP;                                               /* 0x0000000000007918 */
		..........
"""

# the same for sm_90 of nested loops:
#   for (r = tid; r < rows; r += blockDim.x) { for (c = 0; c < cols; ++c) acc += x[r * cols + c]; ... }
ROWSUM_SM90 = """
	code for sm_90
	.target	sm_90

		Function : _Z6rowsumiiPKfPf
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R9, SR_TID.X ;                     /* 0x0000000000097919 */
        /*0020*/                   ULDC UR4, c[0x0][0x210] ;              /* 0x0000840000047ab9 */
        /*0030*/                   BSSY B0, 0x220 ;                       /* 0x000001e000007945 */
        /*0040*/                   IMAD.MOV.U32 R5, RZ, RZ, RZ ;          /* 0x000000ffff057224 */
        /*0050*/                   ISETP.GE.AND P0, PT, R9, UR4, PT ;     /* 0x0000000409007c0c */
        /*0060*/                   ULDC.64 UR4, c[0x0][0x208] ;           /* 0x0000820000047ab9 */
        /*0070*/               @P0 BRA 0x210 ;                            /* 0x0000000000640947 */
        /*0080*/                   LDC R11, c[0x0][RZ] ;                  /* 0x00000000ff0b7b82 */
        /*0090*/                   ULDC UR6, c[0x0][0x214] ;              /* 0x0000850000067ab9 */
        /*00a0*/                   ISETP.LT.AND P0, PT, RZ, UR6, PT ;     /* 0x00000006ff007c0c */
        /*00b0*/              @!P0 BRA 0x210 ;                            /* 0x0000000000548947 */
        /*00c0*/                   HFMA2.MMA R5, -RZ, RZ, 0, 0 ;          /* 0x00000000ff057435 */
        /*00d0*/                   IMAD.MOV.U32 R0, RZ, RZ, R9 ;          /* 0x000000ffff007224 */
        /*00e0*/                   LDC.64 R12, c[0x0][0x210] ;            /* 0x00008400ff0c7b82 */
        /*00f0*/                   IMAD.MOV.U32 R4, RZ, RZ, RZ ;          /* 0x000000ffff047224 */
        /*0100*/                   MOV R6, RZ ;                           /* 0x000000ff00067202 */
        /*0110*/                   LDC.64 R2, c[0x0][0x218] ;             /* 0x00008600ff027b82 */
        /*0120*/                   IMAD R7, R0, R13, RZ ;                 /* 0x0000000d00077224 */
        /*0130*/                   IMAD.IADD R0, R11, 0x1, R0 ;           /* 0x000000010b007824 */
        /*0140*/                   ISETP.GE.AND P2, PT, R0, R12, PT ;     /* 0x0000000c0000720c */
        /*0150*/                   IMAD.WIDE R2, R7, 0x4, R2 ;            /* 0x0000000407027825 */
        /*0160*/                   MOV R7, R3 ;                           /* 0x0000000300077202 */
        /*0170*/                   IMAD.MOV.U32 R3, RZ, RZ, R7 ;          /* 0x000000ffff037224 */
        /*0180*/                   LDG.E.CONSTANT R3, desc[UR4][R2.64] ;  /* 0x0000000402037981 */
        /*0190*/                   IADD3 R4, R4, 0x1, RZ ;                /* 0x0000000104047810 */
        /*01a0*/                   ISETP.GE.AND P0, PT, R4, R13, PT ;     /* 0x0000000d0400720c */
        /*01b0*/                   IADD3 R2, P1, R2, 0x4, RZ ;            /* 0x0000000402027810 */
        /*01c0*/                   IADD3.X R7, RZ, R7, RZ, P1, !PT ;      /* 0x00000007ff077210 */
        /*01d0*/                   FADD R6, R3, R6 ;                      /* 0x0000000603067221 */
        /*01e0*/              @!P0 BRA 0x170 ;                            /* 0xfffffffc00e08947 */
        /*01f0*/                   FFMA R5, R6, R6, R5 ;                  /* 0x0000000606057223 */
        /*0200*/              @!P2 BRA 0xe0 ;                             /* 0xfffffffc00b4a947 */
        /*0210*/                   BSYNC B0 ;                             /* 0x0000000000007941 */
        /*0220*/                   LDC.64 R2, c[0x0][0x220] ;             /* 0x00008800ff027b82 */
        /*0230*/                   IMAD.WIDE.U32 R2, R9, 0x4, R2 ;        /* 0x0000000409027825 */
        /*0240*/                   STG.E desc[UR4][R2.64], R5 ;           /* 0x0000000502007986 */
        /*0250*/                   EXIT ;                                 /* 0x000000000000794d */
        /*0260*/                   BRA 0x260;                             /* 0xfffffffc00fc7947 */
        /*0270*/                   NOP;                                   /* 0x0000000000007918 */
        /*0280*/                   NOP;                                   /* 0x0000000000007918 */
		..........
"""

# `nvcc -arch=sm_90 -cubin -Xptxas -v` of two kernels and a non-inlined device function (not an entry: left out)
NVCC_PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z2k2Pf' for 'sm_90'
ptxas info    : Function properties for _Z2k2Pf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 14 registers, used 1 barriers, 256 bytes smem
ptxas info    : Compile time = 7.484 ms
ptxas info    : Compiling entry function '_Z2k1PKfPf' for 'sm_90'
ptxas info    : Function properties for _Z2k1PKfPf
    256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 256 bytes cumulative stack size
ptxas info    : Compile time = 8.367 ms
ptxas info    : Function properties for _Z6helperPKfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""

# Triton 3.8's ptxas log of the fp32 head forward kernel for sm_90a (W48 seg shapes)
TRITON_PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_head_forward_kernel' for 'sm_90a'
ptxas info    : Function properties for _head_forward_kernel
    7096 bytes stack frame, 18016 bytes spill stores, 21616 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 7096 bytes cumulative stack size
ptxas info    : Compile time = 2155.996 ms
"""

SAXPY_CU = """
__global__ void saxpy(int n, float a, const float* __restrict__ x, float* __restrict__ y) {
  __shared__ float tile[256];
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    tile[threadIdx.x] = x[i];
    __syncthreads();
    y[i] = a * tile[(threadIdx.x + 1) % 256] + y[i];
    __syncthreads();
  }
}
"""


def test_sass_loop_and_instruction_classes():
    kernel = parse_sass(SAXPY_SM80)["_Z5saxpyifPKfPf"]
    assert kernel.counts["total"] == 27  # 0x000..0x1a0: the BRA to itself after EXIT and the NOPs are dropped
    (loop,) = kernel.loops
    assert (loop.start, loop.end, loop.depth) == (0xA0, 0x190, 1)
    assert dict(loop.counts) == {"total": 16, "fp16": 1, "integer": 5, "LDG.32": 2, "control": 4, "STS": 1,
                                 "LDS": 1, "fp32": 1, "STG.32": 1}
    assert dict(counts(kernel.straight)) == {"total": 11, "integer": 8, "control": 2, "uniform": 1}


def test_sass_nested_loops_innermost_first_with_their_own_bodies():
    kernel = parse_sass(ROWSUM_SM90)["_Z6rowsumiiPKfPf"]
    inner, outer = kernel.loops
    assert (inner.start, inner.end, inner.depth) == (0x170, 0x1E0, 2)
    assert (outer.start, outer.end, outer.depth) == (0xE0, 0x200, 1)
    assert dict(inner.counts) == {"total": 8, "integer": 5, "LDG.32": 1, "fp32": 1, "control": 1}
    # 0xe0..0x160 and 0x1f0..0x200: the inner loop's instructions are the inner loop's only
    assert dict(outer.counts) == {"total": 11, "constant": 2, "integer": 7, "fp32": 1, "control": 1}
    assert len(kernel.straight) == 19 and kernel.counts["total"] == 38
    # 2 warps of 4 rows (outer trips) x 10 columns (inner trips: 40 in all)
    assert dynamic_warp_instructions(kernel, [40, 4], warps=2) == 2 * (19 + 11 * 4 + 8 * 40)
    with pytest.raises(ValueError, match="1 trip counts for 2 loops"):
        dynamic_warp_instructions(kernel, [40], warps=2)


@pytest.mark.parametrize("opcode, kind", [
    ("LDG.E.128", "LDG.128"), ("LDG.E.64.CONSTANT", "LDG.64"), ("LDG.E.U16", "LDG.16"), ("LDG.E.LTC128B.S8", "LDG.8"),
    ("LDG.E", "LDG.32"), ("STG.E.64", "STG.64"), ("STG.E.U16", "STG.16"), ("LDGSTS.E.BYPASS.LTC128B.128", "LDGSTS"),
    ("HGMMA.64x128x16.F32.BF16", "tensor"), ("HMMA.16816.F32.BF16", "tensor"), ("IMAD.WIDE.U32", "integer"),
    ("LEA.HI.X.SX32", "integer"), ("UIADD3", "uniform"), ("DFMA", "fp64"), ("MUFU.EX2", "sfu"),
    ("BAR.SYNC.DEFER_BLOCKING", "control"), ("STL.64", "STL"), ("XYZZY", "other")])
def test_classify(opcode, kind):
    assert classify(opcode) == kind


def test_parse_ptxas_log_per_entry_function():
    assert parse_ptxas_log(NVCC_PTXAS_LOG) == {
        "_Z2k2Pf": {"registers": 14, "spill_stores": 0, "spill_loads": 0, "stack": 0, "shared": 256},
        "_Z2k1PKfPf": {"registers": 32, "spill_stores": 0, "spill_loads": 0, "stack": 256, "shared": 0}}
    assert parse_ptxas_log(TRITON_PTXAS_LOG) == {"_head_forward_kernel": {
        "registers": 32, "spill_stores": 18016, "spill_loads": 21616, "stack": 7096, "shared": 0}}


# ------------------------------------------------------------------------------------------- occupancy, model


def test_occupancy_known_cases():
    h100, a100 = A.H100, A.A100
    assert registers_per_warp(h100, 255) == 8192 and registers_per_warp(h100, 33) == 40 * 32
    # 255 registers -> 256 per thread, 8,192 per warp; a register-file quarter (16,384) holds 2 warps: 8 warps
    # per SM, 2 blocks of 128 threads
    assert occupancy(h100, 255, 128) == Occupancy(2, 8, "registers")
    # 40 registers: 1,280 per warp, 12 warps per quarter (16,384 // 1,280), 48 per SM: 12 blocks of 4 warps
    assert occupancy(h100, 40, 128) == Occupancy(12, 48, "registers")
    # with 3-warp blocks: 48 // 3 = 16 blocks (65,536 // 1,280 = 51 unpartitioned registers would allow 17)
    assert occupancy(h100, 40, 96) == Occupancy(16, 48, "registers")
    # 100,000 B + the 1 KB reserve, in 128 B units: 101,120 B per block; 2 fit in 233,472 B, 1 in 167,936 B
    assert occupancy(h100, 32, 128, 100_000) == Occupancy(2, 8, "shared memory")
    assert occupancy(a100, 32, 128, 100_000) == Occupancy(1, 4, "shared memory")
    # 116,000 B: 117,120 B with the reserve, one per SM (without the reserve two would fit)
    assert occupancy(h100, 32, 128, 116_000) == Occupancy(1, 4, "shared memory")
    assert occupancy(h100, 16, 512) == Occupancy(4, 64, "warps")  # 16 warps per block, 64 per SM
    assert occupancy(h100, 16, 32) == Occupancy(32, 32, "blocks")  # 1-warp blocks: 32 blocks per SM at most


def test_launch_failure_reasons():
    h100, a100 = A.H100, A.A100
    assert launch_failure(h100, 128, 128, 232_448) is None
    assert "232,449 B of shared memory per block, H100 SXM allows 232,448 B" in launch_failure(h100, 128, 128, 232_449)
    # the bf16 channels_last head forward (181,248 B): launches on H100, not on A100
    assert launch_failure(h100, 255, 128, 181_248) is None
    assert "A100 SXM 80GB allows 166,912 B" in launch_failure(a100, 255, 128, 181_248)
    assert "256 registers per thread" in launch_failure(h100, 256, 128)
    assert "1025 threads" in launch_failure(h100, 32, 1025)
    # 255 (256) registers x 16 warps = 131,072 > 65,536 per block; 128 x 16 warps = 65,536 fits
    assert "131,072 registers" in launch_failure(h100, 255, 512)
    assert launch_failure(h100, 128, 512) is None
    # 200 registers x 10 warps = 64,000 fits, but the hardware counts the warps rounded up to 12: 76,800
    assert "76,800 registers" in launch_failure(h100, 200, 320)


def test_prediction_names_the_limiter():
    h100 = A.H100
    memory = predict(h100, compulsory_bytes=1e9, warp_instructions=1e6)
    assert memory.limiter == "memory"
    assert memory.seconds == pytest.approx(1e9 / (0.87 * 3.35e12) + 4e-6)
    issue = predict(h100, compulsory_bytes=1e6, warp_instructions=27.3e6)
    assert issue.limiter == "issue" and issue.terms["issue"] == pytest.approx(27.3e6 / (132 * 4 * 1.755e9))
    tensor = predict(h100, 1e6, 1e6, tensor_flops=1e12)
    assert tensor.limiter == "tensor" and tensor.terms["tensor"] == pytest.approx(1e12 / 989e12)
    tf32 = predict(h100, 1e6, 1e6, tensor_flops=1e12, tensor_precision="tf32")
    assert tf32.terms["tensor"] == pytest.approx(1e12 / 494e12)
    assert predict(h100, 1e6, 1e6, fma_flops=1e11).limiter == "fma"
    assert predict(h100, 1e9, launches=3).launch_seconds == pytest.approx(12e-6)
    assert predict(h100, 1e9, warps_per_sm=4).latency_exposed
    assert not predict(h100, 1e9, warps_per_sm=8).latency_exposed
    assert predict_eager(h100, [1e9, 2e9]) == pytest.approx(3e9 / (0.87 * 3.35e12) + 8e-6)


# ------------------------------------------------------------------------------- recording, specialisation

DIV16 = [["tt.divisibility", 16]]


def test_record_captures_launches_without_running_them():
    original = _tiny_kernel
    (launch,) = _record_tiny(num_warps=2)
    assert _tiny_kernel is original  # restored on exit
    assert launch.name == "_tiny_kernel"
    assert launch.grid == (4,)  # cdiv(1000, BLOCK=256), the callable grid resolved with the call's parameters
    assert launch.options == {"num_warps": 2, "num_stages": 3}
    assert launch.warps == 8
    spec = launch.specialization()
    assert spec.signature == {"ptrs": ("*fp32", "*bf16"), "n": "i32", "scale": "fp32", "steps": "i32",
                              "BLOCK": "constexpr", "SHAPE": "constexpr"}
    assert spec.constexprs == {(4,): 256, (5,): (2, 3)}
    assert spec.attrs == {(0, 0): DIV16, (0, 1): DIV16}  # n = 1000 and steps = 4: not multiples of 16


def test_specialization_rules():
    x = torch.empty(64, device="meta")
    params = bind(_tiny_kernel, ((x, x[1:]), 1, 2.0, 2**32), {"BLOCK": 64, "SHAPE": (1, 16)})
    spec = specialize_call(_tiny_kernel, params)
    assert spec.signature["ptrs"] == ("*fp32", "*fp32")
    assert spec.signature["n"] == "constexpr" and spec.constexprs[(1,)] == 1  # an int equal to 1
    assert spec.signature["steps"] == "i64" and spec.attrs[(3,)] == DIV16
    assert (0, 0) in spec.attrs and (0, 1) not in spec.attrs  # x[1:] starts 4 bytes in
    assert spec.constexprs[(5,)] == (1, 16)


def test_specialization_matches_triton_jit():
    """The same calls through Triton's own JIT binder and `_pack_args` for sm_90 (no GPU needed)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as exc:
        pytest.skip(f"Triton's JIT internals moved: {exc}")

    def kernel(ptrs, n, m, k, scale, flag, none, typed: tl.int64, typed_float: tl.float32, dns, dns_oa,
               BLOCK: tl.constexpr, SHAPE: tl.constexpr):
        pass

    jit = JITFunction(kernel, do_not_specialize=["dns"], do_not_specialize_on_alignment=["dns_oa"])
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    x = torch.empty(64)  # a CPU tensor: Triton reads its real address
    calls = [((x, x[1:], 1, 32), 1, 16, 2**40 + 3, 0.5, True, None, 1, 16, 1, 32),
             ((x[4:], (x, 17)), 17, 2**31, -16, 1.0, False, None, 16, 2.5, (1, 16), 1)]
    for args in calls:
        kwargs = dict(BLOCK=64, SHAPE=(2, 3), num_warps=8)
        bound, specialization, options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
        mine = specialize_call(jit, bind(jit, args, kwargs))
        assert mine.signature == signature
        assert mine.constexprs == constexprs
        assert mine.attrs == {path: a for path, a in attrs.items() if a}


def _record_real_fusion_launch():
    """One real launcher call on meta tensors. The launchers' signatures are changing: adapt this fixture."""
    from hrfast.kernels import fuse
    from hrfast.plan import FusePlan, TermPlan
    xs = [torch.empty(2, 8, 16, 16, device="meta") for _ in range(2)]
    with record() as launches:
        fuse.fuse_forward(FusePlan((TermPlan(), TermPlan()), (16, 16)), xs, [None, None], [None, None])
    return launches


def test_record_a_real_launcher_on_meta_tensors():
    try:
        launches = _record_real_fusion_launch()
    except (TypeError, ImportError, AttributeError) as exc:
        pytest.skip(f"the launcher's signature changed, adapt _record_real_fusion_launch: {exc}")
    assert launches, "the launcher made no launch"
    for launch in launches:
        assert launch.fn.fn.__module__.startswith("hrfast.kernels")
        assert launch.programs >= 1
        assert "*fp32" in repr(launch.specialization().signature)


# ------------------------------------------------------------------------------------------------ compiling


def _compile_tiny_for_both_targets() -> dict:
    """Run without TRITON_INTERPRET (as a script): the tiny kernel with 8 warps compiled for sm_90 and sm_80,
    twice each (the second from the cache)."""
    import re

    from hrfast.perf.compile import cache_dir, compile_launch

    (launch,) = _record_tiny(num_warps=8)
    report = {}
    for sm, gpu in ((90, A.H100), (80, A.A100)):
        compiled = compile_launch(launch, sm)
        kernel = parse_sass(compiled.sass)["_tiny_kernel"]
        report[sm] = {"registers": compiled.registers, "spills": [compiled.spill_stores, compiled.spill_loads],
                      "stack": compiled.stack, "shared": compiled.shared, "num_warps": compiled.num_warps,
                      "sass_target": re.search(r"code for (sm_\w+)", compiled.sass).group(1),
                      "loops": [dict(loop.counts) for loop in kernel.loops], "total": kernel.counts["total"],
                      "cached_equal": compile_launch(launch, sm) == compiled,
                      "launch_failure": launch_failure(gpu, compiled.registers, 32 * compiled.num_warps,
                                                       compiled.shared)}
    report["cache_files"] = len(list(cache_dir().glob("*.json")))
    return report


def test_compile_tiny_tuple_kernel_for_sm90_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HRFAST_PERF_CACHE=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for sm, target in (("90", "sm_90a"), ("80", "sm_80")):
        r = report[sm]
        assert r["sass_target"] == target
        assert 0 < r["registers"] <= 255 and r["spills"] == [0, 0] and r["stack"] == 0
        assert r["shared"] == 8 * 4  # tl.sum over 8 warps: one fp32 partial per warp through shared memory
        assert r["num_warps"] == 8
        assert any(any(k.startswith("LDG.") for k in loop) and loop.get("fp32", 0) > 0 for loop in r["loops"])
        assert r["cached_equal"] and r["launch_failure"] is None
    assert report["cache_files"] == 2


def test_compile_cuda_reports_each_kernel(tmp_path, monkeypatch):
    from hrfast.perf.compile import compile_cuda, cuda_home
    try:
        cuda_home()
    except FileNotFoundError:
        pytest.skip("no CUDA toolkit (nvcc)")
    monkeypatch.setenv("HRFAST_PERF_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "saxpy.cu"
    source.write_text(SAXPY_CU)
    (compiled,) = compile_cuda(str(source), sm=80).values()
    assert compiled.name == "_Z5saxpyifPKfPf" and compiled.sm == 80
    assert 0 < compiled.registers <= 255 and compiled.shared == 256 * 4  # the float tile[256]
    (loop,) = parse_sass(compiled.sass)[compiled.name].loops
    assert loop.counts["LDS"] == 1 and loop.counts["STS"] == 1 and loop.counts["fp32"] == 1
    assert list(compile_cuda(str(source), sm=80).values()) == [compiled]  # from the cache
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


if __name__ == "__main__":
    print(json.dumps(_compile_tiny_for_both_targets()))


# ------------------------------------------------------------------------------ inspect: recording a model

W18 = dict(model="hrnetv2_w18_seg", size=(64, 128), batch=2)


def _fusion_rows(model) -> int:
    """Fused output branches of every fusion module: one fuse forward launch each (at most 4 terms a row)."""
    from hrfast.hrnet.fusion import describe_hr_module
    layouts = [describe_hr_module(m) for m in model.modules()]
    return sum(layout.num_outputs for layout in layouts if layout is not None and not isinstance(layout, str))


@pytest.fixture(scope="module")
def w18_inference():
    from hrfast.perf.inspect import Config, build, record_run
    config = Config(**W18)
    return config, record_run(config), _fusion_rows(build(config)[0])


@pytest.fixture(scope="module")
def w18_training():
    from hrfast.perf.inspect import Config, record_run
    config = Config(**W18, mode="training")
    return config, record_run(config)


def _names(launches) -> dict:
    return {name: sum(l.name == name for l in launches) for name in {l.name for l in launches}}


def test_recording_a_patched_model_gives_one_fuse_launch_per_fused_branch(w18_inference):
    _, attribution, rows = w18_inference
    assert rows > 0
    assert _names(attribution.launches) == {"_fuse_forward_kernel": rows, "_head_forward_kernel": 1}
    fuse_calls = [c for c in attribution.calls if c.kind == "fuse"]
    (head,) = [c for c in attribution.calls if c.kind == "head"]
    assert len(fuse_calls) == rows
    for call in fuse_calls:
        assert [l.name for l in call.launches["forward"]] == ["_fuse_forward_kernel"]
        assert call.launches["backward"] == [] and call.ops["forward"] == []  # eval: BN folds cached
        assert len(call.plan.terms) == len(call.inputs)
    assert [l.name for l in head.launches["forward"]] == ["_head_forward_kernel"]
    assert (head.extra["M"], head.extra["K"]) == (270, 19)  # W18: 18+36+72+144 channels, 19 classes
    assert [s[1] for s in head.inputs] == [18, 36, 72, 144]
    assert any(op.name == "convolution" for op in head.ops["forward"])  # the projections W_j x_j


def test_recording_training_attributes_backward_launches_and_fold_ops(w18_training):
    _, attribution = w18_training
    for call in attribution.calls:
        if call.kind == "fuse":
            assert "var_mean" not in [op.name for op in call.ops["forward"]]
    # batch statistics: one launch of each BN kernel for all the folds of a fusion step, every row's; the step is
    # one autograd node (`hrfast.ops.fuse_step`) whose launches, every row's (one forward launch for all), sit
    # in its first row's call (`hrfast.perf.opcalls`); the step's other rows launch none
    from hrfast.kernels import batch_norm as batch_norm_kernels  # as hrfast imports it (not at the top: this
    # file also runs as a script, tests/test_perf.py, in a subprocess)
    steps = []
    for call in (c for c in attribution.calls if c.kind == "fuse"):
        forward = [l.name for l in call.launches["forward"]]
        backward = [l.name for l in call.launches["backward"]]
        if "_bn_stats_kernel" in forward:
            steps.append([call])
            assert forward.count("_bn_stats_kernel") == 1 and backward.count("_bn_backward_kernel") == 1
            assert forward.count("_bn_finalize_kernel") == (0 if batch_norm_kernels.MERGED_FINALIZE else 1)
            assert backward.count("_reduce_partials_kernel") == 1  # every row's per-channel sums
            assert forward.count("_fuse_forward_rows_kernel") == 1
        else:
            assert steps and not forward and not backward
            steps[-1].append(call)
    assert [len(step) for step in steps] == [2] + [3] * 4 + [4] * 3  # hrnet_w18: stages 2-4 of 1, 4, 3 modules
    for step in steps:
        stats = [l for l in step[0].launches["forward"] if l.name == "_bn_stats_kernel"]
        assert len(stats[0].params["terms"]) == sum(t.has_scale for call in step for t in call.plan.terms)
        backward = step[0].launches["backward"]
        names = [l.name for l in backward]
        # a row's phase-form terms in one `_adjoint_row_kernel` launch (two or more), the others one launch each;
        # W18 at 64x128 runs programs of fewer cells than threads, so its rows do not share one
        # `_adjoint_rows_kernel` launch (`ADJOINT_ROWS_MIN_CELLS`; W48's do: benchmarks/results/fusion_kernel)
        assert "_adjoint_rows_kernel" not in names
        rows = [l for l in backward if l.name == "_adjoint_row_kernel"]
        assert all(len(l.params["FH"]) >= 2 for l in rows)
        upsampled = sum(t.mode != 0 for call in step for t in call.plan.terms)
        assert names.count("_upsample_adjoint_kernel") + sum(len(l.params["FH"]) for l in rows) == upsampled
        (same,) = [l for l in backward if l.name == "_fuse_backward_same_kernel"]  # every row's, one launch
        assert len(same.params["rows"]) == sum(any(t.mode == 0 for t in call.plan.terms) for call in step)
        (forward,) = [l for l in step[0].launches["forward"] if l.name == "_fuse_forward_rows_kernel"]
        assert len(forward.params["rows"]) == len(step)
    (head,) = [c for c in attribution.calls if c.kind == "head"]
    backward = [l.name for l in head.launches["backward"]]
    assert [l.name for l in head.launches["forward"]] == ["_head_stats_kernel", "_head_forward_kernel"]
    # the reduce's patch dots and exact gathers; fp32's ds (written) and its exact gathers
    assert backward[:4] == ["_head_backward_reduce_kernel"] * 2 + ["_head_backward_ds_kernel"] * 2
    assert backward.count("_upsample_adjoint_kernel") == 3
    assert sum(op.name == "einsum" and op.flops > 0 for op in head.ops["backward"]) == 2
    assert sum(op.name == "convolution_backward" for op in head.ops["backward"]) == 3



def test_w48_stage4_training_step_shares_one_adjoint_launch():
    """W48's stage-4 step in training (bf16, b8 at 128x256 on meta tensors, as the patched model runs it): every
    upsampled term of rows 0-2 (x2 / x4 / x8, x2 / x4, x2) in one `_adjoint_rows_kernel` launch, row by row."""
    from hrfast.models import build_model
    from hrfast.nn.fusion import fusion_forward
    from hrfast.perf.opcalls import BACKWARD, recording
    from hrfast.plan import Resample

    with torch.device("meta"):
        model = build_model("hrnetv2_w48_seg")
    fuse = [m for m in model.modules() if getattr(m, "fuse_layers", None) is not None][-1]
    layers = fuse.fuse_layers.to(torch.bfloat16).train()
    xs = [torch.empty((8, c, 128 >> j, 256 >> j), dtype=torch.bfloat16, device="meta", requires_grad=True)
          for j, c in enumerate((48, 96, 192, 384))]
    with recording() as attribution:
        ys = fusion_forward(layers, xs, default=Resample("bilinear", align_corners=False), backend="triton")
        torch.autograd.backward(ys, [torch.empty_like(y) for y in ys])
    backward = [l for call in attribution.calls for l in call.launches[BACKWARD]]
    (adjoint,) = [l for l in backward if "adjoint" in l.name]
    assert adjoint.name == "_adjoint_rows_kernel"
    assert adjoint.params["FH"] == ((2, 4, 8), (2, 4), (2,))

def test_trip_count_table_covers_every_kernel():
    """Every kernel the launchers launch (`name[grid](...)`) has trip counts, or is listed as unknown."""
    import importlib
    import inspect as pyinspect
    import re

    from hrfast.perf import workload
    from hrfast.perf.record import is_kernel
    kernels = set()
    for module in ("hrfast.kernels.fuse", "hrfast.kernels.head", "hrfast.kernels.resample",
                   "hrfast.kernels.batch_norm"):
        mod = importlib.import_module(module)
        launched = set(re.findall(r"\b(\w+)\[", pyinspect.getsource(mod)))
        kernels |= {name for name, value in vars(mod).items() if is_kernel(value) and name in launched}
    assert kernels, "no kernel found: the launch pattern changed"
    assert kernels <= set(workload.KERNELS) | set(workload.UNKNOWN), kernels - set(workload.KERNELS)


# ------------------------------------------------------------------------------- inspect: the byte models


def test_eager_and_compile_models_on_a_hand_computed_row():
    from hrfast.perf import eager
    from hrfast.plan import FusePlan, TermPlan
    # y [1, 2, 4, 4] fp32 (32 elements) = ReLU(x [same] + Up(z [1, 2, 2, 2], 8 elements) * scale + shift)
    plan = FusePlan((TermPlan(), TermPlan(2, False, (1, 2), (1, 2), True, True)), (4, 4))
    inputs = [(1, 2, 4, 4), (1, 2, 2, 2)]
    ev = eager.eager_fuse(plan, inputs, torch.float32, training=False)
    assert [(o.name, o.bytes) for o in ev["forward"]] == [
        ("batch_norm", 4 * 16), ("upsample", 4 * 40), ("add", 4 * 96), ("relu", 4 * 64)]
    assert ev["backward"] == []
    cv = eager.compiled_fuse(plan, inputs, torch.float32, training=False)
    assert [(o.name, o.bytes) for o in cv["forward"]] == [("fused pointwise", 4 * (32 + 8 + 32))]
    et = eager.eager_fuse(plan, inputs, torch.bfloat16, training=True)
    assert [(o.name, o.bytes) for o in et["backward"]] == [
        ("threshold_backward", 2 * 96), ("zeros (upsample grad)", 2 * 8),
        ("upsample_backward (atomic scatter)", 2 * 40), ("batch_norm_backward", 2 * 24)]
    h100 = A.H100
    assert eager.seconds(h100, ev["forward"]) == pytest.approx(4 * 4e-6 + 4 * 216 / (0.87 * 3.35e12))


def test_eager_head_model_counts_the_concat_and_gemms():
    from hrfast.perf import eager
    inputs = [(1, 2, 4, 4), (1, 4, 2, 2), (1, 8, 1, 1)]  # 14 channels, 16 pixels
    ops = eager.eager_head(inputs, M=14, K=3, dtype=torch.float32, training=False)["forward"]
    assert [o.name for o in ops] == ["upsample", "upsample", "cat", "conv 15C->M", "batch_norm", "relu",
                                     "conv M->K (classifier)"]
    assert [o.bytes for o in ops[:3]] == [4 * (16 + 64), 4 * (8 + 128), 4 * 2 * 14 * 16]
    assert ops[3].flops == 2 * 16 * 14 * 14 and ops[6].flops == 2 * 16 * 14 * 3
    # fp32 GEMMs at 60% of the FMA peak (TF32 off), bf16 at 60% of the dense tensor-core peak
    assert eager.gemm_peak(A.H100, torch.float32) == pytest.approx(0.6 * 67e12)
    assert eager.gemm_peak(A.H100, torch.bfloat16) == pytest.approx(0.6 * 989e12)
    compiled = eager.compiled_head(inputs, M=14, K=3, dtype=torch.float32, training=False)["forward"]
    assert compiled[0].name == "upsample + cat (fused)" and compiled[0].bytes == 4 * (32 + 16 + 8 + 14 * 16)


def test_launch_bytes_count_each_tensor_once_and_stand_ins_as_nothing():
    from hrfast.perf.workload import footprint
    x = torch.empty(2, 3, 4, 5, device="meta")
    assert footprint(x) == 4 * 120 and footprint(x.to(memory_format=torch.channels_last)) == 4 * 120
    assert footprint(torch.empty((), device="meta").expand(2, 3, 4, 5)) == 4
    assert footprint(torch.empty(3, device="meta", dtype=torch.bfloat16)[:, None].expand(3, 7)) == 6
    (launch,) = _record_tiny()
    from hrfast.perf.workload import launch_bytes
    assert launch_bytes(launch) == 4 * 4000 + 2 * 4  # x (fp32) and y (bf16), each once


# -------------------------------------------------------------------- inspect: analysis with a fake compiler

_FAKE_SASS = """
        Function : {name}
        /*0000*/                   S2R R0, SR_CTAID.X ;
        /*0010*/                   LDG.E.128 R4, [R2.64] ;
{loops}        /*0f00*/                   STG.E.128 [R2.64], R4 ;
        /*0f10*/                   EXIT ;
        /*0f20*/                   BRA 0xf20;
"""
_FAKE_LOOP = """        /*{a:04x}*/                   FFMA R4, R4, R5, R6 ;
        /*{b:04x}*/               @P0 BRA 0x{a:x} ;
"""


def _fake_compile(loops: dict):
    """A compile_fn: every kernel 40 registers, no spills, 4 warps, a SASS with `loops[name]` nested loops."""
    from hrfast.perf.compile import Compiled

    def compile_fn(launch, sm):
        n = 0 if launch.params.get("PH") else loops.get(launch.name, 0)  # the adjoint's phase form: no loop
        # nested: outer loop from 0x100 to 0x900, inner from 0x200 to 0x800, ...
        body = "".join(_FAKE_LOOP.format(a=0x100 * (k + 1), b=0x900 - 0x100 * k) for k in range(n))
        return Compiled(launch.name, sm, 40, 0, 0, 0, 1024, 4, _FAKE_SASS.format(name=launch.name, loops=body))
    return compile_fn


def test_analyse_with_a_fake_compiler(w18_training):
    from hrfast.perf.inspect import analyse
    from hrfast.perf.report import markdown, terminal
    config, attribution = w18_training
    loops = {"_upsample_adjoint_kernel": 2, "_head_stats_kernel": 2, "_head_forward_kernel": 2}
    # _head_backward_reduce_kernel gets no loop though the table expects one: "trip counts unknown"
    report = analyse(config, attribution, [A.H100, A.A100], compile_fn=_fake_compile(loops), cuda_fn=None)
    assert report["header"].startswith("Predictions") and "not measurements" in report["header"]
    h100 = report["archs"]["H100 SXM"]
    by_kernel = {}
    for row in h100["variants"]:
        by_kernel.setdefault(row["kernel"], []).append(row)
        assert row["predicted_s"] > 4e-6 * row["launches"] and row["bytes"] > 0
        assert row["registers"] == 40 and row["warps_per_sm"] == 48 and row["launch_failure"] is None
    reduce_rows = by_kernel["_head_backward_reduce_kernel"]  # the patch dots, the exact gathers
    assert [r["launches"] for r in reduce_rows] == [1, 1]
    assert all(r["warp_instructions"] is None and "trip counts unknown" in r["notes"][0] for r in reduce_rows)
    assert all(r["warp_instructions"] > 0 for r in by_kernel["_upsample_adjoint_kernel"])
    (stats,) = by_kernel["_head_stats_kernel"]
    # the patch-dot loop over ceil(270 / 64) channel chunks (recorded without limits: the first candidate, sm_90's
    # transposed fp32 chunk); fp32 as 3xTF32 splits at the TF32 peak
    assert stats["main_loop"]["trips_per_program"] == 5 and stats["dot_unit"] == "tf32"
    ops = h100["op_calls"]
    assert sum(r["calls"] for r in ops) == len(attribution.calls)
    for row in ops:
        # a training step's rows after its first: their launches are the step's, in its first row's call
        if row["hrfast_s"] == 0:
            assert row["kind"] == "fuse" and row["ratio_eager"] is None and row["ratio_compile"] is None
        else:
            assert row["hrfast_s"] > 0 and row["ratio_eager"] > 0 and row["ratio_compile"] > 0
        assert set(row["eager_s"]) == {"forward", "backward"} and sum(row["eager_s"].values()) > 0
    assert any(row["hrfast_s"] == 0 for row in ops) and all(row["hrfast_s"] > 0 for row in ops if row["kind"] == "head")
    totals = h100["totals"]["all"]
    assert totals["hrfast_s"] == pytest.approx(sum(r["calls"] * r["hrfast_s"] for r in ops))
    assert report["archs"]["A100 SXM 80GB"]["sm"] == 80
    assert "not measurements" in markdown(report) and "Op calls" in terminal(report)
    json.dumps(report, default=str)


def test_grouped_launch_issues_each_terms_code_once(w18_training):
    # a grouped batch-norm launch holds one copy of the term code per term; a warp runs its own term's only
    from hrfast.perf.inspect import kernel_cost, term_launches
    _, attribution = w18_training
    backward = [l for l in attribution.launches if l.name == "_bn_backward_kernel"]  # no loop: straight-line only
    grouped = next(l for l in backward if len(l.params["terms"]) > 1)
    k = len(grouped.params["terms"])
    terms = term_launches(grouped)
    assert len(terms) == k and sum(t.programs for t in terms) == grouped.programs
    for i, term in enumerate(terms):
        assert len(term.params["terms"]) == 1 and term.params["terms"][0][-2:] == (0, term.programs)
        assert term.params["BLOCK_P"] == (grouped.params["BLOCK_P"][i],)
        assert term.options == grouped.options and term_launches(term) is None

    def compile_fn(launch, sm):  # straight-line code: 8 FFMAs per term held by the binary
        from hrfast.perf.compile import Compiled
        body = "".join(f"        /*{0x100 + 0x10 * i:04x}*/                   FFMA R4, R4, R5, R6 ;\n"
                       for i in range(8 * len(launch.params["terms"])))
        return Compiled(launch.name, sm, 40, 0, 0, 0, 1024, 4, _FAKE_SASS.format(name=launch.name, loops=body))

    one = parse_sass(compile_fn(terms[0], 90).sass)["_bn_backward_kernel"].counts["total"]
    whole = parse_sass(compile_fn(grouped, 90).sass)["_bn_backward_kernel"].counts["total"]
    assert whole == one + 8 * (k - 1)
    cost = kernel_cost(A.H100, grouped, compile_fn(grouped, 90), compile_fn)
    assert cost["warp_instructions"] == pytest.approx(one * grouped.warps)


# ----------------------------------------------------------------------------------------- inspect: the CLI


def test_inspect_cli_help_and_errors(capsys):
    from hrfast.perf.inspect import main, parse_args
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0 and "--arch" in capsys.readouterr().out
    for bad, message in ((["--arch", "v100"], "unknown architecture"), (["--mode", "fast"], "invalid choice"),
                         (["--batch", "0"], "must be positive"), (["--model", "resnet50"], "invalid choice")):
        with pytest.raises(SystemExit) as exit_bad:
            parse_args(bad)
        assert exit_bad.value.code == 2 and message in capsys.readouterr().err
    args = parse_args(["--arch", "sm_80", "h200", "--dtype", "bf16", "--mode", "training"])
    assert [a.name for a in args.archs] == ["A100 SXM 80GB", "H200"]
    if os.environ.get("TRITON_INTERPRET") == "1":  # the test session interprets: inspect refuses to compile
        assert main([]) == 2 and "without TRITON_INTERPRET" in capsys.readouterr().err


def test_hrfast_main_lists_inspect(capsys):
    from hrfast.__main__ import main
    assert main(["--help"]) == 0 and "inspect" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- calibrate (CPU part)


def _calibrate_module(monkeypatch):
    import importlib.util
    path = Path(__file__).parents[1] / "benchmarks" / "calibrate.py"
    spec = importlib.util.spec_from_file_location("hrfast_calibrate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "DEVICE", "cpu")
    return module


@pytest.mark.parametrize("fixture", ["w18_inference", "w18_training"])
def test_calibrate_builds_every_recorded_op_call(fixture, request, monkeypatch):
    """The calls calibrate.py times on a GPU, built from the recording and run once on CPU (reference)."""
    from hrfast.perf.inspect import op_rows
    calibrate = _calibrate_module(monkeypatch)
    config, attribution = request.getfixturevalue(fixture)[:2]
    for calls in op_rows(attribution.calls):
        make = calibrate.fuse_runner if calls[0].kind == "fuse" else calibrate.head_runner
        make(calls[0], config.training, config.channels_last)("reference")()
    row = {"kind": "fuse", "kernels_s": {"forward": 1.0, "backward": 2.0}, "glue_s": {"forward": 8.0},
           "glue_in_op_s": {"forward": 0.5, "backward": 0.25}}
    assert calibrate.predicted_op_s(row) == 3.75  # the fold's ATen ops are not in what is timed
    assert calibrate.predicted_op_s({**row, "kind": "head"}) == 11.0


def test_calibrate_says_it_needs_a_gpu(monkeypatch, capsys, tmp_path):
    calibrate = _calibrate_module(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert calibrate.main([str(tmp_path / "report.json")]) == 2
    assert "CUDA GPU" in capsys.readouterr().err
