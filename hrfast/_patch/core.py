"""The patch machinery shared by every adapter: the walk over a model, the report, the instance-level forward.

How a module is patched: its *instance* gets a `forward` attribute (a `PatchedForward` stored in
``module.__dict__``), which `nn.Module.__call__` finds before the class's `forward`. Nothing else changes: no
submodule, parameter or buffer is added, so `state_dict()` keys and values stay those of the unpatched model, and
the class (hence every other instance of it) is untouched. `unpatch` deletes the attribute.

`PatchedForward` is a small callable rather than a `types.MethodType` because a bound method of a plain function
does not survive pickling (`torch.save(model)`): pickle reduces it to ``getattr(module, func.__name__)``, which the
module does not have. `PatchedForward` pickles and deep-copies to the copy of its module (the module is memoised
before its attributes are, so the reference is rebuilt to the new instance).

Adapters: one per kind of patch target (`"fusion"`, `"head"`), registered with `register_adapter`. Each
answers `match(module, options)` with None (not its kind of module: no report row) or a `Match` (patch it with this
config, or skip it for this reason, or this module needs an argument `patch` was not given), and runs the patched
forward in `forward(module, config, *args, **kwargs)`.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import backends
from ..hrnet.fusion import resample_from_args
from ..plan import Resample

__all__ = ["PatchReport", "PatchRow", "Options", "Match", "Adapter", "PatchedForward", "register_adapter",
           "adapters", "patch", "unpatch", "KINDS", "register_inference", "hooked"]

KINDS = ("fusion", "head", "inference")
PATCHED, SKIPPED, UNPATCHED = "patched", "skipped", "unpatched"


# ------------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class PatchRow:
    """One line of a `PatchReport`: a module, what kind of target it is, what happened to it and why."""

    name: str  # qualified name in the model, "" for the model itself
    cls: str  # the module's class name
    kind: str  # "fusion", "head" or "inference"
    status: str  # "patched", "skipped" or "unpatched"
    detail: str  # what the patch does, or why the module was left alone


class PatchReport:
    """What `hrfast.patch` (or `hrfast.unpatch`) did, module by module; ``print(report)`` shows a table.

    Attributes:
        rows: every `PatchRow`, in model order (`model.named_modules()`), then model-level rows.
    """

    def __init__(self, rows: Sequence[PatchRow], action: str = "patch"):
        self.rows: Tuple[PatchRow, ...] = tuple(rows)
        self.action = action

    def _with(self, status: str, kind: Optional[str]) -> Tuple[PatchRow, ...]:
        return tuple(r for r in self.rows if r.status == status and (kind is None or r.kind == kind))

    @property
    def patched(self) -> Tuple[PatchRow, ...]:
        """Rows of the modules that now run hrfast's forward."""
        return self._with(PATCHED, None)

    @property
    def skipped(self) -> Tuple[PatchRow, ...]:
        """Rows of the candidates left alone, each with its reason."""
        return self._with(SKIPPED, None)

    @property
    def unpatched(self) -> Tuple[PatchRow, ...]:
        """Rows of the modules `hrfast.unpatch` restored."""
        return self._with(UNPATCHED, None)

    def count(self, status: str = PATCHED, kind: Optional[str] = None) -> int:
        """Number of rows with this status ("patched", "skipped", "unpatched"), optionally of one kind."""
        if status not in (PATCHED, SKIPPED, UNPATCHED):
            raise ValueError(f"status must be one of 'patched', 'skipped', 'unpatched', got {status!r}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be None or one of {KINDS}, got {kind!r}")
        return len(self._with(status, kind))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[PatchRow]:
        return iter(self.rows)

    def summary(self) -> str:
        counts = [(s, self.count(s)) for s in (PATCHED, SKIPPED, UNPATCHED)]
        parts = [f"{n} {s}" for s, n in counts if n or s == (UNPATCHED if self.action == "unpatch" else PATCHED)]
        return f"hrfast.{self.action}: " + ", ".join(parts)

    def table(self) -> str:
        """The report as a plain-text table: module, class, kind, status, detail."""
        header = ("module", "class", "kind", "status", "detail")
        body = [(r.name or "(model)", r.cls, r.kind, r.status, r.detail) for r in self.rows]
        widths = [max(len(row[k]) for row in [header] + body) for k in range(4)]
        lines = [self.summary()]
        if body:
            fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
            lines.append(fmt.format(*header))
            lines.append(fmt.format(*("-" * w for w in widths), "-" * len(header[4])))
            lines += [fmt.format(*row) for row in body]
        return "\n".join(lines)

    __str__ = table

    def __repr__(self) -> str:
        return f"<PatchReport {self.summary()}>"


