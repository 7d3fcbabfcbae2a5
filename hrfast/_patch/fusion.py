"""The fusion adapter: one structural matcher for every HRNet multi-resolution module, and its patched forward.

Matched by structure, not by class: a `branches` nn.ModuleList plus a `fuse_layers` nn.ModuleList of
nn.ModuleList indexed ``[i_out][j_in]`` whose entries are the HRNet ones (identity: None or nn.Identity; j > i:
``Sequential(conv1x1 s1, norm[, upsample])``; j < i: ``Sequential`` of i - j ``Sequential(conv3x3 s2, norm[,
ReLU])`` blocks, ReLU on all but the last), channels read from the conv weights, and a ReLU fuse activation
(`fuse_act` in timm, `relu` elsewhere). This covers timm and the official MSRA `HighResolutionModule`
(segmentation, pose, classification, facial landmarks, detection) and the mm* `HRModule` (mmseg, mmpose,
mmdet, mmpretrain) without per-source code; what differs between them (class and attribute names, where and
how the upsampling happens) is read from the module, see `FusionAdapter.match`.
"""
from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn._norm import can_fold
from ..nn.fusion import _describe, _is_upsample, _parse, fusion_forward
from ..ops.resample import Resample
from .core import Adapter, Match, Options, PatchedForward

__all__ = ["FusionAdapter", "FusionConfig", "inspect_hr_module", "HRLayout"]

# classes whose fusion is the HRNet one (matched by name: the packages are not imported)
_KNOWN_BASES = ("HighResolutionModule", "HRModule")
# classes that look like HRNet modules but fuse differently
_REJECTED = {
    "HRFomerModule": "mmpose HRFormer module: its fuse_layers downsample with depthwise+pointwise convs and its "
                     "branches are transformer blocks, a different fusion",
    "LiteHRModule": "mmpose Lite-HRNet module: a different fusion",
}
# methods a subclass overrides when it changes the fusion
_FUSION_METHODS = ("forward", "_make_fuse_layers")
_ALIGN_GLOBAL = "ALIGN_CORNERS"
_RESIZE_CALL = re.compile(r"\b(interpolate|resize|upsample)\s*\(")
_MISSING = object()


# ------------------------------------------------------------------------------------------------- matcher


@dataclass(frozen=True)
class HRLayout:
    """What the structural matcher read from an HRNet module."""

    num_branches: int
    num_outputs: int  # rows of fuse_layers: num_branches, or 1 with multi_scale_output=False
    channels: Tuple[int, ...]  # per branch, from the conv weights
    activation: str  # attribute holding the fuse ReLU: "fuse_act" (timm) or "relu"
    upsamplers: Tuple[Tuple[int, int, nn.Module], ...]  # (i, j, module) for the j > i entries that have one
    norms: Tuple[str, ...]  # class names of the norms in fuse_layers
    family: str


def _class_problem(cls: type) -> Optional[str]:
    for klass in cls.__mro__:
        if klass.__name__ in _REJECTED:
            prefix = "" if klass is cls else f"subclass of {klass.__name__}, "
            return f"{prefix}{_REJECTED[klass.__name__]}; left alone"
    base = next((k for k in cls.__mro__ if k.__name__ in _KNOWN_BASES), None)
    if base is not None:
        for klass in cls.__mro__[:cls.__mro__.index(base)]:
            overridden = [m for m in _FUSION_METHODS if m in vars(klass)]
            if overridden:
                return (f"{klass.__name__} subclasses {base.__name__} and overrides {', '.join(overridden)}, so its "
                        "fusion may differ; left alone")
    if getattr(cls, "forward", None) is nn.Module.forward:
        return "its class defines no forward"
    return None


def _norm_name(m: nn.Module) -> Optional[str]:
    """The class name of a norm the fused step handles (batch norms folded or run, group norm run), else None."""
    if isinstance(m, (_BatchNorm, nn.GroupNorm)) or type(m).__name__ == "FrozenBatchNorm2d":
        return type(m).__name__
    return None


def _conv_problem(m, where: str, k: int, s: int) -> Optional[str]:
    if not isinstance(m, nn.Conv2d):
        return f"{where} is {type(m).__name__}, not an nn.Conv2d"
    if isinstance(m.weight, nn.parameter.UninitializedParameter):
        return f"{where} is a lazy conv that has not run yet"
    if m.kernel_size != (k, k) or m.stride != (s, s) or m.dilation != (1, 1) or m.groups != 1:
        return (f"{where} is a conv with kernel {m.kernel_size}, stride {m.stride}, dilation {m.dilation}, groups "
                f"{m.groups}; the HRNet fusion has a {k}x{k} stride-{s} dense conv there")
    return None


