// The fusion op's kernels, written once for both executors: the CUDA one (fuse_cuda.cu: thin __global__
// wrappers) and the host emulation of the grid (fuse_cpu.cpp: a test vehicle for this very code on CPU
// tensors). Everything here is __host__ __device__ (HRFAST_INLINE); the per-element math is fuse.h's.
//
// A kernel is a struct K with
//   - `Params`: its launch arguments (one trivially copyable struct: the __global__ kernel's only parameter);
//   - `State`: what a thread keeps between phases (registers on a GPU);
//   - `start(p, ti, state)`: phase 0, the per-element work (loads, the ReLU mask, output stores);
//   - `kSlots`, `reduces(p, r)`, `value(p, state, r)`, `dst(p, ti, r)`: the block reductions r < kSlots that
//     run after it (`reduces` is the same for every thread of the grid: it depends on Params only), each the
//     value this thread contributes and the row of the partials [slot, R, C] that its block writes.
// `run_block` is the one sequence of phases of a block; the executor supplies the block: on a GPU the
// calling thread (`each` runs the phase for it, `barrier` is __syncthreads()), on the host all 32 x 8 threads
// (`each` runs the phase for every thread before returning, in place of the barrier).
//
// Thread mapping (all kernels): blocks of 32 x 8 threads over a [channels x pixels] tile of one image
// (grid z = image). The 32-wide dimension is the tensor's contiguous one: pixels for NCHW (threadIdx.x ->
// pixel), channels for channels_last (threadIdx.x -> channel), so a warp's loads and stores of same-size
// tensors are coalesced in either layout. One thread per element; offsets are 64-bit (int64 strides).
#pragma once

#include <cstdint>

#include "fuse.h"

namespace hrfast {

constexpr int kMaxTerms = 8;  // terms per launch (kernel parameters); more are chained
constexpr int kBX = 32;       // threads along the contiguous dimension
constexpr int kBY = 8;        // threads along the other one
constexpr int kThreads = kBX * kBY;

// blockIdx, threadIdx and gridDim.x of one thread, explicit so that the same code runs on the host.
struct ThreadIdx {
  uint32_t bx, by, bz;  // blockIdx
  uint32_t tx, ty;      // threadIdx
  uint32_t gx;          // gridDim.x
};

struct Strides {
  int64_t n, c, h, w;
};

HRFAST_INLINE int64_t offset4(int64_t n, int64_t c, int64_t y, int64_t x, const Strides& s) {
  return n * s.n + c * s.c + y * s.h + x * s.w;
}

template <typename scalar_t, typename acc_t>
struct TermPack {
  TermView<scalar_t, acc_t> t[kMaxTerms];
};

// The upstream gradient of a backward kernel and the ReLU mask's source (y, read only when relu).
template <typename scalar_t>
struct GradIn {
  const scalar_t* gy;
  Strides sg;
  const scalar_t* y;
  Strides sy;
  bool relu;
};

template <typename scalar_t>
struct GradPack {
  scalar_t* dx[kMaxTerms];  // null: not needed
  Strides s[kMaxTerms];
};

// The (channel, pixel) of this thread in a [C x P] plane tiled by 32 x 8 blocks; false when outside. c and
// p are set either way (a thread outside the pixels still reduces its channel).
HRFAST_INLINE bool tile_coords(const ThreadIdx& ti, bool cl, int64_t C, int64_t P, int64_t& c, int64_t& p) {
  if (cl) {
    c = static_cast<int64_t>(ti.by) * kBX + ti.tx;
    p = static_cast<int64_t>(ti.bx) * kBY + ti.ty;
  } else {
    p = static_cast<int64_t>(ti.bx) * kBX + ti.tx;
    c = static_cast<int64_t>(ti.by) * kBY + ti.ty;
  }
  return c < C && p < P;
}

// tile_coords in a [C x h * w] plane, the pixel as (row y, column x) (those of pixel 0 when outside).
HRFAST_INLINE bool tile_element(const ThreadIdx& ti, bool cl, int64_t C, int64_t h, int32_t w, int64_t& c, int64_t& y,
                                int64_t& x) {
  int64_t q;
  const bool active = tile_coords(ti, cl, C, h * w, c, q);
  const int32_t q32 = static_cast<int32_t>(active ? q : 0);  // < h * w < 2^31
  y = q32 / w;
  x = q32 - static_cast<int32_t>(y) * w;
  return active;
}

// This block's row of the per-tile partials: blocks (x, z) of one grid row write row z * gridDim.x + x; the
// blocks along y hold other channels, so every (row, channel) is written by exactly one thread.
HRFAST_INLINE int64_t partial_row(const ThreadIdx& ti) {
  return static_cast<int64_t>(ti.bz) * ti.gx + ti.bx;
}

// ------------------------------------------------------------------------------ block reduction, 2 phases

// Phase 1 (a barrier follows): every thread of the block stores its value into red[ty][tx] (shared memory).
template <typename acc_t>
HRFAST_INLINE void block_sum_store(acc_t (*red)[kBX], const ThreadIdx& ti, acc_t v) {
  red[ti.ty][ti.tx] = v;
}

// Phase 2 (a barrier follows before red is reused): one thread per channel of the block sums that channel's
// pixels in a fixed order and writes the sum of channel c to dst[c] (dst: this block's row of the partials).
template <typename acc_t>
HRFAST_INLINE void block_sum_reduce(acc_t (*red)[kBX], const ThreadIdx& ti, bool cl, int64_t c, int64_t C,
                                    acc_t* dst) {
  if (cl) {  // threadIdx.x -> channel: thread (x, 0) sums the kBY pixels of column x
    if (ti.ty == 0 && c < C) {
      acc_t s = red[0][ti.tx];
      for (int i = 1; i < kBY; ++i) s += red[i][ti.tx];
      dst[c] = s;
    }
  } else {  // threadIdx.x -> pixel: thread (0, y) sums the kBX pixels of row y
    if (ti.tx == 0 && c < C) {
      acc_t s = red[ti.ty][0];
      for (int i = 1; i < kBX; ++i) s += red[ti.ty][i];
      dst[c] = s;
    }
  }
}

// The phases of one block of kernel K. `blk` is the executor's block (see the top of this file):
// blk.each(f) calls f(ThreadIdx, K::State&) for the thread(s) it runs, blk.barrier() separates phases,
// blk.red() is the [kBY][kBX] shared-memory array (unused when K::kSlots is 0).
template <class K, class Block>
HRFAST_INLINE void run_block(const typename K::Params& p, Block& blk) {
  using acc_t = typename K::acc_type;
  blk.each([&](const ThreadIdx& ti, typename K::State& s) { K::start(p, ti, s); });
  for (int r = 0; r < K::kSlots; ++r) {
    if (!K::reduces(p, r)) continue;  // uniform: every thread of the grid takes the same branch
    blk.each([&](const ThreadIdx& ti, typename K::State& s) {
      block_sum_store<acc_t>(blk.red(), ti, K::value(p, s, r));
    });
    blk.barrier();
    blk.each([&](const ThreadIdx& ti, typename K::State& s) {
      block_sum_reduce<acc_t>(blk.red(), ti, p.cl, s.c, p.C, K::dst(p, ti, r));
    });
    blk.barrier();
  }
}

// ------------------------------------------------------------------------------------------------ kernels

// y = ReLU(sum of `count` terms (+ init)) for one output element per thread. With `partial_out` the
// pre-ReLU sum is written there in the accumulation type instead (a chained launch continues from it).
template <typename scalar_t, typename acc_t>
struct ForwardKernel {
  using acc_type = acc_t;
  struct Params {
    TermPack<scalar_t, acc_t> pack;
    int count;
    // partial sums of earlier terms, laid out like `out` (same strides `so`); null in the first launch.
    // `init` and `partial_out` are the same buffer in the middle launches of a chain: each thread reads its
    // element, then rewrites it (no __restrict__ on either).
    const acc_t* init;
    acc_t* partial_out;  // null in the last launch, which writes `out`
    scalar_t* out;
    Strides so;
    int64_t C;
    int32_t H, W;
    bool cl, relu;
  };
  struct State {
    int64_t c;
  };
  static constexpr int kSlots = 0;

