// CUDA kernels of hrfast's fusion op and their launchers (compiled only in the CUDA build, -DHRFAST_WITH_CUDA).
//
// The per-element math is fuse.h's (__host__ __device__, shared with the host loops of fuse_cpu.cpp, which
// run the correctness suite on CPU). Here only the thread mapping, the block reductions and the launches.
//
// Thread mapping (all kernels): blocks of 32 x 8 threads over a [channels x pixels] tile of one image
// (grid z = image). The 32-wide dimension is the tensor's contiguous one: pixels for NCHW (threadIdx.x ->
// pixel), channels for channels_last (threadIdx.x -> channel), so a warp's loads and stores of same-size
// tensors are coalesced in either layout. One thread per element; offsets are 64-bit (int64 strides).
//
// Backward: the adjoint of each upsample is a gather (each source pixel sums the output pixels that read it,
// fuse.h `adjoint_element`); no atomics anywhere. Per-channel gradients (dscale, dshift) are reduced per
// block in shared memory in a fixed order and written as per-tile partials [slot, tile row, C], which the
// binding sums over the tile rows with torch.sum: bitwise deterministic from run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "fuse_launch.h"

namespace hrfast {
namespace {

constexpr int kMaxTerms = 8;  // terms per launch (kernel parameters); more are chained
constexpr int kBX = 32;       // threads along the contiguous dimension
constexpr int kBY = 8;        // threads along the other one
constexpr int64_t kMaxGridY = 65535;

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

bool channels_last_like(const at::Tensor& t) { return t.stride(1) == 1 && t.size(1) > 1; }

template <typename scalar_t, typename acc_t>
struct TermPack {
  TermView<scalar_t, acc_t> t[kMaxTerms];
};

template <typename scalar_t>
struct GradPack {
  scalar_t* dx[kMaxTerms];
  Strides s[kMaxTerms];
};

// The (channel, pixel) of this thread in a [C x P] plane tiled by 32 x 8 blocks; false when outside.
__device__ __forceinline__ bool tile_coords(bool cl, int64_t C, int64_t P, int64_t& c, int64_t& p) {
  if (cl) {
    c = static_cast<int64_t>(blockIdx.y) * kBX + threadIdx.x;
    p = static_cast<int64_t>(blockIdx.x) * kBY + threadIdx.y;
  } else {
    p = static_cast<int64_t>(blockIdx.x) * kBX + threadIdx.x;
    c = static_cast<int64_t>(blockIdx.y) * kBY + threadIdx.y;
  }
  return c < C && p < P;
}

dim3 grid_for(bool cl, int64_t C, int64_t P, int64_t N) {
  const int64_t gx = cl ? (P + kBY - 1) / kBY : (P + kBX - 1) / kBX;
  const int64_t gy = cl ? (C + kBX - 1) / kBX : (C + kBY - 1) / kBY;
  TORCH_CHECK(gy <= kMaxGridY, "hrfast fuse (CUDA): ", C, " channels exceed the kernels' grid (at most ",
              kMaxGridY * (cl ? kBX : kBY), " in this layout)");
  TORCH_CHECK(N <= kMaxGridY, "hrfast fuse (CUDA): batch ", N, " exceeds ", kMaxGridY, " images per call");
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(N));
}

// Sums `v` over the block's pixel dimension for each of its channels, in a fixed order, and writes the sum
// of channel c to dst[c] (dst: this block's row of the partials). Every thread of the block must call it.
template <typename acc_t>
__device__ __forceinline__ void block_sum_store(acc_t (*red)[kBX], acc_t v, bool cl, int64_t c, int64_t C,
                                                acc_t* dst) {
  red[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  if (cl) {  // threadIdx.x -> channel: sum the kBY pixels of column threadIdx.x
    if (threadIdx.y == 0 && c < C) {
      acc_t s = red[0][threadIdx.x];
      for (int i = 1; i < kBY; ++i) s += red[i][threadIdx.x];
      dst[c] = s;
    }
  } else {  // threadIdx.x -> pixel: sum the kBX pixels of row threadIdx.y
    if (threadIdx.x == 0 && c < C) {
      acc_t s = red[threadIdx.y][0];
      for (int i = 1; i < kBX; ++i) s += red[threadIdx.y][i];
      dst[c] = s;
    }
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------ kernels

// y = ReLU(sum of `count` terms (+ init)) for one output element per thread. With `partial_out` the
// pre-ReLU sum is written there in the accumulation type instead (a chained launch continues from it).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBX* kBY)
    fuse_forward_kernel(const TermPack<scalar_t, acc_t> pack, int count, const acc_t* __restrict__ init,
                        acc_t* __restrict__ partial_out, scalar_t* __restrict__ out, Strides so, int64_t C,
                        int32_t H, int32_t W, bool cl, bool relu) {
  int64_t c, p;
  if (!tile_coords(cl, C, static_cast<int64_t>(H) * W, c, p)) return;
  const int64_t n = blockIdx.z;
  const int32_t p32 = static_cast<int32_t>(p);
  const int64_t oy = p32 / W, ox = p32 - static_cast<int32_t>(oy) * W;
  const int64_t off = offset4(n, c, oy, ox, so.n, so.c, so.h, so.w);
  acc_t v = forward_sum<scalar_t, acc_t>(pack.t, count, init != nullptr ? init + off : nullptr, n, c, oy, ox);
  if (partial_out != nullptr) {
    partial_out[off] = v;
    return;
  }
  if (relu) v = relu_keep_nan(v);
  out[off] = static_cast<scalar_t>(v);
}

// Output-size terms: g = grad_y * (y > 0); dx_k = g * scale_k; per-tile partials of sum(g * x_k) (slot
// slot0 + k) and sum(g) (slot `sum_slot`, when >= 0).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBX* kBY)
    fuse_backward_same_kernel(const TermPack<scalar_t, acc_t> pack, const GradPack<scalar_t> grads, int count,
                              uint32_t dscale_mask, int sum_slot, int slot0, const scalar_t* __restrict__ gy,
                              Strides sg, const scalar_t* __restrict__ y, Strides sy, bool relu,
                              acc_t* __restrict__ parts, int64_t R, int64_t C, int32_t H, int32_t W, bool cl) {
  __shared__ acc_t red[kBY][kBX];
  int64_t c, p;
  const bool active = tile_coords(cl, C, static_cast<int64_t>(H) * W, c, p);
  const int64_t n = blockIdx.z;
  const int32_t p32 = static_cast<int32_t>(active ? p : 0);
  const int64_t oy = p32 / W, ox = p32 - static_cast<int32_t>(oy) * W;
  acc_t g = 0;
  if (active) {
    g = masked_grad<scalar_t, acc_t>(gy, offset4(n, c, oy, ox, sg.n, sg.c, sg.h, sg.w), y,
                                     offset4(n, c, oy, ox, sy.n, sy.c, sy.h, sy.w), relu);
    for (int k = 0; k < count; ++k) {
      scalar_t* dx = grads.dx[k];
      if (dx == nullptr) continue;
      const TermView<scalar_t, acc_t>& t = pack.t[k];
      const acc_t v = t.scale != nullptr ? g * t.scale[c] : g;
      const Strides& sd = grads.s[k];
      dx[offset4(n, c, oy, ox, sd.n, sd.c, sd.h, sd.w)] = static_cast<scalar_t>(v);
    }
  }
  const int64_t row = n * gridDim.x + blockIdx.x;
  if (sum_slot >= 0) block_sum_store<acc_t>(red, g, cl, c, C, parts + (sum_slot * R + row) * C);
  for (int k = 0; k < count; ++k) {
    if (!((dscale_mask >> k) & 1u)) continue;
    const TermView<scalar_t, acc_t>& t = pack.t[k];
    const acc_t v = active ? g * static_cast<acc_t>(t.x[offset4(n, c, oy, ox, t.sn, t.sc, t.sh, t.sw)]) : acc_t(0);
    block_sum_store<acc_t>(red, v, cl, c, C, parts + ((slot0 + k) * R + row) * C);
  }
}

// An upsampled term, one source pixel per thread: u = Up^T(g) (gather), dz = u * scale; per-tile partials
// of sum(u * z) (slot 0) and sum(u) (slot 1).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBX* kBY)
    upsample_adjoint_kernel(const TermView<scalar_t, acc_t> t, scalar_t* __restrict__ dz, Strides sd,
                            const scalar_t* __restrict__ gy, Strides sg, const scalar_t* __restrict__ y, Strides sy,
                            bool relu, int64_t H, int64_t W, acc_t* __restrict__ parts, int64_t R, int64_t C,
                            bool need_dscale, bool need_dshift, bool cl) {
  __shared__ acc_t red[kBY][kBX];
  int64_t c, q;
  const int32_t w = static_cast<int32_t>(t.w);
  const bool active = tile_coords(cl, C, t.h * t.w, c, q);
  const int64_t n = blockIdx.z;
  const int32_t q32 = static_cast<int32_t>(active ? q : 0);
  const int64_t sy_ = q32 / w, sx = q32 - static_cast<int32_t>(sy_) * w;
  acc_t u = 0;
  if (active) {
    u = adjoint_element<scalar_t, acc_t>(t, gy, sg.n, sg.c, sg.h, sg.w, y, sy.n, sy.c, sy.h, sy.w, relu, H, W, n,
                                         c, sy_, sx);
    if (dz != nullptr) {
      const acc_t v = t.scale != nullptr ? u * t.scale[c] : u;
      dz[offset4(n, c, sy_, sx, sd.n, sd.c, sd.h, sd.w)] = static_cast<scalar_t>(v);
    }
  }
  const int64_t row = n * gridDim.x + blockIdx.x;
  if (need_dscale) {
    const acc_t v = active ? u * static_cast<acc_t>(t.x[offset4(n, c, sy_, sx, t.sn, t.sc, t.sh, t.sw)]) : acc_t(0);
    block_sum_store<acc_t>(red, v, cl, c, C, parts + row * C);
  }
  if (need_dshift) block_sum_store<acc_t>(red, u, cl, c, C, parts + (R + row) * C);
}

at::ScalarType acc_dtype_of(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

// ------------------------------------------------------------------------------------------------ launchers

void forward_cuda(const at::Tensor& out, const std::vector<TermSpec>& terms, bool relu) {
  if (out.numel() == 0) return;
  const at::cuda::OptionalCUDAGuard guard(out.device());
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
  const bool cl = channels_last_like(out);
  const dim3 grid = grid_for(cl, C, H * W, N);
  const dim3 block(kBX, kBY);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t K = static_cast<int64_t>(terms.size());
  // more than kMaxTerms terms: chained launches through a partial sum in the accumulation type, laid out
  // like `out` (empty_like keeps its strides), read and rewritten in place element by element
  at::Tensor partial;
  if (K > kMaxTerms) partial = at::empty_like(out, out.options().dtype(acc_dtype_of(out)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hrfast_fuse_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* part = partial.defined() ? partial.data_ptr<acc_t>() : nullptr;
    for (int64_t start = 0; start < K; start += kMaxTerms) {
      const int count = static_cast<int>(std::min<int64_t>(kMaxTerms, K - start));
      const bool last = start + count >= K;
      TermPack<scalar_t, acc_t> pack;
      for (int i = 0; i < count; ++i) pack.t[i] = make_view<scalar_t, acc_t>(terms[start + i], H, W);
      fuse_forward_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          pack, count, start > 0 ? part : nullptr, last ? nullptr : part, out.data_ptr<scalar_t>(), strides_of(out),
          C, static_cast<int32_t>(H), static_cast<int32_t>(W), cl, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

at::Tensor backward_same_cuda(const at::Tensor& grad_y, const at::Tensor& y, bool relu,
                              const std::vector<TermSpec>& terms, const std::vector<at::Tensor>& dx,
                              const std::vector<bool>& need_dscale, bool need_sum_g) {
  const at::cuda::OptionalCUDAGuard guard(grad_y.device());
  const int64_t N = grad_y.size(0), C = grad_y.size(1), H = grad_y.size(2), W = grad_y.size(3);
  const int64_t K = static_cast<int64_t>(terms.size());
  const bool cl = channels_last_like(grad_y);
  const dim3 grid = grid_for(cl, C, H * W, N);
  const dim3 block(kBX, kBY);
  const int64_t R = N * static_cast<int64_t>(grid.x);
  at::Tensor parts = at::zeros({K + 1, R, C}, grad_y.options().dtype(acc_dtype_of(grad_y)));
  if (grad_y.numel() == 0) return parts;
  const at::Tensor& y_arg = relu ? y : grad_y;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "hrfast_fuse_bwd_same_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // one launch per kMaxTerms terms; the first one also sums g (zero terms: only that)
    for (int64_t start = 0; start < std::max<int64_t>(K, 1); start += kMaxTerms) {
      const int count = static_cast<int>(std::min<int64_t>(kMaxTerms, K - start));
      TermPack<scalar_t, acc_t> pack;
      GradPack<scalar_t> grads;
      uint32_t mask = 0;
      bool busy = start == 0 && need_sum_g;
      for (int i = 0; i < count; ++i) {
        const int64_t k = start + i;
        pack.t[i] = make_view<scalar_t, acc_t>(terms[k], H, W);
        grads.dx[i] = dx[k].defined() ? dx[k].data_ptr<scalar_t>() : nullptr;
        grads.s[i] = dx[k].defined() ? strides_of(dx[k]) : Strides{0, 0, 0, 0};
        if (need_dscale[k]) mask |= 1u << i;
        busy |= dx[k].defined() || need_dscale[k];
      }
      if (!busy) continue;
      fuse_backward_same_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          pack, grads, count, mask, (start == 0 && need_sum_g) ? static_cast<int>(K) : -1, static_cast<int>(start),
          grad_y.data_ptr<scalar_t>(), strides_of(grad_y), y_arg.data_ptr<scalar_t>(), strides_of(y_arg), relu,
          parts.data_ptr<acc_t>(), R, C, static_cast<int32_t>(H), static_cast<int32_t>(W), cl);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return parts;
}

at::Tensor backward_adjoint_cuda(const at::Tensor& grad_y, const at::Tensor& y, bool relu, const TermSpec& term,
                                 const at::Tensor& dz, bool need_dscale, bool need_dshift) {
  const at::cuda::OptionalCUDAGuard guard(grad_y.device());
  const at::Tensor& z = term.x;
  const int64_t N = z.size(0), C = z.size(1), h = z.size(2), w = z.size(3);
  const int64_t H = grad_y.size(2), W = grad_y.size(3);
  const bool cl = channels_last_like(dz.defined() ? dz : z);
  const dim3 grid = grid_for(cl, C, h * w, N);
  const dim3 block(kBX, kBY);
  const int64_t R = N * static_cast<int64_t>(grid.x);
  at::Tensor parts = at::zeros({2, R, C}, grad_y.options().dtype(acc_dtype_of(grad_y)));
  if (z.numel() == 0 || grad_y.numel() == 0) return parts;
  const at::Tensor& y_arg = relu ? y : grad_y;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "hrfast_fuse_bwd_adjoint_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const TermView<scalar_t, acc_t> t = make_view<scalar_t, acc_t>(term, H, W);
    upsample_adjoint_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        t, dz.defined() ? dz.data_ptr<scalar_t>() : nullptr, dz.defined() ? strides_of(dz) : Strides{0, 0, 0, 0},
        grad_y.data_ptr<scalar_t>(), strides_of(grad_y), y_arg.data_ptr<scalar_t>(), strides_of(y_arg), relu, H, W,
        parts.data_ptr<acc_t>(), R, C, need_dscale, need_dshift, cl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return parts;
}

}  // namespace hrfast
