// CPU kernels of loft::adam_step, loft::adam_step_ and loft::adam_step_backward (contract
// and math: docs/ops.md, "Adam / AdamW"; per-element math: csrc/adam_math.h; memory walk:
// csrc/cpu/common.h; registration: csrc/cpu/ops_cpu.cpp). One pass over memory: chunks of
// at most kChunk elements in parallel, each running a loop specialised (templates) for its
// segment's amsgrad and decoupled-weight-decay flags.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../adam_math.h"
#include "common.h"
#include "kernels.h"

namespace loft {
namespace cpu {
namespace {

/// Makes `se` (a copy of the segment's scalars) element i's scalars when its lr and / or
/// weight_decay are per element (kLr, kWd); nothing otherwise.
template <bool kLr, bool kWd, typename T>
LOFT_INLINE void set_element_scalars(AdamScalars<T>& se, const AdamBasis& basis,
                                     const T* __restrict__ lr_e, const T* __restrict__ wd_e,
                                     int64_t i) {
  if constexpr (kLr || kWd) {
    adam_set_element_scalars(se, basis, kLr, kLr ? lr_e[i] : T(0), kWd, kWd ? wd_e[i] : T(0));
  }
}

/// Element i of a forward: reads p, g, m, v (vmax with amsgrad) and writes p_out and the
/// new state to m_out, v_out (vmax_out with amsgrad), which are m, v, vmax themselves in
/// place. `se` is a copy of the segment's scalars (updated here with kLr / kWd).
template <bool kAmsgrad, bool kDecoupled, bool kLr, bool kWd, typename S, typename T>
LOFT_INLINE void adam_forward_element(int64_t i, const S* p, const S* g, const S* m, const S* v,
                                      const S* vmax, const T* lr_e, const T* wd_e,
                                      AdamScalars<T>& se, const AdamBasis& basis, S* p_out,
                                      S* m_out, S* v_out, S* vmax_out) {
  set_element_scalars<kLr, kWd>(se, basis, lr_e, wd_e, i);
  T p_new, m_new, v_new, vmax_new;
  adam_forward<kAmsgrad, kDecoupled>(T(p[i]), T(g[i]), T(m[i]), T(v[i]),
                                     kAmsgrad ? T(vmax[i]) : T(0), se, p_new, m_new, v_new,
                                     vmax_new);
  p_out[i] = S(p_new);
  m_out[i] = S(m_new);
  v_out[i] = S(v_new);
  if (kAmsgrad) vmax_out[i] = S(vmax_new);
}

/// Forward over one chunk of an active segment; vmax is read and written only with
/// amsgrad, and copied through without (when there is one). lr_e / wd_e (kLr / kWd) are
/// the chunk's per-element lr and weight_decay.
template <bool kAmsgrad, bool kDecoupled, bool kLr, bool kWd, typename S, typename T>
void adam_forward_chunk(int64_t n, const S* __restrict__ p, const S* __restrict__ g,
                        const S* __restrict__ m, const S* __restrict__ v,
                        const S* __restrict__ vmax, const T* __restrict__ lr_e,
                        const T* __restrict__ wd_e, S* __restrict__ p_out, S* __restrict__ m_out,
                        S* __restrict__ v_out, S* __restrict__ vmax_out, const AdamScalars<T> s,
                        const AdamBasis basis) {
  if (!kAmsgrad && vmax_out != nullptr) copy_elements(vmax_out, vmax, n);
  AdamScalars<T> se = s;
  for (int64_t i = 0; i < n; ++i) {
    adam_forward_element<kAmsgrad, kDecoupled, kLr, kWd>(i, p, g, m, v, vmax, lr_e, wd_e, se, basis,
                                                         p_out, m_out, v_out, vmax_out);
  }
}

/// adam_forward_chunk with the state read and written in place (adam_step_).
template <bool kAmsgrad, bool kDecoupled, bool kLr, bool kWd, typename S, typename T>
void adam_forward_chunk_inplace(int64_t n, const S* __restrict__ p, const S* __restrict__ g,
                                S* __restrict__ m, S* __restrict__ v, S* __restrict__ vmax,
                                const T* __restrict__ lr_e, const T* __restrict__ wd_e,
                                S* __restrict__ p_out, const AdamScalars<T> s,
                                const AdamBasis basis) {
  AdamScalars<T> se = s;
  for (int64_t i = 0; i < n; ++i) {
    adam_forward_element<kAmsgrad, kDecoupled, kLr, kWd>(i, p, g, m, v, vmax, lr_e, wd_e, se, basis,
                                                         p_out, m, v, vmax);
  }
}

/// Backward over one chunk of an active segment; with kHyper, writes the chunk's sums of the
/// kAdamNumHyper hyperparameter terms to partial[0..4] (unless it is null). vmax is read only
/// with amsgrad; without, X passes through to grad_vmax (when there is one). With a per-element lr
/// (kLr) or weight_decay (kWd), their terms are written per element to grad_lr_e / grad_wd_e when
/// those are not null (the gradient is wanted; kHyper is then set).
template <bool kAmsgrad, bool kDecoupled, bool kHyper, bool kLr, bool kWd, typename S, typename T>
void adam_backward_chunk(int64_t n, const S* __restrict__ P, const S* __restrict__ M,
                         const S* __restrict__ V, const S* __restrict__ X, const S* __restrict__ p,
                         const S* __restrict__ g, const S* __restrict__ m, const S* __restrict__ v,
                         const S* __restrict__ vmax, const T* __restrict__ lr_e,
                         const T* __restrict__ wd_e, S* __restrict__ grad_p, S* __restrict__ grad_g,
                         S* __restrict__ grad_m, S* __restrict__ grad_v, S* __restrict__ grad_vmax,
                         T* __restrict__ grad_lr_e, T* __restrict__ grad_wd_e,
                         const AdamScalars<T> s, const AdamBasis basis,
                         double* __restrict__ partial) {
  static_assert(kHyper || !(kLr || kWd), "per-element gradients are hyperparameter terms");
  if (!kAmsgrad && grad_vmax != nullptr) copy_elements(grad_vmax, X, n);
  ChunkHyperTerms<AdamBackwardBuffers, kLr, kWd, T> hyper;
  AdamScalars<T> se = s;  // the element's scalars: with kLr / kWd, updated per element
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t count = std::min(kBlock, n - start);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = start + j;
      set_element_scalars<kLr, kWd>(se, basis, lr_e, wd_e, i);
      const AdamElementGrads<T> r = adam_backward<kAmsgrad, kDecoupled>(
          T(P[i]), T(M[i]), T(V[i]), kAmsgrad ? T(X[i]) : T(0), T(p[i]), T(g[i]), T(m[i]), T(v[i]),
          kAmsgrad ? T(vmax[i]) : T(0), se);
      grad_p[i] = S(r.params);
      grad_g[i] = S(r.grads);
      grad_m[i] = S(r.exp_avg);
      grad_v[i] = S(r.exp_avg_sq);
      if (kAmsgrad) grad_vmax[i] = S(r.max_exp_avg_sq);
      if (kHyper) hyper.set(j, r.hyper);
    }
    if (kHyper) hyper.end_block(start, count, grad_lr_e, grad_wd_e, partial);
  }
  if (kHyper) hyper.end(partial);
}

/// Adam's part of the CPU loops (csrc/cpu/common.h): with AdamOp (csrc/adam_math.h), the
/// chunk loops above on the buffers of a chunk.
struct AdamLoops : AdamOp {
  template <typename S, bool kLr, bool kWd, bool kAmsgrad, bool kDecoupled>
  static void forward(const StepArgs& a, const AdamStepBuffers& b, int64_t o, int64_t n,
                      const AdamSegment<compute_t<S>>& seg) {
    using T = compute_t<S>;
    adam_forward_chunk<kAmsgrad, kDecoupled, kLr, kWd>(
        n, typed<S>(b.params, o), typed<S>(b.grads, o), typed<S>(b.exp_avg, o),
        typed<S>(b.exp_avg_sq, o), typed<S>(b.max_exp_avg_sq, o), typed<T>(a.lr_elementwise, o),
        typed<T>(a.weight_decay_elementwise, o), typed<S>(b.params_out, o),
        typed<S>(b.exp_avg_out, o), typed<S>(b.exp_avg_sq_out, o),
        typed<S>(b.max_exp_avg_sq_out, o), seg.scalars, seg.basis);
  }

