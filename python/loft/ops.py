"""Typed, differentiable wrappers of ``torch.ops.loft.*``, and the kernels the step engine calls.

Every op has three Python pieces (contract: :mod:`loft._contract`, ``docs/ops.md``):

- a **typed wrapper** (:func:`sgd_step`, :func:`adam_step`) whose docstring gives the
  math; it runs the fused kernel when one is built for the tensors' device and
  :mod:`loft.reference` otherwise;
- a **fake kernel** (``torch.library.register_fake``) for torch.compile and meta tensors;
- its **autograd**: one definition per op (:func:`_op_backward`), registered on the raw
  ``torch.ops.loft.*`` ops and applied by the typed wrappers (:class:`_FlatStep`, which
  also serves the reference fallback, where no raw op exists).

The backward runs the fused ``*_backward`` kernel. When it runs under grad mode itself
(``create_graph=True``), it computes the same derivative with the differentiable
reference formulas instead, so the op is twice differentiable.

:func:`forward_kernel`, :func:`inplace_kernel` and :func:`backward_kernel` are what
:mod:`loft.step` calls inside its own autograd node (one per bucket and step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from loft import _ext, reference
from loft._contract import ADAM, ELEMENTWISE, OPS, SGD, OpContract, compute_dtype

__all__ = ["sgd_step", "adam_step", "SGD_HYPER", "ADAM_HYPER", "ELEMENTWISE",
           "forward_kernel", "inplace_kernel", "backward_kernel"]

#: Hyperparameter names, in schema order (bit k of hyper_grad_mask is the k-th).
SGD_HYPER = SGD.hyper
ADAM_HYPER = ADAM.hyper

# --------------------------------------------------------------------------------------
# The kernels
# --------------------------------------------------------------------------------------

#: ``torch.ops.loft.<name>`` below autograd, by name (looked up once: the op namespace
#: lookup costs more than a small step's kernel).
_RAW: dict[str, Callable[..., Any]] = {}


def _raw(name: str) -> Callable[..., Any]:
    """``torch.ops.loft.<name>`` called below the autograd dispatch key: skips the op's
    own (Python) autograd and its redispatch, which cost more than a small bucket's kernel."""
    fn = _RAW.get(name)
    if fn is None:
        op = getattr(torch.ops.loft, name).default

        def fn(*args: Any) -> Any:
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)

        _RAW[name] = fn
    return fn


def forward_kernel(op: OpContract, device: torch.device) -> Callable[..., Any]:
    """``op``'s forward for tensors on ``device``, not recorded by autograd: the fused
    kernel where one is built, else the reference (validating its inputs)."""
    if _ext.has_device_kernels(device):
        return _raw(op.name)
    return getattr(reference, op.name)


def inplace_kernel(op: OpContract, device: torch.device) -> Callable[..., Any] | None:
    """``<op>_``, the step that overwrites the state with the new state and returns the new
    params, for ``device``; ``None`` where there is none (only the CPU has one: CUDA's
    caching allocator already reuses the state's memory)."""
    if op.inplace and device.type == "cpu" and _ext.has_device_kernels(device):
        return _raw(op.name + "_")
    return None


def backward_kernel(op: OpContract, device: torch.device,
                    differentiable: bool) -> Callable[..., Any]:
    """``<op>_backward`` for ``device``: the fused kernel, or the differentiable reference
    formulas when the backward is itself differentiated (``differentiable``) or no kernel
    is built. Its inputs were validated by the forward."""
    if not differentiable and _ext.has_device_kernels(device):
        return _raw(op.backward_name)
    return functools.partial(getattr(reference, op.backward_name), check=False)


# --------------------------------------------------------------------------------------
# Autograd: one definition per op
# --------------------------------------------------------------------------------------

def _op_backward(op: OpContract, saved: Sequence[Tensor], needs: Sequence[bool],
                 grad_outputs: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
    """The gradients of ``op``'s inputs (``saved``: the forward's inputs, per-element
    hyperparameters included when given; ``needs``: which inputs want one)."""
    forward = op.forward_slots
    params = saved[0]
    empty = params.new_empty(0)
    # Autograd may hand over expanded or strided gradients; the kernels read flat memory.
    upstream = [g.contiguous() if g is not None else empty for g in grad_outputs]
    elementwise = list(saved[forward.elementwise])
    elementwise += [None] * (len(ELEMENTWISE) - len(elementwise))
    mask = op.hyper_grad_mask(needs[forward.hyper], needs[forward.elementwise])
    fn = backward_kernel(op, params.device, differentiable=torch.is_grad_enabled())
    result = fn(*upstream, *saved[:forward.elementwise.start], mask, *elementwise)
    grads = op.grad_slots
    out: list[Tensor | None] = [None] * len(needs)
    for position, g in zip(range(forward.buffers.start, forward.buffers.stop),
                           result[grads.buffers]):
        out[position] = g
    for position, g in zip(range(forward.hyper.start, forward.hyper.stop), result[grads.hyper]):
        out[position] = g
    for position, g in zip(range(forward.elementwise.start, len(needs)),
                           result[grads.elementwise]):
        out[position] = g
    return tuple(g if need else None for g, need in zip(out, needs))


def _save_inputs(ctx: Any, inputs: Sequence[Any]) -> None:
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)