def _in_ch(conv: nn.Conv2d) -> int:
    return int(conv.weight.shape[1])  # groups == 1 (checked)


def _out_ch(conv: nn.Conv2d) -> int:
    return int(conv.weight.shape[0])


def inspect_hr_module(module: nn.Module) -> Union[HRLayout, str, None]:
    """The layout of an HRNet fusion module; a string saying why `module` is not one the fused step can take over;
    or None when `module` is no HRNet candidate at all (no `fuse_layers`, not an HRNet class)."""
    cls = type(module)
    fuse_layers = getattr(module, "fuse_layers", _MISSING)
    names = {k.__name__ for k in cls.__mro__}
    if fuse_layers is _MISSING and not names & (set(_KNOWN_BASES) | set(_REJECTED)):
        return None
    problem = _class_problem(cls)
    if problem:
        return problem
    branches = getattr(module, "branches", None)
    if not isinstance(branches, nn.ModuleList) or len(branches) == 0:
        return "has no non-empty `branches` nn.ModuleList: not an HRNet multi-branch module"
    n = len(branches)
    if fuse_layers is None or isinstance(fuse_layers, nn.Identity):
        if n == 1:
            return "single branch (fuse_layers is " + type(fuse_layers).__name__ + "): no fusion step"
        return f"{n} branches but fuse_layers is {type(fuse_layers).__name__}"
    if fuse_layers is _MISSING or not isinstance(fuse_layers, nn.ModuleList):
        return f"fuse_layers is {type(fuse_layers).__name__ if fuse_layers is not _MISSING else 'missing'}, " \
               "not an nn.ModuleList of nn.ModuleList"
    rows = len(fuse_layers)
    if not 1 <= rows <= n:
        return f"fuse_layers has {rows} rows for {n} branches"
    num_branches = getattr(module, "num_branches", None)
    if isinstance(num_branches, int) and num_branches != n:
        return f"num_branches is {num_branches} but there are {n} branches"
    for flag in ("multi_scale_output", "multiscale_output"):
        value = getattr(module, flag, None)
        if isinstance(value, bool) and rows != (n if value else 1):
            return f"{flag}={value} but fuse_layers has {rows} rows for {n} branches"

    activation = next((a for a in ("fuse_act", "relu") if getattr(module, a, None) is not None), None)
    if activation is None:
        return "has no fuse activation (`relu` or `fuse_act`)"
    if not isinstance(getattr(module, activation), nn.ReLU):
        return f"its fuse activation `{activation}` is {type(getattr(module, activation)).__name__}, not nn.ReLU"

    channels: List[Optional[int]] = [None] * n
    norms, upsamplers = [], []

    def note_channels(idx: int, c: int, where: str) -> Optional[str]:
        if channels[idx] is None:
            channels[idx] = c
        elif channels[idx] != c:
            return f"{where} implies {c} channels for branch {idx}, elsewhere {channels[idx]}"
        return None

    def check_norm(m, where: str, c: int) -> Optional[str]:
        name = _norm_name(m)
        if name is None:
            return f"{where} is {type(m).__name__}, a norm hrfast does not know; left alone"
        features = getattr(m, "num_features", getattr(m, "num_channels", c))
        if features != c:
            return f"{where} normalises {features} channels, its conv gives {c}"
        norms.append(name)
        return None

    for i, row in enumerate(fuse_layers):
        if not isinstance(row, nn.ModuleList) or len(row) != n:
            return (f"fuse_layers[{i}] is {type(row).__name__}"
                    + (f" of {len(row)} entries" if isinstance(row, nn.ModuleList) else "")
                    + f", expected an nn.ModuleList of {n} entries")
        for j, entry in enumerate(row):
            where = f"fuse_layers[{i}][{j}]"
            if j == i:
                if entry is not None and not isinstance(entry, nn.Identity):
                    return f"{where} (j == i) is {type(entry).__name__}, expected None or nn.Identity"
                continue
            if not isinstance(entry, nn.Sequential):
                return f"{where} is {type(entry).__name__}, expected an nn.Sequential"
            mods = list(entry)
            if j > i:
                if len(mods) == 3 and _is_upsample(mods[2]):
                    upsamplers.append((i, j, mods[2]))
                elif len(mods) != 2:
                    return f"{where} holds {len(mods)} modules, expected (conv1x1, norm[, upsample])"
                problem = (_conv_problem(mods[0], f"{where}[0]", 1, 1)
                           or note_channels(j, _in_ch(mods[0]), f"{where}[0]")
                           or note_channels(i, _out_ch(mods[0]), f"{where}[0]")
                           or check_norm(mods[1], f"{where}[1]", _out_ch(mods[0])))
            else:
                if len(mods) != i - j:
                    return f"{where} chains {len(mods)} blocks, expected {i - j} (conv3x3 s2, norm[, ReLU])"
                problem = None
                for k, block in enumerate(mods):
                    last = k == i - j - 1
                    bw = f"{where}[{k}]"
                    if not isinstance(block, nn.Sequential) or len(block) != (2 if last else 3):
                        size = f" of {len(block)}" if isinstance(block, nn.Sequential) else ""
                        return (f"{bw} is {type(block).__name__}{size}, expected Sequential(conv3x3 s2, norm"
                                + (")" if last else ", ReLU)"))
                    conv = block[0]
                    problem = _conv_problem(conv, f"{bw}[0]", 3, 2)
                    if problem is None:
                        c_in, c_out = _in_ch(conv), _out_ch(conv)
                        problem = (note_channels(j, c_in, f"{bw}[0]")
                                   or (note_channels(i, c_out, f"{bw}[0]") if last else
                                       None if c_out == c_in else f"{bw}[0] changes the channels before the last block")
                                   or check_norm(block[1], f"{bw}[1]", c_out))
                    if problem:
                        break
                    if not last and not isinstance(block[2], nn.ReLU):
                        return f"{bw}[2] is {type(block[2]).__name__}, expected nn.ReLU"
            if problem:
                return problem
    if any(c is None for c in channels):
        return "could not read every branch's channels from fuse_layers"
    family = ("timm" if hasattr(module, "num_in_chs") else "official MSRA" if hasattr(module, "num_inchannels")
              else "mm*" if hasattr(module, "in_channels") and hasattr(module, "multiscale_output") else "HRNet-like")
    return HRLayout(n, rows, tuple(channels), activation, tuple(upsamplers), tuple(dict.fromkeys(norms)), family)


