"""Building patched trees: the patched subclass of each original class (made once, kept
on the class), the copy of a module tree into patched modules, and the twin copy of a
patched tree (for :func:`loft.unroll`).

State is written straight into each module's ``__dict__``: that skips
``nn.Module.__setattr__``'s type dispatch and the patched classes' fast-weight rule
(:mod:`loft._patched_module`), neither of which applies to a module being built.
"""

from __future__ import annotations

import sys
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from loft._batched import expand_to_tasks
from loft._patched_module import (
    _flatten_parameters,
    _inner_forward,
    _inner_setattr,
    _MonkeyPatchBase,
    _ParameterPlaceholder,
)

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


# ---- the patched classes ------------------------------------------------------------------

#: The attributes of an original class that hold its patched classes (root, submodule).
_ROOT_CLASS = "_loft_patched_root_class"
_INNER_CLASS = "_loft_patched_inner_class"
#: Patched classes of original classes that refuse new attributes (rare).
_OTHER_CLASSES: dict[tuple[type, bool], type] = {}


def _patched_class(cls: type[nn.Module], root_base: type[_MonkeyPatchBase] | None) -> type:
    """The patched subclass of ``cls``, made once: the root flavour, deriving from
    ``root_base`` (:class:`~loft.patch.FunctionalModule`, passed in because it is defined
    on top of this module), or for ``None`` the submodule flavour.

    It is kept on ``cls`` itself (an attribute of ``cls.__dict__``), so that it lives
    exactly as long as ``cls``: a cache keyed by classes would keep classes made at run
    time (torch.fx's GraphModule makes one per instance) alive forever.
    """
    root = root_base is not None
    found = cls.__dict__.get(_ROOT_CLASS if root else _INNER_CLASS)
    if found is None:
        found = _OTHER_CLASSES.get((cls, root))
    if found is not None:
        return found
    _check_patchable(cls)
    namespace: dict[str, Any] = {"_loft_wrapped": cls, "_wrapped_name": cls.__name__,
                                 "__module__": "loft.patch"}
    if not root:
        namespace["forward"] = _inner_forward
        # Before the original class's own (RNNBase has one).
        namespace["__setattr__"] = _inner_setattr
    if hasattr(cls, "flatten_parameters"):
        namespace["flatten_parameters"] = _flatten_parameters
    name = ("Functional" if root else "InnerFunctional") + cls.__name__
    bases = (root_base, cls) if root_base is not None else (cls, _MonkeyPatchBase)
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
            f"loft patches a {name} only as the model given to monkeypatch / "
            f"innerloop_ctx (it then patches the model it wraps and averages the "
            f"meta-gradients through it), not as a submodule of another model: wrap the "
            f"whole model in DistributedDataParallel instead"
        )
    if issubclass(cls, nn.DataParallel):
        raise TypeError(
            f"loft cannot patch a {name}: its replicas would not run on the fast weights. "
            f"Use one process per device with DistributedDataParallel "
            f"(loft.innerloop_ctx(DistributedDataParallel(model), opt, "
            f"copy_initial_weights=False), see loft.distributed), or patch the wrapped "
            f"model (model.module) on one device."
        )
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        wrappers = tuple(getattr(fsdp, n) for n in ("FullyShardedDataParallel", "FSDPModule")
                         if isinstance(getattr(fsdp, n, None), type))
        if wrappers and issubclass(cls, wrappers):
            raise TypeError(
                f"loft does not support FSDP ({name}): its sharded parameters are "
                f"gathered by hooks that a patched module does not run, and an inner loop "
                f"needs every weight on every rank. Replicate the model instead: "
                f"loft.innerloop_ctx(DistributedDataParallel(model), opt, "
                f"copy_initial_weights=False) averages the meta-gradients across ranks."
            )


# ---- copying a module tree ------------------------------------------------------------------


