"""Drop-in nn.Modules of hrfast."""
from .fusion import HRFusion

__all__ = ["HRFusion"]
