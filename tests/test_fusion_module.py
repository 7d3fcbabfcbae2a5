"""HRFusion (hrfast.nn) against the eager fusion step it replaces: timm's HighResolutionModule (nearest
nn.Upsample inside fuse_layers) and an official-segmentation-style layout (bilinear F.interpolate in forward).

Every check compares outputs, the gradients of every branch input and of every fuse_layers parameter, and
every fuse_layers buffer (running statistics, num_batches_tracked) after one forward. The expected values
come from the eager code in float64; float64 runs must match to 1e-10, float32 runs to FP32_RTOL, bf16 runs
within twice PyTorch's own bf16 error.
"""
import copy
import itertools

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TRITON_DEVICE

from hrfast.nn import HRFusion
from hrfast.batchnorm import fold_batch_norm
from hrfast.testing import FP32_RTOL, assert_low_precision_close, assert_rel_close

DEVICE = TRITON_DEVICE
BACKENDS = ("reference", "triton", "cuda")
FP64_TOL = 1e-10
SIZES = ((16, 16), (8, 8), (4, 4), (2, 2))  # timm branches: /1, /2, /4, /8 of the first one
ODD_SIZES = ((7, 9), (4, 5), (2, 3))  # official seg: conv3x3 s2 p1 gives ceil(n / 2)


# ------------------------------------------------------------------------------------------------ builders


def _randomize_norms(module: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics (positive variances) for every norm."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)


@pytest.fixture(scope="module")
def timm_modules():
    """The fusing HighResolutionModules of a randomly initialised timm hrnet_w18_small, by branch count."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("hrnet_w18_small", pretrained=False)
        _randomize_norms(model)
    mods = [m for m in model.modules()
            if hasattr(m, "fuse_layers") and m.fuse_layers is not None and isinstance(m.fuse_layers, nn.ModuleList)]
    assert [len(m.fuse_layers) for m in mods] == [2, 3, 4]
    assert all(isinstance(m.fuse_layers[0][1][2], nn.Upsample) for m in mods)
    return {len(m.fuse_layers): m for m in mods}


def _copy(module: nn.Module, dtype: torch.dtype, train: bool) -> nn.Module:
    return copy.deepcopy(module).to(device=DEVICE, dtype=dtype).train(train)


def _in_channels(branch: nn.Module) -> int:
    return next(m for m in branch.modules() if isinstance(m, nn.Conv2d)).in_channels


def _branch_outputs(hr_module: nn.Module, sizes, batch: int = 2):
    """Branch outputs of the module on random inputs (float64, eval), the real inputs of the fusion step."""
    m = copy.deepcopy(hr_module).to(device=DEVICE, dtype=torch.float64).eval()
    with torch.no_grad():
        return [branch(torch.randn(batch, _in_channels(branch), *hw, device=DEVICE, dtype=torch.float64))
                for branch, hw in zip(m.branches, sizes)]


def _timm_eager(fuse_layers: nn.ModuleList, fuse_act: nn.Module):
    """timm HighResolutionModule.forward after the branches (nn.Identity at j == i, upsample in the Seq)."""
    def run(x):
        x_fuse = []
        for fuse_outer in fuse_layers:
            y = None
            for j, f in enumerate(fuse_outer):
                y = f(x[j]) if y is None else y + f(x[j])
            x_fuse.append(fuse_act(y))
        return x_fuse
    return run


def _seg_eager(fuse_layers: nn.ModuleList, align_corners: bool):
    """Official HRNet-Semantic-Segmentation HighResolutionModule.forward after the branches."""
    def run(x):
        x_fuse = []
        for i in range(len(fuse_layers)):
            y = x[0] if i == 0 else fuse_layers[i][0](x[0])
            for j in range(1, len(x)):
                if i == j:
                    y = y + x[j]
                elif j > i:
                    h, w = x[i].shape[-2:]
                    y = y + F.interpolate(fuse_layers[i][j](x[j]), size=[h, w], mode="bilinear",
                                          align_corners=align_corners)
                else:
                    y = y + fuse_layers[i][j](x[j])
            x_fuse.append(F.relu(y))
        return x_fuse
    return run


def _make_fuse_layers(channels, norm=None, upsample_module=None, identity=None):
    """An HRNet fuse_layers: Seq(conv1x1, norm[, upsample]) for j > i, chains of Seq(conv3x3 s2, norm[, relu])
    for j < i; `upsample_module(scale)` None means the upsample happens in forward (official seg)."""
    norm = norm or (lambda c: nn.BatchNorm2d(c, momentum=0.01))
    n = len(channels)
    layers = []
    for i in range(n):
        row = []
        for j in range(n):
            if j > i:
                seq = [nn.Conv2d(channels[j], channels[i], 1, 1, 0, bias=False), norm(channels[i])]
                if upsample_module is not None:
                    seq.append(upsample_module(2 ** (j - i)))
                row.append(nn.Sequential(*seq))
            elif j == i:
                row.append(identity)
            else:
                chain = []
                for k in range(i - j):
                    last = k == i - j - 1
                    c_out = channels[i] if last else channels[j]
                    block = [nn.Conv2d(channels[j], c_out, 3, 2, 1, bias=False), norm(c_out)]
                    if not last:
                        block.append(nn.ReLU(inplace=True))
                    chain.append(nn.Sequential(*block))
                row.append(nn.Sequential(*chain))
        layers.append(nn.ModuleList(row))
    fl = nn.ModuleList(layers)
    _randomize_norms(fl)
    return fl


def _random_inputs(channels, sizes, batch=2, dtype=torch.float64):
    # post-ReLU like real branch outputs
    return [torch.randn(batch, c, *hw, device=DEVICE, dtype=dtype).relu() for c, hw in zip(channels, sizes)]


# ----------------------------------------------------------------------------------------------- comparing


def _collect(run, fuse_layers: nn.Module, xs, grad_seed: int, keep=None):
    """Outputs, input/parameter gradients and buffers after run(xs) and a backward of random cotangents
    (zeroed where the boolean tensors `keep[i]` are False)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    outs = run(leaves)
    gen = torch.Generator(device="cpu").manual_seed(grad_seed)
    gys = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
           for o in outs]
    if keep is not None:
        gys = [g * k.to(g.dtype) for g, k in zip(gys, keep)]
    torch.autograd.backward(outs, gys)
    res = {f"out[{i}]": o.detach() for i, o in enumerate(outs)}
    res.update({f"grad xs[{j}]": x.grad for j, x in enumerate(leaves)})
    res.update({f"grad {n}": p.grad for n, p in fuse_layers.named_parameters()})
    res.update({f"buffer {n}": b.detach().clone() for n, b in fuse_layers.named_buffers()})
    return res


