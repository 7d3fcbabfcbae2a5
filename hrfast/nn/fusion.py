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

from .._backend import BACKENDS
from ..ops.fuse import fuse
from ..ops.resample import MODES, Resample
from ._norm import can_fold, fold_batch_norm

__all__ = ["HRFusion", "fusion_forward"]

_IDENTITY, _UP, _DOWN = "identity", "up", "down"


class _Entry(NamedTuple):
    """How term (i, j) is computed: `pre` modules run in PyTorch in order, then `last` is either folded
    into the op's (scale, shift) (a foldable batch norm) or run too; `resample` upsamples in the op."""

    kind: str
    pre: Tuple[nn.Module, ...]
    last: Optional[nn.Module]
    resample: Optional[Resample]


def _is_upsample(module: nn.Module) -> bool:
    """nn.Upsample (and its UpsamplingNearest2d/UpsamplingBilinear2d subclasses) or an Upsample-like
    wrapper without parameters that names its `mode` and `scale_factor` (mmcv/mmseg `Upsample`)."""
    if isinstance(module, nn.Upsample):
        return True
    return (hasattr(module, "mode") and hasattr(module, "scale_factor")
            and next(module.parameters(recurse=True), None) is None)


def _parse_up(entry, where: str, default: Optional[Resample]) -> _Entry:
    if not isinstance(entry, nn.Sequential):
        raise ValueError(f"{where} (an upsample path, j > i) must be an nn.Sequential such as "
                         f"(conv1x1, norm[, upsample]), got {type(entry).__name__}")
    mods = list(entry)
    resample = None
    if mods and _is_upsample(mods[-1]):
        up = mods.pop()
        try:
            resample = Resample.from_module(up)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: cannot fuse its upsample module: {exc}") from exc
    for k, m in enumerate(mods):
        if _is_upsample(m):
            raise ValueError(f"{where}[{k}] is an upsample module that is not the last element; hrfast only "
                             "fuses (..., norm, upsample) paths")
    if not mods:
        raise ValueError(f"{where} holds no conv/norm before its upsample; expected (conv1x1, norm[, upsample])")
    if resample is None:
        if default is None:
            raise ValueError(
                f"{where} has no upsample module (the original code upsamples in forward, e.g. "
                "F.interpolate(size=..., mode='bilinear')), so HRFusion cannot see the mode: pass "
                "upsample='bilinear' (or 'nearest') and align_corners=True/False to HRFusion")
        resample = default
    return _Entry(_UP, tuple(mods[:-1]), mods[-1], resample)


def _parse_down(entry, where: str) -> _Entry:
    if not isinstance(entry, nn.Sequential) or len(entry) == 0:
        raise ValueError(f"{where} (a downsample chain, j < i) must be a non-empty nn.Sequential of "
                         f"(conv3x3 s2, norm[, relu]) blocks, got {type(entry).__name__}"
                         + (" of length 0" if isinstance(entry, nn.Sequential) else ""))
    links = list(entry)
    for k, m in enumerate(links):
        if m is None:
            raise ValueError(f"{where}[{k}] is None")
    pre = links[:-1]
    last_link = links[-1]
    if isinstance(last_link, nn.Sequential):
        if len(last_link) == 0:
            raise ValueError(f"{where}[{len(links) - 1}] is an empty nn.Sequential")
        inner = list(last_link)
        return _Entry(_DOWN, tuple(pre + inner[:-1]), inner[-1], None)
    return _Entry(_DOWN, tuple(pre), last_link, None)


def _parse(fuse_layers, default: Optional[Resample]) -> Tuple[List[List[_Entry]], int]:
    """The per-term plan of `fuse_layers`, validated; and the number of input branches."""
    if not isinstance(fuse_layers, nn.ModuleList):
        raise TypeError(f"fuse_layers must be an nn.ModuleList of nn.ModuleList (indexed [i_out][j_in]), got "
                        f"{type(fuse_layers).__name__}; a single-branch module (fuse_layers None or "
                        "nn.Identity) has no fusion step to replace")
    if len(fuse_layers) == 0:
        raise ValueError("fuse_layers is empty")
    num_inputs = None
    plan = []
    for i, row in enumerate(fuse_layers):
        if not isinstance(row, nn.ModuleList):
            raise TypeError(f"fuse_layers[{i}] must be an nn.ModuleList (one entry per input branch), got "
                            f"{type(row).__name__}")
        if num_inputs is None:
            num_inputs = len(row)
        elif len(row) != num_inputs:
            raise ValueError(f"fuse_layers[{i}] has {len(row)} entries but fuse_layers[0] has {num_inputs}; "
                             "every row needs one entry per input branch")
        entries = []
        for j, entry in enumerate(row):
            where = f"fuse_layers[{i}][{j}]"
            if j == i:
                if entry is not None and not isinstance(entry, nn.Identity):
                    raise ValueError(f"{where} (j == i) must be None or nn.Identity, got {type(entry).__name__}")
                entries.append(_Entry(_IDENTITY, (), None, None))
            elif j > i:
                entries.append(_parse_up(entry, where, default))
            else:
                entries.append(_parse_down(entry, where))
        plan.append(entries)
    if len(fuse_layers) > num_inputs:
        raise ValueError(f"fuse_layers has {len(fuse_layers)} rows (outputs) but only {num_inputs} inputs; "
                         "output i needs the identity entry fuse_layers[i][i]")
    return plan, num_inputs


