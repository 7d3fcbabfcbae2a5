"""Compile every Triton kernel variant the launchers produce for real GPUs, on a machine without one.

The Triton interpreter runs kernels as numpy code and skips the compiler's type checks, so a kernel can
pass every interpreted test and still fail to compile. This script (run by tests/test_kernels_compile.py
in a subprocess, because it must import triton without TRITON_INTERPRET) replaces the kernels with
recorders, calls the launchers over a spread of cases, and compiles each distinct recorded variant with
`triton.compile` for sm_90 (H100/H200) and sm_80 down to cubin (Triton bundles ptxas). Exit code 0 and
a last line "compiled N variants" on success.
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

TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
KERNELS = {K: ["_fuse_forward_kernel", "_fuse_backward_same_kernel", "_upsample_adjoint_kernel"],
           KH: ["_head_stats_kernel", "_head_forward_kernel", "_head_backward_reduce_kernel",
                "_head_backward_ds_kernel"]}
TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


class Recorder:
    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        raise TypeError("runtime bool argument: launchers pass flags as constexprs")
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def compile_call(fn, args, kwargs, target):
    runtime = [p for p in fn.params if not p.is_constexpr]
    assert len(runtime) == len(args), f"{fn.__name__}: {len(args)} args for {len(runtime)} parameters"
    signature, constexprs = {}, {}
    values = dict(zip((p.name for p in runtime), args))
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(p.num,)] = kwargs[p.name]
        else:
            signature[p.name] = arg_type(values[p.name])
    options = {"num_warps": kwargs.get("num_warps", 4)}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target, options=options)


def variant_key(fn, args, kwargs):
    return (fn.__name__, tuple(arg_type(a) for a in args), tuple(sorted(kwargs.items())))


def record_cases(calls):
    from hrfast.ops import Resample
    from hrfast.ops.fuse import _term_plan

    def terms_for(dtype, sizes, resamples, channels_last=False, affine=True):
        out_size = sizes[0]
        xs = [torch.randn(2, 3, *hw, dtype=dtype) for hw in sizes]
        if channels_last:
            xs = [x.to(memory_format=torch.channels_last) for x in xs]
        terms = []
        for k, (x, r) in enumerate(zip(xs, resamples)):
            p = _term_plan(r, x.shape[2:], out_size)
            scale = torch.rand(3) if affine and k else None
            shift = torch.rand(3) if affine and k else None
            terms.append(K.Term(x, scale, shift, p.mode, p.align_corners, p.ratio_h, p.ratio_w))
        return terms, out_size

    bil = Resample("bilinear", align_corners=False)
    cases = [
        ([(8, 8), (4, 4), (2, 2), (1, 1)], [None, "nearest", bil, Resample("bilinear", align_corners=True)]),
        ([(7, 5), (4, 3)], [None, bil]),
        ([(8, 8)] * 3 + [(4, 4)] * 3, [None, None, None, "nearest", bil, "nearest"]),  # chained launches
    ]
    for dtype in TYPE_NAMES:
        for sizes, resamples in cases:
            for channels_last in (False, True):
                for force_int64 in (False, True):
                    terms, size = terms_for(dtype, sizes, [Resample(r) if isinstance(r, str) else r
                                                           for r in resamples], channels_last)
                    y = K.fuse_forward(terms, size, relu=True, force_int64=force_int64)
                    needs = [(True, t.scale is not None, t.shift is not None) for t in terms]
                    K.fuse_backward(torch.randn_like(y), y, terms, needs, relu=True, force_int64=force_int64)
        terms, size = terms_for(dtype, *cases[0][:1], [None, Resample("nearest"), bil, bil], affine=False)
        y = K.fuse_forward(terms, size, relu=False)
        K.fuse_backward(torch.randn_like(y), None, terms, [(True, False, False)] * len(terms), relu=False)


def record_head_cases(calls):
    """The head's launchers over dtypes, modes and layouts (eval and batch statistics)."""
    from hrfast.kernels.head import HeadPlan, HeadTensors
    from hrfast.ops import Resample
    from hrfast.ops.fuse import _term_plan

    for dtype in TYPE_NAMES:
        for resample in (Resample("nearest"), Resample("bilinear"), Resample("bilinear", align_corners=True)):
            for channels_last in (False, True):
                x0 = torch.randn(2, 18, 8, 8, dtype=dtype)
                lows = [torch.randn(2, 40, 8 // 2**j, 8 // 2**j, dtype=dtype) for j in (1, 2, 3)]
                if channels_last:
                    x0, lows = x0.to(memory_format=torch.channels_last), [p.to(memory_format=torch.channels_last)
                                                                         for p in lows]
                plan = HeadPlan(tuple(tuple(_term_plan(resample, p.shape[2:], (8, 8))) for p in lows))
                t = HeadTensors(x0, lows, torch.randn(40, 18, dtype=dtype), torch.randn(19, 40, dtype=dtype),
                                torch.randn(19, dtype=dtype))
                scale = torch.rand(40, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                KH.head_batch_stats(plan, t)
                KH.head_forward(plan, t, scale, scale)
                grad = torch.randn(2, 19, 8, 8, dtype=dtype)
                KH.head_backward_reduce(plan, t, scale, scale, grad)
                KH.head_backward_ds(plan, t, scale, scale, grad)
                KH.head_backward_ds(plan, t, scale, scale, grad, scale, scale)


def main():
    calls = []
    for module, names in KERNELS.items():
        for name in names:
            setattr(module, name, Recorder(getattr(module, name), calls))
    record_cases(calls)
    record_head_cases(calls)
    variants = {}
    for fn, args, kwargs in calls:
        variants.setdefault(variant_key(fn, args, kwargs), (fn, args, kwargs))
    for target in TARGETS:
        for fn, args, kwargs in variants.values():
            try:
                compile_call(fn, args, kwargs, target)
            except Exception as exc:
                consts = {k: v for k, v in kwargs.items() if k != "num_warps"}
                print(f"FAILED {fn.__name__} for sm_{target.arch} with {consts}:\n{exc}", file=sys.stderr)
                raise SystemExit(1)
    print(f"compiled {len(variants)} variants for {len(TARGETS)} targets")


if __name__ == "__main__":
    main()
