"""`python -m hrfast inspect`: what hrfast's kernels would do on a GPU, predicted without one.

Records every kernel launch the launchers make for one forward (inference: eval, no grad) or forward and
backward (training: train mode, the loss's gradient as a meta tensor) of a patched reference model on meta
tensors (`opcalls.recording`), groups identical variants, compiles each once per target with Triton's own
compiler (`compile.compile_launch`), and reports per variant the compiler's facts (registers, spills, stack,
shared memory against the architecture's per-block limit, occupancy, SASS per warp in the main loop and
issued per output element) and a predicted time (`model.predict`): max(bytes / achievable bandwidth, dynamic
warp instructions / issue rate, dot FLOPs / peak) + launch, naming the limiter. Per fused op call (each fusion
row and the head): hrfast's kernels plus the ATen ops it runs itself (BN folds, the head's projections, the
backward's GEMMs: `opcalls`), next to the eager ops it replaces and what torch.compile would generate
(`eager`), as predicted ratios. Also the CUDA C++ fusion kernels for the same op calls (`cuda_cpp`).

These are predictions from compiler output and a roofline model (../shared/PERF_METHOD.md), not measurements:
`benchmarks/calibrate.py` measures the same op calls on a GPU and writes measured beside predicted.
Compiles need Triton's real compiler: run without TRITON_INTERPRET. Compiled variants are cached
(`HRFAST_PERF_CACHE`, default ~/.cache/hrfast/perf), so a second run takes seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import arch as arch_table
from . import cuda_cpp, eager, workload
from .arch import Arch, get_arch
from .compile import Compiled, compile_cuda, compile_launch
from .model import dynamic_warp_instructions, launch_failure, occupancy, predict
from .opcalls import BACKWARD, FORWARD, Attribution, OpCall, meta_autocast, recording
from .record import Launch
from .sass import parse_sass

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("inference", "training")
HEADER = ("Predictions from compiler output (Triton / nvcc for the target, ptxas, SASS) and the roofline model "
          "of PERF_METHOD.md: not measurements. No GPU ran this.")
CompileFn = Callable[[Launch, int], Compiled]


@dataclass(frozen=True)
class Config:
    """One configuration to inspect."""

    model: str = "hrnetv2_w48_seg"
    size: Tuple[int, int] = (1024, 2048)
    batch: int = 1
    dtype: str = "fp32"
    channels_last: bool = False
    mode: str = "inference"

    @property
    def training(self) -> bool:
        return self.mode == "training"

    @property
    def stem(self) -> str:
        """The reports' file name without extension."""
        layout = "_cl" if self.channels_last else ""
        return f"{self.model}_{self.size[0]}x{self.size[1]}_b{self.batch}_{self.mode}_{self.dtype}{layout}"


# --------------------------------------------------------------------------------------------- recording


def build(config: Config) -> Tuple[torch.nn.Module, torch.Tensor]:
    """The patched model (backend "triton") and its input, on meta. bf16/fp16 training is the model in that
    dtype: what autocast gives the activations, and the dtypes hrfast's kernels see under autocast."""
    import hrfast
    from hrfast.models import build_model

    with torch.device("meta"):
        model = build_model(config.model)
    hrfast.patch(model, backend="triton")
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(dtype=DTYPES[config.dtype], memory_format=fmt).train(config.training)
    x = torch.empty((config.batch, 3, *config.size), device="meta", dtype=DTYPES[config.dtype])
    return model, x.contiguous(memory_format=fmt)


def record_run(config: Config, arch: Optional[Arch] = None) -> Attribution:
    """The op calls of one inference forward (after an unrecorded one that fills hrfast's caches, as on a GPU
    in steady state) or one training forward and backward; with `arch`, as launched on that GPU (the launchers
    fit their block configurations to its limits, `hrfast.kernels.limits`)."""
    with assumed_limits(arch):
        return _record_run(config)


