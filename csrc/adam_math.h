// Per-element math of adam_step and adam_step_backward (docs/ops.md, "Adam / AdamW"),
// shared by the CPU loops (csrc/cpu/adam_cpu.cpp) and the CUDA kernels. Torch-free on
// purpose: CUDA translation units include it without any torch header.
//
// T is the compute type (float or double; half buffers compute in float). amsgrad and
// decoupled weight decay are template parameters so that a backend hoists them out of
// its inner loop; maximize is the exact sign factor AdamScalars::sign (+1 or -1).
#pragma once

#include "dispatch.h"
#include "segments.h"

namespace loft {

/// What the scalars that contain lr or weight_decay are made of, per segment, in float64:
/// the group's own lr and weight_decay and the segment's bias correction. A per-element
/// lr or weight_decay recomputes those scalars from it with adam_lr_terms(), the function
/// the per-segment scalars use, so that a per-element value equal to the group's gives
/// the same bits. Kept apart from AdamScalars, which the loops copy per element: a larger
/// struct is no longer split into registers and stops gcc vectorising the loop.
struct AdamBasis {
  double lr;
  double weight_decay;
  double bc1;            // 1 - beta1^t
  double t;              // t = step + 1
  double beta1_pow_tm1;  // beta1^(t-1)
};

/// The Adam scalars that contain lr or weight_decay, in float64.
struct AdamLrTerms {
  double decay;       // 1 - lr * weight_decay
  double step_size;   // lr / bc1
  double beta1_coef;  // lr * t * beta1^(t-1) / bc1^2
};

LOFT_HOST_DEVICE LOFT_INLINE AdamLrTerms adam_lr_terms(double lr, double weight_decay,
                                                       const AdamBasis& b) {
  // As torch.optim computes them from Python floats: 1 - lr * weight_decay (AdamW's
  // param.mul_ factor) and lr / bias_correction1 (addcdiv's value), each rounded to the
  // compute type once, when the caller casts.
  return {1.0 - lr * weight_decay, lr / b.bc1, lr * b.t * b.beta1_pow_tm1 / (b.bc1 * b.bc1)};
}

/// The per-segment scalars of one Adam step, in a compute type T. They depend on the
/// group's hyperparameters and on the segment's own step count; build them in double
/// with adam_segment_scalars() and cast once per segment.
template <typename T>
struct AdamScalars {
  T sign;             // -1 when the group maximizes, else +1
  T lr;               // lr
  T beta1;            // beta1
  T one_minus_beta1;  // 1 - beta1
  T beta2;            // beta2
  T one_minus_beta2;  // 1 - beta2
  T eps;              // eps
  T weight_decay;     // weight_decay
  T decay;            // 1 - lr * weight_decay (AdamW's decoupled decay factor)
  T step_size;        // c = lr / bc1, bc1 = 1 - beta1^t
  T sqrt_bc2;         // sqrt(bc2), bc2 = 1 - beta2^t
  T inv_sqrt_bc2;     // r = 1 / sqrt(bc2)
  T inv_bc1;          // 1 / bc1
  T beta1_coef;       // d c / d beta1 = lr * t * beta1^(t-1) / bc1^2
  T beta2_coef;       // d d / d beta2 per unit s = 0.5 * t * beta2^(t-1) * bc2^(-3/2)

