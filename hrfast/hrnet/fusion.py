"""The structure of an HRNet fusion module, read once for everyone who needs it (`hrfast.nn`, `hrfast.patch`).

- `describe_fuse_layers(fuse_layers, default)`: how each term (i, j) of ``fuse_layers[i][j]`` is computed:
  the modules that run in PyTorch, the last module (a norm, folded into the fused op when it is a foldable
  batch norm) and the resampling (from an upsample module, else `default`). Raises TypeError/ValueError for a
  layout the fused step cannot run.
- `describe_hr_module(module)`: the stricter reading the patcher uses before it takes over a module's forward:
  a `branches` ModuleList, HRNet's own conv shapes, channels, norms and a ReLU fuse activation; a string with
  the reason when the module is HRNet-like but different, None when it is no HRNet candidate at all.
- `read_fusion_loop(module, activation)`: what the class's forward computes, read by running it once on
  symbolic stand-ins: a `FusionLoop` when it is the HRNet fusion loop (in any upstream spelling), else why not.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple, Union

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..plan import MODES, Resample

__all__ = ["IDENTITY", "UP", "DOWN", "FusionTerm", "FusionDescription", "describe_fuse_layers", "is_upsample",
           "resample_from_args", "HRLayout", "describe_hr_module", "resizes_in_forward", "ALIGN_GLOBAL",
           "FusionLoop", "read_fusion_loop", "activation_attr", "called_modules"]

IDENTITY, UP, DOWN = "identity", "up", "down"


class FusionTerm(NamedTuple):
    """How term (i, j) is computed: `pre` modules run in PyTorch in order (a downsample chain: its blocks but
    the last, then the last block's conv), then `last` is either folded into the op's (scale, shift) (a foldable
    batch norm) or run too; `resample` upsamples in the op (read from `upsample`, the path's upsample module,
    when it has one)."""

    kind: str
    pre: Tuple[nn.Module, ...]
    last: Optional[nn.Module]
    resample: Optional[Resample]
    upsample: Optional[nn.Module] = None


def is_upsample(module: nn.Module) -> bool:
    """nn.Upsample (and its UpsamplingNearest2d/UpsamplingBilinear2d subclasses) or an Upsample-like
    wrapper without parameters that names its `mode` and `scale_factor` (mmcv/mmseg `Upsample`)."""
    if isinstance(module, nn.Upsample):
        return True
    return (hasattr(module, "mode") and hasattr(module, "scale_factor")
            and next(module.parameters(recurse=True), None) is None)


def _describe_up(entry, where: str, default: Optional[Resample], require_resample: bool) -> FusionTerm:
    if not isinstance(entry, nn.Sequential):
        raise ValueError(f"{where} (an upsample path, j > i) must be an nn.Sequential such as "
                         f"(conv1x1, norm[, upsample]), got {type(entry).__name__}")
    mods = list(entry)
    resample = up = None
    if mods and is_upsample(mods[-1]):
        up = mods.pop()
        if isinstance(up, nn.Upsample) and type(up).forward is not nn.Upsample.forward:
            raise ValueError(f"{where}[{len(mods)}] is {type(up).__name__}, an nn.Upsample subclass with its own "
                             "forward: hrfast cannot tell what it computes")
        try:
            resample = Resample.from_module(up)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: cannot fuse its upsample module: {exc}") from exc
    for k, m in enumerate(mods):
        if is_upsample(m):
            raise ValueError(f"{where}[{k}] is an upsample module that is not the last element; hrfast only "
                             "fuses (..., norm, upsample) paths")
    if not mods:
        raise ValueError(f"{where} holds no conv/norm before its upsample; expected (conv1x1, norm[, upsample])")
    if resample is None:
        if default is None and require_resample:
            raise ValueError(
                f"{where} has no upsample module (the original code upsamples in forward, e.g. "
                "F.interpolate(size=..., mode='bilinear')), so HRFusion cannot see the mode: pass "
                "upsample='bilinear' (or 'nearest') and align_corners=True/False to HRFusion")
        resample = default
    return FusionTerm(UP, tuple(mods[:-1]), mods[-1], resample, up)


def _describe_down(entry, where: str) -> FusionTerm:
    if not isinstance(entry, nn.Sequential) or len(entry) == 0:
        raise ValueError(f"{where} (a downsample chain, j < i) must be a non-empty nn.Sequential of "
                         f"(conv3x3 s2, norm[, relu]) blocks, got {type(entry).__name__}"
                         + (" of length 0" if isinstance(entry, nn.Sequential) else ""))
    links = list(entry)
    for k, m in enumerate(links):
        if m is None:
            raise ValueError(f"{where}[{k}] is None")
    pre = links[:-1]
    last_link = links[-1]
    if isinstance(last_link, nn.Sequential):
        if len(last_link) == 0:
            raise ValueError(f"{where}[{len(links) - 1}] is an empty nn.Sequential")
        inner = list(last_link)
        return FusionTerm(DOWN, tuple(pre + inner[:-1]), inner[-1], None)
    return FusionTerm(DOWN, tuple(pre), last_link, None)


class FusionDescription(NamedTuple):
    """`rows[i][j]`: how term j of output i is computed."""

    rows: Tuple[Tuple[FusionTerm, ...], ...]
    num_inputs: int


def describe_fuse_layers(fuse_layers, default: Optional[Resample],
                         require_resample: bool = True) -> FusionDescription:
    """How each term of `fuse_layers` (indexed [i_out][j_in]) is computed, validated. `default`: the
    resampling of the j > i entries without an upsample module (the original upsamples in forward); without
    it such entries raise, unless `require_resample` is False (their `resample` is then None)."""
    if not isinstance(fuse_layers, nn.ModuleList):
        raise TypeError(f"fuse_layers must be an nn.ModuleList of nn.ModuleList (indexed [i_out][j_in]), got "
                        f"{type(fuse_layers).__name__}; a single-branch module (fuse_layers None or "
                        "nn.Identity) has no fusion step to replace")
    if len(fuse_layers) == 0:
        raise ValueError("fuse_layers is empty")
    num_inputs = None
    rows = []
    for i, row in enumerate(fuse_layers):
        if not isinstance(row, nn.ModuleList):
            raise TypeError(f"fuse_layers[{i}] must be an nn.ModuleList (one entry per input branch), got "
                            f"{type(row).__name__}")
        if num_inputs is None:
            num_inputs = len(row)
        elif len(row) != num_inputs:
            raise ValueError(f"fuse_layers[{i}] has {len(row)} entries but fuse_layers[0] has {num_inputs}; "
                             "every row needs one entry per input branch")
        entries = []
        for j, entry in enumerate(row):
            where = f"fuse_layers[{i}][{j}]"
            if j == i:
                if entry is not None and not isinstance(entry, nn.Identity):
                    raise ValueError(f"{where} (j == i) must be None or nn.Identity, got {type(entry).__name__}")
                entries.append(FusionTerm(IDENTITY, (), None, None))
            elif j > i:
                entries.append(_describe_up(entry, where, default, require_resample))
            else:
                entries.append(_describe_down(entry, where))
        rows.append(tuple(entries))
    if len(fuse_layers) > num_inputs:
        raise ValueError(f"fuse_layers has {len(fuse_layers)} rows (outputs) but only {num_inputs} inputs; "
                         "output i needs the identity entry fuse_layers[i][i]")
    return FusionDescription(tuple(rows), num_inputs)


def resample_from_args(upsample: Optional[str], align_corners: Optional[bool]) -> Optional[Resample]:
    """The Resample that `upsample=` / `align_corners=` arguments (of HRFusion, hrfast.patch) describe."""
    if upsample is None:
        if align_corners is not None:
            raise ValueError("align_corners is only meaningful with upsample='bilinear'; pass upsample= too")
        return None
    if not isinstance(upsample, str) or upsample not in MODES:
        raise ValueError(f"upsample must be None or one of {MODES}, got {upsample!r}")
    if align_corners is not None and not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool or None, got {type(align_corners).__name__}")
    if upsample == "nearest":
        if align_corners is not None:
            raise ValueError("align_corners can only be given with upsample='bilinear' (as in F.interpolate)")
        return Resample(mode="nearest")
    # F.interpolate's default for bilinear is align_corners=False (with a warning); keep it explicit
    return Resample(mode="bilinear", align_corners=bool(align_corners))


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
ALIGN_GLOBAL = "ALIGN_CORNERS"
RESIZE_CALL = re.compile(r"\b(interpolate|resize|upsample)\s*\(")
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


class _Found(NamedTuple):
    """What the strict reading collects from the terms: channels per branch, norm names, upsample modules."""

    channels: List[Optional[int]]
    norms: List[str]
    upsamplers: List[Tuple[int, int, nn.Module]]


def _note_channels(found: _Found, idx: int, c: int, where: str) -> Optional[str]:
    if found.channels[idx] is None:
        found.channels[idx] = c
    elif found.channels[idx] != c:
        return f"{where} implies {c} channels for branch {idx}, elsewhere {found.channels[idx]}"
    return None


def _norm_problem(found: _Found, m: nn.Module, where: str, c: int) -> Optional[str]:
    name = _norm_name(m)
    if name is None:
        return f"{where} is {type(m).__name__}, a norm hrfast does not know; left alone"
    features = getattr(m, "num_features", getattr(m, "num_channels", c))
    if features != c:
        return f"{where} normalises {features} channels, its conv gives {c}"
    found.norms.append(name)
    return None


def _up_problem(term: FusionTerm, where: str, i: int, j: int, found: _Found) -> Optional[str]:
    """An upsample path must be (conv1x1, norm[, upsample])."""
    if len(term.pre) != 1:
        return f"{where} holds {len(term.pre) + 1} modules before its upsample, expected (conv1x1, norm)"
    if term.upsample is not None:
        found.upsamplers.append((i, j, term.upsample))
    conv = term.pre[0]
    return (_conv_problem(conv, f"{where}[0]", 1, 1) or _note_channels(found, j, _in_ch(conv), f"{where}[0]")
            or _note_channels(found, i, _out_ch(conv), f"{where}[0]")
            or _norm_problem(found, term.last, f"{where}[1]", _out_ch(conv)))


def _down_problem(term: FusionTerm, where: str, i: int, j: int, found: _Found) -> Optional[str]:
    """A downsample chain must be i - j blocks (conv3x3 s2, norm, ReLU) ... (conv3x3 s2, norm), one channel
    count until the last conv."""
    *blocks, conv = term.pre
    if len(blocks) + 1 != i - j:
        return f"{where} chains {len(blocks) + 1} blocks, expected {i - j} (conv3x3 s2, norm[, ReLU])"
    for k, block in enumerate(blocks):
        bw = f"{where}[{k}]"
        if not isinstance(block, nn.Sequential) or len(block) != 3:
            size = f" of {len(block)}" if isinstance(block, nn.Sequential) else ""
            return f"{bw} is {type(block).__name__}{size}, expected Sequential(conv3x3 s2, norm, ReLU)"
        c = _in_ch(block[0]) if isinstance(block[0], nn.Conv2d) else None
        problem = (_conv_problem(block[0], f"{bw}[0]", 3, 2) or _note_channels(found, j, c, f"{bw}[0]")
                   or (None if _out_ch(block[0]) == c else f"{bw}[0] changes the channels before the last block")
                   or _norm_problem(found, block[1], f"{bw}[1]", c))
        if problem:
            return problem
        if not isinstance(block[2], nn.ReLU):
            return f"{bw}[2] is {type(block[2]).__name__}, expected nn.ReLU"
    bw = f"{where}[{len(blocks)}]"
    return (_conv_problem(conv, f"{bw}[0]", 3, 2) or _note_channels(found, j, _in_ch(conv), f"{bw}[0]")
            or _note_channels(found, i, _out_ch(conv), f"{bw}[0]")
            or _norm_problem(found, term.last, f"{bw}[1]", _out_ch(conv)))


def activation_attr(module: nn.Module) -> Optional[str]:
    """The attribute holding an HRNet module's fuse activation: "fuse_act" (timm) or "relu"; None if neither."""
    return next((a for a in ("fuse_act", "relu") if getattr(module, a, None) is not None), None)


def describe_hr_module(module: nn.Module) -> Union[HRLayout, str, None]:
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

    activation = activation_attr(module)
    if activation is None:
        return "has no fuse activation (`relu` or `fuse_act`)"
    act = getattr(module, activation)
    if not isinstance(act, nn.ReLU):
        return f"its fuse activation `{activation}` is {type(act).__name__}, not nn.ReLU"
    if type(act).forward is not nn.ReLU.forward:
        return (f"its fuse activation `{activation}` is {type(act).__name__}, an nn.ReLU subclass with its own "
                "forward: hrfast cannot tell what it computes")

    try:
        description = describe_fuse_layers(fuse_layers, None, require_resample=False)
    except (TypeError, ValueError) as exc:
        return str(exc)
    if description.num_inputs != n:
        return f"fuse_layers rows hold {description.num_inputs} entries, expected one per branch ({n})"
    found = _Found([None] * n, [], [])
    for i, row in enumerate(description.rows):
        for j, term in enumerate(row):
            where = f"fuse_layers[{i}][{j}]"
            if term.kind == UP:
                problem = _up_problem(term, where, i, j, found)
            elif term.kind == DOWN:
                problem = _down_problem(term, where, i, j, found)
            else:
                problem = None
            if problem:
                return problem
    channels, norms, upsamplers = found
    if any(c is None for c in channels):
        return "could not read every branch's channels from fuse_layers"
    family = ("timm" if hasattr(module, "num_in_chs") else "official MSRA" if hasattr(module, "num_inchannels")
              else "mm*" if hasattr(module, "in_channels") and hasattr(module, "multiscale_output") else "HRNet-like")
    return HRLayout(n, rows, tuple(channels), activation, tuple(upsamplers), tuple(dict.fromkeys(norms)), family)


def called_modules(description: FusionDescription, fold) -> set:
    """The modules of fuse_layers that the fused step calls (ids, their submodules included): every term's
    `pre` modules, and its `last` unless `fold(last)` (then computed, not called)."""
    called = set()
    for row in description.rows:
        for term in row:
            for m in term.pre + ((term.last,) if term.last is not None and not fold(term.last) else ()):
                called.update(id(sub) for sub in m.modules())
    return called


def resizes_in_forward(cls: type) -> Optional[str]:
    """Why the class's forward is believed to resize the j > i terms again (mmseg), or None."""
    if cls.__module__.split(".")[0] == "mmseg":
        return "mmseg's HRModule resizes in forward too"
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    source = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    if RESIZE_CALL.search(source):
        return f"{cls.__name__}.forward calls a resize"
    return None


# ------------------------------------------------------------------------------------ the forward's fusion loop
#
# The patcher replaces a module's whole forward, so it must know that forward computes the HRNet fusion and
# nothing else. It reads it by running it once on symbolic stand-ins (`read_fusion_loop`): the branch tensors,
# `branches`, `fuse_layers` and the fuse activation are replaced by objects that record what is done with them
# (torch functions reach `_Sym.__torch_function__`), every other attribute is the module's own, read only.
# This accepts every spelling of the loop (official `if i == j / elif j > i`, timm's `enumerate`, mm*'s
# `y = 0; y += ...`, hrfast.models' conditional expression) and users' copies of them, and rejects a forward
# that adds, scales, skips or reorders anything, calls another op or module, or sets an attribute.


class _Unknown(Exception):
    """The forward did something the fusion loop does not."""


class _Dim(NamedTuple):
    """A symbolic size: `axis` ("N", "C", "H", "W") of branch `branch`."""

    axis: str
    branch: int

    def __index__(self):
        raise _Unknown("it computes with a tensor size")

    __int__ = __index__


def _interpolate_args(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                      recompute_scale_factor=None, antialias=False):
    return size, scale_factor, mode, align_corners, recompute_scale_factor, antialias


class _Sym:
    """A symbolic tensor: the expression that computed it, and its sizes when it is a branch tensor."""

    def __init__(self, expr: tuple, branch: Optional[int] = None):
        self.expr = expr
        self._branch = branch

    @property
    def shape(self) -> Tuple[_Dim, ...]:
        if self._branch is None:
            raise _Unknown("it reads the size of a term")
        return tuple(_Dim(a, self._branch) for a in "NCHW")

    def __add__(self, other):
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:  # mm*'s `y = 0; y += ...`
            return self
        if not isinstance(other, _Sym):
            raise _Unknown(f"it adds a {type(other).__name__} to a term")
        return _Sym(("+",) + _summands(self) + _summands(other))

    __radd__ = __iadd__ = __add__

    def _other_op(self, *args):
        raise _Unknown("it computes with a term other than by adding it")

    __mul__ = __rmul__ = __sub__ = __rsub__ = __truediv__ = __rtruediv__ = __neg__ = __matmul__ = _other_op

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name == "relu" and len(args) == 1 and set(kwargs or ()) <= {"inplace"}:
            return _Sym(("relu", args[0].expr))
        if name != "interpolate":
            raise _Unknown(f"it calls {name}")
        size, scale, mode, align, recompute, antialias = _interpolate_args(*args, **(kwargs or {}))
        if scale is not None or recompute or antialias or size is None:
            raise _Unknown("it resizes by a scale factor or with antialias / recompute_scale_factor")
        return _Sym(("resize", args[0].expr, tuple(size), mode, align))


def _summands(s: _Sym) -> tuple:
    return s.expr[1:] if s.expr[0] == "+" else (s.expr,)


class _Stand:
    """The module as its forward sees it during the symbolic run: `overrides`, else the module's attributes."""

    def __init__(self, module: nn.Module, overrides: dict):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._module, name)

    def __setattr__(self, name, value):
        raise _Unknown(f"it sets self.{name}")


