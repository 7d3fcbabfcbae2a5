"""`HRNetV2Head`: drop-in fused HRNetV2 head, built from an existing head's layers.

Existing code computes ``cls(relu(bn(conv(cat[x0, Up(x1), Up(x2), Up(x3)]))))`` with the layers in one of
these layouts (HRNET_LAYOUTS.md section 4), all of which `HRNetV2Head.from_module` recognises:

- official segmentation `last_layer` and facial-landmark `head`: ``Sequential(conv1x1, BN, ReLU, conv1x1)``;
- mmseg `FCNHead` with ``input_transform='resize_concat'``: ``convs.0.{conv, bn, activate}`` and ``conv_seg``;
- mmpose `HeatmapHead` after the concat neck: ``conv_layers.{0, 1, 2}`` and ``final_layer``.

The head adopts the source module's children under their own names, so its state_dict has exactly the
source's keys and tensors (the same objects). Forward takes the branch features and runs
`hrfast.ops.hrnet_v2_head`; a head whose norm cannot be folded (GroupNorm, SyncBatchNorm while
synchronising, ...) runs the eager concat form with its own layers instead.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .._backend import BACKENDS
from ..ops.head import hrnet_v2_head
from ..ops.reference import resample_ref
from ..ops.resample import Resample, as_resample
from ._norm import can_fold

__all__ = ["HRNetV2Head"]

# layout name -> dotted paths of (conv, norm, act, classifier) in the source module
LAYOUTS = {
    "sequential": ("0", "1", "2", "3"),
    "mmseg": ("convs.0.conv", "convs.0.bn", "convs.0.activate", "conv_seg"),
    "mmpose": ("conv_layers.0", "conv_layers.1", "conv_layers.2", "final_layer"),
}


def _detect_layout(module: nn.Module) -> str:
    if isinstance(module, nn.Sequential) and len(module) == 4:
        return "sequential"
    if hasattr(module, "convs") and hasattr(module, "conv_seg"):
        return "mmseg"
    if hasattr(module, "conv_layers") and hasattr(module, "final_layer"):
        return "mmpose"
    raise ValueError(f"cannot recognise {type(module).__name__} as an HRNetV2 head: expected Sequential(conv1x1, "
                     "BN, ReLU, conv1x1) (official seg last_layer, facial head), an mmseg FCNHead (convs, conv_seg) "
                     "or an mmpose HeatmapHead (conv_layers, final_layer)")


def _check_pointwise(conv: nn.Module, where: str) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{where} must be an nn.Conv2d, got {type(conv).__name__}")
    if (conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1
            or conv.padding not in ((0, 0), "valid")):
        raise ValueError(f"{where} must be a plain 1x1 conv (stride 1, no padding, groups 1); got kernel "
                         f"{conv.kernel_size}, stride {conv.stride}, padding {conv.padding}, groups {conv.groups}: "
                         "the fused head cannot reorder it")


class HRNetV2Head(nn.Module):
    """Fused HRNetV2 head: ``classifier(ReLU(norm(conv(cat[x0, Up(x1), ...]))))`` without the concatenation.

    Args:
        source: the module holding the head's layers (its children are adopted under their own names).
        layout: "sequential", "mmseg" or "mmpose" (where the four layers sit in `source`).
        resample: how x1..x3 reach x0's size: a `Resample` or mode string (default bilinear,
            align_corners=False, to the exact size; the official segmentation code's `ALIGN_CORNERS` may
            be True).
        backend: "auto", "triton", "cuda" or "reference".
    """

    def __init__(self, source: nn.Module, layout: str = "sequential", *, resample=None, backend: str = "auto"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for name, child in source.named_children():
            self.add_module(name, child)
        for name, param in source.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in source.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self.layout = layout
        self.backend = backend
        self.resample = as_resample(resample, "resample") or Resample("bilinear", align_corners=False)
        conv_path, norm_path, act_path, cls_path = LAYOUTS[layout]
        try:
            conv, act, classifier = (self.get_submodule(p) for p in (conv_path, act_path, cls_path))
            self.get_submodule(norm_path)
        except AttributeError as exc:
            raise ValueError(f"{type(source).__name__} does not have the {layout} head layout: {exc}") from exc
        _check_pointwise(conv, conv_path)
        _check_pointwise(classifier, cls_path)
        if not isinstance(act, nn.ReLU):
            raise ValueError(f"{act_path} must be nn.ReLU, got {type(act).__name__}: the fused head applies ReLU")
        if layout == "mmseg":
            _check_mmseg(source)

    @classmethod
    def from_module(cls, head: nn.Module, *, resample=None, backend: str = "auto") -> "HRNetV2Head":
        """Recognises the layout of `head` (see the module docstring). For mmseg heads the resampling is read
        from the head (bilinear, its `align_corners`) unless given."""
        layout = _detect_layout(head)
        if layout == "mmseg" and resample is None:
            resample = Resample("bilinear", align_corners=bool(getattr(head, "align_corners", False)))
        return cls(head, layout, resample=resample, backend=backend)

    @classmethod
    def from_channels(cls, in_channels: Sequence[int], num_classes: int, *, conv_bias: bool = True,
                      cls_bias: bool = True, bn_momentum: float = 0.1, resample=None,
                      backend: str = "auto") -> "HRNetV2Head":
        """A new head over branches of `in_channels` (e.g. [48, 96, 192, 384]): the official layout."""
        if not in_channels or not all(isinstance(c, int) and c > 0 for c in in_channels):
            raise ValueError(f"in_channels must be positive ints, got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        width = sum(in_channels)
        layers = nn.Sequential(nn.Conv2d(width, width, 1, bias=conv_bias), nn.BatchNorm2d(width, momentum=bn_momentum),
                               nn.ReLU(inplace=False), nn.Conv2d(width, num_classes, 1, bias=cls_bias))
        return cls(layers, "sequential", resample=resample, backend=backend)

    def _role(self, index: int) -> nn.Module:
        return self.get_submodule(LAYOUTS[self.layout][index])

    @property
    def conv(self) -> nn.Conv2d:
        return self._role(0)

    @property
    def norm(self) -> nn.Module:
        return self._role(1)

    @property
    def classifier(self) -> nn.Conv2d:
        return self._role(3)

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        """Logits [N, K, H0, W0] from the branch features xs = [x0, x1, ...] (x0 the highest resolution)."""
        if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"xs must be a list or tuple of branch tensors, got {type(xs).__name__}")
        conv, norm, classifier = self.conv, self.norm, self.classifier
        if not can_fold(norm):
            return self._eager(xs)
        bn = norm
        factor = 0.0 if bn.momentum is None else bn.momentum  # _BatchNorm.forward's bookkeeping
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        tracked = not bn.training or bn.track_running_stats
        # under autocast hrnet_v2_head casts the branches as eager autocast casts the convs' inputs
        return hrnet_v2_head(list(xs), conv.weight, conv.bias, bn.running_mean if tracked else None,
                             bn.running_var if tracked else None, bn.weight, bn.bias, classifier.weight,
                             classifier.bias, training=use_batch_stats, momentum=factor, eps=bn.eps,
                             resample=self.resample, backend=self.backend)

    def _eager(self, xs: Sequence[Tensor]) -> Tensor:
        size = tuple(xs[0].shape[2:])
        ups = [xs[0]] + [resample_ref(x, self.resample, size) for x in xs[1:]]
        hidden = self.conv(torch.cat(ups, 1))
        return self.classifier(self._role(2)(self.norm(hidden)))

    def extra_repr(self) -> str:
        r = self.resample
        mode = r.mode + (f"(align_corners={r.corners_aligned})" if r.is_bilinear else "")
        return f"layout={self.layout!r}, resample={mode}, backend={self.backend!r}"


def _check_mmseg(head: nn.Module) -> None:
    """mmseg FCNHead: only the HRNetV2 configuration (one 1x1 ConvModule, no concat_input, no dropout)."""
    convs = getattr(head, "convs", None)
    if not isinstance(convs, nn.Sequential) or len(convs) != 1:
        raise ValueError("mmseg head: expected exactly one ConvModule in `convs` (num_convs=1)")
    if getattr(head, "concat_input", False):
        raise ValueError("mmseg head: concat_input=True is not the HRNetV2 head; not supported")
    dropout = getattr(head, "dropout", None)
    if dropout is not None and getattr(dropout, "p", 0) > 0:
        raise ValueError("mmseg head: dropout before conv_seg is not supported by the fused head")
    transform = getattr(head, "input_transform", "resize_concat")
    if transform != "resize_concat":
        raise ValueError(f"mmseg head: input_transform={transform!r}; the fused head is the resize_concat head")
