"""The fusion step of one HRNet output branch, fused: y = ReLU(sum_k Up_k(x_k * scale_k + shift_k)).

Layers: `fuse` (functional API: validation, backend dispatch) -> `FuseFunction` (thin autograd Function)
-> `hrfast.kernels.fuse` launchers. The plain PyTorch reference is `hrfast.ops.reference.fuse_ref`.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._backend import resolve_backend
from .reference import fuse_ref
from .resample import Resample, as_resample

_SAME, _NEAREST, _BILINEAR = 0, 1, 2  # = hrfast.kernels.fuse.SAME / NEAREST / BILINEAR (not imported: lazy triton)


class TermPlan(NamedTuple):
    """What the kernels need to know about one term besides its tensors."""

    mode: int
    align_corners: bool
    ratio_h: Tuple[int, int]
    ratio_w: Tuple[int, int]


class FusePlan(NamedTuple):
    terms: Tuple[TermPlan, ...]
    size: Tuple[int, int]
    relu: bool
    channels_last: bool
    backend: str = "triton"  # which launchers run it: see `_launchers`


def _launchers(backend: str):
    """The module with `Term`, `fuse_forward` and `fuse_backward` for a concrete backend (imported lazily)."""
    if backend == "triton":
        from hrfast.kernels import fuse as launchers
    else:
        raise ValueError(f"no fused launchers for backend {backend!r}")
    return launchers


def _term_plan(resample: Optional[Resample], in_hw: Tuple[int, int], size: Tuple[int, int]) -> TermPlan:
    if resample is None or tuple(in_hw) == tuple(size):  # same size: F.interpolate copies
        return TermPlan(_SAME, False, (1, 1), (1, 1))
    mode = _NEAREST if resample.mode == "nearest" else _BILINEAR
    ratio_h = tuple(resample.axis_ratio(0, in_hw[0], size[0]))
    ratio_w = tuple(resample.axis_ratio(1, in_hw[1], size[1]))
    return TermPlan(mode, resample.corners_aligned, ratio_h, ratio_w)


class FuseFunction(torch.autograd.Function):
    """Autograd over the fused launchers. Inputs: the plan, then (x, scale, shift) per term, None allowed."""

    @staticmethod
    def forward(ctx, plan: FusePlan, *flat: Optional[Tensor]) -> Tensor:
        terms = _kernel_terms(plan, flat)
        fmt = torch.channels_last if plan.channels_last else torch.contiguous_format
        y = _launchers(plan.backend).fuse_forward(terms, plan.size, relu=plan.relu, memory_format=fmt)
        ctx.plan = plan
        # keep only what backward reads: y for the ReLU mask, x_k where its scale needs a gradient
        kept = []
        for k in range(len(plan.terms)):
            x, scale, shift = flat[3 * k:3 * k + 3]
            needs_x = scale is not None and ctx.needs_input_grad[2 + 3 * k]
            kept += [x if needs_x else None, scale, shift]
        ctx.save_for_backward(y if plan.relu else None, *kept)
        ctx.shapes = [flat[3 * k].shape for k in range(len(plan.terms))]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        y, *kept = ctx.saved_tensors
        plan = ctx.plan
        needs = [tuple(ctx.needs_input_grad[1 + 3 * k:4 + 3 * k]) for k in range(len(plan.terms))]
        # x is only read for d(scale); when it was not kept, a strided stand-in gives the kernels its shape
        for k, shape in enumerate(ctx.shapes):
            if kept[3 * k] is None:
                kept[3 * k] = grad_y.new_empty(()).expand(shape)
        terms = _kernel_terms(plan, kept)
        grads = _launchers(plan.backend).fuse_backward(grad_y, y, terms, needs, relu=plan.relu)
        return (None, *[g for term_grads in grads for g in term_grads])


def _kernel_terms(plan: FusePlan, flat: Sequence[Optional[Tensor]]):
    Term = _launchers(plan.backend).Term
    return [Term(flat[3 * k], flat[3 * k + 1], flat[3 * k + 2], p.mode, p.align_corners, p.ratio_h, p.ratio_w)
            for k, p in enumerate(plan.terms)]


def fuse(
    inputs: Sequence[Tensor],
    *,
    scales: Optional[Sequence[Optional[Tensor]]] = None,
    shifts: Optional[Sequence[Optional[Tensor]]] = None,
    resample: Optional[Sequence[Optional[object]]] = None,
    size: Optional[Tuple[int, int]] = None,
    relu: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Fused HRNet fusion step: ``ReLU(sum_k Up_k(inputs[k] * scales[k] + shifts[k]))`` in one pass.

    Args:
        inputs: tensors [N, C, H_k, W_k] of one floating dtype on one device (NCHW or channels_last).
        scales, shifts: per term a [C] tensor or None; a per-channel affine map (e.g. BN) applied to the term
            at its own resolution. Their dtype may differ from the inputs' (fp32 BN parameters with bf16
            activations); the math runs in fp32 (fp64 for fp64 inputs).
        resample: per term None (the term is at the output size already) or how it is upsampled to the
            output size: a `hrfast.ops.Resample` or a mode string ('nearest' or 'bilinear'), with
            `F.interpolate`'s exact semantics.
        size: the output (H, W); needed only when every term is resampled.
        relu: apply ReLU to the sum (HRNet always does).
        backend: "auto" (Triton for CUDA tensors, else the PyTorch reference), "triton" or "reference".

    Returns:
        y [N, C, H, W] in the inputs' dtype, channels_last when the first output-size input is.

    Gradients flow to every input, scale and shift; the Triton backward is deterministic (no atomics).
    """
    inputs, scales, shifts, resamples, size = _validate(inputs, scales, shifts, resample, size)
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    impl = resolve_backend(backend, inputs[0].device)
    if impl == "reference" or inputs[0].numel() == 0:
        return fuse_ref(inputs, scales, shifts, resamples, size, relu)
    plans = tuple(_term_plan(r, x.shape[2:], size) for x, r in zip(inputs, resamples))
    same_size = [x for x, p in zip(inputs, plans) if p.mode == _SAME]
    layout_ref = same_size[0] if same_size else inputs[0]
    channels_last = layout_ref.dim() == 4 and layout_ref.shape[1] > 1 and layout_ref.stride(1) == 1
    plan = FusePlan(plans, tuple(size), relu, channels_last, impl)
    flat: List[Optional[Tensor]] = []
    for x, s, b in zip(inputs, scales, shifts):
        # the kernels index per-channel vectors densely; a strided or expanded view is copied (autograd-safe)
        flat += [x, s.contiguous() if s is not None else None, b.contiguous() if b is not None else None]
    return FuseFunction.apply(plan, *flat)


