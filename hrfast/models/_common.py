"""Pieces shared by the reference HRNet models: residual blocks, the multi-resolution module's branches and
fuse layers, and the backbone (stem, ``layer1``, transitions, stages).

Written after the official MSRA code (HRNet-Semantic-Segmentation, HRNet-Image-Classification,
HRNet-Facial-Landmark-Detection), whose submodule names and order it keeps so that state_dict keys are the
official ones. Unlike the official code, BN momentum (a module global there) is a constructor argument.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Type

import torch.nn as nn
from torch import Tensor

__all__ = ["BasicBlock", "Bottleneck", "BLOCKS", "HighResolutionModuleBase", "HighResolutionBackbone"]


def init_normal_weights(model: nn.Module) -> None:
    """Upstream's init for the segmentation and landmark models: Normal(0, 0.001) convs, BN weight 1 and
    bias 0 (conv biases keep PyTorch's default)."""
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.normal_(mod.weight, std=0.001)
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.constant_(mod.weight, 1)
            nn.init.constant_(mod.bias, 0)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs), attributes ``conv1 bn1 relu conv2 bn2 downsample`` as upstream."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 bn_momentum: float = 0.1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1 to ``4 * planes``), attributes ``conv1..3 bn1..3 relu downsample``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 bn_momentum: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


