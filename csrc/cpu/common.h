// The memory walk shared by the CPU kernels (csrc/cpu/sgd_cpu.cpp, adam_cpu.cpp): typed
// views of the pointers of csrc/kernel_args.h, the chunked parallel loop, the fixed-order
// sums of the hyperparameter terms, and the two drivers every op's loops run under.
//
// How a CPU op walks memory: the segments are cut into chunks of at most kChunk
// elements (a chunk never crosses a segment boundary), at::parallel_for runs over the
// chunks, and each chunk runs one tight loop specialised for its segment's flags. A
// backward writes each chunk's hyperparameter partial sums into its own slot; the slots
// are added chunk by chunk in a fixed order afterwards, so the result does not depend
// on the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "../kernel_args.h"
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

/// Calls f(S{}) with S the element type of `dtype` (double, float, c10::Half, c10::BFloat16).
template <typename F>
inline void dispatch_cpu_dtype(DType dtype, const F& f) {
  dispatch_dtype<c10::Half, c10::BFloat16>(dtype, f);
}

/// Element `offset` of a buffer of S handed as a pointer (csrc/kernel_args.h); nullptr for
/// an absent buffer.
template <typename S>
inline const S* typed(const void* p, int64_t offset) {
  return p != nullptr ? static_cast<const S*>(p) + offset : nullptr;
}

template <typename S>
inline S* typed(void* p, int64_t offset) {
  return p != nullptr ? static_cast<S*>(p) + offset : nullptr;
}

/// Element `offset` of an upstream gradient, or, for an absent (zero) one, a read-only run
/// of kChunk zeros, so that the inner loops stay branch-free.
template <typename S>
inline const S* upstream(const void* p, int64_t offset) {
  return p != nullptr ? static_cast<const S*>(p) + offset : zeros_chunk<S>();
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

/// Runs, for every chunk in parallel, inactive(o, n) for a chunk [o, o + n) of an inactive
/// segment, else active(c, s, o, n) (c: the chunk's index, s: its segment).
template <typename Inactive, typename Active>
inline void for_each_chunk(const Segments& seg, const std::vector<Chunk>& chunks,
                           const Inactive& inactive, const Active& active) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), kGrainChunks,
                   [&](int64_t first, int64_t last) {
                     for (int64_t c = first; c < last; ++c) {
                       const Chunk& chunk = chunks[c];
                       if (seg.active(chunk.segment)) {
                         active(c, chunk.segment, chunk.begin, chunk.size);
                       } else {
                         inactive(chunk.begin, chunk.size);
                       }
                     }
                   });
}

