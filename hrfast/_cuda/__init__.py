"""hrfast's CUDA C++ backend ("cuda_cpp"): the extension built from `csrc/` (`build`) and its launchers (`fuse`).

Nothing here imports torch's cpp_extension, compiles or queries CUDA at import time; what is available is
`hrfast.backends`' business.
"""
from .build import BuildError

__all__ = ["BuildError"]
