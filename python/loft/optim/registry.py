"""The registry (``torch.optim`` type -> differentiable optimiser) and higher's factories."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from loft import utils as _utils
from loft.optim import fused, unfused
from loft.optim.base import DifferentiableOptimizer, _Override

__all__ = ["register_optim", "get_diff_optim", "create_diff_optim", "get_trainable_opt_params",
           "apply_trainable_opt_params"]

_OptMappingType = dict[type, type[DifferentiableOptimizer]]
_OPT_MAPPING: _OptMappingType = {
    torch.optim.SGD: fused.DifferentiableSGD,
    torch.optim.Adam: fused.DifferentiableAdam,
    torch.optim.AdamW: fused.DifferentiableAdamW,
    torch.optim.Adagrad: unfused.DifferentiableAdagrad,
    torch.optim.Adadelta: unfused.DifferentiableAdadelta,
    torch.optim.Adamax: unfused.DifferentiableAdamax,
    torch.optim.ASGD: unfused.DifferentiableASGD,
    torch.optim.RMSprop: unfused.DifferentiableRMSprop,
    torch.optim.Rprop: unfused.DifferentiableRprop,
}


#: higher's name for the registry (the same dict).
_opt_mapping = _OPT_MAPPING


def register_optim(optim_type: type, diff_optim_type: type[DifferentiableOptimizer]) -> None:
    """Map a ``torch.optim`` type to a differentiable optimiser (higher's ``register_optim``)."""
    _OPT_MAPPING[optim_type] = diff_optim_type


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: _Override | None = None,
    track_higher_grads: bool = True,
    first_order: bool = False,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable version of ``opt`` (higher's ``get_diff_optim``).

    ``opt``'s type must be registered (SGD, Adam, AdamW built in; see
    :func:`register_optim`); its param groups and state are copied. ``first_order``:
    see :class:`DifferentiableOptimizer`.
    """
    opt_type = type(opt)
    if opt_type not in _OPT_MAPPING:
        name = f"{opt_type.__module__}.{opt_type.__qualname__}"
        # As higher: the exact type decides. A subclass may change step(), so loft cannot
        # assume that its parent's differentiable version computes the same update.
        parent = next((t for t in opt_type.__mro__[1:] if t in _OPT_MAPPING), None)
        hint = (f" It subclasses {parent.__module__}.{parent.__qualname__}: if its update is "
                f"the same, register it with loft.register_optim({opt_type.__name__}, "
                f"{_OPT_MAPPING[parent].__module__}.{_OPT_MAPPING[parent].__qualname__})."
                if parent is not None else
                " Use loft.register_optim(optim_type, diff_optim_type) to add one.")
        raise ValueError(
            f"Optimizer type {name} has no differentiable version in loft; supported: "
            f"{', '.join(sorted(t.__name__ for t in _OPT_MAPPING))}.{hint}"
        )
    return _OPT_MAPPING[opt_type](opt, reference_params, fmodel=fmodel, device=device,
                                  override=override, track_higher_grads=track_higher_grads,
                                  first_order=first_order, **kwargs)


def create_diff_optim(
    opt_type: type,
    opt_kwargs: dict[str, Any] | None = None,
    params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: _Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """Build a differentiable optimiser of ``opt_type`` directly (higher's ``create_diff_optim``).

    The optimiser is constructed on placeholder tensors shaped like ``params`` (or
    ``fmodel``'s parameters) with ``opt_kwargs``; ``params`` may also be param groups
    (dicts with the tensors under ``"params"`` and per-group settings), as a torch
    optimizer takes them.
    """
    opt_kwargs = {} if opt_kwargs is None else opt_kwargs
    if params is not None:
        params = list(params)
    elif fmodel is not None:
        params = list(fmodel.parameters())
    else:
        raise ValueError("Must specify one of fmodel or params in kwargs.")

    def placeholders(tensors: Any) -> list[Tensor]:
        tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        return [torch.zeros_like(p, requires_grad=True) for p in tensors]

    if params and isinstance(params[0], dict):
        # Param groups, as a torch optimizer takes them: each group's tensors get
        # placeholders, and the fast weights follow the groups' order.
        groups = [{**group, "params": placeholders(group["params"])} for group in params]
        dummies = [p for group in groups for p in group["params"]]
        opt = opt_type(groups, **opt_kwargs)
    else:
        dummies = placeholders(params)
        opt = opt_type(dummies, **opt_kwargs)
    return get_diff_optim(opt, dummies, fmodel=fmodel, device=device, override=override,
                          track_higher_grads=track_higher_grads, **kwargs)


def get_trainable_opt_params(opt: torch.optim.Optimizer,
                             device: torch.device | str | None = None) -> _Override:
    """An ``override`` dict of learnable tensors from ``opt``'s numeric hyperparameters
    (higher's ``get_trainable_opt_params``).

    Every group entry whose leaves are all ints or floats (``lr``, ``betas``, ...)
    becomes tensors that require grad, one list entry per group; tensors are cloned.
    """
    override: dict[str, list[Any]] = {}

    def to_leaf(x: Any) -> Tensor:
        if isinstance(x, Tensor):
            return x.detach().clone().requires_grad_()
        return torch.tensor(float(x), device=device, requires_grad=True)

    for group in opt.param_groups:
        for key, value in group.items():
            if key == "params":
                continue
            if all(isinstance(x, (int, float)) for x in _utils.flatten(value)):
                override.setdefault(key, []).append(_utils._recursive_map(value, to_leaf))
    return override


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: _Override) -> None:
    """Write learned hyperparameters back into ``opt``'s groups as plain numbers
    (higher's ``apply_trainable_opt_params``)."""
    for key, values in override.items():
        if len(values) not in (1, len(opt.param_groups)):
            raise ValueError(
                f"override[{key!r}] must hold 1 value or one per param group "
                f"({len(opt.param_groups)}), got {len(values)}"
            )
        for i, group in enumerate(opt.param_groups):
            replacement = values[0] if len(values) == 1 else values[i]
            group[key] = _apply_structure(replacement, group[key])


def _apply_structure(replacement: Any, target: Any) -> Any:
    """``replacement``'s values in ``target``'s structure and leaf types: a tensor
    replacing a number becomes a number of the same type (``bool``, ``int``, ``float``);
    a tensor replacing a tensor is copied into it."""
    if isinstance(target, Tensor) and isinstance(replacement, Tensor):
        with torch.no_grad():
            target.copy_(replacement.to(target.device))
        return target
    if isinstance(target, (list, tuple)):
        if not isinstance(replacement, (list, tuple)):
            raise ValueError(f"expected a {type(target).__name__} to replace {target!r}, got "
                             f"{type(replacement).__name__}")
        return type(target)(_apply_structure(r, t) for r, t in zip(replacement, target))
    if isinstance(target, dict):
        return {k: _apply_structure(replacement[k], v) for k, v in target.items()}
    if isinstance(replacement, Tensor):
        return type(target)(replacement.item())
    return replacement
