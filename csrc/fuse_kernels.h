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
// Thread mapping: blocks of 32 x 8 threads, grid z = image. The generic kernels (ForwardKernel,
// AdjointKernel<.., 0, 0>) run one element per thread over a [channels x pixels] tile of one image, the
// 32-wide dimension the tensor's contiguous one (pixels for NCHW: threadIdx.x -> pixel; channels for
// channels_last: threadIdx.x -> channel), so a warp's accesses are coalesced in either layout, with 64-bit
// offsets. ForwardTileKernel (kRows x kPX pixels per thread, compile-time mode pack, int32 offsets),
// BackwardSameKernel (kPB pixels of a row per thread) and the register AdjointKernel<.., KMAX > 0, MODE>
// (32 / KMAX source pixels per thread, int32 offsets) are described where they are defined.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

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
HRFAST_INLINE void run_block_phases(const typename K::Params& p, Block& blk) {
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

// A kernel with its own sequence of phases (K::kOwnBlock, RowAdjointKernel) runs K::run(p, blk) instead; its
// shared memory is K::kRedRows rows of kBX (red_rows; the others kBY).
template <class K, class = void>
struct own_block {
  static constexpr bool value = false;
};
template <class K>
struct own_block<K, std::void_t<decltype(K::kOwnBlock)>> {
  static constexpr bool value = K::kOwnBlock;
};
template <class K, class = void>
struct red_rows {
  static constexpr int value = kBY;
};
template <class K>
struct red_rows<K, std::void_t<decltype(K::kRedRows)>> {
  static constexpr int value = K::kRedRows;
};

template <class K, class Block>
HRFAST_INLINE void run_block(const typename K::Params& p, Block& blk) {
  if constexpr (own_block<K>::value) {
    K::run(p, blk);
  } else {
    run_block_phases<K>(p, blk);
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

// ----------------------------------------------------------------------------- forward, mode-pack tiles

// A term pack known at compile time: bits 0-3 the term count, bits 4 + 2k the mode of term k. The launchers
// instantiate the packs of kForwardPacks (HRNet's fusions: output-size terms, then bilinear ones) and run the
// generic ForwardKernel for any other combination, for more than kMaxPackTerms terms, or when an offset may
// not fit in int32.
constexpr int kMaxPackTerms = 4;
constexpr uint32_t pack_code(const char* modes) {  // "sbbb": s same, n nearest, b bilinear
  uint32_t code = 0;
  int k = 0;
  for (; modes[k] != 0; ++k) code |= static_cast<uint32_t>(modes[k] == 's' ? SAME : modes[k] == 'n' ? NEAREST
                                                                                                   : BILINEAR)
                                     << (4 + 2 * k);
  return code | static_cast<uint32_t>(k);
}
constexpr int pack_count(uint32_t code) { return static_cast<int>(code & 15u); }
constexpr int pack_mode(uint32_t code, int k) { return static_cast<int>((code >> (4 + 2 * k)) & 3u); }
// PhaseKernel's packs also carry each term's upsampling factor f (1 for an output-size term; 2, 4 or 8 on both
// axes) as log2 f in bits 16 + 2k ("sbbb", "1248": output-size, bilinear x2, x4, x8); pack_code's have 0 there.
constexpr uint32_t phase_code(const char* modes, const char* factors) {
  uint32_t code = pack_code(modes);
  for (int k = 0; factors[k] != 0; ++k) {
    code |= static_cast<uint32_t>(factors[k] == '8' ? 3 : factors[k] == '4' ? 2 : factors[k] == '2' ? 1 : 0)
            << (16 + 2 * k);
  }
  return code;
}
constexpr int pack_factor(uint32_t code, int k) { return 1 << ((code >> (16 + 2 * k)) & 3u); }
// keep in step with hrfast/perf/cuda_cpp.py FORWARD_PACKS
constexpr uint32_t kForwardPacks[] = {pack_code("s"),    pack_code("ss"),   pack_code("sb"),  pack_code("sss"),
                                      pack_code("ssb"),  pack_code("sbb"),  pack_code("ssss"), pack_code("sssb"),
                                      pack_code("ssbb"), pack_code("sbbb")};

constexpr int kPX = 8;    // output pixels per thread along a row in ForwardTileKernel
constexpr int kRows = 2;  // output rows per thread in ForwardTileKernel

// One term with int32 strides (every offset of the tensor < 2^31, checked by the launcher).
template <typename scalar_t, typename acc_t>
struct TermView32 {
  const scalar_t* x;
  const acc_t* scale;
  const acc_t* shift;
  int32_t h, w;
  int32_t sn, sc, sh, sw;
  int32_t align;
  float r32_h, r32_w;
  acc_t r_h, r_w;
};

// base + off for a non-negative int32 offset (the int32 variants: every offset in [0, 2^30)): zero-extended,
// one wide multiply-add on a GPU instead of a sign extension and a 64-bit add.
template <typename T>
HRFAST_INLINE T* at32(T* base, int32_t off) {
  return base + static_cast<uint32_t>(off);
}

template <typename scalar_t, typename acc_t>
struct ForwardTileParams {
  TermView32<scalar_t, acc_t> t[kMaxPackTerms];
  scalar_t* out;
  int32_t so_n, so_c, so_h, so_w;
  int32_t C, H, W, S;  // S = ceil(W / kPX) row segments
  int32_t HP;          // ceil(H / kRows) row groups
  int32_t per_image;   // C * HP * S threads per image
  bool cl, relu;
};

// One term of the pack at the kPX output pixels (oy, xs[i]) of (n, c): the row's source rows and weights once,
// each pixel's column taps; the same arithmetic as load_term (same bits).
// One term of the pack at the kRows x kPX output pixels (oys[j], xs[i]) of (n, c): each row's source rows and
// vertical weights once, each column's source taps and horizontal weights once for the kRows rows; the same
// arithmetic as load_term (same bits).
template <int MODE, typename scalar_t, typename acc_t>
HRFAST_INLINE void tile_term(const TermView32<scalar_t, acc_t>& t, int32_t n, int32_t c, const int32_t (&oys)[kRows],
                             const int32_t (&xs)[kPX], acc_t (&v)[kRows][kPX]) {
  const int32_t base = n * t.sn + c * t.sc;  // int32 offsets, one wide add per load (at32)
  if constexpr (MODE == SAME) {
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int32_t row = base + oys[j] * t.sh;
#pragma unroll
      for (int i = 0; i < kPX; ++i) v[j][i] = static_cast<acc_t>(load_ro(at32(t.x, row + xs[i] * t.sw)));
    }
  } else if constexpr (MODE == NEAREST) {
    int32_t rows[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) rows[j] = base + nearest_source<int32_t>(oys[j], t.r32_h, t.h) * t.sh;
#pragma unroll
    for (int i = 0; i < kPX; ++i) {
      const int32_t col = nearest_source<int32_t>(xs[i], t.r32_w, t.w) * t.sw;
#pragma unroll
      for (int j = 0; j < kRows; ++j) v[j][i] = static_cast<acc_t>(load_ro(at32(t.x, rows[j] + col)));
    }
  } else {
    const bool align = t.align != 0;
    int32_t r0[kRows], r1[kRows];
    acc_t ly0[kRows], ly1[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      int32_t y0, y1;
      linear_source<acc_t, int32_t>(oys[j], t.r_h, t.h, align, y0, y1, ly0[j], ly1[j]);
      r0[j] = base + y0 * t.sh;
      r1[j] = base + y1 * t.sh;
    }
#pragma unroll
    for (int i = 0; i < kPX; ++i) {
      int32_t x0, x1;
      acc_t lx0, lx1;
      linear_source<acc_t, int32_t>(xs[i], t.r_w, t.w, align, x0, x1, lx0, lx1);
      const int32_t c0 = x0 * t.sw, c1 = x1 * t.sw;
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        const acc_t v00 = static_cast<acc_t>(load_ro(at32(t.x, r0[j] + c0)));
        const acc_t v01 = static_cast<acc_t>(load_ro(at32(t.x, r0[j] + c1)));
        const acc_t v10 = static_cast<acc_t>(load_ro(at32(t.x, r1[j] + c0)));
        const acc_t v11 = static_cast<acc_t>(load_ro(at32(t.x, r1[j] + c1)));
        v[j][i] = ly0[j] * (lx0 * v00 + lx1 * v01) + ly1[j] * (lx0 * v10 + lx1 * v11);
      }
    }
  }
  if (t.scale != nullptr) {
    const acc_t a = load_ro(t.scale + c);
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
#pragma unroll
      for (int i = 0; i < kPX; ++i) v[j][i] = v[j][i] * a;
    }
  }
  if (t.shift != nullptr) {
    const acc_t b = load_ro(t.shift + c);
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
#pragma unroll
      for (int i = 0; i < kPX; ++i) v[j][i] = v[j][i] + b;
    }
  }
}

// acc = the sum over the terms of PACK of `terms.load<mode>(k, v)`, left to right as forward_sum, the modes
// resolved at compile time: the one term loop of ForwardTileKernel and ForwardVecKernel (each thread's values
// an A x B array: rows x pixels, or pixels x channels).
template <uint32_t PACK, int K, class Terms, typename T, int A, int B>
HRFAST_INLINE void sum_pack(const Terms& terms, T (&acc)[A][B]) {
  if constexpr (K < pack_count(PACK)) {
    T v[A][B];
    terms.template load<pack_mode(PACK, K)>(K, v);
#pragma unroll
    for (int a = 0; a < A; ++a) {
#pragma unroll
      for (int b = 0; b < B; ++b) {
        if constexpr (K == 0) {
          acc[a][b] = v[a][b];
        } else {
          acc[a][b] = acc[a][b] + v[a][b];
        }
      }
    }
    sum_pack<PACK, K + 1>(terms, acc);
  }
}

