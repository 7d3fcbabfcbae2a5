"""The launchers fit their block configurations to the device at hand (hrfast.kernels.limits), on CPU.

The device's limit comes from `torch.cuda.get_device_properties` (faked here), read once per device and never
at import. The head's launchers take the first configuration, in order of preference, whose shared-memory
bound fits: recorded on meta tensors (`hrfast.perf.record`) at HRNetV2-W48's head shapes, under the limits
of the A100, the H100 and smaller devices. tests/test_launchability.py checks the bounds against the compiler.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from hrfast.kernels import head as KH
from hrfast.kernels import limits
from hrfast.kernels.limits import DeviceLimits, assume, device_limits, first_fitting
from hrfast.perf.arch import A100, H100
from hrfast.perf.record import record
from hrfast.plan import HeadPlan, Resample, term_plan

HEAD_KERNELS = ("_head_stats_kernel", "_head_forward_kernel", "_head_backward_reduce_kernel",
                "_head_backward_ds_kernel")


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda.get_device_properties answering from a table by device index; records the queries."""
    table, queries = {}, []

    def get_device_properties(index):
        queries.append(index)
        return table[index]

    monkeypatch.setattr(torch.cuda, "get_device_properties", get_device_properties)
    limits._cuda_limits.cache_clear()
    yield table, queries
    limits._cuda_limits.cache_clear()


def test_limit_read_once_per_device(fake_gpus):
    table, queries = fake_gpus
    table[0] = SimpleNamespace(shared_memory_per_block_optin=232_448)
    table[1] = SimpleNamespace(shared_memory_per_block_optin=166_912)
    for _ in range(3):
        assert device_limits(torch.device("cuda", 0)) == DeviceLimits(232_448)
        assert device_limits(torch.device("cuda", 1)) == DeviceLimits(166_912)
    assert queries == [0, 1]


def test_limit_without_torch_attribute_from_triton_else_48k(fake_gpus, monkeypatch):
    """torch < 2.7 has no shared_memory_per_block_optin: Triton's driver says, or else the 48 KB every device
    gives a block."""
    table, _ = fake_gpus
    table[0] = table[1] = SimpleNamespace(shared_memory_per_block=49_152)
    monkeypatch.setattr(limits, "_triton_shared_per_block", lambda index: {0: 101_376}.get(index))
    assert device_limits(torch.device("cuda", 0)).shared_per_block == 101_376
    assert device_limits(torch.device("cuda", 1)).shared_per_block == limits.DEFAULT_SHARED_PER_BLOCK == 49_152


def test_no_limit_off_cuda_unless_assumed(fake_gpus):
    _, queries = fake_gpus
    assert device_limits(torch.device("cpu")) is None and device_limits(torch.device("meta")) is None
    with assume(DeviceLimits(1234)):
        assert device_limits(torch.device("cpu")) == device_limits(torch.device("cuda", 3)) == DeviceLimits(1234)
    assert device_limits(torch.device("cpu")) is None and queries == []


