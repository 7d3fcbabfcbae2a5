"""hrfast packaging. `pip install -e .` compiles nothing and needs no GPU or CUDA toolkit.

The Triton kernels live in the top-level `kernels/` folder and install as `hrfast.kernels`. The CUDA C++
kernels in `csrc/` are compiled on first use (JIT, hrfast/_cuda/build.py), or ahead of time into `hrfast._C`
when asked for: `HRFAST_BUILD_CUDA=1 pip install --no-build-isolation -e .` (needs torch already installed
and nvcc matching torch.version.cuda; TORCH_CUDA_ARCH_LIST picks the GPUs, default 8.0;9.0).
"""
import glob
import os

from setuptools import find_packages, setup


def _cuda_extension():
    """(ext_modules, cmdclass) of the ahead-of-time build, or nothing unless HRFAST_BUILD_CUDA=1."""
    if os.environ.get("HRFAST_BUILD_CUDA", "0") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join(here, "csrc", "*.cpp")) + glob.glob(os.path.join(here, "csrc", "*.cu")))
    flags = ["-O3", "-DHRFAST_WITH_CUDA"]  # the JIT build's flags (hrfast/_cuda/build.py compile_flags)
    # the headers as `depends`: setuptools skips an extension whose sources and depends are older than it
    headers = sorted(glob.glob(os.path.join(here, "csrc", "*.h")))
    ext = CUDAExtension("hrfast._C", [os.path.relpath(s, here) for s in sources],
                        depends=[os.path.relpath(h, here) for h in headers],
                        extra_compile_args={"cxx": flags, "nvcc": flags + ["--expt-relaxed-constexpr", "-lineinfo"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="hrfast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for HRNet's multi-resolution fusion and HRNetV2 head",
    python_requires=">=3.9",
    packages=["hrfast", *(f"hrfast.{p}" for p in find_packages("hrfast")), "hrfast.kernels"],
    package_dir={"hrfast": "hrfast", "hrfast.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.5", "ninja", "pybind11"],
    extras_require={"test": ["pytest", "pytest-benchmark", "timm>=0.9", "numpy", "matplotlib", "hypothesis",
                             "onnx", "onnxscript"],
                    "bench": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
