// The entry point of every op (schemas: csrc/ops.cpp), written once for all backends: the
// argument checks (csrc/checks.h), the outputs, and the call to the backend's kernels with
// plain pointers (csrc/kernel_args.h). Each backend registers them for its dispatch key
// with its own Backend (csrc/cpu/ops_cpu.cpp, csrc/cuda/ops_cuda.cpp), which provides:
//
//   Backend(op, params)       checks what the backend needs of params and holds what its
//                             kernels run under (CUDA: a device guard, the current stream)
//   reads_values()            whether the checks may read group_flags and segments values
//   step(args, buffers)       runs a forward op
//   backward(args, hyper_grads, buffers)
//                             runs a backward op, writing the [G] hyperparameter gradients
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "kernel_args.h"

namespace loft {

/// Hands an op's tensors to its kernels as pointers (nullptr for 0 elements) and records
/// whether every pointer handed is 16-byte aligned.
class BufferPointers {
 public:
  const void* in(const at::Tensor& t) { return note(t.numel() > 0 ? t.const_data_ptr() : nullptr); }
  void* out(const at::Tensor& t) {
    void* p = t.numel() > 0 ? t.mutable_data_ptr() : nullptr;
    note(p);
    return p;
  }
  bool aligned() const { return aligned_; }

 private:
  const void* note(const void* p) {
    aligned_ = aligned_ && reinterpret_cast<uintptr_t>(p) % 16 == 0;
    return p;
  }
  bool aligned_ = true;
};

/// A new buffer of `numel` elements with the dtype and device of params.
inline at::Tensor new_buffer(const at::Tensor& params, int64_t numel) {
  return at::empty({numel}, params.options());
}

/// The hyperparameter gradients of a backward whose buffers are Buffers (which name the
/// op's H [G] hyperparameters): one [G] tensor per hyperparameter in the dtype of lr
/// (zeros where hyper_grad_mask does not ask for it), and the [N] gradients of
/// lr_elementwise / weight_decay_elementwise in the compute dtype of params (0 elements
/// when absent or not wanted: mask bits H, H + 1). A hyperparameter given per element
/// replaces the group's value everywhere: its [G] tensor gets a zero gradient.
template <typename Buffers>
struct HyperGrads {
  static constexpr int kNumHyper = Buffers::kNumHyper;
  at::Tensor group[kNumHyper];
  at::Tensor lr_elementwise;
  at::Tensor weight_decay_elementwise;
  HyperGradArgs args{};

