// The fusion op's launchers, written once for both executors (host code, ATen): the grid and its limits,
// the term packs (at most kMaxTerms per launch, more are chained), the dscale masks and the sum slot, and
// the per-tile partial buffers [slots, R, C]. `Exec` runs one launch of a kernel of fuse_kernels.h:
//
//   struct Exec {
//     using Guard = ...;                        // constructed from the tensors' device for the whole call
//     template <class K> static void run(const Grid& grid, const typename K::Params& p);
//   };
//
// CudaExec (fuse_cuda.cu) launches the __global__ wrappers on the current stream; HostExec (fuse_cpu.cpp)
// emulates the grid on CPU tensors, block by block. host_launchers() / cuda_launchers() are these templates
// instantiated with one or the other (`launchers_of`), so the host build runs the CUDA launch logic as it is.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "fuse_kernels.h"
#include "fuse_launch.h"

namespace hrfast {

constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridYZ = 65535;

struct Grid {
  int64_t x, y, z;
};

template <class T>
struct type_tag {
  using type = T;
};

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The thread mapping's layout (fuse_kernels.h): channels contiguous, more than one of them.
inline bool channels_last_like(const at::Tensor& t) { return t.stride(1) == 1 && t.size(1) > 1; }

inline bool has_zero_stride(const at::Tensor& t) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) == 0 && t.size(d) > 1) return true;
  }
  return false;
}

inline at::ScalarType acc_dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A backward kernel's grad_y and ReLU mask source; without relu y is undefined and grad_y stands in for it
// (a valid pointer, never read).
template <typename scalar_t>
GradIn<scalar_t> grad_in(const at::Tensor& grad_y, const at::Tensor& y, bool relu) {
  const at::Tensor& y_arg = relu ? y : grad_y;
  return {grad_y.data_ptr<scalar_t>(), strides_of(grad_y), y_arg.data_ptr<scalar_t>(), strides_of(y_arg), relu};
}

// The grid over a [C x P] plane per image (N images), within CUDA's limits (x < 2^31, y and z <= 65535).
inline Grid grid_for(bool cl, int64_t C, int64_t P, int64_t N) {
  const int64_t gx = cl ? (P + kBY - 1) / kBY : (P + kBX - 1) / kBX;
  const int64_t gy = cl ? (C + kBX - 1) / kBX : (C + kBY - 1) / kBY;
  TORCH_CHECK(gy <= kMaxGridYZ, "hrfast fuse: ", C, " channels exceed the CUDA kernels' grid (at most ",
              kMaxGridYZ * (cl ? kBX : kBY), " in the ", cl ? "channels_last" : "NCHW", " layout)");
  TORCH_CHECK(gx <= kMaxGridX, "hrfast fuse: ", P, " pixels per channel exceed the CUDA kernels' grid");
  TORCH_CHECK(N <= kMaxGridYZ, "hrfast fuse: batch ", N, " exceeds ", kMaxGridYZ,
              " images per call (CUDA grid z)");
  return {gx, gy, N};
}

// Whether every element offset of `t` (and of offsets up to twice its span, the slack the adjoint's window
// pointers take) fits in int32: the kernels' int32 variants.
inline bool fits_int32(const at::Tensor& t) {
  int64_t span = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) < 0) return false;
    span += (t.size(d) - 1) * t.stride(d);
  }
  return span < (int64_t{1} << 30);
}

// The compile-time pack of `terms` when ForwardTileKernel has it (kForwardPacks), else 0 (generic kernel).
inline uint32_t forward_pack(const std::vector<TermSpec>& terms) {
  if (terms.empty() || terms.size() > static_cast<size_t>(kMaxPackTerms)) return 0;
  uint32_t code = static_cast<uint32_t>(terms.size());
  for (size_t k = 0; k < terms.size(); ++k) {
    if (!fits_int32(terms[k].x)) return 0;
    code |= static_cast<uint32_t>(terms[k].desc.mode) << (4 + 2 * k);
  }
  for (uint32_t known : kForwardPacks) {
    if (known == code) return code;
  }
  return 0;
}

