"""Compile the Triton kernels, as the launchers launch them, for real GPUs on a machine without one.

The Triton interpreter runs kernels as numpy code and skips the compiler's type checks, so a kernel can
pass every interpreted test and still fail to compile. This script (run by tests/test_kernels_compile.py
in a subprocess, because it must import triton without TRITON_INTERPRET) records the launches the launchers
make over a spread of cases (`hrfast.perf.record`: kernels replaced by recorders, nothing runs), and compiles
one launch of each distinct code path (kernel, constexprs, pointer types, launch options) with `triton.compile`
for sm_90 (H100/H200) and sm_80 down to cubin (Triton bundles ptxas), specialised as Triton's JIT would on a
GPU (ints equal to 1 as constants, 16-divisibility, tuple arguments element by element). Exit code 0 and a
last line "compiled N variants for 2 targets" on success.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hrfast.kernels import fuse as K  # noqa: E402
from hrfast.kernels import head as KH  # noqa: E402
from hrfast.perf.record import Launch, record  # noqa: E402
from hrfast.plan import HeadPlan, Resample, fuse_plan, term_plan  # noqa: E402

TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BIL = Resample("bilinear", align_corners=False)
BIL_CORNERS = Resample("bilinear", align_corners=True)
NEAR = Resample("nearest")
FUSE_CASES = [
    ([(8, 8), (4, 4), (2, 2), (1, 1)], [None, NEAR, BIL, BIL_CORNERS]),
    ([(7, 5), (4, 3)], [None, BIL]),
    ([(8, 8)] * 3 + [(4, 4)] * 3, [None, None, None, NEAR, BIL, NEAR]),
]
# one launch for all terms: a many-term variant (17 terms, 10 of output size, as tests/test_csrc_fuse.py's)
MANY_TERMS = ([(5, 9), (3, 5), (5, 9), (2, 3), (5, 9), (4, 4), (5, 9), (5, 9), (1, 2), (5, 9), (3, 6), (5, 9), (5, 9),
               (2, 7), (5, 9), (5, 9), (1, 1)],
              [None, BIL, None, NEAR, None, BIL_CORNERS, None, None, BIL, None, NEAR, None, None, BIL, None, None,
               NEAR])


def fuse_problem(dtype, sizes, resamples, channels_last=False, affine=True, relu=True):
    """(plan, xs, scales, shifts) as the fusion launchers take them; the first term has no affine."""
    xs = [torch.randn(2, 3, *hw, dtype=dtype) for hw in sizes]
    if channels_last:
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    params = [torch.rand(3, dtype=dtype) if affine and k else None for k in range(len(xs))]
    present = tuple(p is not None for p in params)
    plan = fuse_plan(tuple(sizes), tuple(resamples), sizes[0], relu, channels_last, present, present)
    return plan, xs, params, list(params)


def fuse_forward_backward(problem, force_int64=False):
    plan, xs, scales, shifts = problem
    y = K.fuse_forward(plan, xs, scales, shifts, force_int64=force_int64)
    needs = [(True, s is not None, b is not None) for s, b in zip(scales, shifts)]
    K.fuse_backward(plan, torch.randn_like(y), y if plan.relu else None, xs, scales, shifts, needs,
                    force_int64=force_int64)


def record_fuse_cases():
    for dtype in DTYPES:
        for sizes, resamples in FUSE_CASES:
            for channels_last in (False, True):
                for force_int64 in (False, True):
                    fuse_forward_backward(fuse_problem(dtype, sizes, resamples, channels_last), force_int64)
        sizes = FUSE_CASES[0][0]
        fuse_forward_backward(fuse_problem(dtype, sizes, [None, NEAR, BIL, BIL], affine=False, relu=False))
    for dtype in (torch.float32, torch.bfloat16):
        fuse_forward_backward(fuse_problem(dtype, *MANY_TERMS))


def record_head_cases():
    """The head's launchers over dtypes, modes and layouts (eval and batch statistics)."""
    for dtype in DTYPES:
        for resample in (NEAR, BIL, BIL_CORNERS):
            for channels_last in (False, True):
                x0 = torch.randn(2, 18, 8, 8, dtype=dtype)
                lows = [torch.randn(2, 40, 8 // 2**j, 8 // 2**j, dtype=dtype) for j in (1, 2, 3)]
                if channels_last:
                    x0, lows = x0.to(memory_format=torch.channels_last), [p.to(memory_format=torch.channels_last)
                                                                         for p in lows]
                plan = HeadPlan(tuple(term_plan(resample, tuple(p.shape[2:]), (8, 8)) for p in lows))
                t = KH.HeadTensors(x0, lows, torch.randn(40, 18, dtype=dtype), torch.randn(19, 40, dtype=dtype),
                                   torch.randn(19, dtype=dtype))
                scale = torch.rand(40, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                KH.head_batch_stats(plan, t)
                KH.head_forward(plan, t, scale, scale)
                grad = torch.randn(2, 19, 8, 8, dtype=dtype)
                KH.head_backward_reduce(plan, t, scale, scale, grad)
                KH.head_backward_ds(plan, t, scale, scale, grad)
                KH.head_backward_ds(plan, t, scale, scale, grad, scale, scale)


def code_path_key(launch: Launch) -> tuple:
    """Equal for launches that differ only in runtime scalars. Those still compile to different binaries (the
    JIT's value specialisations: ints equal to 1, divisibility by 16), but compiling one of them per code path
    checks the kernel at a fraction of the time (every variant: about twice as many compiles)."""
    constexpr_names = {p.name for p in launch.fn.params if p.is_constexpr}
    signature = launch.specialization().signature
    pointers = {name: _pointer_types(ty) for name, ty in signature.items() if name not in constexpr_names}
    constexprs = {name: value for name, value in launch.params.items() if name in constexpr_names}
    return launch.name, repr(pointers), repr(sorted(constexprs.items())), repr(sorted(launch.options.items()))


def _pointer_types(ty):
    if isinstance(ty, tuple):
        return tuple(_pointer_types(t) for t in ty)
    return ty if ty.startswith("*") else "scalar"


def compile_launch(launch: Launch, target: GPUTarget) -> None:
    spec = launch.specialization()
    triton.compile(ASTSource(launch.fn, spec.signature, spec.constexprs, spec.attrs), target=target,
                   options=launch.options)


def main():
    with record() as launches:
        record_fuse_cases()
        record_head_cases()
    variants = {}
    for launch in launches:
        variants.setdefault(code_path_key(launch), launch)
    for target in TARGETS:
        for launch in variants.values():
            try:
                compile_launch(launch, target)
            except Exception as exc:
                constexprs = launch.specialization().constexprs
                print(f"FAILED {launch.name} for sm_{target.arch} with constants {constexprs}:\n{exc}",
                      file=sys.stderr)
                raise SystemExit(1)
    print(f"compiled {len(variants)} variants for {len(TARGETS)} targets")


if __name__ == "__main__":
    main()
