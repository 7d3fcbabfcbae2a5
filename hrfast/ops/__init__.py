"""Functional API of hrfast's fused ops, with their plain PyTorch references in `hrfast.ops.reference`."""
from .fuse import FuseFunction, fuse
from .head import HeadFunction, hrnet_v2_head
from .reference import fuse_ref, head_ref
from .resample import Resample

__all__ = ["fuse", "fuse_ref", "FuseFunction", "hrnet_v2_head", "head_ref", "HeadFunction", "Resample"]
