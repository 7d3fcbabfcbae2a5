"""The fusion step of one HRNet output branch, fused: y = ReLU(sum_k Up_k(x_k * scale_k + shift_k)).

Layers: `fuse` (functional API: validation, backend dispatch) -> the custom ops `hrfast::fuse_forward` and
`hrfast::fuse_backward` (`torch.library.custom_op`, with fake implementations and autograd, so
`torch.compile(fullgraph=True)` traces through them) -> the launchers of the backend, picked by `_launchers`
(`hrfast.kernels.fuse` for Triton, `hrfast._cuda.fuse` for the CUDA C++ extension). The plain PyTorch
reference is `hrfast.ops.reference.fuse_ref`.

The ops' schemas carry only tensors and flat lists: the per-term plan is flattened into `modes`,
`align_corners` and `ratios` (4 ints per term: ratio_h num/den, ratio_w num/den), and the optional
per-channel scales/shifts are passed as lists of the present ones with `has_scale`/`has_shift` flags
(a `Tensor?[]` holding None is not differentiable through `register_autograd`).
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _autotune
from .._backend import resolve_backend
from .reference import fuse_ref
from .resample import Resample, as_resample

_SAME, _NEAREST, _BILINEAR = 0, 1, 2  # = hrfast.kernels.fuse.SAME / NEAREST / BILINEAR (not imported: lazy triton)


class Term(NamedTuple):
    """One summand as every backend's launchers take it (`hrfast.kernels.fuse`, `hrfast._cuda.fuse`).
    `ratio_h`/`ratio_w` are ATen's source-index ratios as exact (num, den) pairs; `mode` is SAME (0),
    NEAREST (1) or BILINEAR (2)."""

    x: Tensor
    scale: Optional[Tensor] = None
    shift: Optional[Tensor] = None
    mode: int = _SAME
    align_corners: bool = False
    ratio_h: Tuple[int, int] = (1, 1)
    ratio_w: Tuple[int, int] = (1, 1)


class TermPlan(NamedTuple):
    """What the kernels need to know about one term besides its tensors."""

    mode: int
    align_corners: bool
    ratio_h: Tuple[int, int]
    ratio_w: Tuple[int, int]


def _launchers(backend: str):
    """The module with `Term`, `fuse_forward` and `fuse_backward` for a concrete backend (imported lazily)."""
    if backend == "triton":
        from hrfast.kernels import fuse as launchers
    elif backend == "cuda":
        from hrfast._cuda import fuse as launchers
    else:
        raise ValueError(f"no fused launchers for backend {backend!r}")
    return launchers


def _resolve_backend(backend: str, device: torch.device) -> str:
    """`resolve_backend`, which torch.compile evaluates once while tracing (its result only depends on the
    backend name, the device type and the environment) instead of tracing its cached import checks."""
    return resolve_backend(backend, device)


# = torch.compiler.assume_constant_result(_resolve_backend) (torch 2.4 to 2.15 set just this attribute), which
# would import torch._dynamo, and with it triton, at `import hrfast`
_resolve_backend._dynamo_marked_constant = True


def _term_plan(resample: Optional[Resample], in_hw: Tuple[int, int], size: Tuple[int, int]) -> TermPlan:
    if resample is None or tuple(in_hw) == tuple(size):  # same size: F.interpolate copies
        return TermPlan(_SAME, False, (1, 1), (1, 1))
    mode = _NEAREST if resample.mode == "nearest" else _BILINEAR
    ratio_h = tuple(resample.axis_ratio(0, in_hw[0], size[0]))
    ratio_w = tuple(resample.axis_ratio(1, in_hw[1], size[1]))
    return TermPlan(mode, resample.corners_aligned, ratio_h, ratio_w)


# --------------------------------------------------------------------------------------------- custom ops


def _kernel_terms(launchers, xs, scales, shifts, has_scale, has_shift, modes, align_corners, ratios) -> list:
    """The launchers' Term list from the flattened plan."""
    scales, shifts = iter(scales), iter(shifts)
    return [launchers.Term(x, next(scales) if has_scale[k] else None, next(shifts) if has_shift[k] else None,
                           modes[k], align_corners[k], (ratios[4 * k], ratios[4 * k + 1]),
                           (ratios[4 * k + 2], ratios[4 * k + 3]))
            for k, x in enumerate(xs)]


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1


@torch.library.custom_op("hrfast::fuse_forward", mutates_args=())
def fuse_forward_op(xs: List[Tensor], scales: List[Tensor], shifts: List[Tensor], has_scale: List[bool],
                    has_shift: List[bool], modes: List[int], align_corners: List[bool], ratios: List[int],
                    size: List[int], relu: bool, channels_last: bool, backend: str) -> Tensor:
    """y [N, C, *size] in xs' dtype (channels_last when `channels_last`); see `fuse` for the math."""
    launchers = _launchers(backend)
    terms = _kernel_terms(launchers, xs, scales, shifts, has_scale, has_shift, modes, align_corners, ratios)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return launchers.fuse_forward(terms, (size[0], size[1]), relu=relu, memory_format=fmt)


