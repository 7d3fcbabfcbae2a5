"""The mmpose adapter: mmpose 1.x's HRNetV2 head, split between a neck and a head, fused at the model level.

mmpose's HRNetV2 configs (face, wholebody; HRNET_LAYOUTS.md section 4) build a ``TopdownPoseEstimator`` whose
neck ``FeatureMapProcessor(concat=True)`` resizes every branch bilinearly to branch 0 and concatenates them, and
whose ``HeatmapHead`` runs ``conv_layers = Sequential(conv1x1, BatchNorm2d, ReLU)`` and a 1x1 ``final_layer`` on
that map: together, the V2 head ``final(ReLU(BN(conv(cat[x0, Up(x1), ...]))))``.

Why the estimator and not the neck or the head: the neck's output is public. ``extract_feat`` returns it, and code
outside the estimator's forward (feature extraction, visualisation, other heads) may consume it, so the neck must
keep returning the concatenation; and the head alone receives only the concatenation. Only the estimator's
forward knows that, there, the neck's output goes to the head and nowhere else. So the estimator's forward is
patched, and nothing else: it runs the class's own forward (every mode: ``tensor``, ``loss``, ``predict`` with or
without flip test, mmpose's code unchanged) on a *view* of the estimator, a shallow copy made per call whose
``neck`` returns a `DeferredConcat` (the branches, not yet concatenated) and whose ``head`` has a forward that
runs `hrfast.nn.HRNetV2Head` over those branches. The view shares the estimator's parameters, buffers and
submodules (BN running statistics update in place); the estimator itself, its neck and its head are never
modified, so ``model.extract_feat(x)``, ``model.neck(...)`` and ``model.head(...)`` called directly compute what
they always did, and concurrent calls cannot see each other's state. Anything other than the fused head that
reads a `DeferredConcat` gets the neck's own output, computed then.

Only the upstream classes are taken (by class name, with ``forward``, ``_forward``, ``extract_feat``, ``loss``,
``predict`` of ``TopdownPoseEstimator`` / ``BasePoseEstimator``, the neck's ``forward`` / ``_concat`` and the
head's ``forward`` not overridden): a subclass could route the neck's output elsewhere.

Every ``HeatmapHead`` also gets a report row that says what it is: the V2 layers (fused through their estimator,
not on their own), or a head over one feature map, which is no HRNetV2 head (e.g. the W32 top-down head on the
highest branch). Kind "head": ``hrfast.patch(model, head=False)`` leaves the estimator alone.
"""
from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch.nn as nn
from torch import Tensor

from ..flops import macs_per_pixel
from ..hrnet.head import HeadLayers, layer_problems
from ..nn.head import HRNetV2Head
from ..plan import Resample
from .core import Adapter, Match, Options

__all__ = ["PoseHeadAdapter", "PoseHeadConfig", "DeferredConcat", "inspect_pose_estimator", "describe_heatmap_head"]

_ESTIMATOR_CLASSES = ("TopdownPoseEstimator", "BasePoseEstimator")
_ESTIMATOR_METHODS = ("forward", "_forward", "extract_feat", "loss", "predict")
_LAYER_NAMES = ("conv_layers[0]", "conv_layers[1]", "conv_layers[2]", "final_layer")
_BYPASSED = ("neck", "head.deconv_layers", "head.conv_layers", "head.conv_layers.0", "head.conv_layers.1",
             "head.conv_layers.2", "head.final_layer")


def _names(cls: type) -> List[str]:
    return [k.__name__ for k in cls.__mro__]


def _definer(cls: type, name: str) -> Optional[type]:
    return next((k for k in cls.__mro__ if name in vars(k)), None)


def _overridden(obj, base: str, methods: Sequence[str]) -> List[str]:
    """Which of `methods` a subclass of the class named `base` overrides."""
    names = _names(type(obj))
    return [m for m in methods if (k := _definer(type(obj), m)) is not None and k.__name__ != base
            and k.__name__ in names[:names.index(base)]]


# ------------------------------------------------------------------------------------------------- matcher


def _head_layers(head: nn.Module) -> Union[HeadLayers, str]:
    """The V2 layers of a HeatmapHead, or what it has instead (for the report)."""
    deconv, convs, final = (getattr(head, a, None) for a in ("deconv_layers", "conv_layers", "final_layer"))
    if not isinstance(deconv, nn.Identity):
        return "deconv layers"
    if isinstance(convs, nn.Identity):
        return "final_layer only (no conv_layers)"
    if not isinstance(convs, nn.Sequential) or len(convs) != 3:
        size = len(convs) if isinstance(convs, nn.Sequential) else "?"
        return f"{size // 3 if isinstance(size, int) else size} conv layers"
    layers = HeadLayers(*convs, final)
    problems = layer_problems(layers, _LAYER_NAMES, batchnorm_only=True)
    return "; ".join(problems) if problems else layers