template <typename scalar_t, typename acc_t>
TermView32<scalar_t, acc_t> view32(const TermView<scalar_t, acc_t>& v) {
  TermView32<scalar_t, acc_t> r;
  r.x = v.x;
  r.scale = v.scale;
  r.shift = v.shift;
  r.h = static_cast<int32_t>(v.h);
  r.w = static_cast<int32_t>(v.w);
  r.sn = static_cast<int32_t>(v.sn);
  r.sc = static_cast<int32_t>(v.sc);
  r.sh = static_cast<int32_t>(v.sh);
  r.sw = static_cast<int32_t>(v.sw);
  r.align = v.align;
  r.r32_h = v.r32_h;
  r.r32_w = v.r32_w;
  r.r_h = v.r_h;
  r.r_w = v.r_w;
  return r;
}

// Kernel<PACK> (ForwardTileKernel or ForwardVecKernel) for the runtime `code` (one of kForwardPacks).
template <template <typename, typename, uint32_t> class Kernel, class Exec, typename scalar_t, typename acc_t,
          size_t... I>
void run_forward_pack(uint32_t code, const Grid& grid, const ForwardTileParams<scalar_t, acc_t>& p,
                      std::index_sequence<I...>) {
  const bool ran = ((code == kForwardPacks[I]
                         ? (Exec::template run<Kernel<scalar_t, acc_t, kForwardPacks[I]>>(grid, p), true)
                         : false) ||
                    ...);
  TORCH_CHECK(ran, "hrfast fuse: no forward kernel for pack ", code);
}

