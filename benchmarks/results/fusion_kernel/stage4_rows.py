"""Instrument rows for the W48 stage-4 fusion step (all four output branches), per kernel and per branch.

    python benchmarks/results/fusion_kernel/stage4_rows.py [--arch sm_90] [--dtype bf16] [--channels-last]
        [--training] [--branches 0 1 2 3]

Records the Triton launchers' launches on meta tensors (HRNetV2-W48 stage 4: 1024x2048 b1 inference, 512x1024
b8 training; training as the patched model runs the step, `record_training_step`: the batch-norm folds' kernels
and hrfast's own ATen ops included, as eager's BNs are), compiles each variant with Triton's real compiler (`hrfast.perf.compile`, cached) and prices it
with `hrfast.perf.model` exactly as `python -m hrfast inspect` does, next to eager and torch.compile
(`hrfast.perf.eager`). Predictions, not measurements. Run without TRITON_INTERPRET.
"""
import argparse
import os
import sys

import torch

from hrfast.perf import eager, workload
from hrfast.perf.arch import get_arch
from hrfast.perf.compile import compile_launch
from hrfast.perf.inspect import kernel_cost, key_constexprs
from hrfast.perf.record import record
from hrfast.plan import Resample, fuse_plan

CHANNELS = (48, 96, 192, 384)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def branch_problem(branch, H, W, N, dtype, channels_last):
    """(plan, xs, scales, shifts) of output branch `branch`: term j at 1/2^j of branch 0's size; BN (scale, shift)
    on every term but the output branch's own, as HRNet's fuse layers after BN folding."""
    C = CHANNELS[branch]
    size = (H >> branch, W >> branch)
    sizes = [(H >> j, W >> j) for j in range(4)]
    resamples = [Resample("bilinear", align_corners=False) if j > branch else None for j in range(4)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # terms from higher-resolution branches arrive already strided down to this size
    shapes = [(N, C, *(sizes[j] if j > branch else size)) for j in range(4)]
    xs = [torch.empty(s, dtype=dtype, device="meta", memory_format=fmt) for s in shapes]
    params = [torch.empty(C, dtype=dtype, device="meta") if j != branch else None for j in range(4)]
    present = tuple(p is not None for p in params)
    plan = fuse_plan(tuple(x.shape[2:] for x in xs), tuple(resamples), size, True, channels_last, present, present)
    return plan, xs, params, list(params)


def record_branch(problem, training):
    from hrfast.kernels import fuse as K
    plan, xs, scales, shifts = problem
    with record("hrfast.kernels") as launches:
        y = K.fuse_forward(plan, xs, scales, shifts)
        forward = len(launches)
        if training:
            needs = [(True, s is not None, b is not None) for s, b in zip(scales, shifts)]
            K.fuse_backward(plan, torch.empty_like(y), y, xs, scales, shifts, needs)
    return launches[:forward], launches[forward:]


def record_training_step(dtype, channels_last):
    """Per output branch (plan, input shapes, launches by phase, hrfast's ATen ops by phase) of the W48 stage-4
    fusion step in training as the patched model runs it: `hrfast.nn.fusion.fusion_forward` over the model's own
    fuse_layers (the convolutions in front of the BNs are the eager model's too and are not recorded), so with
    the batch-norm folds' kernels (batch statistics, their backward) and every ATen op hrfast runs besides its
    kernels, recorded by `hrfast.perf.opcalls.recording` as `python -m hrfast inspect` does."""
    from hrfast.models import build_model
    from hrfast.nn.fusion import fusion_forward
    from hrfast.perf.opcalls import BACKWARD, FORWARD, recording

    with torch.device("meta"):
        model = build_model("hrnetv2_w48_seg")
    stage4 = [m for m in model.modules() if getattr(m, "fuse_layers", None) is not None and len(m.fuse_layers) == 4]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layers = stage4[-1].fuse_layers.to(dtype=dtype, memory_format=fmt).train()
    xs = [torch.empty((8, c, 128 >> j, 256 >> j), dtype=dtype, device="meta", requires_grad=True,
                      memory_format=fmt) for j, c in enumerate(CHANNELS)]
    from hrfast.kernels import batch_norm as bn_kernels
    if hasattr(bn_kernels, "_tickets"):  # steady state: the statistics kernel's tickets exist from an earlier step
        bn_kernels._tickets(torch.device("meta"), 1)
    with recording() as attribution:
        ys = fusion_forward(layers, xs, default=Resample("bilinear", align_corners=False), backend="triton")
        torch.autograd.backward(ys, [torch.empty_like(y) for y in ys])
    return [(c.plan, c.inputs, {"forward": c.launches[FORWARD], "backward": c.launches[BACKWARD]},
             {"forward": c.ops[FORWARD], "backward": c.ops[BACKWARD]}) for c in attribution.calls]


def cost_rows(arch, launches):
    rows = []
    for launch in launches:
        compiled = compile_launch(launch, arch.sm)
        cost = kernel_cost(arch, launch, compiled)
        rows.append(dict(name=launch.name, key=key_constexprs(launch), regs=compiled.registers,
                         spill=f"{compiled.spill_stores}/{compiled.spill_loads}" if hasattr(compiled, "spill_stores")
                         else "", us=cost["seconds"] * 1e6, mb=cost["bytes"] / 1e6, limiter=cost["limiter"],
                         issue_us=cost["terms"]["issue"] * 1e6, bytes_us=cost["terms"]["memory"] * 1e6,
                         per_elem=(cost["warp_instructions"] or 0) / max(cost["elements"] or 1, 1),
                         warps=cost["occupancy"].warps_per_sm, fail=cost["failure"]))
    return rows


def step_arguments() -> argparse.ArgumentParser:
    """The options every stage-4 row script takes (this one and cuda_cpp_rows.py)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--training", action="store_true")
    return ap


def step_setup(args):
    """(arch, branch 0's H, W, batch N, dtype) of the parsed options; refuses the Triton interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET")
    H, W, N = (128, 256, 8) if args.training else (256, 512, 1)
    return get_arch(args.arch), H, W, N, DTYPES[args.dtype]


def main(argv=None):
    ap = step_arguments()
    ap.add_argument("--branches", type=int, nargs="*", default=[0, 1, 2, 3])
    args = ap.parse_args(argv)
    arch, H, W, N, dtype = step_setup(args)
    print(f"# {arch.name}, {args.dtype}, {'channels_last' if args.channels_last else 'NCHW'}, "
          f"{'512x1024 b8 training' if args.training else '1024x2048 b1 inference'}")
    print("| branch | phase | kernel | key | regs | SASS/elem | MB | bytes us | issue us | issue/bytes | warps/SM "
          "| predicted us | limiter |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    totals = {}
    step = record_training_step(dtype, args.channels_last) if args.training else None
    for b in args.branches:
        if step is not None:  # the module's step: BN folds and hrfast's ATen ops included
            plan, shapes, phases, aten = step[b]
        else:
            problem = branch_problem(b, H, W, N, dtype, args.channels_last)
            fwd, bwd = record_branch(problem, args.training)
            plan, shapes, phases, aten = problem[0], [tuple(x.shape) for x in problem[1]], {"forward": fwd}, {}
        ops_e = eager.eager_fuse(plan, shapes, dtype, args.training)
        ops_c = eager.compiled_fuse(plan, shapes, dtype, args.training)
        for phase, launches in phases.items():
            us = 0.0
            for r in cost_rows(arch, launches):
                us += r["us"]
                print(f"| {b} | {phase} | {r['name']} | {r['key']} | {r['regs']} | {r['per_elem']:.2f} | "
                      f"{r['mb']:.1f} | {r['bytes_us']:.2f} | {r['issue_us']:.2f} | "
                      f"{r['issue_us'] / max(r['bytes_us'], 1e-12):.2f} | {r['warps']} | {r['us']:.2f} | "
                      f"{r['limiter']}{' FAILS ' + r['fail'] if r['fail'] else ''} |")
            ops = aten.get(phase, [])
            if ops:  # costed like eager's ops (bytes once, 4 us per launch)
                aten_us = eager.seconds(arch, ops) * 1e6
                us += aten_us
                names = ", ".join(f"{n} x{sum(o.name == n for o in ops)}" for n in dict.fromkeys(o.name for o in ops))
                print(f"| {b} | {phase} | ATen ops: {names} | | | | {sum(o.bytes for o in ops) / 1e6:.1f} | | | | | "
                      f"{aten_us:.2f} | launches |")
            e_us = eager.seconds(arch, ops_e[phase]) * 1e6
            c_us = eager.seconds(arch, ops_c[phase]) * 1e6
            totals[(b, phase)] = (us, e_us, c_us)
    print("\n| branch | phase | hrfast us | eager us | compile us | vs eager | vs compile |")
    print("|---|---|---|---|---|---|---|")
    for (b, phase), (us, e_us, c_us) in totals.items():
        if not us:  # the step's grouped launches sit under branch 0
            print(f"| {b} | {phase} | (in branch 0's) | {e_us:.1f} | {c_us:.1f} | | |")
            continue
        print(f"| {b} | {phase} | {us:.1f} | {e_us:.1f} | {c_us:.1f} | {e_us / us:.2f}x | {c_us / us:.2f}x |")
    for phase in ("forward", "backward"):
        sel = [v for (b, p), v in totals.items() if p == phase]
        if sel:
            us, e_us, c_us = (sum(x) for x in zip(*sel))
            print(f"| all | {phase} | {us:.1f} | {e_us:.1f} | {c_us:.1f} | {e_us / us:.2f}x | {c_us / us:.2f}x |")
    if args.training:
        us, e_us, c_us = (sum(x) for x in zip(*totals.values()))
        print(f"| all | fwd+bwd | {us:.1f} | {e_us:.1f} | {c_us:.1f} | {e_us / us:.2f}x | {c_us / us:.2f}x |")


if __name__ == "__main__":
    main()
