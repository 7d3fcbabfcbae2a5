"""`backend="auto"` measures the candidates once per call signature and runs the fastest (hrfast._autotune).

On a GPU the candidates are the real ones on CUDA tensors (Triton, the CUDA extension, the reference); without
one, the test vehicles on CPU tensors (`measure_on_cpu`): the Triton interpreter, the csrc host build and the
reference. Most tests replace the clock by one that advances by a set
time per candidate run, so which candidate is fastest is decided by the test, while everything else (the
warm-up, the repetitions, the table, the copies of the inputs) runs for real; the chosen backend's own
output and gradients must then come back bit for bit.
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch

import hrfast
from hrfast import _autotune, backends, timing
from hrfast.ops import Resample, fuse, hrnet_v2_head
from hrfast.testing import FP32_RTOL, assert_rel_close

from conftest import TRITON_DEVICE

DEVICE = TRITON_DEVICE
ON_GPU = DEVICE == "cuda"
STATIC = "triton" if ON_GPU else "reference"  # auto without measuring

CANDIDATES = ("triton", "cuda_cpp", "reference")


@pytest.fixture(autouse=True)
def measuring(monkeypatch):
    """Measure (on CPU tensors too), from an empty table, with the csrc extension built for DEVICE (it is a
    candidate only once built: auto never compiles). cuDNN deterministic, so that the head's convolutions
    repeat bit for bit on a GPU."""
    from hrfast._cuda.build import load

    load(ON_GPU)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(_autotune, "measure_on_cpu", True)
    monkeypatch.delenv("HRFAST_AUTO_MEASURE", raising=False)
    _autotune.clear()
    yield
    _autotune.clear()


class Stopwatch:
    """Stands in for `time` in hrfast._autotune: each candidate run takes `cost[name]` seconds of its clock.
    Records the runs and can make a candidate raise."""

    def __init__(self, monkeypatch, cost, fail=()):
        self.now, self.cost, self.fail, self.runs = 0.0, dict(cost), set(fail), []
        monkeypatch.setattr(_autotune, "MIN_REPS", 2)  # the interpreter is slow; the loop is the same
        monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter_ns=lambda: round(self.now * 1e9)))
        real_measure = _autotune._measure

        def measure(names, run, device, op):
            def timed(name):
                self.runs.append(name)
                if name in self.fail:
                    raise RuntimeError(f"{name} cannot run this")
                run(name)
                self.now += self.cost[name]
            return real_measure(names, timed, device, op)

        monkeypatch.setattr(_autotune, "_measure", measure)


def _fuse_problem(requires_grad=True, H=5, device=DEVICE):
    resamples = [None, Resample("bilinear"), Resample("nearest")]
    xs = [torch.randn(2, 3, *hw, device=device, requires_grad=requires_grad) for hw in ((H, 4), (3, 2), (2, 2))]
    scales = [(torch.rand(3, device=device) + 0.5).requires_grad_(requires_grad) for _ in xs]
    shifts = [torch.randn(3, device=device, requires_grad=requires_grad), None,
              torch.randn(3, device=device, requires_grad=requires_grad)]
    return dict(inputs=xs, scales=scales, shifts=shifts, resample=resamples)


def _leaves(problem):
    return [t for t in (*problem["inputs"], *problem["scales"], *problem["shifts"]) if t is not None]


def _fuse_with_grads(problem, backend, grad_y=None):
    y = fuse(problem["inputs"], scales=problem["scales"], shifts=problem["shifts"], resample=problem["resample"],
             backend=backend)
    grad_y = torch.randn_like(y) if grad_y is None else grad_y
    return y, torch.autograd.grad(y, _leaves(problem), grad_y), grad_y


def _assert_same_results(run, rerun, backend):
    """(y, grads) of two calls that ran `backend`: bit for bit, but for the reference's gradients on a GPU,
    which F.interpolate's CUDA backward accumulates with atomicAdd in a run-dependent order."""
    (y, grads), (y2, grads2) = run, rerun
    assert torch.equal(y, y2)
    for a, b in zip(grads, grads2):
        if ON_GPU and backend == "reference":
            assert_rel_close(a, b, FP32_RTOL)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("winner", CANDIDATES)
