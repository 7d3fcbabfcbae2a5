"""Plain PyTorch references of hrfast's ops: the ground truth for tests and benchmarks, and the CPU path.

They compute exactly what eager HRNet code computes, in the order it computes it (affine, i.e. BN, at the
source resolution, then `F.interpolate`, then the sum in term order, then ReLU), in the inputs' dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..plan import Resample, as_resample


def affine_ref(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor]) -> Tensor:
    """Per-channel `x * scale + shift` in the wider of the two dtypes, rounded back to x's dtype (as BN does)."""
    if scale is not None:
        x_scaled = x * scale.view(1, -1, 1, 1)
    else:
        x_scaled = x
    if shift is not None:
        x_scaled = x_scaled + shift.view(1, -1, 1, 1)
    return x_scaled.to(x.dtype)


def resample_ref(x: Tensor, resample: Resample, size: Tuple[int, int]) -> Tensor:
    """`F.interpolate` to `size`, passing the scale factor when there is one (ATen then uses 1/s)."""
    kwargs = {"mode": resample.mode}
    if resample.is_bilinear:
        kwargs["align_corners"] = resample.corners_aligned
    if resample.scale_factor is not None:
        kwargs["scale_factor"] = resample.scale_factor
        kwargs["recompute_scale_factor"] = resample.recompute_scale_factor
    else:
        kwargs["size"] = tuple(size)
    return F.interpolate(x, **kwargs)


def fuse_ref(
    inputs: Sequence[Tensor],
    scales: Sequence[Optional[Tensor]],
    shifts: Sequence[Optional[Tensor]],
    resamples: Sequence[Optional[Resample]],
    size: Tuple[int, int],
    relu: bool = True,
) -> Tensor:
    """y = ReLU(sum_k Up_k(x_k * scale_k + shift_k)), terms without a Resample being at `size` already; always a
    fresh tensor (an op's output that aliases its input would let an in-place update of one change the other)."""
    total = None
    for k, (x, scale, shift, resample) in enumerate(zip(inputs, scales, shifts, resamples)):
        term = affine_ref(x, scale, shift)
        resample = as_resample(resample, f"resamples[{k}]")
        if resample is not None:
            term = resample_ref(term, resample, size)
        total = term if total is None else total + term
    if not relu and total is inputs[0]:  # one plain term: the sum would be the input itself, an alias
        return total.clone()
    return torch.relu(total) if relu else total


def fusion_module_ref(fuse_layers, xs: Sequence[Tensor], upsample: Optional[str] = None,
                      align_corners: Optional[bool] = None) -> list:
    """What an HRNet module's fusion computes with its own layers, eagerly (the official/timm loop).

    `fuse_layers[i][j]` is None/Identity for j == i; for j > i it ends in its own upsample module (pose,
    cls, timm) or, when `upsample` is given, is followed by `F.interpolate(size=xs[i].shape[2:], mode=upsample,
    align_corners=align_corners)` as the official segmentation and facial-landmark code do in forward.
    """
    out = []
    for i, row in enumerate(fuse_layers):
        total = None
        for j, layer in enumerate(row):
            term = xs[j] if layer is None else layer(xs[j])
            if j > i and upsample is not None:
                kwargs = {"align_corners": align_corners} if upsample == "bilinear" else {}
                term = F.interpolate(term, size=tuple(xs[i].shape[2:]), mode=upsample, **kwargs)
            total = term if total is None else total + term
        out.append(torch.relu(total))
    return out


def head_ref(
    xs: Sequence[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    cls_weight: Tensor,
    cls_bias: Optional[Tensor],
    resamples: Sequence[Optional[Resample]],
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """The HRNetV2 head as existing code computes it: Cls(ReLU(BN(Conv1x1(cat[x0, Up(x1), Up(x2), Up(x3)])))).

    `resamples[j]` upsamples xs[j] to xs[0]'s size (None: already that size); BN is `F.batch_norm` with its
    in-place running-statistics update when training.
    """
    size = tuple(xs[0].shape[2:])
    ups = [x if r is None else resample_ref(x, as_resample(r, f"resamples[{j}]"), size)
           for j, (x, r) in enumerate(zip(xs, resamples))]
    hidden = F.conv2d(torch.cat(ups, 1), conv_weight, conv_bias)
    hidden = F.batch_norm(hidden, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.conv2d(torch.relu(hidden), cls_weight, cls_bias)
