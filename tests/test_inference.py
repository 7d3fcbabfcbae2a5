"""hrfast.patch(model, inference=True): BN folded into convs, residual epilogues, layout; eval-only and exact.

What is checked: the structural readings (`hrfast.hrnet.blocks`) on the residual blocks of every code base
(official / hrfast.models, timm, torchvision, mm* copies below); `fold_into_conv` and its cache; whole models
(hrfast.models seg / pose / cls, timm, the official and mm* toy nets of hrnet_layouts) against the same model
unpatched: float64 within 1e-10, float32 within the unpatched float32 model's own error against float64 (as
`hrfast.testing` budgets it); eval/train switching, load_state_dict after patching, parameter updates between
calls, gradients in eval, hooks, unpatch, re-patching, state_dict keys, pickling, torch.compile (aot_eager).
"""
import copy
import io

import hrnet_layouts as layouts
import pytest
import timm
import torch
import torch.nn as nn
import torchvision.models.resnet as tv

import hrfast
import hrfast._patch.inference as patch_inference
from hrfast import inference
from hrfast._patch import PatchedForward
from hrfast.batchnorm import fold_into_conv
from hrfast.hrnet.blocks import ConvUnit, describe_residual_block, describe_stem, sequential_steps
from hrfast.models import _common, build_model
from hrfast.testing import FP32_RTOL, LOW_PRECISION_FACTOR, rel_error

