"""The HRNetV2 head, reordered and fused: logits = Cls(ReLU(BN(Conv1x1(cat[x0, Up(x1), Up(x2), Up(x3)])))).

Because a 1x1 conv and an upsample commute (Up's weights sum to 1), the conv is split by input branch:
Conv1x1(cat[...]) = W0 x0 + sum_j Up(W_j x_j) + b, with W_j x_j computed at branch j's own resolution
(PyTorch GEMMs, ~6.8x fewer FLOPs for W48). The Triton kernels then produce the logits tile by tile; the
15C-channel full-resolution tensor is never written, and backward recomputes it instead of storing it.

Layers: `hrnet_v2_head` (functional API, `F.batch_norm`-like BN arguments) -> the custom ops `hrfast::head_forward`
and `hrfast::head_backward` (`torch.library.custom_op` with fake implementations and autograd, so
`torch.compile(fullgraph=True)` traces through them) -> launchers in `hrfast.kernels.head`. Reference:
`hrfast.ops.reference.head_ref` (the eager concat form).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _autotune
from ._head_composed import head_by_fusion
from .fuse import _SAME, _no_grads, _resolve_backend, _term_plan, _unaliased
from .reference import head_ref
from .resample import Resample, as_resample


def _launchers(backend: str):
    """The module with `HeadPlan`, `HeadTensors` and the head launchers for a concrete backend (lazy import)."""
    if backend == "triton":
        from hrfast.kernels import head as launchers
    else:
        raise ValueError(f"no fused head launchers for backend {backend!r}")
    return launchers


# --------------------------------------------------------------------------------------------- custom ops
#
# hrfast::head_forward(x0, w0, a, b, wc, bc, conv_bias, lows, modes, align_corners, ratios, batch_stats, eps,
#                      backend) -> (logits, mean, var)
# hrfast::head_backward(grad, x0, w0, a, b, wc, bc, lows, mean, var, modes, align_corners, ratios, batch_stats,
#                       eps, needs, backend) -> the gradients `needs` asks for
#
# With `batch_stats`, (a, b) are BN's (weight, bias) (None allowed) and BN normalises with the batch statistics
# of s = W0 x0 + sum_j Up(P_j), computed by the op in a first pass and returned as float64 mean and biased var;
# otherwise (a, b) are the folded per-channel (scale, shift), differentiable expressions made by the caller,
# and mean/var are empty. `conv_bias` enters only for its gradient (exactly zero under batch statistics, where
# it only shifts BN's mean). The low-branch plan is flattened: `modes`, `align_corners` and `ratios` (4 ints per
# low branch: ratio_h num/den, ratio_w num/den).


def _plan(launchers, modes: Sequence[int], align_corners: Sequence[bool], ratios: Sequence[int]):
    return launchers.HeadPlan(tuple((modes[j], align_corners[j], (ratios[4 * j], ratios[4 * j + 1]),
                                     (ratios[4 * j + 2], ratios[4 * j + 3])) for j in range(len(modes))))


def _acc_dtype(x0: Tensor) -> torch.dtype:
    return torch.float64 if x0.dtype == torch.float64 else torch.float32


def _bn_affine(a: Optional[Tensor], b: Optional[Tensor], mean: Tensor, var: Tensor, batch_stats: bool,
               eps: float, acc: torch.dtype) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(scale, shift) the kernels apply, in `acc`, and with batch statistics also (rstd, scale) in float64.
    Forward and backward both call this: the backward recomputes bitwise the forward's scale and shift."""
    if not batch_stats:
        return a.to(acc).contiguous(), b.to(acc).contiguous(), None, None
    rstd = torch.rsqrt(var + eps)
    gamma = a.double() if a is not None else torch.ones_like(mean)
    beta = b.double() if b is not None else torch.zeros_like(mean)
    scale64 = gamma * rstd
    return scale64.to(acc), (beta - mean * scale64).to(acc), rstd, scale64


