"""Compile kernels for a GPU this machine does not have, and read what the compiler says about them.

Triton: `triton.compile(ASTSource(...), target=GPUTarget("cuda", sm, 32))` runs the whole pipeline down to the
cubin on the CPU. Its own ptxas run's log (`-v`: registers, spills, stack) is captured with Triton's
`dump_ptxas_log` knob and a forced recompile, so the figures are those of the very cubin whose SASS is read
(`cuobjdump -sass`, shipped in the triton wheel beside ptxas). Shared memory is `metadata.shared`, the dynamic
shared memory Triton asks for at launch and checks against the device's per-block limit.

CUDA C++: `nvcc -arch=sm_XX -cubin -Xptxas -v`, per kernel of the file.

Both cache their results as JSON under `HRFAST_PERF_CACHE` (default ~/.cache/hrfast/perf), keyed on everything
that determines the binary: the kernel's source hash (Triton's `cache_key`, which covers the @jit functions it
calls; for CUDA C++ the file and the headers beside it), signature, constants, options, target and compiler.
Compile after leaving `record()`: while recording, the kernels' globals name recorders.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from .record import Launch, Specialization

CACHE_ENV = "HRFAST_PERF_CACHE"
CACHE_VERSION = 1  # bump when Compiled's fields or their meaning change

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclass
class Compiled:
    """Compiler facts about one kernel binary for one target (sizes in bytes, registers per thread)."""

    name: str
    sm: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int  # per block: Triton's metadata.shared; for CUDA C++ the static shared memory ptxas reports
    num_warps: Optional[int]  # Triton's (after its own passes); None for CUDA C++ (the launcher's block size)
    sass: str


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hrfast" / "perf")


def _cache_path(key: str) -> Path:
    return cache_dir() / f"{key}.json"


def _cached(key: str, make) -> list:
    """The cached list of Compiled for `key`, made (and stored atomically) if absent."""
    path = _cache_path(key)
    if path.exists():
        return [Compiled(**entry) for entry in json.loads(path.read_text())]
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps([dataclasses.asdict(c) for c in result]))
    os.replace(tmp, path)
    return result


def _hash(*parts) -> str:
    return hashlib.sha256(repr((CACHE_VERSION, *parts)).encode()).hexdigest()[:32]


def triton_tool(name: str) -> str:
    """A binary the triton wheel ships for NVIDIA (ptxas, cuobjdump, nvdisasm)."""
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def disassemble(cubin: bytes) -> str:
    """`cuobjdump -sass` of a cubin, the encoding-only lines left out."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([triton_tool("cuobjdump"), "-sass", str(path)], check=True, capture_output=True,
                              text=True).stdout
    return "\n".join(line for line in text.splitlines() if not re.match(r"^\s*/\* 0x[0-9a-f]+ \*/\s*$", line))


def parse_ptxas_log(log: str) -> Dict[str, dict]:
    """Per entry function of a `ptxas -v` log: registers, spill_stores, spill_loads, stack, shared (static)."""
    entries: Dict[str, dict] = {}
    entry = properties = None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            entry = entries.setdefault(match.group(1), {"registers": 0, "spill_stores": 0, "spill_loads": 0,
                                                        "stack": 0, "shared": 0})
        elif match := _PROPERTIES.search(line):
            properties = entries.get(match.group(1))  # None for a non-inlined device function
        elif (match := _FRAME.search(line)) and properties is not None:
            properties.update(stack=int(match.group(1)), spill_stores=int(match.group(2)),
                              spill_loads=int(match.group(3)))
        elif (match := _USED.search(line)) and entry is not None:
            entry.update(registers=int(match.group(1)), shared=int(match.group(2) or 0))
    return entries


# ---------------------------------------------------------------------------------------------------- Triton


def _stable(value) -> str:
    """A value's identity across processes (a @jit function passed as a constant by its source hash)."""
    return getattr(value, "cache_key", None) or repr(value)


def compile_triton(fn, spec: Specialization, options: dict, sm: int, sass: bool = True) -> Compiled:
    """Compile one kernel variant for sm_<sm> (cached). With `sass=False` the SASS is left out (empty) unless
    ptxas reports spills: disassembling takes about half of a small kernel's compile, and only a spill check
    needs it (where the spills are); an entry with SASS serves such a call too."""
    import triton
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise TypeError(f"{fn.__name__} is not compiled by Triton here (TRITON_INTERPRET=1?): compile in a "
                        "process that imports triton without TRITON_INTERPRET")
    key = _hash("triton", triton.__version__, fn.cache_key, repr(spec.signature),
                sorted((path, _stable(v)) for path, v in spec.constexprs.items()), sorted(spec.attrs.items()),
                sorted(options.items()), sm)
    if not sass and not _cache_path(key).exists():
        key = _hash(key, "SASS of spilling binaries only")
    return _cached(key, lambda: [_compile_triton(fn, spec, options, sm, sass)])[0]


