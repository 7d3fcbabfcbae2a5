"""Drop-in nn.Modules of hrfast: the fused fusion step, the fused HRNetV2 head and HRFPN's fused reduction."""
from .fusion import HRFusion
from .head import HRNetV2Head
from .hrfpn import HRFPNReduction

__all__ = ["HRFusion", "HRNetV2Head", "HRFPNReduction"]
