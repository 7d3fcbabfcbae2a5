"""The inference mode of `hrfast.patch` (``inference=True`` or an `hrfast.Inference`): what it patches.

On top of what `patch` does anyway (fusion steps, heads), with instance-level forwards like every other patch
(so parameters, buffers, `state_dict` keys and submodules are untouched and `hrfast.unpatch` restores all):

- residual blocks (`hrfast.hrnet.blocks.describe_residual_block`: BasicBlock / Bottleneck of every code base):
  each conv with its BN folded in, ``conv + bias + ReLU`` and ``conv + bias + residual + ReLU`` as one call each
  (`hrfast.inference.conv_unit`);
- plain nn.Sequentials holding conv -> BN [-> ReLU] (transitions, shortcuts, the links of the fusion step's
  strided 3x3 downsample chains, heads): the same per unit, other members run as they are;
- the HRNet stem (conv1 -> bn1, conv2 -> bn2, called one by one by the model's forward): the conv runs folded
  and the BN passes its input through, both deciding from the same state at the same call;
- fusion modules and heads that `patch` took over: where hrfast's fused ops would run their PyTorch reference
  (CPU), the module's own forward (in training: the same math as the reference, faster on CPU); in eval there a
  fusion module runs as one `hrfast.inference.FusionProgram` (its branches' blocks and its fusion rows as bound
  conv steps, BN folded, the last link of each downsample chain adding the row's partial sum as its epilogue;
  the module's own forward, with each piece folded on its own, where the program cannot run), and a head runs
  `hrfast.inference.reordered_head` (BN folded, the 1x1 conv per branch before the upsampling); on CUDA the
  fused ops run (chain links folded, the last BN as the op's per-channel affine, applied in the kernel);
- the model itself: its memory layout and epilogue configuration per input signature
  (`hrfast.inference.LayoutChoice`); the place where
  CUDA graphs would be captured and replayed per signature.

Every forward takes the folded path only in eval mode with no gradient wanted for the parameters, and only
where no hook would be skipped (instance hooks on the modules it folds, or global module hooks); otherwise the
module runs as written, so `model.train()` computes exactly what it did before patching.
"""
from __future__ import annotations

import itertools
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules import module as module_globals

from ..backends import resolve
from ..hrnet.blocks import (ConvUnit, ResidualBlock, describe_residual_block, describe_stem, sequential_steps,
                            unit_problem)
from ..hrnet.fusion import DOWN, IDENTITY, UP, describe_fuse_layers
from ..hrnet.head import head_layers
from ..inference import (BlockSteps, FusionProgram, Inference, LayoutChoice, SumTerm, UnitChain, as_inference,
                         conv_unit, reordered_head, unit_applies)
from .core import Adapter, PatchedForward, PatchRow
from .fusion import FusionConfig
from .head import HeadConfig, fusable_branches, replay_official_trunk

__all__ = ["InferenceAdapter", "InferencePlanner", "BlockConfig", "SequentialConfig", "StemConfig", "EvalPath",
           "RootConfig"]

INFERENCE = "inference"
PATCHED, SKIPPED, UNPATCHED = "patched", "skipped", "unpatched"


# ------------------------------------------------------------------------------------------ hook guard


_TRAINING = operator.attrgetter("training")
_FORWARD_HOOKS = operator.attrgetter("_forward_hooks", "_forward_pre_hooks")


def _hooks_free(modules: Sequence[nn.Module]) -> bool:
    """No forward hook that the folded path would skip: none on these modules, no global module hook."""
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return False
    return not any(map(any, map(_FORWARD_HOOKS, modules)))  # C-level maps: runs for every block of every forward


def _ready(units: Sequence[ConvUnit], modules: Sequence[nn.Module]) -> bool:
    """Whether these units may run folded now (eval, no parameter gradient) without skipping a hook. Not under
    torch.compile: there the parameters are graph inputs, so a traced fold would be recomputed on every call
    (measured on CPU: 0.45x eager for W18-small), while inductor fuses BN + ReLU into one pass itself."""
    if torch.compiler.is_compiling():
        return False
    for u in units:
        if not unit_applies(u.conv, u.norm):
            return False
    return _hooks_free(modules)


