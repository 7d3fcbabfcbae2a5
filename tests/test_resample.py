"""`hrfast.ops.Resample`: the per-axis source-index ratios must reproduce `F.interpolate`'s index maps.

The kernels only ever see `Resample.axis_ratio` (an exact fraction num/den per axis). Here that ratio is
turned back into a source-index map with ATen's own formulas (`nearest_neighbor_compute_source_index` and
`area_pixel_compute_source_index` in ATen's UpSample.h, in float32, or float64 for float64 bilinear) and
compared with what `F.interpolate` itself does on a ramp (nearest: the ramp's values are the source
indices) and on one-hot inputs (bilinear: each output is exactly the weight of that one source pixel).
Everything here is plain PyTorch on CPU: fast, and the CPU kernels are the semantics hrfast follows.
"""
import itertools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hrfast.ops import Resample
from hrfast.ops.reference import resample_ref
from hrfast.plan import AxisRatio, as_resample

# 2.2 and 1.2 hit the CPU kernels' exact shortcuts (out == 2 * in, out == in) with a scale factor that is not 2 or 1
SCALE_FACTORS = (2.0, 4.0, 1.5, 3.0, 2.5, 2.2, 1.2)
SIZES_IN = range(1, 8)


# ------------------------------------------------------------------------------------ index maps from ratios


def _ratio_value(ratio: AxisRatio, dtype: torch.dtype) -> torch.Tensor:
    # the ratio as ATen holds it: Python's correctly rounded double num/den, cast to the math dtype
    return torch.tensor(ratio.num / ratio.den, dtype=torch.float64).to(dtype)


def nearest_map(ratio: AxisRatio, n_in: int, n_out: int) -> torch.Tensor:
    """ATen: min(int64(floorf(dst * scale)), in - 1), with a float32 scale and a float32 product."""
    d = torch.arange(n_out, dtype=torch.float32)
    src = torch.floor(d * _ratio_value(ratio, torch.float32)).to(torch.int64)
    return torch.clamp(src, max=n_in - 1)


def bilinear_weights(ratio: AxisRatio, n_in: int, n_out: int, align_corners: bool, dtype: torch.dtype,
                     fused: bool = False) -> torch.Tensor:
    """[n_out, n_in] weights of ATen's linear interpolation along one axis (area_pixel_compute_source_index,
    guard_index_and_lambda), in the math dtype `dtype`.

    ATen's `scale * (dst + 0.5) - 0.5` may be compiled to a fused multiply-add (one rounding instead of
    two), depending on the build and on the loop (vectorized body or scalar tail); `fused=True` evaluates it
    that way, exactly (with fractions) and rounded once to `dtype`.
    """
    r = _ratio_value(ratio, dtype)
    d = torch.arange(n_out, dtype=dtype)
    if align_corners:
        real = r * d
    elif fused:
        exact = [Fraction(r.item()) * (k + Fraction(1, 2)) - Fraction(1, 2) for k in range(n_out)]
        # float(Fraction) rounds once to double; for float32 the exact value has < 53 bits, so the
        # double is exact and the cast to float32 is the single rounding
        real = torch.clamp(torch.tensor([float(e) for e in exact], dtype=torch.float64).to(dtype), min=0.0)
    else:
        real = torch.clamp(r * (d + 0.5) - 0.5, min=0.0)
    i0 = torch.clamp(torch.floor(real).to(torch.int64), max=n_in - 1)
    l1 = torch.clamp(real - i0.to(dtype), 0.0, 1.0)
    l0 = 1.0 - l1
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    w = torch.zeros(n_out, n_in, dtype=dtype)
    rows = torch.arange(n_out)
    w[rows, i0] += l0
    w[rows, i1] += l1  # when i1 == i0 both land on one pixel: l0 + l1 rounded once, as ATen's v * l0 + v * l1
    return w


def interpolate_1d(x: torch.Tensor, axis: int, n_out: int, mode: str, align_corners, scale_factor,
                   recompute: bool) -> torch.Tensor:
    """F.interpolate along one axis of x [B, n_in] (the other spatial axis has size 1 and is kept)."""
    B, n_in = x.shape
    x4 = x.view(B, 1, n_in, 1) if axis == 0 else x.view(B, 1, 1, n_in)
    kwargs = {"mode": mode}
    if mode == "bilinear":
        kwargs["align_corners"] = align_corners
    if scale_factor is None:
        kwargs["size"] = (n_out, 1) if axis == 0 else (1, n_out)
    else:
        kwargs["scale_factor"] = (scale_factor, 1.0) if axis == 0 else (1.0, scale_factor)
        kwargs["recompute_scale_factor"] = recompute
    y = F.interpolate(x4, **kwargs)
    assert y.shape[2 + axis] == n_out and y.shape[3 - axis] == 1
    return y.reshape(B, n_out)


