// torch.ops.loft.bucket_step: one optimiser step over a bucket as ONE C++ autograd node.
//
// The Python step engine (python/loft/step.py) calls it once per bucket and step with the
// weights as the per-tensor views the model uses, their per-tensor gradients (None:
// inactive), the flat state, the [G] hyperparameters, the per-element ones (Meta-SGD),
// the segment table and the group flags. The node concatenates what the kernel reads
// flat, runs the fused kernel (sgd_step / adam_step, below autograd), and returns the
// new weights as views of one new flat buffer, then the new state buffers. Its backward
// runs the fused backward kernel directly; under grad mode (create_graph=True) it calls
// loft::step_backward_reference instead, the differentiable reference formulas
// (registered from Python), on inputs rebuilt with differentiable ops, so the step is
// differentiable to any order. The math and the Python twin of this node (used where no
// kernel is built): python/loft/step.py, _BucketStep.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <vector>

namespace loft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// What the node knows of an op kind (the order of loft._contract.OPS).
struct OpKind {
  const char* forward;
  const char* backward;
  bool linear;  // linear in its buffers: the backward reads none of their values
};
constexpr std::array<OpKind, 2> kKinds = {{{"loft::sgd_step", "loft::sgd_step_backward", true},
                                           {"loft::adam_step", "loft::adam_step_backward", false}}};

/// The dispatcher handles, looked up once: 0/1 forward, 2/3 backward, 4 the reference.
const c10::OperatorHandle& handle(size_t index) {
  static const std::vector<c10::OperatorHandle> handles = [] {
    std::vector<c10::OperatorHandle> out;
    for (const auto& kind : kKinds) out.push_back(c10::Dispatcher::singleton().findSchemaOrThrow(kind.forward, ""));
    for (const auto& kind : kKinds) out.push_back(c10::Dispatcher::singleton().findSchemaOrThrow(kind.backward, ""));
    out.push_back(c10::Dispatcher::singleton().findSchemaOrThrow("loft::step_backward_reference", ""));
    return out;
  }();
  return handles.at(index);
}

/// The sizes of the node's tensor groups, in the order of its inputs:
/// views[s], grads[present], state, hyper, elementwise (0 or 2), segments, flags.
struct Layout {
  int64_t kind = 0;
  int64_t s = 0;
  int64_t grads = 0;
  int64_t state = 0;
  int64_t hyper = 0;
  int64_t elementwise = 0;

  int64_t grads_at() const { return s; }
  int64_t state_at() const { return s + grads; }
  int64_t hyper_at() const { return state_at() + state; }
  int64_t elementwise_at() const { return hyper_at() + hyper; }
  int64_t segments_at() const { return elementwise_at() + elementwise; }
  int64_t flags_at() const { return segments_at() + 1; }
  int64_t size() const { return flags_at() + 1; }
};

/// The non-tensor arguments of the node (not autograd inputs).
struct Meta {
  Layout layout;
  std::vector<bool> present;  // per tensor: has a gradient this step
  at::Tensor base;            // the flat buffer the views are intact views of, or undefined
};

/// Whether `parts` (undefined: absent) can be gathered with plain copies into a buffer
/// like `like`: outside grad mode, on the CPU, contiguous and of its dtype.
bool copyable(const std::vector<at::Tensor>& parts, const at::Tensor& like) {
  if (at::GradMode::is_enabled() || !like.device().is_cpu()) return false;
  for (const auto& t : parts) {
    if (t.defined() && (!t.device().is_cpu() || t.scalar_type() != like.scalar_type() ||
                        !t.is_contiguous())) {
      return false;
    }
  }
  return true;
}