def test_nothing_queried_at_import():
    code = ("import torch\n"
            "def boom(*a): raise AssertionError('device properties queried at import')\n"
            "torch.cuda.get_device_properties = boom\n"
            "import hrfast, hrfast.kernels.head, hrfast.kernels.fuse, hrfast.kernels.limits\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_first_fitting_order_and_fallbacks():
    sizes = {"big": 300, "mid": 200, "small": 100}
    bound = sizes.__getitem__
    assert first_fitting(list(sizes), bound, None) == "big"
    assert first_fitting(list(sizes), bound, DeviceLimits(250)) == "mid"
    assert first_fitting(list(sizes), bound, DeviceLimits(100)) == "small"
    assert first_fitting(list(sizes), bound, DeviceLimits(50)) == "small"  # none fits: the smallest


# ------------------------------------------------------------------------------------- the head's choice


def _w48_head(dtype, channels_last: bool):
    """The head launchers' arguments at HRNetV2-W48's shapes (512x1024 input, batch 2), on meta."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x0 = torch.empty(2, 48, 128, 256, dtype=dtype, device="meta").contiguous(memory_format=fmt)
    lows = [torch.empty(2, 720, 128 // 2**j, 256 // 2**j, dtype=dtype, device="meta").contiguous(memory_format=fmt)
            for j in (1, 2, 3)]
    bil = Resample("bilinear", align_corners=False)
    plan = HeadPlan(tuple(term_plan(bil, tuple(p.shape[2:]), (128, 256)) for p in lows))
    t = KH.HeadTensors(x0, lows, torch.empty(720, 48, dtype=dtype, device="meta"),
                       torch.empty(19, 720, dtype=dtype, device="meta"), torch.empty(19, dtype=dtype, device="meta"))
    return plan, t, torch.empty(720, device="meta"), torch.empty(2, 19, 128, 256, dtype=dtype, device="meta")


def head_choices(dtype, channels_last: bool, device_limit=None) -> dict:
    """kernel -> (BLOCK_M, pixels per tile, num_stages, its shared_bound) as the launchers choose them."""
    plan, t, scale, grad = _w48_head(dtype, channels_last)
    context = assume(DeviceLimits(device_limit)) if device_limit else contextlib.nullcontext()
    with context, record() as launches:
        KH.head_batch_stats(plan, t)
        KH.head_forward(plan, t, scale, scale)
        KH.head_backward_reduce(plan, t, scale, scale, grad)
        KH.head_backward_ds(plan, t, scale, scale, grad, scale, scale)
    choices = {}
    for launch in launches:
        if launch.name not in HEAD_KERNELS:  # the backward's patch gathers: no tile configuration
            continue
        if launch.params.get("EXACT"):  # the exact gathers' own launch: 8 warps, 1 stage on the same tiles
            continue
        p, stages = launch.params, launch.options["num_stages"]
        pixels = p["TILE_H"] * p["TILE_W"] if "TILE_H" in p else p["BLOCK_P"]  # the forward's tiles are 2-D
        choices[launch.name] = (p["BLOCK_M"], pixels, stages, KH.shared_bound(launch.name, p, stages))
    assert set(choices) == set(HEAD_KERNELS)
    return choices


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.bfloat16, False),
                                                  (torch.bfloat16, True), (torch.float16, True)])
@pytest.mark.parametrize("gpu", [A100, H100], ids=lambda a: a.name)
def test_head_choice_fits_the_device(dtype, channels_last, gpu):
    for name, (_, _, _, bound) in head_choices(dtype, channels_last, gpu.shared_per_block).items():
        assert bound <= gpu.shared_per_block, name


def test_head_choices_at_w48_shapes():
    """Every head kernel runs on the forward's 2-D tiles (8x8 pixels for fp32, 8x16 for bf16), 2 stages, on A100
    and H100 alike (issue 13: the old fp32 backward reduce needed 352 KB at 3 stages on sm_90); 32-channel chunks
    but bf16's statistics (16: 32 spilled, 4fc1e27), bf16's backward reduce (16 at 4 warps: spill-free on both
    since the exact gathers have a launch of their own; 32 spilled 4 B on sm_90 at W48 NCHW), fp32's ds
    kernel: 1 stage, 32 channels on sm_90 (2 stages spilled 76-104 B in the loop), 16 below (32 spilled
    100-188 B on sm_80), and fp32's statistics and backward reduce on sm_90: the transposed chunk, 64 channels
    (a warpgroup's wgmma rows), the reduce on 4x8 tiles and 1 stage (on sm_80 the transposed chunk spills
    kilobytes: the row form there)."""
    for dtype, channels_last in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        pixels = 64 if dtype == torch.float32 else 128
        for gpu in (None, A100, H100):
            expected = {k: (32, pixels, 2) for k in HEAD_KERNELS}
            if dtype == torch.bfloat16:
                expected["_head_stats_kernel"] = (16, pixels, 2)
                expected["_head_backward_reduce_kernel"] = (16, pixels, 2)
            else:
                expected["_head_backward_ds_kernel"] = (16 if gpu is A100 else 32, pixels, 1)
                if gpu is not A100:
                    expected["_head_stats_kernel"] = (64, pixels, 2)
                    expected["_head_backward_reduce_kernel"] = (64, 32, 1)
            choices = head_choices(dtype, channels_last, gpu and gpu.shared_per_block)
            assert {k: c[:3] for k, c in choices.items()} == expected, (gpu and gpu.name, dtype, channels_last)
            assert gpu is None or all(bound <= gpu.shared_per_block for *_, bound in choices.values())


def test_head_smaller_devices_get_smaller_tiles():
    """A 99 KB device (sm_86/sm_89 give 101,376 B) and the 48 KB every device gives: fewer stages, then
    smaller tiles, always within the limit."""
    for limit in (101_376, 49_152):
        for dtype, channels_last in ((torch.float32, False), (torch.bfloat16, True)):
            choices = head_choices(dtype, channels_last, limit)
            assert all(bound <= limit for *_, bound in choices.values()), (limit, dtype, choices)
    fp32_48k = head_choices(torch.float32, False, 49_152)
    assert fp32_48k["_head_forward_kernel"][:3] == (16, 16, 1)  # 4x4 pixels over 16 channels


# ------------------------------------------------------------------------------------------- grid limits


def test_launch_grid_refuses_what_cuda_cannot_launch():
    from hrfast.kernels.resample import launch_grid
    assert launch_grid(2**31 - 1, 65535, 65535) == (2**31 - 1, 65535, 65535)
    for grid, axis in (((1, 1, 65536), "z"), ((1, 65536), "y"), ((2**31, 1, 1), "x")):
        with pytest.raises(ValueError, match=f"along the grid's {axis} axis.*backend='reference'"):
            launch_grid(*grid)


@pytest.mark.parametrize("op", ["fuse", "head"])
def test_triton_launchers_refuse_a_batch_over_the_grid_limit(op, monkeypatch):
    """The limit belongs to the Triton launchers (one grid slice per image); checked before any launch, so
    through the interpreter as on a GPU. The reference path takes the batch (tests/test_bad_inputs.py)."""
    from hrfast.ops import fuse, hrnet_v2_head
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    N = 65536
    if op == "fuse":
        call = lambda: fuse([torch.randn(N, 1, 1, 1), torch.randn(N, 1, 1, 1)], backend="triton")  # noqa: E731
    else:
        xs = [torch.randn(N, 1, 2, 2), torch.randn(N, 1, 1, 1)]
        call = lambda: hrnet_v2_head(xs, torch.randn(2, 2, 1, 1), None, torch.zeros(2), torch.ones(2),  # noqa: E731
                                     None, None, torch.randn(3, 2, 1, 1), None, backend="triton")
    with pytest.raises(ValueError, match="65536 blocks along the grid's z axis|65536 blocks along the grid's y axis"):
        call()