def _unfolded(module: nn.Module) -> bool:
    """Shortcut before any reading: under torch.compile nothing folds, and a module training with gradients
    enabled has parameters that want them (a frozen module in train mode merely loses the fold: still exact).
    Keeps the patched training forward within ~1 us per module of eager's."""
    return (module.training and torch.is_grad_enabled()) or torch.compiler.is_compiling()


# one structural reading per module, redone when its children change (a module swapped after patching): keyed by
# id, each entry removed by its module's weakref callback (a WeakKeyDictionary lookup is Python code, and this
# one runs for every block of every eval forward)
_READINGS: Dict[int, tuple] = {}


def _forget(key: int) -> Callable[[weakref.ref], None]:
    return lambda ref: _READINGS.pop(key, None) if _READINGS.get(key, (None,))[0] is ref else None


def _reading(module: nn.Module, read: Callable[[nn.Module], Any]):
    """The cached structural reading of `module`. Eager only: callers check `torch.compiler.is_compiling()`
    first (dynamo tracing a lookup keyed by module ids failed in CI's full run)."""
    stamp = tuple(module._modules.values())  # compared by identity (modules compare as objects)
    hit = _READINGS.get(id(module))
    if hit is None or hit[0]() is not module or hit[1] != stamp:
        key = id(module)
        hit = _READINGS[key] = (weakref.ref(module, _forget(key)), stamp, read(module))
    return hit[2]


class _Folded(NamedTuple):
    """A block's or Sequential's reading for the folded path: the structure (`ResidualBlock` / the steps), the
    chain of its units, their norms, and every module whose hooks the folded path would skip."""

    structure: Any
    chain: UnitChain
    norms: Tuple[nn.Module, ...]
    modules: Tuple[nn.Module, ...]


def _ready_now(folded: _Folded) -> bool:
    """`_ready` for a reading, the common case (no gradients, checked by the caller under torch.compile) without
    per-unit calls."""
    if torch.is_grad_enabled():
        return _ready(folded.chain.units, folded.modules)
    return not any(map(_TRAINING, folded.norms)) and _hooks_free(folded.modules)


# ------------------------------------------------------------------------------------------------ configs


def _read_block(module: nn.Module) -> Union[_Folded, str, None]:
    """The block's `_Folded` reading, or the reason it is left alone (a str)."""
    block = describe_residual_block(module)
    if isinstance(block, str):
        return block
    chain = UnitChain(block.units, relus=[True] * len(block.units))
    return _Folded(block, chain, tuple(u.norm for u in block.units), block.folded_modules)


def _read_sequential(module: nn.Module) -> Optional[_Folded]:
    """The Sequential's `_Folded` reading (its steps), or None."""
    steps = sequential_steps(module)
    if steps is None:
        return None
    units = [s for s in steps if isinstance(s, ConvUnit)]
    return _Folded(steps, UnitChain(steps), tuple(u.norm for u in units), tuple(m for u in units for m in u.modules))


@dataclass(frozen=True)
class BlockConfig:
    """A residual block: main path as conv units, ``relu(last unit + shortcut)`` as one call."""

    options: Inference

    def run(self, module: nn.Module, x):
        # nothing folds under compile (`_ready`), nor while training with gradients: the original forward at once
        if _unfolded(module):
            return type(module).forward(module, x)
        folded = _reading(module, _read_block)
        if isinstance(folded, str) or not isinstance(x, Tensor) or not _ready_now(folded):
            return type(module).forward(module, x)
        shortcut = folded.structure.shortcut
        return folded.chain(x, x if shortcut is None else shortcut(x), self.options)


@dataclass(frozen=True)
class SequentialConfig:
    """An nn.Sequential with conv -> BN [-> ReLU] units: each unit as one call, the other members as they are."""

    options: Inference

    def run(self, module: nn.Sequential, x):
        folded = None if _unfolded(module) else _reading(module, _read_sequential)
        if folded is None or not isinstance(x, Tensor):
            return nn.Sequential.forward(module, x)
        if _ready_now(folded):
            return folded.chain(x, None, self.options)
        for step in folded.structure:  # some unit cannot fold now (a hook on it): unit by unit
            if not isinstance(step, ConvUnit):
                x = step(x)
            elif isinstance(x, Tensor) and _ready((step,), step.modules):
                x = conv_unit(x, step.conv, step.norm, step.act is not None, options=self.options)
            else:
                for m in step.modules:
                    x = m(x)
        return x


