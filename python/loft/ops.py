"""Typed, differentiable wrappers of ``torch.ops.loft.*``.

Every op has three Python pieces:

- a **typed wrapper** (:func:`sgd_step`, :func:`adam_step`) whose docstring gives the
  math; it is a :class:`torch.autograd.Function` (works with ``torch.func`` too) that
  runs the fused kernel when one is built for the tensors' device and
  :mod:`loft.reference` otherwise;
- a **fake kernel** (``torch.library.register_fake``) for torch.compile and meta tensors;
- an **autograd registration** (``torch.library.register_autograd``) on the raw ops, so
  ``torch.ops.loft.*`` are differentiable when called directly.

The backward runs the fused ``*_backward`` kernel. When it runs under grad mode itself
(``create_graph=True``), it computes the same derivative with the differentiable
reference formulas instead, so the op is twice differentiable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from loft import _ext, reference

__all__ = ["sgd_step", "adam_step", "SGD_HYPER", "ADAM_HYPER", "ELEMENTWISE"]

#: Hyperparameter names, in schema order (bit k of hyper_grad_mask is the k-th).
SGD_HYPER = ("lr", "momentum", "dampening", "weight_decay")
ADAM_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay")
#: The optional per-element hyperparameters, last in every op's schema (the backward ops
#: take them after hyper_grad_mask); bits H and H + 1 of hyper_grad_mask, with H the
#: number of [G] hyperparameters, ask for their gradients.
ELEMENTWISE = ("lr_elementwise", "weight_decay_elementwise")


class _Spec:
    """What distinguishes one optimiser op from another in the shared autograd code."""

    def __init__(self, name: str, num_buffers: int, hyper: Sequence[str], values_needed: bool,
                 inplace: bool = False):
        self.name = name
        # Whether ``torch.ops.loft.<name>_`` exists (CPU): the step with the state updated
        # in place, returning only the new params.
        self.inplace = inplace
        # False: with no hyperparameter gradient wanted, the backward does not read the
        # values of the input buffers (the step is linear in them).
        self.values_needed = values_needed
        self.num_buffers = num_buffers  # params, grads, state...
        self.hyper = tuple(hyper)
        self.segments_index = num_buffers
        self.hyper_start = num_buffers + 1
        self.num_outputs = num_buffers - 1  # every buffer but grads
        # The forward's inputs before the per-element hyperparameters: buffers, segments,
        # hyperparameters, group_flags.
        self.num_inputs = num_buffers + 1 + len(self.hyper) + 1
        self._kernels: dict[str, Callable[..., Any]] = {}

    def _kernel(self, suffix: str) -> Callable[..., Any]:
        """``torch.ops.loft.<name><suffix>`` called below autograd (looked up once: the op
        namespace lookup costs more than a small step's kernel)."""
        fn = self._kernels.get(suffix)
        if fn is None:
            fn = _below_autograd(getattr(torch.ops.loft, self.name + suffix).default)
            self._kernels[suffix] = fn
        return fn

    def forward_fn(self, device: torch.device) -> Callable[..., Any]:
        if _ext.has_device_kernels(device):
            # Inside autograd.Function.forward: straight to the kernel.
            return self._kernel("")
        return getattr(reference, self.name)

    def inplace_fn(self, device: torch.device) -> Callable[..., Any] | None:
        """The in-place-state kernel for ``device``, or ``None`` where there is none (only
        the CPU has one: CUDA's caching allocator already reuses the state's memory)."""
        if self.inplace and device.type == "cpu" and _ext.has_device_kernels(device):
            return self._kernel("_")
        return None

    def backward_fn(self, device: torch.device, differentiable: bool) -> Callable[..., Any]:
        if not differentiable and _ext.has_device_kernels(device):
            # Not differentiated again (grad mode is off).
            return self._kernel("_backward")
        # The forward already validated these inputs.
        return functools.partial(getattr(reference, self.name + "_backward"), check=False)


def _below_autograd(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op`` called below the autograd dispatch key: skips the op's own (Python) autograd
    registration and its redispatch, which cost more than the kernel on small buckets."""

    def call(*args: Any) -> Any:
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return call


_SGD = _Spec("sgd_step", 3, SGD_HYPER, values_needed=False)
_ADAM = _Spec("adam_step", 5, ADAM_HYPER, values_needed=True, inplace=True)


def _elementwise_mask(spec: _Spec, wanted: Sequence[bool]) -> int:
    """The hyper_grad_mask bits of the per-element hyperparameters whose gradient is
    ``wanted`` (bits H, H + 1)."""
    return sum(1 << (len(spec.hyper) + k) for k, want in enumerate(wanted) if want)


def _backward(spec: _Spec, ctx: Any, grad_outputs: Sequence[Tensor | None]) -> tuple:
    saved = ctx.saved_tensors
    params = saved[0]
    empty = params.new_empty(0)
    # Autograd may hand over expanded or strided gradients; the kernels read flat memory.
    upstream = [g.contiguous() if g is not None else empty for g in grad_outputs]
    needs = ctx.needs_input_grad
    forward_inputs = saved[:spec.num_inputs]
    elementwise = list(saved[spec.num_inputs:])
    elementwise += [None] * (len(ELEMENTWISE) - len(elementwise))
    mask = 0
    for k in range(len(spec.hyper)):
        if needs[spec.hyper_start + k]:
            mask |= 1 << k
    mask |= _elementwise_mask(spec, needs[spec.num_inputs:])
    fn = spec.backward_fn(params.device, differentiable=torch.is_grad_enabled())
    result = fn(*upstream, *forward_inputs, mask, *elementwise)
    num_hyper = len(spec.hyper)
    buffer_grads = list(result[: spec.num_buffers])
    hyper_grads = list(result[spec.num_buffers:spec.num_buffers + num_hyper])
    elementwise_grads = list(result[spec.num_buffers + num_hyper:])
    out: list[Tensor | None] = []
    for i, g in enumerate(buffer_grads):
        out.append(g if needs[i] else None)
    out.append(None)  # segments
    for k, g in enumerate(hyper_grads):
        out.append(g if needs[spec.hyper_start + k] else None)
    out.append(None)  # group_flags
    for k, need in enumerate(needs[spec.num_inputs:]):
        out.append(elementwise_grads[k] if need else None)
    return tuple(out)


def _setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
    ctx.save_for_backward(*inputs)
    if hasattr(ctx, "set_materialize_grads"):
        ctx.set_materialize_grads(False)


class _SGDStep(torch.autograd.Function):
    @staticmethod
    def forward(*args: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return _SGD.forward_fn(args[0].device)(*args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple:  # type: ignore[override]
        return _backward(_SGD, ctx, grad_outputs)


class _AdamStep(torch.autograd.Function):
    @staticmethod
    def forward(*args: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        return _ADAM.forward_fn(args[0].device)(*args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple:  # type: ignore[override]
        return _backward(_ADAM, ctx, grad_outputs)


def sgd_step(
    params: Tensor,
    grads: Tensor,
    momentum_buffer: Tensor,
    segments: Tensor,
    lr: Tensor,
    momentum: Tensor,
    dampening: Tensor,
    weight_decay: Tensor,
    group_flags: Tensor,
    lr_elementwise: Tensor | None = None,
    weight_decay_elementwise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
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
    return _SGDStep.apply(params, grads, momentum_buffer, segments, lr, momentum, dampening,
                          weight_decay, group_flags, lr_elementwise, weight_decay_elementwise)


def adam_step(
    params: Tensor,
    grads: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor,
    segments: Tensor,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    group_flags: Tensor,
    lr_elementwise: Tensor | None = None,
    weight_decay_elementwise: Tensor | None = None,
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
    return _AdamStep.apply(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, segments, lr,
                           beta1, beta2, eps, weight_decay, group_flags, lr_elementwise,
                           weight_decay_elementwise)


# --------------------------------------------------------------------------------------
# Registrations on the raw torch.ops.loft ops (done once, after the library loads).
# --------------------------------------------------------------------------------------

_REGISTERED = False


def _fake_forward(spec: _Spec) -> Callable[..., Any]:
    def fake(*args: Tensor) -> tuple[Tensor, ...]:
        buffers = [args[0]] + list(args[2: spec.num_buffers])
        return tuple(b.new_empty(b.numel()) for b in buffers)

    return fake


def _fake_backward(spec: _Spec) -> Callable[..., Any]:
    def fake(*args: Any) -> tuple[Tensor, ...]:
        mask_index = spec.num_outputs + spec.num_inputs
        inputs = args[spec.num_outputs:mask_index]
        mask = args[mask_index]
        elementwise = list(args[mask_index + 1:]) + [None] * len(ELEMENTWISE)
        buffers = inputs[: spec.num_buffers]
        hyper = inputs[spec.hyper_start: spec.hyper_start + len(spec.hyper)]
        params = buffers[0]
        elementwise_dtype = reference.compute_dtype(params.dtype)
        grads = tuple(b.new_empty(b.numel()) for b in buffers) + tuple(
            h.new_empty(h.numel()) for h in hyper
        )
        for k in range(len(ELEMENTWISE)):
            e = elementwise[k]
            wanted = e is not None and e.numel() > 0 and (mask >> (len(spec.hyper) + k)) & 1
            grads += (params.new_empty(params.numel() if wanted else 0, dtype=elementwise_dtype),)
        return grads

    return fake


def _backward_of_backward(spec: _Spec) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Autograd for ``*_backward`` ops: the VJP of the differentiable reference formulas."""
    # Positions among the backward op's inputs: the upstream gradients and the buffers
    # (one run), the hyperparameters, and the per-element hyperparameters after the mask.
    mask_index = spec.num_outputs + spec.num_inputs
    differentiable = set(range(spec.num_outputs + spec.num_buffers)) | {
        spec.num_outputs + spec.hyper_start + k for k in range(len(spec.hyper))
    } | {mask_index + 1 + k for k in range(len(ELEMENTWISE))}

    def setup(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.positions = [i for i, x in enumerate(inputs) if isinstance(x, Tensor)]
        ctx.num_inputs = len(inputs)
        ctx.mask = inputs[mask_index]
        ctx.save_for_backward(*[inputs[i] for i in ctx.positions])

    def backward(ctx: Any, *grads: Tensor | None) -> tuple:
        args: list[Any] = [None] * ctx.num_inputs
        args[mask_index] = ctx.mask
        with torch.enable_grad():
            leaves = []
            for i, x in zip(ctx.positions, ctx.saved_tensors):
                args[i] = x.detach().requires_grad_(i in differentiable and x.is_floating_point())
                leaves.append(args[i])
            outs = getattr(reference, spec.name + "_backward")(*args, check=False)
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


def _register_python_parts() -> None:
    """Fake kernels and autograd for ``torch.ops.loft.*`` (called once the ops exist)."""
    global _REGISTERED
    if _REGISTERED:
        return
    for spec in (_SGD, _ADAM):
        torch.library.register_fake(f"loft::{spec.name}", _fake_forward(spec))
        torch.library.register_fake(f"loft::{spec.name}_backward", _fake_backward(spec))
        torch.library.register_autograd(
            f"loft::{spec.name}",
            lambda ctx, *g, _spec=spec: _backward(_spec, ctx, g),
            setup_context=_setup_context,
        )
        setup, backward = _backward_of_backward(spec)
        torch.library.register_autograd(f"loft::{spec.name}_backward", backward,
                                        setup_context=setup)
        if spec.inplace:
            torch.library.register_fake(f"loft::{spec.name}_",
                                        lambda params, *args: params.new_empty(params.numel()))
    _REGISTERED = True
