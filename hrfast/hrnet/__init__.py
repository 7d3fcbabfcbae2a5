"""How HRNet code is structured, read from the modules: one description of a fusion module and of a V2 head,
shared by the drop-in modules (`hrfast.nn`) and the patcher (`hrfast.patch`)."""
from .fusion import (FusionDescription, FusionTerm, HRLayout, describe_fuse_layers, describe_hr_module,
                     resample_from_args)
from .head import LAYOUTS, HeadLayers, detect_layout, head_layers, layer_problems, mmseg_problems

__all__ = ["FusionDescription", "FusionTerm", "HRLayout", "describe_fuse_layers", "describe_hr_module",
           "resample_from_args", "LAYOUTS", "HeadLayers", "detect_layout", "head_layers", "layer_problems",
           "mmseg_problems"]
