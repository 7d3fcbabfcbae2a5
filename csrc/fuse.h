// Per-element math of hrfast's fusion op, used by the kernels of fuse_kernels.h, which run on a GPU
// (fuse_cuda.cu) and in the host build's emulation of the grid on CPU tensors (fuse_cpu.cpp).
//
//     y = ReLU( sum_k Up_k(x_k) * scale_k + shift_k )
//
// Everything here is a port of the Triton kernels (kernels/resample.py, kernels/fuse.py), operation for
// operation, so that the three implementations select the same source pixels as F.interpolate:
//   - nearest:  min(int(float(d) * r32), in - 1), always in float32 (ATen's nearest_idx; the 2x case has
//               r32 = 0.5 exactly, which equals ATen's `d >> 1` shortcut);
//   - bilinear: ATen's area_pixel_compute_source_index in the accumulation type (float32, float64 for
//               float64), with the ratio given as an exact fraction num/den. The second tap is read even at
//               zero weight (0 * inf = NaN, as in F.interpolate), except on an axis that is not resized.
// The affine map (scale, shift) is applied after the gather, in the accumulation type; it commutes with Up
// because Up's weights sum to 1.
//
// Index helpers are templated on the index type: int64_t in the generic kernels, int32_t in the kernels'
// int32 variants (chosen by the launchers when every offset fits); the values are the same either way.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__
#define HRFAST_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE
#define HRFAST_INLINE inline
#endif

namespace hrfast {

enum Mode : int32_t { SAME = 0, NEAREST = 1, BILINEAR = 2 };

template <typename T>
HRFAST_INLINE T min_(T a, T b) { return b < a ? b : a; }

// A load of data that no thread of the kernel writes (inputs, scales, shifts, grad_y, y): through the
// read-only data cache on a GPU (ld.global.nc, what `const __restrict__` kernel parameters let the compiler
// choose; the kernels take their arguments in one struct, whose members it cannot take as restrict), a plain
// load on the host. Never for the forward's chained partial sum, which the same launch rewrites.
template <typename T>
HRFAST_INLINE T load_ro(const T* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 2) {  // c10::Half, c10::BFloat16: load the bits
    return T(__ldg(reinterpret_cast<const unsigned short*>(p)), T::from_bits());
  } else {
    return __ldg(p);
  }
#else
  return *p;
#endif
}
template <typename T>
HRFAST_INLINE T max_(T a, T b) { return a < b ? b : a; }

// One summand as the kernels see it. `scale`/`shift` are dense [C] vectors already in the accumulation
// type, or null. `r32_*` is the ratio as float32 (as the Triton launcher passes it: float(num / den) from
// double); `r_*` the bilinear ratio in the accumulation type (r32 for float, num / den in double for double).
// The adjoint window (K, step, offset) per axis is computed on the host by `window()`.
template <typename scalar_t, typename acc_t>
struct TermView {
  const scalar_t* x;
  const acc_t* scale;
  const acc_t* shift;
  int64_t h, w;            // source size
  int64_t sn, sc, sh, sw;  // source strides (elements)
  int32_t mode;
  int32_t align;
  float r32_h, r32_w;
  acc_t r_h, r_w;
  int32_t k_h, k_w, step_h, step_w, off_h, off_w;
};

HRFAST_INLINE int64_t offset4(int64_t n, int64_t c, int64_t y, int64_t x, int64_t sn, int64_t sc, int64_t sh,
                              int64_t sw) {
  return n * sn + c * sc + y * sh + x * sw;
}

// ---------------------------------------------------------------------------------------------- indices

// ATen nearest_neighbor_compute_source_index: min(floorf(dst * scale), in - 1), in float32.
// I: the index type (int64_t, or int32_t in the kernels' int32 variants; the same values either way).
template <typename I>
HRFAST_INLINE I nearest_source(I d, float r32, I n_in) {
  float real = static_cast<float>(d) * r32;
  return min_(static_cast<I>(real), n_in - 1);
}

