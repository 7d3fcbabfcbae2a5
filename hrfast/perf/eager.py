"""What the fused ops replace, as lists of ATen-like ops, and the one cost rule for every op that is not a
hrfast kernel (../shared/PERF_METHOD.md, "Eager's cost for the same work").

Cost rule (`op_seconds`): each op reads its inputs and writes its output once at the achievable HBM bandwidth,
plus one launch (4 us); convolutions and GEMMs run at `CONV_TENSOR_EFFICIENCY` (60%) of the peak of their
dtype's math (bf16/fp16: dense tensor cores; fp32: the FMA peak, TF32 off as in `python -m hrfast bench`),
whichever bound is larger. Per-channel vectors (BN's parameters and statistics) are left out of the bytes.

Eager (`eager_fuse`, `eager_head`): the ops of the unpatched official forward, one per ATen call.
- fusion row y = ReLU(sum_k Up_k(BN_k(z_k))): each folded BN at its term's resolution (training: also
  `num_batches_tracked += 1`), each upsample (reads the low-resolution term, writes the full one), the T - 1
  out-of-place adds, the ReLU. Backward (training): ReLU's backward, BN's backward per BN term (reads grad and
  input, writes grad), and per upsampled term the upsample's backward as ATen runs it, a scatter: a zero fill
  of the low-resolution gradient, then one pass reading the full-resolution gradient and adding into the
  low-resolution one with atomics (counted as one write of it: the atomics resolve in L2; the slowness of
  fp16/bf16 atomics, pytorch issue 48163, is not modelled). The adds' backward is free (gradients pass through).
- head: the three upsamples, the cat (reads the four branches, writes the 15C-channel tensor), the 15C->M conv,
  BN, ReLU, the M->K classifier. Backward: the classifier's and the conv's input and weight GEMMs and bias
  reductions, ReLU's and BN's backward, and per upsampled branch a contiguous copy of its slice of the concat
  gradient (ATen's upsample backward makes grad_output contiguous) and the scatter as above.

torch.compile (`compiled_fuse`, `compiled_head`), what inductor generates at best:
- fusion row: one fused pointwise kernel moving the compulsory bytes (every term once, y once); training adds
  a statistics reduction per BN term in forward, and in backward one reduction and one pointwise pass at the
  output size (grad_y, y, the output-size terms), per upsampled term the atomic scatter (zero fill + one pass)
  and BN's backward at its resolution (a reduction and a pointwise pass).
- head: upsample + cat fused into one kernel writing the concat, the conv through cuBLAS, BN + ReLU fused (a
  statistics reduction first in training), the classifier conv; backward: the GEMMs as eager, BN + ReLU's
  backward as a reduction and a pointwise pass, the concat gradient's slices scattered into the branches.

Eager's and torch.compile's kernels are costed by bytes and GEMM FLOPs only (their SASS is not compiled here):
where an hrfast kernel is issue-bound, its ratio to them compares it with memory-bound ideals.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Sequence, Tuple

import torch

from .arch import CONV_TENSOR_EFFICIENCY, LAUNCH_SECONDS, Arch
from .opcalls import AtenOp

Shape = Tuple[int, ...]


def gemm_peak(arch: Arch, dtype: torch.dtype) -> float:
    """FLOP/s of a conv or GEMM in `dtype` at the model's efficiency."""
    dense = arch.tensor_bf16_flops if dtype in (torch.bfloat16, torch.float16) else arch.fma_fp32_flops
    return CONV_TENSOR_EFFICIENCY * dense


def op_seconds(arch: Arch, op: AtenOp) -> float:
    return max(op.bytes / arch.achievable_hbm_bytes_per_s, op.flops / gemm_peak(arch, op.dtype)) + LAUNCH_SECONDS


def seconds(arch: Arch, ops: Iterable[AtenOp]) -> float:
    return sum(op_seconds(arch, op) for op in ops)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


