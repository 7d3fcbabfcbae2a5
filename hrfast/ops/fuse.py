"""The fusion step of one HRNet output branch, fused: y = ReLU(sum_k Up_k(x_k * scale_k + shift_k)).

`fuse` validates its arguments, builds the call's `hrfast.plan.FusePlan` (cached), lets the backend registry
pick the implementation (`hrfast.backends.choose`) and runs it: the plain PyTorch reference
(`hrfast.ops.reference.fuse_ref`), or the custom op `hrfast::fuse_forward` (`hrfast.ops.custom_ops`) over the
Triton or CUDA C++ launchers.
"""
from typing import Callable, Optional, Sequence, Tuple

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
    are functions of what `_call_key` reads, so a repeated signature costs one dict lookup. A traced call
    (compile, export, jit.trace) neither reads nor fills the memo: its sizes may be symbolic."""
    if torch.jit.is_tracing():
        with custom_ops.untraced():
            return _plan(inputs, scales, shifts, resample, size, relu)
    if torch.compiler.is_compiling():
        return _plan(inputs, scales, shifts, resample, size, relu)
    key = _call_key(inputs, scales, shifts, resample, size, relu)
    known = _CHECKED.get(key) if key is not None else None
    if known is not None:
        return known
    known = _plan(inputs, scales, shifts, resample, size, relu)
    if key is not None:
        if len(_CHECKED) >= _MAX_CHECKED:
            _CHECKED.clear()
        _CHECKED[key] = known
    return known


def _plan(inputs, scales, shifts, resample, size, relu) -> Tuple[FusePlan, list, Tuple[int, int]]:
    inputs, scales, shifts, resamples, size = _validate(inputs, scales, shifts, resample, size)
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    # the output's layout is that of the first output-size term (traced: the first without resample, since a
    # size test on symbolic sizes would fix them)
    traced = torch.compiler.is_compiling()
    same_size = [x for x, r in zip(inputs, resamples) if r is None or (not traced and tuple(x.shape[2:]) == size)]
    layout_ref = same_size[0] if same_size else inputs[0]
    plan = fuse_plan(tuple(tuple(x.shape[2:]) for x in inputs), tuple(resamples), size, relu,
                     custom_ops.is_channels_last(layout_ref), tuple(s is not None for s in scales),
                     tuple(b is not None for b in shifts))
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
        if size is not None and not all(type(s) is int for s in size):
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
                key += (None,) if t is None else (t.shape, t.dtype, t.device, t.layout)
        key = tuple(key)
        hash(key)
    except (AttributeError, TypeError, RuntimeError):  # RuntimeError: strides of a sparse tensor
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
    """`xs` (the argument `name`) must be a non-empty list or tuple of dense 4-D floating tensors [N, C_k, H_k, W_k]
    sharing dtype, device and batch; the errors name the offending entry."""
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError(f"{name} must hold at least one tensor")
    for k, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}[{k}] must be a torch.Tensor, got {type(x).__name__}")
        if x.layout != torch.strided:
            raise TypeError(f"{name}[{k}] has layout {x.layout}; expected a dense tensor (torch.strided)")
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


def check_tensor(t, name: str, shape: tuple, device: torch.device, dtypes: Optional[Sequence[torch.dtype]] = None,
                 what: str = "", optional: bool = False) -> None:
    """`t` (the argument `name`) must be a dense floating tensor of `shape` on `device`, with one of `dtypes` when
    given; TypeError for type, layout and dtype, ValueError for shape and device, each saying what was expected
    (`what`: how the expected shape reads, e.g. "one value per channel"; `optional`: None was allowed too)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; expected a dense tensor (torch.strided)")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; expected a floating dtype")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected {' or '.join(map(str, dtypes))}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}{f' ({what})' if what else ''}, got "
                         f"{list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")


