"""`python -m hrfast bench`: a whole HRNet model, unpatched vs `hrfast.patch`-ed, timed side by side in one run.

Contenders: eager PyTorch (the unpatched model), torch.compile of it, hrfast (a patched copy), and hrfast under
torch.compile; optionally compile with max-autotune. Modes: inference (eval, no grad) and a training step
(train mode, forward, cross-entropy loss against random labels, backward; no optimizer step). Dtypes: fp32
(TF32 off) and bf16: inference bf16 converts the model and input to bfloat16; training bf16 is
`torch.autocast(bfloat16)` over an fp32 model.

Every figure printed or written is measured in this run: the median of interleaved repetitions (each round
runs every contender once, rotating three input buffers), the peak memory one step allocates above what was
already allocated (CUDA only), and each contender's relative error against the same model, unpatched, in
float64 on the same input (output, and in training every parameter gradient), next to the unpatched model's
own error. The checks: the hrfast-patched model in float64 matches the unpatched one within 1e-10 (the
fused ops compute the same function), and in inference each contender's error stays within the tests' rule:
fp32 within max(1e-5, 2x eager's error), bf16 within 2x eager's error. Training gradients in fp32/bf16 are
ill-conditioned for a whole model (eager's own fp32 error is ~1e-3 and moves with summation order), so there
the float64 comparison decides and the low-precision errors are shown for information.

On a GPU the default is HRNetV2-W48 segmentation: inference at 1024x2048 batch 1, training at 512x1024 batch 8
(the shapes of DESIGN.md). On CPU the default is a small model and size that run in about a minute, without
the torch.compile contenders (compiling a whole HRNet with inductor on CPU takes minutes; add them with
``--contenders all``), and ``backend='auto'`` runs hrfast's PyTorch reference path (Triton needs a GPU): CPU
ratios compare two PyTorch programs, not kernels.

Writes ``<out>/bench_<model>_<device>_<time>.json`` (device, versions, arguments, every measurement) and a
PNG chart of it when matplotlib is installed (``pip install -e ".[bench]"``).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import ALIASES, BACKENDS
from .timing import synchronize, time_interleaved

CONTENDERS = ("eager", "compile", "hrfast", "hrfast-compile", "compile-max-autotune")
DEFAULT_CONTENDERS = ("eager", "compile", "hrfast", "hrfast-compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("inference", "train")
GPU_MODEL = "hrnetv2_w48_seg"
GPU_SHAPES = {"inference": ((1024, 2048), 1), "train": ((512, 1024), 8)}
CPU_MODEL = "hrnetv2_w18_small_v1_seg"
CPU_SHAPE = ((128, 256), 1)
OTHER_SIZES = {"cls": (224, 224), "face": (256, 256), "pose": (256, 192)}
HEATMAP_TASKS = ("face", "pose")  # trained against heatmaps (MSE), the others against class labels
N_INPUTS = 3
FP64_BUDGET = 1e-10  # hrfast-patched vs unpatched model, both float64 (tests measure <= 1e-13)


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrfast bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from .models import list_models

    p.add_argument("--model", choices=list_models(), default=None, metavar="NAME",
                   help=f"a name of hrfast.models.list_models() (default {GPU_MODEL} on a GPU, {CPU_MODEL} on CPU)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input image size (default on a GPU: 1024 2048 inference, 512 1024 training; "
                        f"CPU: {CPU_SHAPE[0][0]} {CPU_SHAPE[0][1]})")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default on a GPU: 1 inference, 8 training; CPU: 1)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    p.add_argument("--mode", choices=("inference", "train", "both"), default="both")
    p.add_argument("--backend", choices=(*BACKENDS, *ALIASES), default="auto",
                   help="hrfast's backend (auto: Triton on CUDA, the PyTorch reference on CPU)")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    p.add_argument("--no-inference", action="store_true",
                   help="patch without hrfast's inference mode (hrfast.patch(..., inference=False): the fused "
                        "fusion / head ops only); by default the hrfast contenders use it (eval-only: BN folded "
                        "into the convs, residual epilogues, layout by measurement; training is unchanged)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) for the whole run (default: torch's own, one per core); "
                        "recorded in the JSON and printed")
    p.add_argument("--contenders", default=None,
                   help=f"comma-separated subset of {','.join(CONTENDERS)}, or 'all' "
                        f"(= {','.join(DEFAULT_CONTENDERS)}); default all on a GPU, eager,hrfast on CPU")
    p.add_argument("--no-compile", action="store_true", help="drop the torch.compile contenders")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20 on a GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls after the first (default 3 on a GPU, 0 on CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default="bench-results", help="folder for the JSON and PNG (default ./bench-results)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be at least 0")
    if args.size is not None and min(args.size) < 1:
        p.error("--size must be positive")
    return args


def _contenders(spec: Optional[str], no_compile: bool, on_gpu: bool) -> Tuple[str, ...]:
    if spec is None:
        chosen = DEFAULT_CONTENDERS if on_gpu else ("eager", "hrfast")
    elif spec.strip() == "all":
        chosen = DEFAULT_CONTENDERS
    else:
        chosen = tuple(c.strip() for c in spec.split(",") if c.strip())
        bad = [c for c in chosen if c not in CONTENDERS]
        if bad or not chosen:
            raise SystemExit(f"python -m hrfast bench: unknown contender(s) {bad or spec!r}; choose from "
                             f"{', '.join(CONTENDERS)} or 'all'")
    if no_compile:
        chosen = tuple(c for c in chosen if "compile" not in c)
    if "eager" not in chosen:
        chosen = ("eager",) + chosen  # every ratio is against eager, measured in the same run
    return tuple(dict.fromkeys(chosen))


# ------------------------------------------------------------------------------------------ measurement


def _numbered(step: Callable[[int], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """step(0), step(1), ... on successive calls: the timed rounds rotate the input buffers."""
    counter = itertools.count()
    return lambda: step(next(counter))


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """What one call allocates at its peak above what was allocated before it (CUDA); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten().cpu()
                      for p in model.parameters()])


