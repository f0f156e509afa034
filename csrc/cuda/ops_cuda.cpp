// CUDA registration of loft's ops (contract and math: docs/ops.md): the same argument
// checks and messages as the CPU ops (csrc/checks.h), a device guard, the current
// stream, one main kernel per call (csrc/cuda/*_kernels.cu, through the torch-free
// launchers of csrc/cuda/launchers.h) and a launch check after every kernel.
//
// The segment table and group_flags live on the device; their values are checked on a
// host copy (a few bytes, but a synchronisation of the current stream). While the stream
// is being captured into a CUDA graph no host copy is allowed, so the value checks are
// skipped then: run the step once outside the capture (the usual warm-up) to check them.
//
// A host-compiled file (not .cu): it includes ATen, which nvcc compiles several times
// slower, and it needs nothing from the device compiler.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../segments.h"
#include "launchers.h"

namespace loft {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& params) {
  switch (params.scalar_type()) {
    case at::kDouble:
      return DType::kFloat64;
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "loft: unexpected dtype ", params.scalar_type());
  }
  return DType::kFloat32;  // not reached
}

/// params: as on the CPU (csrc/checks.h), and on a CUDA device (the other arguments are
/// checked to be on the same device).
void check_cuda_params(const char* op, const at::Tensor& params) {
  check_params(op, params);
  TORCH_CHECK(params.is_cuda(), op, ": params must be a CUDA tensor, got ", params.device());
}

/// Whether `stream` is capturing a CUDA graph (then no host synchronisation is allowed).
bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

/// The data of t, or nullptr when it has 0 elements (an optional buffer or a zero
/// upstream gradient).
const void* data_or_null(const at::Tensor& t) {
  return t.numel() > 0 ? t.const_data_ptr() : nullptr;
}

void* mutable_data_or_null(at::Tensor& t) { return t.numel() > 0 ? t.mutable_data_ptr() : nullptr; }

