"""Multiply-accumulate counts of HRNet models, in the convention of the HRNet papers.

The HRNet papers' "GFLOPs" are the official ``get_model_summary`` figures: forward hooks count, for every
``Conv*`` module, ``weight.numel() * output pixels`` and, for ``nn.Linear``, ``output.numel() * in_features``,
i.e. multiply-accumulates of convolutions and linear layers (no bias, BN, ReLU, add or resize). The unit
differs between tables: the segmentation figures are MACs / 1e9 (`MacCount.gmacs`: HRNetV2-W48 at 1024x2048
counts 747.51, the paper shows 747.3), the ImageNet classification figures are MACs / 2**30, as that repo's
summary divides by 1024**3 (`MacCount.gibi_macs`: HRNet-W18-C at 224x224 counts 3.99, as in the paper; 4.28 / 1e9).

`count_macs` counts these MACs, by forward hooks (default) or with `torch.utils.flop_counter.FlopCounterMode`,
which counts a multiply-accumulate as 2 FLOPs (halved here); on the meta device by default, so nothing is
computed or allocated and a 1024x2048 count takes about a second.

`head_reorder_macs` gives the MACs of the HRNetV2 concat head in eager form and in the reordered form that
hrfast's fused head computes (``W_0 x_0 + sum_j Up(W_j x_j)``, each projection at its branch's resolution).

Patched models: `count_macs` counts what the patched forward computes. Patched fusion modules run the same
convolution modules as unpatched ones (the same count); `hrfast.nn.HRNetV2Head` has a built-in rule
(`hrnet_v2_head_macs`) that counts the reordered head, also when `hrfast.patch` calls it without registering it
as a submodule (the hooks are global while counting), so ``count_macs(patched_model, shape)`` shows the saving:
HRNetV2-W48 at 1024x2048 goes from 747.5 to 688.1 GMACs (the head from 69.7 to 10.3).

`hrfpn_reduction_macs` / `hrfpn_table` do the same for HRNetV2p's HRFPN neck (`hrfast.nn.HRFPNReduction`, which
has a rule too): at 800x1344 its 1x1 reduction goes from 4.64 / 8.26 / 10.32 GMACs (W18 / W32 / W40) to 0.58 /
1.03 / 1.29.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MacCount", "count_macs", "register_mac_rule", "HeadMacs", "head_reorder_macs", "branch_sizes",
           "hrnet_v2_head_macs", "HRNETV2P_CHANNELS", "DETECTION_SIZE", "hrfpn_reduction_macs", "hrfpn_table",
           "hrfpn_reduction_rule", "macs_per_pixel"]

MacRule = Callable[[nn.Module, Tuple, object], int]
_RULES: Dict[Type[nn.Module], MacRule] = {}
_MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_mm")


def register_mac_rule(module_type: Type[nn.Module], rule: Optional[MacRule]) -> None:
    """Count modules of `module_type` (and subclasses) with ``rule(module, inputs, output) -> MACs`` instead of
    their convolutions: while such a module runs, the convs and linears it calls are not counted (so a fused
    module that falls back to its eager layers is not counted twice). For modules whose MACs no conv or linear
    module call reveals, e.g. a fused kernel that reads the layers' weights directly. ``rule=None`` removes
    the rule of `module_type`. Only the hooks method of `count_macs` applies rules; they apply to every call of
    such a module during the count, whether or not it is a registered submodule of the model."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if rule is None:
        _RULES.pop(module_type, None)
    else:
        _RULES[module_type] = rule


def _rule_for(module: nn.Module) -> Optional[MacRule]:
    for klass in type(module).__mro__:
        if klass in _RULES:
            return _RULES[klass]
    return None


