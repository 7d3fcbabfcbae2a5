"""The HRNetV2 head for the CUDA C++ backend: cuBLAS/cuDNN projections (through torch) + the fused fusion op.

The 1x1 conv commutes with the upsample (its weights sum to 1), so the head's conv over the concatenation is
``sum_j Up(W_j x_j)`` with each projection P_j = W_j x_j at branch j's own resolution; what is left, the
upsample-sum-affine-ReLU over the P_j, is exactly the fusion op (`hrfast.ops.fuse`) with BN's per-channel
affine on every term. So the CUDA backend runs the head as:

- eval (running statistics): z = fuse(P_j; scale s, shift t + s * conv_bias, ReLU): one fused kernel;
- batch statistics: a = fuse(P_j; shift conv_bias, no ReLU), then F.batch_norm (statistics, running-buffer
  update, and its exact backward) and ReLU;

then the classifier conv. The 15C-channel concatenation is never formed; unlike the Triton head, the M-channel
hidden tensor is (z, and a in training). Gradients come from the fusion op's deterministic backward and
PyTorch's conv/BN backward.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .fuse import fuse


def head_by_fusion(xs: Sequence[Tensor], conv_weight: Tensor, conv_bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], bn_weight: Optional[Tensor],
                   bn_bias: Optional[Tensor], cls_weight: Tensor, cls_bias: Optional[Tensor], resamples: List,
                   batch_stats: bool, momentum: float, eps: float, backend: str) -> Tensor:
    """Logits of the HRNetV2 head (arguments as `hrnet_v2_head`, already validated; `resamples` has one entry
    per low branch) through the fusion op of `backend`."""
    dtype = xs[0].dtype
    widths = [x.shape[1] for x in xs]
    projections = [F.conv2d(x, w.to(dtype)) for x, w in zip(xs, conv_weight.split(widths, dim=1))]
    terms = dict(resample=[None, *resamples], size=tuple(xs[0].shape[2:]), backend=backend)
    rest = [None] * (len(xs) - 1)
    if batch_stats:
        a = fuse(projections, shifts=[conv_bias, *rest], relu=False, **terms)
        z = F.relu(F.batch_norm(a, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps))
    else:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        scale = torch.rsqrt(running_var.to(acc) + eps)
        if bn_weight is not None:
            scale = scale * bn_weight.to(acc)
        shift = -running_mean.to(acc) * scale
        if bn_bias is not None:
            shift = shift + bn_bias.to(acc)
        if conv_bias is not None:
            shift = shift + conv_bias.to(acc) * scale
        z = fuse(projections, scales=[scale] * len(xs), shifts=[shift, *rest], relu=True, **terms)
    return F.conv2d(z, cls_weight.to(dtype), None if cls_bias is None else cls_bias.to(dtype))
