"""The CUDA C++ fusion kernels (csrc/, backend "cuda_cpp") for the same fusion op calls, modelled.

Their launches are made by C++ (csrc/fuse_launchers.h), so they are derived here from each recorded op call's
plan and shapes, following csrc/README.md's thread mapping: blocks of 32 x 8 threads over a [channels x
pixels] tile of one image (32 along the contiguous dimension), one output element per thread, grid z = image;
forward: one launch per 8 terms; backward (training): one launch for the output-size terms (dx_k = g * scale_k,
block reductions for dscale / dshift), and one per upsampled term gathering its window of grad_y (masked by
y > 0 on the fly: grad_y and y are read, no g buffer). Compulsory bytes are counted as for the Triton kernels
(each tensor once). The kernels are compiled with nvcc for the target (`compile.compile_cuda`, the extension's
own flags); their trip counts are `workload.CUDA_KERNELS`'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from .opcalls import OpCall

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "fuse_cuda.cu"
BLOCK_X, BLOCK_Y, MAX_TERMS = 32, 8, 8  # csrc/fuse_kernels.h kBX, kBY, kMaxTerms

# the template arguments <scalar_t, acc_t> as they appear in the mangled kernel names
_MANGLED_TYPES = {torch.float32: "IffEE", torch.float64: "IddEE", torch.bfloat16: "IN3c108BFloat16EfEE",
                  torch.float16: "IN3c104HalfEfEE"}


@dataclass
class CudaLaunch:
    """One modelled launch: the kernel struct, its grid's warps, compulsory bytes and the trip-table params."""

    kernel: str  # ForwardKernel, BackwardSameKernel, AdjointKernel
    phase: str
    warps: int
    bytes: int
    params: Dict[str, int]


def mangled_name(names: Sequence[str], kernel: str, dtype: torch.dtype) -> str:
    """The compiled kernel of struct `kernel` for `dtype` among nvcc's (mangled) names."""
    token = kernel + _MANGLED_TYPES[dtype]
    matches = [n for n in names if token in n]
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} compiled kernels match {token}: csrc changed, update cuda_cpp.py")
    return matches[0]


def _warps(channels_last: bool, C: int, pixels: int, N: int) -> int:
    """fuse_launchers.h grid_for: blocks of 8 warps."""
    along_pixels = BLOCK_Y if channels_last else BLOCK_X
    along_channels = BLOCK_X if channels_last else BLOCK_Y
    return math.ceil(pixels / along_pixels) * math.ceil(C / along_channels) * N * (BLOCK_X * BLOCK_Y // 32)


def _window(ratio, mode: int, align: bool, n_out: int) -> int:
    """fuse_launch.h window(): the adjoint's gather length along one axis."""
    num, den = ratio
    if num == 1 and den & (den - 1) == 0 and not (mode == 2 and align):
        return den if mode == 1 else 2 * den
    r = num / den
    if r <= 0:
        return n_out
    return int(min(n_out + 2, math.ceil((1 / r if mode == 1 else 2 / r)) + 5))


def launches(call: OpCall, training: bool) -> List[CudaLaunch]:
    """The CUDA launches of one fusion op call (forward; with `training` also backward, every gradient)."""
    plan, shapes = call.plan, call.inputs
    size = torch.empty((), dtype=call.dtype).element_size()
    N, C = shapes[0][:2]
    H, W = plan.size
    out = N * C * H * W
    cl = plan.channels_last
    warps = _warps(cl, C, H * W, N)
    terms = list(zip(shapes, plan.terms))
    result = []
    for start in range(0, len(terms), MAX_TERMS):
        group = terms[start:start + MAX_TERMS]
        elems = sum(math.prod(s) for s, _ in group) + out * (2 if start else 1)
        result.append(CudaLaunch("ForwardKernel", "forward", warps, elems * size,
                                 dict(count=len(group), elements=out)))
    if training:
        result += _backward(terms, N, C, H, W, cl, out, size)
    return result


def _backward(terms, N, C, H, W, cl, out, size) -> List[CudaLaunch]:
    same = [(s, t) for s, t in terms if t.mode == 0]
    result = []
    if same:
        dscale = sum(t.has_scale for _, t in same)
        slots = dscale + any(t.has_shift for _, t in same)
        elems = 2 * out + out * (len(same) + dscale)  # grad_y, y, every dx_k, x_k for dscale
        result.append(CudaLaunch("BackwardSameKernel", "backward", _warps(cl, C, H * W, N), elems * size,
                                 dict(count=len(same), slots=slots, elements=out)))
    for shape, t in terms:
        if t.mode == 0:
            continue
        e = math.prod(shape)
        elems = 2 * out + e * (2 if t.has_scale else 1)  # grad_y, y, dz, z for dscale
        result.append(CudaLaunch("AdjointKernel", "backward", _warps(cl, C, shape[2] * shape[3], N), elems * size,
                                 dict(k_h=_window(t.ratio_h, t.mode, t.align_corners, H),
                                      k_w=_window(t.ratio_w, t.mode, t.align_corners, W), elements=e)))
    return result


def compile_flags() -> List[str]:
    """The flags the extension is built with (hrfast._cuda.build), torch's includes first."""
    from .._cuda.build import compile_flags as build_flags
    from .compile import torch_extension_flags
    return [*torch_extension_flags(), *build_flags(True)[1]]
