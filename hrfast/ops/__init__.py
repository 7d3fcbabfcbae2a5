"""Functional API of hrfast's fused ops, with their plain PyTorch references in `hrfast.ops.reference`."""
from ..plan import Resample
from .fuse import fuse
from .head import hrnet_v2_head
from .reference import fuse_ref, head_ref

__all__ = ["fuse", "fuse_ref", "hrnet_v2_head", "head_ref", "Resample"]