def _calibrate(model: nn.Module, x: torch.Tensor, seed: int) -> None:
    """Weights and BN state on the scale of a trained network's rather than upstream's init (conv weights
    N(0, 0.001), BN 1/0/0/1): He-normal conv weights, random BN affine, and running statistics set from one
    train-mode pass on `x` (so eval activations are normalised, not vanishing or exploding)."""
    gen = torch.Generator().manual_seed(seed + 1)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                w = torch.empty(m.weight.shape)
                nn.init.kaiming_normal_(w, nonlinearity="relu", generator=gen)
                m.weight.copy_(w)
        for m in norms:
            m.weight.copy_(torch.empty(m.weight.shape).uniform_(0.5, 1.5, generator=gen))
            m.bias.copy_(torch.empty(m.bias.shape).normal_(0.0, 0.2, generator=gen))
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.momentum = 1.0
        model.train()
        model(x)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.zero_()


def _loss_fn(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if task in HEATMAP_TASKS:
        return lambda out, target: F.mse_loss(out.float(), target)
    return lambda out, target: F.cross_entropy(out.float(), target)


def _targets(task: str, out_shape: Sequence[int], count: int, device, gen: torch.Generator) -> List[torch.Tensor]:
    if task in HEATMAP_TASKS:
        return [torch.rand(tuple(out_shape), generator=gen).to(device) for _ in range(count)]
    n, k = out_shape[0], out_shape[1]
    return [torch.randint(0, k, (n, *out_shape[2:]), generator=gen).to(device) for _ in range(count)]


def _budget(dtype: torch.dtype, eager_error: float) -> float:
    from .testing import FP32_RTOL, LOW_PRECISION_FACTOR

    if dtype == torch.float32:
        return max(FP32_RTOL, LOW_PRECISION_FACTOR * eager_error)
    return LOW_PRECISION_FACTOR * max(eager_error, torch.finfo(dtype).eps / 64)


class _Case:
    """One (mode, dtype): builds every contender, checks errors, times them side by side."""

    def __init__(self, args, base: nn.Module, task: str, mode: str, dtype_name: str, shape, device, contenders,
                 log: Callable[[str], None]):
        self.args, self.base, self.task, self.mode, self.device = args, base, task, mode, device
        self.dtype_name, self.dtype = dtype_name, DTYPES[dtype_name]
        self.train = mode == "train"
        (self.h, self.w), self.batch = shape
        self.contenders = contenders
        self.log = log
        self.fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        gen = torch.Generator().manual_seed(args.seed + 7)
        xs = [torch.randn(self.batch, 3, self.h, self.w, generator=gen) for _ in range(N_INPUTS)]
        self.x64 = xs[0].double()  # the error checks run on input 0
        in_dtype = self.dtype if not self.train else torch.float32  # training bf16 is autocast over fp32
        self.xs = [x.to(device=device, dtype=in_dtype).contiguous(memory_format=self.fmt) for x in xs]
        self.targets: List[torch.Tensor] = []
        self.gen = gen
        self.loss = _loss_fn(task)

    # -- models

    def _make(self, contender: str) -> nn.Module:
        import hrfast

        model = copy.deepcopy(self.base)
        if contender.startswith("hrfast"):
            hrfast.patch(model, backend=self.args.backend, inference=not self.args.no_inference)
        if not self.train:
            model = model.to(self.dtype)
        model = model.to(memory_format=self.fmt).train(self.train)
        if contender.endswith("compile") or contender == "compile-max-autotune":
            mode = "max-autotune-no-cudagraphs" if contender == "compile-max-autotune" else None
            model = torch.compile(model, mode=mode, dynamic=False)
        return model

    def _step(self, model: nn.Module) -> Callable[[int], torch.Tensor]:
        device_type = self.device.type
        autocast = self.train and self.dtype != torch.float32

        def step(i: int):
            x = self.xs[i % N_INPUTS]
            if not self.train:
                with torch.no_grad():
                    return model(x)
            for p in model.parameters():
                p.grad = None
            with torch.autocast(device_type, dtype=self.dtype, enabled=autocast):
                out = model(x)
                loss = self.loss(out, self.targets[i % N_INPUTS])
            loss.backward()
            return out
        return step

    def _warmup(self, contender: str, warmup: int) -> int:
        """Untimed calls after the first: the inference mode's first eval calls of an input signature measure
        (the layout, alternating, and each conv's epilogue), so they are not timed; under torch.compile it
        measures nothing."""
        from .inference import EXPLORE_CALLS

        measures = contender == "hrfast" and not self.train and not self.args.no_inference
        return max(warmup, EXPLORE_CALLS) if measures else warmup

    # -- reference

    def reference(self, patched: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The model in float64 on input 0, unpatched (or patched with hrfast): output (and parameter grads),
        on the CPU. Runs on the device, or on the CPU when the device runs out of memory (a float64 training
        step of W48 at batch 8 needs about twice the memory of an fp32 one)."""
        try:
            return self._reference(self.device, patched)
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            self.log("    float64 reference: out of GPU memory; computing it on the CPU instead ...")
            return self._reference(torch.device("cpu"), patched)

    def _reference(self, device: torch.device, patched: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        import hrfast

        ref = copy.deepcopy(self.base)
        if patched:
            hrfast.patch(ref, backend=self.args.backend, inference=not self.args.no_inference)
        ref = ref.to(device=device, dtype=torch.float64).train(self.train)
        x = self.x64.to(device).contiguous(memory_format=self.fmt)
        if not self.train:
            with torch.no_grad():
                return ref(x).cpu(), None
        out = ref(x)
        if not self.targets:
            self.targets = _targets(self.task, out.shape, N_INPUTS, self.device, self.gen)
        self.loss(out, self.targets[0].to(device)).backward()
        return out.detach().cpu(), _flat_grads(ref)

    def exactness(self, ref_out: torch.Tensor, ref_grads: Optional[torch.Tensor]) -> float:
        """Relative error of the hrfast-patched model against the unpatched one, both in float64 (output and,
        in training, every parameter gradient): the check that the fused ops compute the same function. In
        fp32/bf16 training the whole model's gradients are ill-conditioned (eager's own error vs float64 is
        ~1e-3 in fp32 here, and varies with summation order), so only float64 can tell a bug from noise."""
        from .testing import rel_error

        out, grads = self.reference(patched=True)
        errors = [rel_error(out, ref_out)]
        if grads is not None:
            errors.append(rel_error(grads, ref_grads))
        return max(errors)

    def run(self, index: int, total: int) -> List[dict]:
        from .testing import rel_error

        if self.dtype == torch.float32:
            how = "fp32"
        else:
            how = "autocast over fp32" if self.train else "model and input in " + self.dtype_name
        what = f"{self.mode} {self.dtype_name} ({how}), batch {self.batch} at {self.h}x{self.w}"
        self.log(f"[{index}/{total}] {what}")
        t0 = time.perf_counter()
        ref_out, ref_grads = self.reference()
        self.log(f"    float64 reference: {time.perf_counter() - t0:.1f} s")
        exact = None
        if any(c.startswith("hrfast") for c in self.contenders):
            exact = self.exactness(ref_out, ref_grads)
            self.log(f"    float64 hrfast-patched vs unpatched: max rel. error {exact:.1e} (budget {FP64_BUDGET:.0e})")

        if any("compile" in c for c in self.contenders):
            torch._dynamo.reset()  # a fresh compile cache per case: no recompile limit carried across cases
        results: Dict[str, dict] = {}
        steps: Dict[str, Callable[[int], torch.Tensor]] = {}
        models: Dict[str, nn.Module] = {}
        warmup = self.args.warmup
        for name in self.contenders:
            rec = {"mode": self.mode, "dtype": self.dtype_name, "contender": name, "batch": self.batch,
                   "size": [self.h, self.w]}
            results[name] = rec
            try:
                model = self._make(name)
                step = self._step(model)
                compiles = "compile" in name
                if compiles:
                    from torch._dynamo.utils import counters

                    counters.clear()
                self.log(f"    {name}: first call" + (" (torch.compile warm-up)" if compiles else "") + " ...")
                t0 = time.perf_counter()
                out = step(0)
                synchronize(self.device)
                first_s = time.perf_counter() - t0
                rec["first_call_s"] = first_s
                errors = {"output": rel_error(out.detach().double().cpu(), ref_out)}
                if self.train:
                    errors["grads"] = rel_error(_flat_grads(model), ref_grads)
                del out
                for k in range(self._warmup(name, warmup)):
                    step(k + 1)
                synchronize(self.device)
                if compiles:
                    rec["compile_s"] = first_s
                    rec["graph_breaks"] = int(sum(counters["graph_break"].values()))
                    rec["graphs"] = int(counters["stats"].get("unique_graphs", 0))
                rec["errors"] = errors
                rec["max_error"] = max(errors.values())
                steps[name], models[name] = step, model
                extra = (f", {rec['graph_breaks']} graph break(s), {rec['graphs']} graph(s)" if compiles else "")
                self.log(f"    {name}: first call {first_s:.1f} s{extra}; max rel. error {rec['max_error']:.2e}")
            except Exception as exc:  # one contender failing must not hide the others' numbers
                rec["failed"] = f"{type(exc).__name__}: {exc}"
                self.log(f"    {name}: FAILED: {rec['failed'].splitlines()[0][:300]}")

        live = [n for n in self.contenders if n in steps]
        repeats = self.args.repeats
        self.log(f"    timing {repeats} interleaved round(s) of {', '.join(live)} ...")

        def failed(name: str, exc: BaseException) -> None:
            results[name]["failed"] = f"{type(exc).__name__} while timing: {exc}"
            self.log(f"    {name}: FAILED while timing: {results[name]['failed'].splitlines()[0][:300]}")

        cpu_ms: Dict[str, List[float]] = {n: [] for n in live}
        fns = {n: _cpu_timed(_numbered(steps[n]), cpu_ms[n], self.device) for n in live}
        times = time_interleaved(fns, self.device, reps=repeats, on_error=failed)
        live = list(times)
        for name in live:
            rec = results[name]
            rec["times_ms"] = times[name]
            if cpu_ms[name]:
                rec["cpu_times_ms"] = cpu_ms[name]
                rec["cpu_median_ms"] = statistics.median(cpu_ms[name])
            layouts = _layouts(models[name])
            if layouts:
                rec["layout"] = layouts
            rec["median_ms"] = statistics.median(times[name])
            rec["peak_bytes"] = _peak_bytes(lambda fn=steps[name]: fn(0), self.device)
        eager = results["eager"]
        compiled = results.get("compile", {})
        for name in live:
            rec = results[name]
            if "median_ms" in eager:
                rec["speedup_vs_eager"] = eager["median_ms"] / rec["median_ms"]
            if "cpu_median_ms" in eager and "cpu_median_ms" in rec:
                rec["cpu_speedup_vs_eager"] = eager["cpu_median_ms"] / rec["cpu_median_ms"]
            if "median_ms" in compiled:
                rec["speedup_vs_compile"] = compiled["median_ms"] / rec["median_ms"]
            if name.startswith("hrfast") and "errors" in eager and "errors" in rec:
                rec["fp64_patched_error"] = exact
                exact_ok = exact is not None and exact <= FP64_BUDGET  # NaN fails
                if self.train:  # ill-conditioned in fp32/bf16: float64 decides (see `exactness`)
                    rec["within_budget"] = exact_ok
                    continue
                budgets = {k: _budget(self.dtype, e) for k, e in eager["errors"].items()}
                rec["error_budgets"] = budgets
                rec["within_budget"] = exact_ok and all(rec["errors"][k] <= b for k, b in budgets.items())
        steps.clear()
        models.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return [results[n] for n in self.contenders]


def _cpu_timed(fn: Callable[[], object], into: List[float], device: torch.device) -> Callable[[], object]:
    """fn, appending the process CPU time of each call (ms) to `into` (CPU device only): on a shared machine
    it moves less with the other processes' load than wall time (with several threads it includes the
    thread pool's spin-waiting)."""
    if device.type != "cpu":
        return fn

    def call():
        t0 = time.process_time()
        out = fn()
        into.append((time.process_time() - t0) * 1e3)
        return out
    return call


# ------------------------------------------------------------------------------------------------ report


def _environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"unavailable ({type(exc).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    memory_bytes=props.total_memory)
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"{torch.get_num_threads()} torch threads)")
    return info


