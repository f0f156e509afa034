"""Hyperparameters: a param group's values (numbers, one-value or per-element tensors) as tensors.

A hyperparameter is a number, a one-element tensor (``[G]``: one value per group) or a
tensor broadcastable to each parameter of its group (per element: Meta-SGD's learned lr
per weight, ``[N]`` over a bucket). :class:`HyperReader` builds a step's tensors and
keeps what has not changed; :class:`StepHyper` serves them to the unfused optimisers'
reference math.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from loft._contract import compute_dtype
from loft.flat import Bucket, hyper_tensor

__all__ = ["HyperReader", "StepHyper", "is_per_element", "check_broadcast", "scalar_tensor",
           "nonzero"]


def is_per_element(value: Any) -> bool:
    """A hyperparameter given per element: a tensor of more than one value."""
    return isinstance(value, Tensor) and value.numel() != 1


def broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (and only to it)."""
    if len(shape) > len(target):
        return False
    return all(s == t or s == 1 for s, t in zip(reversed(shape), reversed(target)))


def check_broadcast(where: str, index: int, value: Tensor, shape: torch.Size) -> None:
    """A per-element hyperparameter (``where``: its key and group) must broadcast to the
    shape of each parameter of its group (parameter ``index`` has ``shape``)."""
    if not broadcasts_to(value.shape, shape):
        raise ValueError(
            f"{where} has shape {list(value.shape)}, which does not broadcast to the shape "
            f"{list(shape)} of parameter {index} of that group: a hyperparameter is a "
            "number, a one-element tensor or a tensor broadcastable to each parameter of "
            "its group")


def nonzero(value: Any) -> bool:
    """Whether a hyperparameter that switches a mode on (momentum) is nonzero anywhere."""
    return bool((value != 0).any()) if isinstance(value, Tensor) else value != 0