def assumed_limits(arch: Optional[Arch]):
    """The launchers fit their configurations to `arch`'s limits inside (nothing changes for None)."""
    from hrfast.kernels.limits import DeviceLimits, assume
    return assume(DeviceLimits(shared_per_block=arch.shared_per_block)) if arch else contextlib.nullcontext()


def record_per_arch(config: Config, archs: Sequence[Arch]) -> Dict[str, Attribution]:
    """One recorded run per arch name; archs with the same limits share theirs."""
    by_limit: Dict[int, Attribution] = {}
    for gpu in archs:
        if gpu.shared_per_block not in by_limit:
            by_limit[gpu.shared_per_block] = record_run(config, gpu)
    return {gpu.name: by_limit[gpu.shared_per_block] for gpu in archs}


def _record_run(config: Config) -> Attribution:
    model, x = build(config)
    if not config.training:
        with torch.no_grad(), meta_autocast():
            model(x)
    with recording() as attribution:
        if config.training:
            y = model(x)
            y.backward(torch.empty_like(y))
        else:
            with torch.no_grad():
                model(x)
    return attribution


def variants(launches: Sequence[Launch]) -> Dict[tuple, List[Launch]]:
    """Launches by variant (`Launch.variant_key`), in first-seen order."""
    groups: Dict[tuple, List[Launch]] = {}
    for launch in launches:
        groups.setdefault(launch.variant_key(), []).append(launch)
    return groups


def op_rows(calls: Sequence[OpCall]) -> List[List[OpCall]]:
    """Op calls grouped by signature (identical work), in first-seen order."""
    groups: Dict[tuple, List[OpCall]] = {}
    for call in calls:
        groups.setdefault(call.signature, []).append(call)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------- compiling


def compile_variants(groups: Dict[tuple, List[Launch]], sms: Sequence[int],
                     compile_fn: CompileFn) -> Dict[Tuple[tuple, int], Tuple[Compiled, float]]:
    """(Compiled, seconds it took) per (variant, sm); a cache hit takes milliseconds."""
    result = {}
    for sm in sms:
        for key, launches in groups.items():
            start = time.perf_counter()
            try:
                binary = compile_fn(launches[0], sm)
            except Exception as exc:  # the compiler's own errors are of many types
                raise RuntimeError(f"compiling {launches[0].name} ({key_constexprs(launches[0])}) for sm_{sm} "
                                   f"failed: {exc}") from exc
            result[key, sm] = binary, time.perf_counter() - start
    return result


def compile_sharded(argv: Sequence[str], jobs: int) -> None:
    """Fill the compile cache with `jobs` processes, each compiling every jobs-th variant (then the caller's
    compiles are cache hits)."""
    procs = [subprocess.Popen([sys.executable, "-m", "hrfast", "inspect", *argv, "--compile-shard", f"{i}/{jobs}"])
             for i in range(jobs)]
    failed = [p.args[-1] for p in procs if p.wait() != 0]
    if failed:
        raise RuntimeError(f"compile shards {failed} failed (see their output above)")


# ------------------------------------------------------------------------------------------------ costing


def _main_loop(kernel, trips: Optional[List[float]]) -> Optional[dict]:
    """The loop that issues most instructions: its own SASS per warp per iteration, and where it sits."""
    if not kernel.loops:
        return None
    weights = trips if trips is not None else [1.0] * len(kernel.loops)
    loop, n = max(zip(kernel.loops, weights), key=lambda ln: len(ln[0].body) * ln[1])
    return {"sass_per_warp_iteration": len(loop.body), "depth": loop.depth, "trips_per_program": n,
            "classes": dict(loop.counts)}


