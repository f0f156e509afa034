// CUDA kernels of loft::adam_step and loft::adam_step_backward (contract and math:
// docs/ops.md, "Adam / AdamW"; per-element math: csrc/adam_math.h; memory walk:
// tiles.cuh). Torch-free: the registration with checks is csrc/cuda/ops_cuda.cpp.
#include <cstdint>

#include "../adam_math.h"
#include "launchers.h"
#include "tiles.cuh"

namespace loft {
namespace cuda {
namespace {

/// The float64 scalars of one segment (four pow calls): not inlined, so that the large
/// libdevice pow is compiled once rather than into every kernel (thread 0 calls it once
/// per run of tiles of a segment, its cost is the call).
__device__ __noinline__ AdamScalars<double> adam_scalars_f64(double lr, double beta1, double beta2,
                                                             double eps, double weight_decay,
                                                             int64_t flags, int64_t step,
                                                             AdamBasis* basis) {
  return adam_segment_scalars(lr, beta1, beta2, eps, weight_decay, flags, step, basis);
}

/// One segment's scalars in the compute type T and the float64 basis of per-element lr /
/// weight_decay (what a block keeps in shared memory per segment).
template <typename T>
struct AdamSegment {
  AdamScalars<T> scalars;
  AdamBasis basis;
};

template <typename S>
struct AdamHyperOf {
  const void* lr;
  const void* beta1;
  const void* beta2;
  const void* eps;
  const void* weight_decay;
  const int64_t* flags;
  bool is_double;
  const compute_t<S>* lr_e;  // lr_elementwise (nullptr: absent)
  const compute_t<S>* wd_e;  // weight_decay_elementwise

  AdamHyperOf(const AdamHyper& h)
      : lr(h.lr),
        beta1(h.beta1),
        beta2(h.beta2),
        eps(h.eps),
        weight_decay(h.weight_decay),
        flags(h.group_flags),
        is_double(h.hyper_double),
        lr_e(static_cast<const compute_t<S>*>(h.lr_elementwise)),
        wd_e(static_cast<const compute_t<S>*>(h.weight_decay_elementwise)) {}

