"""The head adapter: one structural matcher for the HRNetV2 concat head, and its patched forward.

The HRNetV2 head is ``cls(ReLU(norm(conv1x1(cat[x0, Up(x1), Up(x2), Up(x3)]))))`` (HRNET_LAYOUTS.md section 4),
but the concat is anonymous code, so the patch target is the module whose forward does it:

- official layout (HRNet-Semantic-Segmentation ``seg_hrnet.py``, HRNet-Facial-Landmark-Detection, and
  `hrfast.models`): the model itself, whose forward runs the trunk, concatenates inline and calls
  ``last_layer`` (segmentation) or ``head`` (landmarks), an ``nn.Sequential(conv1x1, BN, ReLU, conv1x1)``;
- mmseg: the ``FCNHead`` with ``input_transform='resize_concat'`` (the concat is in
  ``BaseDecodeHead._transform_inputs``), layers ``convs.0.{conv, bn, activate}`` and ``conv_seg``.

Both are found by `inspect_head` and checked by the same layer check (`_layer_problems`); what differs is only
where the layers sit and how the branch list is obtained at call time. The patched forward hands the branches
to an `hrfast.nn.HRNetV2Head` built *per call* over the module's own children: it is never a registered
submodule (state_dict, named_modules, optimisers unchanged), it follows `copy.deepcopy`, pickling and
``.to()`` for free, and it is called through ``__call__`` so global module hooks (`hrfast.flops`) see it.

Reported and left alone: mmpose 1.x (the concat is the output of the ``FeatureMapProcessor`` neck, which other
code may consume), other mmseg decode heads (OCRHead, ...), OCR models, openseg's ``cls_head`` (3x3 conv,
dropout), norms other than PyTorch batch norm (InPlaceABN), activations other than ReLU, 3x3 classifiers,
dropout, forks whose forward or attributes differ from the official layout, and heads with hooks.
"""
from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from torch import Tensor

from ..hrnet.fusion import ALIGN_GLOBAL, RESIZE_CALL
from ..hrnet.head import HeadLayers, layer_problems, mmseg_problems
from ..nn.head import HRNetV2Head
from ..plan import Resample
from .core import Adapter, Match, Options, PatchedForward
from .fusion import _MISSING, FusionConfig

__all__ = ["HeadAdapter", "HeadConfig", "HeadSite", "inspect_head"]

# the official HighResolutionNet trunk, whose forward the patched official forward replays
_TRUNK = ("conv1", "bn1", "conv2", "bn2", "relu", "layer1", "transition1", "stage2", "transition2", "stage3",
          "transition3", "stage4")
# official heads the fused head replaces: (Sequential attribute, extra children its model may hold)
_OFFICIAL_HEADS = {"last_layer": (), "head": ("sf",)}  # the facial model keeps an unused Softmax `sf`
# further Sequential attributes that mark a model as an HRNet head candidate (reported, not patched)
_OTHER_HEADS = ("cls_head", "aux_head")
_OCR_CHILDREN = ("aux_head", "conv3x3_ocr", "ocr_gather_head", "ocr_distri_head")
_FORK_FLAGS = ("drop_stage4", "full_res_stem", "keep_imagenet_head")  # openseg's environment-driven structure
# methods whose override by an FCNHead subclass could change what is concatenated or how
_FCN_METHODS = ("forward", "_forward_feature", "_transform_inputs", "cls_seg")
_ALIGN_KWARG = re.compile(r"align_corners\s*=\s*([\w.]+)")


# ------------------------------------------------------------------------------------------------- matcher


@dataclass(frozen=True)
class HeadSite:
    """What `inspect_head` read from a module that holds an HRNetV2 head."""

    layout: str  # "official" (concat in the model's forward) or "mmseg" (FCNHead)
    attr: str  # official: "last_layer" or "head"; mmseg: ""
    trunk: str  # official: "forward_backbone" (hrfast.models) or "replayed" (the official forward); mmseg: ""
    channels: Tuple[int, int, int]  # concat width, hidden width, classes (from the conv weights)
    norm: str  # class name of the head's norm