def _away_from_kink(fuse_layers, xs, low_dtype, train, autocast=False):
    """Where the pre-ReLU sum is farther from 0 than 4x PyTorch's own low-precision error of it.

    Within that band the ReLU mask is a coin flip decided by rounding; a handful of flipped elements
    then dominates every per-channel gradient sum (BN weight and bias), whichever implementation
    flipped them, so low-precision gradients are compared with cotangents that vanish there.
    """
    ref = _copy(fuse_layers, torch.float64, train)
    low = _copy(fuse_layers, torch.float32 if autocast else low_dtype, train)
    with torch.no_grad():
        pre_ref = _timm_eager(ref, nn.Identity())([x.double() for x in xs])
        with torch.autocast(device_type=DEVICE, dtype=low_dtype, enabled=autocast):
            pre_low = _timm_eager(low, nn.Identity())(xs)
    return [(r.abs() > 4 * (p.double() - r).abs().max()) for r, p in zip(pre_ref, pre_low)]


def _compare(actual: dict, expected: dict, check) -> None:
    assert actual.keys() == expected.keys()
    for name, exp in expected.items():
        act = actual[name]
        assert exp is not None and act is not None, f"{name}: missing gradient"
        if not exp.is_floating_point():  # num_batches_tracked
            assert torch.equal(act.cpu(), exp.cpu()), f"{name}: {act} != {exp}"
            continue
        assert act.shape == exp.shape, name
        check(act, exp, name)