def _default_resample(upsample: Optional[str], align_corners: Optional[bool]) -> Optional[Resample]:
    if upsample is None:
        if align_corners is not None:
            raise ValueError("align_corners is only meaningful with upsample='bilinear'; pass upsample= too")
        return None
    if not isinstance(upsample, str) or upsample not in MODES:
        raise ValueError(f"upsample must be None or one of {MODES}, got {upsample!r}")
    if align_corners is not None and not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool or None, got {type(align_corners).__name__}")
    if upsample == "nearest":
        if align_corners is not None:
            raise ValueError("align_corners can only be given with upsample='bilinear' (as in F.interpolate)")
        return Resample(mode="nearest")
    # F.interpolate's default for bilinear is align_corners=False (with a warning); keep it explicit
    return Resample(mode="bilinear", align_corners=bool(align_corners))


def _describe(r: Resample) -> str:
    if r.mode == "bilinear":
        return f"bilinear(align_corners={r.corners_aligned})"
    return "nearest"


def fusion_forward(fuse_layers: nn.ModuleList, xs: Sequence[Tensor], *, default: Optional[Resample] = None,
                   backend: str = "auto") -> List[Tensor]:
    """The fused fusion step over `fuse_layers` (what `HRFusion.forward` runs), as a function.

    `default` is the Resample of the j > i entries without an upsample module (None: such entries raise).
    Used by `HRFusion` and by `hrfast.patch`, which must not add a module to the model it patches.
    """
    # parsed on every call: cheap, and it follows module swaps made after construction
    # (e.g. nn.SyncBatchNorm.convert_sync_batchnorm replacing the norms)
    plan, num_inputs = _parse(fuse_layers, default)
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"xs must be a list or tuple of tensors (one per branch), got {type(xs).__name__}")
    if len(xs) != num_inputs:
        raise ValueError(f"xs must hold {num_inputs} tensors (one per input branch of fuse_layers), got {len(xs)}")
    for j, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"xs[{j}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"xs[{j}] must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    return [_fuse_row(row, xs, tuple(xs[i].shape[2:]), backend) for i, row in enumerate(plan)]


def _fuse_row(row: Sequence[_Entry], xs: Sequence[Tensor], size: Tuple[int, int], backend: str) -> Tensor:
    # first every term up to its foldable norm, then the common dtype (eager `+` promotes), then the fold
    terms, to_fold = [], []
    for j, entry in enumerate(row):
        h = xs[j]
        if entry.kind != _IDENTITY:
            for m in entry.pre:
                h = m(h)
            if can_fold(entry.last):
                to_fold.append(j)
            else:
                h = entry.last(h)
        terms.append(h)
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in terms])
    scales: List[Optional[Tensor]] = [None] * len(row)
    shifts: List[Optional[Tensor]] = [None] * len(row)
    for j in range(len(row)):
        if j in to_fold:
            terms[j], scales[j], shifts[j] = fold_batch_norm(row[j].last, terms[j], dtype)
        else:
            terms[j] = terms[j].to(dtype)
    return fuse(terms, scales=scales, shifts=shifts, resample=[e.resample for e in row], size=size, relu=True,
                backend=backend)


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
        backend: passed to `hrfast.ops.fuse`: "auto", "triton", "cuda" or "reference".

    Not scriptable with `torch.jit.script`.
    """

    def __init__(self, fuse_layers: nn.ModuleList, *, upsample: Optional[str] = None,
                 align_corners: Optional[bool] = None, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        default = _default_resample(upsample, align_corners)
        _parse(fuse_layers, default)  # validate now: a layout HRFusion cannot run fails at construction
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
            plan, _ = _parse(self.fuse_layers, self._default)
            modes = sorted({_describe(e.resample) for row in plan for e in row if e.resample is not None})
        except (TypeError, ValueError):
            modes = []
        upsample = "/".join(modes) if modes else "none"
        return f"backend={self.backend!r}, upsample={upsample}"
