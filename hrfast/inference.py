"""The inference mode's runtime: conv + folded BN + epilogue as one call, and the model's memory layout.

`hrfast.patch(model, inference=True)` (or ``inference=hrfast.Inference(...)``) installs forwards that call into
this module (the matching lives in `hrfast._patch.inference`, the structures in `hrfast.hrnet.blocks`):

- `conv_unit(x, conv, bn, relu, residual)`: ``relu(bn(conv(x)) + residual)`` as one conv with the BN folded into
  its weights (`hrfast.batchnorm.fold_into_conv`, cached) and the add / ReLU as its epilogue. How the epilogue
  runs is chosen by measurement per call signature (`hrfast._autotune.choose`, op "conv_unit"), among the
  candidates of the device: "aten" (``F.conv2d`` then in-place ``add_`` / ``relu_`` on its fresh output,
  everywhere), on CPU "onednn" (oneDNN's fused post-ops, ``torch.ops.mkldnn._convolution_pointwise``) and
  "onednn_packed" (the same with the weights reordered once into oneDNN's blocked layout), on CUDA "cudnn"
  (``torch.cudnn_convolution_add_relu``) only when asked for: it has not run on a GPU yet.
- `UnitChain` / `FusionProgram`: plan once per input signature, run many: a residual block's or Sequential's
  units, and a whole fusion module (its branches' blocks and its fusion rows, sums formed in place with the
  downsample chains' adds as conv epilogues), as flat lists of bound steps behind one guard.
- `reordered_head(xs, conv, bn, classifier, resample)`: the HRNetV2 head with its BN folded and its 1x1 conv
  applied per branch before the upsampling (what the fused head kernel computes, in plain PyTorch).
- `LayoutChoice`: the whole model's configuration per input signature, measured on the model's own first calls:
  channels_last or not (see `Inference.channels_last`), and whether the per-conv measured epilogues ("auto")
  beat plain "aten" over the whole forward (a conv measured alone, on warm caches, can favour oneDNN where the
  whole model runs faster without it).

Everything here is eval-only: callers take this path only when the batch norms are in eval mode and no gradient
is needed for the parameters (`unit_applies`); otherwise the modules run as written.
"""
from __future__ import annotations

import contextvars
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import _autotune
from .batchnorm import fold_into_conv
from .hrnet.fusion import UP
from .ops.reference import resample_ref
from .plan import Resample

__all__ = ["Inference", "as_inference", "unit_applies", "conv_unit", "unit_step", "UnitChain", "BlockSteps",
           "SumTerm", "FusionProgram", "reordered_head", "LayoutChoice", "EPILOGUES", "EXPLORE_CALLS",
           "layout_choices"]

EPILOGUES = ("auto", "aten")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# the configuration is settled after each candidate ran once untimed (per-conv measurements happen there) and
# LAYOUT_ROUNDS times timed: the first eval calls of each input signature (at most EXPLORE_CALLS) alternate them
LAYOUT_ROUNDS = 2
_LAYOUTS = ("contiguous", "channels_last")
_MODEL_EPILOGUES = ("aten", "auto")
EXPLORE_CALLS = len(_LAYOUTS) * len(_MODEL_EPILOGUES) * (1 + LAYOUT_ROUNDS)
# the epilogue configuration of the forward running now ("aten" forces it in every conv unit), set by LayoutChoice
_FORWARD_EPILOGUE: "contextvars.ContextVar[Optional[str]]" = contextvars.ContextVar("hrfast_epilogue", default=None)