@dataclass(frozen=True)
class StemConfig:
    """One side of a stem pair ``parent.<bn>(parent.<conv>(x))``: the conv runs folded, the BN passes through.

    Both sides decide with `_folds`, from the same state, so within one forward they agree; the pair is read from
    the parent at every call (a module swapped in later is not folded)."""

    options: Inference
    parent: nn.Module
    conv: str
    norm: str

    def _folds(self) -> bool:
        conv, bn = self.parent._modules.get(self.conv), self.parent._modules.get(self.norm)
        return (isinstance(conv, nn.Conv2d) and bn is not None and _patched_by(conv, self) and _patched_by(bn, self)
                and _ready((ConvUnit(conv, bn, None),), (conv, bn)))

    def run(self, module: nn.Module, x):
        folds = self._folds() and isinstance(x, Tensor)
        if module is self.parent._modules.get(self.conv):
            return conv_unit(x, module, self.parent._modules[self.norm], False, options=self.options) if folds \
                else type(module).forward(module, x)
        return x if folds else type(module).forward(module, x)


def _patched_by(module: nn.Module, config) -> bool:
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, PatchedForward) and fwd.config == config


def _device_of(args) -> Optional[Any]:
    for a in args:
        for v in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(v, Tensor):
                return v.device
    return None


@dataclass(frozen=True)
class EvalPath:
    """A fusion module or head that `patch` took over. Where its fused op would run the PyTorch reference (CPU):
    in eval, a fusion module runs its own forward (whose conv -> BN pieces are folded) and a head
    `reordered_head`; in training, the module's own forward (the reference computes the same, with batch
    statistics assembled op by op: slower than eager's batch norm on CPU). Elsewhere the patched forward."""

    options: Inference
    base_adapter: Adapter
    base_config: Any

    def run(self, module: nn.Module, *args, **kwargs):
        device = _device_of(args)
        if device is None or resolve(self.base_config.backend, device) != "reference":
            return self.base_adapter.forward(module, self.base_config, *args, **kwargs)
        if not module.training and len(args) == 1 and not kwargs:
            out = None
            # the V2 concat head only: HRFPN and mmpose's pair are "head" patches with configs of their own
            if isinstance(self.base_config, HeadConfig):
                out = _eval_head(module, self.base_config, args[0], self.options)
            elif isinstance(self.base_config, FusionConfig):
                out = _eval_fusion(module, self.base_config, args[0], self.options)
            if out is not None:
                return out
        return type(module).forward(module, *args, **kwargs)


def _eval_head(module: nn.Module, config, inputs, options: Inference) -> Optional[Tensor]:
    """The patched head's eval forward on CPU: its branches gathered as the head adapter gathers them
    (`hrfast._patch.head`), then `reordered_head`; None when the layers cannot run folded now (then the
    original forward runs)."""
    source = module if config.layout == "mmseg" else getattr(module, config.attr)
    layers = head_layers(source, "mmseg" if config.layout == "mmseg" else "sequential")
    if not _ready((ConvUnit(layers.conv, layers.norm, layers.act),), layers):
        return None
    if config.layout == "mmseg":
        xs = [inputs[i] for i in module.in_index]
        if not fusable_branches(xs):
            return None
    else:
        xs = list(module.forward_backbone(inputs) if config.trunk == "forward_backbone"
                  else replay_official_trunk(module, inputs))
    return reordered_head(xs, layers.conv, layers.norm, layers.classifier, config.resample_for(module), options)


class _FusionReading(NamedTuple):
    """A fusion module's reading for its eval program: the `FusionProgram`, the children dicts of every module
    below it with their values as read (a module swapped in or added anywhere below changes them), the modules
    whose hooks the program would skip (all of them) and its units' norms."""

    program: FusionProgram
    dicts: Tuple[dict, ...]
    members: list
    modules: Tuple[nn.Module, ...]
    norms: Tuple[nn.Module, ...]