// ATen's bilinear taps (i0, i1) and weights (l0, l1) of output index d along one axis.
template <typename acc_t, typename I>
HRFAST_INLINE void linear_source(I d, acc_t r, I n_in, bool align, I& i0, I& i1, acc_t& l0, acc_t& l1) {
  const acc_t df = static_cast<acc_t>(d);
  acc_t real;
  if (align) {
    real = r * df;
  } else {
    real = r * (df + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
    real = real < static_cast<acc_t>(0) ? static_cast<acc_t>(0) : real;
  }
  i0 = min_(static_cast<I>(real), n_in - 1);
  acc_t lam = real - static_cast<acc_t>(i0);
  lam = min_(max_(lam, static_cast<acc_t>(0)), static_cast<acc_t>(1));
  const bool resized = r != static_cast<acc_t>(1);  // ratio exactly 1: ATen copies that axis
  i1 = (i0 < n_in - 1 && resized) ? i0 + 1 : i0;
  l0 = static_cast<acc_t>(1) - lam;
  l1 = lam;
}

// ------------------------------------------------------------------------------------------------ forward

// One term of the sum at output pixel (oy, ox) of image n, channel c, in the accumulation type.
template <typename scalar_t, typename acc_t>
HRFAST_INLINE acc_t load_term(const TermView<scalar_t, acc_t>& t, int64_t n, int64_t c, int64_t oy, int64_t ox) {
  const int64_t base = n * t.sn + c * t.sc;
  acc_t v;
  if (t.mode == SAME) {
    v = static_cast<acc_t>(load_ro(t.x + base + oy * t.sh + ox * t.sw));
  } else if (t.mode == NEAREST) {
    const int64_t iy = nearest_source(oy, t.r32_h, t.h);
    const int64_t ix = nearest_source(ox, t.r32_w, t.w);
    v = static_cast<acc_t>(load_ro(t.x + base + iy * t.sh + ix * t.sw));
  } else {
    int64_t y0, y1, x0, x1;
    acc_t ly0, ly1, lx0, lx1;
    linear_source<acc_t>(oy, t.r_h, t.h, t.align != 0, y0, y1, ly0, ly1);
    linear_source<acc_t>(ox, t.r_w, t.w, t.align != 0, x0, x1, lx0, lx1);
    const acc_t v00 = static_cast<acc_t>(load_ro(t.x + base + y0 * t.sh + x0 * t.sw));
    const acc_t v01 = static_cast<acc_t>(load_ro(t.x + base + y0 * t.sh + x1 * t.sw));
    const acc_t v10 = static_cast<acc_t>(load_ro(t.x + base + y1 * t.sh + x0 * t.sw));
    const acc_t v11 = static_cast<acc_t>(load_ro(t.x + base + y1 * t.sh + x1 * t.sw));
    // ATen's order: h0l * (w0l * v00 + w1l * v01) + h1l * (w0l * v10 + w1l * v11)
    v = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11);
  }
  if (t.scale != nullptr) v = v * load_ro(t.scale + c);
  if (t.shift != nullptr) v = v + load_ro(t.shift + c);
  return v;
}

// ReLU that keeps NaN, as torch.relu does.
template <typename acc_t>
HRFAST_INLINE acc_t relu_keep_nan(acc_t v) {
  return v < static_cast<acc_t>(0) ? static_cast<acc_t>(0) : v;
}

// The (pre-ReLU) sum of terms [0, count) at one output element, left to right. `init`, when given, is a
// partial sum of earlier terms (chained launches); it takes the place of the first term's value.
template <typename scalar_t, typename acc_t>
HRFAST_INLINE acc_t forward_sum(const TermView<scalar_t, acc_t>* terms, int count, const acc_t* init,
                                int64_t n, int64_t c, int64_t oy, int64_t ox) {
  int k = 0;
  acc_t acc;
  if (init != nullptr) {
    acc = *init;
  } else {
    acc = load_term(terms[0], n, c, oy, ox);
    k = 1;
  }
  for (; k < count; ++k) acc += load_term(terms[k], n, c, oy, ox);
  return acc;
}

// --------------------------------------------------------------------------------------------- backward

// The upstream gradient through the ReLU, in the accumulation type: grad_y, zeroed where y <= 0 only (ATen's
// threshold_backward: NaN y passes the gradient).
template <typename scalar_t, typename acc_t>
HRFAST_INLINE acc_t masked_grad(const scalar_t* gy, int64_t off_gy, const scalar_t* y, int64_t off_y, bool relu) {
  const acc_t g = static_cast<acc_t>(load_ro(gy + off_gy));
  if (relu && static_cast<acc_t>(load_ro(y + off_y)) <= static_cast<acc_t>(0)) return static_cast<acc_t>(0);
  return g;
}

