"""The op boundary: hrfast's fused ops as `torch.library` custom ops, with fake implementations and autograd.

    hrfast::fuse_forward / fuse_backward     the fusion step (`hrfast.ops.fuse`)
    hrfast::head_forward / head_backward     the HRNetV2 head (`hrfast.ops.hrnet_v2_head`)

Each carries its plan (`hrfast.plan.FusePlan` / `HeadPlan`) as the plan's flat int encoding, decoded by the
plan's own `decode`, and the name of a concrete backend whose launchers (`hrfast.backends.launchers`) run it.
`torch.compile(fullgraph=True)`, export and jit.trace see the ops (fake implementations, registered autograd).
Optional per-term tensors travel as lists of the present ones (the plan says which terms have them): a
`Tensor?[]` holding None is not differentiable through `register_autograd`.

A plain eager call without autograd (inference, where host time matters: a batch-1 forward is bound by it) skips
torch.library's dispatcher, which costs about 15 us per call, more than everything else hrfast does around a
kernel launch: the op's implementation runs directly. So do the backward ops called by the registered autograd
formula. Whenever something may be watching the dispatcher (tracing, a TorchDispatchMode such as FakeTensorMode
or an op counter, tensor subclasses, meta tensors) the custom op itself runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import backends
from ..batchnorm import accumulation_dtype, affine
from ..plan import SAME, FusePlan, HeadPlan, cached

__all__ = ["fuse", "head"]


# ------------------------------------------------------------------------------------ compile caches

_PACKAGE = Path(__file__).resolve().parents[1]
# the code behind the ops' fake and real implementations (shapes, strides, what the backward returns)
_OP_SOURCES = ("ops/*.py", "plan.py", "batchnorm.py", "backends.py")


def _op_source_files() -> List[Path]:
    files = [p for pattern in _OP_SOURCES for p in sorted(_PACKAGE.glob(pattern))]
    spec = importlib.util.find_spec("hrfast.kernels")  # the top-level kernels/ (mapped, not under hrfast/)
    for location in (spec.submodule_search_locations or []) if spec else []:
        files += sorted(Path(location).glob("*.py"))
    return files


def source_tag(files: Optional[Sequence[Path]] = None) -> str:
    """"hrfast-<digest>": a digest of the op sources (`files`, default the installed ones)."""
    digest = hashlib.sha256()
    for path in _op_source_files() if files is None else files:
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return f"hrfast-{digest.hexdigest()[:16]}"


def _tag_compile_caches() -> None:
    """Adds `source_tag()` to torch.compile's cache key (`torch.compiler.config.cache_key_tag`, appended to what
    the user set). Inductor's FX graph and AOTAutograd caches key on the traced graph, not on a custom op's
    implementation: after hrfast changed an op's outputs, a cached graph from the old code fails its stride and
    size asserts (seen here: head_backward's conv-bias gradient), or runs stale code where those agree."""
    config = getattr(getattr(torch, "compiler", None), "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return
    tag = source_tag()
    if tag not in config.cache_key_tag.split(";"):
        config.cache_key_tag = ";".join(t for t in (config.cache_key_tag, tag) if t)


_tag_compile_caches()


# ------------------------------------------------------------------------------------------------- helpers


def _per_term(flags: Sequence[bool], present: Sequence[Tensor]) -> List[Optional[Tensor]]:
    """The packed list of present tensors spread over the terms (None where a flag is False)."""
    it = iter(present)
    return [next(it) if f else None for f in flags]


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1


def _unaliased(outputs: List[Tensor]) -> List[Tensor]:
    """A custom op's outputs may not share storage, and their storage offsets must be what the fake
    implementation says (0): launchers may return per-channel gradients as views of one reduction buffer, so
    such a view (a [C] vector) is copied."""
    seen = set()
    out = []
    for t in outputs:
        ptr = id(t) if t.is_meta else t.untyped_storage().data_ptr()  # meta storages all sit at 0
        out.append(t.clone() if ptr in seen or t.storage_offset() != 0 else t)
        seen.add(ptr)
    return out


def _no_grads(*inputs) -> tuple:
    """The gradients of non-tensor inputs: None, but [] for an empty list (register_autograd matches the
    structure of the inputs, where an empty list is a list node, not a leaf)."""
    return tuple([] if isinstance(v, (list, tuple)) and len(v) == 0 else None for v in inputs)


# ------------------------------------------------------------------------------------------- the fusion op


def _fuse_forward(plan: List[int], xs: List[Tensor], scales: List[Tensor], shifts: List[Tensor],
                  backend: str) -> Tensor:
    """y [N, C, *plan.size] in xs' dtype; `scales` / `shifts`: the present ones, in term order."""
    p = FusePlan.decode(plan)
    return backends.launchers("fuse", backend).fuse_forward(
        p, xs, _per_term([t.has_scale for t in p.terms], scales), _per_term([t.has_shift for t in p.terms], shifts))


fuse_forward_op = torch.library.custom_op("hrfast::fuse_forward", _fuse_forward, mutates_args=())


@fuse_forward_op.register_fake
def _(plan, xs, scales, shifts, backend):
    p = FusePlan.decode(plan)
    x0 = xs[0]
    return torch.empty((x0.shape[0], x0.shape[1], *p.size), dtype=x0.dtype, device=x0.device,
                       memory_format=_memory_format(p.channels_last))


def _stand_ins(grad_y: Tensor, xs: Sequence[Tensor], x_kept: Sequence[bool], x_shapes: Sequence[int]) -> list:
    """Every term's x: the kept ones, and for the others a stride-0 stand-in that gives the launchers its shape
    (a gradient for x then takes grad_y's layout)."""
    kept = iter(xs)
    return [next(kept) if k_kept else grad_y.new_empty(()).expand(x_shapes[4 * k:4 * k + 4])
            for k, k_kept in enumerate(x_kept)]


def _fuse_backward_impl(plan: List[int], grad_y: Tensor, y: Optional[Tensor], xs: List[Tensor], x_kept: List[bool],
                        x_shapes: List[int], scales: List[Tensor], shifts: List[Tensor], needs: List[bool],
                        backend: str) -> List[Tensor]:
    """The gradients `needs` asks for (3 flags per term: dx, dscale, dshift), in term order.

    `xs` holds only the inputs with `x_kept` (the launchers read x_k only for d(scale_k)); the others are known
    by their shape (`x_shapes`, 4 ints per term). `y` is the forward output (its sign is the ReLU mask), None
    without ReLU. A dscale/dshift flag must be False for a term without that parameter.
    """
    p = FusePlan.decode(plan)
    full = _stand_ins(grad_y, xs, x_kept, x_shapes)
    per_term = [tuple(needs[3 * k:3 * k + 3]) for k in range(len(full))]
    grads = backends.launchers("fuse", backend).fuse_backward(
        p, grad_y, y, full, _per_term([t.has_scale for t in p.terms], scales),
        _per_term([t.has_shift for t in p.terms], shifts), per_term)
    return _unaliased([g for flags, term_grads in zip(per_term, grads) for need, g in zip(flags, term_grads) if need])


fuse_backward_op = torch.library.custom_op("hrfast::fuse_backward", _fuse_backward_impl, mutates_args=())


@fuse_backward_op.register_fake
def _(plan, grad_y, y, xs, x_kept, x_shapes, scales, shifts, needs, backend):
    # the launchers' allocation contract: dx like x (empty_like) when x was kept, else in grad_y's memory
    # format; dscale/dshift [C] in the parameter's dtype
    p = FusePlan.decode(plan)
    full = _stand_ins(grad_y, xs, x_kept, x_shapes)
    fmt = _memory_format(is_channels_last(grad_y))
    scales = _per_term([t.has_scale for t in p.terms], scales)
    shifts = _per_term([t.has_shift for t in p.terms], shifts)
    out = []
    for k, x in enumerate(full):
        if needs[3 * k]:
            if 0 not in x.stride() or x.numel() <= 1:
                out.append(torch.empty_like(x))
            else:
                out.append(torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt))
        if needs[3 * k + 1]:
            out.append(scales[k].new_empty(scales[k].shape))
        if needs[3 * k + 2]:
            out.append(shifts[k].new_empty(shifts[k].shape))
    return out


def _fuse_setup_context(ctx, inputs, output):
    plan, xs, scales, shifts, backend = inputs
    p = FusePlan.decode(plan)
    # keep only what backward reads: y for the ReLU mask, x_k where its scale needs a gradient
    per_scale = _per_term([t.has_scale for t in p.terms], scales)
    x_kept = [s is not None and s.requires_grad for s in per_scale]
    ctx.save_for_backward(output if p.relu else None, *[x for x, kept in zip(xs, x_kept) if kept], *scales, *shifts)
    ctx.meta = (plan, len(scales), x_kept, [d for x in xs for d in x.shape], backend)


def _fuse_backward(ctx, grad_y: Tensor):
    y, *saved = ctx.saved_tensors
    plan, n_scales, x_kept, x_shapes, backend = ctx.meta
    p = FusePlan.decode(plan)
    n_kept = sum(x_kept)
    xs, scales, shifts = saved[:n_kept], saved[n_kept:n_kept + n_scales], saved[n_kept + n_scales:]
    need_xs, need_scales, need_shifts = ctx.needs_input_grad[1:4]
    need_scale = iter(need_scales)
    need_shift = iter(need_shifts)
    needs = []
    for k, t in enumerate(p.terms):
        needs += [need_xs[k], t.has_scale and next(need_scale), t.has_shift and next(need_shift)]
    grads = iter(_backward_call(fuse_backward_op, _fuse_backward_impl, grad_y,
                                plan, grad_y, y, list(xs), x_kept, x_shapes, list(scales), list(shifts), needs, backend))
    dxs, dscales, dshifts = [], [], []
    for k, t in enumerate(p.terms):
        dxs.append(next(grads) if needs[3 * k] else None)
        if t.has_scale:
            dscales.append(next(grads) if needs[3 * k + 1] else None)
        if t.has_shift:
            dshifts.append(next(grads) if needs[3 * k + 2] else None)
    return (None, dxs) + tuple(d if d else [] for d in (dscales, dshifts)) + (None,)


fuse_forward_op.register_autograd(_fuse_backward, setup_context=_fuse_setup_context)


def fuse(plan: FusePlan, xs: Sequence[Tensor], scales: Sequence[Optional[Tensor]],
         shifts: Sequence[Optional[Tensor]], backend: str) -> Tensor:
    """The fusion op on a concrete fused backend ("triton" or "cuda_cpp"); per-term scales / shifts (None where
    the plan has none) as dense [C] vectors."""
    if _plain(xs[0]):
        return backends.launchers("fuse", backend).fuse_forward(plan, xs, scales, shifts)
    return fuse_forward_op(_encoded(plan), list(xs), [s for s in scales if s is not None],
                           [b for b in shifts if b is not None], backend)


# --------------------------------------------------------------------------------------------- the head op
#
# With `plan.batch_stats`, (a, b) are BN's (weight, bias) (None allowed) and BN normalises with the batch
# statistics of s = W0 x0 + sum_j Up(P_j), computed by the op in a first pass and returned as float64 mean and
# biased var; otherwise (a, b) are the folded per-channel (scale, shift) (differentiable expressions made by the
# caller) and mean/var are empty. `conv_bias` enters only for its gradient (exactly zero under batch
# statistics, where it only shifts BN's mean).


def _head_affine(p: HeadPlan, a: Optional[Tensor], b: Optional[Tensor], mean: Tensor, var: Tensor, eps: float,
                 acc: torch.dtype) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(scale, shift) the kernels apply, in `acc`; with batch statistics also (rstd, scale) in float64.
    Forward and backward both call this: the backward recomputes bitwise the forward's scale and shift."""
    if not p.batch_stats:
        return a.to(acc).contiguous(), b.to(acc).contiguous(), None, None
    scale64, shift64 = affine(mean, var, a, b, eps)
    return scale64.to(acc), shift64.to(acc), torch.rsqrt(var + eps), scale64


def _no_autocast(x0: Tensor):
    """Autocast off for x0's device (the head's einsums stay in x0's dtype under the caller's autocast); meta
    tensors have no autocast to turn off."""
    return contextlib.nullcontext() if x0.is_meta else torch.autocast(x0.device.type, enabled=False)


def _logits_format(x0: Tensor) -> torch.memory_format:
    return _memory_format(is_channels_last(x0))


def _head_forward(plan: List[int], x0: Tensor, w0: Tensor, a: Optional[Tensor], b: Optional[Tensor], wc: Tensor,
                  bc: Optional[Tensor], conv_bias: Optional[Tensor], lows: List[Tensor], eps: float,
                  backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(logits [N, K, H, W] in x0's dtype, mean, var): see the notes above."""
    return _head_forward_plan(HeadPlan.decode(plan), x0, w0, a, b, wc, bc, lows, eps, backend)


def _head_forward_plan(p: HeadPlan, x0: Tensor, w0: Tensor, a: Optional[Tensor], b: Optional[Tensor], wc: Tensor,
                       bc: Optional[Tensor], lows: List[Tensor], eps: float,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    launchers = backends.launchers("head", backend)
    t = launchers.HeadTensors(x0, lows, w0, wc, bc)
    if p.batch_stats:
        mean, var = launchers.head_batch_stats(p, t)
    else:
        mean, var = (x0.new_empty((0,), dtype=torch.float64) for _ in range(2))
    scale, shift, _, _ = _head_affine(p, a, b, mean, var, eps, accumulation_dtype(x0))
    return launchers.head_forward(p, t, scale, shift), mean, var


head_forward_op = torch.library.custom_op("hrfast::head_forward", _head_forward, mutates_args=())


@head_forward_op.register_fake
def _(plan, x0, w0, a, b, wc, bc, conv_bias, lows, eps, backend):
    N, _, H, W = x0.shape
    logits = torch.empty((N, wc.shape[0], H, W), dtype=x0.dtype, device=x0.device, memory_format=_logits_format(x0))
    stats = (w0.shape[0] if HeadPlan.decode(plan).batch_stats else 0,)
    return logits, x0.new_empty(stats, dtype=torch.float64), x0.new_empty(stats, dtype=torch.float64)


def _head_backward_impl(plan: List[int], grad: Tensor, x0: Tensor, w0: Tensor, a: Optional[Tensor],
                        b: Optional[Tensor], wc: Tensor, bc: Optional[Tensor], lows: List[Tensor], mean: Tensor,
                        var: Tensor, eps: float, needs: List[bool], backend: str) -> List[Tensor]:
    """The gradients `needs` asks for, in this order and each in its input's dtype: x0, w0, a, b, wc, bc, the
    conv bias (batch statistics only), then one flag per low branch (a flag for an absent a, b or bc must be
    False)."""
    launchers, p = backends.launchers("head", backend), HeadPlan.decode(plan)
    t = launchers.HeadTensors(x0, lows, w0, wc, bc)
    scale, shift, rstd, scale64 = _head_affine(p, a, b, mean, var, eps, accumulation_dtype(x0))
    N, _, H, W = x0.shape
    # the einsums must stay in x0's dtype even when backward runs under the caller's autocast
    with _no_autocast(x0):
        dwc, sum_da, sum_da_s = launchers.head_backward_reduce(p, t, scale, shift, grad)
        if p.batch_stats:
            count = N * H * W
            dbeta = sum_da.double()
            dgamma = rstd * (sum_da_s.double() - mean * dbeta)
            # BN's input gradient: scale * (dA - mean(dA) - s_hat * mean(dA * s_hat)) = scale*dA + alpha + beta*s
            alpha = (scale64 * (rstd * mean * dgamma - dbeta) / count).to(scale.dtype)
            beta = (-scale64 * rstd * dgamma / count).to(scale.dtype)
            dx0, dw0, dlows = launchers.head_backward_ds(p, t, scale, shift, grad, alpha, beta)
            da, db = dgamma, dbeta
        else:
            dx0, dw0, dlows = launchers.head_backward_ds(p, t, scale, shift, grad)
            da, db = sum_da_s, sum_da
        out = []
        if needs[0]:
            out.append(dx0)
        if needs[1]:
            out.append(dw0.to(w0.dtype))
    for need, g, param in zip(needs[2:5], (da, db, dwc), (a, b, wc)):
        if need:
            out.append(g.to(param.dtype))
    if needs[5]:
        out.append(grad.sum(dim=(0, 2, 3)).to(bc.dtype))
    if needs[6]:
        # the conv bias only shifts BN's batch mean: its gradient is zero, but eager's (the sum of BN's input
        # gradient) is NaN where a channel's is, which multiplying BN's parameter gradients by 0 keeps
        out.append((da + db).mul(0).to(w0.dtype) if p.batch_stats else w0.new_zeros(w0.shape[0]))
    out += [d for need, d in zip(needs[7:], dlows) if need]
    return _unaliased(out)


head_backward_op = torch.library.custom_op("hrfast::head_backward", _head_backward_impl, mutates_args=())


@head_backward_op.register_fake
def _(plan, grad, x0, w0, a, b, wc, bc, lows, mean, var, eps, needs, backend):
    # the launchers' allocation contract: dx0 like x0 in the logits' layout, dW0 like w0; dP_j like P_j (a
    # same-size branch: [N, M, H, W] in x0's dtype and the logits' layout, ds itself)
    p = HeadPlan.decode(plan)
    N, C0, H, W = x0.shape
    fmt = _logits_format(x0)
    out = []
    if needs[0]:
        out.append(torch.empty((N, C0, H, W), dtype=x0.dtype, device=x0.device, memory_format=fmt))
    if needs[1]:
        out.append(w0.new_empty(w0.shape))
    out += [param.new_empty(param.shape) for need, param in zip(needs[2:6], (a, b, wc, bc)) if need]
    if needs[6]:
        out.append(w0.new_empty(w0.shape[0]))
    for need, low, lp in zip(needs[7:], p.lows, lows):
        if need:
            out.append(torch.empty((N, w0.shape[0], H, W), dtype=x0.dtype, device=x0.device, memory_format=fmt)
                       if low.mode == SAME else torch.empty_like(lp))
    return out


def _head_setup_context(ctx, inputs, output):
    plan, x0, w0, a, b, wc, bc, conv_bias, lows, eps, backend = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x0, w0, a, b, wc, bc, mean, var, *lows)
    ctx.meta = (plan, eps, backend, conv_bias.dtype if conv_bias is not None else None)


def _head_backward(ctx, grad: Tensor, _grad_mean, _grad_var):
    x0, w0, a, b, wc, bc, mean, var, *lows = ctx.saved_tensors
    plan, eps, backend, conv_bias_dtype = ctx.meta
    need = ctx.needs_input_grad
    needs = [need[1], need[2], a is not None and need[3], b is not None and need[4], need[5],
             bc is not None and need[6], need[7], *need[8]]
    grads = iter(_backward_call(head_backward_op, _head_backward_impl, grad,
                                plan, grad, x0, w0, a, b, wc, bc, lows, mean, var, eps, needs, backend))
    dx0, dw0, da, db, dwc, dbc, dconv_bias, *dlows = [next(grads) if flag else None for flag in needs]
    if dconv_bias is not None:
        dconv_bias = dconv_bias.to(conv_bias_dtype)
    return (None, dx0, dw0, da, db, dwc, dbc, dconv_bias, dlows) + _no_grads(eps, backend)


head_forward_op.register_autograd(_head_backward, setup_context=_head_setup_context)


def head(plan: HeadPlan, x0: Tensor, w0: Tensor, a: Optional[Tensor], b: Optional[Tensor], wc: Tensor,
         bc: Optional[Tensor], conv_bias: Optional[Tensor], lows: Sequence[Tensor], eps: float,
         backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """The head op on a concrete fused backend: (logits, batch mean, batch var); see the notes above."""
    if _plain(x0):
        return _head_forward_plan(plan, x0, w0, a, b, wc, bc, list(lows), eps, backend)
    return head_forward_op(_encoded(plan), x0, w0, a, b, wc, bc, conv_bias, list(lows), eps, backend)


# ------------------------------------------------------------------------------------- the eager fast path

@cached(maxsize=1024)
def _encoded(plan) -> List[int]:
    return plan.encode()


# the number of active TorchDispatchModes (a private torch function, there since torch 2.0; without it every
# call takes the custom op)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)


def _watched(t: Tensor) -> bool:
    """Whether the dispatcher may be observed: tracing, an active TorchDispatchMode (FakeTensorMode, op
    counters, FlopCounterMode), a tensor subclass or meta tensors; then only the custom op itself will do."""
    # is_compiling first: torch.compile evaluates it to True while tracing and skips the rest
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or type(t) is not Tensor
            or _dispatch_modes() > 0 or t.is_meta)


def traced() -> bool:
    """Whether a tracer records this call: torch.compile or torch.export (Dynamo or non-strict), or jit.trace.
    Such a call must not read or fill host-side caches keyed on sizes: the sizes may be symbolic."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


@contextlib.contextmanager
def untraced():
    """jit.trace suspended, for host-side reads only (validation, plans): there a shape entry is an int, not
    the 0-d tensor jit.trace hands out to record dynamic sizes. A traced fused call is specialised to its sizes
    anyway (its plan is a list of constants), and nothing run here records a tensor op."""
    state = torch._C._get_tracing_state()
    if state is None:
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def sizes(t: Tensor) -> Tuple[int, ...]:
    """`t.shape` as a tuple of ints, also under jit.trace (see `untraced`); SymInts under dynamic shapes."""
    if torch.jit.is_tracing():
        with untraced():
            return tuple(t.shape)
    return tuple(t.shape)


def _plain(t: Tensor) -> bool:
    """A plain eager call without autograd (inference): the implementation itself will do."""
    return not torch.is_grad_enabled() and not _watched(t)


def _backward_call(op, impl, anchor: Tensor, *args):
    """A backward op from the registered autograd formula: its implementation directly in plain eager mode
    (autograd is done with it), the op itself when something watches the dispatcher."""
    return op(*args) if _watched(anchor) else impl(*args)