def test_fuse_runs_the_fastest_candidate(monkeypatch, winner):
    clock = Stopwatch(monkeypatch, {name: 1.0 if name == winner else 3.0 for name in CANDIDATES})
    problem = _fuse_problem()
    rng = torch.get_rng_state(), torch.cuda.get_rng_state() if ON_GPU else None
    fuse(problem["inputs"], scales=problem["scales"], shifts=problem["shifts"], resample=problem["resample"])
    assert torch.equal(torch.get_rng_state(), rng[0]), "the measurement drew random numbers"
    assert not ON_GPU or torch.equal(torch.cuda.get_rng_state(), rng[1]), "the measurement drew random numbers"
    y, grads, grad_y = _fuse_with_grads(problem, "auto")  # measured by the call above
    assert all(t.grad is None for t in _leaves(problem)), "the measurement left gradients on the caller's tensors"
    [choice] = _autotune.choices()
    assert choice.op == "fuse" and choice.backend == winner
    assert set(choice.median_ms) == set(CANDIDATES) and choice.median_ms[winner] == 1e3
    # a warm-up and MIN_REPS timed runs each, interleaved
    assert sorted(clock.runs) == sorted(list(CANDIDATES) * (1 + _autotune.MIN_REPS))
    y_w, grads_w, _ = _fuse_with_grads(problem, winner, grad_y)
    _assert_same_results((y, grads), (y_w, grads_w), winner)


def test_fuse_measures_once_per_signature(monkeypatch):
    clock = Stopwatch(monkeypatch, {"triton": 2.0, "cuda_cpp": 1.0, "reference": 3.0})
    problem = _fuse_problem()
    _fuse_with_grads(problem, "auto")
    measured = len(clock.runs)
    _fuse_with_grads(problem, "auto")
    _fuse_with_grads(_fuse_problem(), "auto")  # new tensors, same signature
    assert len(clock.runs) == measured and len(_autotune.choices()) == 1
    with torch.no_grad():  # no backward to time: a signature of its own
        fuse(problem["inputs"], scales=problem["scales"], shifts=problem["shifts"], resample=problem["resample"])
    _fuse_with_grads(_fuse_problem(H=6), "auto")  # another shape
    fuse(problem["inputs"], resample=problem["resample"], backend="triton")  # an explicit backend: never
    assert len(clock.runs) == 3 * measured and len(_autotune.choices()) == 3
    assert [c.backend for c in _autotune.choices()] == ["cuda_cpp"] * 3
    _autotune.clear()
    _fuse_with_grads(problem, "auto")
    assert len(clock.runs) == 4 * measured


def test_fuse_real_clock_choice_is_what_runs():
    """With the real clock: whatever wins, the call returns that backend's result."""
    problem = _fuse_problem()
    y, grads, grad_y = _fuse_with_grads(problem, "auto")
    [choice] = _autotune.choices()
    assert set(choice.median_ms) == set(CANDIDATES)
    assert all(ms > 0 for ms in choice.median_ms.values())
    assert choice.backend == min(choice.median_ms, key=choice.median_ms.get)
    y_w, grads_w, _ = _fuse_with_grads(problem, choice.backend, grad_y)
    _assert_same_results((y, grads), (y_w, grads_w), choice.backend)