def _members(dicts: Sequence[dict]) -> list:
    return list(itertools.chain.from_iterable(map(dict.values, dicts)))


def _own_forward(module: nn.Module) -> bool:
    """No instance forward, or one of the inference mode's own (it computes what the program does)."""
    fwd = module.__dict__.get("forward")
    return fwd is None or (isinstance(fwd, PatchedForward) and isinstance(fwd.adapter, InferenceAdapter))


def _read_fusion(module: nn.Module) -> Optional[_FusionReading]:
    """The `FusionProgram` of a fusion module whose branches are nn.Sequentials of residual blocks and whose
    fuse_layers entries are conv -> BN units (HRNet's, in every code base); None for anything else (its own
    forward runs)."""
    below = list(module.modules())
    branches = getattr(module, "branches", None)
    if not isinstance(branches, nn.ModuleList) or len(branches) < 2 or not all(map(_own_forward, below[1:])):
        return None
    try:
        description = describe_fuse_layers(module.fuse_layers, None, require_resample=False)
    except (TypeError, ValueError):
        return None
    if description.num_inputs != len(branches):
        return None
    units: List[ConvUnit] = []

    def add(found) -> Optional[Tuple[int, ...]]:
        if found is None or not all(isinstance(u, ConvUnit) for u in found):
            return None
        units.extend(found)
        return tuple(range(len(units) - len(found), len(units)))

    blocks = [[_block_steps(m, add) for m in branch] if isinstance(branch, nn.Sequential)
              and type(branch).forward is nn.Sequential.forward else [None] for branch in branches]
    rows = [_row_terms(module.fuse_layers[i], row, i, add) for i, row in enumerate(description.rows)]
    if any(b is None for branch in blocks for b in branch) or any(r is None for r in rows):
        return None
    dicts = tuple(m._modules for m in below)
    return _FusionReading(FusionProgram(units, blocks, rows), dicts, _members(dicts), tuple(below[1:]),
                          tuple(u.norm for u in units))


def _block_steps(member: nn.Module, add) -> Optional[BlockSteps]:
    block = describe_residual_block(member)
    if not isinstance(block, ResidualBlock):
        return None
    shortcut = None
    if block.shortcut is not None:
        steps = sequential_steps(block.shortcut)
        if steps is None or any(isinstance(s, ConvUnit) and s.act is not None for s in steps):
            return None
        shortcut = add(steps)
        if shortcut is None:
            return None
    main = add(block.units)
    return BlockSteps(main, shortcut)


def _row_terms(entries: nn.ModuleList, row, i: int, add) -> Optional[List[SumTerm]]:
    """Row i's terms: the identity, then the upsampled ones, then the downsample chains (`FusionProgram`)."""
    terms = [SumTerm(IDENTITY, i)]
    for j, term in enumerate(row):
        if term.kind == UP:
            if len(term.pre) != 1 or unit_problem(term.pre[0], term.last, "") is not None:
                return None
            terms.append(SumTerm(UP, j, add([ConvUnit(term.pre[0], term.last, None)]), (False,), term.resample))
    for j, term in enumerate(row):
        if term.kind == DOWN:
            links = [sequential_steps(link) for link in entries[j]]
            if any(steps is None or len(steps) != 1 for steps in links) or links[-1][0].act is not None:
                return None
            found = add([steps[0] for steps in links])
            if found is None:
                return None
            terms.append(SumTerm(DOWN, j, found, tuple(steps[0].act is not None for steps in links)))
    return terms