def term_launches(launch: Launch) -> Optional[List[Launch]]:
    """A grouped launch as the one-term launches its programs run, or None for any other launch.

    Grouped kernels (kernels/batch_norm.py; the fusion's `_fuse_backward_same_kernel`, whose groups are `rows`)
    take a `terms` parameter, one argument tuple per term ending in the term's program range (start, end) of the
    1-D grid, and per-term constexprs as tuples of the same length. A
    program runs only its own term's copy of the code, while the binary holds every copy: charging each warp the
    whole straight-line SASS would count every term's code K times. Term k's launch is the same kernel with
    that term alone (programs [0, end - start), its constexprs), i.e. the k = 1 case the launcher makes for a
    single fold."""
    params = launch.params
    group = "rows" if "rows" in params else "terms"
    terms = params.get(group)
    if not (isinstance(terms, tuple) and len(terms) > 1
            and all(isinstance(t, tuple) and isinstance(t[-2], int) and isinstance(t[-1], int) for t in terms)):
        return None
    signature = launch.specialization().signature
    per_term = [name for name, value in params.items() if signature.get(name) == "constexpr"
                and isinstance(value, tuple) and len(value) == len(terms)]
    launches = []
    for k, term in enumerate(terms):
        start, end = term[-2], term[-1]
        one = {**params, group: (term[:-2] + (0, end - start),), **{n: (params[n][k],) for n in per_term}}
        launches.append(Launch(launch.fn, (end - start,), (), {**one, **launch.options}))
    return launches


def _issued(arch: Arch, launch: Launch, kernel, trips, compile_fn: "CompileFn") -> Optional[float]:
    """Dynamic warp instructions of the launch: for a grouped launch the sum of its terms' (`term_launches`),
    each from the one-term binary."""
    terms = term_launches(launch)
    if terms is None:
        return None if trips is None else dynamic_warp_instructions(kernel, trips, launch.warps)
    total = 0.0
    for term in terms:
        compiled = compile_fn(term, arch.sm)
        one = parse_sass(compiled.sass)[term.name]
        one_trips = workload.trips_for(term, len(one.loops))
        if one_trips is None:
            return None
        total += dynamic_warp_instructions(one, one_trips, term.warps)
    return total


def kernel_cost(arch: Arch, launch: Launch, compiled: Compiled, compile_fn: "CompileFn" = compile_launch) -> dict:
    """The compiler's facts and the prediction for one launch on `arch` (registers, shared memory and occupancy
    of the launch's own binary; a grouped launch's issue from its terms' binaries, made by `compile_fn`)."""
    kernel = parse_sass(compiled.sass)[launch.name]
    trips = workload.trips_for(launch, len(kernel.loops))
    instructions = _issued(arch, launch, kernel, trips, compile_fn)
    threads = 32 * compiled.num_warps
    occ = occupancy(arch, compiled.registers, threads, compiled.shared)
    flops, unit = workload.dot_flops(launch)
    nbytes = workload.launch_bytes(launch)
    pred = predict(arch, nbytes, instructions or 0.0, tensor_flops=0.0 if unit == "fma" else flops,
                   fma_flops=flops if unit == "fma" else 0.0, tensor_precision="tf32" if unit == "tf32" else "bf16",
                   warps_per_sm=occ.warps_per_sm)
    elements = workload.elements(launch)
    return {"bytes": nbytes, "warp_instructions": instructions, "dot_flops": flops, "dot_unit": unit,
            "elements": elements, "seconds": pred.seconds, "limiter": pred.limiter, "terms": pred.terms,
            "latency_exposed": pred.latency_exposed, "occupancy": occ, "main_loop": _main_loop(kernel, trips),
            "sass_total": len(kernel.instructions),
            "failure": launch_failure(arch, compiled.registers, threads, compiled.shared)}


def _fmt_value(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, tuple):
        if all(isinstance(v, bool) for v in value):
            return "".join(str(int(v)) for v in value)
        return ",".join(_fmt_value(v) for v in value)
    return str(value)


# constexprs left out of row keys at these values: G / FH / FW (the fusion forward's phase form) and PH / PW / PQ
# / COLS (the adjoint's) are off there
_HIDDEN = {"F64": False, "INT64": False, "G": 0, "FH": None, "FW": None, "PH": 0, "PW": 0, "PQ": 0, "COLS": False}
_MODE_LETTERS = {"MODES": "snb", "MODE": "snb"}  # same, nearest, bilinear