def _validate(inputs, scales, shifts, resample, size):
    check_branches(inputs, "inputs")
    x0 = inputs[0]
    for k, x in enumerate(inputs[1:], start=1):
        if x.shape[1] != x0.shape[1]:
            raise ValueError(f"inputs[{k}] has {x.shape[1]} channels but inputs[0] has {x0.shape[1]}; "
                             "every term must already have the output branch's channels")
    n, C = len(inputs), x0.shape[1]
    scales = _per_term(scales, "scales", n)
    shifts = _per_term(shifts, "shifts", n)
    for name, params in (("scales", scales), ("shifts", shifts)):
        for k, p in enumerate(params):
            if p is not None:
                check_tensor(p, f"{name}[{k}]", (C,), x0.device, what="one value per channel", optional=True)
    resamples = [as_resample(r, f"resample[{k}]") for k, r in enumerate(_per_term(resample, "resample", n))]
    size = _output_size(inputs, resamples, size)
    if C == 0 and any(r is not None for r in resamples):
        raise ValueError("inputs have 0 channels; a resampled term needs at least one (F.interpolate, which "
                         "the eager code calls, rejects it as well)")
    for k, (x, r) in enumerate(zip(inputs, resamples)):
        in_hw = tuple(x.shape[2:])
        if r is None:
            for a in (0, 1):
                require(in_hw[a] == size[a], lambda: f"inputs[{k}] is {in_hw[0]}x{in_hw[1]} but the output is "
                                                     f"{size[0]}x{size[1]}; give resample[{k}] to upsample it")
            continue
        for a in (0, 1):
            require(in_hw[a] <= size[a], lambda: f"inputs[{k}] is {in_hw[0]}x{in_hw[1]}, larger than the output "
                                                 f"{size[0]}x{size[1]}: the fusion only upsamples")
        if in_hw[0] == 0 or in_hw[1] == 0:
            raise ValueError(f"inputs[{k}] has an empty spatial size {in_hw}; F.interpolate cannot resize it")
        produced = r.output_size(in_hw)
        for a in (0, 1) if produced is not None else ():
            require(produced[a] == size[a], lambda: f"resample[{k}] with scale_factor={r.scale_factor} turns "
                    f"{in_hw[0]}x{in_hw[1]} into {produced[0]}x{produced[1]}, not the output size {size[0]}x{size[1]}; "
                    "use scale_factor=None to resize to the exact size")
        require(size[0] * size[1] < 2**31, lambda: f"output size {size} has 2**31 or more pixels per channel; not "
                                                   "supported")
    return list(inputs), scales, shifts, resamples, size


def require(ok, message: Callable[[], str]) -> None:
    """ValueError(message()) unless `ok`, a comparison of sizes. Under torch.export with symbolic sizes a
    comparison that does not follow from the sizes' own constraints is skipped: export refuses any guard it
    cannot prove for every size, and these (a low branch no larger than a high one, ...) hold by HRNet's
    construction yet are beyond its prover (floor divisions); where they would fail, the eager model's
    F.interpolate would resample all the same. Under torch.compile the comparison is a guard, as eager code's."""
    if torch.compiler.is_exporting() and not isinstance(ok, bool):
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        ok = not statically_known_true(torch.sym_not(ok))
    if not ok:
        raise ValueError(message())


def _size_entry(s):
    """An output size entry as the plan holds it: an int, a SymInt (torch.compile with dynamic shapes), or the
    int of a 0-d integer tensor (jit.trace hands out shape entries as such); None for anything else."""
    if isinstance(s, bool):
        return None
    if isinstance(s, (int, torch.SymInt)):
        return s
    if isinstance(s, Tensor) and s.dim() == 0 and not s.is_floating_point() and not s.is_complex():
        return int(s)
    return None


def _output_size(inputs, resamples, size) -> Tuple[int, int]:
    if size is not None:
        entries = tuple(_size_entry(s) for s in size) if isinstance(size, (list, tuple)) else ()
        if len(entries) != 2 or any(e is None for e in entries):
            raise TypeError(f"size must be a pair of ints (H, W), got {size!r}")
        if entries[0] < 1 or entries[1] < 1:
            raise ValueError(f"size must be positive, got {entries}")
        return entries
    same = [tuple(x.shape[2:]) for x, r in zip(inputs, resamples) if r is None]
    if not same:
        raise ValueError("size is required when every input has a resample")
    return same[0]