def _eval_fusion(module: nn.Module, config: FusionConfig, xs, options: Inference) -> Optional[List[Tensor]]:
    """The patched fusion module's eval forward on the reference backend (CPU) as one `FusionProgram`; None when
    it cannot run now (then the module's own forward runs, with every conv -> BN piece folded on its own)."""
    if type(xs) is not list or torch.compiler.is_compiling():
        return None
    reading = _reading(module, _read_fusion)
    if reading is not None and _members(reading.dicts) != reading.members:  # a module swapped deeper down
        _READINGS.pop(id(module), None)
        reading = _reading(module, _read_fusion)
    if reading is None or len(xs) < len(reading.program.branches):
        return None
    if not all(isinstance(x, Tensor) for x in xs[:len(reading.program.branches)]):
        return None
    if not config.fuses(xs):
        return None
    if torch.is_grad_enabled():
        if not _ready(reading.program.units, reading.modules):
            return None
    elif any(map(_TRAINING, reading.norms)) or not _hooks_free(reading.modules):
        return None
    return reading.program(xs, config.default_resample(module), options)


@dataclass(frozen=True)
class RootConfig:
    """The model: its forward (patched or not) in the memory layout and epilogue configuration chosen per input
    signature."""

    options: Inference
    layout: LayoutChoice = field(default_factory=LayoutChoice, compare=False)
    base_adapter: Optional[Adapter] = None
    base_config: Any = None

    def run(self, module: nn.Module, *args, **kwargs):
        if self.base_adapter is None:
            def forward(*a, **k):
                return type(module).forward(module, *a, **k)
        else:
            def forward(*a, **k):
                return self.base_adapter.forward(module, self.base_config, *a, **k)
        if module.training:
            return forward(*args, **kwargs)
        return self.layout.call(forward, args, kwargs, self.options)


class InferenceAdapter(Adapter):
    """Runs every inference-mode forward: ``config.run(module, ...)``. Its kind is that of the patch it wraps
    (so ``patch(head=False)`` still finds a wrapped head), else "inference"."""

    def __init__(self, kind: str = INFERENCE):
        self.kind = kind

    def forward(self, module: nn.Module, config, *args, **kwargs):
        return config.run(module, *args, **kwargs)

    def __eq__(self, other) -> bool:
        return type(other) is InferenceAdapter and other.kind == self.kind

    def __hash__(self) -> int:
        return hash((InferenceAdapter, self.kind))


# ------------------------------------------------------------------------------------------------ planner


def _unwrapped(fwd: Optional[PatchedForward]):
    """(adapter, config) of the fusion / head patch under any inference wrappers; (None, None) when there is none
    (no patch, or an inference forward of its own)."""
    adapter, config = (None, None) if fwd is None else (fwd.adapter, fwd.config)
    while isinstance(config, (EvalPath, RootConfig)):
        adapter, config = config.base_adapter, config.base_config
    if adapter is None or isinstance(adapter, InferenceAdapter):
        return None, None
    return adapter, config


def _install(module: nn.Module, config, kind: str = INFERENCE) -> None:
    module.__dict__["forward"] = PatchedForward(module, InferenceAdapter(kind), config)


def _foreign(module: nn.Module) -> Optional[str]:
    fwd = module.__dict__.get("forward")
    if fwd is None or isinstance(fwd, PatchedForward):
        return None
    return f"its instance already has its own forward ({fwd!r}), set by something other than hrfast; left alone"