def _rel_check(rtol):
    return lambda act, exp, name: assert_rel_close(act, exp, rtol, name)


def _check_fusion(fuse_layers, eager, xs, dtype, train, backend, rtol, **hrfusion_kwargs):
    """HRFusion over a copy of fuse_layers in `dtype` vs the eager code on a float64 copy."""
    ref_layers = _copy(fuse_layers, torch.float64, train)
    fast_layers = _copy(fuse_layers, dtype, train)
    expected = _collect(eager(ref_layers), ref_layers, xs, grad_seed=1)
    fusion = HRFusion(fast_layers, backend=backend, **hrfusion_kwargs)
    actual = _collect(fusion, fast_layers, [x.to(dtype) for x in xs], grad_seed=1)
    for i in range(len(fuse_layers)):
        assert actual[f"out[{i}]"].dtype == dtype
    _compare(actual, expected, _rel_check(rtol))
    if train:  # the statistics did move (a trivially unchanged buffer would pass the comparison)
        bn = next(m for m in fast_layers.modules() if isinstance(m, nn.BatchNorm2d))
        assert bn.num_batches_tracked.item() == 8


# ------------------------------------------------------------------------------------------------- timm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_matches_timm(timm_modules, dtype, train, backend):
    rtol = FP64_TOL if dtype == torch.float64 else FP32_RTOL
    for n, m in timm_modules.items():
        xs = _branch_outputs(m, SIZES[:n])
        _check_fusion(m.fuse_layers, lambda fl: _timm_eager(fl, nn.ReLU(False)), xs, dtype, train, backend, rtol)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_timm_module_forward(timm_modules, train):
    """Against the real HighResolutionModule.forward (branches included, list mutated in place by timm)."""
    m = _copy(timm_modules[4], torch.float64, train)
    fast = copy.deepcopy(m)
    fusion = HRFusion.from_module(fast, backend="triton")
    x_in = [torch.randn(2, _in_channels(b), *hw, device=DEVICE, dtype=torch.float64)
            for b, hw in zip(m.branches, SIZES)]
    expected = m(list(x_in))
    actual = fusion([b(x) for b, x in zip(fast.branches, x_in)])
    assert isinstance(actual, list) and len(actual) == len(expected) == 4
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_rel_close(a, e, FP64_TOL, f"out[{i}]")
    for (name, b_ref), (_, b_fast) in zip(m.named_buffers(), fast.named_buffers()):
        assert torch.allclose(b_fast, b_ref, rtol=FP64_TOL, atol=0), name


def test_state_dict_identical(timm_modules):
    m = copy.deepcopy(timm_modules[4])
    fusion = HRFusion(m.fuse_layers)
    assert fusion.fuse_layers is m.fuse_layers
    expected = {k: v for k, v in m.state_dict().items() if k.startswith("fuse_layers.")}
    actual = fusion.state_dict()
    assert list(actual.keys()) == list(expected.keys())
    for k, v in expected.items():
        assert actual[k].data_ptr() == v.data_ptr() and torch.equal(actual[k], v), k
    # and it loads a checkpoint of the original module
    other = copy.deepcopy(timm_modules[4])
    _randomize_norms(other)
    fusion.load_state_dict({k: v for k, v in other.state_dict().items() if k.startswith("fuse_layers.")})
    assert torch.equal(m.fuse_layers[3][0][2][1].running_var, other.fuse_layers[3][0][2][1].running_var)
    assert HRFusion.from_module(m).fuse_layers is m.fuse_layers


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_untouched_outputs_fresh(timm_modules, backend):
    m = _copy(timm_modules[3], torch.float32, True)
    xs = [x.float() for x in _branch_outputs(timm_modules[3], SIZES[:3])]
    saved = [x.clone() for x in xs]
    arg = list(xs)
    outs = HRFusion(m.fuse_layers, backend=backend)(arg)
    assert isinstance(outs, list) and len(outs) == 3
    assert len(arg) == 3 and all(a is x for a, x in zip(arg, xs))
    for o in outs:
        for x in xs:
            assert o.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        o.relu_().mul_(0)  # an in-place consumer downstream (pose/OCR fuse ReLUs are inplace)
    for x, s in zip(xs, saved):
        assert torch.equal(x, s)
    # a tuple works as well
    assert len(HRFusion(m.fuse_layers, backend=backend)(tuple(xs))) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_scale_output_false(timm_modules, backend):
    """pose stage 4: one output row, every branch still an input."""
    one_row = nn.ModuleList([copy.deepcopy(timm_modules[4].fuse_layers[0])])
    xs = _branch_outputs(timm_modules[4], SIZES)
    _check_fusion(one_row, lambda fl: _timm_eager(fl, nn.ReLU(False)), xs, torch.float64, True, backend, FP64_TOL)
    assert len(HRFusion(_copy(one_row, torch.float64, False))(xs)) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last(timm_modules, backend):
    m = timm_modules[2]
    xs = [x.contiguous(memory_format=torch.channels_last) for x in _branch_outputs(m, SIZES[:2])]
    layers = _copy(m.fuse_layers, torch.float64, True).to(memory_format=torch.channels_last)
    _check_fusion(layers, lambda fl: _timm_eager(fl, nn.ReLU(False)), xs, torch.float64, True, backend, FP64_TOL)


