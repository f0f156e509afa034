"""The private helpers and type aliases of ``higher.optim`` that programs import.

Published code reaches into higher's module (``from higher.optim import _add,
_OverrideType, _GradCallbackType``); :mod:`loft.optim` re-exports these so that
``import loft as higher`` keeps it running. Each behaves as higher's does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor

__all__ = [
    "_GroupedGradsType",
    "_StateType",
    "_GradClosureType",
    "_OverrideType",
    "_GradCallbackType",
    "_add",
    "_addcdiv",
    "_addcmul",
    "_get_mask_closure",
    "_maybe_mask",
    "_recursive_apply",
]

#: Per param group, the gradients of its tensors (higher's ``_update`` argument).
_GroupedGradsType = list[list[Tensor]]
#: higher's ``diffopt.state``: per param group, a dict from index to the tensor's state.
_StateType = list[defaultdict[int, Any]]
#: A gradient hook: gradient in, gradient out.
_GradClosureType = Callable[[Tensor], Tensor]
#: ``override``: a hyperparameter name to one value or one value per param group.
_OverrideType = dict[str, list[Any]]
#: ``grad_callback``: the list of gradients in, the list of gradients out.
_GradCallbackType = Callable[[list[Tensor]], list[Tensor]]

_Number = Union[float, int, Tensor]


def _add(tensor: Tensor, a1: _Number, a2: Tensor | None = None) -> Tensor:
    """``tensor + a1`` or, with ``a2``, ``tensor + a1 * a2`` (higher's out-of-place
    ``Tensor.add(value, other)``)."""
    value, other = (1.0, a1) if a2 is None else (a1, a2)
    return tensor + (value * other)


def _addcdiv(tensor: Tensor, a1: _Number | Tensor, a2: Tensor,
             a3: Tensor | None = None) -> Tensor:
    """``tensor + a1 / a2`` or, with ``a3``, ``tensor + a1 * (a2 / a3)`` (higher's
    out-of-place ``addcdiv``)."""
    value, t1, t2 = (1.0, a1, a2) if a3 is None else (a1, a2, a3)
    return tensor + value * (t1 / t2)


def _addcmul(tensor: Tensor, a1: _Number | Tensor, a2: Tensor,
             a3: Tensor | None = None) -> Tensor:
    """``tensor + a1 * a2`` or, with ``a3``, ``tensor + a1 * a2 * a3`` (higher's
    out-of-place ``addcmul``)."""
    value, t1, t2 = (1.0, a1, a2) if a3 is None else (a1, a2, a3)
    return tensor + (value * t1 * t2)


def _get_mask_closure(mask: Tensor) -> _GradClosureType:
    """A gradient hook that zeroes the gradient where ``mask`` is true, and registers
    itself again on a gradient that requires grad (so higher orders are masked too)."""

    def closure(grad: Tensor) -> Tensor:
        grad = torch.where(mask, torch.zeros_like(grad), grad)
        if grad.requires_grad:
            grad.register_hook(_get_mask_closure(mask))
        return grad

    return closure


def _maybe_mask(tensor: Tensor, mask: Tensor) -> None:
    """Zero ``tensor``'s gradient where ``mask`` is true (if it requires grad): higher's
    guard against ``sqrt``'s infinite derivative at 0."""
    if tensor.requires_grad:
        tensor.register_hook(_get_mask_closure(mask))


def _is_container(value: Any) -> bool:
    return isinstance(value, (list, tuple, dict, set))


def _recursive_apply(replacement: Any, target: Any) -> Any:
    """``replacement``'s values in ``target``'s structure and types (higher's helper of
    ``apply_trainable_opt_params``): a tensor replacing a number becomes a number of the
    number's type; a tensor replacing a tensor takes its data (moved to the target's
    device) in place; containers are matched element by element. Raises ``ValueError``
    for a replacement that does not fit the target."""
    if not isinstance(replacement, type(target)):
        if isinstance(replacement, Tensor) and not _is_container(target):
            return type(target)(replacement.item())
        raise ValueError(f"Expected a non-container type for target, but got "
                         f"{type(target)} with value {target}")
    if isinstance(replacement, Tensor) and isinstance(target, Tensor):
        target.data = replacement.to(target.device).data
        return target
    if isinstance(target, (list, tuple)):
        return type(target)([_recursive_apply(r, t) for r, t in zip(replacement, target)])
    if isinstance(replacement, dict) and isinstance(target, dict):
        return type(target)({key: _recursive_apply(r, t)
                             for (_, r), (key, t) in zip(replacement.items(), target.items())})
    if isinstance(target, set):
        return type(target)({_recursive_apply(r, t) for r, t in zip(replacement, target)})
    raise ValueError(f"Couldn't apply replacement of type {type(replacement)} to target of "
                     f"type {type(target)}")
