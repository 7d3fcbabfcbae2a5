"""The CUDA C++ fusion kernels (csrc/, backend "cuda_cpp") for the same fusion op calls, modelled.

Their launches are made by C++ (csrc/fuse_launchers.h), so they are derived here from each recorded op call's
plan and shapes, following csrc/README.md: blocks of 32 x 8 threads, grid z = image.
- forward: `PhaseKernel<PACK>` in NCHW when every term is output-size or nearest / bilinear (no align_corners)
  by a factor f in {2, 4, 8} from a source of exactly H / f x W / f, some term by 4 or more, and the modes and
  factors are one of the compiled packs (PHASE_PACKS): a G x G output block of one channel per thread (G the
  largest factor), one launch; else `ForwardTileKernel<PACK>` when the terms' modes are one of the compiled packs (FORWARD_PACKS, at
  most 4 terms) and the offsets fit in int32: 2 x 8 output pixels (2 rows) per thread, one launch; in
  channels_last with the channels a multiple of 16 bytes' worth (VEC_BYTES; strides and alignment are assumed
  to follow, as for tensors from torch's allocator) `ForwardVecKernel<PACK>` instead: 16-byte channel vectors
  of VPX pixels of a row per thread; else the generic `ForwardKernel` (one element per thread over a
  [channels x pixels] tile, one launch per 8 terms);
- backward (training): one `BackwardSameKernel` launch for the output-size terms (kPB = 8 pixels of a row
  per thread; dx_k = g * scale_k, block reductions for dscale / dshift), and one `AdjointKernel<KMAX, MODE>`
  per upsampled term gathering its window of grad_y (masked by y > 0 on the fly: grad_y and y are read, no g
  buffer): KMAX the register variant for exact windows (ratio 1/2^k, bilinear without align_corners, or
  nearest) exactly KMAX = 4 / 8 / 16 taps wide (2 / 4 / 8 for nearest) and at most as high, int32 offsets,
  32 / KMAX (at most 8) source pixels of a row per thread sharing the union of their windows, MODE its mode,
  or ADJOINT_TENT (3, the phase form: compile-time tent weights, runtime flags only for the image's first and
  last rows and columns) for bilinear without align_corners by the same f on both axes with g exactly f times
  the source and whole rows of 32 / KMAX-pixel segments; KMAX 0 the generic one (one source pixel per thread).
  Where at least two terms take the phase form with factors, in term order, of ROW_PACKS (x2 x4 x8, x2 x4)
  and W / ROW_L segments per row that divide, or are divided by, a block's 32 (channels_last 8): one
  `RowAdjointKernel<PACK>` launch for them instead (`adjoint_row_group`): grad_y and y read once for all
  of them, a thread per ROW_L = 16 output columns of one source row of the coarsest term (the finer terms'
  rows under it), the partial sums of each term into the rows its own launch would write.
The kernel names are `KernelName`s: the struct (the workload.CUDA_KERNELS key) carrying its extra template
arguments as mangled (`mangled_name` finds the instantiation). Compulsory bytes are counted as for the Triton
kernels (each tensor once). The kernels are compiled with nvcc for the target (`compile.compile_cuda`, the
extension's own flags); their trip counts are `workload.CUDA_KERNELS`'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from .opcalls import OpCall

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "fuse_cuda.cu"
BLOCK_X, BLOCK_Y, MAX_TERMS = 32, 8, 8  # csrc/fuse_kernels.h kBX, kBY, kMaxTerms
PX, ROWS = 8, 2  # csrc/fuse_kernels.h kPX, kRows: output pixels per row and rows per thread, ForwardTileKernel
VPX, VEC_BYTES = 4, 16  # csrc/fuse_kernels.h kVPX, kVec: pixels per thread and vector bytes, ForwardVecKernel
PB = 16  # csrc/fuse_kernels.h kPB: output pixels per thread in BackwardSameKernel
PS = 8  # csrc/fuse_kernels.h adjoint_ps: source pixels per thread in the register AdjointKernel (32 / KMAX from 8)
# csrc/fuse_kernels.h kForwardPacks (s same, n nearest, b bilinear), and AdjointKernel's register windows
FORWARD_PACKS = ("s", "ss", "sb", "sss", "ssb", "sbb", "ssss", "sssb", "ssbb", "sbbb")
# csrc/fuse_kernels.h kPhasePacks: (modes, factors) of PhaseKernel
PHASE_PACKS = (("sbbb", "1248"), ("ssbb", "1124"), ("sbb", "124"), ("snnn", "1248"), ("ssnn", "1124"),
               ("snn", "124"))
ADJOINT_WINDOWS = {2: (4, 8, 16), 1: (2, 4, 8)}  # by mode: bilinear, nearest (exact windows)
ADJOINT_TENT = 3  # csrc/fuse_kernels.h: AdjointKernel's MODE for the phase form of bilinear (adjoint_row_tent)
INT32_SPAN = 1 << 30  # csrc/fuse_launchers.h fits_int32
# csrc/fuse_kernels.h kRowL (output columns per thread of RowAdjointKernel) and kRowPacks (its terms' factors)
ROW_L = 16
ROW_PACKS = ((2, 4, 8), (2, 4))

# the template arguments <scalar_t, acc_t> as they appear in the mangled kernel names
_MANGLED_TYPES = {torch.float32: "IffEE", torch.float64: "IddEE", torch.bfloat16: "IN3c108BFloat16EfEE",
                  torch.float16: "IN3c104HalfEfEE"}


class KernelName(str):
    """A kernel struct's name (the workload.CUDA_KERNELS key) with its extra template arguments as nvcc mangles
    them (e.g. "Lj37E" for the uint32 37), "" for none."""

    template_args: str

    def __new__(cls, name: str, template_args: str = ""):
        obj = super().__new__(cls, name)
        obj.template_args = template_args
        return obj


def pack_code(modes: str, factors: str = "") -> int:
    """csrc/fuse_kernels.h pack_code: the count in bits 0-3, term k's mode in bits 4 + 2k; with `factors`
    phase_code: term k's log2 factor in bits 16 + 2k."""
    code = len(modes)
    for k, m in enumerate(modes):
        code |= "snb".index(m) << (4 + 2 * k)
    for k, f in enumerate(factors):
        code |= "1248".index(f) << (16 + 2 * k)
    return code


