"""The main-job demo: one HRNet stage-4 fusion step, eager PyTorch vs hrfast, error and time.

On a GPU it runs the Triton kernels at HRNetV2-W48 stage-4 shapes (a 1024x2048 image, branches at 1/4 to
1/32). Without one it runs them through the Triton interpreter on CPU at a small size: a correctness run,
whose times say nothing about GPU speed (the table says so). Nothing is patched.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
from typing import List, Optional

import torch
import torch.nn as nn

from .backends import ALIASES, BACKENDS
from .timing import time_interleaved

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_fuse_layers(channels: List[int], upsample: Optional[str] = "nearest",
                      multi_scale_output: bool = True) -> nn.ModuleList:
    """`fuse_layers` laid out as every HRNet codebase does (HRNET_LAYOUTS.md section 1): [i][j] is None on
    the diagonal, conv1x1-BN(-Upsample) for j > i, and chains of 3x3 stride-2 conv-BN(-ReLU) for j < i.
    With `upsample=None` the upsample is left to forward, as the official segmentation code does."""
    n = len(channels)
    rows = []
    for i in range(n if multi_scale_output else 1):
        row = []
        for j in range(n):
            if j == i:
                row.append(None)
            elif j > i:
                layers = [nn.Conv2d(channels[j], channels[i], 1, bias=False), nn.BatchNorm2d(channels[i])]
                if upsample is not None:
                    layers.append(nn.Upsample(scale_factor=2 ** (j - i), mode=upsample))
                row.append(nn.Sequential(*layers))
            else:
                links = []
                for k in range(i - j):
                    last = k == i - j - 1
                    c_out = channels[i] if last else channels[j]
                    link = [nn.Conv2d(channels[j], c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out)]
                    if not last:
                        link.append(nn.ReLU(False))
                    links.append(nn.Sequential(*link))
                row.append(nn.Sequential(*links))
        rows.append(nn.ModuleList(row))
    return nn.ModuleList(rows)


def randomize_norms(module: nn.Module, generator: Optional[torch.Generator] = None) -> None:
    """Non-trivial BN state (as a trained network has), so folding errors cannot hide behind 1s and 0s."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0.0, 0.2, generator=generator)
                m.running_mean.normal_(0.0, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)