def test_upsample_module_wins_over_arguments(timm_modules):
    """Entries with an upsample module use it; upsample= only fills in for entries without one."""
    m = timm_modules[3]
    xs = _branch_outputs(m, SIZES[:3])
    _check_fusion(m.fuse_layers, lambda fl: _timm_eager(fl, nn.ReLU(False)), xs, torch.float64, False,
                  "reference", FP64_TOL, upsample="bilinear", align_corners=True)


# ---------------------------------------------------------------------------------- bilinear in forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("train, dtype", [(False, torch.float32), (True, torch.float64)],
                         ids=["eval-fp32", "train-fp64"])
def test_bilinear_in_forward_odd_sizes(train, dtype, align_corners, backend):
    """Official seg layout (no upsample module; F.interpolate(size=...) in forward) on odd sizes."""
    channels = (4, 6, 8)
    fl = _make_fuse_layers(channels, identity=None)
    xs = _random_inputs(channels, ODD_SIZES)
    eager = lambda layers: _seg_eager(layers, align_corners)  # noqa: E731
    rtol = FP64_TOL if dtype == torch.float64 else FP32_RTOL
    _check_fusion(fl, eager, xs, dtype, train, backend, rtol, upsample="bilinear", align_corners=align_corners)


def test_missing_upsample_mode_raises():
    fl = _make_fuse_layers((4, 6, 8))
    with pytest.raises(ValueError, match=r"upsample=.*align_corners="):
        HRFusion(fl)

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.fuse_layers = fl

    with pytest.raises(ValueError, match=r"fuse_layers\[0\]\[1\].*upsample="):
        HRFusion.from_module(Seg())
    HRFusion.from_module(Seg(), upsample="bilinear", align_corners=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_to_exact_size(backend):
    """upsample='nearest' without a module: F.interpolate(size=..., mode='nearest') on odd sizes."""
    channels = (4, 6, 8)
    fl = _make_fuse_layers(channels)
    xs = _random_inputs(channels, ODD_SIZES)

    def eager(layers):
        def run(x):
            outs = []
            for i, row in enumerate(layers):
                y = x[i]
                for j in range(len(x)):
                    if j > i:
                        y = y + F.interpolate(row[j](x[j]), size=x[i].shape[-2:], mode="nearest")
                    elif j < i:
                        y = y + row[j](x[j])
                outs.append(torch.relu(y))
            return outs
        return run

    _check_fusion(fl, eager, xs, torch.float64, True, backend, FP64_TOL, upsample="nearest")


# ------------------------------------------------------------------------------------------------- norms


class FrozenBN(nn.Module):
    """torchvision FrozenBatchNorm2d-like: buffers only, not a _BatchNorm."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(c) + 0.5)
        self.register_buffer("bias", torch.rand(c) - 0.5)
        self.register_buffer("running_mean", torch.rand(c) - 0.5)
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class AlwaysEvalBN(nn.BatchNorm2d):
    """A _BatchNorm subclass with its own forward (norm_eval-style): must not be folded with batch stats."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _mixed_norms(kinds):
    counter = itertools.count()

    def make(c):
        kind = kinds[next(counter) % len(kinds)]
        if kind == "bn":
            return nn.BatchNorm2d(c)
        if kind == "gn":
            return nn.GroupNorm(2, c)
        if kind == "frozen":
            return FrozenBN(c)
        if kind == "always_eval":
            return AlwaysEvalBN(c)
        if kind == "affine_false":
            return nn.BatchNorm2d(c, affine=False)
        if kind == "untracked":
            return nn.BatchNorm2d(c, track_running_stats=False)
        if kind == "momentum_none":
            return nn.BatchNorm2d(c, momentum=None)
        raise AssertionError(kind)
    return make


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kinds", [("gn",), ("gn", "bn"), ("frozen", "always_eval", "bn"),
                                   ("affine_false", "untracked", "momentum_none")],
                         ids=["groupnorm", "groupnorm+bn", "frozen+subclass+bn", "bn-variants"])
