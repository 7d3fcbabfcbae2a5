"""Test-only replicas of the upstream HRNetV2p and mmpose V2-head classes (HRNET_LAYOUTS.md sections 4 and 5).

mmdet, mmcv, mmengine and mmpose are not installed here, so their classes are rebuilt from the upstream sources
(mmdet 3.x ``mmdet/models/necks/hrfpn.py``, HRNet-Object-Detection ``mmdet/models/necks/hrfpn.py``, mmcv
``ConvModule``, mmpose 1.x ``BasePoseEstimator`` / ``TopdownPoseEstimator`` / ``FeatureMapProcessor`` /
``HeatmapHead``): same class names (each in a Python module of its own, as `hrnet_layouts` places them), same
attribute names, the same forward semantics step by step (where the upsampling happens, with which arguments,
the ``requires_grad and with_cp`` checkpoint conditions, which method calls which). What the tests do not touch
(registries, init_cfg, codecs, metainfo parsing, accuracy metrics) is reduced to what the forward paths need.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional, Tuple

import hrnet_layouts as layouts
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

_place = layouts._place


# ------------------------------------------------------------------------------------------------------ mmcv


class _ConvModule(nn.Module):
    """mmcv ConvModule(conv_cfg=None, norm_cfg, act_cfg): ``conv`` (bias='auto': a bias unless there is a norm),
    the norm (``bn``) when norm_cfg is given, ``activate`` (ReLU) unless act_cfg is None; forward in order
    conv, norm, act."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, conv_cfg=None, norm_cfg=None,
                 act_cfg=dict(type="ReLU"), inplace=True, order=("conv", "norm", "act")):
        super().__init__()
        self.with_norm = norm_cfg is not None
        self.with_activation = act_cfg is not None
        self.order = order
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=not self.with_norm)
        if self.with_norm:
            self.norm_name = "bn"
            self.add_module("bn", nn.BatchNorm2d(out_channels))
        if self.with_activation:
            self.activate = nn.ReLU(inplace=inplace)

    def forward(self, x):
        for layer in self.order:
            if layer == "conv":
                x = self.conv(x)
            elif layer == "norm" and self.with_norm:
                x = getattr(self, self.norm_name)(x)
            elif layer == "act" and self.with_activation:
                x = self.activate(x)
        return x


_place(_ConvModule, "hrfpn_layouts_mmcv.cnn.bricks.conv_module", "ConvModule")


# ----------------------------------------------------------------------------------------------- mmdet HRFPN


class _MmdetHRFPN(nn.Module):
    """mmdet 2.x/3.x HRFPN: upsample branch i by scale_factor 2**i (bilinear, align_corners unset), concat, a 1x1
    ConvModule reduction (bias, no norm, no activation), avg/max pooling to num_outs levels, a 3x3 ConvModule per
    level; reduction and level convs checkpointed when the tensor requires grad and with_cp is set."""

    def __init__(self, in_channels, out_channels, num_outs=5, pooling_type="AVG", conv_cfg=None, norm_cfg=None,
                 with_cp=False, stride=1):
        super().__init__()
        assert isinstance(in_channels, list)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_ins = len(in_channels)
        self.num_outs = num_outs
        self.with_cp = with_cp
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.reduction_conv = _ConvModule(sum(in_channels), out_channels, kernel_size=1, conv_cfg=self.conv_cfg,
                                          norm_cfg=norm_cfg, act_cfg=None)
        self.fpn_convs = nn.ModuleList(
            _ConvModule(out_channels, out_channels, kernel_size=3, padding=1, stride=stride, conv_cfg=self.conv_cfg,
                        act_cfg=None) for _ in range(self.num_outs))
        self.pooling = F.max_pool2d if pooling_type == "MAX" else F.avg_pool2d

    def forward(self, inputs):
        """Forward function."""
        assert len(inputs) == self.num_ins
        outs = [inputs[0]]
        for i in range(1, self.num_ins):
            outs.append(F.interpolate(inputs[i], scale_factor=2**i, mode="bilinear"))
        out = torch.cat(outs, dim=1)
        if out.requires_grad and self.with_cp:
            out = checkpoint(self.reduction_conv, out)
        else:
            out = self.reduction_conv(out)
        outs = [out]
        for i in range(1, self.num_outs):
            outs.append(self.pooling(out, kernel_size=2**i, stride=2**i))
        outputs = []
        for i in range(self.num_outs):
            if outs[i].requires_grad and self.with_cp:
                tmp_out = checkpoint(self.fpn_convs[i], outs[i])
            else:
                tmp_out = self.fpn_convs[i](outs[i])
            outputs.append(tmp_out)
        return tuple(outputs)


