"""How a low-resolution term is resized to the output grid, with `F.interpolate`'s exact semantics.

The kernels never see modes or scale factors, only, per axis, the source-index ratio that PyTorch's
upsample kernels use (`area_pixel_compute_scale` and `compute_scales_value` in ATen's UpSample.h) as an
exact fraction `num / den` of integers. The kernels turn it into float32 the way PyTorch does, or float64
for float64 bilinear, so index selection matches `F.interpolate` bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple, Optional, Tuple, Union

import torch.nn as nn

MODES = ("nearest", "bilinear")

ScaleFactor = Union[float, Tuple[float, float]]


class AxisRatio(NamedTuple):
    """Source index = f(dst index, num/den), in lowest terms; see `Resample.axis_ratio`."""

    num: int
    den: int

    @classmethod
    def of(cls, num: int, den: int) -> "AxisRatio":
        g = math.gcd(num, den) or 1
        return cls(num // g, den // g)

    @property
    def value(self) -> float:
        return self.num / self.den  # Python int division is correctly rounded, as ATen's double math


@dataclass(frozen=True)
class Resample:
    """Upsampling of one term to the output size, as `F.interpolate(mode, align_corners, scale_factor)`.

    With `scale_factor=None` the term is resized to the exact output size (`F.interpolate(size=...)`),
    which is how size-based HRNet code handles odd inputs. With a scale factor, the output size must be
    `floor(in * scale_factor)` and PyTorch's `1 / scale_factor` ratio is used (as `nn.Upsample` does).
    `recompute_scale_factor=True` uses the scale factor for the size only, as `F.interpolate` does.
    """

    mode: str = "nearest"
    align_corners: Optional[bool] = None
    scale_factor: Optional[ScaleFactor] = None
    recompute_scale_factor: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Resample.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "nearest" and self.align_corners is not None:
            raise ValueError("Resample.align_corners can only be set with mode='bilinear' (as in F.interpolate)")
        if self.align_corners is not None and not isinstance(self.align_corners, bool):
            raise TypeError(f"Resample.align_corners must be a bool or None, got {self.align_corners!r}")
        for s in self._scale_pair() or ():
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or s < 1:
                raise ValueError(f"Resample.scale_factor must be a finite number >= 1 (hrfast only upsamples), "
                                 f"got {self.scale_factor!r}")

    @classmethod
    def from_module(cls, module: nn.Module) -> "Resample":
        """Reads an `nn.Upsample`-like module (torch, mmcv/mmseg `Upsample`): mode, align_corners, scale_factor."""
        mode = getattr(module, "mode", None)
        if mode not in MODES:
            raise ValueError(f"cannot fuse upsample module {module!r}: mode {mode!r} is not one of {MODES}")
        if getattr(module, "size", None) is not None:
            raise ValueError(f"cannot fuse upsample module {module!r}: a fixed size= is not supported; "
                             "hrfast resizes to the output branch's size")
        sf = getattr(module, "scale_factor", None)
        if isinstance(sf, (tuple, list)):
            sf = tuple(float(s) for s in sf)
        elif sf is not None:
            sf = float(sf)
        align = getattr(module, "align_corners", None) if mode == "bilinear" else None
        recompute = bool(getattr(module, "recompute_scale_factor", False))
        return cls(mode=mode, align_corners=align, scale_factor=sf, recompute_scale_factor=recompute)

    @property
    def is_bilinear(self) -> bool:
        return self.mode == "bilinear"

    @property
    def corners_aligned(self) -> bool:
        return bool(self.align_corners)

    def _scale_pair(self) -> Optional[Tuple[float, float]]:
        sf = self.scale_factor
        if sf is None:
            return None
        if isinstance(sf, (tuple, list)):
            if len(sf) != 2:
                raise ValueError(f"Resample.scale_factor must be a number or a pair, got {sf!r}")
            return (sf[0], sf[1])
        return (sf, sf)

    def output_size(self, in_hw: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        """The size F.interpolate gives with this scale factor (floor(in * s), in double), or None."""
        pair = self._scale_pair()
        if pair is None:
            return None
        return tuple(int(math.floor(float(n) * s)) for n, s in zip(in_hw, pair))

    def axis_ratio(self, axis: int, n_in: int, n_out: int) -> AxisRatio:
        """The ratio ATen uses to map an output index to a source index along one axis."""
        if n_out == n_in:  # ATen copies (and the nearest CPU kernel takes the index as is)
            return AxisRatio(1, 1)
        if self.mode == "nearest" and n_out == 2 * n_in:  # ATen's exact `dst >> 1` shortcut
            return AxisRatio(1, 2)
        if self.corners_aligned:
            return AxisRatio.of(n_in - 1, n_out - 1) if n_out > 1 else AxisRatio(0, 1)
        pair = self._scale_pair()
        if pair is not None and not self.recompute_scale_factor:
            frac = Fraction(pair[axis])  # exact: 1/s as ATen computes it in double
            return AxisRatio(frac.denominator, frac.numerator)
        return AxisRatio.of(n_in, n_out)


def as_resample(value, where: str) -> Optional[Resample]:
    """Accepts None, a Resample, or a mode string ('nearest', 'bilinear')."""
    if value is None or isinstance(value, Resample):
        return value
    if isinstance(value, str):
        return Resample(mode=value)
    raise TypeError(f"{where} must be None, a mode string or hrfast.ops.Resample, got {type(value).__name__}")
