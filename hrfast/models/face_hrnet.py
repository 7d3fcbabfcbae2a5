"""Reference facial-landmark HRNetV2-W18, laid out as the official HRNet-Facial-Landmark-Detection
``lib/models/hrnet.py`` (state_dict keys identical).

Same trunk and fusion as the segmentation model (bilinear resize in forward, here always
``align_corners=False``: upstream passes none in the fusion and an explicit False in the concat), BN momentum
0.01, and the head named ``head``: ``Sequential(Conv2d(270, 270, 1, bias=True), BN, ReLU,
Conv2d(270, num_joints, 1, bias=True))``. Output: heatmaps at 1/4 of the input (64x64 for 256x256 crops).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch.nn as nn
from torch import Tensor

from ._common import HighResolutionBackbone, init_normal_weights
from .configs import stage_config
from .seg_hrnet import HighResolutionModule, concat_branches

__all__ = ["HighResolutionNet"]


class HighResolutionNet(HighResolutionBackbone):
    """Facial-landmark HRNetV2 (W18 by default).

    Args:
        num_joints: landmarks (98 for WFLW, 68 for 300W, 29 for COFW, 19 for AFLW).
        config: stage configuration (default ``stage_config("w18")``, as every released face config).
        bn_momentum: BatchNorm momentum (0.01 upstream).

    The official head's first conv gets padding 1 when ``FINAL_CONV_KERNEL == 3`` although its kernel is 1
    (a latent bug; every released config uses 1); only kernel 1 is built here. The official model also holds
    an unused ``sf = nn.Softmax(dim=1)``, kept (it has no parameters).
    """

    module_cls = HighResolutionModule
    align_corners = False

    def __init__(self, num_joints: int = 98, config: Optional[Dict[str, Dict]] = None, bn_momentum: float = 0.01):
        super().__init__()
        self.num_joints = num_joints
        config = stage_config("w18") if config is None else config
        s1 = config["STAGE1"]
        if (s1["BLOCK"], list(s1["NUM_CHANNELS"]), list(s1["NUM_BLOCKS"])) != ("BOTTLENECK", [64], [4]):
            raise ValueError("the facial-landmark model hard-codes stage 1 as 4 Bottleneck(64) blocks (256 channels), "
                             f"got {s1['NUM_BLOCKS']} x {s1['BLOCK']}({s1['NUM_CHANNELS']})")
        self.sf = nn.Softmax(dim=1)  # unused, as upstream
        pre_stage_channels = self._build_backbone(config, bn_momentum)
        c = sum(pre_stage_channels)
        self.head = nn.Sequential(
            nn.Conv2d(c, c, kernel_size=1, stride=1, padding=0),
            nn.BatchNorm2d(c, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, num_joints, kernel_size=1, stride=1, padding=0))
        self.init_weights()

    def _module_kwargs(self) -> Dict:
        return {"align_corners": False}

    def init_weights(self) -> None:
        """Normal(0, 0.001) convs, BN weight 1 and bias 0, as upstream."""
        init_normal_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, 3, H, W]`` -> ``[N, num_joints, ceil(H/4), ceil(W/4)]`` heatmaps."""
        return self.head(concat_branches(self.forward_backbone(x), align_corners=False))