// ForwardTileKernel's terms at kRows x kPX pixels (oys[j], xs[i]) of (n, c).
template <typename scalar_t, typename acc_t>
struct TileTerms {
  const ForwardTileParams<scalar_t, acc_t>& p;
  int32_t n, c;
  const int32_t (&oys)[kRows];
  const int32_t (&xs)[kPX];
  template <int MODE>
  HRFAST_INLINE void load(int k, acc_t (&v)[kRows][kPX]) const {
    tile_term<MODE, scalar_t, acc_t>(p.t[k], n, c, oys, xs, v);
  }
};

// y = ReLU(sum of the terms of PACK), kRows x kPX output pixels of one channel per thread (kPX consecutive
// pixels of kRows consecutive rows): per term the source rows and vertical weights once per row, the column
// taps and horizontal weights once per column, the modes resolved at compile time, int32 offsets. Threads
// over (channel, row pair, segment), the segment fastest in NCHW (a warp reads and writes along rows) and
// the channel fastest in channels_last (a warp covers consecutive channels of a pixel, every lane busy
// whatever C is); grid x over one image's threads (blocks of kThreads), grid z = image. Pixels past the
// row's end or the last row load a valid (clamped) address and are not stored.
template <typename scalar_t, typename acc_t, uint32_t PACK>
struct ForwardTileKernel {
  using acc_type = acc_t;
  using Params = ForwardTileParams<scalar_t, acc_t>;
  struct State {
    int64_t c;
  };
  static constexpr int kSlots = 0;

  static HRFAST_INLINE void start(const Params& p, const ThreadIdx& ti, State& s) {
    s.c = 0;
    const int32_t id = static_cast<int32_t>(ti.bx) * kThreads + static_cast<int32_t>(ti.ty * kBX + ti.tx);
    if (id >= p.per_image) return;
    int32_t c, rp, seg;
    if (p.cl) {
      c = id % p.C;
      const int32_t r = id / p.C;
      seg = r % p.S;
      rp = r / p.S;
    } else {
      seg = id % p.S;
      const int32_t r = id / p.S;
      rp = r % p.HP;
      c = r / p.HP;
    }
    const int32_t n = static_cast<int32_t>(ti.bz);
    int32_t xs[kPX], oys[kRows];
#pragma unroll
    for (int i = 0; i < kPX; ++i) xs[i] = min_(seg * kPX + i, p.W - 1);
#pragma unroll
    for (int j = 0; j < kRows; ++j) oys[j] = min_(rp * kRows + j, p.H - 1);
    acc_t acc[kRows][kPX];
    sum_pack<PACK, 0>(TileTerms<scalar_t, acc_t>{p, n, c, oys, xs}, acc);
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      if (rp * kRows + j >= p.H) break;
      const int32_t row = n * p.so_n + c * p.so_c + oys[j] * p.so_h;
#pragma unroll
      for (int i = 0; i < kPX; ++i) {
        if (seg * kPX + i >= p.W) break;
        const acc_t v = p.relu ? relu_keep_nan(acc[j][i]) : acc[j][i];
        *at32(p.out, row + xs[i] * p.so_w) = static_cast<scalar_t>(v);
      }
    }
  }
  static HRFAST_INLINE bool reduces(const Params&, int) { return false; }
  static HRFAST_INLINE acc_t value(const Params&, const State&, int) { return acc_t(0); }
  static HRFAST_INLINE acc_t* dst(const Params&, const ThreadIdx&, int) { return nullptr; }
};

// --------------------------------------------------------------- forward, channels_last channel vectors

// channels_last with the channels a multiple of kVec<scalar_t> (16 bytes: 8 half/bf16, 4 float, 2 double), every
// tensor's non-channel strides multiples of it and 16-byte aligned (the launcher checks): each thread computes
// kVec consecutive channels of kVPX consecutive pixels of one row, with 16-byte loads and stores, the source
// rows, columns and interpolation weights once for all kVec channels.
constexpr int kVPX = 4;  // output pixels per thread along a row in ForwardVecKernel
template <typename scalar_t>
constexpr int kVec = static_cast<int>(16 / sizeof(scalar_t));

// kVec consecutive elements from a 16-byte aligned address (one 16-byte load on a GPU), converted.
template <typename scalar_t, typename acc_t>
HRFAST_INLINE void load_vec(const scalar_t* p, acc_t (&out)[kVec<scalar_t>]) {
  scalar_t v[kVec<scalar_t>];
#if defined(__CUDA_ARCH__)
  const uint4 bits = __ldg(reinterpret_cast<const uint4*>(p));
  memcpy(v, &bits, sizeof(v));
#else
  memcpy(v, p, sizeof(v));
#endif
#pragma unroll
  for (int k = 0; k < kVec<scalar_t>; ++k) out[k] = static_cast<acc_t>(v[k]);
}

template <typename scalar_t, typename acc_t>
HRFAST_INLINE void store_vec(scalar_t* p, const acc_t (&in)[kVec<scalar_t>]) {
  scalar_t v[kVec<scalar_t>];
#pragma unroll
  for (int k = 0; k < kVec<scalar_t>; ++k) v[k] = static_cast<scalar_t>(in[k]);
#if defined(__CUDA_ARCH__)
  uint4 bits;
  memcpy(&bits, v, sizeof(v));
  *reinterpret_cast<uint4*>(p) = bits;
#else
  memcpy(p, v, sizeof(v));
#endif
}

// One term at kVPX pixels (oy, xs[i]) of the kVec channels from c0: the same arithmetic as tile_term (same bits).
template <int MODE, typename scalar_t, typename acc_t>
HRFAST_INLINE void vec_term(const TermView32<scalar_t, acc_t>& t, int32_t n, int32_t c0, int32_t oy,
                            const int32_t (&xs)[kVPX], acc_t (&v)[kVPX][kVec<scalar_t>]) {
  constexpr int V = kVec<scalar_t>;
  const int32_t base = n * t.sn + c0;  // channel stride 1
  if constexpr (MODE == SAME) {
    const int32_t row = base + oy * t.sh;
#pragma unroll
    for (int i = 0; i < kVPX; ++i) load_vec(at32(t.x, row + xs[i] * t.sw), v[i]);
  } else if constexpr (MODE == NEAREST) {
    const int32_t row = base + nearest_source<int32_t>(oy, t.r32_h, t.h) * t.sh;
#pragma unroll
    for (int i = 0; i < kVPX; ++i) load_vec(at32(t.x, row + nearest_source<int32_t>(xs[i], t.r32_w, t.w) * t.sw), v[i]);
  } else {
    const bool align = t.align != 0;
    int32_t y0, y1;
    acc_t ly0, ly1;
    linear_source<acc_t, int32_t>(oy, t.r_h, t.h, align, y0, y1, ly0, ly1);
    const int32_t r0 = base + y0 * t.sh, r1 = base + y1 * t.sh;
#pragma unroll
    for (int i = 0; i < kVPX; ++i) {
      int32_t x0, x1;
      acc_t lx0, lx1;
      linear_source<acc_t, int32_t>(xs[i], t.r_w, t.w, align, x0, x1, lx0, lx1);
      const int32_t c0w = x0 * t.sw, c1w = x1 * t.sw;
      acc_t v00[V], v01[V], v10[V], v11[V];
      load_vec(at32(t.x, r0 + c0w), v00);
      load_vec(at32(t.x, r0 + c1w), v01);
      load_vec(at32(t.x, r1 + c0w), v10);
      load_vec(at32(t.x, r1 + c1w), v11);
#pragma unroll
      for (int k = 0; k < V; ++k) v[i][k] = ly0 * (lx0 * v00[k] + lx1 * v01[k]) + ly1 * (lx0 * v10[k] + lx1 * v11[k]);
    }
  }
  if (t.scale != nullptr) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t a = load_ro(t.scale + c0 + k);
#pragma unroll
      for (int i = 0; i < kVPX; ++i) v[i][k] = v[i][k] * a;
    }
  }
  if (t.shift != nullptr) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t b = load_ro(t.shift + c0 + k);
#pragma unroll
      for (int i = 0; i < kVPX; ++i) v[i][k] = v[i][k] + b;
    }
  }
}

// ForwardVecKernel's terms at kVPX pixels (oy, xs[i]) of the kVec channels from c0.
template <typename scalar_t, typename acc_t>
struct VecTerms {
  const ForwardTileParams<scalar_t, acc_t>& p;
  int32_t n, c0, oy;
  const int32_t (&xs)[kVPX];
  template <int MODE>
  HRFAST_INLINE void load(int k, acc_t (&v)[kVPX][kVec<scalar_t>]) const {
    vec_term<MODE, scalar_t, acc_t>(p.t[k], n, c0, oy, xs, v);
  }
};

// y = ReLU(sum of the terms of PACK) in channels_last, kVec channels x kVPX pixels of one row per thread.
// Threads over (channel group, row, segment), the channel group fastest (a warp's 16-byte accesses cover
// consecutive channel groups of a pixel, then the next segment's); ForwardTileParams with S = ceil(W / kVPX)
// segments and HP = H rows. Pixels past the row's end load a valid (clamped) address and are not stored.
template <typename scalar_t, typename acc_t, uint32_t PACK>
struct ForwardVecKernel {
  using acc_type = acc_t;
  using Params = ForwardTileParams<scalar_t, acc_t>;
  struct State {
    int64_t c;
  };
  static constexpr int kSlots = 0;