/// Scratch buffers for the flat inputs a kernel reads and nobody keeps (the gradients,
/// the upstream gradients), per thread, CPU only: a new buffer of a large bucket is new
/// memory each step, and on the CPU touching new pages (about 1 us per 4 kB) costs more
/// than the copy. A buffer is taken out while in use and handed back after the kernel.
class ScratchPool {
 public:
  static at::Tensor take(int64_t numel, const at::TensorOptions& options) {
    auto& pool = buffers();
    for (auto it = pool.begin(); it != pool.end(); ++it) {
      if (it->numel() == numel && it->scalar_type() == options.dtype().toScalarType()) {
        at::Tensor t = std::move(*it);
        pool.erase(it);
        return t;
      }
    }
    return at::empty({numel}, options);
  }
  /// Hands `t` back if it came from take() and nothing else holds it now.
  static void give_back(at::Tensor t) {
    if (!t.defined() || t.use_count() != 1 || t.storage().use_count() != 1 ||
        !t.device().is_cpu()) {
      return;
    }
    auto& pool = buffers();
    if (pool.size() >= kKept) pool.erase(pool.begin());
    pool.push_back(std::move(t));
  }

 private:
  static constexpr size_t kKept = 4;
  static std::vector<at::Tensor>& buffers() {
    thread_local std::vector<at::Tensor> pool;
    return pool;
  }
};

/// One flat buffer of `parts` (undefined: zeros of numels[i]) in the dtype and device of
/// `like`; differentiable under grad mode. On the CPU outside grad mode, one allocation
/// (a ScratchPool buffer with `scratch`: the caller hands it back) and a memcpy per part.
at::Tensor flatten(const std::vector<at::Tensor>& parts, const std::vector<int64_t>& numels,
                   const at::Tensor& like, bool scratch = false) {
  if (parts.empty()) return like.new_empty({0});
  if (copyable(parts, like)) {
    int64_t total = 0;
    for (int64_t n : numels) total += n;
    at::Tensor flat = scratch ? ScratchPool::take(total, like.options())
                              : at::empty({total}, like.options());
    char* out = static_cast<char*>(flat.data_ptr());
    const size_t item = flat.element_size();
    for (size_t i = 0; i < parts.size(); ++i) {
      const size_t bytes = static_cast<size_t>(numels[i]) * item;
      if (parts[i].defined()) {
        std::memcpy(out, parts[i].const_data_ptr(), bytes);
      } else {
        std::memset(out, 0, bytes);
      }
      out += bytes;
    }
    return flat;
  }
  std::vector<at::Tensor> flat;
  flat.reserve(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    const at::Tensor& t = parts[i];
    if (!t.defined()) {
      flat.push_back(at::zeros({numels[i]}, like.options()));
    } else {
      flat.push_back(t.reshape({-1}).to(like.options()));
    }
  }
  return at::cat(flat);
}

/// The contiguous strides of `shape`.
std::vector<int64_t> strides_of(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t stride = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    strides[d] = stride;
    stride *= std::max<int64_t>(shape[d], 1);
  }
  return strides;
}

/// Part `i` of `flat` (at `offset`), shaped `shape`: one as_strided view outside grad
/// mode, differentiable narrow + view under it.
at::Tensor part_of(const at::Tensor& flat, int64_t offset, const std::vector<int64_t>& shape,
                   int64_t numel) {
  if (!at::GradMode::is_enabled()) {
    return flat.as_strided(shape, strides_of(shape), flat.storage_offset() + offset);
  }
  return flat.narrow(0, offset, numel).view(shape);
}

std::vector<int64_t> numels_of(const std::vector<std::vector<int64_t>>& shapes) {
  std::vector<int64_t> out;
  out.reserve(shapes.size());
  for (const auto& shape : shapes) out.push_back(c10::multiply_integers(shape));
  return out;
}

/// `flat` cut into `shapes` (views), where `wanted`; undefined elsewhere.
std::vector<at::Tensor> cut(const at::Tensor& flat, const std::vector<std::vector<int64_t>>& shapes,
                            const std::vector<bool>& wanted) {
  std::vector<at::Tensor> out(shapes.size());
  int64_t offset = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const int64_t n = c10::multiply_integers(shapes[i]);
    if (wanted[i]) out[i] = part_of(flat, offset, shapes[i], n);
    offset += n;
  }
  return out;
}

