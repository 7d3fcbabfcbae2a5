"""The fusion step of one HRNet output branch, fused: y = ReLU(sum_k Up_k(x_k * scale_k + shift_k)).

`fuse` validates its arguments, builds the call's `hrfast.plan.FusePlan` (cached), lets the backend registry
pick the implementation (`hrfast.backends.choose`) and runs it: the plain PyTorch reference
(`hrfast.ops.reference.fuse_ref`), or the custom op `hrfast::fuse_forward` (`hrfast.ops.custom_ops`) over the
Triton or CUDA C++ launchers.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _autotune, backends
from ..plan import FusePlan, as_resample, fuse_plan
from . import custom_ops
from .reference import fuse_ref


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
        backend: "auto", "triton", "cuda_cpp" (alias "cuda") or "reference": see `hrfast.backends`.

    Returns:
        y [N, C, H, W] in the inputs' dtype, channels_last when the first output-size input is.

    Gradients flow to every input, scale and shift; the Triton backward is deterministic (no atomics).

    Autocast: like the add, upsample and ReLU it replaces, the op is not touched by autocast: it runs in its
    inputs' dtype whether autocast is on or not (the custom ops fall through autocast's dispatch keys; callers
    such as `HRFusion` first promote mixed-dtype terms as eager `+` would).
    """
    plan, resamples, size = _checked(inputs, scales, shifts, resample, size, relu)
    inputs = list(inputs)
    scales = [None] * len(inputs) if scales is None else list(scales)
    shifts = [None] * len(inputs) if shifts is None else list(shifts)
    device = inputs[0].device
    if inputs[0].numel() == 0:
        backends.resolve(backend, device)  # an explicit backend that cannot run here still says so
        return fuse_ref(inputs, scales, shifts, resamples, size, relu)
    impl = backends.choose("fuse", backend, device, lambda: _signature(plan, inputs, scales, shifts),
                           lambda name: _measure_run(name, inputs, scales, shifts, resamples, size, relu))
    if impl == "reference":
        return fuse_ref(inputs, scales, shifts, resamples, size, relu)
    # the kernels index per-channel vectors densely; a strided or expanded view is copied (autograd-safe)
    return custom_ops.fuse(plan, inputs, [s if s is None else s.contiguous() for s in scales],
                           [b if b is None else b.contiguous() for b in shifts], impl)


def _checked(inputs, scales, shifts, resample, size, relu) -> Tuple[FusePlan, list, Tuple[int, int]]:
    """(plan, resamples, output size) of a call, validated. Remembered per call signature: validation and plan
    are functions of what `_call_key` reads, so a repeated signature costs one dict lookup."""
    key = _call_key(inputs, scales, shifts, resample, size, relu)
    known = _CHECKED.get(key) if key is not None else None
    if known is not None:
        return known
    inputs, scales, shifts, resamples, size = _validate(inputs, scales, shifts, resample, size)
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    same_size = [x for x, r in zip(inputs, resamples) if r is None or tuple(x.shape[2:]) == size]
    layout_ref = same_size[0] if same_size else inputs[0]
    plan = fuse_plan(tuple(tuple(x.shape[2:]) for x in inputs), tuple(resamples), size, relu,
                     custom_ops.is_channels_last(layout_ref), tuple(s is not None for s in scales),
                     tuple(b is not None for b in shifts))
    if key is not None:
        if len(_CHECKED) >= _MAX_CHECKED:
            _CHECKED.clear()
        _CHECKED[key] = (plan, resamples, size)
    return plan, resamples, size


_CHECKED: dict = {}
_MAX_CHECKED = 4096


def _call_key(inputs, scales, shifts, resample, size, relu) -> Optional[tuple]:
    """Everything `_validate` and the plan depend on (shapes, dtypes, devices, the channel stride that decides
    the layout, the resampling, size, relu), or None when the arguments are not of the expected types (then
    `_validate` says what is wrong)."""
    try:
        if type(inputs) not in (list, tuple) or type(relu) is not bool:
            return None
        if type(resample) not in (list, tuple, str, type(None)) or type(size) not in (list, tuple, type(None)):
            return None
        key = [len(inputs), relu, size if size is None else tuple(size),
               resample if resample is None or type(resample) is str else tuple(resample)]
        for x in inputs:
            if not isinstance(x, Tensor):
                return None
            key += (x.shape, x.dtype, x.device, x.stride(1) if x.dim() > 1 else 0)
        for params in (scales, shifts):
            if params is not None and type(params) not in (list, tuple):
                return None
            key.append(None if params is None else len(params))
            for t in params or ():
                key += (None,) if t is None else (t.shape, t.dtype, t.device)
        key = tuple(key)
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def _signature(plan, inputs, scales, shifts) -> tuple:
    """What of a call can change which backend is fastest (backend="auto" measures once per signature)."""
    sig = _autotune.tensor_signature
    return (plan, tuple(sig(x) for x in inputs), tuple(sig(s) for s in scales), tuple(sig(b) for b in shifts),
            torch.is_grad_enabled())


def _measure_run(name: str, inputs, scales, shifts, resamples, size, relu) -> None:
    """One forward (and backward when a gradient is needed) on `name`, on detached copies of the inputs."""
    xs_, scales_, shifts_ = ([_autotune.detached_like(t) for t in ts] for ts in (inputs, scales, shifts))
    y = fuse(xs_, scales=scales_, shifts=shifts_, resample=resamples, size=size, relu=relu, backend=name)
    _autotune.forward_backward(y, xs_ + scales_ + shifts_)


# --------------------------------------------------------------------------------------------- validation


def _per_term(value, name: str, n: int) -> list:
    if value is None:
        return [None] * n
    if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list with one entry per input (None allowed), got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries but there are {n} inputs")
    return list(value)


def check_branches(xs, name: str) -> None:
    """`xs` (the argument `name`) must be a non-empty list or tuple of 4-D floating tensors [N, C_k, H_k, W_k]
    sharing dtype, device and batch; the errors name the offending entry."""
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError(f"{name} must hold at least one tensor")
    for k, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}[{k}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name}[{k}] must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name}[{k}] has dtype {x.dtype}; expected float16, bfloat16, float32 or float64")
        if x.dtype != xs[0].dtype:
            raise TypeError(f"{name}[{k}] has dtype {x.dtype} but {name}[0] has {xs[0].dtype}; all {name} share "
                            "a dtype")
        if x.device != xs[0].device:
            raise ValueError(f"{name}[{k}] is on {x.device} but {name}[0] is on {xs[0].device}")
        if x.shape[0] != xs[0].shape[0]:
            raise ValueError(f"{name}[{k}] has batch {x.shape[0]} but {name}[0] has {xs[0].shape[0]}")


def _validate(inputs, scales, shifts, resample, size):
    check_branches(inputs, "inputs")
    x0 = inputs[0]
    for k, x in enumerate(inputs[1:], start=1):
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
