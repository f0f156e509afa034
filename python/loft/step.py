"""The step engine: one optimiser step over a bucket as a single autograd node.

:func:`bucket_step` takes the fast weights of a bucket as the per-tensor views the model
uses, their per-tensor gradients, the flat optimiser state and the ``[G]``
hyperparameter tensors, runs the fused op once, and returns the new fast weights as
views of the new flat buffer, plus the new flat state. Autograd sees **one node per
bucket per step**: no separate flatten, split or view nodes.

The weights go in as the views themselves, so the gradient of a later loss with
respect to ``fmodel.parameters(time=t)`` for any recorded ``t`` includes the path
through every later update (as in ``higher``). When the views are intact views of the
previous step's flat buffer (the usual case), that buffer is handed to the kernel
directly: no copy.

Per-element hyperparameters (Meta-SGD's learned lr per weight): ``elementwise=(lr_elementwise,
weight_decay_elementwise)``, flat ``[N]`` buffers in the op's compute dtype that replace
the group's values (either may have 0 elements: absent). They are inputs of the same
node, and get their gradients from the same backward kernel.

Saved for the backward: the weights (the previous buffer, or the views), the
per-tensor gradients, the state buffers and the hyperparameters; the flat gradient is
rebuilt in the backward instead of being kept twice. When the backward runs under grad
mode (``create_graph=True``), it concatenates the saved views and gradients with
differentiable ops and uses the reference formulas, so the step stays twice
differentiable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from loft import _ext
from loft._contract import OPS, OpContract
from loft.flat import Bucket
from loft.ops import backward_kernel, forward_kernel, inplace_kernel

__all__ = ["bucket_step", "shift_step", "is_constant_shift", "is_sole_holder", "is_step_node"]


def _apply(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """``fn.apply(*args)`` for a Function without ``setup_context``.

    Outside functorch transforms, ``Function.apply`` only unwraps dead functorch
    wrappers (a Python pass over every argument; a step has two per parameter) before
    calling the C++ ``apply``. Tensors here come from loft's own step, which runs no
    transform, so this calls the C++ ``apply`` directly; under a transform it is the
    usual path.
    """
    if _C_APPLY is None or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return _C_APPLY.__get__(None, fn)(*args)


#: The C++ ``apply`` that ``Function.apply`` calls last (a classmethod of
#: ``_FunctionBase``); ``None`` if a torch version has moved it.
_C_APPLY = vars(torch._C._FunctionBase).get("apply")


def _ready_to_copy(bucket: Bucket, parts: Sequence[Tensor | None]) -> bool:
    """Whether every part is present and already in ``bucket``'s dtype and device, so that
    it can be copied into a flat buffer as it is (no cast, no zeros)."""
    return all(t is not None and t.dtype == bucket.dtype and t.device == bucket.device
               for t in parts)


def _cat(bucket: Bucket, parts: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """The flat buffer of ``parts`` (``None``: zeros), in ``bucket``'s dtype and device."""
    if not parts:
        return like.new_empty(0)
    if not torch.is_grad_enabled() and _ready_to_copy(bucket, parts):
        # One C++ call instead of a reshape per tensor (a per-step cost on small models).
        return torch._C._nn.flatten_dense_tensors(list(parts))
    return torch.cat([
        torch.zeros(n, dtype=bucket.dtype, device=bucket.device) if t is None
        else t.reshape(-1).to(device=bucket.device, dtype=bucket.dtype)
        for t, n in zip(parts, bucket.numels)
    ])


def _with_flat(bucket: Bucket, parts: Sequence[Tensor | None], like: Tensor, slot: int,
               run: Callable[[Tensor], Any]) -> Any:
    """``run(flat)`` with ``flat = _cat(bucket, parts, like)``, for a kernel input that
    ``run`` neither keeps nor returns: then it is the bucket's scratch buffer
    (:meth:`Bucket.gather`) where it can be: outside grad mode, and where ``run`` calls
    the fused kernels, whose outputs are always new tensors (the reference formulas may
    return an input as it is)."""
    if parts and not torch.is_grad_enabled() and _ext.has_device_kernels(bucket.device) and \
            _ready_to_copy(bucket, parts):
        return bucket.gather(parts, slot, run)  # type: ignore[arg-type]
    return run(_cat(bucket, parts, like))


