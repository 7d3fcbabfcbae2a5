"""hrfast.patch / hrfast.unpatch on timm HRNets and on the official / mm* layouts of tests/hrnet_layouts.py.

What "matches the unpatched model" means here: the same model object (same weights, same buffers, same input,
same random cotangents) is run unpatched and patched, and every output, every parameter gradient and every
buffer (running statistics, num_batches_tracked) is compared.

These whole-model comparisons run in float64, held to FP64_TOL. In float32 they would measure the model rather
than the patch: a random-init timm HRNet's own float32 gradients differ from its float64 gradients by more than
1e-2 (relative) for some parameters on such inputs (e.g. hrnet_w48, train mode, batch 2, 64x64), because
wherever a pre-activation lies within rounding distance of 0 the ReLU mask itself differs between two roundings,
and train-mode batch norm over a few values per channel amplifies rounding. Two float32 runs that round
differently (eager and fused) differ by as much. In float64 both models agree to about 1e-13. Float32 is held to
FP32_RTOL where it is well posed: the eval-mode output of the patched float32 model against the float64
unpatched one. (The fused op itself is checked in float32, float64 and bf16, gradients included, module by
module, in test_fuse_op.py and test_fusion_module.py.)

Conv biases that feed a training-mode batch norm have a gradient that is exactly zero in exact arithmetic (the
norm removes the batch mean); both models give rounding noise there, so those are checked to be at rounding
level instead of being compared with each other.
"""
import copy
import functools
import io
import subprocess
import sys

import hrnet_layouts as layouts
import pytest
import timm
import torch
import torch.nn as nn
from conftest import TRITON_DEVICE

import hrfast
from hrfast._patch import PatchedForward, PatchReport
from hrfast.testing import FP32_RTOL, assert_low_precision_close, assert_rel_close, rel_error

FP64_TOL = 1e-10
# patched fusion modules per timm model; hrnet_w48 (8, the layout and module count of hrnet_w18, only wider) is
# left out: its float64 train + eval comparison was the suite's slowest case after the compile checks (~5% of
# the suite) and adds no structure to hrnet_w18's; wider channels only change the kernels' channel blocks,
# which the op tests cover (test_fuse_op.py, test_fuse_tiles.py)
TIMM_COUNTS = {"hrnet_w18_small": 3, "hrnet_w18_small_v2": 6, "hrnet_w18": 8}
# the upsample mode of these layouts is not visible on the model (F.interpolate in forward, no global)
FORWARD_ARGS = {
    "seg_master": dict(upsample="bilinear", align_corners=False),
    "seg_master_inplace_abn": dict(upsample="bilinear", align_corners=False),
    "face": dict(upsample="bilinear", align_corners=False),
    "openseg": dict(upsample="bilinear", align_corners=True),
}
PATCHED_FAMILIES = ["seg_ocr", "seg_master", "face", "openseg", "pose", "cls", "mmseg", "mmpose", "mmpose_bilinear",
                    "mmseg_groupnorm"]
