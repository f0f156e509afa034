// CPU implementation of loft::sgd_step and loft::sgd_step_backward (contract and math:
// docs/ops.md, "SGD"; per-element math: csrc/sgd_math.h; memory walk: csrc/cpu/common.h).
// One pass over memory: chunks of at most kChunk elements in parallel, each running a
// loop specialised (templates) for its segment's momentum / first-step / nesterov flags.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../sgd_math.h"
#include "common.h"

namespace loft {
namespace cpu {
namespace {

/// Checks every argument of sgd_step (and the shared ones of its backward) before any
/// buffer memory is read; returns the validated segment table.
Segments check_sgd_args(const char* op, const at::Tensor& params, const at::Tensor& grads,
                        const at::Tensor& momentum_buffer, const at::Tensor& segments,
                        const at::Tensor& lr, const at::Tensor& momentum,
                        const at::Tensor& dampening, const at::Tensor& weight_decay,
                        const at::Tensor& group_flags) {
  check_params(op, params);
  check_buffer(op, "grads", grads, params, /*may_be_empty=*/false);
  check_buffer(op, "momentum_buffer", momentum_buffer, params, /*may_be_empty=*/true);
  const int64_t groups = check_group_flags(op, group_flags, params, kSgdAllFlags);
  const at::ScalarType hyper_dtype = check_hyper_dtype(op, lr, params);
  check_hyper(op, "lr", lr, params, groups, hyper_dtype);
  check_hyper(op, "momentum", momentum, params, groups, hyper_dtype);
  check_hyper(op, "dampening", dampening, params, groups, hyper_dtype);
  check_hyper(op, "weight_decay", weight_decay, params, groups, hyper_dtype);
  const Segments seg = check_segments(op, segments, params, groups);
  check_optional_needed(op, "momentum_buffer", momentum_buffer, seg, group_flags, kSgdMomentum,
                        "momentum");
  return seg;
}

/// The per-segment scalars, computed in float64 and cast to the compute type T.
template <typename T>
std::vector<SgdScalars<T>> sgd_scalars(const Segments& seg, const at::Tensor& lr,
                                       const at::Tensor& momentum, const at::Tensor& dampening,
                                       const at::Tensor& weight_decay,
                                       const at::Tensor& group_flags) {
  const HyperValues lr_(lr), mom_(momentum), damp_(dampening), wd_(weight_decay);
  const int64_t* flags = group_flags.data_ptr<int64_t>();
  std::vector<SgdScalars<T>> out(static_cast<size_t>(seg.count));
  for (int64_t s = 0; s < seg.count; ++s) {
    const int64_t g = seg.group(s);
    out[s] = sgd_segment_scalars(lr_[g], mom_[g], damp_[g], wd_[g], flags[g]).template cast<T>();
  }
  return out;
}

/// Forward over one chunk of an active segment. The buffer is read only when the update
/// uses it (momentum, not the first step) and written only with momentum (otherwise the
/// caller copies it through). lr_e / wd_e (kLr / kWd) are the chunk's per-element lr and
/// weight_decay.
template <bool kMomentum, bool kFirst, bool kNesterov, bool kLr, bool kWd, typename scalar_t,
          typename T>
void sgd_forward_chunk(int64_t n, const scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                       const scalar_t* __restrict__ b, const T* __restrict__ lr_e,
                       const T* __restrict__ wd_e, scalar_t* __restrict__ p_out,
                       scalar_t* __restrict__ b_out, const SgdScalars<T> s) {
  constexpr bool kReadsBuffer = kMomentum && !kFirst;
  SgdScalars<T> se = s;  // the element's scalars: with kLr / kWd, updated per element
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (kLr || kWd) {
      sgd_set_element_scalars(se, kLr, kLr ? lr_e[i] : T(0), kWd, kWd ? wd_e[i] : T(0));
    }
    T p_new, b_new;
    sgd_forward<kMomentum, kFirst, kNesterov>(T(p[i]), T(g[i]), kReadsBuffer ? T(b[i]) : T(0), se,
                                              p_new, b_new);
    p_out[i] = scalar_t(p_new);
    if (kMomentum) b_out[i] = scalar_t(b_new);
  }
}

/// Backward over one chunk of an active segment; with kHyper, writes the chunk's sums of the
/// kSgdNumHyper hyperparameter terms to partial[0..3] (unless it is null). With a per-element lr
/// (kLr) or weight_decay (kWd), their terms are written per element to grad_lr_e / grad_wd_e when
/// those are not null (the gradient is wanted; kHyper is then set).
template <bool kMomentum, bool kFirst, bool kNesterov, bool kHyper, bool kLr, bool kWd,
          typename scalar_t, typename T>
void sgd_backward_chunk(int64_t n, const scalar_t* __restrict__ P, const scalar_t* __restrict__ B,
                        const scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                        const scalar_t* __restrict__ b, const T* __restrict__ lr_e,
                        const T* __restrict__ wd_e, scalar_t* __restrict__ grad_p,
                        scalar_t* __restrict__ grad_g, scalar_t* __restrict__ grad_b,
                        T* __restrict__ grad_lr_e, T* __restrict__ grad_wd_e, const SgdScalars<T> s,
                        double* __restrict__ partial) {
  static_assert(kHyper || !(kLr || kWd), "per-element gradients are hyperparameter terms");
  constexpr bool kReadsBuffer = kMomentum && !kFirst;
  T lanes[kSgdNumHyper][kLanes] = {};
  T terms[kSgdNumHyper][kBlock];
  SgdScalars<T> se = s;  // the element's scalars: with kLr / kWd, updated per element
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t count = std::min(kBlock, n - start);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = start + j;
      if constexpr (kLr || kWd) {
        sgd_set_element_scalars(se, kLr, kLr ? lr_e[i] : T(0), kWd, kWd ? wd_e[i] : T(0));
      }
      const SgdElementGrads<T> r = sgd_backward<kMomentum, kFirst, kNesterov>(
          T(P[i]), kMomentum ? T(B[i]) : T(0), T(p[i]), T(g[i]), kReadsBuffer ? T(b[i]) : T(0), se);
      grad_p[i] = scalar_t(r.params);
      grad_g[i] = scalar_t(r.grads);
      if (kMomentum) grad_b[i] = scalar_t(r.momentum_buffer);
      if (kHyper) {
        terms[0][j] = r.lr;
        terms[1][j] = r.momentum;
        terms[2][j] = r.dampening;
        terms[3][j] = r.weight_decay;
      }
    }
    if (kHyper && partial != nullptr) {  // [G] gradients wanted
      for (int k = 0; k < kSgdNumHyper; ++k) add_to_lanes(lanes[k], terms[k], count);
    }
    // The per-element gradients are the block's lr / weight_decay terms (copied here, not
    // stored in the loop above: a conditional store there stops gcc vectorising it).
    if (kLr && grad_lr_e != nullptr) copy_elements(grad_lr_e + start, terms[0], count);
    if (kWd && grad_wd_e != nullptr) copy_elements(grad_wd_e + start, terms[3], count);
  }
  if (kHyper && partial != nullptr) {
    for (int k = 0; k < kSgdNumHyper; ++k) partial[k] = sum_lanes(lanes[k]);
  }
}

