"""Drop-in nn.Modules of hrfast: the fused fusion step and the fused HRNetV2 head."""
from .fusion import HRFusion
from .head import HRNetV2Head

__all__ = ["HRFusion", "HRNetV2Head"]
