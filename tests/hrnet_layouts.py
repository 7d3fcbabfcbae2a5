"""Test-only HRNet modules that follow /work/shared/HRNET_LAYOUTS.md attribute by attribute.

The official MSRA repositories and mm* cannot be installed here, so their fusion modules are rebuilt from that
description: class names (`HighResolutionModule`, `HRModule`, `HRFomerModule`, `LiteHRModule`), attribute names
(`num_inchannels` / `in_channels`, `multi_scale_output` / `multiscale_output`, `relu`), where the upsampling
happens (an `nn.Upsample` inside `fuse_layers`, `F.interpolate(size=...)` inside forward, or mmseg's bilinear
`Upsample` wrapper inside `fuse_layers` plus a `resize` in forward), the summation order of each forward, the
in-place ReLUs, BN momenta and BN classes.

Each family's module lives in its own Python module (registered in `sys.modules`), as in the real code bases:
that matters because the official segmentation code keeps `ALIGN_CORNERS` as a global of its defining module,
which the patcher reads. The official-segmentation (HRNet-OCR branch) module is defined in this file, whose
global `ALIGN_CORNERS` its forward reads exactly as `seg_hrnet.py` does; the other families are placed in
module namespaces without that global.

`build(family)` returns a `TinyHRNet`: a stem, then transitions and stages as in `HighResolutionNet` (stage 2: one
2-branch module, stage 3: one 3-branch module, stage 4: two 4-branch modules), returning the list of branch
outputs, with small widths so that it runs in milliseconds.

`build_net(name)` returns a whole toy model with its head (section 4, see NETS): the official segmentation
(HRNet-OCR and master branches), facial-landmark and seg_hrnet_ocr `HighResolutionNet`s, openseg's `HRNet_W48`, mmseg
`EncoderDecoder` / `CascadeEncoderDecoder` (FCNHead, OCRHead) and mmpose `TopdownPoseEstimator` (FeatureMapProcessor
neck, HeatmapHead); `fcn_head()` a standalone mmseg FCNHead.
"""
from __future__ import annotations

import sys
import types
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# official HRNet-Semantic-Segmentation (HRNet-OCR branch) seg_hrnet.py: a module global, default True, overwritten
# by HighResolutionNet.__init__ from config.MODEL.ALIGN_CORNERS; HighResolutionModule.forward reads it at call time
ALIGN_CORNERS = True


def set_align_corners(value: bool) -> None:
    """What `HighResolutionNet.__init__` does with `config.MODEL.ALIGN_CORNERS` (process-wide)."""
    global ALIGN_CORNERS
    ALIGN_CORNERS = value


# ------------------------------------------------------------------------------------------ shared pieces


class BasicBlock(nn.Module):
    """The residual BasicBlock of every HRNet code base (conv3x3-BN-ReLU-conv3x3-BN, + identity, ReLU)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm_layer=nn.BatchNorm2d, relu_inplace=True):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=relu_inplace)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class InPlaceABNSync(nn.Module):
    """InPlaceABNSync(activation='none') as the seg master branch uses it: batch norm with weight, bias,
    running_mean and running_var but no num_batches_tracked, and not a torch `_BatchNorm`."""

    def __init__(self, num_features, activation="none", momentum=0.01, eps=1e-5):
        super().__init__()
        self.num_features, self.activation, self.momentum, self.eps = num_features, activation, momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


def _namespace(name: str) -> types.ModuleType:
    """A Python module of its own for one code base's classes (registered so that pickle finds them)."""
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name, "stand-in for the module defining one HRNet code base's classes")
        sys.modules[name] = module
        if "." in name:  # pickle imports the parent package first
            parent, _, child = name.rpartition(".")
            setattr(_namespace(parent), child, module)
    return module


def _place(cls: type, module_name: str, class_name: str) -> type:
    """Gives `cls` the upstream class name and moves it to its own Python module."""
    cls.__name__ = cls.__qualname__ = class_name
    cls.__module__ = module_name
    setattr(_namespace(module_name), class_name, cls)
    return cls


# --------------------------------------------------------------------------------------- official MSRA


class _OfficialBase(nn.Module):
    """`HighResolutionModule.__init__` and builders shared by the official repositories (seg, pose, cls, face,
    openseg): attributes num_inchannels, fuse_method, num_branches, multi_scale_output, branches, fuse_layers,
    relu; None at j == i; fuse_layers None for one branch. Per-repository choices are class attributes."""

    norm_layer: Callable = nn.BatchNorm2d
    bn_momentum = 0.1
    relu_inplace = True
    seq_upsample: Optional[str] = None  # 'nearest': nn.Upsample inside fuse_layers (pose, cls)

    def __init__(self, num_branches, blocks, num_blocks, num_inchannels, num_channels, fuse_method,
                 multi_scale_output=True):
        super().__init__()
        self._check_branches(num_branches, blocks, num_blocks, num_inchannels, num_channels)
        self.num_inchannels = num_inchannels
        self.fuse_method = fuse_method
        self.num_branches = num_branches
        self.multi_scale_output = multi_scale_output
        self.branches = self._make_branches(num_branches, blocks, num_blocks, num_channels)
        self.fuse_layers = self._make_fuse_layers()
        self.relu = nn.ReLU(inplace=self.relu_inplace)

    def _check_branches(self, num_branches, blocks, num_blocks, num_inchannels, num_channels):
        if not num_branches == len(num_blocks) == len(num_channels) == len(num_inchannels):
            raise ValueError("NUM_BRANCHES does not match NUM_BLOCKS / NUM_CHANNELS / NUM_INCHANNELS")

    def _norm(self, c):
        return type(self).norm_layer(c, momentum=self.bn_momentum)

    def _make_one_branch(self, branch_index, block, num_blocks, num_channels):
        layers = [block(self.num_inchannels[branch_index], num_channels[branch_index], norm_layer=self._norm,
                        relu_inplace=self.relu_inplace)]
        self.num_inchannels[branch_index] = num_channels[branch_index] * block.expansion
        for _ in range(1, num_blocks[branch_index]):
            layers.append(block(self.num_inchannels[branch_index], num_channels[branch_index], norm_layer=self._norm,
                                relu_inplace=self.relu_inplace))
        return nn.Sequential(*layers)

    def _make_branches(self, num_branches, block, num_blocks, num_channels):
        return nn.ModuleList([self._make_one_branch(i, block, num_blocks, num_channels) for i in range(num_branches)])

    def _make_fuse_layers(self):
        if self.num_branches == 1:
            return None
        num_branches = self.num_branches
        num_inchannels = self.num_inchannels
        fuse_layers = []
        for i in range(num_branches if self.multi_scale_output else 1):
            fuse_layer = []
            for j in range(num_branches):
                if j > i:
                    path = [nn.Conv2d(num_inchannels[j], num_inchannels[i], 1, 1, 0, bias=False),
                            self._norm(num_inchannels[i])]
                    if self.seq_upsample is not None:
                        path.append(nn.Upsample(scale_factor=2 ** (j - i), mode=self.seq_upsample))
                    fuse_layer.append(nn.Sequential(*path))
                elif j == i:
                    fuse_layer.append(None)
                else:
                    conv3x3s = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            conv3x3s.append(nn.Sequential(
                                nn.Conv2d(num_inchannels[j], num_inchannels[i], 3, 2, 1, bias=False),
                                self._norm(num_inchannels[i])))
                        else:
                            conv3x3s.append(nn.Sequential(
                                nn.Conv2d(num_inchannels[j], num_inchannels[j], 3, 2, 1, bias=False),
                                self._norm(num_inchannels[j]),
                                nn.ReLU(inplace=self.relu_inplace)))
                    fuse_layer.append(nn.Sequential(*conv3x3s))
            fuse_layers.append(nn.ModuleList(fuse_layer))
        return nn.ModuleList(fuse_layers)

    def get_num_inchannels(self):
        return self.num_inchannels


