"""Test configuration: device gating in one place (torchvision style) and the Triton interpreter on CPU.

Without a GPU the Triton kernels run through the interpreter on CPU tensors: TRITON_INTERPRET must be set
before triton is imported, which happens here, before any test module imports hrfast.kernels.
"""
import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# device on which the Triton kernels run in this session: the GPU, or the CPU through the interpreter
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: runs only where a CUDA GPU is available")
    config.addinivalue_line("markers", "slow: larger shapes; skipped under the Triton interpreter unless "
                                       "HRFAST_SLOW_TESTS=1")


def pytest_collection_modifyitems(config, items):
    run_slow = HAS_CUDA or os.environ.get("HRFAST_SLOW_TESTS") == "1"
    for item in items:
        if "needs_cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow under the Triton interpreter; HRFAST_SLOW_TESTS=1 runs it"))


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Each test gets its own reproducible seed (from its id), and leaves the global RNG as it found it."""
    state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if HAS_CUDA else None
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
    torch.set_rng_state(state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN, so an unwritten element fails."""
    try:
        from hrfast.kernels import fuse as fuse_kernels
    except Exception:  # triton missing: tests that need it fail on their own with a clear error
        yield
        return
    monkeypatch.setattr(fuse_kernels, "POISON_OUTPUTS", True)
    yield
