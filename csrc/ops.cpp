// Schemas of loft's fused optimiser ops. Implementations register per backend
// (csrc/cpu/, csrc/cuda/); the contract of every argument is in docs/ops.md.
//
// lr_elementwise / weight_decay_elementwise (optional, last): per-element values that
// replace the group's lr / weight_decay for every element (Meta-SGD). The backward ops
// take them after hyper_grad_mask and return their gradients last (mask bits H, H + 1,
// with H the number of [G] hyperparameters).
#include <torch/library.h>

TORCH_LIBRARY(loft, m) {
  m.def(
      "sgd_step(Tensor params, Tensor grads, Tensor momentum_buffer, Tensor segments, "
      "Tensor lr, Tensor momentum, Tensor dampening, Tensor weight_decay, Tensor group_flags, "
      "Tensor? lr_elementwise=None, Tensor? weight_decay_elementwise=None) -> (Tensor, Tensor)");
  m.def(
      "sgd_step_backward(Tensor grad_params_out, Tensor grad_momentum_buffer_out, "
      "Tensor params, Tensor grads, Tensor momentum_buffer, Tensor segments, "
      "Tensor lr, Tensor momentum, Tensor dampening, Tensor weight_decay, Tensor group_flags, "
      "int hyper_grad_mask, Tensor? lr_elementwise=None, "
      "Tensor? weight_decay_elementwise=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
  m.def(
      "adam_step(Tensor params, Tensor grads, Tensor exp_avg, Tensor exp_avg_sq, "
      "Tensor max_exp_avg_sq, Tensor segments, Tensor lr, Tensor beta1, Tensor beta2, "
      "Tensor eps, Tensor weight_decay, Tensor group_flags, Tensor? lr_elementwise=None, "
      "Tensor? weight_decay_elementwise=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "adam_step_backward(Tensor grad_params_out, Tensor grad_exp_avg_out, "
      "Tensor grad_exp_avg_sq_out, Tensor grad_max_exp_avg_sq_out, Tensor params, Tensor grads, "
      "Tensor exp_avg, Tensor exp_avg_sq, Tensor max_exp_avg_sq, Tensor segments, Tensor lr, "
      "Tensor beta1, Tensor beta2, Tensor eps, Tensor weight_decay, Tensor group_flags, "
      "int hyper_grad_mask, Tensor? lr_elementwise=None, "
      "Tensor? weight_decay_elementwise=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // adam_step with the state updated in place (CPU only): for a caller that owns the
  // state buffers and needs only the new ones (loft's first-order fast path), so that
  // no new state memory is touched each step. Returns the new params.
  m.def(
      "adam_step_(Tensor params, Tensor grads, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, "
      "Tensor(c!) max_exp_avg_sq, Tensor segments, Tensor lr, Tensor beta1, Tensor beta2, "
      "Tensor eps, Tensor weight_decay, Tensor group_flags, Tensor? lr_elementwise=None, "
      "Tensor? weight_decay_elementwise=None) -> Tensor");
  // One optimiser step over a bucket as one autograd node (csrc/bucket_step.cpp): the
  // weights as views, their gradients (None: inactive), the state, the [G] and per-element
  // hyperparameters; returns the new weights (views of one new flat buffer), then the new
  // state. kind: the op, in the order of loft._contract.OPS (0 sgd_step, 1 adam_step).
  m.def(
      "bucket_step(int kind, Tensor? base, Tensor[] views, Tensor?[] grads, Tensor[] state, "
      "Tensor[] hyper, Tensor[] elementwise, Tensor segments, Tensor group_flags) -> Tensor[]");
  // The differentiable reference formulas of <op>_backward (registered from Python,
  // loft/ops.py): what bucket_step's backward calls when it is differentiated itself.
  // args: the backward op's tensor arguments in order, without hyper_grad_mask.
  m.def("step_backward_reference(int kind, Tensor[] args, int hyper_grad_mask) -> Tensor[]");
}