def describe_heatmap_head(head: nn.Module) -> Union[HeadLayers, str]:
    """The (conv, norm, act, final) of an mmpose HeatmapHead built as the HRNetV2 head (no deconv layers, one
    1x1 conv + BatchNorm2d + ReLU, a 1x1 final layer, the single input taken as is), else why it is not one."""
    transform = getattr(head, "input_transform", "select")  # mmpose 1.0rc heads select the input by index
    if transform != "select" or getattr(head, "input_index", -1) not in (-1, 0):
        return f"input_transform={transform!r}, input_index={getattr(head, 'input_index', None)!r}"
    overridden = _overridden(head, "HeatmapHead", ("forward",))
    if overridden:
        return f"{type(head).__name__} overrides HeatmapHead.forward"
    return _head_layers(head)


def _neck_problem(neck: nn.Module) -> Optional[str]:
    """Why a FeatureMapProcessor(concat=True) `neck` does not feed the concat to the head as it is, else None."""
    overridden = _overridden(neck, "FeatureMapProcessor", ("forward", "_concat"))
    if overridden:
        return f"{type(neck).__name__} overrides FeatureMapProcessor.{', '.join(overridden)}"
    if getattr(neck, "apply_relu", False) or getattr(neck, "scale_factor", 1.0) != 1.0:
        return "its FeatureMapProcessor applies a ReLU or rescales after the concat"
    if not isinstance(getattr(neck, "align_corners", None), bool):
        return f"its FeatureMapProcessor's align_corners={getattr(neck, 'align_corners', None)!r} is not a bool"
    index = getattr(neck, "select_index", None)
    if index is not None and not (isinstance(index, (list, tuple)) and all(isinstance(i, int) for i in index)):
        return f"select_index={index!r} is not None or a tuple of ints"
    return None


def inspect_pose_estimator(model: nn.Module) -> Union[HeadLayers, str, None]:
    """The head layers of an mmpose TopdownPoseEstimator with the HRNetV2 neck + head pair; a string saying why
    such a pair cannot be fused; None when `model` holds no V2-shaped HeatmapHead behind a backbone (no row)."""
    children = dict(model.named_children())
    head, neck = children.get("head"), children.get("neck")
    if "backbone" not in children or head is None or "HeatmapHead" not in _names(type(head)):
        return None
    layers = describe_heatmap_head(head)
    if isinstance(layers, str) or neck is None:
        return None  # a head over one map: not an HRNetV2 head (its own row says so)
    if "FeatureMapProcessor" not in _names(type(neck)) or not getattr(neck, "concat", False):
        return None  # the head takes one map as it is: not an HRNetV2 head
    problem = _neck_problem(neck)
    if problem:
        return problem
    names = _names(type(model))
    if "TopdownPoseEstimator" not in names:
        return f"{type(model).__name__} is not an mmpose TopdownPoseEstimator"
    foreign = [m for m in _ESTIMATOR_METHODS
               if (k := _definer(type(model), m)) is not None and k.__name__ not in _ESTIMATOR_CLASSES]
    if foreign or _definer(type(model), "extract_feat") is None:
        return (f"{type(model).__name__} overrides {', '.join(foreign) or 'extract_feat'} of TopdownPoseEstimator: "
                "its forward may use the neck's output elsewhere")
    return layers


# ----------------------------------------------------------------------------------- the per-call view


class DeferredConcat(SequenceABC):
    """What the neck returns inside a patched estimator's forward: the branches it would resize and
    concatenate, not concatenated. The fused head takes `branches`; anything else that reads it as a sequence
    gets the neck's own output (``[cat]``), computed on first use."""

    __slots__ = ("neck", "inputs", "branches", "_value")

    def __init__(self, neck: nn.Module, inputs, branches: List[Tensor]):
        self.neck, self.inputs, self.branches, self._value = neck, inputs, branches, None

    def materialize(self):
        """The neck's original output for these inputs."""
        if self._value is None:
            self._value = type(self.neck).forward(self.neck, self.inputs)
        return self._value

    def __getitem__(self, index):
        return self.materialize()[index]

    def __len__(self) -> int:
        return len(self.materialize())

    def __repr__(self) -> str:
        return f"<DeferredConcat of {len(self.branches)} branches>"


def _selected(neck: nn.Module, inputs) -> Optional[List[Tensor]]:
    """The branches the neck would concatenate, when the fused head can take them (else None)."""
    if not isinstance(inputs, (list, tuple)):
        return None
    index = neck.select_index
    xs = list(inputs) if index is None else [inputs[i] for i in index]
    if not 1 <= len(xs) <= 4 or not all(isinstance(x, Tensor) and x.dim() == 4 for x in xs):
        return None
    h, w = xs[0].shape[2:]
    same = all(x.dtype == xs[0].dtype and x.device == xs[0].device and x.shape[0] == xs[0].shape[0] for x in xs)
    return xs if same and all(x.shape[2] <= h and x.shape[3] <= w for x in xs) else None


