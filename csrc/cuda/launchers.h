// The interface between the CUDA registration (csrc/cuda/ops_cuda.cpp, which includes
// torch) and the kernels (csrc/cuda/*_kernels.cu, which do not, so that nvcc compiles them
// in about a second). The arguments of every backend (csrc/kernel_args.h): every pointer
// is device memory, every launcher enqueues exactly one kernel on `stream` and returns
// without synchronising; the caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK) after
// each call.
//
// How a kernel walks memory: the buffer is cut into tiles of kTile elements; block b of a
// grid of grid_blocks(numel) blocks handles tiles b, b + grid, b + 2 grid, ... (a
// grid-stride loop, int64 indices). A tile is handled segment by segment: the block
// finds the first segment of the tile by binary search over the device segment table,
// then for each segment overlapping the tile, thread 0 computes the segment's scalars
// (in double, csrc/*_math.h) into shared memory and every thread updates its elements:
// 16-byte vector loads and stores when the tile lies within one segment and the
// buffers are aligned, scalar ones otherwise. A backward block sums each segment's
// hyperparameter terms (a fixed-order block reduction, in double) into its own slice
// partials[block][group][hyper]; a second small kernel adds the slices in block order.
// No atomics: the result is bitwise the same run to run, and depends only on numel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kernel_args.h"

namespace loft {
namespace cuda {

/// Threads per block of the main kernels.
constexpr int kThreads = 256;
/// Elements per tile: kThreads threads x 8 elements (one 16-byte vector of float16,
/// two of float32, four of float64 per thread).
constexpr int64_t kTile = kThreads * 8;
/// The grid never exceeds this many blocks (a fixed number, not one derived from the
/// device, so that the partial sums, and so the results, do not depend on the GPU).
constexpr int64_t kMaxBlocks = 2048;
/// The grid of a main kernel over `numel` elements (0 when numel is 0); a backward's
/// partials hold grid_blocks(numel) * groups * kNumHyper doubles.
inline int64_t grid_blocks(int64_t numel) {
  const int64_t tiles = (numel + kTile - 1) / kTile;
  return tiles < kMaxBlocks ? tiles : kMaxBlocks;
}

/// A forward op: one launch of grid_blocks(args.segments.numel) blocks (nothing when numel
/// is 0).
void launch(const StepArgs& args, const SgdStepBuffers& buffers, cudaStream_t stream);
void launch(const StepArgs& args, const AdamStepBuffers& buffers, cudaStream_t stream);

/// A backward op, main pass (one launch, as a forward): writes the buffer gradients, the
/// per-element hyperparameter gradients and, for the [G] hyperparameters whose bit is set
/// in hyper.mask, the partial sums partials[block][group][kNumHyper] (grid_blocks(numel) *
/// groups * kNumHyper doubles, kNumHyper that of the buffers; unused when the mask is 0).
void launch(const StepArgs& args, const HyperGradArgs& hyper, const SgdBackwardBuffers& buffers,
            double* partials, cudaStream_t stream);
void launch(const StepArgs& args, const HyperGradArgs& hyper, const AdamBackwardBuffers& buffers,
            double* partials, cudaStream_t stream);

/// The second pass of a backward: hyper.group[k][g] = sum over blocks b = 0, 1, ... of
/// partials[b][g][k] (in double, in a fixed order, then cast to double or float as
/// `outputs_double`), for the hyperparameters whose bit is set in hyper.mask; zeros for the
/// others (without reading the partials). One launch of groups * num_hyper blocks (nothing
/// when groups is 0).
void launch_hyper_grad_reduce(const HyperGradArgs& hyper, bool outputs_double,
                              const double* partials, int64_t blocks, int64_t groups, int num_hyper,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace loft