FP64_TOL = 1e-10
FORWARD_ARGS = {"seg_master": dict(upsample="bilinear", align_corners=False),
                "face": dict(upsample="bilinear", align_corners=False),
                "openseg": dict(upsample="bilinear", align_corners=True)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine, competing threads make tiny convs ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- mm* residual blocks (copies)


class _MmBasicBlock(nn.Module):
    """mmseg / mmpose / mmdet ``ResNet`` BasicBlock: norms registered under ``norm{k}_name`` ("bn1") and read
    through properties, ``with_cp``, ``out += identity`` then ReLU."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, with_cp=False):
        super().__init__()
        self.norm1_name, self.norm2_name = "bn1", "bn2"
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.add_module(self.norm1_name, nn.BatchNorm2d(planes))
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.add_module(self.norm2_name, nn.BatchNorm2d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample, self.stride, self.with_cp = downsample, stride, with_cp

    @property
    def norm1(self):
        return getattr(self, self.norm1_name)

    @property
    def norm2(self):
        return getattr(self, self.norm2_name)

    def forward(self, x):
        identity = x
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class _MmBottleneck(nn.Module):
    """mm* ``ResNet`` Bottleneck (style 'pytorch': stride on the 3x3), plugins and DCN off."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, with_cp=False):
        super().__init__()
        self.norm1_name, self.norm2_name, self.norm3_name = "bn1", "bn2", "bn3"
        self.with_plugins, self.with_dcn, self.dcn = False, False, None
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.add_module("bn1", nn.BatchNorm2d(planes))
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.add_module("bn2", nn.BatchNorm2d(planes))
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.add_module("bn3", nn.BatchNorm2d(planes * 4))
        self.relu = nn.ReLU(inplace=True)
        self.downsample, self.with_cp = downsample, with_cp

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


_MmBasicBlock.__name__ = _MmBasicBlock.__qualname__ = "BasicBlock"
_MmBottleneck.__name__ = _MmBottleneck.__qualname__ = "Bottleneck"


def _shortcut(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


BLOCKS = {
    "hrfast_basic": lambda: _common.BasicBlock(8, 8),
    "hrfast_bottleneck": lambda: _common.Bottleneck(8, 4, downsample=_shortcut(8, 16)),
    "layouts_basic": lambda: layouts.BasicBlock(8, 8),
    "timm_basic": lambda: timm.models.resnet.BasicBlock(8, 8, stride=2, downsample=_shortcut(8, 8, 2)),
    "timm_bottleneck": lambda: timm.models.resnet.Bottleneck(16, 4),
    "torchvision_basic": lambda: tv.BasicBlock(8, 8),
    "torchvision_bottleneck": lambda: tv.Bottleneck(8, 2, downsample=_shortcut(8, 8)),
    "mm_basic": lambda: _MmBasicBlock(8, 8, with_cp=True),
    "mm_bottleneck": lambda: _MmBottleneck(8, 4, stride=2, downsample=_shortcut(8, 16, 2)),
}


def _randomized(model, seed=0):
    layouts.randomize_norms(model, seed)
    return model.eval()


def _flat(out):
    if isinstance(out, (list, tuple)):
        return torch.cat([o.reshape(-1) for o in out])
    return out.reshape(-1)


def _run(model, x):
    with torch.no_grad():
        return _flat(model(x))


def _patched(model, **kwargs):
    model = copy.deepcopy(model)
    hrfast.patch(model, inference=True, **kwargs)
    return model


def _assert_exact_and_within_budget(model, x, calls=inference.EXPLORE_CALLS + 1, **patch_args):
    """float64: patched vs unpatched within FP64_TOL; float32: every call (each layout the exploration tries,
    then the chosen one) within the unpatched float32 model's own error against float64 (FP32_RTOL floor)."""
    ref64 = _run(copy.deepcopy(model).double(), x.double())
    got64 = _run(_patched(model, **patch_args).double(), x.double())
    assert rel_error(got64, ref64) <= FP64_TOL
    budget = max(FP32_RTOL, LOW_PRECISION_FACTOR * rel_error(_run(model, x), ref64))
    patched = _patched(model, **patch_args)
    for _ in range(calls):
        assert rel_error(_run(patched, x), ref64) <= budget
    return patched


@pytest.fixture
def unit_calls(monkeypatch):
    """Counts the conv units that ran folded: every run of a step that `unit_step` bound (the stem's
    `conv_unit` and the chains' planned steps), so the steps a UnitChain replays count too."""
    calls = []
    original = inference.unit_step

    def counting(x, conv, *args, **kwargs):
        step = original(x, conv, *args, **kwargs)
        return lambda *a: calls.append(conv) or step(*a)

    monkeypatch.setattr(inference, "unit_step", counting)
    return calls


# ------------------------------------------------------------------------------------------ structure


@pytest.mark.parametrize("name", BLOCKS)
def test_residual_blocks_of_every_code_base(name):
    block = BLOCKS[name]()
    found = describe_residual_block(block)
    n = 3 if "bottleneck" in name else 2
    assert found.kind == ("Bottleneck" if n == 3 else "BasicBlock")
    assert [u.conv for u in found.units] == [getattr(block, f"conv{k}") for k in range(1, n + 1)]
    assert [u.norm for u in found.units] == [getattr(block, f"bn{k}") for k in range(1, n + 1)]
    assert [u.act is not None for u in found.units] == [True] * (n - 1) + [False]
    assert found.shortcut is block.downsample and type(found.act) is nn.ReLU


@pytest.mark.parametrize("name", BLOCKS)
def test_residual_block_runs_folded_and_exact(name, unit_calls):
    block = _randomized(BLOCKS[name]())
    c_in = block.conv1.in_channels
    _assert_exact_and_within_budget(block, torch.randn(2, c_in, 9, 11))
    assert unit_calls  # the folded path ran


def test_blocks_that_compute_something_else_are_left_alone():
    se = timm.models.resnet.BasicBlock(8, 8, attn_layer="se")
    assert "its se is" in describe_residual_block(se)

    class Custom(_common.BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    assert "overrides forward" in describe_residual_block(Custom(8, 8))
    grouped = _common.BasicBlock(8, 8)
    grouped.bn1 = nn.GroupNorm(2, 8)
    assert "not a batch norm" in describe_residual_block(grouped)
    plugins = _MmBottleneck(8, 2)
    plugins.with_plugins = True
    assert "with_plugins" in describe_residual_block(plugins)
    extra = _common.BasicBlock(8, 8)
    extra.gate = nn.Sigmoid()
    assert "unexpected children gate" in describe_residual_block(extra)
    assert describe_residual_block(nn.Conv2d(3, 3, 1)) is None


def test_sequential_steps():
    conv1, bn1, relu, conv2, bn2, up = (nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                        nn.BatchNorm2d(4), nn.Upsample(scale_factor=2))
    steps = sequential_steps(nn.Sequential(conv1, bn1, relu, conv2, bn2, up))
    assert steps == [ConvUnit(conv1, bn1, relu), ConvUnit(conv2, bn2, None), up]
    assert sequential_steps(nn.Sequential(conv1, nn.GroupNorm(2, 4))) is None
    assert sequential_steps(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), bn1)) is None


def test_stem_reading():
    model = build_model("hrnetv2_w18_small_v1_seg")
    assert describe_stem(model) == (("conv1", "bn1"), ("conv2", "bn2"))
    assert describe_stem(tv.resnet18()) is None  # a ResNet stem: its forward is not HRNet's


# --------------------------------------------------------------------------------------- fold_into_conv


def test_fold_into_conv_equals_bn_of_conv_and_is_cached():
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=True).double(), _randomized(nn.BatchNorm2d(5)).double()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    with torch.no_grad():  # as the inference mode calls it (with parameter gradients wanted, modules run instead)
        weight, bias = fold_into_conv(conv, bn)
        torch.testing.assert_close(nn.functional.conv2d(x, weight, bias, padding=1), bn(conv(x)), rtol=1e-12,
                                   atol=1e-12)
        assert fold_into_conv(conv, bn)[0] is weight  # derived once
    assert not weight.requires_grad
    assert set(dict(conv.named_parameters())) == {"weight", "bias"}  # the modules keep their own tensors