def _split(bucket: Bucket, flat: Tensor, wanted: Sequence[bool]) -> list[Tensor | None]:
    """``flat`` cut into ``bucket``'s shapes; ``None`` where not ``wanted``."""
    return [part if want else None for part, want in zip(bucket.plain_views(flat), wanted)]


class _Inputs(NamedTuple):
    """Where each group of :class:`_BucketStep`'s tensor inputs sits (after its 4 leading)."""

    views: slice
    grads: slice
    state: slice
    hyper: slice
    elementwise: slice  # empty, or lr_elementwise, weight_decay_elementwise
    segments: int
    flags: int

    @staticmethod
    @functools.cache
    def of(op: OpContract, num_tensors: int, num_elementwise: int) -> _Inputs:
        """The layout for ``num_tensors`` parameters, with or without the per-element ones."""
        s, n_state, n_hyper = num_tensors, len(op.state), len(op.hyper)
        hyper = 2 * s + n_state
        elementwise = hyper + n_hyper
        segments = elementwise + num_elementwise
        return _Inputs(slice(0, s), slice(s, 2 * s), slice(2 * s, hyper),
                       slice(hyper, elementwise), slice(elementwise, segments), segments,
                       segments + 1)


#: ``_BucketStep.apply``'s arguments before the tensors: op, bucket, base, at.
_LEADING = 4


class _BucketStep(torch.autograd.Function):
    """``(views, grads, state, hyper, elementwise, segments, flags) -> (new views, new state)``
    (:func:`bucket_step`), one node per bucket and step."""

    @staticmethod
    def forward(ctx: Any, op: OpContract, bucket: Bucket, base: Tensor | None,  # type: ignore[override]
                at: _Inputs, *tensors: Tensor | None) -> tuple[Tensor, ...]:
        views, grads, state = tensors[at.views], tensors[at.grads], tensors[at.state]
        hyper, elementwise = tensors[at.hyper], tensors[at.elementwise]
        segments, flags = tensors[at.segments], tensors[at.flags]
        like = next(t for t in (*views, *state) if t is not None)
        params = base if base is not None else _cat(bucket, views, like)
        kernel = forward_kernel(op, params.device)
        outs = _with_flat(bucket, grads, like, 0, lambda flat_grads: kernel(
            params, flat_grads, *state, segments, *hyper, flags, *elementwise))
        ctx.op, ctx.bucket, ctx.at = op, bucket, at
        ctx.grad_present = [g is not None for g in grads]
        needs = ctx.needs_input_grad[_LEADING:]
        # Hyperparameter gradients (group or per element) read the buffers' values.
        ctx.values_saved = not op.linear or any(needs[at.hyper]) or any(needs[at.elementwise])
        if ctx.values_saved:
            ctx.save_for_backward(base if base is not None else params, *views,
                                  *[g for g in grads if g is not None], *state, segments,
                                  *hyper, *elementwise, flags)
        else:
            # Linear in the buffers and no hyperparameter gradient wanted: the backward
            # reads none of their values (docs/ops.md), so none is kept; a per-element lr
            # or weight decay is a factor of the gradients, so it is kept.
            ctx.state_numels = [t.numel() for t in state]
            ctx.save_for_backward(segments, *hyper, *elementwise, flags)
        ctx.set_materialize_grads(False)
        return tuple(bucket.plain_views(outs[0])) + tuple(outs[1:])

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if not ctx.values_saved:
            return _linear_backward(ctx, grad_outputs)
        op: OpContract = ctx.op
        bucket: Bucket = ctx.bucket
        s, n_state = len(bucket.numels), len(op.state)
        saved = list(ctx.saved_tensors)
        params_flat = saved[0]
        views = saved[1:1 + s]
        n_grads = sum(ctx.grad_present)
        present = iter(saved[1 + s:1 + s + n_grads])
        grads = [next(present) if p else None for p in ctx.grad_present]
        rest = saved[1 + s + n_grads:]
        state, segments = rest[:n_state], rest[n_state]
        hyper, elementwise = _hyper_and_elementwise(ctx, rest[n_state + 1:-1])
        flags = rest[-1]

        differentiable = torch.is_grad_enabled()
        if differentiable:
            # Rebuild the flat inputs with differentiable ops so that a second backward
            # reaches the views and the per-tensor gradients.
            params_flat = _cat(bucket, views, params_flat)
        kernel = backward_kernel(op, params_flat.device, differentiable=differentiable)
        mask = _hyper_grad_mask(ctx)

        def run(flat_grads: Tensor) -> Any:
            return _with_upstream(bucket, grad_outputs, params_flat, lambda up, up_state: kernel(
                up, *up_state, params_flat, flat_grads, *state, segments, *hyper, flags, mask,
                *elementwise))

        through = grad_outputs[:s] if _params_pass_through(
            op, _weight_decay_in_effect(op, hyper, elementwise)) else None
        return _input_grads(ctx, _with_flat(bucket, grads, params_flat, 0, run), through)


