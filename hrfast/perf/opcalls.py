"""Run a patched model on meta tensors and attribute every kernel launch and every ATen op hrfast runs to the
fused op call (one fusion row, or the head) it belongs to, forward and backward.

No GPU and no computation: the model and its input are meta tensors. Meta tensors normally take the custom
ops' fake implementations; here each custom op's fake is swapped for its real implementation (torch keeps the
fake in `CustomOpDef._abstract_fn`), so the launchers run and the kernels, replaced by recorders
(`record.record`), append `Launch`es instead of running.

What hrfast runs besides its kernels is recorded too, as ATen ops (`AtenOp`: bytes moved, FLOPs), by a
`TorchDispatchMode` that is active throughout: the launchers' own ops (per-tile partial sums, allocations are
not ops), the batch-norm folds of the fusion rows (in training on the Triton backend their kernels,
`hrfast.kernels.batch_norm`, attributed by `_launcher_hook`; on the reference path their ATen ops) and
everything the fused head does besides its kernels (the projections W_j x_j, the backward's GEMMs). An op
belongs to an op call when it runs
- in forward, inside `hrfast.nn.fusion.fold_batch_norms` / `hrfast.nn.fusion.fuse` (a step folds every row's
  batch norms in one call before the rows' fuse calls: the folds belong to the first row's call, so the step's
  grouped batch-norm launches are listed under its first row; per-step totals are like for like) or inside
  `hrfast.nn.HRNetV2Head.forward`; the autograd nodes such a scope creates are tagged with its op call;
- in backward, under an autograd node tagged so (`torch._C._current_autograd_node`).
Everything else (the trunk's convolutions, residual blocks, the fusion terms' own convolutions) is the same
in eager and patched models and is not recorded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .record import Launch, record
from .workload import footprint, tensor_key

FORWARD, BACKWARD = "forward", "backward"

# ops that launch no kernel (allocation, aliasing, metadata) besides views (`OpOverload.is_view`)
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_unsafe_view", "set_", "resize_", "_to_copy_meta", "zeros_like_meta"}


@dataclass(frozen=True)
class AtenOp:
    """One ATen op as the eager model costs it: each distinct tensor read or written once, its GEMM FLOPs."""

    name: str
    bytes: int
    flops: float
    dtype: torch.dtype
    in_op: bool = False  # run by a fused op's implementation (not by the BN fold or the head's projections)


@dataclass
class OpCall:
    """One fused op call: a fusion row ("fuse") or the head ("head"), with what it ran in each phase."""

    kind: str
    inputs: List[Tuple[int, ...]] = field(default_factory=list)  # the fused op's input shapes (head: the xs)
    dtype: Optional[torch.dtype] = None
    plan: Optional[object] = None  # FusePlan / HeadPlan
    extra: Dict[str, object] = field(default_factory=dict)  # head: M, K
    launches: Dict[str, List[Launch]] = field(default_factory=lambda: {FORWARD: [], BACKWARD: []})
    ops: Dict[str, List[AtenOp]] = field(default_factory=lambda: {FORWARD: [], BACKWARD: []})

    @property
    def signature(self) -> tuple:
        """Equal for calls that do the same work (same plan, shapes, dtype)."""
        return (self.kind, self.plan, tuple(self.inputs), self.dtype, tuple(sorted(self.extra.items())))


def aten_op(func, args, kwargs, out) -> Optional[AtenOp]:
    """The op's cost record, or None for an op that launches no kernel."""
    name = func.overloadpacket.__name__
    if func.is_view or name in _NO_KERNEL:
        return None
    tensors = {}
    for t in _leaves((args, kwargs, out)):
        tensors.setdefault(tensor_key(t), footprint(t))
    packet = func.overloadpacket
    if name == "einsum":
        flops = einsum_flops(args[0], args[1])
    else:
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0.0
    dtypes = [t.dtype for t in _leaves(out)] or [torch.float32]
    return AtenOp(name, sum(tensors.values()), float(flops), dtypes[0])