// Whether ForwardVecKernel can run `out` and `terms`: channels_last with the channels a multiple of kVec, every
// tensor's channel stride 1, its other strides multiples of kVec and its data 16-byte aligned.
template <typename scalar_t>
bool vec_ok(const at::Tensor& out, const std::vector<TermSpec>& terms) {
  constexpr int64_t V = kVec<scalar_t>;
  auto fits = [](const at::Tensor& t) {
    if (t.stride(1) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
    for (int64_t d : {0, 2, 3}) {
      if (t.stride(d) % V != 0) return false;
    }
    return true;
  };
  if (out.size(1) % V != 0 || !fits(out)) return false;
  for (const TermSpec& t : terms) {
    if (!fits(t.x)) return false;
  }
  return true;
}

// The fields every pack forward fills alike: the terms' int32 views, the output's pointer, strides and sizes.
template <typename scalar_t, typename acc_t>
ForwardTileParams<scalar_t, acc_t> pack_params(const at::Tensor& out, const std::vector<TermSpec>& terms) {
  const int64_t C = out.size(1), H = out.size(2), W = out.size(3);
  ForwardTileParams<scalar_t, acc_t> p;
  for (size_t k = 0; k < terms.size(); ++k) p.t[k] = view32(make_view<scalar_t, acc_t>(terms[k], H, W));
  p.out = out.data_ptr<scalar_t>();
  p.so_n = static_cast<int32_t>(out.stride(0));
  p.so_c = static_cast<int32_t>(out.stride(1));
  p.so_h = static_cast<int32_t>(out.stride(2));
  p.so_w = static_cast<int32_t>(out.stride(3));
  p.C = static_cast<int32_t>(C);
  p.H = static_cast<int32_t>(H);
  p.W = static_cast<int32_t>(W);
  return p;
}

// The compile-time pack forward, one launch for all terms: ForwardVecKernel where `vec_ok`, else
// ForwardTileKernel.
template <class Exec, typename scalar_t, typename acc_t>
void forward_pack_launch(const at::Tensor& out, const std::vector<TermSpec>& terms, bool relu, uint32_t code) {
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
  const bool vec = vec_ok<scalar_t>(out, terms);
  auto p = pack_params<scalar_t, acc_t>(out, terms);
  // threads per image: (channel, row pair, kPX-pixel segment), or (kVec-channel group, row, kVPX-pixel segment)
  p.S = static_cast<int32_t>(vec ? (W + kVPX - 1) / kVPX : (W + kPX - 1) / kPX);
  p.HP = static_cast<int32_t>(vec ? H : (H + kRows - 1) / kRows);
  p.per_image = static_cast<int32_t>((vec ? C / kVec<scalar_t> : C) * p.HP * p.S);
  p.cl = channels_last_like(out);
  p.relu = relu;
  const Grid grid{(p.per_image + kThreads - 1) / kThreads, 1, N};
  const auto packs = std::make_index_sequence<sizeof(kForwardPacks) / sizeof(uint32_t)>{};
  if (vec) {
    run_forward_pack<ForwardVecKernel, Exec, scalar_t, acc_t>(code, grid, p, packs);
  } else {
    run_forward_pack<ForwardTileKernel, Exec, scalar_t, acc_t>(code, grid, p, packs);
  }
}

// The factor f of an axis ratio that is exactly 1 / f with f = 2, 4 or 8, else 0.
inline int power_of_2_factor(const Ratio& r) {
  if (r.num <= 0 || r.den % r.num != 0) return 0;
  const int64_t f = r.den / r.num;
  return f == 2 || f == 4 || f == 8 ? static_cast<int>(f) : 0;
}

// Whether `t` can be read (or written) as runs of g elements along x by PhaseKernel: stride 1 along x, its other
// strides multiples of g, its data aligned to min(16, g * element size) bytes (load_run / store_run).
inline bool runs_ok(const at::Tensor& t, int64_t g) {
  if (t.stride(3) != 1) return false;
  for (int64_t d : {0, 1, 2}) {
    if (t.stride(d) % g != 0) return false;
  }
  const int64_t align = std::min<int64_t>(16, g * static_cast<int64_t>(t.element_size()));
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % align == 0;
}

// The pack of kPhasePacks that runs `out` and `terms` with PhaseKernel, else 0: NCHW (the output's stride along
// x is 1), every term output-size, or nearest / bilinear without align_corners by a factor f in {2, 4, 8} on
// both axes (the ratio exactly 1 / f) from a source of exactly H / f x W / f, the output divided into G x G
// blocks (G the largest factor, at least 4), the output and each term read / written as runs of G / f
// elements (`runs_ok`: output-size terms and the output G, the inner pixels of an upsampled term's window
// G / f), every offset int32.
inline uint32_t phase_pack(const at::Tensor& out, const std::vector<TermSpec>& terms) {
  if (terms.empty() || terms.size() > static_cast<size_t>(kMaxPackTerms) || !fits_int32(out)) return 0;
  const int64_t H = out.size(2), W = out.size(3);
  uint32_t code = static_cast<uint32_t>(terms.size());
  int g = 1;
  for (size_t k = 0; k < terms.size(); ++k) {
    const TermDesc& d = terms[k].desc;
    const at::Tensor& x = terms[k].x;
    if (!fits_int32(x)) return 0;
    int f = 1;
    if (d.mode != SAME) {
      f = power_of_2_factor(d.ratio_h);
      if (f == 0 || power_of_2_factor(d.ratio_w) != f || (d.mode == BILINEAR && d.align_corners)) return 0;
      if (x.size(2) * f != H || x.size(3) * f != W) return 0;
    }
    g = std::max(g, f);
    code |= static_cast<uint32_t>(d.mode) << (4 + 2 * k);
    code |= static_cast<uint32_t>(f == 8 ? 3 : f == 4 ? 2 : f == 2 ? 1 : 0) << (16 + 2 * k);
  }
  if (g < 4 || H % g != 0 || W % g != 0 || !runs_ok(out, g)) return 0;
  for (size_t k = 0; k < terms.size(); ++k) {
    if (!runs_ok(terms[k].x, g / pack_factor(code, static_cast<int>(k)))) return 0;
  }
  for (uint32_t known : kPhasePacks) {
    if (known == code) return code;
  }
  return 0;
}

// PhaseKernel<PACK> for the runtime `code` (one of kPhasePacks): one launch, G x G output pixels per thread.
template <class Exec, typename scalar_t, typename acc_t, size_t... I>
void phase_launch(const at::Tensor& out, const std::vector<TermSpec>& terms, bool relu, uint32_t code,
                  std::index_sequence<I...>) {
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
  const int64_t G = phase_group(code);
  auto p = pack_params<scalar_t, acc_t>(out, terms);
  p.S = static_cast<int32_t>(W / G);   // block columns
  p.HP = static_cast<int32_t>(H / G);  // block rows
  p.per_image = static_cast<int32_t>(C * p.HP * p.S);
  p.cl = false;
  p.relu = relu;
  const Grid grid{(p.per_image + kThreads - 1) / kThreads, 1, N};
  const bool ran = ((code == kPhasePacks[I]
                         ? (Exec::template run<PhaseKernel<scalar_t, acc_t, kPhasePacks[I]>>(grid, p), true)
                         : false) ||
                    ...);
  TORCH_CHECK(ran, "hrfast fuse: no phase kernel for pack ", code);
}

// The forward kernel that forward_launch runs for `out` and `terms` (its struct's name; tests and
// hrfast/perf/cuda_cpp.py's model of the choice): the same tests in the same order.
inline const char* forward_kernel_name(const at::Tensor& out, const std::vector<TermSpec>& terms) {
  if (phase_pack(out, terms) != 0) return "PhaseKernel";
  if ((fits_int32(out) ? forward_pack(terms) : 0) == 0) return "ForwardKernel";
  bool vec = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hrfast_fuse_forward_kernel",
                                  [&] { vec = vec_ok<scalar_t>(out, terms); });
  return vec ? "ForwardVecKernel" : "ForwardTileKernel";
}