def _stripped_source(func) -> Optional[str]:
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return None
    return "\n".join(line.split("#", 1)[0] for line in source.splitlines())


def _hooked(modules: Sequence[nn.Module]) -> Optional[str]:
    for m in modules:
        if any(getattr(m, a, None) for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                               "_backward_pre_hooks")):
            return (f"a {type(m).__name__} of the head has hooks, which the fused head would bypass (it reads the "
                    "layers' weights instead of calling them)")
    return None


def _sequential_problems(seq: nn.Sequential, attr: str) -> List[str]:
    mods = list(seq)
    drops = [f"{attr}[{k}] is {type(m).__name__}" for k, m in enumerate(mods)
             if isinstance(m, nn.modules.dropout._DropoutNd)]
    if len(mods) != 4:
        return [f"{attr} holds {len(mods)} modules, expected (conv1x1, BN, ReLU, conv1x1)"] + drops
    problems = layer_problems(HeadLayers(*mods), [f"{attr}[{k}]" for k in range(4)], batchnorm_only=True)
    return problems + [f"{d} (dropout)" for d in drops]


def _hrfast_forwards() -> Tuple:
    from ..models import face_hrnet, seg_hrnet

    return seg_hrnet.HighResolutionNet.forward, face_hrnet.HighResolutionNet.forward


def _official_trunk(module: nn.Module, attr: str) -> Union[str, Tuple[str, str]]:
    """("forward_backbone" | "replayed", note) when `module` is the official HighResolutionNet around `attr`,
    else why not."""
    children = dict(module.named_children())
    allowed = set(_TRUNK) | {attr} | set(_OFFICIAL_HEADS.get(attr, ()))
    ocr = [c for c in _OCR_CHILDREN if c in children]
    if ocr:
        return (f"an OCR model ({', '.join(ocr)}): its forward feeds the concat to the OCR head too, so the V2 "
                "head is not separable")
    if attr not in _OFFICIAL_HEADS:
        return f"{attr} is not an official HRNetV2 head (only `last_layer` and the facial `head` are)"
    missing = [c for c in _TRUNK if c not in children]
    extra = [c for c in children if c not in allowed]
    if missing or extra:
        parts = ([f"no {', '.join(missing)}"] if missing else []) + (
            [f"unexpected children {', '.join(extra)} (its forward may use them)"] if extra else [])
        return "not the official HighResolutionNet layout: " + "; ".join(parts)
    flags = [f for f in _FORK_FLAGS if getattr(module, f, False)]
    if flags:
        return f"{', '.join(flags)} is set: not the official forward"
    prev = 1
    for s in (2, 3, 4):
        cfg = getattr(module, f"stage{s}_cfg", None)
        branches = cfg.get("NUM_BRANCHES") if isinstance(cfg, dict) else None
        if not isinstance(branches, int):
            return f"no stage{s}_cfg dict with NUM_BRANCHES: not the official HighResolutionNet"
        transition, stage = children[f"transition{s - 1}"], children[f"stage{s}"]
        if not isinstance(transition, nn.ModuleList) or len(transition) != branches:
            return f"transition{s - 1} is not an nn.ModuleList of {branches} entries"
        if not isinstance(stage, nn.Sequential):
            return f"stage{s} is {type(stage).__name__}, not an nn.Sequential"
        for i in range(min(prev, branches) - 1):
            if transition[i] is not None:
                # upstream code bases feed such a transition y_list[i] (seg) or y_list[-1] (face, v1.1)
                return f"transition{s - 1}[{i}] transforms an existing branch, which the official forwards disagree on"
        prev = branches
    if prev != 4:
        return f"stage4 has {prev} branches; the official concat takes exactly 4"

    if type(module).forward in _hrfast_forwards():
        return "forward_backbone", "trunk: its forward_backbone"
    source = _stripped_source(type(module).forward)
    if source is None:
        return "its forward's source is not available to confirm the official layout"
    needed = [f"self.{attr}(", "cat(", "self.layer1(", "self.stage4(", "self.conv2("]
    absent = [n for n in needed if n not in source]
    if absent:
        return f"its forward does not call {', '.join(absent)} as the official one does"
    if RESIZE_CALL.search(source.rsplit(f"self.{attr}(", 1)[1]):
        return f"its forward resizes after {attr}, unlike the official one"
    if attr == "head":
        values = set(_ALIGN_KWARG.findall(source))
        if values - {"False"}:
            return f"its forward passes align_corners={'/'.join(sorted(values))}; the facial head uses False"
    return "replayed", "trunk: the official forward's stem, layer1, transitions and stages"