  static HRFAST_INLINE void start(const Params& p, const ThreadIdx& ti, State& s) {
    constexpr int V = kVec<scalar_t>;
    s.c = 0;
    const int32_t id = static_cast<int32_t>(ti.bx) * kThreads + static_cast<int32_t>(ti.ty * kBX + ti.tx);
    if (id >= p.per_image) return;
    const int32_t groups = p.C / V;
    const int32_t c0 = (id % groups) * V;
    const int32_t r = id / groups;
    const int32_t seg = r % p.S, oy = r / p.S;
    const int32_t n = static_cast<int32_t>(ti.bz);
    int32_t xs[kVPX];
#pragma unroll
    for (int i = 0; i < kVPX; ++i) xs[i] = min_(seg * kVPX + i, p.W - 1);
    acc_t acc[kVPX][V];
    sum_pack<PACK, 0>(VecTerms<scalar_t, acc_t>{p, n, c0, oy, xs}, acc);
    const int32_t row = n * p.so_n + c0 + oy * p.so_h;
#pragma unroll
    for (int i = 0; i < kVPX; ++i) {
      if (seg * kVPX + i >= p.W) break;
      if (p.relu) {
#pragma unroll
        for (int k = 0; k < V; ++k) acc[i][k] = relu_keep_nan(acc[i][k]);
      }
      store_vec(at32(p.out, row + xs[i] * p.so_w), acc[i]);
    }
  }
  static HRFAST_INLINE bool reduces(const Params&, int) { return false; }
  static HRFAST_INLINE acc_t value(const Params&, const State&, int) { return acc_t(0); }
  static HRFAST_INLINE acc_t* dst(const Params&, const ThreadIdx&, int) { return nullptr; }
};

// ------------------------------------------------------------ forward, phases of power-of-2 upsampling

// NCHW, every term output-size or upsampled (nearest, or bilinear without align_corners) by a power-of-2 factor
// f on both axes, some term by 4 or more: each thread computes a G x G block of output pixels of one channel
// (G the largest factor: output rows G * gy + r, columns G * gx + p), which reads a fixed window of each term's
// source. kPhasePacks: HRNet's fusions with bilinear (HRNetV2) or nearest (pose HRNet) upsampling; the
// launcher checks the ratios (exactly 1 / f), the sizes (h * f = H, w * f = W), the strides and alignment.
// keep in step with hrfast/perf/cuda_cpp.py PHASE_PACKS
constexpr uint32_t kPhasePacks[] = {phase_code("sbbb", "1248"), phase_code("ssbb", "1124"), phase_code("sbb", "124"),
                                    phase_code("snnn", "1248"), phase_code("ssnn", "1124"), phase_code("snn", "124")};

constexpr int phase_group(uint32_t code) {  // G: the largest factor of the pack
  int g = 1;
  for (int k = 0; k < pack_count(code); ++k) g = pack_factor(code, k) > g ? pack_factor(code, k) : g;
  return g;
}

// Output phase p (0 .. G-1) along a x F axis (F a power of 2) without align_corners reads ATen's source taps
// i0 = Q * g + tap_slot(p), i1 = i0 + 1 of its group g (Q = G / F source pixels per group: real = (d + 0.5) / F
// - 0.5 = Q * g + p / F + frac) with the weights 1 - tap_l1 and tap_l1: dyadic fractions, so these constants
// are exactly ATen's float (and double) values. Away from the image's first and last pixels; at the last
// one the tap past the end is clamped (ATen's i1 = i0 there: the same value) and at the first ones (group 0,
// p < F / 2: ATen's real clamps to 0) the taps are source pixels 0 and 1 with weights 1 and 0 (PhaseTerm
// reads pixel 1 through slot -1 with the weights 0 and 1 there: the same products).
constexpr int tap_slot(int p, int F) { return p / F - (2 * (p % F) < F ? 1 : 0); }
constexpr double tap_l1(int p, int F) {
  return (p % F + 0.5) / F - 0.5 + (2 * (p % F) < F ? 1.0 : 0.0);
}
constexpr double tap_l0(int p, int F) { return 1.0 - tap_l1(p, F); }

// N consecutive elements (stride 1) from p, aligned to min(16, N * sizeof) bytes (the launcher checks): 16-byte
// (or one 8- or 4-byte) loads on a GPU; converted.
template <int N, typename scalar_t, typename acc_t>
HRFAST_INLINE void load_run(const scalar_t* p, acc_t (&out)[N]) {
  scalar_t v[N];
#if defined(__CUDA_ARCH__)
  constexpr int B = static_cast<int>(N * sizeof(scalar_t));
  if constexpr (B % 16 == 0) {
#pragma unroll
    for (int i = 0; i < B / 16; ++i) {
      const uint4 bits = __ldg(reinterpret_cast<const uint4*>(p) + i);
      memcpy(reinterpret_cast<char*>(v) + 16 * i, &bits, 16);
    }
  } else if constexpr (B == 8) {
    const uint2 bits = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(v, &bits, 8);
  } else if constexpr (B == 4 && N == 2) {
    const unsigned int bits = __ldg(reinterpret_cast<const unsigned int*>(p));
    memcpy(v, &bits, 4);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = load_ro(p + i);
  }
#else
  memcpy(v, p, sizeof(v));
#endif
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<acc_t>(v[i]);
}

template <int N, typename scalar_t, typename acc_t>
HRFAST_INLINE void store_run(scalar_t* p, const acc_t (&in)[N]) {
  scalar_t v[N];
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = static_cast<scalar_t>(in[i]);
#if defined(__CUDA_ARCH__)
  constexpr int B = static_cast<int>(N * sizeof(scalar_t));
  if constexpr (B % 16 == 0) {
#pragma unroll
    for (int i = 0; i < B / 16; ++i) {
      uint4 bits;
      memcpy(&bits, reinterpret_cast<const char*>(v) + 16 * i, 16);
      reinterpret_cast<uint4*>(p)[i] = bits;
    }
  } else if constexpr (B == 8) {
    uint2 bits;
    memcpy(&bits, v, 8);
    *reinterpret_cast<uint2*>(p) = bits;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = v[i];
  }
#else
  memcpy(p, v, sizeof(v));
#endif
}

// One term of a phase pack for the G x G output block (G * gy + r, G * gx + p) of (n, c), factor F, as the
// output rows are summed (`row`): the same arithmetic as tile_term (ATen's order, h0l * (w0l * v00 + w1l * v01)
// + h1l * (w0l * v10 + w1l * v11), then the affine map, here v * a + b with a = 1 and b = -0 where the term has
// no scale or shift: the same values, -0 and NaN included), so the same bits on the host (on a GPU nvcc
// contracts v * a + b into one FMA, as the Triton phase form's compiler does); but each source
// pixel of the block's window loaded and converted once, each window row's horizontal interpolation
// (w0l * v0 + w1l * v1) computed once per output column and shared by the output rows that read it, taps and
// weights compile-time constants per phase. Unit stride along x, and runs of G (output-size terms) or G / F
// (the window's inner pixels) elements aligned for load_run (the launcher checks).
template <int MODE, int F, int G, typename scalar_t, typename acc_t>
struct PhaseTerm;

// the affine map's (a, b): (scale, shift), 1 and -0 where absent (v * 1 + -0 is v)
template <typename scalar_t, typename acc_t>
HRFAST_INLINE void phase_affine(const TermView32<scalar_t, acc_t>& t, int32_t c, acc_t& a, acc_t& b) {
  a = t.scale != nullptr ? load_ro(t.scale + c) : acc_t(1);
  b = t.shift != nullptr ? load_ro(t.shift + c) : -acc_t(0);
}

template <int F, int G, typename scalar_t, typename acc_t>
struct PhaseTerm<SAME, F, G, scalar_t, acc_t> {
  const scalar_t* x;
  int32_t off, sh;  // the block's first element, the row stride
  acc_t a, b;
  HRFAST_INLINE PhaseTerm(const TermView32<scalar_t, acc_t>& t, int32_t n, int32_t c, int32_t gy, int32_t gx)
      : x(t.x), off(n * t.sn + c * t.sc + G * gy * t.sh + G * gx), sh(t.sh) {
    phase_affine(t, c, a, b);
  }
  HRFAST_INLINE void row(int r, acc_t (&v)[G]) const {
    load_run<G>(at32(x, off + r * sh), v);
#pragma unroll
    for (int p = 0; p < G; ++p) v[p] = v[p] * a + b;
  }
};

// nearest: output index G * g + p reads source Q * g + p / F (ATen's floor(d * (1 / F)), exact; h * F = H)
template <int F, int G, typename scalar_t, typename acc_t>
struct PhaseTerm<NEAREST, F, G, scalar_t, acc_t> {
  static constexpr int Q = G / F;
  acc_t u[Q][Q];  // the window's values after the affine map (one per source pixel, as every output reads it)
  HRFAST_INLINE PhaseTerm(const TermView32<scalar_t, acc_t>& t, int32_t n, int32_t c, int32_t gy, int32_t gx) {
    acc_t a, b;
    phase_affine(t, c, a, b);
    const int32_t base = n * t.sn + c * t.sc + Q * gy * t.sh + Q * gx;
#pragma unroll
    for (int i = 0; i < Q; ++i) {
      load_run<Q>(at32(t.x, base + i * t.sh), u[i]);
#pragma unroll
      for (int j = 0; j < Q; ++j) u[i][j] = u[i][j] * a + b;
    }
  }
  HRFAST_INLINE void row(int r, acc_t (&v)[G]) const {
#pragma unroll
    for (int p = 0; p < G; ++p) v[p] = u[r / F][p / F];
  }
};

