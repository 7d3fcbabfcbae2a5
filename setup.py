"""hrfast packaging. `pip install -e .` compiles nothing and needs no GPU or CUDA toolkit.

The Triton kernels live in the top-level `kernels/` folder and install as `hrfast.kernels`.
"""
from setuptools import find_packages, setup

setup(
    name="hrfast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for HRNet's multi-resolution fusion and HRNetV2 head",
    python_requires=">=3.9",
    packages=["hrfast", *(f"hrfast.{p}" for p in find_packages("hrfast")), "hrfast.kernels"],
    package_dir={"hrfast": "hrfast", "hrfast.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0", "ninja", "pybind11"],
    extras_require={"test": ["pytest", "pytest-benchmark", "timm>=0.9", "numpy"]},
)
