// The CUDA executor of hrfast's fusion kernels (compiled only in the CUDA build, -DHRFAST_WITH_CUDA).
//
// The kernels themselves (thread mapping, per-element work, block reductions in phases) are
// fuse_kernels.h's and the launchers (grids, term packs, chaining, partial buffers) fuse_launchers.h's,
// shared with the host build's grid emulation (fuse_cpu.cpp), which runs them on CPU tensors in the test
// suite. Here only the __global__ wrappers (the thread's index, shared memory, __syncthreads() between the
// phases) and the launch on the current stream.
//
// Backward: the adjoint of each upsample is a gather (each source pixel sums the output pixels that read it,
// fuse.h `adjoint_element`); no atomics anywhere. Per-channel gradients (dscale, dshift) are reduced per
// block in shared memory in a fixed order and written as per-tile partials [slot, tile row, C], which the
// binding sums over the tile rows with torch.sum: bitwise deterministic from run to run.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "fuse_launchers.h"

namespace hrfast {
namespace {

__device__ __forceinline__ ThreadIdx this_thread() {
  return ThreadIdx{blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, gridDim.x};
}

// The calling thread's view of its block for run_block: a phase runs for this thread only, the phases are
// separated by __syncthreads(), red is the block's shared memory.
template <class K>
struct DeviceBlock {
  using acc_t = typename K::acc_type;
  ThreadIdx ti;
  acc_t (*red_)[kBX];
  typename K::State state;

  __device__ __forceinline__ acc_t (*red())[kBX] { return red_; }
  template <class F>
  __device__ __forceinline__ void each(F&& f) {
    f(static_cast<const ThreadIdx&>(ti), state);
  }
  __device__ __forceinline__ void barrier() { __syncthreads(); }
};

// The minimum of resident blocks per SM a kernel asks of ptxas (__launch_bounds__): K::kMinBlocks where it has
// one (PhaseKernel for 2- and 4-byte types: 2, so at most 128 registers and 16 warps per SM), else 1.
template <class K, class = void>
struct min_blocks {
  static constexpr int value = 1;
};
template <class K>
struct min_blocks<K, std::void_t<decltype(K::kMinBlocks)>> {
  static constexpr int value = K::kMinBlocks;
};

// Kernels without block reductions (forward): no shared memory.
template <class K>
__global__ void __launch_bounds__(kThreads, min_blocks<K>::value) elementwise_kernel(const typename K::Params p) {
  DeviceBlock<K> blk;
  blk.ti = this_thread();
  blk.red_ = nullptr;
  run_block<K>(p, blk);
}

// Kernels with block reductions (backward): phase 0, then per reduction store / barrier / reduce / barrier
// (RowAdjointKernel: its own phases, red_rows<K> rows of shared memory).
template <class K>
__global__ void __launch_bounds__(kThreads, 1) block_reduce_kernel(const typename K::Params p) {
  __shared__ typename K::acc_type red[red_rows<K>::value][kBX];
  DeviceBlock<K> blk;
  blk.ti = this_thread();
  blk.red_ = red;
  run_block<K>(p, blk);
}

struct CudaExec {
  using Guard = at::cuda::OptionalCUDAGuard;

  template <class K>
  static void run(const Grid& g, const typename K::Params& p) {
    const dim3 grid(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
    const dim3 block(kBX, kBY);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if constexpr (K::kSlots == 0) {
      elementwise_kernel<K><<<grid, block, 0, stream>>>(p);
    } else {
      block_reduce_kernel<K><<<grid, block, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

const Launchers& cuda_launchers() { return launchers_of<CudaExec>(); }

}  // namespace hrfast