def inspect_head(module: nn.Module) -> Union[HeadSite, str, None]:
    """The head `module` holds; a string saying why the fused head cannot take it over; or None when `module`
    holds no HRNetV2-like head (no report row).

    Candidates: an mmseg decode head (``conv_seg`` and ``input_transform`` attributes), an mmpose
    ``HeatmapHead``, and a model with a ``stage4`` or ``backbone`` child plus an nn.Sequential
    ``last_layer``, ``head``, ``cls_head`` or ``aux_head``.
    """
    cls = type(module)
    names = [k.__name__ for k in cls.__mro__]
    if isinstance(getattr(module, "conv_seg", None), nn.Module) and hasattr(module, "input_transform"):
        return _inspect_mmseg(module, names)
    if "HeatmapHead" in names:
        return ("mmpose HeatmapHead: it takes one feature map; in HRNetV2 configs that map is the output of the "
                "FeatureMapProcessor(concat=True) neck, which other code (extract_feat, flip test, other heads) "
                "consumes, so fusing the concat into the head would change what the neck returns. Use "
                "hrfast.nn.HRNetV2Head.from_module(head) in your own forward instead")
    children = dict(module.named_children())
    if "stage4" not in children and "backbone" not in children:
        return None
    attr = next((a for a in (*_OFFICIAL_HEADS, *_OTHER_HEADS) if isinstance(children.get(a), nn.Sequential)), None)
    if attr is None:
        return None
    seq = children[attr]
    problems = _sequential_problems(seq, attr)
    if problems:
        return "; ".join(problems)
    trunk = _official_trunk(module, attr)
    if isinstance(trunk, str):
        return trunk
    problem = _hooked([seq, *seq])
    if problem:
        return problem
    conv, norm, _, classifier = seq
    return HeadSite("official", attr, trunk[0], (int(conv.weight.shape[1]), int(conv.weight.shape[0]),
                                                 int(classifier.weight.shape[0])), type(norm).__name__)


def _inspect_mmseg(module: nn.Module, names: List[str]) -> Union[HeadSite, str]:
    cls = type(module)
    if "FCNHead" not in names:
        return f"mmseg {cls.__name__} decode head: only FCNHead with input_transform='resize_concat' is the V2 head"
    base = names.index("FCNHead")
    for klass in cls.__mro__[:base]:
        overridden = [m for m in _FCN_METHODS if m in vars(klass)]
        if overridden:
            return f"{klass.__name__} subclasses FCNHead and overrides {', '.join(overridden)}; left alone"
    problems = mmseg_problems(module, batchnorm_only=True)
    if problems:
        return "; ".join(problems)
    unit = module.convs[0]
    conv, norm, act = unit.conv, unit.bn, unit.activate
    problem = _hooked([module.convs, unit, conv, norm, act, module.conv_seg])
    if problem:
        return problem
    return HeadSite("mmseg", "", "", (int(conv.weight.shape[1]), int(conv.weight.shape[0]),
                                      int(module.conv_seg.weight.shape[0])), type(norm).__name__)


