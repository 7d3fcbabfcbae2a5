"""hrfast under torch.compile and torch.library: the custom ops, fullgraph compiles and autocast.

- `torch.library.opcheck` on every custom op (`hrfast::fuse_forward`, `fuse_backward`, `head_forward`,
  `head_backward`): schema, autograd registration, fake (meta) implementation against the real outputs'
  shapes, strides and dtypes, and AOT dispatch with dynamic shapes.
- `torch.compile(fullgraph=True)` of HRFusion, HRNetV2Head and a patched timm hrnet_w18_small with the Triton
  backend: one graph holding the custom ops (a graph break fails the compile), and outputs, every input and
  parameter gradient and every buffer equal to eager hrfast. Without a GPU the kernels run through the Triton
  interpreter on CPU tensors; the compile backend is "aot_eager" (Dynamo + AOTAutograd with the fake
  implementations, kernels run as in eager), "inductor" too for the two modules.
- Autocast: HRFusion and HRNetV2Head (eager and compiled) under `torch.autocast(DEVICE, bfloat16)` against the
  original eager modules under the same autocast, within twice PyTorch's own error against float64.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TRITON_DEVICE
from test_fusion_module import _timm_eager
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.registry import lookup_backend
from torch._functorch.aot_autograd import make_boxed_func

import hrfast
from hrfast.nn import HRFusion, HRNetV2Head
from hrfast.ops import Resample
from hrfast.plan import FusePlan, HeadPlan, term_plan
from hrfast.testing import FP32_RTOL, assert_low_precision_close, assert_rel_close

DEVICE = TRITON_DEVICE
OPS = torch.ops.hrfast
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
QUICK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every compile starts from an empty Dynamo cache (no recompile limit carried over between tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ opcheck


def _term(r, in_hw, size, has_scale=False, has_shift=False):
    return term_plan(Resample(r) if isinstance(r, str) else r, in_hw, size, has_scale, has_shift)


def _fuse_case(dtype, channels_last, requires_grad=True, backend="triton"):
    """Four terms at output 5x6: same size without parameters, nearest x2 with a scale, bilinear
    (align_corners=True) with scale and shift, bilinear (align_corners=False) with a shift only."""
    size, C = (5, 6), 3
    hws = [(5, 6), (3, 3), (2, 4), (3, 2)]
    resamples = [None, "nearest", Resample("bilinear", align_corners=True), Resample("bilinear", align_corners=False)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(2, C, *hw, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt) for hw in hws]
    has_scale, has_shift = [False, True, True, False], [False, False, True, True]
    scales = [torch.rand(C, dtype=dtype, device=DEVICE) + 0.5 for _ in range(sum(has_scale))]
    shifts = [torch.randn(C, dtype=dtype, device=DEVICE) for _ in range(sum(has_shift))]
    for t in (*xs, *scales, *shifts):
        t.requires_grad_(requires_grad)
    terms = tuple(_term(r, hw, size, s, b) for r, hw, s, b in zip(resamples, hws, has_scale, has_shift))
    return (FusePlan(terms, size, True, channels_last).encode(), xs, scales, shifts, backend)


@pytest.mark.parametrize("dtype, channels_last, utils", [
    (torch.float64, False, ALL_UTILS),
    (torch.float32, True, QUICK_UTILS),
], ids=["fp64-nchw-all", "fp32-channels_last"])
@pytest.mark.parametrize("fused", ["triton", "cuda_cpp"])
def test_opcheck_fuse(dtype, channels_last, utils, fused):
    """Also for the CUDA launchers (host path on CPU): the fake implementations encode how the launchers
    allocate outputs and gradients, and both backends must follow them."""
    args = _fuse_case(dtype, channels_last, backend=fused)
    torch.library.opcheck(OPS.fuse_forward.default, args, test_utils=utils)
    plan, xs, scales, shifts, backend = _fuse_case(dtype, channels_last, requires_grad=False, backend=fused)
    y = OPS.fuse_forward(plan, xs, scales, shifts, backend)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad_y = torch.randn_like(y)
    # x kept for the terms whose scale needs a gradient (1, 2), the others known by shape; some grads not needed
    x_kept = [False, True, True, False]
    shapes = [d for x in xs for d in x.shape]
    needs = [True, False, False, True, True, False, False, True, True, True, False, True]
    bwd = (plan, grad_y, y, [xs[1], xs[2]], x_kept, shapes, scales, shifts, needs, backend)
    torch.library.opcheck(OPS.fuse_backward.default, bwd, test_utils=utils)
    assert len(OPS.fuse_backward(*bwd)) == sum(needs)


def _head_case(dtype, batch_stats, requires_grad=True):
    """x0 [2, 3, 6, 5], M=6 head channels, K=4 classes; a bilinear low branch 3x3 and a nearest one 3x5."""
    M, K, size = 6, 4, (6, 5)
    x0 = torch.randn(2, 3, *size, dtype=dtype, device=DEVICE)
    w0 = torch.randn(M, 3, dtype=dtype, device=DEVICE)
    lows = [torch.randn(2, M, 3, 3, dtype=dtype, device=DEVICE), torch.randn(2, M, 3, 5, dtype=dtype, device=DEVICE)]
    lows_plan = (_term("bilinear", (3, 3), size), _term("nearest", (3, 5), size))
    wc = torch.randn(K, M, dtype=dtype, device=DEVICE)
    bc = torch.randn(K, dtype=dtype, device=DEVICE)
    a = torch.rand(M, dtype=dtype, device=DEVICE) + 0.5
    b = torch.randn(M, dtype=dtype, device=DEVICE)
    conv_bias = torch.randn(M, dtype=dtype, device=DEVICE) if batch_stats else None
    for t in (x0, w0, *lows, wc, bc, a, b, conv_bias):
        if t is not None:
            t.requires_grad_(requires_grad)
    return (HeadPlan(lows_plan, batch_stats).encode(), x0, w0, a, b, wc, bc, conv_bias, lows, 1e-5, "triton")


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch_stats", "folded"])
def test_opcheck_head(batch_stats):
    utils = ALL_UTILS if batch_stats else QUICK_UTILS
    torch.library.opcheck(OPS.head_forward.default, _head_case(torch.float64, batch_stats), test_utils=utils)
    plan, x0, w0, a, b, wc, bc, conv_bias, lows, eps, backend = _head_case(
        torch.float32, batch_stats, requires_grad=False)
    x0 = x0.contiguous(memory_format=torch.channels_last)  # logits and ds follow x0's layout
    logits, mean, var = OPS.head_forward(plan, x0, w0, a, b, wc, bc, conv_bias, lows, eps, backend)
    assert logits.is_contiguous(memory_format=torch.channels_last)
    assert mean.shape == var.shape == ((w0.shape[0],) if batch_stats else (0,))
    for needs in ([True] * 9, [False, True, True, False, True, False, batch_stats, True, False]):
        bwd = (plan, torch.randn_like(logits), x0, w0, a, b, wc, bc, lows, mean, var, eps, needs, backend)
        torch.library.opcheck(OPS.head_backward.default, bwd, test_utils=QUICK_UTILS)
        assert len(OPS.head_backward(*bwd)) == sum(needs)


# ------------------------------------------------------------------------------------------- fullgraph compile


def _compiled(module, backend):
    """torch.compile(fullgraph=True) with a recording backend: returns (compiled, graphs) where graphs has the
    Dynamo graphs ("dynamo") and, for aot_eager, AOTAutograd's forward and backward graphs ("fw", "bw")."""
    graphs = {"dynamo": [], "fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    inner = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")) if backend == "aot_eager" \
        else lookup_backend(backend)

    def record(gm, example_inputs):
        graphs["dynamo"].append(gm)
        return inner(gm, example_inputs)

    return torch.compile(module, fullgraph=True, backend=record), graphs


