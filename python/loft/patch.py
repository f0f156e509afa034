"""Functional ("monkey-patched") modules with time-indexed fast weights (higher's API).

``monkeypatch(module)`` returns ``fmodel``, a stateless twin of ``module``:

- ``fmodel(x)`` runs ``module``'s forward with the **fast weights** in place of its
  parameters (swapped into a structural copy of ``module``
  whose own parameters are shape-only placeholders, so no weights are duplicated).
- The copy owns **its own buffers**, copied at patch time: BatchNorm statistics then
  diverge from the original module without touching it, until
  :meth:`FunctionalModule.write_back_buffers` copies them back on request.
- Submodules are patched too: ``fmodel.encoder(x)`` or ``fmodel[0](x)`` runs that
  submodule on the current fast weights; ``fmodel.encoder.weight`` is the current fast
  tensor, and assigning a tensor to it records new fast weights (as higher does).
- ``fmodel.parameters(time=i)`` returns the fast weights after ``i`` updates (``time=0``:
  the initial weights). Unlike higher, asking for a step that is not recorded (any step
  but the latest when ``track_higher_grads=False``) raises instead of silently returning
  the latest weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["monkeypatch", "make_functional", "buffer_sync", "FunctionalModule"]


def _structural_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are meta-device placeholders."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        placeholder = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                   requires_grad=p.requires_grad)
        memo[id(p)] = placeholder
    return copy.deepcopy(module, memo)


def _param_entries(module: nn.Module) -> list[tuple[str, int]]:
    """Every (qualified name, fast-weight index) pair, tied parameters included.

    The fast weights follow ``module.parameters()`` (each shared tensor once); a tensor
    reachable under several names maps all of them to its one index.
    """
    index = {id(p): i for i, p in enumerate(module.parameters())}
    return [(name, index[id(p)]) for name, p in module.named_parameters(remove_duplicate=False)]


class _PatchedView:
    """Shared behaviour of the root functional module and its patched submodules."""

    _root: FunctionalModule
    _prefix: str
    _target: nn.Module

    def _local_entries(self) -> list[tuple[str, int]]:
        n = len(self._prefix)
        return [(name[n:], i) for name, i in self._root._entries if name.startswith(self._prefix)]

    def _local_param_index(self, name: str) -> int | None:
        for local, i in self._local_entries():
            if local == name:
                return i
        return None

    def _slots(self) -> list[tuple[nn.Module, str, int]]:
        """(owning module, attribute, fast-weight index) for every parameter slot in reach,
        resolved once per submodule view."""
        cache = self._root._slot_cache
        if self._prefix not in cache:
            slots = []
            for name, i in self._local_entries():
                owner, _, attr = name.rpartition(".")
                module = self._target.get_submodule(owner) if owner else self._target
                slots.append((module, attr, i))
            cache[self._prefix] = slots
        return cache[self._prefix]

    def _call(self, args: tuple, kwargs: dict) -> Any:
        """Run the target's forward with the fast weights swapped into its parameter slots.

        The same as :func:`torch.func.functional_call`, without its per-call overhead:
        the slots are resolved once, and swapping is a dict assignment per slot.
        """
        fast = self._root.fast_params
        if fast is None:
            raise ValueError(
                "params keyword must be provided if patched module not tracking its own "
                "fast parameters"
            )
        slots = self._slots()
        saved = [module._parameters[attr] for module, attr, _ in slots]
        recurrent = {id(m): m for m, _, _ in slots if isinstance(m, nn.RNNBase)}
        try:
            for module, attr, i in slots:
                module._parameters[attr] = fast[i]
            for module in recurrent.values():
                module._init_flat_weights()  # RNNs cache their weights in _flat_weights
            return self._target(*args, **kwargs)
        finally:
            for (module, attr, _), placeholder in zip(slots, saved):
                module._parameters[attr] = placeholder
            for module in recurrent.values():
                module._init_flat_weights()

    def _child(self, name: str) -> _PatchedSubmodule | None:
        sub = self._target._modules.get(name) if hasattr(self._target, "_modules") else None
        if sub is None:
            return None
        return _PatchedSubmodule(self._root, f"{self._prefix}{name}.", sub)

    def _get(self, name: str) -> Any:
        index = self._local_param_index(name)
        if index is not None and self._root.fast_params is not None:
            return self._root.fast_params[index]
        child = self._child(name)
        if child is not None:
            return child
        return getattr(self._target, name)

    def _set(self, name: str, value: Any) -> bool:
        """Assign a tensor to a patched parameter: new fast weights. False if not one."""
        index = self._local_param_index(name)
        if index is None:
            return False
        if not isinstance(value, Tensor):
            raise TypeError(f"cannot assign {type(value).__name__} to the patched parameter "
                            f"{self._prefix}{name}: expected a tensor")
        fast = list(self._root.fast_params)
        fast[index] = value
        self._root.update_params(fast)
        return True

    # Container protocol (Sequential, ModuleList): items come back patched.
    def __getitem__(self, key: Any) -> Any:
        return self._getitem(key)

    def __len__(self) -> int:
        return len(self._target)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self._getitem(i)

    def _getitem(self, key: Any) -> Any:
        item = self._target[key]
        if isinstance(item, nn.Module):
            for name, sub in self._target._modules.items():
                if sub is item:
                    return _PatchedSubmodule(self._root, f"{self._prefix}{name}.", sub)
        return item


class _PatchedSubmodule(_PatchedView):
    """A submodule of a functional module: calls run on the root's current fast weights."""

    def __init__(self, root: FunctionalModule, prefix: str, target: nn.Module) -> None:
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_target", target)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(args, kwargs)

    forward = __call__

    def __getattr__(self, name: str) -> Any:
        return self._get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if not self._set(name, value):
            setattr(self._target, name, value)

    def parameters(self, recurse: bool = True) -> Iterator[Tensor]:
        """This submodule's current fast weights (each shared tensor once)."""
        seen: list[int] = []
        for _, i in self._local_entries():
            if i not in seen:
                seen.append(i)
        return iter([self._root.fast_params[i] for i in seen])

    def train(self, mode: bool = True) -> _PatchedSubmodule:
        self._target.train(mode)
        return self

    def eval(self) -> _PatchedSubmodule:
        return self.train(False)

    def __repr__(self) -> str:
        return f"Patched({self._target!r})"


