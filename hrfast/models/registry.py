"""Named builders of the reference HRNet models: `build_model(name, **kwargs)` and `list_models()`.

Names (paper naming, lower case):

- ``hrnetv2_{w18_small_v1, w18_small_v2, w18, w32, w40, w48, w64}_seg``: HRNetV2 segmentation
  (`hrfast.models.seg_hrnet.HighResolutionNet`; kwargs ``num_classes=19``, ``align_corners=False``,
  ``bn_momentum=0.1``, ``final_conv_kernel=1``);
- ``hrnetv2_w18_face``: facial landmarks (`hrfast.models.face_hrnet.HighResolutionNet`; ``num_joints=98``);
- ``hrnet_{w32, w48}_pose``: top-down pose estimation (`hrfast.models.pose_hrnet.PoseHighResolutionNet`;
  ``num_joints=17``, ``final_conv_kernel=1``, ``bn_momentum=0.1``), 28.54M / 63.60M parameters (paper: 28.5M,
  63.6M at 256x192);
- ``hrnet_{w18_small_v1, w18_small_v2, w18, w30, w32, w40, w44, w48, w64}_c``: ImageNet classifiers
  (`hrfast.models.cls_hrnet.HighResolutionNet`; ``num_classes=1000``); `TIMM_NAMES` maps them to timm's.

Parameter counts (official architecture, counted here): HRNetV2-W48 seg 65.86M (19 classes; paper 65.9M),
HRNet-W18-C 21.30M, W30-C 37.71M, W40-C 57.56M (paper 21.3M, 37.7M, 57.6M). **HRNetV2-W40 seg**: the paper's
row (45.2M params, 493.2 GFLOPs at 1024x2048) does not match the official architecture, which gives 45.89M
parameters and 535.4 GMACs (19 classes); these builders follow the official code.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch.nn as nn

from . import cls_hrnet, face_hrnet, pose_hrnet, seg_hrnet
from .configs import stage_config

__all__ = ["build_model", "list_models", "TIMM_NAMES", "TASKS"]

TASKS = ("seg", "cls", "face", "pose")

_SEG_WIDTHS = ("w18_small_v1", "w18_small_v2", "w18", "w32", "w40", "w48", "w64")
_CLS_WIDTHS = ("w18_small_v1", "w18_small_v2", "w18", "w30", "w32", "w40", "w44", "w48", "w64")
_POSE_WIDTHS = ("w32", "w48")

# our classifier name -> timm model name (same architecture and parameter names)
TIMM_NAMES: Dict[str, str] = {f"hrnet_{w}_c": "hrnet_" + {"w18_small_v1": "w18_small"}.get(w, w)
                              for w in _CLS_WIDTHS}


def _seg(width: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 19, align_corners: bool = False, bn_momentum: float = 0.1,
              final_conv_kernel: int = 1) -> nn.Module:
        return seg_hrnet.HighResolutionNet(stage_config(width), num_classes=num_classes, align_corners=align_corners,
                                           bn_momentum=bn_momentum, final_conv_kernel=final_conv_kernel)
    build.__doc__ = f"HRNetV2-{width.upper().replace('_', '-')} segmentation (official seg_hrnet.py layout)."
    return build


def _cls(width: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, bn_momentum: float = 0.1) -> nn.Module:
        return cls_hrnet.HighResolutionNet(stage_config(width), num_classes=num_classes, bn_momentum=bn_momentum)
    build.__doc__ = f"HRNet-{width.upper().replace('_', '-')}-C ImageNet classifier (official cls_hrnet.py layout)."
    return build


def _pose(width: str) -> Callable[..., nn.Module]:
    def build(num_joints: int = 17, final_conv_kernel: int = 1, bn_momentum: float = 0.1) -> nn.Module:
        return pose_hrnet.PoseHighResolutionNet(stage_config(width), num_joints=num_joints,
                                                final_conv_kernel=final_conv_kernel, bn_momentum=bn_momentum)
    build.__doc__ = f"Pose HRNet-{width.upper()} (official deep-high-resolution-net pose_hrnet.py layout)."
    return build


def _face(num_joints: int = 98, bn_momentum: float = 0.01) -> nn.Module:
    """Facial-landmark HRNetV2-W18 (official HRNet-Facial-Landmark-Detection layout)."""
    return face_hrnet.HighResolutionNet(num_joints=num_joints, bn_momentum=bn_momentum)


_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    **{f"hrnetv2_{w}_seg": _seg(w) for w in _SEG_WIDTHS},
    "hrnetv2_w18_face": _face,
    **{f"hrnet_{w}_c": _cls(w) for w in _CLS_WIDTHS},
    **{f"hrnet_{w}_pose": _pose(w) for w in _POSE_WIDTHS},
}
_TASK_OF = {name: {"seg": "seg", "face": "face", "c": "cls", "pose": "pose"}[name.rsplit("_", 1)[1]]
            for name in _REGISTRY}


def list_models(task: Optional[str] = None) -> List[str]:
    """The names `build_model` knows, in registry order; `task` ("seg", "cls", "face" or "pose") filters them."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return [n for n in _REGISTRY if task is None or _TASK_OF[n] == task]


def task_of(name: str) -> str:
    """The task ("seg", "cls", "face" or "pose") of the registered model `name`."""
    if name not in _TASK_OF:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(_REGISTRY)}")
    return _TASK_OF[name]


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the reference model `name` (see `list_models`) with randomly initialised weights, on the CPU.

    Keyword arguments go to the builder: ``num_classes``, ``align_corners``, ``bn_momentum``,
    ``final_conv_kernel`` (segmentation); ``num_classes``, ``bn_momentum`` (classification); ``num_joints``,
    ``bn_momentum`` (face); ``num_joints``, ``final_conv_kernel``, ``bn_momentum`` (pose). Wrap the call in ``with torch.device("meta"):`` to build without allocating.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(_REGISTRY)}") from None
    return builder(**kwargs)