def _budget(dtype: torch.dtype, eager_error: float) -> float:
    from hrfast.testing import LOW_PRECISION_FACTOR, tolerance

    if dtype in (torch.float16, torch.bfloat16):
        return LOW_PRECISION_FACTOR * max(eager_error, torch.finfo(dtype).eps / 64)
    return tolerance(dtype)


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrfast demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--width", type=int, default=None, help="HRNet width C (branches C, 2C, 4C, 8C); "
                   "default 48 on a GPU, 18 on CPU")
    p.add_argument("--image", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input image size; branch 0 is 1/4 of it (default 1024 2048 on a GPU, 64 64 on CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--upsample", choices=("nearest", "bilinear"), default="nearest")
    p.add_argument("--backend", choices=(*BACKENDS, *ALIASES), default="auto")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--train", action="store_true", help="training mode: batch-statistics BN, forward+backward")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 50 on a GPU, 3 on CPU)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    on_gpu = device.type == "cuda"
    backend = args.backend
    if not on_gpu and backend != "reference":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before hrfast imports triton
        backend = "triton"
    from hrfast.nn import HRFusion  # after the interpreter switch
    from hrfast.ops.reference import fusion_module_ref
    from hrfast.testing import rel_error, tolerance

    width = args.width or (48 if on_gpu else 18)
    img_h, img_w = args.image or ((1024, 2048) if on_gpu else (64, 64))
    reps = args.reps or (50 if on_gpu else 3)
    dtype = DTYPES[args.dtype]
    channels = [width * 2**k for k in range(4)]
    sizes = [(max(1, img_h // 2 ** (k + 2)), max(1, img_w // 2 ** (k + 2))) for k in range(4)]
    gen = torch.Generator().manual_seed(0)

    print(f"hrfast demo: HRNet stage-4 fusion, width {width}, branches {channels}, sizes {sizes}, batch "
          f"{args.batch}, {args.dtype}, {args.upsample}, {'train' if args.train else 'eval'}, on {device}"
          + ("" if on_gpu else " (Triton through its interpreter)" if backend == "triton" else ""), flush=True)
    layers = build_fuse_layers(channels, upsample=args.upsample)
    randomize_norms(layers, gen)
    layers.train(args.train)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    xs64 = [torch.randn(args.batch, c, h, w, generator=gen, dtype=torch.float64) for c, (h, w) in zip(channels, sizes)]

    ref_layers = copy.deepcopy(layers).double()
    eager_layers = copy.deepcopy(layers).to(device=device, dtype=dtype)
    fused = HRFusion(copy.deepcopy(layers).to(device=device, dtype=dtype), backend=backend)
    xs = [x.to(device=device, dtype=dtype).contiguous(memory_format=fmt) for x in xs64]

    print("  checking against the float64 reference ...", flush=True)
    xs_ref = [x.clone().requires_grad_(args.train) for x in xs64]
    xs_eager = [x.clone().requires_grad_(args.train) for x in xs]
    xs_fused = [x.clone().requires_grad_(args.train) for x in xs]
    out_ref = fusion_module_ref(ref_layers, xs_ref)
    out_eager = fusion_module_ref(eager_layers, xs_eager)
    out_fused = fused(xs_fused)
    rows = [("output", rel_error(torch.cat([o.flatten() for o in out_eager]), torch.cat([o.flatten() for o in out_ref])),
             rel_error(torch.cat([o.flatten() for o in out_fused]), torch.cat([o.flatten() for o in out_ref])))]
    if args.train:
        grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in out_ref]
        torch.autograd.backward(out_ref, grads)
        torch.autograd.backward(out_eager, [g.to(device, dtype) for g in grads])
        torch.autograd.backward(out_fused, [g.to(device, dtype) for g in grads])
        flat = lambda ts: torch.cat([t.grad.flatten().double().cpu() for t in ts])  # noqa: E731
        rows.append(("input grads", rel_error(flat(xs_eager), flat(xs_ref)), rel_error(flat(xs_fused), flat(xs_ref))))
        pflat = lambda m: torch.cat([p.grad.flatten().double().cpu() for p in m.parameters()])  # noqa: E731
        rows.append(("weight grads", rel_error(pflat(eager_layers), pflat(ref_layers)),
                     rel_error(pflat(fused.fuse_layers), pflat(ref_layers))))

    print(f"  timing {reps} repetitions each ...", flush=True)
    grads_dev = [torch.randn_like(o) for o in out_eager]

    def run(fn):
        def step():
            with torch.set_grad_enabled(args.train):
                outs = fn([x.detach().requires_grad_(args.train) for x in xs] if args.train else xs)
                if args.train:
                    torch.autograd.backward(outs, grads_dev)
        return step

    eager_step = run(lambda v: fusion_module_ref(eager_layers, v))
    fused_step = run(fused)
    # two warm-up rounds (Triton compiles, oneDNN/cuDNN pick kernels), then interleaved timed rounds
    times = time_interleaved({"eager": eager_step, "hrfast": fused_step}, device, reps=reps, warmup=2)
    t_eager, t_fused = statistics.median(times["eager"]), statistics.median(times["hrfast"])

    print()
    print(f"  {'check':<14}{'eager rel. err':>16}{'hrfast rel. err':>17}   (vs float64 reference)")
    for name, e_eager, e_fused in rows:
        print(f"  {name:<14}{e_eager:>16.2e}{e_fused:>17.2e}")
    print()
    what = "fwd+bwd" if args.train else "forward"
    print(f"  {what} median: eager {t_eager:.3f} ms, hrfast ({fused.backend}) {t_fused:.3f} ms, "
          f"ratio {t_eager / t_fused:.2f}x")
    if not on_gpu:
        print("  note: on CPU the Triton kernels run in the Triton interpreter, a slow simulator for checking "
              "correctness;\n        these times are not a speed result. Run on a GPU for real timings.")
    ok = all(e_fused <= _budget(dtype, e_eager) for _, e_eager, e_fused in rows)
    print(f"  result: {'OK' if ok else 'MISMATCH'}: hrfast is within "
          + ("twice eager PyTorch's own error" if dtype in (torch.float16, torch.bfloat16)
             else f"{tolerance(dtype):.0e} relative error") + " of the float64 reference")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
