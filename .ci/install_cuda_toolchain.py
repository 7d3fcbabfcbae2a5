"""Install, from PyPI, the CUDA compiler that matches torch.version.cuda, so that csrc/ compiles and links on a
machine without a GPU (see ../shared/TOOLCHAIN.md). Prints the CUDA_HOME to use on stdout.

The PyPI toolkit (nvidia-cuda-nvcc, nvidia-nvvm, nvidia-cuda-crt and nvidia-cuda-cccl, pinned to torch's
major.minor: a newer nvvm's PTX is rejected by the older ptxas, newer headers by the older nvcc) lands in site-packages/nvidia/cu<major>, next to the runtime torch already
installed; torch's cpp_extension also wants lib64/libcudart.so, hence two links.
"""
import os
import subprocess
import sys
import sysconfig

import torch


def main() -> int:
    cuda = torch.version.cuda
    if cuda is None:
        print(f"torch {torch.__version__} is a CPU-only build: no CUDA extension can be built against it",
              file=sys.stderr)
        return 1
    major, minor = cuda.split(".")[:2]
    if int(major) < 13:
        print(f"torch.version.cuda={cuda}: this script knows the PyPI layout of CUDA 13+ only", file=sys.stderr)
        return 1
    # nvcc's headers come in separate wheels too: crt (the compiler's runtime headers) and cccl (<nv/target>,
    # included by cuda_fp16.h); unpinned they drift to a newer release than nvcc
    pins = [f"nvidia-{name}=={major}.{minor}.*" for name in ("cuda-nvcc", "nvvm", "cuda-crt", "cuda-cccl")]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *pins], check=True, stdout=sys.stderr)
    home = os.path.join(sysconfig.get_paths()["platlib"], "nvidia", f"cu{major}")
    lib = os.path.join(home, "lib")
    if not os.path.exists(os.path.join(lib, "libcudart.so")):
        os.symlink(f"libcudart.so.{major}", os.path.join(lib, "libcudart.so"))
    if not os.path.exists(os.path.join(home, "lib64")):
        os.symlink("lib", os.path.join(home, "lib64"))
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        print(f"no nvcc at {home}/bin after installing {pins}", file=sys.stderr)
        return 1
    print(home)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
