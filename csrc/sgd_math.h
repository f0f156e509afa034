// Per-element math of sgd_step and sgd_step_backward (docs/ops.md, "SGD"), shared by
// the CPU loops (csrc/cpu/sgd_cpu.cpp) and the CUDA kernels. Torch-free on purpose:
// CUDA translation units include it without any torch header.
//
// T is the compute type (float or double; half buffers compute in float). The group
// flags that change the shape of the computation (momentum, first step, nesterov) are
// template parameters so that a backend hoists them out of its inner loop; maximize
// is the exact sign factor SgdScalars::sign (+1 or -1).
#pragma once

#include "dispatch.h"
#include "segments.h"

namespace loft {

/// The per-segment scalars of one SGD step, in a compute type T. Build them in double
/// with sgd_segment_scalars() and cast once per segment.
template <typename T>
struct SgdScalars {
  T sign;                 // -1 when the group maximizes, else +1
  T lr;                   // lr
  T momentum;             // momentum
  T one_minus_dampening;  // 1 - dampening
  T weight_decay;         // weight_decay (L2, added to the gradient)

  template <typename U>
  LOFT_HOST_DEVICE SgdScalars<U> cast() const {
    return {static_cast<U>(sign), static_cast<U>(lr), static_cast<U>(momentum),
            static_cast<U>(one_minus_dampening), static_cast<U>(weight_decay)};
  }
};

/// Per-segment SGD scalars in float64 from the group's hyperparameters and flags.
LOFT_HOST_DEVICE inline SgdScalars<double> sgd_segment_scalars(double lr, double momentum,
                                                               double dampening,
                                                               double weight_decay, int64_t flags) {
  return {(flags & kSgdMaximize) ? -1.0 : 1.0, lr, momentum, 1.0 - dampening, weight_decay};
}

/// Makes `s` (a copy of its segment's scalars) the scalars of one element whose lr
/// (has_lr) and/or weight_decay (has_wd) are its own values (lr_elementwise /
/// weight_decay_elementwise). No other SGD scalar depends on them, so a per-element value
/// equal to the group's gives the per-group results bit for bit. In place: the loops keep
/// one copy outside (a struct copy per element can stop gcc vectorising them).
template <typename T>
LOFT_HOST_DEVICE LOFT_INLINE void sgd_set_element_scalars(SgdScalars<T>& s, bool has_lr, T lr,
                                                          bool has_wd, T weight_decay) {
  if (has_lr) s.lr = lr;
  if (has_wd) s.weight_decay = weight_decay;
}

/// One SGD element, forward, rounded as higher's per-tensor ops (`g + weight_decay * p`,
/// `buf * momentum + (1 - dampening) * g`, `p + (-lr * d)`: every product and sum
/// rounded apart, segments.h [note: rounding]):
///
///     g2 = (maximize ? -g : g) + weight_decay * p   (the term skipped when weight_decay == 0)
///     momentum:  b' = first ? g2 : momentum * b + (1 - dampening) * g2
///                d  = nesterov ? g2 + momentum * b' : b'
///     else:      b' = b,  d = g2
///     p' = p - lr * d
template <bool kMomentum, bool kFirst, bool kNesterov, typename T>
LOFT_HOST_DEVICE LOFT_INLINE void sgd_forward(T p, T g, T b, const SgdScalars<T>& s, T& p_out,
                                              T& b_out) {
  const T g2 = loft_add_scaled(s.sign * g, s.weight_decay, p);
  T d = g2;
  b_out = b;
  if (kMomentum) {
    b_out = kFirst ? g2 : s.momentum * b + s.one_minus_dampening * g2;
    d = kNesterov ? g2 + s.momentum * b_out : b_out;
  }
  p_out = p - s.lr * d;
}

/// Gradients of one SGD element: of its inputs (params, grads, momentum_buffer) and its
/// contributions to the hyperparameter gradients, hyper[k] for hyperparameter k
/// (kSgdHyperLr, kSgdHyperMomentum, kSgdHyperDampening, kSgdHyperWeightDecay).
template <typename T>
struct SgdElementGrads {
  static constexpr int kNumHyper = kSgdNumHyper;
  T params, grads, momentum_buffer;
  T hyper[kSgdNumHyper];
};

/// One SGD element, backward (vector-Jacobian product), with P, B the upstream
/// gradients of p', b':
///
///     D  = -lr * P
///     momentum:  B' = B + (nesterov ? momentum * D : D)
///                G2 = (nesterov ? D : 0) + (first ? B' : (1 - dampening) * B')
///                     (first and nesterov: (B + D) + momentum * D, the order in which
///                     autograd adds the three gradients reaching g2 = b' through
///                     higher's ops, so that float32 results are the same bits)
///                grad_b = first ? 0 : momentum * B'
///     else:      G2 = D,  grad_b = B
///     grad_p = P + weight_decay * G2 (P when weight_decay == 0),  grad_g = maximize ? -G2 : G2
///     lr += -P * d,  weight_decay += G2 * p
///     momentum += momentum ? (first ? 0 : B' * b) + (nesterov ? D * b' : 0) : 0
///     dampening += momentum and not first ? -B' * g2 : 0
template <bool kMomentum, bool kFirst, bool kNesterov, typename T>
LOFT_HOST_DEVICE LOFT_INLINE SgdElementGrads<T> sgd_backward(T P, T B, T p, T g, T b,
                                                             const SgdScalars<T>& s) {
  const T g2 = loft_add_scaled(s.sign * g, s.weight_decay, p);
  T d = g2;
  T b_new = b;
  if (kMomentum) {
    b_new = kFirst ? g2 : s.momentum * b + s.one_minus_dampening * g2;
    d = kNesterov ? g2 + s.momentum * b_new : b_new;
  }
  const T D = -s.lr * P;
  SgdElementGrads<T> r;
  T G2 = D;
  r.momentum_buffer = B;
  r.hyper[kSgdHyperMomentum] = T(0);
  r.hyper[kSgdHyperDampening] = T(0);
  if (kMomentum) {
    const T Bt = B + (kNesterov ? s.momentum * D : D);
    if (kFirst) {
      G2 = kNesterov ? (B + D) + s.momentum * D : Bt;
    } else {
      const T from_b = s.one_minus_dampening * Bt;
      G2 = kNesterov ? D + from_b : from_b;
    }
    r.momentum_buffer = kFirst ? T(0) : s.momentum * Bt;
    const T from_mom = kFirst ? T(0) : Bt * b;
    r.hyper[kSgdHyperMomentum] = kNesterov ? from_mom + D * b_new : from_mom;
    r.hyper[kSgdHyperDampening] = kFirst ? T(0) : -Bt * g2;
  }
  r.params = loft_add_scaled(P, s.weight_decay, G2);
  r.grads = s.sign * G2;
  r.hyper[kSgdHyperLr] = P * -d;
  r.hyper[kSgdHyperWeightDecay] = G2 * p;
  return r;
}

/// SGD as the walks of every backend see it (csrc/cpu/common.h, csrc/cuda/tiles.cuh):
/// what a backend keeps per segment and how it makes it, and the group flags that select
/// a specialisation of its loops.
struct SgdOp {
  template <typename T>
  using Segment = SgdScalars<T>;

  /// The scalars of a segment of group `group` (they do not depend on its step), from the
  /// group's hyperparameters in float64, cast to the compute type T.
  template <typename T>
  LOFT_HOST_DEVICE static Segment<T> segment(const GroupHyper& h, int64_t group, int64_t /*step*/) {
    return sgd_segment_scalars(h.value(kSgdHyperLr, group), h.value(kSgdHyperMomentum, group),
                               h.value(kSgdHyperDampening, group),
                               h.value(kSgdHyperWeightDecay, group), h.flags[group])
        .template cast<T>();
  }

  /// f(kMomentum, kFirst, kNesterov) (with_sgd_mode).
  template <typename F>
  LOFT_HOST_DEVICE LOFT_INLINE static void with_mode(int64_t flags, int64_t step, const F& f) {
    with_sgd_mode(flags, step, f);
  }
};

}  // namespace loft