@dataclass(frozen=True)
class MacCount:
    """Result of `count_macs`.

    conv: multiply-accumulates of convolutions (weight elements x output pixels x batch; no bias).
    linear: multiply-accumulates of linear layers (hooks) or matrix products (FlopCounterMode).
    ruled: MACs counted by `register_mac_rule` rules.
    per_module: ``(qualified name, class name, MACs)`` per counted call, in call order (hooks method only).
    other: with ``count_other=True``: aten op name -> elements of that op's (first) output, for every op other
        than convolutions and matrix products (BN, ReLU, add, interpolate, cat, ...): a proxy for memory traffic.
    """

    conv: int
    linear: int
    ruled: int = 0
    per_module: Tuple[Tuple[str, str, int], ...] = ()
    other: Mapping[str, int] = field(default_factory=dict)
    input_shape: Tuple[int, ...] = ()
    method: str = "hooks"

    @property
    def total(self) -> int:
        """All counted MACs: convolutions, linear layers and ruled modules (the papers' "FLOPs")."""
        return self.conv + self.linear + self.ruled

    @property
    def gmacs(self) -> float:
        """`total` / 1e9: the segmentation tables' "GFLOPs" (HRNetV2-W48 at 1024x2048: 747.5; paper 747.3)."""
        return self.total / 1e9

    @property
    def gibi_macs(self) -> float:
        """`total` / 2**30: the unit of the official classification summaries (HRNet-W18-C: 3.99)."""
        return self.total / 2 ** 30

    def by_prefix(self, depth: int = 1) -> Dict[str, int]:
        """MACs grouped by the first `depth` components of the module name (``stage4``, ``last_layer``, ...)."""
        out: Dict[str, int] = {}
        for name, _, macs in self.per_module:
            key = ".".join(name.split(".")[:depth])
            out[key] = out.get(key, 0) + macs
        return out


class _OtherOps(TorchDispatchMode):
    """Output elements of every aten op except convolutions and matrix products."""

    def __init__(self):
        super().__init__()
        self.counts: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if "convolution" not in name and name not in _MATMUL_OPS:
            # the first output only: the others of multi-output ops are statistics or indices (batch norm's
            # save_mean / save_invstd, which are empty on the CPU in eval mode but not on the meta device)
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            n = first.numel() if isinstance(first, Tensor) else 0
            if n:
                self.counts[name] = self.counts.get(name, 0) + n
        return out


