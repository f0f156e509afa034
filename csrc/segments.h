// Torch-free pieces shared by the math headers and every backend: the host/device
// macro, the segment table, the group_flags bits, the order of each op's [G]
// hyperparameters, and small scalar helpers. See docs/ops.md for the contract these
// constants encode.
#pragma once

#include <math.h>

#include <cstdint>

#ifndef LOFT_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define LOFT_HOST_DEVICE __host__ __device__
#else
#define LOFT_HOST_DEVICE
#endif
#endif

// The per-element math is always inlined into the loops that walk memory: called out of
// line, a loop over it is not vectorised (gcc stops inlining plain `inline` functions
// once a translation unit has grown by its many specialisations, making Adam 25x slower).
#ifndef LOFT_INLINE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define LOFT_INLINE __forceinline__
#else
#define LOFT_INLINE inline __attribute__((always_inline))
#endif
#endif

// Kept out of line (a function called once per segment whose inlined body would be large).
#ifndef LOFT_NOINLINE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define LOFT_NOINLINE __noinline__
#else
#define LOFT_NOINLINE __attribute__((noinline))
#endif
#endif

namespace loft {

// Columns of one row of the [S, 5] int64 segment table.
constexpr int kSegmentColumns = 5;
constexpr int kSegmentOffset = 0;
constexpr int kSegmentNumel = 1;
constexpr int kSegmentGroup = 2;
constexpr int kSegmentStep = 3;  // updates the tensor had *before* this call
constexpr int kSegmentActive = 4;

/// A validated segment table (csrc/checks.h): `count` rows tiling the `numel` elements of
/// the buffers in order, with groups in [0, groups). `rows` is in the memory of the
/// buffers' device.
struct Segments {
  const int64_t* rows;
  int64_t count;
  int64_t numel;
  int64_t groups;

  LOFT_HOST_DEVICE int64_t offset(int64_t s) const {
    return rows[s * kSegmentColumns + kSegmentOffset];
  }
  LOFT_HOST_DEVICE int64_t size(int64_t s) const {
    return rows[s * kSegmentColumns + kSegmentNumel];
  }
  LOFT_HOST_DEVICE int64_t group(int64_t s) const {
    return rows[s * kSegmentColumns + kSegmentGroup];
  }
  LOFT_HOST_DEVICE int64_t step(int64_t s) const {
    return rows[s * kSegmentColumns + kSegmentStep];
  }
  LOFT_HOST_DEVICE bool active(int64_t s) const {
    return rows[s * kSegmentColumns + kSegmentActive] != 0;
  }
};

// group_flags bits of sgd_step.
constexpr int64_t kSgdMaximize = 1;
constexpr int64_t kSgdNesterov = 2;
constexpr int64_t kSgdMomentum = 4;
constexpr int64_t kSgdAllFlags = kSgdMaximize | kSgdNesterov | kSgdMomentum;

// group_flags bits of adam_step.
constexpr int64_t kAdamMaximize = 1;
constexpr int64_t kAdamAmsgrad = 2;
constexpr int64_t kAdamDecoupled = 4;
constexpr int64_t kAdamAllFlags = kAdamMaximize | kAdamAmsgrad | kAdamDecoupled;

// The [G] hyperparameters of each op in the order of its schema: index k is also bit k of
// the backward's hyper_grad_mask and its k-th hyperparameter gradient; the gradients of
// lr_elementwise and weight_decay_elementwise are bits kNumHyper and kNumHyper + 1.
constexpr int kSgdHyperLr = 0;
constexpr int kSgdHyperMomentum = 1;
constexpr int kSgdHyperDampening = 2;
constexpr int kSgdHyperWeightDecay = 3;
constexpr int kSgdNumHyper = 4;

constexpr int kAdamHyperLr = 0;
constexpr int kAdamHyperBeta1 = 1;
constexpr int kAdamHyperBeta2 = 2;
constexpr int kAdamHyperEps = 3;
constexpr int kAdamHyperWeightDecay = 4;
constexpr int kAdamNumHyper = 5;

constexpr int kMaxHyper = kAdamNumHyper > kSgdNumHyper ? kAdamNumHyper : kSgdNumHyper;

/// An op's [G] hyperparameters (in the order above) and group_flags, in the memory of the
/// buffers' device: each hyperparameter is G doubles when `is_double`, else G floats (its
/// dtype is that of lr, csrc/checks.h).
struct GroupHyper {
  const void* values[kMaxHyper];
  const int64_t* flags;
  bool is_double;

