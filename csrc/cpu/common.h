// Shared pieces of the CPU ops (csrc/cpu/*_cpu.cpp): argument checks that name the op
// and the argument, the segment-table validation, and the chunked parallel loop.
//
// How a CPU op walks memory: the segments are cut into chunks of at most kChunk
// elements (a chunk never crosses a segment boundary), at::parallel_for runs over the
// chunks, and each chunk runs one tight loop specialised for its segment's flags. A
// backward writes each chunk's hyperparameter partial sums into its own slot; the slots
// are added chunk by chunk in a fixed order afterwards, so the result does not depend
// on the number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../segments.h"

namespace loft {
namespace cpu {

/// Elements per chunk: the unit of parallel work and of a hyperparameter partial sum.
constexpr int64_t kChunk = 4096;
/// At least this many chunks per parallel task (small buckets stay on one thread).
constexpr int64_t kGrainChunks = 8;
/// Elements per block inside a backward chunk (the per-element hyperparameter terms of
/// one block are kept on the stack, then added into kLanes running sums).
constexpr int64_t kBlock = 256;
constexpr int kLanes = 8;

/// The compute type of buffers of scalar_t, which is also the dtype of their
/// hyperparameter tensors: double for double, float for float, half and bfloat16 (the
/// same as at::opmath_type, which ATen/ATen.h does not bring in).
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

struct Chunk {
  int64_t begin;    // first element
  int64_t size;     // 1 .. kChunk
  int64_t segment;  // row of the segment table
};

/// A read-only run of kChunk zeros of any floating type (all-zero bits are +0.0 in
/// float64, float32, float16 and bfloat16): the stand-in for a 0-element upstream
/// gradient, so that the inner loops stay branch-free.
template <typename scalar_t>
inline const scalar_t* zeros_chunk() {
  alignas(64) static const unsigned char kZeros[kChunk * sizeof(double)] = {};
  static_assert(sizeof(scalar_t) <= sizeof(double), "zeros_chunk: element too large");
  return reinterpret_cast<const scalar_t*>(kZeros);
}

template <typename scalar_t>
inline void copy_elements(scalar_t* dst, const scalar_t* src, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(scalar_t));
}

template <typename scalar_t>
inline void zero_elements(scalar_t* dst, int64_t n) {
  std::memset(dst, 0, static_cast<size_t>(n) * sizeof(scalar_t));
}

/// The checked view of a segment table: the rows (on the host) and the number of
/// elements and groups they were validated against.
struct Segments {
  const int64_t* rows;
  int64_t count;
  int64_t numel;
  int64_t groups;

  int64_t offset(int64_t s) const { return rows[s * kSegmentColumns + kSegmentOffset]; }
  int64_t size(int64_t s) const { return rows[s * kSegmentColumns + kSegmentNumel]; }
  int64_t group(int64_t s) const { return rows[s * kSegmentColumns + kSegmentGroup]; }
  int64_t step(int64_t s) const { return rows[s * kSegmentColumns + kSegmentStep]; }
  bool active(int64_t s) const { return rows[s * kSegmentColumns + kSegmentActive] != 0; }
};

/// params: a 1-D contiguous floating tensor (float64, float32, float16 or bfloat16).
inline void check_params(const char* op, const at::Tensor& params) {
  TORCH_CHECK(params.dim() == 1, op, ": params must be 1-D, got shape ", params.sizes());
  TORCH_CHECK(params.is_contiguous(), op, ": params must be contiguous");
  const auto dtype = params.scalar_type();
  TORCH_CHECK(
      dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": params must be float64, float32, float16 or bfloat16, got ", dtype);
}

/// A buffer of the bucket: 1-D, contiguous, the dtype and device of params, with
/// params.numel() elements, or also 0 elements when `may_be_empty` (optional state
/// buffers, upstream gradients).
inline void check_buffer(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& params, bool may_be_empty) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == params.scalar_type(), op, ": ", name, " must have dtype ",
              params.scalar_type(), " (the dtype of params), got ", t.scalar_type());
  TORCH_CHECK(t.device() == params.device(), op, ": ", name, " must be on ", params.device(),
              " (the device of params), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  const int64_t n = params.numel();
  if (may_be_empty) {
    TORCH_CHECK(t.numel() == n || t.numel() == 0, op, ": ", name, " must have ", n,
                " or 0 elements, got ", t.numel());
  } else {
    TORCH_CHECK(t.numel() == n, op, ": ", name, " must have ", n, " elements, got ", t.numel());
  }
}