@dataclass(frozen=True)
class Inference:
    """Options of ``hrfast.patch(model, inference=...)`` (``inference=True`` means ``Inference()``).

    Attributes:
        channels_last: None (default): on CPU, measured on the model's first eval calls of each input signature
            (with the epilogue configurations, they alternate NCHW and channels_last, at most EXPLORE_CALLS calls
            in all, then the fastest stays; `LayoutChoice`); on CUDA, the input's layout (measuring there needs a
            GPU run first). True / False: always / never convert.
        epilogue: "auto" (default): per conv call signature, the fastest measured implementation of conv + bias
            (+ residual add) (+ ReLU) among the device's candidates, kept on CPU only where the whole forward
            measured faster with them than with "aten" everywhere; "aten": always ``F.conv2d`` with in-place
            ``add_`` / ``relu_``.
        cudnn_fused: let "auto" also measure cuDNN's fused conv-bias-add-ReLU on CUDA. Off by default: not yet
            run on a GPU.
        cuda_graphs: reserved: replay a CUDA graph per input signature (captured at the same place the layout is
            chosen). Not built yet (needs a GPU to verify); True raises NotImplementedError.
        streams: reserved: run the branches of each fusion module on separate CUDA streams. Not built yet
            (needs a GPU to verify); True raises NotImplementedError.
    """

    channels_last: Optional[bool] = None
    epilogue: str = "auto"
    cudnn_fused: bool = False
    cuda_graphs: bool = False
    streams: bool = False

    def __post_init__(self):
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise TypeError(f"channels_last must be None or a bool, got {type(self.channels_last).__name__}")
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"epilogue must be one of {EPILOGUES}, got {self.epilogue!r}")
        for name in ("cudnn_fused", "cuda_graphs", "streams"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        for name in ("cuda_graphs", "streams"):
            if getattr(self, name):
                raise NotImplementedError(f"hrfast.Inference({name}=True) is not built yet: it needs a GPU session "
                                          "to verify it")


def as_inference(value) -> Optional[Inference]:
    """The options `patch`'s ``inference=`` argument stands for: None for False, `Inference()` for True."""
    if value is False or value is None:
        return None
    if value is True:
        return Inference()
    if isinstance(value, Inference):
        return value
    raise TypeError(f"inference must be a bool or an hrfast.Inference, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------ one conv unit


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def unit_applies(conv: nn.Conv2d, bn: nn.Module) -> bool:
    """Whether (conv, bn) may run folded now: BN in eval mode, and no gradient wanted for the parameters (the
    folded weights are constants for autograd)."""
    if bn.training:
        return False
    return not torch.is_grad_enabled() or not _needs_grad(conv.weight, conv.bias, bn.weight, bn.bias)


def _onednn_ok(x: Tensor, residual: Optional[Tensor]) -> bool:
    if x.device.type != "cpu" or x.dtype not in _ONEDNN_DTYPES or _needs_grad(x, residual):
        return False
    if x.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if residual is None:
        return True
    channels_last = _is_channels_last(x)
    if x.dtype == torch.bfloat16 and not channels_last:
        return False  # oneDNN falls back to ATen's add_relu there, which has no bf16 kernel
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return residual.dtype == x.dtype and residual.is_contiguous(memory_format=fmt)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _cudnn_ok(x: Tensor, residual: Optional[Tensor], relu: bool) -> bool:
    return (x.device.type == "cuda" and relu and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and not _needs_grad(x, residual))


def _candidates(x: Tensor, residual: Optional[Tensor], relu: bool, options: Inference) -> List[str]:
    if (options.epilogue != "auto" or _FORWARD_EPILOGUE.get() == "aten" or torch.compiler.is_compiling()
            or torch.jit.is_tracing()):
        return ["aten"]
    if torch.backends.mkldnn.is_available() and _onednn_ok(x, residual):
        # packed weights make oneDNN write channels_last whatever the input: only where the input is
        return ["aten", "onednn", "onednn_packed"] if _is_channels_last(x) else ["aten", "onednn"]
    names = ["aten"]
    if options.cudnn_fused and _cudnn_ok(x, residual, relu):
        names.append("cudnn")
    return names


def _conv_args(conv: nn.Conv2d) -> Tuple[List[int], List[int], List[int], int]:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def _conv_epilogue(x, weight, bias, conv, relu, residual):
    out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None:
        out = out.add_(residual)
    return out.relu_() if relu else out


# Each implementation binds, for inputs like (x, residual), the folded weights in the form it needs (layout,
# packed) and the conv's arguments into one call ``step(x[, residual])``: what an eval forward runs per conv.


def _aten(x, unit, bias, conv, relu, residual) -> Callable:
    args = (unit.weight_like(x), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    conv2d = torch.conv2d

    def step(x, residual=None):
        out = conv2d(x, *args)
        if residual is not None:
            out = out.add_(residual)
        return out.relu_() if relu else out
    return step


def _onednn(x, unit, bias, conv, relu, residual, weight=None) -> Callable:
    args = (unit.weight_like(x) if weight is None else weight, bias, *_conv_args(conv))
    if residual is None:
        unary, attr = torch.ops.mkldnn._convolution_pointwise.default, "relu" if relu else "none"
        return lambda x: unary(x, *args, attr, [], "")
    binary, attr = torch.ops.mkldnn._convolution_pointwise.binary, "relu" if relu else None
    return lambda x, residual: binary(x, residual, *args, "add", 1.0, attr, [], "")


def _packed(x, unit, bias, conv, relu, residual) -> Callable:
    """oneDNN with the weights reordered once for this input size (see `_Unit.packed`)."""
    return _onednn(x, unit, bias, conv, relu, residual, unit.packed(x, conv))


def _cudnn(x, unit, bias, conv, relu, residual) -> Callable:
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is None:
        return lambda x: torch.cudnn_convolution_relu(x, unit.weight, bias, *args)
    return lambda x, residual: torch.cudnn_convolution_add_relu(x, unit.weight, residual, 1.0, bias, *args)


_IMPLS: Dict[str, Callable] = {"aten": _aten, "onednn": _onednn, "onednn_packed": _packed, "cudnn": _cudnn}


def _measuring(device: torch.device) -> bool:
    """Measure here and now? Not while tracing (the traced graph fixes the choice), not with
    HRFAST_AUTO_MEASURE=0, not during a CUDA graph capture."""
    if os.environ.get("HRFAST_AUTO_MEASURE", "1") == "0":
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


class _Unit:
    """What the inference mode derived for one conv from its current folded weights: the bound step chosen per
    call signature, and derived forms of the weights (channels_last, packed per input size, column blocks).
    Replaced when the folded weights are (a parameter changed)."""

    __slots__ = ("weight", "steps", "forms", "__weakref__")

    def __init__(self, weight: Tensor):
        self.weight, self.steps, self.forms = weight, {}, {}

    def form(self, key: Hashable, make: Callable[[], Any]):
        found = self.forms.get(key)
        if found is None:
            found = self.forms[key] = make()
        return found

    def weight_like(self, x: Tensor) -> Tensor:
        """The folded weight in x's layout: ATen's CPU convs reorder an NCHW weight for a channels_last input on
        every call (up to 2x the time of a small conv)."""
        if not _is_channels_last(x):
            return self.weight
        return self.form("channels_last", lambda: self.weight.contiguous(memory_format=torch.channels_last))

    def packed(self, x: Tensor, conv: nn.Conv2d) -> Tensor:
        size = tuple(x.shape)
        return self.form(("packed", size), lambda: torch.ops.mkldnn._reorder_convolution_weight(
            self.weight_like(x), *_conv_args(conv), list(size)))


_UNITS: "weakref.WeakKeyDictionary[nn.Conv2d, _Unit]" = weakref.WeakKeyDictionary()


def _unit(conv: nn.Conv2d, weight: Tensor) -> _Unit:
    unit = _UNITS.get(conv)
    if unit is None or unit.weight is not weight:
        unit = _UNITS[conv] = _Unit(weight)
    return unit


def _signature(x: Tensor, residual: Optional[Tensor], conv: nn.Conv2d, relu: bool) -> Hashable:
    return (_autotune.tensor_signature(x), _autotune.tensor_signature(residual), tuple(conv.weight.shape),
            conv.stride, conv.padding, conv.dilation, conv.groups, relu, torch.get_num_threads())


def _choose(x: Tensor, unit: _Unit, bias: Tensor, conv: nn.Conv2d, relu: bool, residual: Optional[Tensor],
            options: Inference) -> str:
    """The implementation for this call: the only candidate, or the measured fastest (`hrfast._autotune`)."""
    names = _candidates(x, residual, relu, options)
    if len(names) == 1 or not _measuring(x.device):
        return names[0]

    def run(candidate: str) -> None:
        step = _IMPLS[candidate](x, unit, bias, conv, relu, residual)
        step(x) if residual is None else step(x, residual)

    return _autotune.choose("conv_unit", _signature(x, residual, conv, relu), x.device, names[0], names, run)


def unit_step(x: Tensor, conv: nn.Conv2d, bn: nn.Module, relu: bool, residual: Optional[Tensor] = None,
              options: Inference = Inference()) -> Callable:
    """``relu?(bn(conv(x)) + residual?)`` prepared for inputs like `x` / `residual` (shape, strides, dtype,
    device): the BN folded into the conv's weights (`fold_into_conv`), the implementation chosen, the weights in
    its form, all bound into ``step(x)`` (``step(x, residual)`` with a residual). Valid while the modules'
    parameters and buffers are unchanged; the caller checked `unit_applies`."""
    weight, bias = fold_into_conv(conv, bn)
    return _bound_step(_unit(conv, weight), x, bias, conv, relu, residual, options)


def _bound_step(unit: _Unit, x: Tensor, bias: Tensor, conv: nn.Conv2d, relu: bool, residual: Optional[Tensor],
                options: Inference) -> Callable:
    """`unit`'s step for inputs like x / residual: bound on first use, chosen by `_choose` (`conv` gives the
    conv's arguments)."""
    key = (x.shape, x.stride(), x.dtype, x.device, None if residual is None else residual.stride(), relu,
           _needs_grad(x, residual), torch.get_num_threads(), options, _FORWARD_EPILOGUE.get())
    step = unit.steps.get(key)
    if step is None:
        name = _choose(x, unit, bias, conv, relu, residual, options)
        step = unit.steps[key] = _IMPLS[name](x, unit, bias, conv, relu, residual)
    return step


def conv_unit(x: Tensor, conv: nn.Conv2d, bn: nn.Module, relu: bool, residual: Optional[Tensor] = None,
              options: Inference = Inference()) -> Tensor:
    """``relu?(bn(conv(x)) + residual?)`` with the BN folded into the conv; the caller checked `unit_applies`.

    Never writes to `x` or `residual` (every in-place step acts on the conv's own fresh output). Per call: the
    fold's cache check and one lookup of the step bound for this signature (`unit_step`); a run of several
    units is cheaper as a `UnitChain`."""
    if torch.compiler.is_compiling():
        weight, bias = fold_into_conv(conv, bn)
        return _conv_epilogue(x, weight, bias, conv, relu, residual)
    step = unit_step(x, conv, bn, relu, residual, options)
    return step(x) if residual is None else step(x, residual)


# ---------------------------------------------------------------------------------- plan once, run many


def _guard(units: Sequence[Any]) -> tuple:
    """Identity, version counter and storage of every parameter and buffer the folds of `units` read, and each
    BN's eps: what a bound step depends on (in-place updates bump versions, `.to()` brings new storage)."""
    state = []
    for u in units:
        conv, bn = u.conv, u.norm
        p, q, b = conv._parameters, bn._parameters, bn._buffers
        for t in (p["weight"], p.get("bias"), q.get("weight"), q.get("bias"), b["running_mean"], b["running_var"]):
            state.append(None if t is None else (id(t), t._version, t.data_ptr()))
        state.append(bn.eps)
    return tuple(state)


class UnitChain:
    """Conv units in a row (``hrfast.hrnet.blocks.ConvUnit``; plain modules between them run as they are), the
    last one optionally adding a residual: a residual block's main path, an nn.Sequential's steps.

    Planned once per input signature, run many times (FlashInfer's split): the first call binds every unit's
    step (`unit_step`: fold, choice, weight forms) while it runs; later calls with the same signature check one
    guard over all the units' parameters and buffers, then call the bound steps, with none of `conv_unit`'s
    per-unit lookups. Programs are kept per signature, the oldest dropped past `MAX_PROGRAMS`."""

    MAX_PROGRAMS = 8
    __slots__ = ("items", "units", "programs")

    def __init__(self, items: Sequence[Any], relus: Optional[Sequence[bool]] = None):
        """`items`: ConvUnits and modules, in order; `relus`: per ConvUnit whether a ReLU ends it (default:
        whether it has an act)."""
        units = [item for item in items if _is_unit(item)]
        relus = [u.act is not None for u in units] if relus is None else list(relus)
        relu_of = dict(zip(map(id, units), relus))
        self.items = tuple((item, relu_of[id(item)]) if _is_unit(item) else (item, None) for item in items)
        self.units = tuple(units)
        self.programs: Dict[Hashable, Tuple[tuple, tuple]] = {}

    def __call__(self, x: Tensor, residual: Optional[Tensor] = None, options: Inference = Inference()) -> Tensor:
        """The chain on x (the caller checked `unit_applies` for every unit); `residual` enters the last unit."""
        key = (x.shape, x.stride(), x.dtype, x.device, None if residual is None else residual.stride(),
               x.requires_grad, torch.is_grad_enabled(), torch.get_num_threads(), options, _FORWARD_EPILOGUE.get())
        guard = _guard(self.units)
        program = self.programs.get(key)
        if program is None or program[0] != guard:
            return self._plan(key, guard, x, residual, options)
        steps = program[1]
        for step in steps[:-1]:
            x = step(x)
        return steps[-1](x) if residual is None else steps[-1](x, residual)

    def _plan(self, key, guard, x: Tensor, residual: Optional[Tensor], options: Inference) -> Tensor:
        steps = []
        last = len(self.items) - 1
        for k, (item, relu) in enumerate(self.items):
            r = residual if k == last else None
            if relu is None:  # a module between the units
                step = item
            else:
                step = unit_step(x, item.conv, item.norm, relu, r, options)
            x = step(x) if r is None else step(x, r)
            steps.append(step)
        self.programs.pop(key, None)
        while len(self.programs) >= self.MAX_PROGRAMS:
            self.programs.pop(next(iter(self.programs)))
        self.programs[key] = (guard, tuple(steps))
        return x


def _is_unit(item: Any) -> bool:
    return hasattr(item, "conv") and hasattr(item, "norm") and not isinstance(item, nn.Module)



# ------------------------------------------------------------------------------ a fusion module as one program


class BlockSteps(NamedTuple):
    """A residual block in a `FusionProgram`: its main-path units (indices into the program's units; each ends in
    a ReLU, the last one after adding the shortcut) and its shortcut's units (None: the identity)."""

    main: Tuple[int, ...]
    shortcut: Optional[Tuple[int, ...]]


class SumTerm(NamedTuple):
    """A term of one fusion row in a `FusionProgram`: "identity" (branch `source` as it is), "up" (one unit,
    then `resample`; None: the module's forward-side default, given per call) or "down" (a chain of units, the
    ReLU after each per `relus`; the last one adds the row's partial sum as its epilogue)."""

    kind: str
    source: int
    units: Tuple[int, ...] = ()
    relus: Tuple[bool, ...] = ()
    resample: Optional[Resample] = None


def _conv_output(conv: nn.Conv2d, shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """(C, H, W) of the conv's output for an input of (C, H, W) `shape` (numeric padding)."""
    hw = ((n + 2 * p - d * (k - 1) - 1) // s + 1
          for n, p, d, k, s in zip(shape[1:], conv.padding, conv.dilation, conv.kernel_size, conv.stride))
    return (conv.out_channels, *hw)


def _resampled(shape: Tuple[int, int, int], resample: Resample, size: Tuple[int, int]) -> Tuple[int, int, int]:
    """(C, H, W) after `resample_ref(., resample, size)`: `size`, or floor(n * s) for a scale factor."""
    if resample.scale_factor is None:
        return (shape[0], *size)
    s = resample.scale_factor
    sy, sx = (s, s) if isinstance(s, (int, float)) else s
    return (shape[0], int(shape[1] * sy), int(shape[2] * sx))


class FusionProgram:
    """An HRNet fusion module's eval forward, ``x[i] = branches[i](x[i])`` then ``out[i] = relu(sum_j
    term_ij(x[j]))``, as one flat program of bound conv steps (`unit_step`), planned once per input signature
    like `UnitChain`: one guard over all its units per call, and none of the per-block and per-entry module calls,
    guards and readings that running the module's own forward costs (on CPU a few percent of a small model).

    Each row's sum is formed in place on fresh tensors: it starts from the identity term, adds the upsampled
    terms, then the downsample chains, whose last conv adds the partial sum as its epilogue (and the row's ReLU,
    on the row's last term). The caller's tensors are never written (the list `xs` gets the branches' outputs,
    as the original forward does)."""

    MAX_PROGRAMS = 8
    __slots__ = ("units", "branches", "rows", "programs")

    def __init__(self, units: Sequence[Any], branches: Sequence[Sequence[BlockSteps]],
                 rows: Sequence[Sequence[SumTerm]]):
        """`units`: ConvUnits (``hrfast.hrnet.blocks``); `branches`: per branch its blocks; `rows`: per output its
        terms, the identity first, then the "up" terms, then the "down" ones."""
        self.units = tuple(units)
        self.branches = tuple(map(tuple, branches))
        self.rows = tuple(map(tuple, rows))
        self.programs: Dict[Hashable, Tuple[tuple, Optional[list]]] = {}

    def __call__(self, xs: List[Tensor], default: Optional[Resample], options: Inference = Inference()
                 ) -> Optional[List[Tensor]]:
        """The module's outputs for `xs` (updated in place with the branches' outputs), or None when these
        inputs' shapes do not fit the module (the original forward then runs, and raises as it does). The caller
        checked `unit_applies` for every unit and that no hook would be skipped."""
        n = len(self.branches)
        grad = torch.is_grad_enabled()
        key = (tuple((x.shape, x.stride(), x.dtype, x.device, grad and x.requires_grad) for x in xs[:n]), grad,
               torch.get_num_threads(), options, _FORWARD_EPILOGUE.get(), default)
        guard = _guard(self.units)
        program = self.programs.get(key)
        if program is None or program[0] != guard:
            steps = [None] * len(self.units) if self._fits(xs[:n], default) else None
            self.programs.pop(key, None)
            while len(self.programs) >= self.MAX_PROGRAMS:
                self.programs.pop(next(iter(self.programs)))
            program = self.programs[key] = (guard, steps)
        steps = program[1]
        return None if steps is None else self._run(xs, default, options, steps)

    def _fits(self, xs: Sequence[Tensor], default: Optional[Resample]) -> bool:
        """Whether every conv, residual and sum of the program gets the shapes it expects (a residual epilogue
        with another shape would not raise as the original's ``+`` does): propagated from the input shapes."""
        if any(x.dim() != 4 or x.dtype != xs[0].dtype or x.device != xs[0].device for x in xs):
            return False
        shapes = []
        for x, blocks in zip(xs, self.branches):
            shape = tuple(x.shape[1:])
            for block in blocks:
                short = self._through(block.shortcut or (), shape)
                shape = self._through(block.main, shape)
                if shape != short:
                    return False
            shapes.append(shape)
        for i, terms in enumerate(self.rows):
            for term in terms[1:]:
                shape = self._through(term.units, shapes[term.source])
                resample = term.resample or default
                if term.kind == UP:
                    if resample is None:
                        return False
                    shape = _resampled(shape, resample, shapes[i][1:])
                if shape != shapes[i]:
                    return False
        return True

    def _through(self, units: Sequence[int], shape: Tuple[int, int, int]) -> Optional[Tuple[int, int, int]]:
        for k in units:
            conv = self.units[k].conv
            if shape is None or shape[0] != conv.in_channels:
                return None
            shape = _conv_output(conv, shape)
        return shape

    def _step(self, steps: list, k: int, x: Tensor, relu: bool, residual: Optional[Tensor],
              options: Inference) -> Tensor:
        """Unit k on x (bound on the first call of the signature)."""
        step = steps[k]
        if step is None:
            unit = self.units[k]
            step = steps[k] = unit_step(x, unit.conv, unit.norm, relu, residual, options)
        return step(x) if residual is None else step(x, residual)

    def _run(self, xs: List[Tensor], default: Optional[Resample], options: Inference, steps: list) -> List[Tensor]:
        run = self._step
        for i, blocks in enumerate(self.branches):
            x = xs[i]
            for main, shortcut in blocks:
                r = x
                for k in shortcut or ():
                    r = run(steps, k, r, False, None, options)
                for k in main[:-1]:
                    x = run(steps, k, x, True, None, options)
                x = run(steps, main[-1], x, True, r, options)
            xs[i] = x
        return [self._row(terms, xs, default, options, steps) for terms in self.rows]

    def _row(self, terms: Sequence[SumTerm], xs: List[Tensor], default: Optional[Resample], options: Inference,
             steps: list) -> Tensor:
        total = xs[terms[0].source]  # the identity term: the caller's, never written
        owned = relu_done = False
        last = len(terms) - 1
        for n, term in enumerate(terms[1:], 1):
            h = xs[term.source]
            if term.kind == UP:
                up = resample_ref(self._step(steps, term.units[0], h, False, None, options),
                                  term.resample or default, total.shape[-2:])
                total = total.add_(up) if owned else up.add_(total)
            else:
                for k, relu in zip(term.units[:-1], term.relus):
                    h = self._step(steps, k, h, relu, None, options)
                relu_done = n == last
                total = self._step(steps, term.units[-1], h, relu_done, total, options)
            owned = True
        if relu_done:
            return total
        return total.relu_() if owned else total.relu()


def reordered_head(xs: Sequence[Tensor], conv: nn.Conv2d, bn: nn.Module, classifier: nn.Module,
                   resample: Resample, options: Inference = Inference()) -> Tensor:
    """The HRNetV2 head ``classifier(relu(bn(conv1x1(cat[x0, Up(x1), ...]))))`` with the BN folded into the 1x1
    conv and the conv moved before the upsampling (``conv(cat) = W0 x0 + sum_j Up(Wj xj) + b``: Up is linear with
    weights summing to 1), so each branch is projected at its own resolution: W48 at 1024x2048 needs 10.3 instead
    of 69.7 GMACs for it (`hrfast.flops.head_reorder_macs`). The upsampled projections are summed in place, then
    ``W0 x0 + b`` adds them and applies the ReLU as its epilogue (one conv unit step, its implementation measured:
    on CPU oneDNN's post-ops spare three full-resolution passes of 15C channels: bias fill, add, ReLU). The
    plain-PyTorch form of what the fused head kernel computes; eval only (the caller checked `unit_applies`)."""
    weight, bias = fold_into_conv(conv, bn)
    unit = _unit(conv, weight)
    channels = tuple(x.shape[1] for x in xs)
    channels_last = _is_channels_last(xs[0])
    blocks = unit.form(("columns", channels, channels_last), lambda: [
        _Unit(w.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format))
        for w in weight.split(channels, dim=1)])
    size = tuple(xs[0].shape[2:])
    ups = None
    for x, block in zip(xs[1:], blocks[1:]):
        up = resample_ref(F.conv2d(x, block.weight), resample, size)
        ups = up if ups is None else ups.add_(up)
    if torch.compiler.is_compiling() or ups is None or ups.dtype != xs[0].dtype:
        out = F.conv2d(xs[0], blocks[0].weight, bias)
        return classifier((out if ups is None else out.add_(ups)).relu_())
    step = _bound_step(blocks[0], xs[0], bias, conv, True, ups, options)
    return classifier(step(xs[0], ups))


# ------------------------------------------------------------------------------------------------ layout


def _map_tensors(value, fn):
    """fn applied to the 4-D floating tensors of `value`, one container level deep (lists, tuples, dicts)."""
    def one(v):
        return fn(v) if isinstance(v, Tensor) and v.dim() == 4 and v.is_floating_point() else v

    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(one(v) for v in value)
    if isinstance(value, dict):
        return {k: one(v) for k, v in value.items()}
    return one(value)


def _first_image(args: Sequence[Any]) -> Optional[Tensor]:
    for a in args:
        for v in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(v, Tensor) and v.dim() == 4 and v.is_floating_point():
                return v
    return None


def _to_channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _to_contiguous(t: Tensor) -> Tensor:
    return t.contiguous()


def _configurations(options: Inference) -> Tuple[str, ...]:
    """The model configurations "<layout>+<epilogue>" that `options` leave open, in measuring order."""
    layouts = _LAYOUTS if options.channels_last is None else (_LAYOUTS[options.channels_last],)
    epilogues = _MODEL_EPILOGUES if options.epilogue == "auto" else (options.epilogue,)
    return tuple(f"{layout}+{epilogue}" for layout in layouts for epilogue in epilogues)


class LayoutChoice:
    """The configuration of one patched model per input signature (shapes, dtype, device, threads): memory layout
    (NCHW or channels_last) and epilogues ("aten" in every conv unit, or "auto": each conv's measured fastest).

    Measured online on CPU: the first calls of a signature alternate the open configurations (each one's first
    call untimed: the per-conv measurements happen there), then the one with the smallest time stays (the
    minimum of its timed calls: other processes only ever add time, and a median of two lets one slow call
    decide). Only the input is converted: the folded weights follow the activations' layout, so every conv, add and ReLU after it
    runs in that layout; 4-D outputs are converted back when the input was NCHW (same strides as the eager
    model). On CUDA nothing is measured: the input's layout (or the one `Inference.channels_last` names), and
    the epilogues per `Inference`."""

    def __init__(self):
        self.times: Dict[Hashable, Dict[str, List[float]]] = {}
        self.chosen: Dict[Hashable, str] = {}

    def call(self, forward: Callable, args: tuple, kwargs: dict, options: Inference):
        """forward(*args, **kwargs) in the configuration chosen (or being measured) for these inputs."""
        image = _first_image(args)
        if (image is None or _is_channels_last(image) or _needs_grad(image) or torch.compiler.is_compiling()
                or torch.jit.is_tracing()):
            return forward(*args, **kwargs)
        key = self._key(image, args)
        config = self._configuration(key, image, options)
        if config is None:
            return forward(*args, **kwargs)
        t0 = time.perf_counter()
        out = self._run(forward, args, kwargs, config)
        if key in self.times and key not in self.chosen:
            self.times[key][config].append(time.perf_counter() - t0)
            self._settle(key)
        return out

    @staticmethod
    def _key(image: Tensor, args: tuple) -> Hashable:
        shapes = tuple(tuple(t.shape) for a in args for t in (a if isinstance(a, (list, tuple)) else (a,))
                       if isinstance(t, Tensor))
        return shapes, image.dtype, image.device.type, torch.get_num_threads()

    def _configuration(self, key: Hashable, image: Tensor, options: Inference) -> Optional[str]:
        """The configuration of this call, or None to leave the input and the epilogues alone."""
        configs = _configurations(options)
        if image.device.type != "cpu" or not _measuring(image.device):
            return None if options.channels_last is None else f"{_LAYOUTS[options.channels_last]}+{options.epilogue}"
        if len(configs) == 1:
            return configs[0]
        if key in self.chosen:
            return self.chosen[key]
        runs = self.times.setdefault(key, {name: [] for name in configs})
        return min(configs, key=lambda name: len(runs[name]))  # alternate, in order

    @staticmethod
    def _run(forward, args, kwargs, config: str):
        layout, epilogue = config.split("+")
        if layout == "channels_last":
            args = [_map_tensors(a, _to_channels_last) for a in args]
        token = _FORWARD_EPILOGUE.set(epilogue)
        try:
            out = forward(*args, **kwargs)
        finally:
            _FORWARD_EPILOGUE.reset(token)
        return _map_tensors(out, _to_contiguous)

    def _settle(self, key: Hashable) -> None:
        runs = self.times[key]
        if all(len(t) > LAYOUT_ROUNDS for t in runs.values()):
            self.chosen[key] = min(runs, key=lambda name: min(runs[name][1:]))


def layout_choices(model: nn.Module) -> List[Tuple[Hashable, str, Dict[str, float]]]:
    """(input signature, configuration "<layout>+<epilogue>", fastest seconds per configuration measured) of every
    configuration the inference-patched `model` chose by measurement."""
    out = []
    for module in model.modules():
        config = getattr(module.__dict__.get("forward"), "config", None)
        layout = getattr(config, "layout", None)
        if isinstance(layout, LayoutChoice):
            for key, name in layout.chosen.items():
                out.append((key, name, {k: min(v[1:]) for k, v in layout.times[key].items()}))
    return out