def _conv_macs(module: nn.modules.conv._ConvNd, inputs: Tuple, output: Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # every input pixel meets every weight once
        x = inputs[0]
        return module.weight.numel() * x.shape[0] * prod(x.shape[2:])
    return module.weight.numel() * output.shape[0] * prod(output.shape[2:])


def _linear_macs(module: nn.Linear, inputs: Tuple, output: Tensor) -> int:
    return output.numel() * module.in_features


def _make_input(input_shape, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(input_shape, Tensor):
        return input_shape.to(device)
    shape = tuple(int(s) for s in input_shape)
    if device.type == "meta":
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.randn(shape, device=device, dtype=dtype)


def count_macs(model: nn.Module, input_shape: Union[Sequence[int], Tensor], device: Union[str, torch.device] = "meta",
               *, count_other: bool = False, method: str = "hooks") -> MacCount:
    """Run `model` once on an input of `input_shape` (e.g. ``(1, 3, 1024, 2048)``) and count its MACs.

    Args:
        model: any nn.Module; it is not modified (with ``device='meta'`` its parameters and buffers are replaced
            by meta tensors for the call only, via `torch.func.functional_call`; on a real device it runs in
            eval mode under no_grad and each submodule's training flag is restored afterwards).
        input_shape: the input's shape, or an input tensor.
        device: ``"meta"`` (default: shapes only, nothing computed or allocated, fast at any size) or the device
            the model already lives on, to count with a real forward.
        count_other: also count the output elements of every other aten op (`MacCount.other`).
        method: ``"hooks"`` (default: forward hooks on conv / linear modules, the official convention, with
            per-module figures and `register_mac_rule` rules; the hooks are global while counting, so modules
            called in the forward without being registered submodules count too, under the common name
            prefix of their registered children, else ``"(unregistered)"``) or ``"flop_counter"``
            (`torch.utils.flop_counter.FlopCounterMode`, which sees aten convolutions and matrix products
            whichever module or function calls them; it reports 2 FLOPs per MAC, halved here).

    Returns:
        A `MacCount`; ``.gmacs`` is the papers' "GFLOPs" figure.
    """
    if method not in ("hooks", "flop_counter"):
        raise ValueError(f"method must be 'hooks' or 'flop_counter', got {method!r}")
    device = torch.device(device)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = _make_input(input_shape, device, dtype)

    if device.type == "meta":
        state = {k: torch.empty_like(v, device="meta") for k, v in
                 [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}

        def run():
            return torch.func.functional_call(model, state, (x,), tie_weights=False, strict=False)
    else:
        def run():
            return model(x)

    flags = [(m, m.training) for m in model.modules()]
    counts = {"conv": 0, "linear": 0, "ruled": 0}
    per_module: List[Tuple[str, str, int]] = []
    other = _OtherOps() if count_other else None
    handles = []
    try:
        model.eval()
        with torch.no_grad():
            if method == "flop_counter":
                from torch.utils.flop_counter import FlopCounterMode

                counter = FlopCounterMode(display=False)
                with counter:
                    if other is not None:
                        with other:
                            run()
                    else:
                        run()
                for op, flops in counter.get_flop_counts().get("Global", {}).items():
                    kind = "conv" if "convolution" in getattr(op, "__name__", str(op)) else "linear"
                    counts[kind] += int(flops) // 2
            else:
                handles = _install_hooks(model, counts, per_module)
                if other is not None:
                    with other:
                        run()
                else:
                    run()
    finally:
        for h in handles:
            h.remove()
        for m, was_training in flags:
            m.training = was_training
    return MacCount(counts["conv"], counts["linear"], counts["ruled"], tuple(per_module),
                    dict(other.counts) if other is not None else {}, tuple(x.shape), method)


def _install_hooks(model: nn.Module, counts: Dict[str, int], per_module: List[Tuple[str, str, int]]):
    """Global module hooks (`torch.nn.modules.module.register_module_forward_hook`), removed by the caller.

    Global rather than per-module hooks, so module calls that are not registered submodules of `model` count
    too: `hrfast.patch` runs the fused head as an `HRNetV2Head` built per call over the model's own layers,
    which never appears in ``model.modules()`` (the state_dict stays that of the unpatched model).
    """
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    names = {id(m): n for n, m in model.named_modules()}
    inside_rule = [0]

    def name_of(module: nn.Module) -> str:
        name = names.get(id(module))
        return name if name is not None else _unregistered_name(module, names)

    def pre(module, inputs):
        if _rule_for(module) is not None:
            inside_rule[0] += 1

    def post(module, inputs, output):
        rule = _rule_for(module)
        if rule is not None:
            inside_rule[0] -= 1
            if inside_rule[0]:
                return
            macs, kind = int(rule(module, inputs, output)), "ruled"
        elif inside_rule[0]:
            return
        elif isinstance(module, nn.modules.conv._ConvNd):
            macs, kind = int(_conv_macs(module, inputs, output)), "conv"
        elif isinstance(module, nn.Linear):
            macs, kind = int(_linear_macs(module, inputs, output)), "linear"
        else:
            return
        counts[kind] += macs
        per_module.append((name_of(module), type(module).__name__, macs))

    return [register_module_forward_pre_hook(pre), register_module_forward_hook(post, always_call=True)]


def _unregistered_name(module: nn.Module, names: Mapping[int, str]) -> str:
    """A module called during the forward that is not a submodule of the model: the common prefix of its
    registered descendants' names (an `HRNetV2Head` over ``last_layer``'s children: ``"last_layer"``), else
    ``"(unregistered)"``."""
    found = [names[id(m)].split(".") for m in module.modules() if id(m) in names]
    prefix: List[str] = []
    if found:
        for parts in zip(*found):
            if any(p != parts[0] for p in parts):
                break
            prefix.append(parts[0])
    return ".".join(prefix) if prefix else "(unregistered)"


# --------------------------------------------------------------------------------------- HRNetV2 head


def branch_sizes(size: Sequence[int], num_branches: int = 4) -> List[Tuple[int, int]]:
    """The branch resolutions of an HRNet for an input image of `size` ``(H, W)``: the stem's two 3x3 stride-2
    convs (padding 1) give branch 0, each further branch is another 3x3 stride-2 conv down (ceil(H/2) each)."""
    h, w = (int(s) for s in size)
    out = []
    for k in range(num_branches + 1):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        if k >= 1:
            out.append((h, w))
    return out


@dataclass(frozen=True)
class HeadMacs:
    """MACs of the HRNetV2 head ``cls(relu(bn(conv1x1(cat[x0, Up(x1), ...]))))`` (batch 1).

    eager_conv: the concat 1x1 conv at branch 0's resolution: ``P0 * Ct * Ct`` (Ct = sum of channels).
    reordered_conv: per branch j, ``W_j x_j`` at branch j's own resolution: ``P_j * C_j * Ct``.
    classifier: the 1x1 classifier ``P0 * Ct * num_classes`` (the same in both forms).
    upsampled_eager / upsampled_reordered: elements the bilinear upsampling produces: ``P0 * C_j`` per low
        branch in eager form, ``P0 * Ct`` per low branch in reordered form (a fused kernel gathers them on the
        fly instead of writing them), to show what the reordering trades for its MACs.
    """

    channels: Tuple[int, ...]
    sizes: Tuple[Tuple[int, int], ...]
    num_classes: int
    eager_conv: int
    reordered_conv: Tuple[int, ...]
    classifier: int
    upsampled_eager: int
    upsampled_reordered: int

    @property
    def eager(self) -> int:
        """Eager head MACs: concat 1x1 conv plus classifier."""
        return self.eager_conv + self.classifier

    @property
    def reordered(self) -> int:
        """Reordered head MACs: the per-branch projections plus classifier."""
        return sum(self.reordered_conv) + self.classifier

    @property
    def ratio(self) -> float:
        """eager / reordered, head 1x1 conv and classifier together."""
        return self.eager / self.reordered

    @property
    def conv_ratio(self) -> float:
        """eager / reordered for the 15C x 15C 1x1 conv alone."""
        return self.eager_conv / sum(self.reordered_conv)

    @property
    def saved(self) -> int:
        """MACs the reordering saves."""
        return self.eager - self.reordered


def head_reorder_macs(channels: Sequence[int], size: Sequence[int], num_classes: int,
                      *, branch_resolutions: Optional[Sequence[Sequence[int]]] = None,
                      out_channels: Optional[int] = None) -> HeadMacs:
    """MACs of the HRNetV2 concat head in eager and in reordered form.

    Args:
        channels: branch channels, e.g. ``(48, 96, 192, 384)`` for W48.
        size: the input image ``(H, W)``, e.g. ``(1024, 2048)``; the branch resolutions follow the HRNet stem
            and transitions (`branch_sizes`: 1/4, 1/8, 1/16, 1/32, rounded up).
        num_classes: outputs of the classifier (1x1 conv); 0 for none (HRFPN's reduction).
        branch_resolutions: the branch ``(H_j, W_j)`` directly, overriding `size`.
        out_channels: outputs of the 1x1 conv over the concat (default: its input width, as in the V2 head;
            HRFPN: 256).
    """
    channels = tuple(int(c) for c in channels)
    sizes = (tuple(tuple(int(v) for v in s) for s in branch_resolutions) if branch_resolutions is not None
             else tuple(branch_sizes(size, len(channels))))
    if len(sizes) != len(channels):
        raise ValueError(f"{len(channels)} channels but {len(sizes)} branch resolutions")
    ct = sum(channels)
    hidden = ct if out_channels is None else int(out_channels)
    pixels = [h * w for h, w in sizes]
    p0 = pixels[0]
    return HeadMacs(channels, sizes, int(num_classes), eager_conv=p0 * ct * hidden,
                    reordered_conv=tuple(p * c * hidden for p, c in zip(pixels, channels)),
                    classifier=p0 * hidden * int(num_classes),
                    upsampled_eager=p0 * sum(channels[1:]), upsampled_reordered=p0 * hidden * (len(channels) - 1))


def hrnet_v2_head_macs(module: nn.Module, inputs: Tuple, output: object) -> int:
    """The `register_mac_rule` rule of `hrfast.nn.HRNetV2Head`: the MACs it computes for branches ``xs``.

    Fused (the norm folds, the usual case): the reordered head of `head_reorder_macs`, i.e. per branch j the
    projection ``W_j x_j`` at branch j's own resolution (``N * H_j * W_j * C_j * C_out``), plus the classifier at
    branch 0's resolution (``N * H_0 * W_0 * C_out * K``). When the norm cannot be folded the head runs the eager
    concat form, and the rule counts that (``N * H_0 * W_0 * C_in * C_out`` plus the classifier).
    """
    from .batchnorm import can_fold

    xs = inputs[0] if inputs else ()
    if isinstance(xs, Tensor) or not xs:
        return 0
    conv, classifier = module.conv, module.classifier
    n, p0 = int(xs[0].shape[0]), prod(int(s) for s in xs[0].shape[2:])
    cls_macs = classifier.weight.numel() * n * p0
    if not can_fold(module.norm):
        return conv.weight.numel() * n * p0 + cls_macs
    c_out = conv.weight.shape[0]
    return sum(int(x.shape[0]) * prod(int(s) for s in x.shape[2:]) * int(x.shape[1]) * c_out for x in xs) + cls_macs


# ------------------------------------------------------------------------------------------ HRNetV2p HRFPN

# branch channels of the HRNetV2p detection backbones (mmdet configs hrnetv2p_w18/w32/w40)
HRNETV2P_CHANNELS = {"W18": (18, 36, 72, 144), "W32": (32, 64, 128, 256), "W40": (40, 80, 160, 320)}
# mmdet's test size 1333x800 padded to a multiple of 32 (landscape: H 800, W 1344)
DETECTION_SIZE = (800, 1344)


def hrfpn_reduction_macs(channels: Sequence[int], size: Sequence[int] = DETECTION_SIZE, out_channels: int = 256,
                         *, branch_resolutions: Optional[Sequence[Sequence[int]]] = None) -> HeadMacs:
    """MACs of HRFPN's reduction ``conv1x1(cat[x0, Up(x1), ...])`` (15C -> `out_channels`) in eager form and in
    the reordered form `hrfast.nn.HRFPNReduction` computes (``W_0 x_0 + sum_j Up(W_j x_j)``), batch 1: a
    `HeadMacs` without classifier. The rest of the neck (pooling, 3x3 convs) is the same in both."""
    return head_reorder_macs(channels, size, 0, branch_resolutions=branch_resolutions, out_channels=out_channels)


def macs_per_pixel(channels: Sequence[int], out_channels: Optional[int] = None,
                   num_classes: int = 0) -> Tuple[float, float]:
    """(eager, reordered) MACs of a V2 head / HRFPN reduction per branch-0 pixel, for branches that halve in
    size (branch j at 2^-j of branch 0 per side): what `hrfast.patch`'s report rows quote."""
    n = len(channels)
    side = 2 ** (n - 1)
    macs = head_reorder_macs(channels, (), num_classes, out_channels=out_channels,
                             branch_resolutions=[(side >> j, side >> j) for j in range(n)])
    return macs.eager / side ** 2, macs.reordered / side ** 2


def hrfpn_table(size: Sequence[int] = DETECTION_SIZE) -> Dict[str, HeadMacs]:
    """`hrfpn_reduction_macs` of HRNetV2p-W18/W32/W40 at `size` (default 800x1344), by width name.

    At 800x1344 (branches 200x336 ... 25x42) the reduction costs 4.64 / 8.26 / 10.32 GMACs eager and 0.58 / 1.03
    / 1.29 reordered (8x fewer): 4.06 / 7.22 / 9.03 GMACs saved per image."""
    return {name: hrfpn_reduction_macs(c, size) for name, c in HRNETV2P_CHANNELS.items()}


def hrfpn_reduction_rule(module: nn.Module, inputs: Tuple, output: object) -> int:
    """The `register_mac_rule` rule of `hrfast.nn.HRFPNReduction`: per branch j the projection ``W_j x_j`` at
    branch j's own resolution, ``N * H_j * W_j * C_j * M``."""
    xs = inputs[0] if inputs else ()
    if isinstance(xs, Tensor) or not xs:
        return 0
    m = int(module.conv.weight.shape[0])
    return sum(int(x.shape[0]) * prod(int(s) for s in x.shape[2:]) * int(x.shape[1]) * m for x in xs)


def _register_builtin_rules() -> None:
    from .nn.head import HRNetV2Head
    from .nn.hrfpn import HRFPNReduction

    register_mac_rule(HRNetV2Head, hrnet_v2_head_macs)
    register_mac_rule(HRFPNReduction, hrfpn_reduction_rule)


_register_builtin_rules()
