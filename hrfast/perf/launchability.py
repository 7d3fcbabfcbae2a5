"""Launchability: every block configuration hrfast's Triton launchers choose for real HRNets launches on sm_80
and sm_90, and every distinct code path of the kernels compiles. Needs no GPU; run without TRITON_INTERPRET:

    python -m hrfast.perf.launchability [--arch sm_80 sm_90] [--jobs 2]

Configurations: the reference models of `MODELS` at SIZE, batch BATCH, inference and training, fp32 / fp16 /
bf16, NCHW and channels_last, recorded on meta tensors (`inspect.record_run`) per target, the launchers fitting
their configurations to its limits (`hrfast.kernels.limits.assume`), so the launches are those a GPU of that
architecture gets. Each distinct variant (`Launch.variant_key`: the very binary) is compiled for the target
with Triton's compiler (`compile.compile_launch`, cached) and checked:

- `shared`: shared memory within the architecture's per-block limit; for the head kernels also within the
  bound their launcher chose the configuration by (`hrfast.kernels.head.shared_bound`), which must hold on
  every device, not just these two;
- `launch`: registers and threads within the per-block limits (`model.launch_failure`);
- `spills`: no spill instructions (LDL/STL) where the kernel spends its time: in a loop, or anywhere in a
  kernel without loops (spills in a prologue run once);
- `occupancy`: at least LATENCY_BOUND_WARPS warps per SM for the memory-bound kernels (MEMORY_BOUND: they
  stream bytes and hide latency with warps in flight; the head kernels are issue- and dot-bound);
- `trips`: the instrument's trip table (`workload.KERNELS`) gives one trip count per loop of the binary's SASS
  (else its reports leave the kernel's issue term out: a prediction too low).

`spills` and `occupancy` findings may be excepted in EXCEPTIONS, each with its reason; `shared`, `launch` and
`trips` cannot be. Code paths (`codepaths`: float64, nearest / align_corners, odd sizes, many terms, 64-bit offsets)
are compiled once each unless a configuration above has covered them, and checked for `shared` and `launch`.
Prints the findings and a summary line; exit status 1 on any finding that is not excepted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .arch import LATENCY_BOUND_WARPS, Arch, get_arch
from .compile import Compiled, compile_launch
from .model import launch_failure, occupancy
from .record import Launch
from .sass import parse_sass

MODELS = ("hrnetv2_w18_seg", "hrnetv2_w48_seg")
SIZE = (512, 1024)
BATCH = 2
DTYPES = ("fp32", "fp16", "bf16")
MODES = ("inference", "training")
HEAD_KERNELS = ("_head_stats_kernel", "_head_forward_kernel", "_head_backward_reduce_kernel",
                "_head_backward_ds_kernel")
MEMORY_BOUND = ("_fuse_forward_kernel", "_fuse_forward_rows_kernel", "_fuse_backward_same_kernel",
                "_upsample_adjoint_kernel", "_adjoint_row_kernel", "_adjoint_rows_kernel")

_HEAD_SPILLS = ("the head's tile kernels (issue 14) hold the x0 tile, the interpolation matrices and several dot "
                "results per chunk; fp32's 3xTF32 dots triple the operands and still spill somewhere (Triton 3.8, "
                "W18 / W48 at 512x1024)")
# per kernel what still spills (bytes of spill stores, Triton 3.8, W18 / W48 at 512x1024, NCHW and channels_last);
# the forward has no spill in its loop in any dtype (fp32 since U exact in tf32 runs unsplit: 0-68 B outside it)
_HEAD_SPILLING = {
    "_head_backward_reduce_kernel": "W48 none on sm_90 (every dtype; the exact gathers in a launch of their own); "
                                    "W18 sm_90 bf16 NCHW 8 B, fp32 channels_last 152 B (the transposed chunk on "
                                    "4x8 tiles: the loop-invariant operands as wgmma's B, in shared memory, their "
                                    "descriptors in registers); sm_80 fp32 (the row form: 3xTF32 split by hand, "
                                    "those operands held in registers, mma.sync) 440-664 B, bf16 / fp16 none; the "
                                    "exact gathers' launch (8 warps, 1 stage, no trips on finite inputs): sm_80 W18 "
                                    "bf16 / fp16 channels_last 4 B",
    "_head_backward_ds_kernel": "bf16 (fused) sm_90 W48 none, W18 12 B (in the tile loop's own code, the "
                                "chunk loops spill-free), sm_80 120-272 B (11-22 spill instructions per dense "
                                "chunk); fp32 (writing ds, one stage; the exact gathers in a launch of their own) "
                                "sm_90 W48 none, W18 16-20 B, sm_80 none",
}
# (kernel, check) -> why the finding is accepted for now
EXCEPTIONS: Dict[Tuple[str, str], str] = {(name, "spills"): f"{_HEAD_SPILLS}: {_HEAD_SPILLING[name]}"
                                          for name in _HEAD_SPILLING}


@dataclass
class Finding:
    """One check a variant fails on one target."""

    check: str  # "shared", "launch", "spills", "occupancy", "trips" or "compile"
    kernel: str
    sm: int
    key: str  # the variant's constexprs
    detail: str
    recorded_in: str  # the first configuration (or "code paths") that launched it
    excepted: Optional[str] = None  # EXCEPTIONS' reason, when excepted


# ------------------------------------------------------------------------------------------------ checks


def spills_where_it_runs(compiled: Compiled) -> Optional[str]:
    """Where the binary's spill instructions cost: in its loops, or (no loops) anywhere; None if nowhere."""
    if not compiled.spill_stores and not compiled.spill_loads:
        return None
    kernel = parse_sass(compiled.sass)[compiled.name]
    facts = f"{compiled.spill_stores} B spill stores, {compiled.spill_loads} B spill loads"
    if not kernel.loops:
        return f"{facts} in a kernel without loops"
    local = sum(loop.counts["LDL"] + loop.counts["STL"] for loop in kernel.loops)
    return f"{facts}, {local} LDL/STL instructions in its loops" if local else None