def test_a_failing_candidate_is_skipped_with_a_warning(monkeypatch):
    clock = Stopwatch(monkeypatch, {"triton": 1.0, "cuda_cpp": 2.0, "reference": 3.0}, fail={"triton"})
    with pytest.warns(RuntimeWarning, match="skips triton for fuse: RuntimeError: triton cannot run this"):
        _fuse_with_grads(_fuse_problem(), "auto")
    [choice] = _autotune.choices()
    assert choice.backend == "cuda_cpp" and set(choice.median_ms) == {"cuda_cpp", "reference"}
    assert clock.runs.count("triton") == 1  # only the warm-up


def test_every_candidate_failing_falls_back_to_the_static_rule(monkeypatch):
    Stopwatch(monkeypatch, dict.fromkeys(CANDIDATES, 1.0), fail=set(CANDIDATES))
    problem = _fuse_problem()
    with pytest.warns(RuntimeWarning, match="skips"):
        y, _, _ = _fuse_with_grads(problem, "auto")
    assert _autotune.choices() == []
    assert torch.equal(y, _fuse_with_grads(problem, STATIC)[0])


def test_measuring_off(monkeypatch):
    clock = Stopwatch(monkeypatch, dict.fromkeys(CANDIDATES, 1.0))
    monkeypatch.setenv("HRFAST_AUTO_MEASURE", "0")
    problem = _fuse_problem()
    y, _, _ = _fuse_with_grads(problem, "auto")
    assert clock.runs == [] and _autotune.choices() == []
    assert torch.equal(y, _fuse_with_grads(problem, STATIC)[0])


def test_cpu_tensors_are_not_measured_by_default(monkeypatch):
    clock = Stopwatch(monkeypatch, dict.fromkeys(CANDIDATES, 1.0))
    monkeypatch.setattr(_autotune, "measure_on_cpu", False)
    _fuse_with_grads(_fuse_problem(device="cpu"), "auto")
    assert clock.runs == [] and _autotune.choices() == []


def test_the_cuda_cpp_head_is_no_candidate(monkeypatch):
    """The CUDA C++ head (the fusion kernel over all M channels) is predicted slower than eager: auto leaves it
    out, says so in `python -m hrfast info`, and an explicit backend="cuda_cpp" still runs it."""
    monkeypatch.setattr(backends, "cuda_cpp_built", lambda device: True)
    device = torch.device(DEVICE)
    assert "cuda_cpp" in backends.candidates(device, "fuse")
    assert "cuda_cpp" not in backends.candidates(device, "head")
    assert "for the head, not cuda_cpp: the CUDA C++ head runs" in backends.auto_rule(device)


def test_an_unbuilt_extension_is_no_candidate(monkeypatch):
    """auto never triggers the minutes-long JIT build: the extension competes only once it is built."""
    clock = Stopwatch(monkeypatch, {"triton": 2.0, "cuda_cpp": 1.0, "reference": 3.0})
    monkeypatch.setattr(backends, "cuda_cpp_built", lambda device: False)
    assert backends.candidates(torch.device(DEVICE)) == ["triton", "reference"]
    _fuse_with_grads(_fuse_problem(), "auto")
    assert set(clock.runs) == {"triton", "reference"}
    assert _autotune.choices()[0].backend == "triton"


def test_no_measurement_while_compiling(monkeypatch):
    clock = Stopwatch(monkeypatch, dict.fromkeys(CANDIDATES, 1.0))
    problem = _fuse_problem(requires_grad=False)

    def step(a, b, c):
        return fuse([a, b, c], scales=problem["scales"], shifts=problem["shifts"], resample=problem["resample"])

    def not_static(*args, **kwargs):
        raise AssertionError(f"compiled auto must run the static rule's {STATIC}")

    from hrfast._cuda import fuse as cuda_launchers
    from hrfast.kernels import fuse as triton_launchers

    monkeypatch.setattr(cuda_launchers, "fuse_forward", not_static)
    if STATIC != "triton":
        monkeypatch.setattr(triton_launchers, "fuse_forward", not_static)
    torch._dynamo.reset()
    y = torch.compile(step, backend="aot_eager", fullgraph=True)(*problem["inputs"])
    assert clock.runs == [] and _autotune.choices() == []
    expected = fuse(problem["inputs"], scales=problem["scales"], shifts=problem["shifts"],
                    resample=problem["resample"], backend=STATIC)
    assert_rel_close(y, expected, FP32_RTOL)  # aot_eager's decompositions round differently


