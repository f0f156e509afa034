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

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from loft import ops, reference
from loft import utils as _utils
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


def _check_override_value(name: str, value: Any, current: Any) -> None:
    """One group's ``override[name]``: the structure of the value it replaces (a pair for
    ``betas``), and tensors holding one element."""
    if isinstance(current, (list, tuple)):
        if isinstance(value, Tensor) and value.dim() == 1 and len(value) == len(current):
            return
        if not isinstance(value, (list, tuple)) or len(value) != len(current):
            raise ValueError(
                f"override[{name!r}] values must be {type(current).__name__}s of "
                f"{len(current)} like {current!r}, got {value!r}"
            )
        for part in value:
            _check_override_value(name, part, None)
    elif isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(f"override[{name!r}]: a tensor value must hold one element, got "
                         f"shape {list(value.shape)}")


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
        self._init_state = self._copy_state(other, reference_params)
        # higher's layout: self.state[group_index][index_in_group] -> dict.
        self.state: list[dict[int, dict[str, Any]]] = [
            {j: dict(self._init_state[i]) for j, i in enumerate(mapping) if self._init_state[i]}
            for mapping in self._group_to_param_list
        ]
        if override is not None:
            self._apply_override(override)

    # ---- higher's API ------------------------------------------------------------------

    def _apply_override(self, override: _Override) -> None:
        """Set ``override``'s values in the param groups, after checking each entry: one
        value or one per group, the structure of the value it replaces (``betas``: a
        pair), tensors of one element, and (for loft's own optimisers, which read a fixed
        set of keys) a key that the groups have, so that a typo is not silently ignored."""
        known = {key for group in self.param_groups for key in group if key != "params"}
        for name, values in override.items():
            if (name not in known and self.param_groups
                    and type(self)._update is DifferentiableOptimizer._update):
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
                                      group.get(name))
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
            self._fmodel.update_params(new_params, _checked=self._fused_update())
        return new_params

    def _fused_update(self) -> bool:
        return False

    def _check_params(self, params: list[Tensor]) -> None:
        """``step``'s fast weights: tensors shaped as the reference parameters (the
        shapes are read from the param groups at the first step, before any update)."""
        last = self.__dict__.get("_last_params")
        if last is not None and len(last) == len(params) and all(
                p is q for p, q in zip(params, last)):
            return  # the weights this optimizer returned last step, unchanged
        shapes = self.__dict__.get("_reference_shapes")
        if shapes is None:
            shapes = [None] * self._num_params
            for group, mapping in zip(self.param_groups, self._group_to_param_list):
                for p, i in zip(group["params"], mapping):
                    shapes[i] = p.shape
            self._reference_shapes = shapes
        for i, (p, shape) in enumerate(zip(params, shapes)):
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

    def _copy_state(self, other: torch.optim.Optimizer,
                    reference_params: list[Tensor]) -> list[dict[str, Any]]:
        states = []
        for p in reference_params:
            st = other.state.get(p, {})
            copied = {}
            for k, v in st.items():
                if isinstance(v, Tensor):
                    v = v.detach().clone()
                    if self._device is not None:
                        v = v.to(self._device)
                copied[k] = v
            states.append(copied)
        return states


