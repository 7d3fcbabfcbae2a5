"""Property tests: random problems of both public ops, every backend against the float64 reference.

Hypothesis draws the structure of a problem (batch, channels, sizes including 1 and odd ones, term or branch
count, resample mode, align_corners, exact size or integral scale factor, which scales / shifts / biases /
statistics exist, training or eval, dtype, memory layout) and a seed for the values; `check_fuse` and
`check_head` (the op tests' own checkers) then compare the output, its layout and every gradient (and the
running statistics) of one backend with the reference evaluated in float64: fp32/fp64 at the fixed
tolerance, fp16/bf16 (outputs only) within twice PyTorch's own error. Backends: "reference", "triton" (the interpreter
without a GPU) and "cuda" (the host build of csrc/ without a GPU), each on the same drawn problems. Without a
GPU the Triton backward kernels take seconds per call in the interpreter, so there the gradient properties
run the CUDA host build only (the Triton gradients are checked by test_fuse_op / test_head_op's matrices); on
a GPU both fused backends. The reference backend's gradients are autograd's through fuse_ref / head_ref.

Examples per property: HRFAST_PROPERTY_EXAMPLES (default 200); shapes stay tiny for the interpreter. The
deadline is off (the interpreter's first call of a kernel variant is slow).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_fuse_op
import test_head_op
from conftest import TRITON_DEVICE
from hrfast.ops import Resample, fuse, fuse_ref
from optest import LOW_PRECISION, assert_matches

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
BACKENDS = ("reference", "triton", "cuda")
GRADIENT_BACKENDS = ("cuda",) if TRITON_DEVICE == "cpu" else ("triton", "cuda")
DTYPES = st.sampled_from([F32, F64, BF16, F16])
# the head's fp16/bf16 budgets are statistics over many elements (its kernels round the projected low branches,
# so they are not correctly rounded): test_head_op checks them on larger shapes
HEAD_DTYPES = st.sampled_from([F32, F64])
# fp16/bf16 gradients and check_fuse's rounded-once count are judged by statistics that need more elements
# than these problems have; the op tests check them on larger shapes
GRADIENT_DTYPES = st.sampled_from([F32, F64])
SEEDS = st.integers(0, 2**31 - 1)
EXAMPLES = int(os.environ.get("HRFAST_PROPERTY_EXAMPLES", "200"))

# the conftest fixtures (seed, NaN-poisoned launch buffers) are per test, not per example: both hold for
# every example alike, which is what the function-scoped-fixture health check asks about
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def poisoned_csrc_outputs(monkeypatch):
    """The CUDA host build's launch buffers start as NaN too (conftest's `fused_backend` does this per test)."""
    from hrfast._cuda import fuse as csrc_fuse

    monkeypatch.setattr(csrc_fuse, "POISON_OUTPUTS", True)


def _resample(draw, scale_factor=None) -> Resample:
    mode = draw(st.sampled_from(["nearest", "bilinear"]))
    align = draw(st.sampled_from([None, False, True])) if mode == "bilinear" else None
    return Resample(mode, align_corners=align, scale_factor=scale_factor)


def _smaller(draw, H: int, W: int):
    return draw(st.integers(1, H)), draw(st.integers(1, W))


@st.composite
def fuse_cases(draw) -> test_fuse_op.Case:
    """A fusion problem: 1 to 4 terms, each at the output size, resampled to it from a smaller size, or
    upsampled by an integral scale factor that divides it."""
    H, W = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    factors = [s for s in (2, 3) if H % s == 0 and W % s == 0]
    terms = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["same", "size", "factor"] if factors else ["same", "size"]))
        if kind == "same":
            terms.append(((H, W), None))
        elif kind == "size":
            terms.append((_smaller(draw, H, W), _resample(draw)))
        else:
            s = draw(st.sampled_from(factors))
            terms.append(((H // s, W // s), _resample(draw, scale_factor=s)))
    return test_fuse_op.Case((H, W), terms, N=draw(st.integers(1, 2)), C=draw(st.integers(1, 3)),
                             affine=draw(st.sampled_from(["full", "mixed", "none"])), relu=draw(st.booleans()),
                             pass_size=draw(st.booleans()))


@st.composite
def head_cases(draw) -> test_head_op.Case:
    """A head problem: 1 to 4 branches no larger than x0, each resampled to x0's size (one Resample for all,
    hrnet_v2_head's default, or one per branch)."""
    n = draw(st.integers(1, 4))
    H, W = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sizes = [(H, W)] + [_smaller(draw, H, W) for _ in range(n - 1)]
    choice = draw(st.sampled_from(["default", "one", "each"]))
    resample = (None if choice == "default" or n == 1 else _resample(draw) if choice == "one"
                else [_resample(draw) for _ in range(n - 1)])
    return test_head_op.Case(tuple(draw(st.integers(1, 3)) for _ in range(n)), sizes, resample,
                             N=draw(st.integers(1, 2)), M=draw(st.sampled_from([None, 1, 5])),
                             K=draw(st.integers(1, 3)), conv_bias=draw(st.booleans()), cls_bias=draw(st.booleans()),
                             affine=draw(st.booleans()), running=draw(st.booleans()))


LAYOUTS = st.sampled_from(["nchw", "channels_last", "strided"])
HEAD_LAYOUTS = st.sampled_from(["nchw", "channels_last", "mixed"])