// bilinear without align_corners: the window is slots -1 .. Q of the group (Q = G / F source pixels per group,
// array index slot + 1), each output phase reading slots tap_slot and tap_slot + 1 with compile-time weights.
// The image's first group (ATen's index clamps at 0 there: taps 0 and 1, weights 1 and 0) reads pixel 1
// through slot -1 with the weights (0, 1) instead: the same products, so the same sum (as the Triton phase
// form does). The last group's slot Q is clamped to the last pixel (ATen's i1 = i0 there).
template <int F, int G, typename scalar_t, typename acc_t>
struct PhaseTerm<BILINEAR, F, G, scalar_t, acc_t> {
  static constexpr int Q = G / F;
  static constexpr int NS = Q + 2;
  acc_t h[NS][G];  // each window row's horizontal interpolation at the G output columns
  acc_t a, b;
  acc_t ly0[F / 2], ly1[F / 2];  // the weights of the rows that read slot -1 (phases r < F / 2)
  HRFAST_INLINE PhaseTerm(const TermView32<scalar_t, acc_t>& t, int32_t n, int32_t c, int32_t gy, int32_t gx) {
    static_assert(F >= 2, "bilinear by 2, 4 or 8");
    phase_affine(t, c, a, b);
    const bool fx = gx == 0, fy = gy == 0;
    acc_t lx0[F / 2], lx1[F / 2];
#pragma unroll
    for (int q = 0; q < F / 2; ++q) {
      lx0[q] = fx ? acc_t(0) : static_cast<acc_t>(tap_l0(q, F));
      lx1[q] = fx ? acc_t(1) : static_cast<acc_t>(tap_l1(q, F));
      ly0[q] = fy ? acc_t(0) : static_cast<acc_t>(tap_l0(q, F));
      ly1[q] = fy ? acc_t(1) : static_cast<acc_t>(tap_l1(q, F));
    }
    const int32_t base = n * t.sn + c * t.sc;
    const int32_t x0 = Q * gx;
    const int32_t left = fx ? min_(1, t.w - 1) : x0 - 1, right = min_(x0 + Q, t.w - 1);
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      const int32_t y0 = Q * gy + i - 1;
      const int32_t iy = i == 0 ? (fy ? min_(1, t.h - 1) : y0) : i == NS - 1 ? min_(y0, t.h - 1) : y0;
      const int32_t row = base + iy * t.sh;
      acc_t s[NS];
      acc_t mid[Q];
      load_run<Q>(at32(t.x, row + x0), mid);
      s[0] = static_cast<acc_t>(load_ro(at32(t.x, row + left)));
#pragma unroll
      for (int j = 0; j < Q; ++j) s[j + 1] = mid[j];
      s[NS - 1] = static_cast<acc_t>(load_ro(at32(t.x, row + right)));
#pragma unroll
      for (int p = 0; p < G; ++p) {
        const int j = tap_slot(p, F) + 1;
        h[i][p] = j == 0 ? lx0[p] * s[0] + lx1[p] * s[1]
                         : static_cast<acc_t>(tap_l0(p, F)) * s[j] + static_cast<acc_t>(tap_l1(p, F)) * s[j + 1];
      }
    }
  }
  HRFAST_INLINE void row(int r, acc_t (&v)[G]) const {
    const int i = tap_slot(r, F) + 1;
#pragma unroll
    for (int p = 0; p < G; ++p) {
      const acc_t u = i == 0 ? ly0[r] * h[0][p] + ly1[r] * h[1][p]
                             : static_cast<acc_t>(tap_l0(r, F)) * h[i][p] + static_cast<acc_t>(tap_l1(r, F)) * h[i + 1][p];
      v[p] = u * a + b;
    }
  }
};

// The terms K.. of PACK for one block, summed row by row in order (acc = term 0, then acc + term k), as
// sum_pack does.
template <uint32_t PACK, int K, int G, typename scalar_t, typename acc_t, bool END = (K >= pack_count(PACK))>
struct PhaseChain {
  PhaseTerm<pack_mode(PACK, K), pack_factor(PACK, K), G, scalar_t, acc_t> term;
  PhaseChain<PACK, K + 1, G, scalar_t, acc_t> next;
  HRFAST_INLINE PhaseChain(const ForwardTileParams<scalar_t, acc_t>& p, int32_t n, int32_t c, int32_t gy, int32_t gx)
      : term(p.t[K], n, c, gy, gx), next(p, n, c, gy, gx) {}
  HRFAST_INLINE void row(int r, acc_t (&acc)[G]) const {
    acc_t v[G];
    term.row(r, v);
#pragma unroll
    for (int p = 0; p < G; ++p) acc[p] = K == 0 ? v[p] : acc[p] + v[p];
    next.row(r, acc);
  }
};
template <uint32_t PACK, int K, int G, typename scalar_t, typename acc_t>
struct PhaseChain<PACK, K, G, scalar_t, acc_t, true> {
  HRFAST_INLINE PhaseChain(const ForwardTileParams<scalar_t, acc_t>&, int32_t, int32_t, int32_t, int32_t) {}
  HRFAST_INLINE void row(int, acc_t (&)[G]) const {}
};

// y = ReLU(sum of the terms of PACK (kPhasePacks)), a G x G output block of one channel per thread; NCHW
// (output stride 1 along x), the output divided into blocks exactly (the launcher checks), int32 offsets.
// Threads over (channel, block row, block column), the block column fastest: a warp's stores are G-element
// vectors of 32 consecutive blocks of a row. ForwardTileParams with S = W / G block columns and HP = H / G
// block rows; every thread below per_image has a whole block.
template <typename scalar_t, typename acc_t, uint32_t PACK>
struct PhaseKernel {
  using acc_type = acc_t;
  using Params = ForwardTileParams<scalar_t, acc_t>;
  static constexpr int G = phase_group(PACK);
  // fuse_cuda.cu min_blocks: 2 blocks of 256 threads per SM (<= 128 registers) but for double (sm_90, sbbb:
  // float 255 -> 128 registers, no spills either way; double would spill)
  static constexpr int kMinBlocks = sizeof(acc_t) <= 4 ? 2 : 1;
  struct State {
    int64_t c;
  };
  static constexpr int kSlots = 0;

  static HRFAST_INLINE void start(const Params& p, const ThreadIdx& ti, State& s) {
    s.c = 0;
    const int32_t id = static_cast<int32_t>(ti.bx) * kThreads + static_cast<int32_t>(ti.ty * kBX + ti.tx);
    if (id >= p.per_image) return;
    const int32_t gx = id % p.S;
    const int32_t r = id / p.S;
    const int32_t gy = r % p.HP;
    const int32_t c = r / p.HP;
    const int32_t n = static_cast<int32_t>(ti.bz);
    const PhaseChain<PACK, 0, G, scalar_t, acc_t> terms(p, n, c, gy, gx);
    const int32_t col = n * p.so_n + c * p.so_c + G * gx;
#pragma unroll
    for (int r = 0; r < G; ++r) {
      acc_t acc[G];
      terms.row(r, acc);
      if (p.relu) {
#pragma unroll
        for (int i = 0; i < G; ++i) acc[i] = relu_keep_nan(acc[i]);
      }
      store_run<G>(at32(p.out, col + (G * gy + r) * p.so_h), acc);
    }
  }
  static HRFAST_INLINE bool reduces(const Params&, int) { return false; }
  static HRFAST_INLINE acc_t value(const Params&, const State&, int) { return acc_t(0); }
  static HRFAST_INLINE acc_t* dst(const Params&, const ThreadIdx&, int) { return nullptr; }
};

constexpr int kPB = 16;  // output pixels per thread along a row in BackwardSameKernel

// Output-size terms: g = grad_y zeroed where y <= 0; dx_k = g * scale_k; per-tile partials of sum(g) (reduction 0,
// slot `sum_slot`, when >= 0) and of sum(g * x_k) (reduction 1 + k, slot slot0 + k, where dscale_mask has
// bit k).
// Thread mapping: kPB consecutive pixels of one row per thread (the row's offsets once, the per-element cost
// of the index arithmetic and of the block reductions shared by kPB pixels). A row is S = ceil(W / kPB)
// segments; the segments of all rows are numbered row-major (segment q: row q / S, pixels from
// (q % S) * kPB). NCHW: threadIdx.x -> segment (kBX consecutive segments per block, across rows when W is
// small), threadIdx.y -> channel; channels_last: threadIdx.x -> channel, threadIdx.y -> segment. Grid x =
// segment block, y = channel block, z = image. A thread sums its pixels (in order) before the block reduction.
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
    int32_t S;  // segments per row, ceil(W / kPB); H * S < 2^31
    bool cl;
  };
  struct State {
    int64_t n, c;
    int32_t oy, x0, valid;  // valid: pixels x0 .. x0 + valid - 1 of row oy (0: none)
    acc_t g[kPB];
  };
  static constexpr int kSlots = 1 + kMaxTerms;

  static HRFAST_INLINE void start(const Params& p, const ThreadIdx& ti, State& s) {
    const int32_t q = p.cl ? static_cast<int32_t>(ti.bx * kBY + ti.ty) : static_cast<int32_t>(ti.bx * kBX + ti.tx);
    s.c = p.cl ? static_cast<int64_t>(ti.by) * kBX + ti.tx : static_cast<int64_t>(ti.by) * kBY + ti.ty;
    s.n = ti.bz;
    s.oy = q / p.S;
    s.x0 = (q - s.oy * p.S) * kPB;
    s.valid = s.c < p.C && s.oy < p.H ? min_(p.W - s.x0, kPB) : 0;
    if (s.valid == 0) s.oy = s.x0 = 0;  // a thread past the plane still takes part in the reductions
#pragma unroll
    for (int i = 0; i < kPB; ++i) s.g[i] = acc_t(0);
    if (s.valid == 0) return;
    const int64_t n = s.n, c = s.c;
    const GradIn<scalar_t>& g = p.g;
    const scalar_t* gy = g.gy + offset4(n, c, s.oy, s.x0, g.sg);
    const scalar_t* yy = g.y + offset4(n, c, s.oy, s.x0, g.sy);
#pragma unroll
    for (int i = 0; i < kPB; ++i) {
      if (i < s.valid) s.g[i] = masked_grad<scalar_t, acc_t>(gy, i * g.sg.w, yy, i * g.sy.w, g.relu);
    }
    for (int k = 0; k < p.count; ++k) {
      scalar_t* dx = p.grads.dx[k];
      if (dx == nullptr) continue;
      const Strides& sd = p.grads.s[k];
      dx += offset4(n, c, s.oy, s.x0, sd);
      const acc_t* scale = p.pack.t[k].scale;
      if (scale != nullptr) {
        const acc_t a = load_ro(scale + c);
#pragma unroll
        for (int i = 0; i < kPB; ++i) {
          if (i < s.valid) dx[i * sd.w] = static_cast<scalar_t>(s.g[i] * a);
        }
      } else {
#pragma unroll
        for (int i = 0; i < kPB; ++i) {
          if (i < s.valid) dx[i * sd.w] = static_cast<scalar_t>(s.g[i]);
        }
      }
    }
  }
  static HRFAST_INLINE bool reduces(const Params& p, int r) {
    if (r == 0) return p.sum_slot >= 0;
    return r - 1 < p.count && ((p.dscale_mask >> (r - 1)) & 1u) != 0;
  }
  static HRFAST_INLINE acc_t value(const Params& p, const State& s, int r) {
    acc_t v = acc_t(0);
    if (s.valid == 0) return v;
    if (r == 0) {
#pragma unroll
      for (int i = 0; i < kPB; ++i) v += s.g[i];  // +0 past the row's end
      return v;
    }
    const TermView<scalar_t, acc_t>& t = p.pack.t[r - 1];
    const scalar_t* x = t.x + offset4(s.n, s.c, s.oy, s.x0, t.sn, t.sc, t.sh, t.sw);
#pragma unroll
    for (int i = 0; i < kPB; ++i) {
      if (i < s.valid) v += s.g[i] * static_cast<acc_t>(load_ro(x + i * t.sw));
    }
    return v;
  }
  static HRFAST_INLINE acc_t* dst(const Params& p, const ThreadIdx& ti, int r) {
    const int64_t slot = r == 0 ? p.sum_slot : p.slot0 + (r - 1);
    return p.parts + (slot * p.R + partial_row(ti)) * p.C;
  }
};

