"""The HRFPN adapter: one structural matcher for HRNetV2p's HRFPN neck (HRNET_LAYOUTS.md section 5), and its
patched forward.

Two upstream classes named ``HRFPN`` run the same algorithm under different attribute names (`LAYOUTS`):

- mmdet (2.x / 3.x): ``reduction_conv`` (ConvModule, act_cfg=None), ``fpn_convs``, ``num_outs``, ``pooling``,
  ``with_cp`` (mmdet 1.x, whose 3x3 convs are ``fpn_conv``, is not taken);
- the official HRNet-Object-Detection: ``reduction_conv`` (``Sequential(Conv2d)``), ``fpn_conv`` (a ModuleList of 5
  or, with ``share_conv``, one shared conv), ``pooling``, ``with_checkpoint``.

Many forks keep the class name and change the forward, so a module is taken only when its class's ``forward`` is
HRFPN's own (not overridden by a subclass) and uses exactly the attribute and global names and the string
constants of the upstream forward of its layout (a fingerprint of the code object, see `_fingerprint_problem`).

The patched forward computes the reduction as `hrfast.nn.HRFPNReduction` (built per call over the module's own
``reduction_conv``, never registered: state_dict unchanged; called through ``__call__`` so `hrfast.flops` counts
it), under ``torch.utils.checkpoint`` exactly when the original checkpoints ``reduction_conv`` (the checkpoint flag
set, and an input needing a gradient); pooling and the 3x3 convs then run as the original runs them, checkpointed
under the same condition. Inputs the fused reduction cannot take (a branch count other than the module's, sizes
that are not exact 2^j multiples, mixed dtypes) run the original forward, which raises where it raised.

Its kind is "head" (HRFPN is detection's V2 concat): ``hrfast.patch(model, head=False)`` leaves it alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import CodeType
from typing import List, Optional, Tuple, Union

import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..flops import macs_per_pixel
from ..nn.hrfpn import HRFPNReduction, reduction_conv_of
from .core import Adapter, Match, Options

__all__ = ["HRFPNAdapter", "HRFPNLayout", "HRFPNConfig", "inspect_hrfpn", "LAYOUTS"]

_SHARED_NAMES = frozenset({"len", "range", "append", "F", "interpolate", "torch", "cat", "requires_grad",
                           "checkpoint", "reduction_conv", "pooling", "tuple"})
_STRINGS = frozenset({"bilinear", "scale_factor", "mode", "dim", "kernel_size", "stride"})


@dataclass(frozen=True)
class HRFPNLayout:
    """Where one upstream HRFPN keeps what its forward reads."""

    name: str
    convs: str  # the 3x3 convs: a ModuleList (or one shared conv, see `shared`)
    checkpoint: str  # the bool attribute that turns torch.utils.checkpoint on
    num_outs: Optional[str]  # attribute with the number of levels; None: 5 (hard-coded upstream)
    shared: Optional[str]  # attribute that makes `convs` one conv shared by every level (never checkpointed)
    names: frozenset  # co_names of the upstream forward

    def levels(self, module: nn.Module) -> int:
        return 5 if self.num_outs is None else int(getattr(module, self.num_outs))

    def is_shared(self, module: nn.Module) -> bool:
        return self.shared is not None and bool(getattr(module, self.shared))


LAYOUTS = (
    HRFPNLayout("mmdet", "fpn_convs", "with_cp", "num_outs", None,
                _SHARED_NAMES | {"num_ins", "num_outs", "with_cp", "fpn_convs"}),
    HRFPNLayout("official HRNet-Object-Detection", "fpn_conv", "with_checkpoint", None, "share_conv",
                _SHARED_NAMES | {"in_channels", "with_checkpoint", "share_conv", "fpn_conv"}),
)


@dataclass(frozen=True)
class HRFPNSite:
    """What `inspect_hrfpn` read from an HRFPN: its layout, branch channels, reduction width."""

    layout: HRFPNLayout
    channels: Tuple[int, ...]
    out_channels: int


def _defining_hrfpn(cls: type) -> Optional[type]:
    return next((k for k in cls.__mro__ if k.__name__ == "HRFPN"), None)


def _codes(code) -> List[CodeType]:
    """`code` and the code objects nested in it (comprehensions, lambdas, inner functions)."""
    return [code] + [c for const in code.co_consts if isinstance(const, CodeType) for c in _codes(const)]


def _strings(code) -> set:
    """String constants of `code`, keyword-name tuples flattened, the docstring left out."""
    found = set()
    for k, c in enumerate(code.co_consts):
        items = c if isinstance(c, tuple) else (c,)
        found |= {s for s in items if isinstance(s, str) and not (k == 0 and " " in s)}
    return found


def _fingerprint_problem(forward, layout: HRFPNLayout) -> Optional[str]:
    """Why `forward` is not the upstream forward of `layout` (names it uses, string constants), else None."""
    code = getattr(forward, "__code__", None)
    if code is None:
        return "its forward has no Python code object to compare with the upstream HRFPN forward"
    codes = _codes(code)
    names, strings = set().union(*(c.co_names for c in codes)), set().union(*(_strings(c) for c in codes))
    extra, missing = sorted(names - layout.names), sorted(layout.names - names)
    if extra or missing or strings != _STRINGS or code.co_argcount != 2:
        parts = ([f"uses {', '.join(extra)}"] if extra else []) + ([f"lacks {', '.join(missing)}"] if missing else [])
        if strings != _STRINGS:
            parts.append(f"string constants {sorted(strings)}")
        if code.co_argcount != 2:
            parts.append(f"{code.co_argcount - 1} arguments")
        return (f"its forward is not the upstream {layout.name} HRFPN forward ({'; '.join(parts) or 'signature'}): a "
                "fork whose neck may differ; left alone")
    return None


def _layout_of(module: nn.Module) -> Optional[HRFPNLayout]:
    for layout in LAYOUTS:
        attrs = [layout.convs, layout.checkpoint] + [a for a in (layout.num_outs, layout.shared) if a]
        if all(hasattr(module, a) for a in attrs):
            return layout
    return None


def inspect_hrfpn(module: nn.Module) -> Union[HRFPNSite, str, None]:
    """The HRFPN `module` is; a string saying why it cannot be fused; None when it is no HRFPN (no report row).

    Candidates: a module of a class named ``HRFPN`` (or a subclass) with a ``reduction_conv`` child.
    """
    cls = _defining_hrfpn(type(module))
    if cls is None or not isinstance(getattr(module, "reduction_conv", None), nn.Module):
        return None
    if "forward" not in vars(cls) or type(module).forward is not cls.forward:
        return f"{type(module).__name__} overrides HRFPN.forward; left alone"
    layout = _layout_of(module)
    if layout is None:
        return ("attributes of neither the mmdet nor the official HRFPN (fpn_convs, with_cp / fpn_conv, "
                "with_checkpoint)")
    problem = _fingerprint_problem(cls.forward, layout)
    if problem:
        return problem
    found = reduction_conv_of(module.reduction_conv)
    if isinstance(found, str):
        return found
    channels = getattr(module, "in_channels", None)
    conv = found[1]
    if (not isinstance(channels, (list, tuple)) or not channels or not all(isinstance(c, int) for c in channels)
            or sum(channels) != conv.weight.shape[1]):
        return f"in_channels={channels!r} does not add up to the reduction conv's {conv.weight.shape[1]} inputs"
    if not callable(getattr(module, "pooling", None)):
        return "pooling is not callable"
    return HRFPNSite(layout, tuple(channels), int(conv.weight.shape[0]))


# --------------------------------------------------------------------------------------------------- adapter


@dataclass(frozen=True)
class HRFPNConfig:
    """Per-module configuration of a patched HRFPN: its layout and the backend of the fusion op."""

    backend: str
    layout: HRFPNLayout


def _fusable(module: nn.Module, inputs) -> bool:
    """Whether the fused reduction reproduces the original on `inputs` (else the original forward runs): one
    tensor per branch of one dtype and device, branch j exactly 2^j times smaller than branch 0."""
    if not isinstance(inputs, (list, tuple)) or len(inputs) != len(module.in_channels):
        return False
    if not all(isinstance(x, Tensor) and x.dim() == 4 for x in inputs):
        return False
    h, w = inputs[0].shape[2:]
    return all(x.shape[2] * 2 ** j == h and x.shape[3] * 2 ** j == w and x.dtype == inputs[0].dtype
               and x.device == inputs[0].device for j, x in enumerate(inputs))


class HRFPNAdapter(Adapter):
    """Patches HRNetV2p's HRFPN neck (see the module docstring). Kind "head": it is the V2 concat of detection."""

    kind = "head"

    def match(self, module: nn.Module, options: Options) -> Optional[Match]:
        site = inspect_hrfpn(module)
        if site is None:
            return None
        if isinstance(site, str):
            return Match(skip=site)
        eager, fused = macs_per_pixel(site.channels, site.out_channels)
        cp = site.layout.checkpoint
        detail = (f"{site.layout.name} HRFPN: reduction conv1x1 {sum(site.channels)} -> {site.out_channels} over the "
                  f"bilinear (scale_factor 2**j) concat of {len(site.channels)} branches {site.channels}, fused as "
                  f"W_0 x_0 + sum_j Up(W_j x_j); reduction MACs per branch-0 pixel {eager:g} -> {fused:g} "
                  f"({eager / fused:.1f}x fewer); {cp} honoured (now {getattr(module, cp)}); pooling and 3x3 convs "
                  f"as before; backend {options.backend!r}")
        return Match(config=HRFPNConfig(options.backend, site.layout), detail=detail)

    def bypassed(self, module: nn.Module, config: HRFPNConfig):
        """``reduction_conv`` and its conv: the fused reduction reads their weights instead of calling them."""
        return tuple((name, m) for name, m in module.named_modules(prefix="reduction_conv"))

    def forward(self, module: nn.Module, config: HRFPNConfig, inputs):
        """The original forward, with the concat and reduction conv as one fused reduction."""
        if not _fusable(module, inputs):
            return type(module).forward(module, inputs)
        layout = config.layout
        xs = list(inputs)
        use_cp = bool(getattr(module, layout.checkpoint))
        reduction = HRFPNReduction(module.reduction_conv, backend=config.backend)  # per call: never registered
        if use_cp and any(x.requires_grad for x in xs):  # the original's `out.requires_grad and with_cp`
            # use_reentrant=True: what upstream's bare checkpoint(...) call runs (PyTorch's default)
            out = checkpoint(lambda *branches: reduction(list(branches)), *xs, use_reentrant=True)
        else:
            out = reduction(xs)
        return _pyramid(module, layout, out, use_cp)


def _pyramid(module: nn.Module, layout: HRFPNLayout, out: Tensor, use_cp: bool) -> tuple:
    """The rest of HRFPN's forward: pooled levels, then the 3x3 conv of each level, checkpointed as upstream."""
    levels = [out] + [module.pooling(out, kernel_size=2 ** i, stride=2 ** i) for i in range(1, layout.levels(module))]
    convs = getattr(module, layout.convs)
    if layout.is_shared(module):  # the official shared conv is never checkpointed
        return tuple(convs(level) for level in levels)
    outputs = []
    for i, level in enumerate(levels):
        if level.requires_grad and use_cp:
            outputs.append(checkpoint(convs[i], level, use_reentrant=True))
        else:
            outputs.append(convs[i](level))
    return tuple(outputs)