class _DeferringNeck:
    """The view's neck: a `DeferredConcat` where the fused head can take the branches, the neck's output else."""

    def __init__(self, neck: nn.Module):
        self.neck = neck

    def __call__(self, inputs):
        xs = _selected(self.neck, inputs)
        if xs is None:
            return type(self.neck).forward(self.neck, inputs)
        return DeferredConcat(self.neck, inputs, xs)


class _FusedHeadForward:
    """The view's head forward: the fused V2 head over a `DeferredConcat`'s branches, the original otherwise."""

    def __init__(self, head: nn.Module, neck: nn.Module, backend: str):
        self.head, self.neck, self.backend = head, neck, backend

    def __call__(self, feats):
        conv = self.head.conv_layers[0]
        if not isinstance(feats, DeferredConcat) or sum(x.shape[1] for x in feats.branches) != conv.in_channels:
            return type(self.head).forward(self.head, feats)
        resample = Resample("bilinear", align_corners=self.neck.align_corners)  # read per call, as the neck does
        fused = HRNetV2Head(self.head, "mmpose", resample=resample, backend=self.backend)  # never registered
        return fused(feats.branches)  # through __call__: global module hooks (hrfast.flops) see it


def _view(module: nn.Module, **replaced) -> nn.Module:
    """A shallow copy of `module` (same parameters, buffers, submodules, flags) with some attributes replaced
    and without hrfast's instance forward."""
    view = object.__new__(type(module))
    view.__dict__.update(module.__dict__)
    for name in ("forward", "__prepare_scriptable__"):
        view.__dict__.pop(name, None)
    view.__dict__.update(replaced)
    return view


# --------------------------------------------------------------------------------------------------- adapter


@dataclass(frozen=True)
class PoseHeadConfig:
    """Per-estimator configuration: the backend of the fused head."""

    backend: str


def _macs_note(layers: HeadLayers) -> str:
    width, hidden = int(layers.conv.weight.shape[1]), int(layers.conv.weight.shape[0])
    classes = int(layers.classifier.weight.shape[0])
    if width % 15:
        return f"head MACs per branch-0 pixel {width * hidden + hidden * classes} before"
    c = width // 15  # HRNet branches C, 2C, 4C, 8C
    before, after = macs_per_pixel((c, 2 * c, 4 * c, 8 * c), hidden, classes)
    return (f"head MACs per branch-0 pixel {before:g} -> {after:g} ({before / after:.1f}x fewer, for branches "
            f"{c}/{2 * c}/{4 * c}/{8 * c} halving in size)")


class PoseHeadAdapter(Adapter):
    """Fuses mmpose's FeatureMapProcessor(concat=True) + HeatmapHead pair at its TopdownPoseEstimator, and reports
    what every HeatmapHead is (see the module docstring). Register it before the generic head adapter."""

    kind = "head"

    def match(self, module: nn.Module, options: Options) -> Optional[Match]:
        if "HeatmapHead" in _names(type(module)):
            return Match(skip=self._head_row(module))
        found = inspect_pose_estimator(module)
        if found is None:
            return None
        if isinstance(found, str):
            return Match(skip=found)
        width, classes = int(found.conv.weight.shape[1]), int(found.classifier.weight.shape[0])
        detail = (f"mmpose HRNetV2 head: neck FeatureMapProcessor(concat=True) + HeatmapHead ({width} -> {width} -> "
                  f"{classes}, {type(found.norm).__name__} folded in eval) fused as hrfast.nn.HRNetV2Head inside "
                  f"{type(module).__name__}.forward (every mode); extract_feat and direct calls of the neck still "
                  f"return the concat; bilinear align_corners from the neck (now {module.neck.align_corners}, read at "
                  f"every call); {_macs_note(found)}; backend {options.backend!r}")
        return Match(config=PoseHeadConfig(options.backend), detail=detail)

    @staticmethod
    def _head_row(head: nn.Module) -> str:
        layers = describe_heatmap_head(head)
        if isinstance(layers, str):
            return (f"mmpose HeatmapHead over one feature map ({layers}): not an HRNetV2 head, nothing to fuse; "
                    "left alone")
        return (f"mmpose HeatmapHead with the HRNetV2 head layers ({layers.conv.weight.shape[1]} -> "
                f"{layers.conv.weight.shape[0]} -> {layers.classifier.weight.shape[0]}): not patched on its own (it "
                "receives the concatenated map); a TopdownPoseEstimator that owns it with a "
                "FeatureMapProcessor(concat=True) neck fuses the pair (see the estimator's row)")

    def bypassed(self, module: nn.Module, config: PoseHeadConfig):
        """The neck and the head's layers: the fused head computes them instead of calling them."""
        return tuple((name, module.get_submodule(name)) for name in _BYPASSED)

    def forward(self, module: nn.Module, config: PoseHeadConfig, *args, **kwargs):
        """The estimator's own forward, run on a per-call view whose neck defers the concat to the fused head."""
        neck, head = module.neck, module.head
        fused_head = _view(head, forward=_FusedHeadForward(head, neck, config.backend))
        view = _view(module, neck=_DeferringNeck(neck), head=fused_head)
        return type(module).forward(view, *args, **kwargs)