  static HRFAST_INLINE void start(const Params& p, const ThreadIdx& ti, State& s) {
    int64_t oy, ox;
    if (!tile_element(ti, p.cl, p.C, p.H, p.W, s.c, oy, ox)) return;
    const int64_t n = ti.bz, c = s.c;
    const int64_t off = offset4(n, c, oy, ox, p.so);
    acc_t v = forward_sum<scalar_t, acc_t>(p.pack.t, p.count, p.init != nullptr ? p.init + off : nullptr, n, c, oy,
                                           ox);
    if (p.partial_out != nullptr) {
      p.partial_out[off] = v;
      return;
    }
    if (p.relu) v = relu_keep_nan(v);
    p.out[off] = static_cast<scalar_t>(v);
  }
  static HRFAST_INLINE bool reduces(const Params&, int) { return false; }
  static HRFAST_INLINE acc_t value(const Params&, const State&, int) { return acc_t(0); }
  static HRFAST_INLINE acc_t* dst(const Params&, const ThreadIdx&, int) { return nullptr; }
};

// Output-size terms: g = grad_y zeroed where y <= 0; dx_k = g * scale_k; per-tile partials of sum(g) (reduction 0,
// slot `sum_slot`, when >= 0) and of sum(g * x_k) (reduction 1 + k, slot slot0 + k, where dscale_mask has
// bit k).
template <typename scalar_t, typename acc_t>
struct BackwardSameKernel {
  using acc_type = acc_t;
  struct Params {
    TermPack<scalar_t, acc_t> pack;
    GradPack<scalar_t> grads;
    int count;
    uint32_t dscale_mask;
    int sum_slot;
    int slot0;
    GradIn<scalar_t> g;
    acc_t* parts;  // [slots, R, C]
    int64_t R, C;
    int32_t H, W;
    bool cl;
  };
  struct State {
    int64_t n, c, oy, ox;
    acc_t g;
    bool active;
  };
  static constexpr int kSlots = 1 + kMaxTerms;

