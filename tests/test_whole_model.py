"""hrfast.perf.whole_model: the whole-model GPU prediction's recording and costing (no compiler run here: the fused
op calls' figures come from `hrfast.perf.inspect.analyse`, tested in test_perf.py; here it is replaced by a fixed
answer where the plumbing is checked)."""
import pytest
import torch
import torch.nn.functional as F

from hrfast.perf import inspect as perf_inspect
from hrfast.perf import whole_model as wm
from hrfast.perf.arch import LAUNCH_SECONDS, get_arch
from hrfast.perf.eager import op_seconds

TINY = wm.Config("hrnetv2_w18_small_v1_seg", (64, 128), 1, "bf16")
H100 = get_arch("sm_90")


def _record(fn):
    with wm.WholeModelRecorder() as rec:
        fn()
    return rec.ops


def test_in_place_ops_read_and_write_their_target():
    x = torch.empty(4, 8, 16, 16, device="meta")
    nbytes = x.numel() * x.element_size()
    out_of_place, in_place = _record(lambda: F.relu(x))[0], _record(lambda: x.relu_())[0]
    assert out_of_place.aten.bytes == 2 * nbytes  # read x, write a new tensor
    assert in_place.aten.bytes == 2 * nbytes  # read x, write x
    assert _record(lambda: x.add_(x.clone()))[-1].aten.bytes == 3 * nbytes


def test_conv_epilogues_are_marked_and_merged():
    x, w = torch.empty(1, 8, 16, 16, device="meta"), torch.empty(8, 8, 3, 3, device="meta")
    residual = torch.empty(1, 8, 16, 16, device="meta")

    def block():
        out = F.conv2d(x, w, padding=1)
        out.add_(residual).relu_()
        y = residual.relu_()  # not on the conv's output: no epilogue
        return out, y

    ops = _record(block)
    assert [o.aten.name for o in ops] == ["convolution", "add_", "relu_", "relu_"]
    assert [o.epilogue_of for o in ops] == [None, 0, 0, None]
    nbytes = residual.numel() * residual.element_size()
    assert ops[1].extra_bytes == nbytes and ops[2].extra_bytes == 0
    merged = wm.merge_epilogues(ops)
    assert [o.name for o in merged] == ["convolution+add_+relu_", "relu_"]
    assert merged[0].bytes == ops[0].aten.bytes + nbytes and merged[0].flops == ops[0].aten.flops


def test_recorded_models():
    """eager: one batch norm op per BN module; hrfast's inference mode: none left outside its fused op calls, and
    fewer launches."""
    from hrfast.models import build_model

    with torch.device("meta"):
        bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in build_model(TINY.model).modules())
    eager = wm.cost(H100, [o.aten for o in wm.record_eager(TINY)])
    assert eager["batch norm"]["launches"] == bns
    ops, attribution = wm.record_hrfast(TINY, H100)
    hrfast = wm.cost(H100, [o.aten for o in ops])
    assert "batch norm" not in hrfast and "upsample" not in hrfast and "cat" not in hrfast
    assert hrfast["conv"]["launches"] == eager["conv"]["launches"] - 2  # the head's two convs are in its kernel
    assert {c.kind for c in attribution.calls} == {"fuse", "head"}
    assert sum(r["seconds"] for r in hrfast.values()) < sum(r["seconds"] for r in eager.values())


def test_predict_whole_sums_and_ratios(monkeypatch):
    """With the instrument's answer fixed: every side's total is its categories' sum; ratios against eager."""
    def analyse(config, runs, archs, cuda_fn=None):
        calls = runs[archs[0].name].calls
        rows = [{"op": c.kind, "kind": c.kind, "calls": 1, "hrfast_s": 10e-6, "eager_s": {"forward": 0.0}}
                for c in calls]
        work = [{"kernel_launches": {"forward": ["k"]}, "hrfast_aten_ops": {"forward": []}} for _ in calls]
        return {"op_calls": work, "archs": {archs[0].name: {"op_calls": rows}}}

    monkeypatch.setattr(perf_inspect, "analyse", analyse)
    report = wm.predict_whole(TINY, H100)
    calls = sum(r["calls"] for r in report["fused_op_calls"])
    for side, parts in report["sides"].items():
        assert report["totals"][side]["seconds"] == pytest.approx(sum(p["seconds"] for p in parts.values()))
        assert report["totals"][side]["ratio_vs_eager"] == pytest.approx(
            report["totals"]["eager"]["seconds"] / report["totals"][side]["seconds"])
    fused = report["sides"]["hrfast"]
    assert fused["hrfast fusion kernels"]["seconds"] + fused["hrfast head kernels"]["seconds"] == pytest.approx(
        calls * 10e-6)
    epi = report["sides"]["hrfast_fused_epilogues"]
    assert "relu" not in epi and "add" not in epi  # every add / ReLU outside the fused ops is a conv epilogue
    assert report["totals"]["hrfast_fused_epilogues"]["launches"] < report["totals"]["hrfast"]["launches"]
    assert "hrnetv2_w18_small_v1_seg" in wm.markdown(report, "cmd")


def test_cost_rule_is_the_eager_rule():
    op = wm.AtenOp("convolution", 10**6, 2e9, torch.bfloat16)
    assert wm.cost(H100, [op, op])["conv"]["seconds"] == pytest.approx(2 * op_seconds(H100, op))
    assert op_seconds(H100, wm.AtenOp("relu_", 0, 0.0, torch.bfloat16)) == LAUNCH_SECONDS


def test_cli_arguments():
    with pytest.raises(SystemExit):
        wm.parse_args(["--arch", "sm_75"])
    with pytest.raises(SystemExit):
        wm.parse_args(["--size", "0", "8"])
    assert wm.parse_args(["--arch", "h200"]).gpu.name == "H200"