/// group_flags: int64 [G] contiguous on the device of params, every value a subset of
/// `all_flags`. Returns G.
inline int64_t check_group_flags(const char* op, const at::Tensor& group_flags,
                                 const at::Tensor& params, int64_t all_flags) {
  TORCH_CHECK(group_flags.dim() == 1, op, ": group_flags must be 1-D, got shape ",
              group_flags.sizes());
  TORCH_CHECK(group_flags.scalar_type() == at::kLong, op,
              ": group_flags must have dtype int64, got ", group_flags.scalar_type());
  TORCH_CHECK(group_flags.device() == params.device(), op, ": group_flags must be on ",
              params.device(), " (the device of params), got ", group_flags.device());
  TORCH_CHECK(group_flags.is_contiguous(), op, ": group_flags must be contiguous");
  const int64_t groups = group_flags.numel();
  const int64_t* flags = group_flags.data_ptr<int64_t>();
  for (int64_t i = 0; i < groups; ++i) {
    TORCH_CHECK((flags[i] & ~all_flags) == 0, op, ": group_flags[", i, "] = ", flags[i],
                " has bits outside ", all_flags);
  }
  return groups;
}

/// A hyperparameter: [G], float64 for float64 buffers and float32 otherwise, contiguous,
/// on the device of params.
inline void check_hyper(const char* op, const char* name, const at::Tensor& t,
                        const at::Tensor& params, int64_t groups) {
  const auto want = params.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.numel() == groups, op, ": ", name, " must have ", groups,
              " elements (one per group, as group_flags), got ", t.numel());
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, " for ",
              params.scalar_type(), " params, got ", t.scalar_type());
  TORCH_CHECK(t.device() == params.device(), op, ": ", name, " must be on ", params.device(),
              " (the device of params), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

/// segments: int64 [S, 5] contiguous on the device of params, tiling [0, N) in order,
/// with 0 <= group < G, step >= 0 and active in {0, 1}. Reads only the table.
inline Segments check_segments(const char* op, const at::Tensor& segments, const at::Tensor& params,
                               int64_t groups) {
  TORCH_CHECK(segments.dim() == 2 && segments.size(1) == kSegmentColumns, op,
              ": segments must have shape [S, 5], got ", segments.sizes());
  TORCH_CHECK(segments.scalar_type() == at::kLong, op, ": segments must have dtype int64, got ",
              segments.scalar_type());
  TORCH_CHECK(segments.device() == params.device(), op, ": segments must be on ", params.device(),
              " (the device of params), got ", segments.device());
  TORCH_CHECK(segments.is_contiguous(), op, ": segments must be contiguous");
  Segments seg{segments.data_ptr<int64_t>(), segments.size(0), params.numel(), groups};
  int64_t end = 0;  // where the next row must start
  for (int64_t s = 0; s < seg.count; ++s) {
    TORCH_CHECK(seg.offset(s) == end, op, ": segments row ", s, " has offset ", seg.offset(s),
                ", expected ", end, " (rows must tile params in order)");
    TORCH_CHECK(seg.size(s) >= 0, op, ": segments row ", s, " has numel ", seg.size(s),
                ", expected >= 0");
    TORCH_CHECK(seg.size(s) <= seg.numel - end, op, ": segments row ", s, " ends at ", end, " + ",
                seg.size(s), ", past the ", seg.numel, " elements of params");
    TORCH_CHECK(seg.group(s) >= 0 && seg.group(s) < groups, op, ": segments row ", s, " has group ",
                seg.group(s), ", expected 0 <= group < ", groups);
    TORCH_CHECK(seg.step(s) >= 0, op, ": segments row ", s, " has step ", seg.step(s),
                ", expected >= 0");
    const int64_t active = seg.rows[s * kSegmentColumns + kSegmentActive];
    TORCH_CHECK(active == 0 || active == 1, op, ": segments row ", s, " has active ", active,
                ", expected 0 or 1");
    end += seg.size(s);
  }
  TORCH_CHECK(end == seg.numel, op, ": segments cover ", end, " elements, but params has ",
              seg.numel, " (rows must tile params in order)");
  return seg;
}

/// An optional state buffer passed with 0 elements is an error when some group whose
/// flags include `flag` has an active segment with elements.
inline void check_optional_needed(const char* op, const char* name, const at::Tensor& buffer,
                                  const Segments& seg, const at::Tensor& group_flags, int64_t flag,
                                  const char* flag_name) {
  if (buffer.numel() != 0 || seg.numel == 0) return;
  const int64_t* flags = group_flags.data_ptr<int64_t>();
  for (int64_t s = 0; s < seg.count; ++s) {
    TORCH_CHECK(!(seg.active(s) && seg.size(s) > 0 && (flags[seg.group(s)] & flag)), op, ": ", name,
                " has 0 elements, but group ", seg.group(s), " uses ", flag_name,
                " and has an active segment (row ", s, ")");
  }
}

/// The chunks of a validated segment table, in element order.
inline std::vector<Chunk> make_chunks(const Segments& seg) {
  std::vector<Chunk> chunks;
  chunks.reserve(static_cast<size_t>(seg.numel / kChunk + seg.count));
  for (int64_t s = 0; s < seg.count; ++s) {
    const int64_t begin = seg.offset(s);
    const int64_t numel = seg.size(s);
    for (int64_t done = 0; done < numel; done += kChunk) {
      chunks.push_back({begin + done, std::min(kChunk, numel - done), s});
    }
  }
  return chunks;
}

/// Runs f(chunk_index, chunk) for every chunk, in parallel.
template <typename F>
inline void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), kGrainChunks,
                   [&](int64_t first, int64_t last) {
                     for (int64_t c = first; c < last; ++c) f(c, chunks[c]);
                   });
}

