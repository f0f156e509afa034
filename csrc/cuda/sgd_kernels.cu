// CUDA kernels of loft::sgd_step and loft::sgd_step_backward (contract and math:
// docs/ops.md, "SGD"; per-element math: csrc/sgd_math.h; memory walk: tiles.cuh).
// Torch-free: the registration with checks is csrc/cuda/ops_cuda.cpp.
#include <cstdint>

#include "../sgd_math.h"
#include "launchers.h"
#include "tiles.cuh"

namespace loft {
namespace cuda {
namespace {

template <typename S>
struct SgdHyperOf {
  const void* lr;
  const void* momentum;
  const void* dampening;
  const void* weight_decay;
  const int64_t* flags;
  bool is_double;
  const compute_t<S>* lr_e;  // lr_elementwise (nullptr: absent)
  const compute_t<S>* wd_e;  // weight_decay_elementwise

  SgdHyperOf(const SgdHyper& h)
      : lr(h.lr),
        momentum(h.momentum),
        dampening(h.dampening),
        weight_decay(h.weight_decay),
        flags(h.group_flags),
        is_double(h.hyper_double),
        lr_e(static_cast<const compute_t<S>*>(h.lr_elementwise)),
        wd_e(static_cast<const compute_t<S>*>(h.weight_decay_elementwise)) {}

