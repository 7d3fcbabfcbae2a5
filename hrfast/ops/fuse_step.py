"""A training fusion step on Triton as one autograd node: every row's fused op and the backward of the step's
batch-norm folds.

Row by row (`hrfast.ops.fuse` per output branch, `_BatchStatsFold` for the folds), autograd hands gradients
between nodes as tensors, so the fused op must write dz = g * scale_k for every folded output-size term (the
strided-down terms) for the fold's backward to read, and each row sums its per-channel gradients in a launch
of its own. As one node, the step's backward
- lets the batch-norm backward read each row's g (written once anyway: the gradient of the row's own branch)
  and apply the scale as it reads it (`BackwardCall.scaled_by_caller`, the batch-norm kernel's G_SCALED):
  one full-resolution write less per strided-down term (W48 stage 4: six terms, 34.6 MB in bf16);
- runs every row's output-size backward in one `_fuse_backward_same_kernel` launch, every row's phase-form
  upsampled terms in one `_adjoint_rows_kernel` launch, and sums every row's per-channel gradients in one
  `_reduce_partials_kernel` launch (one of each per row before).
The forward runs every row's fused kernel in one launch (`fuse_forward_rows_with_bits`), which also writes
the ReLU's mask as bits for the rows whose size allows (multiples of 8 rows and columns, phase-form terms):
their backward reads 1/16 of y's bytes (bf16), not y (W48 stage 4, 512x1024 b8 bf16: 44 MB less). The
arithmetic is the row-by-row path's, but for dz of a strided-down term, now rounded once (g * scale is no
longer stored in the term's dtype first).

`hrfast.nn.fusion.fusion_forward` takes it in training on the Triton backend whenever a batch norm folds onto
the kernels (`fold_batch_norms(deferred=...)`); traced calls (torch.compile, export, jit.trace) fold in
PyTorch and take the row-by-row custom ops.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..batchnorm import DeferredFold, deferred_backward
from ..plan import SAME, FusePlan
from .fuse import _checked

__all__ = ["StepRow", "FuseStepFunction", "fuse_step"]


class StepRow(NamedTuple):
    """One output branch of a step: `hrfast.ops.fuse`'s arguments (ReLU applied)."""

    inputs: List[Tensor]
    scales: List[Optional[Tensor]]
    shifts: List[Optional[Tensor]]
    resample: list
    size: Tuple[int, int]

    def plan(self) -> FusePlan:
        """The row's plan, its arguments validated as `hrfast.ops.fuse` validates them."""
        return _checked(self.inputs, self.scales, self.shifts, self.resample, self.size, True)[0]


class _Layout(NamedTuple):
    """The non-tensor constants of one `FuseStepFunction`: each row's plan, and where each fold's term sits."""

    plans: Tuple[FusePlan, ...]
    folds: Tuple[Tuple[int, int], ...]  # (row, term) of fold f

    def counts(self, i: int) -> Tuple[int, int, int]:
        """(terms, present scales, present shifts) of row i: its share of the flat inputs."""
        terms = self.plans[i].terms
        return len(terms), sum(t.has_scale for t in terms), sum(t.has_shift for t in terms)


def fuse_step(rows: Sequence[StepRow], folds: Sequence[Tuple[int, int, DeferredFold]]) -> List[Tensor]:
    """y_i = ReLU(sum_k Up_k(x_ik * scale_ik + shift_ik)) of every row, as `hrfast.ops.fuse` on Triton computes
    them, with the deferred batch-norm folds `folds` = (row, term, fold) inside the step's backward (their term
    is the fold's z, their scale / shift the fold's, not differentiated: the gradients go to z and the module's
    weight / bias through the fold's backward). Validates each row as `fuse` does."""
    plans, flat = [], []
    for row in rows:
        plans.append(row.plan())
        flat += list(row.inputs)
        flat += [s.contiguous() for s in row.scales if s is not None]
        flat += [b.contiguous() for b in row.shifts if b is not None]
    for _, _, f in folds:
        flat += [f.weight, f.bias, f.stats]
    layout = _Layout(tuple(plans), tuple((i, k) for i, k, _ in folds))
    return list(FuseStepFunction.apply(layout, *flat))


