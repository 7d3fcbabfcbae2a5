"""Reference HRNet pose estimator, laid out as the official deep-high-resolution-net ``pose_hrnet.py``
(``PoseHighResolutionNet``; state_dict keys identical).

Stage 1 is hard-coded as upstream (4 Bottleneck(64) blocks, 256 channels); the fusion's j > i entries are
``Sequential(conv1x1, BN, nn.Upsample(scale_factor=2**(j-i), mode='nearest'))`` (inputs divisible by 32, as
upstream) and the fuse ReLU is in place; stage 4 ends with ``multi_scale_output=False``, so the last module
returns branch 0 only; ``final_layer`` is a conv (1x1 with bias in every released config) to the joint heatmaps
at 1/4 of the input resolution. W32 has 28.5M parameters and W48 63.6M (17 COCO joints), as in the paper.
"""
from __future__ import annotations

from typing import Dict, List

import torch.nn as nn
from torch import Tensor

from ._common import HighResolutionBackbone
from .cls_hrnet import HighResolutionModule as _SeqUpsampleModule

__all__ = ["HighResolutionModule", "PoseHighResolutionNet"]


class HighResolutionModule(_SeqUpsampleModule):
    """Multi-resolution module of the pose code: as the classification one (nearest ``nn.Upsample`` inside
    ``fuse_layers``), with the fuse ReLU in place (``nn.ReLU(True)`` upstream)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.relu = nn.ReLU(inplace=True)


class PoseHighResolutionNet(HighResolutionBackbone):
    """SimpleBaseline-style top-down pose HRNet: the trunk, then ``final_layer`` on branch 0.

    Args:
        config: stage configuration, e.g. ``hrfast.models.configs.stage_config("w32")`` (stage 1 must be the
            hard-coded 4 x Bottleneck(64)).
        num_joints: heatmap channels (17 for COCO, 16 for MPII).
        final_conv_kernel: 1 (every released config) or 3 (padding 1).
        bn_momentum: BatchNorm momentum (0.1 upstream).

    Forward takes ``[N, 3, H, W]`` with H and W divisible by 32 and returns ``[N, num_joints, H/4, W/4]``.
    """

    module_cls = HighResolutionModule

    def __init__(self, config: Dict[str, Dict], num_joints: int = 17, final_conv_kernel: int = 1,
                 bn_momentum: float = 0.1):
        if final_conv_kernel not in (1, 3):
            raise ValueError(f"final_conv_kernel must be 1 or 3, got {final_conv_kernel}")
        s1 = config["STAGE1"]
        if (s1["BLOCK"], list(s1["NUM_CHANNELS"]), list(s1["NUM_BLOCKS"])) != ("BOTTLENECK", [64], [4]):
            raise ValueError("the pose model hard-codes stage 1 as 4 Bottleneck(64) blocks (256 channels), "
                             f"got {s1['NUM_BLOCKS']} x {s1['BLOCK']}({s1['NUM_CHANNELS']})")
        super().__init__()
        self.num_joints = num_joints
        pre_stage_channels = self._build_backbone(config, bn_momentum, multi_scale_output=False)
        self.final_layer = nn.Conv2d(pre_stage_channels[0], num_joints, kernel_size=final_conv_kernel, stride=1,
                                     padding=1 if final_conv_kernel == 3 else 0)
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, 0.001) conv weights and zero conv biases, BN weight 1 and bias 0, as upstream."""
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.normal_(mod.weight, std=0.001)
                if mod.bias is not None:
                    nn.init.constant_(mod.bias, 0)
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.constant_(mod.weight, 1)
                nn.init.constant_(mod.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        y_list: List[Tensor] = self.forward_backbone(x)
        return self.final_layer(y_list[0])