/// Adds the n values of x into the kLanes running sums `lanes` (in a fixed order; the
/// independent lanes let the compiler vectorise the sum without reassociation).
template <typename T>
inline void add_to_lanes(T* lanes, const T* x, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[i + l];
  }
  for (int l = 0; i < n; ++i, ++l) lanes[l] += x[i];
}

template <typename T>
inline double sum_lanes(const T* lanes) {
  T total = T(0);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return static_cast<double>(total);
}

/// The [G] hyperparameter gradients from per-chunk partials (partials[c * H + k] is the
/// sum of hyperparameter k over chunk c): summed chunk by chunk in float64 in chunk
/// order, then cast to the dtype of `like`. Hyperparameters whose bit in `mask` is clear
/// get zeros without touching the partials.
inline std::vector<at::Tensor> reduce_hyper_grads(const std::vector<double>& partials,
                                                  const std::vector<Chunk>& chunks,
                                                  const Segments& seg, int num_hyper, int64_t mask,
                                                  const at::Tensor& like) {
  std::vector<at::Tensor> out;
  out.reserve(num_hyper);
  const auto options = like.options().dtype(at::kDouble);
  for (int k = 0; k < num_hyper; ++k) {
    at::Tensor acc = at::zeros({seg.groups}, options);
    if ((mask >> k) & 1) {
      double* a = acc.data_ptr<double>();
      for (size_t c = 0; c < chunks.size(); ++c) {
        a[seg.group(chunks[c].segment)] += partials[c * num_hyper + k];
      }
    }
    out.push_back(acc.to(like.scalar_type()));
  }
  return out;
}

/// Calls f(std::bool_constant<b>{}) with the run-time bool b as a compile-time constant.
template <typename F>
inline void with_bool(bool b, const F& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace cpu
}  // namespace loft