# ------------------------------------------------------------------------------------------------ adapters


class Options(NamedTuple):
    """The arguments of `patch`, validated, as adapters see them."""

    upsample: Optional[str]
    align_corners: Optional[bool]
    default: Optional[Resample]  # Resample(upsample, align_corners), None when upsample is None
    backend: str


@dataclass(frozen=True)
class Match:
    """An adapter's answer for a module it recognises.

    Exactly one of: `config` (patch with it; `detail` says what the patch does), `skip` (leave the module alone;
    the reason), `needs` (the module can be patched only with an argument `patch` was not given; the message
    names it, and `patch` raises before patching anything).
    """

    config: Any = None
    detail: str = ""
    skip: Optional[str] = None
    needs: Optional[str] = None


class Adapter:
    """Base of the adapters `patch` consults. Subclasses set `kind` and implement `match` and `forward`.

    Adapters must be stateless (their instances are pickled along with patched modules).
    """

    kind: str = ""

    def match(self, module: nn.Module, options: Options) -> Optional[Match]:
        """None when `module` is not this adapter's kind of target, else a `Match`."""
        raise NotImplementedError

    def forward(self, module: nn.Module, config: Any, *args, **kwargs):
        """The patched forward of `module`, with the `config` its `Match` gave."""
        raise NotImplementedError

    def bypassed(self, module: nn.Module, config: Any) -> Tuple[Tuple[str, nn.Module], ...]:
        """(qualified name under `module`, submodule) of the submodules the original forward calls and the
        patched one does not (computed instead): hooks on them would not run."""
        return ()


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def hooked(named: Sequence[Tuple[str, nn.Module]]) -> Optional[str]:
    """The name of the first of `named` with a module hook (forward, pre-forward or backward), else None."""
    for name, m in named:
        if any(getattr(m, d, None) for d in _HOOK_DICTS):
            return name
    return None


_REGISTRY: Dict[str, List[Adapter]] = {kind: [] for kind in KINDS}


def register_adapter(adapter: Adapter) -> None:
    """Adds an adapter; for each module, the first registered adapter of a kind that matches it wins."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"adapter must be an hrfast._patch.Adapter, got {type(adapter).__name__}")
    if adapter.kind not in KINDS:
        raise ValueError(f"adapter.kind must be one of {KINDS}, got {adapter.kind!r}")
    if any(type(a) is type(adapter) for a in _REGISTRY[adapter.kind]):
        return
    _REGISTRY[adapter.kind].append(adapter)


def adapters(kind: str) -> Tuple[Adapter, ...]:
    """The registered adapters of one kind, in order."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return tuple(_REGISTRY[kind])


class PatchedForward:
    """The `forward` that `hrfast.patch` stores on a module instance: ``adapter.forward(module, config, ...)``.

    Attributes:
        __self__: the patched module (as on a bound method).
        adapter: the `Adapter` that runs it.
        config: that adapter's per-module configuration.
    """

    __slots__ = ("__self__", "adapter", "config", "_bypassed", "_warned")

    def __init__(self, module: nn.Module, adapter: Adapter, config: Any):
        self.__self__ = module
        self.adapter = adapter
        self.config = config
        self._bypassed = None  # read on the first call: an unpickled module gets its attributes after this
        self._warned = False

    def __call__(self, *args, **kwargs):
        # once known to bypass nothing (most modules of the inference mode): no compile query, no hook check
        if (self._bypassed is None or self._bypassed) and not torch.compiler.is_compiling() and self._hook_added():
            return self.original(*args, **kwargs)
        return self.adapter.forward(self.__self__, self.config, *args, **kwargs)

    def _hook_added(self) -> bool:
        """Whether a submodule the fused forward bypasses has a hook now (one added after `patch`, which skips
        modules with such hooks): then the original forward runs, so the hook does, with a warning (once)."""
        if self._bypassed is None:
            self._bypassed = self.adapter.bypassed(self.__self__, self.config)
        name = hooked(self._bypassed)
        if name is not None and not self._warned:
            self._warned = True
            warnings.warn(f"hrfast: a hook was added to {name} of this patched {type(self.__self__).__name__} "
                          "after hrfast.patch; the fused forward would not run it, so the original forward runs "
                          "while it is there (slower). Patch again after adding hooks to skip the module in the "
                          "report, or remove the hook", RuntimeWarning, stacklevel=3)
        return name is not None

    def __reduce__(self):
        return (PatchedForward, (self.__self__, self.adapter, self.config))

    @property
    def original(self):
        """The class's own forward, bound to the module (what runs after `unpatch`)."""
        return type(self.__self__).forward.__get__(self.__self__)

    # what tools that read a module's forward as a function find (torch.export reads `__code__` for its messages
    # and `inspect.signature` for the arguments): the original's, whose arguments the patched forward takes
    @property
    def __code__(self):
        return type(self.__self__).forward.__code__

    @property
    def __signature__(self):
        return inspect.signature(self.original)

    def __repr__(self) -> str:
        return f"<hrfast patched forward of {type(self.__self__).__name__} ({self.adapter.kind})>"