def key_constexprs(launch: Launch) -> str:
    """The launch's constexpr arguments, compactly (tuples of flags as bit strings, modes as s/n/b)."""
    signature = launch.specialization().signature
    parts = []
    for name, value in launch.params.items():
        if signature.get(name) != "constexpr" or _HIDDEN.get(name, object()) == value:
            continue
        if name in _MODE_LETTERS:
            value = _mode_letters(_MODE_LETTERS[name], value)
        parts.append(f"{name}={_fmt_value(value)}")
    parts.append(f"warps={launch.options['num_warps']} stages={launch.options['num_stages']}")
    return " ".join(parts)


def _mode_letters(letters: str, value) -> str:
    """Modes as letters: "sbbb" for a row's terms, "sbbb,ssbb" for a grouped launch's rows."""
    if not isinstance(value, tuple):
        return letters[value]
    if value and isinstance(value[0], tuple):
        return ",".join(_mode_letters(letters, v) for v in value)
    return "".join(letters[v] for v in value)


def _sum_terms(costs: Sequence[dict]) -> Dict[str, float]:
    total = Counter()
    for c in costs:
        total.update(c["terms"])
    return dict(total)


def variant_row(arch: Arch, launches: List[Launch], compiled: Compiled, compile_s: float,
                costs: Sequence[dict]) -> dict:
    """One variant on one arch: the compiler's facts once, the work and prediction summed over its launches."""
    first = costs[0]
    known = all(c["warp_instructions"] is not None for c in costs)
    instructions = sum(c["warp_instructions"] for c in costs) if known else None
    elements = sum(c["elements"] or 0 for c in costs)
    terms = _sum_terms(costs)
    nbytes = sum(c["bytes"] for c in costs)
    notes = []
    if not known:
        notes.append("trip counts unknown: issue term left out (time is a lower bound)")
    if first["latency_exposed"]:
        notes.append(f"under {arch_table.LATENCY_BOUND_WARPS} warps/SM: latency exposed, issue term underestimates")
    if max(c["bytes"] for c in costs) <= arch.l2_bytes:
        notes.append("working set fits in L2: freshly written inputs come at L2 speed (memory term pessimistic)")
    return {
        "kernel": launches[0].name, "key": key_constexprs(launches[0]), "launches": len(launches),
        "programs": sum(l.programs for l in launches), "num_warps": compiled.num_warps,
        "registers": compiled.registers, "spill_stores": compiled.spill_stores, "spill_loads": compiled.spill_loads,
        "stack": compiled.stack, "shared": compiled.shared, "shared_limit": arch.shared_per_block,
        "launch_failure": first["failure"], "warps_per_sm": first["occupancy"].warps_per_sm,
        "occupancy_limiter": first["occupancy"].limiter, "main_loop": first["main_loop"],
        "sass_total": first["sass_total"], "warp_instructions": instructions,
        "instructions_per_element": instructions / elements if instructions is not None and elements else None,
        "bytes": nbytes, "dot_flops": sum(c["dot_flops"] for c in costs), "dot_unit": first["dot_unit"],
        "terms_s": terms, "limiter": max(terms, key=terms.get),
        "predicted_s": sum(c["seconds"] for c in costs), "compile_s": compile_s, "notes": notes,
        "per_launch": [{"grid": list(l.grid), **{k: c[k] for k in _PER_LAUNCH}} for l, c in zip(launches, costs)],
    }


_PER_LAUNCH = ("bytes", "warp_instructions", "elements", "dot_flops", "seconds", "limiter", "terms")


# ----------------------------------------------------------------------------------------------- op calls


def _term_text(shape, term) -> str:
    mode = "same" if term.mode == 0 else ("nearest" if term.mode == 1 else "bilinear")
    where = "" if term.mode == 0 else f" {shape[2]}x{shape[3]}"
    return mode + where + ("+BN" if term.has_scale else "")


