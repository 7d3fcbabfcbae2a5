"""The CUDA extension compiles and links (nvcc) on any machine with a matching toolkit, GPU or not.

In CI (.ci/run sets HRFAST_REQUIRE_CUDA_BUILD=1 after installing the toolkit) a missing toolkit fails this
test instead of skipping it, so a .cu file that does not compile fails CI.
"""
import os

import pytest

from hrfast._cuda.build import build, toolkit_problem

REQUIRED = os.environ.get("HRFAST_REQUIRE_CUDA_BUILD") == "1"


def _assert_headers_tracked(with_cuda: bool) -> None:
    """cpp_extension is given the .cpp/.cu files only (its version hash covers those); the csrc headers (the
    kernels, the launchers, the element math) must be in ninja's dependency log of the build, or editing one
    would leave a stale build in the cache."""
    import glob
    import shutil
    import subprocess

    from hrfast._cuda.build import CSRC, build_dir

    ninja = shutil.which("ninja")
    if ninja is None:
        pytest.skip("no ninja on PATH")
    out = subprocess.run([ninja, "-C", str(build_dir(with_cuda)), "-t", "deps"], capture_output=True, text=True,
                         check=True).stdout
    listed = {os.path.realpath(line.strip()) for line in out.splitlines() if line.startswith(" ")}
    headers = {os.path.realpath(h) for h in glob.glob(str(CSRC / "*.h"))}
    assert headers and headers <= listed, f"not in ninja's deps: {sorted(headers - listed)}"


def test_cuda_extension_compiles_links_and_imports():
    problem = toolkit_problem()
    if problem:
        if REQUIRED:
            pytest.fail(f"HRFAST_REQUIRE_CUDA_BUILD=1 but the CUDA build is impossible here: {problem}")
        pytest.skip(f"no usable CUDA toolkit: {problem}")
    module = build(with_cuda=True)
    assert module.with_cuda, "the CUDA build did not define HRFAST_WITH_CUDA"
    assert callable(module.fuse_forward)
    _assert_headers_tracked(with_cuda=True)


def test_host_build_is_not_the_cuda_build():
    assert not build(with_cuda=False).with_cuda


def test_host_build_tracks_the_headers():
    build(with_cuda=False)
    _assert_headers_tracked(with_cuda=False)


def test_cuda_backend_on_cpu_tensors_says_why(monkeypatch):
    import torch

    from hrfast.ops import fuse

    monkeypatch.setenv("HRFAST_CSRC_ON_CPU", "0")
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs CUDA tensors.*HRFAST_CSRC_ON_CPU=1"):
        fuse([x], backend="cuda")


def test_cuda_status_names_the_missing_piece(monkeypatch):
    import torch

    from hrfast.backends import cuda_cpp_status

    ok, reason = cuda_cpp_status()
    if not torch.cuda.is_available():
        assert not ok and ("no CUDA GPU" in reason or "CPU-only" in reason), reason
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    expected = "CPU-only build" if torch.version.cuda is None else "no nvcc found (CUDA_HOME=/nonexistent)"
    assert expected in toolkit_problem()


def test_info_lists_every_backend(capsys):
    from hrfast.info import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("'triton'", "'cuda_cpp'", "'reference'"):
        assert f"backend {name}" in out
    assert "backend='auto' on" in out