def _resizes_in_forward(cls: type) -> Optional[str]:
    """Why the class's forward is believed to resize the j > i terms again (mmseg), or None."""
    if cls.__module__.split(".")[0] == "mmseg":
        return "mmseg's HRModule resizes in forward too"
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    source = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    if _RESIZE_CALL.search(source):
        return f"{cls.__name__}.forward calls a resize"
    return None


# --------------------------------------------------------------------------------------------------- adapter


@dataclass(frozen=True)
class FusionConfig:
    """Per-module configuration of a patched fusion module.

    placement: "module" (upsample modules in fuse_layers), "double" (those plus a resize in forward: mmseg),
    "forward" (no upsample module; the original upsamples in forward).
    resample: the Resample of the forward-side upsampling, from the arguments of `patch`.
    align_attr: the forward-side bilinear align_corners is the module's own ``align_corners`` attribute, read at
    every call (hrfast.models' reference segmentation / landmark modules).
    align_global: the Python module whose ``ALIGN_CORNERS`` global sets the forward-side bilinear
    align_corners, read at every call (official segmentation).
    exact_scales: (i, j, 2**(j-i)) for "double": the sizes on which one resize equals the original two.
    """

    backend: str
    placement: str
    resample: Optional[Resample] = None
    align_attr: bool = False
    align_global: Optional[str] = None
    exact_scales: Tuple[Tuple[int, int, int], ...] = ()

    def default_resample(self, module: nn.Module) -> Optional[Resample]:
        """The Resample of `module`'s entries without an upsample module, as of now."""
        if self.align_attr:
            value = module.align_corners
        elif self.align_global is not None:
            namespace = sys.modules.get(self.align_global)
            if namespace is None or not hasattr(namespace, _ALIGN_GLOBAL):
                raise RuntimeError(f"hrfast: the patched module reads {self.align_global}.{_ALIGN_GLOBAL}, which no "
                                   "longer exists; re-run hrfast.patch or hrfast.unpatch")
            value = getattr(namespace, _ALIGN_GLOBAL)
        else:
            return self.resample
        return Resample(mode="bilinear", align_corners=None if value is None else bool(value))


def _exact(scales, x) -> bool:
    for i, j, s in scales:
        hi, wi = x[i].shape[-2:]
        hj, wj = x[j].shape[-2:]
        if (hj * s, wj * s) != (hi, wi):
            return False
    return True


def _previous_resample(module: nn.Module) -> Optional[Resample]:
    fwd = module.__dict__.get("forward")
    config = getattr(fwd, "config", None) if isinstance(fwd, PatchedForward) else None
    return config.resample if isinstance(config, FusionConfig) else None


