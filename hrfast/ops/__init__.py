"""Functional API of hrfast's fused ops, with their plain PyTorch references in `hrfast.ops.reference`."""
from .fuse import FuseFunction, fuse
from .reference import fuse_ref
from .resample import Resample

__all__ = ["fuse", "fuse_ref", "FuseFunction", "Resample"]