def _resample(mode, align_corners, scale_factor, recompute, axis):
    sf = None
    if scale_factor is not None:
        sf = (scale_factor, 1.0) if axis == 0 else (1.0, scale_factor)
    return Resample(mode=mode, align_corners=align_corners, scale_factor=sf, recompute_scale_factor=recompute)


def _size_pairs():
    return [(n_in, n_out) for n_in in SIZES_IN for n_out in range(n_in, 2 * n_in + 6)]


def _scale_pairs():
    return [(n_in, s) for n_in in SIZES_IN for s in SCALE_FACTORS]


# ----------------------------------------------------------------------------------- nearest: exact indices


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("by", ["size", "scale_factor", "scale_factor_recompute"])
def test_nearest_ratio_matches_interpolate(by, axis):
    cases = _size_pairs() if by == "size" else _scale_pairs()
    checked = 0
    for n_in, arg in cases:
        if by == "size":
            n_out, sf = arg, None
        else:
            sf, n_out = arg, int(math.floor(n_in * arg))
        recompute = by == "scale_factor_recompute"
        r = _resample("nearest", None, sf, recompute, axis)
        ratio = r.axis_ratio(axis, n_in, n_out)
        assert math.gcd(ratio.num, ratio.den) == 1
        ramp = torch.arange(n_in, dtype=torch.float32).view(1, n_in)
        got = interpolate_1d(ramp, axis, n_out, "nearest", None, sf, recompute)[0].to(torch.int64)
        expected = nearest_map(ratio, n_in, n_out)
        assert torch.equal(got, expected), (n_in, n_out, sf, ratio, got.tolist(), expected.tolist())
        checked += 1
    assert checked == len(cases)


# -------------------------------------------------------------------------------- bilinear: exact weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("by", ["size", "scale_factor", "scale_factor_recompute"])
def test_bilinear_ratio_matches_interpolate(by, align_corners, axis, dtype):
    cases = _size_pairs() if by == "size" else _scale_pairs()
    for n_in, arg in cases:
        if by == "size":
            n_out, sf = arg, None
        else:
            sf, n_out = arg, int(math.floor(n_in * arg))
        recompute = by == "scale_factor_recompute"
        r = _resample("bilinear", align_corners, sf, recompute, axis)
        ratio = r.axis_ratio(axis, n_in, n_out)
        # one-hot inputs: output [b, d] is exactly the weight with which d reads source b
        got = interpolate_1d(torch.eye(n_in, dtype=dtype), axis, n_out, "bilinear", align_corners, sf, recompute).T
        plain = bilinear_weights(ratio, n_in, n_out, align_corners, dtype)
        fused = bilinear_weights(ratio, n_in, n_out, align_corners, dtype, fused=True)
        # every output row is exactly one of the two evaluations of ATen's formula with this ratio
        row_ok = (got == plain).all(dim=1) | (got == fused).all(dim=1)
        assert row_ok.all(), (n_in, n_out, sf, ratio, (got - plain).abs().max().item())


def test_ratio_distinguishes_scale_factor_from_size():
    # floor(5 * 1.5) = 7 but 1/1.5 != 5/7: with a scale factor ATen uses 1/s, resized to a size in/out
    assert Resample("bilinear", scale_factor=1.5).axis_ratio(1, 5, 7) == AxisRatio(2, 3)
    assert Resample("bilinear").axis_ratio(1, 5, 7) == AxisRatio(5, 7)
    assert Resample("bilinear", scale_factor=1.5, recompute_scale_factor=True).axis_ratio(1, 5, 7) == AxisRatio(5, 7)
    # align_corners ignores the scale factor: (in - 1) / (out - 1), 0 for a single output pixel
    assert Resample("bilinear", align_corners=True, scale_factor=2.0).axis_ratio(0, 3, 6) == AxisRatio(2, 5)
    assert Resample("bilinear", align_corners=True).axis_ratio(0, 1, 5) == AxisRatio(0, 1)
    # a pair of scale factors is read per axis
    r = Resample("nearest", scale_factor=(3.0, 1.5))
    assert r.axis_ratio(0, 3, 9) == AxisRatio(1, 3)
    assert r.axis_ratio(1, 5, 7) == AxisRatio(2, 3)