# --------------------------------------------------------------------------------------------------- adapter


@dataclass(frozen=True)
class HeadConfig:
    """Per-module configuration of a patched head.

    layout / attr / trunk: as in `HeadSite`. The concat's bilinear align_corners: mmseg reads the head's own
    ``align_corners`` at every call (as ``_transform_inputs`` does); the official layout reads the model's
    ``align_corners`` attribute (`align_attr`) or the ``ALIGN_CORNERS`` global of its defining Python module
    (`align_global`) at every call, else uses `resample` (facial: False; or the arguments of `patch`).
    """

    backend: str
    layout: str
    attr: str = ""
    trunk: str = ""
    resample: Optional[Resample] = None
    align_attr: bool = False
    align_global: Optional[str] = None

    def resample_for(self, module: nn.Module) -> Resample:
        """The Resample of x1.. to x0's size, as of now."""
        if self.layout == "mmseg":
            return Resample("bilinear", align_corners=module.align_corners)
        # the fusion adapter's reading of the same attribute / global (one implementation of the rule)
        return FusionConfig(self.backend, "forward", self.resample, self.align_attr,
                            self.align_global).default_resample(module)


def _previous_resample(module: nn.Module) -> Optional[Resample]:
    fwd = module.__dict__.get("forward")
    config = getattr(fwd, "config", None) if isinstance(fwd, PatchedForward) else None
    return config.resample if isinstance(config, HeadConfig) else None


def _official_align(module: nn.Module, site: HeadSite, options: Options) -> Union[dict, Match]:
    """HeadConfig fields for the concat's align_corners, and how it was found, or a Match(skip/needs)."""
    if site.attr == "head":  # the facial forward passes an explicit align_corners=False
        return dict(resample=Resample("bilinear", align_corners=False), how="align_corners=False (facial layout)")
    cls = type(module)
    own = module.__dict__.get("align_corners", _MISSING)
    namespace = sys.modules.get(cls.__module__)
    if isinstance(own, bool):
        return dict(align_attr=True, how=f"align_corners from the model's align_corners attribute (now {own}, read "
                                         "at every call)")
    if namespace is not None and hasattr(namespace, ALIGN_GLOBAL):
        value = getattr(namespace, ALIGN_GLOBAL)
        if value is not None and not isinstance(value, bool):
            return Match(skip=f"{cls.__module__}.{ALIGN_GLOBAL} is {value!r}, not a bool")
        return dict(align_global=cls.__module__, how=f"align_corners from {cls.__module__}.{ALIGN_GLOBAL} (now "
                                                     f"{value}, read at every call)")
    if options.default is not None and options.default.mode == "bilinear":
        return dict(resample=options.default, how=f"align_corners={options.default.corners_aligned} (from the "
                                                  "align_corners= argument)")
    previous = _previous_resample(module)
    if previous is not None:
        return dict(resample=previous, how=f"align_corners={previous.corners_aligned} (from the arguments of an "
                                           "earlier hrfast.patch)")
    return Match(needs=(
        f"its forward resizes the branches for the concat before {site.attr} with a bilinear F.interpolate whose "
        f"align_corners neither the model (an `align_corners` attribute) nor its Python module {cls.__module__} "
        f"(an {ALIGN_GLOBAL} global) states; pass upsample='bilinear' and align_corners=True/False as in that call "
        "(no align_corners there means False) to hrfast.patch, or head=False"))


def fusable_branches(xs: Sequence) -> bool:
    """Whether the fused head can take these branches (else mmseg's original forward runs)."""
    if not 1 <= len(xs) <= 4 or not all(isinstance(x, Tensor) and x.dim() == 4 for x in xs):
        return False
    h, w = xs[0].shape[2:]
    return all(x.shape[2] <= h and x.shape[3] <= w and x.dtype == xs[0].dtype and x.device == xs[0].device
               for x in xs[1:])