def _stub(expected: Optional[tuple], result):
    """A stand-in module: takes exactly the symbolic tensor `expected` (any, if None), returns `result(arg)`."""
    def call(x):
        if not isinstance(x, _Sym) or (expected is not None and x.expr != expected):
            raise _Unknown("it feeds a module something other than the HRNet loop does")
        return result(x)
    return call


def _stand_ins(module: nn.Module, activation: str) -> dict:
    n = len(module.branches)
    branches = [_stub(("x", k), lambda x, k=k: _Sym(("branch", k), branch=k)) for k in range(n)]
    rows = []
    for i, row in enumerate(module.fuse_layers):
        entries = []
        for j, entry in enumerate(row):
            if entry is None:
                entries.append(None)
            elif i == j:  # nn.Identity (timm calls it)
                entries.append(_stub(("branch", j), lambda x: x))
            else:
                entries.append(_stub(("branch", j), lambda x, i=i, j=j: _Sym(("fuse", i, j, x.expr))))
        rows.append(entries)
    act = _stub(None, lambda x: _Sym(("relu", x.expr)))
    return {"branches": branches, "fuse_layers": rows, activation: act}


class FusionLoop(NamedTuple):
    """What `read_fusion_loop` read: `resized[i][j]` whether the forward resizes term (i, j) to branch i's size
    itself (after fuse_layers[i][j]), and the (mode, align_corners) of those resizes."""

    resized: Tuple[Tuple[bool, ...], ...]
    modes: Tuple[Tuple[str, Optional[bool]], ...]