PLACEMENT_TEXT = {
    "seg_ocr": "align_corners from hrnet_layouts.ALIGN_CORNERS",
    "seg_master": "bilinear(align_corners=False) in forward (from the upsample=/align_corners= arguments)",
    "face": "bilinear(align_corners=False) in forward",
    "openseg": "bilinear(align_corners=True) in forward",
    "pose": "nearest x2^k by Upsample in fuse_layers",
    "cls": "nearest x2^k by Upsample in fuse_layers",
    "mmseg": "then a resize in forward (Upsample is no nn.Upsample",
    "mmpose": "nearest x2^k by Upsample in fuse_layers",
    "mmpose_bilinear": "bilinear(align_corners=False) x2^k by Upsample in fuse_layers",
    "mmseg_groupnorm": "GroupNorm (run as modules)",
}
ODD = (45, 37)  # stem /2 gives 23x19, then 12x10, 6x5, 3x3: no branch is an exact 2^k multiple of the next


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the patched forwards that took the fused path (not a fallback to the original forward)."""
    from hrfast._patch import fusion as adapter_module

    calls = []
    original = adapter_module.fusion_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter_module, "fusion_forward", counting)
    return calls


# ------------------------------------------------------------------------------------------------ helpers


def _as_list(y):
    return list(y) if isinstance(y, (list, tuple)) else [y]


def _run(model: nn.Module, x: torch.Tensor, grad_seed: int) -> dict:
    """Outputs, parameter gradients and buffers after model(x) and a backward of seeded random cotangents."""
    model.zero_grad(set_to_none=True)
    outs = _as_list(model(x))
    gen = torch.Generator().manual_seed(grad_seed)
    gys = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, gys)
    res = {f"out[{i}]": o.detach() for i, o in enumerate(outs)}
    res.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    res.update({f"buffer {n}": b.detach().clone() for n, b in model.named_buffers()})
    return res


def _zero_grad_biases(model: nn.Module) -> dict:
    """{"grad <conv>.bias": "grad <conv>.weight"} for conv biases that feed a training-mode batch norm directly."""
    pairs = {}
    for name, seq in model.named_modules():
        if isinstance(seq, nn.Sequential) and len(seq) >= 2:
            conv, norm = seq[0], seq[1]
            if (isinstance(conv, nn.Conv2d) and conv.bias is not None
                    and isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.training):
                pairs[f"grad {name}.0.bias"] = f"grad {name}.0.weight"
    return pairs


def _compare(actual: dict, expected: dict, rtol: float, zero_grads: dict = None) -> None:
    zero_grads = zero_grads or {}
    assert actual.keys() == expected.keys()
    for name, exp in expected.items():
        act = actual[name]
        assert exp is not None and act is not None, f"{name}: missing gradient"
        assert act.shape == exp.shape and act.dtype == exp.dtype, name
        if not exp.is_floating_point():  # num_batches_tracked
            assert torch.equal(act, exp), f"{name}: {act} != {exp}"
        elif name in zero_grads:  # exactly zero in exact arithmetic: rounding noise in both
            eps = torch.finfo(exp.dtype).eps
            for res in (actual, expected):
                assert res[name].norm() <= 16 * eps * res[zero_grads[name]].norm(), name
        else:
            assert_rel_close(act, exp, rtol, name)


def _patched_modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), PatchedForward)]


def _timm(name: str) -> nn.Module:
    model = timm.create_model(name, pretrained=False)
    layouts.randomize_norms(model)  # non-trivial BN affine maps and running statistics
    return model


def _check_fp32_eval_output(model: nn.Module, state: dict, x: torch.Tensor, expected: dict) -> None:
    """The (patched, eval) model from `state`, run in float32: every output within FP32_RTOL of the float64
    `expected` outputs. Leaves `model` in float64."""
    model.load_state_dict(state)
    model.float()
    with torch.no_grad():
        outs = _as_list(model(x.float()))
    for i, out in enumerate(outs):
        assert out.dtype == torch.float32
        assert_rel_close(out, expected[f"out[{i}]"], FP32_RTOL, f"fp32 out[{i}]")
    model.double()


def _check_same_model(model: nn.Module, x: torch.Tensor, train: bool, patch_kwargs: dict, expected_count: int,
                      grad_seed: int = 0, fp32_eval_output: bool = False) -> PatchReport:
    """`model` (float64) unpatched, then patched, from the same state: every output, parameter gradient and
    buffer equal within FP64_TOL. With `fp32_eval_output` (eval mode only), the patched model is then also run
    in float32 and its output held to FP32_RTOL against the unpatched float64 output. Leaves `model` unpatched,
    in float64, in its initial state."""
    state = copy.deepcopy(model.state_dict())
    model.train(train)
    expected = _run(model, x, grad_seed)
    model.load_state_dict(state)
    report = hrfast.patch(model, **patch_kwargs)
    assert report.count("patched", "fusion") == expected_count, report
    actual = _run(model, x, grad_seed)
    _compare(actual, expected, FP64_TOL, _zero_grad_biases(model))
    if train:  # the running statistics did move (an unchanged buffer would compare equal trivially)
        name = next(n for n in state if n.endswith("running_mean"))
        assert not torch.equal(actual[f"buffer {name}"], state[name])
    if fp32_eval_output:
        assert not train
        _check_fp32_eval_output(model, state, x, expected)
    hrfast.unpatch(model)
    model.load_state_dict(state)
    return report


# ------------------------------------------------------------------------------------- timm acceptance


@pytest.mark.parametrize("name", list(TIMM_COUNTS))
def test_timm_matches_unpatched(name):
    """Reference backend, eval and train: outputs, all parameter gradients and all buffers (running stats and
    num_batches_tracked after the training forward) equal the unpatched model's; float32 eval output too."""
    model = _timm(name).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for train in (False, True):
        report = _check_same_model(model, x, train, dict(backend="reference"), TIMM_COUNTS[name],
                                   fp32_eval_output=not train)
    assert report.count("skipped", "fusion") == 0
    assert all("timm layout" in r.detail and "nearest x2^k" in r.detail for r in report.patched)


