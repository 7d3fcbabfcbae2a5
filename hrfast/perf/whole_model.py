"""`python -m hrfast.perf.whole_model`: the whole model's predicted GPU inference time, eager against hrfast's
inference mode (`hrfast.patch(model, inference=True)`), without a GPU.

Both models run one eval forward on meta tensors; every ATen op is recorded (`WholeModelRecorder`) and costed by
one rule for both sides (PERF_METHOD.md, `hrfast.perf.eager.op_seconds`): each op reads each distinct input and
writes each distinct output once at the achievable HBM bandwidth (an in-place op reads and writes its target:
two passes), convolutions and GEMMs at `CONV_TENSOR_EFFICIENCY` (60%) of the dense tensor-core peak of their
dtype when that bound is larger, plus 4 us per launch. Constants and figures: `hrfast.perf.arch`.

- eager: the unpatched model, every op.
- hrfast: the inference-patched model (backend "triton"), after one unrecorded forward (the folded weights are
  cached, as in steady state). The fused op calls (fusion rows, the head) are costed by the instrument
  (`hrfast.perf.inspect.analyse`: the Triton kernels compiled for the target, SASS, roofline, plus the ATen
  ops hrfast runs inside the op call); every other op (the convs with BN folded, the residual adds and ReLUs
  run in place on the conv's output, transitions, the terms' convs) by the rule above.
- hrfast + fused conv epilogues: the same, with each conv's in-place bias / residual-add / ReLU epilogue merged
  into the conv (one launch reading the residual as well): what cuDNN's fused conv-bias-add-activation or a
  Triton epilogue would do. Off by default in `hrfast.Inference` (`cudnn_fused`): no GPU has run it.

Predictions, not measurements: the first GPU session checks them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import arch as arch_table
from .arch import Arch, get_arch
from .eager import op_seconds
from .opcalls import AtenOp, Attribution, aten_op, meta_autocast, recording
from .workload import footprint

__all__ = ["Op", "WholeModelRecorder", "record_eager", "record_hrfast", "merge_epilogues", "cost", "predict_whole",
           "markdown", "main"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GOAL = 1.5  # DESIGN.md: whole W48 seg inference (bf16) >= 1.5x eager
EPILOGUE_OPS = ("add_", "relu_", "clamp_min_")
HEADER = ("Predictions from meta-tensor recordings, compiler output and the roofline model of PERF_METHOD.md: "
          "not measurements. No GPU ran this.")


@dataclass
class Op:
    """One recorded ATen op outside hrfast's fused op calls; `epilogue_of`: the index of the conv whose fresh
    output this in-place op modifies next (a conv epilogue), else None."""

    aten: AtenOp
    epilogue_of: Optional[int] = None
    extra_bytes: int = 0  # bytes an epilogue reads besides the conv's output (the residual)


def _written_twice(func, args, kwargs) -> Tuple[int, list]:
    """(bytes, tensors) of the arguments an op writes in place: read and written, a second pass each."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        info = arg.alias_info
        if info is not None and info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if isinstance(value, torch.Tensor):
                written.append(value)
    return sum(footprint(t) for t in written), written


class WholeModelRecorder(TorchDispatchMode):
    """Records every ATen op as an `Op`, except those inside a fused op call of `attribution` (the instrument
    costs those). Marks conv epilogues: an in-place add / ReLU on the output of the conv recorded last."""

    def __init__(self, attribution: Optional[Attribution] = None):
        super().__init__()
        self.attribution, self.ops = attribution, []
        self._tail: Optional[Tuple[torch.Tensor, int]] = None  # (conv output, conv index) open for an epilogue

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace != "aten" or (self.attribution is not None and self.attribution.current() is not None):
            return out
        op = aten_op(func, args, kwargs, out)
        if op is None:
            return out
        extra, written = _written_twice(func, args, kwargs)
        op = dataclasses.replace(op, bytes=op.bytes + extra)
        self._add(func.overloadpacket.__name__, op, args, written, out)
        return out

    def _add(self, name: str, op: AtenOp, args, written, out) -> None:
        tail, self._tail = self._tail, None
        if name == "convolution":
            self.ops.append(Op(op))
            self._tail = (out, len(self.ops) - 1)
            return
        if name in EPILOGUE_OPS and tail is not None and written and written[0] is tail[0]:
            others = [a for a in args[1:] if isinstance(a, torch.Tensor)]
            self.ops.append(Op(op, tail[1], sum(footprint(t) for t in others)))
            self._tail = tail
            return
        self.ops.append(Op(op))


# ------------------------------------------------------------------------------------------------ recording


@dataclass(frozen=True)
class Config:
    """The model and input to predict."""

    model: str = "hrnetv2_w48_seg"
    size: Tuple[int, int] = (1024, 2048)
    batch: int = 1
    dtype: str = "bf16"
    channels_last: bool = False


