// The memory walk shared by the CUDA kernels (csrc/cuda/*_kernels.cu): element types and
// their float32/float64 compute types, 16-byte packs, the tile loop over the segment
// table, the per-block segment scalars, the fixed-order block reduction, and the forward
// and backward kernels themselves, which each op fills with its part. Torch-free (see
// csrc/cuda/launchers.h for the layout of the work).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../dispatch.h"
#include "../kernel_args.h"
#include "../segments.h"
#include "launchers.h"

namespace loft {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
static_assert(kThreads % kWarpSize == 0, "kThreads must be a multiple of the warp size");

// ---- element types --------------------------------------------------------------------

/// Loads (to the compute type, compute_t<S> of csrc/dispatch.h) and stores (rounding once,
/// to nearest even) of an element type S. Half types compute in float32; torch builds with
/// __CUDA_NO_HALF_CONVERSIONS__, so every conversion is an explicit intrinsic.
template <typename S>
struct Element;

template <>
struct Element<double> {
  __device__ __forceinline__ static double load(double x) { return x; }
  __device__ __forceinline__ static double store(double x) { return x; }
};

template <>
struct Element<float> {
  __device__ __forceinline__ static float load(float x) { return x; }
  __device__ __forceinline__ static float store(float x) { return x; }
};

template <>
struct Element<__half> {
  __device__ __forceinline__ static float load(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Element<__nv_bfloat16> {
  __device__ __forceinline__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

template <typename S>
__device__ __forceinline__ compute_t<S> to_compute(S x) {
  return Element<S>::load(x);
}

template <typename S>
__device__ __forceinline__ S from_compute(compute_t<S> x) {
  return Element<S>::store(x);
}

/// Elements of S in one 16-byte vector.
template <typename S>
constexpr int kVec = static_cast<int>(16 / sizeof(S));
static_assert(kTile % (kThreads * 2) == 0 && kTile / kThreads >= 8,
              "a tile must give every thread whole vectors of every element type");

/// kVec<S> consecutive elements, aligned as one 16-byte access.
template <typename S>
struct alignas(16) Pack {
  S v[kVec<S>];
};

/// The `valid` (1 .. kVec<S>) elements p[i], p[i + 1], ... of a buffer of S as a pack,
/// zeros past them, or all zeros when the buffer is nullptr (0 elements). With `vector`,
/// p + i is 16-byte aligned and valid == kVec<S>: one vector load.
template <typename S>
__device__ __forceinline__ Pack<S> load_pack(const void* buffer, int64_t i, int valid,
                                             bool vector) {
  const S* p = static_cast<const S*>(buffer);
  Pack<S> r;
  if (p != nullptr && vector) {
    r = *reinterpret_cast<const Pack<S>*>(p + i);
  } else {
    const S zero = from_compute<S>(compute_t<S>(0));
#pragma unroll
    for (int e = 0; e < kVec<S>; ++e) r.v[e] = (p != nullptr && e < valid) ? p[i + e] : zero;
  }
  return r;
}

/// Stores the first `valid` elements of r at p + i in a buffer of S (one vector store
/// with `vector`); nothing when the buffer is nullptr.
template <typename S>
__device__ __forceinline__ void store_pack(void* buffer, int64_t i, const Pack<S>& r, int valid,
                                           bool vector) {
  if (buffer == nullptr) return;
  S* p = static_cast<S*>(buffer);
  if (vector) {
    *reinterpret_cast<Pack<S>*>(p + i) = r;
  } else {
#pragma unroll
    for (int e = 0; e < kVec<S>; ++e) {
      if (e < valid) p[i + e] = r.v[e];
    }
  }
}

/// kVec<S> values of the compute type of S: the per-element hyperparameters (and their
/// gradients) of one pack of elements.
template <typename S>
struct ComputePack {
  compute_t<S> v[kVec<S>];
};

/// The `valid` values p[i], p[i + 1], ... of a per-element hyperparameter (zeros past
/// them, or all zeros when p is nullptr). Element by element: these buffers have the
/// compute type, wider than S for half types, so one 16-byte access would not cover them.
template <typename S>
__device__ __forceinline__ ComputePack<S> load_compute(const void* buffer, int64_t i, int valid) {
  const compute_t<S>* p = static_cast<const compute_t<S>*>(buffer);
  ComputePack<S> r;
#pragma unroll
  for (int e = 0; e < kVec<S>; ++e) {
    r.v[e] = (p != nullptr && e < valid) ? p[i + e] : compute_t<S>(0);
  }
  return r;
}

/// Stores the first `valid` values of r at p + i; nothing when p is nullptr.
template <typename S>
__device__ __forceinline__ void store_compute(void* buffer, int64_t i, const ComputePack<S>& r,
                                              int valid) {
  if (buffer == nullptr) return;
  compute_t<S>* p = static_cast<compute_t<S>*>(buffer);
#pragma unroll
  for (int e = 0; e < kVec<S>; ++e) {
    if (e < valid) p[i + e] = r.v[e];
  }
}

/// The per-element lr and weight_decay of the pack at i (kElementwise; zeros otherwise),
/// and whether each is given.
template <typename S, bool kElementwise>
struct ElementwisePack {
  ComputePack<S> lr, weight_decay;
  bool has_lr, has_wd;

  __device__ __forceinline__ ElementwisePack(const StepArgs& a, int64_t i, int valid)
      : lr(load_compute<S>(kElementwise ? a.lr_elementwise : nullptr, i, valid)),
        weight_decay(
            load_compute<S>(kElementwise ? a.weight_decay_elementwise : nullptr, i, valid)),
        has_lr(a.lr_elementwise != nullptr),
        has_wd(a.weight_decay_elementwise != nullptr) {}
};

/// The hyperparameter terms of one pack of a backward (Buffers: its buffers, which name the
/// op's hyperparameters): add() adds element e's terms to this thread's sums (e < valid
/// only) and keeps its lr / weight_decay terms, the gradients of the per-element ones,
/// which store() writes.
template <typename S, typename Buffers>
struct PackHyperTerms {
  static constexpr int H = Buffers::kNumHyper;
  ComputePack<S> lr, weight_decay;

  __device__ __forceinline__ void add(int e, int valid, const compute_t<S> (&terms)[H],
                                      compute_t<S> (&acc)[H]) {
    lr.v[e] = terms[Buffers::kLrHyper];
    weight_decay.v[e] = terms[Buffers::kWeightDecayHyper];
    if (e < valid) {
#pragma unroll
      for (int k = 0; k < H; ++k) acc[k] += terms[k];
    }
  }

  __device__ __forceinline__ void store(const HyperGradArgs& h, int64_t i, int valid) const {
    store_compute<S>(h.lr_elementwise, i, lr, valid);
    store_compute<S>(h.weight_decay_elementwise, i, weight_decay, valid);
  }
};

// ---- the walk -------------------------------------------------------------------------

/// Calls f(i, valid) for this thread's groups of kVec<S> consecutive elements of
/// [lo, hi) (neighbouring threads on neighbouring groups; `valid` < kVec<S> only for the
/// last group). With `vector`, [lo, hi) is a whole aligned tile and f moves each group
/// with one 16-byte access; otherwise element by element. One body serves both, so each
/// specialisation of the math is compiled once.
template <typename S, typename F>
__device__ __forceinline__ void walk(int64_t lo, int64_t hi, const F& f) {
  constexpr int W = kVec<S>;
#pragma unroll 1
  for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * W; i < hi;
       i += static_cast<int64_t>(kThreads) * W) {
    f(i, hi - i < W ? static_cast<int>(hi - i) : W);
  }
}

/// Copies [lo, hi) of the buffer of S src to dst (zeros when src is nullptr; nothing when
/// dst is nullptr).
template <typename S>
__device__ __forceinline__ void copy_range(void* dst, const void* src, int64_t lo, int64_t hi,
                                           bool vector) {
  if (dst == nullptr) return;
  walk<S>(lo, hi, [&](int64_t i, int valid) {
    store_pack<S>(dst, i, load_pack<S>(src, i, valid, vector), valid, vector);
  });
}

/// Zeroes [lo, hi) of a per-element hyperparameter gradient (nothing when dst is nullptr).
template <typename S>
__device__ __forceinline__ void zero_compute_range(void* dst, int64_t lo, int64_t hi) {
  if (dst == nullptr) return;
  walk<S>(lo, hi, [&](int64_t i, int valid) {
    store_compute<S>(dst, i, load_compute<S>(nullptr, i, valid), valid);
  });
}

/// The row of the segment table holding element i (0 <= i < numel): the last row whose
/// offset is <= i (rows tile the buffer in order; empty rows share their successor's
/// offset, so the last such row is the one with elements).
__device__ __forceinline__ int64_t find_segment(const int64_t* rows, int64_t count, int64_t i) {
  int64_t lo = 0, hi = count;  // row lo has offset <= i; rows >= hi have offset > i
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (rows[mid * kSegmentColumns + kSegmentOffset] <= i) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

/// Calls visit(s, row, lo, hi, vector) for every (tile, segment) overlap [lo, hi) of this
/// block's tiles, in element order. Block b owns the contiguous tiles
/// [b * tiles / grid, (b + 1) * tiles / grid): neighbouring tiles usually share their
/// segment, so the segment scalars are computed once per run of tiles (block_scalars).
/// Every argument is the same in all threads of the block, so `visit` may synchronise.
template <typename Visit>
__device__ __forceinline__ void for_each_overlap(const Segments& seg, bool aligned,
                                                 const Visit& visit) {
  const int64_t tiles = (seg.numel + kTile - 1) / kTile;
  const int64_t grid = gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * tiles / grid;
  const int64_t last = (static_cast<int64_t>(blockIdx.x) + 1) * tiles / grid;
  for (int64_t tile = first; tile < last; ++tile) {
    const int64_t begin = tile * kTile;
    const int64_t end = begin + kTile < seg.numel ? begin + kTile : seg.numel;
    for (int64_t s = find_segment(seg.rows, seg.count, begin); s < seg.count; ++s) {
      const int64_t* row = seg.rows + s * kSegmentColumns;
      const int64_t offset = row[kSegmentOffset];
      if (offset >= end) break;
      const int64_t lo = offset > begin ? offset : begin;
      const int64_t stop = offset + row[kSegmentNumel];
      const int64_t hi = stop < end ? stop : end;
      if (lo >= hi) continue;  // an empty segment
      visit(s, row, lo, hi, aligned && lo == begin && hi == begin + kTile);
    }
  }
}

/// The scalars of segment s, made by thread 0 (make(), in double, cast to the compute
/// type) into shared memory unless it already holds them; every thread gets a copy.
/// Called by all threads of the block with the same s. `slot_segment` starts at -1.
template <typename Scalars, typename Make>
__device__ __forceinline__ Scalars block_scalars(Scalars& slot, int64_t& slot_segment, int64_t s,
                                                 const Make& make) {
  if (slot_segment != s) {
    __syncthreads();  // every thread has read the previous scalars
    if (threadIdx.x == 0) {
      slot = make();
      slot_segment = s;
    }
    __syncthreads();
  }
  return slot;
}

/// The walk of a main kernel over its block's (tile, segment) overlaps [lo, hi), in element
/// order: inactive(lo, hi, vector) for a segment that is not active, else
/// active(group, step, scalars, lo, hi, vector) with the segment's group, step and
/// scalars = make(group, step), made by thread 0 once per run of tiles of the segment and
/// kept in shared memory (block_scalars). Called by every thread of the block.
template <typename Scalars, typename Make, typename Inactive, typename Active>
__device__ __forceinline__ void for_each_segment_range(const Segments& seg, bool aligned,
                                                       const Make& make, const Inactive& inactive,
                                                       const Active& active) {
  __shared__ Scalars slot;
  __shared__ int64_t slot_segment;
  if (threadIdx.x == 0) slot_segment = -1;
  __syncthreads();
  for_each_overlap(seg, aligned,
                   [&](int64_t s, const int64_t* row, int64_t lo, int64_t hi, bool vector) {
                     if (row[kSegmentActive] == 0) {
                       inactive(lo, hi, vector);
                       return;
                     }
                     const int64_t group = row[kSegmentGroup];
                     const int64_t step = row[kSegmentStep];
                     const Scalars scalars =
                         block_scalars(slot, slot_segment, s, [&] { return make(group, step); });
                     active(group, step, scalars, lo, hi, vector);
                   });
}

/// Adds the block's sums of v[k] (k with bit k set in `mask`) to slice[k], in a fixed
/// order: a warp tree by shuffles, then warp by warp in thread 0. Called by all threads;
/// `red` is a [kWarps][kMaxHyper] shared array.
template <int H>
__device__ __forceinline__ void block_add(double (&v)[H], int64_t mask, double* slice,
                                          double (*red)[kMaxHyper]) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < H; ++k) {
    if (!((mask >> k) & 1)) continue;
    double x = v[k];
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      x += __shfl_down_sync(0xffffffffu, x, offset);
    }
    if (lane == 0) red[warp][k] = x;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < H; ++k) {
      if (!((mask >> k) & 1)) continue;
      double total = 0.0;
      for (int w = 0; w < kWarps; ++w) total += red[w][k];
      slice[k] += total;
    }
  }
  __syncthreads();  // red may be written again
}