def test_timm_report_names_and_table():
    model = _timm("hrnet_w18_small_v2")
    report = hrfast.patch(model)
    assert [r.name for r in report.patched] == ["stage2.0", "stage3.0", "stage3.1", "stage3.2", "stage4.0", "stage4.1"]
    assert all(r.cls == "HighResolutionModule" and r.kind == "fusion" for r in report.patched)
    assert "channels 18/36/72/144" in report.patched[-1].detail and "BatchNorm2d (folded)" in report.patched[-1].detail
    head = [r for r in report.rows if r.kind == "head"]
    assert len(head) == 1 and head[0].status == "skipped" and "no HRNetV2 concat head found" in head[0].detail
    table = str(report)
    assert table.splitlines()[0] == "hrfast.patch: 6 patched, 1 skipped"
    assert "stage3.1" in table and "no HRNetV2 concat head found" in table
    assert repr(report) == "<PatchReport hrfast.patch: 6 patched, 1 skipped>"
    assert len(report) == 7 and report.count("patched") == 6 and report.count("skipped", "head") == 1
    assert not any(r.kind == "head" for r in hrfast.patch(model, head=False))
    with pytest.raises(ValueError, match="status"):
        report.count("done")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_timm_fused_backend(train, backend):
    """The fused kernels on the smallest model and input: Triton (through the interpreter without a GPU) and the
    CUDA C++ kernels (through the host build's grid emulation without a GPU)."""
    model = _timm("hrnet_w18_small").to(device=TRITON_DEVICE, dtype=torch.float64)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, device=TRITON_DEVICE)
    _check_same_model(model, x, train, dict(backend=backend), 3, fp32_eval_output=not train)


def test_training_steps():
    """Three SGD steps in train mode (official seg layout, odd sizes): outputs, gradients, parameters and
    running statistics stay equal after every step, and so does the eval output afterwards."""
    base = layouts.build("seg_ocr").double().train()
    ref, fast = copy.deepcopy(base), copy.deepcopy(base)
    hrfast.patch(fast, backend="reference")
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, fast)]
    for step in range(3):
        x = torch.randn(2, 3, *ODD, dtype=torch.float64)
        expected, actual = _run(ref, x, step), _run(fast, x, step)
        _compare(actual, expected, FP64_TOL)
        for opt in opts:
            opt.step()
        for (n, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
            assert_rel_close(q, p, FP64_TOL, n)
    ref.eval(), fast.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, *ODD, dtype=torch.float64)
        for i, (a, e) in enumerate(zip(fast(x), ref(x))):
            assert_rel_close(a, e, FP64_TOL, f"eval out[{i}] after training")


