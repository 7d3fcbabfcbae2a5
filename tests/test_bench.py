"""`python -m hrfast bench` (hrfast.bench.main) on CPU at a tiny size: the JSON record, errors, chart handling.

Times taken here mean nothing; the checks are the plumbing: every contender/mode/dtype measured, errors finite
and within the budget the bench applies, the MAC counts, and the chart written or its skip announced.
"""
import glob
import json
import math
import os
import sys

import pytest
import torch

from hrfast import __main__ as cli
from hrfast import bench, inference

TINY = ["--model", "hrnetv2_w18_small_v1_seg", "--size", "32", "64", "--batch", "2", "--repeats", "2",
        "--warmup", "0", "--no-compile", "--device", "cpu"]


def _record(out_dir):
    files = glob.glob(os.path.join(str(out_dir), "bench_*.json"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        return json.load(f), files[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = bench.main(TINY + ["--out", str(out), "--backend", "reference"])
    return code, out


def test_bench_writes_every_measurement(tiny_run):
    code, out = tiny_run
    assert code == 0
    record, _ = _record(out)
    env = record["environment"]
    for key in ("device", "torch", "triton", "python"):
        assert env[key]
    assert record["model"] == "hrnetv2_w18_small_v1_seg" and record["backend_resolved"] == "reference"
    assert record["args"]["size"] == [32, 64] and record["args"]["repeats"] == 2
    assert record["command"].startswith("python -m hrfast bench")
    assert record["ok"] is True
    assert record["contenders"] == ["eager", "hrfast"]
    cases = {(r["mode"], r["dtype"], r["contender"]) for r in record["results"]}
    assert cases == {(m, d, c) for m in ("inference", "train") for d in ("fp32", "bf16") for c in ("eager", "hrfast")}
    for r in record["results"]:
        assert "failed" not in r, r
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0
        assert r["peak_bytes"] is None  # CPU: n/a
        assert set(r["errors"]) == ({"output", "grads"} if r["mode"] == "train" else {"output"})
        assert all(math.isfinite(e) for e in r["errors"].values())
        if r["dtype"] == "fp32":  # eager itself: ~2e-6 (output), ~2e-4 (training gradients, BN-amplified)
            assert r["errors"]["output"] < 1e-4 and r["max_error"] < 1e-2
        if r["contender"] == "hrfast":
            assert r["within_budget"] is True
            assert 0 <= r["fp64_patched_error"] <= 1e-10  # patched vs unpatched, both float64
            if r["mode"] == "inference":  # training: float64 decides (ill-conditioned in fp32/bf16)
                assert set(r["error_budgets"]) == set(r["errors"])
        else:
            assert r["speedup_vs_eager"] == 1.0
    macs = record["macs"][0]
    assert macs["size"] == [32, 64] and 0 < macs["macs_patched"] < macs["macs_unpatched"]
    rows = record["patch_report"]
    assert any(r["kind"] == "fusion" and r["status"] == "patched" for r in rows)


def test_bench_output_says_what_ran(tiny_run, capsys, tmp_path):
    # a second, smaller run, to see its printed output
    code = bench.main(TINY + ["--out", str(tmp_path), "--mode", "inference", "--dtype", "fp32", "--repeats", "1"])
    text = capsys.readouterr().out
    assert code == 0
    assert "reference path" in text and "not fused kernels" in text  # CPU ratios are not kernel speedups
    assert "GMACs per image at 32x64" in text
    assert "n/a" in text
    assert "wrote " in text and ".json" in text
    record, _ = _record(tmp_path)
    assert [r["contender"] for r in record["results"]] == ["eager", "hrfast"]


def test_chart_skipped_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code = bench.main(TINY + ["--out", str(tmp_path), "--mode", "inference", "--dtype", "fp32", "--repeats", "1"])
    assert code == 0
    assert "chart skipped: matplotlib is not installed" in capsys.readouterr().out
    assert not glob.glob(os.path.join(str(tmp_path), "*.png"))


def test_chart_written_with_matplotlib(tiny_run):
    pytest.importorskip("matplotlib")
    _, out = tiny_run
    _, path = _record(out)
    png = path[:-len(".json")] + ".png"
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_contender_selection():
    assert bench._contenders(None, False, on_gpu=True) == ("eager", "compile", "hrfast", "hrfast-compile")
    assert bench._contenders(None, False, on_gpu=False) == ("eager", "hrfast")
    assert bench._contenders("all", True, on_gpu=False) == ("eager", "hrfast")
    assert bench._contenders("hrfast,compile", False, on_gpu=False) == ("eager", "hrfast", "compile")
    with pytest.raises(SystemExit, match="unknown contender"):
        bench._contenders("eager,fast", False, on_gpu=False)


def test_cli_dispatches_bench(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "python -m hrfast bench" in capsys.readouterr().out


def test_threads_pose_and_the_inference_mode(capsys, tmp_path):
    """--threads sets torch's thread count for the run (recorded, printed, restored after); the pose model runs
    with its heatmap loss; the hrfast contender uses the inference mode in eval (its measured layout is recorded;
    its calls before timing cover the measuring calls) and is exact in float64."""
    before = torch.get_num_threads()
    code = bench.main(["--model", "hrnet_w32_pose", "--size", "64", "32", "--batch", "1", "--repeats", "1",
                       "--dtype", "fp32", "--no-compile", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert code == 0 and torch.get_num_threads() == before
    assert "torch threads: 1 (--threads)" in text
    record, _ = _record(tmp_path)
    assert record["environment"]["torch_threads"] == 1 and record["args"]["threads"] == 1
    rows = {(r["mode"], r["contender"]): r for r in record["results"]}
    assert set(rows) == {(m, c) for m in ("inference", "train") for c in ("eager", "hrfast")}
    layout = rows["inference", "hrfast"]["layout"]
    configs = {f"{layout}+{epilogue}" for layout in ("contiguous", "channels_last") for epilogue in ("aten", "auto")}
    assert len(layout) == 1 and layout[0]["layout"] in configs and set(layout[0]["fastest_ms"]) == configs
    assert "layout" not in rows["train", "hrfast"]  # training: the inference mode is off
    assert all(r["fp64_patched_error"] <= 1e-10 for k, r in rows.items() if k[1] == "hrfast")
    assert all(len(r["cpu_times_ms"]) == 1 and r["cpu_median_ms"] > 0 for r in rows.values())  # process CPU time
    assert rows["inference", "hrfast"]["cpu_speedup_vs_eager"] > 0 and "process CPU time per call" in text
    assert any(r["kind"] == "inference" and r["status"] == "patched" for r in record["patch_report"])


def test_threads_and_no_inference_arguments(tmp_path):
    with pytest.raises(SystemExit):
        bench._parse(["--threads", "0"])
    args = bench._parse(["--no-inference", "--threads", "2"])
    assert args.no_inference and args.threads == 2
    case = bench._Case(args, None, "seg", "inference", "fp32", ((8, 8), 1), torch.device("cpu"), ("eager",),
                       print)
    assert case._warmup("hrfast", 0) == 0  # without the inference mode nothing measures on the first calls
    args.no_inference = False
    assert case._warmup("hrfast", 0) == inference.EXPLORE_CALLS and case._warmup("eager", 0) == 0
