"""Count the ATen ops of one eval forward of an HRNet: eager vs hrfast-patched (reference path, Triton path).

Every host op costs dispatch time whatever the device, so an eval forward of a patched model should issue no
more ops than the unpatched one (issue 12's acceptance). Counted with a `TorchDispatchMode` that sees every op
call below autograd: the custom ops `hrfast::*` reach the mode as themselves, and the mode is switched off while
it runs an op, so what a custom op does inside (its launcher's own ATen calls) is not counted: one call, one op.

Contenders, each after one uncounted warm-up forward, under torch.no_grad(), model in eval:
- eager: the unpatched model;
- reference: `hrfast.patch(model, backend="reference")`, hrfast's PyTorch path;
- triton: `hrfast.patch(model, backend="triton")` on CPU tensors through the Triton interpreter (slow, hence its
  smaller input), compared with eager at that same size.
fp32 and bf16 (model and input in bf16).

    python benchmarks/count_aten_ops.py [--model hrnetv2_w48_seg] [--size 64 128] [--triton-size 32 32]
                                        [--dtypes fp32 bf16] [--top 12] [--json ops.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from collections import Counter
from typing import List, Optional, Tuple

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: the Triton kernels on CPU

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class OpCounter(TorchDispatchMode):
    """Counts op calls by overload packet (``aten.add``, ``hrfast.fuse_forward``)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))  # the mode is off in here: a custom op's internals are not seen


def count_forward(model: torch.nn.Module, x: torch.Tensor) -> Counter:
    """Ops of one forward after one warm-up (which fills caches: lazily built plans, compiled kernels)."""
    with torch.no_grad():
        model(x)
        with OpCounter() as counter:
            model(x)
    return counter.counts


def make_model(base: torch.nn.Module, contender: str, dtype: torch.dtype) -> torch.nn.Module:
    import hrfast

    model = copy.deepcopy(base)
    if contender != "eager":
        hrfast.patch(model, backend=contender)
    return model.to(dtype).eval()


def measure(base: torch.nn.Module, contender: str, dtype_name: str, size: Tuple[int, int]) -> dict:
    dtype = DTYPES[dtype_name]
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(dtype)
    counts = count_forward(make_model(base, contender, dtype), x)
    return {"contender": contender, "dtype": dtype_name, "size": list(size), "total": sum(counts.values()),
            "counts": dict(counts.most_common())}


def with_deltas(records: List[dict]) -> List[dict]:
    """Adds each record's per-op difference from eager at the same dtype and size."""
    eager = {(r["dtype"], tuple(r["size"])): r for r in records if r["contender"] == "eager"}
    for r in records:
        base = eager.get((r["dtype"], tuple(r["size"])))
        if base is None or base is r:
            continue
        names = set(r["counts"]) | set(base["counts"])
        delta = {n: r["counts"].get(n, 0) - base["counts"].get(n, 0) for n in names}
        r["eager_total"] = base["total"]
        r["delta"] = {n: d for n, d in sorted(delta.items(), key=lambda kv: (-abs(kv[1]), kv[0])) if d}
    return records


def table(records: List[dict], top: int) -> str:
    """Per record: its total against eager's, its top ops by count, then every other op whose count differs."""
    lines = []
    for r in records:
        size = "x".join(map(str, r["size"]))
        vs = f"   eager {r['eager_total']}, delta {r['total'] - r['eager_total']:+d}" if "eager_total" in r else ""
        lines.append(f"{r['contender']:<10} {r['dtype']:<5} 1x3x{size:<8} total {r['total']:>6}{vs}")
        delta = r.get("delta", {})
        shown = list(r["counts"])[:top] + [n for n in delta if n not in list(r["counts"])[:top]]
        for name in shown:
            d = f"{delta[name]:+6d}" if name in delta else ("     0" if "eager_total" in r else "")
            lines.append(f"    {name:<36} {r['counts'].get(name, 0):>6} {d}")
    return "\n".join(lines)


def _parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hrnetv2_w48_seg", help="a name of hrfast.models.list_models()")
    p.add_argument("--size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    p.add_argument("--triton-size", type=int, nargs=2, default=(32, 32), metavar=("H", "W"),
                   help="input of the Triton-interpreter contender (and of eager beside it); 0 0 skips it")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    p.add_argument("--top", type=int, default=12, help="ops listed per contender (besides those that differ)")
    p.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    return p.parse_args(argv)


def runs(args: argparse.Namespace) -> List[Tuple[str, str, Tuple[int, int]]]:
    size, small = tuple(args.size), tuple(args.triton_size)
    found = []
    for dtype in args.dtypes:
        found += [("eager", dtype, size), ("reference", dtype, size)]
        if min(small) > 0:
            found += [("eager", dtype, small)] * (small != size) + [("triton", dtype, small)]
    return found


def main(argv: Optional[List[str]] = None) -> int:
    from hrfast.models import build_model

    args = _parse(argv)
    torch.manual_seed(0)
    base = build_model(args.model).eval()
    records = []
    for contender, dtype, size in runs(args):
        print(f"counting {contender} {dtype} 1x3x{size[0]}x{size[1]} ...", flush=True)
        records.append(measure(base, contender, dtype, size))
    records = with_deltas(records)
    print(f"\nATen ops of one eval forward of {args.model} (batch 1, no grad, after one warm-up forward)")
    print(table(records, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "torch": torch.__version__, "records": records}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
