"""The flat engine: a differentiable optimiser that steps each bucket of parameters at once.

:class:`FlatOptimizer` keeps its state in a :class:`loft.flat.FlatState` (per bucket one
buffer per quantity) and runs one step per bucket: the fused optimisers one autograd node
over one kernel call (:func:`loft.step.bucket_step`), the unfused ones their reference
math over the flat buffers (``_reference_step``). higher's per-tensor ``state`` dicts mirror the
flat state (:mod:`loft.optim.higher_state`).
"""

from __future__ import annotations

import copy
import operator
import weakref
from typing import Any

import torch
from torch import Tensor

from loft._contract import ELEMENTWISE_HYPER, OpContract, compute_dtype
from loft.flat import Bucket, FlatState, make_buckets
from loft.optim import per_tensor
from loft.optim.base import DifferentiableOptimizer
from loft.optim.higher_state import StateMirror, new_structure
from loft.optim.hyper import Hyper, HyperReader, broadcasts_to, scalar_tensor
from loft.step import bucket_step, is_constant_shift, is_sole_holder, shift_step

__all__ = ["FlatOptimizer", "uses_flat_engine"]


class FlatOptimizer(DifferentiableOptimizer):
    """Flat-buffer optimiser: one op call per bucket per step.

    Subclasses say which state buffers they keep (``_state_names``, each one value per
    parameter element; ``_segment_state_names``, one value per tensor), which
    hyperparameters they read from a param group (``_hyper_names``, ``_group_hyper``),
    which per-group flags they pass (``_group_flags``), and either name a fused op
    (``_op``) or run one step over a bucket in ``_reference_step``.

    Note: two ways to run. A class of loft's own (neither ``step`` nor ``_update``
    overridden by a subclass) runs the flat engine (:meth:`_new_weights`), and keeps
    higher's ``state`` dicts as a mirror of its flat buffers. A subclass that overrides
    ``step`` or ``_update`` gets higher's per-tensor ``_update``
    (:mod:`loft.optim.per_tensor`: the same math, one tensor at a time, on the dicts).
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
    #: The fused op this optimiser runs (``None``: :meth:`_reference_step` on flat buffers).
    _op: OpContract | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: The flat state, made at the first step (``None`` until then).
        self._flat: FlatState | None = None
        #: ``(class, uses_flat_engine(class))`` for the class this optimiser has now.
        self._engine_for: tuple[type, bool] = (type(self), uses_flat_engine(type(self)))
        super().__init__(*args, **kwargs)
        self._hyper = self._new_hyper_reader()
        #: :meth:`_step_settings`' last result: ``(identity key, flags, per bucket, grad
        #: mode)``.
        self._settings: tuple[Any, list[int], list[Hyper], bool] | None = None
        self._optional_for: tuple[list[int], bool] | None = None

    def _new_hyper_reader(self) -> HyperReader:
        # The fused ops take float64 [G] hyperparameters for any bucket: they then form
        # 1 - dampening, 1 - beta2 and the bias corrections from the exact values, as
        # torch.optim and higher do in Python. The reference math of the others computes
        # in the compute dtype, as torch.optim does.
        fused = self._op is not None
        return HyperReader(self._hyper_names, self._hyper_keys, self._position,
                           lambda dtype: torch.float64 if fused else compute_dtype(dtype))

    def _managed_state_keys(self) -> tuple[str, ...]:
        step = (self._step_key,) if self._step_key else ()
        return step + tuple(self._state_names) + tuple(self._segment_state_names)

    @property
    def state(self) -> list[dict[int, dict[str, Any]]]:
        """higher's ``diffopt.state`` (see :class:`DifferentiableOptimizer`), kept in step
        with the flat buffers: each value is a new tensor (not a view), differentiable
        with respect to the inner loop while tracking higher-order gradients."""
        if self._flat is None or not uses_flat_engine(type(self)):
            return self._mirror.structure
        return self._mirror.get(self._exported_entries)

    @state.setter
    def state(self, value: list[dict[int, dict[str, Any]]]) -> None:
        self._mirror.set(value)

    # ---- the flat state, for loft.unroll ---------------------------------------------------

    @property
    def flat_state(self) -> FlatState | None:
        """The flat state (loft only; ``None`` before the first step or :meth:`sync_flat_state`)."""
        return self._flat

    def sync_flat_state(self, params: list[Tensor]) -> FlatState:
        """Build the flat state at the first step; later, take over any change made to
        ``self.state``'s dicts since the last step (they are the state in higher)."""
        if self._flat is None:
            # No flat weights yet: the first step concatenates the weights it is given.
            self._flat = FlatState.empty(make_buckets(params, self._group_of), self._num_params,
                                         self._state_names)
            self._import_state()
        elif self._mirror.needs_import():
            self._import_state()
        return self._flat

    def set_flat_state(self, state: FlatState) -> None:
        """Continue from ``state`` (loft only: loft.unroll hands back its final state)."""
        self._flat = state
        self._mirror.advanced(self._exported_entries)

    def replica(self, fmodel: Any) -> FlatOptimizer:
        """A copy that steps ``fmodel`` (loft only: loft.unroll's private copy). It shares
        the param groups' values and the layout, and has its own flat state (never
        updated in place: checkpoints hold it), hyperparameter caches and state mirror."""
        assert self._flat is not None, "replica: call sync_flat_state first"
        twin = copy.copy(self)
        twin._fmodel = fmodel
        twin.param_groups = [dict(group) for group in self.param_groups]
        twin._flat = self._flat.snapshot()
        twin._flat.keep_buffers, twin._flat.private = True, set()
        twin._hyper = twin._new_hyper_reader()
        twin._settings = None
        # Its own mirror of higher's state dicts (nobody reads them), following its flat state.
        twin._mirror = StateMirror(new_structure(len(twin.param_groups)),
                                   twin._managed_state_keys(), flat_is_current=True)
        return twin

    def _last_returned(self) -> list[Tensor | None] | None:
        return self._flat.last_views if self._flat is not None else self._last_params

    def _remember(self, params: list[Tensor]) -> None:
        if self._flat is not None:
            self._flat.last_views = list(params)
        else:
            self._last_params = list(params)

    # ---- subclass hooks ------------------------------------------------------------------

    def _group_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _group_flags(self, group: dict[str, Any]) -> int:
        raise NotImplementedError

    def _reference_step(self, params: Tensor, grads: Tensor, state: dict[str, Tensor],
                        segments: Tensor, hyper: dict[str, Tensor], flags: Tensor,
                        elementwise: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One step over flat buffers as differentiable PyTorch: ``(new params, new state)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _reference_step")

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
        count = int(step.item()) if isinstance(step, Tensor) else int(step)
        return (count, True, step.dtype if isinstance(step, Tensor) else None,
                {name: entry[name] for name in names if name in entry})

    def _default_state(self, name: str, group: dict[str, Any], shape: torch.Size,
                       b: Bucket) -> Tensor | None:
        """The value of state buffer ``name`` for a tensor without one (``None``: zeros)."""
        return None

    # ---- higher's dicts <-> the flat state ---------------------------------------------------

    def _import_state(self) -> None:
        """The flat state and step counts from higher's dicts (``self.state``): the torch
        optimizer's state at the first step, the program's changes later. Differentiable:
        a tensor the program put there carries its graph into the next step."""
        flat = self._flat
        assert flat is not None
        structure = self._mirror.structure
        values: list[dict[str, Any]] = [{} for _ in range(self._num_params)]
        groups = self._group_to_param_list
        if not any(structure):
            # No state at all (a fresh torch optimizer, or a program that cleared it).
            n = self._num_params
            flat.steps[:], flat.has_state[:], flat.step_dtypes[:] = [0] * n, [False] * n, [None] * n
            groups = []
        for g, mapping in enumerate(groups):
            group_state = structure[g] if g < len(structure) else {}
            for j, i in enumerate(mapping):
                entry = group_state.get(j)  # .get: a defaultdict must not grow here
                step, has_state, step_dtype, values[i] = self._read_entry(entry or {})
                flat.steps[i], flat.has_state[i], flat.step_dtypes[i] = (
                    step, has_state, step_dtype)
        # An optional buffer has 0 elements unless a group needs it; an override that
        # turns it on later allocates it (_new_weights).
        unused = self._unused_state([self._group_flags(g) for g in self.param_groups])
        flat.buffers = []
        for b in flat.buckets:
            state: dict[str, Tensor] = {}
            for name in self._state_names:
                if name in unused:
                    state[name] = torch.empty(0, dtype=b.dtype, device=b.device)
                    continue
                parts = [self._state_value(name, i, values[i].get(name), b, pos)
                         for pos, i in enumerate(b.indices)]
                state[name] = torch.zeros(b.numel, dtype=b.dtype, device=b.device) if all(
                    part is None for part in parts) else b.flatten(parts)
            for name, default in self._segment_state_names.items():
                ct = compute_dtype(b.dtype)
                parts = [scalar_tensor(values[i].get(name, default), ct, b.device)
                         for i in b.indices]
                state[name] = torch.stack(parts) if parts else torch.empty(
                    0, dtype=ct, device=b.device)
            flat.buffers.append(state)
        flat.private.clear()
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
        if not broadcasts_to(value.shape, shape):
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
        flat = self._flat
        assert flat is not None
        if not flat.has_state[i]:
            return {}
        k, pos = flat.where[i]
        b, buffers = flat.buckets[k], flat.buffers[k]
        entry: dict[str, Any] = {}
        if self._step_key:
            dtype = flat.step_dtypes[i]
            entry[self._step_key] = flat.steps[i] if dtype is None else torch.tensor(
                float(flat.steps[i]), dtype=dtype)
        off, n, shape = b.offsets[pos], b.numels[pos], b.shapes[pos]
        for name in self._state_names:
            buffer = buffers[name]
            if buffer.numel() == b.numel and name not in unused:
                entry[name] = buffer[off:off + n].view(shape).clone()
        for name in self._segment_state_names:
            entry[name] = buffers[name][pos].clone()
        return entry

    # ---- the flat engine ---------------------------------------------------------------------

    def _new_weights(self, params: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
        """The new fast weights: one step per bucket (``step`` has checked the shapes)."""
        if not self._runs_flat_engine():
            # A subclass written for higher: the per-tensor _update, as higher runs it.
            return DifferentiableOptimizer._new_weights(self, params, grads)
        new_params = list(params)
        op = self._op
        track = self._track_higher_grads
        with _GradMode(track):
            flat = self._flat
            if flat is None or self._mirror.needs_import():
                flat = self.sync_flat_state(params)
            flags, settings = self._step_settings(flat)
            needs_optional = bool(self._optional_state) and self._needs_optional_cached(flags)
            for k, b in enumerate(flat.buckets):
                indices = b.indices
                grads_in = [grads[i] for i in indices]
                active = [g is not None for g in grads_in]
                if not any(active):
                    continue
                hyper, flag_tensor, elementwise = settings[k]
                state = flat.buffers[k]
                if needs_optional and state[self._optional_state].numel() == 0 and b.numel > 0:
                    state[self._optional_state] = torch.zeros(b.numel, dtype=b.dtype,
                                                              device=b.device)
                    if self._first_step_only:
                        # SGD: a tensor without a momentum buffer starts it (b' = g2).
                        for i in b.indices:
                            flat.steps[i] = 0
                all_steps = flat.steps
                steps = [min(all_steps[i], 1) for i in indices] if self._first_step_only else [
                    all_steps[i] for i in indices]
                segments = b.segments(steps, active)
                views_in = [params[i] for i in indices]
                base = flat.weights[k] if flat.intact(k, params) else None
                if op is not None and (not elementwise or all(
                        n in ELEMENTWISE_HYPER for n in elementwise)):
                    state_in = [state[n] for n in op.state]
                    hyper_in = [hyper[n] for n in op.hyper]
                    kernel_elementwise = _kernel_elementwise(elementwise)
                    if self._first_order and is_constant_shift(op, grads_in, state_in, hyper_in,
                                                               kernel_elementwise):
                        # p' = p - delta with delta constant: run without a graph, one
                        # pass-through node (it saves nothing, so the state can be freed).
                        # When only this optimiser holds the state (made by its last such
                        # step, no view or other reference since), update it in place.
                        in_place = k in flat.private and not flat.keep_buffers and all(
                            map(is_sole_holder, state_in))
                        views, state_out = shift_step(op, b, base, views_in, grads_in, state_in,
                                                      hyper_in, segments, flag_tensor, in_place,
                                                      elementwise=kernel_elementwise)
                        flat.private.add(k)
                    else:
                        flat.private.discard(k)
                        views, state_out = bucket_step(op, b, base, views_in, grads_in, state_in,
                                                       hyper_in, segments, flag_tensor,
                                                       elementwise=kernel_elementwise)
                    state_new = dict(zip(op.state, state_out))
                else:
                    flat.private.discard(k)
                    # Flatten the views themselves (not ``base``), so that gradients with
                    # respect to the weights at any recorded step include this update.
                    p_new, state_new = self._reference_step(
                        b.flatten(views_in), b.flatten(grads_in), state, segments, hyper,
                        flag_tensor, elementwise)
                    views = b.views(p_new)
                base = views[0]._base
                assert base is not None and base.numel() == b.numel, "views of one flat buffer"
                if not track:
                    base = base.detach()
                    views = b.plain_views(base)
                    state_new = {n: t.detach() for n, t in state_new.items()}
                flat.weights[k] = base
                flat.buffers[k] = state_new
                has_state = flat.has_state
                for j, i in enumerate(indices):
                    if active[j]:
                        all_steps[i] += 1
                        has_state[i] = True
                    # Every tensor of the bucket becomes a view of the new buffer (an
                    # inactive one passes through unchanged); a frozen one stays frozen.
                    view = views[j]
                    if not track:
                        view = view.requires_grad_(params[i].requires_grad)
                    elif not views_in[j].requires_grad:
                        view = view.detach()
                    new_params[i] = view
        if not track:
            # Test mode, as higher: every parameter of a group comes back detached, also
            # one that got no gradient (it may still hang on the initial weights' graph).
            for group_indices in self._group_to_param_list:
                for i in group_indices:
                    if new_params[i].grad_fn is not None:
                        new_params[i] = new_params[i].detach().requires_grad_(
                            new_params[i].requires_grad)
        flat.last_views = list(new_params)
        self._mirror.advanced(self._exported_entries)
        return new_params

    def _step_settings(self, flat: FlatState) -> tuple[list[int], list[Hyper]]:
        """The groups' flags and each bucket's hyperparameter tensors for this step
        (:meth:`HyperReader.for_bucket`); reused while the param groups hold the same
        numbers and the same tensors, unchanged (:func:`_same_settings`)."""
        cached = self._settings
        grad_mode = torch.is_grad_enabled()  # a tensor's graph is made under it, or not
        if cached is not None and cached[3] == grad_mode and len(cached[2]) == len(
                flat.buckets) and _same_settings(self.param_groups, cached[0]):
            return cached[1], cached[2]
        found_key = _settings_key(self.param_groups)
        key, numbers = found_key if found_key is not None else ((), False)
        # Another optimiser of this class over the same buckets (the inner loop of the
        # previous task) may have made them: the buckets keep them (numbers only: a
        # tensor's graph belongs to one inner loop).
        shared = (type(self), key) if numbers else None
        found = [b.settings.get(shared) for b in flat.buckets] if shared else []
        if found and all(f is not None for f in found):
            flags = found[0][0]
            settings = [f[1] for f in found]
        else:
            flags = [self._group_flags(g) for g in self.param_groups]
            per_group = [self._group_hyper(g) for g in self.param_groups]
            settings = [self._hyper.for_bucket(b, per_group, flags) for b in flat.buckets]
            if shared is not None:
                for b, setting in zip(flat.buckets, settings):
                    b.keep_settings(shared, (flags, setting))
        self._settings = None if found_key is None else (
            _identity_key(self.param_groups), flags, settings, grad_mode)
        return flags, settings

    def _needs_optional_cached(self, flags: list[int]) -> bool:
        """:meth:`_needs_optional` of ``flags``, remembered for the same list (the settings'
        flags are reused while the groups are unchanged)."""
        last = self._optional_for
        if last is None or last[0] is not flags:
            last = self._optional_for = (flags, self._needs_optional(flags))
        return last[1]

    def _returns_own_views(self) -> bool:
        return self._runs_flat_engine()

    def _reads_fixed_keys(self) -> bool:
        return self._runs_flat_engine()

    def _runs_flat_engine(self) -> bool:
        """``uses_flat_engine(type(self))``, remembered for the class this object has."""
        engine = self._engine_for
        if engine[0] is not type(self):
            engine = self._engine_for = (type(self), uses_flat_engine(type(self)))
        return engine[1]

    def _detach_params(self, params: list[Tensor]) -> list[Tensor]:
        flat = self._flat
        if flat is None or not uses_flat_engine(type(self)):
            return super()._detach_params(params)
        if self._mirror.needs_import():
            self._import_state()
        new_params = [p.detach().requires_grad_(p.requires_grad) for p in params]
        flat.private.clear()
        for k, b in enumerate(flat.buckets):
            flat.buffers[k] = {n: t.detach() for n, t in flat.buffers[k].items()}
            base = flat.weights[k]
            if base is None or not flat.intact(k, params):
                continue
            # Keep the weights as views of one (detached) flat buffer: no copy next step.
            base = base.detach()
            flat.weights[k] = base
            for view, i in zip(b.plain_views(base), b.indices):
                new_params[i] = view.requires_grad_(params[i].requires_grad)
        self._mirror.advanced(self._exported_entries)
        return new_params

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        """higher's per-tensor ``_update`` (:func:`loft.optim.per_tensor.update`): runs when
        a subclass overrides ``step`` or ``_update`` (and calls this one)."""
        per_tensor.update(self, grouped_grads)


class _GradMode:
    """``torch.set_grad_enabled(mode)`` as a context, without its decorator machinery (a
    cost every step pays)."""

    __slots__ = ("mode", "previous")

    def __init__(self, mode: bool) -> None:
        self.mode = mode
        self.previous = True

    def __enter__(self) -> None:
        self.previous = torch.is_grad_enabled()
        torch._C._set_grad_enabled(self.mode)

    def __exit__(self, *exc: Any) -> None:
        torch._C._set_grad_enabled(self.previous)


#: Per class (weakly held: subclasses made at run time are freed with their users).
_FLAT_ENGINE_CACHE: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def uses_flat_engine(cls: type) -> bool:
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


def _settings_key(groups: list[dict[str, Any]]) -> tuple[tuple[Any, ...], bool] | None:
    """The param groups' settings (every key but ``params``) as ``(key, numbers only)``:
    the key holds every plain value (numbers, flags, strings, tuples of numbers) with its
    name, and ``numbers only`` is false where a group holds a tensor (left out of the key:
    such settings are compared by identity, :func:`_same_settings`). ``None`` for a value
    of another kind (not cached)."""
    key: list[Any] = []
    numbers = True
    for group in groups:
        for item in group.items():
            value = item[1]
            kind = type(value)
            if kind not in _PLAIN:
                if item[0] == "params":
                    continue
                if isinstance(value, Tensor):
                    numbers = False
                    continue
                if kind is not tuple or any(type(v) not in _PLAIN for v in value):
                    return None
            key.append(item)
        key.append(None)  # the end of a group
    return tuple(key), numbers


def _identity_key(groups: list[dict[str, Any]]) -> tuple[list[tuple[Any, ...]],
                                                          list[tuple[Tensor, int]]]:
    """Each group's values (held, so their ids stay theirs) and each tensor value with its
    version: what :func:`_same_settings` compares a later step's groups with."""
    values = [tuple(group.values()) for group in groups]
    tensors = [(v, v._version) for vs in values for v in vs if isinstance(v, Tensor)]
    return values, tensors


def _same_settings(groups: list[dict[str, Any]],
                   key: tuple[list[tuple[Any, ...]], list[tuple[Tensor, int]]]) -> bool:
    """Whether ``groups`` hold the very objects :func:`_identity_key` recorded, the tensors
    unchanged in place (a value replaced by an equal one is a miss, never a wrong hit)."""
    values, tensors = key
    if len(values) != len(groups):
        return False
    for group, recorded in zip(groups, values):
        if len(group) != len(recorded) or not all(map(operator.is_, group.values(), recorded)):
            return False
    return all(t._version == version for t, version in tensors)


#: The types of a setting that is compared by value (a tensor may change in place).
_PLAIN = frozenset({float, int, bool, str, type(None)})


def _kernel_elementwise(elementwise: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """The fused step's ``elementwise``: ``()``, or lr and weight decay per element (a
    0-element tensor for the one given per group)."""
    if not elementwise:
        return ()
    empty = next(iter(elementwise.values())).new_empty(0)
    return tuple(elementwise.get(name, empty) for name in ELEMENTWISE_HYPER)