def _calls(graphs, op) -> int:
    return sum(node.target is op for gm in graphs for node in gm.graph.nodes)


def _run(forward, module, xs, seed):
    """Outputs, gradients of the inputs and of every parameter, and the buffers after one forward/backward."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    outs = forward(leaves)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    torch.autograd.backward(outs, cotangents)
    res = {f"out[{i}]": o.detach() for i, o in enumerate(outs)}
    res.update({f"grad xs[{j}]": x.grad for j, x in enumerate(leaves)})
    res.update({f"grad {n}": p.grad for n, p in module.named_parameters()})
    res.update({f"buffer {n}": b.detach().clone() for n, b in module.named_buffers()})
    return res


def _biases_before_batch_stats(model: nn.Module) -> list:
    """Names of conv biases followed by a batch norm in training: their gradient is 0 in exact arithmetic (the
    batch mean removes the bias), so computed values are rounding noise, compared against the weight's scale."""
    names = []
    for prefix, seq in model.named_modules():
        if isinstance(seq, nn.Sequential):
            children = list(seq.named_children())
            for (name, conv), (_, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and conv.bias is not None and isinstance(bn, nn.BatchNorm2d) \
                        and bn.training:
                    names.append(f"{prefix}.{name}" if prefix else name)
    return names


def _assert_same(actual: dict, expected: dict, rtol: float, noise_biases=()) -> None:
    assert actual.keys() == expected.keys()
    for name, exp in expected.items():
        act = actual[name]
        assert act is not None and exp is not None, f"{name}: missing gradient"
        assert act.dtype == exp.dtype and act.shape == exp.shape, name
        module = name[len("grad "):-len(".bias")] if name.startswith("grad ") and name.endswith(".bias") else None
        if module in noise_biases:  # ~0: bounded by rtol x the norm of the conv weight's gradient
            scale = expected[f"grad {module}.weight"].double().norm().item()
            err = (act.double() - exp.double()).norm().item()
            assert scale > 0 and err <= rtol * scale, f"{name}: {err:.3e} exceeds {rtol:.1e} x {scale:.3e}"
        elif exp.is_floating_point():
            assert_rel_close(act, exp, rtol, name)
        else:
            assert torch.equal(act, exp), name


def _randomize_norms(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)


@pytest.fixture(scope="module")
def timm_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("hrnet_w18_small", pretrained=False)
    _randomize_norms(model)
    return model


def _fusion_module(timm_model):
    """timm's 3-branch HighResolutionModule (stage3): nearest nn.Upsample inside fuse_layers, strided convs."""
    return next(m for m in timm_model.modules()
                if isinstance(getattr(m, "fuse_layers", None), nn.ModuleList) and len(m.fuse_layers) == 3)


def _branch_inputs(hr_module, sizes, dtype=torch.float32, batch=2):
    chans = [next(m for m in b.modules() if isinstance(m, nn.Conv2d)).in_channels for b in hr_module.branches]
    return [torch.randn(batch, c, *hw, dtype=dtype, device=DEVICE) for c, hw in zip(chans, sizes)]


FUSION_SIZES = ((8, 8), (4, 4), (2, 2))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_hrfusion(timm_model, train, backend):
    hr = _fusion_module(timm_model)
    base = copy.deepcopy(hr.fuse_layers).to(DEVICE).train(train)
    xs = _branch_inputs(hr, FUSION_SIZES)
    eager = HRFusion(copy.deepcopy(base), backend="triton")
    fused = HRFusion(copy.deepcopy(base), backend="triton")
    compiled, graphs = _compiled(fused, backend)
    expected = _run(eager, eager.fuse_layers, xs, seed=1)
    actual = _run(compiled, fused.fuse_layers, xs, seed=1)
    assert len(graphs["dynamo"]) == 1
    assert _calls(graphs["dynamo"], OPS.fuse_forward.default) == 3  # one per output branch
    if backend == "aot_eager":
        assert _calls(graphs["bw"], OPS.fuse_backward.default) == 3
    _assert_same(actual, expected, FP32_RTOL)


def _seq_head(channels, classes, seed=0):
    """Sequential(conv1x1, BN, ReLU, conv1x1): the official segmentation `last_layer`."""
    width = sum(channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seq = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU(),
                            nn.Conv2d(width, classes, 1))
    _randomize_norms(seq, seed)
    return seq.to(DEVICE)


HEAD_CHANNELS, HEAD_SIZES = (4, 6, 8), ((6, 5), (3, 3), (2, 2))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_head(train, backend):
    seq = _seq_head(HEAD_CHANNELS, 3).train(train)
    xs = [torch.randn(2, c, *hw, device=DEVICE) for c, hw in zip(HEAD_CHANNELS, HEAD_SIZES)]
    eager = HRNetV2Head(copy.deepcopy(seq), "sequential", backend="triton")
    fused = HRNetV2Head(copy.deepcopy(seq), "sequential", backend="triton")
    compiled, graphs = _compiled(fused, backend)
    expected = _run(eager, eager, xs, seed=2)
    actual = _run(compiled, fused, xs, seed=2)
    assert len(graphs["dynamo"]) == 1
    assert _calls(graphs["dynamo"], OPS.head_forward.default) == 1
    if backend == "aot_eager":
        assert _calls(graphs["bw"], OPS.head_backward.default) == 1
    _assert_same(actual, expected, FP32_RTOL)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_patched_timm_model(timm_model, train):
    """The whole patched classifier (stem, branches, the three fused HR modules, head) in one graph."""
    model = copy.deepcopy(timm_model).to(DEVICE).train(train)
    report = hrfast.patch(model, backend="triton")
    assert len(report.patched) == 3
    eager = copy.deepcopy(model)  # patched too: the reference is eager hrfast
    compiled, graphs = _compiled(model, "aot_eager")
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    expected = _run(lambda xs: eager(xs[0]), eager, [x], seed=3)
    actual = _run(lambda xs: compiled(xs[0]), model, [x], seed=3)
    assert len(graphs["dynamo"]) == 1
    fused_rows = sum(len(m.fuse_layers) for m in model.modules() if isinstance(getattr(m, "fuse_layers", None),
                                                                                nn.ModuleList))
    assert _calls(graphs["dynamo"], OPS.fuse_forward.default) == fused_rows
    assert _calls(graphs["bw"], OPS.fuse_backward.default) == fused_rows
    # eager runs the training BN folds on the kernels, the compiled graph their PyTorch twin: equal up to rounding
    noise = _biases_before_batch_stats(model) if train else []
    assert not train or noise  # timm's classifier: conv (bias) -> BN in downsamp_modules and final_layer
    _assert_same(actual, expected, FP32_RTOL, noise)


# ------------------------------------------------------------------------------------------------- autocast


def _low_precision_check(actual: dict, expected: dict, pytorch_low: dict) -> None:
    assert actual.keys() == expected.keys() == pytorch_low.keys()
    for name, exp in expected.items():
        act = actual[name]
        assert act is not None, f"{name}: missing gradient"
        assert act.dtype == pytorch_low[name].dtype and act.shape == exp.shape, name
        if exp.is_floating_point():
            assert_low_precision_close(act, exp, pytorch_low[name], name, dtype=torch.bfloat16)
        else:
            assert torch.equal(act, exp), name


def _masked(forward, keep):
    """forward with its outputs multiplied by 0/1 masks: cotangents vanish where the ReLU decision is within
    rounding of the kink (there a flipped mask element, in either implementation, dominates the gradients)."""
    def run(xs):
        return [o * k.to(o.dtype) for o, k in zip(forward(xs), keep)]
    return run


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_autocast_hrfusion(timm_model, compiled):
    """Under autocast(bf16) the convs give bf16 next to fp32 identity terms; HRFusion matches the original
    module under the same autocast (fp32 outputs, as eager `+` promotes) within twice its error vs float64."""
    hr = _fusion_module(timm_model)
    base = copy.deepcopy(hr.fuse_layers).to(DEVICE).train(True)
    xs = _branch_inputs(hr, FUSION_SIZES)
    ref, low = copy.deepcopy(base).double(), copy.deepcopy(base)
    with torch.no_grad():
        pre64 = _timm_eager(copy.deepcopy(ref), nn.Identity())([x.double() for x in xs])
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            pre_low = _timm_eager(copy.deepcopy(low), nn.Identity())(xs)
    keep = [p.abs() > 4 * (q.double() - p).abs().max() for p, q in zip(pre64, pre_low)]
    expected = _run(_masked(_timm_eager(ref, nn.ReLU()), keep), ref, [x.double() for x in xs], seed=4)
    fast = HRFusion(copy.deepcopy(base), backend="triton")
    forward = _compiled(fast, "aot_eager")[0] if compiled else fast
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        pytorch_low = _run(_masked(_timm_eager(low, nn.ReLU()), keep), low, xs, seed=4)
        actual = _run(_masked(forward, keep), fast.fuse_layers, xs, seed=4)
    assert all(actual[f"out[{i}]"].dtype == torch.float32 for i in range(3))
    _low_precision_check(actual, expected, pytorch_low)


def _eager_head(seq, act=None):
    """The official segmentation head: concat of x0 and the bilinearly upsampled branches, then the layers."""
    def run(xs):
        h, w = xs[0].shape[2:]
        ups = [xs[0]] + [F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False) for x in xs[1:]]
        hidden = seq[1](seq[0](torch.cat(ups, 1)))
        return [hidden] if act is None else [seq[3](act(hidden))]
    return run


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_autocast_head(train, compiled):
    """Under autocast(bf16) the fused head casts the branches as autocast casts the eager head's convs: bf16
    logits within twice PyTorch's own autocast error (logits and every gradient) against float64."""
    seq = _seq_head(HEAD_CHANNELS, 3).train(train)
    xs = [torch.randn(2, c, *hw, device=DEVICE) for c, hw in zip(HEAD_CHANNELS, HEAD_SIZES)]
    ref, low = copy.deepcopy(seq).double(), copy.deepcopy(seq)
    with torch.no_grad():
        pre64 = _eager_head(copy.deepcopy(ref))([x.double() for x in xs])[0]
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            pre_low = _eager_head(copy.deepcopy(low))(xs)[0]
    band = 4 * (pre_low.double() - pre64).abs().amax(dim=(0, 2, 3), keepdim=True)
    keep = [(pre64.abs() > band).all(dim=1, keepdim=True)]
    assert keep[0].double().mean() >= 0.25
    expected = _run(_masked(_eager_head(ref, nn.ReLU()), keep), ref, [x.double() for x in xs], seed=5)
    fast = HRNetV2Head(copy.deepcopy(seq), "sequential", backend="triton")
    forward = _compiled(fast, "aot_eager")[0] if compiled else fast
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        pytorch_low = _run(_masked(_eager_head(low, nn.ReLU()), keep), low, xs, seed=5)
        actual = _run(_masked(lambda v: [forward(v)], keep), fast, xs, seed=5)
    assert actual["out[0]"].dtype == torch.bfloat16
    if train:
        # the conv bias only shifts BN's batch mean: its gradient is zero in exact arithmetic, and the fused
        # op returns exactly zero where eager autocast returns rounding noise; no relative error applies
        assert torch.equal(actual.pop("grad 0.bias"), torch.zeros_like(expected.pop("grad 0.bias")))
        pytorch_low.pop("grad 0.bias")
    _low_precision_check(actual, expected, pytorch_low)


def test_compile_caches_are_keyed_on_the_op_sources(tmp_path):
    """A graph compiled against an older hrfast must not be served from inductor's caches: importing hrfast adds
    a digest of its op sources to torch.compile's cache key, and any edit changes the digest."""
    from hrfast.ops import custom_ops

    assert custom_ops.source_tag() in torch.compiler.config.cache_key_tag.split(";")
    files = custom_ops._op_source_files()
    assert {f.name for f in files} >= {"custom_ops.py", "fuse.py", "head.py", "plan.py"}
    assert any(f.parent.name == "kernels" for f in files)
    copies = []
    for i, f in enumerate(files):
        copies.append(tmp_path / f"{i}_{f.name}")
        copies[-1].write_bytes(f.read_bytes())
    before = custom_ops.source_tag(copies)
    assert custom_ops.source_tag(copies) == before  # deterministic
    copies[-1].write_bytes(copies[-1].read_bytes() + b"\n# edited\n")
    assert custom_ops.source_tag(copies) != before