@pytest.mark.parametrize("change", ["in_place", "load_state_dict", "to_dtype"])
def test_fold_into_conv_follows_parameter_changes(change):
    conv, bn = nn.Conv2d(3, 5, 1, bias=False).requires_grad_(False), _randomized(nn.BatchNorm2d(5))
    bn.requires_grad_(False)
    before = fold_into_conv(conv, bn)[0]
    assert fold_into_conv(conv, bn)[0] is before
    if change == "in_place":
        with torch.no_grad():
            bn.running_var.mul_(4)
    elif change == "load_state_dict":
        bn.load_state_dict({**bn.state_dict(), "weight": torch.full((5,), 3.0)})
    else:
        conv.double(), bn.double()
    after = fold_into_conv(conv, bn)[0]
    assert after is not before and not torch.equal(after.double(), before.double())
    x = torch.randn(1, 3, 4, 4, dtype=after.dtype)
    torch.testing.assert_close(nn.functional.conv2d(x, *fold_into_conv(conv, bn)), bn(conv(x)))


def test_fold_into_conv_low_precision_computes_in_fp32():
    conv, bn = nn.Conv2d(8, 8, 1, bias=False), _randomized(nn.BatchNorm2d(8))
    w32 = fold_into_conv(conv, bn)[0]
    w16 = fold_into_conv(conv.bfloat16(), bn.bfloat16())[0]
    assert w16.dtype == torch.bfloat16
    assert rel_error(w16, w32) <= torch.finfo(torch.bfloat16).eps  # one rounding, not a bf16 computation


@pytest.mark.parametrize("change", ["in_place", "new_parameter", "data", "eps"])
def test_planned_chains_replay_and_follow_parameter_changes(change, monkeypatch):
    """A block binds its steps on its first call of a signature and replays them (no new binding) while its
    parameters are unchanged; any change (in place, a new Parameter, new storage, eps) plans again."""
    block = _randomized(BLOCKS["hrfast_bottleneck"]()).double()
    hrfast.patch(block, inference=inference.Inference(channels_last=False, epilogue="aten"))  # one configuration
    bindings = []
    original = inference.unit_step
    monkeypatch.setattr(inference, "unit_step", lambda *a, **k: bindings.append(a[1]) or original(*a, **k))
    x = torch.randn(2, 8, 7, 5, dtype=torch.float64)
    unpatched = copy.deepcopy(block)
    hrfast.unpatch(unpatched)
    for _ in range(2):
        assert rel_error(_run(block, x), _run(unpatched, x)) <= FP64_TOL
    assert len(bindings) == 4  # the three units and the shortcut's, bound once
    for m in (block, unpatched):
        with torch.no_grad():
            if change == "in_place":
                m.bn2.running_mean.add_(1)
            elif change == "new_parameter":
                m.conv3.weight = nn.Parameter(m.conv3.weight * 2)
            elif change == "data":
                m.bn1.weight.data = m.bn1.weight.data * 3
            else:
                m.bn3.eps = 0.5
    assert rel_error(_run(block, x), _run(unpatched, x)) <= FP64_TOL
    assert len(bindings) == 4 + 3  # the main path planned again, the shortcut replayed


