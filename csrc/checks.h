// Argument checks shared by every backend (csrc/cpu/, csrc/cuda/): each names the op and
// the argument (docs/ops.md, "Common arguments"). Torch-only, device-agnostic: the checks
// of tensor metadata read no tensor memory, and the checks of values (group_flags bits,
// the segment table) read them on the host: the tensor's own data on the CPU, a host copy
// of the (tiny) device tensor otherwise. The op-level checks at the end (check_sgd_args,
// check_adam_args) return the arguments as the kernels read them (csrc/kernel_args.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

#include "kernel_args.h"
#include "segments.h"

namespace loft {

/// params: a 1-D contiguous floating tensor (float64, float32, float16 or bfloat16).
inline void check_params(const char* op, const at::Tensor& params) {
  TORCH_CHECK(params.dim() == 1, op, ": params must be 1-D, got shape ", params.sizes());
  TORCH_CHECK(params.is_contiguous(), op, ": params must be contiguous");
  const auto dtype = params.scalar_type();
  TORCH_CHECK(
      dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": params must be float64, float32, float16 or bfloat16, got ", dtype);
}

/// A buffer of the bucket: 1-D, contiguous, the dtype and device of params, with
/// params.numel() elements, or also 0 elements when `may_be_empty` (optional state
/// buffers, upstream gradients).
inline void check_buffer(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& params, bool may_be_empty) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == params.scalar_type(), op, ": ", name, " must have dtype ",
              params.scalar_type(), " (the dtype of params), got ", t.scalar_type());
  TORCH_CHECK(t.device() == params.device(), op, ": ", name, " must be on ", params.device(),
              " (the device of params), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  const int64_t n = params.numel();
  if (may_be_empty) {
    TORCH_CHECK(t.numel() == n || t.numel() == 0, op, ": ", name, " must have ", n,
                " or 0 elements, got ", t.numel());
  } else {
    TORCH_CHECK(t.numel() == n, op, ": ", name, " must have ", n, " elements, got ", t.numel());
  }
}

/// group_flags metadata: int64 [G] contiguous on the device of params. Returns G.
inline int64_t check_group_flags_layout(const char* op, const at::Tensor& group_flags,
                                        const at::Tensor& params) {
  TORCH_CHECK(group_flags.dim() == 1, op, ": group_flags must be 1-D, got shape ",
              group_flags.sizes());
  TORCH_CHECK(group_flags.scalar_type() == at::kLong, op,
              ": group_flags must have dtype int64, got ", group_flags.scalar_type());
  TORCH_CHECK(group_flags.device() == params.device(), op, ": group_flags must be on ",
              params.device(), " (the device of params), got ", group_flags.device());
  TORCH_CHECK(group_flags.is_contiguous(), op, ": group_flags must be contiguous");
  return group_flags.numel();
}

/// group_flags values (on the host): every value a subset of `all_flags`.
inline void check_group_flags_values(const char* op, const int64_t* flags, int64_t groups,
                                     int64_t all_flags) {
  for (int64_t i = 0; i < groups; ++i) {
    TORCH_CHECK((flags[i] & ~all_flags) == 0, op, ": group_flags[", i, "] = ", flags[i],
                " has bits outside ", all_flags);
  }
}

