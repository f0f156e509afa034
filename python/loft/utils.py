"""higher's ``higher.utils``: every helper of higher 0.2.1 and of higher's HEAD, with
higher's signatures and behaviour (user code reaches for the private ones too)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["get_func_params", "flatten"]

_T = TypeVar("_T")
_U = TypeVar("_U")


def _copy_tensor(t: Tensor, safe_copy: bool, device: torch.device | str | None = None) -> Tensor:
    """A detached tensor keeping ``t.requires_grad``: a new copy when ``safe_copy``,
    else sharing ``t``'s memory; moved to ``device`` if given (higher's ``_copy_tensor``)."""
    out = t.detach().clone() if safe_copy else t.detach()
    out = out.requires_grad_(t.requires_grad)
    return out if device is None else out.to(device)


def _recursive_detach(target: Any) -> Any:
    """Detach every tensor in nested lists, tuples and dicts (dicts come back as plain
    dicts; sets and other objects as they are); higher HEAD's ``_recursive_detach``."""
    if isinstance(target, Tensor):
        return target.detach()
    if isinstance(target, dict):
        return {k: _recursive_detach(v) for k, v in target.items()}
    if isinstance(target, list):
        return [_recursive_detach(v) for v in target]
    if isinstance(target, tuple):
        return tuple(_recursive_detach(v) for v in target)
    return target


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """Apply ``map_fn`` to every leaf of nested lists, tuples, dicts and sets, keeping
    the container types (higher's ``_recursive_map``)."""
    if isinstance(target, (list, tuple)):
        return type(target)([_recursive_map(x, map_fn) for x in target])
    if isinstance(target, dict):
        return type(target)({k: _recursive_map(v, map_fn) for k, v in target.items()})
    if isinstance(target, set):
        return type(target)({_recursive_map(x, map_fn) for x in target})
    return map_fn(target)


def _recursive_copy_and_cast(target: Any, device: torch.device | str | None) -> Any:
    """Copy every tensor in a nested structure, detached, to ``device`` (higher's
    ``_recursive_copy_and_cast``)."""
    return _recursive_map(
        target, lambda x: _copy_tensor(x, True, device) if isinstance(x, Tensor) else x
    )


def _is_container(target: Any) -> bool:
    """Whether ``target`` is a list, tuple, dict or set (higher's ``_is_container``)."""
    return isinstance(target, (list, tuple, dict, set))


def _find_param_in_list(param: Tensor, params: Iterable[Tensor]) -> int | None:
    """The index of ``param`` in ``params`` by identity (not by value), or ``None``
    (higher's ``_find_param_in_list``)."""
    for i, p in enumerate(params):
        if p is param:
            return i
    return None


def _get_param_mapping(module: torch.nn.Module, seen: list[Tensor],
                       mapping: list[int]) -> list[int]:
    """For every parameter slot of ``module`` (depth first, tied slots repeated), the
    index of its tensor among the distinct tensors met so far (``seen``); higher's
    ``_get_param_mapping`` (which fails on a ``None`` child; loft skips it)."""
    for param in module._parameters.values():
        if param is None:
            continue
        found = _find_param_in_list(param, seen)
        if found is None:
            mapping.append(len(seen))
            seen.append(param)
        else:
            mapping.append(found)
    for child in module._modules.values():
        if child is not None:
            _get_param_mapping(child, seen, mapping)
    return mapping


def flatten(x: Any) -> list[Any]:
    """The leaves of a nested structure of dicts (values), lists, tuples and sets
    (higher's ``flatten``)."""
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in flatten(v)]
    if isinstance(x, (list, tuple, set)):
        return [leaf for v in x for leaf in flatten(v)]
    return [x]


def get_func_params(module: torch.nn.Module, device: torch.device | str | None = None,
                    safe_copy: bool = True) -> list[Tensor]:
    """Detached copies of ``module``'s parameters that keep their ``requires_grad``
    (higher's ``get_func_params``)."""
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]
