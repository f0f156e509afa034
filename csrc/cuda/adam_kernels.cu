// CUDA kernels of loft::adam_step and loft::adam_step_backward (contract and math:
// docs/ops.md, "Adam / AdamW"; per-element math: csrc/adam_math.h; memory walk and the
// kernels themselves: tiles.cuh). Torch-free: the registration with checks is
// csrc/cuda/ops_cuda.cpp.
#include <cstdint>

#include "../adam_math.h"
#include "launchers.h"
#include "tiles.cuh"

namespace loft {
namespace cuda {
namespace {

/// Adam's part of the main kernels (tiles.cuh): with AdamOp (csrc/adam_math.h), what a
/// thread does over a range of an active segment, for the group's amsgrad /
/// decoupled-weight-decay flags. kElementwise: the kernel variant for calls with
/// lr_elementwise and/or weight_decay_elementwise, whose values replace the segment's,
/// with the scalars that contain them (adam_set_element_scalars; which one is given is a
/// grid-uniform branch).
struct AdamKernels : AdamOp {
  /// Element e's scalars: its segment's, with its own lr / weight_decay (kElementwise).
  template <bool kElementwise, typename S>
  __device__ __forceinline__ static AdamScalars<compute_t<S>> element_scalars(
      const Segment<compute_t<S>>& seg, const ElementwisePack<S, kElementwise>& elem, int e) {
    AdamScalars<compute_t<S>> se = seg.scalars;
    if (kElementwise) {
      adam_set_element_scalars(se, seg.basis, elem.has_lr, elem.lr.v[e], elem.has_wd,
                               elem.weight_decay.v[e]);
    }
    return se;
  }

  /// Without amsgrad, vmax (if any) is copied through.
  template <typename S, bool kElementwise, bool kAmsgrad, bool kDecoupled>
  __device__ __forceinline__ static void forward(const StepArgs& a, const AdamStepBuffers& b,
                                                 int64_t lo, int64_t hi, bool vector,
                                                 const Segment<compute_t<S>>& seg) {
    using T = compute_t<S>;
    walk<S>(lo, hi, [&](int64_t i, int valid) {
      const Pack<S> p = load_pack<S>(b.params, i, valid, vector);
      const Pack<S> g = load_pack<S>(b.grads, i, valid, vector);
      const Pack<S> m = load_pack<S>(b.exp_avg, i, valid, vector);
      const Pack<S> v = load_pack<S>(b.exp_avg_sq, i, valid, vector);
      const Pack<S> vmax = load_pack<S>(b.max_exp_avg_sq, i, valid, vector);
      const ElementwisePack<S, kElementwise> elem(a, i, valid);
      Pack<S> p_out, m_out, v_out, vmax_out;
#pragma unroll
      for (int e = 0; e < kVec<S>; ++e) {
        T p_new, m_new, v_new, vmax_new;
        adam_forward<kAmsgrad, kDecoupled>(
            to_compute(p.v[e]), to_compute(g.v[e]), to_compute(m.v[e]), to_compute(v.v[e]),
            to_compute(vmax.v[e]), element_scalars(seg, elem, e), p_new, m_new, v_new, vmax_new);
        p_out.v[e] = from_compute<S>(p_new);
        m_out.v[e] = from_compute<S>(m_new);
        v_out.v[e] = from_compute<S>(v_new);
        vmax_out.v[e] = kAmsgrad ? from_compute<S>(vmax_new) : vmax.v[e];
      }
      store_pack<S>(b.params_out, i, p_out, valid, vector);
      store_pack<S>(b.exp_avg_out, i, m_out, valid, vector);
      store_pack<S>(b.exp_avg_sq_out, i, v_out, valid, vector);
      store_pack<S>(b.max_exp_avg_sq_out, i, vmax_out, valid, vector);
    });
  }

  /// The hyperparameter terms (lr, beta1, beta2, eps, weight_decay) are computed even when
  /// none is wanted (a few multiplies in a memory-bound loop, half the specialisations to
  /// compile). Without amsgrad, X passes through as the gradient of vmax (vmax itself is
  /// not read).
  template <typename S, bool kElementwise, bool kAmsgrad, bool kDecoupled>
  __device__ __forceinline__ static void backward(const StepArgs& a, const HyperGradArgs& h,
                                                  const AdamBackwardBuffers& b, int64_t lo,
                                                  int64_t hi, bool vector,
                                                  const Segment<compute_t<S>>& seg,
                                                  compute_t<S> (&acc)[kAdamNumHyper]) {
    const void* vmax_in = kAmsgrad ? b.max_exp_avg_sq : nullptr;
    walk<S>(lo, hi, [&](int64_t i, int valid) {
      const Pack<S> P = load_pack<S>(b.grad_params_out, i, valid, vector);
      const Pack<S> M = load_pack<S>(b.grad_exp_avg_out, i, valid, vector);
      const Pack<S> V = load_pack<S>(b.grad_exp_avg_sq_out, i, valid, vector);
      const Pack<S> X = load_pack<S>(b.grad_max_exp_avg_sq_out, i, valid, vector);
      const Pack<S> p = load_pack<S>(b.params, i, valid, vector);
      const Pack<S> g = load_pack<S>(b.grads, i, valid, vector);
      const Pack<S> m = load_pack<S>(b.exp_avg, i, valid, vector);
      const Pack<S> v = load_pack<S>(b.exp_avg_sq, i, valid, vector);
      const Pack<S> vmax = load_pack<S>(vmax_in, i, valid, vector);
      const ElementwisePack<S, kElementwise> elem(a, i, valid);
      Pack<S> gp, gg, gm, gv, gx;
      PackHyperTerms<S, AdamBackwardBuffers> terms;
#pragma unroll
      for (int e = 0; e < kVec<S>; ++e) {
        const AdamElementGrads<compute_t<S>> r = adam_backward<kAmsgrad, kDecoupled>(
            to_compute(P.v[e]), to_compute(M.v[e]), to_compute(V.v[e]), to_compute(X.v[e]),
            to_compute(p.v[e]), to_compute(g.v[e]), to_compute(m.v[e]), to_compute(v.v[e]),
            to_compute(vmax.v[e]), element_scalars(seg, elem, e));
        gp.v[e] = from_compute<S>(r.params);
        gg.v[e] = from_compute<S>(r.grads);
        gm.v[e] = from_compute<S>(r.exp_avg);
        gv.v[e] = from_compute<S>(r.exp_avg_sq);
        gx.v[e] = kAmsgrad ? from_compute<S>(r.max_exp_avg_sq) : X.v[e];
        terms.add(e, valid, r.hyper, acc);
      }
      store_pack<S>(b.grad_params, i, gp, valid, vector);
      store_pack<S>(b.grad_grads, i, gg, valid, vector);
      store_pack<S>(b.grad_exp_avg, i, gm, valid, vector);
      store_pack<S>(b.grad_exp_avg_sq, i, gv, valid, vector);
      store_pack<S>(b.grad_max_exp_avg_sq, i, gx, valid, vector);
      if (kElementwise) terms.store(h, i, valid);
    });
  }
};

}  // namespace

void launch(const StepArgs& args, const AdamStepBuffers& buffers, cudaStream_t stream) {
  launch_step<AdamKernels>(args, buffers, stream);
}

void launch(const StepArgs& args, const HyperGradArgs& hyper, const AdamBackwardBuffers& buffers,
            double* partials, cudaStream_t stream) {
  launch_backward<AdamKernels>(args, hyper, buffers, partials, stream);
}

}  // namespace cuda
}  // namespace loft