# ------------------------------------------------------------------------------------------- output sizes


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_output_size_matches_interpolate(mode):
    factors = list(SCALE_FACTORS) + [(2.0, 4.0), (1.5, 3.0), (1.0, 2.5), 1.0, 1.1, 7.3]
    for (h, w), sf in itertools.product([(1, 1), (1, 7), (5, 3), (7, 9), (13, 4)], factors):
        r = Resample(mode=mode, scale_factor=sf)
        expected = F.interpolate(torch.empty(1, 1, h, w), scale_factor=sf, mode=mode).shape[2:]
        assert r.output_size((h, w)) == tuple(expected), (h, w, sf)
        r = Resample(mode=mode, scale_factor=sf, recompute_scale_factor=True)
        expected = F.interpolate(torch.empty(1, 1, h, w), scale_factor=sf, mode=mode,
                                 recompute_scale_factor=True).shape[2:]
        assert r.output_size((h, w)) == tuple(expected), (h, w, sf)
    assert Resample(mode=mode).output_size((3, 4)) is None


# ----------------------------------------------------------------------------------- nn.Upsample modules


@pytest.mark.parametrize("module", [
    nn.Upsample(scale_factor=2, mode="nearest"),
    nn.Upsample(scale_factor=4.0, mode="nearest"),
    nn.Upsample(scale_factor=(2, 3), mode="nearest"),
    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
    nn.Upsample(scale_factor=1.5, mode="bilinear"),
    nn.Upsample(scale_factor=1.5, mode="bilinear", recompute_scale_factor=True),
    nn.UpsamplingNearest2d(scale_factor=2),
    nn.UpsamplingBilinear2d(scale_factor=2),
], ids=lambda m: repr(m))
def test_from_module(module):
    r = Resample.from_module(module)
    assert r.mode == module.mode
    if module.mode == "nearest":
        assert r.align_corners is None
    else:
        assert r.corners_aligned == bool(module.align_corners)
    assert r.recompute_scale_factor == bool(module.recompute_scale_factor)
    x = torch.randn(2, 3, 5, 3)
    expected = module(x)
    size = tuple(expected.shape[2:])
    assert r.output_size((5, 3)) == size
    # the reference resample of the Resample read from the module is the module, bit for bit
    assert torch.equal(resample_ref(x, r, size), expected)


def test_from_module_rejects():
    with pytest.raises(ValueError, match="mode 'bicubic'"):
        Resample.from_module(nn.Upsample(scale_factor=2, mode="bicubic"))
    with pytest.raises(ValueError, match="size="):
        Resample.from_module(nn.Upsample(size=(8, 8), mode="nearest"))
    with pytest.raises(ValueError, match="mode None"):
        Resample.from_module(nn.Identity())


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(mode="bicubic"), ValueError, r"Resample.mode must be one of"),
    (dict(mode="nearest", align_corners=False), ValueError, r"align_corners can only be set with mode='bilinear'"),
    (dict(mode="nearest", align_corners=True), ValueError, r"align_corners can only be set"),
    (dict(mode="bilinear", align_corners=1), TypeError, r"align_corners must be a bool"),
    (dict(mode="nearest", scale_factor=0.5), ValueError, r"scale_factor must be a finite number >= 1"),
    (dict(mode="bilinear", scale_factor=(2.0, 0.5)), ValueError, r"scale_factor must be a finite number >= 1"),
    (dict(mode="nearest", scale_factor=float("inf")), ValueError, r"scale_factor must be a finite number"),
    (dict(mode="nearest", scale_factor=float("nan")), ValueError, r"scale_factor must be a finite number"),
    (dict(mode="nearest", scale_factor=True), ValueError, r"scale_factor must be a finite number"),
    (dict(mode="nearest", scale_factor="2"), ValueError, r"scale_factor must be a finite number"),
    (dict(mode="nearest", scale_factor=(2.0, 2.0, 2.0)), ValueError, r"scale_factor must be a number or a pair"),
], ids=["bad_mode", "align_false_nearest", "align_true_nearest", "align_not_bool", "sf_below_1",
        "sf_pair_below_1", "sf_inf", "sf_nan", "sf_bool", "sf_str", "sf_triple"])
def test_resample_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Resample(**kwargs)


def test_as_resample():
    assert as_resample(None, "r") is None
    r = Resample("bilinear", align_corners=True)
    assert as_resample(r, "r") is r
    assert as_resample("nearest", "r") == Resample("nearest")
    assert as_resample("bilinear", "r") == Resample("bilinear")
    with pytest.raises(ValueError, match="Resample.mode"):
        as_resample("bicubic", "r")
    with pytest.raises(TypeError, match=r"resample\[3\] must be None, a mode string or hrfast.ops.Resample"):
        as_resample(2, "resample[3]")