class _Patcher:
    """Builds one patched tree (see :func:`loft._functional._build`): one patched module
    per original module, the parameter slots, and the distinct parameters in
    ``parameters()`` order; the root's class derives from ``root_class``.

    An object rather than a recursive closure: a closure that calls itself is a
    reference cycle, which would keep the whole patched tree (and through the fast
    weights, an autograd graph) alive until the cyclic collector runs.
    """

    def __init__(self, device: torch.device | str | None,
                 make_fast: Callable[[Tensor], Tensor] | None, root_ref: Any,
                 root_class: type[_MonkeyPatchBase], tasks: int | None = None) -> None:
        self.device = device
        self.tasks = tasks
        self.make_fast = make_fast
        self.root_ref = root_ref
        self.root_class = root_class
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
        # The cached patched class read inline: saves a call per module on the common path.
        patched_cls = cls.__dict__.get(_ROOT_CLASS if is_root else _INNER_CLASS)
        if patched_cls is None:
            patched_cls = _patched_class(cls, self.root_class if is_root else None)
        patched = object.__new__(patched_cls)
        self.memo[id(original)] = patched
        source = original.__dict__
        state = patched.__dict__
        state.update(source)  # shallow: every plain attribute is the original's object
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
        state["_parameters"] = self._parameter_slots(source["_parameters"])
        state["_buffers"] = self._buffer_copies(source["_buffers"])
        if self.make_fast is None:
            state["_loft_unset"] = True
        if self.tasks is not None:
            state["_loft_tasks"] = self.tasks
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

    def _parameter_slots(self, originals: dict[str, Any]) -> dict[str, Any]:
        """A patched module's ``_parameters``: for each of the original's, its fast
        weight (a placeholder without ``make_fast``), recorded as a slot; a parameter
        met before (tied, or in a shared module) keeps its fast-weight index."""
        make_fast, index, fast = self.make_fast, self.index, self.fast
        params: dict[str, Any] = {}
        for name, p in originals.items():
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
            self.slots.append((params, name, i))
        return params

    def _buffer_copies(self, originals: dict[str, Any]) -> dict[str, Any]:
        """A patched module's ``_buffers``: detached copies of the original's, on
        ``device`` if given (what higher's ``buffer_sync`` makes); with ``tasks``, one
        copy per task (``[tasks, *shape]``)."""
        device, tasks = self.device, self.tasks
        buffers = {}
        for name, b in originals.items():
            if b is not None:
                b = b.clone() if tasks is None else expand_to_tasks(b, tasks)
                if b.requires_grad:
                    b = b.detach()
                if device is not None:
                    b = b.to(device)
            buffers[name] = b
        return buffers


# ---- the twin of a patched tree ------------------------------------------------------------


def _twin_tree(patched: _MonkeyPatchBase, memo: dict[int, _MonkeyPatchBase],
               param_dicts: dict[int, dict[str, Any]], root_ref: Any) -> _MonkeyPatchBase:
    """A copy of the patched tree under ``patched`` with its own parameter slots and
    children, sharing everything else (see :meth:`~loft.patch.FunctionalModule.twin`)."""
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


def _twin_root(root: Any) -> Any:
    """A twin of the patched tree under ``root`` (a :class:`~loft.patch.FunctionalModule`)
    whose slot tables (``_loft_slots``, ``_loft_inner``, ``_loft_recurrent``) point into
    the twin; its history is left to the caller."""
    memo: dict[int, _MonkeyPatchBase] = {}
    param_dicts: dict[int, dict[str, Any]] = {}
    twin = _twin_tree(root, memo, param_dicts, None)
    state = twin.__dict__
    state["_loft_slots"] = [(param_dicts[id(params)], name, i)
                            for params, name, i in root._loft_slots
                            if id(params) in param_dicts]
    state["_loft_inner"] = [memo[id(m)] for m in root._loft_inner if id(m) in memo]
    state["_loft_recurrent"] = [memo[id(m)] for m in root._loft_recurrent if id(m) in memo]
    return twin