# ------------------------------------------------------------------------------------- API and lifecycle


def test_patch_twice_then_unpatch():
    model = _timm("hrnet_w18_small").double().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    first = hrfast.patch(model, backend="reference")
    modules = _patched_modules(model)
    with torch.no_grad():
        once = model(x)
    second = hrfast.patch(model, backend="reference")
    assert second.count() == first.count() == 3 and _patched_modules(model) == modules
    assert all(r.detail.endswith("was patched already") for r in second.patched)
    with torch.no_grad():
        assert torch.equal(model(x), once)
    third = hrfast.patch(model, backend="auto")  # new options are applied
    assert all(r.detail.endswith("options updated") for r in third.patched)
    assert all(m.forward.config.backend == "auto" for m in modules)

    restored = hrfast.unpatch(model)
    assert restored.count("unpatched") == 3 and str(restored).startswith("hrfast.unpatch: 3 unpatched")
    assert _patched_modules(model) == [] and all("forward" not in m.__dict__ for m in modules)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # the original code runs again, bit for bit
    assert hrfast.unpatch(model).count("unpatched") == 0  # harmless when nothing is patched


def test_state_dict_and_checkpoints():
    ref = _timm("hrnet_w18_small")
    model = copy.deepcopy(ref)
    hrfast.patch(model)
    expected, actual = ref.state_dict(), model.state_dict()
    assert list(actual) == list(expected)
    for k, v in expected.items():
        assert actual[k].dtype == v.dtype and torch.equal(actual[k], v), k
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]
    # an unpatched checkpoint loads strictly into the patched model, and back
    other = _timm("hrnet_w18_small")
    layouts.randomize_norms(other, seed=5)
    buf = io.BytesIO()
    torch.save(other.state_dict(), buf)
    buf.seek(0)
    model.load_state_dict(torch.load(buf, weights_only=True))
    ref.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert _patched_modules(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_rel_close(model.eval()(x), ref.eval()(x), FP32_RTOL, "after load_state_dict")


def test_deepcopy_and_pickle_stay_patched():
    model = _timm("hrnet_w18_small").double().eval()
    ref = copy.deepcopy(model)
    hrfast.patch(model, backend="reference")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for copied in (clone, loaded):
        patched = _patched_modules(copied)
        assert len(patched) == 3
        for m in patched:  # bound to the copy, not to the original module
            assert m.forward.__self__ is m and m.forward.config.backend == "reference"
        with torch.no_grad():
            assert_rel_close(copied(x), ref(x), FP64_TOL, "copy output")
        # the copy runs on its own weights: changing them changes it, not the original
        with torch.no_grad():
            patched[0].fuse_layers[0][1][1].bias.add_(1.0)
            assert not torch.equal(copied(x), model(x))
        hrfast.unpatch(copied)
        assert len(_patched_modules(model)) == 3


def check_mode_switching(model: nn.Module, x: torch.Tensor) -> None:
    """A patched float64 `model` against an unpatched copy over train/eval switches: equal outputs, and
    running statistics that evolve identically."""
    ref = copy.deepcopy(model)
    hrfast.unpatch(ref)
    for train in (True, False, True, False):
        model.train(train), ref.train(train)
        with torch.no_grad():
            out, expected = model(x), ref(x)
        assert out.dtype == torch.float64
        assert_rel_close(out, expected, FP64_TOL, f"train={train}")
    for (n, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        assert a.dtype == b.dtype and (torch.equal(a, b) if not a.is_floating_point()
                                       else rel_error(a, b) <= FP64_TOL), n


def test_to_dtype_and_mode_switching():
    """Patched before .to(float64) and train()/eval() switches; BN in train mode updates the same statistics."""
    model = _timm("hrnet_w18_small")
    hrfast.patch(model, backend="reference")
    model = model.to(torch.float64)
    check_mode_switching(model, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_autocast_bf16():
    """Under autocast (bf16 convs next to fp32 tensors) the patched model is within twice PyTorch's own error."""
    model = layouts.build("seg_ocr").eval()
    fast = copy.deepcopy(model)
    hrfast.patch(fast, backend="reference")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.double()(x.double())
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, actual = model(x), fast(x)
    for i, (a, e, p) in enumerate(zip(actual, expected, low)):
        assert a.dtype == p.dtype
        assert_low_precision_close(a, e, p, f"out[{i}]", dtype=torch.bfloat16)


def test_forward_keeps_in_place_semantics():
    """The caller's list holds the branch outputs afterwards (x[i] = branches[i](x[i])); the result is a new list
    of fresh tensors that an in-place consumer may overwrite."""
    for module in (_timm("hrnet_w18_small").stage3[0], layouts.fusion_modules(layouts.build("seg_ocr"))[1]):
        module = module.double().eval()
        ref = copy.deepcopy(module)
        hrfast.patch(module, backend="reference")
        chans = [b[0].conv1.in_channels for b in module.branches]
        inputs = [torch.randn(2, c, 16 // 2 ** k, 16 // 2 ** k, dtype=torch.float64) for k, c in enumerate(chans)]
        arg, ref_arg = list(inputs), list(inputs)
        with torch.no_grad():
            out, expected = module(arg), ref(ref_arg)
        assert isinstance(out, list) and out is not arg and len(out) == len(expected) == 3
        for k in range(3):
            assert arg[k] is not inputs[k] and torch.equal(arg[k], ref_arg[k])  # updated like the original
            assert_rel_close(out[k], expected[k], FP64_TOL, f"out[{k}]")
            for t in arg + inputs:
                assert out[k].untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        saved = [t.clone() for t in arg]
        for o in out:
            o.relu_().mul_(0)
        assert all(torch.equal(a, s) for a, s in zip(arg, saved))
        with pytest.raises(TypeError):  # a tuple cannot be updated in place: the original fails the same way
            module(tuple(inputs))


def test_argument_validation():
    model = layouts.build("pose")
    with pytest.raises(TypeError, match="model"):
        hrfast.patch("resnet")
    with pytest.raises(ValueError, match="upsample"):
        hrfast.patch(model, upsample="bicubic")
    with pytest.raises(TypeError, match="upsample"):
        hrfast.patch(model, upsample=True)
    with pytest.raises(TypeError, match="align_corners"):
        hrfast.patch(model, upsample="bilinear", align_corners="yes")
    with pytest.raises(ValueError, match="align_corners"):
        hrfast.patch(model, align_corners=True)
    with pytest.raises(ValueError, match="align_corners"):
        hrfast.patch(model, upsample="nearest", align_corners=False)
    with pytest.raises(ValueError, match="backend"):
        hrfast.patch(model, backend="cuda-magic")
    with pytest.raises(TypeError, match="head"):
        hrfast.patch(model, head="yes")
    with pytest.raises(TypeError, match="model"):
        hrfast.unpatch(None)
    assert _patched_modules(model) == []


def test_foreign_instance_forward_left_alone():
    model = layouts.build("pose")
    target = layouts.fusion_modules(model)[0]
    foreign = functools.partial(type(target).forward, target)
    target.forward = foreign
    report = hrfast.patch(model)
    row = next(r for r in report.rows if r.name == "stage2.0")
    assert row.status == "skipped" and "its own forward" in row.detail
    assert report.count() == 3 and target.forward is foreign
    hrfast.unpatch(model)
    assert target.forward is foreign


def test_import_hrfast_does_not_import_triton():
    code = "import sys, hrfast; hrfast.patch; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------- official and mm* layouts


@pytest.mark.parametrize("family", PATCHED_FAMILIES)
def test_layout_matches_unpatched(family, fused_calls):
    """Each layout of HRNET_LAYOUTS.md, eval and train, exact and (for size-based code) odd sizes: everything
    equal to the unpatched model; float32 eval output within FP32_RTOL."""
    model = layouts.build(family).double()
    kwargs = dict(backend="reference", **FORWARD_ARGS.get(family, {}))
    sizes = [(64, 64)] + ([ODD] if layouts.size_based(family) else [])
    for hw in sizes:
        x = torch.randn(2, 3, *hw, dtype=torch.float64)
        for train in (False, True):
            fused_calls.clear()
            report = _check_same_model(model, x, train, kwargs, 4, fp32_eval_output=not train)
            fallback = family.startswith("mmseg") and hw == ODD
            assert len(fused_calls) == (0 if fallback else 4 if train else 8), (hw, train)
    assert all(PLACEMENT_TEXT[family] in r.detail for r in report.patched), report
    out = model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert len(out) == (1 if family in ("pose", "mmpose") else 4)  # multi_scale_output=False in stage 4


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("family, train", [("seg_ocr", False), ("seg_ocr", True), ("face", True), ("mmseg", True)],
                         ids=["seg_ocr-eval", "seg_ocr-train", "face-train", "mmseg-train"])
def test_layout_fused_backend(family, train, backend, fused_calls):
    """The Triton kernels under the size-based layouts: bilinear with align_corners True (official seg global) and
    False (face) on odd sizes (the general per-pixel path), mmseg on exact sizes. Small inputs: the interpreter is
    slow on bilinear adjoints."""
    model = layouts.build(family).to(device=TRITON_DEVICE, dtype=torch.float64)
    hw = (32, 32) if family == "mmseg" else (21, 19)  # branches 16/8/4/2, or 11x10, 6x5, 3x3, 2x2
    x = torch.randn(1, 3, *hw, dtype=torch.float64, device=TRITON_DEVICE)  # train BN: 4 values per channel at 2x2
    _check_same_model(model, x, train, dict(backend=backend, **FORWARD_ARGS.get(family, {})), 4,
                      fp32_eval_output=not train)
    assert len(fused_calls) == (4 if train else 8)


@pytest.mark.parametrize("name, kwargs, count, hw", [
    ("hrnetv2_w18_small_v1_seg", dict(align_corners=True), 3, (61, 59)),
    ("hrnetv2_w18_small_v1_seg", dict(align_corners=False), 3, (61, 59)),
    ("hrnetv2_w18_face", {}, 8, (61, 59)),
    ("hrnet_w18_small_v1_c", {}, 3, (64, 64)),
], ids=["seg-align_corners", "seg", "face", "cls"])
def test_hrfast_reference_models(name, kwargs, count, hw, fused_calls):
    """hrfast.models (official layouts, keys and forwards; align_corners an attribute of each module): patched
    without arguments, equal to the unpatched model, odd sizes for the size-based ones."""
    from hrfast.models import build_model

    model = build_model(name, **kwargs)
    layouts.randomize_norms(model)
    model = model.double()
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    for train in (False, True):
        fused_calls.clear()
        report = _check_same_model(model, x, train, dict(backend="reference"), count, fp32_eval_output=not train)
        assert len(fused_calls) == count * (1 if train else 2)
    if name.endswith("_c"):
        assert all("nearest x2^k by Upsample in fuse_layers" in r.detail for r in report.patched)
        assert report.count("patched", "head") == 0
    else:
        value = kwargs.get("align_corners", False)
        text = f"align_corners from the module's align_corners attribute (now {value}"
        assert all(text in r.detail for r in report.patched if r.kind == "fusion"), report
        assert report.count("patched", "head") == 1  # the V2 head too (tests/test_patch_head.py)


def test_align_corners_global_is_read_at_every_call(monkeypatch):
    """Official seg: the module global ALIGN_CORNERS (set process-wide by HighResolutionNet.__init__) decides,
    also when it changes after patching, exactly as it changes the original; it wins over the arguments."""
    monkeypatch.setattr(layouts, "ALIGN_CORNERS", True)
    model = layouts.build("seg_ocr").double().eval()
    ref = copy.deepcopy(model)
    report = hrfast.patch(model, backend="reference", upsample="bilinear", align_corners=False)
    assert all("hrnet_layouts.ALIGN_CORNERS (now True" in r.detail for r in report.patched)
    x = torch.randn(2, 3, *ODD, dtype=torch.float64)
    outs = {}
    with torch.no_grad():
        for value in (True, False):
            layouts.set_align_corners(value)
            outs[value] = model(x)
            for a, e in zip(outs[value], ref(x)):
                assert_rel_close(a, e, FP64_TOL, f"ALIGN_CORNERS={value}")
    assert rel_error(outs[True][0], outs[False][0]) > 1e-3  # the setting matters on these sizes


@pytest.mark.parametrize("family", ["seg_master", "face", "openseg"])
def test_forward_side_mode_unknown_raises(family):
    """No upsample module and no ALIGN_CORNERS global: patch names upsample=/align_corners= and patches nothing."""
    model = layouts.build(family)
    with pytest.raises(ValueError, match=r"(?s)stage2\.0.*upsample='bilinear' and align_corners=True/False"):
        hrfast.patch(model)
    assert _patched_modules(model) == []
    assert hrfast.patch(model, **FORWARD_ARGS[family]).count() == 4
    again = hrfast.patch(model)  # patching again without the arguments keeps the mode they gave
    assert again.count() == 4
    assert all("from the arguments of an earlier hrfast.patch" in r.detail for r in again.patched)
    assert {m.forward.config.resample for m in _patched_modules(model)} == {
        hrfast.Resample("bilinear", FORWARD_ARGS[family]["align_corners"])}


@pytest.mark.parametrize("family, reason", [
    ("hrformer", "HRFormer module"),
    ("lite", "Lite-HRNet module"),
    ("seg_master_inplace_abn", "InPlaceABNSync, a norm hrfast does not know"),
])
def test_different_fusions_are_left_alone(family, reason):
    model = layouts.build(family).eval()
    ref = copy.deepcopy(model)
    report = hrfast.patch(model, **FORWARD_ARGS.get(family, {}))
    expected_rows = 1 if family == "lite" else 4
    assert report.count("patched") == 0 and report.count("skipped", "fusion") == expected_rows
    assert all(reason in r.detail for r in report.skipped if r.kind == "fusion"), report
    assert _patched_modules(model) == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), ref(x)))


def test_subclass_that_overrides_the_fusion_is_left_alone():
    base = type(layouts.fusion_modules(layouts.build("pose"))[0])

    class MyHRModule(base):
        def forward(self, x):
            return super().forward(x)

    class Renamed(base):  # overrides nothing: still the HRNet fusion
        pass

    model = layouts.TinyHRNet(lambda nb, ch, ms: (MyHRModule if nb == 4 else Renamed)(
        nb, layouts.BasicBlock, [1] * nb, list(ch), list(ch), "SUM", ms), 4, True)
    report = hrfast.patch(model)
    assert [r.cls for r in report.patched] == ["Renamed", "Renamed"]
    skipped = [r for r in report.skipped if r.kind == "fusion"]
    assert len(skipped) == 2 and all("MyHRModule subclasses HighResolutionModule and overrides forward" in r.detail
                                     for r in skipped)


def test_single_branch_and_inconsistent_modules_are_reported():
    model = layouts.build("cls")
    single = type(model.stage2[0])(1, layouts.BasicBlock, [1], [4], [4], "SUM")
    assert single.fuse_layers is None
    broken = copy.deepcopy(model.stage3[0])
    broken.multi_scale_output = False  # says one output row, has three
    holder = nn.ModuleDict({"single": single, "broken": broken})
    rows = {r.name: r for r in hrfast.patch(holder, head=False)}
    assert rows["single"].status == "skipped" and "single branch" in rows["single"].detail
    assert rows["broken"].status == "skipped" and "multi_scale_output=False" in rows["broken"].detail