def _compile_triton(fn, spec: Specialization, options: dict, sm: int, sass: bool) -> Compiled:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and leave no log
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(ASTSource(fn, spec.signature, spec.constexprs, spec.attrs),
                                target=GPUTarget("cuda", sm, 32), options=options)
    ptxas = parse_ptxas_log(log.getvalue())[kernel.metadata.name]
    spills = ptxas["spill_stores"] + ptxas["spill_loads"]
    return Compiled(name=fn.__name__, sm=sm, registers=ptxas["registers"], spill_stores=ptxas["spill_stores"],
                    spill_loads=ptxas["spill_loads"], stack=ptxas["stack"], shared=kernel.metadata.shared,
                    num_warps=kernel.metadata.num_warps,
                    sass=disassemble(kernel.asm["cubin"]) if sass or spills else "")


def compile_launch(launch: Launch, sm: int = 90, sass: bool = True) -> Compiled:
    """Compile a recorded launch as Triton's JIT would on an sm_<sm> GPU (cached; `sass`: see compile_triton)."""
    return compile_triton(launch.fn, launch.specialization(), launch.options, sm, sass)


def compile_launches(launches: Iterable[Launch], sm: int = 90) -> List[tuple]:
    """(launch, Compiled) for each distinct variant among `launches`, in first-seen order; the first launch of a
    variant stands for the others (they differ only in grid and runtime values)."""
    variants = {}
    for launch in launches:
        variants.setdefault(launch.variant_key(), launch)
    return [(launch, compile_launch(launch, sm)) for launch in variants.values()]


# -------------------------------------------------------------------------------------------------- CUDA C++


def cuda_home() -> str:
    """CUDA_HOME, else the PyPI toolkit beside torch (nvidia-cuda-nvcc), else the nvcc on PATH's toolkit."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    site = sysconfig.get_paths()["purelib"]
    pip = sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "bin", "nvcc")))
    nvcc = pip[-1] if pip else shutil.which("nvcc")
    if not nvcc:
        raise FileNotFoundError("no nvcc: set CUDA_HOME or install nvidia-cuda-nvcc matching torch.version.cuda")
    return str(Path(nvcc).resolve().parents[1])


def torch_extension_flags() -> List[str]:
    """The include paths and flags torch's cpp_extension compiles a .cu with (torch 2.14: C++20)."""
    from torch.utils import cpp_extension
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    return [*(f"-I{d}" for d in includes), *cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20"]


def compile_cuda(source: str, sm: int = 90, flags: Sequence[str] = ()) -> Dict[str, Compiled]:
    """Every kernel of a .cu file compiled with `nvcc -arch=sm_<sm> -cubin -Xptxas -v <flags>`, by (mangled)
    name (cached on the file, the headers in its folder, the flags and nvcc's version)."""
    home = cuda_home()
    nvcc = os.path.join(home, "bin", "nvcc")
    version_text = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True).stdout
    folder = Path(source).parent
    texts = [Path(source).read_text()] + [p.read_text() for p in sorted(folder.glob("*.h")) + sorted(
        folder.glob("*.cuh"))]
    key = _hash("nvcc", version_text, hashlib.sha256("\0".join(texts).encode()).hexdigest(), sm, list(flags))
    command = [nvcc, f"-arch=sm_{sm}", "-cubin", "-Xptxas", "-v", *flags]
    return {c.name: c for c in _cached(key, lambda: _compile_cuda(command, source, sm))}


def _compile_cuda(command: List[str], source: str, sm: int) -> List[Compiled]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernels.cubin"
        proc = subprocess.run([*command, source, "-o", str(cubin)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(command)} {source}):\n{proc.stderr[-6000:]}")
        sass_by_name = _split_functions(disassemble(cubin.read_bytes()))
    return [Compiled(name=name, sm=sm, num_warps=None, sass=sass_by_name.get(name, ""), **facts)
            for name, facts in parse_ptxas_log(proc.stdout + proc.stderr).items()]


def _split_functions(sass: str) -> Dict[str, str]:
    """A multi-kernel SASS listing cut into one listing per function."""
    pieces = re.split(r"(?m)^(?=\s*Function\s*:)", sass)
    return {re.search(r"Function\s*:\s*(\S+)", p).group(1): p for p in pieces if re.search(r"Function\s*:", p)}