class FuseStepFunction(torch.autograd.Function):
    """Applied as ``apply(layout, *row_0 terms, *row_0 scales, *row_0 shifts, ..., *(weight, bias, stats) per
    fold)`` (the present scales / shifts only); returns the rows' outputs."""

    @staticmethod
    def forward(ctx, layout: _Layout, *flat):
        from hrfast.kernels import fuse as K

        rows, folds = _unflatten(layout, flat)
        calls = [(plan, *row) for plan, row in zip(layout.plans, rows)]
        if any(ctx.needs_input_grad):
            outs = K.fuse_forward_rows_with_bits(calls)
        else:  # no backward to come (no_grad): no bits
            outs = [(y, None) for y in K.fuse_forward_rows(calls)]
        ys = [y for y, _ in outs]
        # the ReLU mask each row's backward reads: its bits where the forward wrote them (1/16 of y's bytes in
        # bf16), else y
        masks = [y if bits is None else bits for y, bits in outs]
        ctx.bits = tuple(bits is not None for _, bits in outs)
        folded = set(layout.folds)
        needs = ctx.needs_input_grad[1:]
        # kept for backward: the ReLU masks, z of every fold, x_k where d(scale_k) is wanted
        kept, position = [], 0
        for i, (terms, scales, _) in enumerate(rows):
            n, n_scales, n_shifts = layout.counts(i)
            scale_needs = iter(needs[position + n:position + n + n_scales])
            for k, x in enumerate(terms):
                wants_dscale = layout.plans[i].terms[k].has_scale and next(scale_needs)
                kept.append(x if (i, k) in folded or wants_dscale else None)
            position += n + n_scales + n_shifts
        ctx.shapes = [tuple(x.shape) for terms, _, _ in rows for x in terms]
        ctx.layout = layout
        params = [t for _, scales, shifts in rows for t in scales + shifts if t is not None]
        ctx.save_for_backward(*masks, *kept, *params, *[t for fold in folds for t in fold])
        return tuple(ys)

    @staticmethod
    @once_differentiable
    def backward(ctx, *dys):
        from hrfast.kernels import fuse as K

        layout = ctx.layout
        plans = layout.plans
        saved = iter(ctx.saved_tensors)
        masks = [next(saved) for _ in plans]
        kept = [next(saved) for _ in ctx.shapes]
        params = [next(saved) for i in range(len(plans)) for _ in range(sum(layout.counts(i)[1:]))]
        folds = [tuple(next(saved) for _ in range(3)) for _ in layout.folds]
        needs = ctx.needs_input_grad[1:]
        fold_at = {where: f for f, where in enumerate(layout.folds)}
        fold_needs = _fold_needs(layout, needs)
        calls, position, term_index, param_index = [], 0, 0, 0
        for i, plan in enumerate(plans):
            n, n_scales, n_shifts = layout.counts(i)
            row_params = iter(params[param_index:param_index + n_scales + n_shifts])
            scales = [next(row_params) if t.has_scale else None for t in plan.terms]
            shifts = [next(row_params) if t.has_shift else None for t in plan.terms]
            scale_needs = iter(needs[position + n:position + n + n_scales])
            shift_needs = iter(needs[position + n + n_scales:position + n + n_scales + n_shifts])
            row_needs, deferred, xs = [], [], []
            for k, t in enumerate(plan.terms):
                x = kept[term_index + k]
                xs.append(x if x is not None else dys[i].new_empty(()).expand(ctx.shapes[term_index + k]))
                need_scale, need_shift = t.has_scale and next(scale_needs), t.has_shift and next(shift_needs)
                if (i, k) in fold_at:
                    need_dz, need_w, need_b = fold_needs[fold_at[i, k]]
                    row_needs.append((need_dz, need_dz or need_w, need_dz or need_w or need_b))
                    if t.mode == SAME and need_dz:
                        deferred.append(k)
                else:
                    row_needs.append((needs[position + k], need_scale, need_shift))
            y, bits = (None, masks[i]) if ctx.bits[i] else (masks[i] if plan.relu else None, None)
            calls.append(K.BackwardCall(plan, dys[i], y, xs, scales, shifts, row_needs, deferred, relu_bits=bits))
            position += n + n_scales + n_shifts
            term_index += n
            param_index += n_scales + n_shifts
        # one output-size launch and one per-channel reduction for every row (`fuse_backward_rows`)
        grads = K.fuse_backward_rows(calls)
        starts = [sum(len(p.terms) for p in plans[:i]) for i in range(len(plans))]
        zs = [kept[starts[i] + k] for i, k in layout.folds]
        fold_grads = _folds_backward(layout, zs, folds, grads, fold_needs)
        out = [None]
        for i, plan in enumerate(plans):
            n = len(plan.terms)
            out += [fold_grads[fold_at[i, k]][0] if (i, k) in fold_at else grads[i][k][0] for k in range(n)]
            for field, flag in ((1, "has_scale"), (2, "has_shift")):
                out += [None if (i, k) in fold_at else grads[i][k][field]
                        for k, t in enumerate(plan.terms) if getattr(t, flag)]
        for _, g_weight, g_bias in fold_grads:
            out += [g_weight, g_bias, None]
        return tuple(out)


