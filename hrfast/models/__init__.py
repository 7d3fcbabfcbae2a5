"""Clean reference HRNet models with the official MSRA structure and state_dict keys.

- `HRNetV2Segmentation` (``seg_hrnet.HighResolutionNet``): HRNetV2 segmentation, output at 1/4 resolution;
  ``align_corners`` is a constructor argument (the official code keeps it in a module global).
- `HRNetV2Landmarks` (``face_hrnet.HighResolutionNet``): facial-landmark HRNetV2-W18, head named ``head``.
- `HRNetClassifier` (``cls_hrnet.HighResolutionNet``): HRNet-W*-C ImageNet classifiers, same parameter names
  as timm ``hrnet_w*``.
- `PoseHRNet` (``pose_hrnet.PoseHighResolutionNet``): the top-down pose estimator (W32, W48), official
  ``pose_hrnet.py`` layout and keys.

Build them by name with `build_model` (`list_models` lists the names) or from a stage configuration
(`configs.stage_config`). Everything runs on the CPU; nothing here needs triton.
"""
from . import configs
from .cls_hrnet import HighResolutionNet as HRNetClassifier
from .configs import STAGE_CONFIGS, stage_config
from .face_hrnet import HighResolutionNet as HRNetV2Landmarks
from .pose_hrnet import PoseHighResolutionNet as PoseHRNet
from .registry import TIMM_NAMES, build_model, list_models
from .seg_hrnet import HighResolutionNet as HRNetV2Segmentation

__all__ = ["build_model", "list_models", "HRNetV2Segmentation", "HRNetV2Landmarks", "HRNetClassifier", "PoseHRNet",
           "STAGE_CONFIGS", "stage_config", "TIMM_NAMES", "configs"]