  static HRFAST_INLINE void start(const Params& p, const ThreadIdx& ti, State& s) {
    s.active = tile_element(ti, p.cl, p.C, p.H, p.W, s.c, s.oy, s.ox);
    s.n = ti.bz;
    s.g = acc_t(0);
    if (!s.active) return;
    const int64_t n = s.n, c = s.c;
    const GradIn<scalar_t>& g = p.g;
    s.g = masked_grad<scalar_t, acc_t>(g.gy, offset4(n, c, s.oy, s.ox, g.sg), g.y, offset4(n, c, s.oy, s.ox, g.sy),
                                       g.relu);
    for (int k = 0; k < p.count; ++k) {
      scalar_t* dx = p.grads.dx[k];
      if (dx == nullptr) continue;
      const acc_t* scale = p.pack.t[k].scale;
      const acc_t v = scale != nullptr ? s.g * load_ro(scale + c) : s.g;
      dx[offset4(n, c, s.oy, s.ox, p.grads.s[k])] = static_cast<scalar_t>(v);
    }
  }
  static HRFAST_INLINE bool reduces(const Params& p, int r) {
    if (r == 0) return p.sum_slot >= 0;
    return r - 1 < p.count && ((p.dscale_mask >> (r - 1)) & 1u) != 0;
  }
  static HRFAST_INLINE acc_t value(const Params& p, const State& s, int r) {
    if (!s.active) return acc_t(0);
    if (r == 0) return s.g;
    const TermView<scalar_t, acc_t>& t = p.pack.t[r - 1];
    return s.g * static_cast<acc_t>(load_ro(t.x + offset4(s.n, s.c, s.oy, s.ox, t.sn, t.sc, t.sh, t.sw)));
  }
  static HRFAST_INLINE acc_t* dst(const Params& p, const ThreadIdx& ti, int r) {
    const int64_t slot = r == 0 ? p.sum_slot : p.slot0 + (r - 1);
    return p.parts + (slot * p.R + partial_row(ti)) * p.C;
  }
};

// An upsampled term, one source pixel per thread: u = Up^T(g) (a gather, fuse.h adjoint_element),
// dz = u * scale; per-tile partials of sum(u * z) (reduction 0, slot 0, when need_dscale) and sum(u)
// (reduction 1, slot 1, when need_dshift).
template <typename scalar_t, typename acc_t>
struct AdjointKernel {
  using acc_type = acc_t;
  struct Params {
    TermView<scalar_t, acc_t> t;
    scalar_t* dz;  // null: not needed
    Strides sd;
    GradIn<scalar_t> g;
    int64_t H, W;  // output size
    acc_t* parts;  // [2, R, C]
    int64_t R, C;
    bool need_dscale, need_dshift, cl;
  };
  struct State {
    int64_t n, c, sy, sx;
    acc_t u;
    bool active;
  };
  static constexpr int kSlots = 2;

  static HRFAST_INLINE void start(const Params& p, const ThreadIdx& ti, State& s) {
    const TermView<scalar_t, acc_t>& t = p.t;
    s.active = tile_element(ti, p.cl, p.C, t.h, static_cast<int32_t>(t.w), s.c, s.sy, s.sx);  // h * w <= H * W
    s.n = ti.bz;
    s.u = acc_t(0);
    if (!s.active) return;
    const int64_t n = s.n, c = s.c;
    const GradIn<scalar_t>& g = p.g;
    s.u = adjoint_element<scalar_t, acc_t>(t, g.gy, g.sg.n, g.sg.c, g.sg.h, g.sg.w, g.y, g.sy.n, g.sy.c, g.sy.h,
                                           g.sy.w, g.relu, p.H, p.W, n, c, s.sy, s.sx);
    if (p.dz != nullptr) {
      const acc_t v = t.scale != nullptr ? s.u * load_ro(t.scale + c) : s.u;
      p.dz[offset4(n, c, s.sy, s.sx, p.sd)] = static_cast<scalar_t>(v);
    }
  }
  static HRFAST_INLINE bool reduces(const Params& p, int r) { return r == 0 ? p.need_dscale : p.need_dshift; }
  static HRFAST_INLINE acc_t value(const Params& p, const State& s, int r) {
    if (!s.active) return acc_t(0);
    if (r == 1) return s.u;
    const TermView<scalar_t, acc_t>& t = p.t;
    return s.u * static_cast<acc_t>(load_ro(t.x + offset4(s.n, s.c, s.sy, s.sx, t.sn, t.sc, t.sh, t.sw)));
  }
  static HRFAST_INLINE acc_t* dst(const Params& p, const ThreadIdx& ti, int r) {
    return p.parts + (static_cast<int64_t>(r) * p.R + partial_row(ti)) * p.C;
  }
};

}  // namespace hrfast
