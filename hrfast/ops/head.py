"""The HRNetV2 head, reordered and fused: logits = Cls(ReLU(BN(Conv1x1(cat[x0, Up(x1), Up(x2), Up(x3)])))).

Because a 1x1 conv and an upsample commute (Up's weights sum to 1), the conv is split by input branch:
Conv1x1(cat[...]) = W0 x0 + sum_j Up(W_j x_j) + b, with W_j x_j computed at branch j's own resolution
(PyTorch GEMMs, ~6.8x fewer FLOPs for W48). The Triton kernels then produce the logits tile by tile; the
15C-channel full-resolution tensor is never written, and backward recomputes it instead of storing it.

`hrnet_v2_head` validates its arguments, builds the call's `hrfast.plan.HeadPlan`, lets the backend registry
pick the implementation and runs it: the eager concat form (`hrfast.ops.reference.head_ref`), the custom op
`hrfast::head_forward` (`hrfast.ops.custom_ops`) over the Triton launchers, or, for "cuda_cpp", the
projections through torch plus the fusion op (`_head_by_fusion`).
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _autotune, backends
from ..batchnorm import accumulation_dtype, check_batch_size, running_affine, update_running_stats
from ..plan import Resample, as_resample, head_plan
from . import custom_ops
from .fuse import check_branches, check_tensor, fuse, require
from .reference import head_ref


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
        backend: "auto", "triton", "cuda_cpp" (alias "cuda") or "reference": see `hrfast.backends`.

    Returns:
        logits [N, K, H_0, W_0] in the inputs' dtype (the autocast dtype under autocast, see below).

    Autocast: the head is a chain of convs, so under `torch.autocast` (any device type, e.g. "cuda" or "cpu")
    the fused path does what autocast does to the eager head's convs: non-fp64 branches are cast to the
    autocast dtype and the whole op (the commuted 1x1 convs, the kernels, their backward) runs in that dtype
    with autocast disabled inside; BN's statistics and affine map stay in fp32 and the returned logits are in
    the autocast dtype. The custom ops themselves are not autocast ops (no `register_autocast`): they always
    see the one dtype chosen here. The reference backend simply runs the eager form under the caller's autocast.
    """
    bn = (running_mean, running_var, bn_weight, bn_bias)
    xs, resamples = _checked(xs, conv_weight, conv_bias, bn, cls_weight, cls_bias, training, momentum, eps, resample)
    use_batch_stats = training or (running_mean is None and running_var is None)  # as F.batch_norm's callers do
    N, C0, H, W = custom_ops.sizes(xs[0])
    count = N * H * W
    device = xs[0].device
    if count <= 1 or C0 == 0 or xs[0].numel() == 0:
        impl = backends.resolve(backend, device)
    else:
        impl = backends.choose("head", backend, device, lambda: _signature(xs, conv_weight, conv_bias, bn, cls_weight,
                                                                           cls_bias, training, resamples),
                               lambda name: _measure_run(name, xs, conv_weight, conv_bias, bn, cls_weight, cls_bias,
                                                         training, momentum, eps, resamples))
    if impl == "reference" or xs[0].numel() == 0:
        return head_ref(xs, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, cls_weight,
                        cls_bias, [None] + resamples, use_batch_stats, momentum, eps)
    args = (conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, cls_weight, cls_bias, resamples,
            use_batch_stats, training, momentum, eps, impl)
    cast = _autocast_dtype(xs[0])
    if cast is not None:  # see "Autocast" above: run the op on cast branches, outside autocast
        with torch.autocast(device.type, enabled=False):
            return _fused([x.to(cast) for x in xs], *args)
    return _fused(xs, *args)


