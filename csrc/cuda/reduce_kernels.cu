// The second pass of the CUDA backward ops: the [G] hyperparameter gradients from the
// per-block partial sums of the main pass (csrc/cuda/launchers.h), in double, in a
// fixed order (no atomics), so that a run is bitwise reproducible. Torch-free.
#include <cstdint>

#include "launchers.h"
#include "tiles.cuh"

namespace loft {
namespace cuda {
namespace {

/// Block g * num_hyper + k writes out[k][g]: each thread sums the partials of blocks
/// b = tid, tid + kThreads, ... in order, then a shared-memory tree adds the threads'
/// sums in a fixed pattern. A hyperparameter whose bit in hyper.mask is clear gets 0.
template <typename H>
__global__ void __launch_bounds__(kThreads)
    hyper_grad_reduce_kernel(const HyperGradArgs hyper, const double* partials, int64_t blocks,
                             int64_t groups, int num_hyper) {
  const int64_t g = blockIdx.x / num_hyper;
  const int k = static_cast<int>(blockIdx.x % num_hyper);
  H* out = static_cast<H*>(hyper.group[k]);
  if (!((hyper.mask >> k) & 1)) {  // the same branch for the whole block
    if (threadIdx.x == 0) out[g] = H(0);
    return;
  }
  double sum = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads) {
    sum += partials[(b * groups + g) * num_hyper + k];
  }
  __shared__ double tree[kThreads];
  tree[threadIdx.x] = sum;
  __syncthreads();
#pragma unroll
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) tree[threadIdx.x] += tree[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[g] = static_cast<H>(tree[0]);
}

}  // namespace

void launch_hyper_grad_reduce(const HyperGradArgs& hyper, bool outputs_double,
                              const double* partials, int64_t blocks, int64_t groups, int num_hyper,
                              cudaStream_t stream) {
  const int64_t grid = groups * num_hyper;
  if (grid == 0) return;
  if (outputs_double) {
    hyper_grad_reduce_kernel<double><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        hyper, partials, blocks, groups, num_hyper);
  } else {
    hyper_grad_reduce_kernel<float><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        hyper, partials, blocks, groups, num_hyper);
  }
}

}  // namespace cuda
}  // namespace loft
