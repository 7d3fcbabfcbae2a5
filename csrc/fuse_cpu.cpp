// Host loops over the fusion kernels' element code (fuse.h), for CPU tensors.
//
// This is a test vehicle for the CUDA kernels' logic on machines without a GPU (the same __host__ __device__
// functions run here, so the whole correctness suite checks the index math, the sums, the ReLU mask and the
// adjoint windows), not a CPU backend: one element at a time, no vectorisation.
//
// Parallel over output elements (forward) or over (image, channel) planes (backward); each plane's
// per-channel sums are accumulated sequentially in a fixed order, so results do not depend on the number of
// threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <array>

#include "fuse_launch.h"

namespace hrfast {
namespace {

template <typename scalar_t, typename acc_t>
std::vector<TermView<scalar_t, acc_t>> make_views(const std::vector<TermSpec>& terms, int64_t H, int64_t W) {
  std::vector<TermView<scalar_t, acc_t>> out;
  out.reserve(terms.size());
  for (const auto& t : terms) out.push_back(make_view<scalar_t, acc_t>(t, H, W));
  return out;
}

constexpr int64_t kGrain = 2048;  // elements per parallel_for task (forward)

}  // namespace

void forward_cpu(const at::Tensor& out, const std::vector<TermSpec>& terms, bool relu) {
  if (out.numel() == 0) return;
  const int64_t C = out.size(1), H = out.size(2), W = out.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hrfast_fuse_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto views = make_views<scalar_t, acc_t>(terms, H, W);
    const TermView<scalar_t, acc_t>* tv = views.data();
    const int count = static_cast<int>(views.size());
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t son = out.stride(0), soc = out.stride(1), soh = out.stride(2), sow = out.stride(3);
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t ox = i % W;
        int64_t rest = i / W;
        const int64_t oy = rest % H;
        rest /= H;
        const int64_t c = rest % C;
        const int64_t n = rest / C;
        acc_t v = forward_sum<scalar_t, acc_t>(tv, count, nullptr, n, c, oy, ox);
        if (relu) v = relu_keep_nan(v);
        o[offset4(n, c, oy, ox, son, soc, soh, sow)] = static_cast<scalar_t>(v);
      }
    });
  });
}

at::Tensor backward_same_cpu(const at::Tensor& grad_y, const at::Tensor& y, bool relu,
                             const std::vector<TermSpec>& terms, const std::vector<at::Tensor>& dx,
                             const std::vector<bool>& need_dscale, bool need_sum_g) {
  const int64_t N = grad_y.size(0), C = grad_y.size(1), H = grad_y.size(2), W = grad_y.size(3);
  const int64_t K = static_cast<int64_t>(terms.size());
  const auto acc_dtype = grad_y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor parts = at::zeros({K + 1, N, C}, grad_y.options().dtype(acc_dtype));
  if (grad_y.numel() == 0) return parts;
  const at::Tensor& y_arg = relu ? y : grad_y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "hrfast_fuse_bwd_same_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto views = make_views<scalar_t, acc_t>(terms, H, W);
    std::vector<scalar_t*> dxp(K, nullptr);
    std::vector<std::array<int64_t, 4>> dxs(K);
    for (int64_t k = 0; k < K; ++k) {
      if (dx[k].defined()) {
        dxp[k] = dx[k].data_ptr<scalar_t>();
        dxs[k] = {dx[k].stride(0), dx[k].stride(1), dx[k].stride(2), dx[k].stride(3)};
      }
    }
    const scalar_t* gy = grad_y.data_ptr<scalar_t>();
    const scalar_t* yp = y_arg.data_ptr<scalar_t>();
    const int64_t gsn = grad_y.stride(0), gsc = grad_y.stride(1), gsh = grad_y.stride(2), gsw = grad_y.stride(3);
    const int64_t ysn = y_arg.stride(0), ysc = y_arg.stride(1), ysh = y_arg.stride(2), ysw = y_arg.stride(3);
    acc_t* pp = parts.data_ptr<acc_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sums(K);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        std::fill(sums.begin(), sums.end(), static_cast<acc_t>(0));
        acc_t sum_g = 0;
        for (int64_t oy = 0; oy < H; ++oy) {
          for (int64_t ox = 0; ox < W; ++ox) {
            const acc_t g = masked_grad<scalar_t, acc_t>(gy, offset4(n, c, oy, ox, gsn, gsc, gsh, gsw), yp,
                                                         offset4(n, c, oy, ox, ysn, ysc, ysh, ysw), relu);
            if (need_sum_g) sum_g += g;
            for (int64_t k = 0; k < K; ++k) {
              const auto& t = views[k];
              if (dxp[k] != nullptr) {
                const acc_t v = t.scale != nullptr ? g * t.scale[c] : g;
                dxp[k][offset4(n, c, oy, ox, dxs[k][0], dxs[k][1], dxs[k][2], dxs[k][3])] = static_cast<scalar_t>(v);
              }
              if (need_dscale[k]) {
                sums[k] += g * static_cast<acc_t>(t.x[offset4(n, c, oy, ox, t.sn, t.sc, t.sh, t.sw)]);
              }
            }
          }
        }
        for (int64_t k = 0; k < K; ++k) {
          if (need_dscale[k]) pp[(k * N + n) * C + c] = sums[k];
        }
        if (need_sum_g) pp[(K * N + n) * C + c] = sum_g;
      }
    });
  });
  return parts;
}

