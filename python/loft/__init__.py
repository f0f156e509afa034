"""loft: fast, exact, differentiable inner loops for PyTorch.

A drop-in replacement for ``higher`` (``import loft as higher``) whose SGD, Adam and
AdamW steps run as one fused, twice-differentiable op per bucket of parameters.

.. code-block:: python

    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x, y in support:
            diffopt.step(loss_fn(fmodel(x), y))
        loss_fn(fmodel(xq), yq).backward()   # meta-gradients through every step
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from loft import distributed, optim, patch, utils
from loft._ext import backend, backend_reason
from loft.optim import (
    DifferentiableOptimizer,
    apply_trainable_opt_params,
    create_diff_optim,
    get_diff_optim,
    get_trainable_opt_params,
    register_optim,
)
from loft.patch import monkeypatch
from loft.unroll import unroll

__version__ = "0.1.0"

__all__ = [
    "innerloop_ctx",
    "monkeypatch",
    "unroll",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
    "DifferentiableOptimizer",
    "backend",
    "backend_reason",
    "distributed",
    "optim",
    "patch",
    "utils",
]


@contextlib.contextmanager
def innerloop_ctx(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: dict[str, Any] | None = None,
    track_higher_grads: bool = True,
    first_order: bool = False,
    tasks: int | None = None,
) -> Iterator[tuple[patch.FunctionalModule, DifferentiableOptimizer]]:
    """A patched model and its differentiable optimiser (higher's ``innerloop_ctx``).

    Yields ``(fmodel, diffopt)``: ``fmodel = monkeypatch(model, ...)`` and
    ``diffopt = get_diff_optim(opt, model.parameters(), fmodel=fmodel, ...)``. Each
    ``diffopt.step(loss)`` appends the new fast weights to ``fmodel``'s history.
    ``first_order=True`` treats the inner gradients as constants (first-order MAML).

    ``tasks=N`` (a loft extension) runs a meta-batch of ``N`` inner loops as one: fast
    weights and buffers are ``[N, *shape]`` (every task starts from ``model``'s),
    ``fmodel(x)`` maps ``[N, ...]`` inputs to ``[N, ...]`` outputs, task by task, and
    ``diffopt.step(losses)`` takes the ``[N]`` per-task losses (or their sum: a mean
    would scale every task's step by ``1/N``). Meta-gradients sum over the tasks, as
    ``N`` sequential contexts accumulate them.
    """
    fmodel = monkeypatch(model, device, copy_initial_weights=copy_initial_weights,
                         track_higher_grads=track_higher_grads, tasks=tasks)
    diffopt = get_diff_optim(opt, model.parameters(), fmodel=fmodel, device=device,
                             override=override, track_higher_grads=track_higher_grads,
                             first_order=first_order)
    yield fmodel, diffopt