// y = ReLU(sum_k Up_k(x_k) * scale_k + shift_k) into `out`; more than kMaxTerms terms are chained through a
// partial sum in the accumulation type, laid out like `out` (empty_like keeps its strides), read and
// rewritten in place element by element.
template <class Exec>
void forward_launch(const at::Tensor& out, const std::vector<TermSpec>& terms, bool relu) {
  if (out.numel() == 0) return;
  const typename Exec::Guard guard(out.device());
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
  const bool cl = channels_last_like(out);
  const Grid grid = grid_for(cl, C, H * W, N);  // its limits hold for every path
  const int64_t K = static_cast<int64_t>(terms.size());
  const uint32_t phase = phase_pack(out, terms);
  if (phase != 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hrfast_fuse_forward_phase", [&] {
      phase_launch<Exec, scalar_t, at::opmath_type<scalar_t>>(
          out, terms, relu, phase, std::make_index_sequence<sizeof(kPhasePacks) / sizeof(uint32_t)>{});
    });
    return;
  }
  const uint32_t code = fits_int32(out) ? forward_pack(terms) : 0;
  if (code != 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hrfast_fuse_forward_tile", [&] {
      forward_pack_launch<Exec, scalar_t, at::opmath_type<scalar_t>>(out, terms, relu, code);
    });
    return;
  }
  at::Tensor partial;
  if (K > kMaxTerms) partial = at::empty_like(out, out.options().dtype(acc_dtype_of(out)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hrfast_fuse_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Kernel = ForwardKernel<scalar_t, acc_t>;
    acc_t* part = partial.defined() ? partial.data_ptr<acc_t>() : nullptr;
    for (int64_t start = 0; start < K; start += kMaxTerms) {
      const int count = static_cast<int>(std::min<int64_t>(kMaxTerms, K - start));
      const bool last = start + count >= K;
      typename Kernel::Params p;
      for (int i = 0; i < count; ++i) p.pack.t[i] = make_view<scalar_t, acc_t>(terms[start + i], H, W);
      p.count = count;
      p.init = start > 0 ? part : nullptr;
      p.partial_out = last ? nullptr : part;
      p.out = out.data_ptr<scalar_t>();
      p.so = strides_of(out);
      p.C = C;
      p.H = static_cast<int32_t>(H);
      p.W = static_cast<int32_t>(W);
      p.cl = cl;
      p.relu = relu;
      Exec::template run<Kernel>(grid, p);
    }
  });
}

