"""Upsample backward alone: the adjoint of F.interpolate (what every upsampled fusion term and the head's low
branches pay in training).

Eager PyTorch's CUDA backward of nearest/bilinear upsampling scatters with atomicAdd (non-deterministic);
hrfast's is a gather (each source pixel sums the output pixels that read it), deterministic. Timed: the
backward only, of y = Up(x) with x a W48 stage-4 branch (C = 96, 192, 384 at 1/8, 1/16, 1/32 of 1024x2048)
upsampled to 1/4 resolution. hrfast runs it as `hrfast.ops.fuse` of a single resampled term without ReLU,
whose backward is exactly the adjoint.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import SMOKE, environment_info
from hrfast import timing
from hrfast.ops import Resample, fuse
from test_bench_fusion import median_ms

IMAGE = (32, 64) if SMOKE else (1024, 2048)
WIDTH = 4 if SMOKE else 48
CONTENDERS = ["eager", "compile", "hrfast", "hrfast-cuda"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODES = {"nearest": Resample("nearest"), "bilinear": Resample("bilinear", align_corners=False)}


def _run(contender: str, resample: Resample, size):
    if contender.startswith("hrfast"):
        backend = "cuda" if contender == "hrfast-cuda" else "triton"
        return lambda x: fuse([x], resample=[resample], size=size, relu=False, backend=backend)
    eager = lambda x: F.interpolate(x, size=size, mode=resample.mode,  # noqa: E731
                                    align_corners=resample.align_corners)
    return eager if contender == "eager" else torch.compile(eager, dynamic=False)


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("branch", [1, 2, 3])
def test_upsample_backward(benchmark, device, contender, dtype, mode, branch):
    size = (IMAGE[0] // 4, IMAGE[1] // 4)
    in_hw = (size[0] >> branch, size[1] >> branch)
    channels = WIDTH * 2**branch
    run = _run(contender, MODES[mode], size)
    x = torch.randn(1, channels, *in_hw, device=device, dtype=DTYPES[dtype], requires_grad=True)
    y = run(x)
    grad = torch.randn_like(y)

    def fn():
        return torch.autograd.grad(y, x, grad, retain_graph=True)

    fn()  # warm-up (and the compile of the backward graph)
    ms = median_ms(fn)
    info = dict(environment_info(), contender=contender, dtype=dtype, mode=mode, branch=branch,
                channels=channels, in_hw=list(in_hw), out_hw=list(size), median_ms=ms,
                bytes_moved=(y.numel() + x.numel()) * y.element_size())
    benchmark.extra_info.update(info)
    benchmark.group = f"upsample-backward-{mode}-{dtype}-branch{branch}"
    benchmark.pedantic(timing.synced(fn, device), rounds=3 if SMOKE else 30, warmup_rounds=1 if SMOKE else 5)
