// CPU implementation of loft::adam_step and loft::adam_step_backward (contract and math:
// docs/ops.md, "Adam / AdamW"; per-element math: csrc/adam_math.h; memory walk:
// csrc/cpu/common.h). One pass over memory: chunks of at most kChunk elements in
// parallel, each running a loop specialised (templates) for its segment's amsgrad and
// decoupled-weight-decay flags.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../adam_math.h"
#include "common.h"

namespace loft {
namespace cpu {
namespace {

/// Checks every argument of adam_step (and the shared ones of its backward) before any
/// buffer memory is read; returns the validated segment table.
Segments check_adam_args(const char* op, const at::Tensor& params, const at::Tensor& grads,
                         const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const at::Tensor& max_exp_avg_sq, const at::Tensor& segments,
                         const at::Tensor& lr, const at::Tensor& beta1, const at::Tensor& beta2,
                         const at::Tensor& eps, const at::Tensor& weight_decay,
                         const at::Tensor& group_flags) {
  check_params(op, params);
  check_buffer(op, "grads", grads, params, /*may_be_empty=*/false);
  check_buffer(op, "exp_avg", exp_avg, params, /*may_be_empty=*/false);
  check_buffer(op, "exp_avg_sq", exp_avg_sq, params, /*may_be_empty=*/false);
  check_buffer(op, "max_exp_avg_sq", max_exp_avg_sq, params, /*may_be_empty=*/true);
  const int64_t groups = check_group_flags(op, group_flags, params, kAdamAllFlags);
  const at::ScalarType hyper_dtype = check_hyper_dtype(op, lr, params);
  check_hyper(op, "lr", lr, params, groups, hyper_dtype);
  check_hyper(op, "beta1", beta1, params, groups, hyper_dtype);
  check_hyper(op, "beta2", beta2, params, groups, hyper_dtype);
  check_hyper(op, "eps", eps, params, groups, hyper_dtype);
  check_hyper(op, "weight_decay", weight_decay, params, groups, hyper_dtype);
  const Segments seg = check_segments(op, segments, params, groups);
  check_optional_needed(op, "max_exp_avg_sq", max_exp_avg_sq, seg, group_flags, kAdamAmsgrad,
                        "amsgrad");
  return seg;
}

/// The per-segment scalars (bias corrections from the segment's own step), computed in
/// float64 and cast to the compute type T; with `bases`, also each segment's float64
/// basis for per-element lr / weight_decay.
template <typename T>
std::vector<AdamScalars<T>> adam_scalars(const Segments& seg, const at::Tensor& lr,
                                         const at::Tensor& beta1, const at::Tensor& beta2,
                                         const at::Tensor& eps, const at::Tensor& weight_decay,
                                         const at::Tensor& group_flags,
                                         std::vector<AdamBasis>* bases = nullptr) {
  const HyperValues lr_(lr), beta1_(beta1), beta2_(beta2), eps_(eps), wd_(weight_decay);
  const int64_t* flags = group_flags.data_ptr<int64_t>();
  std::vector<AdamScalars<T>> out(static_cast<size_t>(seg.count));
  if (bases != nullptr) bases->resize(static_cast<size_t>(seg.count));
  for (int64_t s = 0; s < seg.count; ++s) {
    const int64_t g = seg.group(s);
    out[s] = adam_segment_scalars(lr_[g], beta1_[g], beta2_[g], eps_[g], wd_[g], flags[g],
                                  seg.step(s), bases != nullptr ? &(*bases)[s] : nullptr)
                 .template cast<T>();
  }
  return out;
}

/// Makes `se` (a copy of the segment's scalars) element i's scalars when its lr and / or
/// weight_decay are per element (kLr, kWd); nothing otherwise.
template <bool kLr, bool kWd, typename T>
inline void set_element_scalars(AdamScalars<T>& se, const AdamBasis& basis,
                                const T* __restrict__ lr_e, const T* __restrict__ wd_e, int64_t i) {
  if constexpr (kLr || kWd) {
    adam_set_element_scalars(se, basis, kLr, kLr ? lr_e[i] : T(0), kWd, kWd ? wd_e[i] : T(0));
  }
}

/// Forward over one chunk of an active segment; vmax is read and written only with
/// amsgrad (otherwise the caller copies it through). lr_e / wd_e (kLr / kWd) are the
/// chunk's per-element lr and weight_decay.
template <bool kAmsgrad, bool kDecoupled, bool kLr, bool kWd, typename scalar_t, typename T>
void adam_forward_chunk(int64_t n, const scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                        const scalar_t* __restrict__ m, const scalar_t* __restrict__ v,
                        const scalar_t* __restrict__ vmax, const T* __restrict__ lr_e,
                        const T* __restrict__ wd_e, scalar_t* __restrict__ p_out,
                        scalar_t* __restrict__ m_out, scalar_t* __restrict__ v_out,
                        scalar_t* __restrict__ vmax_out, const AdamScalars<T> s,
                        const AdamBasis basis) {
  AdamScalars<T> se = s;  // the element's scalars: with kLr / kWd, updated per element
  for (int64_t i = 0; i < n; ++i) {
    set_element_scalars<kLr, kWd>(se, basis, lr_e, wd_e, i);
    T p_new, m_new, v_new, vmax_new;
    adam_forward<kAmsgrad, kDecoupled>(T(p[i]), T(g[i]), T(m[i]), T(v[i]),
                                       kAmsgrad ? T(vmax[i]) : T(0), se, p_new, m_new, v_new,
                                       vmax_new);
    p_out[i] = scalar_t(p_new);
    m_out[i] = scalar_t(m_new);
    v_out[i] = scalar_t(v_new);
    if (kAmsgrad) vmax_out[i] = scalar_t(vmax_new);
  }
}

/// adam_forward_chunk with the state read and written in place (adam_step_).
template <bool kAmsgrad, bool kDecoupled, bool kLr, bool kWd, typename scalar_t, typename T>
void adam_forward_chunk_inplace(int64_t n, const scalar_t* __restrict__ p,
                                const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
                                scalar_t* __restrict__ v, scalar_t* __restrict__ vmax,
                                const T* __restrict__ lr_e, const T* __restrict__ wd_e,
                                scalar_t* __restrict__ p_out, const AdamScalars<T> s,
                                const AdamBasis basis) {
  AdamScalars<T> se = s;  // the element's scalars: with kLr / kWd, updated per element
  for (int64_t i = 0; i < n; ++i) {
    set_element_scalars<kLr, kWd>(se, basis, lr_e, wd_e, i);
    T p_new, m_new, v_new, vmax_new;
    adam_forward<kAmsgrad, kDecoupled>(T(p[i]), T(g[i]), T(m[i]), T(v[i]),
                                       kAmsgrad ? T(vmax[i]) : T(0), se, p_new, m_new, v_new,
                                       vmax_new);
    p_out[i] = scalar_t(p_new);
    m[i] = scalar_t(m_new);
    v[i] = scalar_t(v_new);
    if (kAmsgrad) vmax[i] = scalar_t(vmax_new);
  }
}

/// Backward over one chunk of an active segment; with kHyper, writes the chunk's sums of the
/// kAdamNumHyper hyperparameter terms to partial[0..4] (unless it is null). vmax, X and grad_vmax
/// are used only with amsgrad (otherwise the caller copies X to grad_vmax). With a per-element lr
/// (kLr) or weight_decay (kWd), their terms are written per element to grad_lr_e / grad_wd_e when
/// those are not null (the gradient is wanted; kHyper is then set).
template <bool kAmsgrad, bool kDecoupled, bool kHyper, bool kLr, bool kWd, typename scalar_t,
          typename T>
void adam_backward_chunk(int64_t n, const scalar_t* __restrict__ P, const scalar_t* __restrict__ M,
                         const scalar_t* __restrict__ V, const scalar_t* __restrict__ X,
                         const scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                         const scalar_t* __restrict__ m, const scalar_t* __restrict__ v,
                         const scalar_t* __restrict__ vmax, const T* __restrict__ lr_e,
                         const T* __restrict__ wd_e, scalar_t* __restrict__ grad_p,
                         scalar_t* __restrict__ grad_g, scalar_t* __restrict__ grad_m,
                         scalar_t* __restrict__ grad_v, scalar_t* __restrict__ grad_vmax,
                         T* __restrict__ grad_lr_e, T* __restrict__ grad_wd_e,
                         const AdamScalars<T> s, const AdamBasis basis,
                         double* __restrict__ partial) {
  static_assert(kHyper || !(kLr || kWd), "per-element gradients are hyperparameter terms");
  T lanes[kAdamNumHyper][kLanes] = {};
  T terms[kAdamNumHyper][kBlock];
  AdamScalars<T> se = s;  // the element's scalars: with kLr / kWd, updated per element
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t count = std::min(kBlock, n - start);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = start + j;
      set_element_scalars<kLr, kWd>(se, basis, lr_e, wd_e, i);
      const AdamElementGrads<T> r = adam_backward<kAmsgrad, kDecoupled>(
          T(P[i]), T(M[i]), T(V[i]), kAmsgrad ? T(X[i]) : T(0), T(p[i]), T(g[i]), T(m[i]), T(v[i]),
          kAmsgrad ? T(vmax[i]) : T(0), se);
      grad_p[i] = scalar_t(r.params);
      grad_g[i] = scalar_t(r.grads);
      grad_m[i] = scalar_t(r.exp_avg);
      grad_v[i] = scalar_t(r.exp_avg_sq);
      if (kAmsgrad) grad_vmax[i] = scalar_t(r.max_exp_avg_sq);
      if (kHyper) {
        terms[0][j] = r.lr;
        terms[1][j] = r.beta1;
        terms[2][j] = r.beta2;
        terms[3][j] = r.eps;
        terms[4][j] = r.weight_decay;
      }
    }
    if (kHyper && partial != nullptr) {  // [G] gradients wanted
      for (int k = 0; k < kAdamNumHyper; ++k) add_to_lanes(lanes[k], terms[k], count);
    }
    // The per-element gradients are the block's lr / weight_decay terms (copied here, not
    // stored in the loop above: a conditional store there stops gcc vectorising it).
    if (kLr && grad_lr_e != nullptr) copy_elements(grad_lr_e + start, terms[0], count);
    if (kWd && grad_wd_e != nullptr) copy_elements(grad_wd_e + start, terms[4], count);
  }
  if (kHyper && partial != nullptr) {
    for (int k = 0; k < kAdamNumHyper; ++k) partial[k] = sum_lanes(lanes[k]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adam_step_cpu(
    const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
    const at::Tensor& exp_avg_sq, const at::Tensor& max_exp_avg_sq, const at::Tensor& segments,
    const at::Tensor& lr, const at::Tensor& beta1, const at::Tensor& beta2, const at::Tensor& eps,
    const at::Tensor& weight_decay, const at::Tensor& group_flags,
    const std::optional<at::Tensor>& lr_elementwise,
    const std::optional<at::Tensor>& weight_decay_elementwise) {
  const char* op = "adam_step";
  const Segments seg = check_adam_args(op, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq,
                                       segments, lr, beta1, beta2, eps, weight_decay, group_flags);
  const bool has_lr_e = check_elementwise(op, "lr_elementwise", lr_elementwise, params);
  const bool has_wd_e =
      check_elementwise(op, "weight_decay_elementwise", weight_decay_elementwise, params);
  const int64_t n = params.numel();
  at::Tensor params_out = at::empty({n}, params.options());
  at::Tensor exp_avg_out = at::empty({n}, params.options());
  at::Tensor exp_avg_sq_out = at::empty({n}, params.options());
  at::Tensor max_out = at::empty({max_exp_avg_sq.numel()}, params.options());
  if (n == 0) return {params_out, exp_avg_out, exp_avg_sq_out, max_out};
  const bool has_max = max_exp_avg_sq.numel() > 0;
  const std::vector<Chunk> chunks = make_chunks(seg);
  const int64_t* flags = group_flags.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params.scalar_type(), "adam_step_cpu", [&] {
        using T = compute_t<scalar_t>;
        std::vector<AdamBasis> bases;
        const std::vector<AdamScalars<T>> scalars =
            adam_scalars<T>(seg, lr, beta1, beta2, eps, weight_decay, group_flags,
                            has_lr_e || has_wd_e ? &bases : nullptr);
        const AdamBasis no_basis{};
        const Elementwise<T> elem =
            elementwise_data<T>(has_lr_e, lr_elementwise, has_wd_e, weight_decay_elementwise);
        const scalar_t* p = params.const_data_ptr<scalar_t>();
        const scalar_t* g = grads.const_data_ptr<scalar_t>();
        const scalar_t* m = exp_avg.const_data_ptr<scalar_t>();
        const scalar_t* v = exp_avg_sq.const_data_ptr<scalar_t>();
        const scalar_t* vmax = has_max ? max_exp_avg_sq.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* p_out = params_out.mutable_data_ptr<scalar_t>();
        scalar_t* m_out = exp_avg_out.mutable_data_ptr<scalar_t>();
        scalar_t* v_out = exp_avg_sq_out.mutable_data_ptr<scalar_t>();
        scalar_t* vmax_out = has_max ? max_out.mutable_data_ptr<scalar_t>() : nullptr;

        for_each_chunk(chunks, [&](int64_t, const Chunk& chunk) {
          const int64_t s = chunk.segment, o = chunk.begin, len = chunk.size;
          const int64_t f = flags[seg.group(s)];
          const bool amsgrad = (f & kAdamAmsgrad) != 0;
          if (!seg.active(s)) {
            copy_elements(p_out + o, p + o, len);
            copy_elements(m_out + o, m + o, len);
            copy_elements(v_out + o, v + o, len);
            if (has_max) copy_elements(vmax_out + o, vmax + o, len);
            return;
          }
          if (!amsgrad && has_max) copy_elements(vmax_out + o, vmax + o, len);
          with_adam_mode(f, [&](auto kAmsgrad, auto kDecoupled) {
            with_elementwise(has_lr_e, has_wd_e, [&](auto kLr, auto kWd) {
              adam_forward_chunk<decltype(kAmsgrad)::value, decltype(kDecoupled)::value,
                                 decltype(kLr)::value, decltype(kWd)::value>(
                  len, p + o, g + o, m + o, v + o, kAmsgrad ? vmax + o : nullptr,
                  kLr ? elem.lr + o : nullptr, kWd ? elem.weight_decay + o : nullptr, p_out + o,
                  m_out + o, v_out + o, kAmsgrad ? vmax_out + o : nullptr, scalars[s],
                  bases.empty() ? no_basis : bases[s]);
            });
          });
        });
      });
  return {params_out, exp_avg_out, exp_avg_sq_out, max_out};
}

/// Whether two buffers share any memory (an in-place state buffer must not).
bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const char* a0 = static_cast<const char*>(a.const_data_ptr());
  const char* b0 = static_cast<const char*>(b.const_data_ptr());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

at::Tensor adam_step_inplace_cpu(const at::Tensor& params, const at::Tensor& grads,
                                 at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                                 at::Tensor& max_exp_avg_sq, const at::Tensor& segments,
                                 const at::Tensor& lr, const at::Tensor& beta1,
                                 const at::Tensor& beta2, const at::Tensor& eps,
                                 const at::Tensor& weight_decay, const at::Tensor& group_flags,
                                 const std::optional<at::Tensor>& lr_elementwise,
                                 const std::optional<at::Tensor>& weight_decay_elementwise) {
  const char* op = "adam_step_";
  const Segments seg = check_adam_args(op, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq,
                                       segments, lr, beta1, beta2, eps, weight_decay, group_flags);
  const bool has_lr_e = check_elementwise(op, "lr_elementwise", lr_elementwise, params);
  const bool has_wd_e =
      check_elementwise(op, "weight_decay_elementwise", weight_decay_elementwise, params);
  const std::pair<const char*, const at::Tensor*> state[] = {
      {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}, {"max_exp_avg_sq", &max_exp_avg_sq}};
  for (size_t i = 0; i < 3; ++i) {
    const char* name = state[i].first;
    const at::Tensor& t = *state[i].second;
    TORCH_CHECK(!overlaps(t, params) && !overlaps(t, grads), op, ": ", name,
                " is updated in place and must not share memory with params or grads");
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK(!overlaps(t, *state[j].second), op, ": ", name,
                  " is updated in place and must not share memory with ", state[j].first);
    }
  }
  const int64_t n = params.numel();
  at::Tensor params_out = at::empty({n}, params.options());
  if (n == 0) return params_out;
  const bool has_max = max_exp_avg_sq.numel() > 0;
  const std::vector<Chunk> chunks = make_chunks(seg);
  const int64_t* flags = group_flags.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params.scalar_type(), "adam_step_inplace_cpu", [&] {
        using T = compute_t<scalar_t>;
        std::vector<AdamBasis> bases;
        const std::vector<AdamScalars<T>> scalars =
            adam_scalars<T>(seg, lr, beta1, beta2, eps, weight_decay, group_flags,
                            has_lr_e || has_wd_e ? &bases : nullptr);
        const AdamBasis no_basis{};
        const Elementwise<T> elem =
            elementwise_data<T>(has_lr_e, lr_elementwise, has_wd_e, weight_decay_elementwise);
        const scalar_t* p = params.const_data_ptr<scalar_t>();
        const scalar_t* g = grads.const_data_ptr<scalar_t>();
        scalar_t* m = exp_avg.mutable_data_ptr<scalar_t>();
        scalar_t* v = exp_avg_sq.mutable_data_ptr<scalar_t>();
        scalar_t* vmax = has_max ? max_exp_avg_sq.mutable_data_ptr<scalar_t>() : nullptr;
        scalar_t* p_out = params_out.mutable_data_ptr<scalar_t>();

        for_each_chunk(chunks, [&](int64_t, const Chunk& chunk) {
          const int64_t s = chunk.segment, o = chunk.begin, len = chunk.size;
          const int64_t f = flags[seg.group(s)];
          if (!seg.active(s)) {  // the state stays as it is
            copy_elements(p_out + o, p + o, len);
            return;
          }
          with_adam_mode(f, [&](auto kAmsgrad, auto kDecoupled) {
            with_elementwise(has_lr_e, has_wd_e, [&](auto kLr, auto kWd) {
              adam_forward_chunk_inplace<decltype(kAmsgrad)::value, decltype(kDecoupled)::value,
                                         decltype(kLr)::value, decltype(kWd)::value>(
                  len, p + o, g + o, m + o, v + o, kAmsgrad ? vmax + o : nullptr,
                  kLr ? elem.lr + o : nullptr, kWd ? elem.weight_decay + o : nullptr, p_out + o,
                  scalars[s], bases.empty() ? no_basis : bases[s]);
            });
          });
        });
      });
  return params_out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adam_step_backward_cpu(const at::Tensor& grad_params_out, const at::Tensor& grad_exp_avg_out,
                       const at::Tensor& grad_exp_avg_sq_out,
                       const at::Tensor& grad_max_exp_avg_sq_out, const at::Tensor& params,
                       const at::Tensor& grads, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, const at::Tensor& max_exp_avg_sq,
                       const at::Tensor& segments, const at::Tensor& lr, const at::Tensor& beta1,
                       const at::Tensor& beta2, const at::Tensor& eps,
                       const at::Tensor& weight_decay, const at::Tensor& group_flags,
                       int64_t hyper_grad_mask, const std::optional<at::Tensor>& lr_elementwise,
                       const std::optional<at::Tensor>& weight_decay_elementwise) {
  const char* op = "adam_step_backward";
  check_params(op, params);
  check_buffer(op, "grad_params_out", grad_params_out, params, /*may_be_empty=*/true);
  check_buffer(op, "grad_exp_avg_out", grad_exp_avg_out, params, /*may_be_empty=*/true);
  check_buffer(op, "grad_exp_avg_sq_out", grad_exp_avg_sq_out, params, /*may_be_empty=*/true);
  check_buffer(op, "grad_max_exp_avg_sq_out", grad_max_exp_avg_sq_out, params,
               /*may_be_empty=*/true);
  const Segments seg = check_adam_args(op, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq,
                                       segments, lr, beta1, beta2, eps, weight_decay, group_flags);
  const bool has_lr_e = check_elementwise(op, "lr_elementwise", lr_elementwise, params);
  const bool has_wd_e =
      check_elementwise(op, "weight_decay_elementwise", weight_decay_elementwise, params);
  const int64_t n = params.numel();
  // A hyperparameter given per element replaces the group's value everywhere: the [G]
  // tensor then gets a zero gradient, the per-element one (bits kAdamNumHyper + 0, + 1)
  // its gradient element by element.
  int64_t mask = hyper_grad_mask & ((1 << kAdamNumHyper) - 1);
  if (has_lr_e) mask &= ~(int64_t{1} << kAdamHyperLr);
  if (has_wd_e) mask &= ~(int64_t{1} << kAdamHyperWeightDecay);
  at::Tensor grad_params = at::empty({n}, params.options());
  at::Tensor grad_grads = at::empty({n}, params.options());
  at::Tensor grad_exp_avg = at::empty({n}, params.options());
  at::Tensor grad_exp_avg_sq = at::empty({n}, params.options());
  at::Tensor grad_max = at::empty({max_exp_avg_sq.numel()}, params.options());
  at::Tensor grad_lr_e =
      elementwise_grad(has_lr_e && ((hyper_grad_mask >> kAdamNumHyper) & 1), params);
  at::Tensor grad_wd_e =
      elementwise_grad(has_wd_e && ((hyper_grad_mask >> (kAdamNumHyper + 1)) & 1), params);
  const bool has_max = max_exp_avg_sq.numel() > 0;
  const std::vector<Chunk> chunks = make_chunks(seg);
  std::vector<double> partials(mask ? chunks.size() * kAdamNumHyper : 0, 0.0);
  const int64_t* flags = group_flags.data_ptr<int64_t>();

  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, params.scalar_type(), "adam_step_backward_cpu", [&] {
          using T = compute_t<scalar_t>;
          std::vector<AdamBasis> bases;
          const std::vector<AdamScalars<T>> scalars =
              adam_scalars<T>(seg, lr, beta1, beta2, eps, weight_decay, group_flags,
                              has_lr_e || has_wd_e ? &bases : nullptr);
          const AdamBasis no_basis{};
          const Elementwise<T> elem =
              elementwise_data<T>(has_lr_e, lr_elementwise, has_wd_e, weight_decay_elementwise);
          T* glr = grad_lr_e.numel() > 0 ? grad_lr_e.mutable_data_ptr<T>() : nullptr;
          T* gwd = grad_wd_e.numel() > 0 ? grad_wd_e.mutable_data_ptr<T>() : nullptr;
          // A 0-element upstream gradient reads as zeros (a static run of kChunk zeros that
          // every chunk indexes from 0, hence a stride of 0 for the chunk offset).
          const scalar_t* zeros = zeros_chunk<scalar_t>();
          auto upstream = [&](const at::Tensor& t, bool present, int64_t& stride) {
            stride = present ? 1 : 0;
            return present ? t.const_data_ptr<scalar_t>() : zeros;
          };
          int64_t P_stride, M_stride, V_stride, X_stride;
          const scalar_t* P = upstream(grad_params_out, grad_params_out.numel() > 0, P_stride);
          const scalar_t* M = upstream(grad_exp_avg_out, grad_exp_avg_out.numel() > 0, M_stride);
          const scalar_t* V =
              upstream(grad_exp_avg_sq_out, grad_exp_avg_sq_out.numel() > 0, V_stride);
          const scalar_t* X = upstream(grad_max_exp_avg_sq_out,
                                       has_max && grad_max_exp_avg_sq_out.numel() > 0, X_stride);
          const scalar_t* p = params.const_data_ptr<scalar_t>();
          const scalar_t* g = grads.const_data_ptr<scalar_t>();
          const scalar_t* m = exp_avg.const_data_ptr<scalar_t>();
          const scalar_t* v = exp_avg_sq.const_data_ptr<scalar_t>();
          const scalar_t* vmax = has_max ? max_exp_avg_sq.const_data_ptr<scalar_t>() : nullptr;
          scalar_t* gp = grad_params.mutable_data_ptr<scalar_t>();
          scalar_t* gg = grad_grads.mutable_data_ptr<scalar_t>();
          scalar_t* gm = grad_exp_avg.mutable_data_ptr<scalar_t>();
          scalar_t* gv = grad_exp_avg_sq.mutable_data_ptr<scalar_t>();
          scalar_t* gx = has_max ? grad_max.mutable_data_ptr<scalar_t>() : nullptr;

          for_each_chunk(chunks, [&](int64_t c, const Chunk& chunk) {
            const int64_t s = chunk.segment, o = chunk.begin, len = chunk.size;
            const scalar_t* P_o = P + o * P_stride;
            const scalar_t* M_o = M + o * M_stride;
            const scalar_t* V_o = V + o * V_stride;
            const scalar_t* X_o = X + o * X_stride;
            const int64_t f = flags[seg.group(s)];
            const bool amsgrad = (f & kAdamAmsgrad) != 0;
            if (!seg.active(s)) {
              copy_elements(gp + o, P_o, len);
              zero_elements(gg + o, len);
              copy_elements(gm + o, M_o, len);
              copy_elements(gv + o, V_o, len);
              if (has_max) copy_elements(gx + o, X_o, len);
              if (glr != nullptr) zero_elements(glr + o, len);
              if (gwd != nullptr) zero_elements(gwd + o, len);
              return;
            }
            if (!amsgrad && has_max) copy_elements(gx + o, X_o, len);
            double* partial = mask ? partials.data() + c * kAdamNumHyper : nullptr;
            with_adam_mode(f, [&](auto kAmsgrad, auto kDecoupled) {
              with_elementwise(has_lr_e, has_wd_e, [&](auto kLr, auto kWd) {
                constexpr bool kElementwise = decltype(kLr)::value || decltype(kWd)::value;
                with_hyper_terms<kElementwise>(mask != 0, [&](auto kHyper) {
                  adam_backward_chunk<decltype(kAmsgrad)::value, decltype(kDecoupled)::value,
                                      decltype(kHyper)::value, decltype(kLr)::value,
                                      decltype(kWd)::value>(
                      len, P_o, M_o, V_o, X_o, p + o, g + o, m + o, v + o,
                      kAmsgrad ? vmax + o : nullptr, kLr ? elem.lr + o : nullptr,
                      kWd ? elem.weight_decay + o : nullptr, gp + o, gg + o, gm + o, gv + o,
                      kAmsgrad ? gx + o : nullptr, glr != nullptr ? glr + o : nullptr,
                      gwd != nullptr ? gwd + o : nullptr, scalars[s],
                      bases.empty() ? no_basis : bases[s], partial);
                });
              });
            });
          });
        });
  }
  std::vector<at::Tensor> hyper =
      reduce_hyper_grads(partials, chunks, seg, kAdamNumHyper, mask, lr);
  return {grad_params, grad_grads, grad_exp_avg, grad_exp_avg_sq, grad_max,  hyper[0],
          hyper[1],    hyper[2],   hyper[3],     hyper[4],        grad_lr_e, grad_wd_e};
}

}  // namespace
}  // namespace cpu
}  // namespace loft

TORCH_LIBRARY_IMPL(loft, CPU, m) {
  m.impl("adam_step", &loft::cpu::adam_step_cpu);
  m.impl("adam_step_backward", &loft::cpu::adam_step_backward_cpu);
  m.impl("adam_step_", &loft::cpu::adam_step_inplace_cpu);
}