def check(arch: Arch, launch: Launch, compiled: Compiled, performance: bool = True) -> List[Tuple[str, str]]:
    """(check, detail) for every rule the variant breaks on `arch`; `performance`: spills and occupancy too."""
    found = []
    threads = 32 * compiled.num_warps
    failure = launch_failure(arch, compiled.registers, threads, compiled.shared)
    if failure:
        found.append(("shared" if "shared memory" in failure else "launch", failure))
    if launch.name in HEAD_KERNELS:
        from hrfast.kernels.head import shared_bound
        bound = shared_bound(launch.name, launch.params, launch.options["num_stages"])
        if compiled.shared > bound:
            found.append(("shared", f"needs {compiled.shared:,} B of shared memory, over the {bound:,} B its "
                                    "launcher chose the configuration by (kernels/head.py shared_bound)"))
    if performance:
        spills = spills_where_it_runs(compiled)
        if spills:
            found.append(("spills", spills))
        warps = occupancy(arch, compiled.registers, threads, compiled.shared).warps_per_sm
        if launch.name in MEMORY_BOUND and warps < LATENCY_BOUND_WARPS:
            found.append(("occupancy", f"{warps} warps per SM (memory-bound: at least {LATENCY_BOUND_WARPS})"))
        mismatch = trip_mismatch(launch, compiled)
        if mismatch:
            found.append(("trips", mismatch))
    return found


def trip_mismatch(launch: Launch, compiled: Compiled) -> Optional[str]:
    """Why the trip table cannot price the binary's loops (`workload.KERNELS`), or None where it can."""
    from .workload import KERNELS
    work = KERNELS.get(launch.name)
    kernel = parse_sass(compiled.sass).get(compiled.name)
    if work is None or kernel is None:
        return None
    loops = len(kernel.loops)
    trips = len(work.trips(launch.params))
    if trips == loops:
        return None
    return (f"the trip table gives {trips} trip counts for the {loops} loops of its SASS (hrfast/perf/workload.py): "
            "the reports leave its issue term out")


# ------------------------------------------------------------------------------------------------ recording


def configurations(models: Sequence[str], dtypes: Sequence[str]):
    from .inspect import Config
    return [Config(model, SIZE, BATCH, dtype, channels_last, mode)
            for model in models for mode in MODES for dtype in dtypes for channels_last in (False, True)]


def record_configurations(arch: Arch, models: Sequence[str], dtypes: Sequence[str]) -> Dict[tuple, tuple]:
    """(first launch, configuration) per distinct variant, as launched on `arch`."""
    from .inspect import record_run
    variants: Dict[tuple, tuple] = {}
    for config in configurations(models, dtypes):
        for launch in record_run(config, arch).launches:
            variants.setdefault(launch.variant_key(), (launch, config.stem))
    return variants