# the planner of patch's inference= option (hrfast._patch.inference registers it): .options(value) validates the
# argument (None: off), .apply(model, options) installs, or with None removes, its forwards and returns report rows
_INFERENCE: List[Any] = []


def register_inference(planner) -> None:
    """Sets the planner behind ``patch(..., inference=...)``."""
    _INFERENCE[:] = [planner]


class RefuseScripting:
    """A patched module's ``__prepare_scriptable__``, which `torch.jit.script` calls on every module before it
    compiles anything: it fails at once, saying what to do, instead of deep inside TorchScript's compiler (a
    patched forward is Python TorchScript cannot compile). Stateless, so it pickles and deep-copies as is."""

    __slots__ = ()

    def __call__(self):
        raise RuntimeError("hrfast: this model is patched by hrfast.patch, and TorchScript cannot compile hrfast's "
                           "fused forwards; call hrfast.unpatch(model) before torch.jit.script (torch.jit.trace, "
                           "torch.export, torch.onnx.export and torch.compile take the patched model)")


def _installed(module: nn.Module) -> Optional[PatchedForward]:
    fwd = module.__dict__.get("forward")
    return fwd if isinstance(fwd, PatchedForward) else None


def _install(module: nn.Module, forward: PatchedForward) -> None:
    module.__dict__["forward"] = forward
    module.__dict__["__prepare_scriptable__"] = RefuseScripting()


def _remove(module: nn.Module) -> None:
    del module.__dict__["forward"]
    module.__dict__.pop("__prepare_scriptable__", None)


# ---------------------------------------------------------------------------------------------- patch API


def _options(upsample, align_corners, backend) -> Options:
    if upsample is not None and not isinstance(upsample, str):
        raise TypeError(f"upsample must be None, 'nearest' or 'bilinear', got {type(upsample).__name__}")
    backends.canonical(backend)
    default = resample_from_args(upsample, align_corners)  # ValueError/TypeError naming upsample/align_corners
    return Options(upsample, align_corners, default, backend)


