"""Launches over a spread of odd cases, so that every distinct code path of the Triton kernels gets compiled.

The Triton interpreter runs kernels as numpy code and skips the compiler's type checks, so a kernel can pass
every interpreted test and still fail to compile. The real HRNet configurations (`launchability`) leave code
paths out: float64, nearest and align_corners resampling, odd sizes, terms without an affine map or without
ReLU, more terms than one launch takes, 64-bit offsets. `record_cases` records the launchers' launches for
those on small CPU tensors (`record.record`: nothing runs); `code_path_key` says which launches share a code
path, so that one launch of each is compiled.
"""
from __future__ import annotations

from typing import List

import torch

from .record import Launch, record

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _resamples():
    from hrfast.plan import Resample
    return (Resample("bilinear", align_corners=False), Resample("bilinear", align_corners=True),
            Resample("nearest"))


def _fuse_cases():
    """(sizes, resamples) per case: the first term at the output size."""
    bil, corners, near = _resamples()
    return [
        ([(8, 8), (4, 4), (2, 2), (1, 1)], [None, near, bil, corners]),
        ([(7, 5), (4, 3)], [None, bil]),
        ([(8, 8)] * 3 + [(4, 4)] * 3, [None, None, None, near, bil, near]),
    ]


def _many_terms():
    """17 terms (10 at the output size), as tests/test_csrc_fuse.py's: chained forward launches."""
    bil, corners, near = _resamples()
    sizes = [(5, 9), (3, 5), (5, 9), (2, 3), (5, 9), (4, 4), (5, 9), (5, 9), (1, 2), (5, 9), (3, 6), (5, 9),
             (5, 9), (2, 7), (5, 9), (5, 9), (1, 1)]
    resamples = [None, bil, None, near, None, corners, None, None, bil, None, near, None, None, bil, None, None,
                 near]
    return sizes, resamples


def fuse_problem(dtype, sizes, resamples, channels_last=False, affine=True, relu=True):
    """(plan, xs, scales, shifts) as the fusion launchers take them; the first term has no affine."""
    from hrfast.plan import fuse_plan

    xs = [torch.randn(2, 3, *hw, dtype=dtype) for hw in sizes]
    if channels_last:
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    params = [torch.rand(3, dtype=dtype) if affine and k else None for k in range(len(xs))]
    present = tuple(p is not None for p in params)
    plan = fuse_plan(tuple(sizes), tuple(resamples), sizes[0], relu, channels_last, present, present)
    return plan, xs, params, list(params)


def fuse_forward_backward(problem, force_int64=False) -> None:
    from hrfast.kernels import fuse as K

    plan, xs, scales, shifts = problem
    y = K.fuse_forward(plan, xs, scales, shifts, force_int64=force_int64)
    needs = [(True, s is not None, b is not None) for s, b in zip(scales, shifts)]
    K.fuse_backward(plan, torch.randn_like(y), y if plan.relu else None, xs, scales, shifts, needs,
                    force_int64=force_int64)


def step_forward_backward(problems, force_int64=False) -> None:
    """A fusion step's rows through their shared launches as `hrfast.ops.fuse_step` runs them
    (`fuse_forward_rows_with_bits`, `fuse_backward_rows` reading the ReLU bits where a row has them; the
    adjoint rows share their launch whatever their programs' size)."""
    from hrfast.kernels import fuse as K

    outs = K.fuse_forward_rows_with_bits(problems, force_int64)
    calls = [K.BackwardCall(plan, torch.randn_like(y), y if bits is None else None, xs, scales, shifts,
                            [(True, s is not None, b is not None) for s, b in zip(scales, shifts)],
                            force_int64=force_int64, relu_bits=bits)
             for (plan, xs, scales, shifts), (y, bits) in zip(problems, outs)]
    min_cells, K.ADJOINT_ROWS_MIN_CELLS = K.ADJOINT_ROWS_MIN_CELLS, 1
    try:
        K.fuse_backward_rows(calls)
    finally:
        K.ADJOINT_ROWS_MIN_CELLS = min_cells


