"""higher's per-tensor optimiser state, ``diffopt.state[group][index]``, over loft's flat state.

In higher, ``diffopt.state`` is a list (one entry per param group) of ``defaultdict(dict)``
mapping a tensor's index in its group to a plain dict of tensors (``momentum_buffer``,
``exp_avg``, ``step``, ...). Programs read it, assign into it, change its tensors in place
(``detach_()``, ``zero_()``, ``mul_()``) and delete entries between steps, and the next
step uses what they left there.

loft's fused optimisers keep that state in flat buffers instead. :class:`StateMirror` keeps
the two consistent without any cost for programs that never look at the state:

- **stale** (after a step): the dicts are not updated. Reading ``diffopt.state`` refreshes
  them from the flat buffers (each tensor a new differentiable copy, not a view, so that
  ``detach_()`` works as in higher) and records what it put there (**synced**).
- **synced**: at the next step the dicts are compared with that record (the same objects,
  the same keys, version counters, ``requires_grad`` and ``grad_fn``); a difference makes
  the optimiser rebuild its flat state from the dicts, so every change takes effect.
- **dirty** (new state assigned with ``diffopt.state = ...``, or the state imported from
  the torch optimiser): the next step rebuilds the flat state from the dicts.

After a step the dicts are refreshed at once only when something outside holds the
structure (the list, a group's dict or a tensor's dict): such a holder would otherwise
see outdated values, as it would not in higher.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

__all__ = ["StateMirror", "new_structure"]

#: Per group, per index in the group: the entries loft manages for that tensor (empty: none).
Entries = list[list[dict[str, Any]]]
Structure = list[dict[int, dict[str, Any]]]

_DIRTY, _STALE, _SYNCED = "dirty", "stale", "synced"


def new_structure(num_groups: int) -> Structure:
    """higher's empty layout: one ``defaultdict(dict)`` per param group."""
    return [collections.defaultdict(dict) for _ in range(num_groups)]


def _fingerprint(value: Any) -> tuple[Any, ...]:
    """What an in-place change to a state value alters: for a tensor its version counter
    (``zero_``, ``mul_``), ``requires_grad`` and its graph node (``detach_``)."""
    if isinstance(value, Tensor):
        return (value._version, value.requires_grad, value.grad_fn)
    return ()


class StateMirror:
    """higher's ``state`` structure kept consistent with a flat state (see the module)."""

    def __init__(self, structure: Structure, managed: Iterable[str],
                 flat_is_current: bool = False) -> None:
        """``flat_is_current``: the flat state is the truth (the dicts start stale), not
        the dicts (imported at the next step)."""
        self.structure = structure
        self.managed = frozenset(managed)
        self._mode = _STALE if flat_is_current else _DIRTY
        # (group dict, {index: (tensor dict, ((key, value, fingerprint), ...))}) per group.
        self._record: list[tuple[dict, dict[int, tuple[dict, tuple]]]] = []

    # ---- the user's side -------------------------------------------------------------------

    def get(self, entries: Callable[[], Entries]) -> Structure:
        """``diffopt.state``: the structure, refreshed from the flat state if it is stale."""
        if self._mode == _STALE:
            self._refresh(entries())
        return self.structure

    def set(self, structure: Structure) -> None:
        """``diffopt.state = structure``: taken as it is at the next step."""
        self.structure = structure
        self._record = []
        self._mode = _DIRTY

    # ---- the optimiser's side --------------------------------------------------------------

    def needs_import(self) -> bool:
        """Whether the flat state must be rebuilt from the dicts before the next step."""
        if self._mode == _DIRTY:
            return True
        return self._mode == _SYNCED and self._changed()

    def imported(self) -> None:
        """The flat state was rebuilt from the dicts: they agree until the next step."""
        self._record = []
        self._mode = _STALE if not self._referenced() else _SYNCED
        if self._mode == _SYNCED:
            self._record = self._snapshot()

    def advanced(self, entries: Callable[[], Entries]) -> None:
        """The flat state moved on (a step, a truncation): the dicts are now outdated."""
        self._record = []
        self._mode = _STALE
        if self._referenced():
            self._refresh(entries())

    # ---- internals ---------------------------------------------------------------------------

    def _refresh(self, entries: Entries) -> None:
        """Write ``entries`` into the existing dicts (the same objects: a holder sees them),
        leaving the keys loft does not manage as they are."""
        for group_state, group_entries in zip(self.structure, entries):
            for j, entry in enumerate(group_entries):
                if not entry and j not in group_state:
                    continue  # higher has no dict for a tensor without state
                target = group_state[j]
                for key in [k for k in target if k in self.managed and k not in entry]:
                    del target[key]
                target.update(entry)
        self._record = self._snapshot()
        self._mode = _SYNCED

    def _snapshot(self) -> list[tuple[dict, dict[int, tuple[dict, tuple]]]]:
        record = []
        for group_state in self.structure:
            per_index = {}
            for j, target in group_state.items():
                per_index[j] = (target, tuple(
                    (key, value, _fingerprint(value)) for key, value in target.items()
                    if key in self.managed))
            record.append((group_state, per_index))
        return record

    def _changed(self) -> bool:
        """Whether the dicts differ from the record: a replaced or deleted dict, a managed
        key added, removed or reassigned, or a tensor changed in place."""
        if len(self._record) != len(self.structure):
            return True
        for group_state, (recorded_group, per_index) in zip(self.structure, self._record):
            if group_state is not recorded_group:
                return True
            for j, target in group_state.items():
                recorded = per_index.get(j)
                if recorded is None:
                    if any(key in self.managed for key in target):
                        return True
                    continue
                recorded_target, items = recorded
                if target is not recorded_target:
                    return True
                if sum(1 for key in target if key in self.managed) != len(items):
                    return True
                for key, value, fingerprint in items:
                    current = target.get(key, items)  # a sentinel no dict holds
                    if current is not value or _fingerprint(current) != fingerprint:
                        return True
            if any(j not in group_state and items for j, (_, items) in per_index.items()):
                return True
        return False

    def _referenced(self) -> bool:
        """Whether anything besides this mirror (and its record) holds the structure, a
        group's dict or a tensor's dict, and could read them without ``diffopt.state``.

        ``sys.getrefcount`` counts its own argument. Our own references: the structure is
        held by this mirror; a group's dict by the structure, the loop variable below and
        the record (if recorded); a tensor's dict by its group's dict, the loop variable
        and the record (if recorded).
        """
        if sys.getrefcount(self.structure) > 2:
            return True
        recorded_groups = {id(group) for group, _ in self._record}
        recorded_targets = {id(target) for _, per_index in self._record
                            for target, _ in per_index.values()}
        for group_state in self.structure:
            if sys.getrefcount(group_state) > 3 + (id(group_state) in recorded_groups):
                return True
            for target in group_state.values():
                if sys.getrefcount(target) > 3 + (id(target) in recorded_targets):
                    return True
        return False
