"""Building and loading hrfast's C++/CUDA extension (the sources are in the repository's top-level `csrc/`).

Two builds of the same sources:
- the CUDA build (`with_cuda=True`): csrc/*.cpp and csrc/*.cu, `-DHRFAST_WITH_CUDA`; nvcc must match the CUDA
  version torch was built with. Runs the kernels on CUDA tensors.
- the host build (`with_cuda=False`): csrc/*.cpp only, g++; runs the CUDA kernels and launchers themselves
  (the same `__host__ __device__` kernel code, csrc/fuse_kernels.h, and launchers, csrc/fuse_launchers.h) on
  CPU tensors through an emulation of the CUDA grid (csrc/fuse_cpu.cpp). A test vehicle for the CUDA code on
  machines without a GPU, not a CPU backend (it is not fast).

Either is compiled on first use (JIT, `torch.utils.cpp_extension.load` with ninja) into a cache folder keyed by
the torch and Python versions (`HRFAST_BUILD_DIR` overrides it), under a file lock so that several processes
(DDP ranks, pytest workers) build once; a one-line message says so while it compiles. Only the .cpp/.cu
files are passed to cpp_extension (its in-process version hash covers them alone); the csrc headers are
tracked by ninja's depfiles, and ninja runs in every new process, so editing a header rebuilds what includes
it (tests/test_csrc_build.py checks that ninja lists them). An ahead-of-time build (`HRFAST_BUILD_CUDA=1 pip
install .`, see setup.py) installs `hrfast._C`, which is used instead when present.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Tuple

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
DEFAULT_ARCHS = "8.0;9.0"  # A100, H100/H200; TORCH_CUDA_ARCH_LIST overrides


class BuildError(RuntimeError):
    """The extension cannot be built or loaded here; the message says why."""


def sources(with_cuda: bool) -> List[str]:
    """The csrc files of one build, sorted (.cu files only in the CUDA build)."""
    if not CSRC.is_dir():
        raise BuildError(f"hrfast's C++ sources are not at {CSRC}: JIT builds need a source checkout "
                         "(pip install -e .), or build ahead of time with HRFAST_BUILD_CUDA=1 pip install .")
    files = sorted(glob.glob(str(CSRC / "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(str(CSRC / "*.cu")))
    if not files:
        raise BuildError(f"no C++ sources in {CSRC}")
    return files


def compile_flags(with_cuda: bool) -> Tuple[List[str], List[str]]:
    """(cxx flags, nvcc flags). No fast-math: the kernels must match PyTorch's index selection bit for bit.
    No -std: torch's cpp_extension picks the standard its headers need (C++17 up to torch 2.1x, C++20 later)."""
    define = ["-DHRFAST_WITH_CUDA"] if with_cuda else []
    cxx = ["-O3", *define]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *define]
    return cxx, nvcc


# ------------------------------------------------------------------------------------------------ toolkit


def _pip_toolkit() -> Optional[str]:
    """The CUDA toolkit installed from PyPI (nvidia-cuda-nvcc), if it has nvcc."""
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for home in sorted(glob.glob(os.path.join(site, "nvidia", "cu*"))):
            if os.path.isfile(os.path.join(home, "bin", "nvcc")):
                return home
    return None