class _Ops:
    """Builds an op list: sizes in elements of one dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.size = torch.empty((), dtype=dtype).element_size()
        self.ops: List[AtenOp] = []

    def add(self, name: str, elements: float, flops: float = 0.0) -> None:
        self.ops.append(AtenOp(name, int(elements * self.size), flops, self.dtype))


# --------------------------------------------------------------------------------------------- fusion row


def _fuse_terms(plan, inputs: Sequence[Shape]) -> Tuple[int, list]:
    """(output elements, [(term elements, upsampled, has BN)])."""
    n, c = inputs[0][:2]
    out = n * c * plan.size[0] * plan.size[1]
    return out, [(_numel(shape), t.mode != 0, t.has_scale) for shape, t in zip(inputs, plan.terms)]


def eager_fuse(plan, inputs: Sequence[Shape], dtype: torch.dtype, training: bool) -> dict:
    """{"forward": ops, "backward": ops} of the eager fusion row (see the module docstring)."""
    out, terms = _fuse_terms(plan, inputs)
    fwd, bwd = _Ops(dtype), _Ops(dtype)
    for e, up, bn in terms:
        if bn:
            if training:
                fwd.add("num_batches_tracked.add_", 0)
            fwd.add("batch_norm", 2 * e)
        if up:
            fwd.add("upsample", e + out)
    for _ in terms[1:]:
        fwd.add("add", 3 * out)
    fwd.add("relu", 2 * out)
    if training:
        bwd.add("threshold_backward", 3 * out)
        for e, up, bn in terms:
            if up:
                bwd.add("zeros (upsample grad)", e)
                bwd.add("upsample_backward (atomic scatter)", out + e)
            if bn:
                bwd.add("batch_norm_backward", 3 * e)
    return {"forward": fwd.ops, "backward": bwd.ops}


def compiled_fuse(plan, inputs: Sequence[Shape], dtype: torch.dtype, training: bool) -> dict:
    """{"forward": ops, "backward": ops} of what torch.compile would generate for the row at best."""
    out, terms = _fuse_terms(plan, inputs)
    fwd, bwd = _Ops(dtype), _Ops(dtype)
    if training:
        for e, _, bn in terms:
            if bn:
                fwd.add("BN statistics (reduction)", e)
    fwd.add("fused pointwise", sum(e for e, _, _ in terms) + out)
    if training:
        same = sum(e for e, up, bn in terms if not up and bn)
        dx_same = sum(e for e, up, _ in terms if not up)
        bwd.add("fused reduction (output size)", 2 * out + same)
        bwd.add("fused pointwise (output size)", 2 * out + same + dx_same)
        for e, up, bn in terms:
            if up:
                bwd.add("zeros (scatter target)", e)
                bwd.add("atomic scatter (upsample backward)", 2 * out + e)
                if bn:
                    bwd.add("BN backward reduction", 2 * e)
                    bwd.add("BN backward pointwise", 3 * e)
    return {"forward": fwd.ops, "backward": bwd.ops}


# ------------------------------------------------------------------------------------------------- head


def _head_sizes(inputs: Sequence[Shape]) -> Tuple[int, int, List[int], List[int]]:
    """(N*H*W at x0's resolution, total channels, per-branch channels, per-branch low-resolution elements)."""
    n, _, h, w = inputs[0]
    return n * h * w, sum(s[1] for s in inputs), [s[1] for s in inputs], [_numel(s) for s in inputs]


def eager_head(inputs: Sequence[Shape], M: int, K: int, dtype: torch.dtype, training: bool) -> dict:
    """{"forward": ops, "backward": ops} of the eager concat head (see the module docstring)."""
    pix, C, widths, lows = _head_sizes(inputs)
    fwd, bwd = _Ops(dtype), _Ops(dtype)
    for c, e in zip(widths[1:], lows[1:]):
        fwd.add("upsample", e + c * pix)
    fwd.add("cat", 2 * C * pix)
    fwd.add("conv 15C->M", (C + M) * pix, 2.0 * pix * C * M)
    if training:
        fwd.add("num_batches_tracked.add_", 0)
    fwd.add("batch_norm", 2 * M * pix)
    fwd.add("relu", 2 * M * pix)
    fwd.add("conv M->K (classifier)", (M + K) * pix, 2.0 * pix * M * K)
    if training:
        bwd.add("classifier grad input (GEMM)", (K + M) * pix, 2.0 * pix * M * K)
        bwd.add("classifier grad weight (GEMM)", (K + M) * pix, 2.0 * pix * M * K)
        bwd.add("classifier grad bias", K * pix)
        bwd.add("threshold_backward", 3 * M * pix)
        bwd.add("batch_norm_backward", 3 * M * pix)
        bwd.add("conv grad input (GEMM)", (M + C) * pix, 2.0 * pix * C * M)
        bwd.add("conv grad weight (GEMM)", (M + C) * pix, 2.0 * pix * C * M)
        bwd.add("conv grad bias", M * pix)
        for c, e in zip(widths[1:], lows[1:]):
            bwd.add("contiguous (concat grad slice)", 2 * c * pix)
            bwd.add("zeros (upsample grad)", e)
            bwd.add("upsample_backward (atomic scatter)", c * pix + e)
    return {"forward": fwd.ops, "backward": bwd.ops}


def compiled_head(inputs: Sequence[Shape], M: int, K: int, dtype: torch.dtype, training: bool) -> dict:
    """{"forward": ops, "backward": ops} of what torch.compile would generate for the head at best."""
    pix, C, widths, lows = _head_sizes(inputs)
    fwd, bwd = _Ops(dtype), _Ops(dtype)
    fwd.add("upsample + cat (fused)", sum(lows) + C * pix)
    fwd.add("conv 15C->M (cuBLAS)", (C + M) * pix, 2.0 * pix * C * M)
    if training:
        fwd.add("BN statistics (reduction)", M * pix)
    fwd.add("BN + ReLU (fused)", 2 * M * pix)
    fwd.add("conv M->K (classifier)", (M + K) * pix, 2.0 * pix * M * K)
    if training:
        bwd.add("classifier grad input (GEMM)", (K + M) * pix, 2.0 * pix * M * K)
        bwd.add("classifier grad weight + bias (GEMM)", (K + M) * pix, 2.0 * pix * M * K)
        bwd.add("BN + ReLU backward reduction", 3 * M * pix)
        bwd.add("BN + ReLU backward pointwise", 4 * M * pix)
        bwd.add("conv grad input (GEMM)", (M + C) * pix, 2.0 * pix * C * M)
        bwd.add("conv grad weight + bias (GEMM)", (M + C) * pix, 2.0 * pix * C * M)
        for c, e in zip(widths[1:], lows[1:]):
            bwd.add("zeros (scatter target)", e)
            bwd.add("atomic scatter (upsample backward)", c * pix + e)
    return {"forward": fwd.ops, "backward": bwd.ops}