def replay_official_trunk(model: nn.Module, x: Tensor) -> List[Tensor]:
    """The official HighResolutionNet forward up to stage 4 (checked by `_official_trunk`): stem, layer1, then
    per stage the transitions (an existing branch from its own output, a new one from the last) and the stage."""
    x = model.relu(model.bn1(model.conv1(x)))
    x = model.relu(model.bn2(model.conv2(x)))
    y_list = [model.layer1(x)]
    for s in (2, 3, 4):
        transition = getattr(model, f"transition{s - 1}")
        x_list = []
        for i in range(getattr(model, f"stage{s}_cfg")["NUM_BRANCHES"]):
            if transition[i] is None:
                x_list.append(y_list[i])
            else:
                x_list.append(transition[i](y_list[i] if i < len(y_list) else y_list[-1]))
        y_list = getattr(model, f"stage{s}")(x_list)
    return y_list


class HeadAdapter(Adapter):
    """Patches the HRNetV2 concat head (see the module docstring for what is matched)."""

    kind = "head"

    def match(self, module: nn.Module, options: Options) -> Optional[Match]:
        site = inspect_head(module)
        if site is None:
            return None
        if isinstance(site, str):
            return Match(skip=site)
        width, hidden, classes = site.channels
        if site.layout == "mmseg":
            config = HeadConfig(options.backend, "mmseg")
            what = (f"mmseg FCNHead (resize_concat of in_index {tuple(module.in_index)}), bilinear align_corners "
                    f"from its align_corners (now {module.align_corners}, read at every call)")
        else:
            found = _official_align(module, site, options)
            if isinstance(found, Match):
                return found
            how = found.pop("how")
            config = HeadConfig(options.backend, "official", site.attr, site.trunk, **found)
            family = "segmentation" if site.attr == "last_layer" else "facial-landmark"
            trunk = ("its forward_backbone" if site.trunk == "forward_backbone"
                     else "the official stem, layer1, transitions and stages")
            what = (f"official {family} head (concat in {type(module).__name__}.forward, then {site.attr}); "
                    f"bilinear {how}; trunk: {trunk}")
        detail = (f"{what}; {width} -> {hidden} -> {classes} channels, {site.norm} (folded in eval); "
                  f"backend {options.backend!r}")
        return Match(config=config, detail=detail)

    def bypassed(self, module: nn.Module, config: HeadConfig):
        """The head's layers, computed by the fused head instead of called (the modules `_hooked` checks)."""
        if config.layout == "mmseg":
            names = ("convs", "convs.0", "convs.0.conv", "convs.0.bn", "convs.0.activate", "conv_seg")
        else:
            seq = getattr(module, config.attr)
            names = (config.attr, *(f"{config.attr}.{k}" for k in range(len(seq))))
        return tuple((name, module.get_submodule(name)) for name in names)

    def forward(self, module: nn.Module, config: HeadConfig, inputs):
        """Official layout: the trunk as the original forward runs it, then the fused head over its 4 branches.
        mmseg: the fused head over ``inputs[i] for i in in_index`` (the original forward when those cannot be
        fused, e.g. a later branch larger than the first)."""
        if config.layout == "mmseg":
            xs = [inputs[i] for i in module.in_index]
            if not fusable_branches(xs):
                return type(module).forward(module, inputs)
            source, layout = module, "mmseg"
        else:
            xs = list(module.forward_backbone(inputs) if config.trunk == "forward_backbone"
                      else replay_official_trunk(module, inputs))
            source, layout = getattr(module, config.attr), "sequential"
        # built per call over the module's own children: never a registered submodule, follows deepcopy/pickle/.to()
        head = HRNetV2Head(source, layout, resample=config.resample_for(module), backend=config.backend)
        return head(xs)  # through __call__, so global module hooks (hrfast.flops) see the fused head
