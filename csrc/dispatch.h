// Compile-time dispatch shared by every backend: the compute type of an element type, and
// run-time flags turned into template arguments, so that each loop (CPU) or kernel body
// (CUDA) is compiled for one combination and tests none of them per element. Torch-free.
#pragma once

#include <cstdint>
#include <type_traits>

#include "segments.h"

namespace loft {

/// The element type of an op's buffers, as its kernels see it (csrc/kernel_args.h).
enum class DType : int { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

/// The compute type of an element type S, which is also the element type of the
/// per-element hyperparameters and of the float32 [G] ones: double for double, float for
/// float, float16 and bfloat16 (at::opmath_type, which ATen/ATen.h does not bring in; the
/// CUDA kernels' __half and __nv_bfloat16 alike).
template <typename S>
using compute_t = std::conditional_t<std::is_same<S, double>::value, double, float>;

/// Calls f(S{}) with S the element type of `dtype`: double, float, or the backend's
/// 16-bit types Half and BFloat16 (c10::Half on the CPU, __half on CUDA).
template <typename Half, typename BFloat16, typename F>
inline void dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat64:
      f(double{});
      break;
    case DType::kFloat32:
      f(float{});
      break;
    case DType::kFloat16:
      f(Half{});
      break;
    case DType::kBFloat16:
      f(BFloat16{});
      break;
  }
}

/// Calls f(std::bool_constant<b>{}) with the run-time bool b as a compile-time constant.
template <typename F>
LOFT_HOST_DEVICE LOFT_INLINE void with_bool(bool b, const F& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

/// Calls f(kMomentum, kFirst, kNesterov) as compile-time bools for a segment of a group
/// with sgd_step flags `flags` that had `step` updates before this one (first and
/// nesterov only matter with momentum, so the plain case is a single specialisation).
template <typename F>
LOFT_HOST_DEVICE LOFT_INLINE void with_sgd_mode(int64_t flags, int64_t step, const F& f) {
  if ((flags & kSgdMomentum) == 0) {
    f(std::false_type{}, std::false_type{}, std::false_type{});
    return;
  }
  with_bool(step == 0, [&](auto kFirst) {
    with_bool((flags & kSgdNesterov) != 0,
              [&](auto kNesterov) { f(std::true_type{}, kFirst, kNesterov); });
  });
}

/// Calls f(kAmsgrad, kDecoupled) as compile-time bools for a group with adam_step flags
/// `flags`.
template <typename F>
LOFT_HOST_DEVICE LOFT_INLINE void with_adam_mode(int64_t flags, const F& f) {
  with_bool((flags & kAdamAmsgrad) != 0, [&](auto kAmsgrad) {
    with_bool((flags & kAdamDecoupled) != 0, [&](auto kDecoupled) { f(kAmsgrad, kDecoupled); });
  });
}

}  // namespace loft