def test_norm_variants(kinds, train, backend):
    """GroupNorm, frozen and custom-forward norms run as modules; BN variants fold exactly."""
    channels = (4, 6, 8)
    fl = _make_fuse_layers(channels, norm=_mixed_norms(kinds), upsample_module=lambda s: nn.Upsample(
        scale_factor=s, mode="nearest"), identity=nn.Identity())
    xs = _random_inputs(channels, SIZES[:3])
    _check_fusion_any(fl, xs, train, backend)


def _check_fusion_any(fl, xs, train, backend):
    ref_layers = _copy(fl, torch.float64, train)
    fast_layers = _copy(fl, torch.float64, train)
    expected = _collect(_timm_eager(ref_layers, nn.ReLU()), ref_layers, xs, grad_seed=2)
    actual = _collect(HRFusion(fast_layers, backend=backend), fast_layers, xs, grad_seed=2)
    _compare(actual, expected, _rel_check(FP64_TOL))


def test_norm_dispatch():
    """Which norms are folded (batch_norm_affine gives scale/shift) and which run as modules (None)."""
    z = torch.randn(2, 4, 3, 3)
    assert fold_batch_norm(nn.BatchNorm2d(4), z) is not None
    assert fold_batch_norm(nn.SyncBatchNorm(4).train(), z) is not None  # not distributed: plain BN
    assert fold_batch_norm(nn.BatchNorm2d(4, affine=False, track_running_stats=False), z) is not None
    for other in (nn.GroupNorm(2, 4), FrozenBN(4), AlwaysEvalBN(4), nn.Identity(), nn.LazyBatchNorm2d()):
        assert fold_batch_norm(other, z) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_none_cumulative_average(timm_modules, backend):
    """momentum=None: cumulative average 1/num_batches_tracked, over several steps."""
    m = timm_modules[3]
    ref_layers = _copy(m.fuse_layers, torch.float64, True)
    for bn in ref_layers.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None
    fast_layers = copy.deepcopy(ref_layers)
    fusion = HRFusion(fast_layers, backend=backend)
    for step in range(3):
        xs = _branch_outputs(m, SIZES[:3])
        expected = _collect(_timm_eager(ref_layers, nn.ReLU()), ref_layers, xs, grad_seed=step)
        actual = _collect(fusion, fast_layers, xs, grad_seed=step)
        _compare(actual, expected, _rel_check(FP64_TOL))
        for p in list(ref_layers.parameters()) + list(fast_layers.parameters()):
            p.grad = None
    assert fast_layers[2][0][1][1].num_batches_tracked.item() == 7 + 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_sync_batchnorm_folds(timm_modules, train, backend):
    """SyncBatchNorm outside distributed training is plain BN; converting after construction is followed."""
    m = timm_modules[3]
    xs = _branch_outputs(m, SIZES[:3])
    ref_layers = _copy(m.fuse_layers, torch.float64, train)
    fast_layers = _copy(m.fuse_layers, torch.float64, train)
    fusion = HRFusion(fast_layers, backend=backend)
    fusion = nn.SyncBatchNorm.convert_sync_batchnorm(fusion)
    assert isinstance(fusion.fuse_layers[0][1][1], nn.SyncBatchNorm)
    fast_layers = fusion.fuse_layers
    expected = _collect(_timm_eager(ref_layers, nn.ReLU()), ref_layers, xs, grad_seed=3)
    actual = _collect(fusion, fast_layers, xs, grad_seed=3)
    _compare(actual, expected, _rel_check(FP64_TOL))


