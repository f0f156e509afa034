// The memory walk shared by the CUDA kernels (csrc/cuda/*_kernels.cu): element types and
// their float32/float64 compute types, 16-byte packs, the tile loop over the segment
// table, the per-block segment scalars and the fixed-order block reduction. Torch-free
// (see csrc/cuda/launchers.h for the layout of the work).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../dispatch.h"
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

/// The `valid` (1 .. kVec<S>) elements p[i], p[i + 1], ... as a pack, zeros past them, or
/// all zeros when p is nullptr (a 0-element buffer). With `vector`, p + i is 16-byte
/// aligned and valid == kVec<S>: one vector load.
template <typename S>
__device__ __forceinline__ Pack<S> load_pack(const S* p, int64_t i, int valid, bool vector) {
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

/// Stores the first `valid` elements of r at p + i (one vector store with `vector`);
/// nothing when p is nullptr.
template <typename S>
__device__ __forceinline__ void store_pack(S* p, int64_t i, const Pack<S>& r, int valid,
                                           bool vector) {
  if (p == nullptr) return;
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
__device__ __forceinline__ ComputePack<S> load_compute(const compute_t<S>* p, int64_t i,
                                                       int valid) {
  ComputePack<S> r;
#pragma unroll
  for (int e = 0; e < kVec<S>; ++e) {
    r.v[e] = (p != nullptr && e < valid) ? p[i + e] : compute_t<S>(0);
  }
  return r;
}

/// Stores the first `valid` values of r at p + i; nothing when p is nullptr.
template <typename S>
__device__ __forceinline__ void store_compute(compute_t<S>* p, int64_t i, const ComputePack<S>& r,
                                              int valid) {
  if (p == nullptr) return;
#pragma unroll
  for (int e = 0; e < kVec<S>; ++e) {
    if (e < valid) p[i + e] = r.v[e];
  }
}

/// A [G] hyperparameter value as double: `p` holds doubles when `is_double`, else floats.
__device__ __forceinline__ double hyper_value(const void* p, bool is_double, int64_t g) {
  return is_double ? static_cast<const double*>(p)[g]
                   : static_cast<double>(static_cast<const float*>(p)[g]);
}

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

/// Copies [lo, hi) of src to dst (zeros when src is nullptr; nothing when dst is nullptr).
template <typename S>
__device__ __forceinline__ void copy_range(S* dst, const S* src, int64_t lo, int64_t hi,
                                           bool vector) {
  if (dst == nullptr) return;
  walk<S>(lo, hi, [&](int64_t i, int valid) {
    store_pack(dst, i, load_pack(src, i, valid, vector), valid, vector);
  });
}

/// Zeroes [lo, hi) of a per-element hyperparameter gradient (nothing when dst is nullptr).
template <typename S>
__device__ __forceinline__ void zero_compute_range(compute_t<S>* dst, int64_t lo, int64_t hi) {
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
__device__ __forceinline__ void for_each_overlap(const DeviceSegments& seg, bool aligned,
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

/// Zeroes this block's slice partials[block][0 .. groups * H) (every block owns one, and
/// the reduce kernel reads them all); ends with a barrier.
__device__ __forceinline__ void zero_block_slice(double* partials, int64_t groups, int num_hyper) {
  const int64_t size = groups * num_hyper;
  double* slice = partials + static_cast<int64_t>(blockIdx.x) * size;
  for (int64_t j = threadIdx.x; j < size; j += kThreads) slice[j] = 0.0;
  __syncthreads();
}

/// Runs kernel<S> for the element type of `dtype`: f(S{}) with S one of double, float,
/// __half, __nv_bfloat16 (a host helper of the launchers).
template <typename F>
inline void dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat64:
      f(double{});
      break;
    case DType::kFloat32:
      f(float{});
      break;
    case DType::kFloat16:
      f(__half{});
      break;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      break;
  }
}

}  // namespace cuda
}  // namespace loft