def _build(config: Config, inference: Optional[bool]) -> Tuple[torch.nn.Module, torch.Tensor]:
    """The model on meta in eval: unpatched (inference None) or patched (backend "triton") with or without the
    inference mode."""
    import hrfast
    from hrfast.models import build_model

    with torch.device("meta"):
        model = build_model(config.model)
    if inference is not None:
        hrfast.patch(model, backend="triton", inference=inference)
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    dtype = DTYPES[config.dtype]
    model = model.to(dtype=dtype, memory_format=fmt).eval()
    x = torch.empty((config.batch, 3, *config.size), device="meta", dtype=dtype)
    return model, x.contiguous(memory_format=fmt)


def record_eager(config: Config) -> List[Op]:
    """Every ATen op of one eval forward of the unpatched model."""
    model, x = _build(config, None)
    with torch.no_grad(), WholeModelRecorder() as rec:
        model(x)
    return rec.ops


def record_hrfast(config: Config, gpu: Arch) -> Tuple[List[Op], Attribution]:
    """The inference-patched model's ops outside its fused op calls, and the fused op calls (launches fitted to
    `gpu`'s limits), from the second forward (the first fills the caches)."""
    from .inspect import assumed_limits

    model, x = _build(config, True)
    with assumed_limits(gpu):
        with torch.no_grad(), meta_autocast():
            model(x)
        with recording() as attribution, WholeModelRecorder(attribution) as rec, torch.no_grad():
            model(x)
    return rec.ops, attribution


# --------------------------------------------------------------------------------------------------- costing


def merge_epilogues(ops: Sequence[Op]) -> List[AtenOp]:
    """The ops with each conv's epilogue folded into it: one launch, reading the residual too."""
    merged: List[AtenOp] = [op.aten for op in ops]
    for k, op in enumerate(ops):
        if op.epilogue_of is not None:
            conv = merged[op.epilogue_of]
            merged[op.epilogue_of] = dataclasses.replace(conv, bytes=conv.bytes + op.extra_bytes,
                                                         name=conv.name + "+" + op.aten.name)
            merged[k] = None
    return [op for op in merged if op is not None]


def category(name: str) -> str:
    """The op's group in the report."""
    base = name.split("+")[0]
    if base == "convolution":
        return "conv + epilogue" if "+" in name else "conv"
    if "batch_norm" in base:
        return "batch norm"
    if base in ("relu", "relu_", "clamp_min", "clamp_min_", "threshold"):
        return "relu"
    if base in ("add", "add_"):
        return "add"
    if base.startswith("upsample"):
        return "upsample"
    return base


def cost(gpu: Arch, ops: Sequence[AtenOp]) -> "OrderedDict[str, dict]":
    """Seconds, launches, bytes and FLOPs per category."""
    out: "OrderedDict[str, dict]" = OrderedDict()
    for op in ops:
        row = out.setdefault(category(op.name), {"seconds": 0.0, "launches": 0, "bytes": 0, "flops": 0.0})
        row["seconds"] += op_seconds(gpu, op)
        row["launches"] += 1
        row["bytes"] += op.bytes
        row["flops"] += op.flops
    return out


def _fused_calls(config: Config, attribution: Attribution, gpu: Arch) -> Tuple[dict, List[dict]]:
    """The instrument's figures for hrfast's fused op calls: {"fuse"/"head": {seconds, launches}}, rows."""
    from .inspect import Config as InspectConfig
    from .inspect import analyse

    inspect_config = InspectConfig(config.model, config.size, config.batch, config.dtype, config.channels_last,
                                   "inference")
    report = analyse(inspect_config, {gpu.name: attribution}, [gpu], cuda_fn=None)
    rows = report["archs"][gpu.name]["op_calls"]
    parts: Dict[str, dict] = {}
    for call, row in zip(report["op_calls"], rows):
        name = "hrfast fusion kernels" if row["kind"] == "fuse" else "hrfast head kernels"
        part = parts.setdefault(name, {"seconds": 0.0, "launches": 0, "bytes": 0, "flops": 0.0})
        part["seconds"] += row["calls"] * row["hrfast_s"]
        part["launches"] += row["calls"] * (len(call["kernel_launches"]["forward"])
                                            + len(call["hrfast_aten_ops"]["forward"]))
    return parts, rows


def _total(parts: Dict[str, dict]) -> Tuple[float, int]:
    return sum(p["seconds"] for p in parts.values()), sum(p["launches"] for p in parts.values())


def predict_whole(config: Config, gpu: Arch) -> dict:
    """The report (JSON-able) of one config on one GPU: per side, seconds by category and in total."""
    eager_parts = cost(gpu, [op.aten for op in record_eager(config)])
    ops, attribution = record_hrfast(config, gpu)
    fused, rows = _fused_calls(config, attribution, gpu)
    sides = {"eager": eager_parts,
             "hrfast": OrderedDict(list(cost(gpu, [op.aten for op in ops]).items()) + list(fused.items())),
             "hrfast_fused_epilogues": OrderedDict(list(cost(gpu, merge_epilogues(ops)).items())
                                                   + list(fused.items()))}
    totals = {}
    for side, parts in sides.items():
        seconds, launches = _total(parts)
        totals[side] = {"seconds": seconds, "launches": launches,
                        "launch_seconds": launches * arch_table.LAUNCH_SECONDS}
    eager_s = totals["eager"]["seconds"]
    for side in totals:
        totals[side]["ratio_vs_eager"] = eager_s / totals[side]["seconds"]
    return {"header": HEADER, "config": dataclasses.asdict(config), "arch": dataclasses.asdict(gpu),
            "sides": {k: dict(v) for k, v in sides.items()}, "totals": totals, "fused_op_calls": rows,
            "goal_ratio": GOAL, "method": __doc__.split("\n\n", 1)[1].split("\n\nPredictions", 1)[0].strip()}


