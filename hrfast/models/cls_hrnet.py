"""Reference HRNet-W*-C ImageNet classifier, laid out as the official HRNet-Image-Classification
``cls_hrnet.py`` (and timm ``hrnet_w*``, whose parameter and buffer names are the same).

The fusion's j > i entries are ``Sequential(conv1x1, BN, nn.Upsample(scale_factor=2**(j-i), mode='nearest'))``,
so inputs must be divisible by 32 (as upstream). The V1 classification head: ``incre_modules`` (one Bottleneck
per branch to 128/256/512/1024 channels), ``downsamp_modules`` (conv3x3 s2 with bias, BN, ReLU),
``final_layer`` (conv1x1 1024 -> 2048 with bias, BN, ReLU), global average pool, ``classifier`` (Linear).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._common import Bottleneck, HighResolutionBackbone, HighResolutionModuleBase, make_layer

__all__ = ["HighResolutionModule", "HighResolutionNet"]


class HighResolutionModule(HighResolutionModuleBase):
    """Multi-resolution module of the classification (and pose / detection) code: nearest ``nn.Upsample``
    inside ``fuse_layers[i][j]`` for j > i; the fuse ReLU is not in place (``nn.ReLU(False)``)."""

    def __init__(self, num_branches, block, num_blocks, num_inchannels, num_channels, fuse_method="SUM",
                 multi_scale_output=True, *, bn_momentum: float = 0.1):
        super().__init__(num_branches, block, num_blocks, num_inchannels, num_channels, fuse_method,
                         multi_scale_output, upsample="nearest", bn_momentum=bn_momentum, relu_inplace=False)

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        for i in range(self.num_branches):
            x[i] = self.branches[i](x[i])  # in the caller's list, as upstream
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
            for j in range(1, self.num_branches):
                y = y + (x[j] if i == j else self.fuse_layers[i][j](x[j]))
            x_fuse.append(self.relu(y))
        return x_fuse


class HighResolutionNet(HighResolutionBackbone):
    """HRNet-W*-C: the HRNet trunk (`hrfast.models.configs`), then the V1 classification head.

    Args:
        config: stage configuration, e.g. ``hrfast.models.configs.stage_config("w18")``.
        num_classes: classifier outputs (1000 for ImageNet).
        bn_momentum: BatchNorm momentum everywhere (0.1 upstream).

    Forward takes ``[N, 3, H, W]`` with H and W divisible by 32 and returns ``[N, num_classes]`` logits.
    """

    module_cls = HighResolutionModule
    head_channels = (32, 64, 128, 256)  # Bottleneck planes of incre_modules; 4x that many channels out

    def __init__(self, config: Dict[str, Dict], num_classes: int = 1000, bn_momentum: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        pre_stage_channels = self._build_backbone(config, bn_momentum)
        self.incre_modules, self.downsamp_modules, self.final_layer = self._make_head(pre_stage_channels)
        self.classifier = nn.Linear(2048, num_classes)
        self.init_weights()

    def _make_head(self, pre_stage_channels: List[int]):
        m = self.bn_momentum
        head = self.head_channels
        incre_modules = nn.ModuleList([make_layer(Bottleneck, c, head[i], 1, stride=1, bn_momentum=m)
                                       for i, c in enumerate(pre_stage_channels)])
        downsamp_modules = nn.ModuleList()
        for i in range(len(pre_stage_channels) - 1):
            c_in, c_out = head[i] * Bottleneck.expansion, head[i + 1] * Bottleneck.expansion
            downsamp_modules.append(nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1),  # bias=True upstream
                nn.BatchNorm2d(c_out, momentum=m), nn.ReLU(inplace=True)))
        final_layer = nn.Sequential(
            nn.Conv2d(head[-1] * Bottleneck.expansion, 2048, kernel_size=1, stride=1, padding=0),
            nn.BatchNorm2d(2048, momentum=m), nn.ReLU(inplace=True))
        return incre_modules, downsamp_modules, final_layer

    def init_weights(self) -> None:
        """Kaiming-normal (fan_out) convs, BN weight 1 and bias 0, as upstream."""
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.constant_(mod.weight, 1)
                nn.init.constant_(mod.bias, 0)

    def forward_features(self, x: Tensor) -> Tensor:
        """Trunk and head up to ``final_layer``: ``[N, 2048, H/32, W/32]``."""
        y_list = self.forward_backbone(x)
        y = self.incre_modules[0](y_list[0])
        for i in range(len(self.downsamp_modules)):
            y = self.incre_modules[i + 1](y_list[i + 1]) + self.downsamp_modules[i](y)
        return self.final_layer(y)

    def forward(self, x: Tensor) -> Tensor:
        y = self.forward_features(x)
        y = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)  # upstream: avg_pool2d over the whole map
        return self.classifier(y)
