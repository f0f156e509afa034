// CUDA kernels of loft::sgd_step and loft::sgd_step_backward (contract and math:
// docs/ops.md, "SGD"; per-element math: csrc/sgd_math.h; memory walk and the kernels
// themselves: tiles.cuh). Torch-free: the registration with checks is
// csrc/cuda/ops_cuda.cpp.
#include <cstdint>

#include "../sgd_math.h"
#include "launchers.h"
#include "tiles.cuh"

namespace loft {
namespace cuda {
namespace {

/// SGD's part of the main kernels (tiles.cuh): with SgdOp (csrc/sgd_math.h), what a thread
/// does over a range of an active segment, for the group's momentum / first-step /
/// nesterov flags. kElementwise: the kernel variant for calls with lr_elementwise and/or
/// weight_decay_elementwise, whose values replace the segment's (which one is given is a
/// run-time, grid-uniform branch).
struct SgdKernels : SgdOp {
  /// Element e's scalars: its segment's, with its own lr / weight_decay (kElementwise).
  template <bool kElementwise, typename S>
  __device__ __forceinline__ static Segment<compute_t<S>> element_scalars(
      const Segment<compute_t<S>>& s, const ElementwisePack<S, kElementwise>& elem, int e) {
    Segment<compute_t<S>> se = s;
    if (kElementwise) {
      sgd_set_element_scalars(se, elem.has_lr, elem.lr.v[e], elem.has_wd, elem.weight_decay.v[e]);
    }
    return se;
  }

  /// The buffer is read when the update uses it (momentum, not the first step) or copies
  /// it through (no momentum).
  template <typename S, bool kElementwise, bool kMomentum, bool kFirst, bool kNesterov>
  __device__ __forceinline__ static void forward(const StepArgs& a, const SgdStepBuffers& b,
                                                 int64_t lo, int64_t hi, bool vector,
                                                 const Segment<compute_t<S>>& s) {
    using T = compute_t<S>;
    const void* buffer = (kMomentum && kFirst) ? nullptr : b.momentum_buffer;
    walk<S>(lo, hi, [&](int64_t i, int valid) {
      const Pack<S> p = load_pack<S>(b.params, i, valid, vector);
      const Pack<S> g = load_pack<S>(b.grads, i, valid, vector);
      const Pack<S> bv = load_pack<S>(buffer, i, valid, vector);
      const ElementwisePack<S, kElementwise> elem(a, i, valid);
      Pack<S> p_out, b_out;
#pragma unroll
      for (int e = 0; e < kVec<S>; ++e) {
        T p_new, b_new;
        sgd_forward<kMomentum, kFirst, kNesterov>(to_compute(p.v[e]), to_compute(g.v[e]),
                                                  to_compute(bv.v[e]), element_scalars(s, elem, e),
                                                  p_new, b_new);
        p_out.v[e] = from_compute<S>(p_new);
        b_out.v[e] = from_compute<S>(b_new);  // b itself without momentum
      }
      store_pack<S>(b.params_out, i, p_out, valid, vector);
      store_pack<S>(b.momentum_buffer_out, i, b_out, valid, vector);
    });
  }

  /// The hyperparameter terms (lr, momentum, dampening, weight_decay) are computed even
  /// when no hyperparameter gradient is wanted (a few multiplies in a memory-bound loop),
  /// which halves the specialisations to compile.
  template <typename S, bool kElementwise, bool kMomentum, bool kFirst, bool kNesterov>
  __device__ __forceinline__ static void backward(const StepArgs& a, const HyperGradArgs& h,
                                                  const SgdBackwardBuffers& b, int64_t lo,
                                                  int64_t hi, bool vector,
                                                  const Segment<compute_t<S>>& s,
                                                  compute_t<S> (&acc)[kSgdNumHyper]) {
    // read only when the math uses it
    const void* buffer = (kMomentum && !kFirst) ? b.momentum_buffer : nullptr;
    walk<S>(lo, hi, [&](int64_t i, int valid) {
      const Pack<S> P = load_pack<S>(b.grad_params_out, i, valid, vector);
      const Pack<S> B = load_pack<S>(b.grad_momentum_buffer_out, i, valid, vector);
      const Pack<S> p = load_pack<S>(b.params, i, valid, vector);
      const Pack<S> g = load_pack<S>(b.grads, i, valid, vector);
      const Pack<S> bv = load_pack<S>(buffer, i, valid, vector);
      const ElementwisePack<S, kElementwise> elem(a, i, valid);
      Pack<S> gp, gg, gb;
      PackHyperTerms<S, SgdBackwardBuffers> terms;
#pragma unroll
      for (int e = 0; e < kVec<S>; ++e) {
        const SgdElementGrads<compute_t<S>> r = sgd_backward<kMomentum, kFirst, kNesterov>(
            to_compute(P.v[e]), to_compute(B.v[e]), to_compute(p.v[e]), to_compute(g.v[e]),
            to_compute(bv.v[e]), element_scalars(s, elem, e));
        gp.v[e] = from_compute<S>(r.params);
        gg.v[e] = from_compute<S>(r.grads);
        gb.v[e] = from_compute<S>(r.momentum_buffer);  // B itself without momentum
        terms.add(e, valid, r.hyper, acc);
      }
      store_pack<S>(b.grad_params, i, gp, valid, vector);
      store_pack<S>(b.grad_grads, i, gg, valid, vector);
      store_pack<S>(b.grad_momentum_buffer, i, gb, valid, vector);
      if (kElementwise) terms.store(h, i, valid);
    });
  }
};

}  // namespace

void launch(const StepArgs& args, const SgdStepBuffers& buffers, cudaStream_t stream) {
  launch_step<SgdKernels>(args, buffers, stream);
}

void launch(const StepArgs& args, const HyperGradArgs& hyper, const SgdBackwardBuffers& buffers,
            double* partials, cudaStream_t stream) {
  launch_backward<SgdKernels>(args, hyper, buffers, partials, stream);
}

}  // namespace cuda
}  // namespace loft
