"""higher's per-tensor ``_update`` for loft's optimisers: the same math, one tensor at a time.

A subclass written for higher overrides ``step`` or ``_update`` (and calls
``super()._update(grouped_grads)``); it then runs :func:`update`, which steps each tensor
with a gradient as a one-tensor bucket, reading and writing its dict in
``diffopt.state[g][j]`` as higher does.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from loft._contract import compute_dtype
from loft.flat import Bucket
from loft.optim.higher_state import StateMirror
from loft.optim.hyper import HyperReader, scalar_tensor

__all__ = ["update"]


class FlatOptimizer(Protocol):
    """What the per-tensor path reads of :class:`loft.optim.engine.FlatOptimizer` (its hooks)."""

    param_groups: list[dict[str, Any]]
    track_higher_grads: bool
    _mirror: StateMirror
    _hyper: HyperReader
    _state_names: tuple[str, ...]
    _segment_state_names: dict[str, float]
    _step_key: str | None
    _first_step_only: bool

    def _read_entry(self, entry: dict[str, Any]) -> tuple[int, bool, torch.dtype | None,
                                                          dict[str, Any]]: ...
    def _group_flags(self, group: dict[str, Any]) -> int: ...
    def _group_hyper(self, group: dict[str, Any]) -> dict[str, Any]: ...
    def _unused_state(self, flags: list[int]) -> set[str]: ...
    def _default_state(self, name: str, group: dict[str, Any], shape: torch.Size,
                       b: Bucket) -> Tensor | None: ...
    def _reference_step(self, params: Tensor, grads: Tensor, state: dict[str, Tensor],
                 segments: Tensor, hyper: dict[str, Tensor], flags: Tensor,
                 elementwise: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]: ...


def update(opt: FlatOptimizer, grouped_grads: list[list[Tensor | None]]) -> None:
    """higher's ``_update``: for every tensor with a gradient, one step of ``opt``'s math
    on that tensor alone, replacing ``param_groups[g]['params'][j]`` and the entries of
    ``state[g][j]``."""
    structure = opt._mirror.structure
    grad_mode = torch.enable_grad() if opt.track_higher_grads else torch.no_grad()
    with grad_mode:
        for g, (group, grads) in enumerate(zip(opt.param_groups, grouped_grads)):
            for j, (p, grad) in enumerate(zip(group["params"], grads)):
                if grad is None:
                    continue
                group["params"][j] = _tensor_step(opt, g, j, p, grad, structure[g])


def _tensor_step(opt: FlatOptimizer, g: int, j: int, p: Tensor, grad: Tensor,
                 group_state: dict[int, dict[str, Any]]) -> Tensor:
    """One update of tensor ``j`` of group ``g``; writes its state dict."""
    group = opt.param_groups[g]
    b = Bucket(p.device, p.dtype, [0], [p.shape], [0])
    entry = group_state.get(j, {})  # .get: higher makes no dict for a stateless update
    step, _, step_dtype, values = opt._read_entry(entry)
    flags = [opt._group_flags(group)]
    unused = opt._unused_state(flags)
    state: dict[str, Tensor] = {}
    for name in opt._state_names:
        if name in unused and name not in values:
            state[name] = torch.empty(0, dtype=b.dtype, device=b.device)
        else:
            value = values.get(name)
            if value is None:
                value = opt._default_state(name, group, p.shape, b)
            elif not isinstance(value, Tensor):
                value = torch.full(p.shape, float(value), dtype=p.dtype, device=p.device)
            state[name] = b.flatten([value])
    ct = compute_dtype(b.dtype)
    for name, default in opt._segment_state_names.items():
        state[name] = scalar_tensor(values.get(name, default), ct, b.device).reshape(1)
    hyper, flag_tensor, elementwise = opt._hyper.for_tensor(b, opt._group_hyper(group), g, j,
                                                            flags)
    op_step = min(step, 1) if opt._first_step_only else step
    segments = b.table([op_step], [True])
    p_new, state_new = opt._reference_step(p.reshape(-1), grad.reshape(-1), state, segments, hyper,
                                    flag_tensor, elementwise)
    _write_entry(opt, entry, step + 1, step_dtype, state_new, p.shape, unused)
    if entry and j not in group_state:
        group_state[j] = entry
    return p_new.view(p.shape)


def _write_entry(opt: FlatOptimizer, entry: dict[str, Any], step: int,
                 step_dtype: torch.dtype | None, state: dict[str, Tensor], shape: torch.Size,
                 unused: set[str]) -> None:
    """Write a tensor's new state into its higher-style dict (new tensors, not views;
    ``unused``: the buffers its group does not use)."""
    if opt._step_key:
        entry[opt._step_key] = step if step_dtype is None else torch.tensor(
            float(step), dtype=step_dtype)
    for name in opt._state_names:
        value = state[name]
        if value.numel() == shape.numel() and name not in unused:
            entry[name] = value.reshape(shape).clone()
    for name in opt._segment_state_names:
        entry[name] = state[name].reshape(()).clone()