  HyperGrads(int64_t hyper_grad_mask, const StepArgs& step, const at::Tensor& params,
             const at::Tensor& lr) {
    const bool has_lr = step.lr_elementwise != nullptr;
    const bool has_wd = step.weight_decay_elementwise != nullptr;
    args.mask = hyper_grad_mask & ((int64_t{1} << kNumHyper) - 1);
    if (has_lr) args.mask &= ~(int64_t{1} << Buffers::kLrHyper);
    if (has_wd) args.mask &= ~(int64_t{1} << Buffers::kWeightDecayHyper);
    const int64_t groups = step.segments.groups;
    for (int k = 0; k < kNumHyper; ++k) {
      group[k] = at::empty({groups}, lr.options());
      args.group[k] = groups > 0 ? group[k].mutable_data_ptr() : nullptr;
    }
    const auto options = params.options().dtype(compute_dtype(params));
    const bool lr_wanted = has_lr && ((hyper_grad_mask >> kNumHyper) & 1);
    const bool wd_wanted = has_wd && ((hyper_grad_mask >> (kNumHyper + 1)) & 1);
    lr_elementwise = at::empty({lr_wanted ? params.numel() : 0}, options);
    weight_decay_elementwise = at::empty({wd_wanted ? params.numel() : 0}, options);
    args.lr_elementwise = lr_wanted ? lr_elementwise.mutable_data_ptr() : nullptr;
    args.weight_decay_elementwise =
        wd_wanted ? weight_decay_elementwise.mutable_data_ptr() : nullptr;
  }
};

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> sgd_step(
    const at::Tensor& params, const at::Tensor& grads, const at::Tensor& momentum_buffer,
    const at::Tensor& segments, const at::Tensor& lr, const at::Tensor& momentum,
    const at::Tensor& dampening, const at::Tensor& weight_decay, const at::Tensor& group_flags,
    const std::optional<at::Tensor>& lr_elementwise,
    const std::optional<at::Tensor>& weight_decay_elementwise) {
  const char* op = "sgd_step";
  const Backend backend(op, params);
  const StepArgs args = check_sgd_args(op, backend.reads_values(), params, grads, momentum_buffer,
                                       segments, lr, momentum, dampening, weight_decay, group_flags,
                                       lr_elementwise, weight_decay_elementwise);
  at::Tensor params_out = new_buffer(params, params.numel());
  at::Tensor buffer_out = new_buffer(params, momentum_buffer.numel());
  BufferPointers ptr;
  const SgdStepBuffers buffers{ptr.in(params),      ptr.in(grads),       ptr.in(momentum_buffer),
                               ptr.out(params_out), ptr.out(buffer_out), ptr.aligned()};
  backend.step(args, buffers);
  return {params_out, buffer_out};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
sgd_step_backward(const at::Tensor& grad_params_out, const at::Tensor& grad_momentum_buffer_out,
                  const at::Tensor& params, const at::Tensor& grads,
                  const at::Tensor& momentum_buffer, const at::Tensor& segments,
                  const at::Tensor& lr, const at::Tensor& momentum, const at::Tensor& dampening,
                  const at::Tensor& weight_decay, const at::Tensor& group_flags,
                  int64_t hyper_grad_mask, const std::optional<at::Tensor>& lr_elementwise,
                  const std::optional<at::Tensor>& weight_decay_elementwise) {
  const char* op = "sgd_step_backward";
  const Backend backend(op, params);
  check_upstream(op, params,
                 {{"grad_params_out", grad_params_out},
                  {"grad_momentum_buffer_out", grad_momentum_buffer_out}});
  const StepArgs args = check_sgd_args(op, backend.reads_values(), params, grads, momentum_buffer,
                                       segments, lr, momentum, dampening, weight_decay, group_flags,
                                       lr_elementwise, weight_decay_elementwise);
  const HyperGrads<SgdBackwardBuffers> hyper(hyper_grad_mask, args, params, lr);
  const bool has_buffer = momentum_buffer.numel() > 0;
  at::Tensor grad_params = new_buffer(params, params.numel());
  at::Tensor grad_grads = new_buffer(params, params.numel());
  at::Tensor grad_buffer = new_buffer(params, momentum_buffer.numel());
  BufferPointers ptr;
  const SgdBackwardBuffers buffers{ptr.in(grad_params_out),
                                   has_buffer ? ptr.in(grad_momentum_buffer_out) : nullptr,
                                   ptr.in(params),
                                   ptr.in(grads),
                                   ptr.in(momentum_buffer),
                                   ptr.out(grad_params),
                                   ptr.out(grad_grads),
                                   ptr.out(grad_buffer),
                                   ptr.aligned()};
  backend.backward(args, hyper.args, buffers);
  return {grad_params,    grad_grads,           grad_buffer,
          hyper.group[0], hyper.group[1],       hyper.group[2],
          hyper.group[3], hyper.lr_elementwise, hyper.weight_decay_elementwise};
}

/// Whether two buffers share any memory (a state buffer updated in place must not).
inline bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const char* a0 = static_cast<const char*>(a.const_data_ptr());
  const char* b0 = static_cast<const char*>(b.const_data_ptr());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

/// adam_step; with State = at::Tensor, adam_step_ (CPU only): the state is updated in
/// place (so it must not share memory with params, grads or another state buffer) and
/// only the new params are returned.
template <typename Backend, typename State = const at::Tensor>
auto adam_step(const at::Tensor& params, const at::Tensor& grads, State& exp_avg, State& exp_avg_sq,
               State& max_exp_avg_sq, const at::Tensor& segments, const at::Tensor& lr,
               const at::Tensor& beta1, const at::Tensor& beta2, const at::Tensor& eps,
               const at::Tensor& weight_decay, const at::Tensor& group_flags,
               const std::optional<at::Tensor>& lr_elementwise,
               const std::optional<at::Tensor>& weight_decay_elementwise) {
  constexpr bool kInPlace = !std::is_const<State>::value;
  const char* op = kInPlace ? "adam_step_" : "adam_step";
  const Backend backend(op, params);
  const StepArgs args = check_adam_args(
      op, backend.reads_values(), params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, segments, lr,
      beta1, beta2, eps, weight_decay, group_flags, lr_elementwise, weight_decay_elementwise);
  BufferPointers ptr;
  if constexpr (kInPlace) {
    const std::initializer_list<Named> state = {
        {"exp_avg", exp_avg}, {"exp_avg_sq", exp_avg_sq}, {"max_exp_avg_sq", max_exp_avg_sq}};
    for (auto t = state.begin(); t != state.end(); ++t) {
      TORCH_CHECK(!overlaps(t->tensor, params) && !overlaps(t->tensor, grads), op, ": ", t->name,
                  " is updated in place and must not share memory with params or grads");
      for (auto u = state.begin(); u != t; ++u) {
        TORCH_CHECK(!overlaps(t->tensor, u->tensor), op, ": ", t->name,
                    " is updated in place and must not share memory with ", u->name);
      }
    }
    at::Tensor params_out = new_buffer(params, params.numel());
    backend.step(args, AdamInplaceBuffers{ptr.in(params), ptr.in(grads), ptr.out(exp_avg),
                                          ptr.out(exp_avg_sq), ptr.out(max_exp_avg_sq),
                                          ptr.out(params_out), ptr.aligned()});
    return params_out;
  } else {
    at::Tensor params_out = new_buffer(params, params.numel());
    at::Tensor exp_avg_out = new_buffer(params, params.numel());
    at::Tensor exp_avg_sq_out = new_buffer(params, params.numel());
    at::Tensor max_out = new_buffer(params, max_exp_avg_sq.numel());
    backend.step(args,
                 AdamStepBuffers{ptr.in(params), ptr.in(grads), ptr.in(exp_avg), ptr.in(exp_avg_sq),
                                 ptr.in(max_exp_avg_sq), ptr.out(params_out), ptr.out(exp_avg_out),
                                 ptr.out(exp_avg_sq_out), ptr.out(max_out), ptr.aligned()});
    return std::make_tuple(params_out, exp_avg_out, exp_avg_sq_out, max_out);
  }
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adam_step_backward(const at::Tensor& grad_params_out, const at::Tensor& grad_exp_avg_out,
                   const at::Tensor& grad_exp_avg_sq_out, const at::Tensor& grad_max_exp_avg_sq_out,
                   const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const at::Tensor& max_exp_avg_sq,
                   const at::Tensor& segments, const at::Tensor& lr, const at::Tensor& beta1,
                   const at::Tensor& beta2, const at::Tensor& eps, const at::Tensor& weight_decay,
                   const at::Tensor& group_flags, int64_t hyper_grad_mask,
                   const std::optional<at::Tensor>& lr_elementwise,
                   const std::optional<at::Tensor>& weight_decay_elementwise) {
  const char* op = "adam_step_backward";
  const Backend backend(op, params);
  check_upstream(op, params,
                 {{"grad_params_out", grad_params_out},
                  {"grad_exp_avg_out", grad_exp_avg_out},
                  {"grad_exp_avg_sq_out", grad_exp_avg_sq_out},
                  {"grad_max_exp_avg_sq_out", grad_max_exp_avg_sq_out}});
  const StepArgs args = check_adam_args(
      op, backend.reads_values(), params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, segments, lr,
      beta1, beta2, eps, weight_decay, group_flags, lr_elementwise, weight_decay_elementwise);
  const HyperGrads<AdamBackwardBuffers> hyper(hyper_grad_mask, args, params, lr);
  const bool has_max = max_exp_avg_sq.numel() > 0;
  at::Tensor grad_params = new_buffer(params, params.numel());
  at::Tensor grad_grads = new_buffer(params, params.numel());
  at::Tensor grad_exp_avg = new_buffer(params, params.numel());
  at::Tensor grad_exp_avg_sq = new_buffer(params, params.numel());
  at::Tensor grad_max = new_buffer(params, max_exp_avg_sq.numel());
  BufferPointers ptr;
  const AdamBackwardBuffers buffers{ptr.in(grad_params_out),
                                    ptr.in(grad_exp_avg_out),
                                    ptr.in(grad_exp_avg_sq_out),
                                    has_max ? ptr.in(grad_max_exp_avg_sq_out) : nullptr,
                                    ptr.in(params),
                                    ptr.in(grads),
                                    ptr.in(exp_avg),
                                    ptr.in(exp_avg_sq),
                                    ptr.in(max_exp_avg_sq),
                                    ptr.out(grad_params),
                                    ptr.out(grad_grads),
                                    ptr.out(grad_exp_avg),
                                    ptr.out(grad_exp_avg_sq),
                                    ptr.out(grad_max),
                                    ptr.aligned()};
  backend.backward(args, hyper.args, buffers);
  return {grad_params,    grad_grads,     grad_exp_avg,         grad_exp_avg_sq,
          grad_max,       hyper.group[0], hyper.group[1],       hyper.group[2],
          hyper.group[3], hyper.group[4], hyper.lr_elementwise, hyper.weight_decay_elementwise};
}

/// Registers the entry points of the ops every backend implements for the dispatch key of
/// `m` (a TORCH_LIBRARY_IMPL block), run by Backend.
template <typename Backend>
void register_ops(torch::Library& m) {
  m.impl("sgd_step", &sgd_step<Backend>);
  m.impl("sgd_step_backward", &sgd_step_backward<Backend>);
  m.impl("adam_step", &adam_step<Backend>);
  m.impl("adam_step_backward", &adam_step_backward<Backend>);
}

}  // namespace loft