// The register AdjointKernel<KMAX, MODE> runs exact windows whose width along x is KMAX (KMAX = 2 * step for
// bilinear, = step for nearest; see window()) and whose height is at most KMAX. Source pixels of a row per
// thread: 32 / KMAX (at most 8), so that the union of their windows fits in registers.
constexpr int kPS = 8;
constexpr int adjoint_ps(int kmax) { return kmax >= 8 ? 32 / kmax : kPS; }

// u = Up^T(g) at the source pixels (sy, sx0 + j), j < PS = adjoint_ps(KMAX), for an exact window (the host
// found the ratio to be 1/step: first reader s * step - offset) KMAX taps wide (the launcher checks it) and at
// most KMAX high, in a compile-time MODE. Along y the window's weights and clamped row offsets once per
// thread; along x the PS windows overlap (pixel j's starts step * j after pixel 0's): the union of their
// columns, NC = (PS - 1) * step + KMAX, is read once per window row (grad_y and y, the ReLU mask applied
// once per value) and each column's source taps and weights (the forward's rule, fuse.h linear_source /
// nearest_source) computed once; pixel j sums its KMAX columns of each row in order, then the rows. int32
// offsets (the launcher checks that every offset fits); the mask always applied (without relu the
// launcher passes a one-element y of 1, strides 0). Columns and rows outside the output (before 0, past
// the end: read at clamped addresses) and outputs that do not read the source have weight 0 and add
// nothing (a masked or zero-weight tap adds +0: the sums are never -0, and an inf or NaN g there is not
// multiplied). Deterministic (a fixed order); not the order of adjoint_element (rows summed first, as the
// Triton adjoint does), so the two agree to rounding. Pixels past the row's end (sx0 + j >= w) compute
// values the caller drops.
template <int KMAX, int MODE, typename scalar_t, typename acc_t>
HRFAST_INLINE void adjoint_row_fixed(const TermView<scalar_t, acc_t>& t, const GradIn<scalar_t>& g, int32_t H,
                                     int32_t W, int32_t n, int32_t c, int32_t sy, int32_t sx0, acc_t* u) {
  constexpr int PS = adjoint_ps(KMAX);
  constexpr int STEP = MODE == BILINEAR ? KMAX / 2 : KMAX;
  constexpr int NC = (PS - 1) * STEP + KMAX;
  constexpr bool align = false;  // exact windows: bilinear without align_corners, or nearest (which ignores it)
  const int32_t h = static_cast<int32_t>(t.h), w = static_cast<int32_t>(t.w);
  const int32_t gsh = static_cast<int32_t>(g.sg.h), gsw = static_cast<int32_t>(g.sg.w);
  const int32_t ysh = static_cast<int32_t>(g.sy.h), ysw = static_cast<int32_t>(g.sy.w);
  const int32_t lo_y = max_(sy * t.step_h - t.off_h, 0);
  const int32_t gbase = n * static_cast<int32_t>(g.sg.n) + c * static_cast<int32_t>(g.sg.c);
  const int32_t ybase = n * static_cast<int32_t>(g.sy.n) + c * static_cast<int32_t>(g.sy.c);
  acc_t wy[KMAX];
  int32_t gy_off[KMAX], yy_off[KMAX];
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    wy[k] = adjoint_weight<acc_t, int32_t>(lo_y + k, sy, t.r32_h, t.r_h, h, H, MODE, align);
    const int32_t dy = min_(lo_y + k, H - 1);
    gy_off[k] = gbase + dy * gsh;
    yy_off[k] = ybase + dy * ysh;
  }
  // the union of the PS windows along x: column m is output d0 + m
  const int32_t d0 = sx0 * STEP - t.off_w;
  acc_t wx[PS][KMAX];
  int32_t gx_off[NC], yx_off[NC];
#pragma unroll
  for (int m = 0; m < NC; ++m) {
    const int32_t d = d0 + m;
    const int32_t dc = min_(max_(d, 0), W - 1);
    const bool inside = d >= 0 && d < W;
    gx_off[m] = dc * gsw;
    yx_off[m] = dc * ysw;
    int32_t i0, i1;
    acc_t l0, l1;
    if constexpr (MODE == BILINEAR) {
      linear_source<acc_t, int32_t>(dc, t.r_w, w, align, i0, i1, l0, l1);
    } else {
      i0 = i1 = nearest_source<int32_t>(dc, t.r32_w, w);
      l0 = static_cast<acc_t>(1);
      l1 = static_cast<acc_t>(0);
    }
#pragma unroll
    for (int j = 0; j < PS; ++j) {
      const int k = m - j * STEP;
      if (k < 0 || k >= KMAX) continue;  // compile time
      const int32_t sx = min_(sx0 + j, w - 1);
      // adjoint_weight's rule: (i0 == s ? l0 : 0) + (i1 == s ? l1 : 0), 1 for nearest's one tap
      const acc_t wgt = MODE == BILINEAR ? (i0 == sx ? l0 : static_cast<acc_t>(0)) + (i1 == sx ? l1 : static_cast<acc_t>(0))
                                         : (i0 == sx ? static_cast<acc_t>(1) : static_cast<acc_t>(0));
      wx[j][k] = inside ? wgt : static_cast<acc_t>(0);
    }
  }
  acc_t v[PS];
#pragma unroll
  for (int j = 0; j < PS; ++j) v[j] = static_cast<acc_t>(0);
#pragma unroll
  for (int ky = 0; ky < KMAX; ++ky) {
    if (wy[ky] == static_cast<acc_t>(0)) continue;  // a row that reads none of these sources
    acc_t gm[NC];  // the row's g, masked by y > 0
#pragma unroll
    for (int m = 0; m < NC; ++m) {
      const acc_t gv = static_cast<acc_t>(load_ro(at32(g.gy, gy_off[ky] + gx_off[m])));
      const acc_t yv = static_cast<acc_t>(load_ro(at32(g.y, yy_off[ky] + yx_off[m])));
      gm[m] = yv <= static_cast<acc_t>(0) ? static_cast<acc_t>(0) : gv;
    }
#pragma unroll
    for (int j = 0; j < PS; ++j) {
      acc_t row = static_cast<acc_t>(0);
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        row += wx[j][k] * (wx[j][k] == static_cast<acc_t>(0) ? static_cast<acc_t>(0) : gm[j * STEP + k]);
      }
      v[j] += wy[ky] * row;
    }
  }
#pragma unroll
  for (int j = 0; j < PS; ++j) u[j] = v[j];
}

// The adjoint's phase form (AdjointKernel<KMAX, ADJOINT_TENT>): adjoint_row_fixed for bilinear without
// align_corners by f = KMAX / 2 on both axes with g exactly f times the source's size and whole rows of PS =
// adjoint_ps(KMAX) pixels (the launcher checks it). Source s then reads the outputs [s f - f/2, s f + 3f/2)
// of each axis with the tent weights (tent_weight: compile-time, dyadic, so exactly the float linear_source
// weights), except at the image's edges: the outputs [0, f/2) read source 0 with weight 1 and those
// [n f - f/2, n f) the last source with weight l0 + l1 = 1 (ATen's clamped index), outputs outside the image
// are not read (only the first / last source row or column can meet them: runtime flags, no per-column index
// math). The same window, the same columns and rows in the same order, the same multiply-adds as
// adjoint_row_fixed (its terms of weight 0 add +0 to a sum that is never -0: left out here), so the same
// bits, NaN and inf included.
constexpr int ADJOINT_TENT = 3;  // AdjointKernel's MODE for the phase form (not a Mode: bilinear's variant)

template <typename acc_t>
HRFAST_INLINE constexpr acc_t tent_weight(int k, int f) {  // k in [0, 2f): (k + 1/2) / f, then (2f - k - 1/2) / f
  return k < f ? static_cast<acc_t>(2 * k + 1) / static_cast<acc_t>(2 * f)
               : static_cast<acc_t>(4 * f - 2 * k - 1) / static_cast<acc_t>(2 * f);
}

