"""The structure of an HRNetV2 head, read once for everyone who needs it (`hrfast.nn`, `hrfast.patch`).

Existing code computes ``cls(relu(bn(conv(cat[x0, Up(x1), Up(x2), Up(x3)]))))`` with the four layers in one
of these layouts (HRNET_LAYOUTS.md section 4):

- "sequential": official segmentation `last_layer` and facial-landmark `head`,
  ``Sequential(conv1x1, BN, ReLU, conv1x1)``;
- "mmseg": mmseg `FCNHead` with ``input_transform='resize_concat'``: ``convs.0.{conv, bn, activate}``, ``conv_seg``;
- "mmpose": mmpose `HeatmapHead` after the concat neck: ``conv_layers.{0, 1, 2}`` and ``final_layer``.

`head_layers` finds the layers, `layer_problems` / `mmseg_problems` say why they are not the head the fused
op computes (an empty list when they are).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch.nn as nn

from ..batchnorm import is_foldable_batchnorm

__all__ = ["LAYOUTS", "HeadLayers", "detect_layout", "head_layers", "layer_problems", "mmseg_problems"]

# layout name -> dotted paths of (conv, norm, act, classifier) in the module holding the head
LAYOUTS = {
    "sequential": ("0", "1", "2", "3"),
    "mmseg": ("convs.0.conv", "convs.0.bn", "convs.0.activate", "conv_seg"),
    "mmpose": ("conv_layers.0", "conv_layers.1", "conv_layers.2", "final_layer"),
}


class HeadLayers(NamedTuple):
    conv: nn.Module
    norm: nn.Module
    act: nn.Module
    classifier: nn.Module


def detect_layout(module: nn.Module) -> str:
    """The layout name of a module holding an HRNetV2 head; ValueError when it has none of them."""
    if isinstance(module, nn.Sequential) and len(module) == 4:
        return "sequential"
    if hasattr(module, "convs") and hasattr(module, "conv_seg"):
        return "mmseg"
    if hasattr(module, "conv_layers") and hasattr(module, "final_layer"):
        return "mmpose"
    raise ValueError(f"cannot recognise {type(module).__name__} as an HRNetV2 head: expected Sequential(conv1x1, "
                     "BN, ReLU, conv1x1) (official seg last_layer, facial head), an mmseg FCNHead (convs, conv_seg) "
                     "or an mmpose HeatmapHead (conv_layers, final_layer)")


def head_layers(module: nn.Module, layout: str) -> HeadLayers:
    """The (conv, norm, act, classifier) of `module` in `layout`; ValueError when they are not there."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
    try:
        return HeadLayers(*(module.get_submodule(p) for p in LAYOUTS[layout]))
    except AttributeError as exc:
        raise ValueError(f"{type(module).__name__} does not have the {layout} head layout: {exc}") from exc


def _pointwise_problem(conv: nn.Module, where: str) -> Optional[str]:
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"{where} must be an nn.Conv2d, got {type(conv).__name__}"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return f"{where} is a lazy conv that has not run yet"
    if (conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1
            or conv.padding not in ((0, 0), "valid")):
        return (f"{where} must be a plain 1x1 conv (stride 1, no padding, groups 1) for the fused head to reorder "
                f"it, but {where} is a {conv.kernel_size[0]}x{conv.kernel_size[1]} conv (stride {conv.stride}, "
                f"padding {conv.padding}, groups {conv.groups})")
    return None


def layer_problems(layers: HeadLayers, names: Sequence[str], dropout: Optional[nn.Module] = None,
                   batchnorm_only: bool = False) -> List[str]:
    """Why (conv, norm, act, classifier) is not the HRNetV2 head the fused op computes; [] when it is.
    `names`: how to call each layer in the messages; `batchnorm_only`: any norm but a foldable PyTorch batch
    norm is a problem too (the patcher's rule; `hrfast.nn.HRNetV2Head` runs other norms eagerly)."""
    conv, norm, act, classifier = layers
    problems = [p for p in (_pointwise_problem(conv, names[0]), _pointwise_problem(classifier, names[3])) if p]
    if batchnorm_only and not is_foldable_batchnorm(norm):
        problems.append(f"{names[1]} is {type(norm).__name__}, a norm the fused head does not take (PyTorch batch "
                        "norm only)")
    if not isinstance(act, nn.ReLU) or type(act).forward is not nn.ReLU.forward:
        problems.append(f"{names[2]} must be nn.ReLU, got {type(act).__name__}: the fused head applies ReLU")
    if dropout is not None and not (isinstance(dropout, nn.modules.dropout._DropoutNd) and dropout.p == 0):
        problems.append(f"it applies {type(dropout).__name__} before the classifier (dropout)")
    if not problems:
        hidden = int(conv.weight.shape[0])
        if getattr(norm, "num_features", hidden) != hidden or int(classifier.weight.shape[1]) != hidden:
            problems.append(f"{names[1]} / {names[3]} do not take the {hidden} channels of {names[0]}")
    return problems


def mmseg_problems(head: nn.Module, batchnorm_only: bool = False) -> List[str]:
    """Why an mmseg FCNHead is not the HRNetV2 head (one 1x1 ConvModule conv-norm-act over the resize_concat of
    1 to 4 branches, no concat_input, no dropout); [] when it is. `batchnorm_only` as in `layer_problems`."""
    transform = getattr(head, "input_transform", None)
    if transform != "resize_concat":
        return [f"input_transform={transform!r}: no concat of the branches (the V2 head uses 'resize_concat')"]
    in_index = getattr(head, "in_index", None)
    if (not isinstance(in_index, (list, tuple)) or not 1 <= len(in_index) <= 4
            or not all(isinstance(i, int) for i in in_index)):
        return [f"in_index={in_index!r}: the fused head takes 1 to 4 branches"]
    if not isinstance(getattr(head, "align_corners", None), bool):
        return [f"align_corners={getattr(head, 'align_corners', None)!r} is not a bool"]
    if getattr(head, "concat_input", False):
        return ["concat_input=True (conv_cat over the concat and the features): not the V2 head"]
    convs = getattr(head, "convs", None)
    if not isinstance(convs, nn.Sequential) or len(convs) != 1:
        size = f" of {len(convs)}" if isinstance(convs, nn.Sequential) else ""
        return [f"convs is {type(convs).__name__}{size}; the V2 head has exactly one ConvModule (num_convs=1)"]
    unit = convs[0]
    order = getattr(unit, "order", ("conv", "norm", "act"))
    explicit_padding = getattr(unit, "with_explicit_padding", False)
    if tuple(order) != ("conv", "norm", "act") or explicit_padding:
        return [f"convs[0] runs {tuple(order)}" + (" with explicit padding" if explicit_padding else "")]
    norm_name = getattr(unit, "norm_name", "bn")
    if norm_name != "bn" or not hasattr(unit, "bn"):
        norm = getattr(unit, norm_name, None) if isinstance(norm_name, str) else None
        return [f"convs[0].{norm_name} is {type(norm).__name__}, a norm the fused head does not take (PyTorch "
                "batch norm only)"]
    layers = HeadLayers(*(getattr(unit, a, None) for a in ("conv", "bn", "activate")), head.conv_seg)
    return layer_problems(layers, ("convs[0].conv", "convs[0].bn", "convs[0].activate", "conv_seg"),
                          dropout=getattr(head, "dropout", None), batchnorm_only=batchnorm_only)