BLOCKS: Dict[str, Type[nn.Module]] = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def make_layer(block: Type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int = 1,
               bn_momentum: float = 0.1) -> nn.Sequential:
    """`blocks` residual blocks; the first gets a 1x1 conv + BN ``downsample`` when the shape changes."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion, momentum=bn_momentum))
    layers = [block(inplanes, planes, stride, downsample, bn_momentum=bn_momentum)]
    inplanes = planes * block.expansion
    layers += [block(inplanes, planes, bn_momentum=bn_momentum) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class HighResolutionModuleBase(nn.Module):
    """Branches and fuse layers of an HRNet multi-resolution module; subclasses define the forward.

    Attributes as in the official code: ``num_inchannels`` (per-branch channels after the branches),
    ``fuse_method``, ``num_branches``, ``multi_scale_output``, ``branches`` (nn.ModuleList of nn.Sequential of
    blocks), ``fuse_layers`` (None with one branch, else nn.ModuleList of nn.ModuleList indexed
    ``[i_out][j_in]``: None for j == i; ``Sequential(conv1x1, BN[, upsample])`` for j > i; for j < i a
    Sequential of i - j ``Sequential(conv3x3 s2, BN[, ReLU])``, ReLU on all but the last) and ``relu``.
    """

    def __init__(self, num_branches: int, block: Type[nn.Module], num_blocks: Sequence[int],
                 num_inchannels: Sequence[int], num_channels: Sequence[int], fuse_method: str = "SUM",
                 multi_scale_output: bool = True, *, upsample: Optional[str] = None, bn_momentum: float = 0.1,
                 relu_inplace: bool = False):
        super().__init__()
        for name, seq in (("num_blocks", num_blocks), ("num_channels", num_channels),
                          ("num_inchannels", num_inchannels)):
            if len(seq) != num_branches:
                raise ValueError(f"num_branches ({num_branches}) != len({name}) ({len(seq)})")
        self.num_inchannels = list(num_inchannels)  # the official code aliases (and updates) the caller's list
        self.fuse_method = fuse_method
        self.num_branches = num_branches
        self.multi_scale_output = multi_scale_output
        self._bn_momentum = bn_momentum
        self.branches = nn.ModuleList(
            [self._make_one_branch(i, block, num_blocks, num_channels) for i in range(num_branches)])
        self.fuse_layers = self._make_fuse_layers(upsample)
        self.relu = nn.ReLU(inplace=relu_inplace)

    def _make_one_branch(self, branch_index: int, block, num_blocks, num_channels) -> nn.Sequential:
        layer = make_layer(block, self.num_inchannels[branch_index], num_channels[branch_index],
                           num_blocks[branch_index], bn_momentum=self._bn_momentum)
        self.num_inchannels[branch_index] = num_channels[branch_index] * block.expansion
        return layer

    def _make_fuse_layers(self, upsample: Optional[str]) -> Optional[nn.ModuleList]:
        """`upsample`: None (the forward resizes the j > i terms) or the ``nn.Upsample`` mode to put in them."""
        if self.num_branches == 1:
            return None
        n, ch, m = self.num_branches, self.num_inchannels, self._bn_momentum
        rows = []
        for i in range(n if self.multi_scale_output else 1):
            row = []
            for j in range(n):
                if j > i:
                    layers = [nn.Conv2d(ch[j], ch[i], 1, 1, 0, bias=False), nn.BatchNorm2d(ch[i], momentum=m)]
                    if upsample is not None:
                        layers.append(nn.Upsample(scale_factor=2 ** (j - i), mode=upsample))
                    row.append(nn.Sequential(*layers))
                elif j == i:
                    row.append(None)
                else:
                    links = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        c_out = ch[i] if last else ch[j]
                        link = [nn.Conv2d(ch[j], c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out, momentum=m)]
                        if not last:
                            link.append(nn.ReLU(inplace=True))
                        links.append(nn.Sequential(*link))
                    row.append(nn.Sequential(*links))
            rows.append(nn.ModuleList(row))
        return nn.ModuleList(rows)

    def get_num_inchannels(self) -> List[int]:
        return self.num_inchannels


class HighResolutionBackbone(nn.Module):
    """The HRNet trunk as in the official ``HighResolutionNet``: ``conv1 bn1 conv2 bn2 relu layer1 transition1
    stage2 transition2 stage3 transition3 stage4``. Subclasses set ``module_cls`` (their HighResolutionModule),
    call `_build_backbone` in ``__init__`` and add the head after it (state_dict key order follows)."""

    module_cls: Type[HighResolutionModuleBase]

    def _module_kwargs(self) -> Dict:
        """Extra keyword arguments for ``module_cls`` (upsampling, align_corners, ...)."""
        return {}

    def _build_backbone(self, config: Dict[str, Dict], bn_momentum: float = 0.1,
                        multi_scale_output: bool = True) -> List[int]:
        """Build the trunk from `config` (see `hrfast.models.configs`); returns the final branch channels.
        `multi_scale_output`: of stage 4's last module (False in the pose code: one output, branch 0)."""
        self.bn_momentum = bn_momentum
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)

        self.stage1_cfg = config["STAGE1"]
        block = BLOCKS[self.stage1_cfg["BLOCK"]]
        planes = self.stage1_cfg["NUM_CHANNELS"][0]
        self.layer1 = make_layer(block, 64, planes, self.stage1_cfg["NUM_BLOCKS"][0], bn_momentum=bn_momentum)
        pre_stage_channels = [block.expansion * planes]

        for s in (2, 3, 4):
            cfg = config[f"STAGE{s}"]
            block = BLOCKS[cfg["BLOCK"]]
            channels = [c * block.expansion for c in cfg["NUM_CHANNELS"]]
            setattr(self, f"stage{s}_cfg", cfg)
            setattr(self, f"transition{s - 1}", self._make_transition_layer(pre_stage_channels, channels))
            stage, pre_stage_channels = self._make_stage(cfg, channels, multi_scale_output or s < 4)
            setattr(self, f"stage{s}", stage)
        return pre_stage_channels

    def _make_transition_layer(self, pre: Sequence[int], cur: Sequence[int]) -> nn.ModuleList:
        m = self.bn_momentum
        layers: List[Optional[nn.Module]] = []
        for i in range(len(cur)):
            if i < len(pre):
                if cur[i] != pre[i]:
                    layers.append(nn.Sequential(nn.Conv2d(pre[i], cur[i], 3, 1, 1, bias=False),
                                                nn.BatchNorm2d(cur[i], momentum=m), nn.ReLU(inplace=True)))
                else:
                    layers.append(None)
            else:
                links = []
                for j in range(i + 1 - len(pre)):
                    c_in = pre[-1]
                    c_out = cur[i] if j == i - len(pre) else c_in
                    links.append(nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False),
                                               nn.BatchNorm2d(c_out, momentum=m), nn.ReLU(inplace=True)))
                layers.append(nn.Sequential(*links))
        return nn.ModuleList(layers)

    def _make_stage(self, cfg: Dict, num_inchannels: List[int], multi_scale_output: bool = True):
        modules = []
        for i in range(cfg["NUM_MODULES"]):
            # multi_scale_output only matters for the last module of the stage
            module = self.module_cls(cfg["NUM_BRANCHES"], BLOCKS[cfg["BLOCK"]], cfg["NUM_BLOCKS"], num_inchannels,
                                     cfg["NUM_CHANNELS"], cfg["FUSE_METHOD"],
                                     multi_scale_output or i < cfg["NUM_MODULES"] - 1,
                                     bn_momentum=self.bn_momentum, **self._module_kwargs())
            modules.append(module)
            num_inchannels = module.get_num_inchannels()
        return nn.Sequential(*modules), num_inchannels

    def forward_backbone(self, x: Tensor) -> List[Tensor]:
        """Stem, ``layer1`` and stages 2-4; returns the final stage's branch outputs (a list, highest first).

        Transitions as in the official segmentation code: an existing branch goes through its transition (when
        not None) from its own output, a new branch from the lowest-resolution output. (The classification and
        landmark code feed ``y_list[-1]`` to every non-None transition; the same thing for every standard
        configuration, whose existing-branch transitions are all None.)
        """
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        y_list = [x]
        for s in (2, 3, 4):
            transition = getattr(self, f"transition{s - 1}")
            x_list = []
            for i in range(getattr(self, f"stage{s}_cfg")["NUM_BRANCHES"]):
                src = y_list[i] if i < len(y_list) else y_list[-1]
                x_list.append(src if transition[i] is None else transition[i](src))
            y_list = getattr(self, f"stage{s}")(x_list)
        return y_list
