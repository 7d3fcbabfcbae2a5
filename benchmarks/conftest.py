"""Benchmark configuration. Benchmarks never run with the test command (pytest's testpaths is tests/).

Run on a GPU:   python -m pytest benchmarks/ --benchmark-only --benchmark-json benchmarks/results/<name>.json
Plumbing check without a GPU (tiny shapes, Triton interpreter, no meaningful times):
                HRFAST_BENCH_SMOKE=1 python -m pytest benchmarks/ --benchmark-only
"""
import os
import platform

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
SMOKE = not HAS_CUDA and os.environ.get("HRFAST_BENCH_SMOKE") == "1"
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("HRFAST_CSRC_ON_CPU", "1")  # backend="cuda": the kernels on CPU (emulated grid)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA or SMOKE:
        return
    for item in items:
        item.add_marker(pytest.mark.skip(reason="benchmarks need a CUDA GPU (HRFAST_BENCH_SMOKE=1 checks the plumbing)"))


def environment_info() -> dict:
    """Device, driver and versions for every result's extra_info."""
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "smoke": SMOKE}
    if HAS_CUDA:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    driver=_driver_version())
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()}), Triton interpreter")
    return info


def _driver_version() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")
