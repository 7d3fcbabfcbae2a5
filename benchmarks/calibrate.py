"""Measure, on the GPU at hand, every fused op call that `python -m hrfast inspect` predicted, and write the
measured time beside the predicted one into the same JSON.

    python benchmarks/calibrate.py REPORT.json [--out DIR] [--reps 10] [--budget-s 150]

REPORT.json is an inspect report (`python -m hrfast inspect --out DIR`); its configuration (model, size,
batch, dtype, layout, mode) is recorded again on meta tensors to get the op calls (the fusion rows and the
head, with their plans and shapes). Each distinct op call then runs on real CUDA tensors of those shapes
(random values; BN as fp32 per-channel scale and shift, with gradients in training): `hrfast.ops.fuse` /
`hrfast.ops.hrnet_v2_head` with backend "triton", "cuda_cpp" (when its extension is already built: nothing
is compiled here) and "reference" (plain PyTorch ops, hrfast.ops.reference), forward under no_grad
(inference) or forward and backward (training), timed by `hrfast.timing` (CUDA events, L2 flushed before every
call, interleaved, median). A backend that fails (a kernel that cannot launch) is recorded with its error.

Written: <out>/<report stem>.calibrated.json, the report with, per op call of the section of the device's
architecture, "measured": {backend: median seconds or error} and "predicted_op_s", the prediction of what is
timed (fusion: the kernels and the ATen ops inside the fused op, not the BN fold around it; head: everything
hrnet_v2_head runs), plus the device and versions. On a machine without a CUDA GPU it exits with a message.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

BACKENDS = ("triton", "cuda_cpp", "reference")
DEVICE = "cuda"  # tests build the same calls on "cpu"


def arch_section(report: dict) -> str:
    """The report's architecture section for this GPU: by name (A100, H100, H200), else by compute capability."""
    name = torch.cuda.get_device_name(0)
    for section in report["archs"]:
        if section.split()[0] in name:
            return section
    major, minor = torch.cuda.get_device_capability(0)
    for section, values in report["archs"].items():
        if values["sm"] == 10 * major + minor:
            return section
    raise SystemExit(f"calibrate: {report['archs'].keys()} has no section for {name} (sm_{major}{minor}); run "
                     "python -m hrfast inspect --arch for it first")


def _resample(term):
    from hrfast.ops import Resample
    if term.mode == 0:
        return None
    return Resample("nearest") if term.mode == 1 else Resample("bilinear", align_corners=bool(term.align_corners))


