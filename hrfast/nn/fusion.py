"""`HRFusion`: drop-in replacement for the fusion step of an HRNet module (`HighResolutionModule`, `HRModule`).

The original code computes, for every output branch i,

    y_i = ReLU( sum_j fuse_layers[i][j](x_j) )        (identity for j == i)

where `fuse_layers[i][j]` is conv1x1 -> norm -> upsample for j > i and a chain of strided 3x3 conv blocks
ending in conv -> norm for j < i. HRFusion keeps the very same `fuse_layers` submodule (so parameter and
buffer names, state_dict, optimizers and checkpoints are unchanged), runs the convolutions in PyTorch, folds
every last batch norm into a per-channel (scale, shift), and hands the terms to `hrfast.ops.fuse`, which
applies the affine maps, upsamples, sums and applies the ReLU in one pass without materialising the
upsampled or normalised tensors.
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import backends
from ..batchnorm import can_fold, fold_batch_norms
from ..hrnet.fusion import IDENTITY, FusionTerm, describe_fuse_layers, resample_from_args
from ..ops.fuse import fuse
from ..ops.fuse_step import StepRow, fuse_step
from ..plan import Resample

__all__ = ["HRFusion", "fusion_forward"]


def fusion_forward(fuse_layers: nn.ModuleList, xs: Sequence[Tensor], *, default: Optional[Resample] = None,
                   backend: str = "auto") -> List[Tensor]:
    """The fused fusion step over `fuse_layers` (what `HRFusion.forward` runs), as a function.

    `default` is the Resample of the j > i entries without an upsample module (None: such entries raise).
    Used by `HRFusion` and by `hrfast.patch`, which must not add a module to the model it patches.

    Order: every row's terms first (the convolutions, and the norms that are not folded), then all of the
    step's batch-norm folds at once, then the rows' fused ops; the same results and buffer updates as eager's
    row after row. Where a fold raises (batch norm's single-value error), the folds before it have updated their
    running statistics as eager's would, but so have the later rows' unfolded norms (those inside the
    strided-down chains), which eager would not have reached.
    """
    # read on every call: cheap, and it follows module swaps made after construction
    # (e.g. nn.SyncBatchNorm.convert_sync_batchnorm replacing the norms)
    rows, num_inputs = describe_fuse_layers(fuse_layers, default)
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"xs must be a list or tuple of tensors (one per branch), got {type(xs).__name__}")
    if len(xs) != num_inputs:
        raise ValueError(f"xs must hold {num_inputs} tensors (one per input branch of fuse_layers), got {len(xs)}")
    for j, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"xs[{j}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"xs[{j}] must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    resolved = backends.resolve(backend, xs[0].device)
    # every row's terms up to its foldable norms, then all of the step's folds at once (on Triton one
    # batch-statistics launch and one backward launch for the whole step), then one fused op per row, or in
    # training on Triton one op for the whole step (`hrfast.ops.fuse_step`)
    prepared = [_row_terms(row, xs, fold=resolved != "reference") for row in rows]
    deferred = [] if resolved == "triton" and _one_step_node(xs) else None
    where = _fold_step(rows, prepared, use_kernels=resolved == "triton", deferred=deferred)
    calls = [StepRow(r.terms, r.scales, r.shifts, [e.resample for e in row], tuple(xs[i].shape[2:]))
             for i, (row, r) in enumerate(zip(rows, prepared))]
    if deferred:
        return fuse_step(calls, [(*where[f.index], f) for f in deferred])
    return [fuse(c.inputs, scales=c.scales, shifts=c.shifts, resample=c.resample, size=c.size, relu=True,
                 backend=backend) for c in calls]


def _one_step_node(xs: Sequence[Tensor]) -> bool:
    """Whether the step may run as one autograd node (`fuse_step`): a gradient is being recorded, nothing
    traces the call (tracers see the row-by-row custom ops) and the inputs are plain, non-empty tensors."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and all(type(x) is Tensor and x.numel() > 0 for x in xs))


class _RowTerms(NamedTuple):
    """One row's fused-op arguments while the step is prepared; `_fold_step` fills the folded entries."""

    terms: List[Tensor]
    scales: List[Optional[Tensor]]
    shifts: List[Optional[Tensor]]
    to_fold: List[int]  # the terms whose norm `_fold_step` folds
    dtype: torch.dtype  # the row's common dtype (eager `+` promotes)


def _row_terms(row: Sequence[FusionTerm], xs: Sequence[Tensor], fold: bool) -> _RowTerms:
    """One row: each term up to its foldable norm (on the reference backend, `fold` False, the norms run as
    modules: the eager computation, op for op), the others in the row's common dtype."""
    terms, to_fold = [], []
    for j, entry in enumerate(row):
        h = xs[j]
        if entry.kind != IDENTITY:
            for m in entry.pre:
                h = m(h)
            if fold and can_fold(entry.last):
                to_fold.append(j)
            else:
                h = entry.last(h)
        terms.append(h)
    dtype = terms[0].dtype
    if any(t.dtype != dtype for t in terms):  # promote_types is an ATen call: only when there is mixing
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in terms])
    for j in range(len(row)):
        if j not in to_fold:
            terms[j] = terms[j].to(dtype)
    return _RowTerms(terms, [None] * len(row), [None] * len(row), to_fold, dtype)