  /// The scalars of a segment of group g, in double (as the CPU op), cast to compute_t<S>.
  __device__ SgdScalars<compute_t<S>> scalars(int64_t g) const {
    return sgd_segment_scalars(hyper_value(lr, is_double, g), hyper_value(momentum, is_double, g),
                               hyper_value(dampening, is_double, g),
                               hyper_value(weight_decay, is_double, g), flags[g])
        .template cast<compute_t<S>>();
  }
};

template <typename S>
struct ForwardArgs {
  DeviceSegments seg;
  SgdHyperOf<S> hyper;
  const S* p;
  const S* g;
  const S* b;  // nullptr: no momentum buffer
  S* p_out;
  S* b_out;
  bool aligned;
};

template <typename S>
struct BackwardArgs {
  DeviceSegments seg;
  SgdHyperOf<S> hyper;
  const S* P;  // nullptr: a zero upstream gradient
  const S* B;
  const S* p;
  const S* g;
  const S* b;
  S* grad_p;
  S* grad_g;
  S* grad_b;
  compute_t<S>* grad_lr_e;  // nullptr: absent or not wanted
  compute_t<S>* grad_wd_e;
  int64_t mask;
  int64_t groups;
  double* partials;
  bool aligned;
};

/// Forward over [lo, hi) of an active segment. The buffer is read when the update uses it
/// (momentum, not the first step) or copies it through (no momentum). kElementwise: the
/// kernel variant for calls with lr_elementwise and/or weight_decay_elementwise, whose
/// values replace the segment's (which one is given is a run-time, grid-uniform branch).
template <bool kMomentum, bool kFirst, bool kNesterov, bool kElementwise, typename S>
__device__ __forceinline__ void forward_range(const ForwardArgs<S>& a, int64_t lo, int64_t hi,
                                              bool vector, const SgdScalars<compute_t<S>>& s) {
  using T = compute_t<S>;
  const S* b = (kMomentum && kFirst) ? nullptr : a.b;
  walk<S>(lo, hi, [&](int64_t i, int valid) {
    const Pack<S> p = load_pack(a.p, i, valid, vector);
    const Pack<S> g = load_pack(a.g, i, valid, vector);
    const Pack<S> bv = load_pack(b, i, valid, vector);
    const ComputePack<S> lr_e = load_compute<S>(kElementwise ? a.hyper.lr_e : nullptr, i, valid);
    const ComputePack<S> wd_e = load_compute<S>(kElementwise ? a.hyper.wd_e : nullptr, i, valid);
    Pack<S> p_out, b_out;
#pragma unroll
    for (int e = 0; e < kVec<S>; ++e) {
      SgdScalars<T> se = s;
      if (kElementwise) {
        sgd_set_element_scalars(se, a.hyper.lr_e != nullptr, lr_e.v[e], a.hyper.wd_e != nullptr,
                                wd_e.v[e]);
      }
      T p_new, b_new;
      sgd_forward<kMomentum, kFirst, kNesterov>(to_compute(p.v[e]), to_compute(g.v[e]),
                                                to_compute(bv.v[e]), se, p_new, b_new);
      p_out.v[e] = from_compute<S>(p_new);
      b_out.v[e] = from_compute<S>(b_new);  // b itself without momentum
    }
    store_pack(a.p_out, i, p_out, valid, vector);
    store_pack(a.b_out, i, b_out, valid, vector);
  });
}

template <typename S, bool kElementwise>
__global__ void __launch_bounds__(kThreads) sgd_step_kernel(const ForwardArgs<S> a) {
  using T = compute_t<S>;
  __shared__ SgdScalars<T> slot;
  __shared__ int64_t slot_segment;
  if (threadIdx.x == 0) slot_segment = -1;
  __syncthreads();
  for_each_overlap(
      a.seg, a.aligned, [&](int64_t s, const int64_t* row, int64_t lo, int64_t hi, bool vector) {
        if (row[kSegmentActive] == 0) {  // copied through
          copy_range(a.p_out, a.p, lo, hi, vector);
          copy_range(a.b_out, a.b, lo, hi, vector);
          return;
        }
        const int64_t group = row[kSegmentGroup];
        const SgdScalars<T> scalars =
            block_scalars(slot, slot_segment, s, [&] { return a.hyper.scalars(group); });
        const int64_t f = a.hyper.flags[group];
        with_sgd_mode(f, row[kSegmentStep], [&](auto kM, auto kF, auto kN) {
          forward_range<decltype(kM)::value, decltype(kF)::value, decltype(kN)::value,
                        kElementwise>(a, lo, hi, vector, scalars);
        });
      });
}

/// Backward over [lo, hi) of an active segment; adds this thread's hyperparameter terms
/// (lr, momentum, dampening, weight_decay) to acc. They are computed even when no
/// hyperparameter gradient is wanted (a few multiplies in a memory-bound loop), which
/// halves the specialisations to compile. With kElementwise the lr / weight_decay terms
/// are also the per-element gradients, stored where wanted.
template <bool kMomentum, bool kFirst, bool kNesterov, bool kElementwise, typename S>
__device__ __forceinline__ void backward_range(const BackwardArgs<S>& a, int64_t lo, int64_t hi,
                                               bool vector, const SgdScalars<compute_t<S>>& s,
                                               compute_t<S> (&acc)[kSgdNumHyper]) {
  using T = compute_t<S>;
  const S* b = (kMomentum && !kFirst) ? a.b : nullptr;  // read only when the math uses it
  walk<S>(lo, hi, [&](int64_t i, int valid) {
    const Pack<S> P = load_pack(a.P, i, valid, vector);
    const Pack<S> B = load_pack(a.B, i, valid, vector);
    const Pack<S> p = load_pack(a.p, i, valid, vector);
    const Pack<S> g = load_pack(a.g, i, valid, vector);
    const Pack<S> bv = load_pack(b, i, valid, vector);
    const ComputePack<S> lr_e = load_compute<S>(kElementwise ? a.hyper.lr_e : nullptr, i, valid);
    const ComputePack<S> wd_e = load_compute<S>(kElementwise ? a.hyper.wd_e : nullptr, i, valid);
    Pack<S> gp, gg, gb;
    ComputePack<S> glr, gwd;
#pragma unroll
    for (int e = 0; e < kVec<S>; ++e) {
      SgdScalars<T> se = s;
      if (kElementwise) {
        sgd_set_element_scalars(se, a.hyper.lr_e != nullptr, lr_e.v[e], a.hyper.wd_e != nullptr,
                                wd_e.v[e]);
      }
      const SgdElementGrads<T> r = sgd_backward<kMomentum, kFirst, kNesterov>(
          to_compute(P.v[e]), to_compute(B.v[e]), to_compute(p.v[e]), to_compute(g.v[e]),
          to_compute(bv.v[e]), se);
      gp.v[e] = from_compute<S>(r.params);
      gg.v[e] = from_compute<S>(r.grads);
      gb.v[e] = from_compute<S>(r.momentum_buffer);  // B itself without momentum
      glr.v[e] = r.lr;
      gwd.v[e] = r.weight_decay;
      if (e < valid) {
        acc[0] += r.lr;
        acc[1] += r.momentum;
        acc[2] += r.dampening;
        acc[3] += r.weight_decay;
      }
    }
    store_pack(a.grad_p, i, gp, valid, vector);
    store_pack(a.grad_g, i, gg, valid, vector);
    store_pack(a.grad_b, i, gb, valid, vector);
    if (kElementwise) {
      store_compute<S>(a.grad_lr_e, i, glr, valid);
      store_compute<S>(a.grad_wd_e, i, gwd, valid);
    }
  });
}

template <typename S, bool kElementwise>
__global__ void __launch_bounds__(kThreads) sgd_step_backward_kernel(const BackwardArgs<S> a) {
  using T = compute_t<S>;
  __shared__ SgdScalars<T> slot;
  __shared__ int64_t slot_segment;
  __shared__ double red[kWarps][kMaxHyper];
  if (threadIdx.x == 0) slot_segment = -1;
  if (a.mask != 0) zero_block_slice(a.partials, a.groups, kSgdNumHyper);
  __syncthreads();
  for_each_overlap(
      a.seg, a.aligned, [&](int64_t s, const int64_t* row, int64_t lo, int64_t hi, bool vector) {
        if (row[kSegmentActive] == 0) {  // upstream gradients pass through, grads get zero
          copy_range(a.grad_p, a.P, lo, hi, vector);
          copy_range(a.grad_g, static_cast<const S*>(nullptr), lo, hi, vector);
          copy_range(a.grad_b, a.B, lo, hi, vector);
          if (kElementwise) {
            zero_compute_range<S>(a.grad_lr_e, lo, hi);
            zero_compute_range<S>(a.grad_wd_e, lo, hi);
          }
          return;
        }
        const int64_t group = row[kSegmentGroup];
        const SgdScalars<T> scalars =
            block_scalars(slot, slot_segment, s, [&] { return a.hyper.scalars(group); });
        const int64_t f = a.hyper.flags[group];
        T acc[kSgdNumHyper] = {};
        with_sgd_mode(f, row[kSegmentStep], [&](auto kM, auto kF, auto kN) {
          backward_range<decltype(kM)::value, decltype(kF)::value, decltype(kN)::value,
                         kElementwise>(a, lo, hi, vector, scalars, acc);
        });
        if (a.mask != 0) {
          double sums[kSgdNumHyper];
#pragma unroll
          for (int k = 0; k < kSgdNumHyper; ++k) sums[k] = static_cast<double>(acc[k]);
          double* slice =
              a.partials + (static_cast<int64_t>(blockIdx.x) * a.groups + group) * kSgdNumHyper;
          block_add(sums, a.mask, slice, red);
        }
      });
}

}  // namespace

void launch_sgd_step(DType dtype, const DeviceSegments& segments, const SgdHyper& hyper,
                     const SgdStepBuffers& buffers, cudaStream_t stream) {
  const int64_t blocks = grid_blocks(segments.numel);
  if (blocks == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const ForwardArgs<S> args{segments,
                              SgdHyperOf<S>(hyper),
                              static_cast<const S*>(buffers.params),
                              static_cast<const S*>(buffers.grads),
                              static_cast<const S*>(buffers.momentum_buffer),
                              static_cast<S*>(buffers.params_out),
                              static_cast<S*>(buffers.momentum_buffer_out),
                              buffers.aligned};
    with_bool(hyper.lr_elementwise != nullptr || hyper.weight_decay_elementwise != nullptr,
              [&](auto kElementwise) {
                sgd_step_kernel<S, decltype(kElementwise)::value>
                    <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
              });
  });
}

void launch_sgd_step_backward(DType dtype, const DeviceSegments& segments, const SgdHyper& hyper,
                              const SgdBackwardBuffers& buffers,
                              const ElementwiseGrads& elementwise_grads, int64_t mask,
                              int64_t groups, double* partials, cudaStream_t stream) {
  const int64_t blocks = grid_blocks(segments.numel);
  if (blocks == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    using T = compute_t<S>;
    const BackwardArgs<S> args{segments,
                               SgdHyperOf<S>(hyper),
                               static_cast<const S*>(buffers.grad_params_out),
                               static_cast<const S*>(buffers.grad_momentum_buffer_out),
                               static_cast<const S*>(buffers.params),
                               static_cast<const S*>(buffers.grads),
                               static_cast<const S*>(buffers.momentum_buffer),
                               static_cast<S*>(buffers.grad_params),
                               static_cast<S*>(buffers.grad_grads),
                               static_cast<S*>(buffers.grad_momentum_buffer),
                               static_cast<T*>(elementwise_grads.lr),
                               static_cast<T*>(elementwise_grads.weight_decay),
                               mask,
                               groups,
                               partials,
                               buffers.aligned};
    with_bool(hyper.lr_elementwise != nullptr || hyper.weight_decay_elementwise != nullptr,
              [&](auto kElementwise) {
                sgd_step_backward_kernel<S, decltype(kElementwise)::value>
                    <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
              });
  });
}

}  // namespace cuda
}  // namespace loft
