"""`HRFPNReduction`: the reduction step of the HRNetV2p neck (HRFPN) without its concatenation.

HRFPN (mmdet ``HRFPN``, the official HRNet-Object-Detection ``HRFPN``; HRNET_LAYOUTS.md section 5) computes
``reduction_conv(cat[x0, Up(x1), Up(x2), Up(x3)])``: every lower branch upsampled bilinearly to the highest
resolution (``F.interpolate(x_i, scale_factor=2**i, mode='bilinear')``), concatenated to 15C channels, then one
1x1 conv with bias to 256 channels, no norm, no activation. A 1x1 conv is a per-pixel linear map and bilinear
upsampling a per-channel linear map, so they commute:

    reduction(cat_j Up(x_j)) = W_0 x_0 + b + sum_j Up(W_j x_j)

with ``W_j`` the columns of the conv weight that meet branch j. The right side projects each branch at its own
resolution (16x fewer pixels per step down) and sums the upsampled projections in one pass of the fusion op
`hrfast.ops.fuse` (``relu=False``, the bias as the shift of the full-resolution term): neither the 15C-channel
concatenation nor the upsampled branches are ever written.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ..ops.fuse import check_branches, check_tensor, fuse
from ..plan import Resample, as_resample

__all__ = ["HRFPNReduction", "hrfpn_reduction", "reduction_conv_of", "hrfpn_resample"]


def hrfpn_resample(index: int) -> Resample:
    """How HRFPN brings branch `index` (>= 1) to branch 0: ``F.interpolate(scale_factor=2**index,
    mode='bilinear')`` (align_corners unset, i.e. False; PyTorch's 1/scale_factor source ratio)."""
    return Resample("bilinear", scale_factor=float(2 ** index))


def reduction_conv_of(module: nn.Module) -> Union[Tuple[str, nn.Conv2d], str]:
    """(path under `module`, conv) of the plain 1x1 conv an HRFPN ``reduction_conv`` runs, or why it is not one.

    Accepted: an ``nn.Conv2d`` itself (path ""), the official ``nn.Sequential(Conv2d)`` (path "0"), or an mmcv
    ``ConvModule`` whose only child is ``conv`` (no norm, activation or padding layer: ``act_cfg=None`` and no
    ``norm_cfg``, so its forward is the conv alone).
    """
    if isinstance(module, nn.Conv2d):
        path, conv = "", module
    elif isinstance(module, nn.Sequential):
        if len(module) != 1:
            return f"reduction_conv is an nn.Sequential of {len(module)} modules, expected one Conv2d"
        path, conv = "0", module[0]
    else:
        children = [name for name, _ in module.named_children()]
        if children != ["conv"]:
            return (f"reduction_conv ({type(module).__name__}) has children {children}; the fused reduction takes a "
                    "conv alone (no norm, activation or padding layer)")
        path, conv = "conv", module.conv
    problem = _pointwise_problem(conv)
    return problem if problem else (path, conv)


def _pointwise_problem(conv: nn.Module) -> Optional[str]:
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"the reduction conv must be an nn.Conv2d, got {type(conv).__name__}"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return "the reduction conv is a lazy conv that has not run yet"
    if (conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1
            or conv.padding not in ((0, 0), "valid")):
        return (f"the reduction conv must be a plain 1x1 conv (stride 1, no padding, groups 1) to be reordered, got "
                f"kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}, groups {conv.groups}")
    return None


def hrfpn_reduction(xs: Sequence[Tensor], weight: Tensor, bias: Optional[Tensor] = None, *,
                    resample=None, backend: str = "auto") -> Tensor:
    """``conv1x1(cat[x0, Up(x1), ...], weight, bias)`` computed as ``W_0 x_0 + b + sum_j Up(W_j x_j)``.

    Args:
        xs: the branches [N, C_j, H_j, W_j], x0 the highest resolution; one dtype and device.
        weight: the conv weight [M, sum C_j, 1, 1] (or [M, sum C_j]).
        bias: None or [M].
        resample: None (HRFPN: branch j upsampled by ``scale_factor=2**j``, bilinear, align_corners False), or
            one `Resample` / mode string for every lower branch (``scale_factor=None``: to x0's exact size).
        backend: "auto", "triton", "cuda_cpp" or "reference" (`hrfast.backends`), for the fusion op.

    Returns:
        [N, M, H_0, W_0] in the branches' dtype (autocast: the projections' dtype, as the eager conv's).

    Gradients flow to the branches, the weight and the bias.
    """
    check_branches(xs, "xs")
    backends.canonical(backend)
    widths = [int(x.shape[1]) for x in xs]
    w2d = _weight_2d(weight, sum(widths), xs[0].device)
    if bias is not None:
        check_tensor(bias, "bias", (w2d.shape[0],), xs[0].device, what="one value per output channel", optional=True)
    one = as_resample(resample, "resample")
    resamples = [None] + [one if one is not None else hrfpn_resample(j) for j in range(1, len(xs))]
    terms, start = [], 0
    for x, width in zip(xs, widths):  # W_j x_j at branch j's own resolution
        terms.append(F.conv2d(x, w2d[:, start:start + width, None, None]))
        start += width
    shifts = [bias] + [None] * (len(xs) - 1)
    return fuse(terms, shifts=shifts, resample=resamples, size=tuple(xs[0].shape[2:]), relu=False, backend=backend)


def _weight_2d(weight, width: int, device) -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
        weight = weight[:, :, 0, 0]
    if weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(f"weight must be [M, {width}, 1, 1] (or [M, {width}]) for branches of {width} channels in "
                         f"all, got {list(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but xs are on {device}")
    return weight


class HRFPNReduction(nn.Module):
    """Fused HRFPN reduction: ``reduction_conv(cat[x0, Up(x1), ...])`` without the concatenation.

    Holds the replaced ``reduction_conv`` under that name, so its state_dict keys are those of the HRFPN it came
    from (``reduction_conv.conv.weight`` for mmdet, ``reduction_conv.0.weight`` for the official code) and its
    parameters are the same tensors.

    Args:
        reduction_conv: an ``nn.Conv2d`` 1x1, an ``nn.Sequential(Conv2d)`` or an mmcv ``ConvModule`` without norm
            and activation (see `reduction_conv_of`).
        resample: as in `hrfpn_reduction` (None: HRFPN's ``scale_factor=2**j`` bilinear upsampling).
        backend: "auto", "triton", "cuda_cpp" or "reference".
    """

    def __init__(self, reduction_conv: nn.Module, *, resample=None, backend: str = "auto"):
        super().__init__()
        if not isinstance(reduction_conv, nn.Module):
            raise TypeError(f"reduction_conv must be an nn.Module, got {type(reduction_conv).__name__}")
        found = reduction_conv_of(reduction_conv)
        if isinstance(found, str):
            raise ValueError(f"reduction_conv cannot be fused: {found}")
        backends.canonical(backend)
        self.reduction_conv = reduction_conv
        self.conv_path = ".".join(p for p in ("reduction_conv", found[0]) if p)
        self.resample = as_resample(resample, "resample")
        self.backend = backend

    @classmethod
    def from_module(cls, hrfpn: nn.Module, *, resample=None, backend: str = "auto") -> "HRFPNReduction":
        """The fused reduction of an HRFPN neck (any module with a ``reduction_conv`` child)."""
        conv = getattr(hrfpn, "reduction_conv", None)
        if not isinstance(conv, nn.Module):
            raise ValueError(f"hrfpn must have a reduction_conv module, {type(hrfpn).__name__} has none")
        return cls(conv, resample=resample, backend=backend)

    @property
    def conv(self) -> nn.Conv2d:
        """The 1x1 conv whose weight and bias the fused reduction uses."""
        return self.get_submodule(self.conv_path)

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        """The reduced map [N, M, H_0, W_0] from the branches xs = [x0, x1, ...]."""
        if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"xs must be a list or tuple of branch tensors, got {type(xs).__name__}")
        conv = self.conv
        return hrfpn_reduction(list(xs), conv.weight, conv.bias, resample=self.resample, backend=self.backend)

    def extra_repr(self) -> str:
        how = "scale_factor=2**j bilinear" if self.resample is None else self.resample.describe()
        return f"resample={how}, backend={self.backend!r}"