/// Adds the block's sums of the H hyperparameter terms acc[k] (each thread's, over a range
/// of a segment of group `group`) to the block's slice partials[block][group][k], for the
/// bits k set in `mask` (nothing when it is 0). Called by all threads.
template <int H, typename T>
__device__ __forceinline__ void add_to_partials(const T (&acc)[H], int64_t mask, double* partials,
                                                int64_t groups, int64_t group) {
  __shared__ double red[kWarps][kMaxHyper];
  if (mask == 0) return;
  double sums[H];
#pragma unroll
  for (int k = 0; k < H; ++k) sums[k] = static_cast<double>(acc[k]);
  block_add(sums, mask, partials + (static_cast<int64_t>(blockIdx.x) * groups + group) * H, red);
}

/// Zeroes this block's slice partials[block][0 .. groups * H) (every block owns one, and
/// the reduce kernel reads them all); ends with a barrier.
__device__ __forceinline__ void zero_block_slice(double* partials, int64_t groups, int num_hyper) {
  const int64_t size = groups * num_hyper;
  double* slice = partials + static_cast<int64_t>(blockIdx.x) * size;
  for (int64_t j = threadIdx.x; j < size; j += kThreads) slice[j] = 0.0;
  __syncthreads();
}

// ---- the main kernels -----------------------------------------------------------------
//
// One forward and one backward kernel for every op; the op's part (Op, in
// csrc/cuda/*_kernels.cu) provides
//   Op::Segment<T>                          what a block keeps per segment (its scalars)
//   Op::segment<T>(hyper, group, step)      makes it, in float64 cast to T
//   Op::with_mode(flags, step, f)           calls f(modes...) with the segment's flags as
//                                           compile-time bools
//   Op::forward<S, kElementwise, modes...>(args, buffers, lo, hi, vector, segment)
//   Op::backward<S, kElementwise, modes...>(args, hyper_grads, buffers, lo, hi, vector,
//                                           segment, acc)
//                                           the range [lo, hi) of an active segment (the
//                                           backward adds its hyperparameter terms to acc)
// and a segment that is not active gets what its Buffers::inactive says.