def _tensor(shape, dtype, channels_last: bool, grad: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    return t.requires_grad_(grad)


def _timed(op: Callable[[str], torch.Tensor], grad: torch.Tensor, training: bool) -> Callable[[str], Callable]:
    """For a backend name, the timed call: the op under no_grad, or forward and backward (gradient `grad`)."""
    def runner(backend):
        def run():
            with torch.set_grad_enabled(training):
                y = op(backend)
                if training:
                    y.backward(grad)
        return run
    return runner


def fuse_runner(call, training: bool, channels_last: bool) -> Callable[[str], Callable]:
    """The timed call of one fusion op call, per backend."""
    from hrfast.ops import fuse
    plan = call.plan
    xs = [_tensor(s, call.dtype, plan.channels_last, training) for s in call.inputs]
    N, C = call.inputs[0][:2]
    scales = [torch.rand(C, device=DEVICE, requires_grad=training) if t.has_scale else None for t in plan.terms]
    shifts = [torch.randn(C, device=DEVICE, requires_grad=training) if t.has_shift else None for t in plan.terms]
    resample = [_resample(t) for t in plan.terms]
    grad = _tensor((N, C, *plan.size), call.dtype, plan.channels_last, False)
    return _timed(lambda backend: fuse(xs, scales=scales, shifts=shifts, resample=resample, size=plan.size,
                                       relu=plan.relu, backend=backend), grad, training)


def head_runner(call, training: bool, channels_last: bool) -> Callable[[str], Callable]:
    """The timed call of the head op call, per backend (BN with batch statistics in training)."""
    from hrfast.ops import hrnet_v2_head
    xs = [_tensor(s, call.dtype, channels_last, training) for s in call.inputs]
    (N, _, H, W), M, K = call.inputs[0], call.extra["M"], call.extra["K"]
    C = sum(s[1] for s in call.inputs)
    conv_w = _tensor((M, C, 1, 1), call.dtype, False, training)
    cls_w = _tensor((K, M, 1, 1), call.dtype, False, training)
    conv_b, cls_b = torch.zeros(M, device=DEVICE, dtype=call.dtype), torch.zeros(K, device=DEVICE, dtype=call.dtype)
    mean, var = torch.zeros(M, device=DEVICE), torch.ones(M, device=DEVICE)
    weight = torch.ones(M, device=DEVICE, requires_grad=training)
    grad = _tensor((N, K, H, W), call.dtype, channels_last, False)
    return _timed(lambda backend: hrnet_v2_head(xs, conv_w, conv_b, mean, var, weight, None, cls_w, cls_b,
                                                training=training, backend=backend), grad, training)


def backends_here() -> List[str]:
    from hrfast import backends
    return [b for b in BACKENDS if b != "cuda_cpp" or backends.cuda_cpp_built(torch.device(DEVICE))]


def measure(runner, names: List[str], reps: int, budget_ms: float) -> Dict[str, object]:
    """Median seconds per backend, or the error it raised."""
    from hrfast.timing import time_interleaved
    errors: Dict[str, str] = {}
    fns = {name: runner(name) for name in names}
    times = time_interleaved(fns, DEVICE, reps=reps, warmup=1, min_reps=3, budget_ms=budget_ms, flush_l2=True,
                             on_error=lambda name, exc: errors.__setitem__(name, f"{type(exc).__name__}: {exc}"[:300]))
    result: Dict[str, object] = {name: statistics.median(ms) * 1e-3 for name, ms in times.items()}
    result.update((name, {"error": message}) for name, message in errors.items())
    return result


def predicted_op_s(row: dict) -> float:
    """What the timed call runs, as predicted: fusion, the kernels and the fused op's own ATen ops; head, all."""
    glue = row["glue_s"] if row["kind"] == "head" else row["glue_in_op_s"]
    return sum(row["kernels_s"].values()) + sum(glue.values())


def calibrate(report: dict, reps: int, budget_s: float) -> dict:
    from hrfast.perf import inspect as perf_inspect
    config = perf_inspect.Config(**{**report["config"], "size": tuple(report["config"]["size"])})
    groups = perf_inspect.op_rows(perf_inspect.record_run(config).calls)
    section = report["archs"][arch_section(report)]
    rows = {row["op"]: row for row in section["op_calls"]}
    names, deadline = backends_here(), time.monotonic() + budget_s
    for calls in groups:
        call = calls[0]
        row = rows.get(perf_inspect.describe(call))
        if row is None:
            continue
        if time.monotonic() > deadline:
            row["measured"] = {"skipped": "time budget spent"}
            continue
        make = fuse_runner if call.kind == "fuse" else head_runner
        row["measured"] = measure(make(call, config.training, config.channels_last), names, reps, budget_ms=2000.0)
        row["predicted_op_s"] = predicted_op_s(row)
        torch.cuda.empty_cache()
    return report


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="an inspect report (.json)")
    p.add_argument("--out", default=None, help="folder for the calibrated JSON (default: the report's)")
    p.add_argument("--reps", type=int, default=10, help="timed rounds per op call at most (default 10)")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="stop starting new op calls after this many seconds (default 150)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print("calibrate.py measures on a CUDA GPU and none is visible here; the predictions alone are what "
              "`python -m hrfast inspect` writes", file=sys.stderr)
        return 2
    import triton
    path = Path(args.report)
    report = json.loads(path.read_text())
    start = time.monotonic()
    calibrate(report, args.reps, args.budget_s)
    report["calibration"] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                             "triton": triton.__version__, "cuda": torch.version.cuda, "backends": backends_here(),
                             "seconds": time.monotonic() - start, "command": " ".join(sys.argv)}
    out = Path(args.out) if args.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    target = out / (path.stem + ".calibrated.json")
    target.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