# --------------------------------------------------------------------------------------------- validation


def _per_term(value, name: str, n: int) -> list:
    if value is None:
        return [None] * n
    if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list with one entry per input (None allowed), got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries but there are {n} inputs")
    return list(value)


def _validate(inputs, scales, shifts, resample, size):
    if isinstance(inputs, Tensor) or not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs must be a list or tuple of tensors, got {type(inputs).__name__}")
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one tensor")
    for k, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs[{k}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"inputs[{k}] must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"inputs[{k}] has dtype {x.dtype}; expected float16, bfloat16, float32 or float64")
    x0 = inputs[0]
    for k, x in enumerate(inputs[1:], start=1):
        if x.dtype != x0.dtype:
            raise TypeError(f"inputs[{k}] has dtype {x.dtype} but inputs[0] has {x0.dtype}; all inputs share a dtype")
        if x.device != x0.device:
            raise ValueError(f"inputs[{k}] is on {x.device} but inputs[0] is on {x0.device}")
        if x.shape[0] != x0.shape[0]:
            raise ValueError(f"inputs[{k}] has batch {x.shape[0]} but inputs[0] has {x0.shape[0]}")
        if x.shape[1] != x0.shape[1]:
            raise ValueError(f"inputs[{k}] has {x.shape[1]} channels but inputs[0] has {x0.shape[1]}; "
                             "every term must already have the output branch's channels")
    if x0.shape[0] > 65535:  # the kernels' grid has one z-slice per image; CUDA caps grid z at 65535
        raise ValueError(f"inputs have batch {x0.shape[0]}; the fused op supports at most 65535 images per call")
    n, C = len(inputs), x0.shape[1]
    scales = _per_term(scales, "scales", n)
    shifts = _per_term(shifts, "shifts", n)
    for name, params in (("scales", scales), ("shifts", shifts)):
        for k, p in enumerate(params):
            if p is None:
                continue
            if not isinstance(p, Tensor):
                raise TypeError(f"{name}[{k}] must be a tensor or None, got {type(p).__name__}")
            if not p.is_floating_point():
                raise TypeError(f"{name}[{k}] has dtype {p.dtype}; expected a floating dtype")
            if p.dim() != 1 or p.shape[0] != C:
                raise ValueError(f"{name}[{k}] must have shape [{C}] (one value per channel), got {tuple(p.shape)}")
            if p.device != x0.device:
                raise ValueError(f"{name}[{k}] is on {p.device} but the inputs are on {x0.device}")
    resamples = [as_resample(r, f"resample[{k}]") for k, r in enumerate(_per_term(resample, "resample", n))]
    size = _output_size(inputs, resamples, size)
    for k, (x, r) in enumerate(zip(inputs, resamples)):
        in_hw = tuple(x.shape[2:])
        if r is None:
            if in_hw != size:
                raise ValueError(f"inputs[{k}] is {in_hw[0]}x{in_hw[1]} but the output is {size[0]}x{size[1]}; "
                                 f"give resample[{k}] to upsample it")
            continue
        if in_hw[0] > size[0] or in_hw[1] > size[1]:
            raise ValueError(f"inputs[{k}] is {in_hw[0]}x{in_hw[1]}, larger than the output {size[0]}x{size[1]}: "
                             "the fusion only upsamples")
        if min(in_hw) == 0:
            raise ValueError(f"inputs[{k}] has an empty spatial size {in_hw}; F.interpolate cannot resize it")
        produced = r.output_size(in_hw)
        if produced is not None and produced != size:
            raise ValueError(f"resample[{k}] with scale_factor={r.scale_factor} turns {in_hw[0]}x{in_hw[1]} into "
                             f"{produced[0]}x{produced[1]}, not the output size {size[0]}x{size[1]}; use "
                             "scale_factor=None to resize to the exact size")
        if size[0] * size[1] >= 2**31:
            raise ValueError(f"output size {size} has 2**31 or more pixels per channel; not supported")
    return list(inputs), scales, shifts, resamples, size


def _output_size(inputs, resamples, size) -> Tuple[int, int]:
    if size is not None:
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
            raise TypeError(f"size must be a pair of ints (H, W), got {size!r}")
        if min(size) < 1:
            raise ValueError(f"size must be positive, got {tuple(size)}")
        return tuple(size)
    same = [tuple(x.shape[2:]) for x, r in zip(inputs, resamples) if r is None]
    if not same:
        raise ValueError("size is required when every input has a resample")
    return same[0]
