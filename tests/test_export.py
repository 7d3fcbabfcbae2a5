"""A patched model under the tools that trace it: torch.jit.trace, torch.export.export, torch.onnx.export and
torch.compile on changing input sizes; and torch.jit.script, which refuses at once.

Models: a tiny HRNetV2 segmentation network (`hrfast.models`' official layout: bilinear resizing in forward and
the fused head) and the pose layout of tests/hrnet_layouts.py (nearest nn.Upsample inside fuse_layers), each
patched with the PyTorch reference ("auto" on CPU) or the Triton kernels (through the interpreter without a GPU).
Every traced or exported program is run and compared with the unpatched model in eager mode. Compiles use the
"eager" / "aot_eager" backends: Dynamo and AOTAutograd trace what inductor would see, in seconds.

Sizes: multiples of 16 (the pose layout upsamples by exact factors), the tiny models' lowest branch (1/32 of the
input) above one pixel, and between 10,240 and 20,480 pixels: PyTorch's own convolution guards on the fake tensors
(fake_impls: ``C * H * W <= 20480`` per conv input) then answer alike for every size of both models. The second
size changes both height and width (Dynamo's automatic dynamic shapes make a dimension dynamic when it first
changes). Otherwise the *unpatched* model recompiles more often too, for reasons of PyTorch's.
"""
import io

import hrnet_layouts as layouts
import pytest
import torch
import torch._dynamo.testing
from conftest import TRITON_DEVICE
from torch.export import Dim

import hrfast
from hrfast.models import seg_hrnet
from hrfast.testing import FP32_RTOL, assert_rel_close

DEVICE = TRITON_DEVICE
SIZES = [(128, 96), (112, 144), (144, 112)]  # see the module docstring


def _stage(branches, block, blocks, channels):
    return {"NUM_MODULES": 1, "NUM_BRANCHES": branches, "BLOCK": block, "NUM_BLOCKS": blocks,
            "NUM_CHANNELS": channels, "FUSE_METHOD": "SUM"}


TINY = {"STAGE1": _stage(1, "BOTTLENECK", [1], [8]), "STAGE2": _stage(2, "BASIC", [1, 1], [4, 8]),
        "STAGE3": _stage(3, "BASIC", [1, 1, 1], [4, 8, 16]), "STAGE4": _stage(4, "BASIC", [1] * 4, [4, 8, 16, 32])}


def tiny_seg() -> torch.nn.Module:
    """HRNetV2 segmentation with one block per branch and 4/8/16/32 channels, 3 classes, eval mode."""
    torch.manual_seed(0)
    model = seg_hrnet.HighResolutionNet(TINY, num_classes=3).eval()
    layouts.randomize_norms(model)
    return model.to(DEVICE)


def tiny_pose() -> torch.nn.Module:
    return layouts.build("pose").eval().to(DEVICE)


def _input(hw, seed=1):
    return torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _eager(model, xs):
    """The unpatched model's outputs on each input (flattened to a list of tensors)."""
    with torch.no_grad():
        return [_flat(model(x)) for x in xs]


