"""The HRNetV2 head, reordered and fused: logits = Cls(ReLU(BN(Conv1x1(cat[x0, Up(x1), Up(x2), Up(x3)])))).

Because a 1x1 conv and an upsample commute (Up's weights sum to 1), the conv is split by input branch:
Conv1x1(cat[...]) = W0 x0 + sum_j Up(W_j x_j) + b, with W_j x_j computed at branch j's own resolution
(PyTorch GEMMs, ~6.8x fewer FLOPs for W48). The Triton kernels then produce the logits tile by tile; the
15C-channel full-resolution tensor is never written, and backward recomputes it instead of storing it.

Layers: `hrnet_v2_head` (functional API, `F.batch_norm`-like BN arguments) -> `HeadFunction` -> launchers in
`hrfast.kernels.head`. Reference: `hrfast.ops.reference.head_ref` (the eager concat form).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._backend import resolve_backend
from .fuse import _term_plan
from .reference import head_ref
from .resample import Resample, as_resample


class HeadFunction(torch.autograd.Function):
    """Autograd over the head kernels. With `batch_stats`, (a, b) are BN's (weight, bias) and BN normalises
    with the batch statistics of s (computed in a first pass, returned as mean and biased var); otherwise
    (a, b) are the folded per-channel (scale, shift), differentiable expressions made by the caller."""

    @staticmethod
    def forward(ctx, plan, batch_stats: bool, eps: float, x0, w0, a, b, wc, bc, conv_bias, *lows):
        from hrfast.kernels.head import HeadTensors, head_batch_stats, head_forward

        t = HeadTensors(x0, lows, w0, wc, bc)
        acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
        if batch_stats:
            mean, var = head_batch_stats(plan, t)
            rstd = torch.rsqrt(var + eps)
            gamma = a.double() if a is not None else torch.ones_like(mean)
            beta = b.double() if b is not None else torch.zeros_like(mean)
            scale64 = gamma * rstd
            scale, shift = scale64.to(acc), (beta - mean * scale64).to(acc)
            ctx.stats = (mean, rstd, scale64)
        else:
            scale, shift = a.to(acc).contiguous(), b.to(acc).contiguous()
            mean = var = torch.empty(0, dtype=torch.float64, device=x0.device)
        logits = head_forward(plan, t, scale, shift)
        ctx.plan, ctx.batch_stats = plan, batch_stats
        ctx.has = (a is not None, b is not None, bc is not None, conv_bias is not None)
        ctx.save_for_backward(x0, w0, wc, bc, scale, shift, *lows)
        ctx.mark_non_differentiable(mean, var)
        return logits, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_mean, _grad_var):
        from hrfast.kernels.head import HeadTensors, head_backward_ds, head_backward_reduce, upsample_adjoint

        x0, w0, wc, bc, scale, shift, *lows = ctx.saved_tensors
        plan = ctx.plan
        t = HeadTensors(x0, lows, w0, wc, bc)
        N, _, H, W = x0.shape
        dwc, sum_da, sum_da_s = head_backward_reduce(plan, t, scale, shift, grad)
        has_a, has_b, has_bc, has_conv_bias = ctx.has
        if ctx.batch_stats:
            mean, rstd, scale64 = ctx.stats
            count = N * H * W
            dbeta = sum_da.double()
            dgamma = rstd * (sum_da_s.double() - mean * dbeta)
            # BN's input gradient: scale * (dA - mean(dA) - s_hat * mean(dA * s_hat)) = scale*dA + alpha + beta*s
            alpha = (scale64 * (rstd * mean * dgamma - dbeta) / count).to(scale.dtype)
            beta = (-scale64 * rstd * dgamma / count).to(scale.dtype)
            ds = head_backward_ds(plan, t, scale, shift, grad, alpha, beta)
            da = dgamma.to(scale.dtype) if has_a else None
            db = dbeta.to(scale.dtype) if has_b else None
        else:
            ds = head_backward_ds(plan, t, scale, shift, grad)
            da, db = sum_da_s, sum_da
        dx0 = torch.einsum("mc,nmhw->nchw", w0, ds) if ctx.needs_input_grad[3] else None
        dw0 = torch.einsum("nmhw,nchw->mc", ds, x0) if ctx.needs_input_grad[4] else None
        dlows = upsample_adjoint(plan, ds, lows)
        dbc = grad.sum(dim=(0, 2, 3)) if has_bc else None
        # with batch statistics the conv bias only shifts BN's mean: its gradient is exactly zero
        dconv_bias = torch.zeros(w0.shape[0], dtype=grad.dtype, device=grad.device) if has_conv_bias else None
        return (None, None, None, dx0, dw0, da, db, dwc.to(wc.dtype), dbc, dconv_bias, *dlows)


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
        backend: "auto", "triton" or "reference".

    Returns:
        logits [N, K, H_0, W_0] in the inputs' dtype.
    """
    xs, resamples = _validate(xs, conv_weight, conv_bias, cls_weight, cls_bias, resample)
    bn = (running_mean, running_var, bn_weight, bn_bias)
    _validate_bn(bn, conv_weight.shape[0], training, xs[0].device)
    impl = resolve_backend(backend, xs[0].device)
    use_batch_stats = training or (running_mean is None and running_var is None)  # as F.batch_norm's callers do
    if impl == "reference" or xs[0].numel() == 0:
        return head_ref(xs, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, cls_weight,
                        cls_bias, [None] + resamples, use_batch_stats, momentum, eps)
    count = xs[0].shape[0] * xs[0].shape[2] * xs[0].shape[3]
    if use_batch_stats and count <= 1:  # F.batch_norm's _verify_batch_size, before any kernel runs
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{[xs[0].shape[0], conv_weight.shape[0], *xs[0].shape[2:]]}")
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
    from hrfast.kernels.head import HeadPlan

    plan = HeadPlan(tuple(tuple(_term_plan(r, p.shape[2:], size)) for r, p in zip(resamples, lows)))
    wc = cls_weight.reshape(cls_weight.shape[0], M).to(dtype)
    cls_bias = cls_bias.contiguous() if cls_bias is not None else None  # indexed densely by the kernel
    if use_batch_stats:
        logits, mean, var = HeadFunction.apply(plan, True, eps, xs[0], w0, bn_weight, bn_bias, wc, cls_bias,
                                               conv_bias, *lows)
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
    logits, _, _ = HeadFunction.apply(plan, False, eps, xs[0], w0, scale, shift, wc, cls_bias, None, *lows)
    return logits


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


__all__: List[str] = ["hrnet_v2_head", "HeadFunction"]
