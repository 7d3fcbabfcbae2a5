"""Instrument rows for the CUDA C++ fusion kernels (csrc/) at the W48 stage-4 fusion step, next to the Triton kernels.

    env -u TRITON_INTERPRET python benchmarks/results/fusion_kernel/cuda_cpp_rows.py [--arch sm_90] [--dtype bf16]
        [--channels-last] [--training] [--before COMMIT]

For each output branch (stage4_rows.branch_problem: HRNetV2-W48 stage 4, 1024x2048 b1 inference or 512x1024 b8
training), the C++ launches as hrfast.perf.cuda_cpp models them, compiled with nvcc for the arch
(`hrfast.perf.inspect.cuda_compiled`, cached) and priced by `inspect.cuda_launch_row` exactly as `python -m
hrfast inspect` does; the Triton kernels of the same call priced as stage4_rows.py does. With `--before COMMIT`
the same rows for csrc/, cuda_cpp.py and workload.CUDA_KERNELS as they were at COMMIT (extracted with git
show into a temporary folder) come first. Predictions for the named architecture, not measurements.
"""
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE))

from stage4_rows import branch_problem, cost_rows, record_branch, step_arguments, step_setup  # noqa: E402

from hrfast.perf import cuda_cpp, inspect, workload  # noqa: E402
from hrfast.perf.compile import compile_cuda  # noqa: E402
from hrfast.perf.opcalls import OpCall  # noqa: E402

CSRC_FILES = ("fuse.h", "fuse_kernels.h", "fuse_launch.h", "fuse_launchers.h", "fuse_cuda.cu")


def model_at(commit, tmp):
    """(cuda_cpp module, workload.CUDA_KERNELS, the .cu path) as they were at `commit`."""
    folder = Path(tmp) / "csrc"
    folder.mkdir()
    for name in CSRC_FILES:
        text = subprocess.run(["git", "show", f"{commit}:csrc/{name}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
        (folder / name).write_text(text)
    modules = []
    for name in ("cuda_cpp", "workload"):
        source = subprocess.run(["git", "show", f"{commit}:hrfast/perf/{name}.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        path = Path(tmp) / f"{name}_before.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"hrfast.perf._{name}_before", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1].CUDA_KERNELS, folder / "fuse_cuda.cu"


def rows(arch, model, compiled, calls, training):
    out = []
    for b, call in calls:
        for launch in model.launches(call, training):
            name = cuda_cpp.mangled_name(list(compiled), launch.kernel, call.dtype)
            r = inspect.cuda_launch_row(arch, inspect.describe(call), launch, name, compiled[name])
            r["branch"] = b
            out.append(r)
    return out


def table(title, launch_rows, triton):
    print(f"\n### {title}\n")
    print("| branch | kernel | phase | regs | spill st/ld B | warps/SM | SASS/elem per thread | MB | predicted us "
          "| limiter |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in launch_rows:
        per = r["thread_instructions_per_element"]
        print(f"| {r['branch']} | {r['kernel']} | {r['phase']} | {r['registers']} | {r['spill_stores']}/"
              f"{r['spill_loads']} | {r['warps_per_sm']} | {per:.1f} | {r['bytes'] / 1e6:.1f} | "
              f"{r['predicted_s'] * 1e6:.1f} | {r['limiter']} |" if per is not None else
              f"| {r['branch']} | {r['kernel']} | {r['phase']} | {r['registers']} | - | - | unknown | - | - | - |")
    print("\n| branch | phase | CUDA C++ us | Triton us | C++ / Triton |")
    print("|---|---|---|---|---|")
    totals = {}
    for (b, phase), t_us in triton.items():
        c_us = sum(r["predicted_s"] for r in launch_rows if r["branch"] == b and r["phase"] == phase) * 1e6
        totals.setdefault(phase, [0.0, 0.0])
        totals[phase][0] += c_us
        totals[phase][1] += t_us
        print(f"| {b} | {phase} | {c_us:.1f} | {t_us:.1f} | {c_us / t_us:.2f}x |")
    for phase, (c_us, t_us) in totals.items():
        print(f"| all | {phase} | {c_us:.1f} | {t_us:.1f} | {c_us / t_us:.2f}x |")
    if len(totals) > 1:
        c_us, t_us = (sum(v) for v in zip(*totals.values()))
        print(f"| all | fwd+bwd | {c_us:.1f} | {t_us:.1f} | {c_us / t_us:.2f}x |")


def main(argv=None):
    ap = step_arguments()
    ap.add_argument("--before", default=None, help="a commit: also the rows of csrc/ as it was there")
    args = ap.parse_args(argv)
    arch, H, W, N, dtype = step_setup(args)
    print(f"# CUDA C++ fusion kernels, {arch.name}, {args.dtype}, {'channels_last' if args.channels_last else 'NCHW'}, "
          f"{'512x1024 b8 training' if args.training else '1024x2048 b1 inference'} (predictions)")
    print("\n    env -u TRITON_INTERPRET python benchmarks/results/fusion_kernel/cuda_cpp_rows.py "
          + " ".join(a for a in (argv if argv is not None else sys.argv[1:])))
    calls, triton = [], {}
    for b in range(4):
        problem = branch_problem(b, H, W, N, dtype, args.channels_last)
        plan, xs = problem[0], problem[1]
        calls.append((b, OpCall(kind="fuse", inputs=[tuple(x.shape) for x in xs], dtype=dtype, plan=plan)))
        fwd, bwd = record_branch(problem, args.training)
        triton[(b, "forward")] = sum(r["us"] for r in cost_rows(arch, fwd))
        if args.training:
            triton[(b, "backward")] = sum(r["us"] for r in cost_rows(arch, bwd))
    flags = cuda_cpp.compile_flags()
    if args.before:
        with tempfile.TemporaryDirectory() as tmp:
            model, trips, source = model_at(args.before, tmp)
            compiled = compile_cuda(str(source), arch.sm, flags)
            now, workload.CUDA_KERNELS = workload.CUDA_KERNELS, trips  # the trip table of those kernels
            try:
                table(f"before (csrc at {args.before})", rows(arch, model, compiled, calls, args.training), triton)
            finally:
                workload.CUDA_KERNELS = now
    compiled = inspect.cuda_compiled(arch.sm)
    table("after (csrc of this checkout)", rows(arch, cuda_cpp, compiled, calls, args.training), triton)


if __name__ == "__main__":
    main()