# ---------------------------------------------------------------------------------------------------- head


def _head_problem():
    C, M, K = (2, 3), 4, 2
    xs = [torch.randn(2, c, 4 >> j, 5 >> j, device=DEVICE, requires_grad=True) for j, c in enumerate(C)]
    params = dict(conv_weight=torch.randn(M, sum(C), 1, 1), conv_bias=torch.randn(M), running_mean=torch.randn(M),
                  running_var=torch.rand(M) + 0.5, bn_weight=torch.rand(M) + 0.5, bn_bias=torch.randn(M),
                  cls_weight=torch.randn(K, M, 1, 1), cls_bias=torch.randn(K))
    params = {k: v.to(DEVICE).requires_grad_(not k.startswith("running")) for k, v in params.items()}
    return xs, params


def _head(xs, params, training, backend):
    p = dict(params, running_mean=params["running_mean"].clone(), running_var=params["running_var"].clone())
    out = hrnet_v2_head(xs, **p, training=training, backend=backend)
    leaves = xs + [t for t in p.values() if t.requires_grad]
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return out, grads, p["running_mean"], p["running_var"]


@pytest.mark.parametrize("winner, training", [("triton", True), ("cuda_cpp", True), ("cuda_cpp", False)])
def test_head_runs_the_fastest_and_updates_running_stats_once(monkeypatch, winner, training):
    Stopwatch(monkeypatch, {winner: 1.0, "reference": 2.0})
    # the interpreter is slow; the machinery is the same whichever candidates there are
    monkeypatch.setattr(backends, "candidates", lambda device, op="fuse": [winner, "reference"])
    xs, params = _head_problem()
    auto = _head(xs, params, training, "auto")
    [choice] = _autotune.choices()
    assert choice.op == "head" and choice.backend == winner
    explicit = _head(xs, params, training, winner)
    for a, b in zip((auto[0], *auto[1], *auto[2:]), (explicit[0], *explicit[1], *explicit[2:])):
        assert torch.equal(a, b)
    if training:  # moved once, not once per measurement run
        assert not torch.equal(auto[2], params["running_mean"])


def test_head_batch_of_one_pixel_is_not_measured(monkeypatch):
    clock = Stopwatch(monkeypatch, dict.fromkeys(CANDIDATES, 1.0))
    xs = [torch.randn(1, 2, 1, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skips" warnings: the op's own error, once
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            hrnet_v2_head(xs, torch.randn(3, 2, 1, 1), None, None, None, None, None, torch.randn(2, 3, 1, 1),
                          training=True, backend="auto")
    assert clock.runs == []


def test_choices_are_public():
    assert hrfast.backend_choices is _autotune.choices


def test_bench_reports_the_choices(monkeypatch):
    from hrfast.bench import _auto_choices, _auto_summary

    Stopwatch(monkeypatch, {"triton": 2.0, "cuda_cpp": 1.0, "reference": 3.0})
    _fuse_with_grads(_fuse_problem(), "auto")
    with torch.no_grad():
        fuse(**_fuse_problem(requires_grad=False))
    rows = _auto_choices()
    assert [(r["op"], r["backend"]) for r in rows] == [("fuse", "cuda_cpp")] * 2
    assert set(rows[0]["median_ms"]) == set(CANDIDATES) and "(2, 3, 5, 4)" in rows[0]["signature"]
    assert _auto_summary(rows) == "2 call signature(s): fuse -> cuda_cpp 2"


def test_info_describes_auto():
    assert backends.auto_rule(torch.device(DEVICE)).startswith("the fastest of triton, cuda_cpp, reference")
