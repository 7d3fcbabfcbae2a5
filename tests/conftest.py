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
    # backend="cuda" runs the CUDA kernels through the host build's grid emulation (hrfast._cuda.build)
    os.environ.setdefault("HRFAST_CSRC_ON_CPU", "1")


def _interpret_without_overflow_asserts():
    """The interpreter checks every int32 add / sub / mul for overflow (a device_assert each, as a compiled kernel
    does only with debug=True): 40% of an interpreted kernel's time, and the tests' tiny shapes cannot overflow
    (the 64-bit offset paths are tested with force_int64). Interpret as the compiled kernels run."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import dataclasses

    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


_interpret_without_overflow_asserts()

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


# The fused backends every kernel test runs against: the Triton kernels (kernels/) and the CUDA C++ kernels
# (csrc/), by the names users write. Without a GPU each runs on CPU tensors through its emulation: the Triton
# interpreter, and the host build of csrc/ (HRFAST_CSRC_ON_CPU=1).
FUSED_BACKENDS = ("triton", "cuda")


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request, monkeypatch):
    """A fused backend under test; every buffer its launchers allocate starts as NaN (see poison_kernel_outputs)."""
    if request.param == "cuda":
        from hrfast._cuda import fuse as csrc_fuse

        monkeypatch.setattr(csrc_fuse, "POISON_OUTPUTS", True)
    return request.param


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
def no_tf32():
    """fp32 convs and matmuls on a GPU must be true fp32 to be held to the 1e-5 relative tolerance
    (cuDNN convolutions default to TF32)."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


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


@pytest.fixture(autouse=True)
def interpreter_rounds_bf16_to_nearest(monkeypatch):
    """Under TRITON_INTERPRET=1, make fp32 -> bf16 casts round to nearest even, as compiled kernels do.

    The Triton interpreter (3.x, `InterpreterBuilder.cast_impl`) converts fp32 to bf16 by truncating the
    mantissa, even with fp_downcast_rounding="rtne" (seen with triton 3.9: 1 + 0.75 * 2**-7 stores as 1.0,
    torch gives 1.0078125). Truncation doubles the RMS error of every bf16 store, so bf16 comparisons would
    measure the interpreter's conversion rather than the kernels' arithmetic. No-op on a GPU.
    """
    if HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    original = interp.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).bfloat16()
            return interp.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    monkeypatch.setattr(interp.InterpreterBuilder, "cast_impl", cast_impl)
    yield


@pytest.fixture(autouse=True)
def interpreter_bf16_dot(monkeypatch):
    """Under TRITON_INTERPRET=1, make `tl.dot` of bfloat16 operands multiply their values, as compiled kernels do.

    The Triton interpreter (seen with triton 3.9, `InterpreterBuilder.create_dot`) stores bf16 tensors as
    uint16 bit patterns and hands them to `np.matmul` as they are, so a bf16 dot multiplies integers (results
    ~1e9 instead of ~1). The head kernels use `tl.dot` for W0 x0, the classifier and their backward, so every
    bf16 check would measure that instead of the kernels. The operands are widened to fp32 first (exact), then
    multiplied and accumulated in fp32, which is what the tensor cores do. No-op on a GPU.
    """
    if HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import triton.language as tl
    import triton.runtime.interpreter as interp

    original = interp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", create_dot)
    yield