/// Whether every pointer is 16-byte aligned (nullptr counts as aligned): the condition
/// of the kernels' vector loads and stores.
bool all_aligned(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

/// group_flags: the layout, then the values on a host copy (kept for the later checks;
/// undefined while capturing). Returns G.
int64_t check_group_flags(const char* op, const at::Tensor& group_flags, const at::Tensor& params,
                          int64_t all_flags, bool capturing, at::Tensor& host_flags) {
  const int64_t groups = check_group_flags_layout(op, group_flags, params);
  if (!capturing) {
    host_flags = group_flags.cpu();
    check_group_flags_values(op, host_flags.const_data_ptr<int64_t>(), groups, all_flags);
  }
  return groups;
}

/// segments: the layout, then the values on a host copy, then whether a 0-element
/// optional buffer is needed by an active segment (values not read while capturing).
void check_segments(const char* op, const at::Tensor& segments, const at::Tensor& params,
                    int64_t groups, const at::Tensor& host_flags, const at::Tensor& optional,
                    const char* optional_name, int64_t optional_flag, const char* flag_name) {
  check_segments_layout(op, segments, params);
  if (!host_flags.defined()) return;  // capturing
  const at::Tensor rows = segments.cpu();
  const Segments seg = check_segments_values(op, rows.const_data_ptr<int64_t>(), rows.size(0),
                                             params.numel(), groups);
  check_optional_needed(op, optional_name, optional, seg, host_flags.const_data_ptr<int64_t>(),
                        optional_flag, flag_name);
}

/// Checks every argument of sgd_step (and the shared ones of its backward), in the order
/// of the CPU op; returns the device segment table.
DeviceSegments check_sgd_args(const char* op, const at::Tensor& params, const at::Tensor& grads,
                              const at::Tensor& momentum_buffer, const at::Tensor& segments,
                              const at::Tensor& lr, const at::Tensor& momentum,
                              const at::Tensor& dampening, const at::Tensor& weight_decay,
                              const at::Tensor& group_flags, bool capturing) {
  check_cuda_params(op, params);
  check_buffer(op, "grads", grads, params, /*may_be_empty=*/false);
  check_buffer(op, "momentum_buffer", momentum_buffer, params, /*may_be_empty=*/true);
  at::Tensor host_flags;
  const int64_t groups =
      check_group_flags(op, group_flags, params, kSgdAllFlags, capturing, host_flags);
  const at::ScalarType hyper_dtype = check_hyper_dtype(op, lr, params);
  check_hyper(op, "lr", lr, params, groups, hyper_dtype);
  check_hyper(op, "momentum", momentum, params, groups, hyper_dtype);
  check_hyper(op, "dampening", dampening, params, groups, hyper_dtype);
  check_hyper(op, "weight_decay", weight_decay, params, groups, hyper_dtype);
  check_segments(op, segments, params, groups, host_flags, momentum_buffer, "momentum_buffer",
                 kSgdMomentum, "momentum");
  return {segments.const_data_ptr<int64_t>(), segments.size(0), params.numel()};
}

/// The per-element hyperparameters, checked (csrc/checks.h): the data of each, or
/// nullptr when absent.
struct ElementwiseInputs {
  const void* lr;
  const void* weight_decay;
};

ElementwiseInputs check_elementwise_inputs(
    const char* op, const std::optional<at::Tensor>& lr_elementwise,
    const std::optional<at::Tensor>& weight_decay_elementwise, const at::Tensor& params) {
  const bool has_lr = check_elementwise(op, "lr_elementwise", lr_elementwise, params);
  const bool has_wd =
      check_elementwise(op, "weight_decay_elementwise", weight_decay_elementwise, params);
  return {has_lr ? lr_elementwise->const_data_ptr() : nullptr,
          has_wd ? weight_decay_elementwise->const_data_ptr() : nullptr};
}

SgdHyper sgd_hyper(const at::Tensor& lr, const at::Tensor& momentum, const at::Tensor& dampening,
                   const at::Tensor& weight_decay, const at::Tensor& group_flags,
                   const ElementwiseInputs& elementwise) {
  return {lr.const_data_ptr(),
          momentum.const_data_ptr(),
          dampening.const_data_ptr(),
          weight_decay.const_data_ptr(),
          group_flags.const_data_ptr<int64_t>(),
          lr.scalar_type() == at::kDouble,
          elementwise.lr,
          elementwise.weight_decay};
}

/// Checks every argument of adam_step (and the shared ones of its backward).
DeviceSegments check_adam_args(const char* op, const at::Tensor& params, const at::Tensor& grads,
                               const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                               const at::Tensor& max_exp_avg_sq, const at::Tensor& segments,
                               const at::Tensor& lr, const at::Tensor& beta1,
                               const at::Tensor& beta2, const at::Tensor& eps,
                               const at::Tensor& weight_decay, const at::Tensor& group_flags,
                               bool capturing) {
  check_cuda_params(op, params);
  check_buffer(op, "grads", grads, params, /*may_be_empty=*/false);
  check_buffer(op, "exp_avg", exp_avg, params, /*may_be_empty=*/false);
  check_buffer(op, "exp_avg_sq", exp_avg_sq, params, /*may_be_empty=*/false);
  check_buffer(op, "max_exp_avg_sq", max_exp_avg_sq, params, /*may_be_empty=*/true);
  at::Tensor host_flags;
  const int64_t groups =
      check_group_flags(op, group_flags, params, kAdamAllFlags, capturing, host_flags);
  const at::ScalarType hyper_dtype = check_hyper_dtype(op, lr, params);
  check_hyper(op, "lr", lr, params, groups, hyper_dtype);
  check_hyper(op, "beta1", beta1, params, groups, hyper_dtype);
  check_hyper(op, "beta2", beta2, params, groups, hyper_dtype);
  check_hyper(op, "eps", eps, params, groups, hyper_dtype);
  check_hyper(op, "weight_decay", weight_decay, params, groups, hyper_dtype);
  check_segments(op, segments, params, groups, host_flags, max_exp_avg_sq, "max_exp_avg_sq",
                 kAdamAmsgrad, "amsgrad");
  return {segments.const_data_ptr<int64_t>(), segments.size(0), params.numel()};
}

AdamHyper adam_hyper(const at::Tensor& lr, const at::Tensor& beta1, const at::Tensor& beta2,
                     const at::Tensor& eps, const at::Tensor& weight_decay,
                     const at::Tensor& group_flags, const ElementwiseInputs& elementwise) {
  return {lr.const_data_ptr(),
          beta1.const_data_ptr(),
          beta2.const_data_ptr(),
          eps.const_data_ptr(),
          weight_decay.const_data_ptr(),
          group_flags.const_data_ptr<int64_t>(),
          lr.scalar_type() == at::kDouble,
          elementwise.lr,
          elementwise.weight_decay};
}

/// A [G] hyperparameter given per element replaces the group's value everywhere: clears
/// its bit (the [G] tensor gets a zero gradient). `lr_bit` and `wd_bit` are the bits of
/// lr and weight_decay among the op's num_hyper [G] hyperparameters.
int64_t group_hyper_mask(int64_t hyper_grad_mask, int num_hyper, const ElementwiseInputs& e,
                         int lr_bit, int wd_bit) {
  int64_t mask = hyper_grad_mask & ((int64_t{1} << num_hyper) - 1);
  if (e.lr != nullptr) mask &= ~(int64_t{1} << lr_bit);
  if (e.weight_decay != nullptr) mask &= ~(int64_t{1} << wd_bit);
  return mask;
}

/// The per-element hyperparameter gradients of a backward: [N] in the compute dtype of
/// params for each one that is given and wanted (bits num_hyper, num_hyper + 1 of the
/// mask), else 0 elements.
std::pair<at::Tensor, at::Tensor> elementwise_grads(int64_t hyper_grad_mask, int num_hyper,
                                                    const ElementwiseInputs& e,
                                                    const at::Tensor& params) {
  const auto options = params.options().dtype(compute_dtype(params));
  const bool lr = e.lr != nullptr && ((hyper_grad_mask >> num_hyper) & 1);
  const bool wd = e.weight_decay != nullptr && ((hyper_grad_mask >> (num_hyper + 1)) & 1);
  return {at::empty({lr ? params.numel() : 0}, options),
          at::empty({wd ? params.numel() : 0}, options)};
}

/// The [G] hyperparameter gradients of a backward: the reduce kernel over the main
/// kernel's partials (zeros for the bits clear in `mask`), one launch; in the dtype of
/// `like` (the hyperparameters').
std::vector<at::Tensor> reduce_hyper_grads(const at::Tensor& partials, int64_t blocks,
                                           int64_t groups, int num_hyper, int64_t mask,
                                           const at::Tensor& like, cudaStream_t stream) {
  std::vector<at::Tensor> out;
  HyperGradOutputs outputs{};
  for (int k = 0; k < num_hyper; ++k) {
    out.push_back(at::empty({groups}, like.options()));
    outputs.out[k] = groups > 0 ? out.back().mutable_data_ptr() : nullptr;
  }
  launch_hyper_grad_reduce(like.scalar_type() == at::kDouble,
                           mask ? partials.const_data_ptr<double>() : nullptr, blocks, groups,
                           num_hyper, mask, outputs, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

/// Per-block partial sums for a backward's hyperparameter gradients (none when mask is 0).
at::Tensor make_partials(const at::Tensor& params, int64_t mask, int64_t groups, int num_hyper) {
  const int64_t size = mask ? grid_blocks(params.numel()) * groups * num_hyper : 0;
  return at::empty({size}, params.options().dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor> sgd_step_cuda(
    const at::Tensor& params, const at::Tensor& grads, const at::Tensor& momentum_buffer,
    const at::Tensor& segments, const at::Tensor& lr, const at::Tensor& momentum,
    const at::Tensor& dampening, const at::Tensor& weight_decay, const at::Tensor& group_flags,
    const std::optional<at::Tensor>& lr_elementwise,
    const std::optional<at::Tensor>& weight_decay_elementwise) {
  const char* op = "sgd_step";
  check_cuda_params(op, params);
  const c10::cuda::CUDAGuard guard(params.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params.device().index()).stream();
  const DeviceSegments seg =
      check_sgd_args(op, params, grads, momentum_buffer, segments, lr, momentum, dampening,
                     weight_decay, group_flags, is_capturing(stream));
  const ElementwiseInputs elementwise =
      check_elementwise_inputs(op, lr_elementwise, weight_decay_elementwise, params);
  const int64_t n = params.numel();
  at::Tensor params_out = at::empty({n}, params.options());
  at::Tensor buffer_out = at::empty({momentum_buffer.numel()}, params.options());
  SgdStepBuffers buffers{data_or_null(params),
                         data_or_null(grads),
                         data_or_null(momentum_buffer),
                         mutable_data_or_null(params_out),
                         mutable_data_or_null(buffer_out),
                         false};
  buffers.aligned = all_aligned({buffers.params, buffers.grads, buffers.momentum_buffer,
                                 buffers.params_out, buffers.momentum_buffer_out});
  launch_sgd_step(dtype_of(params), seg,
                  sgd_hyper(lr, momentum, dampening, weight_decay, group_flags, elementwise),
                  buffers, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {params_out, buffer_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
sgd_step_backward_cuda(const at::Tensor& grad_params_out,
                       const at::Tensor& grad_momentum_buffer_out, const at::Tensor& params,
                       const at::Tensor& grads, const at::Tensor& momentum_buffer,
                       const at::Tensor& segments, const at::Tensor& lr, const at::Tensor& momentum,
                       const at::Tensor& dampening, const at::Tensor& weight_decay,
                       const at::Tensor& group_flags, int64_t hyper_grad_mask,
                       const std::optional<at::Tensor>& lr_elementwise,
                       const std::optional<at::Tensor>& weight_decay_elementwise) {
  const char* op = "sgd_step_backward";
  check_cuda_params(op, params);
  check_buffer(op, "grad_params_out", grad_params_out, params, /*may_be_empty=*/true);
  check_buffer(op, "grad_momentum_buffer_out", grad_momentum_buffer_out, params,
               /*may_be_empty=*/true);
  const c10::cuda::CUDAGuard guard(params.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params.device().index()).stream();
  const DeviceSegments seg =
      check_sgd_args(op, params, grads, momentum_buffer, segments, lr, momentum, dampening,
                     weight_decay, group_flags, is_capturing(stream));
  const ElementwiseInputs elementwise =
      check_elementwise_inputs(op, lr_elementwise, weight_decay_elementwise, params);
  const int64_t n = params.numel();
  const int64_t groups = group_flags.numel();
  const int64_t mask = group_hyper_mask(hyper_grad_mask, kSgdNumHyper, elementwise, kSgdHyperLr,
                                        kSgdHyperWeightDecay);
  auto [grad_lr_e, grad_wd_e] =
      elementwise_grads(hyper_grad_mask, kSgdNumHyper, elementwise, params);
  const bool has_buffer = momentum_buffer.numel() > 0;
  at::Tensor grad_params = at::empty({n}, params.options());
  at::Tensor grad_grads = at::empty({n}, params.options());
  at::Tensor grad_buffer = at::empty({momentum_buffer.numel()}, params.options());
  at::Tensor partials = make_partials(params, mask, groups, kSgdNumHyper);
  SgdBackwardBuffers buffers{data_or_null(grad_params_out),
                             has_buffer ? data_or_null(grad_momentum_buffer_out) : nullptr,
                             data_or_null(params),
                             data_or_null(grads),
                             data_or_null(momentum_buffer),
                             mutable_data_or_null(grad_params),
                             mutable_data_or_null(grad_grads),
                             mutable_data_or_null(grad_buffer),
                             false};
  buffers.aligned =
      all_aligned({buffers.grad_params_out, buffers.grad_momentum_buffer_out, buffers.params,
                   buffers.grads, buffers.momentum_buffer, buffers.grad_params, buffers.grad_grads,
                   buffers.grad_momentum_buffer});
  const ElementwiseGrads grads_elementwise{mutable_data_or_null(grad_lr_e),
                                           mutable_data_or_null(grad_wd_e)};
  launch_sgd_step_backward(
      dtype_of(params), seg,
      sgd_hyper(lr, momentum, dampening, weight_decay, group_flags, elementwise), buffers,
      grads_elementwise, mask, groups, mask ? partials.mutable_data_ptr<double>() : nullptr,
      stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  std::vector<at::Tensor> hyper =
      reduce_hyper_grads(partials, grid_blocks(n), groups, kSgdNumHyper, mask, lr, stream);
  return {grad_params, grad_grads, grad_buffer, hyper[0], hyper[1],
          hyper[2],    hyper[3],   grad_lr_e,   grad_wd_e};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adam_step_cuda(
    const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
    const at::Tensor& exp_avg_sq, const at::Tensor& max_exp_avg_sq, const at::Tensor& segments,
    const at::Tensor& lr, const at::Tensor& beta1, const at::Tensor& beta2, const at::Tensor& eps,
    const at::Tensor& weight_decay, const at::Tensor& group_flags,
    const std::optional<at::Tensor>& lr_elementwise,
    const std::optional<at::Tensor>& weight_decay_elementwise) {
  const char* op = "adam_step";
  check_cuda_params(op, params);
  const c10::cuda::CUDAGuard guard(params.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params.device().index()).stream();
  const DeviceSegments seg =
      check_adam_args(op, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, segments, lr, beta1,
                      beta2, eps, weight_decay, group_flags, is_capturing(stream));
  const ElementwiseInputs elementwise =
      check_elementwise_inputs(op, lr_elementwise, weight_decay_elementwise, params);
  const int64_t n = params.numel();
  at::Tensor params_out = at::empty({n}, params.options());
  at::Tensor exp_avg_out = at::empty({n}, params.options());
  at::Tensor exp_avg_sq_out = at::empty({n}, params.options());
  at::Tensor max_out = at::empty({max_exp_avg_sq.numel()}, params.options());
  AdamStepBuffers buffers{data_or_null(params),
                          data_or_null(grads),
                          data_or_null(exp_avg),
                          data_or_null(exp_avg_sq),
                          data_or_null(max_exp_avg_sq),
                          mutable_data_or_null(params_out),
                          mutable_data_or_null(exp_avg_out),
                          mutable_data_or_null(exp_avg_sq_out),
                          mutable_data_or_null(max_out),
                          false};
  buffers.aligned = all_aligned({buffers.params, buffers.grads, buffers.exp_avg, buffers.exp_avg_sq,
                                 buffers.max_exp_avg_sq, buffers.params_out, buffers.exp_avg_out,
                                 buffers.exp_avg_sq_out, buffers.max_exp_avg_sq_out});
  launch_adam_step(dtype_of(params), seg,
                   adam_hyper(lr, beta1, beta2, eps, weight_decay, group_flags, elementwise),
                   buffers, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {params_out, exp_avg_out, exp_avg_sq_out, max_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adam_step_backward_cuda(const at::Tensor& grad_params_out, const at::Tensor& grad_exp_avg_out,
                        const at::Tensor& grad_exp_avg_sq_out,
                        const at::Tensor& grad_max_exp_avg_sq_out, const at::Tensor& params,
                        const at::Tensor& grads, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const at::Tensor& max_exp_avg_sq,
                        const at::Tensor& segments, const at::Tensor& lr, const at::Tensor& beta1,
                        const at::Tensor& beta2, const at::Tensor& eps,
                        const at::Tensor& weight_decay, const at::Tensor& group_flags,
                        int64_t hyper_grad_mask, const std::optional<at::Tensor>& lr_elementwise,
                        const std::optional<at::Tensor>& weight_decay_elementwise) {
  const char* op = "adam_step_backward";
  check_cuda_params(op, params);
  check_buffer(op, "grad_params_out", grad_params_out, params, /*may_be_empty=*/true);
  check_buffer(op, "grad_exp_avg_out", grad_exp_avg_out, params, /*may_be_empty=*/true);
  check_buffer(op, "grad_exp_avg_sq_out", grad_exp_avg_sq_out, params, /*may_be_empty=*/true);
  check_buffer(op, "grad_max_exp_avg_sq_out", grad_max_exp_avg_sq_out, params,
               /*may_be_empty=*/true);
  const c10::cuda::CUDAGuard guard(params.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params.device().index()).stream();
  const DeviceSegments seg =
      check_adam_args(op, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, segments, lr, beta1,
                      beta2, eps, weight_decay, group_flags, is_capturing(stream));
  const ElementwiseInputs elementwise =
      check_elementwise_inputs(op, lr_elementwise, weight_decay_elementwise, params);
  const int64_t n = params.numel();
  const int64_t groups = group_flags.numel();
  const int64_t mask = group_hyper_mask(hyper_grad_mask, kAdamNumHyper, elementwise, kAdamHyperLr,
                                        kAdamHyperWeightDecay);
  auto [grad_lr_e, grad_wd_e] =
      elementwise_grads(hyper_grad_mask, kAdamNumHyper, elementwise, params);
  const bool has_max = max_exp_avg_sq.numel() > 0;
  at::Tensor grad_params = at::empty({n}, params.options());
  at::Tensor grad_grads = at::empty({n}, params.options());
  at::Tensor grad_exp_avg = at::empty({n}, params.options());
  at::Tensor grad_exp_avg_sq = at::empty({n}, params.options());
  at::Tensor grad_max = at::empty({max_exp_avg_sq.numel()}, params.options());
  at::Tensor partials = make_partials(params, mask, groups, kAdamNumHyper);
  AdamBackwardBuffers buffers{data_or_null(grad_params_out),
                              data_or_null(grad_exp_avg_out),
                              data_or_null(grad_exp_avg_sq_out),
                              has_max ? data_or_null(grad_max_exp_avg_sq_out) : nullptr,
                              data_or_null(params),
                              data_or_null(grads),
                              data_or_null(exp_avg),
                              data_or_null(exp_avg_sq),
                              data_or_null(max_exp_avg_sq),
                              mutable_data_or_null(grad_params),
                              mutable_data_or_null(grad_grads),
                              mutable_data_or_null(grad_exp_avg),
                              mutable_data_or_null(grad_exp_avg_sq),
                              mutable_data_or_null(grad_max),
                              false};
  buffers.aligned = all_aligned(
      {buffers.grad_params_out, buffers.grad_exp_avg_out, buffers.grad_exp_avg_sq_out,
       buffers.grad_max_exp_avg_sq_out, buffers.params, buffers.grads, buffers.exp_avg,
       buffers.exp_avg_sq, buffers.max_exp_avg_sq, buffers.grad_params, buffers.grad_grads,
       buffers.grad_exp_avg, buffers.grad_exp_avg_sq, buffers.grad_max_exp_avg_sq});
  const ElementwiseGrads grads_elementwise{mutable_data_or_null(grad_lr_e),
                                           mutable_data_or_null(grad_wd_e)};
  launch_adam_step_backward(
      dtype_of(params), seg,
      adam_hyper(lr, beta1, beta2, eps, weight_decay, group_flags, elementwise), buffers,
      grads_elementwise, mask, groups, mask ? partials.mutable_data_ptr<double>() : nullptr,
      stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  std::vector<at::Tensor> hyper =
      reduce_hyper_grads(partials, grid_blocks(n), groups, kAdamNumHyper, mask, lr, stream);
  return {grad_params, grad_grads, grad_exp_avg, grad_exp_avg_sq, grad_max,  hyper[0],
          hyper[1],    hyper[2],   hyper[3],     hyper[4],        grad_lr_e, grad_wd_e};
}

}  // namespace
}  // namespace cuda
}  // namespace loft

TORCH_LIBRARY_IMPL(loft, CUDA, m) {
  m.impl("sgd_step", &loft::cuda::sgd_step_cuda);
  m.impl("sgd_step_backward", &loft::cuda::sgd_step_backward_cuda);
  m.impl("adam_step", &loft::cuda::adam_step_cuda);
  m.impl("adam_step_backward", &loft::cuda::adam_step_backward_cuda);
}
