"""The meta-training runs the multi-process tests compare: each rank's tasks through a
``DistributedDataParallel`` model (in the spawned workers), and the same tasks in one
process without DDP (the reference: the mean over ranks of each rank's sum of task
meta-gradients). float64 throughout."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import loft

#: Steps of every inner loop.
STEPS = 3


@dataclass(frozen=True)
class Scenario:
    """One meta-iteration setting."""

    opt: str = "momentum"  # "momentum" (SGD) or "adam"
    tasks: tuple[int, ...] = (1,)  # tasks per rank, cycled over the ranks
    no_sync: bool = False  # all but each rank's last task inside ddp.no_sync()
    batched: bool = False  # a rank's tasks as one innerloop_ctx(..., tasks=n)
    learned_lr: bool = False  # a leaf lr in override, averaged by average_gradients
    first_order: bool = False
    checkpoint: bool = False  # loft.unroll(..., checkpoint_every=2)
    find_unused: bool = False  # DistributedDataParallel(..., find_unused_parameters=True)

    def tasks_of(self, rank: int) -> int:
        return self.tasks[rank % len(self.tasks)]


SCENARIOS: dict[str, Scenario] = {
    "momentum": Scenario(),
    "adam": Scenario(opt="adam"),
    "no_sync": Scenario(tasks=(2,), no_sync=True),
    "uneven": Scenario(tasks=(1, 3, 2), no_sync=True),
    "batched": Scenario(tasks=(2, 3), batched=True),
    "learned_lr": Scenario(learned_lr=True, tasks=(2,), no_sync=True),
    "first_order": Scenario(first_order=True),
    "checkpointed": Scenario(opt="adam", checkpoint=True),
    "find_unused": Scenario(tasks=(2,), no_sync=True, find_unused=True),
}


def make_model() -> nn.Module:
    """The same seeded MLP on every rank."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def task_data(rank: int, task: int) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    """Task ``task`` of rank ``rank``: support batches (one per step) and a query batch."""
    gen = torch.Generator().manual_seed(1000 * rank + task)

    def batch() -> tuple[Tensor, Tensor]:
        return (torch.randn(4, 3, generator=gen, dtype=torch.float64),
                torch.randn(4, 2, generator=gen, dtype=torch.float64))

    return [batch() for _ in range(STEPS)], batch()


def _inner_opt(s: Scenario, model: nn.Module) -> torch.optim.Optimizer:
    if s.opt == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.05)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    """Per-task mean squared error: ``[N]`` for batched outputs, a scalar otherwise."""
    return (out - y).square().flatten(-2).mean(-1)


def meta_iteration(s: Scenario, model: nn.Module, rank: int,
                   lr: Tensor | None) -> None:
    """Rank ``rank``'s tasks: each inner loop and its meta-backward (``model``: the DDP
    model in a worker, the plain model in the reference)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = _inner_opt(s, inner)
    override = {"lr": [lr]} if lr is not None else None
    count = s.tasks_of(rank)
    data = [task_data(rank, t) for t in range(count)]
    groups = [list(range(count))] if s.batched else [[t] for t in range(count)]
    for k, group in enumerate(groups):
        last = k == len(groups) - 1
        quiet = s.no_sync and not last and isinstance(model, nn.parallel.DistributedDataParallel)
        with model.no_sync() if quiet else contextlib.nullcontext():  # type: ignore[operator]
            _one_context(s, model, opt, override, [data[t] for t in group])


def _one_context(s: Scenario, model: nn.Module, opt: torch.optim.Optimizer,
                 override: Any, data: list[Any]) -> None:
    n = len(data) if s.batched else None
    with loft.innerloop_ctx(model, opt, copy_initial_weights=False, override=override,
                            first_order=s.first_order, tasks=n) as (fmodel, diffopt):
        def stack(k: int, which: int) -> Tensor:
            parts = [d[0][k][which] for d in data]
            return torch.stack(parts) if n is not None else parts[0]

        batches = [(stack(k, 0), stack(k, 1)) for k in range(STEPS)]
        if s.checkpoint:
            loft.unroll(fmodel, diffopt, lambda f, b: _mse(f(b[0]), b[1]), batches,
                        checkpoint_every=2)
        else:
            for x, y in batches:
                diffopt.step(_mse(fmodel(x), y))
        xq = torch.stack([d[1][0] for d in data]) if n is not None else data[0][1][0]
        yq = torch.stack([d[1][1] for d in data]) if n is not None else data[0][1][1]
        _mse(fmodel(xq), yq).sum().backward()


def gradients(model: nn.Module, lr: Tensor | None) -> list[Tensor]:
    """The meta-gradients after an iteration: the model's, then the learned lr's."""
    grads = [p.grad.clone() for p in model.parameters()]
    return grads + ([lr.grad.clone()] if lr is not None else [])


def new_lr(s: Scenario) -> Tensor | None:
    return torch.tensor(0.1 if s.opt == "momentum" else 0.05, dtype=torch.float64,
                        requires_grad=True) if s.learned_lr else None


def reference(name: str, world: int) -> list[Tensor]:
    """One process: the mean over ranks of each rank's sum of task meta-gradients."""
    s = SCENARIOS[name]
    total: list[Tensor] | None = None
    for rank in range(world):
        model, lr = make_model(), new_lr(s)
        meta_iteration(s, model, rank, lr)
        grads = gradients(model, lr)
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    assert total is not None
    return [g / world for g in total]
