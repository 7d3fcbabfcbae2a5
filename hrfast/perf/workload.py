"""What one recorded Triton launch does, from its arguments: the one place that knows each kernel's tiling.

`KERNELS` holds, per kernel name, functions of the launch's bound arguments (`Launch.params`, constexprs
included):

- `trips`: how often one program runs each loop of the kernel's SASS, innermost first (the order of
  `sass.Kernel.loops`), counting outer iterations: `model.dynamic_warp_instructions` multiplies each loop's own
  body by it. Triton unrolls `tl.static_range`, so only `range` loops over runtime bounds remain loops;
- `dots`: the FLOPs of the kernel's `tl.dot`s over the whole grid, at the tile shapes the tensor cores (or, for
  fp32 with input_precision="ieee", the FMA units) execute, padding included;
- `elements`: the elements the launch produces (the per-element figures divide by it): the output, or for
  the head's statistics and backward reduction the [N, M, H, W] values they reduce;
- `unread`: the argument names whose tensors these constexprs leave unread (stand-ins for absent pointers);
- `dot_unit`: which peak the dots run at: "bf16" (fp16/bf16 inputs: tensor cores), "tf32", or "fma" (fp32 with
  input_precision="ieee": FFMAs on the CUDA cores, also counted in the issue term).

`CUDA_KERNELS` is the same for the CUDA C++ kernels of csrc/ (keyed by their kernel struct), whose launches are
made by C++ and so are modelled (`cuda_cpp.py`), not recorded: their params are that model's.

**Update these tables when a kernel changes** (its loops, tiling or dots). A kernel that is not here, or whose
SASS has another number of loops than `trips` gives, is reported with "trip counts unknown": its issue term is
left out rather than guessed. `UNKNOWN` lists kernels deliberately left without an entry.

Bytes are counted in `launch_bytes`: every distinct tensor argument once (read or written), as the number of
distinct elements it spans (dimensions of stride 0 count once: a stride-0 stand-in for an absent tensor spans
one element, ~0 bytes) times its element size; `unread` arguments excluded. That is the compulsory traffic if
every byte a kernel touches crosses HBM exactly once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .record import Launch

Params = Dict[str, object]


@dataclass(frozen=True)
class KernelWork:
    """The table entry of one kernel (see the module docstring)."""

    trips: Callable[[Params], List[float]]
    elements: Callable[[Params], int]
    dots: Callable[[Params], float] = lambda p: 0.0
    unread: Callable[[Params], Sequence[str]] = lambda p: ()
    dot_unit: Callable[[Params], str] = lambda p: _dot_unit(p)


def _dot_unit(p: Params) -> str:
    dtype = p["x0_ptr"].dtype if "x0_ptr" in p else torch.float32
    if dtype in (torch.float16, torch.bfloat16):
        return "bf16"
    return "tf32" if p.get("PRECISION") == "tf32" else "fma"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------- fusion kernels


def _fuse_forward_elements(p: Params) -> int:
    return p["out_ptr"].numel()


def _adjoint_trips(p: Params) -> List[float]:
    """Inner loop (ky) KH * KW times, outer loop (kx) KW times per program; the phase form (PH > 0) has no
    loop (its window unrolled)."""
    if p.get("PH", 0):
        return []
    kh, kw = p["window_h"][0], p["window_w"][0]
    return [kh * kw, kw]


def _adjoint_elements(p: Params) -> int:
    z = p["src"][0]
    return z.shape[0] * p["C"] * z.shape[2] * z.shape[3]


def _adjoint_row_elements(p: Params) -> int:
    """The source pixels of all the row's terms (g's size over each term's factors)."""
    return _row_source_pixels(p["g_ptr"], p["FH"], p["FW"])


def _adjoint_rows_elements(p: Params) -> int:
    """The source pixels of every row's terms (`rows[k][0]`: row k's g)."""
    return sum(_row_source_pixels(row[0], fh, fw) for row, fh, fw in zip(p["rows"], p["FH"], p["FW"]))