/// The compute dtype of params: float64 for float64 params, float32 otherwise. It is the
/// dtype of the per-element hyperparameters (lr_elementwise, weight_decay_elementwise)
/// and of their gradients.
inline at::ScalarType compute_dtype(const at::Tensor& params) {
  return params.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

/// The dtype of the [G] hyperparameters: that of lr, which may be the compute dtype of
/// params or float64 (for any params: the per-segment scalars are computed in float64,
/// so float64 values round once, as torch.optim's Python-number hyperparameters do).
inline at::ScalarType check_hyper_dtype(const char* op, const at::Tensor& lr,
                                        const at::Tensor& params) {
  const auto want = compute_dtype(params);
  TORCH_CHECK(lr.scalar_type() == want || lr.scalar_type() == at::kDouble, op,
              ": lr must have dtype ", want, " or Double for ", params.scalar_type(),
              " params, got ", lr.scalar_type());
  return lr.scalar_type();
}

/// A hyperparameter: [G], of dtype `dtype` (check_hyper_dtype: that of lr), contiguous,
/// on the device of params.
inline void check_hyper(const char* op, const char* name, const at::Tensor& t,
                        const at::Tensor& params, int64_t groups, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.numel() == groups, op, ": ", name, " must have ", groups,
              " elements (one per group, as group_flags), got ", t.numel());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype,
              " (the dtype of lr) for ", params.scalar_type(), " params, got ", t.scalar_type());
  TORCH_CHECK(t.device() == params.device(), op, ": ", name, " must be on ", params.device(),
              " (the device of params), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

/// A per-element hyperparameter (lr_elementwise, weight_decay_elementwise): absent (None,
/// or any tensor with 0 elements), or 1-D, contiguous, with params.numel() elements, of
/// the compute dtype of params, on the device of params. Returns whether it is present.
inline bool check_elementwise(const char* op, const char* name, const std::optional<at::Tensor>& t,
                              const at::Tensor& params) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) return false;
  const at::Tensor& e = *t;
  const auto want = compute_dtype(params);
  TORCH_CHECK(e.dim() == 1, op, ": ", name, " must be 1-D, got shape ", e.sizes());
  TORCH_CHECK(e.numel() == params.numel(), op, ": ", name, " must have ", params.numel(),
              " elements (one per element of params) or 0 (none), got ", e.numel());
  TORCH_CHECK(e.scalar_type() == want, op, ": ", name, " must have dtype ", want, " for ",
              params.scalar_type(), " params, got ", e.scalar_type());
  TORCH_CHECK(e.device() == params.device(), op, ": ", name, " must be on ", params.device(),
              " (the device of params), got ", e.device());
  TORCH_CHECK(e.is_contiguous(), op, ": ", name, " must be contiguous");
  return true;
}

/// segments metadata: int64 [S, 5] contiguous on the device of params.
inline void check_segments_layout(const char* op, const at::Tensor& segments,
                                  const at::Tensor& params) {
  TORCH_CHECK(segments.dim() == 2 && segments.size(1) == kSegmentColumns, op,
              ": segments must have shape [S, 5], got ", segments.sizes());
  TORCH_CHECK(segments.scalar_type() == at::kLong, op, ": segments must have dtype int64, got ",
              segments.scalar_type());
  TORCH_CHECK(segments.device() == params.device(), op, ": segments must be on ", params.device(),
              " (the device of params), got ", segments.device());
  TORCH_CHECK(segments.is_contiguous(), op, ": segments must be contiguous");
}

/// segments values (the `count` rows, on the host): tiling [0, numel) in order, with
/// 0 <= group < G, step >= 0 and active in {0, 1}.
inline Segments check_segments_values(const char* op, const int64_t* rows, int64_t count,
                                      int64_t numel, int64_t groups) {
  Segments seg{rows, count, numel, groups};
  int64_t end = 0;  // where the next row must start
  for (int64_t s = 0; s < seg.count; ++s) {
    TORCH_CHECK(seg.offset(s) == end, op, ": segments row ", s, " has offset ", seg.offset(s),
                ", expected ", end, " (rows must tile params in order)");
    TORCH_CHECK(seg.size(s) >= 0, op, ": segments row ", s, " has numel ", seg.size(s),
                ", expected >= 0");
    TORCH_CHECK(seg.size(s) <= seg.numel - end, op, ": segments row ", s, " ends at ", end, " + ",
                seg.size(s), ", past the ", seg.numel, " elements of params");
    TORCH_CHECK(seg.group(s) >= 0 && seg.group(s) < groups, op, ": segments row ", s, " has group ",
                seg.group(s), ", expected 0 <= group < ", groups);
    TORCH_CHECK(seg.step(s) >= 0, op, ": segments row ", s, " has step ", seg.step(s),
                ", expected >= 0");
    const int64_t active = seg.rows[s * kSegmentColumns + kSegmentActive];
    TORCH_CHECK(active == 0 || active == 1, op, ": segments row ", s, " has active ", active,
                ", expected 0 or 1");
    end += seg.size(s);
  }
  TORCH_CHECK(end == seg.numel, op, ": segments cover ", end, " elements, but params has ",
              seg.numel, " (rows must tile params in order)");
  return seg;
}

