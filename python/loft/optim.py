"""Differentiable optimisers (higher's ``higher.optim`` API) on fused flat buffers.

``diffopt.step(loss)`` replaces ``opt.zero_grad(); loss.backward(); opt.step()``: it
takes the gradients of ``loss`` with respect to the fast weights (with
``create_graph=True`` while tracking higher-order gradients) and returns new fast
weights that stay differentiable with respect to the old ones, the gradients, and any
tensor hyperparameter given through ``override``.

SGD, Adam and AdamW make **one fused op call per bucket per step**
(:func:`loft.ops.sgd_step`, :func:`loft.ops.adam_step`); a bucket is the set of
parameters sharing a (device, dtype), flattened into one buffer per quantity.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from loft import ops, reference
from loft import utils as _utils
from loft._higher_state import StateMirror, new_structure
from loft._optim_compat import (  # noqa: F401 - higher.optim's names, for its users
    _add,
    _addcdiv,
    _addcmul,
    _get_mask_closure,
    _GradCallbackType,
    _GradClosureType,
    _GroupedGradsType,
    _maybe_mask,
    _OverrideType,
    _recursive_apply,
    _StateType,
)
from loft._step import bucket_step, shift_step
from loft.flat import Bucket, hyper_tensor, make_buckets

__all__ = [
    "DifferentiableOptimizer",
    "DifferentiableSGD",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdagrad",
    "DifferentiableAdadelta",
    "DifferentiableAdamax",
    "DifferentiableASGD",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
]

_GradCallback = Callable[[list[Tensor | None]], Sequence[Tensor | None]]
_Override = dict[str, Sequence[Any]]


def _find_index(param: Tensor, params: Sequence[Tensor]) -> int | None:
    for i, candidate in enumerate(params):
        if candidate is param:
            return i
    return None


def _check_loss(loss: Any) -> None:
    """``step``'s loss: a tensor with one element that requires grad."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"step: the loss must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise RuntimeError(
            f"step: the loss must be a scalar (one element), got shape {list(loss.shape)}; "
            "reduce it first, e.g. loss.mean() or loss.sum()"
        )
    if not loss.requires_grad:
        raise RuntimeError(
            "step: the loss is not connected to the fast weights (it does not require grad). "
            "Compute it from the patched model's output (fmodel(x), not model(x)) or from "
            "the params passed to step, with grad mode enabled."
        )


def _check_override_value(name: str, value: Any, current: Any, group: int,
                          shapes: list[torch.Size]) -> None:
    """One group's ``override[name]``: the structure of the value it replaces (a pair for
    ``betas``), and tensors that hold one value or broadcast to each of the group's
    parameters (``shapes``)."""
    if isinstance(current, (list, tuple)):
        if isinstance(value, Tensor) and value.dim() == 1 and len(value) == len(current):
            return
        if not isinstance(value, (list, tuple)) or len(value) != len(current):
            raise ValueError(
                f"override[{name!r}] values must be {type(current).__name__}s of "
                f"{len(current)} like {current!r}, got {value!r}"
            )
        for k, part in enumerate(value):
            _check_override_value(f"{name}[{k}]", part, None, group, shapes)
    elif _is_per_element(value):
        for j, shape in enumerate(shapes):
            _check_broadcast(f"override[{name!r}] for param group {group}", j, value, shape)


def _as_int_step(value: Any) -> int:
    if isinstance(value, Tensor):
        return int(value.item())
    return int(value)


