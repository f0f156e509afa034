// Shared pieces of the CPU ops (csrc/cpu/*_cpu.cpp): the argument checks of
// csrc/checks.h reading values in place, and the chunked parallel loop.
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
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
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

/// The argument checks of csrc/checks.h with the values read in place (CPU tensors).
inline int64_t check_group_flags(const char* op, const at::Tensor& group_flags,
                                 const at::Tensor& params, int64_t all_flags) {
  const int64_t groups = check_group_flags_layout(op, group_flags, params);
  check_group_flags_values(op, group_flags.data_ptr<int64_t>(), groups, all_flags);
  return groups;
}

inline Segments check_segments(const char* op, const at::Tensor& segments, const at::Tensor& params,
                               int64_t groups) {
  check_segments_layout(op, segments, params);
  return check_segments_values(op, segments.data_ptr<int64_t>(), segments.size(0), params.numel(),
                               groups);
}

inline void check_optional_needed(const char* op, const char* name, const at::Tensor& buffer,
                                  const Segments& seg, const at::Tensor& group_flags, int64_t flag,
                                  const char* flag_name) {
  loft::check_optional_needed(op, name, buffer, seg, group_flags.data_ptr<int64_t>(), flag,
                              flag_name);
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

/// A [G] hyperparameter tensor (float64, or float32 for non-float64 params: checks.h)
/// read as float64 values.
class HyperValues {
 public:
  explicit HyperValues(const at::Tensor& t)
      : data_(t.const_data_ptr()), is_double_(t.scalar_type() == at::kDouble) {}
  double operator[](int64_t g) const {
    return is_double_ ? static_cast<const double*>(data_)[g]
                      : static_cast<double>(static_cast<const float*>(data_)[g]);
  }

 private:
  const void* data_;
  bool is_double_;
};

/// The optional per-element hyperparameters of an op (lr_elementwise,
/// weight_decay_elementwise), checked: the data of each, or nullptr when absent.
template <typename T>
struct Elementwise {
  const T* lr;
  const T* weight_decay;
};

template <typename T>
inline Elementwise<T> elementwise_data(bool has_lr, const std::optional<at::Tensor>& lr,
                                       bool has_wd, const std::optional<at::Tensor>& wd) {
  return {has_lr ? lr->const_data_ptr<T>() : nullptr, has_wd ? wd->const_data_ptr<T>() : nullptr};
}

/// A gradient of a per-element hyperparameter: [N] in the compute dtype of params when
/// the hyperparameter is present and its gradient is wanted, else 0 elements.
inline at::Tensor elementwise_grad(bool wanted, const at::Tensor& params) {
  return at::empty({wanted ? params.numel() : 0}, params.options().dtype(compute_dtype(params)));
}

/// Calls f(kLr, kWd) with whether lr_elementwise / weight_decay_elementwise are present
/// as compile-time bools: the per-group path (both false) is its own specialisation, as
/// fast as without them.
template <typename F>
inline void with_elementwise(bool lr, bool wd, const F& f) {
  with_bool(lr, [&](auto kLr) { with_bool(wd, [&](auto kWd) { f(kLr, kWd); }); });
}

/// Calls f(kHyper): whether a backward loop computes the hyperparameter terms, which it
/// needs for [G] gradients (`group_grads`) and always does with a per-element
/// hyperparameter (kElementwise: its gradient is such a term); those loops then skip only
/// the partial sums at run time, which halves their specialisations.
template <bool kElementwise, typename F>
inline void with_hyper_terms(bool group_grads, const F& f) {
  if constexpr (kElementwise) {
    f(std::true_type{});
  } else {
    with_bool(group_grads, f);
  }
}

}  // namespace cpu
}  // namespace loft