def _fold_step(rows: Sequence[Sequence[FusionTerm]], prepared: Sequence[_RowTerms], use_kernels: bool,
               deferred: Optional[list] = None) -> List[Tuple[int, int]]:
    """Folds every row's `to_fold` norms in one `fold_batch_norms` call (row after row, term after term: the
    order eager runs them in, which is also the order an error leaves earlier folds done in), replacing each
    folded term by (term in the row's dtype, scale, shift) in `prepared`. Returns the folds' (row, term), in
    the order of `fold_batch_norms`'s inputs (`deferred`: passed on)."""
    where = [(i, j) for i, r in enumerate(prepared) for j in r.to_fold]
    if not where:
        return where
    folded = fold_batch_norms([rows[i][j].last for i, j in where], [prepared[i].terms[j] for i, j in where],
                              [prepared[i].dtype for i, _ in where], use_kernels=use_kernels, deferred=deferred)
    for (i, j), (term, scale, shift) in zip(where, folded):
        r = prepared[i]
        r.terms[j], r.scales[j], r.shifts[j] = term, scale, shift
    return where


class HRFusion(nn.Module):
    """Fused fusion step of an HRNet module: ``out[i] = ReLU(sum_j fuse_layers[i][j](xs[j]))``.

    A drop-in for the second half of `HighResolutionModule.forward` (official MSRA code, timm) or
    `HRModule.forward` (mmseg, mmpose, mmdet, mmpretrain): the part after ``x[i] = branches[i](x[i])``.
    It holds the module's own `fuse_layers` (the same object, not a copy), so ``HRFusion(m.fuse_layers)``
    has exactly the `fuse_layers.*` parameters and buffers of ``m``.

    Per output i and input j:

    - j == i: the branch output itself (`fuse_layers[i][j]` is None or nn.Identity).
    - j > i: ``Sequential(conv1x1, norm[, upsample])``. The conv runs in PyTorch at the low resolution,
      the norm is folded into the fused op's per-channel (scale, shift), and the op upsamples. The mode
      comes from the upsample module (`nn.Upsample`, mmcv `Upsample`) when there is one, else from the
      `upsample` / `align_corners` arguments, resizing to the exact size of ``xs[i]`` (as the official
      segmentation and facial-landmark code do with ``F.interpolate(size=...)`` in forward).
    - j < i: ``Sequential`` of ``Sequential(conv3x3 s2, norm[, relu])`` blocks. All blocks but the last
      run in PyTorch as they are; of the last block, everything but its final norm runs in PyTorch and
      that norm is folded.

    Norms: PyTorch batch norms (`BatchNorm2d`, `SyncBatchNorm` while it would not synchronise, thin
    subclasses that keep PyTorch's forward) are folded exactly, in training mode too: batch statistics
    over (N, H, W) with autograd through them, and the running statistics, momentum (or cumulative
    average when momentum is None) and `num_batches_tracked` updated as `nn.BatchNorm2d` does. Any other
    norm (GroupNorm, frozen BN, InPlaceABN, SyncBatchNorm while synchronising) runs as a module and its
    output enters the op unscaled. Forward hooks registered on a folded batch norm do not run.

    Terms of different dtypes (autocast: bf16 conv outputs next to an fp32 branch output) are promoted to
    their common dtype first, as eager PyTorch's ``+`` would.

    Args:
        fuse_layers: the module's `fuse_layers`, an `nn.ModuleList` of `nn.ModuleList` indexed
            ``[i_out][j_in]``; it may have fewer rows than inputs (``multi_scale_output=False``).
        upsample: None, 'nearest' or 'bilinear': the upsampling of the j > i entries that have no upsample
            module (it happens in the original forward). Ignored for entries that have one.
        align_corners: with ``upsample='bilinear'``, F.interpolate's align_corners (None means False).
        backend: passed to `hrfast.ops.fuse`: "auto", "triton", "cuda_cpp" or "reference" (`hrfast.backends`).

    Not scriptable with `torch.jit.script`.
    """

    def __init__(self, fuse_layers: nn.ModuleList, *, upsample: Optional[str] = None,
                 align_corners: Optional[bool] = None, backend: str = "auto"):
        super().__init__()
        backends.canonical(backend)
        default = resample_from_args(upsample, align_corners)
        describe_fuse_layers(fuse_layers, default)  # validate now: a layout HRFusion cannot run fails at construction
        self.fuse_layers = fuse_layers
        self.upsample = upsample
        self.align_corners = align_corners
        self.backend = backend
        self._default = default

    @classmethod
    def from_module(cls, hr_module: nn.Module, *, upsample: Optional[str] = None,
                    align_corners: Optional[bool] = None, backend: str = "auto") -> "HRFusion":
        """HRFusion over ``hr_module.fuse_layers`` (HighResolutionModule, HRModule or alike).

        The upsample mode of official-segmentation-style modules, whose fuse layers have no upsample
        module, is not visible on the module: pass `upsample` and `align_corners` for them.
        """
        if not isinstance(hr_module, nn.Module) or not hasattr(hr_module, "fuse_layers"):
            raise TypeError(f"from_module expects an HRNet module with a `fuse_layers` attribute, got "
                            f"{type(hr_module).__name__}")
        fuse_layers = hr_module.fuse_layers
        if fuse_layers is None or isinstance(fuse_layers, nn.Identity):
            raise ValueError(f"{type(hr_module).__name__} has a single branch (fuse_layers is "
                             f"{type(fuse_layers).__name__}): there is no fusion step to replace")
        return cls(fuse_layers, upsample=upsample, align_corners=align_corners, backend=backend)

    @property
    def num_inputs(self) -> int:
        """Number of branch tensors `forward` takes (entries per row of `fuse_layers`)."""
        return len(self.fuse_layers[0])

    @property
    def num_outputs(self) -> int:
        """Number of tensors `forward` returns (rows of `fuse_layers`)."""
        return len(self.fuse_layers)

    def forward(self, xs: Sequence[Tensor]) -> List[Tensor]:
        """Fused outputs ``[ReLU(sum_j fuse_layers[i][j](xs[j])) for i in range(len(fuse_layers))]``.

        Args:
            xs: the branch outputs (after `branches`), one [N, C_j, H_j, W_j] tensor per input branch.

        Returns:
            A new list of fresh tensors (never views of `xs`); `xs` itself is not modified.
        """
        return fusion_forward(self.fuse_layers, xs, default=self._default, backend=self.backend)

    def extra_repr(self) -> str:
        try:
            rows, _ = describe_fuse_layers(self.fuse_layers, self._default)
            modes = sorted({e.resample.describe() for row in rows for e in row if e.resample is not None})
        except (TypeError, ValueError):
            modes = []
        upsample = "/".join(modes) if modes else "none"
        return f"backend={self.backend!r}, upsample={upsample}"