def row_code(factors) -> int:
    """csrc/fuse_kernels.h row_code: the count in bits 0-3, term k's log2 factor in bits 4 + 2k."""
    code = len(factors)
    for k, f in enumerate(factors):
        code |= (f.bit_length() - 1) << (4 + 2 * k)
    return code


def _phase_factor(ratio) -> int:
    """csrc/fuse_launchers.h power_of_2_factor: f where the ratio is exactly 1 / f, f in {2, 4, 8}, else 0."""
    num, den = ratio
    if num <= 0 or den % num:
        return 0
    f = den // num
    return f if f in (2, 4, 8) else 0


def phase_pack(plan, shapes, out_shape):
    """csrc/fuse_launchers.h phase_pack for dense tensors from torch's allocator (strides and alignment follow):
    (modes, factors, G) of the PhaseKernel pack that runs the call, or None."""
    N, C, H, W = out_shape
    if plan.channels_last and C > 1 or not 0 < len(plan.terms) <= 4:
        return None
    modes, factors = "", ""
    for shape, t in zip(shapes, plan.terms):
        f = 1
        if t.mode != 0:
            f = _phase_factor(t.ratio_h)
            if not f or _phase_factor(t.ratio_w) != f or (t.mode == 2 and t.align_corners):
                return None
            if shape[2] * f != H or shape[3] * f != W:
                return None
        modes += "snb"[t.mode]
        factors += str(f)
    G = max(int(f) for f in factors)
    if G < 4 or H % G or W % G or (modes, factors) not in PHASE_PACKS:
        return None
    return modes, factors, G


@dataclass
class CudaLaunch:
    """One modelled launch: the kernel struct, its grid's warps, compulsory bytes and the trip-table params."""

    kernel: str  # ForwardKernel, BackwardSameKernel, AdjointKernel
    phase: str
    warps: int
    bytes: int
    params: Dict[str, int]


def mangled_name(names: Sequence[str], kernel: str, dtype: torch.dtype) -> str:
    """The compiled kernel of struct `kernel` (a KernelName: with its extra template arguments) for `dtype`
    among nvcc's (mangled) names."""
    types = _MANGLED_TYPES[dtype]
    token = kernel + types[:-2] + getattr(kernel, "template_args", "") + types[-2:]
    matches = [n for n in names if token in n]
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} compiled kernels match {token}: csrc changed, update cuda_cpp.py")
    return matches[0]