def describe(call: OpCall) -> str:
    """A fusion row or head call in words."""
    if call.kind == "fuse":
        c = call.inputs[0][1]
        terms = ", ".join(_term_text(s, t) for s, t in zip(call.inputs, call.plan.terms))
        return f"fuse C={c} {call.plan.size[0]}x{call.plan.size[1]} <- [{terms}]"
    x0 = call.inputs[0]
    lows = "+".join(str(s[1]) for s in call.inputs)
    return f"head {lows} ch at {x0[2]}x{x0[3]} -> M={call.extra['M']} -> K={call.extra['K']}"


def replaced_ops(call: OpCall, training: bool) -> Tuple[dict, dict]:
    """(eager ops, torch.compile ops) the call stands for, by phase."""
    if call.kind == "fuse":
        args = (call.plan, call.inputs, call.dtype, training)
        return eager.eager_fuse(*args), eager.compiled_fuse(*args)
    args = (call.inputs, call.extra["M"], call.extra["K"], call.dtype, training)
    return eager.eager_head(*args), eager.compiled_head(*args)


def _phase_seconds(arch: Arch, ops_by_phase: dict) -> Dict[str, float]:
    return {phase: eager.seconds(arch, ops) for phase, ops in ops_by_phase.items()}


def _ops_json(ops_by_phase: dict) -> dict:
    return {p: [dataclasses.asdict(o, dict_factory=_json_dict) for o in ops] for p, ops in ops_by_phase.items()}


def op_call_work(calls: List[OpCall], training: bool) -> dict:
    """What one group of identical op calls runs, on any arch: hrfast's kernels and ATen ops, and the eager and
    torch.compile ops it replaces (bytes, FLOPs)."""
    call = calls[0]
    eager_ops, compiled_ops = replaced_ops(call, training)
    return {"op": describe(call), "kind": call.kind, "calls": len(calls),
            "kernel_launches": {p: [l.name for l in call.launches[p]] for p in (FORWARD, BACKWARD)},
            "hrfast_aten_ops": _ops_json(call.ops), "eager_ops": _ops_json(eager_ops),
            "compile_ops": _ops_json(compiled_ops)}


def op_row(arch: Arch, calls: List[OpCall], launch_s: Dict[int, float], failing: set, training: bool) -> dict:
    """One group of identical op calls on one arch: per call, hrfast (kernels + its own ATen ops) vs eager and
    torch.compile, by phase; ratios > 1 mean hrfast is predicted faster. `failing`: ids of launches that
    cannot launch on `arch` (their op call is flagged)."""
    call = calls[0]
    launches = call.launches[FORWARD] + call.launches[BACKWARD]
    kernels = {p: sum(launch_s[id(l)] for l in call.launches[p]) for p in (FORWARD, BACKWARD)}
    glue = _phase_seconds(arch, call.ops)
    in_op = _phase_seconds(arch, {p: [o for o in ops if o.in_op] for p, ops in call.ops.items()})
    eager_ops, compiled_ops = replaced_ops(call, training)
    eager_s, compile_s = _phase_seconds(arch, eager_ops), _phase_seconds(arch, compiled_ops)
    hrfast_s = sum(kernels.values()) + sum(glue.values())
    # None: a row of a training step whose shared launches sit in the step's first row (`opcalls`): only the
    # totals compare like for like
    return {"op": describe(call), "kind": call.kind, "calls": len(calls), "kernels_s": kernels, "glue_s": glue,
            "glue_in_op_s": in_op, "hrfast_s": hrfast_s, "eager_s": eager_s, "compile_s": compile_s,
            "ratio_eager": sum(eager_s.values()) / hrfast_s if hrfast_s else None,
            "ratio_compile": sum(compile_s.values()) / hrfast_s if hrfast_s else None,
            "cannot_launch": sorted({l.name for l in launches if id(l) in failing})}


def _json_dict(items) -> dict:
    return {k: str(v) if isinstance(v, torch.dtype) else v for k, v in items}


