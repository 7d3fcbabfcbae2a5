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

from .. import backends
from ..batchnorm import bn_step, can_fold
from ..hrnet.head import LAYOUTS, detect_layout, head_layers, layer_problems, mmseg_problems
from ..ops.head import hrnet_v2_head
from ..ops.reference import resample_ref
from ..plan import Resample, as_resample

__all__ = ["HRNetV2Head"]


class HRNetV2Head(nn.Module):
    """Fused HRNetV2 head: ``classifier(ReLU(norm(conv(cat[x0, Up(x1), ...]))))`` without the concatenation.

    Args:
        source: the module holding the head's layers (its children are adopted under their own names).
        layout: "sequential", "mmseg" or "mmpose" (where the four layers sit in `source`).
        resample: how x1..x3 reach x0's size: a `Resample` or mode string (default bilinear,
            align_corners=False, to the exact size; the official segmentation code's `ALIGN_CORNERS` may
            be True).
        backend: "auto", "triton", "cuda_cpp" or "reference" (`hrfast.backends`).
    """

    def __init__(self, source: nn.Module, layout: str = "sequential", *, resample=None, backend: str = "auto"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
        backends.canonical(backend)
        for name, child in source.named_children():
            self.add_module(name, child)
        for name, param in source.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in source.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self.layout = layout
        self.backend = backend
        self.resample = as_resample(resample, "resample") or Resample("bilinear", align_corners=False)
        layers = head_layers(self, layout)
        problems = mmseg_problems(source) if layout == "mmseg" else layer_problems(layers, LAYOUTS[layout])
        if problems:
            raise ValueError(f"{type(source).__name__} is not an HRNetV2 head the fused op computes: "
                             + "; ".join(problems))

    @classmethod
    def from_module(cls, head: nn.Module, *, resample=None, backend: str = "auto") -> "HRNetV2Head":
        """Recognises the layout of `head` (see the module docstring). For mmseg heads the resampling is read
        from the head (bilinear, its `align_corners`) unless given."""
        layout = detect_layout(head)
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
        step = bn_step(norm)
        # under autocast hrnet_v2_head casts the branches as eager autocast casts the convs' inputs
        return hrnet_v2_head(list(xs), conv.weight, conv.bias, step.running_mean, step.running_var, norm.weight,
                             norm.bias, classifier.weight, classifier.bias, training=step.batch_stats,
                             momentum=step.factor, eps=norm.eps, resample=self.resample, backend=self.backend)

    def _eager(self, xs: Sequence[Tensor]) -> Tensor:
        size = tuple(xs[0].shape[2:])
        ups = [xs[0]] + [resample_ref(x, self.resample, size) for x in xs[1:]]
        hidden = self.conv(torch.cat(ups, 1))
        return self.classifier(self._role(2)(self.norm(hidden)))

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, resample={self.resample.describe()}, backend={self.backend!r}"