class _FlatOptimizer(DifferentiableOptimizer):
    """Flat-buffer optimiser: one op call per bucket per step.

    Subclasses say which state buffers they keep (``_state_names``, each one value per
    parameter element), which hyperparameters they read from a param group
    (``_hyper_names``, ``_group_hyper``), which per-group flags they pass
    (``_group_flags``), and run one step over a bucket in ``_call_op``.
    """

    _hyper_names: tuple[str, ...] = ()
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
        self._steps = [self._initial_step(st) for st in self._init_state]
        self._flat_params: list[Tensor | None] = []
        self._flat_state: list[dict[str, Tensor]] = []
        self._last_params: list[Tensor | None] | None = None

    @property
    def state(self) -> list[dict[int, dict[str, Any]]]:
        """higher's layout, ``state[group_index][index_in_group]``: views of the current
        flat state buffers, and the tensor's step count."""
        if self._buckets is None:
            return self._state_before_first_step
        where = {i: (k, j) for k, b in enumerate(self._buckets) for j, i in enumerate(b.indices)}
        out: list[dict[int, dict[str, Any]]] = []
        for mapping in self._group_to_param_list:
            group_state: dict[int, dict[str, Any]] = {}
            for j, i in enumerate(mapping):
                k, pos = where[i]
                b = self._buckets[k]
                off, n = b.offsets[pos], b.numels[pos]
                entry: dict[str, Any] = {"step": self._steps[i]}
                for name, flat in self._flat_state[k].items():
                    if flat.numel() == b.numel and flat.dim() == 1:
                        entry[name] = flat[off:off + n].view(b.shapes[pos])
                group_state[j] = entry
            out.append(group_state)
        return out

    @state.setter
    def state(self, value: list[dict[int, dict[str, Any]]]) -> None:
        self._state_before_first_step = value

    # subclass hooks
    def _initial_step(self, state: dict[str, Any]) -> int:
        return _as_int_step(state.get("step", 0))

    def _group_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _group_flags(self, group: dict[str, Any]) -> int:
        raise NotImplementedError

    def _call_op(self, params: Tensor, grads: Tensor, state: dict[str, Tensor], segments: Tensor,
                 hyper: dict[str, Tensor], flags: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def _needs_optional(self, flags: list[int]) -> bool:
        return False

    # machinery
    def _hyper_and_flags(self, b: Bucket, flags: list[int]) -> tuple[dict[str, Tensor], Tensor]:
        """The ``[G]`` hyperparameter tensors and group flags of a bucket for this step.

        Built anew whenever a group holds a tensor (it may require grad, and the graph
        needs a fresh node per step); all-number settings are cached until they change.
        """
        per_group = [self._group_hyper(g) for g in self.param_groups]
        values = {name: [h[name] for h in per_group] for name in self._hyper_names}
        numbers = not any(isinstance(v, Tensor) for vs in values.values() for v in vs)
        key = (b.device, b.dtype, tuple(flags),
               tuple(tuple(vs) for vs in values.values())) if numbers else None
        cache = self.__dict__.setdefault("_hyper_cache", {})
        if key is not None and key in cache:
            return cache[key]
        hdt = reference.compute_dtype(b.dtype)
        hyper = {name: hyper_tensor(vs, hdt, b.device) for name, vs in values.items()}
        result = (hyper, torch.tensor(flags, dtype=torch.int64, device=b.device))
        if key is not None:
            cache.clear()
            cache[key] = result
        return result

    def _setup(self, params: list[Tensor]) -> None:
        self._buckets = make_buckets(params, self._group_of)
        # No flat weights yet: the first step concatenates the weights it is given.
        self._flat_params = [None] * len(self._buckets)
        self._last_params = [None] * len(params)
        # The optional buffer (``_optional_state``) starts with 0 elements unless a group
        # needs it; a later override that turns it on allocates it in _flat_update.
        skip_optional = bool(self._optional_state) and not self._needs_optional(
            [self._group_flags(g) for g in self.param_groups])
        self._flat_state = []
        for b in self._buckets:
            state = {}
            for name in self._state_names:
                if skip_optional and name == self._optional_state:
                    state[name] = torch.empty(0, dtype=b.dtype, device=b.device)
                else:
                    state[name] = b.flatten([self._init_state[i].get(name) for i in b.indices])
            self._flat_state.append(state)

    def _flat_update(self, params: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
        if not self._fused_update():
            # A subclass written for higher: its own per-tensor _update wins.
            return DifferentiableOptimizer._flat_update(self, params, grads)
        if self._buckets is None:
            self._setup(params)
        assert self._buckets is not None and self._last_params is not None
        # (step() has checked the shapes against the reference parameters.)
        flags = [self._group_flags(g) for g in self.param_groups]
        new_params = list(params)
        grad_mode = torch.enable_grad() if self._track_higher_grads else torch.no_grad()
        with grad_mode:
            for k, b in enumerate(self._buckets):
                active = [grads[i] is not None for i in b.indices]
                if not any(active):
                    continue
                # The last step's flat buffer, when the fast weights are still its views.
                intact = all(params[i] is self._last_params[i] for i in b.indices)
                hyper, flag_tensor = self._hyper_and_flags(b, flags)
                state = self._flat_state[k]
                if self._optional_state and state[self._optional_state].numel() == 0 and \
                        self._needs_optional(flags) and b.numel > 0:
                    state[self._optional_state] = torch.zeros(b.numel, dtype=b.dtype,
                                                              device=b.device)
                if self._first_step_only:
                    steps = [min(self._steps[i], 1) for i in b.indices]
                else:
                    steps = [self._steps[i] for i in b.indices]
                segments = b.segments(steps, active)
                views, state_new = self._step_bucket(
                    b, self._flat_params[k] if intact else None, [params[i] for i in b.indices],
                    [grads[i] for i in b.indices], state, segments, hyper, flag_tensor)
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
        return new_params

    def _fused_update(self) -> bool:
        return type(self)._update is DifferentiableOptimizer._update

    def _detach_params(self, params: list[Tensor]) -> list[Tensor]:
        if self._buckets is None or not self._fused_update():
            return super()._detach_params(params)
        new_params = [p.detach().requires_grad_(p.requires_grad) for p in params]
        self.__dict__.setdefault("_private_state", set()).clear()
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
        return new_params

    def _step_bucket(self, b: Bucket, base: Tensor | None, views: list[Tensor],
                     grads: list[Tensor | None], state: dict[str, Tensor], segments: Tensor,
                     hyper: dict[str, Tensor],
                     flags: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One step over bucket ``b``: the new weights as views of one flat buffer, and the
        new state. ``base`` is the flat buffer ``views`` are intact views of, or ``None``.

        The fused optimisers (``_spec`` set) make one autograd node of it
        (:func:`loft._step.bucket_step`); the others flatten, call :meth:`_call_op` on
        the flat buffers, and split.
        """
        spec = self._spec
        private = self.__dict__.setdefault("_private_state", set())
        k = id(b)
        if spec is not None and self._first_order and _constant_shift(grads, state, hyper):
            # First order, nothing that needs a gradient enters the update but the weights:
            # p' = p - delta with delta constant. Compute it without a graph and record
            # one pass-through node (it saves nothing, so the state can be freed). When
            # this optimiser alone holds the state (made by its last such step, no view
            # or other reference to it since), the kernel updates it in place.
            in_place = k in private and not self.__dict__.get("_keep_state") and all(
                _sole_reference(t) for t in state.values())
            new_views, new_state = shift_step(
                spec, b, base, views, grads, [state[n] for n in self._state_names],
                [hyper[n] for n in self._hyper_names], segments, flags, in_place)
            private.add(k)
            return new_views, dict(zip(self._state_names, new_state))
        private.discard(k)
        if spec is not None:
            new_views, new_state = bucket_step(
                spec, b, base, views, grads, [state[n] for n in self._state_names],
                [hyper[n] for n in self._hyper_names], segments, flags)
            return new_views, dict(zip(self._state_names, new_state))
        # Flatten the views themselves (not ``base``), so that gradients with respect to
        # the weights at any recorded step include the path through this update.
        p_new, state_new = self._call_op(b.flatten(views), b.flatten(grads), state, segments,
                                         hyper, flags)
        return b.views(p_new), state_new


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
                    hyper: dict[str, Tensor]) -> bool:
    """Whether a fused SGD/Adam(W) update is ``p - delta`` with ``delta`` independent of
    anything that requires grad: constant gradients (first order), state and
    hyperparameters, and no weight decay (which would tie ``delta`` or a scale to ``p``)."""
    if any(g is not None and g.requires_grad for g in grads):
        return False
    if any(t.requires_grad for t in state.values()) or \
            any(h.requires_grad for h in hyper.values()):
        return False
    return not bool(hyper["weight_decay"].any())


class DifferentiableSGD(_FlatOptimizer):
    r"""Differentiable ``torch.optim.SGD`` (higher's ``DifferentiableSGD``).

    Per parameter: :math:`g_2 = \pm g + \lambda p`; with momentum
    :math:`b' = g_2` on the first step, else :math:`\mu b + (1 - \tau) g_2`;
    :math:`p' = p - \eta d` with :math:`d = g_2 + \mu b'` (nesterov), :math:`b'`
    (momentum) or :math:`g_2`. Runs :func:`loft.ops.sgd_step`, one call per bucket.
    """

    _state_names = ("momentum_buffer",)
    _hyper_names = ops.SGD_HYPER
    _spec = ops._SGD
    _optional_state = "momentum_buffer"
    _first_step_only = True

    def _initial_step(self, state: dict[str, Any]) -> int:
        # torch.optim.SGD keeps no step count: a momentum buffer means "not the first step".
        return 1 if state.get("momentum_buffer") is not None else 0

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
        if bool(group.get("momentum", 0.0) != 0):
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

_OPT_MAPPING: dict[type, type[DifferentiableOptimizer]] = {
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
    params: Iterable[Tensor] | None = None,
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: _Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """Build a differentiable optimiser of ``opt_type`` directly (higher's ``create_diff_optim``).

    The optimiser is constructed on placeholder tensors shaped like ``params`` (or
    ``fmodel``'s parameters) with ``opt_kwargs``.
    """
    opt_kwargs = {} if opt_kwargs is None else opt_kwargs
    if params is not None:
        params = list(params)
    elif fmodel is not None:
        params = list(fmodel.parameters())
    else:
        raise ValueError("Must specify one of fmodel or params in kwargs.")
    dummies = [torch.zeros_like(p, requires_grad=True) for p in params]
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