// Pixel j's (of PS, by f = F) sum over its window's 2F columns of one window row, gm[j F + k] its column k, in
// column order with the tent weights (1 where ATen clamps at the image's first / last column, columns
// outside the image left out): adjoint_row_tent's and RowAdjointKernel's one column sum.
template <int F, int PS, typename acc_t>
HRFAST_INLINE acc_t tent_columns(const acc_t* gm, int j, bool first_x, bool last_x) {
  constexpr int HALF = F / 2;
  acc_t row = static_cast<acc_t>(0);
#pragma unroll
  for (int k = 0; k < 2 * F; ++k) {
    const acc_t gk = gm[j * F + k];
    if (j == 0 && k < HALF) {  // before the image where pixel 0 is the first column
      if (!first_x) row += tent_weight<acc_t>(k, F) * gk;
    } else if (j == PS - 1 && k >= F + HALF) {  // past it where pixel PS - 1 is the last column
      if (!last_x) row += tent_weight<acc_t>(k, F) * gk;
    } else if (j == 0 && k < F) {
      row += (first_x ? static_cast<acc_t>(1) : tent_weight<acc_t>(k, F)) * gk;
    } else if (j == PS - 1 && k >= F && k < F + HALF) {
      row += (last_x ? static_cast<acc_t>(1) : tent_weight<acc_t>(k, F)) * gk;
    } else {
      row += tent_weight<acc_t>(k, F) * gk;
    }
  }
  return row;
}

// What adjoint_row_tent's rows share (one thread): the row bases, the flags, the columns' offsets.
template <int NC, typename scalar_t>
struct TentRows {
  const scalar_t* gy;
  const scalar_t* y;
  int32_t gbase, ybase, gsh, ysh, sy;
  bool first_y, last_y, first_x, last_x;
  int32_t gx_off[NC], yx_off[NC];
};

// Window row KY of adjoint_row_tent: v[j] += wy * (pixel j's columns of the row, in order). A template per
// row (expanded by adjoint_row_tent's fold), so that the rows are straight-line code (nvcc kept a loop over
// the 16 rows of KMAX 16 under #pragma unroll).
template <int KMAX, int KY, typename scalar_t, typename acc_t>
HRFAST_INLINE void tent_row(const TentRows<(adjoint_ps(KMAX) - 1) * (KMAX / 2) + KMAX, scalar_t>& r, acc_t* v) {
  constexpr int PS = adjoint_ps(KMAX);
  constexpr int F = KMAX / 2;
  constexpr int HALF = F / 2;
  constexpr int NC = (PS - 1) * F + KMAX;
  if (KY < HALF && r.first_y) return;      // above the image
  if (KY >= F + HALF && r.last_y) return;  // below it
  acc_t wy = tent_weight<acc_t>(KY, F);
  if (KY >= HALF && KY < F && r.first_y) wy = static_cast<acc_t>(1);
  if (KY >= F && KY < F + HALF && r.last_y) wy = static_cast<acc_t>(1);
  const int32_t dy = r.sy * F - HALF + KY;
  const int32_t grow = r.gbase + dy * r.gsh, yrow = r.ybase + dy * r.ysh;
  acc_t gm[NC];  // the row's g, masked by y > 0
#pragma unroll
  for (int m = 0; m < NC; ++m) {
    const acc_t gv = static_cast<acc_t>(load_ro(at32(r.gy, grow + r.gx_off[m])));
    const acc_t yv = static_cast<acc_t>(load_ro(at32(r.y, yrow + r.yx_off[m])));
    gm[m] = yv <= static_cast<acc_t>(0) ? static_cast<acc_t>(0) : gv;
  }
#pragma unroll
  for (int j = 0; j < PS; ++j) v[j] += wy * tent_columns<F, PS, acc_t>(gm, j, r.first_x, r.last_x);
}

template <int KMAX, typename scalar_t, typename acc_t, int... KY>
HRFAST_INLINE void tent_rows(const TentRows<(adjoint_ps(KMAX) - 1) * (KMAX / 2) + KMAX, scalar_t>& r, acc_t* v,
                             std::integer_sequence<int, KY...>) {
  (tent_row<KMAX, KY, scalar_t, acc_t>(r, v), ...);  // rows in order
}

template <int KMAX, typename scalar_t, typename acc_t>
HRFAST_INLINE void adjoint_row_tent(const TermView<scalar_t, acc_t>& t, const GradIn<scalar_t>& g, int32_t W,
                                    int32_t n, int32_t c, int32_t sy, int32_t sx0, acc_t* u) {
  constexpr int PS = adjoint_ps(KMAX);
  constexpr int F = KMAX / 2;
  constexpr int HALF = F / 2;
  constexpr int NC = (PS - 1) * F + KMAX;
  const int32_t h = static_cast<int32_t>(t.h), w = static_cast<int32_t>(t.w);
  TentRows<NC, scalar_t> r;
  r.gy = g.gy;
  r.y = g.y;
  r.sy = sy;
  r.first_y = sy == 0;
  r.last_y = sy == h - 1;
  r.first_x = sx0 == 0;
  r.last_x = sx0 + PS == w;
  r.gsh = static_cast<int32_t>(g.sg.h);
  r.ysh = static_cast<int32_t>(g.sy.h);
  const int32_t gsw = static_cast<int32_t>(g.sg.w), ysw = static_cast<int32_t>(g.sy.w);
  r.gbase = n * static_cast<int32_t>(g.sg.n) + c * static_cast<int32_t>(g.sg.c);
  r.ybase = n * static_cast<int32_t>(g.sy.n) + c * static_cast<int32_t>(g.sy.c);
  // column m is output d0 + m; only the first (last) HALF columns can lie before (past) the image: clamped
  const int32_t d0 = sx0 * F - HALF;
#pragma unroll
  for (int m = 0; m < NC; ++m) {
    int32_t d = d0 + m;
    if (m < HALF) d = max_(d, 0);
    if (m >= NC - HALF) d = min_(d, W - 1);
    r.gx_off[m] = d * gsw;
    r.yx_off[m] = d * ysw;
  }
  acc_t v[PS];
#pragma unroll
  for (int j = 0; j < PS; ++j) v[j] = static_cast<acc_t>(0);
  tent_rows<KMAX, scalar_t, acc_t>(r, v, std::make_integer_sequence<int, KMAX>{});
#pragma unroll
  for (int j = 0; j < PS; ++j) u[j] = v[j];
}

// An upsampled term: u = Up^T(g) (a gather), dz = u * scale; per-tile partials of sum(u * z) (reduction 0,
// slot 0, when need_dscale) and sum(u) (reduction 1, slot 1, when need_dshift).
//   - KMAX > 0 (exact windows of at most KMAX taps per axis in mode MODE, int32 offsets): adjoint_ps(KMAX)
//     source pixels of a row per thread (adjoint_row_fixed), mapped as BackwardSameKernel's segments: S = ceil(w / PS)
//     per row, numbered row-major; NCHW threadIdx.x -> segment, threadIdx.y -> channel; channels_last the
//     other way round; grid x = segment block. A thread sums its pixels in order before the block reduction.
//     MODE = ADJOINT_TENT: the same with adjoint_row_tent (bilinear's phase form, compile-time weights; the
//     launcher checks g is exactly f times the source and rows are whole segments); the same bits.
//   - KMAX = 0: the generic gather (fuse.h adjoint_element), one source pixel per thread over a [channels x
//     pixels] tile (tile_element).
template <typename scalar_t, typename acc_t, int KMAX, int MODE>
struct AdjointKernel {
  using acc_type = acc_t;
  static constexpr int kPix = KMAX > 0 ? adjoint_ps(KMAX) : 1;  // source pixels per thread
  struct Params {
    TermView<scalar_t, acc_t> t;
    scalar_t* dz;  // null: not needed
    Strides sd;
    GradIn<scalar_t> g;
    int64_t H, W;  // output size
    acc_t* parts;  // [2, R, C]
    int64_t R, C;
    int32_t S;  // KMAX > 0: segments per source row, ceil(w / adjoint_ps(KMAX))
    bool need_dscale, need_dshift, cl;
  };
  struct State {
    int64_t n, c, sy, sx;  // the first pixel
    int32_t valid;         // pixels sx .. sx + valid - 1 (0: none)
    acc_t u[kPix];
  };
  static constexpr int kSlots = 2;

  static HRFAST_INLINE void start(const Params& p, const ThreadIdx& ti, State& s) {
    const TermView<scalar_t, acc_t>& t = p.t;
    s.n = ti.bz;
#pragma unroll
    for (int j = 0; j < kPix; ++j) s.u[j] = acc_t(0);
    const GradIn<scalar_t>& g = p.g;
    if constexpr (KMAX > 0) {
      const int32_t q = p.cl ? static_cast<int32_t>(ti.bx * kBY + ti.ty) : static_cast<int32_t>(ti.bx * kBX + ti.tx);
      s.c = p.cl ? static_cast<int64_t>(ti.by) * kBX + ti.tx : static_cast<int64_t>(ti.by) * kBY + ti.ty;
      constexpr int PS = adjoint_ps(KMAX);
      const int32_t sy = q / p.S, sx0 = (q - sy * p.S) * PS;
      s.valid = s.c < p.C && sy < t.h ? min_(static_cast<int32_t>(t.w) - sx0, PS) : 0;
      s.sy = s.valid > 0 ? sy : 0;
      s.sx = s.valid > 0 ? sx0 : 0;
      if (s.valid == 0) return;
      if constexpr (MODE == ADJOINT_TENT) {
        adjoint_row_tent<KMAX, scalar_t, acc_t>(t, g, static_cast<int32_t>(p.W), static_cast<int32_t>(s.n),
                                                static_cast<int32_t>(s.c), sy, sx0, s.u);
      } else {
        adjoint_row_fixed<KMAX, MODE, scalar_t, acc_t>(t, g, static_cast<int32_t>(p.H), static_cast<int32_t>(p.W),
                                                       static_cast<int32_t>(s.n), static_cast<int32_t>(s.c), sy,
                                                       sx0, s.u);
      }
#pragma unroll
      for (int j = 0; j < kPix; ++j) {
        if (j >= s.valid) s.u[j] = acc_t(0);
      }
    } else {
      s.valid = tile_element(ti, p.cl, p.C, t.h, static_cast<int32_t>(t.w), s.c, s.sy, s.sx) ? 1 : 0;  // h*w <= H*W
      if (s.valid == 0) return;
      s.u[0] = adjoint_element<scalar_t, acc_t>(t, g.gy, g.sg.n, g.sg.c, g.sg.h, g.sg.w, g.y, g.sy.n, g.sy.c,
                                                g.sy.h, g.sy.w, g.relu, p.H, p.W, s.n, s.c, s.sy, s.sx);
    }
    if (p.dz != nullptr) {
      const acc_t a = t.scale != nullptr ? load_ro(t.scale + s.c) : acc_t(1);
      scalar_t* dz = p.dz + offset4(s.n, s.c, s.sy, s.sx, p.sd);
#pragma unroll
      for (int j = 0; j < kPix; ++j) {
        if (j < s.valid) dz[j * p.sd.w] = static_cast<scalar_t>(t.scale != nullptr ? s.u[j] * a : s.u[j]);
      }
    }
  }
  static HRFAST_INLINE bool reduces(const Params& p, int r) { return r == 0 ? p.need_dscale : p.need_dshift; }
  static HRFAST_INLINE acc_t value(const Params& p, const State& s, int r) {
    acc_t v = acc_t(0);
    if (s.valid == 0) return v;
    if (r == 1) {
#pragma unroll
      for (int j = 0; j < kPix; ++j) v += s.u[j];  // +0 past the row's end
      return v;
    }
    const TermView<scalar_t, acc_t>& t = p.t;
    const scalar_t* z = t.x + offset4(s.n, s.c, s.sy, s.sx, t.sn, t.sc, t.sh, t.sw);
#pragma unroll
    for (int j = 0; j < kPix; ++j) {
      if (j < s.valid) v += s.u[j] * static_cast<acc_t>(load_ro(z + j * t.sw));
    }
    return v;
  }
  static HRFAST_INLINE acc_t* dst(const Params& p, const ThreadIdx& ti, int r) {
    return p.parts + (static_cast<int64_t>(r) * p.R + partial_row(ti)) * p.C;
  }
};