  /// adam_step_: the state in place.
  template <typename S, bool kLr, bool kWd, bool kAmsgrad, bool kDecoupled>
  static void forward(const StepArgs& a, const AdamInplaceBuffers& b, int64_t o, int64_t n,
                      const AdamSegment<compute_t<S>>& seg) {
    using T = compute_t<S>;
    adam_forward_chunk_inplace<kAmsgrad, kDecoupled, kLr, kWd>(
        n, typed<S>(b.params, o), typed<S>(b.grads, o), typed<S>(b.exp_avg, o),
        typed<S>(b.exp_avg_sq, o), typed<S>(b.max_exp_avg_sq, o), typed<T>(a.lr_elementwise, o),
        typed<T>(a.weight_decay_elementwise, o), typed<S>(b.params_out, o), seg.scalars, seg.basis);
  }

  template <typename S, bool kHyper, bool kLr, bool kWd, bool kAmsgrad, bool kDecoupled>
  static void backward(const StepArgs& a, const HyperGradArgs& h, const AdamBackwardBuffers& b,
                       int64_t o, int64_t n, const AdamSegment<compute_t<S>>& seg,
                       double* partial) {
    using T = compute_t<S>;
    adam_backward_chunk<kAmsgrad, kDecoupled, kHyper, kLr, kWd>(
        n, upstream<S>(b.grad_params_out, o), upstream<S>(b.grad_exp_avg_out, o),
        upstream<S>(b.grad_exp_avg_sq_out, o), upstream<S>(b.grad_max_exp_avg_sq_out, o),
        typed<S>(b.params, o), typed<S>(b.grads, o), typed<S>(b.exp_avg, o),
        typed<S>(b.exp_avg_sq, o), typed<S>(b.max_exp_avg_sq, o), typed<T>(a.lr_elementwise, o),
        typed<T>(a.weight_decay_elementwise, o), typed<S>(b.grad_params, o),
        typed<S>(b.grad_grads, o), typed<S>(b.grad_exp_avg, o), typed<S>(b.grad_exp_avg_sq, o),
        typed<S>(b.grad_max_exp_avg_sq, o), typed<T>(h.lr_elementwise, o),
        typed<T>(h.weight_decay_elementwise, o), seg.scalars, seg.basis, partial);
  }
};

}  // namespace

void run(const StepArgs& args, const AdamStepBuffers& buffers) {
  run_forward<AdamLoops>(args, buffers);
}

void run(const StepArgs& args, const AdamInplaceBuffers& buffers) {
  run_forward<AdamLoops>(args, buffers);
}

void run(const StepArgs& args, const HyperGradArgs& hyper, const AdamBackwardBuffers& buffers) {
  run_backward<AdamLoops>(args, hyper, buffers);
}

}  // namespace cpu
}  // namespace loft
