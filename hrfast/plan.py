"""Frozen, hashable descriptions of one call of each fused op: everything a backend needs besides the tensors.

    module / functional arguments  ->  FusePlan / HeadPlan  ->  every backend (reference, Triton, CUDA C++)

- `Resample`: how a term is upsampled, as the user (or the HRNet module) states it: `F.interpolate`'s mode,
  align_corners and scale factor.
- `TermPlan`: what a kernel needs to know about one term: its resample mode, align_corners, the exact
  source-index ratios ATen uses on each axis (see `Resample.axis_ratio`), and whether it has a per-channel
  scale / shift.
- `FusePlan`: the fusion step of one output branch: its terms, output size, ReLU and output layout.
- `HeadPlan`: the HRNetV2 head: one `TermPlan` per low-resolution branch (projected to M channels), whether BN
  uses batch statistics, and whether the classifier has a bias.

Plans are built by `fuse_plan` / `head_plan` (cached: one object per distinct call signature) and cross the
custom-op boundary as one flat list of ints (`encode`), turned back into a plan in exactly one place
(`decode`). Under torch.compile / torch.export with dynamic shapes the sizes (and the ratios built from them)
are `torch.SymInt`s: nothing here fixes them to one call's values (no cache, no gcd, no int()), so one graph
serves every size; `decode` reduces the ratios once the values are concrete. Kernels import this module and
nothing else of hrfast.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = ["SAME", "NEAREST", "BILINEAR", "MODES", "Resample", "AxisRatio", "as_resample", "TermPlan",
           "FusePlan", "HeadPlan", "cached", "term_plan", "fuse_plan", "head_plan"]

# a term's resample mode as the kernels see it (csrc/fuse.h `Mode` has the same values)
SAME, NEAREST, BILINEAR = 0, 1, 2

MODES = ("nearest", "bilinear")

ScaleFactor = Union[float, Tuple[float, float]]


class AxisRatio(NamedTuple):
    """Source index = f(dst index, num/den), in lowest terms; see `Resample.axis_ratio`."""

    num: int
    den: int

    @classmethod
    def of(cls, num: int, den: int) -> "AxisRatio":
        """num/den in lowest terms; kept as it is while traced or symbolic (torch.compile's dynamic sizes: a gcd
        would fix them to this call's values), `decode` reduces it once the values are concrete."""
        if not _concrete(num, den):
            return cls(num, den)
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
    def from_module(cls, module) -> "Resample":
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

    def describe(self) -> str:
        """'nearest', 'bilinear(align_corners=False)', ...: for reports and reprs."""
        return self.mode + (f"(align_corners={self.corners_aligned})" if self.is_bilinear else "")

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
        # an integral factor in integers (exact below 2**53, and it keeps a symbolic size symbolic)
        return tuple(n * int(s) if float(s).is_integer() else int(math.floor(float(n) * s))
                     for n, s in zip(in_hw, pair))

    def axis_ratio(self, axis: int, n_in: int, n_out: int) -> AxisRatio:
        """The ratio ATen uses to map an output index to a source index along one axis
        (`area_pixel_compute_scale` / `compute_scales_value` in ATen's UpSample.h), as an exact fraction.

        ATen's shortcuts for equal and (nearest) doubled sizes are size tests; with symbolic sizes they are
        skipped where the general ratio already equals theirs once reduced (`shortcut_free`), so the sizes stay
        unguarded."""
        if _concrete(n_in, n_out) or not self.shortcut_free(axis):
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

    def shortcut_free(self, axis: int) -> bool:
        """Whether the general ratio, reduced, is (1, 1) for equal sizes and (1, 2) for doubled nearest ones:
        true for a ratio of sizes (to the exact size, recomputed scale factors, align_corners) and for an
        integral scale factor (sizes n and n * s), not for a fractional one (floor(n * s) may equal n or 2n)."""
        pair = self._scale_pair()
        return (self.corners_aligned or pair is None or self.recompute_scale_factor
                or float(pair[axis]).is_integer())


def _concrete(*sizes) -> bool:
    """Plain ints, not traced: neither a torch.SymInt nor a Dynamo trace (where a SymInt shows as an int)."""
    return all(type(n) is int for n in sizes) and not torch.compiler.is_compiling()


def as_resample(value, where: str) -> Optional[Resample]:
    """Accepts None, a Resample, or a mode string ('nearest', 'bilinear')."""
    if value is None or isinstance(value, Resample):
        return value
    if isinstance(value, str):
        return Resample(mode=value)
    raise TypeError(f"{where} must be None, a mode string or hrfast.ops.Resample, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------------- plans


def cached(maxsize: int):
    """`functools.lru_cache` for calls on plain values; the bare function when the call is traced by Dynamo
    (which would warn and trace through the cache anyway) or holds symbolic sizes (a `torch.SymInt` under
    torch.compile / torch.export with dynamic shapes is unhashable, and a plan must keep it symbolic)."""
    def wrap(func):
        memo = functools.lru_cache(maxsize=maxsize)(func)

        @functools.wraps(func)
        def call(*args):
            if torch.compiler.is_compiling():
                return func(*args)
            try:
                hash(args)
            except TypeError:
                return func(*args)
            return memo(*args)

        return call
    return wrap


class TermPlan(NamedTuple):
    """One summand as the kernels see it. `ratio_h` / `ratio_w` are ATen's source-index ratios as exact
    (num, den) pairs ((1, 1) for a SAME term)."""

    mode: int = SAME
    align_corners: bool = False
    ratio_h: Tuple[int, int] = (1, 1)
    ratio_w: Tuple[int, int] = (1, 1)
    has_scale: bool = False
    has_shift: bool = False

    FIELDS = 8  # ints per term in the encoded form

    def encode(self) -> List[int]:
        return [self.mode, int(self.align_corners), *self.ratio_h, *self.ratio_w, int(self.has_scale),
                int(self.has_shift)]

    @classmethod
    def decode(cls, v: Sequence[int]) -> "TermPlan":
        """The canonical term: ratios in lowest terms (`AxisRatio.of`), and a resampled term whose ratios are
        both exactly 1 is the same-size term (ATen copies), as `term_plan` builds it from concrete sizes; a plan
        traced with symbolic sizes leaves both to here. Nothing is coerced with int(): a SymInt must stay
        symbolic in a fake implementation."""
        ratio_h, ratio_w = tuple(AxisRatio.of(v[2], v[3])), tuple(AxisRatio.of(v[4], v[5]))
        if v[0] != SAME and _concrete(*ratio_h, *ratio_w) and ratio_h == ratio_w == (1, 1):
            return cls(SAME, False, ratio_h, ratio_w, bool(v[6]), bool(v[7]))
        return cls(v[0], bool(v[1]), ratio_h, ratio_w, bool(v[6]), bool(v[7]))


class FusePlan(NamedTuple):
    """y [N, C, *size] = ReLU(sum_k Up_k(x_k * scale_k + shift_k)); `channels_last`: y's memory format."""

    terms: Tuple[TermPlan, ...]
    size: Tuple[int, int]
    relu: bool = True
    channels_last: bool = False

    def encode(self) -> List[int]:
        """The plan as the custom ops carry it: [H, W, relu, channels_last, then TermPlan.FIELDS per term]."""
        return [*self.size, int(self.relu), int(self.channels_last)] + [v for t in self.terms for v in t.encode()]

    @classmethod
    def decode(cls, v: Sequence[int]) -> "FusePlan":
        return _decode_fuse(tuple(v))


class HeadPlan(NamedTuple):
    """logits = Wc . ReLU(BN(W0 x0 + sum_j Up_j(P_j) + b)) + bc, with one TermPlan per projected low branch
    P_j; `batch_stats`: BN normalises with the batch statistics of its input (training) instead of the
    folded (scale, shift)."""

    lows: Tuple[TermPlan, ...]
    batch_stats: bool = False

    def encode(self) -> List[int]:
        return [int(self.batch_stats)] + [v for t in self.lows for v in t.encode()]

    @classmethod
    def decode(cls, v: Sequence[int]) -> "HeadPlan":
        return _decode_head(tuple(v))


def _terms(v: Sequence[int]) -> Tuple[TermPlan, ...]:
    n = TermPlan.FIELDS
    if len(v) % n:
        raise ValueError(f"a plan's term list has {len(v)} ints, not a multiple of {n}")
    return tuple(TermPlan.decode(v[i:i + n]) for i in range(0, len(v), n))


@cached(maxsize=1024)
def _decode_fuse(v: Tuple[int, ...]) -> FusePlan:
    return FusePlan(_terms(v[4:]), (v[0], v[1]), bool(v[2]), bool(v[3]))


@cached(maxsize=256)
def _decode_head(v: Tuple[int, ...]) -> HeadPlan:
    return HeadPlan(_terms(v[1:]), bool(v[0]))


@cached(maxsize=4096)
def term_plan(resample: Optional[Resample], in_hw: Tuple[int, int], size: Tuple[int, int],
              has_scale: bool = False, has_shift: bool = False) -> TermPlan:
    """The TermPlan of a term of spatial size `in_hw` resampled by `resample` to `size`. With symbolic sizes
    the same-size test is left to `decode` (ratios (1, 1) on both axes), which keeps the sizes unguarded."""
    if resample is None or (_concrete(*in_hw, *size) and in_hw == size):  # same size: F.interpolate copies
        return TermPlan(SAME, False, (1, 1), (1, 1), has_scale, has_shift)
    mode = NEAREST if resample.mode == "nearest" else BILINEAR
    ratio_h = tuple(resample.axis_ratio(0, in_hw[0], size[0]))
    ratio_w = tuple(resample.axis_ratio(1, in_hw[1], size[1]))
    return TermPlan(mode, resample.corners_aligned, ratio_h, ratio_w, has_scale, has_shift)


@cached(maxsize=1024)
def fuse_plan(in_hws: Tuple[Tuple[int, int], ...], resamples: Tuple[Optional[Resample], ...],
              size: Tuple[int, int], relu: bool, channels_last: bool, has_scale: Tuple[bool, ...],
              has_shift: Tuple[bool, ...]) -> FusePlan:
    """The FusePlan of one call (arguments per term, in term order). Cached: equal calls share one plan."""
    terms = tuple(term_plan(r, hw, size, s, b) for hw, r, s, b in zip(in_hws, resamples, has_scale, has_shift))
    return FusePlan(terms, size, relu, channels_last)


@cached(maxsize=256)
def head_plan(low_hws: Tuple[Tuple[int, int], ...], resamples: Tuple[Optional[Resample], ...],
              size: Tuple[int, int], batch_stats: bool) -> HeadPlan:
    """The HeadPlan of one call: the low branches' spatial sizes and resamples to x0's `size`."""
    return HeadPlan(tuple(term_plan(r, hw, size) for hw, r in zip(low_hws, resamples)), batch_stats)