def _unflatten(layout: _Layout, flat: Sequence[Optional[Tensor]]):
    """(rows as (terms, scales per term, shifts per term), folds as (weight, bias, stats)) of the flat inputs."""
    rows, position = [], 0
    for i, plan in enumerate(layout.plans):
        n, n_scales, n_shifts = layout.counts(i)
        terms = list(flat[position:position + n])
        present = iter(flat[position + n:position + n + n_scales])
        scales = [next(present) if t.has_scale else None for t in plan.terms]
        present = iter(flat[position + n + n_scales:position + n + n_scales + n_shifts])
        shifts = [next(present) if t.has_shift else None for t in plan.terms]
        rows.append((terms, scales, shifts))
        position += n + n_scales + n_shifts
    folds = [tuple(flat[position + 3 * f:position + 3 * f + 3]) for f in range(len(layout.folds))]
    return rows, folds


def _fold_needs(layout: _Layout, needs: Sequence[bool]) -> List[Tuple[bool, bool, bool]]:
    """(dz, weight, bias) wanted of each fold: dz where its term (z) needs a gradient."""
    starts, position = [], 0
    for i in range(len(layout.plans)):
        starts.append(position)
        position += sum(layout.counts(i))
    return [(needs[starts[i] + k], needs[position + 3 * f], needs[position + 3 * f + 1])
            for f, (i, k) in enumerate(layout.folds)]


def _folds_backward(layout: _Layout, zs, folds, grads, fold_needs) -> List[Tuple[Optional[Tensor], ...]]:
    """(dz, g_weight, g_bias) of every fold, in one batch-norm backward launch: its term's gradient is the fused
    backward's (for an output-size term, g, scaled by the kernel as it reads it)."""
    records, g_terms, scaled, g_scales, g_shifts = [], [], [], [], []
    for (i, k), z, (weight, bias, stats), need in zip(layout.folds, zs, folds, fold_needs):
        dz_part, g_scale, g_shift = grads[i][k]
        term = layout.plans[i].terms[k]
        records.append(DeferredFold(-1, z, stats, weight, bias))
        g_terms.append(dz_part if need[0] else None)
        scaled.append(term.mode == SAME)
        g_scales.append(g_scale)
        g_shifts.append(g_shift)
    return deferred_backward(records, g_terms, scaled, g_scales, g_shifts, fold_needs)