# --------------------------------------------------------------------------------- the conv epilogues


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("residual, relu", [(False, False), (False, True), (True, True)])
def test_every_epilogue_implementation_agrees(dtype, layout, residual, relu):
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False).to(dtype)
    bn = _randomized(nn.BatchNorm2d(16)).to(dtype)
    x = torch.randn(1, 8, 12, 10, dtype=dtype).contiguous(memory_format=layout)
    r = torch.randn(1, 16, 6, 5, dtype=dtype).contiguous(memory_format=layout) if residual else None
    expected = bn(conv(x)).double() + (0 if r is None else r.double())
    expected = expected.relu() if relu else expected
    weight, bias = fold_into_conv(conv, bn)
    names = inference._candidates(x, r, relu, inference.Inference())
    channels_last = layout == torch.channels_last
    if dtype == torch.bfloat16 and residual and not channels_last:
        assert names == ["aten"]  # oneDNN has no bf16 add + ReLU epilogue for NCHW
    else:  # packed weights make oneDNN write channels_last: only for channels_last inputs
        assert names == ["aten", "onednn"] + (["onednn_packed"] if channels_last else [])
    names = ["aten", "onednn", "onednn_packed"] if names != ["aten"] else names
    x_before, r_before = x.clone(), None if r is None else r.clone()
    tol = FP32_RTOL if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    for name in names:
        with torch.no_grad():
            step = inference._IMPLS[name](x, inference._unit(conv, weight), bias, conv, relu, r)
            out = step(x) if r is None else step(x, r)
        assert rel_error(out, expected) <= tol, name
    assert torch.equal(x, x_before) and (r is None or torch.equal(r, r_before))  # inputs never written


def test_epilogue_candidates_when_gradients_or_tracing_are_involved():
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    assert inference._candidates(x, None, True, inference.Inference()) == ["aten"]
    with torch.no_grad():
        assert inference._candidates(x, None, True, inference.Inference(epilogue="aten")) == ["aten"]
        assert inference._candidates(x.double(), None, True, inference.Inference()) == ["aten"]


# ------------------------------------------------------------------------------------------ whole models


MODELS = {
    "seg_w18_small": (lambda: build_model("hrnetv2_w18_small_v1_seg"), (1, 3, 64, 96)),
    "pose_w32": (lambda: build_model("hrnet_w32_pose"), (1, 3, 32, 32)),
    "cls_w18_small": (lambda: build_model("hrnet_w18_small_v1_c"), (1, 3, 64, 64)),
    "timm_w18_small": (lambda: timm.create_model("hrnet_w18_small", pretrained=False), (1, 3, 64, 64)),
    "timm_features": (lambda: timm.create_model("hrnet_w18_small", pretrained=False, features_only=True),
                      (1, 3, 64, 64)),
}


@pytest.mark.parametrize("name", MODELS)
def test_models_exact_in_float64_and_within_budget_in_float32(name, unit_calls):
    make, shape = MODELS[name]
    model = _randomized(make())
    patched = _assert_exact_and_within_budget(model, torch.randn(shape))
    assert unit_calls
    report = hrfast.patch(copy.deepcopy(model), inference=True)
    assert not [r for r in report.skipped if r.kind == "inference"]
    assert len(inference.layout_choices(patched)) == 1


