"""Folding a normalisation layer into the per-channel (scale, shift) that `hrfast.ops.fuse` applies in-kernel.

Only plain PyTorch batch norm is folded: `torch.nn.modules.batchnorm._BatchNorm` subclasses whose `forward` is
`_BatchNorm.forward` (BatchNorm2d, mmcv/mmengine thin subclasses) or `nn.SyncBatchNorm.forward` when it would not
synchronise. The fold reproduces `_BatchNorm.forward` exactly:

- normalisation with running statistics (eval mode with tracked stats):
  ``scale = weight * rsqrt(running_var + eps)``, ``shift = bias - running_mean * scale``;
- normalisation with batch statistics (training mode, or eval mode without running stats): mean and biased
  variance of the conv output over (N, H, W) in float32 (float64 for float64), folded the same way as
  differentiable torch expressions, so autograd yields batch norm's own gradients (through mean and var);
  for fp16/bf16 inputs the two parts of the input gradient (through the fused op and through the
  statistics) are summed in float32 and rounded once, as batch norm's backward does (`_Fork`);
- the running-statistics update of `_BatchNorm.forward` / `F.batch_norm` (``num_batches_tracked += 1``,
  momentum or the cumulative average when momentum is None, unbiased running variance), under no_grad.

ATen's batch norm applies the same fold (``alpha = invstd * weight``, ``beta = bias - mean * alpha``,
``out = in * alpha + beta``), so this matches PyTorch's own rounding behaviour.

Every other norm (GroupNorm, frozen BN, InPlaceABN-like modules, SyncBatchNorm while synchronising, a subclass
with its own forward) is not folded: the caller runs the module as is.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

_PLAIN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def is_foldable_batchnorm(module: Optional[nn.Module]) -> bool:
    """True for a batch norm whose forward is PyTorch's own, i.e. one whose effect the fold reproduces."""
    if not isinstance(module, _BatchNorm):
        return False
    if getattr(type(module), "forward", None) not in _PLAIN_FORWARDS:
        return False  # a subclass with its own forward (frozen BN, custom sync): unknown semantics
    has_uninit = getattr(module, "has_uninitialized_params", None)
    if callable(has_uninit) and has_uninit():  # LazyBatchNorm before its first forward
        return False
    return True


def _syncs(bn: _BatchNorm) -> bool:
    """Whether `nn.SyncBatchNorm.forward` would synchronise statistics across processes right now."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    group = bn.process_group if bn.process_group else dist.group.WORLD
    return dist.get_world_size(group) > 1


def _stats_dtype(z: Tensor, bn: _BatchNorm) -> torch.dtype:
    """fp32 math (ATen's opmath for fp16/bf16/fp32), fp64 when the input or the module is fp64."""
    tensors = (z, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def can_fold(bn: Optional[nn.Module]) -> bool:
    """Whether `fold_batch_norm` folds this module now (False: run it as a module)."""
    return is_foldable_batchnorm(bn) and not _syncs(bn)


class _Fork(torch.autograd.Function):
    """z -> (z as the fused op's term, z for the batch statistics), with the two gradients summed in the
    statistics' (accumulation) dtype and rounded to z's dtype once, as batch norm's own backward does.

    Without it autograd would round both contributions to bf16/fp16 and add them in that dtype: the
    mean/variance part of BN's input gradient is a small correction that such a sum partly rounds away.
    """

    @staticmethod
    def forward(ctx, z: Tensor, term_dtype: torch.dtype, stats_dtype: torch.dtype):
        ctx.z_dtype, ctx.stats_dtype = z.dtype, stats_dtype
        term = z.to(term_dtype) if term_dtype != z.dtype else z.view_as(z)
        stats = z.to(stats_dtype) if stats_dtype != z.dtype else z.view_as(z)
        return term, stats

    @staticmethod
    def backward(ctx, g_term: Optional[Tensor], g_stats: Optional[Tensor]):
        total = None
        for g in (g_term, g_stats):
            if g is not None:
                g = g.to(ctx.stats_dtype)
                total = g if total is None else total + g
        return (None if total is None else total.to(ctx.z_dtype)), None, None


def fold_batch_norm(bn: nn.Module, z: Tensor, term_dtype: Optional[torch.dtype] = None,
                    ) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """(term, scale, shift) with ``bn(z) == term * scale[:, None, None] + shift[:, None, None]``, or None.

    None means the module is not a batch norm that can be folded here (see `can_fold`): the caller then
    runs ``bn(z)`` itself. Otherwise this has the side effects of ``bn(z)`` (the running statistics update
    in training mode) and raises the same ValueError as batch norm for a single value per channel in
    training.

    `term` is z in `term_dtype` (default z's dtype), the tensor to hand to the fused op. scale and shift
    are [C] tensors in float32 (float64 for float64 inputs or modules), differentiable w.r.t. bn.weight,
    bn.bias and, when batch statistics are used, z; z's gradient is accumulated in that dtype.
    """
    if not can_fold(bn):
        return None
    term_dtype = term_dtype or z.dtype
    bn._check_input_dim(z)
    if z.dim() != 4:
        raise ValueError(f"expected a 4-D input [N, C, H, W] for {type(bn).__name__}, got shape {tuple(z.shape)}")

    # _BatchNorm.forward: the counter and the averaging factor come first
    factor = 0.0 if bn.momentum is None else bn.momentum
    update = bn.training and bn.track_running_stats
    if update and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    # F.batch_norm is given the running buffers only in eval mode or when they are tracked
    running_mean = bn.running_mean if not bn.training or bn.track_running_stats else None
    running_var = bn.running_var if not bn.training or bn.track_running_stats else None

    dt = _stats_dtype(z, bn)
    if use_batch_stats:
        count = z.shape[0] * math.prod(z.shape[2:])
        if count == 1:  # F.batch_norm's _verify_batch_size
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {z.size()}")
        if z.dtype == dt == term_dtype or not z.requires_grad:
            term, zs = z.to(term_dtype), z.to(dt)
        else:
            term, zs = _Fork.apply(z, term_dtype, dt)
        var, mean = torch.var_mean(zs, dim=(0, 2, 3), correction=0)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                unbiased = var.detach() * (count / (count - 1))
                # ATen: running = momentum * batch + (1 - momentum) * running, in the accumulation type
                new_mean = factor * mean.detach() + (1 - factor) * running_mean.to(dt)
                new_var = factor * unbiased + (1 - factor) * running_var.to(dt)
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
    else:
        term = z.to(term_dtype)
        mean = running_mean.to(dt)
        var = running_var.to(dt)

    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.to(dt) * scale
    shift = -mean * scale
    if bn.bias is not None:
        shift = bn.bias.to(dt) + shift
    return term, scale, shift