def _fmt_mem(b: Optional[int]) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f}"


def _table(results: List[dict], on_gpu: bool) -> str:
    lines = []
    header = (f"  {'mode':<10}{'dtype':<6}{'contender':<22}{'median ms':>11}{'vs eager':>10}{'vs compile':>11}"
              f"{'peak MiB':>10}{'max rel. err':>14}  check")
    lines.append(header)
    lines.append("  " + "-" * (len(header) - 2))
    for r in results:
        head = f"  {r['mode']:<10}{r['dtype']:<6}{r['contender']:<22}"
        if "failed" in r:
            lines.append(head + "failed: " + r["failed"].splitlines()[0][:80])
            continue
        vs_c = f"{r['speedup_vs_compile']:.2f}x" if "speedup_vs_compile" in r else "-"
        check = "" if "within_budget" not in r else _check_text(r)
        lines.append(head + f"{r['median_ms']:>11.2f}{r.get('speedup_vs_eager', 0):>9.2f}x{vs_c:>11}"
                     f"{_fmt_mem(r['peak_bytes']):>10}{r['max_error']:>14.2e}  {check}")
    return "\n".join(lines)


def _check_text(r: dict) -> str:
    verdict = "ok" if r["within_budget"] else "OVER"
    exact = r.get("fp64_patched_error")
    parts = [f"fp64 {exact:.0e}" if exact is not None else "fp64 n/a"]
    if "error_budgets" in r:
        parts.append(f"budget {max(r['error_budgets'].values()):.1e}")
    return f"{verdict} ({'; '.join(parts)})"