class FusionAdapter(Adapter):
    """Patches the fusion step of HRNet modules (see the module docstring for what is matched)."""

    kind = "fusion"

    def match(self, module: nn.Module, options: Options) -> Optional[Match]:
        layout = inspect_hr_module(module)
        if layout is None:
            return None
        if isinstance(layout, str):
            return Match(skip=layout)
        n_up = sum(1 for i in range(layout.num_outputs) for j in range(i + 1, layout.num_branches))
        ups = layout.upsamplers
        if ups and len(ups) != n_up:
            return Match(skip=f"{len(ups)} of the {n_up} upsample paths of fuse_layers hold an upsample module and "
                              "the others not; unknown layout")
        cls = type(module)
        if ups:
            modes = []
            for i, j, up in ups:
                try:
                    r = Resample.from_module(up)
                except (ValueError, TypeError) as exc:
                    return Match(skip=f"fuse_layers[{i}][{j}][2]: {exc}")
                factor = 2 ** (j - i)
                if r.scale_factor not in (factor, (factor, factor)):
                    return Match(skip=f"fuse_layers[{i}][{j}][2] scales by {r.scale_factor}, expected {factor}")
                modes.append(_describe(r))
            mode = "/".join(dict.fromkeys(modes)) + " x2^k"
            kinds = "/".join(dict.fromkeys(type(up).__name__ for _, _, up in ups))
            wrapped = [type(up).__name__ for _, _, up in ups if not isinstance(up, nn.Upsample)]
            double = (f"{wrapped[0]} is no nn.Upsample (mmseg's wrapper; its forward resizes again)" if wrapped
                      else _resizes_in_forward(cls))
            if double:
                config = FusionConfig(options.backend, "double",
                                      exact_scales=tuple((i, j, 2 ** (j - i)) for i, j, _ in ups))
                how = (f"{mode} by {kinds} in fuse_layers, then a resize in forward ({double}): fused when every "
                       "branch is exactly 2^k times smaller, else the original forward runs")
            else:
                config = FusionConfig(options.backend, "module")
                how = f"{mode} by {kinds} in fuse_layers"
            default = None
        else:
            namespace = sys.modules.get(cls.__module__)
            own = module.__dict__.get("align_corners", _MISSING)
            if isinstance(own, bool):
                config = FusionConfig(options.backend, "forward", align_attr=True)
                how = (f"bilinear in forward, align_corners from the module's align_corners attribute (now {own}, "
                       "read at every call)")
            elif namespace is not None and hasattr(namespace, _ALIGN_GLOBAL):
                value = getattr(namespace, _ALIGN_GLOBAL)
                if value is not None and not isinstance(value, bool):
                    return Match(skip=f"{cls.__module__}.{_ALIGN_GLOBAL} is {value!r}, not a bool")
                config = FusionConfig(options.backend, "forward", align_global=cls.__module__)
                how = (f"bilinear in forward, align_corners from {cls.__module__}.{_ALIGN_GLOBAL} (now {value}, "
                       "read at every call)")
            elif options.default is not None:
                config = FusionConfig(options.backend, "forward", resample=options.default)
                how = f"{_describe(options.default)} in forward (from the upsample=/align_corners= arguments)"
            elif _previous_resample(module) is not None:  # patched before with the arguments: keep their mode
                config = FusionConfig(options.backend, "forward", resample=_previous_resample(module))
                how = f"{_describe(config.resample)} in forward (from the arguments of an earlier hrfast.patch)"
            else:
                return Match(needs=(
                    "fuse_layers[0][1] holds no upsample module, so forward upsamples (official segmentation / "
                    f"facial-landmark layout), and neither the module (an `align_corners` attribute) nor its Python "
                    f"module {cls.__module__} (an {_ALIGN_GLOBAL} global) says how; pass "
                    "upsample='bilinear' and align_corners=True/False as in its F.interpolate call (no "
                    "align_corners there means False) to hrfast.patch"))
            default = config.default_resample(module)
        try:
            _parse(module.fuse_layers, default)
        except (TypeError, ValueError) as exc:
            return Match(skip=f"the fused step cannot run it: {exc}")
        folded = [m for m in module.fuse_layers.modules() if can_fold(m)]
        norms = "/".join(layout.norms) + (" (folded)" if folded else " (run as modules)")
        detail = (f"{layout.family} layout, {layout.num_branches} branches -> {layout.num_outputs} outputs, "
                  f"channels {'/'.join(map(str, layout.channels))}; {how}; {norms}; backend {options.backend!r}")
        return Match(config=config, detail=detail)

    def forward(self, module: nn.Module, config: FusionConfig, x):
        """``x[i] = branches[i](x[i])`` for every branch (in the caller's list, as the original), then the fused
        fusion step; returns a new list of fresh tensors (one per row of fuse_layers)."""
        if config.placement == "double" and not _exact(config.exact_scales, x):
            return type(module).forward(module, x)  # two bilinear passes: the original computes them
        branches = module.branches
        n = len(branches)
        for i in range(n):
            x[i] = branches[i](x[i])
        return fusion_forward(module.fuse_layers, x[:n], default=config.default_resample(module),
                              backend=config.backend)
