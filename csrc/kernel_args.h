// What an op hands the kernels of its backend (csrc/cpu/, csrc/cuda/): plain pointers and
// sizes, the same for every backend. Torch-free, so that the CUDA kernels compile without
// any torch header. csrc/entry_points.h fills them after the checks of csrc/checks.h;
// every pointer is memory of the buffers' device.
#pragma once

#include <cstdint>

#include "dispatch.h"
#include "segments.h"

namespace loft {

/// What every kernel of an op reads besides its buffers.
struct StepArgs {
  DType dtype;  // of the buffers
  Segments segments;
  GroupHyper hyper;
  /// lr_elementwise / weight_decay_elementwise: [numel] values in the compute type of the
  /// buffers (compute_t) that replace the group's lr / weight_decay; nullptr when absent.
  const void* lr_elementwise;
  const void* weight_decay_elementwise;

  LOFT_HOST_DEVICE bool has_elementwise() const {
    return lr_elementwise != nullptr || weight_decay_elementwise != nullptr;
  }
};

/// What a backward writes besides the gradients of its buffers.
struct HyperGradArgs {
  /// The [G] hyperparameters whose gradient is computed (bit k: hyperparameter k); the
  /// others get zeros. A hyperparameter given per element has its bit clear.
  int64_t mask;
  /// The [G] gradients of the op's hyperparameters (segments.h order), in their dtype
  /// (GroupHyper::is_double); nullptr when there are no groups.
  void* group[kMaxHyper];
  /// The gradients of lr_elementwise / weight_decay_elementwise ([numel], compute type),
  /// written element by element (zero on inactive segments); nullptr when absent or not
  /// wanted.
  void* lr_elementwise;
  void* weight_decay_elementwise;
};

// The buffers of each op. An optional buffer with 0 elements (a state buffer the groups do
// not use, a zero upstream gradient) is nullptr, as is its gradient or new value.
// `aligned`: every non-null pointer is 16-byte aligned (the CUDA kernels' vector accesses).
// inactive(copy) says what a segment that is not active writes (docs/ops.md): it calls
// copy(dst, src) for each output, src being the input that passes through (nullptr: zeros);
// each backend runs it over its own ranges. A backward's buffers also name its op's [G]
// hyperparameters: how many, and which are lr and weight_decay (csrc/segments.h).

struct SgdStepBuffers {
  const void* params;
  const void* grads;
  const void* momentum_buffer;
  void* params_out;
  void* momentum_buffer_out;
  bool aligned;

  /// The inputs pass through.
  template <typename Copy>
  LOFT_HOST_DEVICE void inactive(const Copy& copy) const {
    copy(params_out, params);
    copy(momentum_buffer_out, momentum_buffer);
  }
};

struct SgdBackwardBuffers {
  static constexpr int kNumHyper = kSgdNumHyper;
  static constexpr int kLrHyper = kSgdHyperLr;
  static constexpr int kWeightDecayHyper = kSgdHyperWeightDecay;
  const void* grad_params_out;
  const void* grad_momentum_buffer_out;
  const void* params;
  const void* grads;
  const void* momentum_buffer;
  void* grad_params;
  void* grad_grads;
  void* grad_momentum_buffer;
  bool aligned;

  /// The upstream gradients pass through, grads gets zero.
  template <typename Copy>
  LOFT_HOST_DEVICE void inactive(const Copy& copy) const {
    copy(grad_params, grad_params_out);
    copy(grad_grads, nullptr);
    copy(grad_momentum_buffer, grad_momentum_buffer_out);
  }
};

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

  /// The inputs pass through.
  template <typename Copy>
  LOFT_HOST_DEVICE void inactive(const Copy& copy) const {
    copy(params_out, params);
    copy(exp_avg_out, exp_avg);
    copy(exp_avg_sq_out, exp_avg_sq);
    copy(max_exp_avg_sq_out, max_exp_avg_sq);
  }
};

/// adam_step_ (CPU only): the state is read and written in place.
struct AdamInplaceBuffers {
  const void* params;
  const void* grads;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* params_out;
  bool aligned;

  /// The state stays as it is.
  template <typename Copy>
  LOFT_HOST_DEVICE void inactive(const Copy& copy) const {
    copy(params_out, params);
  }
};

struct AdamBackwardBuffers {
  static constexpr int kNumHyper = kAdamNumHyper;
  static constexpr int kLrHyper = kAdamHyperLr;
  static constexpr int kWeightDecayHyper = kAdamHyperWeightDecay;
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

  /// The upstream gradients pass through, grads gets zero.
  template <typename Copy>
  LOFT_HOST_DEVICE void inactive(const Copy& copy) const {
    copy(grad_params, grad_params_out);
    copy(grad_grads, nullptr);
    copy(grad_exp_avg, grad_exp_avg_out);
    copy(grad_exp_avg_sq, grad_exp_avg_sq_out);
    copy(grad_max_exp_avg_sq, grad_max_exp_avg_sq_out);
  }
};

}  // namespace loft