def fuse_forward(case: test_fuse_op.Case, dtype, layout, backend: str) -> None:
    """`check_fuse`'s forward half: the output's value, shape and dtype against fuse_ref in float64, and the
    fused kernels' layout rule (the reference backend's layout is eager's)."""
    xs, scales, shifts, resamples, size_arg = test_fuse_op._build(case, dtype, layout)
    y = fuse(xs, scales=scales, shifts=shifts, resample=resamples, size=size_arg, relu=case.relu, backend=backend)
    assert y.shape == (case.N, case.C, *case.size) and y.dtype == dtype
    fmt = test_fuse_op._expected_memory_format(case, layout)
    assert backend == "reference" or fmt is None or y.is_contiguous(memory_format=fmt), f"strides {y.stride()}"
    y64 = fuse_ref(*test_fuse_op._clone_args(xs, scales, shifts, F64), resamples, case.size, case.relu)
    low = dtype in LOW_PRECISION
    y_pt = fuse_ref(*test_fuse_op._clone_args(xs, scales, shifts), resamples, case.size, case.relu) if low else None
    assert_matches("y", y, y64, y_pt, dtype)


def head_forward(case: test_head_op.Case, dtype, layout, training: bool, backend: str) -> None:
    """`check_head`'s forward half: the logits (value, shape, dtype; the fused kernels' layout rule) and the
    running statistics."""
    args = test_head_op._build(case, dtype, layout)
    before = test_head_op._copy(args)
    y = test_head_op._call(args, case, training, backend)
    assert y.shape == (case.N, case.K, *case.sizes[0]) and y.dtype == dtype
    fmt = test_head_op._expected_format(case, layout)
    assert backend == "reference" or fmt is None or y.is_contiguous(memory_format=fmt), f"strides {y.stride()}"
    grad_y = torch.zeros_like(y)  # no gradient is compared here
    y64, _, r64 = test_head_op._reference(before, case, training, grad_y, F64)
    low = dtype in LOW_PRECISION
    y_pt, _, r_pt = test_head_op._reference(before, case, training, grad_y) if low else (None, None, None)
    assert_matches("logits", y, y64, y_pt, dtype)
    for name in ("running_mean", "running_var") if training and case.running else ():
        assert_matches(name, args[name], r64[name], r_pt[name] if low else None, dtype)


def _strided_ok(case: test_fuse_op.Case, layout: str) -> str:
    """`layout`, but "nchw" for a "strided" case with a term of height or width 1 (no view of it is strided)."""
    if layout == "strided" and any(min(hw) == 1 for hw, _ in case.terms):
        return "nchw"
    return layout


def _seeded(seed: int, check, *args) -> None:
    torch.manual_seed(seed)
    check(*args)


# ------------------------------------------------------------------------------------------------ the fusion


@PROPERTY
@given(case=fuse_cases(), dtype=DTYPES, layout=LAYOUTS, seed=SEEDS)
def test_fuse_forward_matches_reference(case, dtype, layout, seed):
    """Every backend's output."""
    layout = _strided_ok(case, layout)
    for backend in BACKENDS:
        _seeded(seed, fuse_forward, case, dtype, layout, backend)


@PROPERTY
@given(case=fuse_cases(), dtype=GRADIENT_DTYPES, layout=LAYOUTS, seed=SEEDS)
def test_fuse_gradients_match_reference(case, dtype, layout, seed):
    """Output and every gradient, on the backends whose backward is cheap without a GPU (see the module
    docstring)."""
    layout = _strided_ok(case, layout)
    for backend in GRADIENT_BACKENDS:
        _seeded(seed, test_fuse_op.check_fuse, case, dtype, layout, None, "like_y", backend)


# ------------------------------------------------------------------------------------------------ the head


def _head_args(case: test_head_op.Case, training: bool, values: int = 2) -> test_head_op.Case:
    """`case` with at least `values` values per channel for batch statistics (a larger batch): F.batch_norm
    refuses one."""
    N, (H, W) = case.N, case.sizes[0]
    if (training or not case.running) and N * H * W < values:
        return case._replace(N=-(-values // (H * W)))
    return case


@PROPERTY
@given(case=head_cases(), dtype=HEAD_DTYPES, layout=HEAD_LAYOUTS, training=st.booleans(), seed=SEEDS,
       backend=st.sampled_from(BACKENDS))
def test_head_forward_matches_reference(case, dtype, layout, training, seed, backend):
    """Logits and running statistics; one backend per example (the interpreted head costs a tenth of a second
    a call)."""
    _seeded(seed, head_forward, _head_args(case, training), dtype, layout, training, backend)


@PROPERTY
@given(case=head_cases(), dtype=GRADIENT_DTYPES, layout=HEAD_LAYOUTS, training=st.booleans(), seed=SEEDS)
def test_head_gradients_match_reference(case, dtype, layout, training, seed):
    """Logits, every gradient and the running statistics, on the backends whose backward is cheap without a
    GPU. Batch statistics where the normalisation leaves nothing to differentiate get more data: two values per
    channel normalise to +-1 whatever they are (then three), with one input channel the conv weight's scale
    cancels (then two), a one-pixel branch of a single image is a constant the mean removes (then two images);
    such gradients are round-off, which no relative tolerance can judge."""
    case = _head_args(case, training, values=3)
    if (training or not case.running) and sum(case.channels) < 2:
        case = case._replace(channels=(2,) + case.channels[1:])
    if (training or not case.running) and (1, 1) in case.sizes[1:]:  # one pixel: constant but for the batch
        case = case._replace(N=max(case.N, 2))
    for backend in GRADIENT_BACKENDS:
        _seeded(seed, test_head_op.check_head, case, dtype, layout, training, None, backend)
