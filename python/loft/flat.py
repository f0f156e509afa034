"""Buckets, segment tables and views: the flat layout the fused ops work on.

A **bucket** holds the trainable parameters that share a (device, dtype). For each
quantity (weights, gradient, optimiser state) it keeps one contiguous buffer of all its
parameters, concatenated in order; a parameter at step *t* is a view into the bucket's
buffer at step *t*. The **segment table** has one row per parameter tensor:
``offset, numel, group, step, active`` (``docs/ops.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Bucket", "make_buckets", "hyper_tensor"]


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

    def __post_init__(self) -> None:
        self.numels = [int(torch.Size(s).numel()) for s in self.shapes]
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.numel = total

    def flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """One flat buffer of ``tensors`` (``None`` entries become zeros); differentiable."""
        parts = []
        for t, n in zip(tensors, self.numels):
            if t is None:
                parts.append(torch.zeros(n, dtype=self.dtype, device=self.device))
            else:
                parts.append(t.reshape(-1).to(device=self.device, dtype=self.dtype))
        if not parts:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def views(self, flat: Tensor) -> list[Tensor]:
        """The parameters as views into ``flat``, with their original shapes."""
        if not self.numels:
            return []
        return [part.view(shape) for part, shape in zip(flat.split(self.numels), self.shapes)]

    def segments(self, steps: Sequence[int], active: Sequence[bool]) -> Tensor:
        """The ``[S, 5]`` int64 segment table for one step."""
        rows = [
            [off, n, grp, st, int(act)]
            for off, n, grp, st, act in zip(self.offsets, self.numels, self.groups, steps, active)
        ]
        table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 5)
        return table if self.device.type == "cpu" else table.to(self.device, non_blocking=True)


def make_buckets(params: Sequence[Tensor], groups: Sequence[int | None]) -> list[Bucket]:
    """Group the parameters that belong to an optimiser group by (device, dtype).

    Parameters whose group is ``None`` (not handled by the optimiser) are left out.
    """
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
    parts = []
    for v in values:
        if isinstance(v, Tensor):
            if v.numel() != 1:
                raise ValueError(f"a tensor hyperparameter must hold one value, got shape "
                                 f"{list(v.shape)}")
            parts.append(v.reshape(()).to(device=device, dtype=dtype))
        else:
            parts.append(torch.tensor(float(v), dtype=dtype, device=device))
    return torch.stack(parts)
