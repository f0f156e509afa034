"""Buckets, segment tables and views: the flat layout the fused ops work on.

A **bucket** holds the trainable parameters that share a (device, dtype). For each
quantity (weights, gradient, optimiser state) it keeps one contiguous buffer of all its
parameters, concatenated in order; a parameter at step *t* is a view into the bucket's
buffer at step *t*. The **segment table** has one row per parameter tensor:
``offset, numel, group, step, active`` (``docs/ops.md``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from loft._contract import SegmentColumn

__all__ = ["Bucket", "FlatState", "make_buckets", "hyper_tensor"]


#: Segment tables of the usual step (all tensors active, one step count) are built this
#: many step counts at a time (:meth:`Bucket.segments`).
_TABLE_BATCH = 32
#: Settings a bucket keeps (:meth:`Bucket.keep_settings`).
_SETTINGS_KEPT = 8


@dataclass
class Bucket:
    """Parameters of one (device, dtype), flattened in the order of ``indices``."""

    device: torch.device
    dtype: torch.dtype
    indices: list[int]  # positions in the optimiser's parameter list
    shapes: list[torch.Size]
    groups: list[int]  # param group of each tensor
    numels: list[int] = field(init=False)
    offsets: list[int] = field(init=False)
    numel: int = field(init=False)
    #: ``(shape, strides, offset)`` per tensor, made at the first :meth:`plain_views`.
    _layout: list[tuple[torch.Size, tuple[int, ...], int]] | None = field(
        init=False, default=None, repr=False, compare=False)
    #: :meth:`gather`'s CPU scratch buffers by slot: ``(flat, its views)``.
    _scratch: dict[int, tuple[Tensor, list[Tensor]]] = field(
        init=False, default_factory=dict, repr=False, compare=False)
    #: :meth:`segments`' batch of usual tables: ``(first step count, [_TABLE_BATCH, S, 5])``.
    _table_batch: tuple[int, Tensor] | None = field(init=False, default=None, repr=False,
                                                    compare=False)

    #: Step settings that optimisers over this bucket computed from plain numbers, by
    #: (optimiser class, settings): read-only tensors, shared by later inner loops.
    settings: dict[Any, Any] = field(init=False, default_factory=dict, repr=False,
                                     compare=False)

    def keep_settings(self, key: Any, value: Any) -> None:
        """Keep ``value`` in :attr:`settings` (the 8 newest keys only)."""
        if len(self.settings) >= _SETTINGS_KEPT:
            del self.settings[next(iter(self.settings))]
        self.settings[key] = value

    def __post_init__(self) -> None:
        self.numels = [int(torch.Size(s).numel()) for s in self.shapes]
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.numel = total

    def flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """One new flat buffer of ``tensors`` (``None`` entries become zeros).

        Differentiable, as a single autograd node (its backward splits the gradient).
        """
        ready = [None if t is None else t.to(device=self.device, dtype=self.dtype)
                 for t in tensors]
        return _Flatten.apply(self, *ready)

    def views(self, flat: Tensor) -> list[Tensor]:
        """The parameters as views into ``flat``, with their original shapes.

        Differentiable, as a single autograd node (its backward concatenates).
        """
        if not self.numels:
            return []
        return list(_Views.apply(self, flat))

    def plain_views(self, flat: Tensor) -> list[Tensor]:
        """The parameters as views into ``flat`` with no autograd node of loft's.

        Under grad mode they are torch's own differentiable views (split, then view).
        Otherwise each is one ``as_strided`` call on ``flat`` (contiguous strides at the
        tensor's offset): one dispatch per tensor instead of two, which halves a cost
        that every step pays on models with many small tensors.
        """
        if torch.is_grad_enabled():
            return [part.view(shape) for part, shape in zip(flat.split(self.numels),
                                                            self.shapes)]
        as_strided = flat.as_strided
        base = flat.storage_offset()
        return [as_strided(shape, stride, base + offset)
                for shape, stride, offset in self._strided_layout()]

    def _strided_layout(self) -> list[tuple[torch.Size, tuple[int, ...], int]]:
        """``(shape, contiguous strides, offset)`` of each parameter in the flat buffer."""
        if self._layout is None:
            self._layout = [(torch.Size(shape), _contiguous_strides(shape), offset)
                            for shape, offset in zip(self.shapes, self.offsets)]
        return self._layout

    def gather(self, parts: Sequence[Tensor], slot: int, run: Any) -> Any:
        """``run(flat)``, where ``flat`` holds ``parts`` (one tensor per parameter, all
        present, in the bucket's dtype and device) concatenated, for a kernel input that
        is neither kept nor returned.

        On the CPU ``flat`` is a scratch buffer the bucket keeps between calls (one per
        ``slot``): a fresh buffer of this size is new memory each step, and on the CPU
        touching new pages costs more than the copy itself. ``run`` must not keep
        ``flat``. Elsewhere (CUDA has a caching allocator, and a reused buffer could be
        read by another stream) it is a new buffer.
        """
        if self.device.type != "cpu" or any(n == 0 for n in self.numels):
            return run(torch._C._nn.flatten_dense_tensors(list(parts)))
        scratch = self._scratch
        entry = scratch.pop(slot, None)  # taken while in use: a re-entrant call makes its own
        if entry is None:
            flat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
            entry = (flat, self.plain_views(flat))
        torch._foreach_copy_(entry[1], list(parts))
        try:
            return run(entry[0])
        finally:
            scratch[slot] = entry

    def segments(self, steps: Sequence[int], active: Sequence[bool]) -> Tensor:
        """The ``[S, 5]`` int64 segment table for one step."""
        first = steps[0] if steps else 0
        if all(active) and all(st == first for st in steps):
            # The usual step: every tensor active, one step count. The tables of such
            # steps are made _TABLE_BATCH at a time (one copy and one fill), and each is
            # a read-only slice of that batch; the ops never write their table.
            if self._table_batch is None or not 0 <= first - self._table_batch[0] < _TABLE_BATCH:
                base = self.table([0] * len(self.numels), [True] * len(self.numels))
                batch = base.unsqueeze(0).repeat(_TABLE_BATCH, 1, 1)
                batch.select(2, SegmentColumn.STEP).copy_(torch.arange(
                    first, first + _TABLE_BATCH, device=batch.device).unsqueeze(1))
                self._table_batch = (first, batch)
            batch_start, batch = self._table_batch
            return batch[first - batch_start]
        return self.table(steps, active)

    def table(self, steps: Sequence[int], active: Sequence[bool]) -> Tensor:
        """A new ``[S, 5]`` segment table: rows ``offset, numel, group, step, active``."""
        rows = [
            [off, n, grp, st, int(act)]
            for off, n, grp, st, act in zip(self.offsets, self.numels, self.groups, steps, active)
        ]
        table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(SegmentColumn))
        return table if self.device.type == "cpu" else table.to(self.device, non_blocking=True)


class _Flatten(torch.autograd.Function):
    """Concatenate tensors (``None``: zeros) into one flat buffer, in one autograd node."""

    @staticmethod
    def forward(ctx: Any, bucket: Bucket, *tensors: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.bucket = bucket
        ctx.present = [t is not None for t in tensors]
        parts = [t.reshape(-1) if t is not None else
                 torch.zeros(n, dtype=bucket.dtype, device=bucket.device)
                 for t, n in zip(tensors, bucket.numels)]
        if not parts:
            return torch.empty(0, dtype=bucket.dtype, device=bucket.device)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        b: Bucket = ctx.bucket
        parts = grad.split(b.numels) if b.numels else []
        return (None,) + tuple(
            part.view(shape) if present else None
            for part, shape, present in zip(parts, b.shapes, ctx.present)
        )


class _Views(torch.autograd.Function):
    """Split a flat buffer into shaped views, in one autograd node."""

    @staticmethod
    def forward(ctx: Any, bucket: Bucket, flat: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.bucket = bucket
        ctx.set_materialize_grads(False)
        return tuple(part.view(shape) for part, shape in zip(flat.split(bucket.numels),
                                                              bucket.shapes))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[None, Tensor]:  # type: ignore[override]
        b: Bucket = ctx.bucket
        ref = next((g for g in grads if g is not None), None)
        if ref is None:
            return None, None
        return None, _Flatten.apply(b, *[None if g is None else g.to(ref.dtype) for g in grads])


@dataclass
class FlatState:
    """What a flat optimiser carries from one step to the next, for all its buckets.

    Per bucket: the flat weights (the buffer the last step's views are views of) and the
    state buffers by name. Per parameter (the optimiser's order): its step count, whether
    it has state yet, the dtype its step had as a tensor (a torch optimiser's state), the
    view the last step returned, and its (bucket, position). Segment tables are the
    buckets' (:meth:`Bucket.segments`).
    """

    buckets: list[Bucket]
    weights: list[Tensor | None]
    buffers: list[dict[str, Tensor]]
    steps: list[int]
    has_state: list[bool]
    step_dtypes: list[torch.dtype | None]
    last_views: list[Tensor | None]
    where: list[tuple[int, int]]
    #: The names of the state buffers, in the op's order.
    state_names: tuple[str, ...]
    #: Buckets (by position) whose buffers only this state holds, made by a first-order
    #: step: the next one may update them in place.
    private: set[int] = field(default_factory=set)
    #: Never update the buffers in place (loft.unroll's copy: its checkpoints hold them).
    keep_buffers: bool = False

    @classmethod
    def empty(cls, buckets: list[Bucket], num_params: int,
              state_names: Sequence[str]) -> FlatState:
        """No weights, buffers or steps yet, for ``num_params`` parameters in ``buckets``."""
        where = [(-1, -1)] * num_params
        for k, b in enumerate(buckets):
            for pos, i in enumerate(b.indices):
                where[i] = (k, pos)
        return cls(buckets, [None] * len(buckets), [{} for _ in buckets], [0] * num_params,
                   [False] * num_params, [None] * num_params, [None] * num_params, where,
                   tuple(state_names))

    def intact(self, k: int, params: Sequence[Tensor]) -> bool:
        """Whether bucket ``k``'s ``params`` are the views the last step returned (so its
        flat weights can be handed to the kernel as they are)."""
        last, indices = self.last_views, self.buckets[k].indices
        return all(map(operator.is_, [params[i] for i in indices], [last[i] for i in indices]))

    def snapshot(self) -> FlatState:
        """A copy of the lists and dicts (the tensors are shared): :meth:`restore` returns to it."""
        return FlatState(self.buckets, list(self.weights), [dict(b) for b in self.buffers],
                         list(self.steps), list(self.has_state), list(self.step_dtypes),
                         list(self.last_views), self.where, self.state_names, set(self.private),
                         self.keep_buffers)

    def restore(self, snapshot: FlatState) -> None:
        """Return to ``snapshot`` (made by :meth:`snapshot` of this state)."""
        self.weights, self.buffers = list(snapshot.weights), [dict(b) for b in snapshot.buffers]
        self.steps, self.has_state = list(snapshot.steps), list(snapshot.has_state)
        self.step_dtypes, self.last_views = list(snapshot.step_dtypes), list(snapshot.last_views)
        self.private, self.keep_buffers = set(snapshot.private), snapshot.keep_buffers

    def flats(self) -> list[Tensor]:
        """The flat weights of every bucket, then its state buffers, bucket by bucket."""
        return list(self.weights) + [  # type: ignore[arg-type]
            buffers[name] for buffers in self.buffers for name in self.state_names]

    def set_flats(self, flats: Sequence[Tensor]) -> None:
        """Make ``flats`` (as :meth:`flats` lays them out) the flat weights and buffers."""
        nb, names = len(self.buckets), self.state_names
        self.weights = list(flats[:nb])
        self.buffers = [{name: flats[nb + k * len(names) + j] for j, name in enumerate(names)}
                        for k in range(nb)]

    def load(self, flats: Sequence[Tensor], steps: Sequence[int],
             fast: list[Tensor]) -> list[Tensor]:
        """:meth:`set_flats`, and ``steps`` as the step counts; ``fast`` (the fast weights)
        gets the new weights' views and is returned. The views are the last step's, so the
        next step reads the flat weights directly."""
        self.set_flats(flats)
        for b, base in zip(self.buckets, self.weights):
            for (off, n, shape), i in zip(zip(b.offsets, b.numels, b.shapes), b.indices):
                fast[i] = base[off:off + n].view(shape)  # type: ignore[index]
        self.steps = list(steps)
        self.last_views = list(fast)
        return fast


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides torch gives a contiguous tensor of ``shape``."""
    return tuple(torch.empty(shape, device="meta").stride())


#: :func:`make_buckets`' buckets by layout (the parameters' devices, dtypes, shapes and
#: groups), so that every inner loop over one model shares them and their cached tables,
#: views and scratch buffers (a meta-batch enters a context per task). Bounded: the
#: oldest layout is dropped first.
_BUCKETS: dict[tuple[Any, ...], list[Bucket]] = {}
_BUCKETS_KEPT = 64


def make_buckets(params: Sequence[Tensor], groups: Sequence[int | None]) -> list[Bucket]:
    """Group the parameters that belong to an optimiser group by (device, dtype).

    Parameters whose group is ``None`` (not handled by the optimiser) are left out. One
    layout gets the same buckets every time (they hold caches only, no state).
    """
    key = tuple((p.device, p.dtype, p.shape, g) for p, g in zip(params, groups))
    buckets = _BUCKETS.get(key)
    if buckets is None:
        buckets = _new_buckets(params, groups)
        if len(_BUCKETS) >= _BUCKETS_KEPT:
            del _BUCKETS[next(iter(_BUCKETS))]
        _BUCKETS[key] = buckets
    return list(buckets)


def _new_buckets(params: Sequence[Tensor], groups: Sequence[int | None]) -> list[Bucket]:
    by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (p, grp) in enumerate(zip(params, groups)):
        if grp is None:
            continue
        if not p.is_floating_point():
            raise TypeError(f"loft optimisers need floating-point parameters, got {p.dtype} "
                            f"for parameter {i}")
        by_key.setdefault((p.device, p.dtype), []).append(i)
    return [
        Bucket(device, dtype, idx, [params[i].shape for i in idx], [int(groups[i]) for i in idx])
        for (device, dtype), idx in by_key.items()
    ]


def hyper_tensor(values: Sequence[float | Tensor], dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """A ``[G]`` tensor of one hyperparameter over the groups (differentiable in tensors)."""
    if not any(isinstance(v, Tensor) for v in values):
        return torch.tensor([float(v) for v in values], dtype=dtype, device=device)
    parts: list[Tensor] = []
    numbers: list[float] = []  # the run of numbers since the last tensor: one tensor each run
    for v in values:
        if isinstance(v, Tensor):
            if v.numel() != 1:
                raise ValueError(f"a tensor hyperparameter must hold one value, got shape "
                                 f"{list(v.shape)}")
            if numbers:
                parts.append(torch.tensor(numbers, dtype=dtype, device=device))
                numbers = []
            parts.append(v.reshape(1).to(device=device, dtype=dtype))
        else:
            numbers.append(float(v))
    if numbers:
        parts.append(torch.tensor(numbers, dtype=dtype, device=device))
    return torch.cat(parts) if len(parts) > 1 else parts[0]