def _fused(xs: List[Tensor], conv_weight: Tensor, conv_bias: Optional[Tensor], running_mean: Optional[Tensor],
           running_var: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], cls_weight: Tensor,
           cls_bias: Optional[Tensor], resamples: List, use_batch_stats: bool, training: bool, momentum: float,
           eps: float, impl: str) -> Tensor:
    """The validated head on a fused backend, with autocast already applied to the branches (the weights take
    their dtype here, as autocast's convs would)."""
    N, _, H, W = custom_ops.sizes(xs[0])
    count = N * H * W
    M = custom_ops.sizes(conv_weight)[0]
    if use_batch_stats:  # before any kernel runs
        check_batch_size(count, [N, M, H, W])
    if impl == "cuda_cpp":
        return _head_by_fusion(xs, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias,
                               cls_weight, cls_bias, resamples, use_batch_stats, momentum, eps, impl)
    dtype = xs[0].dtype
    w0, *low_weights = conv_weight.reshape(M, -1).to(dtype).split([custom_ops.sizes(x)[1] for x in xs], dim=1)
    # the commuted 1x1 convs, at each branch's own resolution
    lows = [F.conv2d(x, w[:, :, None, None]) for x, w in zip(xs[1:], low_weights)]
    plan = head_plan(tuple(custom_ops.sizes(p)[2:] for p in lows), tuple(resamples), (H, W), use_batch_stats)
    wc = cls_weight.reshape(custom_ops.sizes(cls_weight)[0], M).to(dtype)
    cls_bias = cls_bias.contiguous() if cls_bias is not None else None  # indexed densely by the kernel
    if use_batch_stats:
        logits, mean, var = custom_ops.head(plan, xs[0], w0, bn_weight, bn_bias, wc, cls_bias, conv_bias, lows, eps,
                                            impl)
        if training:
            centred = mean if conv_bias is None else mean + conv_bias.double()
            update_running_stats(running_mean, running_var, centred, var, count, momentum)
        return logits
    scale, shift = running_affine(running_mean, running_var, bn_weight, bn_bias, eps, accumulation_dtype(xs[0]),
                                  centre=conv_bias)
    logits, _, _ = custom_ops.head(plan, xs[0], w0, scale, shift, wc, cls_bias, None, lows, eps, impl)
    return logits


def _head_by_fusion(xs: Sequence[Tensor], conv_weight: Tensor, conv_bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor], bn_weight: Optional[Tensor],
                    bn_bias: Optional[Tensor], cls_weight: Tensor, cls_bias: Optional[Tensor], resamples: List,
                    batch_stats: bool, momentum: float, eps: float, backend: str) -> Tensor:
    """The head through the fusion op (the "cuda_cpp" backend has no head kernel): P_j = W_j x_j through torch
    (cuBLAS / cuDNN), then what is left, the upsample-sum-affine-ReLU over the P_j, is exactly the fusion op
    with BN's per-channel affine on every term (eval: one fused kernel; batch statistics: the fused sum, then
    F.batch_norm and ReLU), then the classifier conv. The 15C-channel concatenation is never formed; unlike the
    Triton head, the M-channel hidden tensor is."""
    dtype = xs[0].dtype
    widths = [x.shape[1] for x in xs]
    projections = [F.conv2d(x, w.to(dtype)) for x, w in zip(xs, conv_weight.split(widths, dim=1))]
    terms = dict(resample=[None, *resamples], size=tuple(xs[0].shape[2:]), backend=backend)
    rest = [None] * (len(xs) - 1)
    if batch_stats:
        a = fuse(projections, shifts=[conv_bias, *rest], relu=False, **terms)
        z = F.relu(F.batch_norm(a, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps))
    else:
        scale, shift = running_affine(running_mean, running_var, bn_weight, bn_bias, eps,
                                      accumulation_dtype(xs[0]), centre=conv_bias)
        z = fuse(projections, scales=[scale] * len(xs), shifts=[shift, *rest], relu=True, **terms)
    return F.conv2d(z, cls_weight.to(dtype), None if cls_bias is None else cls_bias.to(dtype))


def _signature(xs, conv_weight, conv_bias, bn, cls_weight, cls_bias, training, resamples) -> tuple:
    """What of a call can change which backend is fastest (backend="auto" measures once per signature)."""
    sig = _autotune.tensor_signature
    autocast = _autocast_dtype(xs[0])
    params = (conv_weight, conv_bias, *bn, cls_weight, cls_bias)
    return (tuple(sig(x) for x in xs), tuple(sig(p) for p in params), tuple(resamples), training, autocast,
            torch.is_grad_enabled())