class _OfficialHRFPN(nn.Module):
    """HRNet-Object-Detection HRFPN: the same algorithm with ``reduction_conv = Sequential(Conv2d 1x1)``,
    ``fpn_conv`` (5 convs, or one shared conv that is never checkpointed), 5 levels, ``with_checkpoint``."""

    def __init__(self, in_channels, out_channels, normalize=None, pooling="AVG", share_conv=False,
                 with_checkpoint=False):
        super().__init__()
        assert isinstance(in_channels, list)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_ins = len(in_channels)
        self.with_bias = normalize is None
        self.share_conv = share_conv
        self.reduction_conv = nn.Sequential(nn.Conv2d(sum(in_channels), out_channels, kernel_size=1))
        if self.share_conv:
            self.fpn_conv = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        else:
            self.fpn_conv = nn.ModuleList(nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
                                          for _ in range(5))
        self.pooling = F.max_pool2d if pooling == "MAX" else F.avg_pool2d
        self.with_checkpoint = with_checkpoint

    def forward(self, inputs):
        assert len(inputs) == len(self.in_channels)
        outs = []
        outs.append(inputs[0])
        for i in range(1, len(inputs)):
            outs.append(F.interpolate(inputs[i], scale_factor=2**i, mode="bilinear"))
        out = torch.cat(outs, dim=1)
        if out.requires_grad and self.with_checkpoint:
            out = checkpoint(self.reduction_conv, out)
        else:
            out = self.reduction_conv(out)
        outs = [out]
        for i in range(1, 5):
            outs.append(self.pooling(out, kernel_size=2**i, stride=2**i))
        outputs = []
        if self.share_conv:
            for i in range(5):
                outputs.append(self.fpn_conv(outs[i]))
        else:
            for i in range(5):
                if outs[i].requires_grad and self.with_checkpoint:
                    tmp_out = checkpoint(self.fpn_conv[i], outs[i])
                else:
                    tmp_out = self.fpn_conv[i](outs[i])
                outputs.append(tmp_out)
        return tuple(outputs)


class _ForkHRFPN(_MmdetHRFPN):
    """A fork as found in the wild: same class name, a forward that returns only the finest level."""

    def forward(self, inputs):
        outs = [inputs[0]] + [F.interpolate(inputs[i], scale_factor=2**i, mode="bilinear")
                              for i in range(1, self.num_ins)]
        return (self.fpn_convs[0](self.reduction_conv(torch.cat(outs, dim=1))),)


_place(_MmdetHRFPN, "hrfpn_layouts_mmdet.models.necks.hrfpn", "HRFPN")
_place(_OfficialHRFPN, "hrfpn_layouts_hrnet_od.models.necks.hrfpn", "HRFPN")
_place(_ForkHRFPN, "hrfpn_layouts_fork.necks", "HRFPN")

HRFPNS = {"mmdet": _MmdetHRFPN, "official": _OfficialHRFPN, "fork": _ForkHRFPN}


def hrfpn(kind: str, channels=(2, 4, 8, 16), out_channels=5, seed=0, **kwargs) -> nn.Module:
    """A toy HRFPN of `kind` ("mmdet", "official", "fork") with random weights and biases."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HRFPNS[kind](list(channels), out_channels, **kwargs)


def branches(channels=(2, 4, 8, 16), size=(16, 24), batch=2, dtype=torch.float64, seed=1) -> List[torch.Tensor]:
    """HRNet branch features: branch j has channels[j] at size / 2**j."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, size[0] >> j, size[1] >> j, generator=g, dtype=dtype)
            for j, c in enumerate(channels)]


