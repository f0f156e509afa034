// CPU kernels of loft::sgd_step and loft::sgd_step_backward (contract and math:
// docs/ops.md, "SGD"; per-element math: csrc/sgd_math.h; memory walk: csrc/cpu/common.h;
// registration: csrc/cpu/ops_cpu.cpp). One pass over memory: chunks of at most kChunk
// elements in parallel, each running a loop specialised (templates) for its segment's
// momentum / first-step / nesterov flags.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../sgd_math.h"
#include "common.h"
#include "kernels.h"

namespace loft {
namespace cpu {
namespace {

/// Makes `se` (a copy of the segment's scalars) element i's scalars when its lr and / or
/// weight_decay are per element (kLr, kWd); nothing otherwise.
template <bool kLr, bool kWd, typename T>
LOFT_INLINE void set_element_scalars(SgdScalars<T>& se, const T* __restrict__ lr_e,
                                     const T* __restrict__ wd_e, int64_t i) {
  if constexpr (kLr || kWd) {
    sgd_set_element_scalars(se, kLr, kLr ? lr_e[i] : T(0), kWd, kWd ? wd_e[i] : T(0));
  }
}

/// Forward over one chunk of an active segment. The buffer is read only when the update
/// uses it (momentum, not the first step), written with momentum and copied through
/// without (when there is one). lr_e / wd_e (kLr / kWd) are the chunk's per-element lr
/// and weight_decay.
template <bool kMomentum, bool kFirst, bool kNesterov, bool kLr, bool kWd, typename S, typename T>
void sgd_forward_chunk(int64_t n, const S* __restrict__ p, const S* __restrict__ g,
                       const S* __restrict__ b, const T* __restrict__ lr_e,
                       const T* __restrict__ wd_e, S* __restrict__ p_out, S* __restrict__ b_out,
                       const SgdScalars<T> s) {
  constexpr bool kReadsBuffer = kMomentum && !kFirst;
  if (!kMomentum && b_out != nullptr) copy_elements(b_out, b, n);
  SgdScalars<T> se = s;  // the element's scalars: with kLr / kWd, updated per element
  for (int64_t i = 0; i < n; ++i) {
    set_element_scalars<kLr, kWd>(se, lr_e, wd_e, i);
    T p_new, b_new;
    sgd_forward<kMomentum, kFirst, kNesterov>(T(p[i]), T(g[i]), kReadsBuffer ? T(b[i]) : T(0), se,
                                              p_new, b_new);
    p_out[i] = S(p_new);
    if (kMomentum) b_out[i] = S(b_new);
  }
}

/// Backward over one chunk of an active segment; with kHyper, writes the chunk's sums of
/// the kSgdNumHyper hyperparameter terms to partial[0..3] (unless it is null). Without
/// momentum, B passes through to grad_b (when there is a buffer). With a per-element lr
/// (kLr) or weight_decay (kWd), their terms are written per element to grad_lr_e /
/// grad_wd_e when those are not null (the gradient is wanted; kHyper is then set).
template <bool kMomentum, bool kFirst, bool kNesterov, bool kHyper, bool kLr, bool kWd, typename S,
          typename T>
void sgd_backward_chunk(int64_t n, const S* __restrict__ P, const S* __restrict__ B,
                        const S* __restrict__ p, const S* __restrict__ g, const S* __restrict__ b,
                        const T* __restrict__ lr_e, const T* __restrict__ wd_e,
                        S* __restrict__ grad_p, S* __restrict__ grad_g, S* __restrict__ grad_b,
                        T* __restrict__ grad_lr_e, T* __restrict__ grad_wd_e, const SgdScalars<T> s,
                        double* __restrict__ partial) {
  static_assert(kHyper || !(kLr || kWd), "per-element gradients are hyperparameter terms");
  constexpr bool kReadsBuffer = kMomentum && !kFirst;
  if (!kMomentum && grad_b != nullptr) copy_elements(grad_b, B, n);
  ChunkHyperTerms<SgdBackwardBuffers, kLr, kWd, T> hyper;
  SgdScalars<T> se = s;  // the element's scalars: with kLr / kWd, updated per element
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t count = std::min(kBlock, n - start);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = start + j;
      set_element_scalars<kLr, kWd>(se, lr_e, wd_e, i);
      const SgdElementGrads<T> r = sgd_backward<kMomentum, kFirst, kNesterov>(
          T(P[i]), kMomentum ? T(B[i]) : T(0), T(p[i]), T(g[i]), kReadsBuffer ? T(b[i]) : T(0), se);
      grad_p[i] = S(r.params);
      grad_g[i] = S(r.grads);
      if (kMomentum) grad_b[i] = S(r.momentum_buffer);
      if (kHyper) hyper.set(j, r.hyper);
    }
    if (kHyper) hyper.end_block(start, count, grad_lr_e, grad_wd_e, partial);
  }
  if (kHyper) hyper.end(partial);
}

/// SGD's part of the CPU loops (csrc/cpu/common.h): with SgdOp (csrc/sgd_math.h), the
/// chunk loops above on the buffers of a chunk.
struct SgdLoops : SgdOp {
  template <typename S, bool kLr, bool kWd, bool kMomentum, bool kFirst, bool kNesterov>
  static void forward(const StepArgs& a, const SgdStepBuffers& b, int64_t o, int64_t n,
                      const SgdScalars<compute_t<S>>& s) {
    using T = compute_t<S>;
    sgd_forward_chunk<kMomentum, kFirst, kNesterov, kLr, kWd>(
        n, typed<S>(b.params, o), typed<S>(b.grads, o), typed<S>(b.momentum_buffer, o),
        typed<T>(a.lr_elementwise, o), typed<T>(a.weight_decay_elementwise, o),
        typed<S>(b.params_out, o), typed<S>(b.momentum_buffer_out, o), s);
  }

  template <typename S, bool kHyper, bool kLr, bool kWd, bool kMomentum, bool kFirst,
            bool kNesterov>
  static void backward(const StepArgs& a, const HyperGradArgs& h, const SgdBackwardBuffers& b,
                       int64_t o, int64_t n, const SgdScalars<compute_t<S>>& s, double* partial) {
    using T = compute_t<S>;
    sgd_backward_chunk<kMomentum, kFirst, kNesterov, kHyper, kLr, kWd>(
        n, upstream<S>(b.grad_params_out, o), upstream<S>(b.grad_momentum_buffer_out, o),
        typed<S>(b.params, o), typed<S>(b.grads, o), typed<S>(b.momentum_buffer, o),
        typed<T>(a.lr_elementwise, o), typed<T>(a.weight_decay_elementwise, o),
        typed<S>(b.grad_params, o), typed<S>(b.grad_grads, o), typed<S>(b.grad_momentum_buffer, o),
        typed<T>(h.lr_elementwise, o), typed<T>(h.weight_decay_elementwise, o), s, partial);
  }
};

}  // namespace

void run(const StepArgs& args, const SgdStepBuffers& buffers) {
  run_forward<SgdLoops>(args, buffers);
}

void run(const StepArgs& args, const HyperGradArgs& hyper, const SgdBackwardBuffers& buffers) {
  run_backward<SgdLoops>(args, hyper, buffers);
}

}  // namespace cpu
}  // namespace loft