def _measure_run(name: str, xs, conv_weight, conv_bias, bn, cls_weight, cls_bias, training, momentum, eps,
                 resamples) -> None:
    """One forward (and backward when a gradient is needed) on `name`, on detached copies of the inputs; the
    running statistics are cloned, so the caller's buffers are updated once, by the real call."""
    xs_ = [_autotune.detached_like(x) for x in xs]
    params = (conv_weight, conv_bias, *bn, cls_weight, cls_bias)
    cw, cb, rm, rv, bw, bb, kw, kb = (_autotune.detached_like(p) for p in params)
    rm, rv = (t.clone() if t is not None else None for t in (rm, rv))
    out = hrnet_v2_head(xs_, cw, cb, rm, rv, bw, bb, kw, kb, training=training, momentum=momentum, eps=eps,
                        resample=resamples, backend=name)
    _autotune.forward_backward(out, xs_ + [cw, cb, bw, bb, kw, kb])


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast gives a conv of x here, or None when autocast is off for x's device (or x is fp64,
    which autocast leaves alone)."""
    if x.dtype == torch.float64 or x.is_meta or not torch.is_autocast_enabled(x.device.type):
        return None  # (autocast has no meta device: asking raises)
    return torch.get_autocast_dtype(x.device.type)


def _checked(xs, conv_weight, conv_bias, bn, cls_weight, cls_bias, training, momentum, eps, resample):
    """(xs as a list, resamples) of a call, validated; host-side reads only (untraced under jit.trace)."""
    if torch.jit.is_tracing():
        with custom_ops.untraced():
            return _checked_now(xs, conv_weight, conv_bias, bn, cls_weight, cls_bias, training, momentum, eps,
                                resample)
    return _checked_now(xs, conv_weight, conv_bias, bn, cls_weight, cls_bias, training, momentum, eps, resample)


def _checked_now(xs, conv_weight, conv_bias, bn, cls_weight, cls_bias, training, momentum, eps, resample):
    xs, resamples = _validate(xs, conv_weight, conv_bias, cls_weight, cls_bias, resample)
    _validate_bn(bn, conv_weight.shape[0], xs[0])
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    for name, value in (("momentum", momentum), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not value >= 0:
            raise ValueError(f"{name} must be a non-negative number (as in F.batch_norm), got {value!r}")
    return xs, resamples


def _weight_dtypes(x0: Tensor) -> Optional[tuple]:
    """The dtypes the convs' weights and biases may have: x0's, as eager conv2d requires, or any floating dtype
    under autocast, which casts them (None)."""
    return None if _autocast_dtype(x0) is not None else (x0.dtype,)


def _validate(xs, conv_weight, conv_bias, cls_weight, cls_bias, resample):
    if isinstance(xs, (list, tuple)) and not 1 <= len(xs) <= 4:
        raise ValueError(f"xs must hold 1 to 4 branch tensors (x0 first, the highest resolution), got {len(xs)}")
    check_branches(xs, "xs")
    for j, x in enumerate(xs[1:], start=1):
        for a in (2, 3):
            require(x.shape[a] <= xs[0].shape[a], lambda: f"xs[{j}] is {tuple(x.shape[2:])}, larger than xs[0] "
                    f"{tuple(xs[0].shape[2:])}: x0 must be the highest-resolution branch")
        if (x.shape[2] == 0 or x.shape[3] == 0) and xs[0].shape[2] > 0 and xs[0].shape[3] > 0:
            raise ValueError(f"xs[{j}] has an empty spatial size {tuple(x.shape[2:])}; it cannot be upsampled to "
                             f"xs[0]'s {tuple(xs[0].shape[2:])}")
    x0 = xs[0]
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
        check_tensor(w, name, tuple(w.shape), x0.device, _weight_dtypes(x0))
    for name, bias, n in (("conv_bias", conv_bias, conv_weight.shape[0]), ("cls_bias", cls_bias, cls_weight.shape[0])):
        if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (n,)):
            raise ValueError(f"{name} must be None or a [{n}] tensor, got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias is not None:
            check_tensor(bias, name, (n,), x0.device, _weight_dtypes(x0))
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
        for a in (0, 1) if r is None else ():
            require(x.shape[2 + a] == size[a], lambda: f"xs[{j}] is {tuple(x.shape[2:])} but xs[0] is {size}; give "
                                                       "it a resample")
        if r is not None and x.shape[1] == 0:
            raise ValueError(f"xs[{j}] has 0 channels; a resampled branch needs at least one (F.interpolate, "
                             "which the eager head calls, rejects it as well)")
        produced = r.output_size(tuple(x.shape[2:])) if r is not None else None
        for a in (0, 1) if produced is not None else ():
            require(produced[a] == size[a], lambda: f"resample for xs[{j}] (scale_factor={r.scale_factor}) gives "
                                                    f"{produced}, not xs[0]'s size {size}; use scale_factor=None to "
                                                    "resize to the exact size")
    return list(xs), resamples


def _validate_bn(bn, M: int, x0: Tensor) -> None:
    """BN's tensors: [M], on x0's device, in the dtype of BN's input (the conv's output: x0's, or autocast's) or,
    for a half-precision input, float32 (F.batch_norm's mixed precision)."""
    hidden = _autocast_dtype(x0) or x0.dtype
    dtypes = (hidden, torch.float32) if hidden in (torch.float16, torch.bfloat16) else (hidden,)
    names = ("running_mean", "running_var", "bn_weight", "bn_bias")
    for name, t in zip(names, bn):
        if t is not None and (not isinstance(t, Tensor) or t.shape != (M,)):
            raise ValueError(f"{name} must be None or a [{M}] tensor (one per head channel), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t is not None:
            check_tensor(t, name, (M,), x0.device, dtypes)
    if (bn[0] is None) != (bn[1] is None):
        raise ValueError("running_mean and running_var must both be given or both be None")


__all__: List[str] = ["hrnet_v2_head"]
