"""`python -m hrfast info`: which backends can run on this machine, and why not.

Reads versions and probes; compiles nothing unless --build is given (which JIT-builds the C++ extension
and reports how long it took).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import List, Tuple


def _versions() -> List[Tuple[str, str]]:
    import torch

    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("torch.version.cuda", str(torch.version.cuda))]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except Exception as exc:  # a broken install may raise anything
        rows.append(("triton", f"not importable ({type(exc).__name__})"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows.append(("GPU", f"{props.name} (sm_{props.major}{props.minor}), {torch.cuda.device_count()} visible"))
    else:
        rows.append(("GPU", "none visible"))
    return rows


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrfast info", description=__doc__.splitlines()[0])
    p.add_argument("--build", action="store_true",
                   help="also compile the C++ extension now (CUDA build if a toolkit is usable, else the host build)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    import torch

    from . import backends

    for name, value in _versions():
        print(f"{name:<20} {value}")
    print()
    for name, usable, reason in backends.status_rows():
        print(f"backend {name!r:<12} {'yes' if usable else 'no ':<4} {reason}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\nbackend='auto' on {device.type} tensors runs: {backends.auto_rule(device)}")
    if args.build:
        from ._cuda.build import BuildError, build, toolkit_problem

        with_cuda = toolkit_problem() is None
        start = time.perf_counter()
        try:
            module = build(with_cuda)
        except BuildError as exc:
            print(f"build failed: {exc}", file=sys.stderr)
            return 1
        print(f"built {module.__name__} ({'CUDA' if with_cuda else 'host'}) in {time.perf_counter() - start:.0f} s: "
              f"{module.__file__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