/// Runs `op` boxed with `args`, returning its tensor outputs (a Tensor[] output flattened).
std::vector<at::Tensor> call(const c10::OperatorHandle& op, std::vector<c10::IValue> stack) {
  op.callBoxed(stack);
  std::vector<at::Tensor> out;
  for (auto& value : stack) {
    if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorList()) out.push_back(t);
    } else {
      out.push_back(value.toTensor());
    }
  }
  return out;
}

/// The kernel-order arguments after the upstream gradients: params, grads, state...,
/// segments, hyper..., flags.
void push_inputs(std::vector<c10::IValue>& stack, const at::Tensor& params, const at::Tensor& grads,
                 const std::vector<at::Tensor>& state, const at::Tensor& segments,
                 const std::vector<at::Tensor>& hyper, const at::Tensor& flags) {
  stack.emplace_back(params);
  stack.emplace_back(grads);
  for (const auto& t : state) stack.emplace_back(t);
  stack.emplace_back(segments);
  for (const auto& t : hyper) stack.emplace_back(t);
  stack.emplace_back(flags);
}

void push_elementwise(std::vector<c10::IValue>& stack, const std::vector<at::Tensor>& elementwise) {
  for (size_t k = 0; k < 2; ++k) {
    if (k < elementwise.size()) {
      stack.emplace_back(elementwise[k]);
    } else {
      stack.emplace_back();
    }
  }
}

std::vector<at::Tensor> slice(at::TensorList v, int64_t at, int64_t n) {
  return std::vector<at::Tensor>(v.begin() + at, v.begin() + at + n);
}

std::vector<int64_t> encode(const Layout& l, const std::vector<bool>& present, bool values_saved,
                            const std::vector<std::vector<int64_t>>& shapes) {
  std::vector<int64_t> out = {l.kind, l.s, l.grads, l.state, l.hyper, l.elementwise, values_saved};
  for (bool p : present) out.push_back(p);
  for (const auto& shape : shapes) {
    out.push_back(static_cast<int64_t>(shape.size()));
    out.insert(out.end(), shape.begin(), shape.end());
  }
  return out;
}

struct Decoded {
  Layout layout;
  bool values_saved = false;
  std::vector<bool> present;
  std::vector<std::vector<int64_t>> shapes;
};

Decoded decode(c10::ArrayRef<int64_t> code) {
  Decoded d;
  d.layout = Layout{code[0], code[1], code[2], code[3], code[4], code[5]};
  d.values_saved = code[6] != 0;
  size_t at = 7;
  for (int64_t i = 0; i < d.layout.s; ++i) d.present.push_back(code[at++] != 0);
  for (int64_t i = 0; i < d.layout.s; ++i) {
    const int64_t ndim = code[at++];
    d.shapes.emplace_back(code.begin() + at, code.begin() + at + ndim);
    at += ndim;
  }
  return d;
}

/// Whether the weights' gradient is the new weights' upstream gradient unchanged: no
/// weight decay anywhere (the decay in effect: the per-element one where given), known
/// without a device sync (CPU) and not itself wanting a gradient.
bool params_pass_through(const std::vector<at::Tensor>& hyper,
                         const std::vector<at::Tensor>& elementwise) {
  const at::Tensor& wd = elementwise.size() == 2 && elementwise[1].numel() > 0 ? elementwise[1]
                                                                               : hyper.back();
  if (!wd.device().is_cpu() || wd.requires_grad()) return false;
  const at::Tensor values = wd.contiguous();
  bool zero = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "bucket_step", [&] {
    const scalar_t* p = values.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < values.numel() && zero; ++i) zero = static_cast<double>(p[i]) == 0.0;
  });
  return zero;
}

