"""Host time of one `hrfast.ops.fuse` call (and one `hrfast.ops.hrnet_v2_head` call) without the kernels.

A fused op only pays off if its Python glue (validation, planning, the custom-op boundary, the launcher's
argument packing) is small next to the kernel it saves; issue 12 asks for at most 25 us per fuse call. This
measures that glue alone: backend="triton" on tiny CPU tensors with TRITON_INTERPRET=1, and every Triton kernel
object the hrfast.kernels modules hold (any `triton.runtime.KernelInterface`: jit functions, autotuners,
heuristics; found by scanning module attributes, whatever their names) replaced by a stub whose ``[grid]``
launch does nothing. A launcher that reaches a kernel other than through its module's attribute would still
run it: the "launches" column (stub calls per op call) shows that the stubs were reached.

Timed with `hrfast.timing`: batches of many calls after a warm-up, the median batch per call, under
torch.no_grad() and with autograd recording (inputs requiring grad, forward only).

    python benchmarks/host_glue.py [--calls 2000] [--batches 7] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import pkgutil
import pstats
from typing import Callable, Dict, List, Optional

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: CPU tensors, no GPU needed

import torch  # noqa: E402

class NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` counts the launch and does nothing."""

    launches = 0

    def __getitem__(self, grid) -> Callable[..., None]:
        return self.launch

    @classmethod
    def launch(cls, *args, **kwargs) -> None:
        cls.launches += 1


def stub_kernels() -> List[str]:
    """Replaces every Triton kernel object in the hrfast.kernels modules by a `NoLaunch`; returns their names."""
    import hrfast.kernels
    from triton.runtime import KernelInterface

    stubbed = []
    for info in pkgutil.iter_modules(hrfast.kernels.__path__, "hrfast.kernels."):
        module = importlib.import_module(info.name)
        for name, value in list(vars(module).items()):
            if isinstance(value, KernelInterface):
                setattr(module, name, NoLaunch())
                stubbed.append(f"{info.name}.{name}")
    return stubbed


def _t(*shape: int, grad: bool) -> torch.Tensor:
    return torch.randn(*shape).requires_grad_(grad)


def fuse_case(low_sizes: List[int], grad: bool) -> Callable[[], object]:
    """Output branch 0 of a stage-4 fusion at C=8: x0 8x8 plus one bilinear term per size in low_sizes, each
    with a per-channel scale and shift (a folded BN)."""
    from hrfast.ops import Resample, fuse

    C, up = 8, Resample("bilinear", align_corners=False)
    xs = [_t(1, C, 8, 8, grad=grad)] + [_t(1, C, s, s, grad=grad) for s in low_sizes]
    scales = [None] + [_t(C, grad=grad) for _ in low_sizes]
    shifts = [None] + [_t(C, grad=grad) for _ in low_sizes]
    resample = [None] + [up] * len(low_sizes)
    return lambda: fuse(xs, scales=scales, shifts=shifts, resample=resample, backend="triton")


def head_case(grad: bool) -> Callable[[], object]:
    """An eval HRNetV2 head at width 4 (branches 4/8/16/32 channels at 8x8 ... 1x1), 60 channels, 3 classes."""
    from hrfast.ops import hrnet_v2_head

    channels, M, K = [4, 8, 16, 32], 60, 3
    xs = [_t(1, c, 8 >> k, 8 >> k, grad=grad) for k, c in enumerate(channels)]
    conv_w, conv_b = _t(M, sum(channels), 1, 1, grad=grad), _t(M, grad=grad)
    bn = (torch.zeros(M), torch.ones(M), _t(M, grad=grad), _t(M, grad=grad))
    cls_w, cls_b = _t(K, M, 1, 1, grad=grad), _t(K, grad=grad)
    return lambda: hrnet_v2_head(xs, conv_w, conv_b, *bn, cls_w, cls_b, backend="triton")


CASES: Dict[str, Callable[[bool], Callable[[], object]]] = {
    "fuse, 4 terms (stage-4 branch 0)": lambda grad: fuse_case([4, 2, 1], grad),
    "fuse, 2 terms": lambda grad: fuse_case([4], grad),
    "hrnet_v2_head, 4 branches": head_case,
}


def us_per_call(fn: Callable[[], object], calls: int, batches: int) -> float:
    """Median over batches of a batch's time per call, in microseconds."""
    from hrfast.timing import median_ms

    def batch():
        for _ in range(calls):
            fn()
    return median_ms(batch, "cpu", reps=batches, warmup=1) * 1e3 / calls


def launches_per_call(fn: Callable[[], object]) -> int:
    before = NoLaunch.launches
    fn()
    return NoLaunch.launches - before


def profile(fn: Callable[[], object], calls: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(20)


def _parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000, help="calls per timed batch")
    p.add_argument("--batches", type=int, default=7, help="timed batches (the median is reported)")
    p.add_argument("--profile", action="store_true", help="also print a cProfile top-20 (cumulative) per case")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    torch.manual_seed(0)
    stubbed = stub_kernels()
    modules = sorted({name.rpartition(".")[0] for name in stubbed})
    print(f"stubbed {len(stubbed)} Triton kernel objects (jit functions included) in {', '.join(modules)}")
    print(f"\n{'case':<36}{'autograd':>10}{'us/call':>10}{'launches':>10}")
    for name, make in CASES.items():
        for grad in (False, True):
            fn = make(grad)
            with torch.set_grad_enabled(grad):
                fn()  # warm-up: plans, caches, first-call imports
                us = us_per_call(fn, args.calls, args.batches)
                print(f"{name:<36}{'on' if grad else 'off':>10}{us:>10.1f}{launches_per_call(fn):>10}", flush=True)
                if args.profile:
                    profile(fn, args.calls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