// First output index that may read source s: exact (s * step - offset) when the host found the ratio to be
// exactly 1/step; otherwise a lower bound with 2 indices of slack for rounding (kernels/resample.py).
template <typename acc_t>
HRFAST_INLINE int64_t first_reader(int64_t s, acc_t r, int32_t step, int32_t offset, int32_t mode, bool align) {
  if (step > 0) return max_(s * step - offset, static_cast<int64_t>(0));
  if (!(r > static_cast<acc_t>(0))) return 0;  // r == 0 (align_corners, one source pixel): all outputs read it
  const acc_t sf = static_cast<acc_t>(s);
  acc_t start;
  if (mode == NEAREST) {
    start = sf / r;
  } else if (align) {
    start = (sf - static_cast<acc_t>(1)) / r;
  } else {
    start = (sf - static_cast<acc_t>(0.5)) / r - static_cast<acc_t>(0.5);
  }
  start = max_(start, static_cast<acc_t>(0));  // before the cast: negative values truncate towards zero
  return max_(static_cast<int64_t>(start) - 2, static_cast<int64_t>(0));
}

// Weight with which output index d reads source index s, with the forward's exact index rules.
template <typename acc_t, typename I>
HRFAST_INLINE acc_t adjoint_weight(I d, I s, float r32, acc_t r, I n_in, I n_out, int32_t mode, bool align) {
  if (d >= n_out) return static_cast<acc_t>(0);
  if (mode == NEAREST) return nearest_source<I>(d, r32, n_in) == s ? static_cast<acc_t>(1) : static_cast<acc_t>(0);
  I i0, i1;
  acc_t l0, l1;
  linear_source<acc_t, I>(d, r, n_in, align, i0, i1, l0, l1);
  return (i0 == s ? l0 : static_cast<acc_t>(0)) + (i1 == s ? l1 : static_cast<acc_t>(0));
}

// u = Up^T(g) at source pixel (sy, sx) of image n, channel c: the sum over the output pixels d that read it,
// g(d) * weight(d), g being grad_y through the ReLU (`masked_grad`, when relu). A gather over the window
// [first_reader, + K) per axis; taps of zero weight are not read. Deterministic: a fixed order (row-major).
// `y`/`sy_*` are ignored when relu is false. Not for SAME terms.
template <typename scalar_t, typename acc_t>
HRFAST_INLINE acc_t adjoint_element(const TermView<scalar_t, acc_t>& t, const scalar_t* gy, int64_t gsn,
                                    int64_t gsc, int64_t gsh, int64_t gsw, const scalar_t* y, int64_t ysn,
                                    int64_t ysc, int64_t ysh, int64_t ysw, bool relu, int64_t H, int64_t W,
                                    int64_t n, int64_t c, int64_t sy, int64_t sx) {
  const bool align = t.align != 0;
  // nearest reads its ratio in float32 in the forward; the window bound uses it in the accumulation type
  const acc_t rh = t.mode == NEAREST ? static_cast<acc_t>(t.r32_h) : t.r_h;
  const acc_t rw = t.mode == NEAREST ? static_cast<acc_t>(t.r32_w) : t.r_w;
  const int64_t lo_y = first_reader<acc_t>(sy, rh, t.step_h, t.off_h, t.mode, align);
  const int64_t lo_x = first_reader<acc_t>(sx, rw, t.step_w, t.off_w, t.mode, align);
  const int64_t gbase = n * gsn + c * gsc;
  const int64_t ybase = n * ysn + c * ysc;
  acc_t u = static_cast<acc_t>(0);
  for (int32_t ky = 0; ky < t.k_h; ++ky) {
    const int64_t dy = lo_y + ky;
    const acc_t wy = adjoint_weight<acc_t, int64_t>(dy, sy, t.r32_h, t.r_h, t.h, H, t.mode, align);
    if (wy == static_cast<acc_t>(0)) continue;  // weights are finite: wy * wx would be 0 too
    for (int32_t kx = 0; kx < t.k_w; ++kx) {
      const int64_t dx = lo_x + kx;
      const acc_t wgt = wy * adjoint_weight<acc_t, int64_t>(dx, sx, t.r32_w, t.r_w, t.w, W, t.mode, align);
      if (wgt == static_cast<acc_t>(0)) continue;
      const acc_t g = masked_grad<scalar_t, acc_t>(gy, gbase + dy * gsh + dx * gsw, y, ybase + dy * ysh + dx * ysw,
                                                   relu);
      u += g * wgt;
    }
  }
  return u;
}

}  // namespace hrfast
