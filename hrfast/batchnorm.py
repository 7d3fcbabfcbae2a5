"""Batch norm, folded: the one place hrfast turns a BN into the per-channel affine map its fused ops apply.

    bn(z) = z * scale + shift,   scale = weight / sqrt(var + eps),   shift = bias - mean * scale

with (mean, var) the running statistics (eval) or the batch statistics of z (training), exactly as ATen's batch
norm computes it (`alpha = invstd * weight`, `beta = bias - mean * alpha`). Only plain PyTorch batch norm is
folded: `_BatchNorm` subclasses whose forward is PyTorch's own (BatchNorm2d, mmcv/mmengine thin subclasses, and
SyncBatchNorm while it would not synchronise); any other norm runs as a module.

- `affine(mean, var, weight, bias, eps)`: the formula, for every caller (fusion terms, the head).
- `eval_affine(bn, dtype)`: the running-statistics fold of a module, cached while no gradient is needed: an
  eval forward does no fold work; the cache entry is dropped when a parameter or buffer changes (version
  counter or storage: in-place updates, `load_state_dict`, `.to()`).
- `fold_into_conv(conv, bn)`: the conv's (weight, bias) with the eval BN after it folded in (torch's
  `fuse_conv_bn_weights`), cached the same way; derived tensors, the modules' own stay untouched.
- `bn_step(bn)`: `_BatchNorm.forward`'s bookkeeping (counter, averaging factor, which statistics).
- `update_running_stats(...)`: `F.batch_norm`'s running-statistics update, given batch statistics.
- `fold_batch_norm(bn, z)`: (term, scale, shift) with bn's side effects, in eval and training mode; with batch
  statistics through `_BatchStatsFold` (Triton kernels when `use_kernels`, else plain PyTorch).
- `fold_batch_norms(bns, zs)`: the same for several (a fusion step's, every row's), the batch-statistics folds
  together: on the kernels one statistics launch (and finalize) and one backward launch for all of them; with
  `deferred`, the kernel folds' backward is left to the caller (`deferred_backward`, `hrfast.ops.fuse_step`).
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.autograd.function import once_differentiable
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["is_foldable_batchnorm", "can_fold", "affine", "running_affine", "eval_affine", "fold_into_conv",
           "bn_step", "BNStep", "update_running_stats", "fold_batch_norm", "fold_batch_norms", "DeferredFold",
           "deferred_backward"]

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


def can_fold(bn: Optional[nn.Module]) -> bool:
    """Whether `fold_batch_norm` folds this module now (False: run it as a module)."""
    return is_foldable_batchnorm(bn) and not _syncs(bn)


def accumulation_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """fp32 math (ATen's opmath for fp16/bf16/fp32), fp64 when any tensor is fp64."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def affine(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
           centre: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(scale, shift) of BN over statistics (mean, var), in their dtype: bn(z) = z * scale + shift.
    `centre` (a conv bias before the BN) is added to z first: shift = (centre - mean) * scale + bias."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = weight.to(scale.dtype) * scale
    offset = -mean if centre is None else centre.to(mean.dtype) - mean
    shift = offset * scale
    if bias is not None:
        shift = bias.to(shift.dtype) + shift
    return scale, shift


# ----------------------------------------------------------------------------------------------- the cache

# one entry per (owner, slot): an owner's derived values of different kinds (a BN's affine, a conv's folded
# weights, their packed forms) do not evict each other
# keyed by identity (modules, and tensors, whose == is elementwise): an entry goes with its owner
_CACHE: "WeakIdKeyDictionary[object, Dict[str, Tuple[Hashable, tuple]]]" = WeakIdKeyDictionary()
# modules with object identity as == go in a stdlib WeakKeyDictionary: its lookup is C code, 0.14 us against
# WeakIdKeyDictionary's 3.2 us, paid by every folded conv of an eval forward (W18-small: 72 per call)
_MODULE_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[str, Tuple[Hashable, tuple]]]" = \
    weakref.WeakKeyDictionary()


def _cache_for(owner: object):
    identity_eq = isinstance(owner, nn.Module) and type(owner).__eq__ is object.__eq__ \
        and type(owner).__hash__ is object.__hash__
    return _MODULE_CACHE if identity_eq else _CACHE


def _fingerprint(tensors) -> Hashable:
    """Identity, version counter and storage of each tensor: a dtype or device change (`.to()`, `.double()`)
    always brings new storage, in-place updates (optimizer steps, `load_state_dict`) bump the version."""
    return tuple([None if t is None else (id(t), t._version, t.data_ptr()) for t in tensors])