/// An optional state buffer passed with 0 elements is an error when some group whose
/// flags (`flags`, on the host) include `flag` has an active segment with elements.
inline void check_optional_needed(const char* op, const char* name, const at::Tensor& buffer,
                                  const Segments& seg, const int64_t* flags, int64_t flag,
                                  const char* flag_name) {
  if (buffer.numel() != 0 || seg.numel == 0) return;
  for (int64_t s = 0; s < seg.count; ++s) {
    TORCH_CHECK(!(seg.active(s) && seg.size(s) > 0 && (flags[seg.group(s)] & flag)), op, ": ", name,
                " has 0 elements, but group ", seg.group(s), " uses ", flag_name,
                " and has an active segment (row ", s, ")");
  }
}

/// A tensor argument and its name, for the checks that take a list of them.
struct Named {
  const char* name;
  const at::Tensor& tensor;
};

/// The values of a small index tensor (group_flags, segments) on the host: the tensor
/// itself on the CPU, a copy (a synchronisation of the current stream) otherwise.
inline at::Tensor on_host(const at::Tensor& t) { return t.is_cpu() ? t : t.cpu(); }

/// The element type of params (checked by check_params) as the kernels name it.
inline DType dtype_of(const at::Tensor& params) {
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

/// The upstream gradients of a backward, before its other arguments: params, then each
/// gradient as a buffer that may have 0 elements (a zero gradient).
inline void check_upstream(const char* op, const at::Tensor& params,
                           std::initializer_list<Named> upstream) {
  check_params(op, params);
  for (const Named& u : upstream) check_buffer(op, u.name, u.tensor, params, /*may_be_empty=*/true);
}

/// The arguments of an op after its buffers: group_flags (bits within `all_flags`), the
/// [G] hyperparameters `hypers` (in the order of csrc/segments.h; the first is lr), the
/// segment table, the optional state buffer `optional` (an error when empty while a group
/// with `optional_flag`, named `flag_name`, has an active segment), and the per-element
/// lr / weight_decay. The values of group_flags and segments are checked only when
/// `read_values` (false while a CUDA stream is captured into a graph, where no host copy
/// is allowed). Returns what the kernels read.
inline StepArgs check_group_args(const char* op, bool read_values, const at::Tensor& params,
                                 const at::Tensor& group_flags, int64_t all_flags,
                                 std::initializer_list<Named> hypers, const at::Tensor& segments,
                                 Named optional, int64_t optional_flag, const char* flag_name,
                                 const std::optional<at::Tensor>& lr_elementwise,
                                 const std::optional<at::Tensor>& weight_decay_elementwise) {
  TORCH_INTERNAL_ASSERT(hypers.size() >= 1 && hypers.size() <= kMaxHyper);
  const int64_t groups = check_group_flags_layout(op, group_flags, params);
  at::Tensor host_flags;
  if (read_values) {
    host_flags = on_host(group_flags);
    check_group_flags_values(op, host_flags.const_data_ptr<int64_t>(), groups, all_flags);
  }
  const at::ScalarType hyper_dtype = check_hyper_dtype(op, hypers.begin()->tensor, params);
  for (const Named& h : hypers) check_hyper(op, h.name, h.tensor, params, groups, hyper_dtype);
  check_segments_layout(op, segments, params);
  if (read_values) {
    const at::Tensor rows = on_host(segments);
    const Segments seg = check_segments_values(op, rows.const_data_ptr<int64_t>(), rows.size(0),
                                               params.numel(), groups);
    check_optional_needed(op, optional.name, optional.tensor, seg,
                          host_flags.const_data_ptr<int64_t>(), optional_flag, flag_name);
  }
  const bool has_lr = check_elementwise(op, "lr_elementwise", lr_elementwise, params);
  const bool has_wd =
      check_elementwise(op, "weight_decay_elementwise", weight_decay_elementwise, params);

  StepArgs args{};
  args.dtype = dtype_of(params);
  args.segments = {segments.const_data_ptr<int64_t>(), segments.size(0), params.numel(), groups};
  int k = 0;
  for (const Named& h : hypers) args.hyper.values[k++] = h.tensor.const_data_ptr();
  args.hyper.flags = group_flags.const_data_ptr<int64_t>();
  args.hyper.is_double = hyper_dtype == at::kDouble;
  args.lr_elementwise = has_lr ? lr_elementwise->const_data_ptr() : nullptr;
  args.weight_decay_elementwise = has_wd ? weight_decay_elementwise->const_data_ptr() : nullptr;
  return args;
}

/// Every argument of sgd_step (the shared ones of sgd_step_backward), in order.
inline StepArgs check_sgd_args(const char* op, bool read_values, const at::Tensor& params,
                               const at::Tensor& grads, const at::Tensor& momentum_buffer,
                               const at::Tensor& segments, const at::Tensor& lr,
                               const at::Tensor& momentum, const at::Tensor& dampening,
                               const at::Tensor& weight_decay, const at::Tensor& group_flags,
                               const std::optional<at::Tensor>& lr_elementwise,
                               const std::optional<at::Tensor>& weight_decay_elementwise) {
  check_params(op, params);
  check_buffer(op, "grads", grads, params, /*may_be_empty=*/false);
  check_buffer(op, "momentum_buffer", momentum_buffer, params, /*may_be_empty=*/true);
  return check_group_args(op, read_values, params, group_flags, kSgdAllFlags,
                          {{"lr", lr},
                           {"momentum", momentum},
                           {"dampening", dampening},
                           {"weight_decay", weight_decay}},
                          segments, {"momentum_buffer", momentum_buffer}, kSgdMomentum, "momentum",
                          lr_elementwise, weight_decay_elementwise);
}

/// Every argument of adam_step (the shared ones of adam_step_backward and adam_step_), in
/// order.
inline StepArgs check_adam_args(const char* op, bool read_values, const at::Tensor& params,
                                const at::Tensor& grads, const at::Tensor& exp_avg,
                                const at::Tensor& exp_avg_sq, const at::Tensor& max_exp_avg_sq,
                                const at::Tensor& segments, const at::Tensor& lr,
                                const at::Tensor& beta1, const at::Tensor& beta2,
                                const at::Tensor& eps, const at::Tensor& weight_decay,
                                const at::Tensor& group_flags,
                                const std::optional<at::Tensor>& lr_elementwise,
                                const std::optional<at::Tensor>& weight_decay_elementwise) {
  check_params(op, params);
  check_buffer(op, "grads", grads, params, /*may_be_empty=*/false);
  check_buffer(op, "exp_avg", exp_avg, params, /*may_be_empty=*/false);
  check_buffer(op, "exp_avg_sq", exp_avg_sq, params, /*may_be_empty=*/false);
  check_buffer(op, "max_exp_avg_sq", max_exp_avg_sq, params, /*may_be_empty=*/true);
  return check_group_args(op, read_values, params, group_flags, kAdamAllFlags,
                          {{"lr", lr},
                           {"beta1", beta1},
                           {"beta2", beta2},
                           {"eps", eps},
                           {"weight_decay", weight_decay}},
                          segments, {"max_exp_avg_sq", max_exp_avg_sq}, kAdamAmsgrad, "amsgrad",
                          lr_elementwise, weight_decay_elementwise);
}

}  // namespace loft