class HighResolutionModule(_OfficialBase):
    """HRNet-Semantic-Segmentation, HRNet-OCR branch, seg_hrnet.py / seg_hrnet_ocr.py: SyncBatchNorm (bn_helper
    on torch >= 1), relu_inplace True, upsampling in forward with the module global ALIGN_CORNERS."""

    norm_layer = nn.SyncBatchNorm

    def forward(self, x):
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        for i in range(self.num_branches):
            x[i] = self.branches[i](x[i])
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
            for j in range(1, self.num_branches):
                if i == j:
                    y = y + x[j]
                elif j > i:
                    width_output = x[i].shape[-1]
                    height_output = x[i].shape[-2]
                    y = y + F.interpolate(self.fuse_layers[i][j](x[j]), size=[height_output, width_output],
                                          mode="bilinear", align_corners=ALIGN_CORNERS)
                else:
                    y = y + self.fuse_layers[i][j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


class _SegMasterModule(_OfficialBase):
    """Seg master / pytorch-v1.1 branches: bilinear F.interpolate(size=) without align_corners (False), BN momentum
    0.01, ReLU not in place (master). On master the norm is InPlaceABNSync (see `build(..., norm='inplace_abn')`)."""

    bn_momentum = 0.01
    relu_inplace = False

    def forward(self, x):
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        for i in range(self.num_branches):
            x[i] = self.branches[i](x[i])
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
            for j in range(1, self.num_branches):
                if i == j:
                    y = y + x[j]
                elif j > i:
                    width_output = x[i].shape[-1]
                    height_output = x[i].shape[-2]
                    y = y + F.interpolate(self.fuse_layers[i][j](x[j]), size=[height_output, width_output],
                                          mode="bilinear")
                else:
                    y = y + self.fuse_layers[i][j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


class _FaceModule(_OfficialBase):
    """HRNet-Facial-Landmark-Detection lib/models/hrnet.py: bilinear F.interpolate(size=[H_i, W_i]) in forward, no
    align_corners (False); BN momentum 0.01; ReLU in place."""

    bn_momentum = 0.01

    def forward(self, x):
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        for i in range(self.num_branches):
            x[i] = self.branches[i](x[i])
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
            for j in range(1, self.num_branches):
                if i == j:
                    y = y + x[j]
                elif j > i:
                    y = y + F.interpolate(self.fuse_layers[i][j](x[j]), size=[x[i].shape[2], x[i].shape[3]],
                                          mode="bilinear")
                else:
                    y = y + self.fuse_layers[i][j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


class _OpensegModule(_OfficialBase):
    """openseg.pytorch hrnet_backbone.py: bn_type / bn_momentum arguments, bilinear with align_corners=True
    hard-coded in forward, ReLU not in place."""

    relu_inplace = False

    def __init__(self, *args, bn_type="torchbn", bn_momentum=0.1, **kwargs):
        self.bn_type, self.bn_momentum = bn_type, bn_momentum
        super().__init__(*args, **kwargs)

    def forward(self, x):
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        for i in range(self.num_branches):
            x[i] = self.branches[i](x[i])
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
            for j in range(1, self.num_branches):
                if i == j:
                    y = y + x[j]
                elif j > i:
                    width_output = x[i].shape[-1]
                    height_output = x[i].shape[-2]
                    y = y + F.interpolate(self.fuse_layers[i][j](x[j]), size=[height_output, width_output],
                                          mode="bilinear", align_corners=True)
                else:
                    y = y + self.fuse_layers[i][j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


class _SeqUpsampleForward:
    """The forward of pose_hrnet.py, cls_hrnet.py and HRNet-Object-Detection: the upsample sits in fuse_layers."""

    def forward(self, x):
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        for i in range(self.num_branches):
            x[i] = self.branches[i](x[i])
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
            for j in range(1, self.num_branches):
                if i == j:
                    y = y + x[j]
                else:
                    y = y + self.fuse_layers[i][j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


class _PoseModule(_SeqUpsampleForward, _OfficialBase):
    """deep-high-resolution-net pose_hrnet.py: nn.Upsample(nearest) in fuse_layers, nn.ReLU(True); stage 4 built
    with multi_scale_output=False."""

    seq_upsample = "nearest"
    relu_inplace = True


class _ClsModule(_SeqUpsampleForward, _OfficialBase):
    """HRNet-Image-Classification cls_hrnet.py: nn.Upsample(nearest) in fuse_layers, nn.ReLU(False)."""

    seq_upsample = "nearest"
    relu_inplace = False


_place(_SegMasterModule, "hrnet_layouts_seg_master.seg_hrnet", "HighResolutionModule")
_place(_FaceModule, "hrnet_layouts_face.hrnet", "HighResolutionModule")
_place(_OpensegModule, "hrnet_layouts_openseg.hrnet_backbone", "HighResolutionModule")
_place(_PoseModule, "hrnet_layouts_pose.pose_hrnet", "HighResolutionModule")
_place(_ClsModule, "hrnet_layouts_cls.cls_hrnet", "HighResolutionModule")


# ----------------------------------------------------------------------------------------------------- mm*


def resize(input, size=None, scale_factor=None, mode="nearest", align_corners=None, warning=True):
    """mmseg.models.utils.resize (minus its align_corners warning): F.interpolate."""
    return F.interpolate(input, size, scale_factor, mode, align_corners)


class _MmsegUpsample(nn.Module):
    """mmseg.models.utils.Upsample: attributes size, scale_factor (float), mode, align_corners; the output size is
    int(H * scale_factor), reached with `resize(size=...)`. Not an nn.Upsample."""

    def __init__(self, size=None, scale_factor=None, mode="nearest", align_corners=None):
        super().__init__()
        self.size = size
        if isinstance(scale_factor, tuple):
            self.scale_factor = tuple(float(factor) for factor in scale_factor)
        else:
            self.scale_factor = float(scale_factor) if scale_factor else None
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x):
        if not self.size:
            size = [int(t * self.scale_factor) for t in x.shape[-2:]]
        else:
            size = self.size
        return resize(x, size, None, self.mode, self.align_corners)


_place(_MmsegUpsample, "hrnet_layouts_mmseg.wrappers", "Upsample")


def _build_norm_layer(norm_cfg, num_features):
    """mmcv build_norm_layer for the configs used here: ('bn' name, module)."""
    kind = norm_cfg["type"]
    if kind == "BN":
        return "bn", nn.BatchNorm2d(num_features)
    if kind == "SyncBN":
        return "bn", nn.SyncBatchNorm(num_features)
    if kind == "GN":
        return "gn", nn.GroupNorm(norm_cfg["num_groups"], num_features)
    raise ValueError(kind)


def _mm_fuse_layers(in_channels, multiscale_output, norm, upsample, relu_inplace):
    """mm* HRModule._make_fuse_layers (build_conv_layer/build_norm_layer resolved by the caller)."""
    num_branches = len(in_channels)
    fuse_layers = []
    num_out_branches = num_branches if multiscale_output else 1
    for i in range(num_out_branches):
        fuse_layer = []
        for j in range(num_branches):
            if j > i:
                fuse_layer.append(nn.Sequential(
                    nn.Conv2d(in_channels[j], in_channels[i], kernel_size=1, stride=1, padding=0, bias=False),
                    norm(in_channels[i]),
                    upsample(2 ** (j - i))))
            elif j == i:
                fuse_layer.append(None)
            else:
                conv_downsamples = []
                for k in range(i - j):
                    if k == i - j - 1:
                        conv_downsamples.append(nn.Sequential(
                            nn.Conv2d(in_channels[j], in_channels[i], kernel_size=3, stride=2, padding=1,
                                      bias=False),
                            norm(in_channels[i])))
                    else:
                        conv_downsamples.append(nn.Sequential(
                            nn.Conv2d(in_channels[j], in_channels[j], kernel_size=3, stride=2, padding=1,
                                      bias=False),
                            norm(in_channels[j]),
                            nn.ReLU(inplace=relu_inplace)))
                fuse_layer.append(nn.Sequential(*conv_downsamples))
        fuse_layers.append(nn.ModuleList(fuse_layer))
    return nn.ModuleList(fuse_layers)


class _MmBase(nn.Module):
    """mm* HRModule: attributes in_channels, num_branches, multiscale_output, with_cp, norm_cfg, conv_cfg,
    branches, fuse_layers, relu; None at j == i; no fuse_method attribute."""

    relu_inplace = False

    def __init__(self, num_branches, blocks, num_blocks, in_channels, num_channels, multiscale_output=True,
                 with_cp=False, conv_cfg=None, norm_cfg=None, block_init_cfg=None, init_cfg=None):
        super().__init__()
        self.block_init_cfg = block_init_cfg
        self._check_branches(num_branches, num_blocks, in_channels, num_channels)
        self.in_channels = in_channels
        self.num_branches = num_branches
        self.multiscale_output = multiscale_output
        self.norm_cfg = norm_cfg if norm_cfg is not None else dict(type="BN", requires_grad=True)
        self.conv_cfg = conv_cfg
        self.with_cp = with_cp
        self.branches = self._make_branches(num_branches, blocks, num_blocks, num_channels)
        self.fuse_layers = self._make_fuse_layers()
        self.relu = nn.ReLU(inplace=self.relu_inplace)

    def _check_branches(self, num_branches, num_blocks, in_channels, num_channels):
        if not num_branches == len(num_blocks) == len(num_channels) == len(in_channels):
            raise ValueError("NUM_BRANCHES does not match num_blocks / num_channels / in_channels")

    def _norm(self, c, momentum=None):
        return _build_norm_layer(self.norm_cfg, c)[1]

    def _make_one_branch(self, branch_index, block, num_blocks, num_channels):
        layers = [block(self.in_channels[branch_index], num_channels[branch_index], norm_layer=self._norm,
                        relu_inplace=self.relu_inplace)]
        self.in_channels[branch_index] = num_channels[branch_index] * block.expansion
        for _ in range(1, num_blocks[branch_index]):
            layers.append(block(self.in_channels[branch_index], num_channels[branch_index], norm_layer=self._norm,
                                relu_inplace=self.relu_inplace))
        return nn.Sequential(*layers)

    def _make_branches(self, num_branches, block, num_blocks, num_channels):
        return nn.ModuleList([self._make_one_branch(i, block, num_blocks, num_channels) for i in range(num_branches)])

    def _upsample(self, scale):
        raise NotImplementedError

    def _make_fuse_layers(self):
        if self.num_branches == 1:
            return None
        return _mm_fuse_layers(self.in_channels, self.multiscale_output, self._norm, self._upsample, self.relu_inplace)


class _MmsegModule(_MmBase):
    """mmsegmentation HRModule: mmseg Upsample(bilinear, align_corners=False) in fuse_layers, then a resize to
    x[i]'s size in forward (a second bilinear pass unless the sizes are exact multiples)."""

    def _upsample(self, scale):
        # we set align_corners=False for HRNet
        return _MmsegUpsample(scale_factor=scale, mode="bilinear", align_corners=False)

    def forward(self, x):
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        for i in range(self.num_branches):
            x[i] = self.branches[i](x[i])
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = 0
            for j in range(self.num_branches):
                if i == j:
                    y += x[j]
                elif j > i:
                    y = y + resize(self.fuse_layers[i][j](x[j]), size=x[i].shape[2:], mode="bilinear",
                                   align_corners=False)
                else:
                    y += self.fuse_layers[i][j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


class _MmposeModule(_MmBase):
    """mmpose HRModule: nn.Upsample(mode=upsample_cfg['mode'], align_corners=upsample_cfg['align_corners']) in
    fuse_layers (default nearest; HRNetV2 face configs: bilinear, False), multiscale_output default False, ReLU in
    place, `y = 0; y += ...` in forward."""

    relu_inplace = True

    def __init__(self, num_branches, blocks, num_blocks, in_channels, num_channels, multiscale_output=False,
                 with_cp=False, conv_cfg=None, norm_cfg=None, upsample_cfg=None):
        self.upsample_cfg = dict(upsample_cfg or dict(mode="nearest", align_corners=None))
        super().__init__(num_branches, blocks, num_blocks, in_channels, num_channels, multiscale_output, with_cp,
                         conv_cfg, norm_cfg)

    def _upsample(self, scale):
        return nn.Upsample(scale_factor=scale, mode=self.upsample_cfg["mode"],
                           align_corners=self.upsample_cfg["align_corners"])

    def forward(self, x):
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        for i in range(self.num_branches):
            x[i] = self.branches[i](x[i])
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = 0
            for j in range(self.num_branches):
                if i == j:
                    y += x[j]
                else:
                    y += self.fuse_layers[i][j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


class _HRFomerModule(_MmposeModule):
    """mmpose HRFormer: subclasses HRModule and overrides _make_fuse_layers (depthwise 3x3 s2 + BN + 1x1 + BN
    downsampling, bilinear upsampling); a fusion hrfast must leave alone."""

    def __init__(self, *args, upsample_cfg=None, **kwargs):
        super().__init__(*args, upsample_cfg=upsample_cfg or dict(mode="bilinear", align_corners=False), **kwargs)

    def _make_fuse_layers(self):
        if self.num_branches == 1:
            return None
        num_branches = self.num_branches
        in_channels = self.in_channels
        fuse_layers = []
        for i in range(num_branches if self.multiscale_output else 1):
            fuse_layer = []
            for j in range(num_branches):
                if j > i:
                    fuse_layer.append(nn.Sequential(
                        nn.Conv2d(in_channels[j], in_channels[i], 1, 1, 0, bias=False), self._norm(in_channels[i]),
                        self._upsample(2 ** (j - i))))
                elif j == i:
                    fuse_layer.append(None)
                else:
                    conv3x3s = []
                    for k in range(i - j):
                        out = in_channels[i] if k == i - j - 1 else in_channels[j]
                        block = [nn.Conv2d(in_channels[j], in_channels[j], 3, 2, 1, groups=in_channels[j], bias=False),
                                 self._norm(in_channels[j]),
                                 nn.Conv2d(in_channels[j], out, 1, 1, 0, bias=False),
                                 self._norm(out)]
                        if k != i - j - 1:
                            block.append(nn.ReLU(False))
                        conv3x3s.append(nn.Sequential(*block))
                    fuse_layer.append(nn.Sequential(*conv3x3s))
            fuse_layers.append(nn.ModuleList(fuse_layer))
        return nn.ModuleList(fuse_layers)


class _LiteHRModule(nn.Module):
    """mmpose Lite-HRNet LiteHRModule (module_type 'NAIVE'): `layers` instead of `branches`, and a fusion that seeds
    row i with its j = 0 term and then adds every j again (the upstream code's own choice). Not an HRNet fusion."""

    def __init__(self, num_branches, num_blocks, in_channels, multiscale_output=False, with_fuse=True):
        super().__init__()
        self.in_channels = in_channels
        self.num_branches = num_branches
        self.module_type = "NAIVE"
        self.multiscale_output = multiscale_output
        self.with_fuse = with_fuse
        self.norm_cfg = dict(type="BN")
        self.layers = nn.ModuleList([nn.Sequential(*[BasicBlock(c, c) for _ in range(num_blocks)])
                                     for c in in_channels])
        # its _make_fuse_layers builds HRNet-like entries (conv1x1-BN-nearest Upsample; conv3x3 s2 chains)
        self.fuse_layers = _mm_fuse_layers(in_channels, multiscale_output, nn.BatchNorm2d,
                                           lambda s: nn.Upsample(scale_factor=s, mode="nearest"), False)
        self.relu = nn.ReLU()

    def forward(self, x):
        if self.num_branches == 1:
            return [self.layers[0](x[0])]
        for i in range(self.num_branches):
            x[i] = self.layers[i](x[i])
        out = x
        out_fuse = []
        for i in range(len(self.fuse_layers)):
            y = out[0] if i == 0 else self.fuse_layers[i][0](out[0])
            for j in range(self.num_branches):
                if i == j:
                    y = y + out[j]
                else:
                    y = y + self.fuse_layers[i][j](out[j])
            out_fuse.append(self.relu(y))
        return out_fuse


_place(_MmsegModule, "hrnet_layouts_mmseg.hrnet", "HRModule")
_place(_MmposeModule, "hrnet_layouts_mmpose.hrnet", "HRModule")
_place(_HRFomerModule, "hrnet_layouts_mmpose.hrformer", "HRFomerModule")
_place(_LiteHRModule, "hrnet_layouts_mmpose.litehrnet", "LiteHRModule")


# ------------------------------------------------------------------------------------------------ networks


def _official(cls, **extra):
    def make(nb, channels, multi_scale_output):
        return cls(nb, BasicBlock, [1] * nb, list(channels), list(channels), "SUM", multi_scale_output, **extra)
    return make


def _mm(cls, **extra):
    def make(nb, channels, multi_scale_output):
        return cls(nb, BasicBlock, [1] * nb, list(channels), list(channels), multiscale_output=multi_scale_output,
                   **extra)
    return make


class _InPlaceABNMaster(_SegMasterModule):
    norm_layer = InPlaceABNSync


_place(_InPlaceABNMaster, "hrnet_layouts_seg_master_abn.seg_hrnet", "HighResolutionModule")

# family -> (module factory(num_branches, channels, multi_scale_output), is the last module multi-scale,
#            accepts sizes that are not multiples of 2^k (size-based upsampling))
FAMILIES: Dict[str, tuple] = {
    "seg_ocr": (_official(HighResolutionModule), True, True),
    "seg_master": (_official(_SegMasterModule), True, True),
    "seg_master_inplace_abn": (_official(_InPlaceABNMaster), True, True),
    "face": (_official(_FaceModule), True, True),
    "openseg": (_official(_OpensegModule, bn_type="torchsyncbn"), True, True),
    "pose": (_official(_PoseModule), False, False),
    "cls": (_official(_ClsModule), True, False),
    "mmseg": (_mm(_MmsegModule), True, True),
    "mmpose": (_mm(_MmposeModule), False, False),
    "mmpose_bilinear": (_mm(_MmposeModule, upsample_cfg=dict(mode="bilinear", align_corners=False)), True, False),
    "mmseg_groupnorm": (_mm(_MmsegModule, norm_cfg=dict(type="GN", num_groups=2)), True, True),
    "hrformer": (_mm(_HRFomerModule), True, False),
}


class TinyHRNet(nn.Module):
    """Stem (conv3x3 s2, BN, ReLU), then transition1, stage2 (1 module), transition2, stage3 (1 module),
    transition3, stage4 (2 modules), as `HighResolutionNet` wires them; returns the branch outputs (a list)."""

    def __init__(self, make_module, width: int = 4, last_multi_scale: bool = True):
        super().__init__()
        channels = [width * 2 ** k for k in range(4)]
        self.channels = channels
        self.conv1 = nn.Conv2d(3, channels[0], 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        self.transition1 = self._transition(channels[:1], channels[:2])
        self.stage2 = nn.Sequential(make_module(2, channels[:2], True))
        self.transition2 = self._transition(channels[:2], channels[:3])
        self.stage3 = nn.Sequential(make_module(3, channels[:3], True))
        self.transition3 = self._transition(channels[:3], channels[:4])
        self.stage4 = nn.Sequential(make_module(4, channels, True), make_module(4, channels, last_multi_scale))

    @staticmethod
    def _transition(pre, cur):
        layers = []
        for i in range(len(cur)):
            if i < len(pre):
                layers.append(None)  # same channels: no transition
            else:
                layers.append(nn.Sequential(nn.Conv2d(pre[-1], cur[i], 3, 2, 1, bias=False), nn.BatchNorm2d(cur[i]),
                                            nn.ReLU(inplace=True)))
        return nn.ModuleList(layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        y_list = [x]
        for transition, stage in ((self.transition1, self.stage2), (self.transition2, self.stage3),
                                  (self.transition3, self.stage4)):
            x_list = [y_list[i] if t is None else t(y_list[-1]) for i, t in enumerate(transition)]
            y_list = stage(x_list)
        return y_list


class _LiteNet(nn.Module):
    """Stem plus one 3-branch LiteHRModule (enough to see that the patcher leaves it alone)."""

    def __init__(self, width=4):
        super().__init__()
        c = [width, 2 * width, 4 * width]
        self.stem = nn.Conv2d(3, c[0], 3, 2, 1)
        self.down1 = nn.Conv2d(c[0], c[1], 3, 2, 1)
        self.down2 = nn.Conv2d(c[1], c[2], 3, 2, 1)
        self.stage = nn.Sequential(_LiteHRModule(3, 1, c, multiscale_output=True))

    def forward(self, x):
        x0 = self.stem(x)
        x1 = self.down1(x0)
        return self.stage([x0, x1, self.down2(x1)])


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters and running statistics in every norm (eval mode is then not the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name, lo, hi in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5), ("running_mean", -0.5, 0.5),
                                 ("running_var", 0.5, 2.0)):
                t = getattr(m, name, None)
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, InPlaceABNSync)) and t is not None:
                    t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (hi - lo) + lo)


def build(family: str, width: int = 4, seed: int = 0) -> nn.Module:
    """A TinyHRNet of one family (see FAMILIES), or the Lite-HRNet stand-in for family 'lite'."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "lite":
            model = _LiteNet(width)
        else:
            make, last_multi_scale, _ = FAMILIES[family]
            model = TinyHRNet(make, width, last_multi_scale)
    randomize_norms(model, seed)
    return model


def size_based(family: str) -> bool:
    """Whether the family's original code runs on sizes that are not multiples of 2^k."""
    return FAMILIES[family][2]


def fusion_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if getattr(m, "fuse_layers", None) is not None]


# ------------------------------------------------------------------------------ whole models with heads (section 4)
#
# Official HighResolutionNet (seg HRNet-OCR and master branches, facial landmarks, seg_hrnet_ocr), openseg's HRNet_W48,
# mmseg EncoderDecoder / CascadeEncoderDecoder with FCNHead / OCRHead, mmpose TopdownPoseEstimator with the
# FeatureMapProcessor neck and HeatmapHead, at toy widths. Each forward is written out as the upstream file has it
# (the head patcher checks the official forward's source and attributes).


def _head_layers(width, num_classes, norm, momentum, act=None, final_conv_kernel=1):
    """`last_layer` / facial `head`: Sequential(conv1x1 (bias), norm, ReLU(inplace), conv k x k (bias))."""
    return nn.Sequential(
        nn.Conv2d(width, width, kernel_size=1, stride=1, padding=0),
        norm(width, momentum=momentum),
        act if act is not None else nn.ReLU(inplace=True),
        nn.Conv2d(width, num_classes, kernel_size=final_conv_kernel, stride=1,
                  padding=1 if final_conv_kernel == 3 else 0))


class _OfficialNetBase(nn.Module):
    """`HighResolutionNet.__init__` of the official seg / face code at toy widths: conv1 bn1 conv2 bn2 relu layer1,
    then transition1 stage2 transition2 stage3 transition3 stage4 (every stage multi-scale) with stage{2,3,4}_cfg.
    Subclasses add the head (`_add_head`) and write the forward."""

    family = "seg_ocr"
    bn_momentum = 0.1
    head_attr = "last_layer"

    def __init__(self, width=4, stem=8, num_classes=3, head_norm=None, head_act=None, final_conv_kernel=1):
        super().__init__()
        make_module = FAMILIES[self.family][0]
        norm, m = nn.BatchNorm2d, self.bn_momentum
        channels = [width * 2 ** k for k in range(4)]
        self.conv1 = nn.Conv2d(3, stem, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = norm(stem, momentum=m)
        self.conv2 = nn.Conv2d(stem, stem, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = norm(stem, momentum=m)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(stem, stem))
        pre = [stem]
        for s, modules in ((2, 1), (3, 1), (4, 2)):
            cur = channels[:s]
            setattr(self, f"stage{s}_cfg", dict(NUM_MODULES=modules, NUM_BRANCHES=s, BLOCK="BASIC",
                                                NUM_BLOCKS=[1] * s, NUM_CHANNELS=cur, FUSE_METHOD="SUM"))
            setattr(self, f"transition{s - 1}", self._make_transition_layer(pre, cur))
            setattr(self, f"stage{s}", nn.Sequential(*[make_module(s, cur, True) for _ in range(modules)]))
            pre = cur
        self._add_head(sum(channels), num_classes, head_norm or nn.BatchNorm2d, head_act, final_conv_kernel)

    def _add_head(self, width, num_classes, norm, act, final_conv_kernel):
        setattr(self, self.head_attr, _head_layers(width, num_classes, norm, self.bn_momentum, act, final_conv_kernel))

    def _make_transition_layer(self, num_channels_pre_layer, num_channels_cur_layer):
        num_branches_cur = len(num_channels_cur_layer)
        num_branches_pre = len(num_channels_pre_layer)
        transition_layers = []
        for i in range(num_branches_cur):
            if i < num_branches_pre:
                if num_channels_cur_layer[i] != num_channels_pre_layer[i]:
                    transition_layers.append(nn.Sequential(
                        nn.Conv2d(num_channels_pre_layer[i], num_channels_cur_layer[i], 3, 1, 1, bias=False),
                        nn.BatchNorm2d(num_channels_cur_layer[i], momentum=self.bn_momentum),
                        nn.ReLU(inplace=True)))
                else:
                    transition_layers.append(None)
            else:
                conv3x3s = []
                for j in range(i + 1 - num_branches_pre):
                    inchannels = num_channels_pre_layer[-1]
                    outchannels = num_channels_cur_layer[i] if j == i - num_branches_pre else inchannels
                    conv3x3s.append(nn.Sequential(
                        nn.Conv2d(inchannels, outchannels, 3, 2, 1, bias=False),
                        nn.BatchNorm2d(outchannels, momentum=self.bn_momentum),
                        nn.ReLU(inplace=True)))
                transition_layers.append(nn.Sequential(*conv3x3s))
        return nn.ModuleList(transition_layers)


class HighResolutionNet(_OfficialNetBase):
    """HRNet-Semantic-Segmentation (HRNet-OCR branch) seg_hrnet.py: the concat resizes with the module global
    ALIGN_CORNERS (this file's), x[0] is not resampled; `last_layer` after it; output at 1/4."""

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.relu(x)
        x = self.layer1(x)

        x_list = []
        for i in range(self.stage2_cfg["NUM_BRANCHES"]):
            if self.transition1[i] is not None:
                x_list.append(self.transition1[i](x))
            else:
                x_list.append(x)
        y_list = self.stage2(x_list)

        x_list = []
        for i in range(self.stage3_cfg["NUM_BRANCHES"]):
            if self.transition2[i] is not None:
                if i < self.stage2_cfg["NUM_BRANCHES"]:
                    x_list.append(self.transition2[i](y_list[i]))
                else:
                    x_list.append(self.transition2[i](y_list[-1]))
            else:
                x_list.append(y_list[i])
        y_list = self.stage3(x_list)

        x_list = []
        for i in range(self.stage4_cfg["NUM_BRANCHES"]):
            if self.transition3[i] is not None:
                if i < self.stage3_cfg["NUM_BRANCHES"]:
                    x_list.append(self.transition3[i](y_list[i]))
                else:
                    x_list.append(self.transition3[i](y_list[-1]))
            else:
                x_list.append(y_list[i])
        x = self.stage4(x_list)

        # Upsampling
        x0_h, x0_w = x[0].size(2), x[0].size(3)
        x1 = F.interpolate(x[1], size=(x0_h, x0_w), mode="bilinear", align_corners=ALIGN_CORNERS)
        x2 = F.interpolate(x[2], size=(x0_h, x0_w), mode="bilinear", align_corners=ALIGN_CORNERS)
        x3 = F.interpolate(x[3], size=(x0_h, x0_w), mode="bilinear", align_corners=ALIGN_CORNERS)

        x = torch.cat([x[0], x1, x2, x3], 1)

        x = self.last_layer(x)

        return x


class _SegMasterNet(_OfficialNetBase):
    """Seg master / pytorch-v1.1 seg_hrnet.py: no ALIGN_CORNERS global, the concat resizes without align_corners
    (False), BN momentum 0.01, every non-None transition fed y_list[-1]."""

    family = "seg_master"
    bn_momentum = 0.01

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.relu(x)
        x = self.layer1(x)

        x_list = []
        for i in range(self.stage2_cfg["NUM_BRANCHES"]):
            if self.transition1[i] is not None:
                x_list.append(self.transition1[i](x))
            else:
                x_list.append(x)
        y_list = self.stage2(x_list)

        x_list = []
        for i in range(self.stage3_cfg["NUM_BRANCHES"]):
            if self.transition2[i] is not None:
                x_list.append(self.transition2[i](y_list[-1]))
            else:
                x_list.append(y_list[i])
        y_list = self.stage3(x_list)

        x_list = []
        for i in range(self.stage4_cfg["NUM_BRANCHES"]):
            if self.transition3[i] is not None:
                x_list.append(self.transition3[i](y_list[-1]))
            else:
                x_list.append(y_list[i])
        x = self.stage4(x_list)

        # Upsampling
        x0_h, x0_w = x[0].size(2), x[0].size(3)
        x1 = F.interpolate(x[1], size=(x0_h, x0_w), mode="bilinear")
        x2 = F.interpolate(x[2], size=(x0_h, x0_w), mode="bilinear")
        x3 = F.interpolate(x[3], size=(x0_h, x0_w), mode="bilinear")

        x = torch.cat([x[0], x1, x2, x3], 1)
        x = self.last_layer(x)

        return x


class _FaceNet(_OfficialNetBase):
    """HRNet-Facial-Landmark-Detection lib/models/hrnet.py: an unused `sf` Softmax, the head named `head`, the
    concat with an explicit align_corners=False, BN momentum 0.01."""

    family = "face"
    bn_momentum = 0.01
    head_attr = "head"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sf = nn.Softmax(dim=1)

    def forward(self, x):
        # h, w = x.size(2), x.size(3)
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.relu(x)
        x = self.layer1(x)

        x_list = []
        for i in range(self.stage2_cfg["NUM_BRANCHES"]):
            if self.transition1[i] is not None:
                x_list.append(self.transition1[i](x))
            else:
                x_list.append(x)
        y_list = self.stage2(x_list)

        x_list = []
        for i in range(self.stage3_cfg["NUM_BRANCHES"]):
            if self.transition2[i] is not None:
                x_list.append(self.transition2[i](y_list[-1]))
            else:
                x_list.append(y_list[i])
        y_list = self.stage3(x_list)

        x_list = []
        for i in range(self.stage4_cfg["NUM_BRANCHES"]):
            if self.transition3[i] is not None:
                x_list.append(self.transition3[i](y_list[-1]))
            else:
                x_list.append(y_list[i])
        x = self.stage4(x_list)

        # Head Part
        height, width = x[0].size(2), x[0].size(3)
        x1 = F.interpolate(x[1], size=(height, width), mode="bilinear", align_corners=False)
        x2 = F.interpolate(x[2], size=(height, width), mode="bilinear", align_corners=False)
        x3 = F.interpolate(x[3], size=(height, width), mode="bilinear", align_corners=False)
        x = torch.cat([x[0], x1, x2, x3], 1)
        x = self.head(x)

        return x


class _SegOcrNet(HighResolutionNet):
    """seg_hrnet_ocr.py: the concat feeds `aux_head` (last_layer's structure) and the OCR head (`conv3x3_ocr`,
    `ocr_gather_head`, `ocr_distri_head` (stand-ins), `cls_head`); returns [out_aux, out]."""

    head_attr = "aux_head"

    def _add_head(self, width, num_classes, norm, act, final_conv_kernel):
        super()._add_head(width, num_classes, norm, act, final_conv_kernel)
        self.conv3x3_ocr = nn.Sequential(nn.Conv2d(width, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.ocr_gather_head = nn.Identity()
        self.ocr_distri_head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.05))
        self.cls_head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        y_list = [x]
        for s in (2, 3, 4):
            transition = getattr(self, f"transition{s - 1}")
            x_list = [y_list[i] if t is None else t(y_list[i] if i < len(y_list) else y_list[-1])
                      for i, t in enumerate(transition)]
            y_list = getattr(self, f"stage{s}")(x_list)
        x = y_list
        x0_h, x0_w = x[0].size(2), x[0].size(3)
        ups = [F.interpolate(t, size=(x0_h, x0_w), mode="bilinear", align_corners=ALIGN_CORNERS) for t in x[1:]]
        feats = torch.cat([x[0], *ups], 1)
        out_aux = self.aux_head(feats)
        feats = self.ocr_distri_head(self.ocr_gather_head(self.conv3x3_ocr(feats)))
        return [out_aux, self.cls_head(feats)]


class _OpensegHRNet(nn.Module):
    """openseg.pytorch HRNet_W48: `backbone` (branches), concat with align_corners=True, `cls_head` =
    Sequential(conv3x3 (bias), BNReLU, Dropout2d(0.10), conv1x1 (no bias)), resized to the input."""

    def __init__(self, width=4, num_classes=3):
        super().__init__()
        self.backbone = TinyHRNet(FAMILIES["openseg"][0], width, True)
        c = 15 * width
        self.cls_head = nn.Sequential(
            nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1),
            nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()),
            nn.Dropout2d(0.10),
            nn.Conv2d(c, num_classes, kernel_size=1, stride=1, padding=0, bias=False))

    def forward(self, x_):
        x = self.backbone(x_)
        _, _, h, w = x[0].size()
        feat1 = x[0]
        feat2 = F.interpolate(x[1], size=(h, w), mode="bilinear", align_corners=True)
        feat3 = F.interpolate(x[2], size=(h, w), mode="bilinear", align_corners=True)
        feat4 = F.interpolate(x[3], size=(h, w), mode="bilinear", align_corners=True)
        feats = torch.cat([feat1, feat2, feat3, feat4], 1)
        out = self.cls_head(feats)
        out = F.interpolate(out, size=(x_.size(2), x_.size(3)), mode="bilinear", align_corners=True)
        return out


_place(_SegMasterNet, "hrnet_layouts_seg_master.seg_hrnet", "HighResolutionNet")
_place(_FaceNet, "hrnet_layouts_face.hrnet", "HighResolutionNet")
_place(_SegOcrNet, "hrnet_layouts_seg_ocr.seg_hrnet_ocr", "HighResolutionNet")
_place(_OpensegHRNet, "hrnet_layouts_openseg.hrnet", "HRNet_W48")


class _ConvModule(nn.Module):
    """mmcv ConvModule(norm_cfg, act_cfg=ReLU): `conv` (bias='auto': False with a norm), the norm under its
    `norm_name` ('bn' for BN/SyncBN, 'gn' for GN), `activate`; forward in `order`."""

    def __init__(self, in_channels, out_channels, kernel_size=1, norm_cfg=None, act=None):
        super().__init__()
        self.order = ("conv", "norm", "act")
        self.with_explicit_padding = False
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm_name, norm = _build_norm_layer(norm_cfg or dict(type="BN"), out_channels)
        self.add_module(self.norm_name, norm)
        self.activate = act if act is not None else nn.ReLU(inplace=True)

    @property
    def norm(self):
        return getattr(self, self.norm_name)

    def forward(self, x):
        for layer in self.order:
            if layer == "conv":
                x = self.conv(x)
            elif layer == "norm":
                x = self.norm(x)
            elif layer == "act":
                x = self.activate(x)
        return x


class _BaseDecodeHead(nn.Module):
    """mmseg BaseDecodeHead: in_index, input_transform, align_corners, conv_seg, dropout (None for
    dropout_ratio <= 0); `_transform_inputs` resizes every selected input (x0 too) to inputs[0]'s size and concats;
    `cls_seg` = dropout then conv_seg."""

    def __init__(self, in_channels, channels, num_classes=3, dropout_ratio=0.1, norm_cfg=None, in_index=-1,
                 input_transform=None, align_corners=False):
        super().__init__()
        self.in_channels = sum(in_channels) if input_transform == "resize_concat" else in_channels
        self.channels = channels
        self.num_classes = num_classes
        self.norm_cfg = norm_cfg
        self.in_index = in_index
        self.input_transform = input_transform
        self.align_corners = align_corners
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None

    def _transform_inputs(self, inputs):
        if self.input_transform == "resize_concat":
            inputs = [inputs[i] for i in self.in_index]
            upsampled_inputs = [resize(input=x, size=inputs[0].shape[2:], mode="bilinear",
                                       align_corners=self.align_corners) for x in inputs]
            inputs = torch.cat(upsampled_inputs, dim=1)
        elif self.input_transform == "multiple_select":
            inputs = [inputs[i] for i in self.in_index]
        else:
            inputs = inputs[self.in_index]
        return inputs

    def cls_seg(self, feat):
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)


class _FCNHead(_BaseDecodeHead):
    """mmseg FCNHead(num_convs, kernel_size, concat_input): `convs` of ConvModules, `conv_cat` with concat_input."""

    def __init__(self, num_convs=2, kernel_size=3, concat_input=True, act=None, **kwargs):
        super().__init__(**kwargs)
        self.num_convs, self.concat_input, self.kernel_size = num_convs, concat_input, kernel_size
        convs = [_ConvModule(self.in_channels if k == 0 else self.channels, self.channels, kernel_size,
                             self.norm_cfg, act) for k in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        if concat_input:
            self.conv_cat = _ConvModule(self.in_channels + self.channels, self.channels, kernel_size, self.norm_cfg)

    def _forward_feature(self, inputs):
        x = self._transform_inputs(inputs)
        feats = self.convs(x)
        if self.concat_input:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return feats

    def forward(self, inputs):
        output = self._forward_feature(inputs)
        output = self.cls_seg(output)
        return output


class _OCRHead(_BaseDecodeHead):
    """mmseg OCRHead (a cascade head: forward(inputs, prev_output)); a simplified body, never patched."""

    def __init__(self, ocr_channels=8, **kwargs):
        super().__init__(**kwargs)
        self.bottleneck = _ConvModule(self.in_channels, self.channels, 3, self.norm_cfg)

    def forward(self, inputs, prev_output):
        x = self._transform_inputs(inputs)
        feats = self.bottleneck(x)
        return self.cls_seg(feats) * torch.sigmoid(prev_output)


class _EncoderDecoder(nn.Module):
    """mmseg EncoderDecoder (the tensor path): backbone (HRNet, a list of 4 branches), decode_head."""

    def __init__(self, width=4, num_classes=3, dropout_ratio=-1, align_corners=False, norm="BN", act=None,
                 in_index=(0, 1, 2, 3), family="mmseg"):
        super().__init__()
        channels = [width * 2 ** k for k in range(4)]
        self.backbone = TinyHRNet(FAMILIES[family][0], width, True)
        self.decode_head = _FCNHead(in_channels=channels, in_index=in_index, channels=sum(channels) + 2,
                                    input_transform="resize_concat", kernel_size=1, num_convs=1, concat_input=False,
                                    dropout_ratio=dropout_ratio, num_classes=num_classes,
                                    norm_cfg=dict(type=norm, num_groups=2), align_corners=align_corners, act=act)

    def forward(self, inputs):
        return self.decode_head(self.backbone(inputs))


class _CascadeEncoderDecoder(nn.Module):
    """mmseg OCRNet-HR (ocrnet_hr18.py): decode_head = [FCNHead (aux, resize_concat), OCRHead (resize_concat)]."""

    def __init__(self, width=4, num_classes=3):
        super().__init__()
        channels = [width * 2 ** k for k in range(4)]
        self.backbone = TinyHRNet(FAMILIES["mmseg"][0], width, True)
        common = dict(in_channels=channels, in_index=(0, 1, 2, 3), input_transform="resize_concat",
                      num_classes=num_classes, dropout_ratio=-1, align_corners=False)
        self.decode_head = nn.ModuleList([
            _FCNHead(channels=sum(channels), kernel_size=1, num_convs=1, concat_input=False, **common),
            _OCRHead(channels=16, ocr_channels=8, **common)])

    def forward(self, inputs):
        x = self.backbone(inputs)
        out = self.decode_head[0](x)
        return [out, self.decode_head[1](x, out)]


class _FeatureMapProcessor(nn.Module):
    """mmpose FeatureMapProcessor(concat=True): every input resized (bilinear, align_corners False) to inputs[0]'s
    size and concatenated; returns a one-element list."""

    def __init__(self, select_index=None, concat=False, scale_factor=1.0, apply_relu=False, align_corners=False):
        super().__init__()
        self.select_index = select_index
        self.concat = concat
        self.scale_factor = scale_factor
        self.apply_relu = apply_relu
        self.align_corners = align_corners

    def forward(self, inputs):
        if not isinstance(inputs, (tuple, list)):
            sequential_input = False
            inputs = [inputs]
        else:
            sequential_input = True
            if self.select_index is not None:
                inputs = [inputs[i] for i in self.select_index]
            if self.concat:
                inputs = self._concat(inputs)
        if not sequential_input:
            inputs = inputs[0]
        return inputs

    def _concat(self, inputs):
        size = inputs[0].shape[-2:]
        resized_inputs = [resize(x, size=size, mode="bilinear", align_corners=self.align_corners) for x in inputs]
        return [torch.cat(resized_inputs, dim=1)]


class _HeatmapHead(nn.Module):
    """mmpose 1.x HeatmapHead(conv_out_channels=(C,), conv_kernel_sizes=(1,), deconv_out_channels=None)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.deconv_layers = nn.Identity()
        self.conv_layers = nn.Sequential(nn.Conv2d(in_channels, in_channels, 1), nn.BatchNorm2d(in_channels),
                                         nn.ReLU(inplace=True))
        self.final_layer = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, feats):
        x = feats[-1]
        x = self.deconv_layers(x)
        x = self.conv_layers(x)
        x = self.final_layer(x)
        return x


class _TopdownPoseEstimator(nn.Module):
    """mmpose 1.x TopdownPoseEstimator (the tensor path `_forward`): extract_feat (backbone, neck), head.forward."""

    def __init__(self, width=4, num_keypoints=3):
        super().__init__()
        self.backbone = TinyHRNet(FAMILIES["mmpose_bilinear"][0], width, True)
        self.neck = _FeatureMapProcessor(concat=True)
        self.head = _HeatmapHead(15 * width, num_keypoints)

    def extract_feat(self, inputs):
        return self.neck(self.backbone(inputs))

    def forward(self, inputs):
        return self.head.forward(self.extract_feat(inputs))


_place(_ConvModule, "hrnet_layouts_mmcv.conv_module", "ConvModule")
_place(_BaseDecodeHead, "hrnet_layouts_mmseg.decode_head", "BaseDecodeHead")
_place(_FCNHead, "hrnet_layouts_mmseg.fcn_head", "FCNHead")
_place(_OCRHead, "hrnet_layouts_mmseg.ocr_head", "OCRHead")
_place(_EncoderDecoder, "hrnet_layouts_mmseg.encoder_decoder", "EncoderDecoder")
_place(_CascadeEncoderDecoder, "hrnet_layouts_mmseg.cascade_encoder_decoder", "CascadeEncoderDecoder")
_place(_FeatureMapProcessor, "hrnet_layouts_mmpose.feature_map_processor", "FeatureMapProcessor")
_place(_HeatmapHead, "hrnet_layouts_mmpose.heatmap_head", "HeatmapHead")
_place(_TopdownPoseEstimator, "hrnet_layouts_mmpose.topdown", "TopdownPoseEstimator")

# whole models with a head: name -> class (constructor kwargs vary the head, see each class)
NETS: Dict[str, type] = {
    "seg_ocr": HighResolutionNet,
    "seg_master": _SegMasterNet,
    "face": _FaceNet,
    "seg_hrnet_ocr": _SegOcrNet,
    "openseg": _OpensegHRNet,
    "mmseg": _EncoderDecoder,
    "mmseg_ocr": _CascadeEncoderDecoder,
    "mmpose": _TopdownPoseEstimator,
}


def build_net(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A whole toy model with its head (see NETS), norms randomized; `kwargs` go to its constructor."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NETS[name](**kwargs)
    randomize_norms(model, seed)
    return model


def fcn_head(channels=(2, 4, 8, 16), num_classes=3, seed=0, **kwargs) -> nn.Module:
    """A standalone mmseg FCNHead as fcn_hr18.py configures it (resize_concat of 4 inputs, one 1x1 ConvModule)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        options = dict(in_channels=list(channels), in_index=tuple(range(len(channels))), channels=sum(channels),
                       input_transform="resize_concat", kernel_size=1, num_convs=1, concat_input=False,
                       dropout_ratio=-1, num_classes=num_classes, align_corners=False)
        head = _FCNHead(**{**options, **kwargs})
    randomize_norms(head, seed)
    return head
