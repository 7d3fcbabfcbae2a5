"""The CUDA extension compiles and links (nvcc) on any machine with a matching toolkit, GPU or not.

In CI (.ci/run sets HRFAST_REQUIRE_CUDA_BUILD=1 after installing the toolkit) a missing toolkit fails this
test instead of skipping it, so a .cu file that does not compile fails CI.
"""
import os

import pytest

from hrfast._cuda.build import build, toolkit_problem

REQUIRED = os.environ.get("HRFAST_REQUIRE_CUDA_BUILD") == "1"


def test_cuda_extension_compiles_links_and_imports():
    problem = toolkit_problem()
    if problem:
        if REQUIRED:
            pytest.fail(f"HRFAST_REQUIRE_CUDA_BUILD=1 but the CUDA build is impossible here: {problem}")
        pytest.skip(f"no usable CUDA toolkit: {problem}")
    module = build(with_cuda=True)
    assert module.with_cuda, "the CUDA build did not define HRFAST_WITH_CUDA"
    assert callable(module.fuse_forward)


def test_host_build_is_not_the_cuda_build():
    assert not build(with_cuda=False).with_cuda
