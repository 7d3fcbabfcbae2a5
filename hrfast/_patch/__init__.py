"""`hrfast.patch(model)`: make an existing HRNet model use hrfast's fused ops, in place, reversibly.

The public API is `patch`, `unpatch` and `PatchReport` (also exported as `hrfast.patch`, `hrfast.unpatch`,
`hrfast.PatchReport`). Note that after ``import hrfast``, the attribute ``hrfast.patch`` is the function; this
package is reached as ``from hrfast.patch import ...`` (or ``sys.modules["hrfast.patch"]``).

Layout: `core` holds the generic machinery (the walk, the report, the instance-level forward, the adapter
registry); `fusion` holds the structural matcher and adapter of the multi-resolution fusion step; `head` those of the
HRNetV2 concat head (kind "head"); `inference` the eval-only inference mode (``patch(..., inference=True)``).
"""
from .core import (Adapter, Match, Options, PatchedForward, PatchReport, PatchRow, adapters, patch,
                   register_adapter, register_inference, unpatch)
from .fusion import FusionAdapter, FusionConfig
from .head import HeadAdapter, HeadConfig, HeadSite, inspect_head
from .hrfpn import HRFPNAdapter
from .inference import InferencePlanner
from .mmpose import PoseHeadAdapter

register_adapter(FusionAdapter())
register_adapter(PoseHeadAdapter())  # before HeadAdapter: it reports every mmpose HeatmapHead itself
register_adapter(HRFPNAdapter())
register_adapter(HeadAdapter())
register_inference(InferencePlanner())

__all__ = ["patch", "unpatch", "PatchReport", "PatchRow", "Adapter", "Match", "Options", "PatchedForward",
           "register_adapter", "adapters", "FusionAdapter", "FusionConfig",
           "HeadAdapter", "HeadConfig", "HeadSite", "inspect_head"]