template <typename Op, typename S, bool kElementwise, typename Buffers>
__global__ void __launch_bounds__(kThreads) step_kernel(const StepArgs a, const Buffers b) {
  using Segment = typename Op::template Segment<compute_t<S>>;
  for_each_segment_range<Segment>(
      a.segments, b.aligned,
      [&](int64_t group, int64_t step) {
        return Op::template segment<compute_t<S>>(a.hyper, group, step);
      },
      [&](int64_t lo, int64_t hi, bool vector) {
        b.inactive([&](void* dst, const void* src) { copy_range<S>(dst, src, lo, hi, vector); });
      },
      [&](int64_t group, int64_t step, const Segment& seg, int64_t lo, int64_t hi, bool vector) {
        Op::with_mode(a.hyper.flags[group], step, [&](auto... mode) {
          Op::template forward<S, kElementwise, decltype(mode)::value...>(a, b, lo, hi, vector,
                                                                          seg);
        });
      });
}

/// The main pass of a backward: also zeroes the per-element hyperparameter gradients on
/// inactive segments, and adds each thread's hyperparameter terms of a range into the
/// block's partial sums.
template <typename Op, typename S, bool kElementwise, typename Buffers>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const StepArgs a, const HyperGradArgs h, const Buffers b, double* partials) {
  using T = compute_t<S>;
  using Segment = typename Op::template Segment<T>;
  if (h.mask != 0) zero_block_slice(partials, a.segments.groups, Buffers::kNumHyper);
  for_each_segment_range<Segment>(
      a.segments, b.aligned,
      [&](int64_t group, int64_t step) { return Op::template segment<T>(a.hyper, group, step); },
      [&](int64_t lo, int64_t hi, bool vector) {
        b.inactive([&](void* dst, const void* src) { copy_range<S>(dst, src, lo, hi, vector); });
        if (kElementwise) {
          zero_compute_range<S>(h.lr_elementwise, lo, hi);
          zero_compute_range<S>(h.weight_decay_elementwise, lo, hi);
        }
      },
      [&](int64_t group, int64_t step, const Segment& seg, int64_t lo, int64_t hi, bool vector) {
        T acc[Buffers::kNumHyper] = {};
        Op::with_mode(a.hyper.flags[group], step, [&](auto... mode) {
          Op::template backward<S, kElementwise, decltype(mode)::value...>(a, h, b, lo, hi, vector,
                                                                           seg, acc);
        });
        add_to_partials(acc, h.mask, partials, a.segments.groups, group);
      });
}

