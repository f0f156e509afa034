"""Meta-training across processes: ``DistributedDataParallel`` models in inner loops, and
the averaging of learned hyperparameters' meta-gradients.

``loft.innerloop_ctx(ddp_model, opt, copy_initial_weights=False, ...)`` patches
``ddp_model.module`` and makes entering the context what DDP calls a forward pass:

1. ``ddp_model._pre_forward()``: DDP's own bookkeeping, buffers broadcast from rank 0
   (``broadcast_buffers=True``), the reducer readied;
2. the initial fast weights are made from the parameters (clones: the meta-gradient
   reaches the parameters through them);
3. ``ddp_model._post_forward(initial fast weights)``: the reducer is prepared for the
   next backward (with ``find_unused_parameters=True`` it finds the parameters through
   the fast weights, and a parameter whose fast weights get no gradient is handled as
   DDP handles an unused output).

The next backward that reaches the parameters (the meta-backward) then averages their
``.grad`` across ranks through DDP's reducer: in buckets, each all-reduced as soon as it
is ready, with DDP's bucket sizes and any communication hook registered on it. (A
meta-gradient is complete only when the meta-backward reaches the initial fast weights,
the graph's first nodes: every bucket becomes ready at the end, so the all-reduce runs
after the meta-backward rather than during it; see docs/distributed.md.) Inside
``ddp_model.no_sync()`` (entered before the context) no reduction is prepared: the
meta-gradients accumulate locally and the next synchronised meta-backward averages all of
them, as in ordinary training.

What DDP averages is ``(1 / world size) * sum over ranks of each rank's .grad``: with a
different number of tasks per rank, each task weighs ``1 / world size`` of its rank's
sum; scale each rank's meta-loss to weigh tasks otherwise (for example by
``world_size / total tasks`` for the mean over all tasks).

A tensor hyperparameter that is learned (a leaf that requires grad: an inner lr given
through ``override``) is not a parameter of the module, so DDP does not average it:
:func:`average_gradients` does, once its meta-backward is done.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["average_gradients", "check_replicas"]


def _ddp_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    return nn.parallel.DistributedDataParallel


def is_ddp(module: Any) -> bool:
    """Whether ``module`` is a ``DistributedDataParallel`` wrapper."""
    cls = _ddp_class()
    return cls is not None and isinstance(module, cls)


def _require_process_group(where: str, group: Any = None) -> None:
    """A ``RuntimeError`` unless the default (or ``group``'s) process group is usable."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{where}: the default process group is not initialised: call "
            f"torch.distributed.init_process_group(...) first (torchrun sets the "
            f"environment it reads), in every process")


#: DDP models whose replicas :func:`check_replicas` has compared (once per model).
_CHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def check_replicas(module: nn.Module, group: Any = None) -> None:
    """Raise ``ValueError`` unless every rank holds the same parameters as rank 0.

    One all-reduce of two float64 numbers per parameter (its sum and its sum of
    squares), compared by their minimum and maximum over the ranks: cheap, run once per
    DDP model when it first enters an inner loop (DDP itself broadcasts rank 0's
    parameters when it is built; this catches a change made after that on some ranks).
    """
    _require_process_group("check_replicas", group)
    params = list(module.parameters())
    if not params:
        return
    device = params[0].device
    with torch.no_grad():
        fingerprint = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                                   for p in params]).flatten().to(device)
        low, high = fingerprint.clone(), fingerprint.clone()
        dist = torch.distributed
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    differs = (low != high).view(-1, 2).any(dim=1)
    if bool(differs.any()):
        names = [name for (name, _), bad in zip(module.named_parameters(), differs.tolist())
                 if bad]
        raise ValueError(
            f"the model's parameters differ across ranks ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}): every rank must start the meta-"
            f"iteration from the same weights. Build the model identically on every rank "
            f"(same seed) before wrapping it in DistributedDataParallel, which broadcasts "
            f"rank 0's weights, and change them only through the meta-optimiser")


def begin_forward(ddp: nn.Module) -> None:
    """DDP's pre-forward for an inner loop about to start (see the module docstring)."""
    _require_process_group("innerloop_ctx with a DistributedDataParallel model")
    if ddp not in _CHECKED:
        check_replicas(ddp.module, ddp.process_group)
        _CHECKED.add(ddp)
    ddp._pre_forward()


def end_forward(ddp: nn.Module, initial: list[Tensor]) -> list[Tensor]:
    """DDP's post-forward, with the initial fast weights as the forward's output; returns
    them as DDP hands them on (through its unused-output node where it uses one)."""
    out = ddp._post_forward(list(initial))
    return list(out)


def average_gradients(tensors: Iterable[Tensor], group: Any = None) -> None:
    """Average ``.grad`` of each tensor across the ranks of ``group`` (default: the world),
    in place: ``grad = (sum over ranks of grad) / world size``, as DDP averages the
    model's. For learned hyperparameters (an inner lr), which DDP does not see; call it
    after the meta-backward and before the meta-optimiser's step. A tensor without a
    gradient on this rank counts as zeros (the all-reduce needs every rank's tensor)."""
    _require_process_group("loft.distributed.average_gradients", group)
    dist = torch.distributed
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"average_gradients: tensors[{i}] must be a tensor, got "
                            f"{type(t).__name__}")
        if not t.requires_grad:
            raise ValueError(f"average_gradients: tensors[{i}] does not require grad, so it "
                             f"has no meta-gradient to average")
    world = dist.get_world_size(group)
    kinds: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:  # one all-reduce per dtype and device
        kinds.setdefault((t.dtype, t.device), []).append(t)
    for same in kinds.values():
        flat = torch.cat([(t.grad if t.grad is not None else torch.zeros_like(t)).reshape(-1)
                          for t in same])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for t in same:
            t.grad = flat[offset:offset + t.numel()].view_as(t).clone()
            offset += t.numel()