# ---------------------------------------------------------------------------------------------------- report


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def _provenance_text(found: Optional[dict]) -> str:
    if not found:
        return "Code: not in a git checkout."
    dirty = found["uncommitted"]
    return (f"Code: commit {found['commit'][:10]}" + (f", with uncommitted changes in {', '.join(dirty)}" if dirty
                                                       else ", clean") + " (kernels/, csrc/, hrfast/).")


def markdown(report: dict, command: str) -> str:
    """The report as markdown: totals, then every category side by side."""
    c, gpu, totals = report["config"], report["arch"], report["totals"]
    lines = [f"# Whole-model prediction: {c['model']}, {c['size'][0]}x{c['size'][1]}, batch {c['batch']}, "
             f"{c['dtype']}, {'channels_last' if c['channels_last'] else 'NCHW'}, inference, {gpu['name']} "
             f"(sm_{gpu['sm']})", "", f"**{report['header']}**", "", f"Command: `{command}`", "",
             _provenance_text(report.get("provenance")), "", "## Method", "",
             report["method"], "", "## Totals", "",
             "| side | predicted us | launches | of which launch us | vs eager |", "|---|---|---|---|---|"]
    for side, t in totals.items():
        lines.append(f"| {side} | {_us(t['seconds'])} | {t['launches']:,} | {_us(t['launch_seconds'])} | "
                     f"{t['ratio_vs_eager']:.2f}x |")
    reached = [side for side, t in totals.items() if side != "eager" and t["ratio_vs_eager"] >= report["goal_ratio"]]
    lines += ["", f"Goal (DESIGN.md): >= {report['goal_ratio']}x eager; predicted reached by: "
              f"{', '.join(reached) or 'none'}. hrfast_fused_epilogues needs `hrfast.Inference(cudnn_fused=True)` "
              "(off by default until a GPU has run it); the defaults on CUDA run each conv's bias in the conv and "
              "its residual add and ReLU as in-place passes.", "", "## By category (us, launches)", "",
              "| category | " + " | ".join(totals) + " |", "|---|" + "---|" * len(totals)]
    cats = list(dict.fromkeys(k for parts in report["sides"].values() for k in parts))
    for cat in cats:
        cells = []
        for side in totals:
            part = report["sides"][side].get(cat)
            cells.append("-" if part is None else f"{_us(part['seconds'])} ({part['launches']})")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    lines += ["", "## hrfast's fused op calls (the instrument, per call)", "",
              "| op call | calls | hrfast us | eager us (instrument's formula) |", "|---|---|---|---|"]
    for row in report["fused_op_calls"]:
        lines.append(f"| {row['op']} | {row['calls']} | {_us(row['hrfast_s'])} | {_us(sum(row['eager_s'].values()))} |")
    return "\n".join(lines) + "\n"


def provenance() -> dict:
    """The git commit and the uncommitted files of the kernels and the instrument the prediction ran with (the
    kernels' predictions move with their code); empty outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "csrc", "hrfast"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": head.stdout.strip(), "uncommitted": [line[3:] for line in dirty.stdout.splitlines()]}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from hrfast.models import list_models

    p = argparse.ArgumentParser(prog="python -m hrfast.perf.whole_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list_models(), default=Config.model, metavar="NAME")
    p.add_argument("--size", type=int, nargs=2, default=list(Config.size), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=Config.batch)
    p.add_argument("--dtype", choices=tuple(DTYPES), default=Config.dtype)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--arch", default="sm_90", help="a name of hrfast.perf.arch (default sm_90: the H100)")
    p.add_argument("--out", default=None, metavar="DIR", help="write <DIR>/<config>.json and .md")
    args = p.parse_args(argv)
    if min(args.size) < 1 or args.batch < 1:
        p.error("--size and --batch must be positive")
    try:
        args.gpu = get_arch(args.arch)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    config = Config(args.model, tuple(args.size), args.batch, args.dtype, args.channels_last)
    start = time.perf_counter()
    report = predict_whole(config, args.gpu)
    report["command"] = "python -m hrfast.perf.whole_model " + " ".join(argv)
    report["provenance"] = provenance()
    report["wall_s"] = time.perf_counter() - start
    text = markdown(report, report["command"])
    print(text)
    if args.out:
        stem = (f"whole_{config.model}_{config.size[0]}x{config.size[1]}_b{config.batch}_inference_{config.dtype}"
                f"{'_cl' if config.channels_last else ''}_{args.arch.lower()}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