/// Calls launch(S{}, kElementwise, blocks) to launch a main kernel over the buffers of an
/// op: S the element type of args.dtype (double, float, __half, __nv_bfloat16),
/// kElementwise whether a per-element hyperparameter is given (the per-group kernel is its
/// own specialisation, as fast as without them; one more serves every per-element case),
/// `blocks` the grid; nothing when there are no elements.
template <typename F>
inline void dispatch_launch(const StepArgs& args, const F& launch) {
  const int64_t blocks = grid_blocks(args.segments.numel);
  if (blocks == 0) return;
  dispatch_dtype<__half, __nv_bfloat16>(args.dtype, [&](auto tag) {
    with_bool(args.has_elementwise(),
              [&](auto kElementwise) { launch(tag, kElementwise, static_cast<unsigned>(blocks)); });
  });
}

/// The launchers of Op's main kernels (launchers.h).
template <typename Op, typename Buffers>
void launch_step(const StepArgs& args, const Buffers& buffers, cudaStream_t stream) {
  dispatch_launch(args, [&](auto tag, auto kElementwise, unsigned blocks) {
    step_kernel<Op, decltype(tag), decltype(kElementwise)::value>
        <<<blocks, kThreads, 0, stream>>>(args, buffers);
  });
}

template <typename Op, typename Buffers>
void launch_backward(const StepArgs& args, const HyperGradArgs& hyper, const Buffers& buffers,
                     double* partials, cudaStream_t stream) {
  dispatch_launch(args, [&](auto tag, auto kElementwise, unsigned blocks) {
    backward_kernel<Op, decltype(tag), decltype(kElementwise)::value>
        <<<blocks, kThreads, 0, stream>>>(args, hyper, buffers, partials);
  });
}

}  // namespace cuda
}  // namespace loft