def patch(model: nn.Module, *, upsample: Optional[str] = None, align_corners: Optional[bool] = None,
          backend: str = "auto", head: bool = True, inference=False) -> PatchReport:
    """Patches the HRNet modules of `model` in place so their fusion step (and, with `head`, the HRNetV2 concat
    head) runs as hrfast's fused ops.

    Every submodule (and `model` itself) is matched by structure: a `branches` nn.ModuleList plus a
    `fuse_layers` nn.ModuleList of nn.ModuleList (timm and official `HighResolutionModule`, mm* `HRModule`),
    channels read from the conv weights. A matched module keeps its class, submodules, parameters and
    buffers; only its instance gets a new `forward` that runs `branches` exactly as the original does
    (``x[i] = branches[i](x[i])``, updating the caller's list in place) and then the fused fusion step over the
    module's own `fuse_layers`, returning a fresh list. Patching again is harmless (it re-applies the new
    arguments); `hrfast.unpatch(model)` restores the original behaviour.

    How each module upsamples is read from the model:

    - an upsample module inside `fuse_layers` (`nn.Upsample`: timm, pose, classification, mmpose, mmdet,
      mmpretrain): its mode and align_corners;
    - mmseg, which has a bilinear `Upsample` in `fuse_layers` *and* resizes again in forward: fused when every
      lower-resolution branch is exactly 2^k times smaller (then the second resize is an identity), the
      original forward otherwise (odd sizes: two bilinear passes that one kernel does not reproduce);
    - no upsample module (`F.interpolate(size=...)` inside forward): bilinear with the module's own
      `align_corners` attribute when it has a bool one (`hrfast.models`), else with the `ALIGN_CORNERS` global
      of the module's defining Python module when it has one (official HRNet-Semantic-Segmentation), both read
      at every call as the original forward does; else the `upsample=` / `align_corners=` arguments (or those
      of an earlier `patch` of the same module). Without any of these, `patch` raises ValueError before
      patching anything.

    The HRNetV2 head (``head=True``): the concat, conv1x1, BN, ReLU and classifier run as
    `hrfast.nn.HRNetV2Head` (built per call over the model's own layers, never registered as a submodule):

    - official segmentation / facial-landmark `HighResolutionNet` (and `hrfast.models`), whose forward
      concatenates inline before ``last_layer`` / ``head``: the model's forward is patched; the trunk runs as
      the original does (`forward_backbone` for `hrfast.models`, else the official stem, layer1, transitions
      and stages, after checking that the model has exactly the official attributes and forward). The
      concat's align_corners: the model's ``align_corners`` attribute, else its module's ``ALIGN_CORNERS``
      global (both read at every call), else ``align_corners=`` (with ``upsample='bilinear'``), else
      ValueError; facial models: False, as their forward says;
    - mmseg ``FCNHead`` with ``input_transform='resize_concat'``: its forward is patched;
    - mmpose's V2 pair, ``FeatureMapProcessor(concat=True)`` feeding a ``HeatmapHead`` of one 1x1 conv + BN +
      ReLU and a 1x1 final layer: the estimator's forward is patched (`hrfast._patch.mmpose`: every mode, the
      neck and ``extract_feat`` unchanged for other callers); every other HeatmapHead is reported as what it is;
    - HRNetV2p's ``HRFPN`` neck (mmdet and the official HRNet-Object-Detection): its 1x1 reduction over the
      concat runs as per-branch projections and one fusion call (`hrfast.nn.HRFPNReduction`, checkpointed
      exactly when the original is); pooling and the 3x3 convs as before;
    - reported and left alone: other mmseg heads,
      OCR models, openseg's ``cls_head``, heads with a non-batch-norm norm (InPlaceABN), a non-ReLU
      activation, a 3x3 conv, dropout, or hooks on their layers.

    Left alone and reported: single-branch modules, subclasses that change the fusion (mmpose
    `HRFomerModule`, `LiteHRModule`, any subclass overriding `forward` or `_make_fuse_layers`), layouts other
    than conv1x1-norm[-upsample] / chains of conv3x3-s2-norm[-ReLU], norms other than batch norm and group
    norm, fuse activations other than ReLU, and modules whose instance already has a foreign `forward`.
    Matching is by structure (users' own copies of the official classes are patched), but only what can be
    shown equivalent is replaced: the fuse activation and upsample modules must run nn.ReLU's / nn.Upsample's
    own forward (a subclass overriding it is unknown), and the class's forward must be the fusion loop, which
    is read by running it once on symbolic stand-ins (`hrfast.hrnet.fusion.read_fusion_loop`: every upstream
    spelling passes; a forward that scales, skips, reorders or adds anything, calls another op or sets an
    attribute does not, nor one that resizes unlike the fused step would). Modules with hooks on a submodule
    the patched forward computes instead of calling (an upsample, a folded batch norm, the fuse activation,
    the head's layers) are skipped too; a hook added there after patching makes the patched forward warn once
    and run the original forward while the hook exists (checked in eager calls only: not in a torch.compile
    trace, where it would add a guard per submodule).

    Args:
        model: the model (or any module) to patch in place.
        upsample: None, 'nearest' or 'bilinear': the upsampling of modules that resize in forward and whose
            mode the model does not state (official seg master/pytorch-v1.1 branches, facial landmarks:
            'bilinear'; openseg: 'bilinear'). Ignored for modules that state it.
        align_corners: with ``upsample='bilinear'``: True/False as in their `F.interpolate` (None means
            False, PyTorch's default).
        backend: "auto", "triton", "cuda_cpp" or "reference" (`hrfast.backends`), passed to the fused ops at
            every call.
        head: also patch the HRNetV2 concat head (above). With False no head is patched or reported; a head
            patched by an earlier call is restored (an "unpatched" row), as patching again re-applies the
            arguments.
        inference: False, True or an `hrfast.Inference`: for eval models, also fold every batch norm that follows
            a conv into that conv, run the residual blocks' conv + bias (+ residual add) + ReLU as single calls,
            and pick the memory layout by measurement (see `hrfast.inference` and `hrfast._patch.inference`).
            Eval-only: in training mode, or when gradients are wanted for the parameters, every module computes
            what it computed before. Patching again with False removes it.

    Returns:
        A `PatchReport` of every candidate module: patched, or skipped and why.

    Raises:
        TypeError / ValueError: for a bad argument (naming it), or when a module upsamples in forward and
            neither the model nor `upsample=` / `align_corners=` say how (nothing is patched then).

    Patched modules work with `train()`/`eval()`, `state_dict()`/`load_state_dict()`, `copy.deepcopy`,
    `torch.save(model)`, `.to(device/dtype)` and autocast; `torch.jit.trace`, `torch.export.export` and
    `torch.compile` (fullgraph, any input size, dynamic=True) trace them, and `torch.onnx.export` records the
    eager computation (`hrfast.backends.resolve`). `torch.jit.script` raises at once: call `hrfast.unpatch`
    first. `nn.DataParallel` replicas would run the original module's forward: use DistributedDataParallel.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(head, bool):
        raise TypeError(f"head must be a bool, got {type(head).__name__}")
    options = _options(upsample, align_corners, backend)
    inference_options = _INFERENCE[0].options(inference) if _INFERENCE else None
    kinds = ("fusion", "head") if head else ("fusion",)

    plans: List[Tuple[nn.Module, Adapter, Match, PatchRow]] = []
    rows: List[PatchRow] = []
    missing: List[str] = []
    for name, module in model.named_modules():
        for kind in kinds:
            found = None
            for adapter in _REGISTRY[kind]:
                match = adapter.match(module, options)
                if match is not None:
                    found = (adapter, match)
                    break
            if found is None:
                continue
            adapter, match = found
            cls = type(module).__name__
            fwd = module.__dict__.get("forward")
            if match.needs is not None:
                missing.append(f"{name or '(model)'} ({cls}): {match.needs}")
                row = PatchRow(name, cls, kind, SKIPPED, match.needs)
            elif match.skip is not None:
                row = PatchRow(name, cls, kind, SKIPPED, match.skip)
            elif (hook := hooked(adapter.bypassed(module, match.config))) is not None:
                row = PatchRow(name, cls, kind, SKIPPED, f"{hook} has "
                               "hooks, which the fused forward would not run (it computes that module instead of "
                               "calling it); left alone")
            elif fwd is not None and not isinstance(fwd, PatchedForward):
                row = PatchRow(name, cls, kind, SKIPPED, f"its instance already has its own forward ({fwd!r}), "
                               "set by something other than hrfast; left alone")
            else:
                detail = match.detail
                if isinstance(fwd, PatchedForward):
                    detail += "; was patched already" + ("" if fwd.config == match.config else ", options updated")
                row = PatchRow(name, cls, kind, PATCHED, detail)
                plans.append((module, adapter, match, row))
            rows.append(row)
            break  # one kind per module

    if missing:
        raise ValueError(
            "hrfast.patch cannot tell how these modules upsample (nothing was patched):\n  " + "\n  ".join(missing))

    for module, adapter, match, _ in plans:
        _install(module, PatchedForward(module, adapter, match.config))

    if not head:  # re-applying the arguments: heads an earlier patch(head=True) fused run their own forward again
        for name, module in model.named_modules():
            fwd = _installed(module)
            if fwd is not None and fwd.adapter.kind == "head":
                _remove(module)
                rows.append(PatchRow(name, type(module).__name__, "head", UNPATCHED,
                                     "head=False: original forward restored"))

    if _INFERENCE:
        rows += _INFERENCE[0].apply(model, inference_options)

    if head and not any(r.kind == "head" for r in rows):
        rows.append(PatchRow("", type(model).__name__, "head", SKIPPED,
                             "no HRNetV2 concat head found (timm, classification and pose models have none); "
                             "pass head=False to silence this row"))
    return PatchReport(rows, "patch")


def unpatch(model: nn.Module) -> PatchReport:
    """Restores the original forward of every module of `model` that `hrfast.patch` patched.

    Deletes the instance-level forward hrfast stored; parameters, buffers and submodules were never changed.
    Harmless on a model that is not (or no longer) patched.

    Returns:
        A `PatchReport` with one "unpatched" row per restored module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rows = []
    for name, module in model.named_modules():
        fwd = _installed(module)
        if fwd is not None:
            _remove(module)
            rows.append(PatchRow(name, type(module).__name__, fwd.adapter.kind, UNPATCHED, "original forward restored"))
    return PatchReport(rows, "unpatch")