  template <typename U>
  LOFT_HOST_DEVICE AdamScalars<U> cast() const {
    return {static_cast<U>(sign),      static_cast<U>(lr),
            static_cast<U>(beta1),     static_cast<U>(one_minus_beta1),
            static_cast<U>(beta2),     static_cast<U>(one_minus_beta2),
            static_cast<U>(eps),       static_cast<U>(weight_decay),
            static_cast<U>(decay),     static_cast<U>(step_size),
            static_cast<U>(sqrt_bc2),  static_cast<U>(inv_sqrt_bc2),
            static_cast<U>(inv_bc1),   static_cast<U>(beta1_coef),
            static_cast<U>(beta2_coef)};
  }
};

/// Per-segment Adam scalars in float64 for a segment that had `step` updates before
/// this one (t = step + 1); with `basis`, also what a per-element lr or weight_decay
/// needs (adam_set_element_scalars). Not inlined: a backend calls it once per segment, and
/// on CUDA the large libdevice pow is then compiled once rather than into every kernel.
LOFT_HOST_DEVICE LOFT_NOINLINE inline AdamScalars<double> adam_segment_scalars(
    double lr, double beta1, double beta2, double eps, double weight_decay, int64_t flags,
    int64_t step, AdamBasis* basis = nullptr) {
  const int64_t t = step + 1;
  const double beta2_pow_tm1 = loft_pow(beta2, step);  // beta2^(t-1)
  // As torch.optim from Python floats: 1 - beta1 ** t, and bias_correction2 ** 0.5 (pow,
  // not sqrt: the two may differ in the last bit).
  const double bc1 = 1.0 - loft_pow(beta1, t);
  const double bc2 = 1.0 - loft_pow(beta2, t);
  const double sqrt_bc2 = ::pow(bc2, 0.5);
  const AdamBasis b{lr, weight_decay, bc1, static_cast<double>(t), loft_pow(beta1, step)};
  if (basis != nullptr) *basis = b;
  const AdamLrTerms terms = adam_lr_terms(lr, weight_decay, b);
  AdamScalars<double> s;
  s.sign = (flags & kAdamMaximize) ? -1.0 : 1.0;
  s.lr = lr;
  s.beta1 = beta1;
  s.one_minus_beta1 = 1.0 - beta1;
  s.beta2 = beta2;
  s.one_minus_beta2 = 1.0 - beta2;
  s.eps = eps;
  s.weight_decay = weight_decay;
  s.decay = terms.decay;
  s.step_size = terms.step_size;
  s.sqrt_bc2 = sqrt_bc2;
  s.inv_sqrt_bc2 = 1.0 / sqrt_bc2;
  s.inv_bc1 = 1.0 / bc1;
  s.beta1_coef = terms.beta1_coef;
  s.beta2_coef = 0.5 * b.t * beta2_pow_tm1 / (bc2 * sqrt_bc2);
  return s;
}

/// Makes `s` (a copy of its segment's scalars) the scalars of one element whose lr
/// (has_lr) and/or weight_decay (has_wd) are its own values (lr_elementwise /
/// weight_decay_elementwise): every scalar that contains them (decay, step_size,
/// beta1_coef) is recomputed in float64 by adam_lr_terms() from the element's values and
/// the segment's basis (the group's float64 value for the one not given), and cast to T.
/// In place, field by field: the loops keep one copy outside, as a copy of the whole
/// struct per element stops gcc vectorising them.
template <typename T>
LOFT_HOST_DEVICE LOFT_INLINE void adam_set_element_scalars(AdamScalars<T>& s,
                                                           const AdamBasis& basis, bool has_lr,
                                                           T lr, bool has_wd, T weight_decay) {
  const double lr_d = has_lr ? static_cast<double>(lr) : basis.lr;
  const double wd_d = has_wd ? static_cast<double>(weight_decay) : basis.weight_decay;
  const AdamLrTerms terms = adam_lr_terms(lr_d, wd_d, basis);
  if (has_lr) {
    s.lr = lr;
    s.step_size = static_cast<T>(terms.step_size);
    s.beta1_coef = static_cast<T>(terms.beta1_coef);
  }
  if (has_wd) s.weight_decay = weight_decay;
  s.decay = static_cast<T>(terms.decay);
}

/// One Adam element, forward, rounded as torch.optim's single-tensor Adam (segments.h
/// [note: rounding]; f(...) marks one rounding of a fused multiply-add):
///
///     g1 = maximize ? -g : g
///     decoupled: g2 = g1,                       p0 = p * (1 - lr * weight_decay)
///     else:      g2 = f(g1 + weight_decay * p), p0 = p   (grad.add(p, alpha=wd);
///                                                         no term when weight_decay == 0)
///     m' = f(m + (1 - beta1) * (g2 - m))      (torch.lerp(m, g2, 1 - beta1), loft_lerp)
///     v' = f(beta2 * v + ((1 - beta2) * g2) * g2)   (v.mul_(beta2).addcmul_(g2, g2, ...))
///     u  = amsgrad ? max(vmax, v') : v'      (NaN-propagating; vmax' = u; without
///                                             amsgrad vmax' = vmax)
///     d  = sqrt(u) / sqrt(bc2) + eps
///     p' = p0 - ((lr / bc1) * m') / d        (addcdiv_(m', d, value=-lr / bc1))
///
/// vmax and vmax_out are only used when kAmsgrad.
template <bool kAmsgrad, bool kDecoupled, typename T>
LOFT_HOST_DEVICE LOFT_INLINE void adam_forward(T p, T g, T m, T v, T vmax, const AdamScalars<T>& s,
                                               T& p_out, T& m_out, T& v_out, T& vmax_out) {
  const T g1 = s.sign * g;
  const T g2 = kDecoupled ? g1 : loft_add_scaled_fused(g1, s.weight_decay, p);
  const T p0 = kDecoupled ? p * s.decay : p;
  m_out = loft_lerp(m, g2, s.one_minus_beta1);
  v_out = loft_fma(s.one_minus_beta2 * g2, g2, s.beta2 * v);
  T u = v_out;
  if (kAmsgrad) {
    u = loft_maximum(vmax, v_out);
    vmax_out = u;
  }
  const T d = loft_sqrt(u) / s.sqrt_bc2 + s.eps;
  p_out = p0 - s.step_size * m_out / d;
}

/// Gradients of one Adam element: of its inputs (params, grads, exp_avg, exp_avg_sq,
/// max_exp_avg_sq) and its contributions to the hyperparameter gradients, hyper[k] for
/// hyperparameter k (kAdamHyperLr, kAdamHyperBeta1, kAdamHyperBeta2, kAdamHyperEps,
/// kAdamHyperWeightDecay).
template <typename T>
struct AdamElementGrads {
  static constexpr int kNumHyper = kAdamNumHyper;
  T params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq;
  T hyper[kAdamNumHyper];
};

/// One Adam element, backward (vector-Jacobian product), with P, M, V, X the upstream
/// gradients of p', m', v', vmax' and c = lr / bc1, r = 1 / sqrt(bc2):
///
///     Q  = P * c * m' / d^2            Mt = M - P * c / d
///     U  = Q * r * (u > 0 ? 0.5 / sqrt(u) : 0)
///     amsgrad: U += X, split between v' and vmax as torch.maximum's derivative
///              (all to the larger, half each on a tie); Vt = V + U_v', grad_vmax = U_vmax
///     else:    Vt = V + U, grad_vmax = X
///     G2 = Mt * (1 - beta1) + Vt * (1 - beta2) * 2 * g2
///     grad_p = decoupled ? P * (1 - lr * wd) : P + wd * G2
///     grad_g = maximize ? -G2 : G2,  grad_m = Mt * beta1,  grad_v = Vt * beta2
///     lr    += -P * m' / (bc1 * d) - (decoupled ? P * wd * p : 0)
///     wd    += decoupled ? -P * lr * p : G2 * p
///     eps   += Q
///     beta1 += Mt * (m - g2) - P * (m' / d) * lr * t * beta1^(t-1) / bc1^2
///     beta2 += Vt * (v - g2^2) + Q * 0.5 * s * bc2^(-3/2) * t * beta2^(t-1)
///
/// vmax and X are only read when kAmsgrad (X is the pass-through otherwise, which the
/// caller copies itself).
template <bool kAmsgrad, bool kDecoupled, typename T>
LOFT_HOST_DEVICE LOFT_INLINE AdamElementGrads<T> adam_backward(T P, T M, T V, T X, T p, T g, T m,
                                                               T v, T vmax,
                                                               const AdamScalars<T>& s) {
  // Recompute the forward.
  const T g1 = s.sign * g;
  const T g2 = kDecoupled ? g1 : loft_add_scaled_fused(g1, s.weight_decay, p);
  const T m_new = loft_lerp(m, g2, s.one_minus_beta1);
  const T v_new = loft_fma(s.one_minus_beta2 * g2, g2, s.beta2 * v);
  const T u = kAmsgrad ? loft_maximum(vmax, v_new) : v_new;
  const T sq = loft_sqrt(u);
  const T d = sq / s.sqrt_bc2 + s.eps;
  const T inv_d = T(1) / d;

  // Backward. Divisions go through inv_d; the select keeps the loop branch-free and
  // never divides by zero (d sqrt(u)/du is taken as 0 at u == 0, as higher does).
  const T Pc = P * s.step_size;
  const T m_over_d = m_new * inv_d;
  const T Q = Pc * m_over_d * inv_d;
  const T Mt = M - Pc * inv_d;
  const bool positive = u > T(0);
  const T half_inv_sq = T(0.5) / (positive ? sq : T(1));
  const T ds = positive ? half_inv_sq : T(0);
  T U = Q * s.inv_sqrt_bc2 * ds;
  AdamElementGrads<T> r;
  T Vt;
  if (kAmsgrad) {
    U = U + X;
    const T share_v = v_new > vmax ? T(1) : (v_new == vmax ? T(0.5) : T(0));
    Vt = V + U * share_v;
    r.max_exp_avg_sq = U * (T(1) - share_v);
  } else {
    Vt = V + U;
    r.max_exp_avg_sq = X;
  }
  const T G2 = Mt * s.one_minus_beta1 + Vt * s.one_minus_beta2 * T(2) * g2;
  r.params = kDecoupled ? P * s.decay : loft_add_scaled(P, s.weight_decay, G2);
  r.grads = s.sign * G2;
  r.exp_avg = Mt * s.beta1;
  r.exp_avg_sq = Vt * s.beta2;
  const T lr_adam = -(P * m_over_d) * s.inv_bc1;
  r.hyper[kAdamHyperLr] = kDecoupled ? lr_adam - P * s.weight_decay * p : lr_adam;
  r.hyper[kAdamHyperWeightDecay] = kDecoupled ? -P * s.lr * p : G2 * p;
  r.hyper[kAdamHyperEps] = Q;
  r.hyper[kAdamHyperBeta1] = Mt * (m - g2) - P * m_over_d * s.beta1_coef;
  r.hyper[kAdamHyperBeta2] = Vt * (v - g2 * g2) + Q * sq * s.beta2_coef;
  return r;
}

/// One segment's scalars in the compute type T and its float64 basis for per-element lr /
/// weight_decay.
template <typename T>
struct AdamSegment {
  AdamScalars<T> scalars;
  AdamBasis basis;
};

/// Adam as the walks of every backend see it (csrc/cpu/common.h, csrc/cuda/tiles.cuh):
/// what a backend keeps per segment and how it makes it, and the group flags that select
/// a specialisation of its loops.
struct AdamOp {
  template <typename T>
  using Segment = AdamSegment<T>;

  /// The scalars of a segment of group `group` with `step` earlier updates, from the
  /// group's hyperparameters (a backend calls it once per segment; the four pow calls are
  /// in adam_segment_scalars, which is not inlined).
  template <typename T>
  LOFT_HOST_DEVICE static Segment<T> segment(const GroupHyper& h, int64_t group, int64_t step) {
    Segment<T> out;
    out.scalars = adam_segment_scalars(
                      h.value(kAdamHyperLr, group), h.value(kAdamHyperBeta1, group),
                      h.value(kAdamHyperBeta2, group), h.value(kAdamHyperEps, group),
                      h.value(kAdamHyperWeightDecay, group), h.flags[group], step, &out.basis)
                      .template cast<T>();
    return out;
  }

  /// f(kAmsgrad, kDecoupled) (with_adam_mode).
  template <typename F>
  LOFT_HOST_DEVICE LOFT_INLINE static void with_mode(int64_t flags, int64_t /*step*/, const F& f) {
    with_adam_mode(flags, f);
  }
};

}  // namespace loft