def einsum_flops(equation: str, operands: Sequence[torch.Tensor]) -> float:
    """2 x the product of every index's size (a two-operand contraction; the launchers' einsums reach the
    dispatch mode undecomposed: inside a custom op, below autograd)."""
    sizes = {}
    for spec, t in zip(equation.replace(" ", "").split("->")[0].split(","), operands):
        sizes.update(zip(spec, t.shape))
    return 2.0 * math.prod(sizes.values())


def _leaves(tree) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _leaves(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _leaves(item)


class Attribution:
    """The op calls of one recorded run, and which op call (if any) the code running now belongs to."""

    def __init__(self, launches: List[Launch]):
        self.launches = launches
        self.calls: List[OpCall] = []
        self._stack: List[OpCall] = []
        self._tags: Dict[int, OpCall] = {}
        self._op_nodes: set = set()  # ids of the fused ops' own autograd nodes
        self._nodes: list = []  # keeps tagged nodes alive: their ids stay theirs
        self._pending: Optional[OpCall] = None  # a fusion row whose folds ran but not yet its fuse call

    def current(self, implementation: bool = False) -> Optional[OpCall]:
        """The op call running now. In backward, under a fused op's own autograd node only its implementation
        counts (`implementation`): the rest there is the engine accumulating the op's input gradients, which
        eager does alike."""
        if self._stack:
            return self._stack[-1]
        node = torch._C._current_autograd_node()
        if node is None or (id(node) in self._op_nodes and not implementation):
            return None
        return self._tags.get(id(node))

    @staticmethod
    def phase() -> str:
        return BACKWARD if torch._C._current_autograd_node() is not None else FORWARD

    def open(self, kind: str, keep_pending: bool = False) -> OpCall:
        """The op call a forward scope belongs to: the pending row (its folds ran), or a new one."""
        call = self._pending if self._pending is not None and self._pending.kind == kind else None
        if call is None:
            call = OpCall(kind)
            self.calls.append(call)
        self._pending = call if keep_pending else None
        return call

    @contextlib.contextmanager
    def scope(self, call: OpCall, inputs: Sequence, outputs: Callable[[], Sequence],
              op_output: bool = False) -> Iterator[None]:
        """Ops inside belong to `call`; afterwards the autograd nodes between `inputs` and `outputs()` are
        tagged with it (with `op_output`, the first output's node is the fused op's own)."""
        self._stack.append(call)
        try:
            yield
        finally:
            self._stack.pop()
        produced = outputs()
        if op_output and produced and produced[0].grad_fn is not None:
            self._op_nodes.add(id(produced[0].grad_fn))
        self._tag(call, inputs, produced)

    def _tag(self, call: OpCall, inputs: Sequence, outputs: Sequence) -> None:
        stop = {id(t.grad_fn) for t in _leaves(list(inputs)) if t.grad_fn is not None}
        todo = [t.grad_fn for t in _leaves(list(outputs)) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or id(node) in stop or id(node) in self._tags or node.name().endswith("AccumulateGrad"):
                continue
            self._tags[id(node)] = call
            self._nodes.append(node)
            todo.extend(n for n, _ in node.next_functions)

    def add_op(self, op: AtenOp, implementation: bool) -> None:
        call = self.current(implementation)
        if call is not None:
            call.ops[self.phase()].append(dataclasses.replace(op, in_op=implementation))


class _OpRecorder(TorchDispatchMode):
    """Records the ATen ops of the current op call (custom ops run inside: their implementation re-enters a
    recorder, `_implementation`)."""

    def __init__(self, attribution: Attribution, implementation: bool = False):
        super().__init__()
        self.attribution, self.implementation = attribution, implementation

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "aten":
            op = aten_op(func, args, kwargs, out)
            if op is not None:
                self.attribution.add_op(op, self.implementation)
        return out


# ------------------------------------------------------------------------------------------- the hooks


def _custom_ops():
    from ..ops import custom_ops as co
    return [(co.fuse_forward_op, co._fuse_forward, _fuse_info), (co.fuse_backward_op, co._fuse_backward_impl, None),
            (co.head_forward_op, co._head_forward, _head_info), (co.head_backward_op, co._head_backward_impl, None)]


def _fuse_info(call: OpCall, args: tuple) -> None:
    from ..plan import FusePlan
    plan, xs = args[0], args[1]
    call.plan, call.inputs, call.dtype = FusePlan.decode(plan), [tuple(x.shape) for x in xs], xs[0].dtype


def _head_info(call: OpCall, args: tuple) -> None:
    from ..plan import HeadPlan
    plan, x0, w0, wc = args[0], args[1], args[2], args[5]
    call.plan, call.dtype = HeadPlan.decode(plan), x0.dtype
    call.extra.update(M=w0.shape[0], K=wc.shape[0])


def _implementation(attribution: Attribution, impl: Callable, info: Optional[Callable]) -> Callable:
    """A custom op's implementation standing in for its fake: records its launches and ATen ops."""
    def run(*args, **kwargs):
        call, phase = attribution.current(implementation=True), attribution.phase()
        if call is not None and info is not None:
            info(call, args)
        start = len(attribution.launches)
        with _OpRecorder(attribution, implementation=True):
            out = impl(*args, **kwargs)
        if call is not None:
            call.launches[phase].extend(attribution.launches[start:])
        return out
    return run


@contextlib.contextmanager
def _replaced(obj, name: str, value) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def _fold_hook(attribution: Attribution, fold: Callable) -> Callable:
    def fold_batch_norms(bns, zs, *args, **kwargs):
        call = attribution.open("fuse", keep_pending=True)
        result = None
        with attribution.scope(call, list(zs), lambda: list(result or ())):
            result = fold(bns, zs, *args, **kwargs)
        return result
    return fold_batch_norms


def _launcher_hook(attribution: Attribution, launcher: Callable) -> Callable:
    """A launcher called outside the custom ops (the batch-norm fold's, `hrfast.kernels.batch_norm`): its launches
    go to the op call running now (its ATen ops are recorded by the recorder already active)."""
    def run(*args, **kwargs):
        call, phase = attribution.current(), attribution.phase()
        start = len(attribution.launches)
        out = launcher(*args, **kwargs)
        if call is not None:
            call.launches[phase].extend(attribution.launches[start:])
        return out
    return run


def _fuse_hook(attribution: Attribution, fuse: Callable) -> Callable:
    def fused(inputs, **kwargs):
        call = attribution.open("fuse")
        out = []
        params = [t for key in ("scales", "shifts") for t in (kwargs.get(key) or ()) if t is not None]
        with attribution.scope(call, [*inputs, *params], lambda: out, op_output=True):
            out.append(fuse(inputs, **kwargs))
        return out[0]
    return fused


def _step_hook(attribution: Attribution, fuse_step: Callable) -> Callable:
    """`hrfast.ops.fuse_step` (a training step's rows as one autograd node, their kernels in shared launches):
    one op call per row (its plan and inputs, for the eager comparison), the step's launches, forward and
    backward, in the first row's, as the step's grouped batch-norm launches are."""
    def step(rows, folds):
        calls = [attribution.open("fuse") for _ in rows]
        for call, row in zip(calls, rows):
            call.plan = row.plan()
            call.inputs, call.dtype = [tuple(x.shape) for x in row.inputs], row.inputs[0].dtype
        params = [t for row in rows for t in (*row.scales, *row.shifts) if t is not None]
        out: list = []
        with attribution.scope(calls[0], [*(x for row in rows for x in row.inputs), *params], lambda: out,
                               op_output=True):
            out.extend(fuse_step(rows, folds))
        return out
    return step


def _head_hook(attribution: Attribution, forward: Callable) -> Callable:
    def head_forward(module, xs, *args, **kwargs):
        call = attribution.open("head")
        call.inputs = [tuple(x.shape) for x in xs]
        out = []
        with attribution.scope(call, list(xs), lambda: out, op_output=True):
            out.append(forward(module, xs, *args, **kwargs))
        return out[0]
    return head_forward


@contextlib.contextmanager
def meta_autocast() -> Iterator[None]:
    """torch.is_autocast_enabled("meta") and torch.autocast("meta", ...) raise ("unknown device type"); hrfast's
    head asks both. On meta tensors autocast has nothing to do: answer False / a no-op context."""
    is_enabled, autocast = torch.is_autocast_enabled, torch.autocast

    def enabled(*args):
        return False if args and args[0] == "meta" else is_enabled(*args)

    def meta_autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else autocast(device_type, *args, **kwargs)

    with _replaced(torch, "is_autocast_enabled", enabled), _replaced(torch, "autocast", meta_autocast):
        yield


def _unaliased(outputs: List[torch.Tensor]) -> List[torch.Tensor]:
    """`custom_ops._unaliased` telling storages apart by identity: on meta every storage's data_ptr() is 0,
    which would make it clone every output after the first (work a GPU run does not do)."""
    seen, out = set(), []
    for t in outputs:
        storage = t.untyped_storage()._cdata
        out.append(t.clone() if storage in seen or t.storage_offset() != 0 else t)
        seen.add(storage)
    return out


class _CudnnLayouts(TorchDispatchMode):
    """Convolutions on meta tensors return the layout cuDNN gives on a GPU: channels_last when the input or the
    weight is (torch's meta convolution returns contiguous outputs, so a channels_last model would be recorded
    as NCHW from its first convolution on)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default and out.dim() == 4 and _channels_last(args[0], args[1]):
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def _channels_last(*tensors: torch.Tensor) -> bool:
    return any(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
               for t in tensors)


@contextlib.contextmanager
def recording() -> Iterator[Attribution]:
    """Inside: fused ops on meta tensors run their launchers, whose launches and ATen ops are attributed to op
    calls (`Attribution.calls`). Compile the launches after leaving (see `record.record`)."""
    from ..nn import fusion as nn_fusion
    from ..nn.head import HRNetV2Head
    from ..ops import custom_ops

    with contextlib.ExitStack() as stack:
        launches = stack.enter_context(record())
        attribution = Attribution(launches)
        stack.enter_context(meta_autocast())
        stack.enter_context(_replaced(custom_ops, "_unaliased", _unaliased))
        for op, impl, info in _custom_ops():
            stack.enter_context(_replaced(op, "_abstract_fn", _implementation(attribution, impl, info)))
        stack.enter_context(_replaced(nn_fusion, "fold_batch_norms",
                                      _fold_hook(attribution, nn_fusion.fold_batch_norms)))
        from hrfast.kernels import batch_norm as bn_kernels
        for name in ("batch_stats", "batch_norm_backward"):
            stack.enter_context(_replaced(bn_kernels, name, _launcher_hook(attribution, getattr(bn_kernels, name))))
        stack.enter_context(_replaced(nn_fusion, "fuse", _fuse_hook(attribution, nn_fusion.fuse)))
        from ..ops.fuse_step import FuseStepFunction
        stack.enter_context(_replaced(nn_fusion, "fuse_step", _step_hook(attribution, nn_fusion.fuse_step)))
        stack.enter_context(_replaced(FuseStepFunction, "forward", staticmethod(
            _launcher_hook(attribution, FuseStepFunction.forward))))
        stack.enter_context(_replaced(FuseStepFunction, "backward", staticmethod(
            _implementation(attribution, FuseStepFunction.backward, None))))
        stack.enter_context(_replaced(HRNetV2Head, "forward", _head_hook(attribution, HRNetV2Head.forward)))
        stack.enter_context(_CudnnLayouts())
        stack.enter_context(_OpRecorder(attribution))
        yield attribution
