"""Arithmetic shared by the SGD and Adam reference steps, rounded as the kernels round."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from loft._contract import ELEMENTWISE_HYPER, OpContract

from ._layout import Layout

__all__ = ["add_scaled", "add_scaled_fused", "hyper_grads", "zeros_or"]


def zeros_or(t: Tensor, n: int, like: Tensor) -> Tensor:
    """An upstream gradient: 0 elements mean zero."""
    return t.to(like.dtype) if t.numel() == n and n > 0 else torch.zeros_like(like)


def add_scaled(y: Tensor, a: Tensor, x: Tensor) -> Tensor:
    """``y + a * x`` (the product rounded, as higher's ``g + weight_decay * p``), and
    exactly ``y`` where ``a == 0`` (torch.optim skips a zero weight decay, so an infinite
    or NaN ``x`` must not make ``y`` NaN through ``0 * x``), as the kernels'
    ``loft_add_scaled``. The derivative in ``a`` stays ``x`` where it is finite."""
    return y + a * torch.where((a == 0) & ~torch.isfinite(x), 0, x)


def add_scaled_fused(y: Tensor, a: Tensor, x: Tensor) -> Tensor:
    """:func:`add_scaled` rounded once (``torch.addcmul``, a fused multiply-add on the CPU),
    as torch.optim.Adam's ``grad.add(param, alpha=weight_decay)`` and the kernels'
    ``loft_add_scaled_fused``."""
    return torch.addcmul(y, a, torch.where((a == 0) & ~torch.isfinite(x), 0, x))


def _group_sum(values: Tensor, layout: Layout, mask: Tensor, hyper: Tensor) -> Tensor:
    """Sum ``values`` over the active elements of each group, in float64."""
    acc = torch.zeros(layout.num_groups, dtype=torch.float64, device=values.device)
    masked = torch.where(mask, values, 0).double()
    if layout.uniform:
        masked = masked.sum().reshape(1)
    acc = acc.index_add(0, layout.group, masked)
    return acc.to(hyper.dtype)


def _elementwise_grad(present: bool, wanted: bool, term, act: Tensor, like: Tensor) -> Tensor:
    """The gradient of a per-element hyperparameter: ``term()`` on the active elements and 0
    on the others, or 0 elements when the hyperparameter is absent or not wanted."""
    if not (present and wanted):
        return like.new_empty(0)
    return torch.where(act, term(), torch.zeros_like(like)).contiguous()


def hyper_grads(contract: OpContract, terms: Mapping[str, Callable[[], Tensor]],
                given: Mapping[str, bool], hyper_grad_mask: int, layout: Layout,
                lr: Tensor, p: Tensor) -> tuple[Tensor, ...]:
    """The backward's hyperparameter gradients, in schema order.

    One per ``contract.hyper`` (``[G]``: the sum of ``terms[name]()`` over each group's
    active elements where its bit of ``hyper_grad_mask`` is set, else zero; zero too when
    ``given[name]`` says it came per element), then one per :data:`ELEMENTWISE_HYPER`
    (``[N]``: :func:`_elementwise_grad` of the same term). ``lr`` and ``p`` give the
    ``[G]`` and ``[N]`` dtypes.
    """
    act = layout.active
    grads = []
    for name in contract.hyper:
        if given.get(name, False) or not hyper_grad_mask & contract.hyper_bit(name):
            grads.append(torch.zeros_like(lr))
        else:
            grads.append(_group_sum(terms[name](), layout, act, lr))
    for k, name in enumerate(ELEMENTWISE_HYPER):
        wanted = bool(hyper_grad_mask & contract.elementwise_bit(k))
        grads.append(_elementwise_grad(given[name], wanted, terms[name], act, p))
    return tuple(grads)