std::tuple<at::Tensor, at::Tensor> sgd_step_cpu(
    const at::Tensor& params, const at::Tensor& grads, const at::Tensor& momentum_buffer,
    const at::Tensor& segments, const at::Tensor& lr, const at::Tensor& momentum,
    const at::Tensor& dampening, const at::Tensor& weight_decay, const at::Tensor& group_flags,
    const std::optional<at::Tensor>& lr_elementwise,
    const std::optional<at::Tensor>& weight_decay_elementwise) {
  const char* op = "sgd_step";
  const Segments seg = check_sgd_args(op, params, grads, momentum_buffer, segments, lr, momentum,
                                      dampening, weight_decay, group_flags);
  const bool has_lr_e = check_elementwise(op, "lr_elementwise", lr_elementwise, params);
  const bool has_wd_e =
      check_elementwise(op, "weight_decay_elementwise", weight_decay_elementwise, params);
  const int64_t n = params.numel();
  at::Tensor params_out = at::empty({n}, params.options());
  at::Tensor buffer_out = at::empty({momentum_buffer.numel()}, params.options());
  if (n == 0) return {params_out, buffer_out};
  const bool has_buffer = momentum_buffer.numel() > 0;
  const std::vector<Chunk> chunks = make_chunks(seg);
  const int64_t* flags = group_flags.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params.scalar_type(), "sgd_step_cpu", [&] {
        using T = compute_t<scalar_t>;
        const std::vector<SgdScalars<T>> scalars =
            sgd_scalars<T>(seg, lr, momentum, dampening, weight_decay, group_flags);
        const Elementwise<T> elem =
            elementwise_data<T>(has_lr_e, lr_elementwise, has_wd_e, weight_decay_elementwise);
        const scalar_t* p = params.const_data_ptr<scalar_t>();
        const scalar_t* g = grads.const_data_ptr<scalar_t>();
        const scalar_t* b = has_buffer ? momentum_buffer.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* p_out = params_out.mutable_data_ptr<scalar_t>();
        scalar_t* b_out = has_buffer ? buffer_out.mutable_data_ptr<scalar_t>() : nullptr;

        for_each_chunk(chunks, [&](int64_t, const Chunk& chunk) {
          const int64_t s = chunk.segment, o = chunk.begin, len = chunk.size;
          const int64_t f = flags[seg.group(s)];
          const bool use_momentum = (f & kSgdMomentum) != 0;
          if (!seg.active(s)) {
            copy_elements(p_out + o, p + o, len);
            if (has_buffer) copy_elements(b_out + o, b + o, len);
            return;
          }
          if (!use_momentum && has_buffer) copy_elements(b_out + o, b + o, len);
          with_sgd_mode(f, seg.step(s), [&](auto kMomentum, auto kFirst, auto kNesterov) {
            with_elementwise(has_lr_e, has_wd_e, [&](auto kLr, auto kWd) {
              sgd_forward_chunk<decltype(kMomentum)::value, decltype(kFirst)::value,
                                decltype(kNesterov)::value, decltype(kLr)::value,
                                decltype(kWd)::value>(
                  len, p + o, g + o, kMomentum ? b + o : nullptr, kLr ? elem.lr + o : nullptr,
                  kWd ? elem.weight_decay + o : nullptr, p_out + o, kMomentum ? b_out + o : nullptr,
                  scalars[s]);
            });
          });
        });
      });
  return {params_out, buffer_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
sgd_step_backward_cpu(const at::Tensor& grad_params_out, const at::Tensor& grad_momentum_buffer_out,
                      const at::Tensor& params, const at::Tensor& grads,
                      const at::Tensor& momentum_buffer, const at::Tensor& segments,
                      const at::Tensor& lr, const at::Tensor& momentum, const at::Tensor& dampening,
                      const at::Tensor& weight_decay, const at::Tensor& group_flags,
                      int64_t hyper_grad_mask, const std::optional<at::Tensor>& lr_elementwise,
                      const std::optional<at::Tensor>& weight_decay_elementwise) {
  const char* op = "sgd_step_backward";
  check_params(op, params);
  check_buffer(op, "grad_params_out", grad_params_out, params, /*may_be_empty=*/true);
  check_buffer(op, "grad_momentum_buffer_out", grad_momentum_buffer_out, params,
               /*may_be_empty=*/true);
  const Segments seg = check_sgd_args(op, params, grads, momentum_buffer, segments, lr, momentum,
                                      dampening, weight_decay, group_flags);
  const bool has_lr_e = check_elementwise(op, "lr_elementwise", lr_elementwise, params);
  const bool has_wd_e =
      check_elementwise(op, "weight_decay_elementwise", weight_decay_elementwise, params);
  const int64_t n = params.numel();
  // A hyperparameter given per element replaces the group's value everywhere: the [G]
  // tensor then gets a zero gradient, and the per-element one (bits kSgdNumHyper + 0, + 1)
  // its gradient element by element.
  int64_t mask = hyper_grad_mask & ((1 << kSgdNumHyper) - 1);
  if (has_lr_e) mask &= ~(int64_t{1} << kSgdHyperLr);
  if (has_wd_e) mask &= ~(int64_t{1} << kSgdHyperWeightDecay);
  at::Tensor grad_params = at::empty({n}, params.options());
  at::Tensor grad_grads = at::empty({n}, params.options());
  at::Tensor grad_buffer = at::empty({momentum_buffer.numel()}, params.options());
  at::Tensor grad_lr_e =
      elementwise_grad(has_lr_e && ((hyper_grad_mask >> kSgdNumHyper) & 1), params);
  at::Tensor grad_wd_e =
      elementwise_grad(has_wd_e && ((hyper_grad_mask >> (kSgdNumHyper + 1)) & 1), params);
  const bool has_buffer = momentum_buffer.numel() > 0;
  const std::vector<Chunk> chunks = make_chunks(seg);
  std::vector<double> partials(mask ? chunks.size() * kSgdNumHyper : 0, 0.0);
  const int64_t* flags = group_flags.data_ptr<int64_t>();

  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, params.scalar_type(), "sgd_step_backward_cpu", [&] {
          using T = compute_t<scalar_t>;
          const std::vector<SgdScalars<T>> scalars =
              sgd_scalars<T>(seg, lr, momentum, dampening, weight_decay, group_flags);
          const Elementwise<T> elem =
              elementwise_data<T>(has_lr_e, lr_elementwise, has_wd_e, weight_decay_elementwise);
          T* glr = grad_lr_e.numel() > 0 ? grad_lr_e.mutable_data_ptr<T>() : nullptr;
          T* gwd = grad_wd_e.numel() > 0 ? grad_wd_e.mutable_data_ptr<T>() : nullptr;
          // A 0-element upstream gradient reads as zeros (a static run of kChunk zeros that
          // every chunk indexes from 0); `stride` is 0 for it so that chunk offsets vanish.
          const scalar_t* zeros = zeros_chunk<scalar_t>();
          const bool has_P = grad_params_out.numel() > 0;
          const bool has_B = has_buffer && grad_momentum_buffer_out.numel() > 0;
          const scalar_t* P = has_P ? grad_params_out.const_data_ptr<scalar_t>() : zeros;
          const scalar_t* B = has_B ? grad_momentum_buffer_out.const_data_ptr<scalar_t>() : zeros;
          const int64_t P_stride = has_P ? 1 : 0, B_stride = has_B ? 1 : 0;
          const scalar_t* p = params.const_data_ptr<scalar_t>();
          const scalar_t* g = grads.const_data_ptr<scalar_t>();
          const scalar_t* b = has_buffer ? momentum_buffer.const_data_ptr<scalar_t>() : nullptr;
          scalar_t* gp = grad_params.mutable_data_ptr<scalar_t>();
          scalar_t* gg = grad_grads.mutable_data_ptr<scalar_t>();
          scalar_t* gb = has_buffer ? grad_buffer.mutable_data_ptr<scalar_t>() : nullptr;

          for_each_chunk(chunks, [&](int64_t c, const Chunk& chunk) {
            const int64_t s = chunk.segment, o = chunk.begin, len = chunk.size;
            const scalar_t* P_o = P + o * P_stride;
            const scalar_t* B_o = B + o * B_stride;
            const int64_t f = flags[seg.group(s)];
            const bool use_momentum = (f & kSgdMomentum) != 0;
            if (!seg.active(s)) {
              copy_elements(gp + o, P_o, len);
              zero_elements(gg + o, len);
              if (has_buffer) copy_elements(gb + o, B_o, len);
              if (glr != nullptr) zero_elements(glr + o, len);
              if (gwd != nullptr) zero_elements(gwd + o, len);
              return;
            }
            if (!use_momentum && has_buffer) copy_elements(gb + o, B_o, len);
            double* partial = mask ? partials.data() + c * kSgdNumHyper : nullptr;
            with_sgd_mode(f, seg.step(s), [&](auto kMomentum, auto kFirst, auto kNesterov) {
              with_elementwise(has_lr_e, has_wd_e, [&](auto kLr, auto kWd) {
                constexpr bool kElementwise = decltype(kLr)::value || decltype(kWd)::value;
                with_hyper_terms<kElementwise>(mask != 0, [&](auto kHyper) {
                  sgd_backward_chunk<decltype(kMomentum)::value, decltype(kFirst)::value,
                                     decltype(kNesterov)::value, decltype(kHyper)::value,
                                     decltype(kLr)::value, decltype(kWd)::value>(
                      len, P_o, B_o, p + o, g + o, kMomentum ? b + o : nullptr,
                      kLr ? elem.lr + o : nullptr, kWd ? elem.weight_decay + o : nullptr, gp + o,
                      gg + o, kMomentum ? gb + o : nullptr, glr != nullptr ? glr + o : nullptr,
                      gwd != nullptr ? gwd + o : nullptr, scalars[s], partial);
                });
              });
            });
          });
        });
  }
  std::vector<at::Tensor> hyper = reduce_hyper_grads(partials, chunks, seg, kSgdNumHyper, mask, lr);
  return {grad_params, grad_grads, grad_buffer, hyper[0], hyper[1],
          hyper[2],    hyper[3],   grad_lr_e,   grad_wd_e};
}

}  // namespace
}  // namespace cpu
}  // namespace loft

TORCH_LIBRARY_IMPL(loft, CPU, m) {
  m.impl("sgd_step", &loft::cpu::sgd_step_cpu);
  m.impl("sgd_step_backward", &loft::cpu::sgd_step_backward_cpu);
}