def record_fuse_cases() -> None:
    bil, _, near = _resamples()
    for dtype in DTYPES:
        for sizes, resamples in _fuse_cases():
            for channels_last in (False, True):
                for force_int64 in (False, True):
                    fuse_forward_backward(fuse_problem(dtype, sizes, resamples, channels_last), force_int64)
        sizes = _fuse_cases()[0][0]
        fuse_forward_backward(fuse_problem(dtype, sizes, [None, near, bil, bil], affine=False, relu=False))
        # x2 / x4 / x8 bilinear: one `_adjoint_row_kernel` launch for the three (two for bf16 channels_last),
        # 32- and 64-bit offsets
        for channels_last in (False, True):
            for force_int64 in (False, True):
                fuse_forward_backward(fuse_problem(dtype, sizes, [None, bil, bil, bil], channels_last), force_int64)
    for dtype in (torch.float32, torch.bfloat16):
        fuse_forward_backward(fuse_problem(dtype, *_many_terms()))
    # a step's grouped launches with 64-bit offsets (the HRNet configurations take 32-bit ones): rows of x2 / x4
    # / x8 (8x8: ReLU bits) and of one x2 term (4x4: y) share the adjoint-row launch
    sizes = _fuse_cases()[0][0]
    bil = _resamples()[0]
    step_forward_backward([fuse_problem(torch.bfloat16, sizes, [None, bil, bil, bil]),
                           fuse_problem(torch.bfloat16, sizes[1:3], [None, bil])], force_int64=True)


def record_head_cases() -> None:
    """Every head launcher per dtype and layout, the three low branches resampled three ways (nearest,
    bilinear, bilinear with align_corners: each mode's code in one variant), eval and batch statistics."""
    from hrfast.kernels import head as KH
    from hrfast.plan import HeadPlan, term_plan

    modes = _resamples()
    for dtype in DTYPES:
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x0 = torch.randn(2, 18, 8, 8, dtype=dtype).contiguous(memory_format=fmt)
            lows = [torch.randn(2, 40, 8 // 2**j, 8 // 2**j, dtype=dtype).contiguous(memory_format=fmt)
                    for j in (1, 2, 3)]
            plan = HeadPlan(tuple(term_plan(r, tuple(p.shape[2:]), (8, 8)) for r, p in zip(modes, lows)))
            t = KH.HeadTensors(x0, lows, torch.randn(40, 18, dtype=dtype), torch.randn(19, 40, dtype=dtype),
                               torch.randn(19, dtype=dtype))
            scale = torch.rand(40, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            grad = torch.randn(2, 19, 8, 8, dtype=dtype)
            KH.head_batch_stats(plan, t)
            KH.head_forward(plan, t, scale, scale)
            KH.head_backward_reduce(plan, t, scale, scale, grad)
            KH.head_backward_ds(plan, t, scale, scale, grad)
            KH.head_backward_ds(plan, t, scale, scale, grad, scale, scale)


def record_cases() -> List[Launch]:
    """The launches of every case (fusion, then head)."""
    with record() as launches:
        record_fuse_cases()
        record_head_cases()
    return launches


def code_path_key(launch: Launch) -> tuple:
    """Equal for launches that differ only in runtime scalars. Those still compile to different binaries (the
    JIT's value specialisations: ints equal to 1, divisibility by 16), but one of them per code path checks
    that the code compiles, at a fraction of the time."""
    constexpr_names = {p.name for p in launch.fn.params if p.is_constexpr}
    signature = launch.specialization().signature
    pointers = {name: _pointer_types(ty) for name, ty in signature.items() if name not in constexpr_names}
    constexprs = {name: value for name, value in launch.params.items() if name in constexpr_names}
    return launch.name, repr(pointers), repr(sorted(constexprs.items())), repr(sorted(launch.options.items()))


def _pointer_types(ty):
    if isinstance(ty, tuple):
        return tuple(_pointer_types(t) for t in ty)
    return ty if ty.startswith("*") else "scalar"
