"""HRNetV2 head: eager concat head vs torch.compile vs hrfast, forward (eval) and forward+backward (train).

Shapes (issue 3): W48 (branches 48/96/192/384, 720 head channels), 19 classes; inference at a 1024x2048 image
(head input 256x512, batch 1) and training at 128x256 batch 8; bf16 and fp32. Besides time, each result
records peak memory and the activation memory the head holds between forward and backward.
"""
import copy

import pytest
import torch

from conftest import SMOKE, environment_info
from hrfast import timing
from hrfast.nn import HRNetV2Head
from hrfast.ops import Resample
from hrfast.ops.reference import resample_ref

WIDTH, CLASSES = (4, 3) if SMOKE else (48, 19)
CASES = {"forward": ((16, 32), 1), "train": ((8, 16), 2)} if SMOKE else {"forward": ((256, 512), 1),
                                                                          "train": ((128, 256), 8)}
# hrfast: the Triton head kernels; hrfast-cuda: cuBLAS projections + the CUDA fusion kernels; hrfast-compile:
# the Triton head under torch.compile
CONTENDERS = ["eager", "compile", "hrfast", "hrfast-cuda", "hrfast-compile"]
if not SMOKE:
    CONTENDERS.insert(2, "compile-max-autotune")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
RESAMPLE = Resample("bilinear", align_corners=False)


def _median_ms(fn):
    from test_bench_fusion import median_ms

    return median_ms(fn)


def _eager_head(layers):
    def run(xs):
        size = tuple(xs[0].shape[2:])
        return layers(torch.cat([xs[0]] + [resample_ref(x, RESAMPLE, size) for x in xs[1:]], 1))
    return run


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", list(CASES))
def test_head(benchmark, device, contender, dtype, mode):
    train = mode == "train"
    (h, w), batch = CASES[mode]
    channels = [WIDTH * 2**k for k in range(4)]
    backend = "cuda" if contender == "hrfast-cuda" else "triton"
    head = HRNetV2Head.from_channels(channels, CLASSES, backend=backend).to(device=device, dtype=DTYPES[dtype])
    head.train(train)
    if contender in ("hrfast", "hrfast-cuda"):
        run = head
    elif contender == "hrfast-compile":
        run = torch.compile(head, dynamic=False)
    else:
        layers = copy.deepcopy(torch.nn.Sequential(*head.children()))
        base = _eager_head(layers)
        run = base if contender == "eager" else torch.compile(
            base, mode="max-autotune-no-cudagraphs" if contender == "compile-max-autotune" else None, dynamic=False)
    xs = [torch.randn(batch, c, h // 2**k, w // 2**k, device=device, dtype=DTYPES[dtype], requires_grad=train)
          for k, c in enumerate(channels)]
    grad = torch.randn(batch, CLASSES, h, w, device=device, dtype=DTYPES[dtype])

    def fn():
        with torch.set_grad_enabled(train):
            y = run(xs)
            if train:
                y.backward(grad)
        return y

    fn()  # compile / warm up
    info = dict(environment_info(), mode=mode, dtype=dtype, contender=contender, width=WIDTH, classes=CLASSES,
                head_input=[h, w], batch=batch, median_ms=_median_ms(fn))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.set_grad_enabled(train):
            y = run(xs)
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - before  # activations kept for backward, plus the logits
            if train:
                y.backward(grad)
        torch.cuda.synchronize()
        info.update(peak_bytes=torch.cuda.max_memory_allocated() - before, activation_bytes=held)
        del y
    benchmark.extra_info.update(info)
    benchmark.group = f"head-{mode}-{dtype}"
    benchmark.pedantic(timing.synced(fn, device), rounds=3 if SMOKE else 30, warmup_rounds=1 if SMOKE else 5)