def _bn_count(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_every_batch_norm_of_the_official_model_is_folded(unit_calls, monkeypatch):
    """On CPU every batch norm of the official segmentation model runs folded into its conv, once per forward:
    stem, blocks, shortcuts, transitions, the fusion step's up paths and chain links as conv units, the head's in
    the reordered head."""
    heads = []
    original = patch_inference.reordered_head
    monkeypatch.setattr(patch_inference, "reordered_head", lambda *a: heads.append(a[2]) or original(*a))
    model = _randomized(build_model("hrnetv2_w18_small_v1_seg"))
    patched = _patched(model)
    _run(patched, torch.randn(1, 3, 64, 64))
    assert heads == [patched.last_layer[1]]
    assert len(unit_calls) == _bn_count(model) - 1


@pytest.fixture
def program_runs(monkeypatch):
    """The fusion modules that ran as one `FusionProgram`, once per run."""
    runs = []
    original = inference.FusionProgram._run
    monkeypatch.setattr(inference.FusionProgram, "_run", lambda self, *a: runs.append(self) or original(self, *a))
    return runs


@pytest.mark.parametrize("family", ["seg_ocr", "seg_master", "face", "openseg", "pose", "cls", "mmseg", "mmpose",
                                    "mmpose_bilinear", "mmseg_groupnorm"])
def test_official_and_mm_layouts(family, unit_calls, program_runs):
    model = layouts.build(family).eval()
    _assert_exact_and_within_budget(model, torch.randn(2, 3, 32, 32), calls=3, **FORWARD_ARGS.get(family, {}))
    assert unit_calls
    assert bool(program_runs) == (family != "mmseg_groupnorm")  # group norms do not fold: the module's forward


def test_fusion_program_replays_and_follows_changes_below_the_module(program_runs, monkeypatch):
    """An eval fusion module runs as one program, bound on its first call of a signature and replayed; it plans
    again after a parameter change, reads the module again after a swap deep below it, lets a hook below it run
    (the module's own forward then), and raises as unpatched where the branch sizes do not fit."""
    model = _randomized(build_model("hrnetv2_w18_small_v1_seg")).double()
    patched = copy.deepcopy(model)
    hrfast.patch(patched, inference=inference.Inference(channels_last=False, epilogue="aten"))
    inside = {id(m) for stage in (patched.stage2, patched.stage3, patched.stage4) for m in stage.modules()}
    bindings = []
    original = inference.unit_step
    monkeypatch.setattr(inference, "unit_step",
                        lambda *a, **k: (id(a[1]) in inside and bindings.append(a[1])) or original(*a, **k))
    x = torch.randn(1, 3, 70, 90, dtype=torch.float64)  # odd branch sizes: 18x23 ... 3x3

    def check():
        assert rel_error(_run(patched, x), _run(model, x)) <= FP64_TOL

    check()
    programs, bound = len(program_runs), len(bindings)
    check()
    assert len(program_runs) == 2 * programs == 6 and len(bindings) == bound  # replayed: nothing bound again
    bn = _randomized(nn.BatchNorm2d(model.stage3[0].branches[0][1].bn2.num_features).double(), seed=5)
    for m in (model, patched):
        with torch.no_grad():
            m.stage3[0].fuse_layers[2][0][1][1].running_var.mul_(2)
        m.stage3[0].branches[0][1].bn2 = copy.deepcopy(bn)  # two levels below the children of stage3[0]
    check()
    assert len(bindings) > bound
    seen = []
    patched.stage4[0].fuse_layers[3][0][2][1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    runs = len(program_runs)
    check()
    assert len(seen) == 1 and len(program_runs) == runs + 2  # stage4 ran its own forward, the others the program
    cls = layouts.build("cls").eval()
    patched_cls = _patched(cls)
    for m in (cls, patched_cls):
        with pytest.raises(RuntimeError, match="must match the size"):
            _run(m, torch.randn(1, 3, 36, 36))  # branch 1 at 9x9 upsampled x2 is not branch 0's 18x18


@pytest.mark.parametrize("net", ["seg_ocr", "face", "mmseg", "mmpose"])
def test_whole_nets_with_heads(net):
    model = layouts.build_net(net).eval()
    x = torch.randn(1, 3, 32, 32)
    if net == "mmpose":
        ref64 = _run(copy.deepcopy(model).double(), x.double())
        got64 = _run(_patched(model).double(), x.double())
        assert rel_error(got64, ref64) <= FP64_TOL
    else:
        _assert_exact_and_within_budget(model, x, calls=2, **FORWARD_ARGS.get(net, {}))


# --------------------------------------------------------------------------------- modes and module state


def _train_step(model, x, lr=0.1):
    """One SGD step in train mode; returns the loss."""
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None
    return loss.detach()


def _pair():
    model = _randomized(build_model("hrnetv2_w18_small_v1_seg")).double()
    return model, _patched(model)


def test_train_mode_runs_the_original_math_and_eval_follows_updates():
    """eval -> train (steps that update parameters and running statistics) -> eval, patched vs unpatched."""
    model, patched = _pair()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert rel_error(_run(patched, x), _run(model, x)) <= FP64_TOL
    for _ in range(2):
        assert rel_error(_train_step(patched, x), _train_step(model, x)) <= FP64_TOL
    for (name, a), b in zip(patched.state_dict().items(), model.state_dict().values()):
        assert rel_error(a.double(), b.double()) <= FP64_TOL, name
    model.eval(), patched.eval()
    assert rel_error(_run(patched, x), _run(model, x)) <= FP64_TOL


def test_load_state_dict_after_patching():
    model, patched = _pair()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    _run(patched, x)  # fold caches filled
    other = _randomized(build_model("hrnetv2_w18_small_v1_seg"), seed=3).double()
    patched.load_state_dict(other.state_dict())
    assert rel_error(_run(patched, x), _run(other, x)) <= FP64_TOL


def test_gradients_in_eval_mode_are_those_of_the_unpatched_model():
    """Eval with autograd on: the parameters get exactly the unpatched model's gradients (no folding then)."""
    model, patched = _pair()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    grads = []
    for m in (model, patched):
        m.zero_grad()
        m(x).square().mean().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    assert rel_error(grads[1], grads[0]) <= FP64_TOL


def test_frozen_parameters_still_fold_and_give_input_gradients(unit_calls):
    model, patched = _pair()
    for m in (model, patched):
        m.requires_grad_(False)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    g = [torch.autograd.grad(m(x).square().mean(), x)[0] for m in (model, patched)]
    assert unit_calls and rel_error(g[1], g[0]) <= FP64_TOL


def test_hooks_on_folded_modules_run():
    model, patched = _pair()
    seen = []
    patched.stage2[0].branches[0][0].bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    patched.conv1.register_forward_pre_hook(lambda m, i: seen.append("stem"))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert rel_error(_run(patched, x), _run(model, x)) <= FP64_TOL
    assert len(seen) == 2


def test_state_dict_keys_values_and_modules_unchanged():
    model, patched = _pair()
    assert list(patched.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(patched.state_dict().values(), model.state_dict().values()))
    assert [n for n, _ in patched.named_modules()] == [n for n, _ in model.named_modules()]
    assert [n for n, _ in patched.named_parameters()] == [n for n, _ in model.named_parameters()]


def test_unpatch_restores_everything():
    model, patched = _pair()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    _run(patched, x)
    report = hrfast.unpatch(patched)
    assert report.count("unpatched", "inference") > 0
    assert not any(isinstance(m.__dict__.get("forward"), PatchedForward) for m in patched.modules())
    assert torch.equal(_run(patched, x), _run(model, x))


def test_patching_again_replaces_and_inference_false_removes():
    model = _randomized(build_model("hrnetv2_w18_small_v1_seg"))
    patched = _patched(model)
    first = hrfast.patch(patched, inference=hrfast.Inference(channels_last=False))
    assert first.count("patched", "inference") == hrfast.patch(copy.deepcopy(model), inference=True).count(
        "patched", "inference")
    assert patched.__dict__["forward"].config.base_config.base_config.backend == "auto"  # one wrapper each
    report = hrfast.patch(patched)
    assert report.count("unpatched", "inference") > 0
    wrappers = [m for m in patched.modules() if isinstance(getattr(m.__dict__.get("forward"), "adapter", None),
                                                         patch_inference.InferenceAdapter)]
    assert not wrappers
    plain = copy.deepcopy(model)
    hrfast.patch(plain)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_run(patched, x), _run(plain, x))


def test_a_stem_norm_swapped_after_patching_is_not_folded_twice():
    model, patched = _pair()
    fresh = _randomized(nn.BatchNorm2d(64), seed=5).double()
    patched.bn1, model.bn1 = fresh, copy.deepcopy(fresh)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert rel_error(_run(patched, x), _run(model, x)) <= FP64_TOL


def test_deepcopy_and_pickle_keep_the_patch():
    model, patched = _pair()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(patched), torch.load(buffer, weights_only=False)):
        assert isinstance(clone.stage2[0].branches[0][0].__dict__["forward"], PatchedForward)
        assert rel_error(_run(clone, x), _run(model, x)) <= FP64_TOL


