// The interface between the CUDA registration (csrc/cuda/ops_cuda.cpp, which includes
// torch) and the kernels (csrc/cuda/*_kernels.cu, which do not, so that nvcc compiles them
// in about a second). Plain pointers and sizes only: every pointer is device memory, every
// launcher enqueues exactly one kernel on `stream` and returns without synchronising; the
// caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK) after each call.
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

#include "../segments.h"

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
/// The dtype of the buffers. Hyperparameters are double for kFloat64, float otherwise.
enum class DType : int { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

/// The grid of a main kernel over `numel` elements (0 when numel is 0); a backward's
/// partials hold grid_blocks(numel) * groups * num_hyper doubles.
inline int64_t grid_blocks(int64_t numel) {
  const int64_t tiles = (numel + kTile - 1) / kTile;
  return tiles < kMaxBlocks ? tiles : kMaxBlocks;
}

/// A validated segment table on the device ([count, 5] int64, csrc/segments.h) and the
/// number of elements it tiles.
struct DeviceSegments {
  const int64_t* rows;
  int64_t count;
  int64_t numel;
};

/// The per-group hyperparameters of sgd_step on the device: [groups] each, double when
/// `hyper_double` (always for float64 buffers; allowed for any) and float otherwise;
/// group_flags is [groups] int64. lr_elementwise / weight_decay_elementwise: [numel]
/// per-element values in the compute type of the buffers (double for float64, float
/// otherwise) that replace the group's lr / weight_decay, or nullptr when absent.
struct SgdHyper {
  const void* lr;
  const void* momentum;
  const void* dampening;
  const void* weight_decay;
  const int64_t* group_flags;
  bool hyper_double;
  const void* lr_elementwise;
  const void* weight_decay_elementwise;
};

/// The per-group hyperparameters of adam_step on the device (as SgdHyper).
struct AdamHyper {
  const void* lr;
  const void* beta1;
  const void* beta2;
  const void* eps;
  const void* weight_decay;
  const int64_t* group_flags;
  bool hyper_double;
  const void* lr_elementwise;
  const void* weight_decay_elementwise;
};

/// The gradients of the per-element hyperparameters ([numel], compute type), written
/// element by element by a backward (zero on inactive segments); nullptr when absent or
/// not wanted.
struct ElementwiseGrads {
  void* lr;
  void* weight_decay;
};

/// sgd_step's buffers. momentum_buffer / momentum_buffer_out are nullptr when the buffer
/// has 0 elements. `aligned`: every non-null pointer is 16-byte aligned.
struct SgdStepBuffers {
  const void* params;
  const void* grads;
  const void* momentum_buffer;
  void* params_out;
  void* momentum_buffer_out;
  bool aligned;
};

/// sgd_step_backward's buffers. An upstream gradient with 0 elements (zero) is nullptr,
/// as are momentum_buffer and grad_momentum_buffer when the buffer has 0 elements.
struct SgdBackwardBuffers {
  const void* grad_params_out;
  const void* grad_momentum_buffer_out;
  const void* params;
  const void* grads;
  const void* momentum_buffer;
  void* grad_params;
  void* grad_grads;
  void* grad_momentum_buffer;
  bool aligned;
};

/// adam_step's buffers; max_exp_avg_sq / max_exp_avg_sq_out are nullptr when empty.
struct AdamStepBuffers {
  const void* params;
  const void* grads;
  const void* exp_avg;
  const void* exp_avg_sq;
  const void* max_exp_avg_sq;
  void* params_out;
  void* exp_avg_out;
  void* exp_avg_sq_out;
  void* max_exp_avg_sq_out;
  bool aligned;
};

/// adam_step_backward's buffers (nullptr for 0-element upstream gradients and for an
/// empty max_exp_avg_sq and its gradient).
struct AdamBackwardBuffers {
  const void* grad_params_out;
  const void* grad_exp_avg_out;
  const void* grad_exp_avg_sq_out;
  const void* grad_max_exp_avg_sq_out;
  const void* params;
  const void* grads;
  const void* exp_avg;
  const void* exp_avg_sq;
  const void* max_exp_avg_sq;
  void* grad_params;
  void* grad_grads;
  void* grad_exp_avg;
  void* grad_exp_avg_sq;
  void* grad_max_exp_avg_sq;
  bool aligned;
};

/// The [groups] hyperparameter gradients (double when the hyperparameters are, else float;
/// kMaxHyper: csrc/segments.h).
struct HyperGradOutputs {
  void* out[kMaxHyper];
};

/// sgd_step: one launch of grid_blocks(segments.numel) blocks (nothing when numel is 0).
void launch_sgd_step(DType dtype, const DeviceSegments& segments, const SgdHyper& hyper,
                     const SgdStepBuffers& buffers, cudaStream_t stream);

/// sgd_step_backward, main pass: writes the buffer gradients, the per-element
/// hyperparameter gradients and, for the [G] hyperparameters whose bit is set in `mask`,
/// the partial sums partials[block][group][kSgdNumHyper] (grid_blocks(numel) * groups *
/// kSgdNumHyper doubles; unused when mask is 0).
void launch_sgd_step_backward(DType dtype, const DeviceSegments& segments, const SgdHyper& hyper,
                              const SgdBackwardBuffers& buffers,
                              const ElementwiseGrads& elementwise_grads, int64_t mask,
                              int64_t groups, double* partials, cudaStream_t stream);

/// adam_step: one launch (as launch_sgd_step).
void launch_adam_step(DType dtype, const DeviceSegments& segments, const AdamHyper& hyper,
                      const AdamStepBuffers& buffers, cudaStream_t stream);

/// adam_step_backward, main pass (as launch_sgd_step_backward, kAdamNumHyper per group).
void launch_adam_step_backward(DType dtype, const DeviceSegments& segments, const AdamHyper& hyper,
                               const AdamBackwardBuffers& buffers,
                               const ElementwiseGrads& elementwise_grads, int64_t mask,
                               int64_t groups, double* partials, cudaStream_t stream);

/// The second pass of a backward: out[k][g] = sum over blocks b = 0, 1, ... of
/// partials[b][g][k] (in double, in a fixed order, then cast to double or float as
/// `outputs_double`), for the hyperparameters whose bit is set in `mask`; zeros for the
/// others (without reading the partials). One launch of groups * num_hyper blocks
/// (nothing when groups is 0).
void launch_hyper_grad_reduce(bool outputs_double, const double* partials, int64_t blocks,
                              int64_t groups, int num_hyper, int64_t mask,
                              const HyperGradOutputs& outputs, cudaStream_t stream);

}  // namespace cuda
}  // namespace loft
