"""The root of a patched tree (:class:`FunctionalModule`, higher's root ``MonkeyPatched``
class): the history of fast weights, and what runs on it (forward, ``parameters(time=...)``,
state dict, buffers, the twin copy for :func:`loft.unroll`).

The public API over it is :mod:`loft.patch`; the patched submodules are
:mod:`loft._patched_module`'s, built by :mod:`loft._patched_tree`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from loft._batched import batched_call
from loft._patched_module import _NO_WEIGHTS, _MonkeyPatchBase, _refresh_flat_weights
from loft._patched_tree import _Patcher, _twin_root


def _patched_parameters(self: FunctionalModule, recurse: bool = True,
                        time: int | None = None) -> Iterator[Tensor]:
    """The fast weights after ``time`` updates (default: the latest); higher's
    ``_patched_parameters``.

    ``recurse`` is accepted for ``nn.Module``'s signature: all fast weights are returned
    either way (higher also warns when it is ``False``; loft does not). Raises
    ``ValueError`` for a step that is not recorded while not tracking higher-order
    gradients (only the latest weights are kept: higher returns them for ``time=0``),
    and ``IndexError`` for a step outside the history (cut by ``diffopt.truncate()``, or
    between the checkpoints of :func:`loft.unroll`), naming the recorded steps.
    """
    history = self._fast_params
    if history is None:
        raise Exception(
            "Tried to get fast weights of a monkey patched module which does not "
            "encapsulate fast weights."
        )
    if time is None:
        return iter(history[-1])
    times = self._times
    latest = times[-1]
    if not self._track_higher_grads:
        if time not in (-1, latest):
            raise ValueError(
                f"The patched model is not tracking higher gradients: only the latest "
                f"parameters (time={latest}) are kept, not time={time}."
            )
        return iter(history[-1])
    if -len(history) <= time < 0:
        return iter(history[time])
    if time in times:
        return iter(history[times.index(time)])
    raise IndexError(
        f"time={time} is not among the recorded fast weights: "
        f"{self._describe_recorded()}, or -1 for the latest"
    )


class FunctionalModule(_MonkeyPatchBase):
    """The root patched module: a stateless twin of a module, driven by a history of
    fast weights (higher's root ``MonkeyPatched`` class).

    ``_fast_params`` is the history (higher's name, which programs edit): a list with one
    list of tensors per recorded step (``_times`` holds each entry's step). Beyond
    higher, :meth:`history`, :meth:`set_history` and :meth:`twin` read, replace and copy
    it. The root of a patched ``cls`` is an instance of a subclass of
    ``FunctionalModule`` and of ``cls``.

    Its state is written straight into ``__dict__``: on the per-step path that skips the
    patched ``__setattr__`` (the fast-weight rule) and ``nn.Module``'s type dispatch.
    """

    _fast_params: list[list[Tensor]] | None
    _times: list[int]
    _track_higher_grads: bool
    #: Every parameter slot of the tree: (its module's ``_parameters``, its name, the
    #: index of its fast weight).
    _loft_slots: list[tuple[dict[str, Any], str, int]]
    #: The patched submodules, and those of them that are RNNs (``_flat_weights``).
    _loft_inner: list[_MonkeyPatchBase]
    _loft_recurrent: list[_MonkeyPatchBase]
    #: The shape of each fast weight (one per distinct parameter of the original).
    _loft_shapes: list[torch.Size]
    #: The fast weights last written into the slots (checked by ``forward``).
    _loft_written: list[Tensor] | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """``FunctionalModule(module, track_higher_grads=True)`` is
        ``make_functional(module)`` (no fast weights yet); see
        :meth:`_MonkeyPatchBase.__new__` for the patched classes."""
        if cls is not FunctionalModule or not (args or kwargs):
            return super().__new__(cls, *args, **kwargs)
        return _functional_module(*args, **kwargs)

    # ---- fast weights ------------------------------------------------------------------

    @property
    def track_higher_grads(self) -> bool:
        """Whether every update is kept (``False``: only the latest fast weights)."""
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"Expected boolean argument. Got: {type(value)}.")
        self.__dict__["_track_higher_grads"] = value

    @property
    def fast_params(self) -> list[Tensor] | None:
        """The latest fast weights (``None`` before any are set)."""
        history = self._fast_params
        return None if history is None else history[-1]

    @fast_params.setter
    def fast_params(self, value: Iterable[Tensor]) -> None:
        value = list(value)
        if len(value) != len(self._loft_shapes):
            raise ValueError(f"expected {len(self._loft_shapes)} fast weights (one per "
                             f"parameter of the module), got {len(value)}")
        self._record(value)

    @property
    def _num_params(self) -> int:
        """The number of fast weights (the name of loft's earlier FunctionalModule)."""
        return len(self._loft_shapes)

    @property
    def _shapes(self) -> list[torch.Size]:
        """The fast weights' shapes (the name of loft's earlier FunctionalModule)."""
        return self._loft_shapes

    def _record(self, value: list[Tensor]) -> None:
        """Append ``value`` to the history (or replace the one entry kept when not
        tracking higher-order gradients), and make it the weights the modules run on."""
        history = self._fast_params
        times = self._times
        if history is None:
            history = self.__dict__["_fast_params"] = []
        step = times[-1] + 1 if times else 0
        if self._track_higher_grads or not history:
            history.append(value)
            times.append(step)
        else:
            history[0] = value
            times[0] = step
        self._write(value)

    def _write(self, fast: list[Tensor]) -> None:
        """Put ``fast`` into every parameter slot of the patched tree."""
        for params, name, i in self._loft_slots:
            params[name] = fast[i]
        for module in self._loft_recurrent:
            _refresh_flat_weights(module)
        state = self.__dict__
        state["_loft_written"] = fast
        if "_flat_weights_names" in state:
            _refresh_flat_weights(self)
        if state.get("_loft_unset"):
            state["_loft_unset"] = False
            for module in self._loft_inner:
                module.__dict__["_loft_unset"] = False

    def _slot_index(self, params: dict[str, Any], name: str) -> int:
        """The fast-weight index of the slot ``name`` of the module whose
        ``_parameters`` is ``params``."""
        for slot_params, slot_name, i in self._loft_slots:
            if slot_params is params and slot_name == name:
                return i
        raise KeyError(f"{name!r} is not a parameter slot of this patched model")

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The initial fast weights (only while tracking higher-order gradients)."""
        if not self._track_higher_grads:
            raise Exception("Cannot get initial parameters when not tracking higher gradients.")
        if self._times[0] != 0:
            raise ValueError(f"The initial fast weights are no longer kept: the history "
                             f"starts at step {self._times[0]} (cut by diffopt.truncate()).")
        return self._fast_params[0]  # type: ignore[index]

    def update_params(self, params: Iterable[Tensor], _checked: bool = False) -> None:
        """Record ``params`` as the new fast weights (one more step of history).

        (``_checked``: loft's optimisers pass the weights they made, already of the
        right count and shapes.)
        """
        params = list(params)
        if _checked:
            self._record(params)
            return
        shapes = self._loft_shapes
        if len(params) != len(shapes):
            raise ValueError(
                f"expected {len(shapes)} fast weights (one per parameter of the "
                f"module), got {len(params)}"
            )
        for i, (new, shape) in enumerate(zip(params, shapes)):
            if not isinstance(new, Tensor):
                raise TypeError(f"fast weight {i} must be a tensor, got {type(new).__name__}")
            if new.shape != shape:
                raise ValueError(f"fast weight {i} must have shape {list(shape)}, "
                                 f"got {list(new.shape)}")
        self._record(params)

    @property
    def recorded_times(self) -> list[int]:
        """The steps whose fast weights ``parameters(time=...)`` can return."""
        return list(self._times)

    def _describe_recorded(self) -> str:
        """The recorded steps in words, for errors (a range, or the checkpoints)."""
        times = self._times
        if times and times[-1] - times[0] == len(times) - 1:
            text = f"{times[0]} to {times[-1]}"
            if times[0] > 0:
                text += f" (the history before step {times[0]} was cut by diffopt.truncate())"
        else:
            shown = ", ".join(map(str, times[:8])) + (", ..." if len(times) > 9 else "")
            if len(times) > 8:
                shown += f", {times[-1]}"
            text = f"steps {shown} only (the checkpoints of loft.unroll)"
        return text

    def history(self) -> tuple[list[int], list[list[Tensor]]]:
        """``(times, entries)``: ``entries[k] == list(self.parameters(time=times[k]))``.

        New lists: changing them leaves the model alone. A loft extension (higher has
        none; its programs read ``_fast_params``).
        """
        history = self._fast_params
        return list(self._times), [] if history is None else [list(e) for e in history]

    def set_history(self, times: list[int], entries: list[list[Tensor]]) -> None:
        """Keep only ``entries``, the fast weights after the steps ``times``; run on the last.

        ``times`` ascending, one per entry; both are copied. A loft extension (higher has
        none).
        """
        state = self.__dict__
        state["_fast_params"] = [list(e) for e in entries]
        state["_times"] = list(times)
        if entries:
            self._write(state["_fast_params"][-1])


    parameters = _patched_parameters  # type: ignore[assignment]

    def _named_slots(self) -> list[tuple[str, int]]:
        """Every (qualified name, fast-weight index) pair of the patched tree, tied
        parameters and shared modules under each of their names."""
        index = {(id(params), name): i for params, name, i in self._loft_slots}
        named = []
        for prefix, module in nn.Module.named_modules(self, remove_duplicate=False):
            params = module._parameters
            for name in params:
                i = index.get((id(params), name))
                if i is not None:
                    named.append((f"{prefix}.{name}" if prefix else name, i))
        return named

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
        """(name, latest fast weight) pairs, named as ``module.named_parameters()``."""
        fast = list(self.parameters())
        names: dict[int, str] = {}
        for name, i in self._named_slots():
            names.setdefault(i, name)
        return iter([(prefix + names[i], p) for i, p in enumerate(fast)])

    # ---- forward and module behaviour ----------------------------------------------------

    @property
    def tasks(self) -> int | None:
        """The number of tasks batched into this model (``innerloop_ctx(..., tasks=N)``:
        fast weights and buffers ``[N, ...]``), or ``None`` for one unbatched task."""
        return self._loft_tasks

    def forward(self, *args: Any, params: Iterable[Tensor] | None = None, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` on the fast weights; ``params`` given are recorded
        as the new fast weights first, as higher does. With ``tasks=N`` every tensor
        argument and the result carry a leading task dimension ``[N, ...]``, and task
        ``t``'s slice runs on task ``t``'s fast weights and buffers."""
        self._refill_params_box(params)
        if self._loft_tasks is not None:
            return batched_call(self, self, args, kwargs)
        state = self.__dict__
        state["_loft_calls"] = self._loft_calls + 1
        try:
            return self._loft_wrapped.forward(self, *args, **kwargs)
        finally:
            state["_loft_calls"] -= 1

    def boxed_forward(self, *args: Any, **kwargs: Any) -> Any:
        """higher's ``boxed_forward``: the original forward on the current fast weights."""
        self._refill_params_box(None)
        if self._loft_tasks is not None:
            return batched_call(self, self, args, kwargs)
        return self._loft_wrapped.forward(self, *args, **kwargs)

    def _refill_params_box(self, params: Iterable[Tensor] | None) -> None:
        """higher's ``_refill_params_box``: record ``params`` if given (else make sure
        the slots hold the latest fast weights); ``ValueError`` if there are none."""
        history = self._fast_params
        if params is not None:
            self.update_params(params)
        elif history is None:
            raise ValueError(_NO_WEIGHTS)
        elif history[-1] is not self._loft_written:
            # The history was changed behind update_params' back (fmodel._fast_params
            # assigned or appended to, as higher allows): run on its latest entry.
            self._write(history[-1])

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        """The original module's state dict with the latest fast weights and the patched
        buffers, so that ``model.load_state_dict(fmodel.state_dict())`` keeps the
        result of an inner loop (higher HEAD's behaviour)."""
        index = dict(self._named_slots())
        buffers = dict(nn.Module.named_buffers(self, remove_duplicate=False))
        fast = self.fast_params
        out = {} if destination is None else destination
        for key, value in self._loft_source.state_dict(keep_vars=True).items():
            if key in index and fast is not None:
                value = fast[index[key]]
            elif key in buffers:
                value = buffers[key]
            out[prefix + key] = value if keep_vars else value.detach()
        return out

    def patched_buffers(self) -> Iterator[tuple[str, Tensor]]:
        """The patched module's own buffers (BatchNorm statistics, ...), by name."""
        return nn.Module.named_buffers(self)

    def write_back_buffers(self, module: nn.Module | None = None,
                           task: int | None = None) -> None:
        """Copy the patched module's buffers into ``module`` (default: the patched one).

        higher never writes BatchNorm running statistics back to the original model;
        call this after an inner loop to keep them (for example before evaluation).
        With ``tasks=N`` the buffers are per task (``[N, ...]``): ``task`` says whose.
        """
        tasks = self._loft_tasks
        if tasks is not None and (isinstance(task, bool) or not isinstance(task, int)
                                  or not 0 <= task < tasks):
            raise ValueError(f"write_back_buffers: this model batches tasks={tasks}, so "
                             f"its buffers are per task; pass task= an int in [0, {tasks}) "
                             f"to say whose to write back, got {task!r}")
        if tasks is None and task is not None:
            raise ValueError("write_back_buffers: task= is for a model with tasks=N")
        module = self._loft_source if module is None else module
        targets = dict(module.named_buffers())
        for name, buf in nn.Module.named_buffers(self):
            if name not in targets:
                raise KeyError(f"write_back_buffers: the module has no buffer named {name!r}")
            with torch.no_grad():
                targets[name].copy_(buf if task is None else buf[task])

    def twin(self) -> FunctionalModule:
        """An independent copy from the latest fast weights, for :func:`loft.unroll`'s replays.

        Its own patched modules, parameter slots and history (one entry: the current
        fast weights); the same attributes, hook registries and ``_buffers`` dicts as
        this one, so buffers it updates (BatchNorm statistics) are this model's. A loft
        extension (higher has none).
        """
        fast = self.fast_params
        if fast is None:
            raise ValueError("twin: the patched model has no fast weights yet")
        root = _twin_root(self)
        state = root.__dict__
        state["_fast_params"] = [list(fast)]
        state["_times"] = [self._times[-1]]
        root._write(state["_fast_params"][-1])
        return root  # type: ignore[return-value]



def _build(module: nn.Module, device: torch.device | str | None,
           make_fast: Callable[[Tensor], Tensor] | None,
           track_higher_grads: bool = True,
           parent_ref: Any = None, tasks: int | None = None,
           ) -> tuple[FunctionalModule, list[Tensor]]:
    """Patch ``module``'s tree; returns the root and ``module``'s distinct parameters.

    ``make_fast(p)`` gives the initial fast weight of each distinct parameter (``None``:
    the slots hold placeholders until fast weights are set). Buffers are copied to
    ``device`` (higher's ``buffer_sync``). ``parent_ref``: a weak reference to another
    root, which makes the result a patched subtree of that root (without history).
    ``tasks``: ``make_fast`` gives ``[tasks, *shape]`` weights; the buffers are copied per
    task too.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module to patch, got {type(module).__name__}")
    patcher = _Patcher(device, make_fast, parent_ref, FunctionalModule, tasks)
    root = patcher.patch(module, parent_ref is None)
    if parent_ref is not None:
        return root, patcher.originals  # type: ignore[return-value]
    state = root.__dict__
    state["_loft_slots"] = patcher.slots
    state["_loft_inner"] = patcher.inner
    state["_loft_recurrent"] = patcher.recurrent
    state["_loft_shapes"] = [p.shape if tasks is None else torch.Size((tasks, *p.shape))
                             for p in patcher.originals]
    state["_fast_params"] = None
    state["_times"] = []
    state["_track_higher_grads"] = track_higher_grads
    if make_fast is not None:
        state["_fast_params"] = [patcher.fast]
        state["_loft_written"] = patcher.fast
        state["_times"] = [0]
        for m in patcher.recurrent:
            _refresh_flat_weights(m)
        if "_flat_weights_names" in state:
            _refresh_flat_weights(root)
    return root, patcher.originals  # type: ignore[return-value]


def _functional_module(module: nn.Module, track_higher_grads: bool = True) -> FunctionalModule:
    """``FunctionalModule(module, track_higher_grads)``: loft's constructor before the
    patched classes: ``make_functional(module)`` and the flag."""
    fmodule, _ = _build(module, None, None)
    fmodule.track_higher_grads = track_higher_grads
    return fmodule