def _hyper_and_elementwise(ctx: Any, saved: Sequence[Tensor]
                           ) -> tuple[Sequence[Tensor], Sequence[Tensor]]:
    """The saved ``[G]`` hyperparameters and per-element ones (empty, or two)."""
    split = len(ctx.op.hyper)
    return saved[:split], saved[split:]


def _hyper_grad_mask(ctx: Any) -> int:
    """The backward kernel's hyper_grad_mask: bit k for the k-th ``[G]`` hyperparameter,
    bits H and H + 1 for the per-element ones, where they require grad."""
    needs = ctx.needs_input_grad[_LEADING:]
    return ctx.op.hyper_grad_mask(needs[ctx.at.hyper], needs[ctx.at.elementwise])


def _weight_decay_in_effect(op: OpContract, hyper: Sequence[Tensor],
                            elementwise: Sequence[Tensor]) -> Sequence[Tensor]:
    """``hyper`` with the ``[G]`` weight decay replaced by the per-element one where that is
    given (the group's value is then used by no element)."""
    if len(elementwise) < 2 or elementwise[1].numel() == 0:
        return hyper
    effective = list(hyper)
    effective[op.hyper.index("weight_decay")] = elementwise[1]
    return effective


def _with_upstream(bucket: Bucket, grad_outputs: Sequence[Tensor | None], like: Tensor,
                   run: Callable[[Tensor, list[Tensor]], Any]) -> Any:
    """``run(upstream_params, upstream_state)``: the backward kernel's upstream gradients,
    the new weights' as one flat buffer (scratch where it can be, :func:`_with_flat`),
    the new state's as they are (0 elements: none)."""
    s = len(bucket.numels)
    empty = like.new_empty(0)
    view_grads = grad_outputs[:s]
    upstream_state = [g.contiguous() if g is not None else empty for g in grad_outputs[s:]]
    if not any(g is not None for g in view_grads):
        return run(empty, upstream_state)
    return _with_flat(bucket, view_grads, like, 1, lambda flat: run(flat, upstream_state))


def _params_pass_through(op: OpContract, hyper: Sequence[Tensor]) -> bool:
    """Whether the gradient of the weights is the upstream gradient of the new weights,
    unchanged: for SGD and Adam(W) that is so for every element, active or not, when the
    weight decay is 0 in every group (``p' = p - delta`` with ``delta`` independent of
    ``p``; the kernels then return ``P`` exactly, ``P * (1 - lr * 0)`` for AdamW). Not
    when the weight decay requires grad (the gradient then depends on it), and only read
    on the CPU (on CUDA the check would synchronise). ``hyper`` holds the weight decay in
    effect: the per-element one where it is given (:func:`_weight_decay_in_effect`)."""
    wd = hyper[op.hyper.index("weight_decay")]
    return wd.device.type == "cpu" and not wd.requires_grad and not bool(wd.any())


def _input_grads(ctx: Any, result: Sequence[Tensor],
                 upstream_views: Sequence[Tensor | None] | None = None
                 ) -> tuple[Tensor | None, ...]:
    """The backward kernel's ``result`` as the gradients of :class:`_BucketStep`'s inputs
    ``(op, bucket, base, at, views..., grads..., state..., hyper..., elementwise..., segments,
    flags)``.

    ``upstream_views``: the upstream gradients of the new weights, to be returned as the
    gradients of the old ones (:func:`_params_pass_through`) instead of cutting the
    kernel's copy of them into views.
    """
    op: OpContract = ctx.op
    bucket: Bucket = ctx.bucket
    at: _Inputs = ctx.at
    needs = ctx.needs_input_grad[_LEADING:]
    grads = op.grad_slots
    out: list[Tensor | None] = [None] * _LEADING
    if upstream_views is not None:
        like = result[0]  # the kernel's dense copy: zeros where the upstream had none
        out += [None if not need else g if g is not None else
                like.new_zeros(shape) for g, need, shape in
                zip(upstream_views, needs[at.views], bucket.shapes)]
    else:
        out += _split(bucket, result[0], needs[at.views])
    out += _split(bucket, result[1], [p and n for p, n in zip(ctx.grad_present, needs[at.grads])])
    out += [g if need else None for g, need in zip(result[2:grads.buffers.stop], needs[at.state])]
    out += [g if need else None for g, need in zip(result[grads.hyper], needs[at.hyper])]
    out += [g if need else None for g, need in zip(result[grads.elementwise],
                                                    needs[at.elementwise])]
    out += [None, None]  # segments, flags
    return tuple(out)