// ------------------------------------------------------------------------------ the row adjoint (issue 18)

// RowAdjointKernel<PACK>: AdjointKernel<2f, ADJOINT_TENT> for several upsampled terms of a row in one launch
// that reads grad_y and y once. PACK: the term count in bits 0-3, term k's log2 f in bits 4 + 2k (bilinear
// without align_corners by f on both axes, g exactly f times the source); kRowPacks the compiled ones.
// Every term's thread covers kRowL = adjoint_ps(2f) * f = 16 output columns, so one thread holds the same
// output columns [X0, X0 + 16) of every term: source columns X0 / f .. + 16 / f.
constexpr int kRowL = 16;
constexpr int row_count(uint32_t pack) { return static_cast<int>(pack & 15u); }
constexpr int row_factor(uint32_t pack, int k) { return 1 << ((pack >> (4 + 2 * k)) & 3u); }
constexpr int row_fmax(uint32_t pack) {
  int f = 1;
  for (int k = 0; k < row_count(pack); ++k) f = row_factor(pack, k) > f ? row_factor(pack, k) : f;
  return f;
}
// source rows of term k per thread (FM / f), and those of the terms before k
constexpr int row_m(uint32_t pack, int k) { return row_fmax(pack) / row_factor(pack, k); }
constexpr int row_base(uint32_t pack, int k) {
  int n = 0;
  for (int t = 0; t < k; ++t) n += row_m(pack, t);
  return n;
}
constexpr uint32_t row_log2(int f) { return f == 2 ? 1u : f == 4 ? 2u : f == 8 ? 3u : 0u; }
constexpr uint32_t row_code(int f0, int f1, int f2 = 0) {  // factors in term order (0: no third term)
  return (f2 ? 3u : 2u) | (row_log2(f0) << 4) | (row_log2(f1) << 6) | (f2 ? row_log2(f2) << 8 : 0u);
}
// HRNet's rows: stage 4 / the head at branch 0 (x2, x4, x8), branch 1 (x2, x4)
constexpr uint32_t kRowPacks[] = {row_code(2, 4, 8), row_code(2, 4)};

// The thread mapping is AdjointKernel's over the coarsest term's (f = FM) segments: S = W / kRowL segments per
// source row of it (h0 = H / FM rows), numbered row-major; NCHW threadIdx.x -> segment, threadIdx.y -> channel,
// channels_last the other way round; grid x = segment block. A thread owns coarse row S0 and the FM / f source
// rows FM / f * S0 + j of term f under it (their windows inside the coarse one's, output rows [FM S0 - FM / 2,
// FM S0 + 3 FM / 2)). Each of those 2 FM rows is read once (the NC = 16 + FM columns of the widest window,
// grad_y and y, the mask applied once per value); per term its pixels' column sums (tent_columns) once, added
// into every source row of the term whose window holds the row, with that row's weight. Per source row the
// multiply-adds of adjoint_row_tent in its order, so dz is the same bits as one AdjointKernel<2f, 3> launch
// per term.
// Partials: each term's [2, R_t, C] as its own launch writes them. Its blocks of kBX (kBY in channels_last)
// segments lie inside this kernel's blocks (the launcher checks S % along == 0 or along % S == 0): phase 0
// stores every thread's per-(term, source row) sums of u * z and u into shared memory; after a barrier one
// thread per (term block, slot, channel) adds its along values in AdjointKernel's block order (block_sum_reduce)
// and writes the term's partial row.
template <typename scalar_t, typename acc_t, uint32_t PACK>
struct RowAdjointKernel {
  using acc_type = acc_t;
  static constexpr int NT = row_count(PACK);
  static constexpr int FM = row_fmax(PACK);
  static constexpr int NC = kRowL + FM;
  static constexpr int kRows = row_base(PACK, NT);  // source rows per thread, all terms
  static constexpr int kPlanes = 2 * kRows;           // shared planes [kBY][kBX]: (row, slot)
  static constexpr bool kOwnBlock = true;
  static constexpr int kSlots = kPlanes;  // > 0: the executor gives it shared memory
  static constexpr int kRedRows = kPlanes * kBY;
  struct Params {
    TermView<scalar_t, acc_t> t[NT];
    scalar_t* dz[NT];  // null: not needed
    Strides sd[NT];
    acc_t* parts[NT];  // [2, R_t, C]
    int64_t R[NT];
    int32_t gx[NT];  // the term's own launch's grid x
    bool need_dscale[NT], need_dshift[NT];
    GradIn<scalar_t> g;
    int64_t C;
    int32_t W, h0, S;  // output width, coarse source rows, segments per row (W / kRowL)
    int32_t log2s;     // log2(S) where S < the block's segments along the row (then a power of 2), else 0
    bool cl;
  };
  struct State {};  // nothing is kept between phases but shared memory

  // what one thread's rows share
  struct Rows {
    const scalar_t* gy;
    const scalar_t* y;
    int32_t gbase, ybase, gsh, ysh, s0;
    bool first_y, last_y, first_x, last_x;
    int32_t gx_off[NC], yx_off[NC];
  };

  // Term T's contribution of output row RR (from FM S0 - FM / 2): its pixels' column sums, added into its
  // source rows J whose window holds the row (adjoint_row_tent's tent_row, row KY = RR - the window's first).
  template <int RR, int T, int J>
  static HRFAST_INLINE void add_row(const Rows& r, const acc_t* cols, acc_t (*v)[8]) {
    constexpr int F = row_factor(PACK, T), HALF = F / 2, M = row_m(PACK, T);
    constexpr int KY = RR - (FM / 2 + F * J - HALF);
    constexpr int PS = kRowL / F;
    if constexpr (KY >= 0 && KY < 2 * F) {
      const bool first = r.first_y && J == 0, last = r.last_y && J == M - 1;
      if (KY < HALF && first) return;      // above the image
      if (KY >= F + HALF && last) return;  // below it
      acc_t wy = tent_weight<acc_t>(KY, F);
      if (KY >= HALF && KY < F && first) wy = static_cast<acc_t>(1);
      if (KY >= F && KY < F + HALF && last) wy = static_cast<acc_t>(1);
#pragma unroll
      for (int j = 0; j < PS; ++j) v[row_base(PACK, T) + J][j] += wy * cols[j];
    }
  }
  template <int RR, int T, int... J>
  static HRFAST_INLINE void term_row(const Rows& r, const acc_t* gm, acc_t (*v)[8], std::integer_sequence<int, J...>) {
    constexpr int F = row_factor(PACK, T), HALF = F / 2, M = row_m(PACK, T);
    constexpr int PS = kRowL / F;
    // the term's source rows' windows: [FM / 2 - HALF, FM / 2 - HALF + F (M - 1) + 2 F)
    if constexpr (RR >= FM / 2 - HALF && RR < FM / 2 - HALF + F * (M + 1)) {
      constexpr int OFF = (FM - F) / 2;  // its column 0 among the NC read
      acc_t cols[PS];
#pragma unroll
      for (int j = 0; j < PS; ++j) cols[j] = tent_columns<F, PS, acc_t>(gm + OFF, j, r.first_x, r.last_x);
      (add_row<RR, T, J>(r, cols, v), ...);
    }
  }
  template <int RR, int... T>
  static HRFAST_INLINE void terms_row(const Rows& r, const acc_t* gm, acc_t (*v)[8], std::integer_sequence<int, T...>) {
    (term_row<RR, T>(r, gm, v, std::make_integer_sequence<int, row_m(PACK, T)>{}), ...);
  }
  template <int RR>
  static HRFAST_INLINE void row(const Rows& r, acc_t (*v)[8]) {
    if (RR < FM / 2 && r.first_y) return;          // above the image
    if (RR >= FM + FM / 2 && r.last_y) return;     // below it
    const int32_t dy = r.s0 * FM - FM / 2 + RR;
    const int32_t grow = r.gbase + dy * r.gsh, yrow = r.ybase + dy * r.ysh;
    acc_t gm[NC];  // the row's g, masked by y > 0
#pragma unroll
    for (int m = 0; m < NC; ++m) {
      const acc_t gv = static_cast<acc_t>(load_ro(at32(r.gy, grow + r.gx_off[m])));
      const acc_t yv = static_cast<acc_t>(load_ro(at32(r.y, yrow + r.yx_off[m])));
      gm[m] = yv <= static_cast<acc_t>(0) ? static_cast<acc_t>(0) : gv;
    }
    terms_row<RR>(r, gm, v, std::make_integer_sequence<int, NT>{});
  }
  template <int... RR>
  static HRFAST_INLINE void rows(const Rows& r, acc_t (*v)[8], std::integer_sequence<int, RR...>) {
    (row<RR>(r, v), ...);  // rows in order
  }