# -------------------------------------------------------------------------------------------- layout


def test_layout_is_measured_once_per_input_signature_and_outputs_keep_the_input_layout():
    model = _randomized(build_model("hrnetv2_w18_small_v1_seg"))
    patched = _patched(model)
    for shape in ((1, 3, 64, 64), (1, 3, 64, 96)):
        x = torch.randn(shape)
        for _ in range(inference.EXPLORE_CALLS + 1):
            with torch.no_grad():
                assert patched(x).is_contiguous()
    choices = inference.layout_choices(patched)
    configs = {f"{layout}+{epilogue}" for layout in ("contiguous", "channels_last") for epilogue in ("aten", "auto")}
    assert len(choices) == 2 and {c[1] for c in choices} <= configs
    assert all(set(c[2]) == configs for c in choices)


def test_model_configurations_and_the_forced_aten_epilogue():
    """The whole forward is measured with per-conv epilogues ("auto") and with "aten" in every conv unit; inside an
    "aten" forward no conv unit offers oneDNN."""
    I = hrfast.Inference
    assert inference._configurations(I()) == ("contiguous+aten", "contiguous+auto", "channels_last+aten",
                                              "channels_last+auto")
    assert inference._configurations(I(channels_last=True)) == ("channels_last+aten", "channels_last+auto")
    assert inference._configurations(I(channels_last=False, epilogue="aten")) == ("contiguous+aten",)
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    token = inference._FORWARD_EPILOGUE.set("aten")
    try:
        with torch.no_grad():
            assert inference._candidates(x, None, True, I()) == ["aten"]
    finally:
        inference._FORWARD_EPILOGUE.reset(token)
    with torch.no_grad():
        assert "onednn" in inference._candidates(x, None, True, I())