class _FlatStep(torch.autograd.Function):
    """``op(*inputs)`` with :func:`_op_backward` as its derivative, for the typed wrappers
    (the raw ops have the same derivative registered; the reference fallback has no raw op)."""

    @staticmethod
    def forward(op: OpContract, *inputs: Tensor | None) -> tuple[Tensor, ...]:  # type: ignore[override]
        return forward_kernel(op, inputs[0].device)(*inputs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.op = inputs[0]
        _save_inputs(ctx, inputs[1:])

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple:  # type: ignore[override]
        return (None, *_op_backward(ctx.op, ctx.saved_tensors, ctx.needs_input_grad[1:],
                                    grad_outputs))


def sgd_step(params: Tensor, grads: Tensor, momentum_buffer: Tensor, segments: Tensor,
             lr: Tensor, momentum: Tensor, dampening: Tensor, weight_decay: Tensor,
             group_flags: Tensor, lr_elementwise: Tensor | None = None,
             weight_decay_elementwise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Differentiable fused SGD step over one flat bucket (``torch.ops.loft.sgd_step``).

    For every active segment (``first``: its step count is 0):

    .. math::
        g_2 = \pm g + \lambda p,\quad
        b' = g_2 \text{ (first) or } \mu b + (1-\tau) g_2,\quad
        p' = p - \eta\,(g_2 + \mu b' \text{ | } b' \text{ | } g_2)

    (nesterov | momentum | plain); higher's ``p - lr * g`` with a tensor ``lr`` shaped like
    the parameter (Meta-SGD) is ``lr_elementwise``: ``[N]`` values that replace the
    group's :math:`\eta` for every element (likewise ``weight_decay_elementwise`` for
    :math:`\lambda`; None or 0 elements: absent). Arguments and flags: ``docs/ops.md``.
    Returns ``(params_out, momentum_buffer_out)``; differentiable (twice) with respect
    to the buffers, the ``[G]`` hyperparameter tensors and the per-element ones.
    """
    return _FlatStep.apply(SGD, params, grads, momentum_buffer, segments, lr, momentum,
                           dampening, weight_decay, group_flags, lr_elementwise,
                           weight_decay_elementwise)


def adam_step(params: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
              max_exp_avg_sq: Tensor, segments: Tensor, lr: Tensor, beta1: Tensor,
              beta2: Tensor, eps: Tensor, weight_decay: Tensor, group_flags: Tensor,
              lr_elementwise: Tensor | None = None,
              weight_decay_elementwise: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Differentiable fused Adam/AdamW step over one flat bucket (``torch.ops.loft.adam_step``).

    For every active segment, :math:`t` = its step count + 1:

    .. math::
        m' = \beta_1 m + (1-\beta_1) g_2,\quad v' = \beta_2 v + (1-\beta_2) g_2^2,\quad
        p' = p_0 - \frac{\eta}{1-\beta_1^t}\frac{m'}{\sqrt{u}/\sqrt{1-\beta_2^t} + \epsilon}

    with :math:`u = \max(v_{max}, v')` under amsgrad, and either L2 decay
    (:math:`g_2 = \pm g + \lambda p`) or AdamW's decoupled decay
    (:math:`p_0 = (1 - \eta\lambda) p`). ``lr_elementwise`` / ``weight_decay_elementwise``:
    ``[N]`` values that replace the group's :math:`\eta` / :math:`\lambda` for every
    element, in every term that contains them (None or 0 elements: absent). Arguments and
    flags: ``docs/ops.md``. Returns ``(params_out, exp_avg_out, exp_avg_sq_out,
    max_exp_avg_sq_out)``.
    """
    return _FlatStep.apply(ADAM, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, segments,
                           lr, beta1, beta2, eps, weight_decay, group_flags, lr_elementwise,
                           weight_decay_elementwise)


# --------------------------------------------------------------------------------------
# Registrations on the raw torch.ops.loft ops (once the library is loaded)
# --------------------------------------------------------------------------------------

def _fake_forward(op: OpContract) -> Callable[..., Any]:
    def fake(*args: Tensor) -> tuple[Tensor, ...]:
        buffers = args[op.forward_slots.buffers]
        outputs = [buffers[0], *buffers[2:]]  # every buffer but grads
        return tuple(b.new_empty(b.numel()) for b in outputs)

    return fake


def _fake_backward(op: OpContract) -> Callable[..., Any]:
    slots = op.backward_slots

    def fake(*args: Any) -> tuple[Tensor, ...]:
        mask = args[slots.mask]
        elementwise = list(args[slots.elementwise]) + [None] * len(ELEMENTWISE)
        params = args[slots.buffers][0]
        elementwise_dtype = compute_dtype(params.dtype)
        grads = tuple(b.new_empty(b.numel()) for b in args[slots.buffers]) + tuple(
            h.new_empty(h.numel()) for h in args[slots.hyper])
        for k in range(len(ELEMENTWISE)):
            e = elementwise[k]
            wanted = e is not None and e.numel() > 0 and mask & op.elementwise_bit(k)
            grads += (params.new_empty(params.numel() if wanted else 0, dtype=elementwise_dtype),)
        return grads

    return fake


def _backward_of_backward(op: OpContract) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Autograd for ``<op>_backward``: the VJP of the differentiable reference formulas."""
    slots = op.backward_slots
    differentiable = {*range(slots.upstream.start, slots.buffers.stop),
                      *range(slots.hyper.start, slots.hyper.stop),
                      *range(slots.elementwise.start, slots.elementwise.stop)}

    def setup(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.positions = [i for i, x in enumerate(inputs) if isinstance(x, Tensor)]
        ctx.num_inputs = len(inputs)
        ctx.mask = inputs[slots.mask]
        ctx.save_for_backward(*[inputs[i] for i in ctx.positions])

    def backward(ctx: Any, *grads: Tensor | None) -> tuple:
        args: list[Any] = [None] * ctx.num_inputs
        args[slots.mask] = ctx.mask
        with torch.enable_grad():
            leaves = []
            for i, x in zip(ctx.positions, ctx.saved_tensors):
                args[i] = x.detach().requires_grad_(i in differentiable and x.is_floating_point())
                leaves.append(args[i])
            outs = getattr(reference, op.backward_name)(*args, check=False)
            pairs = [(o, g) for o, g in zip(outs, grads)
                     if g is not None and o.requires_grad and o.numel() > 0]
            wrt = [x for x in leaves if x.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                      allow_unused=True) if pairs else [None] * len(wrt)
        it = iter(got)
        result: list[Tensor | None] = [None] * ctx.num_inputs
        for i, x in zip(ctx.positions, leaves):
            if x.requires_grad:
                g = next(it)
                result[i] = torch.zeros_like(x) if g is None else g
        return tuple(result)

    return setup, backward


def _step_backward_reference(kind: int, args: list[Tensor], hyper_grad_mask: int) -> list[Tensor]:
    """``loft::step_backward_reference``: ``<op>_backward`` by the differentiable reference
    formulas (``args``: its tensor arguments in order, without the mask), for the C++ step
    node's backward when that is differentiated itself (``create_graph=True``)."""
    op = OPS[kind]
    head = op.backward_slots.mask
    result = getattr(reference, op.backward_name)(*args[:head], hyper_grad_mask, *args[head:],
                                                  check=False)
    return [t if t is not None else args[head - 1].new_empty(0) for t in result]


def _register_python_parts() -> None:
    """Fake kernels and autograd for ``torch.ops.loft.*`` (called once the ops exist)."""
    torch.library.impl("loft::step_backward_reference", "CompositeImplicitAutograd")(
        _step_backward_reference)
    for op in OPS:
        torch.library.register_fake(f"loft::{op.name}", _fake_forward(op))
        torch.library.register_fake(f"loft::{op.backward_name}", _fake_backward(op))
        torch.library.register_autograd(
            f"loft::{op.name}",
            lambda ctx, *g, _op=op: _op_backward(_op, ctx.saved_tensors, ctx.needs_input_grad, g),
            setup_context=lambda ctx, inputs, output: _save_inputs(ctx, inputs),
        )
        setup, backward = _backward_of_backward(op)
        torch.library.register_autograd(f"loft::{op.backward_name}", backward,
                                        setup_context=setup)
        if op.inplace:
            torch.library.register_fake(f"loft::{op.name}_",
                                        lambda params, *args: params.new_empty(params.numel()))


_ext.on_load(_register_python_parts)