@pytest.mark.parametrize("merged", [False, True], ids=["two_launches", "merged"])
def test_training_step_folds_in_one_launch(timm_modules, merged, monkeypatch):
    """The whole step's batch norms (the 4-branch module's 12 folds, every row's) share one statistics launch (+ one
    finalize) and one backward launch on Triton, and the four rows' per-channel sums one reduction launch (the step
    is one autograd node, `hrfast.ops.fuse_step`) as do the rows' output-size backward kernels, with the eager
    step's results (fp64) and running statistics. No strided-down term's gradient is written by the fused
    backward: the batch-norm backward reads g."""
    from test_batch_norm_fold import _Counting

    from hrfast.kernels import batch_norm as kernels
    from hrfast.kernels import fuse as fuse_kernels

    monkeypatch.setattr(kernels, "MERGED_FINALIZE", merged)
    counts = {}
    for name in ("_bn_stats_kernel", "_bn_finalize_kernel", "_bn_backward_kernel"):
        monkeypatch.setattr(kernels, name, _Counting(getattr(kernels, name), counts, name))
    monkeypatch.setattr(fuse_kernels, "_reduce_partials_kernel",
                        _Counting(fuse_kernels._reduce_partials_kernel, counts, "_reduce_partials_kernel"))
    written = []
    same = fuse_kernels._fuse_backward_same_kernel
    monkeypatch.setattr(fuse_kernels, "_fuse_backward_same_kernel",
                        _Recording(same, lambda kwargs: written.append((kwargs["HAS_SCALE"], kwargs["NEED_DX"]))))
    m = timm_modules[4]
    _check_fusion(m.fuse_layers, lambda fl: _timm_eager(fl, nn.ReLU(False)), _branch_outputs(m, SIZES),
                  torch.float64, True, "triton", FP64_TOL)
    assert counts == {"_bn_stats_kernel": 1, "_bn_backward_kernel": 1, "_reduce_partials_kernel": 1,
                      **({} if merged else {"_bn_finalize_kernel": 1})}
    (rows,) = written  # one output-size launch for the four rows
    assert [sum(has_scale) for has_scale in rows[0]] == [0, 1, 2, 3]  # the strided-down terms, all folded
    assert not any(scaled and dx for has_scale, need_dx in zip(*rows) for scaled, dx in zip(has_scale, need_dx))


def test_training_step_reads_relu_bits(timm_modules, monkeypatch):
    """In bf16 the step's forward writes the ReLU's bits for the rows whose size is a multiple of 8 (16x16 and
    8x8 here; not 4x4, 2x2) and their backward reads them instead of y: the same outputs, gradients and
    running statistics, bit for bit, as the step reading y everywhere."""
    from test_fuse_tiles import _same_bits

    from hrfast.kernels import fuse as fuse_kernels

    m = timm_modules[4]
    xs = [x.bfloat16() for x in _branch_outputs(m, SIZES)]
    layers = _copy(m.fuse_layers, torch.bfloat16, True)

    def run():
        reads = []
        same = fuse_kernels._fuse_backward_same_kernel
        with monkeypatch.context() as patch:
            patch.setattr(fuse_kernels, "_fuse_backward_same_kernel",
                          _Recording(same, lambda kwargs: reads.append(kwargs["RELU_BITS"])))
            fast = copy.deepcopy(layers)
            return _collect(HRFusion(fast, backend="triton"), fast, xs, grad_seed=5), reads

    with_bits, reads = run()
    assert reads == [(True, True, False, False)]
    monkeypatch.setattr(fuse_kernels, "fuse_forward_rows_with_bits",
                        lambda calls: [(y, None) for y in fuse_kernels.fuse_forward_rows(calls)])
    with_y, reads = run()
    assert reads == [(False, False, False, False)]

    def same_bits(a, b, name):
        assert _same_bits(a, b), name

    _compare(with_bits, with_y, same_bits)