def record_code_paths(arch: Arch, covered: Iterable[Launch]) -> List[Launch]:
    """One launch per code path of `codepaths.record_cases` that no launch of `covered` has."""
    from .codepaths import code_path_key, record_cases
    from .inspect import assumed_limits
    with assumed_limits(arch):
        launches = record_cases()
    seen = {code_path_key(launch) for launch in covered}
    result = []
    for launch in launches:
        key = code_path_key(launch)
        if key not in seen:
            seen.add(key)
            result.append(launch)
    return result


# ----------------------------------------------------------------------------------------------------- run


def _findings(arch: Arch, launch: Launch, where: str, performance: bool) -> List[Finding]:
    from .inspect import key_constexprs
    key = key_constexprs(launch)
    try:
        compiled = compile_launch(launch, arch.sm, sass=False)
    except Exception as exc:  # the compiler's own errors are of many types
        return [Finding("compile", launch.name, arch.sm, key, f"{type(exc).__name__}: {exc}"[:4000], where)]
    return [Finding(name, launch.name, arch.sm, key, detail, where, EXCEPTIONS.get((launch.name, name)))
            for name, detail in check(arch, launch, compiled, performance)]


def run_arch(arch: Arch, models: Sequence[str], dtypes: Sequence[str], code_paths: bool = True) -> dict:
    """Record, compile and check everything for one target (JSON-able)."""
    start = time.perf_counter()
    variants = record_configurations(arch, models, dtypes)
    extra = record_code_paths(arch, [launch for launch, _ in variants.values()]) if code_paths else []
    recorded_s = time.perf_counter() - start
    findings = [f for launch, where in variants.values() for f in _findings(arch, launch, where, True)]
    findings += [f for launch in extra for f in _findings(arch, launch, "code paths", False)]
    return {"sm": arch.sm, "variants": len(variants), "code_paths": len(extra),
            "findings": [asdict(f) for f in findings], "record_s": recorded_s,
            "seconds": time.perf_counter() - start}


def _run_children(argv: Sequence[str], archs: Sequence[str]) -> List[dict]:
    """One process per target, concurrently (each compiles its own variants): their JSON results."""
    command = [sys.executable, "-m", "hrfast.perf.launchability", *argv, "--json", "--arch"]
    procs = [subprocess.Popen([*command, name], stdout=subprocess.PIPE, text=True) for name in archs]
    results = []
    for name, proc in zip(archs, procs):
        out, _ = proc.communicate()
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"the launchability run for {name} failed (exit {proc.returncode})")
        results.extend(json.loads(out.strip().splitlines()[-1]))
    return results


def report(results: Sequence[dict], seconds: float) -> Tuple[str, int]:
    """The findings as text, a summary line, and the exit status (1 if any finding is not excepted)."""
    lines, failed, reasons = [], 0, {}
    for result in results:
        for f in result["findings"]:
            failed += not f["excepted"]
            if f["excepted"]:
                reasons.setdefault((f["kernel"], f["check"]), f["excepted"])
            lines.append(f"{'excepted' if f['excepted'] else 'FAILS'}: sm_{f['sm']} {f['kernel']} [{f['key']}] "
                         f"({f['recorded_in']}): {f['check']}: {f['detail']}")
    lines += [f"exception ({kernel}, {name}): {reason}" for (kernel, name), reason in reasons.items()]
    excepted = sum(bool(f["excepted"]) for r in results for f in r["findings"])
    variants = sum(r["variants"] for r in results)
    paths = sum(r["code_paths"] for r in results)
    targets = " ".join(f"sm_{r['sm']}" for r in results)
    lines.append(f"launchability: {variants} configuration variants and {paths} further code paths for {targets}: "
                 f"{failed} failing, {excepted} excepted findings, {seconds:.0f} s")
    return "\n".join(lines), int(failed > 0)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrfast.perf.launchability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], help="targets (default sm_80 sm_90)")
    p.add_argument("--model", nargs="+", default=list(MODELS), help=f"models (default {' '.join(MODELS)})")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--no-code-paths", action="store_true", help="only the model configurations")
    p.add_argument("--jobs", type=int, default=1, help="targets checked concurrently, one process each")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line instead")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("launchability compiles with Triton's real compiler: run it without TRITON_INTERPRET=1",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.jobs > 1 and len(args.arch) > 1:
        common = ["--model", *args.model, "--dtype", *args.dtype, *(["--no-code-paths"] if args.no_code_paths else [])]
        results = _run_children(common, args.arch)
    else:
        results = [run_arch(get_arch(name), args.model, args.dtype, not args.no_code_paths) for name in args.arch]
    text, status = report(results, time.perf_counter() - start)
    print(json.dumps(results) if args.json else text)
    return status


if __name__ == "__main__":
    sys.exit(main())