  // shared plane of (source row i of all terms, slot: 0 sum(u * z), 1 sum(u))
  static HRFAST_INLINE acc_t* plane(acc_t (*red)[kBX], int i, int slot) { return &red[(2 * i + slot) * kBY][0]; }

  // Term T's source row J of this thread: dz = u * scale, and the sums of u * z and u into shared memory
  // (AdjointKernel's start, value).
  template <int T, int J>
  static HRFAST_INLINE void out_row(const Params& p, const Rows& r, int64_t n, int64_t c, int32_t cs,
                                    acc_t (*v)[8], acc_t (*red)[kBX], int cell) {
    constexpr int F = row_factor(PACK, T), M = row_m(PACK, T), PS = kRowL / F;
    constexpr int I = row_base(PACK, T) + J;
    const TermView<scalar_t, acc_t>& t = p.t[T];
    const int64_t sy = static_cast<int64_t>(r.s0) * M + J, sx = static_cast<int64_t>(cs) * PS;
    if (p.dz[T] != nullptr) {
      const acc_t a = t.scale != nullptr ? load_ro(t.scale + c) : acc_t(1);
      scalar_t* dz = p.dz[T] + offset4(n, c, sy, sx, p.sd[T]);
#pragma unroll
      for (int j = 0; j < PS; ++j) dz[j * p.sd[T].w] = static_cast<scalar_t>(t.scale != nullptr ? v[I][j] * a : v[I][j]);
    }
    if (p.need_dscale[T]) {
      const scalar_t* z = t.x + offset4(n, c, sy, sx, t.sn, t.sc, t.sh, t.sw);
      acc_t s = acc_t(0);
#pragma unroll
      for (int j = 0; j < PS; ++j) s += v[I][j] * static_cast<acc_t>(load_ro(z + j * t.sw));
      plane(red, I, 0)[cell] = s;
    }
    if (p.need_dshift[T]) {
      acc_t s = acc_t(0);
#pragma unroll
      for (int j = 0; j < PS; ++j) s += v[I][j];
      plane(red, I, 1)[cell] = s;
    }
  }
  template <int T, int... J>
  static HRFAST_INLINE void out_term(const Params& p, const Rows& r, int64_t n, int64_t c, int32_t cs,
                                     acc_t (*v)[8], acc_t (*red)[kBX], int cell, std::integer_sequence<int, J...>) {
    (out_row<T, J>(p, r, n, c, cs, v, red, cell), ...);
  }
  template <int... T>
  static HRFAST_INLINE void out_terms(const Params& p, const Rows& r, int64_t n, int64_t c, int32_t cs,
                                      acc_t (*v)[8], acc_t (*red)[kBX], int cell, std::integer_sequence<int, T...>) {
    (out_term<T>(p, r, n, c, cs, v, red, cell, std::make_integer_sequence<int, row_m(PACK, T)>{}), ...);
  }

  // phase 0: the thread's rows, dz, its sums into shared memory (zeros where it has no pixels)
  static HRFAST_INLINE void start(const Params& p, const ThreadIdx& ti, acc_t (*red)[kBX]) {
    const int32_t q = p.cl ? static_cast<int32_t>(ti.bx * kBY + ti.ty) : static_cast<int32_t>(ti.bx * kBX + ti.tx);
    const int64_t c = p.cl ? static_cast<int64_t>(ti.by) * kBX + ti.tx : static_cast<int64_t>(ti.by) * kBY + ti.ty;
    const int cell = static_cast<int>(ti.ty * kBX + ti.tx);
    const int32_t s0 = q / p.S, cs = q - s0 * p.S;
    if (!(c < p.C && s0 < p.h0)) {
#pragma unroll
      for (int i = 0; i < kPlanes; ++i) (&red[i * kBY][0])[cell] = acc_t(0);
      return;
    }
    const int64_t n = ti.bz;
    const GradIn<scalar_t>& g = p.g;
    Rows r;
    r.gy = g.gy;
    r.y = g.y;
    r.s0 = s0;
    r.first_y = s0 == 0;
    r.last_y = s0 == p.h0 - 1;
    const int32_t x0 = cs * kRowL;
    r.first_x = x0 == 0;
    r.last_x = x0 + kRowL == p.W;
    r.gsh = static_cast<int32_t>(g.sg.h);
    r.ysh = static_cast<int32_t>(g.sy.h);
    const int32_t gsw = static_cast<int32_t>(g.sg.w), ysw = static_cast<int32_t>(g.sy.w);
    r.gbase = static_cast<int32_t>(n) * static_cast<int32_t>(g.sg.n) + static_cast<int32_t>(c) * static_cast<int32_t>(g.sg.c);
    r.ybase = static_cast<int32_t>(n) * static_cast<int32_t>(g.sy.n) + static_cast<int32_t>(c) * static_cast<int32_t>(g.sy.c);
    // column m is output x0 - FM / 2 + m; only the first (last) FM / 2 can lie before (past) the image: clamped
#pragma unroll
    for (int m = 0; m < NC; ++m) {
      int32_t d = x0 - FM / 2 + m;
      if (m < FM / 2) d = max_(d, 0);
      if (m >= NC - FM / 2) d = min_(d, p.W - 1);
      r.gx_off[m] = d * gsw;
      r.yx_off[m] = d * ysw;
    }
    acc_t v[kRows][8];  // per source row, its pixels' u (the first kRowL / f used)
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[i][j] = static_cast<acc_t>(0);
    }
    rows(r, v, std::make_integer_sequence<int, 2 * FM>{});
    out_terms(p, r, n, c, cs, v, red, cell, std::make_integer_sequence<int, NT>{});
  }

  // phase 1: one thread per (term block, slot, channel) sums its ALONG values in AdjointKernel's order
  // (block_sum_reduce). ALONG and the channels per block compile-time (CL), the loops unrolled.
  template <bool CL>
  static HRFAST_INLINE void reduce(const Params& p, const ThreadIdx& ti, acc_t (*red)[kBX]) {
    constexpr int ALONG = CL ? kBY : kBX, CHANS = CL ? kBX : kBY;
    const int64_t B = ti.bx;
    const bool wide = p.S >= ALONG;  // S % ALONG == 0: a term block is ALONG segments of one source row
    const int log2s = p.log2s;       // else ALONG % S == 0: S = 2^log2s, a term block whole rows
#pragma unroll
    for (int it = 0; it < (kPlanes * CHANS + kThreads - 1) / kThreads; ++it) {
      const int idx = static_cast<int>(ti.ty * kBX + ti.tx) + it * kThreads;
      if (idx >= kPlanes * CHANS) break;
      const int cb = idx % CHANS, slot = (idx / CHANS) % 2, i = idx / CHANS / 2;
      int t = 0;
#pragma unroll
      for (int k = 1; k < NT; ++k) t += i >= row_base(PACK, k) ? 1 : 0;
      int base = 0, m = 0, log2m = 0;
      bool need = false;
#pragma unroll
      for (int k = 0; k < NT; ++k) {  // term t's constants without a runtime-indexed array
        if (k == t) {
          base = row_base(PACK, k);
          m = row_m(PACK, k);
          log2m = static_cast<int>(row_log2(m));  // m = 1 gives 0
          need = slot == 0 ? p.need_dscale[k] : p.need_dshift[k];
        }
      }
      const int l = i - base;
      const int64_t c = static_cast<int64_t>(ti.by) * CHANS + cb;
      if (!need || c >= p.C) continue;
      // the term's block b; its element e is this block's segment ei, source row ej of the thread
      int64_t b;
      if (wide) {
        const int64_t s0 = ALONG * B / p.S, cs0 = ALONG * B - s0 * p.S;
        b = ((m * s0 + l) * p.S + cs0) / ALONG;
      } else {
        b = m * B + l;
      }
      if (b >= p.gx[t]) continue;
      const int rows0 = (l * ALONG) >> log2s;  // the term block's first row, from the m B rows of this block
      acc_t s = acc_t(0);
#pragma unroll
      for (int e = 0; e < ALONG; ++e) {
        int ei = e, ej = l;
        if (!wide) {  // term row sy = (its m B rows) + rows0 + e / S, column segment e % S
          const int sy = rows0 + (e >> log2s), cs = e & (p.S - 1);
          ei = ((sy >> log2m) << log2s) + cs;  // m a power of 2
          ej = sy & (m - 1);
        }
        const acc_t* pl = plane(red, base + ej, slot);
        const acc_t val = CL ? pl[ei * kBX + cb] : pl[cb * kBX + ei];
        s = e == 0 ? val : s + val;
      }
      p.parts[t][(static_cast<int64_t>(slot) * p.R[t] + static_cast<int64_t>(ti.bz) * p.gx[t] + b) * p.C + c] = s;
    }
  }

  template <class Block>
  static HRFAST_INLINE void run(const Params& p, Block& blk) {
    acc_t (*red)[kBX] = blk.red();
    blk.each([&](const ThreadIdx& ti, State&) { start(p, ti, red); });
    blk.barrier();
    if (p.cl) {
      blk.each([&](const ThreadIdx& ti, State&) { reduce<true>(p, ti, red); });
    } else {
      blk.each([&](const ThreadIdx& ti, State&) { reduce<false>(p, ti, red); });
    }
  }
};

}  // namespace hrfast