class InferencePlanner:
    """What `patch` calls for its ``inference=`` argument (registered with `core.register_inference`)."""

    @staticmethod
    def options(value) -> Optional[Inference]:
        return as_inference(value)

    def apply(self, model: nn.Module, options: Optional[Inference]) -> List[PatchRow]:
        """Installs (options) or removes (None) the inference forwards of `model`; report rows."""
        if options is None:
            return self._remove(model)
        rows: List[PatchRow] = []
        for name, module in model.named_modules():
            rows += self._patch_one(name, module, options)
            rows += self._patch_stem(name, module, options)
        rows += self._patch_root(model, options)
        return rows

    @staticmethod
    def _row(name: str, module: nn.Module, status: str, detail: str) -> PatchRow:
        return PatchRow(name, type(module).__name__, INFERENCE, status, detail)

    def _patch_one(self, name: str, module: nn.Module, options: Inference) -> List[PatchRow]:
        fwd = module.__dict__.get("forward")
        adapter, config = _unwrapped(fwd)
        if adapter is not None and adapter.kind in ("fusion", "head"):
            _install(module, EvalPath(options, adapter, config), adapter.kind)
            how = ("its own forward with the conv -> BN pieces folded" if adapter.kind == "fusion"
                   else "the head reordered (1x1 conv per branch before the upsampling) with its BN folded")
            return [self._row(name, module, PATCHED, f"{adapter.kind}: in eval on the reference backend (CPU) "
                              f"{how}; elsewhere the fused op")]
        if isinstance(fwd, PatchedForward) and isinstance(fwd.config, StemConfig):
            return []  # a stem member, patched from its parent
        block = describe_residual_block(module)
        steps = sequential_steps(module) if block is None else None
        if block is None and steps is None:
            return []
        problem = block if isinstance(block, str) else _foreign(module)
        if problem:
            return [self._row(name, module, SKIPPED, problem)]
        if block is not None:
            _install(module, BlockConfig(options))
            what = " + ".join(f"conv{k + 1}" for k in range(len(block.units)))
            shortcut = "identity" if block.shortcut is None else type(block.shortcut).__name__
            return [self._row(name, module, PATCHED, f"{block.kind}: {what} with BN folded, ReLU and the residual "
                              f"add ({shortcut} shortcut) as conv epilogues")]
        _install(module, SequentialConfig(options))
        units = sum(isinstance(s, ConvUnit) for s in steps)
        return [self._row(name, module, PATCHED, f"Sequential: {units} conv -> BN unit(s) folded, "
                          "a following ReLU as the conv epilogue")]

    def _patch_stem(self, name: str, module: nn.Module, options: Inference) -> List[PatchRow]:
        pairs = describe_stem(module)
        if pairs is None:
            return []
        if isinstance(pairs, str):
            return [self._row(name, module, SKIPPED, pairs)]
        rows = []
        for conv_name, norm_name in pairs:
            conv, bn = module._modules[conv_name], module._modules[norm_name]
            problem = _foreign(conv) or _foreign(bn)
            prefix = f"{name}." if name else ""
            if problem:
                rows.append(self._row(prefix + conv_name, conv, SKIPPED, problem))
                continue
            config = StemConfig(options, module, conv_name, norm_name)
            _install(conv, config)
            _install(bn, config)
            rows.append(self._row(prefix + conv_name, conv, PATCHED, f"stem: {norm_name} folded into {conv_name}, "
                                  f"{norm_name} passes its input through"))
        return rows

    def _patch_root(self, model: nn.Module, options: Inference) -> List[PatchRow]:
        problem = _foreign(model)
        if problem:
            return [self._row("", model, SKIPPED, problem)]
        fwd = model.__dict__.get("forward")
        if fwd is None:
            adapter, config = None, None
        elif isinstance(fwd.config, RootConfig):  # from an earlier patch, and nothing re-patched the model since
            adapter, config = fwd.config.base_adapter, fwd.config.base_config
        else:  # fresh from this patch: the fusion / head / inference forward of the model itself
            adapter, config = fwd.adapter, fwd.config
        kind = INFERENCE if adapter is None else adapter.kind
        _install(model, RootConfig(options, base_adapter=adapter, base_config=config), kind)
        how = ("as given" if options.channels_last is False else "channels_last" if options.channels_last
               else "measured per input signature on CPU (first calls), as given on CUDA")
        return [self._row("", model, PATCHED, f"model: memory layout {how}; epilogues {options.epilogue!r}"
                          + (" (per conv, kept where the whole forward measured faster)" if options.epilogue == "auto"
                             else ""))]

    @staticmethod
    def _remove(model: nn.Module) -> List[PatchRow]:
        rows = []
        for name, module in model.named_modules():
            fwd = module.__dict__.get("forward")
            if isinstance(fwd, PatchedForward) and isinstance(fwd.adapter, InferenceAdapter):
                adapter, config = _unwrapped(fwd)
                if adapter is None:
                    del module.__dict__["forward"]
                else:
                    module.__dict__["forward"] = PatchedForward(module, adapter, config)
                rows.append(PatchRow(name, type(module).__name__, INFERENCE, UNPATCHED,
                                     "inference=False: inference forward removed"))
        return rows