@fuse_forward_op.register_fake
def _(xs, scales, shifts, has_scale, has_shift, modes, align_corners, ratios, size, relu, channels_last, backend):
    x0 = xs[0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((x0.shape[0], x0.shape[1], size[0], size[1]), dtype=x0.dtype, device=x0.device,
                       memory_format=fmt)


@torch.library.custom_op("hrfast::fuse_backward", mutates_args=())
def fuse_backward_op(grad_y: Tensor, y: Optional[Tensor], xs: List[Tensor], x_kept: List[bool],
                     x_shapes: List[int], scales: List[Tensor], shifts: List[Tensor], has_scale: List[bool],
                     has_shift: List[bool], modes: List[int], align_corners: List[bool], ratios: List[int],
                     relu: bool, needs: List[bool], backend: str) -> List[Tensor]:
    """The gradients `needs` asks for (3 flags per term: dx, dscale, dshift), in term order.

    `xs` holds only the inputs with `x_kept` (the kernels read x_k only for d(scale_k)); the others are known
    by their shape (`x_shapes`, 4 ints per term). `y` is the forward output (its sign is the ReLU mask), None
    without ReLU. A dscale/dshift flag must be False for a term without that parameter.
    """
    launchers = _launchers(backend)
    full = _stand_ins(grad_y, xs, x_kept, x_shapes)
    terms = _kernel_terms(launchers, full, scales, shifts, has_scale, has_shift, modes, align_corners, ratios)
    per_term = [tuple(needs[3 * k:3 * k + 3]) for k in range(len(full))]
    grads = launchers.fuse_backward(grad_y, y, terms, per_term, relu=relu)
    out = []
    for flags, term_grads in zip(per_term, grads):
        for need, g in zip(flags, term_grads):
            if need:
                out.append(g)
    return _unaliased(out)


def _unaliased(outputs: List[Tensor]) -> List[Tensor]:
    """A custom op's outputs may not share storage, and their storage offsets must be what the fake
    implementation says (0): the launchers return per-channel gradients as views of one reduction buffer, so
    such a view (a [C] vector) is copied."""
    seen = set()
    out = []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr()
        out.append(t.clone() if ptr in seen or t.storage_offset() != 0 else t)
        seen.add(ptr)
    return out


def _stand_ins(grad_y: Tensor, xs: Sequence[Tensor], x_kept: Sequence[bool], x_shapes: Sequence[int]) -> list:
    """Every term's x: the kept ones, and for the others a stride-0 stand-in that gives the kernels its shape
    (a gradient for x then takes grad_y's layout)."""
    kept = iter(xs)
    return [next(kept) if k_kept else grad_y.new_empty(()).expand(x_shapes[4 * k:4 * k + 4])
            for k, k_kept in enumerate(x_kept)]


@fuse_backward_op.register_fake
def _(grad_y, y, xs, x_kept, x_shapes, scales, shifts, has_scale, has_shift, modes, align_corners, ratios, relu,
      needs, backend):
    # the launchers' allocation contract: dx like x (empty_like) when x was kept, else in grad_y's memory
    # format; dscale/dshift [C] in the parameter's dtype
    full = _stand_ins(grad_y, xs, x_kept, x_shapes)
    fmt = torch.channels_last if _is_channels_last(grad_y) else torch.contiguous_format
    scales, shifts = iter(scales), iter(shifts)
    out = []
    for k, x in enumerate(full):
        scale = next(scales) if has_scale[k] else None
        shift = next(shifts) if has_shift[k] else None
        if needs[3 * k]:
            if 0 not in x.stride() or x.numel() <= 1:
                out.append(torch.empty_like(x))
            else:
                out.append(torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt))
        if needs[3 * k + 1]:
            out.append(scale.new_empty(scale.shape))
        if needs[3 * k + 2]:
            out.append(shift.new_empty(shift.shape))
    return out


def _fuse_setup_context(ctx, inputs, output):
    xs, scales, shifts, has_scale, has_shift, modes, align_corners, ratios, size, relu, channels_last, backend = inputs
    # keep only what backward reads: y for the ReLU mask, x_k where its scale needs a gradient
    # (ctx.needs_input_grad is flat here, over the tensors of the lists; requires_grad says the same)
    scale_of = _positions(has_scale)
    x_kept = [has_scale[k] and scales[scale_of[k]].requires_grad for k in range(len(xs))]
    ctx.save_for_backward(output if relu else None, *[x for x, kept in zip(xs, x_kept) if kept], *scales, *shifts)
    ctx.plan = (len(scales), x_kept, [d for x in xs for d in x.shape], has_scale, has_shift, modes, align_corners,
                ratios, relu, backend)


def _positions(flags: Sequence[bool]) -> List[int]:
    """For each term, the index of its entry in the packed list of present parameters (-1 if absent)."""
    out, i = [], 0
    for f in flags:
        out.append(i if f else -1)
        i += int(f)
    return out