def cuda_home() -> Optional[str]:
    """CUDA_HOME / CUDA_PATH if set, else a PyPI toolkit, else the nvcc on PATH's toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    return _pip_toolkit() or _cpp_extension().CUDA_HOME


def _cpp_extension():
    """torch.utils.cpp_extension, imported with CUDA_HOME set when we know the toolkit (it looks for one at
    import time). Its import-time warning "No CUDA runtime is found" is expected on a machine without a GPU
    (the toolkit compiles and links there), so it is silenced."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or _pip_toolkit()
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with _environ({"CUDA_HOME": home} if home else {}):
            from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def nvcc_version(home: Optional[str]) -> Optional[str]:
    """'major.minor' of `home`/bin/nvcc, or None when there is none."""
    if not home:
        return None
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def toolkit_problem() -> Optional[str]:
    """Why the CUDA build cannot be compiled here, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    home = cuda_home()
    version = nvcc_version(home)
    if version is None:
        return (f"no nvcc found (CUDA_HOME={home}); install the CUDA toolkit matching torch.version.cuda="
                f"{torch.version.cuda}, e.g. pip install 'nvidia-cuda-nvcc=={torch.version.cuda}.*' "
                f"'nvidia-nvvm=={torch.version.cuda}.*', and set CUDA_HOME")
    wanted = ".".join(torch.version.cuda.split(".")[:2])
    same_major = version.split(".")[0] == wanted.split(".")[0]
    if not same_major or (version != wanted and _strict_version()):
        return (f"nvcc {version} at {home} does not match torch.version.cuda={torch.version.cuda} "
                "(set CUDA_HOME to a matching toolkit)")
    if not glob.glob(os.path.join(home, "lib64", "libcudart.so*")):
        return (f"{home}/lib64/libcudart.so is missing (a PyPI toolkit needs two links: "
                "lib/libcudart.so -> libcudart.so.<major> and lib64 -> lib)")
    return None


def _strict_version() -> bool:
    # the headers of a newer minor toolkit than nvcc are rejected ("incompatible"), so require the same minor
    return os.environ.get("HRFAST_ALLOW_NVCC_MINOR_MISMATCH", "0") != "1"


# ------------------------------------------------------------------------------------------------ building


def build_dir(with_cuda: bool) -> Path:
    """Cache folder of one build: a change of torch, CUDA or Python gets a fresh one."""
    root = os.environ.get("HRFAST_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hrfast")
    key = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}".replace("+", "_")
    path = Path(root) / key / ("cuda" if with_cuda else "host")
    path.mkdir(parents=True, exist_ok=True)
    return path


def extension_name(with_cuda: bool) -> str:
    return "hrfast_csrc_cuda" if with_cuda else "hrfast_csrc_host"


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive file lock (fcntl), so concurrent processes build one after the other and the later ones
    find the finished build in the cache."""
    import fcntl

    with open(path / "hrfast.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(with_cuda: bool, verbose: bool = False) -> ModuleType:
    """Compile (if needed) and import one build of the extension. Needs no GPU, only the toolkit for CUDA."""
    if with_cuda:
        problem = toolkit_problem()
        if problem:
            raise BuildError(f"cannot build hrfast's CUDA extension: {problem}")
    cpp_extension = _cpp_extension()

    name, folder = extension_name(with_cuda), build_dir(with_cuda)
    cxx, nvcc = compile_flags(with_cuda)
    env = {}
    if with_cuda:
        home = cuda_home()
        cpp_extension.CUDA_HOME = home  # read by cpp_extension at import time; the toolkit may be a PyPI one
        env = {"CUDA_HOME": home, "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)}
    with _locked(folder), _environ(env):
        if not verbose and not (folder / f"{name}.so").exists():
            what = "CUDA extension (nvcc)" if with_cuda else "host build of the CUDA kernels' C++"
            print(f"hrfast: compiling the {what} once, into {folder}; this takes a few minutes...",
                  file=sys.stderr, flush=True)
        try:
            return cpp_extension.load(name=name, sources=sources(with_cuda), extra_cflags=cxx,
                                      extra_cuda_cflags=nvcc, build_directory=str(folder), verbose=verbose,
                                      with_cuda=with_cuda)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            raise BuildError(f"building hrfast's {'CUDA' if with_cuda else 'host'} extension failed in {folder} "
                             f"(rerun with verbose=True for the compiler output): {exc}") from exc


@contextlib.contextmanager
def _environ(values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def precompiled() -> Optional[ModuleType]:
    try:
        from hrfast import _C  # built ahead of time by setup.py with HRFAST_BUILD_CUDA=1
    except ImportError:
        return None
    return _C


@functools.lru_cache(maxsize=None)
def load(with_cuda: bool) -> ModuleType:
    """The extension module for CUDA tensors (`with_cuda=True`) or for the host test path; cached.
    The ahead-of-time build serves both (it holds the host build's grid emulation too)."""
    module = precompiled()
    if module is not None:
        return module
    return build(with_cuda)