def _summed(rows: Sequence[dict], key: str) -> float:
    """Sum over rows of calls x the per-call figure (summed over phases when by phase)."""
    return sum(r["calls"] * (sum(r[key].values()) if isinstance(r[key], dict) else r[key]) for r in rows)


def totals(rows: Sequence[dict]) -> dict:
    """Every op call of the run summed, and per kind ("fuse", "head"), with the predicted ratios."""
    def summary(part):
        out = {key: _summed(part, key) for key in ("kernels_s", "glue_s", "hrfast_s", "eager_s", "compile_s")}
        out["ratio_eager"] = out["eager_s"] / out["hrfast_s"]
        out["ratio_compile"] = out["compile_s"] / out["hrfast_s"]
        return out

    result = {"all": summary(rows)} if rows else {}
    for kind in ("fuse", "head"):
        part = [r for r in rows if r["kind"] == kind]
        if part:
            result[kind] = summary(part)
    return result


# ----------------------------------------------------------------------------------------------- CUDA C++


def cuda_compiled(sm: int) -> Dict[str, Compiled]:
    """csrc/fuse_cuda.cu's kernels compiled for sm_<sm> with the extension's flags (cached)."""
    return compile_cuda(str(cuda_cpp.CSRC), sm, cuda_cpp.compile_flags())


def cuda_launch_row(arch: Arch, op: str, launch: cuda_cpp.CudaLaunch, name: str, compiled: Compiled) -> dict:
    """One modelled CUDA C++ launch: compiler facts, issued instructions per element (an upper bound for the
    generic kernels, see workload.CUDA_KERNELS), prediction."""
    kernel = parse_sass(compiled.sass)[name]
    trips = workload.CUDA_KERNELS[launch.kernel].trips(launch.params)
    known = len(trips) == len(kernel.loops)
    instructions = dynamic_warp_instructions(kernel, trips, launch.warps) if known else None
    threads = cuda_cpp.BLOCK_X * cuda_cpp.BLOCK_Y
    occ = occupancy(arch, compiled.registers, threads, compiled.shared)
    pred = predict(arch, launch.bytes, instructions or 0.0, warps_per_sm=occ.warps_per_sm)
    elements = launch.params["elements"]
    return {"op": op, "kernel": launch.kernel, "phase": launch.phase, "registers": compiled.registers,
            "spill_stores": compiled.spill_stores, "spill_loads": compiled.spill_loads, "stack": compiled.stack,
            "shared": compiled.shared, "warps_per_sm": occ.warps_per_sm, "occupancy_limiter": occ.limiter,
            "launch_failure": launch_failure(arch, compiled.registers, threads, compiled.shared),
            "sass_total": len(kernel.instructions), "warp_instructions": instructions,
            "instructions_per_element": instructions / elements if known else None,
            "thread_instructions_per_element": instructions * 32 / elements if known else None,
            "bytes": launch.bytes, "predicted_s": pred.seconds, "limiter": pred.limiter, "terms_s": pred.terms,
            "notes": [] if known else ["trip counts unknown: issue term left out"]}


def cuda_section(arch: Arch, groups: List[List[OpCall]], training: bool,
                 compiled: Dict[str, Compiled]) -> dict:
    """The CUDA C++ fusion kernels for every fusion op call group, per launch and per op call."""
    rows, per_op = [], []
    for calls in groups:
        call = calls[0]
        if call.kind != "fuse":
            continue
        mine = []
        for launch in cuda_cpp.launches(call, training):
            name = cuda_cpp.mangled_name(list(compiled), launch.kernel, call.dtype)
            mine.append(cuda_launch_row(arch, describe(call), launch, name, compiled[name]))
        rows += mine
        per_op.append({"op": describe(call), "calls": len(calls), "kernels_s": sum(r["predicted_s"] for r in mine)})
    return {"launches": rows, "op_calls": per_op,
            "note": "modelled launches (C++ launchers); instruction counts of the generic kernels (ForwardKernel, "
                    "the generic AdjointKernel) are upper bounds (every resample mode's code counted per term), the "
                    "tiled ones resolve the modes at compile time; kernels only, the binding's partial-sum "
                    "reductions left out"}