def scalar_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A per-tensor value (a number or a one-element tensor) as a 0-d tensor."""
    if isinstance(value, Tensor):
        return value.reshape(()).to(device=device, dtype=dtype)
    return torch.tensor(float(value), dtype=dtype, device=device)


#: A step's hyperparameters: ``[G]`` tensors by name, the ``[G]`` int64 group flags, and
#: ``[N]`` per-element tensors by name (only those some group gives per element).
Hyper = tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]


class HyperReader:
    """Reads an optimiser's hyperparameters for a step.

    Args:
        names: the hyperparameters, in the op's order.
        keys: how a name is spelled in a param group where that differs (``beta1`` is
            ``betas[0]``), for error messages.
        position: parameter i's ``(group, index in group)``.
        dtype: the ``[G]`` tensors' dtype for a bucket's dtype.
    """

    def __init__(self, names: Sequence[str], keys: dict[str, str],
                 position: dict[int, tuple[int, int]],
                 dtype: Callable[[torch.dtype], torch.dtype]) -> None:
        self.names, self.keys, self.position, self.dtype = tuple(names), keys, position, dtype
        #: The last all-number setting's tensors: ``{key: ([G] by name, flags)}``.
        self._group_cache: dict[Any, tuple[dict[str, Tensor], Tensor]] = {}
        #: ``(id(bucket), name) -> (key of the values, [N] tensor)``.
        self._elementwise_cache: dict[tuple[int, str], tuple[tuple[Any, ...], Tensor]] = {}

    def for_bucket(self, b: Bucket, per_group: list[dict[str, Any]], flags: list[int]) -> Hyper:
        """Bucket ``b``'s tensors for this step (``per_group``: each group's values by name).

        ``[G]`` tensors are built anew whenever a group holds a tensor (it may require
        grad); all-number settings are kept until they change.
        """
        values = {name: [h[name] for h in per_group] for name in self.names}
        tensors = {name for name, vs in values.items() if any(isinstance(v, Tensor) for v in vs)}
        key = None if tensors else (b.device, b.dtype, tuple(flags),
                                    tuple(tuple(vs) for vs in values.values()))
        if key is not None and key in self._group_cache:
            return (*self._group_cache[key], {})
        per_element = [name for name in tensors if any(map(is_per_element, values[name]))]
        dtype = self.dtype(b.dtype)
        hyper = {name: hyper_tensor([0.0 if is_per_element(v) else v for v in vs], dtype,
                                    b.device) if name in per_element else
                 hyper_tensor(vs, dtype, b.device)
                 for name, vs in values.items()}
        flag_tensor = torch.tensor(flags, dtype=torch.int64, device=b.device)
        if key is not None:
            self._group_cache.clear()
            self._group_cache[key] = (hyper, flag_tensor)
        ct = compute_dtype(b.dtype)
        return hyper, flag_tensor, {name: self._elementwise(b, name, values[name], ct)
                                    for name in per_element}

    def for_tensor(self, b: Bucket, values: dict[str, Any], g: int, j: int,
                   flags: list[int]) -> Hyper:
        """:meth:`for_bucket` for tensor ``j`` of group ``g`` alone (``b``: its one-tensor,
        one-group bucket; ``values``: its group's values by name)."""
        ct = compute_dtype(b.dtype)
        hyper, elementwise = {}, {}
        for name in self.names:
            v = values[name]
            if is_per_element(v):
                check_broadcast(f"param_groups[{g}][{self.key(name)!r}]", j, v, b.shapes[0])
                elementwise[name] = v.to(device=b.device, dtype=ct).broadcast_to(
                    b.shapes[0]).reshape(-1)
                v = 0.0
            hyper[name] = hyper_tensor([v], self.dtype(b.dtype), b.device)
        return hyper, torch.tensor(flags, dtype=torch.int64, device=b.device), elementwise

    def key(self, name: str) -> str:
        """How hyperparameter ``name`` is spelled in a param group."""
        return self.keys.get(name, name)

    def _elementwise(self, b: Bucket, name: str, group_values: list[Any],
                     dtype: torch.dtype) -> Tensor:
        """Hyperparameter ``name`` of every element of bucket ``b`` ([N]): a group's
        per-element tensor broadcast to each of its parameters, a group's number
        repeated. Kept while its tensors are unchanged (the same objects and versions):
        one node of the graph then serves every step."""
        key = (torch.is_grad_enabled(),) + tuple(
            (v, v._version) if isinstance(v, Tensor) else (v, None) for v in group_values)
        cached = self._elementwise_cache.get((id(b), name))
        if cached is not None and cached[0][0] == key[0] and len(cached[0]) == len(key) and all(
                a[0] is c[0] and a[1] == c[1] for a, c in zip(key[1:], cached[0][1:])):
            return cached[1]
        parts = []
        for pos, i in enumerate(b.indices):
            g, j = self.position[i]
            v, shape = group_values[g], b.shapes[pos]
            if is_per_element(v):
                if v.shape != shape:
                    check_broadcast(f"param_groups[{g}][{self.key(name)!r}]", j, v, shape)
                    v = v.broadcast_to(shape)
                parts.append(v.to(device=b.device, dtype=dtype).reshape(-1))
            elif isinstance(v, Tensor):
                parts.append(scalar_tensor(v, dtype, b.device).reshape(1).expand(b.numels[pos]))
            else:
                parts.append(torch.full((b.numels[pos],), float(v), dtype=dtype, device=b.device))
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=b.device)
        self._elementwise_cache[(id(b), name)] = (key, flat)
        return flat


class StepHyper:
    """A step's hyperparameters for the reference math: each one per group (``[G]``) or,
    where a group gave a tensor shaped like its parameters, per element (``[N]``)."""

    def __init__(self, hyper: dict[str, Tensor], elementwise: dict[str, Tensor],
                 layout: Any) -> None:
        self.hyper, self.elementwise, self.layout = hyper, elementwise, layout

    def __getitem__(self, name: str) -> Tensor:
        """Hyperparameter ``name`` of every element (the compute dtype)."""
        values = self.elementwise.get(name)
        return values if values is not None else self.hyper[name][self.layout.group]

    def per_element(self, *names: str) -> bool:
        """Whether any of ``names`` is given per element."""
        return any(name in self.elementwise for name in names)

    def scalars(self, name: str, per_element: bool) -> Tensor:
        """``name`` in float64 per segment (``[S]``), or per element with ``per_element``."""
        if per_element:
            return self[name].double()
        return self.hyper[name].double()[self.layout.seg_group]

    def steps(self, per_element: bool) -> Tensor:
        """Each tensor's step count after this update, float64, per segment or element."""
        t = self.layout.seg_t
        return self.layout.per_segment(t, torch.float64) if per_element else t

    def to_elements(self, values: Tensor, per_element: bool, ct: torch.dtype) -> Tensor:
        """Float64 values of :meth:`scalars`' layout, per element in ``ct``."""
        return values.to(ct) if per_element else self.layout.per_segment(values, ct)