def _row_source_pixels(g, fh: Sequence[int], fw: Sequence[int]) -> int:
    N, C, H, W = g.shape
    return sum(N * C * (H // a) * (W // b) for a, b in zip(fh, fw))


def _adjoint_unread(p: Params) -> Sequence[str]:
    unread = [] if p["NEED_DSCALE"] else ["src"]  # z is read only for d(scale)
    if not p["NEED_DZ"]:
        unread.append("dz_ptr")
    if not p["HAS_SCALE"]:
        unread.append("scale_ptr")
    return unread


def _same_elements(p: Params) -> int:
    """The output elements of the launch's rows (`rows[k][0]` is row k's grad_y)."""
    return sum(row[0].numel() for row in p["rows"])


def _reduce_trips(p: Params) -> List[float]:
    """The row loop: output i's programs run cdiv(R_i, BLOCK_R) trips each, those of its channel blocks (the grid
    fits the widest output; the others run none); the mean over the programs."""
    sources = p["sources"]
    blocks = _cdiv(max(c for _, _, _, c in sources), p["BLOCK_C"]) * len(sources)
    return [sum(_cdiv(c, p["BLOCK_C"]) * _cdiv(r, p["BLOCK_R"]) for _, _, r, c in sources) / blocks]


# ----------------------------------------------------------------------------------------- head kernels


def _forward_tiles(p: Params) -> int:
    """The head kernels' 2-D pixel tiles (the forward's) of the whole batch."""
    return _cdiv(p["H"], p["TILE_H"]) * _cdiv(p["W"], p["TILE_W"]) * p["x0_ptr"].shape[0]


def _chunks(p: Params) -> int:
    return _cdiv(p["M"], p["BLOCK_M"])


def _tile_dot_flops(p: Params, width: int) -> float:
    """Dot FLOPs of one M chunk on one tile: [pixels, width] x [width, BLOCK_M] (or transposes of that size),
    width = the summed inner sizes; 3xTF32 runs three dots per product."""
    return (2.0 * p["TILE_H"] * p["TILE_W"] * p["BLOCK_M"] * width
            * (3 if p["PRECISION"] == "tf32x3" else 1))


def _src_width(p: Params) -> float:
    """The summed patch sizes of the U_j dots, in units of `_tile_dot_flops`' width: under 3xTF32 a U exact in
    tf32 (`UEXACT`, kernels/head.py `_dot3_exact`) runs two dots per product, not three."""
    split = p["PRECISION"] == "tf32x3"
    return sum(src * (2 / 3 if split and exact else 1) for src, exact in zip(p["SRC"], p["UEXACT"]))


def _x0_width(p: Params) -> int:
    """x0's inner size in the head's dots: C0P, or C0 rounded up to 16 (C0Q) in the transposed chunk
    (kernels/head.py `TRANSPOSED`: fp32 statistics and backward reduce on sm_90)."""
    return p["C0Q"] if p.get("TRANSPOSED") else p["C0P"]


def _head_reduce_trips(p: Params) -> List[float]:
    """The head's backward reduce's loops. The dense launch: the chunk loop (TILES / SPLITS tiles x chunks),
    the tile loop; the transposed chunk's SASS adds a third: the divergent path of a warp-uniform branch in the
    tile loop (BRA.DIV, a 13-instruction block jumping back into it on sm_90 W48), counted once per tile (an
    upper bound: a uniform warp skips it). The EXACT launch: the exact gathers' chunk loop inside the tile
    loop, both 0 trips on finite inputs (one load of the split's starts finds nothing to redo)."""
    if p["EXACT"]:
        return [0, 0]
    tiles = p["TILES"] / p["SPLITS"]
    return [tiles * _chunks(p), tiles] + ([tiles] if p.get("TRANSPOSED") else [])


def _head_ds_trips(p: Params) -> List[float]:
    """The head's backward ds kernel's loops. FUSED: the dense chunk loop (TILES / SPLITS tiles x chunks), the
    exact gathers' (0 trips on finite inputs), the loop over the split's tiles, twice (two passes). Else (ds
    stored): the dense launch's chunk loop, one tile per program; the EXACT launch's exact chunk loop inside
    the split's tile loop, both 0 trips on finite inputs (one load of the split's starts finds nothing)."""
    if p["FUSED"]:
        return [p["TILES"] / p["SPLITS"] * _chunks(p), 0, p["TILES"] / p["SPLITS"]]
    return [0, 0] if p["EXACT"] else [_chunks(p)]


def _exact_unread(p: Params) -> List[str]:
    """An exact-gather launch (EXACT) on finite inputs reads only the tiles' starts (redo_ptr)."""
    return [name for name in p if name != "redo_ptr"]


def _tile_dot_unit(p: Params) -> str:
    return "tf32" if p["PRECISION"] == "tf32x3" else _dot_unit(p)


def _head_pixels_out(p: Params, channels: int) -> int:
    return p["x0_ptr"].shape[0] * channels * p["H"] * p["W"]


# ------------------------------------------------------------------------------------ batch-norm kernels


def _bn_programs(p: Params) -> List[Tuple[int, tuple]]:
    """(programs, term) of each term of a grouped batch-norm launch (`terms`: per term a tuple ending in its
    program range start, end)."""
    return [(term[-1] - term[-2], term) for term in p["terms"]]


def _bn_stats_trips(p: Params) -> List[float]:
    """Per term k (the SASS holds one copy of the term code each, in term order): the loop over the BLOCK_P tiles
    of a chunk, IMGS x its tiles less the first (peeled: the references) per program; where IMGS is not 1 (an
    argument equal to 1 is a constant: no loop) the loop over the IMGS images around it; MERGED and S not 1:
    then the finalize loop over the S partials (BLOCK_S at a time), run by one program of the S of a channel
    block: cdiv(S, BLOCK_S) / S. As averages over all programs of the launch (a program runs its own term's loops
    only)."""
    terms = _bn_programs(p)
    total = sum(n for n, _ in terms)
    trips = []
    for k, (n, term) in enumerate(terms):
        _, _, _, P, _, S, splits, chunk, imgs = term[:9]
        tiles = _cdiv(P, p["BLOCK_P"][k]) / splits  # per chunk, on average
        trips.append(n / total * (imgs * tiles - 1))
        if imgs != 1:
            trips.append(n / total * imgs)
        if p["MERGED"] and S != 1:
            trips.append(n / total * _cdiv(S, p["BLOCK_S"][k]) / S)
    return trips


def _bn_finalize_trips(p: Params) -> List[float]:
    """Per term: the loop over its S partials BLOCK_S at a time, by the term's programs."""
    terms = _bn_programs(p)
    total = sum(n for n, _ in terms)
    return [n / total * _cdiv(term[3], p["BLOCK_S"]) for n, term in terms]


KERNELS: Dict[str, KernelWork] = {
    # one [BLOCK_C x BLOCK_P] tile per program, every term unrolled (static_range): no loop
    "_fuse_forward_kernel": KernelWork(trips=lambda p: [], elements=_fuse_forward_elements),
    # a step's rows in one launch, program ranges of the 1-D grid (`rows[k][0]`: row k's output)
    "_fuse_forward_rows_kernel": KernelWork(trips=lambda p: [],
                                            elements=lambda p: sum(r[0].numel() for r in p["rows"])),
    # one tile per program, every output-size term unrolled: no loop; a launch holds one or several rows (a
    # step's), program ranges of the 1-D grid like the batch-norm kernels' terms; what a row does not read (y
    # without ReLU) or write (g) is its grad_y passed again (counted once)
    "_fuse_backward_same_kernel": KernelWork(trips=lambda p: [], elements=_same_elements),
    # per program a [BLOCK_C x BLOCK_H x BLOCK_W] tile of source pixels; loops kx < KW (outer), ky < KH; the
    # phase form (PH > 0): one source row of BLOCK_W columns, no loop
    "_upsample_adjoint_kernel": KernelWork(trips=_adjoint_trips, elements=_adjoint_elements,
                                           unread=_adjoint_unread),
    # the phase form for all the upsampled terms of a row (their source pixels are the elements): one coarse
    # source row of BLOCK_Q x L output columns per program, its window's rows and every term unrolled, no loop;
    # what a term does not read is g passed again (counted once)
    "_adjoint_row_kernel": KernelWork(trips=lambda p: [], elements=_adjoint_row_elements),
    # a step's rows' `_adjoint_row_kernel` launches in one, program ranges of the 1-D grid: no loop
    "_adjoint_rows_kernel": KernelWork(trips=lambda p: [], elements=_adjoint_rows_elements),
    # program (channel block, output): a loop over its [R_i, C] partials BLOCK_R rows at a time
    "_reduce_partials_kernel": KernelWork(trips=_reduce_trips,
                                          elements=lambda p: sum(c for _, _, _, c in p["sources"])),
    # The head's tile kernels: one TILE_H x TILE_W pixel tile per program (the backward reduce: a split of them),
    # a loop over the M chunks through the patch dots (x0^T W0^T and one U_j patch_j per upsampled branch), then
    # a second loop over 16-channel chunks with the exact gathers that runs only for a tile whose dense s held
    # NaN or whose patch missed a tap: 0 trips on finite inputs. Statistics: no further dot.
    "_head_stats_kernel": KernelWork(
        trips=lambda p: [_chunks(p), 0], elements=lambda p: _head_pixels_out(p, p["M"]),
        dots=lambda p: _forward_tiles(p) * _chunks(p) * _tile_dot_flops(p, _x0_width(p) + _src_width(p)),
        dot_unit=_tile_dot_unit),
    # + the classifier dot
    "_head_forward_kernel": KernelWork(
        trips=lambda p: [_chunks(p), 0], elements=lambda p: _head_pixels_out(p, p["K"]),
        dots=lambda p: _forward_tiles(p) * _chunks(p) * _tile_dot_flops(p, p["C0P"] + _src_width(p) + p["KP"]),
        unread=lambda p: [] if p["HAS_BC"] else ["bc_ptr"], dot_unit=_tile_dot_unit),
    # program `split` visits TILES / SPLITS tiles (outer loop, innermost last): per tile and chunk also g Wc
    # and g^T a (`_head_reduce_trips`); the EXACT launch reads only the tiles' starts on finite inputs
    "_head_backward_reduce_kernel": KernelWork(
        trips=_head_reduce_trips,
        elements=lambda p: _head_pixels_out(p, p["M"]),
        dots=lambda p: 0.0 if p["EXACT"] else _forward_tiles(p) * _chunks(p) * _tile_dot_flops(
            p, _x0_width(p) + _src_width(p) + 2 * p["KP"]),
        unread=lambda p: _exact_unread(p) if p["EXACT"] else [],
        dot_unit=_tile_dot_unit),
    # FUSED: program `split` visits TILES / SPLITS tiles (outer loop, as the reduce); per tile and chunk also
    # g Wc, then from ds: ds W0 (dx0), ds^T x0 (dW0) and U_j^T ds (the patch partials), ds never written. Else
    # (fp32) one tile per program, ds written (dx0, dW0 and the origins are stand-ins)
    "_head_backward_ds_kernel": KernelWork(
        trips=_head_ds_trips,
        elements=lambda p: _head_pixels_out(p, p["M"]),
        dots=lambda p: 0.0 if p["EXACT"] else _forward_tiles(p) * _chunks(p) * _tile_dot_flops(
            p, (3 * p["C0P"] + 2 * sum(p["SRC"]) if p["FUSED"] else p["C0P"] + _src_width(p)) + p["KP"]),
        unread=lambda p: _exact_unread(p) if p["EXACT"] else
        ([] if p["BATCH_STATS"] else ["alpha_ptr", "beta_ptr"])
        + ([] if p["FUSED"] else ["dx0_ptr", "dw0_ptr", "origin_ptr"]), dot_unit=_tile_dot_unit),
    # one BLOCK_Y x BLOCK_X x BLOCK_M block of one branch's dP per program, the NA x NB candidate patches and the
    # bisections unrolled: no loop
    "_head_patch_gather_kernel": KernelWork(trips=lambda p: [], elements=lambda p: p["out_ptr"].numel()),
    # batch norm (kernels/batch_norm.py): grouped launches, programs [start, end) of the 1-D grid are term k's
    # (`terms[k]`), stand-ins for absent or unread tensors are the term's own tensors (their bytes count once).
    # Statistics: elements: the values of z it reduces; trips: `_bn_stats_trips`
    "_bn_stats_kernel": KernelWork(trips=_bn_stats_trips, elements=lambda p: sum(t[0].numel() for t in p["terms"])),
    # one program per BLOCK_C channels of a term, loop over its S partials BLOCK_S at a time
    "_bn_finalize_kernel": KernelWork(trips=_bn_finalize_trips,
                                      elements=lambda p: sum(t[3] * t[1] for t in p["terms"])),
    # one [BLOCK_C x BLOCK_P] tile per program (dz), no loop; without dz one program per channel block (g_w)
    "_bn_backward_kernel": KernelWork(
        trips=lambda p: [],
        elements=lambda p: sum(t[0].numel() if need else t[6] for t, need in zip(p["terms"], p["NEED_DZ"]))),
}

# csrc/fuse_kernels.h (params: see cuda_cpp.py). ptxas keeps the loops over runtime counts: the generic
# forward's loop over the terms after the first (peeled), the backward's dx loop, then the loop over the
# reduction slots; the generic adjoint's window loops (ky outer, kx inner). The generic kernels' loop bodies
# hold the code of every resample mode (a run-time switch): upper bounds of what a thread executes; the
# tiled forward (ForwardTileKernel<PACK>) and the register adjoint (AdjointKernel<KMAX > 0, MODE>) resolve
# the modes at compile time and unroll everything.
CUDA_KERNELS: Dict[str, KernelWork] = {
    "ForwardKernel": KernelWork(trips=lambda p: [p["count"] - 1], elements=lambda p: p["elements"]),
    # compile-time term pack, kPX pixels per thread: straight-line code
    "ForwardTileKernel": KernelWork(trips=lambda p: [], elements=lambda p: p["elements"]),
    # the same in channels_last, 16-byte channel vectors of kVPX pixels per thread: straight-line code
    "ForwardVecKernel": KernelWork(trips=lambda p: [], elements=lambda p: p["elements"]),
    # power-of-2 upsampling in NCHW, a G x G output block per thread, phases unrolled: straight-line code
    "PhaseKernel": KernelWork(trips=lambda p: [], elements=lambda p: p["elements"]),
    # kPB pixels per thread: the dx loop over the terms unrolled by 2 (remainder peeled), the slots loop
    "BackwardSameKernel": KernelWork(trips=lambda p: [p["count"] // 2, p["slots"]],
                                     elements=lambda p: p["elements"]),
    # KMAX > 0: the window unrolled (no loops), the phase form (MODE 3, compile-time weights) too; 0: the
    # generic gather's two loops
    "AdjointKernel": KernelWork(trips=lambda p: [] if p.get("kmax") else [p["k_h"] * p["k_w"], p["k_h"]],
                                elements=lambda p: p["elements"]),
    # the 2 FM rows and the terms unrolled, the partials' reduction phase unrolled per layout (both counted:
    # an upper bound): straight-line code
    "RowAdjointKernel": KernelWork(trips=lambda p: [], elements=lambda p: p["elements"]),
}

# kernels deliberately without an entry (reported with "trip counts unknown"), with the reason
UNKNOWN: Dict[str, str] = {}


def work(launch: Launch) -> Optional[KernelWork]:
    return KERNELS.get(launch.name)


def trips_for(launch: Launch, sass_loops: int) -> Optional[List[float]]:
    """The trip counts of the launch's SASS loops, or None when unknown (no entry, or the SASS has another
    number of loops than the entry describes: the compiler restructured the kernel, update the table)."""
    entry = work(launch)
    if entry is None:
        return None
    trips = entry.trips(launch.params)
    return trips if len(trips) == sass_loops else None


def dot_flops(launch: Launch) -> Tuple[float, str]:
    """(FLOPs of the launch's dots, the unit they run on: "bf16", "tf32" or "fma")."""
    entry = work(launch)
    if entry is None:
        return 0.0, "fma"
    params = launch.params
    flops = entry.dots(params)
    return flops, entry.dot_unit(params) if flops else "fma"


def elements(launch: Launch) -> Optional[int]:
    entry = work(launch)
    return entry.elements(launch.params) if entry is not None else None


# ----------------------------------------------------------------------------------------------- bytes


def footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor spans: dimensions of stride 0 count once."""
    return math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) * t.element_size() if t.numel() else 0


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def tensor_key(t: torch.Tensor) -> tuple:
    """Identifies the same tensor passed twice, also as two view objects of equal geometry."""
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def launch_bytes(launch: Launch) -> int:
    """Compulsory bytes of one launch (see the module docstring)."""
    entry = work(launch)
    params = launch.params
    skip = set(entry.unread(params)) if entry is not None else set()
    seen = {}
    for name, value in params.items():
        if name not in skip:
            for t in _tensors(value):
                seen.setdefault(tensor_key(t), footprint(t))
    return sum(seen.values())
