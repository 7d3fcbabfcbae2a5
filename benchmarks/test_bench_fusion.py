"""HRNet fusion step: eager PyTorch vs torch.compile vs hrfast, forward (eval) and forward+backward (train).

Two levels, same contenders, timed side by side in one run:
- "op": the fusion of output branch 0 of a stage-4 module on precomputed terms (its identity input, and the
  conv outputs of the three lower branches with their BN as a per-channel affine): the memory-bound part
  hrfast fuses. Reported with the bytes it must move and the fraction of the copy bandwidth measured in the
  same run.
- "module": the whole stage-4 fusion (all four outputs, the convs included) from a `fuse_layers` laid out as
  the official code has it.

Shapes: HRNetV2-W48 at a 1024x2048 image (branches 256x512 ... 32x64), batch 1, bf16 and fp32. Each
contender cycles through 3 input sets so the 50 MB L2 cannot hold the working set.
"""
import copy
import os

import pytest
import torch

from conftest import SMOKE, environment_info
from hrfast import timing
from hrfast.demo import build_fuse_layers, randomize_norms
from hrfast.ops import Resample, fuse, fuse_ref
from hrfast.ops.reference import fusion_module_ref

WIDTH, IMAGE = (4, (32, 64)) if SMOKE else (48, (1024, 2048))
BATCH = 1
ROTATE = 1 if SMOKE else 3
# hrfast: the Triton kernels; hrfast-cuda: the CUDA C++ kernels (csrc/); hrfast-compile: Triton under compile
CONTENDERS = ["eager", "compile", "compile-max-autotune", "hrfast", "hrfast-cuda", "hrfast-compile"]
if SMOKE or os.environ.get("HRFAST_BENCH_MAX_AUTOTUNE", "1") == "0":
    CONTENDERS.remove("compile-max-autotune")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _channels():
    return [WIDTH * 2**k for k in range(4)]


def _sizes():
    return [(IMAGE[0] // 2 ** (k + 2), IMAGE[1] // 2 ** (k + 2)) for k in range(4)]


def median_ms(fn) -> float:
    """Median time of fn in ms, by `hrfast.timing`: on a GPU CUDA events with the L2 flushed before each call and
    about 200 ms of calls (as triton's do_bench(rep=200) measured before), on CPU three calls."""
    if torch.cuda.is_available():
        return timing.median_ms(fn, "cuda", warmup=5, reps=1000, min_reps=5, budget_ms=200, flush_l2=True)
    return timing.median_ms(fn, "cpu", reps=3)


@pytest.fixture(scope="module")
def copy_gbps(device):
    """Device copy bandwidth (read + write bytes per second), measured in this run."""
    n = (1 << 20) if SMOKE else (1 << 28)  # 1 GiB of fp32 on a GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _backend(contender: str) -> str:
    return "cuda" if contender == "hrfast-cuda" else "triton"


def _make_contender(name, fn):
    if name in ("eager", "hrfast", "hrfast-cuda"):
        return fn
    mode = "max-autotune-no-cudagraphs" if name == "compile-max-autotune" else None
    return torch.compile(fn, mode=mode, dynamic=False)


def _record(benchmark, device, copy_gbps, fn, *, level, mode, dtype, contender, bytes_moved=None):
    ms = median_ms(fn)
    info = dict(environment_info(), level=level, mode=mode, dtype=dtype, contender=contender, width=WIDTH,
                image=list(IMAGE), batch=BATCH, median_ms=ms, copy_gbps=copy_gbps)
    if bytes_moved is not None:
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        info.update(bytes_moved=bytes_moved, achieved_gbps=gbps, fraction_of_copy=gbps / copy_gbps)
    benchmark.extra_info.update(info)
    benchmark.group = f"fusion-{level}-{mode}-{dtype}"
    benchmark.pedantic(timing.synced(fn, device), rounds=3 if SMOKE else 30, warmup_rounds=1 if SMOKE else 5)


def _op_inputs(device, dtype, train):
    """Output branch 0 of a stage-4 module: identity term + three conv outputs with their BN affine."""
    c, sizes = _channels(), _sizes()
    x0 = torch.randn(BATCH, c[0], *sizes[0], device=device, dtype=dtype, requires_grad=train)
    zs = [torch.randn(BATCH, c[0], *sizes[k], device=device, dtype=dtype, requires_grad=train) for k in (1, 2, 3)]
    scales = [None] + [torch.rand(c[0], device=device, requires_grad=train) + 0.5 for _ in zs]
    shifts = [None] + [torch.randn(c[0], device=device, requires_grad=train) for _ in zs]
    return [x0] + zs, scales, shifts


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_fusion_op(benchmark, device, copy_gbps, contender, dtype, mode):
    train = mode == "train"
    resample = [None] + [Resample("nearest", scale_factor=2**k) for k in (1, 2, 3)]
    sets = [_op_inputs(device, DTYPES[dtype], train) for _ in range(ROTATE)]
    size = _sizes()[0]
    if contender.startswith("hrfast"):
        backend = _backend(contender)
        base = lambda xs, s, b: fuse(xs, scales=s, shifts=b, resample=resample, backend=backend)  # noqa: E731
    else:
        base = lambda xs, s, b: fuse_ref(xs, s, b, resample, size)  # noqa: E731
    run = _make_contender(contender, base)
    grads = [torch.randn(BATCH, _channels()[0], *size, device=device, dtype=DTYPES[dtype]) for _ in sets]
    step = {"i": 0}

    def fn():
        k = step["i"] = (step["i"] + 1) % len(sets)
        xs, s, b = sets[k]
        with torch.set_grad_enabled(train):
            y = run(xs, s, b)
            if train:
                torch.autograd.grad(y, [t for t in xs + s[1:] + b[1:]], grads[k])
        return y

    fn()  # compile / warm up outside the timing
    xs, _, _ = sets[0]
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    terms, out = sum(nbytes(x) for x in xs), nbytes(xs[0])
    # the least any implementation must move: forward reads every term and writes y; backward also reads
    # grad_y and y (ReLU mask), the low-resolution terms again (for the BN-scale gradients) and writes
    # every term's gradient
    moved = terms + out if not train else terms + out + 2 * out + (terms - out) + terms
    _record(benchmark, device, copy_gbps, fn, level="op", mode=mode, dtype=dtype, contender=contender,
            bytes_moved=moved)


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_fusion_module(benchmark, device, copy_gbps, contender, dtype, mode):
    from hrfast.nn import HRFusion

    train = mode == "train"
    layers = build_fuse_layers(_channels(), upsample="nearest")
    randomize_norms(layers)
    layers = layers.to(device=device, dtype=DTYPES[dtype]).train(train)
    if contender.startswith("hrfast"):
        base = HRFusion(copy.deepcopy(layers), backend=_backend(contender))
    else:
        base = lambda xs: fusion_module_ref(layers, xs)  # noqa: E731
    run = _make_contender(contender, base)
    sets = [[torch.randn(BATCH, c, *hw, device=device, dtype=DTYPES[dtype], requires_grad=train)
             for c, hw in zip(_channels(), _sizes())] for _ in range(ROTATE)]
    step = {"i": 0}

    def fn():
        k = step["i"] = (step["i"] + 1) % len(sets)
        with torch.set_grad_enabled(train):
            outs = run(sets[k])
            if train:
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return outs

    fn()
    _record(benchmark, device, copy_gbps, fn, level="module", mode=mode, dtype=dtype, contender=contender)