// Output-size terms (see fuse_launch.h Launchers::backward_same): one launch per kMaxTerms terms; the first one
// also sums g (zero terms: only that). Partials [K + 1, R, C], R = N * grid.x.
template <class Exec>
at::Tensor backward_same_launch(const at::Tensor& grad_y, const at::Tensor& y, bool relu,
                                const std::vector<TermSpec>& terms, const std::vector<at::Tensor>& dx,
                                const std::vector<bool>& need_dscale, bool need_sum_g) {
  const typename Exec::Guard guard(grad_y.device());
  const int64_t N = grad_y.size(0), C = grad_y.size(1), H = grad_y.size(2), W = grad_y.size(3);
  const int64_t K = static_cast<int64_t>(terms.size());
  const bool cl = channels_last_like(grad_y);
  const Grid limits = grid_for(cl, C, H * W, N);  // the limits' errors, as every launcher gives them
  // fuse_kernels.h BackwardSameKernel: kPB pixels of a row per thread, grid x over the rows' segments
  const int64_t S = (W + kPB - 1) / kPB;
  const int64_t along = cl ? kBY : kBX;
  const Grid grid{(H * S + along - 1) / along, limits.y, limits.z};
  const int64_t R = N * grid.x;
  at::Tensor parts = at::zeros({K + 1, R, C}, grad_y.options().dtype(acc_dtype_of(grad_y)));
  if (grad_y.numel() == 0) return parts;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "hrfast_fuse_bwd_same", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Kernel = BackwardSameKernel<scalar_t, acc_t>;
    for (int64_t start = 0; start < std::max<int64_t>(K, 1); start += kMaxTerms) {
      const int count = static_cast<int>(std::min<int64_t>(kMaxTerms, K - start));
      typename Kernel::Params p;
      uint32_t mask = 0;
      bool busy = start == 0 && need_sum_g;
      for (int i = 0; i < count; ++i) {
        const int64_t k = start + i;
        p.pack.t[i] = make_view<scalar_t, acc_t>(terms[k], H, W);
        p.grads.dx[i] = dx[k].defined() ? dx[k].data_ptr<scalar_t>() : nullptr;
        p.grads.s[i] = dx[k].defined() ? strides_of(dx[k]) : Strides{0, 0, 0, 0};
        if (need_dscale[k]) mask |= 1u << i;
        busy |= dx[k].defined() || need_dscale[k];
      }
      if (!busy) continue;
      p.count = count;
      p.dscale_mask = mask;
      p.sum_slot = (start == 0 && need_sum_g) ? static_cast<int>(K) : -1;
      p.slot0 = static_cast<int>(start);
      p.g = grad_in<scalar_t>(grad_y, y, relu);
      p.parts = parts.data_ptr<acc_t>();
      p.R = R;
      p.C = C;
      p.H = static_cast<int32_t>(H);
      p.W = static_cast<int32_t>(W);
      p.S = static_cast<int32_t>(S);
      p.cl = cl;
      Exec::template run<Kernel>(grid, p);
    }
  });
  return parts;
}

// The thread mapping's layout of an upsampled term's adjoint: that of what it writes (dz), else of z; a
// stride-0 stand-in z (its dscale not needed) has none: then grad_y's, the layout empty_grad gives dz.
inline bool adjoint_layout_cl(const at::Tensor& grad_y, const TermSpec& term, const at::Tensor& dz) {
  const at::Tensor& layout = dz.defined() ? dz : (has_zero_stride(term.x) ? grad_y : term.x);
  return channels_last_like(layout);
}

// The adjoint kernel backward_adjoint_launch runs (AdjointKernel<KMAX, MODE>): kmax 0 the generic gather,
// else the register variant of an exact window (int32 offsets) KMAX wide, MODE its mode, or ADJOINT_TENT for
// its phase form (fuse_kernels.h adjoint_row_tent) when `phase` and bilinear without align_corners by the same
// f on both axes, g exactly f times z's size, whole rows of adjoint_ps(KMAX) pixels.
struct AdjointChoice {
  int kmax, mode;
};

inline AdjointChoice adjoint_choice(const at::Tensor& grad_y, const at::Tensor& y, bool relu, const TermSpec& term,
                                    const at::Tensor& dz, bool phase) {
  const at::Tensor& z = term.x;
  const int64_t h = z.size(2), w = z.size(3);
  const int64_t H = grad_y.size(2), W = grad_y.size(3);
  const TermDesc& d = term.desc;
  int32_t k_h, k_w, step_h, step_w, off_h, off_w;
  window(d.ratio_h, d.mode, d.align_corners, H, k_h, step_h, off_h);
  window(d.ratio_w, d.mode, d.align_corners, W, k_w, step_w, off_w);
  // (fuse_kernels.h adjoint_row_fixed: exact on both axes, the window exactly KMAX wide, at most KMAX high)
  const bool fast = step_h > 0 && step_w > 0 && k_h <= k_w && fits_int32(grad_y) && (!relu || fits_int32(y)) &&
                    (dz.defined() ? fits_int32(dz) : true) && fits_int32(z);
  int kmax = 0;
  if (fast && d.mode == BILINEAR && (k_w == 4 || k_w == 8 || k_w == 16)) kmax = k_w;
  if (fast && d.mode == NEAREST && (k_w == 2 || k_w == 4 || k_w == 8)) kmax = k_w;
  if (kmax == 0) return {0, 0};
  const bool tent = phase && d.mode == BILINEAR && !d.align_corners && step_h == step_w && H == h * step_h &&
                    W == w * step_w && w % adjoint_ps(kmax) == 0;
  return {kmax, tent ? ADJOINT_TENT : static_cast<int>(d.mode)};
}