# ------------------------------------------------------------------------------------------------ analyse


def analyse(config: Config, attribution: Union[Attribution, Dict[str, Attribution]], archs: Sequence[Arch],
            compile_fn: CompileFn = compile_launch,
            cuda_fn: Optional[Callable[[int], Dict[str, Compiled]]] = cuda_compiled) -> dict:
    """The report (JSON-able) of each of `archs`, from one recorded run for all or one per arch name
    (`record_per_arch`: the launchers may choose other configurations for another arch's limits)."""
    runs = attribution if isinstance(attribution, dict) else {a.name: attribution for a in archs}
    first = runs[archs[0].name]
    rows = op_rows(first.calls)
    report = {"header": HEADER, "config": dataclasses.asdict(config), "versions": versions(),
              "constants": constants(archs), "method": METHOD,
              "recorded": {"launches": len(first.launches), "variants": len(variants(first.launches)),
                           "op_calls": len(first.calls), "distinct_op_calls": len(rows)},
              "op_calls": [op_call_work(calls, config.training) for calls in rows], "archs": {}}
    for gpu in archs:
        groups = variants(runs[gpu.name].launches)
        compiled = compile_variants(groups, [gpu.sm], compile_fn)
        report["archs"][gpu.name] = arch_report(gpu, config, groups, compiled, op_rows(runs[gpu.name].calls),
                                                cuda_fn, compile_fn)
    return report


def arch_report(gpu: Arch, config: Config, groups: Dict[tuple, List[Launch]], compiled: dict,
                rows: List[List[OpCall]], cuda_fn, compile_fn: CompileFn = compile_launch) -> dict:
    launch_s, failing, variant_rows = {}, set(), []
    for key, launches in groups.items():
        binary, seconds = compiled[key, gpu.sm]
        costs = [kernel_cost(gpu, launch, binary, compile_fn) for launch in launches]
        launch_s.update((id(l), c["seconds"]) for l, c in zip(launches, costs))
        failing.update(id(l) for l, c in zip(launches, costs) if c["failure"])
        variant_rows.append(variant_row(gpu, launches, binary, seconds, costs))
    op_calls = [op_row(gpu, calls, launch_s, failing, config.training) for calls in rows]
    cuda = _cuda_or_reason(gpu, rows, config.training, cuda_fn)
    triton_kernels = {r["op"]: sum(r["kernels_s"].values()) for r in op_calls}
    for row in cuda.get("op_calls", ()):
        row["triton_kernels_s"] = triton_kernels[row["op"]]
    return {"arch": dataclasses.asdict(gpu), "sm": gpu.sm, "variants": variant_rows, "op_calls": op_calls,
            "compile_s_total": sum(r["compile_s"] for r in variant_rows), "totals": totals(op_calls), "cuda_cpp": cuda}


def _cuda_or_reason(gpu: Arch, rows, training: bool, cuda_fn) -> dict:
    if cuda_fn is None:
        return {"skipped": "not requested (--no-cuda)"}
    try:
        compiled = cuda_fn(gpu.sm)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        return {"skipped": f"nvcc could not compile csrc/fuse_cuda.cu: {str(exc)[:400]}"}
    return cuda_section(gpu, rows, training, compiled)


def versions() -> dict:
    import triton
    return {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]}


def constants(archs: Sequence[Arch]) -> dict:
    """The model's constants and the architectures' figures, as used (arch.py, from PERF_METHOD.md)."""
    return {"achievable_hbm_fraction": arch_table.ACHIEVABLE_HBM_FRACTION,
            "issues_per_sm_per_cycle": arch_table.ISSUES_PER_SM_PER_CYCLE,
            "launch_seconds": arch_table.LAUNCH_SECONDS,
            "conv_tensor_efficiency": arch_table.CONV_TENSOR_EFFICIENCY,
            "latency_bound_warps": arch_table.LATENCY_BOUND_WARPS,
            "archs": {a.name: dataclasses.asdict(a) for a in archs}}