class DifferentiableOptimizer:
    """Base class of loft's differentiable optimisers (higher's name and signature).

    Args:
        other: the ``torch.optim.Optimizer`` whose param groups, hyperparameters and
            state (momentum buffers, moments, step counts) are copied.
        reference_params: the parameters ``other`` was built on, in the order of the
            fast weights (typically ``model.parameters()``).
        fmodel: the patched module whose fast weights ``step`` updates.
        device: where the copied state goes (default: where it is).
        override: ``{name: [value]}`` or ``{name: [value per group]}``; values may be
            tensors that require grad (``betas`` takes a tuple of two).
        grad_callback: applied to the list of gradients before every update.
        track_higher_grads: ``False`` takes gradients without ``create_graph`` and
            detaches the new weights ("test mode").
        first_order: ``True`` takes the inner gradients without ``create_graph``: the
            update stays differentiable with respect to the weights, the state and the
            hyperparameters, but treats the gradients as constants (first-order MAML;
            for plain SGD the meta-gradient on the initial weights is then the
            query-loss gradient at the final weights).
    """

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: Any = None,
        device: torch.device | str | None = None,
        override: _Override | None = None,
        grad_callback: _GradCallback | None = None,
        track_higher_grads: bool = True,
        first_order: bool = False,
        **kwargs: Any,
    ) -> None:
        reference_params = list(reference_params)
        self._first_order = bool(first_order)
        self._fmodel = fmodel
        self._device = torch.device(device) if device is not None else None
        self._grad_callback = grad_callback
        self._track_higher_grads = bool(track_higher_grads)
        self._num_params = len(reference_params)
        self.param_groups: list[dict[str, Any]] = []
        self._group_to_param_list: list[list[int]] = []
        self._group_of: list[int | None] = [None] * len(reference_params)
        for g, group in enumerate(other.param_groups):
            mapping = []
            for p in group["params"]:
                index = _find_index(p, reference_params)
                if index is None:
                    raise ValueError(
                        "Could not find a parameter of the optimizer in reference_params: "
                        "build the optimizer on the same parameters (e.g. model.parameters())."
                    )
                mapping.append(index)
                self._group_of[index] = g
            copied = {k: v for k, v in group.items() if k != "params"}
            copied["params"] = [reference_params[i] for i in mapping]
            self.param_groups.append(copied)
            self._group_to_param_list.append(mapping)
        #: Tensor i's param group and index in it.
        self._position: dict[int, tuple[int, int]] = {
            i: (g, j) for g, mapping in enumerate(self._group_to_param_list)
            for j, i in enumerate(mapping)}
        self._reference_shapes: list[torch.Size | None] = [
            p.shape if g is not None else None for p, g in zip(reference_params, self._group_of)]
        # higher's layout, state[group_index][index_in_group] -> dict: the torch
        # optimizer's state, copied (detached, cast to ``device``), as higher copies it.
        structure = new_structure(len(self.param_groups))
        for g, group in enumerate(other.param_groups):
            for j, p in enumerate(group["params"]):
                if p in other.state:
                    structure[g][j] = {k: _utils._recursive_copy_and_cast(v, self._device)
                                       for k, v in other.state[p].items()}
        self._mirror = StateMirror(structure, self._managed_state_keys())
        if override is not None:
            self._apply_override(override)

    @property
    def state(self) -> list[dict[int, dict[str, Any]]]:
        """higher's ``diffopt.state``: per param group a ``defaultdict(dict)`` mapping a
        tensor's index in its group to its state (plain dicts of tensors). Reads,
        assignments, in-place changes and deletions take effect at the next step."""
        return self._mirror.structure

    @state.setter
    def state(self, value: list[dict[int, dict[str, Any]]]) -> None:
        self._mirror.set(value)

    def _managed_state_keys(self) -> tuple[str, ...]:
        """The state keys loft itself keeps for a tensor (none: a per-tensor optimiser
        written for higher keeps its own)."""
        return ()

    # ---- higher's API ------------------------------------------------------------------

    def _apply_override(self, override: _Override) -> None:
        """Set ``override``'s values in the param groups, after checking each entry: one
        value or one per group, the structure of the value it replaces (``betas``: a
        pair), tensors of one element, and (for loft's own optimisers, which read a fixed
        set of keys) a key that the groups have, so that a typo is not silently ignored."""
        known = {key for group in self.param_groups for key in group if key != "params"}
        for name, values in override.items():
            if name not in known and self.param_groups and self._reads_fixed_keys():
                raise ValueError(
                    f"override[{name!r}]: {type(self).__name__}'s param groups have no "
                    f"hyperparameter {name!r} (they have: {', '.join(sorted(known))})"
                )
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if len(values) not in (1, len(self.param_groups)):
                raise ValueError(
                    f"override[{name!r}] must hold 1 value or one per param group "
                    f"({len(self.param_groups)}), got {len(values)}"
                )
            for i, group in enumerate(self.param_groups):
                _check_override_value(name, values[0] if len(values) == 1 else values[i],
                                      group.get(name), i, [
                                          self._reference_shapes[index]
                                          for index in self._group_to_param_list[i]])
            for i, group in enumerate(self.param_groups):
                group[name] = values[0] if len(values) == 1 else values[i]

    def step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: _Override | None = None,
        grad_callback: _GradCallback | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """One differentiable update; returns (and gives ``fmodel``) the new fast weights.

        higher's ``DifferentiableOptimizer.step``: gradients of ``loss`` with respect to
        the fast weights (``create_graph`` while tracking), ``grad_callback`` (this call's,
        else the constructor's), then the update. Parameters that get no gradient
        (unused, or ``requires_grad=False``) are left exactly as they are.

        Raises ``RuntimeError`` (as torch's autograd, and so higher, does for the first
        two) for a loss that is not a one-element tensor or that is not connected to the
        fast weights the optimizer updates, and ``ValueError``/``TypeError`` for
        ``params`` of the wrong length, shapes or types.
        """
        if override is not None:
            self._apply_override(override)
        _check_loss(loss)
        if self._fmodel is None or self._fmodel.fast_params is None:
            if params is None:
                raise ValueError(
                    "params kwarg must be passed to step if the differentiable optimizer "
                    "doesn't have a view on a patched model with params."
                )
        else:
            params = self._fmodel.fast_params if params is None else params
        params = list(params)
        if len(params) != self._num_params:
            raise ValueError(
                f"step: expected {self._num_params} parameters (the optimizer's reference "
                f"parameters), got {len(params)}"
            )
        self._check_params(params)
        targets = [p if p.requires_grad else torch.tensor([], requires_grad=True) for p in params]
        all_grads: Sequence[Tensor | None] = torch.autograd.grad(
            loss, targets, create_graph=self._track_higher_grads and not self._first_order,
            allow_unused=True
        )
        if not any(g is not None and p.requires_grad and self._group_of[i] is not None
                   for i, (g, p) in enumerate(zip(all_grads, params))):
            raise RuntimeError(
                "step: the loss is not connected to the fast weights the optimizer updates "
                "(every gradient is None). Compute it from the patched model's output "
                "(fmodel(x), not model(x)) or from the params passed to step."
            )
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            all_grads = callback(list(all_grads))
        all_grads = [g if (g is not None and p.requires_grad) else None
                     for g, p in zip(all_grads, params)]
        new_params = self._flat_update(params, list(all_grads))
        if self._fmodel is not None:
            # loft's flat optimisers return views shaped as the weights they were given;
            # a higher-style _update may return anything, so that is checked.
            self._fmodel.update_params(new_params, _checked=self._returns_own_views())
        return new_params

    def _returns_own_views(self) -> bool:
        """Whether ``_flat_update`` returns loft's own views, shaped as the weights it was
        given (a higher-style ``_update`` may return anything, so that is checked)."""
        return False

    def _reads_fixed_keys(self) -> bool:
        """Whether the update reads a fixed set of param-group keys (loft's own classes),
        so that an override of another key is a mistake (a typo) rather than an input."""
        return False

    def _check_params(self, params: list[Tensor]) -> None:
        """``step``'s fast weights: tensors shaped as the reference parameters (the
        shapes are read from the param groups at the first step, before any update)."""
        last = self.__dict__.get("_last_params")
        if last is not None and len(last) == len(params) and all(
                p is q for p, q in zip(params, last)):
            return  # the weights this optimizer returned last step, unchanged
        for i, (p, shape) in enumerate(zip(params, self._reference_shapes)):
            if not isinstance(p, Tensor):
                raise TypeError(f"step: params[{i}] must be a tensor, got {type(p).__name__}")
            if shape is not None and p.shape != shape:
                raise ValueError(
                    f"step: params[{i}] has shape {list(p.shape)}, expected {list(shape)} "
                    "(the shape of the optimizer's reference parameter)"
                )

    def state_dict(self) -> dict[str, Any]:
        """The state in ``torch.optim.Optimizer.state_dict()``'s format (higher HEAD's
        ``DifferentiableOptimizer.state_dict``), so that
        ``opt.load_state_dict(diffopt.state_dict())`` carries an inner loop's moments,
        step counts and (learned, as numbers) hyperparameters back to ``opt``."""
        state: dict[int, dict[str, Any]] = {}
        groups = []
        index = 0
        for g, (group, mapping) in enumerate(zip(self.param_groups, self._group_to_param_list)):
            ids = []
            for j in range(len(mapping)):
                entry = self.state[g].get(j)
                exported = self._export_state(entry) if entry else None
                if exported:
                    state[index] = exported
                ids.append(index)
                index += 1
            copied = {k: _to_numbers(v) for k, v in group.items() if k != "params"}
            copied["params"] = ids
            groups.append(copied)
        return {"state": state, "param_groups": groups}

    def truncate(self) -> list[Tensor]:
        """Cut the tape here (truncated backpropagation through the inner loop).

        The fast weights and the optimiser state are detached (the weights stay leaves
        that require grad where they did), and ``fmodel``'s history before this step is
        dropped, so a later meta-backward stops here and the graph of the steps so far
        can be freed. Calling it every ``k`` steps bounds the memory of a long inner
        loop by ``k`` steps. Tensor hyperparameters keep receiving gradients from the
        steps after the cut. Returns the detached fast weights.
        """
        params = self._current_params()
        if params is None:
            raise ValueError("truncate: no fast weights yet (give the optimizer an fmodel, "
                             "or call step(..., params=...) first)")
        new_params = self._detach_params(params)
        self._last_params = list(new_params)
        if self._fmodel is not None:
            self._fmodel._replace_history(self._fmodel._times[-1:], [new_params])
        return new_params

    def _current_params(self) -> list[Tensor] | None:
        if self._fmodel is not None and self._fmodel.fast_params is not None:
            return list(self._fmodel.fast_params)
        last = getattr(self, "_last_params", None)
        return None if last is None or any(p is None for p in last) else list(last)

    def _detach_params(self, params: list[Tensor]) -> list[Tensor]:
        """Detached weights; the per-tensor state (higher's layout) is detached too."""
        for group_state in self.state:
            for entry in group_state.values():
                for key, value in entry.items():
                    if isinstance(value, Tensor):
                        entry[key] = value.detach()
        return [p.detach().requires_grad_(p.requires_grad) for p in params]

    def _export_state(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        """One tensor's state as torch.optim keeps it (detached copies; ``step`` as the
        float tensor torch uses). ``None``: torch would have no state for it yet."""
        if "step" in entry and not isinstance(entry["step"], Tensor) and entry["step"] == 0:
            return None
        out = {}
        for key, value in entry.items():
            if key == "step" and not isinstance(value, Tensor):
                value = torch.tensor(float(value))
            out[key] = value.detach().clone() if isinstance(value, Tensor) else value
        return out

    # ---- higher's per-tensor extension point ----------------------------------------------

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        """Per-tensor update, higher style: replace ``group['params'][i]`` with the new
        parameter, keeping state in ``self.state[group_index][param_index]``.

        Subclasses written for higher override this; loft's own optimisers run on flat
        buffers instead and never call it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement _update(grouped_grads) (per-tensor, as "
            "in higher) to be used as a differentiable optimizer"
        )

    def _flat_update(self, params: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
        """Return the new parameters given the current ones and their gradients.

        The generic path calls :meth:`_update` on per-group lists, as higher does.
        """
        grouped = []
        for group, mapping in zip(self.param_groups, self._group_to_param_list):
            group["params"] = [params[i] for i in mapping]
            grouped.append([grads[i] for i in mapping])
        self._update(grouped)
        new_params = list(params)
        for group, mapping in zip(self.param_groups, self._group_to_param_list):
            for p, index in zip(group["params"], mapping):
                new_params[index] = p if self._track_higher_grads else p.detach().requires_grad_()
        self._last_params = list(new_params)
        return new_params


class _FlatOptimizer(DifferentiableOptimizer):
    """Flat-buffer optimiser: one op call per bucket per step.

    Subclasses say which state buffers they keep (``_state_names``, each one value per
    parameter element; ``_segment_state_names``, one value per tensor), which
    hyperparameters they read from a param group (``_hyper_names``, ``_group_hyper``),
    which per-group flags they pass (``_group_flags``), and run one step over a bucket in
    ``_call_op`` (or name a fused op in ``_spec``).

    Note: two ways to run. A class of loft's own (neither ``step`` nor ``_update``
    overridden by a subclass) runs the flat engine (:meth:`_flat_update`), and keeps
    higher's ``state`` dicts as a mirror of its flat buffers (:mod:`loft._higher_state`).
    A subclass that overrides ``step`` or ``_update`` gets higher's per-tensor
    :meth:`_update` (the same math, one tensor at a time, on ``self.state``'s dicts).
    """

    #: Per-element state buffers, in the op's order (each one value per element).
    _state_names: tuple[str, ...] = ()
    #: One-value-per-tensor state buffers ([S] per bucket; ASGD's eta and mu), with the
    #: value a tensor without state starts from.
    _segment_state_names: dict[str, float] = {}
    #: The key of a tensor's step count in higher's state dict (``None``: not kept).
    _step_key: str | None = "step"
    _hyper_names: tuple[str, ...] = ()
    #: How a hyperparameter is spelled in a param group, where that is not its name
    #: (``beta1`` is ``betas[0]``); for error messages.
    _hyper_keys: dict[str, str] = {}
    _optional_state: str = ""
    #: The op reads only whether a tensor's step count is 0 (SGD's momentum starts on
    #: the first step): the segment tables then carry min(step, 1), so every later step
    #: shares one table instead of keeping its own for the backward.
    _first_step_only: bool = False
    #: The fused op this optimiser runs (``None``: :meth:`_call_op` on flat buffers).
    _spec: ops._Spec | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._buckets: list[Bucket] | None = None
        super().__init__(*args, **kwargs)
        n = self._num_params
        self._steps: list[int] = [0] * n
        #: Whether tensor i has state (higher keeps an empty dict until its first update).
        self._has_state: list[bool] = [False] * n
        #: The dtype of tensor i's step when it was a tensor (a torch optimizer's state).
        self._step_dtype: list[torch.dtype | None] = [None] * n
        self._where: list[tuple[int, int]] = []  # tensor i -> (bucket, position in it)
        self._flat_params: list[Tensor | None] = []
        self._flat_state: list[dict[str, Tensor]] = []
        self._last_params: list[Tensor | None] | None = None
        #: Buckets (by id) whose state only this optimiser holds, made by its last
        #: first-order step: the next one may update it in place.
        self._private_state: set[int] = set()
        #: Never update the state in place (loft.unroll's copy: checkpoints hold it).
        self._keep_state = False
        self._hyper_cache: dict[Any, tuple[dict[str, Tensor], Tensor]] = {}
        self._elementwise_cache: dict[tuple[int, str], tuple[tuple[Any, ...], Tensor]] = {}

    def _managed_state_keys(self) -> tuple[str, ...]:
        step = (self._step_key,) if self._step_key else ()
        return step + tuple(self._state_names) + tuple(self._segment_state_names)

    @property
    def state(self) -> list[dict[int, dict[str, Any]]]:
        """higher's ``diffopt.state`` (see :class:`DifferentiableOptimizer`), kept in step
        with the flat buffers: each value is a new tensor (not a view), differentiable
        with respect to the inner loop while tracking higher-order gradients."""
        if self._buckets is None or not _uses_flat_engine(type(self)):
            return self._mirror.structure
        return self._mirror.get(self._exported_entries)

    @state.setter
    def state(self, value: list[dict[int, dict[str, Any]]]) -> None:
        self._mirror.set(value)

    # ---- subclass hooks ------------------------------------------------------------------

    def _group_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _group_flags(self, group: dict[str, Any]) -> int:
        raise NotImplementedError

    def _call_op(self, params: Tensor, grads: Tensor, state: dict[str, Tensor], segments: Tensor,
                 hyper: dict[str, Tensor], flags: Tensor,
                 elementwise: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One step over flat buffers as differentiable PyTorch (the fused optimisers: the
        reference op, used where a hyperparameter the kernels read per group is given
        per element)."""
        spec = self._spec
        assert spec is not None, f"{type(self).__name__} must implement _call_op"
        per_element: dict[str, Any] = {}
        if elementwise:
            per_element = {"lr_elementwise": elementwise.get("lr"),
                           "weight_decay_elementwise": elementwise.get("weight_decay"),
                           "elementwise": {n: t for n, t in elementwise.items()
                                           if n not in _KERNEL_ELEMENTWISE} or None}
        outs = getattr(reference, spec.name)(
            params, grads, *[state[n] for n in self._state_names], segments,
            *[hyper[n] for n in self._hyper_names], flags, check=False, **per_element)
        return outs[0], dict(zip(self._state_names, outs[1:]))

    def _needs_optional(self, flags: list[int]) -> bool:
        return False

    def _unused_state(self, flags: list[int]) -> set[str]:
        """The state buffers no group uses with these flags: kept with 0 elements."""
        if self._optional_state and not self._needs_optional(flags):
            return {self._optional_state}
        return set()

    def _read_entry(self, entry: dict[str, Any]) -> tuple[int, bool, torch.dtype | None,
                                                          dict[str, Any]]:
        """Tensor's higher-style state dict as ``(step count, has state, dtype of a tensor
        step or None, state values by name)``; a missing value starts from its default."""
        if not entry:
            return 0, False, None, {}
        step = entry.get(self._step_key, 0) if self._step_key else 0
        names = (*self._state_names, *self._segment_state_names)
        return (_as_int_step(step), True, step.dtype if isinstance(step, Tensor) else None,
                {name: entry[name] for name in names if name in entry})

    def _default_state(self, name: str, group: dict[str, Any], shape: torch.Size,
                       b: Bucket) -> Tensor | None:
        """The value of state buffer ``name`` for a tensor without one (``None``: zeros)."""
        return None

    # ---- higher's dicts <-> the flat state ---------------------------------------------------

    def _sync_flat_state(self, params: list[Tensor]) -> None:
        """Build the flat state at the first step; later, take over any change made to
        ``self.state``'s dicts since the last step (they are the state in higher)."""
        if self._buckets is None:
            self._setup(params)
        elif self._mirror.needs_import():
            self._import_state()

    def _setup(self, params: list[Tensor]) -> None:
        self._buckets = make_buckets(params, self._group_of)
        self._where = [(-1, -1)] * self._num_params
        for k, b in enumerate(self._buckets):
            for pos, i in enumerate(b.indices):
                self._where[i] = (k, pos)
        # No flat weights yet: the first step concatenates the weights it is given.
        self._flat_params = [None] * len(self._buckets)
        self._last_params = [None] * len(params)
        self._import_state()

    def _import_state(self) -> None:
        """The flat state and step counts from higher's dicts (``self.state``): the torch
        optimizer's state at the first step, the program's changes later. Differentiable:
        a tensor the program put there carries its graph into the next step."""
        assert self._buckets is not None
        structure = self._mirror.structure
        values: list[dict[str, Any]] = [{} for _ in range(self._num_params)]
        for g, mapping in enumerate(self._group_to_param_list):
            group_state = structure[g] if g < len(structure) else {}
            for j, i in enumerate(mapping):
                entry = group_state.get(j)  # .get: a defaultdict must not grow here
                step, has_state, step_dtype, values[i] = self._read_entry(entry or {})
                self._steps[i], self._has_state[i], self._step_dtype[i] = (
                    step, has_state, step_dtype)
        # An optional buffer has 0 elements unless a group needs it; an override that
        # turns it on later allocates it (_flat_update, _math).
        unused = self._unused_state([self._group_flags(g) for g in self.param_groups])
        self._flat_state = []
        for b in self._buckets:
            state: dict[str, Tensor] = {}
            for name in self._state_names:
                if name in unused:
                    state[name] = torch.empty(0, dtype=b.dtype, device=b.device)
                    continue
                state[name] = b.flatten([self._state_value(name, i, values[i].get(name), b, pos)
                                         for pos, i in enumerate(b.indices)])
            for name, default in self._segment_state_names.items():
                ct = reference.compute_dtype(b.dtype)
                parts = [_scalar_tensor(values[i].get(name, default), ct, b.device)
                         for i in b.indices]
                state[name] = torch.stack(parts) if parts else torch.empty(
                    0, dtype=ct, device=b.device)
            self._flat_state.append(state)
        self._private_state.clear()
        self._mirror.imported()

    def _state_value(self, name: str, i: int, value: Any, b: Bucket, pos: int) -> Tensor | None:
        """Tensor ``i``'s state ``name`` from its dict, shaped as the parameter."""
        g, j = self._position[i]
        shape = b.shapes[pos]
        if value is None:
            return self._default_state(name, self.param_groups[g], shape, b)
        if not isinstance(value, Tensor):
            if isinstance(value, (int, float)):
                return torch.full(shape, float(value), dtype=b.dtype, device=b.device)
            raise TypeError(f"diffopt.state[{g}][{j}][{name!r}] must be a tensor, got "
                            f"{type(value).__name__}")
        if not _broadcasts_to(value.shape, shape):
            raise ValueError(f"diffopt.state[{g}][{j}][{name!r}] has shape {list(value.shape)}, "
                             f"which does not broadcast to the parameter's shape {list(shape)}")
        return value.to(device=b.device, dtype=b.dtype).broadcast_to(shape)

    def _exported_entries(self) -> list[list[dict[str, Any]]]:
        """Per group, per index: the tensor's state as higher keeps it, from the flat state.

        New tensors (copies, not views: ``detach_()`` works on them as in higher),
        differentiable with respect to the inner loop while tracking."""
        grad_mode = torch.enable_grad() if self._track_higher_grads else torch.no_grad()
        with grad_mode:
            return [[self._exported_entry(i, self._unused_state([self._group_flags(group)]))
                     for i in mapping]
                    for group, mapping in zip(self.param_groups, self._group_to_param_list)]

    def _exported_entry(self, i: int, unused: set[str]) -> dict[str, Any]:
        """Tensor ``i``'s entry (:meth:`_exported_entries`); ``unused``: the buffers its
        group does not use (a bucket keeps one for all groups)."""
        if not self._has_state[i]:
            return {}
        assert self._buckets is not None
        k, pos = self._where[i]
        b, flat_state = self._buckets[k], self._flat_state[k]
        entry: dict[str, Any] = {}
        if self._step_key:
            dtype = self._step_dtype[i]
            entry[self._step_key] = self._steps[i] if dtype is None else torch.tensor(
                float(self._steps[i]), dtype=dtype)
        off, n, shape = b.offsets[pos], b.numels[pos], b.shapes[pos]
        for name in self._state_names:
            flat = flat_state[name]
            if flat.numel() == b.numel and name not in unused:
                entry[name] = flat[off:off + n].view(shape).clone()
        for name in self._segment_state_names:
            entry[name] = flat_state[name][pos].clone()
        return entry

    # ---- hyperparameters ----------------------------------------------------------------------

    def _hyper_and_flags(self, b: Bucket, flags: list[int]
                         ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        """The ``[G]`` hyperparameter tensors, the group flags and the ``[N]`` per-element
        hyperparameters (where a group holds a tensor shaped like its parameters) of a
        bucket for this step.

        ``[G]`` tensors are built anew whenever a group holds a tensor (it may require
        grad); all-number settings are cached until they change.
        """
        per_group = [self._group_hyper(g) for g in self.param_groups]
        values = {name: [h[name] for h in per_group] for name in self._hyper_names}
        numbers = not any(isinstance(v, Tensor) for vs in values.values() for v in vs)
        key = (b.device, b.dtype, tuple(flags),
               tuple(tuple(vs) for vs in values.values())) if numbers else None
        if key is not None and key in self._hyper_cache:
            return (*self._hyper_cache[key], {})
        per_element = [name for name, vs in values.items() if any(map(_is_per_element, vs))]
        hyper = {name: hyper_tensor([0.0 if _is_per_element(v) else v for v in vs],
                                    self._hyper_dtype(b), b.device)
                 for name, vs in values.items()}
        flag_tensor = torch.tensor(flags, dtype=torch.int64, device=b.device)
        if key is not None:
            self._hyper_cache.clear()
            self._hyper_cache[key] = (hyper, flag_tensor)
        ct = reference.compute_dtype(b.dtype)
        return hyper, flag_tensor, {name: self._elementwise(b, name, values[name], ct)
                                    for name in per_element}

    def _hyper_dtype(self, b: Bucket) -> torch.dtype:
        """The dtype of bucket ``b``'s ``[G]`` hyperparameters. The fused ops take float64
        for any bucket: they then form ``1 - dampening``, ``1 - beta2`` and the bias
        corrections from the exact values, as torch.optim and higher do in Python (a
        float32 ``dampening`` of 0.058 gives another ``1 - dampening``). The reference
        math of the others computes in the compute dtype, as torch.optim does."""
        return torch.float64 if self._spec is not None else reference.compute_dtype(b.dtype)

    def _elementwise(self, b: Bucket, name: str, group_values: list[Any],
                     dtype: torch.dtype) -> Tensor:
        """Hyperparameter ``name`` of every element of bucket ``b`` ([N]): a group's
        per-element tensor broadcast to each of its parameters, a group's number
        repeated. Kept while its tensors are unchanged (the same objects and versions):
        one node of the graph then serves every step."""
        key = (torch.is_grad_enabled(),) + tuple(
            (v, v._version) if isinstance(v, Tensor) else (v, None) for v in group_values)
        cached = self._elementwise_cache.get((id(b), name))
        if cached is not None and cached[0][0] == key[0] and len(cached[0]) == len(key) and all(
                a[0] is c[0] and a[1] == c[1] for a, c in zip(key[1:], cached[0][1:])):
            return cached[1]
        parts = []
        for pos, i in enumerate(b.indices):
            g, j = self._position[i]
            v, shape = group_values[g], b.shapes[pos]
            if _is_per_element(v):
                _check_broadcast(f"param_groups[{g}][{self._hyper_key(name)!r}]", j, v, shape)
                parts.append(v.to(device=b.device, dtype=dtype).broadcast_to(shape).reshape(-1))
            else:
                scalar = _scalar_tensor(v, dtype, b.device)
                parts.append(scalar.reshape(1).expand(b.numels[pos]))
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=b.device)
        self._elementwise_cache[(id(b), name)] = (key, flat)
        return flat

    def _hyper_key(self, name: str) -> str:
        return self._hyper_keys.get(name, name)

    # ---- the flat engine ---------------------------------------------------------------------

    def _flat_update(self, params: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
        if not _uses_flat_engine(type(self)):
            # A subclass written for higher: the per-tensor _update, as higher runs it.
            return DifferentiableOptimizer._flat_update(self, params, grads)
        # (step() has checked the shapes against the reference parameters.)
        flags = [self._group_flags(g) for g in self.param_groups]
        new_params = list(params)
        grad_mode = torch.enable_grad() if self._track_higher_grads else torch.no_grad()
        with grad_mode:
            self._sync_flat_state(params)
            assert self._buckets is not None and self._last_params is not None
            for k, b in enumerate(self._buckets):
                active = [grads[i] is not None for i in b.indices]
                if not any(active):
                    continue
                # The last step's flat buffer, when the fast weights are still its views.
                intact = all(params[i] is self._last_params[i] for i in b.indices)
                hyper, flag_tensor, elementwise = self._hyper_and_flags(b, flags)
                state = self._flat_state[k]
                if self._optional_state and state[self._optional_state].numel() == 0 and \
                        self._needs_optional(flags) and b.numel > 0:
                    state[self._optional_state] = torch.zeros(b.numel, dtype=b.dtype,
                                                              device=b.device)
                    if self._first_step_only:
                        # SGD: a tensor without a momentum buffer starts it (b' = g2).
                        for i in b.indices:
                            self._steps[i] = 0
                if self._first_step_only:
                    steps = [min(self._steps[i], 1) for i in b.indices]
                else:
                    steps = [self._steps[i] for i in b.indices]
                segments = b.segments(steps, active)
                views, state_new = self._step_bucket(
                    b, self._flat_params[k] if intact else None, [params[i] for i in b.indices],
                    [grads[i] for i in b.indices], state, segments, hyper, flag_tensor,
                    elementwise)
                base = views[0]._base
                assert base is not None and base.numel() == b.numel, "views of one flat buffer"
                if not self._track_higher_grads:
                    base = base.detach()
                    views = b.plain_views(base)
                    state_new = {n: t.detach() for n, t in state_new.items()}
                self._flat_params[k] = base
                self._flat_state[k] = state_new
                for j, i in enumerate(b.indices):
                    if active[j]:
                        self._steps[i] += 1
                        self._has_state[i] = True
                    # Every tensor of the bucket becomes a view of the new buffer (an
                    # inactive one passes through unchanged); a frozen one stays frozen.
                    view = views[j]
                    if not self._track_higher_grads:
                        view = view.requires_grad_(params[i].requires_grad)
                    elif not params[i].requires_grad:
                        view = view.detach()
                    new_params[i] = view
        if not self._track_higher_grads:
            # Test mode, as higher: every parameter of a group comes back detached, also
            # one that got no gradient (it may still hang on the initial weights' graph).
            for group_indices in self._group_to_param_list:
                for i in group_indices:
                    if new_params[i].grad_fn is not None:
                        new_params[i] = new_params[i].detach().requires_grad_(
                            new_params[i].requires_grad)
        self._last_params = list(new_params)
        self._mirror.advanced(self._exported_entries)
        return new_params

    def _returns_own_views(self) -> bool:
        return _uses_flat_engine(type(self))

    def _reads_fixed_keys(self) -> bool:
        return _uses_flat_engine(type(self))

    def _detach_params(self, params: list[Tensor]) -> list[Tensor]:
        if self._buckets is None or not _uses_flat_engine(type(self)):
            return super()._detach_params(params)
        if self._mirror.needs_import():
            self._import_state()
        new_params = [p.detach().requires_grad_(p.requires_grad) for p in params]
        self._private_state.clear()
        for k, b in enumerate(self._buckets):
            self._flat_state[k] = {n: t.detach() for n, t in self._flat_state[k].items()}
            base = self._flat_params[k]
            if base is None or not all(params[i] is self._last_params[i] for i in b.indices):
                continue
            # Keep the weights as views of one (detached) flat buffer: no copy next step.
            base = base.detach()
            self._flat_params[k] = base
            for view, i in zip(b.plain_views(base), b.indices):
                new_params[i] = view.requires_grad_(params[i].requires_grad)
        self._mirror.advanced(self._exported_entries)
        return new_params

    def _step_bucket(self, b: Bucket, base: Tensor | None, views: list[Tensor],
                     grads: list[Tensor | None], state: dict[str, Tensor], segments: Tensor,
                     hyper: dict[str, Tensor], flags: Tensor,
                     elementwise: dict[str, Tensor]) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One step over bucket ``b``: the new weights as views of one flat buffer, and the
        new state. ``base`` is the flat buffer ``views`` are intact views of, or ``None``.

        The fused optimisers (``_spec`` set) make one autograd node of it
        (:func:`loft._step.bucket_step`), with per-element ``lr`` and ``weight_decay``
        read by the kernels; the others, and the fused ones given another hyperparameter
        per element, flatten, call :meth:`_call_op` on the flat buffers, and split.
        """
        spec = self._spec
        k = id(b)
        fused = spec is not None and all(n in _KERNEL_ELEMENTWISE for n in elementwise)
        kernel_elementwise = _kernel_elementwise(elementwise, hyper)
        if fused and self._first_order and _constant_shift(grads, state, hyper, elementwise):
            # First order, nothing that needs a gradient enters the update but the weights:
            # p' = p - delta with delta constant. Compute it without a graph and record
            # one pass-through node (it saves nothing, so the state can be freed). When
            # this optimiser alone holds the state (made by its last such step, no view
            # or other reference to it since), the kernel updates it in place.
            in_place = k in self._private_state and not self._keep_state and all(
                _sole_reference(t) for t in state.values())
            new_views, new_state = shift_step(
                spec, b, base, views, grads, [state[n] for n in self._state_names],
                [hyper[n] for n in self._hyper_names], segments, flags, in_place,
                **kernel_elementwise)
            self._private_state.add(k)
            return new_views, dict(zip(self._state_names, new_state))
        self._private_state.discard(k)
        if fused:
            new_views, new_state = bucket_step(
                spec, b, base, views, grads, [state[n] for n in self._state_names],
                [hyper[n] for n in self._hyper_names], segments, flags, **kernel_elementwise)
            return new_views, dict(zip(self._state_names, new_state))
        # Flatten the views themselves (not ``base``), so that gradients with respect to
        # the weights at any recorded step include the path through this update.
        p_new, state_new = self._call_op(b.flatten(views), b.flatten(grads), state, segments,
                                         hyper, flags, elementwise)
        return b.views(p_new), state_new

    # ---- higher's per-tensor update ------------------------------------------------------------

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        """higher's per-tensor ``_update``: for every tensor with a gradient, one step of
        the same math (loft's reference) on that tensor alone, replacing
        ``param_groups[g]['params'][j]`` and the entries of ``state[g][j]``.

        Runs when a subclass overrides ``step`` or ``_update`` (and calls this one);
        loft's own classes run the flat engine instead.
        """
        structure = self._mirror.structure
        grad_mode = torch.enable_grad() if self._track_higher_grads else torch.no_grad()
        with grad_mode:
            for g, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
                for j, (p, grad) in enumerate(zip(group["params"], grads)):
                    if grad is None:
                        continue
                    group["params"][j] = self._tensor_step(g, j, p, grad, structure[g])

    def _tensor_step(self, g: int, j: int, p: Tensor, grad: Tensor,
                     group_state: dict[int, dict[str, Any]]) -> Tensor:
        """One update of one tensor (:meth:`_update`); writes its state dict."""
        group = self.param_groups[g]
        b = Bucket(p.device, p.dtype, [0], [p.shape], [0])
        entry = group_state.get(j, {})  # .get: higher makes no dict for a stateless update
        step, _, step_dtype, values = self._read_entry(entry)
        flags = [self._group_flags(group)]
        unused = self._unused_state(flags)
        state: dict[str, Tensor] = {}
        for name in self._state_names:
            if name in unused and name not in values:
                state[name] = torch.empty(0, dtype=b.dtype, device=b.device)
            else:
                value = values.get(name)
                if value is None:
                    value = self._default_state(name, group, p.shape, b)
                elif not isinstance(value, Tensor):
                    value = torch.full(p.shape, float(value), dtype=p.dtype, device=p.device)
                state[name] = b.flatten([value])
        ct = reference.compute_dtype(b.dtype)
        for name, default in self._segment_state_names.items():
            state[name] = _scalar_tensor(values.get(name, default), ct, b.device).reshape(1)
        hyper, flag_tensor, elementwise = self._hyper_and_flags_of(b, g, j, flags)
        op_step = min(step, 1) if self._first_step_only else step
        segments = torch.tensor([[0, b.numel, 0, op_step, 1]], dtype=torch.int64,
                                device=b.device)
        p_new, state_new = self._call_op(p.reshape(-1), grad.reshape(-1), state, segments,
                                         hyper, flag_tensor, elementwise)
        self._write_entry(entry, step + 1, step_dtype, state_new, p.shape, unused)
        if entry and j not in group_state:
            group_state[j] = entry
        return p_new.view(p.shape)

    def _hyper_and_flags_of(self, b: Bucket, g: int, j: int, flags: list[int]
                            ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        """:meth:`_hyper_and_flags` for tensor ``j`` of group ``g`` alone (a one-tensor,
        one-group bucket)."""
        values = self._group_hyper(self.param_groups[g])
        ct = reference.compute_dtype(b.dtype)
        hyper, elementwise = {}, {}
        for name in self._hyper_names:
            v = values[name]
            if _is_per_element(v):
                _check_broadcast(f"param_groups[{g}][{self._hyper_key(name)!r}]", j, v,
                                 b.shapes[0])
                elementwise[name] = v.to(device=b.device, dtype=ct).broadcast_to(
                    b.shapes[0]).reshape(-1)
                v = 0.0
            hyper[name] = hyper_tensor([v], self._hyper_dtype(b), b.device)
        return hyper, torch.tensor(flags, dtype=torch.int64, device=b.device), elementwise

    def _write_entry(self, entry: dict[str, Any], step: int, step_dtype: torch.dtype | None,
                     state: dict[str, Tensor], shape: torch.Size, unused: set[str]) -> None:
        """Write a tensor's new state into its higher-style dict (new tensors, not views;
        ``unused``: the buffers its group does not use)."""
        if self._step_key:
            entry[self._step_key] = step if step_dtype is None else torch.tensor(
                float(step), dtype=step_dtype)
        for name in self._state_names:
            value = state[name]
            if value.numel() == shape.numel() and name not in unused:
                entry[name] = value.reshape(shape).clone()
        for name in self._segment_state_names:
            entry[name] = state[name].reshape(()).clone()


#: The hyperparameters the fused kernels take per element (others: the reference path).
_KERNEL_ELEMENTWISE = ("lr", "weight_decay")

#: Per class (weakly held: subclasses made at run time are freed with their users).
_FLAT_ENGINE_CACHE: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _uses_flat_engine(cls: type) -> bool:
    """Whether ``cls`` runs loft's flat engine: the classes that define its ``step`` and
    ``_update`` are loft's own (a subclass written for higher overrides one of them and
    gets higher's per-tensor path)."""
    known = _FLAT_ENGINE_CACHE.get(cls)
    if known is None:
        def owner(name: str) -> type:
            return next(c for c in cls.__mro__ if name in vars(c))
        known = all(owner(name).__module__.split(".")[0] == "loft" for name in ("step", "_update"))
        _FLAT_ENGINE_CACHE[cls] = known
    return known


def _is_per_element(value: Any) -> bool:
    """A hyperparameter given per element: a tensor of more than one value."""
    return isinstance(value, Tensor) and value.numel() != 1


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (and only to it)."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _check_broadcast(where: str, index: int, value: Tensor, shape: torch.Size) -> None:
    """A per-element hyperparameter (``where``: its key and group) must broadcast to the
    shape of each parameter of its group (parameter ``index`` has ``shape``)."""
    if not _broadcasts_to(value.shape, shape):
        raise ValueError(
            f"{where} has shape {list(value.shape)}, which does not broadcast to the shape "
            f"{list(shape)} of parameter {index} of that group: a hyperparameter is a "
            "number, a one-element tensor or a tensor broadcastable to each parameter of "
            "its group")


def _nonzero(value: Any) -> bool:
    """Whether a hyperparameter that switches a mode on (momentum) is nonzero anywhere."""
    return bool((value != 0).any()) if isinstance(value, Tensor) else value != 0


def _scalar_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A per-tensor state value (a number or a one-element tensor) as a 0-d tensor."""
    if isinstance(value, Tensor):
        return value.reshape(()).to(device=device, dtype=dtype)
    return torch.tensor(float(value), dtype=dtype, device=device)


def _kernel_elementwise(elementwise: dict[str, Tensor],
                        hyper: dict[str, Tensor]) -> dict[str, Any]:
    """The fused step's ``elementwise=`` argument (lr and weight decay per element, a
    0-element tensor for one given per group); nothing when neither is per element."""
    if not elementwise:
        return {}
    empty = next(iter(elementwise.values())).new_empty(0)
    return {"elementwise": (elementwise.get("lr", empty), elementwise.get("weight_decay", empty))}


def _sole_reference(t: Tensor) -> bool:
    """Whether ``t`` is the only tensor on its memory (no view of it, no detached or other
    alias: the storage is held once by ``t`` and once by the probe itself) and is not a
    view itself. A saved reference to ``t`` itself is not seen here: the caller rules
    those out (see ``_private_state``)."""
    if t.numel() == 0:
        return True
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # a torch without the probe: never in place
        return False
    return t._base is None and use_count(t.untyped_storage()._cdata) == 2


def _constant_shift(grads: list[Tensor | None], state: dict[str, Tensor],
                    hyper: dict[str, Tensor], elementwise: dict[str, Tensor]) -> bool:
    """Whether a fused SGD/Adam(W) update is ``p - delta`` with ``delta`` independent of
    anything that requires grad: constant gradients (first order), state and
    hyperparameters, and no weight decay (which would tie ``delta`` or a scale to ``p``)."""
    if any(g is not None and g.requires_grad for g in grads):
        return False
    if any(t.requires_grad for t in (*state.values(), *hyper.values(), *elementwise.values())):
        return False
    decay = elementwise.get("weight_decay", hyper["weight_decay"])
    return not bool(decay.any())


class DifferentiableSGD(_FlatOptimizer):
    r"""Differentiable ``torch.optim.SGD`` (higher's ``DifferentiableSGD``).

    Per parameter: :math:`g_2 = \pm g + \lambda p`; with momentum
    :math:`b' = g_2` on the first step, else :math:`\mu b + (1 - \tau) g_2`;
    :math:`p' = p - \eta d` with :math:`d = g_2 + \mu b'` (nesterov), :math:`b'`
    (momentum) or :math:`g_2`. Runs :func:`loft.ops.sgd_step`, one call per bucket.
    """

    _state_names = ("momentum_buffer",)
    _step_key = None  # torch.optim.SGD and higher keep no step count
    _hyper_names = ops.SGD_HYPER
    _spec = ops._SGD
    _optional_state = "momentum_buffer"
    _first_step_only = True

    def _read_entry(self, entry: dict[str, Any]) -> tuple[int, bool, torch.dtype | None,
                                                          dict[str, Any]]:
        # A momentum buffer means "not the first step" (as in torch.optim and higher).
        buffer = entry.get("momentum_buffer") if entry else None
        if buffer is None:
            return 0, False, None, {}
        return 1, True, None, {"momentum_buffer": buffer}

    def _exported_entry(self, i: int, unused: set[str]) -> dict[str, Any]:
        # No momentum buffer before a tensor's first momentum step.
        return super()._exported_entry(i, unused) if self._steps[i] > 0 else {}

    def _export_state(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        exported = super()._export_state(entry)
        if exported is None or "momentum_buffer" not in exported:
            return None
        return {"momentum_buffer": exported["momentum_buffer"]}

    def _group_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "lr": group["lr"],
            "momentum": group.get("momentum", 0.0),
            "dampening": group.get("dampening", 0.0),
            "weight_decay": group.get("weight_decay", 0.0),
        }

    def _group_flags(self, group: dict[str, Any]) -> int:
        flags = 0
        if group.get("maximize", False):
            flags |= reference.SGD_MAXIMIZE
        if group.get("nesterov", False):
            flags |= reference.SGD_NESTEROV
        if _nonzero(group.get("momentum", 0.0)):
            flags |= reference.SGD_MOMENTUM
        return flags

    def _needs_optional(self, flags: list[int]) -> bool:
        return any(f & reference.SGD_MOMENTUM for f in flags)


class DifferentiableAdam(_FlatOptimizer):
    r"""Differentiable ``torch.optim.Adam`` (higher's ``DifferentiableAdam``, HEAD numbers).

    .. math::
        m' = \beta_1 m + (1-\beta_1) g_2,\quad v' = \beta_2 v + (1-\beta_2) g_2^2,\quad
        p' = p_0 - \frac{\eta}{1-\beta_1^t}\frac{m'}{\sqrt{u}/\sqrt{1-\beta_2^t}+\epsilon}

    with per-tensor step counts :math:`t`, :math:`u = \max(v_{max}, v')` under amsgrad,
    :math:`g_2 = \pm g + \lambda p`, :math:`p_0 = p`. Runs :func:`loft.ops.adam_step`.
    """

    _state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _hyper_names = ops.ADAM_HYPER
    _hyper_keys = {"beta1": "betas[0]", "beta2": "betas[1]"}
    _spec = ops._ADAM
    _optional_state = "max_exp_avg_sq"
    _decoupled = False

    def _group_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        betas = group["betas"]
        return {
            "lr": group["lr"],
            "beta1": betas[0],
            "beta2": betas[1],
            "eps": group["eps"],
            "weight_decay": group.get("weight_decay", 0.0),
        }

    def _group_flags(self, group: dict[str, Any]) -> int:
        flags = reference.ADAM_DECOUPLED if (self._decoupled or group.get(
            "decoupled_weight_decay", False)) else 0
        if group.get("maximize", False):
            flags |= reference.ADAM_MAXIMIZE
        if group.get("amsgrad", False):
            flags |= reference.ADAM_AMSGRAD
        return flags

    def _needs_optional(self, flags: list[int]) -> bool:
        return any(f & reference.ADAM_AMSGRAD for f in flags)


class DifferentiableAdamW(DifferentiableAdam):
    r"""Differentiable ``torch.optim.AdamW``: Adam with decoupled weight decay,
    :math:`g_2 = \pm g`, :math:`p_0 = (1 - \eta\lambda) p`."""

    _decoupled = True


# The optimisers without a fused kernel: reference math over the same flat buffers.
from loft._optim_extra import (  # noqa: E402 - they subclass _FlatOptimizer above
    DifferentiableAdadelta,
    DifferentiableAdagrad,
    DifferentiableAdamax,
    DifferentiableASGD,
    DifferentiableRMSprop,
    DifferentiableRprop,
)

_OptMappingType = dict[type, type[DifferentiableOptimizer]]
_OPT_MAPPING: _OptMappingType = {
    torch.optim.SGD: DifferentiableSGD,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.AdamW: DifferentiableAdamW,
    torch.optim.Adagrad: DifferentiableAdagrad,
    torch.optim.Adadelta: DifferentiableAdadelta,
    torch.optim.Adamax: DifferentiableAdamax,
    torch.optim.ASGD: DifferentiableASGD,
    torch.optim.RMSprop: DifferentiableRMSprop,
    torch.optim.Rprop: DifferentiableRprop,
}


#: higher's name for the registry (the same dict).
_opt_mapping = _OPT_MAPPING


def register_optim(optim_type: type, diff_optim_type: type[DifferentiableOptimizer]) -> None:
    """Map a ``torch.optim`` type to a differentiable optimiser (higher's ``register_optim``)."""
    _OPT_MAPPING[optim_type] = diff_optim_type


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: _Override | None = None,
    track_higher_grads: bool = True,
    first_order: bool = False,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable version of ``opt`` (higher's ``get_diff_optim``).

    ``opt``'s type must be registered (SGD, Adam, AdamW built in; see
    :func:`register_optim`); its param groups and state are copied. ``first_order``:
    see :class:`DifferentiableOptimizer`.
    """
    opt_type = type(opt)
    if opt_type not in _OPT_MAPPING:
        name = f"{opt_type.__module__}.{opt_type.__qualname__}"
        # As higher: the exact type decides. A subclass may change step(), so loft cannot
        # assume that its parent's differentiable version computes the same update.
        parent = next((t for t in opt_type.__mro__[1:] if t in _OPT_MAPPING), None)
        hint = (f" It subclasses {parent.__module__}.{parent.__qualname__}: if its update is "
                f"the same, register it with loft.register_optim({opt_type.__name__}, "
                f"{_OPT_MAPPING[parent].__module__}.{_OPT_MAPPING[parent].__qualname__})."
                if parent is not None else
                " Use loft.register_optim(optim_type, diff_optim_type) to add one.")
        raise ValueError(
            f"Optimizer type {name} has no differentiable version in loft; supported: "
            f"{', '.join(sorted(t.__name__ for t in _OPT_MAPPING))}.{hint}"
        )
    return _OPT_MAPPING[opt_type](opt, reference_params, fmodel=fmodel, device=device,
                                  override=override, track_higher_grads=track_higher_grads,
                                  first_order=first_order, **kwargs)


def create_diff_optim(
    opt_type: type,
    opt_kwargs: dict[str, Any] | None = None,
    params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: _Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """Build a differentiable optimiser of ``opt_type`` directly (higher's ``create_diff_optim``).

    The optimiser is constructed on placeholder tensors shaped like ``params`` (or
    ``fmodel``'s parameters) with ``opt_kwargs``; ``params`` may also be param groups
    (dicts with the tensors under ``"params"`` and per-group settings), as a torch
    optimizer takes them.
    """
    opt_kwargs = {} if opt_kwargs is None else opt_kwargs
    if params is not None:
        params = list(params)
    elif fmodel is not None:
        params = list(fmodel.parameters())
    else:
        raise ValueError("Must specify one of fmodel or params in kwargs.")

    def placeholders(tensors: Any) -> list[Tensor]:
        tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        return [torch.zeros_like(p, requires_grad=True) for p in tensors]

    if params and isinstance(params[0], dict):
        # Param groups, as a torch optimizer takes them: each group's tensors get
        # placeholders, and the fast weights follow the groups' order.
        groups = [{**group, "params": placeholders(group["params"])} for group in params]
        dummies = [p for group in groups for p in group["params"]]
        opt = opt_type(groups, **opt_kwargs)
    else:
        dummies = placeholders(params)
        opt = opt_type(dummies, **opt_kwargs)
    return get_diff_optim(opt, dummies, fmodel=fmodel, device=device, override=override,
                          track_higher_grads=track_higher_grads, **kwargs)


def get_trainable_opt_params(opt: torch.optim.Optimizer,
                             device: torch.device | str | None = None) -> _Override:
    """An ``override`` dict of learnable tensors from ``opt``'s numeric hyperparameters
    (higher's ``get_trainable_opt_params``).

    Every group entry whose leaves are all ints or floats (``lr``, ``betas``, ...)
    becomes tensors that require grad, one list entry per group; tensors are cloned.
    """
    override: dict[str, list[Any]] = {}

    def to_leaf(x: Any) -> Tensor:
        if isinstance(x, Tensor):
            return x.detach().clone().requires_grad_()
        return torch.tensor(float(x), device=device, requires_grad=True)

    for group in opt.param_groups:
        for key, value in group.items():
            if key == "params":
                continue
            if all(isinstance(x, (int, float)) for x in _utils.flatten(value)):
                override.setdefault(key, []).append(_utils._recursive_map(value, to_leaf))
    return override


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: _Override) -> None:
    """Write learned hyperparameters back into ``opt``'s groups as plain numbers
    (higher's ``apply_trainable_opt_params``)."""
    for key, values in override.items():
        if len(values) not in (1, len(opt.param_groups)):
            raise ValueError(
                f"override[{key!r}] must hold 1 value or one per param group "
                f"({len(opt.param_groups)}), got {len(values)}"
            )
        for i, group in enumerate(opt.param_groups):
            replacement = values[0] if len(values) == 1 else values[i]
            group[key] = _apply_structure(replacement, group[key])


def _apply_structure(replacement: Any, target: Any) -> Any:
    """``replacement``'s values in ``target``'s structure and leaf types: a tensor
    replacing a number becomes a number of the same type (``bool``, ``int``, ``float``);
    a tensor replacing a tensor is copied into it."""
    if isinstance(target, Tensor) and isinstance(replacement, Tensor):
        with torch.no_grad():
            target.copy_(replacement.to(target.device))
        return target
    if isinstance(target, (list, tuple)):
        if not isinstance(replacement, (list, tuple)):
            raise ValueError(f"expected a {type(target).__name__} to replace {target!r}, got "
                             f"{type(replacement).__name__}")
        return type(target)(_apply_structure(r, t) for r, t in zip(replacement, target))
    if isinstance(target, dict):
        return {k: _apply_structure(replacement[k], v) for k, v in target.items()}
    if isinstance(replacement, Tensor):
        return type(target)(replacement.item())
    return replacement


def _to_numbers(value: Any) -> Any:
    """Hyperparameters for a torch optimiser: tensors become Python numbers."""
    return _utils._recursive_map(
        value, lambda x: x.item() if isinstance(x, Tensor) and x.numel() == 1 else x)
