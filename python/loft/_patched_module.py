"""Patched modules (higher's ``_MonkeyPatchBase``): what every module of a patched tree
is, and how a tensor assigned to one of its parameter slots becomes new fast weights.

The root of a tree, which keeps the history of fast weights, is
:class:`loft._functional.FunctionalModule`; the classes are made by
:mod:`loft._patched_tree`; the public API is :mod:`loft.patch`.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import Tensor, nn

from loft._batched import batched_call

_NO_WEIGHTS = ("params keyword must be provided if patched module not tracking its own "
               "fast parameters")


@contextlib.contextmanager
def _modify_internally(fmodule: _MonkeyPatchBase) -> Iterator[None]:
    """higher's ``_modify_internally``: inside it, assigning a tensor to a patched
    parameter sets that slot only, without recording new fast weights."""
    fmodule._being_modified_internally = True
    try:
        yield
    finally:
        fmodule._being_modified_internally = False


class _ParameterPlaceholder:
    """higher's ``_ParameterPlaceholder``: what a parameter slot holds before any fast
    weights are set (``make_functional`` without an encapsulator)."""

    def __init__(self, name: str) -> None:
        self._param_name = name

    def __repr__(self) -> str:
        return f'Parameter placeholder ("{self._param_name}")'


_ParameterPlaceholder.__name__ = _ParameterPlaceholder.__qualname__ = "ParameterPlaceholder"


# ---- patched modules -----------------------------------------------------------------------


class _MonkeyPatchBase(nn.Module):
    """Base of every patched module (higher's ``_MonkeyPatchBase``).

    A patched module's class derives from its original class and from this one.
    Differences from higher: not an ``abc.ABC`` (so that modules whose class has a
    metaclass of its own can be patched; constructing it still raises), and on a patched
    submodule ``fast_params``, ``track_higher_grads``, ``init_fast_params`` and
    ``update_params`` are the root's (higher's submodules have no fast weights of their
    own: ``None``, or an ``AttributeError``).
    """

    #: higher's flag: while true, assigning to a parameter slot records nothing.
    _being_modified_internally: bool = False
    #: True until fast weights are first written (a call would have no weights).
    _loft_unset: bool = False
    #: The class this patched class derives from, and its name (higher's
    #: ``_wrapped_name``): set on each patched class.
    _loft_wrapped: type[nn.Module] = nn.Module
    _wrapped_name: str
    #: The original module this one patches (set per instance).
    _loft_source: nn.Module
    #: A weak reference to the root (``None`` on the root itself).
    _root_ref: Callable[[], _MonkeyPatchBase | None] | None = None
    #: higher's submodules keep no history of their own (the root's is set per instance).
    _fast_params: list[list[Tensor]] | None = None
    _track_higher_grads: bool = True
    #: Calls of the root's forward under way (for ``direct_submodule_call``).
    _loft_calls: int = 0
    #: The number of tasks batched into the fast weights (``None``: one task, unbatched).
    _loft_tasks: int | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Called with arguments, a patched class builds its original class: the
        original's own code does that (``Sequential.__getitem__`` with a slice calls
        ``self.__class__(...)``), so ``fmodel[1:]`` is a plain ``Sequential`` of patched
        modules. Without (``copy.copy``): an empty instance."""
        if args or kwargs:
            if cls._loft_wrapped is nn.Module:
                raise TypeError("patched modules are made by loft.monkeypatch(module) or "
                                "loft.patch.make_functional(module), not constructed directly")
            return cls._loft_wrapped(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Nothing for a built patched module (``FunctionalModule(module)`` returns
        one); an empty one cannot be constructed."""
        if "_parameters" not in self.__dict__:
            raise TypeError("patched modules are made by loft.monkeypatch(module) or "
                            "loft.patch.make_functional(module), not constructed directly")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """higher's placeholder forward (the patched classes define their own)."""
        raise NotImplementedError(
            "The monkey-patching logic has failed to override self.forward on the new "
            "module, or you tried calling forward on a patched version of a module which "
            "doesn't have forward (e.g. ModuleList)."
        )

    # ---- higher's members -----------------------------------------------------------------

    @property
    def is_root(self) -> bool:
        """Whether this is the root patched module (higher's ``is_root``)."""
        return self._root_ref is None

    @property
    def root(self) -> _MonkeyPatchBase | None:
        """The root patched module, a :class:`~loft.patch.FunctionalModule` (higher's
        ``root``): ``None`` once it is gone, as in higher (submodules hold it by a weak
        reference)."""
        if self._root_ref is None:
            return self
        return self._root_ref()

    def _live_root(self) -> Any:
        """The root (a :class:`~loft.patch.FunctionalModule`); ``RuntimeError`` once it
        is gone."""
        root = self.root
        if root is None:
            raise RuntimeError(f"the patched model this {type(self).__name__} belongs to no "
                               f"longer exists (keep a reference to the result of "
                               f"monkeypatch / innerloop_ctx while using its submodules)")
        return root

    @property
    def direct_submodule_call(self) -> bool:
        """higher's ``direct_submodule_call``: whether a call now would be a direct call
        (not one made by the root's forward). loft serves both the same way: every call
        runs on the root's latest fast weights."""
        return self._live_root()._loft_calls == 0

    @property
    def _original_params(self) -> Iterator[Tensor]:
        """higher's ``_original_params``: the original module's parameters."""
        return self._loft_source.parameters()

    @functools.cached_property
    def _param_mapping(self) -> list[int]:
        """higher's ``_param_mapping``: for every parameter slot of the patched tree, in
        higher's order (depth first, shared modules and tied slots repeated), the index
        of its fast weight. Submodules: ``[]``, as in higher."""
        if not self.is_root:
            return []
        index = {(id(params), name): i for params, name, i in self._loft_slots}  # type: ignore[attr-defined]
        mapping: list[int] = []
        stack: list[nn.Module] = [self]
        while stack:  # depth first, children in order (no recursive closure: no cycle)
            module = stack.pop()
            params = module._parameters
            for name, value in params.items():
                i = index.get((id(params), name))
                if value is not None and i is not None:
                    mapping.append(i)
            stack.extend(c for c in reversed(module._modules.values()) if c is not None)
        return mapping

    @functools.cached_property
    def _param_names(self) -> list[str]:
        """higher's ``_param_names``: the names of this module's own parameter slots."""
        return [name for name, value in self._parameters.items() if value is not None]

    def _expand_params(self, params: list[Tensor]) -> list[Tensor]:
        """higher's ``_expand_params``: ``params`` (one per distinct weight) laid out
        over every slot in ``_param_mapping``'s order."""
        return [params[index] for index in self._param_mapping]

    @property
    def fast_params(self) -> list[Tensor] | None:
        """The root's latest fast weights."""
        return self._live_root().fast_params

    @fast_params.setter
    def fast_params(self, value: Iterable[Tensor]) -> None:
        self._live_root().fast_params = value

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The root's initial fast weights."""
        return self._live_root().init_fast_params

    @property
    def track_higher_grads(self) -> bool:
        """The root's ``track_higher_grads``."""
        return self._live_root().track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        self._live_root().track_higher_grads = value

    def update_params(self, params: Iterable[Tensor]) -> None:
        """Record ``params`` (all the model's fast weights) in the root's history."""
        self._live_root().update_params(params)

    # ---- attribute assignment ------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        """A tensor assigned to a parameter slot records new fast weights (higher's
        behaviour); anything else is ``nn.Module``'s (and the original class's) rule,
        on this patched module only."""
        if not _assign_fast_weight(self, name, value):
            super().__setattr__(name, value)


def _assign_fast_weight(module: _MonkeyPatchBase, name: str, value: Any) -> bool:
    """Assign ``value`` to the parameter slot ``name`` of ``module``: new fast weights
    (the slot alone inside :func:`_modify_internally`). ``False``: not a slot."""
    params = module.__dict__.get("_parameters")
    if params is None or params.get(name) is None:
        return False
    if not isinstance(value, Tensor):
        raise TypeError(f"cannot assign {type(value).__name__} to the patched parameter "
                        f"{name!r} of {type(module).__name__}: expected a tensor")
    if module._being_modified_internally:
        params[name] = value
        if "_flat_weights_names" in module.__dict__:
            _refresh_flat_weights(module)
        return True
    root = module._live_root()
    fast = root.fast_params
    if fast is None:
        raise Exception("Cannot assign parameters to patched module which does not "
                        "have implicit fast parameters.")
    fast = list(fast)
    fast[root._slot_index(params, name)] = value
    root.update_params(fast)
    return True


def _inner_setattr(self: _MonkeyPatchBase, name: str, value: Any) -> None:
    """A patched submodule's ``__setattr__``: fast weights as in
    :meth:`_MonkeyPatchBase.__setattr__`, the original class's rule otherwise. (Placed
    before the original class's own in the method order, which reaches
    ``_MonkeyPatchBase.__setattr__`` only through its ``super()`` calls.)"""
    if not _assign_fast_weight(self, name, value):
        self._loft_wrapped.__setattr__(self, name, value)


def _inner_forward(self: _MonkeyPatchBase, *args: Any, params: Iterable[Tensor] | None = None,
                   **kwargs: Any) -> Any:
    """A patched submodule's forward: the original class's, on the current fast weights.

    ``params`` (all the model's fast weights, as higher allows on a direct submodule
    call) are recorded in the root's history first; they never reach the original
    forward.
    """
    if params is not None or self._loft_unset:
        root = self._live_root()
        if params is not None:
            root.update_params(params)
        elif root._fast_params is None:
            raise ValueError(_NO_WEIGHTS)
    if self._loft_tasks is not None:
        root = self._live_root()
        if root._loft_calls == 0:  # a direct call: batch it over the tasks
            root._refill_params_box(None)
            return batched_call(root, self, args, kwargs)
    return self._loft_wrapped.forward(self, *args, **kwargs)


def _flatten_parameters(self: nn.Module) -> None:
    """No-op (higher's): the fast weights are not a flat cuDNN buffer."""


def _refresh_flat_weights(module: nn.Module) -> None:
    """Point an RNN's ``_flat_weights`` (what its forward reads) at the fast weights."""
    state = module.__dict__  # written directly: skips the patched and the RNN __setattr__
    params = state["_parameters"]
    weights = [params.get(name) for name in state["_flat_weights_names"]]
    state["_flat_weights"] = weights
    if "_flat_weight_refs" in state:
        # torch compares these with the weights to decide whether to rebuild the list.
        state["_flat_weight_refs"] = [None if w is None else weakref.ref(w) for w in weights]

