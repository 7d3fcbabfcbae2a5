// Host-side interface between the binding (bindings.cpp: validation, allocation, per-channel reductions) and
// the two executors of the fusion kernels: the host build's emulation of the CUDA grid (fuse_cpu.cpp, CPU
// tensors, a test vehicle for the CUDA code) and the GPU (fuse_cuda.cu, CUDA tensors). Both are the same
// launchers (fuse_launchers.h) and kernels (fuse_kernels.h) with another executor: one `Launchers` table each.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "fuse.h"

namespace hrfast {

// One term's descriptor: hrfast/plan.py `TermPlan`'s fields in its order. Ratios are ATen's source-index
// ratios per axis as exact fractions num/den ((1, 1) for a SAME term).
struct Ratio {
  int64_t num = 1, den = 1;
};

struct TermDesc {
  int64_t mode = SAME;
  bool align_corners = false;  // bilinear only
  Ratio ratio_h, ratio_w;
  bool has_scale = false, has_shift = false;
};

// One term as the launchers take it: its descriptor and tensors. `scale`/`shift` are undefined (the
// descriptor has none) or dense [C] tensors in the accumulation dtype (float32, float64 for float64 inputs),
// converted by the binding.
struct TermSpec {
  TermDesc desc;
  at::Tensor x;
  at::Tensor scale;
  at::Tensor shift;
};

// (K, step, offset) of the adjoint's gather along one axis (a port of kernels/fuse.py `window`): source s
// visits outputs [s * step - offset, + K) when the ratio is exactly 1/step with step a power of two (the
// forward's float index math is then exact: HRNet's usual 2^k); else step = 0 and K over-estimates the
// fan-out (1/r nearest, 2/r bilinear) with room for `first_reader`'s slack.
inline void window(Ratio ratio, int64_t mode, bool align, int64_t n_out, int32_t& K, int32_t& step,
                   int32_t& offset) {
  const int64_t num = ratio.num, den = ratio.den;
  if (num == 1 && (den & (den - 1)) == 0 && !(mode == BILINEAR && align)) {
    step = static_cast<int32_t>(den);
    if (mode == NEAREST) {
      K = static_cast<int32_t>(den);
      offset = 0;
    } else {
      K = static_cast<int32_t>(2 * den);
      offset = static_cast<int32_t>((den + 1) / 2);  // d reads s iff (d + 0.5) / m - 0.5 lies in [s - 1, s + 1)
    }
    return;
  }
  step = 0;
  offset = 0;
  const double r = static_cast<double>(num) / static_cast<double>(den);
  if (r <= 0) {
    K = static_cast<int32_t>(n_out);
    return;
  }
  const double fan_out = mode == NEAREST ? 1.0 / r : 2.0 / r;
  K = static_cast<int32_t>(std::min<double>(static_cast<double>(n_out + 2), std::ceil(fan_out) + 5));
}

// The kernels' view of a term: pointers, sizes, strides, ratios and adjoint windows. `H`, `W`: output size.
template <typename scalar_t, typename acc_t>
TermView<scalar_t, acc_t> make_view(const TermSpec& t, int64_t H, int64_t W) {
  TermView<scalar_t, acc_t> v;
  v.x = t.x.data_ptr<scalar_t>();
  v.scale = t.scale.defined() ? t.scale.data_ptr<acc_t>() : nullptr;
  v.shift = t.shift.defined() ? t.shift.data_ptr<acc_t>() : nullptr;
  v.h = t.x.size(2);
  v.w = t.x.size(3);
  v.sn = t.x.stride(0);
  v.sc = t.x.stride(1);
  v.sh = t.x.stride(2);
  v.sw = t.x.stride(3);
  const TermDesc& d = t.desc;
  v.mode = static_cast<int32_t>(d.mode);
  v.align = d.align_corners ? 1 : 0;
  // as the Triton launcher passes it: the double quotient rounded to float32
  const double qh = static_cast<double>(d.ratio_h.num) / static_cast<double>(d.ratio_h.den);
  const double qw = static_cast<double>(d.ratio_w.num) / static_cast<double>(d.ratio_w.den);
  v.r32_h = static_cast<float>(qh);
  v.r32_w = static_cast<float>(qw);
  // bilinear computes its ratio in the accumulation type (ATen's opmath): float32, or float64 for float64
  v.r_h = static_cast<acc_t>(std::is_same<acc_t, double>::value ? qh : static_cast<double>(v.r32_h));
  v.r_w = static_cast<acc_t>(std::is_same<acc_t, double>::value ? qw : static_cast<double>(v.r32_w));
  v.k_h = v.k_w = 1;
  v.step_h = v.step_w = 1;
  v.off_h = v.off_w = 0;
  if (d.mode != SAME) {
    window(d.ratio_h, d.mode, d.align_corners, H, v.k_h, v.step_h, v.off_h);
    window(d.ratio_w, d.mode, d.align_corners, W, v.k_w, v.step_w, v.off_w);
  }
  return v;
}

// The launchers of one executor (fuse_launchers.h instantiated with it): host_launchers() runs CPU tensors
// through the host build's grid emulation (fuse_cpu.cpp), cuda_launchers() CUDA tensors (fuse_cuda.cu, only
// in the CUDA build).
struct Launchers {
  // y = ReLU(sum_k Up_k(x_k) * scale_k + shift_k), written into `out` ([N, C, H, W], any strides).
  void (*forward)(const at::Tensor& out, const std::vector<TermSpec>& terms, bool relu);
  // Output-size terms: dx[k] = g * scale_k (dx[k] undefined: not needed), g = grad_y zeroed where y <= 0. Returns
  // per-channel partial sums `parts` [K + 1, R, C] in the accumulation dtype (R: one row per image and block
  // along the grid's x, fuse_kernels.h partial_row): slot k < K holds sum(g * x_k) where need_dscale[k] (else
  // zero), slot K sum(g) when need_sum_g. The caller sums over R (a fixed-order reduction). `y` is undefined
  // when relu is false.
  at::Tensor (*backward_same)(const at::Tensor& grad_y, const at::Tensor& y, bool relu,
                              const std::vector<TermSpec>& terms, const std::vector<at::Tensor>& dx,
                              const std::vector<bool>& need_dscale, bool need_sum_g);
  // An upsampled term: u = Up^T(g) (a gather), dz = u * scale (dz undefined: not needed). Returns partial
  // sums `parts` [2, R, C]: slot 0 sum(u * z) when need_dscale, slot 1 sum(u) when need_dshift.
  // `phase`: its phase form where it applies (fuse_launchers.h adjoint_choice; false: tests of the other form).
  at::Tensor (*backward_adjoint)(const at::Tensor& grad_y, const at::Tensor& y, bool relu, const TermSpec& term,
                                 const at::Tensor& dz, bool need_dscale, bool need_dshift, bool phase);
  // Several upsampled terms in one launch that reads grad_y and y once (fuse_kernels.h RowAdjointKernel):
  // `terms` those adjoint_row_group chose, in order; per term its partials [2, R, C] as backward_adjoint
  // returns them (the same bits: dz, and the partial rows its own launch writes).
  std::vector<at::Tensor> (*backward_adjoint_row)(const at::Tensor& grad_y, const at::Tensor& y, bool relu,
                                                  const std::vector<TermSpec>& terms, const std::vector<at::Tensor>& dz,
                                                  const std::vector<bool>& need_dscale,
                                                  const std::vector<bool>& need_dshift);
  // The name of the kernel struct `forward` runs for `out` and `terms` (tests; the instrument's model).
  const char* (*forward_kernel)(const at::Tensor& out, const std::vector<TermSpec>& terms);
  // The adjoint kernel `backward_adjoint` runs for these arguments, "AdjointKernel<KMAX,MODE>".
  std::string (*adjoint_kernel)(const at::Tensor& grad_y, const at::Tensor& y, bool relu, const TermSpec& term,
                                const at::Tensor& dz, bool phase);
  // The upsampled terms (positions in `terms`) that backward_adjoint_row takes in one launch, none when it
  // takes none (fuse_launchers.h adjoint_row_group); dz[k] as backward_adjoint takes it.
  std::vector<int64_t> (*adjoint_row_group)(const at::Tensor& grad_y, const at::Tensor& y, bool relu,
                                            const std::vector<TermSpec>& terms, const std::vector<at::Tensor>& dz);
  // Its kernel's name, "RowAdjointKernel<f0,f1,...>" (the terms' factors, in order).
  std::string (*adjoint_row_kernel)(const at::Tensor& grad_y, const std::vector<TermSpec>& terms);
};

const Launchers& host_launchers();
#ifdef HRFAST_WITH_CUDA
const Launchers& cuda_launchers();
#endif

}  // namespace hrfast