class BucketStep : public torch::autograd::Function<BucketStep> {
 public:
  static variable_list forward(AutogradContext* ctx, const Meta& meta, at::TensorList inputs) {
    const Layout& l = meta.layout;
    const OpKind& kind = kKinds.at(l.kind);
    const auto views = slice(inputs, 0, l.s);
    std::vector<std::vector<int64_t>> shapes;
    shapes.reserve(l.s);
    for (const auto& v : views) shapes.push_back(v.sizes().vec());
    const std::vector<int64_t> numels = numels_of(shapes);
    std::vector<at::Tensor> grads(l.s);
    for (int64_t i = 0, k = l.grads_at(); i < l.s; ++i) {
      if (meta.present[i]) grads[i] = inputs[k++];
    }
    const auto state = slice(inputs, l.state_at(), l.state);
    const auto hyper = slice(inputs, l.hyper_at(), l.hyper);
    const auto elementwise = slice(inputs, l.elementwise_at(), l.elementwise);
    const at::Tensor& segments = inputs[l.segments_at()];
    const at::Tensor& flags = inputs[l.flags_at()];

    const at::Tensor params = meta.base.defined() ? meta.base : flatten(views, numels, views[0]);
    at::Tensor flat_grads = flatten(grads, numels, params, /*scratch=*/true);
    std::vector<c10::IValue> stack;
    stack.reserve(16);
    push_inputs(stack, params, flat_grads, state, segments, hyper, flags);
    push_elementwise(stack, elementwise);
    std::vector<at::Tensor> outs;
    {
      at::AutoDispatchBelowAutograd below;
      outs = call(handle(l.kind), std::move(stack));
    }
    ScratchPool::give_back(std::move(flat_grads));

    // Hyperparameter gradients (group or per element) read the buffers' values.
    bool values_saved = !kind.linear;
    for (int64_t i = l.hyper_at(); i < l.segments_at(); ++i) {
      values_saved = values_saved || inputs[i].requires_grad();
    }
    ctx->saved_data["m"] = encode(l, meta.present, values_saved, shapes);
    if (values_saved) {
      variable_list saved;
      saved.reserve(inputs.size() + 1);
      saved.push_back(params);
      saved.insert(saved.end(), inputs.begin(), inputs.end());
      ctx->save_for_backward(saved);
    } else {
      // Linear in the buffers and no hyperparameter gradient wanted: the backward reads
      // none of their values; a per-element lr or weight decay is a factor, so it is kept.
      std::vector<int64_t> state_numels;
      for (const auto& t : state) state_numels.push_back(t.numel());
      ctx->saved_data["n"] = state_numels;
      variable_list saved(inputs.begin() + l.hyper_at(), inputs.end());
      ctx->save_for_backward(saved);
    }
    ctx->set_materialize_grads(false);

    variable_list result = cut(outs[0], shapes, std::vector<bool>(l.s, true));
    result.insert(result.end(), outs.begin() + 1, outs.end());
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Decoded d = decode(ctx->saved_data["m"].toIntList().vec());
    const Layout& l = d.layout;
    const int64_t n_inputs = l.size();
    variable_list result(1 + n_inputs);  // the Meta argument first
    const auto up_views = slice(grad_outputs, 0, l.s);
    const auto up_state_in = slice(grad_outputs, l.s, static_cast<int64_t>(grad_outputs.size()) - l.s);
    const at::Tensor* any = nullptr;
    for (const auto& g : grad_outputs) {
      if (g.defined()) {
        any = &g;
        break;
      }
    }
    if (any == nullptr) return result;
    std::vector<bool> needs(n_inputs);
    for (int64_t i = 0; i < n_inputs; ++i) needs[i] = ctx->needs_input_grad(i);
    const bool differentiable = at::GradMode::is_enabled();
    const std::vector<int64_t> numels = numels_of(d.shapes);

    const variable_list saved = ctx->get_saved_variables();
    at::Tensor params, flat_grads;
    std::vector<at::Tensor> state, hyper, elementwise;
    at::Tensor segments, flags;
    int64_t mask = 0;
    // The tail both kinds of save share: hyper, elementwise, segments, flags.
    auto read_tail = [&](int64_t at) {
      hyper = slice(saved, at, l.hyper);
      elementwise = slice(saved, at + l.hyper, l.elementwise);
      segments = saved[at + l.hyper + l.elementwise];
      flags = saved[at + l.hyper + l.elementwise + 1];
    };
    if (d.values_saved) {
      params = saved[0];
      const auto views = slice(saved, 1, l.s);
      std::vector<at::Tensor> grads(l.s);
      for (int64_t i = 0, k = 1 + l.grads_at(); i < l.s; ++i) {
        if (d.present[i]) grads[i] = saved[k++];
      }
      state = slice(saved, 1 + l.state_at(), l.state);
      read_tail(1 + l.hyper_at());
      if (differentiable) {
        // Rebuild the flat inputs with differentiable ops so that a second backward
        // reaches the views and the per-tensor gradients.
        params = flatten(views, numels, params);
      }
      flat_grads = flatten(grads, numels, params, /*scratch=*/!differentiable);
      for (int64_t k = 0; k < l.hyper; ++k) {
        if (needs[l.hyper_at() + k]) mask |= int64_t{1} << k;
      }
      for (int64_t k = 0; k < l.elementwise; ++k) {
        if (needs[l.elementwise_at() + k]) mask |= int64_t{1} << (l.hyper + k);
      }
    } else {
      read_tail(0);
    }

    // Upstream: the new weights' as one flat buffer (empty if none), the state's as given.
    const at::Tensor empty = any->new_empty({0});
    bool any_view = false;
    for (const auto& g : up_views) any_view = any_view || g.defined();
    at::Tensor up_params = any_view ? flatten(up_views, numels, *any, !differentiable) : empty;
    std::vector<at::Tensor> up_state;
    for (const auto& g : up_state_in) up_state.push_back(g.defined() ? g.contiguous() : empty);

    if (!d.values_saved) {
      // Any tensor of the right size stands in for the weights, gradients and state.
      at::Tensor stand_in = up_params.numel() > 0 ? up_params : up_state[0];
      for (const auto& g : up_state) {
        if (stand_in.numel() == 0 && g.numel() > 0) stand_in = g;
      }
      stand_in = stand_in.detach();
      params = flat_grads = stand_in;
      const auto state_numels = ctx->saved_data["n"].toIntList().vec();
      for (int64_t n : state_numels) state.push_back(n > 0 ? stand_in : stand_in.new_empty({0}));
    }

    std::vector<c10::IValue> stack;
    std::vector<at::Tensor> grads_out;
    if (differentiable) {
      std::vector<at::Tensor> args = {up_params};
      args.insert(args.end(), up_state.begin(), up_state.end());
      args.push_back(params);
      args.push_back(flat_grads);
      args.insert(args.end(), state.begin(), state.end());
      args.push_back(segments);
      args.insert(args.end(), hyper.begin(), hyper.end());
      args.push_back(flags);
      args.insert(args.end(), elementwise.begin(), elementwise.end());
      stack = {c10::IValue(l.kind), c10::IValue(args), c10::IValue(mask)};
      grads_out = call(handle(2 * kKinds.size()), std::move(stack));
    } else {
      stack.emplace_back(up_params);
      for (const auto& g : up_state) stack.emplace_back(g);
      push_inputs(stack, params, flat_grads, state, segments, hyper, flags);
      stack.emplace_back(mask);
      push_elementwise(stack, elementwise);
      at::AutoDispatchBelowAutograd below;
      grads_out = call(handle(kKinds.size() + l.kind), std::move(stack));
    }
    // The scratch inputs go back to the pool (the stand-ins of a linear step are views of
    // up_params' memory only through these names, released here first).
    if (!differentiable) {
      if (!d.values_saved) {
        params = flat_grads = at::Tensor();
        state.clear();
      }
      ScratchPool::give_back(std::move(flat_grads));
      ScratchPool::give_back(std::move(up_params));
    }

    // grads_out: params, grads, state..., hyper..., elementwise (2).
    at::Tensor* out = result.data() + 1;
    const std::vector<bool> view_needs(needs.begin(), needs.begin() + l.s);
    if (params_pass_through(hyper, elementwise)) {
      for (int64_t i = 0; i < l.s; ++i) {
        if (!view_needs[i]) continue;
        out[i] = up_views[i].defined() ? up_views[i] : at::zeros(d.shapes[i], any->options());
      }
    } else {
      const auto parts = cut(grads_out[0], d.shapes, view_needs);
      for (int64_t i = 0; i < l.s; ++i) out[i] = parts[i];
    }
    std::vector<bool> grad_needs(l.s);
    for (int64_t i = 0, k = l.grads_at(); i < l.s; ++i) {
      if (d.present[i]) grad_needs[i] = needs[k++];
    }
    const auto grad_parts = cut(grads_out[1], d.shapes, grad_needs);
    for (int64_t i = 0, k = l.grads_at(); i < l.s; ++i) {
      if (d.present[i]) out[k++] = grad_parts[i];
    }
    for (int64_t j = 0; j < l.state; ++j) {
      if (needs[l.state_at() + j]) out[l.state_at() + j] = grads_out[2 + j];
    }
    for (int64_t j = 0; j < l.hyper; ++j) {
      if (needs[l.hyper_at() + j]) out[l.hyper_at() + j] = grads_out[2 + l.state + j];
    }
    for (int64_t j = 0; j < l.elementwise; ++j) {
      if (needs[l.elementwise_at() + j]) out[l.elementwise_at() + j] = grads_out[2 + l.state + l.hyper + j];
    }
    return result;
  }
};

