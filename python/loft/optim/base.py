"""higher's ``DifferentiableOptimizer``: the API every loft optimiser shares.

``diffopt.step(loss)`` replaces ``opt.zero_grad(); loss.backward(); opt.step()``: it
takes the gradients of ``loss`` with respect to the fast weights (with
``create_graph=True`` while tracking higher-order gradients) and returns new fast
weights that stay differentiable with respect to the old ones, the gradients, and any
tensor hyperparameter given through ``override``. How the new weights are computed is
the subclass's: loft's own optimisers run the flat engine (:mod:`loft.optim.engine`);
a subclass written for higher implements the per-tensor ``_update``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from loft import utils as _utils
from loft.optim.higher_state import StateMirror, new_structure
from loft.optim.hyper import check_broadcast, is_per_element

__all__ = ["DifferentiableOptimizer"]

_GradCallback = Callable[[list[Tensor | None]], Sequence[Tensor | None]]
_Override = dict[str, Sequence[Any]]


def _gradients(loss: Tensor, inputs: list[Tensor], create_graph: bool
               ) -> Sequence[Tensor | None]:
    """``torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)``
    for a one-element ``loss``: the autograd engine called directly where that is what
    ``grad`` would do (a plain tensor, no functorch transform), without its Python
    argument handling (a cost every step pays on small models)."""
    if _ENGINE is None or type(loss) is not Tensor or \
            torch._C._are_functorch_transforms_active():
        return torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
    return _ENGINE.run_backward((loss,), (torch.ones_like(loss),), create_graph, create_graph,
                                tuple(inputs), True, False)


#: The autograd engine ``torch.autograd.grad`` runs (``None``: not found in this torch).
_ENGINE = getattr(getattr(torch.autograd, "variable", None), "Variable", None)
_ENGINE = getattr(_ENGINE, "_execution_engine", None)


def _check_loss(loss: Any, tasks: int | None) -> Tensor:
    """``step``'s loss: a tensor with one element that requires grad; with ``tasks=N``
    also the ``[N]`` per-task losses (summed: each task's step sees its own gradient)."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"step: the loss must be a tensor, got {type(loss).__name__}")
    if tasks is not None and loss.numel() != 1:
        if loss.shape != (tasks,):
            raise ValueError(
                f"step: with tasks={tasks} the loss must be the [{tasks}] per-task losses or "
                f"their sum (one element), got shape {list(loss.shape)}")
        loss = loss.sum()
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
    return loss


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
    elif is_per_element(value):
        for j, shape in enumerate(shapes):
            check_broadcast(f"override[{name!r}] for param group {group}", j, value, shape)


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
        #: Tasks batched into ``fmodel`` (``tasks=N``: weights and state ``[N, *shape]``).
        self._tasks: int | None = getattr(fmodel, "tasks", None)
        tasks = self._tasks
        self._device = torch.device(device) if device is not None else None
        self._grad_callback = grad_callback
        self._track_higher_grads = bool(track_higher_grads)
        self._num_params = len(reference_params)
        #: The fast weights the last step (or truncate) returned (per-tensor path).
        self._last_params: list[Tensor | None] | None = None
        self.param_groups: list[dict[str, Any]] = []
        self._group_to_param_list: list[list[int]] = []
        self._group_of: list[int | None] = [None] * len(reference_params)
        for g, group in enumerate(other.param_groups):
            mapping = []
            for p in group["params"]:
                index = _utils._find_param_in_list(p, reference_params)
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
            None if g is None else p.shape if tasks is None else torch.Size((tasks, *p.shape))
            for p, g in zip(reference_params, self._group_of)]
        # higher's layout, state[group_index][index_in_group] -> dict: the torch
        # optimizer's state, copied (detached, cast to ``device``), as higher copies it.
        structure = new_structure(len(self.param_groups))
        for g, group in enumerate(other.param_groups):
            for j, p in enumerate(group["params"]):
                if p in other.state:
                    structure[g][j] = {k: _utils._recursive_copy_and_cast(
                        _per_task(k, v, p, tasks), self._device)
                        for k, v in other.state[p].items()}
        self._mirror = StateMirror(structure, self._managed_state_keys())
        if override is not None:
            self._apply_override(override)

    @property
    def fmodel(self) -> Any:
        """The patched module whose fast weights ``step`` updates (higher: ``_fmodel``)."""
        return self._fmodel

    @property
    def track_higher_grads(self) -> bool:
        """Whether steps keep the graph for second-order gradients (``_track_higher_grads``)."""
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        self._track_higher_grads = bool(value)

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
        loss = _check_loss(loss, self._tasks)
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
        all_grads = _gradients(loss, targets,
                               self._track_higher_grads and not self._first_order)
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
        new_params = self._new_weights(params, list(all_grads))
        if self._fmodel is not None:
            # loft's flat optimisers return views shaped as the weights they were given;
            # a higher-style _update may return anything, so that is checked.
            self._fmodel.update_params(new_params, _checked=self._returns_own_views())
        return new_params

    def _returns_own_views(self) -> bool:
        """Whether ``_new_weights`` returns loft's own views, shaped as the weights it was
        given (a higher-style ``_update`` may return anything, so that is checked)."""
        return False

    def _reads_fixed_keys(self) -> bool:
        """Whether the update reads a fixed set of param-group keys (loft's own classes),
        so that an override of another key is a mistake (a typo) rather than an input."""
        return False

    def _check_params(self, params: list[Tensor]) -> None:
        """``step``'s fast weights: tensors shaped as the reference parameters (the
        shapes are read from the param groups at the first step, before any update)."""
        last = self._last_returned()
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
        self._remember(new_params)
        if self._fmodel is not None:
            times, _ = self._fmodel.history()
            self._fmodel.set_history(times[-1:], [new_params])
        return new_params

    def _current_params(self) -> list[Tensor] | None:
        if self._fmodel is not None and self._fmodel.fast_params is not None:
            return list(self._fmodel.fast_params)
        last = self._last_returned()
        return None if last is None or any(p is None for p in last) else list(last)

    def _last_returned(self) -> list[Tensor | None] | None:
        """The fast weights the last step or :meth:`truncate` returned (``None``: none yet)."""
        return self._last_params

    def _remember(self, params: list[Tensor]) -> None:
        """Record ``params`` as the fast weights this optimiser returned last."""
        self._last_params = list(params)

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

    def _new_weights(self, params: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
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
        self._remember(new_params)
        return new_params



def _per_task(key: str, value: Any, p: Tensor, tasks: int | None) -> Any:
    """A torch optimizer's state ``value`` for ``p``, repeated for each of ``tasks`` tasks
    where it is shaped like ``p`` (moments, momentum buffers; not the step count)."""
    if tasks is None or key == "step" or not isinstance(value, Tensor) or \
            value.shape != p.shape:
        return value
    return value.unsqueeze(0).expand(tasks, *value.shape)


def _to_numbers(value: Any) -> Any:
    """Hyperparameters for a torch optimiser: tensors become Python numbers."""
    return _utils._recursive_map(
        value, lambda x: x.item() if isinstance(x, Tensor) and x.numel() == 1 else x)