# ---------------------------------------------------------------------------------------------------- mmpose


def resize(input, size=None, scale_factor=None, mode="nearest", align_corners=None, warning=True):
    """mmpose.models.utils.ops.resize: F.interpolate (the warning branch only warns)."""
    if isinstance(size, torch.Size):
        size = tuple(int(x) for x in size)
    return F.interpolate(input, size, scale_factor, mode, align_corners)


class _FeatureMapProcessor(nn.Module):
    """mmpose 1.x FeatureMapProcessor: select, concat (every input resized bilinear to inputs[0]), ReLU, rescale."""

    def __init__(self, select_index=None, concat=False, scale_factor=1.0, apply_relu=False, align_corners=False):
        super().__init__()
        if isinstance(select_index, int):
            select_index = (select_index,)
        self.select_index = select_index
        self.concat = concat
        assert scale_factor > 0
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
        if self.apply_relu:
            inputs = [F.relu(x) for x in inputs]
        if self.scale_factor != 1.0:
            inputs = self._rescale(inputs)
        if not sequential_input:
            inputs = inputs[0]
        return inputs

    def _concat(self, inputs):
        size = inputs[0].shape[-2:]
        resized = [resize(x, size=size, mode="bilinear", align_corners=self.align_corners) for x in inputs]
        return [torch.cat(resized, dim=1)]

    def _rescale(self, inputs):
        return [resize(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=self.align_corners)
                for x in inputs]


def flip_heatmaps(heatmaps, flip_indices, shift_heatmap=True):
    """mmpose.models.utils.tta.flip_heatmaps, flip_mode='heatmap'."""
    heatmaps = heatmaps.flip(-1)[:, flip_indices]
    if shift_heatmap:
        heatmaps[..., 1:] = heatmaps[..., :-1].clone()
    return heatmaps