def _cached(owner: object, tensors, extra: Hashable, compute: Callable[[], tuple], slot: str = "affine") -> tuple:
    """compute() once per state of `tensors` (and `extra`); recomputed whenever autograd must see it."""
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)) \
            or torch.compiler.is_compiling():
        return compute()
    key = (_fingerprint(tensors), extra)
    cache = _cache_for(owner)
    entries = cache.get(owner)
    if entries is None:
        entries = cache[owner] = {}
    hit = entries.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    entries[slot] = (key, value)
    return value


def running_affine(running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float, dtype: torch.dtype, centre: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """`affine` of the running statistics in `dtype`, cached like `eval_affine` but keyed on the running-mean
    buffer: for the functional ops (the head), whose eval calls would otherwise fold again each time (about
    ten small kernels and their launches)."""
    tensors = (weight, bias, running_mean, running_var, centre)

    def compute():
        return affine(running_mean.to(dtype), running_var.to(dtype), weight, bias, eps, centre)

    return _cached(running_mean, tensors, (dtype, eps), compute, slot="running")


def eval_affine(bn: _BatchNorm, dtype: torch.dtype, centre: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(scale, shift) in `dtype` of BN normalising with its running statistics (cached, see the module notes).
    `centre`: a conv bias in front of the BN (see `affine`)."""
    return running_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, dtype, centre)


def fold_into_conv(conv: nn.Conv2d, bn: _BatchNorm) -> Tuple[Tensor, Tensor]:
    """(weight, bias) of ``conv`` with the eval-mode ``bn`` that follows it folded in: conv(x, weight, bias) equals
    bn(conv(x)) up to rounding. torch's `fuse_conv_bn_weights`, computed in fp32 for fp16/bf16 modules (their
    running statistics would lose the fold's precision) and rounded once to the conv's dtype.

    The results are derived tensors, detached (constants for autograd: callers that need gradients for the
    parameters run the modules instead); cached per conv until a parameter or buffer of either module changes
    (version counter, storage: optimizer steps, `load_state_dict`, `.to()`)."""
    # read from the modules' dicts: nn.Module.__getattr__ would cost more than the rest of a cache hit
    params, bn_params, buffers = conv._parameters, bn._parameters, bn._buffers
    tensors = (params["weight"], params.get("bias"), bn_params.get("weight"), bn_params.get("bias"),
               buffers["running_mean"], buffers["running_var"])

    def compute():
        dtype = conv.weight.dtype
        math_dtype = accumulation_dtype(*tensors) if dtype in (torch.float16, torch.bfloat16) else None
        up = [t if t is None or math_dtype is None else t.to(math_dtype) for t in tensors]
        with torch.no_grad():
            weight, bias = fuse_conv_bn_weights(up[0], up[1], up[4], up[5], bn.eps, up[2], up[3])
        return weight.detach().to(dtype), bias.detach().to(dtype)

    return _cached(conv, tensors, ("conv", bn.eps, id(bn)), compute, slot="fold")


# ---------------------------------------------------------------------------------------- BN's forward steps


class BNStep(NamedTuple):
    """What `_BatchNorm.forward` decides before normalising."""

    factor: float  # the running-average factor (momentum, or 1 / num_batches_tracked when momentum is None)
    batch_stats: bool  # normalise with the batch statistics (training, or no running statistics)
    running_mean: Optional[Tensor]  # the buffers F.batch_norm is given (None: not tracked in training)
    running_var: Optional[Tensor]


def bn_step(bn: _BatchNorm, count: bool = True) -> BNStep:
    """`_BatchNorm.forward`'s bookkeeping, side effect included (num_batches_tracked += 1 in training).
    `count=False`: the caller increments num_batches_tracked itself (the statistics kernels do, saving the
    add's launch); only with a momentum, where the factor does not read the counter."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if count or bn.momentum is None:
            bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    tracked = not bn.training or bn.track_running_stats
    return BNStep(factor, batch_stats, bn.running_mean if tracked else None, bn.running_var if tracked else None)


def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor,
                         var: Tensor, count: int, factor: float) -> None:
    """F.batch_norm's update from batch statistics (mean, biased var over `count` values), in their dtype:
    running = factor * batch + (1 - factor) * running, with the unbiased variance."""
    if running_mean is None or running_var is None:
        return
    with torch.no_grad():
        dt = mean.dtype
        unbiased = var.detach() * (count / (count - 1))
        running_mean.copy_(factor * mean.detach() + (1 - factor) * running_mean.to(dt))
        running_var.copy_(factor * unbiased + (1 - factor) * running_var.to(dt))


def check_batch_size(count: int, size) -> None:
    """F.batch_norm's _verify_batch_size: batch statistics need more than one value per channel."""
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


class FoldSpec(NamedTuple):
    """The constants of one term of `_BatchStatsFold`."""

    term_dtype: torch.dtype  # the term's dtype (z's, or the row's promoted dtype)
    dtype: torch.dtype  # the accumulation dtype (fp32, fp64 when anything is fp64)
    eps: float
    factor: float  # the running-average factor
    use_kernels: bool  # the Triton kernels (else plain PyTorch)


class _BatchStatsFold(torch.autograd.Function):
    """(z_k, weight_k, bias_k) -> (term_k, scale_k, shift_k) for k folds at once: batch norm's fold with batch
    statistics over (N, H, W), bn(z) = term * scale + shift, with the running-statistics update as a side effect
    of the forward. Applied as ``apply(specs, *zs, *weights, *biases, *running_means, *running_vars, *counters)``
    (k of each, None allowed but for z), returning the 3k outputs (term, scale, shift) term after term; one term
    is the k = 1 case. On the kernels the k folds share their launches (`hrfast.kernels.batch_norm`: one
    statistics launch, one finalize, one backward launch for a fusion step), each fold's arithmetic unchanged.

    Two implementations of the same computation: the Triton kernels (`hrfast.kernels.batch_norm`: one read of
    z for the statistics, one pass for z's gradient) and plain PyTorch (the reference, below). Both compute
    in `dtype` (fp32, fp64 when anything is fp64) and round z's gradient to z's dtype once: its two parts, the
    term's gradient and the statistics' correction, are summed in `dtype` as batch norm's own backward does
    (summed in bf16 the small correction would partly round away). With r = 1 / sqrt(var + eps),
    scale = w * r, shift = b - mean * scale and incoming (g_term, g_scale, g_shift):

        g_b = g_shift,   g_w = r * (g_scale - mean * g_shift),   g_mean = -scale * g_shift,
        g_var = -0.5 * r^3 * w * (g_scale - mean * g_shift),
        dz = g_term + g_mean / count + 2 * g_var * (z - mean) / count

    `counters`: num_batches_tracked tensors the kernels increment (None: the caller did). Once differentiable:
    a double backward raises (batch norm's fold has no second-order use in hrfast).
    """

    @staticmethod
    def forward(ctx, specs: Tuple[FoldSpec, ...], *tensors: Optional[Tensor]):
        k = len(specs)
        zs, weights, biases, running_means, running_vars, counters = (tensors[i * k:(i + 1) * k] for i in range(6))
        results: List[Optional[Tuple[Tensor, Tensor, Tensor]]] = [None] * k
        on_kernels = [i for i in range(k) if specs[i].use_kernels]
        for i, result in zip(on_kernels, _kernel_stats([specs[i] for i in on_kernels],
                                                       [[t[i] for t in (zs, weights, biases, running_means,
                                                                        running_vars, counters)]
                                                        for i in on_kernels])):
            results[i] = result
        for i in range(k):
            if not specs[i].use_kernels:
                z = zs[i]
                if counters[i] is not None:
                    counters[i].add_(1)
                results[i] = _reference_stats(z, weights[i], biases[i], specs[i].eps, specs[i].dtype,
                                              running_means[i], running_vars[i], specs[i].factor,
                                              z.shape[0] * z.shape[2] * z.shape[3])
        ctx.specs = specs
        ctx.bias_dtypes = [None if b is None else b.dtype for b in biases]
        ctx.save_for_backward(*zs, *weights, *[r[0] for r in results], *[r[1] for r in results])
        out = []
        for z, spec, (_, scale, shift) in zip(zs, specs, results):
            out += [z.to(spec.term_dtype) if spec.term_dtype != z.dtype else z.view_as(z), scale, shift]
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Optional[Tensor]):
        specs = ctx.specs
        k = len(specs)
        saved = ctx.saved_tensors
        zs, weights, stats, scales = (saved[i * k:(i + 1) * k] for i in range(4))
        needs = ctx.needs_input_grad[1:]
        dzs, g_weights, g_biases = [None] * k, [None] * k, [None] * k
        launch = []  # (term, BackwardTerm) for the kernels
        for i, spec in enumerate(specs):
            g_term, g_scale, g_shift = grads[3 * i:3 * i + 3]
            need_dz, need_dw, need_db = needs[i], needs[k + i] and weights[i] is not None, needs[2 * k + i]
            if spec.use_kernels:
                term, g_biases[i] = _kernel_backward_term(zs[i], g_term, stats[i], weights[i], g_scale, g_shift,
                                                          need_dz, need_dw, need_db, ctx.bias_dtypes[i])
                launch.append((i, term))
                continue
            if need_db:
                g_biases[i] = (torch.zeros_like(scales[i]) if g_shift is None else g_shift).to(ctx.bias_dtypes[i])
            if need_dz or need_dw:
                dz, g_weight = _reference_backward(zs[i], g_term, stats[i], weights[i], scales[i], g_scale,
                                                   g_shift, zs[i].shape[0] * zs[i].shape[2] * zs[i].shape[3])
                dzs[i], g_weights[i] = (dz if need_dz else None), (g_weight if need_dw else None)
        if launch:
            from hrfast.kernels import batch_norm as kernels
            for (i, _), (dz, g_weight) in zip(launch, kernels.batch_norm_backward([t for _, t in launch])):
                dzs[i], g_weights[i] = dz, g_weight
        return (None, *dzs, *g_weights, *g_biases, *([None] * (3 * k)))


def _kernel_stats(specs: Sequence[FoldSpec], tensors: Sequence[Sequence[Optional[Tensor]]]
                  ) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """(stats, scale, shift) of each fold on the kernels (one statistics launch for all, `batch_stats`);
    tensors[i] = (z, weight, bias, running_mean, running_var, counter) of fold i."""
    if not specs:
        return []
    from hrfast.kernels import batch_norm as kernels
    return kernels.batch_stats([kernels.StatsTerm(z, w, b, spec.eps, spec.dtype, rm, rv, spec.factor, counter)
                                for spec, (z, w, b, rm, rv, counter) in zip(specs, tensors)])


def _kernel_backward_term(z: Tensor, g_term: Optional[Tensor], stats: Tensor, weight: Optional[Tensor],
                          g_scale: Optional[Tensor], g_shift: Optional[Tensor], need_dz: bool, need_dw: bool,
                          need_db: bool, bias_dtype: Optional[torch.dtype], g_scaled: bool = False):
    """(the kernels' BackwardTerm, the bias gradient): the bias gradient is g_shift itself where its dtype is the
    bias's, else written by the backward kernel in the bias's dtype (no conversion launch); None unless
    `need_db`. `g_scaled`: g_term is the gradient of the scaled term (`kernels.BackwardTerm`)."""
    from hrfast.kernels import batch_norm as kernels
    g_bias = g_bias_out = None
    if need_db:
        if g_shift is not None and g_shift.dtype == bias_dtype:
            g_bias = g_shift
        else:
            g_bias = g_bias_out = torch.empty(stats.shape[1:], dtype=bias_dtype, device=stats.device)
    return kernels.BackwardTerm(z, g_term, stats, weight, g_scale, g_shift, need_dz, need_dw, g_bias_out,
                                g_scaled), g_bias


class DeferredFold(NamedTuple):
    """A batch-statistics fold on the kernels whose backward its caller runs (`fold_batch_norms(deferred=...)`,
    `deferred_backward`): entry `index` of the call, its z, statistics [2, C] = (mean, r) and module tensors."""

    index: int
    z: Tensor
    stats: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]