def _flat(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _close(got, expected, backend):
    for k, (g, e) in enumerate(zip(_flat(got), expected)):
        if backend == "reference":
            assert torch.equal(g, e), k
        else:
            assert_rel_close(g, e, FP32_RTOL, f"output {k}")


def _patched(model, backend):
    """model patched with `backend` ("reference" or "triton"); the report must patch something."""
    assert hrfast.patch(model, backend=backend).count("patched") > 0
    return model


BUILDS = {"seg": tiny_seg, "pose": tiny_pose}


# ------------------------------------------------------------------------------------------- torch.jit.trace


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", ["seg", "pose"])
def test_jit_trace(name, backend):
    """Before: TypeError "size must be a pair of ints (H, W), got (tensor(16), tensor(32))". The trace holds the
    fused op (Triton) or the reference's ATen ops, and gives eager's outputs."""
    model = BUILDS[name]()
    x = _input(SIZES[0])
    [expected] = _eager(model, [x])
    _patched(model, backend)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        _close(traced(x), expected, backend)
    assert ("hrfast::fuse_forward" in str(traced.inlined_graph)) == (backend == "triton")


# ------------------------------------------------------------------------------------------- torch.export


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_export_with_dynamic_sizes(backend):
    """Before: AttributeError "'PatchedForward' object has no attribute '__code__'". Non-strict export with
    dynamic height and width: one program for every size (the plans carry symbolic sizes), eager's outputs on
    sizes it was not traced with, multiples of nothing included."""
    model = tiny_seg()
    sizes = [SIZES[0], (48, 80), (37, 45)]  # any size >= 33
    expected = _eager(model, [_input(hw) for hw in sizes])
    _patched(model, backend)
    dims = {2: Dim("h", min=33, max=1024), 3: Dim("w", min=33, max=1024)}
    program = torch.export.export(model, (_input(sizes[0]),), strict=False, dynamic_shapes=(dims,))
    assert any("hrfast" in str(n.target) for n in program.graph.nodes) == (backend == "triton")
    run = program.module()
    with torch.no_grad():
        for hw, e in zip(sizes, expected):
            _close(run(_input(hw)), e, backend)


def test_export_strict_pose():
    """Strict export (Dynamo) of the nearest-upsample layout."""
    model = tiny_pose()
    x = _input(SIZES[0])
    [expected] = _eager(model, [x])
    program = torch.export.export(_patched(model, "reference"), (x,), strict=True)
    with torch.no_grad():
        _close(program.module()(x), expected, "reference")


# --------------------------------------------------------------------------------------- torch.onnx, script


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
def test_onnx_export_records_the_eager_computation(dynamo):
    """Before: the TorchScript exporter failed in jit.trace (above), the dynamo exporter in torch.export. While
    torch.onnx.export traces, every backend means the reference, so the ONNX graph holds standard operators
    only, even for a model patched with the Triton backend; onnx's reference evaluator gives eager's logits."""
    onnx = pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    model = tiny_seg().cpu()
    x = _input(SIZES[0]).cpu()
    [expected] = _eager(model, [x])
    _patched(model, "triton")
    if dynamo:
        proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    else:
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False)
        proto = onnx.load_from_string(buffer.getvalue())
    assert {node.domain for node in proto.graph.node} == {""}  # the standard domain: no hrfast op
    [logits] = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    assert_rel_close(torch.from_numpy(logits), expected[0], FP32_RTOL, "logits")


def test_script_refuses_at_once():
    """Before: AttributeError "'PatchedForward' object has no attribute '__globals__'" from deep inside the
    TorchScript compiler. Now a RuntimeError before anything is compiled, saying to unpatch first; unpatching
    removes the refusal along with the forwards."""
    model = _patched(tiny_seg(), "reference")
    with pytest.raises(RuntimeError, match=r"call hrfast.unpatch\(model\) before torch.jit.script"):
        torch.jit.script(model)
    hrfast.unpatch(model)
    assert not any("__prepare_scriptable__" in vars(m) for m in model.modules())


# ----------------------------------------------------------------------------------------------- torch.compile


def _compile_sizes(model, backend, dynamic):
    """Compiles `model` (fullgraph: a graph break fails) and runs it on SIZES; returns (outputs, compiled
    frames after each call)."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=dynamic)
    outputs, frames = [], []
    with torch.no_grad():
        for hw in SIZES:
            outputs.append(compiled(_input(hw)))
            frames.append(counter.frame_count)
    torch._dynamo.reset()
    return outputs, frames


@pytest.mark.parametrize("name, backend, dynamic, compiler", [
    ("pose", "reference", None, "eager"),
    ("seg", "triton", True, "aot_eager"),
], ids=["pose-reference", "seg-triton-dynamic"])
def test_compile_on_new_sizes(name, backend, dynamic, compiler):
    """Before: the second input size failed with "Unsupported: torch.* op returned non-Tensor" (a gcd on a
    symbolic size), and without fullgraph every new size recompiled until Dynamo's limit, then ran eagerly.
    Now: no graph break on any size, one recompile at the second size (Dynamo's automatic dynamic shapes) and
    none after it; with dynamic=True none at all after the first call."""
    model = BUILDS[name]()
    expected = _eager(model, [_input(hw) for hw in SIZES])
    outputs, frames = _compile_sizes(_patched(model, backend), compiler, dynamic)
    for got, e in zip(outputs, expected):
        _close(got, e, backend)
    settled = 0 if dynamic else 1  # the call after which no size compiles again
    assert frames[settled:] == [frames[settled]] * (len(SIZES) - settled), frames
    assert frames[settled] <= (settled + 1) * 2, frames  # a compile may restart once (Dynamo's float handling)