at::Tensor backward_adjoint_cpu(const at::Tensor& grad_y, const at::Tensor& y, bool relu, const TermSpec& term,
                                const at::Tensor& dz, bool need_dscale, bool need_dshift) {
  const at::Tensor& z = term.x;
  const int64_t N = z.size(0), C = z.size(1), h = z.size(2), w = z.size(3);
  const int64_t H = grad_y.size(2), W = grad_y.size(3);
  const auto acc_dtype = grad_y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor parts = at::zeros({2, N, C}, grad_y.options().dtype(acc_dtype));
  if (z.numel() == 0 || grad_y.numel() == 0) return parts;
  const at::Tensor& y_arg = relu ? y : grad_y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "hrfast_fuse_bwd_adjoint_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const TermView<scalar_t, acc_t> t = make_view<scalar_t, acc_t>(term, H, W);
    scalar_t* dzp = dz.defined() ? dz.data_ptr<scalar_t>() : nullptr;
    const int64_t dsn = dz.defined() ? dz.stride(0) : 0, dsc = dz.defined() ? dz.stride(1) : 0;
    const int64_t dsh = dz.defined() ? dz.stride(2) : 0, dsw = dz.defined() ? dz.stride(3) : 0;
    const scalar_t* gy = grad_y.data_ptr<scalar_t>();
    const scalar_t* yp = y_arg.data_ptr<scalar_t>();
    const int64_t gsn = grad_y.stride(0), gsc = grad_y.stride(1), gsh = grad_y.stride(2), gsw = grad_y.stride(3);
    const int64_t ysn = y_arg.stride(0), ysc = y_arg.stride(1), ysh = y_arg.stride(2), ysw = y_arg.stride(3);
    acc_t* pp = parts.data_ptr<acc_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        acc_t sum_uz = 0, sum_u = 0;
        for (int64_t sy = 0; sy < h; ++sy) {
          for (int64_t sx = 0; sx < w; ++sx) {
            const acc_t u = adjoint_element<scalar_t, acc_t>(t, gy, gsn, gsc, gsh, gsw, yp, ysn, ysc, ysh, ysw,
                                                             relu, H, W, n, c, sy, sx);
            if (dzp != nullptr) {
              const acc_t v = t.scale != nullptr ? u * t.scale[c] : u;
              dzp[offset4(n, c, sy, sx, dsn, dsc, dsh, dsw)] = static_cast<scalar_t>(v);
            }
            if (need_dscale) sum_uz += u * static_cast<acc_t>(t.x[offset4(n, c, sy, sx, t.sn, t.sc, t.sh, t.sw)]);
            if (need_dshift) sum_u += u;
          }
        }
        if (need_dscale) pp[n * C + c] = sum_uz;
        if (need_dshift) pp[(N + n) * C + c] = sum_u;
      }
    });
  });
  return parts;
}

}  // namespace hrfast