def _warps(channels_last: bool, C: int, pixels: int, N: int) -> int:
    """fuse_launchers.h grid_for: blocks of 8 warps."""
    along_pixels = BLOCK_Y if channels_last else BLOCK_X
    along_channels = BLOCK_X if channels_last else BLOCK_Y
    return math.ceil(pixels / along_pixels) * math.ceil(C / along_channels) * N * (BLOCK_X * BLOCK_Y // 32)


def _window(ratio, mode: int, align: bool, n_out: int) -> int:
    """fuse_launch.h window(): the adjoint's gather length along one axis."""
    num, den = ratio
    if num == 1 and den & (den - 1) == 0 and not (mode == 2 and align):
        return den if mode == 1 else 2 * den
    r = num / den
    if r <= 0:
        return n_out
    return int(min(n_out + 2, math.ceil((1 / r if mode == 1 else 2 / r)) + 5))


def launches(call: OpCall, training: bool) -> List[CudaLaunch]:
    """The CUDA launches of one fusion op call (forward; with `training` also backward, every gradient)."""
    plan, shapes = call.plan, call.inputs
    size = torch.empty((), dtype=call.dtype).element_size()
    N, C = shapes[0][:2]
    H, W = plan.size
    out = N * C * H * W
    cl = plan.channels_last
    warps = _warps(cl, C, H * W, N)
    terms = list(zip(shapes, plan.terms))
    result = []
    modes = "".join("snb"[t.mode] for t in plan.terms)
    fits = all(_span(s) < INT32_SPAN for s in [*shapes, (N, C, H, W)])
    vec = VEC_BYTES // size
    phase = phase_pack(plan, shapes, (N, C, H, W)) if fits else None
    if phase is not None:
        G = phase[2]
        threads = C * (H // G) * (W // G)
        elems = sum(math.prod(s) for s in shapes) + out
        result.append(CudaLaunch(KernelName("PhaseKernel", f"Lj{pack_code(phase[0], phase[1])}E"), "forward",
                                 math.ceil(threads / (BLOCK_X * BLOCK_Y)) * N * (BLOCK_X * BLOCK_Y // 32),
                                 elems * size, dict(count=len(modes), elements=out)))
        starts = []
    elif modes in FORWARD_PACKS and fits and cl and C % vec == 0:
        threads = C // vec * H * math.ceil(W / VPX)
        elems = sum(math.prod(s) for s in shapes) + out
        result.append(CudaLaunch(KernelName("ForwardVecKernel", f"Lj{pack_code(modes)}E"), "forward",
                                 math.ceil(threads / (BLOCK_X * BLOCK_Y)) * N * (BLOCK_X * BLOCK_Y // 32),
                                 elems * size, dict(count=len(modes), elements=out)))
        starts = []
    elif modes in FORWARD_PACKS and fits:
        threads = C * math.ceil(H / ROWS) * math.ceil(W / PX)
        elems = sum(math.prod(s) for s in shapes) + out
        result.append(CudaLaunch(KernelName("ForwardTileKernel", f"Lj{pack_code(modes)}E"), "forward",
                                 math.ceil(threads / (BLOCK_X * BLOCK_Y)) * N * (BLOCK_X * BLOCK_Y // 32),
                                 elems * size, dict(count=len(modes), elements=out)))
        starts = []
    else:
        starts = range(0, len(terms), MAX_TERMS)
    for start in starts:
        group = terms[start:start + MAX_TERMS]
        elems = sum(math.prod(s) for s, _ in group) + out * (2 if start else 1)
        result.append(CudaLaunch(KernelName("ForwardKernel"), "forward", warps, elems * size,
                                 dict(count=len(group), elements=out)))
    if training:
        result += _backward(terms, N, C, H, W, cl, out, size, fits)
    return result


def _span(shape) -> int:
    """Elements spanned by a dense tensor of `shape` (either layout)."""
    return math.prod(shape)


def _adjoint_ps(kmax: int) -> int:
    """csrc/fuse_kernels.h adjoint_ps: source pixels of a row per thread in the register AdjointKernel."""
    return 32 // kmax if kmax >= 8 else PS


def adjoint_row_group(terms, H: int, W: int, cl: bool, fits: bool) -> List[int]:
    """csrc/fuse_launchers.h adjoint_row_group for dense tensors (every term's gradient in one layout): the
    positions in `terms` ((shape, TermPlan) of the upsampled terms) that one RowAdjointKernel launch takes, the
    longest run from the first in the phase form (ADJOINT_TENT) of at least two whose factors, in order, are one
    of ROW_PACKS, where S = W / ROW_L segments per row and the block's segments along the row (32, channels_last
    8) divide one another; [] otherwise."""
    phased = [i for i, (shape, t) in enumerate(terms) if _adjoint_choice(shape, t, H, W, fits)[1] == ADJOINT_TENT]
    S, along = W // ROW_L, BLOCK_Y if cl else BLOCK_X
    for n in range(min(len(phased), 3), 1, -1):
        factors = tuple(W // terms[i][0][3] for i in phased[:n])
        if factors in ROW_PACKS and W % ROW_L == 0 and (S % along == 0 or along % S == 0):
            return phased[:n]
    return []


def _adjoint_choice(shape, t, H: int, W: int, fits: bool):
    """csrc/fuse_launchers.h adjoint_choice: (KMAX, MODE) of a term's AdjointKernel."""
    k_h = _window(t.ratio_h, t.mode, t.align_corners, H)
    k_w = _window(t.ratio_w, t.mode, t.align_corners, W)
    exact = all(num == 1 and den & (den - 1) == 0 for num, den in (t.ratio_h, t.ratio_w)) and not (
        t.mode == 2 and t.align_corners)
    windows = ADJOINT_WINDOWS.get(t.mode, ()) if fits and exact and k_h <= k_w else ()
    kmax = k_w if k_w in windows else 0  # the window exactly KMAX wide
    mode = t.mode if kmax else 0
    if kmax and t.mode == 2 and t.ratio_h == t.ratio_w and shape[2] * k_h // 2 == H and (
            shape[3] * k_w // 2 == W and shape[3] % _adjoint_ps(kmax) == 0):
        mode = ADJOINT_TENT  # the phase form: g exactly f times the source, whole rows of segments
    return kmax, mode


def _backward(terms, N, C, H, W, cl, out, size, fits) -> List[CudaLaunch]:
    same = [(s, t) for s, t in terms if t.mode == 0]
    result = []
    if same:
        dscale = sum(t.has_scale for _, t in same)
        slots = dscale + any(t.has_shift for _, t in same)
        elems = 2 * out + out * (len(same) + dscale)  # grad_y, y, every dx_k, x_k for dscale
        segments = H * math.ceil(W / PB)
        blocks = math.ceil(segments / (BLOCK_Y if cl else BLOCK_X)) * math.ceil(C / (BLOCK_X if cl else BLOCK_Y)) * N
        result.append(CudaLaunch(KernelName("BackwardSameKernel"), "backward", blocks * BLOCK_X * BLOCK_Y // 32,
                                 elems * size,
                                 dict(count=len(same), slots=slots, elements=out)))
    upsampled = [(k, shape, t) for k, (shape, t) in enumerate(terms) if t.mode != 0]
    group = [upsampled[i] for i in adjoint_row_group([(s, t) for _, s, t in upsampled], H, W, cl, fits)]
    if group:  # one RowAdjointKernel launch: grad_y and y read once for its terms
        factors = [W // shape[3] for _, shape, _ in group]
        h0, S = H // max(factors), W // ROW_L
        along, chans = (BLOCK_Y, BLOCK_X) if cl else (BLOCK_X, BLOCK_Y)  # segments, channels per block
        blocks = math.ceil(h0 * S / along) * math.ceil(C / chans) * N
        src = [math.prod(shape) * (2 if t.has_scale else 1) for _, shape, t in group]  # dz, z for dscale
        result.append(CudaLaunch(KernelName("RowAdjointKernel", f"Lj{row_code(factors)}E"), "backward",
                                 blocks * BLOCK_X * BLOCK_Y // 32, (2 * out + sum(src)) * size,
                                 dict(count=len(group), terms=sum(1 << k for k, _, _ in group),
                                      elements=sum(math.prod(shape) for _, shape, _ in group))))
    for k, shape, t in upsampled:
        if any(k == g[0] for g in group):
            continue
        e = math.prod(shape)
        elems = 2 * out + e * (2 if t.has_scale else 1)  # grad_y, y, dz, z for dscale
        k_h = _window(t.ratio_h, t.mode, t.align_corners, H)
        k_w = _window(t.ratio_w, t.mode, t.align_corners, W)
        kmax, mode = _adjoint_choice(shape, t, H, W, fits)
        if kmax:  # adjoint_ps(KMAX) source pixels of a row per thread, segments numbered row-major
            segments = shape[2] * math.ceil(shape[3] / _adjoint_ps(kmax))
            blocks = (math.ceil(segments / (BLOCK_Y if cl else BLOCK_X)) * math.ceil(C / (BLOCK_X if cl else BLOCK_Y))
                      * N)
            warps = blocks * BLOCK_X * BLOCK_Y // 32
        else:
            warps = _warps(cl, C, shape[2] * shape[3], N)
        result.append(CudaLaunch(KernelName("AdjointKernel", f"Li{kmax}ELi{mode}E"), "backward", warps, elems * size,
                                 dict(k_h=k_h, k_w=k_w, kmax=kmax, mode=mode, term=k, elements=e)))
    return result


def compile_flags() -> List[str]:
    """The flags the extension is built with (hrfast._cuda.build), torch's includes first."""
    from .._cuda.build import compile_flags as build_flags
    from .compile import torch_extension_flags
    return [*torch_extension_flags(), *build_flags(True)[1]]