def _fuse_backward(ctx, grad_y: Tensor):
    y, *saved = ctx.saved_tensors
    n_scales, x_kept, x_shapes, has_scale, has_shift, modes, align_corners, ratios, relu, backend = ctx.plan
    n_kept = sum(x_kept)
    xs, scales, shifts = saved[:n_kept], saved[n_kept:n_kept + n_scales], saved[n_kept + n_scales:]
    need_xs, need_scales, need_shifts = ctx.needs_input_grad[:3]
    scale_of, shift_of = _positions(has_scale), _positions(has_shift)
    needs = []
    for k in range(len(x_kept)):
        needs += [need_xs[k], has_scale[k] and need_scales[scale_of[k]], has_shift[k] and need_shifts[shift_of[k]]]
    grads = iter(fuse_backward_op(grad_y, y, list(xs), x_kept, x_shapes, list(scales), list(shifts), has_scale,
                                  has_shift, modes, align_corners, ratios, relu, needs, backend))
    dxs, dscales, dshifts = [], [], []
    for k in range(len(x_kept)):
        dxs.append(next(grads) if needs[3 * k] else None)
        if has_scale[k]:
            dscales.append(next(grads) if needs[3 * k + 1] else None)
        if has_shift[k]:
            dshifts.append(next(grads) if needs[3 * k + 2] else None)
    # then has_scale, has_shift, modes, align_corners, ratios (never empty: one entry per term), size, relu,
    # channels_last, backend
    return (dxs, dscales, dshifts) + (None,) * 9


def _no_grads(*inputs) -> tuple:
    """The gradients of non-tensor inputs: None, but [] for an empty list (register_autograd matches the
    structure of the inputs, where an empty list is a list node, not a leaf)."""
    return tuple([] if isinstance(v, (list, tuple)) and len(v) == 0 else None for v in inputs)


fuse_forward_op.register_autograd(_fuse_backward, setup_context=_fuse_setup_context)


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
        backend: "auto" (for CUDA tensors the fastest of Triton, the CUDA extension if built and the PyTorch
            reference, measured on the first call with each signature, see `hrfast._autotune`; for CPU
            tensors the reference), "triton", "cuda" (the CUDA C++ extension, compiled on first use) or
            "reference".

    Returns:
        y [N, C, H, W] in the inputs' dtype, channels_last when the first output-size input is.

    Gradients flow to every input, scale and shift; the Triton backward is deterministic (no atomics).

    Autocast: like the add, upsample and ReLU it replaces, the op is not touched by autocast: it runs in its
    inputs' dtype whether autocast is on or not (the custom ops fall through autocast's dispatch keys; callers
    such as `HRFusion` first promote mixed-dtype terms as eager `+` would).
    """
    inputs, scales, shifts, resamples, size = _validate(inputs, scales, shifts, resample, size)
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    impl = _resolve_backend(backend, inputs[0].device)
    plans = tuple(_term_plan(r, x.shape[2:], size) for x, r in zip(inputs, resamples))
    if _autotune.applies(backend, inputs[0].device) and inputs[0].numel() > 0:
        impl = _measured_backend(inputs, scales, shifts, resamples, plans, size, relu, impl)
    if impl == "reference" or inputs[0].numel() == 0:
        return fuse_ref(inputs, scales, shifts, resamples, size, relu)
    same_size = [x for x, p in zip(inputs, plans) if p.mode == _SAME]
    layout_ref = same_size[0] if same_size else inputs[0]
    channels_last = layout_ref.dim() == 4 and layout_ref.shape[1] > 1 and layout_ref.stride(1) == 1
    # the kernels index per-channel vectors densely; a strided or expanded view is copied (autograd-safe)
    return fuse_forward_op(
        list(inputs), [s.contiguous() for s in scales if s is not None],
        [b.contiguous() for b in shifts if b is not None], [s is not None for s in scales],
        [b is not None for b in shifts], [p.mode for p in plans], [p.align_corners for p in plans],
        [r for p in plans for r in (*p.ratio_h, *p.ratio_w)], [size[0], size[1]], relu, channels_last, impl)


def _measured_backend(inputs, scales, shifts, resamples, plans, size, relu, static: str) -> str:
    """backend='auto': the fastest backend for this call's signature (see hrfast._autotune)."""
    sig = _autotune.tensor_signature
    signature = (tuple(sig(x) for x in inputs), tuple(sig(s) for s in scales), tuple(sig(b) for b in shifts),
                 plans, size, relu, torch.is_grad_enabled())

    def run(name: str) -> None:
        xs_, scales_, shifts_ = ([_autotune.detached_like(t) for t in ts] for ts in (inputs, scales, shifts))
        y = fuse(xs_, scales=scales_, shifts=shifts_, resample=resamples, size=size, relu=relu, backend=name)
        _autotune.forward_backward(y, xs_ + scales_ + shifts_)

    return _autotune.choose("fuse", signature, inputs[0].device, static, run)


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