// Its name, "AdjointKernel<KMAX,MODE>" (tests; hrfast/perf/cuda_cpp.py's model of the choice).
inline std::string adjoint_kernel_name(const at::Tensor& grad_y, const at::Tensor& y, bool relu,
                                       const TermSpec& term, const at::Tensor& dz, bool phase) {
  const AdjointChoice a = adjoint_choice(grad_y, y, relu, term, dz, phase);
  return "AdjointKernel<" + std::to_string(a.kmax) + "," + std::to_string(a.mode) + ">";
}

// An upsampled term (see fuse_launch.h Launchers::backward_adjoint): one launch over the source pixels. Partials
// [2, R, C], R = N * grid.x. The thread mapping follows the layout of what it writes (dz), else of z; a
// stride-0 stand-in z (its dscale not needed) has none: then grad_y's, the layout empty_grad gives dz.
template <class Exec>
at::Tensor backward_adjoint_launch(const at::Tensor& grad_y, const at::Tensor& y, bool relu, const TermSpec& term,
                                   const at::Tensor& dz, bool need_dscale, bool need_dshift, bool phase) {
  const typename Exec::Guard guard(grad_y.device());
  const at::Tensor& z = term.x;
  const int64_t N = z.size(0), C = z.size(1), h = z.size(2), w = z.size(3);
  const int64_t H = grad_y.size(2), W = grad_y.size(3);
  const bool cl = adjoint_layout_cl(grad_y, term, dz);
  const Grid limits = grid_for(cl, C, h * w, N);  // the generic mapping's grid; its limits hold for both
  // the register variant of an exact window (int32 offsets) when one fits, else the generic gather
  const TermDesc& d = term.desc;
  const AdjointChoice choice = adjoint_choice(grad_y, y, relu, term, dz, phase);
  const int kmax = choice.kmax;
  // the register variant: adjoint_ps(kmax) source pixels of a row per thread, grid x over the rows' segments
  const int64_t ps = adjoint_ps(kmax);
  const int64_t S = (w + ps - 1) / ps;
  const int64_t along = cl ? kBY : kBX;
  const Grid grid = kmax > 0 ? Grid{(h * S + along - 1) / along, limits.y, limits.z} : limits;
  const int64_t R = N * grid.x;
  at::Tensor parts = at::zeros({2, R, C}, grad_y.options().dtype(acc_dtype_of(grad_y)));
  if (z.numel() == 0 || grad_y.numel() == 0) return parts;
  // the register variant always applies the mask: without relu, a y of 1 (strides 0) passes every g
  const at::Tensor one = kmax > 0 && !relu ? at::ones({1, 1, 1, 1}, grad_y.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "hrfast_fuse_bwd_adjoint", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel_tag) {
      using Kernel = typename decltype(kernel_tag)::type;
      typename Kernel::Params p;
      p.t = make_view<scalar_t, acc_t>(term, H, W);
      p.dz = dz.defined() ? dz.data_ptr<scalar_t>() : nullptr;
      p.sd = dz.defined() ? strides_of(dz) : Strides{0, 0, 0, 0};
      p.g = grad_in<scalar_t>(grad_y, y, relu);
      if (one.defined()) {
        p.g.y = one.data_ptr<scalar_t>();
        p.g.sy = Strides{0, 0, 0, 0};
      }
      p.H = H;
      p.W = W;
      p.parts = parts.data_ptr<acc_t>();
      p.R = R;
      p.C = C;
      p.S = static_cast<int32_t>(S);
      p.need_dscale = need_dscale;
      p.need_dshift = need_dshift;
      p.cl = cl;
      Exec::template run<Kernel>(grid, p);
    };
    if (choice.mode == ADJOINT_TENT && kmax == 4) {
      launch(type_tag<AdjointKernel<scalar_t, acc_t, 4, ADJOINT_TENT>>{});
    } else if (choice.mode == ADJOINT_TENT && kmax == 8) {
      launch(type_tag<AdjointKernel<scalar_t, acc_t, 8, ADJOINT_TENT>>{});
    } else if (choice.mode == ADJOINT_TENT && kmax == 16) {
      launch(type_tag<AdjointKernel<scalar_t, acc_t, 16, ADJOINT_TENT>>{});
    } else if (d.mode == BILINEAR && kmax == 4) {
      launch(type_tag<AdjointKernel<scalar_t, acc_t, 4, BILINEAR>>{});
    } else if (d.mode == BILINEAR && kmax == 8) {
      launch(type_tag<AdjointKernel<scalar_t, acc_t, 8, BILINEAR>>{});
    } else if (d.mode == BILINEAR && kmax == 16) {
      launch(type_tag<AdjointKernel<scalar_t, acc_t, 16, BILINEAR>>{});
    } else if (d.mode == NEAREST && kmax == 2) {
      launch(type_tag<AdjointKernel<scalar_t, acc_t, 2, NEAREST>>{});
    } else if (d.mode == NEAREST && kmax == 4) {
      launch(type_tag<AdjointKernel<scalar_t, acc_t, 4, NEAREST>>{});
    } else if (d.mode == NEAREST && kmax == 8) {
      launch(type_tag<AdjointKernel<scalar_t, acc_t, 8, NEAREST>>{});
    } else {
      launch(type_tag<AdjointKernel<scalar_t, acc_t, 0, 0>>{});
    }
  });
  return parts;
}