class FunctionalModule(_PatchedView, nn.Module):
    """The stateless twin of a module, driven by a history of fast weights.

    ``_fast_params`` is the history: a list with one list of tensors per recorded step.
    """

    def __init__(self, module: nn.Module, track_higher_grads: bool = True) -> None:
        nn.Module.__init__(self)
        target = _structural_copy(module)
        # Kept outside nn.Module's registries: the placeholders are not parameters of ours.
        for name, value in (("_prefix", ""), ("_target", target),
                            ("_source", module), ("_entries", _param_entries(module)),
                            ("_fast_params", None), ("_times", []), ("_slot_cache", {}),
                            ("_track_higher_grads", bool(track_higher_grads))):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_shapes", [p.shape for p in module.parameters()])
        object.__setattr__(self, "_num_params", len(self._shapes))
        object.__setattr__(self, "training", target.training)

    @property
    def _root(self) -> FunctionalModule:
        # The root view is itself. A property, not an attribute pointing to self: such a
        # cycle would keep every finished inner loop's history (and through it the
        # autograd graph of the whole unroll) alive until Python's cyclic collector ran,
        # so memory (host and GPU) grew between collections.
        return self

    # ---- fast weights ------------------------------------------------------------------

    @property
    def track_higher_grads(self) -> bool:
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"Expected boolean argument. Got: {type(value)}.")
        object.__setattr__(self, "_track_higher_grads", value)

    @property
    def fast_params(self) -> list[Tensor] | None:
        """The latest fast weights (``None`` before any are set)."""
        return None if self._fast_params is None else self._fast_params[-1]

    @fast_params.setter
    def fast_params(self, value: Iterable[Tensor]) -> None:
        self._record(list(value))

    def _record(self, value: list[Tensor]) -> None:
        """Append ``value`` to the history (or replace the one entry kept when not
        tracking higher-order gradients)."""
        if self._fast_params is None:
            object.__setattr__(self, "_fast_params", [])
        step = self._times[-1] + 1 if self._times else 0
        if self._track_higher_grads or not self._fast_params:
            self._fast_params.append(value)
            self._times.append(step)
        else:
            self._fast_params[0] = value
            self._times[0] = step

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The initial fast weights (only while tracking higher-order gradients)."""
        if not self._track_higher_grads:
            raise Exception("Cannot get initial parameters when not tracking higher gradients.")
        if self._times[0] != 0:
            raise ValueError(f"The initial fast weights are no longer kept: the history "
                             f"starts at step {self._times[0]} (cut by diffopt.truncate()).")
        return self._fast_params[0]

    def update_params(self, params: Iterable[Tensor], _checked: bool = False) -> None:
        """Record ``params`` as the new fast weights (one more step of history).

        (``_checked``: loft's optimisers pass the weights they made, already of the
        right count and shapes.)
        """
        params = list(params)
        if _checked:
            # Not ``self.fast_params = params``: that goes through nn.Module.__setattr__,
            # which costs ten times the recording itself on every step.
            self._record(params)
            return
        if len(params) != self._num_params:
            raise ValueError(
                f"expected {self._num_params} fast weights (one per parameter of the "
                f"module), got {len(params)}"
            )
        for i, (new, shape) in enumerate(zip(params, self._shapes)):
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

    def _replace_history(self, times: list[int], entries: list[list[Tensor]]) -> None:
        """Keep only ``entries``, the fast weights after the steps ``times`` (ascending)."""
        object.__setattr__(self, "_fast_params", [list(e) for e in entries])
        object.__setattr__(self, "_times", list(times))

    def parameters(self, recurse: bool = True, time: int | None = None) -> Iterator[Tensor]:
        """The fast weights after ``time`` updates (default: the latest).

        Raises ``ValueError`` for a step that is not recorded while not tracking
        higher-order gradients (only the latest weights are kept), and ``IndexError``
        for a step outside the history (cut by ``diffopt.truncate()``, or between the
        checkpoints of :func:`loft.unroll`), naming the recorded steps.
        """
        if self._fast_params is None:
            raise Exception(
                "Tried to get fast weights of a monkey patched module which does not "
                "encapsulate fast weights."
            )
        if time is None:
            return iter(self._fast_params[-1])
        latest = self._times[-1]
        if not self._track_higher_grads:
            if time not in (-1, latest):
                raise ValueError(
                    f"The patched model is not tracking higher gradients: only the latest "
                    f"parameters (time={latest}) are kept, not time={time}."
                )
            return iter(self._fast_params[-1])
        if -len(self._fast_params) <= time < 0:
            return iter(self._fast_params[time])
        if time in self._times:
            return iter(self._fast_params[self._times.index(time)])
        raise IndexError(
            f"time={time} is not among the recorded fast weights: "
            f"{self._describe_recorded()}, or -1 for the latest"
        )

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
        names = [name for name, _ in self._source.named_parameters()]
        return iter(zip([prefix + n for n in names], self.parameters()))

    # ---- forward and module behaviour ----------------------------------------------------

    def forward(self, *args: Any, params: Iterable[Tensor] | None = None, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` on the fast weights; ``params`` given are recorded
        as the new fast weights first, as higher does."""
        if params is not None:
            self.update_params(params)
        return self._call(args, kwargs)

    def train(self, mode: bool = True) -> FunctionalModule:
        self._target.train(mode)
        object.__setattr__(self, "training", mode)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name.startswith("__") or "_target" not in self.__dict__:
                raise
            return self._get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_target" in self.__dict__ and self._set(name, value):
            return
        nn.Module.__setattr__(self, name, value)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        """The original module's state dict with the latest fast weights and the patched
        buffers, so that ``model.load_state_dict(fmodel.state_dict())`` keeps the
        result of an inner loop (higher HEAD's behaviour)."""
        index = dict(self._entries)
        buffers = dict(self._target.named_buffers())
        fast = self.fast_params
        out = {} if destination is None else destination
        for key, value in self._source.state_dict(keep_vars=True).items():
            if key in index and fast is not None:
                value = fast[index[key]]
            elif key in buffers:
                value = buffers[key]
            out[prefix + key] = value if keep_vars else value.detach()
        return out

    def patched_buffers(self) -> Iterator[tuple[str, Tensor]]:
        """The patched module's own buffers (BatchNorm statistics, ...), by name."""
        return self._target.named_buffers()

    def write_back_buffers(self, module: nn.Module | None = None) -> None:
        """Copy the patched module's buffers into ``module`` (default: the patched one).

        higher never writes BatchNorm running statistics back to the original model;
        call this after an inner loop to keep them (for example before evaluation).
        """
        module = self._source if module is None else module
        targets = dict(module.named_buffers())
        for name, buf in self._target.named_buffers():
            if name not in targets:
                raise KeyError(f"write_back_buffers: the module has no buffer named {name!r}")
            with torch.no_grad():
                targets[name].copy_(buf)

    def __repr__(self) -> str:
        return f"MonkeyPatched({self._target!r})"