def test_channels_last_forced_and_channels_last_input():
    model = _randomized(build_model("hrnetv2_w18_small_v1_seg")).double()
    patched = copy.deepcopy(model)
    hrfast.patch(patched, inference=hrfast.Inference(channels_last=True))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        out = patched(x)
        assert out.is_contiguous() and rel_error(out, model(x)) <= FP64_TOL
        cl = patched(x.contiguous(memory_format=torch.channels_last))
    assert rel_error(cl, model(x)) <= FP64_TOL


# ------------------------------------------------------------------------------------ compile, options


def test_torch_compile_of_the_inference_patched_model():
    """Compiles and computes the unpatched model's output; the graph has the batch norms as they are (a traced
    fold would be recomputed on every call: the parameters are graph inputs)."""
    model = layouts.build("pose").eval()
    patched = _patched(model)
    x = torch.randn(1, 3, 32, 32)
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    expected = _run(model, x)
    assert rel_error(_run(torch.compile(patched, backend="aot_eager"), x), expected) <= FP32_RTOL
    torch._dynamo.reset()
    assert rel_error(_run(torch.compile(patched, backend=recording_backend), x), expected) <= FP32_RTOL
    assert sum("batch_norm" in t for t in targets) == _bn_count(model)


def test_options():
    assert hrfast.Inference() == inference.as_inference(True)
    assert inference.as_inference(False) is None
    with pytest.raises(NotImplementedError, match="needs a GPU"):
        hrfast.Inference(cuda_graphs=True)
    with pytest.raises(NotImplementedError, match="needs a GPU"):
        hrfast.Inference(streams=True)
    with pytest.raises(ValueError, match="epilogue"):
        hrfast.Inference(epilogue="fast")
    with pytest.raises(TypeError, match="inference must be"):
        hrfast.patch(build_model("hrnetv2_w18_small_v1_seg"), inference="yes")