// The upsampled terms (positions in `terms`, in order) that one RowAdjointKernel launch takes: the longest
// run from the first of those in the phase form (adjoint_choice: ADJOINT_TENT) of at least two whose
// factors, in order, are a compiled pack (kRowPacks) and whose thread mappings share a layout, where every
// term's blocks of segments lie inside the row kernel's (S = W / kRowL segments per row: S % along == 0 or
// along % S == 0, along = kBX, kBY in channels_last); none otherwise. `dz[k]` as backward_adjoint takes it.
inline std::vector<int64_t> adjoint_row_group(const at::Tensor& grad_y, const at::Tensor& y, bool relu,
                                              const std::vector<TermSpec>& terms, const std::vector<at::Tensor>& dz) {
  std::vector<int64_t> phased;
  for (size_t k = 0; k < terms.size(); ++k) {
    if (adjoint_choice(grad_y, y, relu, terms[k], dz[k], true).mode == ADJOINT_TENT) {
      phased.push_back(static_cast<int64_t>(k));
    }
  }
  const int64_t W = grad_y.size(3);
  for (size_t n = std::min<size_t>(phased.size(), 3); n >= 2; --n) {
    const bool cl = adjoint_layout_cl(grad_y, terms[phased[0]], dz[phased[0]]);
    uint32_t code = static_cast<uint32_t>(n);
    bool same_layout = true;
    for (size_t i = 0; i < n; ++i) {
      const TermSpec& t = terms[phased[i]];
      code |= row_log2(static_cast<int>(grad_y.size(3) / t.x.size(3))) << (4 + 2 * i);
      same_layout &= adjoint_layout_cl(grad_y, t, dz[phased[i]]) == cl;
    }
    bool known = false;
    for (uint32_t c : kRowPacks) known |= c == code;
    const int64_t S = W / kRowL, along = cl ? kBY : kBX;
    if (known && same_layout && W % kRowL == 0 && (S % along == 0 || along % S == 0)) {
      return std::vector<int64_t>(phased.begin(), phased.begin() + static_cast<int64_t>(n));
    }
  }
  return {};
}

// Its kernel's name, "RowAdjointKernel<f0,f1,...>" (tests; hrfast/perf/cuda_cpp.py's model of the choice).
inline std::string adjoint_row_name(const at::Tensor& grad_y, const std::vector<TermSpec>& terms) {
  std::string name = "RowAdjointKernel<";
  for (size_t i = 0; i < terms.size(); ++i) {
    name += (i ? "," : "") + std::to_string(grad_y.size(3) / terms[i].x.size(3));
  }
  return name + ">";
}