def read_fusion_loop(module: nn.Module, activation: str) -> Union[FusionLoop, str]:
    """What `type(module).forward` computes, read on symbolic stand-ins (see above): a `FusionLoop` when it is
    ``x[k] = branches[k](x[k])`` for every k (in the caller's list) followed by, for every row i of fuse_layers,
    ``activation(sum_j term_ij)`` with term_ii = x[i] and term_ij = fuse_layers[i][j](x[j]), optionally resized
    to x[i]'s size; else the reason it is not."""
    n = len(module.branches)
    xs = [_Sym(("x", k), branch=k) for k in range(n)]
    try:
        out = type(module).forward(_Stand(module, _stand_ins(module, activation)), xs)
    except _Unknown as exc:
        return str(exc)
    except Exception as exc:  # whatever a stand-in cannot do (an op on a size, super() ...) is not the loop
        return f"{type(exc).__name__}: {exc}"
    if any(x.expr != ("branch", k) for k, x in enumerate(xs)):
        return "it does not store branches[k](x[k]) into the caller's list"
    if not isinstance(out, list) or len(out) != len(module.fuse_layers):
        return f"it returns {type(out).__name__}, not a list of one tensor per row of fuse_layers"
    resized, modes = [], set()
    for i, y in enumerate(out):
        row = _read_row(y, i, n, modes)
        if isinstance(row, str):
            return f"output {i}: {row}"
        resized.append(row)
    return FusionLoop(tuple(resized), tuple(sorted(modes, key=repr)))


def _read_row(y, i: int, n: int, modes: set) -> Union[Tuple[bool, ...], str]:
    if not isinstance(y, _Sym) or y.expr[0] != "relu":
        return "not the activation of a sum"
    inner = y.expr[1]
    terms = inner[1:] if inner[0] == "+" else (inner,)
    found = {}
    for term in terms:
        resized = term[0] == "resize"
        if resized:
            _, term, size, mode, align = term
            if size != (("H", i), ("W", i)):
                return "a resize to another size than the branch's own"
            modes.add((mode, align))
        j = {"branch": 1, "fuse": 2}.get(term[0])
        j = term[j] if j is not None else None
        expected = ("branch", i) if j == i else ("fuse", i, j, ("branch", j))
        if j is None or j in found or term != expected or (resized and j <= i):
            return "its sum holds a term the HRNet fusion does not"
        found[j] = resized
    if sorted(found) != list(range(n)):
        return f"its sum has terms {sorted(found)}, not one per branch"
    return tuple(found[j] for j in range(n))
