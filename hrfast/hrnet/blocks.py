"""The structure of the conv + batch-norm pieces around the fusion step, read once for the inference mode.

- `ConvUnit(conv, norm, act)`: a conv, the batch norm right after it, and the ReLU module that follows (or None):
  the unit the inference mode runs as one call (BN folded into the conv, the ReLU as the conv's epilogue).
- `describe_residual_block(module)`: a ResNet BasicBlock / Bottleneck as every HRNet code base builds it
  (official MSRA, timm, mm*, torchvision, `hrfast.models`): its main path as units, its shortcut, the ReLU after
  the residual add. Matched by structure: one reading for every code base, the attribute names being the
  only thing that differs (``bn1`` / mm*'s ``norm1_name``, ``relu`` / timm's ``act1..act3``).
- `sequential_steps(seq)`: an nn.Sequential (transitions, downsample shortcuts, downsample-chain links, heads)
  read as steps: a `ConvUnit` where a conv is followed by a foldable BN, the module itself elsewhere.
- `describe_stem(module)`: the (conv1, bn1), (conv2, bn2) pairs of an HRNet stem, which the model's own forward
  calls one by one.

Each returns None when the module is no candidate, a string when it is one that cannot be taken over (why).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple, Union

import torch.nn as nn

from ..batchnorm import is_foldable_batchnorm

__all__ = ["ConvUnit", "ResidualBlock", "describe_residual_block", "sequential_steps", "describe_stem",
           "unit_problem"]

# the residual blocks of every supported code base, by class name -> number of convs on the main path
_BLOCKS = {"BasicBlock": 2, "Bottleneck": 3}
# children that must be absent or neutral (Identity / None) for the block to compute the plain residual
_NEUTRAL = ("drop_block", "aa", "se", "drop_path")  # timm
_OFF_FLAGS = ("with_plugins", "with_dcn")  # mm*
_STEM = (("conv1", "bn1"), ("conv2", "bn2"))
_TRUNK_MARKS = ("transition1", "stage2")  # an HRNet trunk (not any ResNet-like stem: only HRNet's forward is known)


class ConvUnit(NamedTuple):
    """conv -> norm (a foldable batch norm) [-> act, an nn.ReLU]."""

    conv: nn.Conv2d
    norm: nn.Module
    act: Optional[nn.Module]

    @property
    def modules(self) -> Tuple[nn.Module, ...]:
        return (self.conv, self.norm) if self.act is None else (self.conv, self.norm, self.act)


class ResidualBlock(NamedTuple):
    """``act(main(x) + shortcut(x))`` with ``main`` the units in order (every one but the last ends in a ReLU);
    `shortcut` is None for the identity, else the module that computes it (run as a module)."""

    kind: str  # "BasicBlock" or "Bottleneck"
    units: Tuple[ConvUnit, ...]
    shortcut: Optional[nn.Module]
    act: nn.Module  # the ReLU after the add

    @property
    def folded_modules(self) -> Tuple[nn.Module, ...]:
        """The modules the inference mode computes instead of calling (their hooks would not run)."""
        return tuple(m for u in self.units for m in u.modules) + (self.act,)


def unit_problem(conv, norm, where: str) -> Optional[str]:
    """Why (conv, norm) cannot run as one folded conv, or None."""
    if type(conv) is not nn.Conv2d:
        return f"{where}: {type(conv).__name__} is not an nn.Conv2d"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return f"{where}: a lazy conv that has not run yet"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"{where}: padding {conv.padding!r} / padding_mode {conv.padding_mode!r}; only numeric zero padding"
    if not is_foldable_batchnorm(norm):
        return f"{where}: {type(norm).__name__} after the conv is not a batch norm that folds into it"
    if norm.num_features != conv.out_channels:
        return f"{where}: the norm has {norm.num_features} channels, the conv gives {conv.out_channels}"
    if norm.running_mean is None or norm.running_var is None:
        return f"{where}: the norm tracks no running statistics (it always uses batch statistics)"
    return None


def _is_relu(m) -> bool:
    return type(m) is nn.ReLU


def _block_base(cls: type) -> Optional[type]:
    return next((k for k in cls.__mro__ if k.__name__ in _BLOCKS), None)


def _class_problem(cls: type, base: type) -> Optional[str]:
    for klass in cls.__mro__[:cls.__mro__.index(base)]:
        if "forward" in vars(klass):
            return f"{klass.__name__} subclasses {base.__name__} and overrides forward; left alone"
    return None


def _norm_name(module: nn.Module, k: int) -> str:
    name = getattr(module, f"norm{k}_name", None)  # mm*: build_norm_layer's name, "bn1" for batch norm
    return name if isinstance(name, str) else f"bn{k}"


def _activation_names(module: nn.Module, n: int) -> Union[Tuple[str, ...], str]:
    """The ReLU after each unit but the last, then the one after the add: ``relu`` everywhere, or timm's
    ``act1..actN``."""
    names = tuple(f"act{k}" for k in range(1, n + 1)) if hasattr(module, "act1") else ("relu",) * n
    for name in dict.fromkeys(names):
        if not _is_relu(getattr(module, name, None)):
            return f"its activation {name} is {type(getattr(module, name, None)).__name__}, not nn.ReLU"
    return names


def _extras_problem(module: nn.Module) -> Optional[str]:
    for name in _NEUTRAL:
        m = getattr(module, name, None)
        if m is not None and type(m) is not nn.Identity:
            return f"its {name} is {type(m).__name__} (only None / nn.Identity leave the residual block plain)"
    for flag in _OFF_FLAGS:
        if getattr(module, flag, False):
            return f"{flag} is set (plugins / deformable convs change the block)"
    return None


def describe_residual_block(module: nn.Module) -> Union[ResidualBlock, str, None]:
    """The units and shortcut of a BasicBlock / Bottleneck (see the module notes); None when `module` is none,
    a string when it is one whose computation the inference mode cannot take over."""
    base = _block_base(type(module))
    if base is None:
        return None
    n = _BLOCKS[base.__name__]
    problem = _class_problem(type(module), base) or _extras_problem(module)
    if problem:
        return problem
    acts = _activation_names(module, n)
    if isinstance(acts, str):
        return acts
    units, names = [], set(acts) | {"downsample", *_NEUTRAL}
    for k in range(1, n + 1):
        conv_name, norm_name = f"conv{k}", _norm_name(module, k)
        conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
        problem = unit_problem(conv, norm, f"{conv_name} -> {norm_name}")
        if problem:
            return problem
        units.append(ConvUnit(conv, norm, getattr(module, acts[k - 1]) if k < n else None))
        names |= {conv_name, norm_name}
    extra = [name for name, _ in module.named_children() if name not in names]
    if extra:
        return f"unexpected children {', '.join(extra)} (its forward may use them)"
    shortcut = getattr(module, "downsample", None)
    if shortcut is not None and not isinstance(shortcut, nn.Module):
        return f"its downsample is {type(shortcut).__name__}, not a module"
    return ResidualBlock(base.__name__, tuple(units), shortcut, getattr(module, acts[-1]))


def sequential_steps(seq: nn.Module) -> Union[List[Union[ConvUnit, nn.Module]], None]:
    """The steps of a plain nn.Sequential with at least one conv -> batch norm pair: `ConvUnit` for each such
    pair (with the ReLU that follows, if any), the module itself for anything else; None when `seq` is not a
    plain nn.Sequential or has no such pair."""
    if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
        return None
    mods, steps, k = list(seq), [], 0
    while k < len(mods):
        m = mods[k]
        if k + 1 < len(mods) and unit_problem(m, mods[k + 1], "") is None:
            act = mods[k + 2] if k + 2 < len(mods) and _is_relu(mods[k + 2]) else None
            steps.append(ConvUnit(m, mods[k + 1], act))
            k += 2 if act is None else 3
        else:
            steps.append(m)
            k += 1
    return steps if any(isinstance(s, ConvUnit) for s in steps) else None


def describe_stem(module: nn.Module) -> Union[Tuple[Tuple[str, str], ...], str, None]:
    """The (conv, bn) attribute pairs of an HRNet stem: a module holding ``conv1 bn1`` (and ``conv2 bn2``) next to
    ``transition1`` / ``stage2`` (official, timm, mm*, `hrfast.models`), whose forward runs ``bnK(convK(x))`` for
    each. None when `module` is no HRNet trunk."""
    children = dict(module.named_children())
    if not any(mark in children for mark in _TRUNK_MARKS):
        return None
    pairs = tuple(pair for pair in _STEM if all(name in children for name in pair))
    if not pairs:
        return None
    for conv_name, norm_name in pairs:
        problem = unit_problem(children[conv_name], children[norm_name], f"stem {conv_name} -> {norm_name}")
        if problem:
            return problem
    return pairs
