"""The op tester's shared pieces: every op test compares a backend with the float64 reference the same way.

- `leaf_copy`: the copy of an argument the reference (or another backend) runs on: detached, optionally cast,
  never an alias (running statistics are updated in place), a leaf of its own graph;
- `gradients`: the gradients of every named leaf for one upstream gradient;
- `assert_matches`: one result against the float64 reference, at the fp32/fp64 tolerance or, in fp16/bf16,
  within twice the error PyTorch itself makes in that dtype (`hrfast.testing`);
- `gradcheck_named`: `torch.autograd.gradcheck` of an op over its named float64 leaves.

The fused backends every kernel test runs against are the `fused_backend` fixture of conftest.py.
"""
from typing import Callable, Optional, Sequence, Tuple

import torch

from hrfast.testing import FP32_RTOL, FP64_RTOL, assert_low_precision_close, assert_rel_close

LOW_PRECISION = (torch.float16, torch.bfloat16)

Named = Sequence[Tuple[str, torch.Tensor]]


def leaf_copy(t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None, grad: bool = True):
    """A detached copy of `t` (cast to `dtype` if given), never an alias, needing a gradient if `grad`."""
    if t is None:
        return None
    t = t.detach().to(dtype or t.dtype, copy=True)
    return t.requires_grad_() if grad else t


def gradients(y: torch.Tensor, named: Named, grad_y: torch.Tensor) -> tuple:
    """d(y . grad_y) / d(leaf) for every (name, leaf), in order; grad_y is cast to y's dtype."""
    return torch.autograd.grad(y, [t for _, t in named], grad_y.to(y.dtype))


def tolerance(dtype: torch.dtype) -> float:
    return FP64_RTOL if dtype == torch.float64 else FP32_RTOL


def assert_matches(name: str, actual: torch.Tensor, expected64: torch.Tensor, pytorch_low: Optional[torch.Tensor],
                   dtype: torch.dtype) -> None:
    """`actual` (computed in `dtype`) against the float64 reference: the fixed fp32/fp64 tolerance, or in
    fp16/bf16 twice PyTorch's own error (`pytorch_low`: the reference computed in that dtype)."""
    if dtype in LOW_PRECISION:
        assert_low_precision_close(actual, expected64, pytorch_low, name, dtype)
    else:
        assert_rel_close(actual, expected64, tolerance(dtype), name)


def gradcheck_named(fn: Callable[..., torch.Tensor], named: Named, fast_mode: bool) -> None:
    """gradcheck of fn(*leaves) over the float64 leaves of `named` (fn rebuilds the op's arguments)."""
    assert all(t.dtype == torch.float64 for _, t in named)
    assert torch.autograd.gradcheck(fn, tuple(t for _, t in named), fast_mode=fast_mode)


# ----------------------------------------------------------------------- small valid head calls (error tests)


def head_branch(N=2, C=4, H=4, W=4, **kw):
    """A head branch: x0 has 4 channels, x1 (2x2) 6."""
    return torch.randn(N, C, H, W, **kw)


def conv_weight(M=8, C=10, k=1, **kw):
    return torch.randn(M, C, k, k, **kw)


def small_head(xs=None, cw=None, cb=None, rm=None, rv=None, bw=None, bb=None, kw=None, kb=None, **kwargs):
    """hrnet_v2_head on valid small defaults (x0 4x4 with 4 channels, x1 2x2 with 6; M 8, K 3), with the
    given arguments replaced; "none" passes None explicitly."""
    from hrfast.ops import hrnet_v2_head

    def pick(value, default):
        return None if isinstance(value, str) and value == "none" else (default if value is None else value)
    xs = pick(xs, [head_branch(), head_branch(C=6, H=2, W=2)])
    return hrnet_v2_head(xs, pick(cw, conv_weight()), pick(cb, torch.randn(8)), pick(rm, torch.zeros(8)),
                         pick(rv, torch.ones(8)), pick(bw, torch.ones(8)), pick(bb, torch.zeros(8)),
                         pick(kw, conv_weight(M=3, C=8)), pick(kb, torch.randn(3)), **kwargs)
