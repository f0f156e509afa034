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
  the latest weights. ``fmodel.history()``, ``fmodel.set_history(times, entries)`` and
  ``fmodel.twin()`` (loft extensions) read, replace and copy the history.

Modules wrapped for multi-device training (``DistributedDataParallel``,
``DataParallel``, FSDP) are refused with an error that says what to do instead.

This module is the API (every name of ``higher.patch``); the code lives by concept in
:mod:`loft._patched_module` (the patched modules), :mod:`loft._patched_tree` (their
classes and the copy of a module tree) and :mod:`loft._functional` (the root and its
history), which import nothing back from here.
"""

from __future__ import annotations

import typing
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from loft import distributed as _distributed
from loft import utils as _utils
from loft._batched import check_tasks

# The modules this one is split into. Names marked ``noqa: F401`` are not used here: they
# stay importable from loft.patch (higher's ``_modify_internally``, ``_patched_parameters``,
# ``_ParameterPlaceholder``; loft's own names from before the split).
from loft._functional import (
    FunctionalModule,
    _build,
    _functional_module,  # noqa: F401
    _patched_parameters,  # noqa: F401
)
from loft._patched_module import (
    _NO_WEIGHTS,  # noqa: F401
    _assign_fast_weight,  # noqa: F401
    _flatten_parameters,  # noqa: F401
    _inner_forward,  # noqa: F401
    _inner_setattr,  # noqa: F401
    _modify_internally,  # noqa: F401
    _MonkeyPatchBase,
    _ParameterPlaceholder,  # noqa: F401
    _refresh_flat_weights,
)
from loft._patched_tree import (
    _HOOK_FLAGS,  # noqa: F401
    _HOOK_REGISTRIES,  # noqa: F401
    _INNER_CLASS,  # noqa: F401
    _MODULE_STATE,
    _OTHER_CLASSES,  # noqa: F401
    _ROOT_CLASS,  # noqa: F401
    _check_patchable,  # noqa: F401
    _patched_class,  # noqa: F401
    _Patcher,  # noqa: F401
    _twin_tree,  # noqa: F401
)

__all__ = ["monkeypatch", "make_functional", "buffer_sync", "FunctionalModule"]

#: higher's ``_internal_attrs``: the attributes of a module that are not copied onto its
#: patched module. loft's set also names every registry torch 2.x's ``nn.Module`` has.
_internal_attrs = {
    "_backend", "_parameters", "_buffers", "_backward_hooks", "_forward_hooks",
    "_forward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks", "_modules",
} | set(_MODULE_STATE)

_BufferType = typing.Dict[str, typing.Optional[Tensor]]  # noqa: UP006 - higher's alias


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
    tasks: int | None = None,
) -> FunctionalModule:
    """A stateless version of ``module`` with its own fast weights (higher's ``monkeypatch``).

    Args:
        module: the module to patch (left unchanged). A ``DistributedDataParallel``
            model patches the model it wraps, and with ``copy_initial_weights=False``
            the next meta-backward averages the meta-gradients across ranks through
            DDP (:mod:`loft.distributed`). Not a ``DataParallel`` or FSDP wrapper
            (``TypeError``).
        device: where the fast weights and buffers go.
        copy_initial_weights: ``True``: the initial fast weights are detached copies
            (no meta-gradient reaches ``module``); ``False``: they are differentiable
            clones of ``module``'s parameters, so meta-gradients flow into them.
        track_higher_grads: ``False`` keeps only the latest fast weights (test mode).
        tasks: ``N`` batches ``N`` tasks into one model (a loft extension): every fast
            weight and buffer is ``[N, *shape]``, all tasks starting from ``module``'s,
            and a forward takes and returns a leading task dimension
            (:attr:`FunctionalModule.tasks`). ``None``: one task, as higher.
    """
    if not isinstance(track_higher_grads, bool):
        raise ValueError(f"Expected boolean argument. Got: {type(track_higher_grads)}.")
    tasks = check_tasks(tasks)
    ddp = None
    if _distributed.is_ddp(module):
        # DDP: patch the wrapped model; entering is DDP's forward (loft.distributed).
        ddp, module = module, module.module
        if not copy_initial_weights:
            _distributed.begin_forward(ddp)
    if copy_initial_weights:
        def make_fast(p: Tensor) -> Tensor:
            return _utils._copy_tensor(p, True, device)
    elif device is None:
        def make_fast(p: Tensor) -> Tensor:
            return p.clone()
    else:
        def make_fast(p: Tensor) -> Tensor:
            return p.clone().to(device)
    make_weights = make_fast
    if tasks is not None:
        def make_weights(p: Tensor) -> Tensor:  # a copy per task (make_fast's clone)
            return make_fast(p.unsqueeze(0).expand(tasks, *p.shape))
    fmodule, _ = _build(module, device, make_weights, track_higher_grads, tasks=tasks)
    if ddp is not None and not copy_initial_weights:
        fmodule.set_history([0], [_distributed.end_forward(ddp, fmodule.fast_params)])
    return fmodule
