"""Reference HRNetV2 semantic segmentation model, laid out as the official HRNet-Semantic-Segmentation
``seg_hrnet.py`` (state_dict keys identical), without its module global.

The official code upsamples in forward with ``F.interpolate(size=..., mode='bilinear',
align_corners=ALIGN_CORNERS)``, where ``ALIGN_CORNERS`` is a **module global** set from
``config.MODEL.ALIGN_CORNERS`` whenever a model is built (default True; the Cityscapes / LIP / PASCAL-Context
yamls set False; master and pytorch-v1.1 branches pass none, i.e. False), so building a second model can
silently change the first. Here ``align_corners`` is a constructor argument kept on the model and on every
`HighResolutionModule` (attribute ``align_corners``), default False; `hrfast.patch` reads that attribute
(fusion modules and the head), so no ``upsample=``/``align_corners=`` arguments are needed.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._common import HighResolutionBackbone, HighResolutionModuleBase, init_normal_weights

__all__ = ["HighResolutionModule", "HighResolutionNet", "concat_branches"]


class HighResolutionModule(HighResolutionModuleBase):
    """Multi-resolution module of the segmentation / facial-landmark code: ``fuse_layers[i][j]`` (j > i) is
    ``Sequential(conv1x1, BN)`` without an upsample module; forward resizes its output to branch i's size with
    ``F.interpolate(mode='bilinear', align_corners=self.align_corners)`` (any input size works)."""

    def __init__(self, num_branches, block, num_blocks, num_inchannels, num_channels, fuse_method="SUM",
                 multi_scale_output=True, *, bn_momentum: float = 0.1, align_corners: bool = False):
        super().__init__(num_branches, block, num_blocks, num_inchannels, num_channels, fuse_method,
                         multi_scale_output, upsample=None, bn_momentum=bn_momentum, relu_inplace=True)
        self.align_corners = bool(align_corners)

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        for i in range(self.num_branches):
            x[i] = self.branches[i](x[i])  # in the caller's list, as upstream
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
            for j in range(1, self.num_branches):
                if i == j:
                    y = y + x[j]
                elif j > i:
                    y = y + F.interpolate(self.fuse_layers[i][j](x[j]), size=x[i].shape[-2:], mode="bilinear",
                                          align_corners=self.align_corners)
                else:
                    y = y + self.fuse_layers[i][j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


def concat_branches(x: List[Tensor], align_corners: bool) -> Tensor:
    """The HRNetV2 representation: ``cat([x0, up(x1), up(x2), up(x3)], 1)``, every branch but the first
    resized bilinearly to branch 0's size (branch 0 is not resampled, as upstream)."""
    size = x[0].shape[-2:]
    ups = [F.interpolate(t, size=size, mode="bilinear", align_corners=align_corners) for t in x[1:]]
    return torch.cat([x[0], *ups], 1)


class HighResolutionNet(HighResolutionBackbone):
    """HRNetV2 segmentation: the HRNet trunk, the concat of all branches at 1/4 resolution and ``last_layer``.

    ``last_layer = Sequential(Conv2d(15C, 15C, 1, bias=True), BN, ReLU, Conv2d(15C, num_classes, k, bias=True))``
    with 15C = the sum of the final branch channels (720 for W48). The output stays at 1/4 of the input
    resolution (upstream resizes it in the loss and at inference, not in the model).

    Args:
        config: stage configuration, e.g. ``hrfast.models.configs.stage_config("w48")``.
        num_classes: segmentation classes (19 for Cityscapes).
        align_corners: of every bilinear resize (fusion and concat); the official ``ALIGN_CORNERS`` global.
        bn_momentum: BatchNorm momentum (0.1 on the HRNet-OCR branch, 0.01 on master / pytorch-v1.1).
        final_conv_kernel: kernel of the classifier conv, 1 (every released config) or 3 (padding 1).
    """

    module_cls = HighResolutionModule

    def __init__(self, config: Dict[str, Dict], num_classes: int = 19, align_corners: bool = False,
                 bn_momentum: float = 0.1, final_conv_kernel: int = 1):
        if final_conv_kernel not in (1, 3):
            raise ValueError(f"final_conv_kernel must be 1 or 3, got {final_conv_kernel}")
        super().__init__()
        self.align_corners = bool(align_corners)
        self.num_classes = num_classes
        pre_stage_channels = self._build_backbone(config, bn_momentum)
        last_inp_channels = sum(pre_stage_channels)
        self.last_layer = nn.Sequential(
            nn.Conv2d(last_inp_channels, last_inp_channels, kernel_size=1, stride=1, padding=0),
            nn.BatchNorm2d(last_inp_channels, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.Conv2d(last_inp_channels, num_classes, kernel_size=final_conv_kernel, stride=1,
                      padding=1 if final_conv_kernel == 3 else 0))
        self.init_weights()

    def _module_kwargs(self) -> Dict:
        return {"align_corners": self.align_corners}

    def init_weights(self) -> None:
        """Normal(0, 0.001) convs, BN weight 1 and bias 0, as upstream."""
        init_normal_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, 3, H, W]`` -> ``[N, num_classes, ceil(H/4), ceil(W/4)]`` logits."""
        return self.last_layer(concat_branches(self.forward_backbone(x), self.align_corners))