std::vector<at::Tensor> bucket_step(int64_t kind, const std::optional<at::Tensor>& base,
                                    at::TensorList views,
                                    const c10::List<std::optional<at::Tensor>>& grads,
                                    at::TensorList state, at::TensorList hyper,
                                    at::TensorList elementwise, const at::Tensor& segments,
                                    const at::Tensor& group_flags) {
  TORCH_CHECK(kind >= 0 && kind < static_cast<int64_t>(kKinds.size()),
              "bucket_step: kind must be 0 (SGD) or 1 (Adam), got ", kind);
  TORCH_CHECK(!views.empty(), "bucket_step: views must hold at least one tensor");
  TORCH_CHECK(grads.size() == views.size(), "bucket_step: grads must have one entry per view (",
              views.size(), "), got ", grads.size());
  TORCH_CHECK(elementwise.empty() || elementwise.size() == 2,
              "bucket_step: elementwise must be empty or (lr_elementwise, "
              "weight_decay_elementwise), got ", elementwise.size(), " tensors");
  TORCH_CHECK(!hyper.empty(), "bucket_step: hyper must not be empty");
  Meta meta;
  meta.layout.kind = kind;
  meta.layout.s = static_cast<int64_t>(views.size());
  meta.layout.state = static_cast<int64_t>(state.size());
  meta.layout.hyper = static_cast<int64_t>(hyper.size());
  meta.layout.elementwise = static_cast<int64_t>(elementwise.size());
  if (base.has_value()) meta.base = *base;
  std::vector<at::Tensor> inputs(views.begin(), views.end());
  inputs.reserve(views.size() * 2 + state.size() + hyper.size() + elementwise.size() + 2);
  meta.present.reserve(views.size());
  for (const std::optional<at::Tensor>& g : grads) {
    const bool present = g.has_value() && g->defined();
    meta.present.push_back(present);
    if (present) inputs.push_back(*g);
  }
  meta.layout.grads = static_cast<int64_t>(inputs.size()) - meta.layout.s;
  inputs.insert(inputs.end(), state.begin(), state.end());
  inputs.insert(inputs.end(), hyper.begin(), hyper.end());
  inputs.insert(inputs.end(), elementwise.begin(), elementwise.end());
  inputs.push_back(segments);
  inputs.push_back(group_flags);
  return BucketStep::apply(meta, at::TensorList(inputs));
}

}  // namespace

TORCH_LIBRARY_IMPL(loft, Autograd, m) { m.impl("bucket_step", &bucket_step); }
TORCH_LIBRARY_IMPL(loft, CompositeExplicitAutograd, m) { m.impl("bucket_step", &bucket_step); }

}  // namespace loft
