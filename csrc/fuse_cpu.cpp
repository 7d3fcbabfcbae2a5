// The host build's executor: runs the CUDA kernels' own code (fuse_kernels.h) and launchers
// (fuse_launchers.h) on CPU tensors through an emulation of the CUDA grid.
//
// This is a test vehicle for the CUDA code on machines without a GPU, not a CPU backend (one thread's work
// at a time, no vectorisation): the thread mapping, the block reductions and their per-tile partials, the
// chained launches and the launchers' grids and limits all run as written, so the whole correctness suite
// checks them. A launch loops over the grid's blocks; within a block each phase of `run_block` runs for all
// 32 x 8 threads before the next phase starts (the __syncthreads() of the GPU), and a per-block red[8][32]
// array (more rows where the kernel asks: red_rows) stands in for shared memory. Blocks are independent and
// write disjoint outputs and partial rows, so they run in parallel (at::parallel_for) and the results do not
// depend on the number of threads.
//
// What this cannot check is the hardware itself: real concurrency and shared-memory semantics (a missing
// barrier is a race there, not here: the phases are separated by construction), whether a launch is valid
// on a device (registers, parameter size), nvcc's FMA contraction, and speed.
#include <ATen/Parallel.h>

#include "fuse_launchers.h"

namespace hrfast {
namespace {

// One block of kernel K on the host: all of its threads, their states, and its "shared memory".
template <class K>
struct HostBlock {
  using acc_t = typename K::acc_type;
  ThreadIdx base;  // blockIdx and gridDim.x; threadIdx set per thread
  acc_t red_[red_rows<K>::value][kBX];
  typename K::State state[kThreads];

  acc_t (*red())[kBX] { return red_; }

  // one phase for every thread of the block, threadIdx.y major (the order does not matter: within a phase
  // the threads write disjoint locations)
  template <class F>
  void each(F&& f) {
    ThreadIdx ti = base;
    for (uint32_t ty = 0; ty < kBY; ++ty) {
      for (uint32_t tx = 0; tx < kBX; ++tx) {
        ti.tx = tx;
        ti.ty = ty;
        f(static_cast<const ThreadIdx&>(ti), state[ty * kBX + tx]);
      }
    }
  }
  void barrier() {}  // each() has run the phase for the whole block already
};

struct HostExec {
  struct Guard {
    explicit Guard(const at::Device&) {}
  };

  template <class K>
  static void run(const Grid& grid, const typename K::Params& p) {
    const int64_t blocks = grid.x * grid.y * grid.z;
    if (blocks == 0) return;
    // grain 1: even two blocks are split across threads (the determinism tests compare 1 and 2 threads)
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      HostBlock<K> blk;
      blk.base.gx = static_cast<uint32_t>(grid.x);
      for (int64_t b = begin; b < end; ++b) {
        blk.base.bx = static_cast<uint32_t>(b % grid.x);
        blk.base.by = static_cast<uint32_t>((b / grid.x) % grid.y);
        blk.base.bz = static_cast<uint32_t>(b / (grid.x * grid.y));
        run_block<K>(p, blk);
      }
    });
  }
};

}  // namespace

const Launchers& host_launchers() { return launchers_of<HostExec>(); }

}  // namespace hrfast