def _chart(path: str, results: List[dict], title: str) -> Optional[str]:
    """Writes the PNG; returns None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e \".[bench]\" or pip install matplotlib)"
    ok = [r for r in results if "median_ms" in r]
    cases = list(dict.fromkeys((r["mode"], r["dtype"]) for r in ok))
    names = list(dict.fromkeys(r["contender"] for r in ok))
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases) + 1, 4), squeeze=False)
    for ax, (mode, dtype) in zip(axes[0], cases):
        rows = {r["contender"]: r for r in ok if (r["mode"], r["dtype"]) == (mode, dtype)}
        xs = [n for n in names if n in rows]
        bars = ax.bar(range(len(xs)), [rows[n]["median_ms"] for n in xs],
                      color=["#999999" if not n.startswith("hrfast") else "#d62728" for n in xs])
        for bar, n in zip(bars, xs):
            ax.annotate(f"{rows[n].get('speedup_vs_eager', float('nan')):.2f}x", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{mode} {dtype}", fontsize=9)
        ax.set_ylabel("median ms (lower is better)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _macs(name: str, shapes: Sequence[Tuple[int, int]]) -> List[dict]:
    """MACs per image at each size, unpatched and patched (counted on the meta device)."""
    import hrfast

    from .flops import count_macs
    from .models import build_model

    with torch.device("meta"):
        plain = build_model(name)
    patched = copy.deepcopy(plain)
    hrfast.patch(patched, backend="reference")
    out = []
    for size in shapes:
        before = count_macs(plain, (1, 3, *size)).total
        after = count_macs(patched, (1, 3, *size)).total
        out.append({"size": list(size), "macs_unpatched": before, "macs_patched": after})
    return out


# -------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    """Runs the benchmark (see the module notes); 0 when every check passed and no contender failed. The torch
    thread count set by ``--threads`` is restored on return."""
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv=None) -> int:
    args = _parse(argv)
    wall0 = time.perf_counter()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    on_gpu = device.type == "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m hrfast bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if not on_gpu and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import hrfast

    from .backends import resolve as resolve_backend
    from .models import build_model
    from .models.registry import task_of

    name = args.model or (GPU_MODEL if on_gpu else CPU_MODEL)
    task = task_of(name)
    contenders = _contenders(args.contenders, args.no_compile, on_gpu)
    modes = MODES if args.mode == "both" else (args.mode,)
    dtypes = tuple(DTYPES) if args.dtype == "both" else (args.dtype,)
    args.repeats = args.repeats or (20 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 0)

    def shape_for(mode: str) -> Tuple[Tuple[int, int], int]:
        if task == "seg" and on_gpu:
            (size, batch) = GPU_SHAPES[mode]
        elif task == "seg":
            (size, batch) = CPU_SHAPE
        else:
            size, batch = OTHER_SIZES[task], 1
        return (tuple(args.size) if args.size else size), (args.batch or batch)

    shapes = {mode: shape_for(mode) for mode in modes}
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (DESIGN.md numerics)
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = _environment(device)
    resolved = resolve_backend(args.backend, device)
    from . import _autotune

    if args.backend == "auto" and _autotune.measuring_enabled(device):  # eager hrfast measures per call signature
        described = f"the fastest measured per call signature (static rule {resolved!r}: under compile)"
    else:
        described = repr(resolved)
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # as the official HRNet scripts set it; warm-up calls absorb the search
    env["cudnn_benchmark"] = bool(on_gpu)

    def log(line: str = "") -> None:
        print(line, flush=True)

    log(f"hrfast bench: {name} on {env['device']}; torch {env['torch']}, triton {env['triton']}")
    log(f"  torch threads: {torch.get_num_threads()}" + (" (--threads)" if args.threads else
                                                         " (torch's default; --threads N sets it)"))
    log(f"  contenders: {', '.join(contenders)}; modes: {', '.join(modes)}; dtypes: {', '.join(dtypes)}; "
        f"{'channels_last' if args.channels_last else 'NCHW'}; {args.repeats} timed round(s), "
        f"{args.warmup} warm-up call(s)")
    notes = []
    if not on_gpu:
        if resolved == "reference":
            notes.append("on CPU hrfast runs its PyTorch reference path (backend 'reference': Triton needs a GPU), "
                         "so these CPU ratios compare two PyTorch programs, not fused kernels: in inference, "
                         "hrfast's inference mode (BN folded into the convs, oneDNN / in-place epilogues, the "
                         "layout measured) against eager; run on a GPU for kernel speedups")
        else:
            notes.append("on CPU the Triton kernels run in the Triton interpreter, a slow simulator for checking "
                         "correctness; the hrfast times are not a speed result")
        if args.contenders is None and not args.no_compile:
            notes.append("the torch.compile contenders are off by default on CPU (inductor compiles a whole HRNet "
                         "for minutes on a small CPU); add them with --contenders all")
    notes.append("bf16 inference converts the model and input to bfloat16; bf16 training is torch.autocast(bfloat16) "
                 "over the fp32 model; fp32 runs with TF32 off" + ("; cudnn.benchmark on" if on_gpu else ""))
    for note in notes:
        log("  note: " + note)

    t0 = time.perf_counter()
    sizes = list(dict.fromkeys(s for s, _ in shapes.values()))
    try:
        macs = _macs(name, sizes)
        for m in macs:
            log(f"  GMACs per image at {m['size'][0]}x{m['size'][1]}: {m['macs_unpatched'] / 1e9:.2f} unpatched, "
                f"{m['macs_patched'] / 1e9:.2f} patched (hrfast.flops.count_macs)")
    except Exception as exc:  # noqa: BLE001
        macs = [{"failed": f"{type(exc).__name__}: {exc}"}]
        log(f"  GMACs: could not count ({macs[0]['failed']})")

    base = build_model(name).to(device)
    params = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(args.seed)
    (ch, cw), cb = shapes[modes[0]]
    _calibrate(base, torch.randn(max(cb, 2), 3, ch, cw, generator=gen).to(device), args.seed)
    probe = copy.deepcopy(base)
    report = hrfast.patch(probe, backend=args.backend, inference=not args.no_inference)
    del probe
    log(f"  {params / 1e6:.2f}M parameters; {report.summary()} (fusion: {report.count('patched', 'fusion')}, "
        f"head: {report.count('patched', 'head')}, inference mode: {report.count('patched', 'inference')}); "
        f"hrfast backend {args.backend!r} -> {described}")
    for row in report.skipped:
        log(f"    skipped {row.name or '(model)'} ({row.kind}): {row.detail}")
    log(f"  (setup {time.perf_counter() - t0:.1f} s)")
    log()

    results: List[dict] = []
    cases = [(m, d) for m in modes for d in dtypes]
    for k, (mode, dtype_name) in enumerate(cases, 1):
        case = _Case(args, base, task, mode, dtype_name, shapes[mode], device, contenders, log)
        results += case.run(k, len(cases))
    wall = time.perf_counter() - wall0

    auto_choices = _auto_choices()
    log()
    log(_table(results, on_gpu))
    for r in results:
        for choice in r.get("layout", []):
            fastest = ", ".join(f"{k} {v:.1f} ms" for k, v in choice["fastest_ms"].items())
            log(f"  {r['contender']} {r['mode']} {r['dtype']}: layout {choice['layout']} (measured, fastest call: "
                f"{fastest})")
    if auto_choices:
        log("  backend='auto' measured " + _auto_summary(auto_choices))
    if not on_gpu:
        for r in results:
            if "cpu_speedup_vs_eager" in r and r["contender"] != "eager":
                log(f"  {r['contender']} {r['mode']} {r['dtype']}: process CPU time per call {r['cpu_median_ms']:.2f} ms, "
                    f"{r['cpu_speedup_vs_eager']:.2f}x eager's (less sensitive than wall time to other processes)")
        log("  peak MiB: n/a on CPU (CUDA's allocator statistics only)")
    else:
        log("  peak MiB: the most one step allocates above what was allocated before it (torch.cuda."
            "max_memory_allocated)")
    hr = [r for r in results if "within_budget" in r]
    failed = [r for r in results if "failed" in r]
    ok = bool(hr) and all(r["within_budget"] for r in hr)
    checked = "output, parameter grads" if "train" in modes else "output"
    log(f"  errors: relative to the unpatched model in float64 on the same input ({checked}). Checks: the "
        f"hrfast-patched model in float64 within {FP64_BUDGET:.0e} of the unpatched one ('fp64'); inference also "
        "within max(1e-5, 2x eager's error) in fp32, 2x eager's error in bf16 ('budget'); training gradients in "
        "fp32/bf16 are ill-conditioned (eager's own error shows how much), so float64 decides there: "
        + ("ok" if ok else "NOT within budget" if hr else "not checked"))

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_{name}_{device.type}_{stamp}")
    record = {"command": " ".join(["python -m hrfast bench", *(argv if argv is not None else sys.argv[2:])]),
              "timestamp": datetime.datetime.now().isoformat(timespec="seconds"), "environment": env,
              "args": {k: v for k, v in vars(args).items()}, "model": name, "parameters": params,
              "backend": args.backend, "backend_resolved": resolved, "contenders": list(contenders),
              "shapes": {m: {"size": list(s), "batch": b} for m, (s, b) in shapes.items()}, "macs": macs,
              "patch_report": [r.__dict__ for r in report.rows], "notes": notes, "results": results,
              "auto_choices": auto_choices, "ok": ok, "wall_s": wall}
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1, default=_json_default)
    log(f"  wrote {stem}.json")
    why = _chart(stem + ".png", results, f"hrfast bench: {name}, {env['device']}, hrfast backend {resolved!r}")
    log(f"  chart skipped: {why}" if why else f"  wrote {stem}.png")
    log(f"  total wall time {time.perf_counter() - wall0:.0f} s")
    if failed:
        log(f"  {len(failed)} contender run(s) failed; see the table")
    return 0 if ok and not failed else 1


def _layouts(model: nn.Module) -> List[dict]:
    """The memory layout the inference mode chose for each input signature, with each configuration's fastest
    measured call (ms)."""
    from .inference import layout_choices

    return [{"signature": repr(key), "layout": layout, "fastest_ms": {k: v * 1e3 for k, v in fastest.items()}}
            for key, layout, fastest in layout_choices(getattr(model, "_orig_mod", model))]


def _auto_choices() -> List[dict]:
    """What backend='auto' measured and chose during the run (hrfast._autotune), per op call signature."""
    from . import _autotune

    return [{"op": c.op, "backend": c.backend, "median_ms": c.median_ms, "signature": repr(c.signature)}
            for c in _autotune.choices()]


def _auto_summary(choices: List[dict]) -> str:
    """e.g. "10 call signatures: fuse -> triton 7, reference 2; head -> triton 1"."""
    per_op: Dict[str, Dict[str, int]] = {}
    for c in choices:
        counts = per_op.setdefault(c["op"], {})
        counts[c["backend"]] = counts.get(c["backend"], 0) + 1
    parts = [f"{op} -> " + ", ".join(f"{b} {n}" for b, n in sorted(counts.items(), key=lambda kv: -kv[1]))
             for op, counts in per_op.items()]
    return f"{len(choices)} call signature(s): " + "; ".join(parts)


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return str(obj)


if __name__ == "__main__":
    raise SystemExit(main())