class _Recording:
    """A kernel stand-in that reports each launch's keyword arguments, then launches it."""

    def __init__(self, kernel, report):
        self.kernel, self.report = kernel, report

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.report(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_value_per_channel_raises_like_bn(backend):
    """Training BN on a 1x1 branch with batch 1 raises ValueError in eager code; so does HRFusion."""
    channels = (4, 6, 8)
    fl = _make_fuse_layers(channels, upsample_module=lambda s: nn.Upsample(scale_factor=s), identity=nn.Identity())
    fl = fl.to(DEVICE).train()
    xs = _random_inputs(channels, ((4, 4), (2, 2), (1, 1)), batch=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        _timm_eager(fl, nn.ReLU())(xs)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        HRFusion(fl, backend=backend)(xs)
    fl.eval()  # running statistics: fine with one value
    assert len(HRFusion(fl, backend=backend)(xs)) == 3


# -------------------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bf16_within_twice_pytorch_error(timm_modules, train, backend):
    m = timm_modules[4]
    xs = _branch_outputs(m, SIZES)
    ref_layers = _copy(m.fuse_layers, torch.float64, train)
    low_layers = _copy(m.fuse_layers, torch.bfloat16, train)
    fast_layers = _copy(m.fuse_layers, torch.bfloat16, train)
    xs16 = [x.bfloat16() for x in xs]
    keep = _away_from_kink(m.fuse_layers, xs16, torch.bfloat16, train)
    expected = _collect(_timm_eager(ref_layers, nn.ReLU()), ref_layers, [x.double() for x in xs16], 4, keep)
    pytorch_low = _collect(_timm_eager(low_layers, nn.ReLU()), low_layers, xs16, 4, keep)
    actual = _collect(HRFusion(fast_layers, backend=backend), fast_layers, xs16, 4, keep)
    assert actual["out[0]"].dtype == torch.bfloat16
    _compare(actual, expected, lambda a, e, name: assert_low_precision_close(
        a, e, pytorch_low[name], name, dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_mixed_dtypes(timm_modules, backend):
    """Under autocast the convs give bf16 while the identity term stays fp32: promoted as eager `+` does."""
    m = timm_modules[3]
    xs = [x.float() for x in _branch_outputs(m, SIZES[:3])]
    ref_layers = _copy(m.fuse_layers, torch.float64, True)
    low_layers = _copy(m.fuse_layers, torch.float32, True)
    fast_layers = _copy(m.fuse_layers, torch.float32, True)
    keep = _away_from_kink(m.fuse_layers, xs, torch.bfloat16, True, autocast=True)
    expected = _collect(_timm_eager(ref_layers, nn.ReLU()), ref_layers, [x.double() for x in xs], 5, keep)
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        pytorch_low = _collect(_timm_eager(low_layers, nn.ReLU()), low_layers, xs, 5, keep)
        actual = _collect(HRFusion(fast_layers, backend=backend), fast_layers, xs, 5, keep)
    for i in range(3):
        assert actual[f"out[{i}]"].dtype == pytorch_low[f"out[{i}]"].dtype == torch.float32
    _compare(actual, expected, lambda a, e, name: assert_low_precision_close(
        a, e, pytorch_low[name], name, dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------- validation


def test_constructor_validation(timm_modules):
    fl = copy.deepcopy(timm_modules[3].fuse_layers)
    with pytest.raises(TypeError, match="ModuleList"):
        HRFusion(nn.Sequential(*fl))
    with pytest.raises(TypeError, match=r"fuse_layers\[0\]"):
        HRFusion(nn.ModuleList([nn.Sequential(*fl[0])]))
    with pytest.raises(ValueError, match="empty"):
        HRFusion(nn.ModuleList())
    with pytest.raises(ValueError, match=r"fuse_layers\[1\] has 2 entries"):
        HRFusion(nn.ModuleList([fl[0], nn.ModuleList(list(fl[1])[:2])]))
    bad = copy.deepcopy(fl)
    bad[1][1] = nn.Conv2d(32, 32, 1)
    with pytest.raises(ValueError, match=r"fuse_layers\[1\]\[1\] \(j == i\)"):
        HRFusion(bad)
    bad = copy.deepcopy(fl)
    bad[0][2] = nn.Conv2d(64, 16, 1)
    with pytest.raises(ValueError, match=r"fuse_layers\[0\]\[2\].*nn.Sequential"):
        HRFusion(bad)
    bad = copy.deepcopy(fl)
    bad[2][0] = nn.Sequential()
    with pytest.raises(ValueError, match=r"fuse_layers\[2\]\[0\].*non-empty"):
        HRFusion(bad)
    bad = copy.deepcopy(fl)
    bad[0][1][2] = nn.Upsample(size=(8, 8))
    with pytest.raises(ValueError, match=r"fuse_layers\[0\]\[1\].*size="):
        HRFusion(bad)
    bad = copy.deepcopy(fl)
    bad[0][1][2] = nn.Upsample(scale_factor=2, mode="bicubic")
    with pytest.raises(ValueError, match=r"fuse_layers\[0\]\[1\].*bicubic"):
        HRFusion(bad)
    bad = copy.deepcopy(fl)
    bad[0][1] = nn.Sequential(bad[0][1][2], bad[0][1][0], bad[0][1][1])
    with pytest.raises(ValueError, match="not the last element"):
        HRFusion(bad)
    down = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="2 rows"):
        HRFusion(nn.ModuleList([nn.ModuleList([nn.Identity()]), nn.ModuleList([down])]))
    with pytest.raises(ValueError, match="backend"):
        HRFusion(fl, backend="cuda-magic")
    with pytest.raises(ValueError, match="upsample"):
        HRFusion(fl, upsample="bicubic")
    with pytest.raises(ValueError, match="align_corners"):
        HRFusion(fl, upsample="nearest", align_corners=True)
    with pytest.raises(ValueError, match="align_corners"):
        HRFusion(fl, align_corners=True)
    with pytest.raises(TypeError, match="align_corners"):
        HRFusion(fl, upsample="bilinear", align_corners=1)
    with pytest.raises(TypeError, match="fuse_layers"):
        HRFusion.from_module(nn.Conv2d(1, 1, 1))

    class Single(nn.Module):
        def __init__(self, fuse_layers):
            super().__init__()
            self.fuse_layers = fuse_layers

    for single in (None, nn.Identity()):
        with pytest.raises(ValueError, match="single branch"):
            HRFusion.from_module(Single(single))


def test_forward_validation(timm_modules):
    fusion = HRFusion(copy.deepcopy(timm_modules[3].fuse_layers), backend="reference")
    xs = [x.float() for x in _branch_outputs(timm_modules[3], SIZES[:3])]
    with pytest.raises(ValueError, match=r"xs must hold 3 tensors.*got 2"):
        fusion(xs[:2])
    with pytest.raises(TypeError, match="xs must be a list"):
        fusion(xs[0])
    with pytest.raises(TypeError, match=r"xs\[1\]"):
        fusion([xs[0], None, xs[2]])
    with pytest.raises(ValueError, match=r"xs\[2\]"):
        fusion([xs[0], xs[1], xs[2][0]])
    assert (fusion.num_inputs, fusion.num_outputs) == (3, 3)


def test_extra_repr(timm_modules):
    text = repr(HRFusion(timm_modules[3].fuse_layers, backend="triton"))
    assert "backend='triton'" in text and "upsample=nearest" in text
    text = HRFusion(_make_fuse_layers((4, 6)), upsample="bilinear", align_corners=True).extra_repr()
    assert text == "backend='auto', upsample=bilinear(align_corners=True)"