METHOD = {
    "time": "predicted = max(bytes / (0.87 x HBM peak), dynamic warp instructions / (SMs x 4 x clock), dot FLOPs / "
            "peak of their unit) + 4 us per launch; the limiter is the largest term",
    "bytes": " ".join(workload.__doc__.split("Bytes are counted in `launch_bytes`: ")[1].split()),
    "instructions": "SASS from cuobjdump of the very cubin (sass.py); loops found by backward branches; dynamic "
                    "warp instructions = warps launched x (straight-line part + each loop's own body x its trips); "
                    "trips from the table in hrfast/perf/workload.py (functions of the launch's arguments); "
                    "instructions_per_element = dynamic warp instructions / output elements",
    "dots": "tl.dot FLOPs at the executed tile shapes (padding included): bf16/fp16 at the dense tensor-core "
            "peak, fp32 with input_precision='ieee' at the FMA peak",
    "hrfast": "kernels (predicted as above) + the ATen ops hrfast runs itself for the op call (BN folds, the "
              "head's projections, the launchers' partial sums, the head backward's GEMMs), recorded on meta "
              "tensors and costed like eager ops",
    "eager_and_compile": eager.__doc__.split("\n\n", 1)[1].strip(),
}


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from hrfast.models import list_models

    p = argparse.ArgumentParser(prog="python -m hrfast inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list_models(), default=Config.model, metavar="NAME",
                   help=f"a name of hrfast.models.list_models() (default {Config.model})")
    p.add_argument("--size", type=int, nargs=2, default=list(Config.size), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=Config.batch)
    p.add_argument("--dtype", choices=tuple(DTYPES), default=Config.dtype)
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    p.add_argument("--mode", choices=MODES, default=Config.mode)
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], metavar="ARCH",
                   help="targets: " + ", ".join([*arch_table.ALIASES, *arch_table.ARCHS]) + " (default sm_80 sm_90)")
    p.add_argument("--out", default=None, metavar="DIR", help="write <DIR>/<config>.json and .md")
    p.add_argument("--no-cuda", action="store_true", help="leave out the CUDA C++ kernels (no nvcc run)")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    p.add_argument("--compile-shard", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.size) < 1 or args.batch < 1 or args.jobs < 1:
        p.error("--size, --batch and --jobs must be positive")
    try:
        args.archs = [get_arch(a) for a in args.arch]
    except ValueError as exc:
        p.error(str(exc))
    return args


def config_of(args: argparse.Namespace) -> Config:
    return Config(args.model, tuple(args.size), args.batch, args.dtype, args.channels_last, args.mode)


def _shard(spec: str, config: Config, archs: Sequence[Arch]) -> int:
    index, count = (int(v) for v in spec.split("/"))
    runs = record_per_arch(config, archs)
    work = {}  # (variant, sm) -> its first launch
    for gpu in archs:
        for key, launches in variants(runs[gpu.name].launches).items():
            work.setdefault((key, gpu.sm), launches[0])
    for (_, sm), launch in list(work.items())[index::count]:
        compile_launch(launch, sm)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("python -m hrfast inspect compiles with Triton's real compiler: run it without TRITON_INTERPRET=1",
              file=sys.stderr)
        return 2
    config = config_of(args)
    if args.compile_shard:
        return _shard(args.compile_shard, config, args.archs)
    if args.jobs > 1:
        compile_sharded(argv, args.jobs)
    from . import report as render

    start = time.perf_counter()
    result = analyse(config, record_per_arch(config, args.archs), args.archs,
                     cuda_fn=None if args.no_cuda else cuda_compiled)
    result["command"] = "python -m hrfast inspect " + " ".join(argv)
    result["wall_s"] = time.perf_counter() - start
    print(render.terminal(result))
    if args.out:
        for path in render.write(result, Path(args.out), config.stem):
            print(f"wrote {path}")
    return 0