def _logits_format(x0: Tensor) -> torch.memory_format:
    return torch.channels_last if x0.stride(1) == 1 and x0.shape[1] > 1 else torch.contiguous_format


@torch.library.custom_op("hrfast::head_forward", mutates_args=())
def head_forward_op(x0: Tensor, w0: Tensor, a: Optional[Tensor], b: Optional[Tensor], wc: Tensor,
                    bc: Optional[Tensor], conv_bias: Optional[Tensor], lows: List[Tensor], modes: List[int],
                    align_corners: List[bool], ratios: List[int], batch_stats: bool, eps: float,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(logits [N, K, H, W] in x0's dtype, mean, var): see the schema notes above."""
    launchers = _launchers(backend)
    plan = _plan(launchers, modes, align_corners, ratios)
    t = launchers.HeadTensors(x0, lows, w0, wc, bc)
    if batch_stats:
        mean, var = launchers.head_batch_stats(plan, t)
    else:
        mean, var = (x0.new_empty((0,), dtype=torch.float64) for _ in range(2))
    scale, shift, _, _ = _bn_affine(a, b, mean, var, batch_stats, eps, _acc_dtype(x0))
    return launchers.head_forward(plan, t, scale, shift), mean, var


@head_forward_op.register_fake
def _(x0, w0, a, b, wc, bc, conv_bias, lows, modes, align_corners, ratios, batch_stats, eps, backend):
    N, _, H, W = x0.shape
    logits = torch.empty((N, wc.shape[0], H, W), dtype=x0.dtype, device=x0.device, memory_format=_logits_format(x0))
    stats = (w0.shape[0] if batch_stats else 0,)
    return logits, x0.new_empty(stats, dtype=torch.float64), x0.new_empty(stats, dtype=torch.float64)


@torch.library.custom_op("hrfast::head_backward", mutates_args=())
def head_backward_op(grad: Tensor, x0: Tensor, w0: Tensor, a: Optional[Tensor], b: Optional[Tensor], wc: Tensor,
                     bc: Optional[Tensor], lows: List[Tensor], mean: Tensor, var: Tensor, modes: List[int],
                     align_corners: List[bool], ratios: List[int], batch_stats: bool, eps: float, needs: List[bool],
                     backend: str) -> List[Tensor]:
    """The gradients `needs` asks for, in this order and each in its input's dtype: x0, w0, a, b, wc, bc, then
    one flag per low branch (a flag for an absent a, b or bc must be False)."""
    launchers = _launchers(backend)
    plan = _plan(launchers, modes, align_corners, ratios)
    t = launchers.HeadTensors(x0, lows, w0, wc, bc)
    scale, shift, rstd, scale64 = _bn_affine(a, b, mean, var, batch_stats, eps, _acc_dtype(x0))
    N, _, H, W = x0.shape
    # the einsums must stay in x0's dtype even when backward runs under the caller's autocast
    with torch.autocast(x0.device.type, enabled=False):
        dwc, sum_da, sum_da_s = launchers.head_backward_reduce(plan, t, scale, shift, grad)
        if batch_stats:
            count = N * H * W
            dbeta = sum_da.double()
            dgamma = rstd * (sum_da_s.double() - mean * dbeta)
            # BN's input gradient: scale * (dA - mean(dA) - s_hat * mean(dA * s_hat)) = scale*dA + alpha + beta*s
            alpha = (scale64 * (rstd * mean * dgamma - dbeta) / count).to(scale.dtype)
            beta = (-scale64 * rstd * dgamma / count).to(scale.dtype)
            ds = launchers.head_backward_ds(plan, t, scale, shift, grad, alpha, beta)
            da, db = dgamma, dbeta
        else:
            ds = launchers.head_backward_ds(plan, t, scale, shift, grad)
            da, db = sum_da_s, sum_da
        out = []
        if needs[0]:
            out.append(torch.einsum("mc,nmhw->nchw", w0, ds))
        if needs[1]:
            out.append(torch.einsum("nmhw,nchw->mc", ds, x0))
    for need, g, p in zip(needs[2:5], (da, db, dwc), (a, b, wc)):
        if need:
            out.append(g.to(p.dtype))
    if needs[5]:
        out.append(grad.sum(dim=(0, 2, 3)).to(bc.dtype))
    wanted = [j for j, need in enumerate(needs[6:]) if need]
    if wanted:
        out += launchers.upsample_adjoint(launchers.HeadPlan(tuple(plan.lows[j] for j in wanted)), ds,
                                          [lows[j] for j in wanted])
    return _unaliased(out)


@head_backward_op.register_fake
def _(grad, x0, w0, a, b, wc, bc, lows, mean, var, modes, align_corners, ratios, batch_stats, eps, needs, backend):
    # the launchers' allocation contract: ds [N, M, H, W] in x0's dtype and logits' layout; dP_j like P_j
    # (a same-size branch: like ds)
    N, _, H, W = x0.shape
    ds = torch.empty((N, w0.shape[0], H, W), dtype=x0.dtype, device=x0.device, memory_format=_logits_format(x0))
    out = []
    with torch.autocast(x0.device.type, enabled=False):  # as the real implementation
        if needs[0]:
            out.append(torch.einsum("mc,nmhw->nchw", w0, ds))
        if needs[1]:
            out.append(torch.einsum("nmhw,nchw->mc", ds, x0))
    out += [p.new_empty(p.shape) for need, p in zip(needs[2:6], (a, b, wc, bc)) if need]
    for need, mode, p in zip(needs[6:], modes, lows):
        if need:
            out.append(torch.empty_like(ds) if mode == _SAME else torch.empty_like(p))
    return out


def _head_setup_context(ctx, inputs, output):
    x0, w0, a, b, wc, bc, conv_bias, lows, modes, align_corners, ratios, batch_stats, eps, backend = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x0, w0, a, b, wc, bc, mean, var, *lows)
    ctx.plan = (modes, align_corners, ratios, batch_stats, eps, backend)
    ctx.conv_bias_dtype = conv_bias.dtype if conv_bias is not None else None


def _head_backward(ctx, grad: Tensor, _grad_mean, _grad_var):
    x0, w0, a, b, wc, bc, mean, var, *lows = ctx.saved_tensors
    modes, align_corners, ratios, batch_stats, eps, backend = ctx.plan
    need = ctx.needs_input_grad
    needs = [need[0], need[1], a is not None and need[2], b is not None and need[3], need[4],
             bc is not None and need[5], *need[7]]
    grads = iter(head_backward_op(grad, x0, w0, a, b, wc, bc, lows, mean, var, modes, align_corners, ratios,
                                  batch_stats, eps, needs, backend))
    dx0, dw0, da, db, dwc, dbc, *dlows = [next(grads) if flag else None for flag in needs]
    # with batch statistics the conv bias only shifts BN's mean: its gradient is exactly zero
    dconv_bias = w0.new_zeros(w0.shape[0], dtype=ctx.conv_bias_dtype) if need[6] else None
    return (dx0, dw0, da, db, dwc, dbc, dconv_bias, dlows) + _no_grads(modes, align_corners, ratios, batch_stats,
                                                                      eps, backend)


head_forward_op.register_autograd(_head_backward, setup_context=_head_setup_context)


def hrnet_v2_head(
    xs: Sequence[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    cls_weight: Tensor,
    cls_bias: Optional[Tensor] = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    resample=None,
    backend: str = "auto",
) -> Tensor:
    """Fused HRNetV2 head: ``Cls(ReLU(BN(Conv1x1(cat[x0, Up(x1), ...]))))`` without the concatenated tensor.

    Args:
        xs: branch outputs [N, C_j, H_j, W_j], x0 at the highest resolution; 1 to 4 tensors of one floating
            dtype, on one device.
        conv_weight, conv_bias: the 1x1 conv over the concatenation, [M, sum C_j, 1, 1] and [M] or None
            (official code has a bias, mmseg not).
        running_mean, running_var, bn_weight, bn_bias, training, momentum, eps: BN over the M channels with
            `F.batch_norm`'s meaning; with `training=True` batch statistics are used and the running buffers
            (if given) are updated in place.
        cls_weight, cls_bias: the 1x1 classifier [K, M, 1, 1] and [K] or None.
        resample: how xs[1:] are upsampled to xs[0]'s size: a `Resample` or mode string for all of them, or a
            list with one entry per low branch. Default: bilinear, align_corners=False, to the exact size.
        backend: "auto" (for CUDA tensors the fastest of Triton, the CUDA extension if built and the PyTorch
            reference, measured on the first call with each signature, see `hrfast._autotune`; for CPU
            tensors the reference), "triton", "cuda" or "reference".

    Returns:
        logits [N, K, H_0, W_0] in the inputs' dtype (the autocast dtype under autocast, see below).

    Autocast: the head is a chain of convs, so under `torch.autocast` (any device type, e.g. "cuda" or "cpu")
    the fused path does what autocast does to the eager head's convs: non-fp64 branches are cast to the
    autocast dtype and the whole op (the commuted 1x1 convs, the kernels, their backward) runs in that dtype
    with autocast disabled inside; BN's statistics and affine map stay in fp32 and the returned logits are in
    the autocast dtype. The custom ops themselves are not autocast ops (no `register_autocast`): they always
    see the one dtype chosen here. The reference backend simply runs the eager form under the caller's autocast.
    """
    xs, resamples = _validate(xs, conv_weight, conv_bias, cls_weight, cls_bias, resample)
    bn = (running_mean, running_var, bn_weight, bn_bias)
    _validate_bn(bn, conv_weight.shape[0], training, xs[0].device)
    impl = _resolve_backend(backend, xs[0].device)
    use_batch_stats = training or (running_mean is None and running_var is None)  # as F.batch_norm's callers do
    count = xs[0].shape[0] * xs[0].shape[2] * xs[0].shape[3]
    if _autotune.applies(backend, xs[0].device) and count > 1 and xs[0].shape[1] > 0:
        impl = _measured_backend(xs, conv_weight, conv_bias, bn, cls_weight, cls_bias, training, momentum, eps,
                                 resamples, impl)
    if impl == "reference" or xs[0].numel() == 0:
        return head_ref(xs, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, cls_weight,
                        cls_bias, [None] + resamples, use_batch_stats, momentum, eps)
    cast = _autocast_dtype(xs[0])
    if cast is not None:  # see "Autocast" above: run the op on cast branches, outside autocast
        with torch.autocast(xs[0].device.type, enabled=False):
            return hrnet_v2_head([x.to(cast) for x in xs], conv_weight, conv_bias, running_mean, running_var,
                                 bn_weight, bn_bias, cls_weight, cls_bias, training=training, momentum=momentum,
                                 eps=eps, resample=resamples, backend=impl)
    if use_batch_stats and count <= 1:  # F.batch_norm's _verify_batch_size, before any kernel runs
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{[xs[0].shape[0], conv_weight.shape[0], *xs[0].shape[2:]]}")
    if impl == "cuda":  # cuBLAS projections through torch + the CUDA fusion kernels: see _head_composed
        return head_by_fusion(xs, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias,
                              cls_weight, cls_bias, resamples, use_batch_stats, momentum, eps, impl)
    dtype = xs[0].dtype
    M = conv_weight.shape[0]
    weight = conv_weight.reshape(M, -1).to(dtype)
    offsets = [0]
    for x in xs:
        offsets.append(offsets[-1] + x.shape[1])
    w0 = weight[:, :offsets[1]]
    # the commuted 1x1 convs, at each branch's own resolution
    lows = [F.conv2d(x, weight[:, offsets[j]:offsets[j + 1], None, None]) for j, x in enumerate(xs) if j > 0]
    size = tuple(xs[0].shape[2:])
    plans = [_term_plan(r, p.shape[2:], size) for r, p in zip(resamples, lows)]
    modes, align_corners = [p.mode for p in plans], [p.align_corners for p in plans]
    ratios = [r for p in plans for r in (*p.ratio_h, *p.ratio_w)]
    wc = cls_weight.reshape(cls_weight.shape[0], M).to(dtype)
    cls_bias = cls_bias.contiguous() if cls_bias is not None else None  # indexed densely by the kernel
    if use_batch_stats:
        logits, mean, var = head_forward_op(xs[0], w0, bn_weight, bn_bias, wc, cls_bias, conv_bias, lows, modes,
                                            align_corners, ratios, True, eps, impl)
        if training and running_mean is not None and running_var is not None:
            count = xs[0].shape[0] * size[0] * size[1]
            _update_running_stats(running_mean, running_var, mean, var, conv_bias, count, momentum)
        return logits
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = bn_weight.to(acc) * scale
    centre = -running_mean.to(acc) if conv_bias is None else conv_bias.to(acc) - running_mean.to(acc)
    shift = centre * scale
    if bn_bias is not None:
        shift = bn_bias.to(acc) + shift
    logits, _, _ = head_forward_op(xs[0], w0, scale, shift, wc, cls_bias, None, lows, modes, align_corners, ratios,
                                   False, eps, impl)
    return logits


def _measured_backend(xs, conv_weight, conv_bias, bn, cls_weight, cls_bias, training, momentum, eps, resamples,
                      static: str) -> str:
    """backend='auto': the fastest backend for this call's signature (see hrfast._autotune). The measurement
    runs on clones of the running statistics, so the caller's buffers are updated once, by the real call."""
    sig = _autotune.tensor_signature
    device_type = xs[0].device.type
    autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    params = (conv_weight, conv_bias, *bn, cls_weight, cls_bias)
    signature = (tuple(sig(x) for x in xs), tuple(sig(p) for p in params), tuple(resamples), training, autocast,
                 torch.is_grad_enabled())

    def run(name: str) -> None:
        xs_ = [_autotune.detached_like(x) for x in xs]
        cw, cb, rm, rv, bw, bb, kw, kb = (_autotune.detached_like(p) for p in params)
        rm, rv = (t.clone() if t is not None else None for t in (rm, rv))
        out = hrnet_v2_head(xs_, cw, cb, rm, rv, bw, bb, kw, kb, training=training, momentum=momentum, eps=eps,
                            resample=resamples, backend=name)
        _autotune.forward_backward(out, xs_ + [cw, cb, bw, bb, kw, kb])

    return _autotune.choose("head", signature, xs[0].device, static, run)


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast gives a conv of x here, or None when autocast is off for x's device (or x is fp64,
    which autocast leaves alone)."""
    device_type = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _update_running_stats(running_mean, running_var, mean, var, conv_bias, count, momentum):
    with torch.no_grad():
        mean = mean if conv_bias is None else mean + conv_bias.double()
        unbiased = var * (count / (count - 1))
        running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.double())
        running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.double())


def _validate(xs, conv_weight, conv_bias, cls_weight, cls_bias, resample):
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"xs must be a list or tuple of tensors, got {type(xs).__name__}")
    if not 1 <= len(xs) <= 4:
        raise ValueError(f"xs must hold 1 to 4 branch tensors (x0 first, the highest resolution), got {len(xs)}")
    for j, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"xs[{j}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"xs[{j}] must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"xs[{j}] has dtype {x.dtype}; expected float16, bfloat16, float32 or float64")
        if x.dtype != xs[0].dtype:
            raise TypeError(f"xs[{j}] has dtype {x.dtype} but xs[0] has {xs[0].dtype}")
        if x.device != xs[0].device:
            raise ValueError(f"xs[{j}] is on {x.device} but xs[0] is on {xs[0].device}")
        if x.shape[0] != xs[0].shape[0]:
            raise ValueError(f"xs[{j}] has batch {x.shape[0]} but xs[0] has {xs[0].shape[0]}")
        if j and (x.shape[2] > xs[0].shape[2] or x.shape[3] > xs[0].shape[3]):
            raise ValueError(f"xs[{j}] is {tuple(x.shape[2:])}, larger than xs[0] {tuple(xs[0].shape[2:])}: "
                             "x0 must be the highest-resolution branch")
        if j and min(x.shape[2:]) == 0 and min(xs[0].shape[2:]) > 0:
            raise ValueError(f"xs[{j}] has an empty spatial size {tuple(x.shape[2:])}; it cannot be upsampled to "
                             f"xs[0]'s {tuple(xs[0].shape[2:])}")
    if xs[0].shape[0] > 65535:
        raise ValueError(f"xs have batch {xs[0].shape[0]}; the fused head supports at most 65535 images per call")
    for name, w, expect_in in (("conv_weight", conv_weight, sum(x.shape[1] for x in xs)),
                               ("cls_weight", cls_weight, conv_weight.shape[0] if isinstance(conv_weight, Tensor)
                                else None)):
        if not isinstance(w, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(w).__name__}")
        if w.dim() != 4 or w.shape[2:] != (1, 1):
            raise ValueError(f"{name} must be a 1x1 conv weight [out, in, 1, 1], got {tuple(w.shape)}")
        if w.shape[1] != expect_in:
            detail = (f"the branches have {[x.shape[1] for x in xs]} channels, {expect_in} in all"
                      if name == "conv_weight" else f"conv_weight has {expect_in} output channels")
            raise ValueError(f"{name} takes {w.shape[1]} input channels but {detail}")
        if w.device != xs[0].device:
            raise ValueError(f"{name} is on {w.device} but xs are on {xs[0].device}")
    for name, bias, n in (("conv_bias", conv_bias, conv_weight.shape[0]), ("cls_bias", cls_bias, cls_weight.shape[0])):
        if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (n,)):
            raise ValueError(f"{name} must be None or a [{n}] tensor, got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
    lows = len(xs) - 1
    if resample is None:
        resample = Resample("bilinear", align_corners=False)
    if isinstance(resample, (list, tuple)):
        if len(resample) != lows:
            raise ValueError(f"resample has {len(resample)} entries but there are {lows} low-resolution branches")
        resamples = [as_resample(r, f"resample[{j}]") for j, r in enumerate(resample)]
    else:
        resamples = [as_resample(resample, "resample")] * lows
    size = tuple(xs[0].shape[2:])
    for j, (x, r) in enumerate(zip(xs[1:], resamples), start=1):
        if r is None and tuple(x.shape[2:]) != size:
            raise ValueError(f"xs[{j}] is {tuple(x.shape[2:])} but xs[0] is {size}; give it a resample")
        produced = r.output_size(tuple(x.shape[2:])) if r is not None else None
        if produced is not None and produced != size:
            raise ValueError(f"resample for xs[{j}] (scale_factor={r.scale_factor}) gives {produced}, not xs[0]'s "
                             f"size {size}; use scale_factor=None to resize to the exact size")
    return list(xs), resamples


def _validate_bn(bn, M: int, training: bool, device) -> None:
    names = ("running_mean", "running_var", "bn_weight", "bn_bias")
    for name, t in zip(names, bn):
        if t is not None and (not isinstance(t, Tensor) or t.shape != (M,)):
            raise ValueError(f"{name} must be None or a [{M}] tensor (one per head channel), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but xs are on {device}")
    if (bn[0] is None) != (bn[1] is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")


__all__: List[str] = ["hrnet_v2_head"]
