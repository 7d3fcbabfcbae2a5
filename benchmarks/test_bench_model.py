"""Whole HRNetV2-W48 segmentation model: eager vs torch.compile vs hrfast.patch vs hrfast under torch.compile.

Cases (DESIGN.md "shapes that matter"): inference (eval, no grad) at a 1024x2048 image batch 1 in fp32 (TF32 off)
and bf16 (model and input converted to bfloat16), and a training step (train mode, forward, cross-entropy
against random labels, backward; no optimizer step) at 512x1024 batch 8 under bf16 autocast over the fp32
model. BN state as a trained network has it (random affine, running statistics from one train-mode pass; see
`hrfast.bench`). Each contender rotates three input buffers; peak memory is what one step allocates above what
was allocated before it. `python -m hrfast bench` runs the same comparison as a script, with error checks.

Smoke (HRFAST_BENCH_SMOKE=1, no GPU): HRNetV2-W18-Small-v1 at 64x128, eager and hrfast only (inductor takes
minutes to compile a whole HRNet on CPU), hrfast on its reference path: plumbing only, no meaningful times.
"""
import copy
import itertools
import time

import pytest
import torch

from conftest import SMOKE, environment_info
from hrfast import timing
from test_bench_fusion import median_ms
from hrfast.bench import _calibrate, _loss_fn, _peak_bytes, _targets
from hrfast.models import build_model

MODEL = "hrnetv2_w18_small_v1_seg" if SMOKE else "hrnetv2_w48_seg"
# id -> (mode, dtype, (H, W), batch)
CASES = {
    "inference-fp32": ("inference", torch.float32, (1024, 2048), 1),
    "inference-bf16": ("inference", torch.bfloat16, (1024, 2048), 1),
    "train-bf16-autocast": ("train", torch.bfloat16, (512, 1024), 8),
}
if SMOKE:
    CASES = {k: (m, d, (64, 128), 1 if m == "inference" else 2) for k, (m, d, _, _) in CASES.items()}
CONTENDERS = ["eager", "hrfast"] if SMOKE else ["eager", "compile", "hrfast", "hrfast-compile"]
ROTATE = 3


@pytest.fixture(scope="module")
def base_model(device):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build_model(MODEL).to(device)
    gen = torch.Generator().manual_seed(0)
    _calibrate(model, torch.randn(2, 3, 256, 512, generator=gen).to(device), 0)
    return model


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_model(benchmark, device, base_model, case, contender):
    import hrfast

    mode, dtype, (h, w), batch = CASES[case]
    train = mode == "train"
    torch._dynamo.reset()
    model = copy.deepcopy(base_model)
    if contender.startswith("hrfast"):
        report = hrfast.patch(model)
        patched = {"fusion": report.count("patched", "fusion"), "head": report.count("patched", "head")}
    else:
        patched = {}
    if not train:
        model = model.to(dtype)
    model.train(train)
    if contender.endswith("compile"):
        model = torch.compile(model, dynamic=False)
    gen = torch.Generator().manual_seed(1)
    in_dtype = torch.float32 if train else dtype
    xs = [torch.randn(batch, 3, h, w, generator=gen).to(device=device, dtype=in_dtype) for _ in range(ROTATE)]
    loss_fn = _loss_fn("seg")
    targets = _targets("seg", (batch, 19, -(-h // 4), -(-w // 4)), ROTATE, device, gen) if train else None
    counter = itertools.count()

    def step():
        i = next(counter) % ROTATE
        if not train:
            with torch.no_grad():
                return model(xs[i])
        for p in model.parameters():
            p.grad = None
        with torch.autocast(device.type, dtype=dtype):
            loss = loss_fn(model(xs[i]), targets[i])
        loss.backward()
        return loss

    timed = timing.synced(step, device)
    t0 = time.perf_counter()
    timed()  # compile / warm up
    first_s = time.perf_counter() - t0

    info = dict(environment_info(), model=MODEL, case=case, mode=mode, dtype=str(dtype).replace("torch.", ""),
                autocast=train and dtype != torch.float32, contender=contender, image=[h, w], batch=batch,
                patched=patched, first_call_s=first_s, median_ms=median_ms(timed),
                peak_bytes=_peak_bytes(step, device))
    benchmark.extra_info.update(info)
    benchmark.group = f"model-{case}"
    benchmark.pedantic(timed, rounds=3 if SMOKE else 20, warmup_rounds=1 if SMOKE else 3)