  /// Hyperparameter k of group g, in float64.
  LOFT_HOST_DEVICE double value(int k, int64_t g) const {
    return is_double ? static_cast<const double*>(values[k])[g]
                     : static_cast<double>(static_cast<const float*>(values[k])[g]);
  }
};

// Square roots without overload ambiguity on host and device.
LOFT_HOST_DEVICE LOFT_INLINE float loft_sqrt(float x) { return ::sqrtf(x); }
LOFT_HOST_DEVICE LOFT_INLINE double loft_sqrt(double x) { return ::sqrt(x); }

// [note: rounding] The kernels round exactly where the per-tensor torch ops they stand
// for round, so that float32 results are the same bits (docs/ops.md, "Rounding"). Every
// build turns the compiler's contraction of a * b + c into a fused multiply-add off
// (-ffp-contract=off for the host compiler, --fmad=false for nvcc): a product and a sum
// written apart round apart, as two torch ops do. Where torch itself fuses (the CPU
// kernels of add(alpha=), addcmul and lerp use a fused multiply-add, checked with torch
// 2.13 on AVX2/AVX512 builds, vectorised body and scalar tail alike), the math says so
// with loft_fma: a * b + c rounded once.
LOFT_HOST_DEVICE LOFT_INLINE float loft_fma(float a, float b, float c) { return ::fmaf(a, b, c); }
LOFT_HOST_DEVICE LOFT_INLINE double loft_fma(double a, double b, double c) {
  return ::fma(a, b, c);
}

// y + a * x with the product rounded (higher's `g + weight_decay * p`, two torch ops), or
// exactly y when a == 0: torch.optim skips a zero weight decay, so an infinite or NaN x
// must not turn y into NaN through 0 * x (docs/ops.md, "Non-finite values").
template <typename T>
LOFT_HOST_DEVICE LOFT_INLINE T loft_add_scaled(T y, T a, T x) {
  return a != T(0) ? y + a * x : y;
}

// y + a * x rounded once (torch's y.add(x, alpha=a): torch.optim.Adam's L2 weight decay),
// or exactly y when a == 0, as loft_add_scaled.
template <typename T>
LOFT_HOST_DEVICE LOFT_INLINE T loft_add_scaled_fused(T y, T a, T x) {
  return a != T(0) ? loft_fma(x, a, y) : y;
}

// torch.lerp(start, end, weight) as torch's CPU kernel computes it: one fused
// multiply-add in one of two forms chosen by |weight| < 0.5, start + weight * (end - start)
// or end + (weight - 1) * (end - start), so that non-finite inputs give torch's results
// (start = inf, finite end: NaN for a small weight, inf otherwise). torch.optim's Adam
// updates exp_avg with lerp_(grad, 1 - beta1).
template <typename T>
LOFT_HOST_DEVICE LOFT_INLINE T loft_lerp(T start, T end, T weight) {
  const T diff = end - start;
  return (weight < T(0.5) && weight > T(-0.5)) ? loft_fma(weight, diff, start)
                                               : loft_fma(weight - T(1), diff, end);
}

// torch.maximum(a, b): NaN when either is NaN (a bare a > b ? a : b drops a NaN a).
template <typename T>
LOFT_HOST_DEVICE LOFT_INLINE T loft_maximum(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// beta^t for an integer step count t >= 0, in double (per-segment scalars are always
// computed in float64, docs/ops.md). pow(0, 0) is 1, as torch's 0 ** 0.
LOFT_HOST_DEVICE inline double loft_pow(double base, int64_t exponent) {
  return ::pow(base, static_cast<double>(exponent));
}

}  // namespace loft