class _BaseHead(nn.Module):
    """mmpose BaseHead: decode (here the argmax of each heatmap, standing in for the codec)."""

    def decode(self, batch_outputs):
        n, k, h, w = batch_outputs.shape
        scores, index = batch_outputs.flatten(2).max(-1)
        keypoints = torch.stack([index % w, index // w], -1).to(batch_outputs.dtype)
        return [SimpleNamespace(keypoints=keypoints[i:i + 1], keypoint_scores=scores[i:i + 1]) for i in range(n)]


class _HeatmapHead(_BaseHead):
    """mmpose 1.x HeatmapHead: deconv_layers (Identity when none), conv_layers (conv-BN-ReLU per entry), a 1x1
    final_layer; forward on feats[-1]; predict (flip test: average with the flipped heatmaps), loss (MSE)."""

    def __init__(self, in_channels, out_channels, deconv_out_channels=(256, 256, 256),
                 deconv_kernel_sizes=(4, 4, 4), conv_out_channels=None, conv_kernel_sizes=None,
                 has_final_layer=True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.loss_module = nn.MSELoss()
        if deconv_out_channels:
            layers = []
            for c, k in zip(deconv_out_channels, deconv_kernel_sizes):
                layers += [nn.ConvTranspose2d(in_channels, c, k, stride=2, padding=1, bias=False),
                           nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                in_channels = c
            self.deconv_layers = nn.Sequential(*layers)
        else:
            self.deconv_layers = nn.Identity()
        if conv_out_channels:
            self.conv_layers = self._make_conv_layers(in_channels, conv_out_channels, conv_kernel_sizes)
            in_channels = conv_out_channels[-1]
        else:
            self.conv_layers = nn.Identity()
        self.final_layer = nn.Conv2d(in_channels, out_channels, 1) if has_final_layer else nn.Identity()

    def _make_conv_layers(self, in_channels, layer_out_channels, layer_kernel_sizes):
        layers = []
        for out_channels, kernel_size in zip(layer_out_channels, layer_kernel_sizes):
            padding = (kernel_size - 1) // 2
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=padding))
            layers.append(nn.BatchNorm2d(num_features=out_channels))
            layers.append(nn.ReLU(inplace=True))
            in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, feats):
        x = feats[-1]
        x = self.deconv_layers(x)
        x = self.conv_layers(x)
        x = self.final_layer(x)
        return x

    def predict(self, feats, batch_data_samples, test_cfg={}):
        if test_cfg.get("flip_test", False):
            assert isinstance(feats, list) and len(feats) == 2
            flip_indices = batch_data_samples[0].metainfo["flip_indices"]
            _feats, _feats_flip = feats
            _batch_heatmaps = self.forward(_feats)
            _batch_heatmaps_flip = flip_heatmaps(self.forward(_feats_flip), flip_indices=flip_indices,
                                                 shift_heatmap=test_cfg.get("shift_heatmap", False))
            batch_heatmaps = (_batch_heatmaps + _batch_heatmaps_flip) * 0.5
        else:
            batch_heatmaps = self.forward(feats)
        preds = self.decode(batch_heatmaps)
        if test_cfg.get("output_heatmaps", False):
            return preds, [SimpleNamespace(heatmaps=h) for h in batch_heatmaps]
        return preds

    def loss(self, feats, batch_data_samples, train_cfg={}):
        pred_fields = self.forward(feats)
        gt_heatmaps = torch.stack([d.gt_fields.heatmaps for d in batch_data_samples])
        return dict(loss_kpt=self.loss_module(pred_fields, gt_heatmaps))


class _BasePoseEstimator(nn.Module):
    """mmpose BasePoseEstimator: backbone, optional neck and head; forward dispatches on mode."""

    def __init__(self, backbone, neck=None, head=None, train_cfg=None, test_cfg=None):
        super().__init__()
        self.backbone = backbone
        if neck is not None:
            self.neck = neck
        if head is not None:
            self.head = head
        self.train_cfg = train_cfg if train_cfg else {}
        self.test_cfg = test_cfg if test_cfg else {}

    @property
    def with_neck(self) -> bool:
        return hasattr(self, "neck") and self.neck is not None

    @property
    def with_head(self) -> bool:
        return hasattr(self, "head") and self.head is not None

    def forward(self, inputs, data_samples=None, mode="tensor"):
        if mode == "loss":
            return self.loss(inputs, data_samples)
        elif mode == "predict":
            return self.predict(inputs, data_samples)
        elif mode == "tensor":
            return self._forward(inputs)
        raise RuntimeError(f'Invalid mode "{mode}". Only supports loss, predict and tensor mode.')

    def _forward(self, inputs):
        x = self.extract_feat(inputs)
        if self.with_head:
            x = self.head.forward(x)
        return x

    def extract_feat(self, inputs):
        x = self.backbone(inputs)
        if self.with_neck:
            x = self.neck(x)
        return x


class _TopdownPoseEstimator(_BasePoseEstimator):
    """mmpose TopdownPoseEstimator: extract_feat, _forward, loss, predict (flip test: features of the flipped
    input too), add_pred_to_datasample."""

    def extract_feat(self, inputs):
        x = self.backbone(inputs)
        if self.with_neck:
            x = self.neck(x)
        return x

    def _forward(self, inputs):
        x = self.extract_feat(inputs)
        if self.with_head:
            x = self.head.forward(x)
        return x

    def loss(self, inputs, data_samples):
        feats = self.extract_feat(inputs)
        losses = dict()
        if self.with_head:
            losses.update(self.head.loss(feats, data_samples, train_cfg=self.train_cfg))
        return losses

    def predict(self, inputs, data_samples):
        assert self.with_head
        if self.test_cfg.get("flip_test", False):
            _feats = self.extract_feat(inputs)
            _feats_flip = self.extract_feat(inputs.flip(-1))
            feats = [_feats, _feats_flip]
        else:
            feats = self.extract_feat(inputs)
        preds = self.head.predict(feats, data_samples, test_cfg=self.test_cfg)
        if isinstance(preds, Tuple):
            batch_pred_instances, batch_pred_fields = preds
        else:
            batch_pred_instances, batch_pred_fields = preds, None
        return self.add_pred_to_datasample(batch_pred_instances, batch_pred_fields, data_samples)

    def add_pred_to_datasample(self, batch_pred_instances, batch_pred_fields, batch_data_samples):
        for k, (pred, data_sample) in enumerate(zip(batch_pred_instances, batch_data_samples)):
            data_sample.pred_instances = pred
            if batch_pred_fields is not None:
                data_sample.pred_fields = batch_pred_fields[k]
        return batch_data_samples


class ToyBackbone(nn.Module):
    """Four branches as an HRNet returns them (a tuple; branch j at 1/2**j of branch 0, channels C * 2**j), or
    only branch 0 (``multiscale_output=False``, the top-down pose configs)."""

    def __init__(self, width=2, multiscale_output=True):
        super().__init__()
        self.multiscale_output = multiscale_output
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.downs = nn.ModuleList(nn.Conv2d(width * 2 ** j, width * 2 ** (j + 1), 3, stride=2, padding=1)
                                   for j in range(3))

    def forward(self, x):
        outs = [torch.tanh(self.stem(x))]
        for down in self.downs:
            outs.append(torch.tanh(down(outs[-1])))
        return tuple(outs) if self.multiscale_output else (outs[0],)


_place(_FeatureMapProcessor, "hrfpn_layouts_mmpose.models.necks.fmap_proc_neck", "FeatureMapProcessor")
_place(_BaseHead, "hrfpn_layouts_mmpose.models.heads.base_head", "BaseHead")
_place(_HeatmapHead, "hrfpn_layouts_mmpose.models.heads.heatmap_heads.heatmap_head", "HeatmapHead")
_place(_BasePoseEstimator, "hrfpn_layouts_mmpose.models.pose_estimators.base", "BasePoseEstimator")
_place(_TopdownPoseEstimator, "hrfpn_layouts_mmpose.models.pose_estimators.topdown", "TopdownPoseEstimator")


def pose_estimator(kind: str = "v2", width=2, keypoints=3, seed=0, test_cfg=None, neck: Optional[dict] = None):
    """A TopdownPoseEstimator over `ToyBackbone`: "v2" (the face/wholebody HRNetV2 configs: the concat neck and
    HeatmapHead(conv_out_channels=(15C,), conv_kernel_sizes=(1,), deconv_out_channels=None)), "w32" (the top-down
    HRNet configs: no neck, HeatmapHead(in_channels=C, deconv_out_channels=None) on the top branch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        total = 15 * width
        if kind == "v2":
            model = _TopdownPoseEstimator(
                ToyBackbone(width), _FeatureMapProcessor(**{"concat": True, **(neck or {})}),
                _HeatmapHead(total, keypoints, deconv_out_channels=None, conv_out_channels=(total,),
                             conv_kernel_sizes=(1,)), test_cfg=test_cfg)
        else:
            model = _TopdownPoseEstimator(ToyBackbone(width, multiscale_output=False), None,
                                          _HeatmapHead(width, keypoints, deconv_out_channels=None), test_cfg=test_cfg)
    layouts.randomize_norms(model, seed)
    return model


def pose_samples(n: int, keypoints=3, size=(8, 8), seed=2) -> list:
    """Data samples with what loss and predict read: gt heatmaps, flip indices, and room for predictions."""
    g = torch.Generator().manual_seed(seed)
    flip = list(range(keypoints))[::-1]
    return [SimpleNamespace(gt_fields=SimpleNamespace(heatmaps=torch.rand(keypoints, *size, generator=g,
                                                                           dtype=torch.float64)),
                            metainfo=dict(flip_indices=flip)) for _ in range(n)]

