"""Functional ("monkey-patched") modules with time-indexed fast weights (higher's API).

``monkeypatch(module)`` returns ``fmodel``, a stateless twin of ``module`` built the way
higher builds it, without copying anything higher does not copy:

- **One patched module per original module** (a submodule shared under two names stays
  one object). Each is an instance of a subclass of its original class and of
  :class:`_MonkeyPatchBase` (``isinstance(fmodel.fc, nn.Linear)`` holds); the subclass is
  made once per original class and kept. Instances are made without ``__init__``: their
  ``__dict__`` starts as a shallow copy of the original's, so every plain attribute (a
  lock, a lookup table, a config) *is* the original object, while rebinding an
  attribute on the patched module leaves the original alone.
- Each patched module owns its containers: ``_parameters`` holds the **current fast
  weights** of its slots, ``_buffers`` copies of the original's buffers (BatchNorm
  statistics then diverge from the original until
  :meth:`FunctionalModule.write_back_buffers` copies them back), ``_modules`` the patched
  children, and empty hook registries (higher does not carry the original's hooks).
- The root (a :class:`FunctionalModule`) keeps the history of fast weights. Whenever it
  changes, the latest weights are written into every patched module's parameter slots,
  so a forward is the original class's forward, unchanged: ``fmodel(x)``,
  ``fmodel.encoder(x)`` and ``fmodel[0](x)`` all run on the current fast weights.
  Assigning a tensor to ``fmodel.encoder.weight`` records new fast weights, as in higher.
- ``fmodel.parameters(time=i)`` returns the fast weights after ``i`` updates (``time=0``:
  the initial weights). Unlike higher, asking for a step that is not recorded (any step
  but the latest when ``track_higher_grads=False``) raises instead of silently returning
  the latest weights.

Modules wrapped for multi-device training (``DistributedDataParallel``,
``DataParallel``, FSDP) are refused with an error that says what to do instead.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
import typing
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from loft import utils as _utils

__all__ = ["monkeypatch", "make_functional", "buffer_sync", "FunctionalModule"]

# ---- nn.Module's own state ---------------------------------------------------------------

#: Everything ``nn.Module.__init__`` creates, but ``training``: the containers a patched
#: module gets its own of (read from torch, so a torch that adds a hook registry is
#: covered).
_MODULE_STATE = {name: value for name, value in nn.Module().__dict__.items() if name != "training"}
#: The hook registries: a patched module starts with empty ones (as in higher).
_HOOK_REGISTRIES = tuple(name for name, value in _MODULE_STATE.items()
                         if isinstance(value, OrderedDict))
#: The other hook state (``_is_full_backward_hook``): reset to its fresh value.
_HOOK_FLAGS = tuple((name, value) for name, value in _MODULE_STATE.items()
                    if name not in _HOOK_REGISTRIES and not isinstance(value, (dict, set)))

#: higher's ``_internal_attrs``: the attributes of a module that are not copied onto its
#: patched module. loft's set also names every registry torch 2.x's ``nn.Module`` has.
_internal_attrs = {
    "_backend", "_parameters", "_buffers", "_backward_hooks", "_forward_hooks",
    "_forward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks", "_modules",
} | set(_MODULE_STATE)

_BufferType = typing.Dict[str, typing.Optional[Tensor]]  # noqa: UP006 - higher's alias

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
    #: The class this patched class derives from (set on each patched class).
    _loft_wrapped: type[nn.Module] = nn.Module
    _root_ref: Callable[[], FunctionalModule | None] | None = None
    #: higher's submodules keep no history of their own (the root's is set per instance).
    _fast_params: list[list[Tensor]] | None = None
    _track_higher_grads: bool = True
    #: Calls of the root's forward under way (for ``direct_submodule_call``).
    _loft_calls: int = 0

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
    def root(self) -> FunctionalModule:
        """The root patched module (higher's ``root``): ``None`` once it is gone, as in
        higher (submodules hold it by a weak reference)."""
        if self._root_ref is None:
            return self  # type: ignore[return-value]
        return self._root_ref()  # type: ignore[return-value]

    def _live_root(self) -> FunctionalModule:
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
        return self._loft_source.parameters()  # type: ignore[attr-defined, no-any-return]

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
    return self._loft_wrapped.forward(self, *args, **kwargs)


def _flatten_parameters(self: nn.Module) -> None:
    """No-op (higher's): the fast weights are not a flat cuDNN buffer."""


def _refresh_flat_weights(module: nn.Module) -> None:
    """Point an RNN's ``_flat_weights`` (what its forward reads) at the fast weights."""
    state = module.__dict__
    params = state["_parameters"]
    weights = [params.get(name) for name in state["_flat_weights_names"]]
    state["_flat_weights"] = weights
    if "_flat_weight_refs" in state:
        # torch compares these with the weights to decide whether to rebuild the list.
        state["_flat_weight_refs"] = [None if w is None else weakref.ref(w) for w in weights]


_ROOT_CLASS = "_loft_patched_root_class"
_INNER_CLASS = "_loft_patched_inner_class"
#: Patched classes of original classes that refuse new attributes (rare).
_OTHER_CLASSES: dict[tuple[type, bool], type] = {}


def _patched_class(cls: type[nn.Module], root: bool) -> type:
    """The patched subclass of ``cls`` (root or submodule flavour), made once.

    It is kept on ``cls`` itself (an attribute of ``cls.__dict__``), so that it lives
    exactly as long as ``cls``: a cache keyed by classes would keep classes made at run
    time (torch.fx's GraphModule makes one per instance) alive forever.
    """
    found = cls.__dict__.get(_ROOT_CLASS if root else _INNER_CLASS)
    if found is None:
        found = _OTHER_CLASSES.get((cls, root))
    if found is not None:
        return found
    _check_patchable(cls)
    namespace: dict[str, Any] = {"_loft_wrapped": cls, "_wrapped_name": cls.__name__,
                                 "__module__": __name__}
    if not root:
        namespace["forward"] = _inner_forward
        # Before the original class's own (RNNBase has one).
        namespace["__setattr__"] = _inner_setattr
    if hasattr(cls, "flatten_parameters"):
        namespace["flatten_parameters"] = _flatten_parameters
    name = ("Functional" if root else "InnerFunctional") + cls.__name__
    bases = (FunctionalModule, cls) if root else (cls, _MonkeyPatchBase)
    patched = type(name, bases, namespace)
    patched.__qualname__ = name
    try:
        setattr(cls, _ROOT_CLASS if root else _INNER_CLASS, patched)
    except (AttributeError, TypeError):
        _OTHER_CLASSES[(cls, root)] = patched
    return patched


def _check_patchable(cls: type) -> None:
    """Refuse patched modules and modules wrapped for multi-device training."""
    if issubclass(cls, _MonkeyPatchBase):
        raise ValueError(
            "Monkey-patching monkey-patched modules is untested uncharted territory, so "
            "we're going to assume it's done in error (patch the original module)."
        )
    name = cls.__name__
    if issubclass(cls, nn.parallel.DistributedDataParallel):
        raise TypeError(
            f"loft cannot patch a {name} yet: each process would meta-train on its own "
            f"un-averaged meta-gradients and the replicas would drift apart. Patch the "
            f"wrapped model instead (innerloop_ctx(model.module, opt)) and average the "
            f"meta-gradients across processes yourself (all_reduce each parameter's .grad "
            f"and divide by the world size) before the meta-optimizer's step, or wait for "
            f"loft's torch.distributed support."
        )
    if issubclass(cls, nn.DataParallel):
        raise TypeError(
            f"loft cannot patch a {name}: its replicas would not run on the fast weights. "
            f"Patch the wrapped model instead (innerloop_ctx(model.module, opt)) on one "
            f"device, or run one process per device and average the meta-gradients "
            f"yourself."
        )
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        wrappers = tuple(getattr(fsdp, n) for n in ("FullyShardedDataParallel", "FSDPModule")
                         if isinstance(getattr(fsdp, n, None), type))
        if wrappers and issubclass(cls, wrappers):
            raise TypeError(
                f"loft does not support FSDP ({name}): its sharded parameters are "
                f"gathered by hooks that a patched module does not run. Patch an "
                f"unsharded model."
            )


# ---- building the patched tree --------------------------------------------------------------


class _Patcher:
    """Builds one patched tree (see :func:`_build`): one patched module per original
    module, the parameter slots, and the distinct parameters in ``parameters()`` order.

    An object rather than a recursive closure: a closure that calls itself is a
    reference cycle, which would keep the whole patched tree (and through the fast
    weights, an autograd graph) alive until the cyclic collector runs.
    """

    def __init__(self, device: torch.device | str | None,
                 make_fast: Callable[[Tensor], Tensor] | None, root_ref: Any) -> None:
        self.device = device
        self.make_fast = make_fast
        self.root_ref = root_ref
        self.memo: dict[int, _MonkeyPatchBase] = {}
        self.index: dict[int, int] = {}
        self.originals: list[Tensor] = []
        self.fast: list[Tensor] = []
        self.slots: list[tuple[dict[str, Any], str, int]] = []
        self.inner: list[_MonkeyPatchBase] = []
        self.recurrent: list[_MonkeyPatchBase] = []

    def patch(self, original: nn.Module, is_root: bool) -> _MonkeyPatchBase:
        """The patched module of ``original`` and, recursively, of its children."""
        cls = type(original)
        patched_cls = cls.__dict__.get(_ROOT_CLASS if is_root else _INNER_CLASS)
        if patched_cls is None:
            patched_cls = _patched_class(cls, is_root)
        patched = object.__new__(patched_cls)
        self.memo[id(original)] = patched
        source = original.__dict__
        state = patched.__dict__
        state.update(source)
        state["_loft_source"] = original
        for registry in _HOOK_REGISTRIES:
            state[registry] = OrderedDict()
        for flag, value in _HOOK_FLAGS:
            state[flag] = value
        state["_non_persistent_buffers_set"] = set(source["_non_persistent_buffers_set"])
        if "_compiled_call_impl" in state:
            del state["_compiled_call_impl"]  # module.compile() of the original
        forward = state.get("forward")
        if isinstance(forward, types.MethodType) and forward.__self__ is original:
            # A forward bound to the original instance: bind it to the patched one.
            state["forward"] = forward.__func__.__get__(patched)
        make_fast, index, fast, slots = self.make_fast, self.index, self.fast, self.slots
        params: dict[str, Any] = {}
        for name, p in source["_parameters"].items():
            if p is None:
                params[name] = None
                continue
            i = index.get(id(p))
            if i is None:
                i = index[id(p)] = len(self.originals)
                self.originals.append(p)
                if make_fast is not None:
                    fast.append(make_fast(p))
            params[name] = _ParameterPlaceholder(name) if make_fast is None else fast[i]
            slots.append((params, name, i))
        state["_parameters"] = params
        device = self.device
        buffers = {}
        for name, b in source["_buffers"].items():
            if b is not None:
                b = b.clone()
                if b.requires_grad:
                    b = b.detach()
                if device is not None:
                    b = b.to(device)
            buffers[name] = b
        state["_buffers"] = buffers
        if make_fast is None:
            state["_loft_unset"] = True
        if is_root:
            self.root_ref = weakref.ref(patched)
        else:
            state["_root_ref"] = self.root_ref
            self.inner.append(patched)
            if "_flat_weights_names" in source:
                self.recurrent.append(patched)
        children: dict[str, Any] = {}
        for name, child in source["_modules"].items():
            if child is not None:
                known = self.memo.get(id(child))
                child = self.patch(child, False) if known is None else known
            children[name] = child
        state["_modules"] = children
        return patched


def _build(module: nn.Module, device: torch.device | str | None,
           make_fast: Callable[[Tensor], Tensor] | None,
           track_higher_grads: bool = True,
           parent_ref: Any = None) -> tuple[FunctionalModule, list[Tensor]]:
    """Patch ``module``'s tree; returns the root and ``module``'s distinct parameters.

    ``make_fast(p)`` gives the initial fast weight of each distinct parameter (``None``:
    the slots hold placeholders until fast weights are set). Buffers are copied to
    ``device`` (higher's ``buffer_sync``). ``parent_ref``: a weak reference to another
    root, which makes the result a patched subtree of that root (without history).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module to patch, got {type(module).__name__}")
    patcher = _Patcher(device, make_fast, parent_ref)
    root = patcher.patch(module, parent_ref is None)
    if parent_ref is not None:
        return root, patcher.originals  # type: ignore[return-value]
    state = root.__dict__
    state["_loft_slots"] = patcher.slots
    state["_loft_inner"] = patcher.inner
    state["_loft_recurrent"] = patcher.recurrent
    state["_loft_shapes"] = [p.shape for p in patcher.originals]
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


class FunctionalModule(_MonkeyPatchBase):
    """The root patched module: a stateless twin of a module, driven by a history of
    fast weights (higher's root ``MonkeyPatched`` class).

    ``_fast_params`` is the history: a list with one list of tensors per recorded step
    (``_times`` holds each entry's step). The root of a patched ``cls`` is an instance of
    a subclass of ``FunctionalModule`` and of ``cls``.
    """

    _fast_params: list[list[Tensor]] | None
    _times: list[int]
    _track_higher_grads: bool
    _loft_source: nn.Module
    _loft_slots: list[tuple[dict[str, Any], str, int]]
    _loft_inner: list[_MonkeyPatchBase]
    _loft_recurrent: list[_MonkeyPatchBase]
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
        return len(self._loft_shapes)

    @property
    def _shapes(self) -> list[torch.Size]:
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
        state = self.__dict__
        state["_fast_params"] = [list(e) for e in entries]
        state["_times"] = list(times)
        if entries:
            self._write(state["_fast_params"][-1])

    parameters = _patched_parameters  # type: ignore[assignment]

    def _entries(self) -> list[tuple[str, int]]:
        """Every (qualified name, fast-weight index) pair of the patched tree, tied
        parameters and shared modules under each of their names."""
        index = {(id(params), name): i for params, name, i in self._loft_slots}
        entries = []
        for prefix, module in nn.Module.named_modules(self, remove_duplicate=False):
            params = module._parameters
            for name in params:
                i = index.get((id(params), name))
                if i is not None:
                    entries.append((f"{prefix}.{name}" if prefix else name, i))
        return entries

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
        """(name, latest fast weight) pairs, named as ``module.named_parameters()``."""
        fast = list(self.parameters())
        names: dict[int, str] = {}
        for name, i in self._entries():
            names.setdefault(i, name)
        return iter([(prefix + names[i], p) for i, p in enumerate(fast)])

    # ---- forward and module behaviour ----------------------------------------------------

    def forward(self, *args: Any, params: Iterable[Tensor] | None = None, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` on the fast weights; ``params`` given are recorded
        as the new fast weights first, as higher does."""
        self._refill_params_box(params)
        state = self.__dict__
        state["_loft_calls"] = self._loft_calls + 1
        try:
            return self._loft_wrapped.forward(self, *args, **kwargs)
        finally:
            state["_loft_calls"] -= 1

    def boxed_forward(self, *args: Any, **kwargs: Any) -> Any:
        """higher's ``boxed_forward``: the original forward on the current fast weights."""
        self._refill_params_box(None)
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
        index = dict(self._entries())
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

    def write_back_buffers(self, module: nn.Module | None = None) -> None:
        """Copy the patched module's buffers into ``module`` (default: the patched one).

        higher never writes BatchNorm running statistics back to the original model;
        call this after an inner loop to keep them (for example before evaluation).
        """
        module = self._loft_source if module is None else module
        targets = dict(module.named_buffers())
        for name, buf in nn.Module.named_buffers(self):
            if name not in targets:
                raise KeyError(f"write_back_buffers: the module has no buffer named {name!r}")
            with torch.no_grad():
                targets[name].copy_(buf)

    def _twin(self) -> FunctionalModule:
        """An independent patched copy, for :func:`loft.unroll`'s replays.

        Its own patched modules, parameter slots and history (one entry: the current
        fast weights); the same attributes, hook registries and ``_buffers`` dicts as
        this one, so buffers it updates (BatchNorm statistics) are this model's.
        """
        fast = self.fast_params
        if fast is None:
            raise ValueError("_twin: the patched model has no fast weights yet")
        memo: dict[int, _MonkeyPatchBase] = {}
        param_dicts: dict[int, dict[str, Any]] = {}
        root = _twin_tree(self, memo, param_dicts, None)
        state = root.__dict__
        state["_loft_slots"] = [(param_dicts[id(params)], name, i)
                                for params, name, i in self._loft_slots
                                if id(params) in param_dicts]
        state["_loft_inner"] = [memo[id(m)] for m in self._loft_inner if id(m) in memo]
        state["_loft_recurrent"] = [memo[id(m)] for m in self._loft_recurrent if id(m) in memo]
        state["_fast_params"] = [list(fast)]
        state["_times"] = [self._times[-1]]
        root._write(state["_fast_params"][-1])
        return root  # type: ignore[return-value]


def _twin_tree(patched: _MonkeyPatchBase, memo: dict[int, _MonkeyPatchBase],
               param_dicts: dict[int, dict[str, Any]], root_ref: Any) -> _MonkeyPatchBase:
    """A copy of the patched tree under ``patched`` with its own parameter slots and
    children, sharing everything else (see :meth:`FunctionalModule._twin`)."""
    twin = object.__new__(type(patched))
    memo[id(patched)] = twin
    state = twin.__dict__
    state.update(patched.__dict__)
    params = dict(patched._parameters)
    param_dicts[id(patched._parameters)] = params
    state["_parameters"] = params
    if root_ref is None:
        root_ref = weakref.ref(twin)
    else:
        state["_root_ref"] = root_ref
    children: dict[str, Any] = {}
    for name, child in patched._modules.items():
        if child is not None:
            known = memo.get(id(child))
            child = _twin_tree(child, memo, param_dicts, root_ref) if known is None else known
        children[name] = child
    state["_modules"] = children
    return twin


def _functional_module(module: nn.Module, track_higher_grads: bool = True) -> FunctionalModule:
    """``FunctionalModule(module, track_higher_grads)``: loft's constructor before the
    patched classes; ``make_functional(module)`` and the flag."""
    fmodule = make_functional(module)
    fmodule.track_higher_grads = track_higher_grads
    return fmodule


# ---- higher's module-level helpers ------------------------------------------------------------


def buffer_sync(module: nn.Module, fmodule: _MonkeyPatchBase,
                device: torch.device | str | None = None) -> None:
    """Copy ``module``'s buffers into ``fmodule``'s own, detached (on ``device``), as
    higher's ``buffer_sync`` does; later updates of either side do not reach the other.

    Raises ``KeyError`` if ``fmodule`` lacks a submodule of ``module`` (higher's error).
    """
    for key, value in module._buffers.items():
        if not isinstance(value, Tensor):
            fmodule._buffers[key] = value
        elif device is None:
            fmodule._buffers[key] = value.clone().detach()
        else:
            fmodule._buffers[key] = value.clone().detach().to(device)
    for name, child in module._modules.items():
        if name not in fmodule._modules:
            raise KeyError(f"Did not find expected submodule {name} of monkey-patched "
                           f"module {fmodule}.")
        if child is not None:
            buffer_sync(child, fmodule._modules[name], device)  # type: ignore[arg-type]


def _count_param_slots(module: nn.Module) -> int:
    """Parameter slots under ``module`` as higher counts them (per module, so a shared
    module's and a tied parameter's count again)."""
    own = sum(1 for p in module._parameters.values() if p is not None)
    return own + sum(_count_param_slots(c) for c in module._modules.values() if c is not None)


def _make_functional(
    module: nn.Module,
    params_box: Any = None,
    params_offset: int = 0,
    root_patched: _MonkeyPatchBase | None = None,
) -> tuple[int, _MonkeyPatchBase, type[_MonkeyPatchBase]]:
    """higher's ``_make_functional``: patch ``module``'s tree without fast weights.

    Returns ``(params_offset + the parameter slots under module, the patched module,
    its class)``. Without ``root_patched`` the result is a root
    (:class:`FunctionalModule`); with it, a patched subtree whose ``root`` is
    ``root_patched`` but whose slots are not wired into its fast weights (fill them with
    :func:`_update_patched_params`). ``params_box`` is accepted and ignored: loft's
    patched modules hold their fast weights themselves.
    """
    parent = None if root_patched is None else weakref.ref(root_patched)
    fmodule, _ = _build(module, None, None, parent_ref=parent)
    return params_offset + _count_param_slots(module), fmodule, type(fmodule)


def _update_patched_params(fmodule: _MonkeyPatchBase, params_box: Any,
                           params_offset: int) -> int:
    """higher's ``_update_patched_params``: set the slots of ``fmodule``'s tree from
    ``params_box[0][params_offset:]`` (one tensor per slot, in ``_param_mapping``'s
    order), without recording history; returns the offset after the tree."""
    expanded = params_box[0]
    own = fmodule._param_names
    offset = params_offset + len(own)
    for child in fmodule._modules.values():
        if child is not None:
            offset = _update_patched_params(child, params_box, offset)  # type: ignore[arg-type]
    for name, value in zip(own, expanded[params_offset:params_offset + len(own)]):
        fmodule._parameters[name] = value
    if "_flat_weights_names" in fmodule.__dict__:
        _refresh_flat_weights(fmodule)
    return offset


_EncapsulatorType = typing.Optional[typing.Callable[[_MonkeyPatchBase, nn.Module], None]]  # noqa: UP006,UP007


def make_functional(module: nn.Module, encapsulator: _EncapsulatorType = None) -> FunctionalModule:
    """A stateless version of ``module`` without fast weights (higher's
    ``make_functional``); ``encapsulator(fmodule, module)`` may set them (and sync the
    buffers, which loft has already copied)."""
    fmodule, _ = _build(module, None, None)
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule


def monkeypatch(
    module: nn.Module,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> FunctionalModule:
    """A stateless version of ``module`` with its own fast weights (higher's ``monkeypatch``).

    Args:
        module: the module to patch (left unchanged). Not a ``DistributedDataParallel``,
            ``DataParallel`` or FSDP wrapper (``TypeError``; patch ``module.module``).
        device: where the fast weights and buffers go.
        copy_initial_weights: ``True``: the initial fast weights are detached copies
            (no meta-gradient reaches ``module``); ``False``: they are differentiable
            clones of ``module``'s parameters, so meta-gradients flow into them.
        track_higher_grads: ``False`` keeps only the latest fast weights (test mode).
    """
    if not isinstance(track_higher_grads, bool):
        raise ValueError(f"Expected boolean argument. Got: {type(track_higher_grads)}.")
    if copy_initial_weights:
        def make_fast(p: Tensor) -> Tensor:
            return _utils._copy_tensor(p, True, device)
    elif device is None:
        def make_fast(p: Tensor) -> Tensor:
            return p.clone()
    else:
        def make_fast(p: Tensor) -> Tensor:
            return p.clone().to(device)
    fmodule, _ = _build(module, device, make_fast, track_higher_grads)
    return fmodule