/// Adds the n values of x into the kLanes running sums `lanes` (in a fixed order; the
/// independent lanes let the compiler vectorise the sum without reassociation). The two
/// never share memory: said, so that the sums stay in registers (ChunkHyperTerms keeps
/// both in one object, where gcc cannot see it by itself).
template <typename T>
inline void add_to_lanes(T* __restrict__ lanes, const T* __restrict__ x, int64_t n) {
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

/// Writes the [G] hyperparameter gradients of `hyper` from per-chunk partials
/// (partials[c * num_hyper + k] is the sum of hyperparameter k over chunk c): summed chunk
/// by chunk in float64 in chunk order, then cast to the dtype of the hyperparameters
/// (`is_double`). Hyperparameters whose bit in the mask is clear get zeros without
/// touching the partials.
inline void reduce_hyper_grads(const std::vector<double>& partials,
                               const std::vector<Chunk>& chunks, const Segments& seg, int num_hyper,
                               const HyperGradArgs& hyper, bool is_double) {
  std::vector<double> sums(static_cast<size_t>(seg.groups));
  for (int k = 0; k < num_hyper; ++k) {
    std::fill(sums.begin(), sums.end(), 0.0);
    if ((hyper.mask >> k) & 1) {
      for (size_t c = 0; c < chunks.size(); ++c) {
        sums[seg.group(chunks[c].segment)] += partials[c * num_hyper + k];
      }
    }
    for (int64_t g = 0; g < seg.groups; ++g) {
      if (is_double) {
        static_cast<double*>(hyper.group[k])[g] = sums[g];
      } else {
        static_cast<float*>(hyper.group[k])[g] = static_cast<float>(sums[g]);
      }
    }
  }
}

/// Copies [o, o + n) of the buffer of S src to dst (zeros when src is nullptr; nothing
/// when dst is nullptr): how a chunk of an inactive segment runs Buffers::inactive.
template <typename S>
inline void copy_or_zero(void* dst, const void* src, int64_t o, int64_t n) {
  if (dst == nullptr) return;
  if (src == nullptr) {
    zero_elements(typed<S>(dst, o), n);
  } else {
    copy_elements(typed<S>(dst, o), typed<S>(src, o), n);
  }
}

/// The hyperparameter terms of a backward chunk, block by block (Buffers names the op's
/// hyperparameters): the loop over a block puts element j's terms with set(j, ...);
/// end_block() adds them into kLanes running sums when [G] gradients are wanted (`partial`
/// is not null) and copies the block's lr / weight_decay terms to the per-element
/// gradients (kLr / kWd, when wanted: copied there, not stored in the loop, as a
/// conditional store there stops gcc vectorising it); end() writes the chunk's sums.
template <typename Buffers, bool kLr, bool kWd, typename T>
struct ChunkHyperTerms {
  static constexpr int H = Buffers::kNumHyper;
  T lanes[H][kLanes] = {};
  T terms[H][kBlock];

  LOFT_INLINE void set(int64_t j, const T (&hyper)[H]) {
#pragma GCC unroll 8
    for (int k = 0; k < H; ++k) terms[k][j] = hyper[k];
  }

  LOFT_INLINE void end_block(int64_t start, int64_t count, T* grad_lr_e, T* grad_wd_e,
                             const double* partial) {
    if (partial != nullptr) {
      for (int k = 0; k < H; ++k) add_to_lanes(lanes[k], terms[k], count);
    }
    if (kLr && grad_lr_e != nullptr) {
      copy_elements(grad_lr_e + start, terms[Buffers::kLrHyper], count);
    }
    if (kWd && grad_wd_e != nullptr) {
      copy_elements(grad_wd_e + start, terms[Buffers::kWeightDecayHyper], count);
    }
  }

  LOFT_INLINE void end(double* partial) const {
    if (partial == nullptr) return;
    for (int k = 0; k < H; ++k) partial[k] = sum_lanes(lanes[k]);
  }
};

// ---- the loops of an op ----------------------------------------------------------------
//
// One driver for the forward ops and one for the backward ops; the op's part (Op: SgdLoops,
// AdamLoops, with SgdOp / AdamOp of the math headers) provides
//   Op::Segment<T>, Op::segment<T>(hyper, group, step)   each segment's scalars
//   Op::with_mode(flags, step, f)                          f(modes...): the segment's flags
//                                                          as compile-time bools
//   Op::forward<S, kLr, kWd, modes...>(args, buffers, o, n, segment)
//   Op::backward<S, kHyper, kLr, kWd, modes...>(args, hyper_grads, buffers, o, n,
//                                               segment, partial)
//                                                          the chunk [o, o + n) of an active
//                                                          segment
// and a chunk of an inactive segment gets what its Buffers::inactive says.

/// Calls f(S{}, segments) for the element type S of args.dtype, with segments[s] the
/// scalars of segment s in the compute type of S (made once, before the loops).
template <typename Op, typename F>
inline void with_segments(const StepArgs& args, const F& f) {
  dispatch_cpu_dtype(args.dtype, [&](auto tag) {
    using T = compute_t<decltype(tag)>;
    const Segments& seg = args.segments;
    std::vector<typename Op::template Segment<T>> segments;
    segments.reserve(static_cast<size_t>(seg.count));
    for (int64_t s = 0; s < seg.count; ++s) {
      segments.push_back(Op::template segment<T>(args.hyper, seg.group(s), seg.step(s)));
    }
    f(tag, segments);
  });
}

/// Calls f(kLr, kWd, modes...) for a chunk of segment s: whether lr_elementwise /
/// weight_decay_elementwise are given (the per-group path is its own specialisation, as
/// fast as without them) and the segment's Op::with_mode, as compile-time bools.
template <typename Op, typename F>
inline void with_chunk_flags(const StepArgs& args, int64_t s, const F& f) {
  Op::with_mode(args.hyper.flags[args.segments.group(s)], args.segments.step(s), [&](auto... mode) {
    with_bool(args.lr_elementwise != nullptr, [&](auto kLr) {
      with_bool(args.weight_decay_elementwise != nullptr, [&](auto kWd) { f(kLr, kWd, mode...); });
    });
  });
}

template <typename Op, typename Buffers>
void run_forward(const StepArgs& args, const Buffers& buffers) {
  const std::vector<Chunk> chunks = make_chunks(args.segments);
  with_segments<Op>(args, [&](auto tag, const auto& segments) {
    using S = decltype(tag);
    for_each_chunk(
        args.segments, chunks,
        [&](int64_t o, int64_t n) {
          buffers.inactive([&](void* dst, const void* src) { copy_or_zero<S>(dst, src, o, n); });
        },
        [&](int64_t, int64_t s, int64_t o, int64_t n) {
          with_chunk_flags<Op>(args, s, [&](auto... flag) {
            Op::template forward<S, decltype(flag)::value...>(args, buffers, o, n, segments[s]);
          });
        });
  });
}

/// The backward driver also zeroes the per-element hyperparameter gradients on inactive
/// segments, and writes the [G] gradients from per-chunk partial sums (reduce_hyper_grads).
/// kHyper: whether a chunk computes the hyperparameter terms, which it needs for [G]
/// gradients and always does with a per-element hyperparameter (its gradient is such a
/// term); those loops then skip only the partial sums at run time, which halves their
/// specialisations.
template <typename Op, typename Buffers>
void run_backward(const StepArgs& args, const HyperGradArgs& hyper, const Buffers& buffers) {
  constexpr int H = Buffers::kNumHyper;
  const std::vector<Chunk> chunks = make_chunks(args.segments);
  std::vector<double> partials(hyper.mask ? chunks.size() * H : 0, 0.0);
  with_segments<Op>(args, [&](auto tag, const auto& segments) {
    using S = decltype(tag);
    using T = compute_t<S>;
    for_each_chunk(
        args.segments, chunks,
        [&](int64_t o, int64_t n) {
          buffers.inactive([&](void* dst, const void* src) { copy_or_zero<S>(dst, src, o, n); });
          copy_or_zero<T>(hyper.lr_elementwise, nullptr, o, n);
          copy_or_zero<T>(hyper.weight_decay_elementwise, nullptr, o, n);
        },
        [&](int64_t c, int64_t s, int64_t o, int64_t n) {
          double* partial = hyper.mask ? partials.data() + c * H : nullptr;
          with_chunk_flags<Op>(args, s, [&](auto kLr, auto kWd, auto... mode) {
            const auto chunk = [&](auto kHyper) {
              Op::template backward<S, decltype(kHyper)::value, decltype(kLr)::value,
                                    decltype(kWd)::value, decltype(mode)::value...>(
                  args, hyper, buffers, o, n, segments[s], partial);
            };
            if constexpr (decltype(kLr)::value || decltype(kWd)::value) {
              chunk(std::true_type{});
            } else {
              with_bool(hyper.mask != 0, chunk);
            }
          });
        });
  });
  reduce_hyper_grads(partials, chunks, args.segments, H, hyper, args.hyper.is_double);
}

}  // namespace cpu
}  // namespace loft