def _linear_backward(ctx: Any, grad_outputs: Sequence[Tensor | None]) -> tuple:
    """The backward of a step that is linear in its buffers (SGD) when no hyperparameter
    gradient is wanted: the kernel's buffer gradients then depend on the upstream
    gradients, the segment table and the hyperparameters only (a per-element lr or
    weight decay included), so any tensor of the right size stands in for the weights,
    gradients and momentum buffer it did not keep."""
    op: OpContract = ctx.op
    bucket: Bucket = ctx.bucket
    s = len(bucket.numels)
    segments, *rest, flags = ctx.saved_tensors
    hyper, elementwise = _hyper_and_elementwise(ctx, rest)
    view_grads = grad_outputs[:s]
    present = [g for g in grad_outputs if g is not None]
    if not present:
        return (None,) * (_LEADING + ctx.at.flags + 1)
    kernel = backward_kernel(op, present[0].device, differentiable=torch.is_grad_enabled())

    def run(upstream_params: Tensor, upstream_state: list[Tensor]) -> Any:
        stand_in = upstream_params if upstream_params.numel() else next(
            g for g in upstream_state if g.numel())
        stand_in = stand_in.detach()
        state = [stand_in if n else stand_in.new_empty(0) for n in ctx.state_numels]
        return kernel(upstream_params, *upstream_state, stand_in, stand_in, *state, segments,
                      *hyper, flags, 0, *elementwise)

    through = view_grads if _params_pass_through(
        op, _weight_decay_in_effect(op, hyper, elementwise)) else None
    return _input_grads(ctx, _with_upstream(bucket, grad_outputs, present[0], run), through)


def bucket_step(op: OpContract, bucket: Bucket, base: Tensor | None, views: Sequence[Tensor],
                grads: Sequence[Tensor | None], state: Sequence[Tensor],
                hyper: Sequence[Tensor], segments: Tensor, flags: Tensor, *,
                elementwise: Sequence[Tensor] = ()) -> tuple[list[Tensor], list[Tensor]]:
    """One fused step of ``op`` over ``bucket``, as one autograd node.

    Args:
        op: the op's contract (:data:`loft._contract.SGD` or :data:`~loft._contract.ADAM`).
        bucket: the layout of the flat buffers.
        base: the flat buffer that ``views`` are intact views of, or ``None`` (the views
            are then concatenated).
        views: the current weights, one tensor per parameter of the bucket.
        grads: their gradients (``None``: the tensor is inactive this step).
        state: the flat state buffers in the op's order (0 elements where unused).
        hyper: the ``[G]`` hyperparameter tensors in the op's order.
        segments, flags: the segment table and group flags (``docs/ops.md``).
        elementwise: ``()`` or ``(lr_elementwise, weight_decay_elementwise)``: flat
            ``[N]`` per-element values in the op's compute dtype that replace the group's
            lr / weight decay (either may have 0 elements: absent); their gradients come
            back when they require grad.

    Returns:
        The new weights as views of one new flat buffer, and the new state buffers.
    """
    s = len(bucket.numels)
    if NATIVE_NODE and _ext.has_device_kernels(bucket.device):
        # The C++ node (csrc/bucket_step.cpp): the same inputs, outputs and derivatives.
        outs = _BUCKET_STEP(OPS.index(op), base, views, grads, state, hyper, elementwise,
                            segments, flags)
        return outs[:s], outs[s:]
    at = _Inputs.of(op, s, len(elementwise))
    outs = _apply(_BucketStep, op, bucket, base, at, *views, *grads, *state, *hyper,
                  *elementwise, segments, flags)
    return list(outs[:s]), list(outs[s:])


