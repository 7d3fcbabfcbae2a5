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

import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import torch.nn as nn

from ..batchnorm import can_fold
from ..hrnet.fusion import (ALIGN_GLOBAL, FusionLoop, activation_attr, called_modules, describe_fuse_layers,
                            describe_hr_module, read_fusion_loop, resizes_in_forward)
from ..nn.fusion import fusion_forward
from ..plan import Resample
from .core import Adapter, Match, Options, PatchedForward

__all__ = ["FusionAdapter", "FusionConfig"]

_MISSING = object()


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

    def fuses(self, x) -> bool:
        """Whether the fused step computes what the original forward does for branch inputs `x`: always, but for
        "double" (mmseg), where only branches exactly 2^k times smaller make its second resize the identity."""
        return self.placement != "double" or _exact(self.exact_scales, x)

    def default_resample(self, module: nn.Module) -> Optional[Resample]:
        """The Resample of `module`'s entries without an upsample module, as of now."""
        if self.align_attr:
            value = module.align_corners
        elif self.align_global is not None:
            namespace = sys.modules.get(self.align_global)
            if namespace is None or not hasattr(namespace, ALIGN_GLOBAL):
                raise RuntimeError(f"hrfast: the patched module reads {self.align_global}.{ALIGN_GLOBAL}, which no "
                                   "longer exists; re-run hrfast.patch or hrfast.unpatch")
            value = getattr(namespace, ALIGN_GLOBAL)
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


def _loop_problem(loop: FusionLoop, config: FusionConfig, default: Optional[Resample]) -> Optional[str]:
    """Why the forward's own resizes disagree with how the fused step would resample (None: they agree).
    "module": the upsample modules do it all, the forward must not resize; "forward": it resizes every j > i term,
    as `default` does; "double" (mmseg) is fused only where its second resize is the identity: either is fine."""
    if config.placement == "double":
        return None
    wanted = config.placement == "forward"
    for i, row in enumerate(loop.resized):
        for j in range(i + 1, len(row)):
            if row[j] != wanted:
                return f"term ({i}, {j}) is {'not ' if wanted else ''}resized in forward, which its fuse_layers imply"
    for mode, align in loop.modes:
        if mode != default.mode or (mode == "bilinear" and bool(align) != bool(default.align_corners)):
            return (f"it resizes with mode={mode!r}, align_corners={align}, but the fused step would use "
                    f"{default.describe()}")
    return None


def _previous_resample(module: nn.Module) -> Optional[Resample]:
    fwd = module.__dict__.get("forward")
    config = getattr(fwd, "config", None) if isinstance(fwd, PatchedForward) else None
    return config.resample if isinstance(config, FusionConfig) else None


class FusionAdapter(Adapter):
    """Patches the fusion step of HRNet modules (see the module docstring for what is matched)."""

    kind = "fusion"

    def match(self, module: nn.Module, options: Options) -> Optional[Match]:
        layout = describe_hr_module(module)
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
                modes.append(r.describe())
            mode = "/".join(dict.fromkeys(modes)) + " x2^k"
            kinds = "/".join(dict.fromkeys(type(up).__name__ for _, _, up in ups))
            wrapped = [type(up).__name__ for _, _, up in ups if not isinstance(up, nn.Upsample)]
            double = (f"{wrapped[0]} is no nn.Upsample (mmseg's wrapper; its forward resizes again)" if wrapped
                      else resizes_in_forward(cls))
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
            elif namespace is not None and hasattr(namespace, ALIGN_GLOBAL):
                value = getattr(namespace, ALIGN_GLOBAL)
                if value is not None and not isinstance(value, bool):
                    return Match(skip=f"{cls.__module__}.{ALIGN_GLOBAL} is {value!r}, not a bool")
                config = FusionConfig(options.backend, "forward", align_global=cls.__module__)
                how = (f"bilinear in forward, align_corners from {cls.__module__}.{ALIGN_GLOBAL} (now {value}, "
                       "read at every call)")
            elif options.default is not None:
                config = FusionConfig(options.backend, "forward", resample=options.default)
                how = f"{options.default.describe()} in forward (from the upsample=/align_corners= arguments)"
            elif _previous_resample(module) is not None:  # patched before with the arguments: keep their mode
                config = FusionConfig(options.backend, "forward", resample=_previous_resample(module))
                how = f"{config.resample.describe()} in forward (from the arguments of an earlier hrfast.patch)"
            else:
                return Match(needs=(
                    "fuse_layers[0][1] holds no upsample module, so forward upsamples (official segmentation / "
                    f"facial-landmark layout), and neither the module (an `align_corners` attribute) nor its Python "
                    f"module {cls.__module__} (an {ALIGN_GLOBAL} global) says how; pass "
                    "upsample='bilinear' and align_corners=True/False as in its F.interpolate call (no "
                    "align_corners there means False) to hrfast.patch"))
            default = config.default_resample(module)
        try:
            describe_fuse_layers(module.fuse_layers, default)
        except (TypeError, ValueError) as exc:
            return Match(skip=f"the fused step cannot run it: {exc}")
        loop = read_fusion_loop(module, layout.activation)
        problem = loop if isinstance(loop, str) else _loop_problem(loop, config, default)
        if problem:
            return Match(skip=f"{cls.__name__}.forward is not a fusion loop hrfast recognises ({problem}); left alone")
        folded = [m for m in module.fuse_layers.modules() if can_fold(m)]
        norms = "/".join(layout.norms) + (" (folded)" if folded else " (run as modules)")
        detail = (f"{layout.family} layout, {layout.num_branches} branches -> {layout.num_outputs} outputs, "
                  f"channels {'/'.join(map(str, layout.channels))}; {how}; {norms}; backend {options.backend!r}")
        return Match(config=config, detail=detail)

    def bypassed(self, module: nn.Module, config: FusionConfig):
        """The fuse activation and every module of fuse_layers the fused step does not call: upsample modules,
        foldable batch norms, identities, the Sequential containers (their parts are called one by one)."""
        description = describe_fuse_layers(module.fuse_layers, None, require_resample=False)
        called = called_modules(description, can_fold)
        act = activation_attr(module)
        named = [(act, getattr(module, act))] if act is not None else []
        named += [(f"fuse_layers.{name}", m) for name, m in module.fuse_layers.named_modules()
                  if id(m) not in called and not isinstance(m, nn.ModuleList)]
        return tuple(named)

    def forward(self, module: nn.Module, config: FusionConfig, x):
        """``x[i] = branches[i](x[i])`` for every branch (in the caller's list, as the original), then the fused
        fusion step; returns a new list of fresh tensors (one per row of fuse_layers)."""
        if not config.fuses(x):
            return type(module).forward(module, x)  # two bilinear passes: the original computes them
        branches = module.branches
        n = len(branches)
        for i in range(n):
            x[i] = branches[i](x[i])
        return fusion_forward(module.fuse_layers, x[:n], default=config.default_resample(module),
                              backend=config.backend)