  /// The scalars of a segment of group g with `step` earlier updates (bias corrections
  /// in double, as the CPU op), cast to compute_t<S>, and its float64 basis.
  __device__ AdamSegment<compute_t<S>> segment(int64_t g, int64_t step) const {
    AdamSegment<compute_t<S>> out;
    out.scalars =
        adam_scalars_f64(hyper_value(lr, is_double, g), hyper_value(beta1, is_double, g),
                         hyper_value(beta2, is_double, g), hyper_value(eps, is_double, g),
                         hyper_value(weight_decay, is_double, g), flags[g], step, &out.basis)
            .template cast<compute_t<S>>();
    return out;
  }
};

template <typename S>
struct ForwardArgs {
  DeviceSegments seg;
  AdamHyperOf<S> hyper;
  const S* p;
  const S* g;
  const S* m;
  const S* v;
  const S* vmax;  // nullptr: no max_exp_avg_sq
  S* p_out;
  S* m_out;
  S* v_out;
  S* vmax_out;
  bool aligned;
};

template <typename S>
struct BackwardArgs {
  DeviceSegments seg;
  AdamHyperOf<S> hyper;
  const S* P;  // nullptr: a zero upstream gradient
  const S* M;
  const S* V;
  const S* X;
  const S* p;
  const S* g;
  const S* m;
  const S* v;
  const S* vmax;
  S* grad_p;
  S* grad_g;
  S* grad_m;
  S* grad_v;
  S* grad_vmax;
  compute_t<S>* grad_lr_e;  // nullptr: absent or not wanted
  compute_t<S>* grad_wd_e;
  int64_t mask;
  int64_t groups;
  double* partials;
  bool aligned;
};

/// Forward over [lo, hi) of an active segment; without amsgrad, vmax (if any) is copied
/// through. kElementwise: the kernel variant for calls with lr_elementwise and/or
/// weight_decay_elementwise, whose values replace the segment's, with the scalars that
/// contain them (adam_set_element_scalars; which one is given is a grid-uniform branch).
template <bool kAmsgrad, bool kDecoupled, bool kElementwise, typename S>
__device__ __forceinline__ void forward_range(const ForwardArgs<S>& a, int64_t lo, int64_t hi,
                                              bool vector, const AdamSegment<compute_t<S>>& seg) {
  using T = compute_t<S>;
  const AdamScalars<T>& s = seg.scalars;
  walk<S>(lo, hi, [&](int64_t i, int valid) {
    const Pack<S> p = load_pack(a.p, i, valid, vector);
    const Pack<S> g = load_pack(a.g, i, valid, vector);
    const Pack<S> m = load_pack(a.m, i, valid, vector);
    const Pack<S> v = load_pack(a.v, i, valid, vector);
    const Pack<S> vmax = load_pack(a.vmax, i, valid, vector);
    const ComputePack<S> lr_e = load_compute<S>(kElementwise ? a.hyper.lr_e : nullptr, i, valid);
    const ComputePack<S> wd_e = load_compute<S>(kElementwise ? a.hyper.wd_e : nullptr, i, valid);
    Pack<S> p_out, m_out, v_out, vmax_out;
#pragma unroll
    for (int e = 0; e < kVec<S>; ++e) {
      AdamScalars<T> se = s;
      if (kElementwise) {
        adam_set_element_scalars(se, seg.basis, a.hyper.lr_e != nullptr, lr_e.v[e],
                                 a.hyper.wd_e != nullptr, wd_e.v[e]);
      }
      T p_new, m_new, v_new, vmax_new;
      adam_forward<kAmsgrad, kDecoupled>(to_compute(p.v[e]), to_compute(g.v[e]), to_compute(m.v[e]),
                                         to_compute(v.v[e]), to_compute(vmax.v[e]), se, p_new,
                                         m_new, v_new, vmax_new);
      p_out.v[e] = from_compute<S>(p_new);
      m_out.v[e] = from_compute<S>(m_new);
      v_out.v[e] = from_compute<S>(v_new);
      vmax_out.v[e] = kAmsgrad ? from_compute<S>(vmax_new) : vmax.v[e];
    }
    store_pack(a.p_out, i, p_out, valid, vector);
    store_pack(a.m_out, i, m_out, valid, vector);
    store_pack(a.v_out, i, v_out, valid, vector);
    store_pack(a.vmax_out, i, vmax_out, valid, vector);
  });
}

template <typename S, bool kElementwise>
__global__ void __launch_bounds__(kThreads) adam_step_kernel(const ForwardArgs<S> a) {
  using T = compute_t<S>;
  __shared__ AdamSegment<T> slot;
  __shared__ int64_t slot_segment;
  if (threadIdx.x == 0) slot_segment = -1;
  __syncthreads();
  for_each_overlap(
      a.seg, a.aligned, [&](int64_t s, const int64_t* row, int64_t lo, int64_t hi, bool vector) {
        if (row[kSegmentActive] == 0) {  // copied through
          copy_range(a.p_out, a.p, lo, hi, vector);
          copy_range(a.m_out, a.m, lo, hi, vector);
          copy_range(a.v_out, a.v, lo, hi, vector);
          copy_range(a.vmax_out, a.vmax, lo, hi, vector);
          return;
        }
        const int64_t group = row[kSegmentGroup];
        const int64_t step = row[kSegmentStep];
        const AdamSegment<T> scalars =
            block_scalars(slot, slot_segment, s, [&] { return a.hyper.segment(group, step); });
        const int64_t f = a.hyper.flags[group];
        with_adam_mode(f, [&](auto kAmsgrad, auto kDecoupled) {
          forward_range<decltype(kAmsgrad)::value, decltype(kDecoupled)::value, kElementwise>(
              a, lo, hi, vector, scalars);
        });
      });
}

/// Backward over [lo, hi) of an active segment; adds this thread's hyperparameter terms
/// (lr, beta1, beta2, eps, weight_decay) to acc (computed even when none is wanted: a
/// few multiplies in a memory-bound loop, half the specialisations to compile). Without
/// amsgrad, X passes through as the gradient of vmax (vmax itself is not read). With
/// kElementwise the lr / weight_decay terms are also the per-element gradients, stored
/// where wanted.
template <bool kAmsgrad, bool kDecoupled, bool kElementwise, typename S>
__device__ __forceinline__ void backward_range(const BackwardArgs<S>& a, int64_t lo, int64_t hi,
                                               bool vector, const AdamSegment<compute_t<S>>& seg,
                                               compute_t<S> (&acc)[kAdamNumHyper]) {
  using T = compute_t<S>;
  const AdamScalars<T>& s = seg.scalars;
  const S* vmax_in = kAmsgrad ? a.vmax : nullptr;
  walk<S>(lo, hi, [&](int64_t i, int valid) {
    const Pack<S> P = load_pack(a.P, i, valid, vector);
    const Pack<S> M = load_pack(a.M, i, valid, vector);
    const Pack<S> V = load_pack(a.V, i, valid, vector);
    const Pack<S> X = load_pack(a.X, i, valid, vector);
    const Pack<S> p = load_pack(a.p, i, valid, vector);
    const Pack<S> g = load_pack(a.g, i, valid, vector);
    const Pack<S> m = load_pack(a.m, i, valid, vector);
    const Pack<S> v = load_pack(a.v, i, valid, vector);
    const Pack<S> vmax = load_pack(vmax_in, i, valid, vector);
    const ComputePack<S> lr_e = load_compute<S>(kElementwise ? a.hyper.lr_e : nullptr, i, valid);
    const ComputePack<S> wd_e = load_compute<S>(kElementwise ? a.hyper.wd_e : nullptr, i, valid);
    Pack<S> gp, gg, gm, gv, gx;
    ComputePack<S> glr, gwd;
#pragma unroll
    for (int e = 0; e < kVec<S>; ++e) {
      AdamScalars<T> se = s;
      if (kElementwise) {
        adam_set_element_scalars(se, seg.basis, a.hyper.lr_e != nullptr, lr_e.v[e],
                                 a.hyper.wd_e != nullptr, wd_e.v[e]);
      }
      const AdamElementGrads<T> r = adam_backward<kAmsgrad, kDecoupled>(
          to_compute(P.v[e]), to_compute(M.v[e]), to_compute(V.v[e]), to_compute(X.v[e]),
          to_compute(p.v[e]), to_compute(g.v[e]), to_compute(m.v[e]), to_compute(v.v[e]),
          to_compute(vmax.v[e]), se);
      gp.v[e] = from_compute<S>(r.params);
      gg.v[e] = from_compute<S>(r.grads);
      gm.v[e] = from_compute<S>(r.exp_avg);
      gv.v[e] = from_compute<S>(r.exp_avg_sq);
      gx.v[e] = kAmsgrad ? from_compute<S>(r.max_exp_avg_sq) : X.v[e];
      glr.v[e] = r.lr;
      gwd.v[e] = r.weight_decay;
      if (e < valid) {
        acc[0] += r.lr;
        acc[1] += r.beta1;
        acc[2] += r.beta2;
        acc[3] += r.eps;
        acc[4] += r.weight_decay;
      }
    }
    store_pack(a.grad_p, i, gp, valid, vector);
    store_pack(a.grad_g, i, gg, valid, vector);
    store_pack(a.grad_m, i, gm, valid, vector);
    store_pack(a.grad_v, i, gv, valid, vector);
    store_pack(a.grad_vmax, i, gx, valid, vector);
    if (kElementwise) {
      store_compute<S>(a.grad_lr_e, i, glr, valid);
      store_compute<S>(a.grad_wd_e, i, gwd, valid);
    }
  });
}

template <typename S, bool kElementwise>
__global__ void __launch_bounds__(kThreads) adam_step_backward_kernel(const BackwardArgs<S> a) {
  using T = compute_t<S>;
  __shared__ AdamSegment<T> slot;
  __shared__ int64_t slot_segment;
  __shared__ double red[kWarps][kMaxHyper];
  if (threadIdx.x == 0) slot_segment = -1;
  if (a.mask != 0) zero_block_slice(a.partials, a.groups, kAdamNumHyper);
  __syncthreads();
  for_each_overlap(
      a.seg, a.aligned, [&](int64_t s, const int64_t* row, int64_t lo, int64_t hi, bool vector) {
        if (row[kSegmentActive] == 0) {  // upstream gradients pass through, grads get zero
          copy_range(a.grad_p, a.P, lo, hi, vector);
          copy_range(a.grad_g, static_cast<const S*>(nullptr), lo, hi, vector);
          copy_range(a.grad_m, a.M, lo, hi, vector);
          copy_range(a.grad_v, a.V, lo, hi, vector);
          copy_range(a.grad_vmax, a.X, lo, hi, vector);
          if (kElementwise) {
            zero_compute_range<S>(a.grad_lr_e, lo, hi);
            zero_compute_range<S>(a.grad_wd_e, lo, hi);
          }
          return;
        }
        const int64_t group = row[kSegmentGroup];
        const int64_t step = row[kSegmentStep];
        const AdamSegment<T> scalars =
            block_scalars(slot, slot_segment, s, [&] { return a.hyper.segment(group, step); });
        const int64_t f = a.hyper.flags[group];
        T acc[kAdamNumHyper] = {};
        with_adam_mode(f, [&](auto kAmsgrad, auto kDecoupled) {
          backward_range<decltype(kAmsgrad)::value, decltype(kDecoupled)::value, kElementwise>(
              a, lo, hi, vector, scalars, acc);
        });
        if (a.mask != 0) {
          double sums[kAdamNumHyper];
#pragma unroll
          for (int k = 0; k < kAdamNumHyper; ++k) sums[k] = static_cast<double>(acc[k]);
          double* slice =
              a.partials + (static_cast<int64_t>(blockIdx.x) * a.groups + group) * kAdamNumHyper;
          block_add(sums, a.mask, slice, red);
        }
      });
}

}  // namespace

void launch_adam_step(DType dtype, const DeviceSegments& segments, const AdamHyper& hyper,
                      const AdamStepBuffers& buffers, cudaStream_t stream) {
  const int64_t blocks = grid_blocks(segments.numel);
  if (blocks == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const ForwardArgs<S> args{segments,
                              AdamHyperOf<S>(hyper),
                              static_cast<const S*>(buffers.params),
                              static_cast<const S*>(buffers.grads),
                              static_cast<const S*>(buffers.exp_avg),
                              static_cast<const S*>(buffers.exp_avg_sq),
                              static_cast<const S*>(buffers.max_exp_avg_sq),
                              static_cast<S*>(buffers.params_out),
                              static_cast<S*>(buffers.exp_avg_out),
                              static_cast<S*>(buffers.exp_avg_sq_out),
                              static_cast<S*>(buffers.max_exp_avg_sq_out),
                              buffers.aligned};
    with_bool(hyper.lr_elementwise != nullptr || hyper.weight_decay_elementwise != nullptr,
              [&](auto kElementwise) {
                adam_step_kernel<S, decltype(kElementwise)::value>
                    <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
              });
  });
}

void launch_adam_step_backward(DType dtype, const DeviceSegments& segments, const AdamHyper& hyper,
                               const AdamBackwardBuffers& buffers,
                               const ElementwiseGrads& elementwise_grads, int64_t mask,
                               int64_t groups, double* partials, cudaStream_t stream) {
  const int64_t blocks = grid_blocks(segments.numel);
  if (blocks == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    using T = compute_t<S>;
    const BackwardArgs<S> args{segments,
                               AdamHyperOf<S>(hyper),
                               static_cast<const S*>(buffers.grad_params_out),
                               static_cast<const S*>(buffers.grad_exp_avg_out),
                               static_cast<const S*>(buffers.grad_exp_avg_sq_out),
                               static_cast<const S*>(buffers.grad_max_exp_avg_sq_out),
                               static_cast<const S*>(buffers.params),
                               static_cast<const S*>(buffers.grads),
                               static_cast<const S*>(buffers.exp_avg),
                               static_cast<const S*>(buffers.exp_avg_sq),
                               static_cast<const S*>(buffers.max_exp_avg_sq),
                               static_cast<S*>(buffers.grad_params),
                               static_cast<S*>(buffers.grad_grads),
                               static_cast<S*>(buffers.grad_exp_avg),
                               static_cast<S*>(buffers.grad_exp_avg_sq),
                               static_cast<S*>(buffers.grad_max_exp_avg_sq),
                               static_cast<T*>(elementwise_grads.lr),
                               static_cast<T*>(elementwise_grads.weight_decay),
                               mask,
                               groups,
                               partials,
                               buffers.aligned};
    with_bool(hyper.lr_elementwise != nullptr || hyper.weight_decay_elementwise != nullptr,
              [&](auto kElementwise) {
                adam_step_backward_kernel<S, decltype(kElementwise)::value>
                    <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
              });
  });
}

}  // namespace cuda
}  // namespace loft