// The upsampled terms of adjoint_row_group in one RowAdjointKernel launch (see fuse_launch.h
// Launchers::backward_adjoint_row): per term its partials [2, R_t, C] as backward_adjoint_launch returns them
// (R_t = N * its own launch's grid x), dz[k] its gradient (undefined: not needed).
template <class Exec>
std::vector<at::Tensor> backward_adjoint_row_launch(const at::Tensor& grad_y, const at::Tensor& y, bool relu,
                                                    const std::vector<TermSpec>& terms,
                                                    const std::vector<at::Tensor>& dz,
                                                    const std::vector<bool>& need_dscale,
                                                    const std::vector<bool>& need_dshift) {
  const typename Exec::Guard guard(grad_y.device());
  const int64_t NT = static_cast<int64_t>(terms.size());
  const int64_t N = grad_y.size(0), C = grad_y.size(1), H = grad_y.size(2), W = grad_y.size(3);
  TORCH_CHECK(NT >= 2 && NT <= 3 && adjoint_row_group(grad_y, y, relu, terms, dz).size() == static_cast<size_t>(NT),
              "hrfast fuse: these terms do not make one RowAdjointKernel launch");
  const bool cl = adjoint_layout_cl(grad_y, terms[0], dz[0]);
  uint32_t code = static_cast<uint32_t>(NT);
  int64_t fm = 1;
  for (int64_t i = 0; i < NT; ++i) {
    const int64_t f = W / terms[i].x.size(3);
    code |= row_log2(static_cast<int>(f)) << (4 + 2 * i);
    fm = std::max(fm, f);
  }
  const int64_t h0 = H / fm, S = W / kRowL, along = cl ? kBY : kBX;
  const Grid limits = grid_for(cl, C, h0 * S, N);
  const Grid grid{(h0 * S + along - 1) / along, limits.y, limits.z};
  std::vector<at::Tensor> parts;
  std::vector<int64_t> gx;
  for (int64_t i = 0; i < NT; ++i) {  // each term's own launch's grid x (backward_adjoint_launch)
    const int64_t h = terms[i].x.size(2);
    gx.push_back((h * S + along - 1) / along);
    parts.push_back(at::zeros({2, N * gx.back(), C}, grad_y.options().dtype(acc_dtype_of(grad_y))));
  }
  if (grad_y.numel() == 0) return parts;
  const at::Tensor one = !relu ? at::ones({1, 1, 1, 1}, grad_y.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "hrfast_fuse_bwd_adjoint_row", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel_tag) {
      using Kernel = typename decltype(kernel_tag)::type;
      typename Kernel::Params p;
      for (int64_t i = 0; i < NT; ++i) {
        p.t[i] = make_view<scalar_t, acc_t>(terms[i], H, W);
        p.dz[i] = dz[i].defined() ? dz[i].data_ptr<scalar_t>() : nullptr;
        p.sd[i] = dz[i].defined() ? strides_of(dz[i]) : Strides{0, 0, 0, 0};
        p.parts[i] = parts[i].data_ptr<acc_t>();
        p.R[i] = N * gx[i];
        p.gx[i] = static_cast<int32_t>(gx[i]);
        p.need_dscale[i] = need_dscale[i];
        p.need_dshift[i] = need_dshift[i];
      }
      p.g = grad_in<scalar_t>(grad_y, y, relu);
      if (one.defined()) {  // the mask always applied: without relu a y of 1 (strides 0) passes every g
        p.g.y = one.data_ptr<scalar_t>();
        p.g.sy = Strides{0, 0, 0, 0};
      }
      p.C = C;
      p.W = static_cast<int32_t>(W);
      p.h0 = static_cast<int32_t>(h0);
      p.S = static_cast<int32_t>(S);
      p.log2s = 0;
      while (S < along && (int64_t{1} << p.log2s) < S) ++p.log2s;
      p.cl = cl;
      Exec::template run<Kernel>(grid, p);
    };
    if (code == row_code(2, 4, 8)) {
      launch(type_tag<RowAdjointKernel<scalar_t, acc_t, row_code(2, 4, 8)>>{});
    } else {
      launch(type_tag<RowAdjointKernel<scalar_t, acc_t, row_code(2, 4)>>{});  // kRowPacks' other
    }
  });
  return parts;
}

// The launchers above with one executor (fuse_launch.h host_launchers / cuda_launchers).
template <class Exec>
const Launchers& launchers_of() {
  static const Launchers table{&forward_launch<Exec>,       &backward_same_launch<Exec>,
                               &backward_adjoint_launch<Exec>, &backward_adjoint_row_launch<Exec>,
                               &forward_kernel_name,          &adjoint_kernel_name,
                               &adjoint_row_group,            &adjoint_row_name};
  return table;
}

}  // namespace hrfast