def buffer_sync(module: nn.Module, fmodule: FunctionalModule,
                device: torch.device | str | None = None) -> None:
    """Copy ``module``'s buffers into ``fmodule``'s own (on ``device``), as higher does at
    patch time; later updates of either side do not reach the other."""
    own = dict(fmodule._target.named_buffers())
    for name, buf in module.named_buffers():
        if name in own:
            copied = buf.detach().clone()
            _assign_buffer(fmodule._target, name, copied if device is None else copied.to(device))


def _assign_buffer(module: nn.Module, qualified: str, value: Tensor) -> None:
    *path, leaf = qualified.split(".")
    for part in path:
        module = getattr(module, part)
    module._buffers[leaf] = value


def make_functional(module: nn.Module, encapsulator: Any = None) -> FunctionalModule:
    """A :class:`FunctionalModule` over ``module``; ``encapsulator(fmodule, module)`` sets
    its initial fast weights and buffers (higher's ``make_functional``)."""
    fmodule = FunctionalModule(module)
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule


def _copy_param(p: Tensor, device: torch.device | str | None, detach: bool) -> Tensor:
    q = p.detach().clone().requires_grad_(p.requires_grad) if detach else p.clone()
    return q if device is None else q.to(device)


def monkeypatch(
    module: nn.Module,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> FunctionalModule:
    """A stateless version of ``module`` with its own fast weights (higher's ``monkeypatch``).

    Args:
        module: the module to patch (left unchanged).
        device: where the fast weights and buffers go.
        copy_initial_weights: ``True``: the initial fast weights are detached copies
            (no meta-gradient reaches ``module``); ``False``: they are differentiable
            clones of ``module``'s parameters, so meta-gradients flow into them.
        track_higher_grads: ``False`` keeps only the latest fast weights (test mode).
    """

    def encapsulator(fmodule: FunctionalModule, mod: nn.Module) -> None:
        params = [_copy_param(p, device, copy_initial_weights) for p in mod.parameters()]
        buffer_sync(mod, fmodule, device)
        fmodule.update_params(params)

    fmodule = make_functional(module, encapsulator=encapsulator)
    fmodule.track_higher_grads = track_higher_grads
    return fmodule
