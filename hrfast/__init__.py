"""hrfast: fused kernels for the memory-bound hot spots of HRNet (multi-resolution fusion, V2 head).

Importing hrfast imports neither triton nor anything that queries CUDA; kernels load on first use.
"""
from . import ops
from ._autotune import choices as backend_choices
from .backends import BACKENDS
from .plan import Resample
from ._patch import PatchReport, patch, unpatch
from .inference import Inference

__version__ = "0.1.0"

__all__ = ["ops", "nn", "Resample", "BACKENDS", "patch", "unpatch", "PatchReport", "Inference", "backend_choices",
           "__version__"]


def __getattr__(name):
    # hrfast.nn is imported lazily so `import hrfast` stays light
    if name == "nn":
        import importlib

        return importlib.import_module(".nn", __name__)
    raise AttributeError(f"module 'hrfast' has no attribute {name!r}")