def deferred_backward(folds: Sequence[DeferredFold], g_terms: Sequence[Optional[Tensor]],
                      g_scaled: Sequence[bool], g_scales: Sequence[Optional[Tensor]],
                      g_shifts: Sequence[Optional[Tensor]], needs: Sequence[Tuple[bool, bool, bool]]
                      ) -> List[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """(dz, g_weight, g_bias) of each deferred fold given the gradients of its (term, scale, shift), as
    `_BatchStatsFold`'s backward computes them, in one kernel launch; `needs[i]` = (dz, weight, bias) wanted.
    `g_scaled[i]`: g_terms[i] is the gradient of term * scale (the fused op's g of an output-size term), scaled
    by the kernel as it reads it."""
    from hrfast.kernels import batch_norm as kernels
    terms, g_biases = [], []
    for f, g_term, scaled, g_scale, g_shift, (need_dz, need_dw, need_db) in zip(folds, g_terms, g_scaled, g_scales,
                                                                                g_shifts, needs):
        term, g_bias = _kernel_backward_term(f.z, g_term, f.stats, f.weight, g_scale, g_shift, need_dz,
                                             need_dw and f.weight is not None, need_db and f.bias is not None,
                                             None if f.bias is None else f.bias.dtype, scaled)
        terms.append(term)
        g_biases.append(g_bias)
    out = kernels.batch_norm_backward(terms) if terms else []
    return [(dz, g_weight, g_bias) for (dz, g_weight), g_bias in zip(out, g_biases)]


def _reference_stats(z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, dtype: torch.dtype,
                     running_mean: Optional[Tensor], running_var: Optional[Tensor], factor: float,
                     count: int) -> Tuple[Tensor, Tensor, Tensor]:
    """_BatchStatsFold's forward in PyTorch: (stats [2, C] = (mean, r), scale, shift) and the running update."""
    var, mean = torch.var_mean(z.to(dtype), dim=(0, 2, 3), correction=0)
    update_running_stats(running_mean, running_var, mean, var, count, factor)
    r = torch.rsqrt(var + eps)
    scale = r if weight is None else weight.to(dtype) * r
    shift = -mean * scale
    if bias is not None:
        shift = bias.to(dtype) + shift
    return torch.stack([mean, r]), scale, shift


def _reference_backward(z: Tensor, g_term: Optional[Tensor], stats: Tensor, weight: Optional[Tensor],
                        scale: Tensor, g_scale: Optional[Tensor], g_shift: Optional[Tensor],
                        count: int) -> Tuple[Tensor, Optional[Tensor]]:
    """_BatchStatsFold's backward in PyTorch: (dz in z's dtype, g_weight in weight's dtype or None)."""
    dtype = stats.dtype
    mean, r = stats[0], stats[1]
    g_shift = torch.zeros_like(mean) if g_shift is None else g_shift.to(dtype)
    t = -mean * g_shift if g_scale is None else g_scale.to(dtype) - mean * g_shift  # g_scale - mean * g_shift
    w = torch.ones_like(mean) if weight is None else weight.to(dtype)
    g_mean = -scale * g_shift
    g_var = -0.5 * r ** 3 * w * t
    c = (None, slice(None), None, None)  # [C] -> [1, C, 1, 1]
    dz = g_mean[c] / count + g_var[c] * 2 * (z.to(dtype) - mean[c]) / count
    if g_term is not None:
        dz = g_term.to(dtype) + dz
    g_weight = None if weight is None else (r * t).to(weight.dtype)
    return dz.to(z.dtype), g_weight


def fold_batch_norm(bn: nn.Module, z: Tensor, term_dtype: Optional[torch.dtype] = None,
                    use_kernels: bool = False) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """(term, scale, shift) with ``bn(z) == term * scale[:, None, None] + shift[:, None, None]``, or None.

    None means the module is not a batch norm that can be folded here (see `can_fold`): the caller then
    runs ``bn(z)`` itself. Otherwise this has the side effects of ``bn(z)`` (the running statistics update
    in training mode) and raises the same ValueError as batch norm for a single value per channel in
    training.

    `term` is z in `term_dtype` (default z's dtype), the tensor to hand to the fused op. scale and shift
    are [C] tensors in float32 (float64 for float64 inputs or modules), differentiable w.r.t. bn.weight,
    bn.bias and, when batch statistics are used, z; z's gradient is accumulated in that dtype.

    `use_kernels`: compute batch statistics and their backward with the Triton kernels
    (`hrfast.kernels.batch_norm`; the caller runs the fused op on Triton) where they can run on z's device and
    nothing traces the call; else in plain PyTorch (`_BatchStatsFold`). Same results up to rounding.
    """
    return fold_batch_norms([bn], [z], term_dtype, use_kernels)[0]


def fold_batch_norms(bns: Sequence[nn.Module], zs: Sequence[Tensor],
                     term_dtype: Union[None, torch.dtype, Sequence[Optional[torch.dtype]]] = None,
                     use_kernels: bool = False, deferred: Optional[List[DeferredFold]] = None
                     ) -> List[Optional[Tuple[Tensor, Tensor, Tensor]]]:
    """`fold_batch_norm` of each (bn, z) in order, with the same results and side effects, the batch-statistics
    folds done together: one `_BatchStatsFold` for all of them, so on the kernels one statistics launch (one
    finalize), and in backward one launch, for a whole fusion step (`hrfast.nn.fusion`: every row's folds; up
    to `hrfast.kernels.batch_norm.MAX_TERMS` per launch). `term_dtype`: one dtype for every term, or one per
    term (None: z's own). An error of term j (`_check_input_dim`, a single value per channel) is raised after
    terms 0..j-1 have folded, as a loop of `fold_batch_norm` would.

    `deferred`: a list to which the batch-statistics folds on the kernels whose term is z itself (no dtype
    conversion) are appended as `DeferredFold`s; their (term, scale, shift) are (z, scale, shift) with no
    autograd node: the caller owns their backward (`deferred_backward`; `hrfast.ops.fuse_step` runs it inside
    the fused step's backward, reading the fused op's gradient where `_BatchStatsFold` would need it written)."""
    if len(bns) != len(zs):
        raise ValueError(f"fold_batch_norms: {len(bns)} modules for {len(zs)} inputs")
    if isinstance(term_dtype, (list, tuple)):
        if len(term_dtype) != len(zs):
            raise ValueError(f"fold_batch_norms: term_dtype holds {len(term_dtype)} dtypes for {len(zs)} inputs")
        term_dtypes = list(term_dtype)
    elif term_dtype is None or isinstance(term_dtype, torch.dtype):
        term_dtypes = [term_dtype] * len(zs)
    else:
        raise TypeError(f"fold_batch_norms: term_dtype must be a torch.dtype, a sequence of them or None, got "
                        f"{type(term_dtype).__name__}")
    results: List[Optional[Tuple[Tensor, Tensor, Tensor]]] = [None] * len(bns)
    pending: List[Tuple[int, FoldSpec, tuple]] = []  # batch-statistics folds: (index, spec, tensors)
    try:
        for i, (bn, z) in enumerate(zip(bns, zs)):
            if not can_fold(bn):
                continue
            dtype = term_dtypes[i] or z.dtype
            bn._check_input_dim(z)
            if z.dim() != 4:
                raise ValueError(f"expected a 4-D input [N, C, H, W] for {type(bn).__name__}, got shape "
                                 f"{tuple(z.shape)}")
            count = z.shape[0] * math.prod(z.shape[2:])
            # the statistics kernels increment num_batches_tracked (no add launch of its own) where the factor does
            # not read it, and not for a batch too small (batch norm increments it before raising)
            counter = None
            if bn.training and use_kernels and bn.momentum is not None and bn.track_running_stats and count > 1 \
                    and bn.num_batches_tracked is not None and _kernels_run(z):
                counter = bn.num_batches_tracked
            step = bn_step(bn, count=counter is None)
            dt = accumulation_dtype(z, bn.weight, bn.bias, bn.running_mean, bn.running_var)
            if not step.batch_stats:
                scale, shift = eval_affine(bn, dt)
                results[i] = (z if z.dtype == dtype else z.to(dtype)), scale, shift
                continue
            check_batch_size(count, z.size())
            kernels = counter is not None or (use_kernels and _kernels_run(z))
            pending.append((i, FoldSpec(dtype, dt, bn.eps, step.factor, kernels),
                            (z, bn.weight, bn.bias, step.running_mean, step.running_var, counter)))
    finally:  # on an error too: the folds before it have their side effects
        now = [p for p in pending if deferred is not None and p[1].use_kernels and p[1].term_dtype == p[2][0].dtype]
        for (i, _, (z, weight, bias, *_)), (stats, scale, shift) in zip(
                now, _kernel_stats([spec for _, spec, _ in now], [tensors for _, _, tensors in now])):
            results[i] = (z, scale, shift)
            deferred.append(DeferredFold(i, z, stats, weight, bias))
        pending = [p for p in pending if not any(p is q for q in now)]
        if pending:
            specs = tuple(spec for _, spec, _ in pending)
            flat = [tensors[field] for field in range(6) for _, _, tensors in pending]
            out = _BatchStatsFold.apply(specs, *flat)
            for n, (i, _, _) in enumerate(pending):
                results[i] = tuple(out[3 * n:3 * n + 3])
    return results


def _kernels_run(z: Tensor) -> bool:
    """The Triton statistics kernels can run for z now: not while torch.compile / jit.trace / export trace
    (they see the PyTorch implementation), and on a device they run on."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    from . import backends

    if not backends.triton_status()[0]:
        return False
    from hrfast.kernels import batch_norm as kernels

    return kernels.can_launch(z.device)
