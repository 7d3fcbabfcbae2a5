"""A static GPU performance instrument: what a kernel will do on a GPU this machine does not have.

Record the launches the launchers make (`record`, on meta tensors), compile each variant for the target
(`compile`: registers, spills, shared memory, SASS), count its instructions per loop (`sass`), and predict its
time and occupancy from one table of architecture figures (`model`, `arch`). See ../shared/PERF_METHOD.md.

`python -m hrfast inspect` (`inspect`) does it for a whole patched model: `opcalls` attributes every launch and
every ATen op hrfast runs to its fused op call, `workload` knows each kernel's loops, dots and bytes (the table
to update when a kernel changes), `eager` models what the fused ops replace (eager PyTorch, torch.compile),
`cuda_cpp` the CUDA C++ kernels' launches, `report` renders it. `benchmarks/calibrate.py` measures the same op
calls on a GPU.
"""
from .arch import A100, ARCHS, H100, H200, Arch, get_arch
from .model import Occupancy, Prediction, launch_failure, occupancy, predict
from .sass import Kernel, Loop, parse_sass