def _bucket_step_op(*args: Any) -> list[Tensor]:
    """``torch.ops.loft.bucket_step`` (looked up at the first call: the ops load lazily)."""
    global _BUCKET_STEP
    _BUCKET_STEP = torch.ops.loft.bucket_step.default
    return _BUCKET_STEP(*args)


_BUCKET_STEP: Callable[..., list[Tensor]] = _bucket_step_op

#: Whether :func:`bucket_step` runs the C++ node where the kernels are built (tests turn
#: it off to compare it with its Python twin, :class:`_BucketStep`).
NATIVE_NODE = True


def is_step_node(node: Any) -> bool:
    """Whether ``node`` (a ``grad_fn``) is a step node of :func:`bucket_step`: the C++ one
    or its Python twin."""
    return node is not None and (type(node).__name__ == "_BucketStepBackward"
                                 or "BucketStep" in node.name())


def is_constant_shift(op: OpContract, grads: Sequence[Tensor | None], state: Sequence[Tensor],
                      hyper: Sequence[Tensor], elementwise: Sequence[Tensor]) -> bool:
    """Whether the update is ``p - delta`` with ``delta`` independent of anything that
    requires grad (then :func:`shift_step` may run it): constant gradients (first
    order), state and hyperparameters, and no weight decay (which would tie ``delta`` or
    a scale to ``p``)."""
    if any(g is not None and g.requires_grad for g in grads):
        return False
    if any(t.requires_grad for t in (*state, *hyper, *elementwise)):
        return False
    return not bool(_weight_decay_in_effect(op, hyper, elementwise)[
        op.hyper.index("weight_decay")].any())


class _Shift(torch.autograd.Function):
    """``(new_flat, views...) -> views of new_flat``, with the identity as the derivative
    with respect to the old views: an update ``p' = p - delta`` with ``delta`` constant."""

    @staticmethod
    def forward(ctx: Any, bucket: Bucket, new_flat: Tensor,  # type: ignore[override]
                *views: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        return tuple(bucket.plain_views(new_flat))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, None) + tuple(grads)


def shift_step(op: OpContract, bucket: Bucket, base: Tensor | None, views: Sequence[Tensor],
               grads: Sequence[Tensor | None], state: Sequence[Tensor],
               hyper: Sequence[Tensor], segments: Tensor, flags: Tensor,
               state_in_place: bool = False, *, elementwise: Sequence[Tensor] = ()
               ) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`bucket_step` for an update ``p' = p - delta`` whose ``delta`` depends on
    nothing that requires grad (:func:`is_constant_shift`): the step runs without a
    graph, and the new weights are differentiable with respect to the old ``views`` with
    derivative 1, through one node that saves nothing. The new state does not require grad.

    ``state_in_place``: the caller is the only holder of ``state`` (no view, no saved
    reference), so the kernel may overwrite it with the new state where it can
    (:func:`loft.ops.inplace_kernel`); the returned state is then ``state`` itself.
    """
    with torch.no_grad():
        like = views[0]
        params = base if base is not None else _cat(bucket, views, like)
        inplace = inplace_kernel(op, params.device) if state_in_place else None
        kernel = inplace if inplace is not None else forward_kernel(op, params.device)
        outs = _with_flat(bucket, grads, like, 0, lambda flat_grads: kernel(
            params, flat_grads, *state, segments, *hyper, flags, *elementwise))
    # The in-place kernel returns the new params alone; the state is then ``state``.
    new_params, new_state = (outs, list(state)) if inplace is not None else (outs[0],
                                                                             list(outs[1:]))
    return list(_apply(_Shift, bucket, new_params, *views)), new_state


def is_sole_holder(t: Tensor) -> bool:
    """Whether ``t`` is the only tensor on its memory (no view of it, no detached or other
    alias: the storage is held once by ``t`` and once by the probe itself) and is not a
    view itself. A saved reference to ``t`` itself is not seen here: the caller rules
    those out (:attr:`loft.flat.FlatState.private`). :func:`shift_step` may overwrite
    state whose every buffer passes this."""
    if t.numel() == 0:
        return True
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # a torch without the probe: never in place
        return False
    return t._base is None and use_count(t.untyped_storage()._cdata) == 2
