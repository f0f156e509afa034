"""MAML on sine-wave regression (Finn et al., 2017), with loft's differentiable inner loop.

Each task is a sine wave ``y = A sin(x - phase)`` with the amplitude ``A`` drawn from
[0.1, 5] and the phase from [0, pi]; inputs ``x`` are drawn from [-5, 5]. The model is a
1-40-40-1 ReLU MLP. For every task of a meta-batch the inner loop takes ``--inner-steps``
steps of SGD (lr ``--inner-lr``) on the task's ``--shots`` support points, through
``loft.innerloop_ctx(..., copy_initial_weights=False)``; the mean squared error on the
task's query points after those steps is the meta-loss, and Adam (lr ``--meta-lr``) on the
model's initial weights minimises its mean over the meta-batch. The meta-gradient flows
back through every inner step (second-order MAML).

At the end it evaluates on ``--eval-tasks`` held-out tasks (drawn from a generator of their
own) and prints the mean query MSE before adaptation (the meta-learned initial weights)
and after ``--inner-steps`` steps of SGD on each task's support points, and also after
``--eval-steps`` steps (10 by default, as in the paper's figures). Everything is seeded by
``--seed``: the same command prints the same figures on the same machine.

``--batched`` runs each meta-batch as one inner loop instead of one per task:
``loft.innerloop_ctx(..., tasks=N)`` makes every fast weight ``[N, *shape]``, ``fmodel``
takes the tasks' inputs stacked as ``[N, K, 1]``, and ``diffopt.step`` takes the ``[N]``
per-task losses, so that each task takes its own SGD step, as in the loop over tasks.
The figures are the same up to float rounding (the same seed draws the same tasks); the
meta-iterations are several times faster. Either way it prints the median time per
meta-iteration.

Run::

    python examples/maml_sinusoid.py [--meta-iterations 2000] [--meta-batch 25]
        [--inner-steps 1] [--shots 10] [--seed 0] [--device cpu] [--batched]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: plain iteration without it
    def tqdm(iterable, **_):  # type: ignore[no-redef]
        return iterable

import loft

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator,
             device: torch.device) -> torch.Tensor:
    # Drawn on the CPU, then moved: the same seed gives the same tasks on every device.
    return (low + (high - low) * torch.rand(shape, generator=generator)).to(device)


def sample_tasks(num_tasks: int, shots: int, queries: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch of sine tasks: ``(x_support, y_support, x_query, y_query)``.

    Shapes are ``(num_tasks, shots, 1)`` and ``(num_tasks, queries, 1)``.
    """
    amplitude = _uniform(*AMPLITUDE, (num_tasks, 1, 1), generator, device)
    phase = _uniform(*PHASE, (num_tasks, 1, 1), generator, device)
    x_support = _uniform(*X_RANGE, (num_tasks, shots, 1), generator, device)
    x_query = _uniform(*X_RANGE, (num_tasks, queries, 1), generator, device)
    return (x_support, amplitude * torch.sin(x_support - phase),
            x_query, amplitude * torch.sin(x_query - phase))


def make_model() -> nn.Module:
    """The 1-40-40-1 ReLU regressor of the MAML paper."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                         nn.Linear(40, 1))


def task_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The ``[N]`` per-task mean squared errors of task-batched ``[N, K, 1]`` tensors."""
    return F.mse_loss(prediction, target, reduction="none").flatten(1).mean(1)


def adapted_query_loss(model: nn.Module, inner_opt: torch.optim.Optimizer,
                       x_support: torch.Tensor, y_support: torch.Tensor,
                       x_query: torch.Tensor, y_query: torch.Tensor,
                       inner_steps: int) -> torch.Tensor:
    """The query MSE of one task after ``inner_steps`` SGD steps on its support set.

    The result is differentiable with respect to ``model``'s parameters through every
    inner step: ``copy_initial_weights=False`` makes the fast weights at time 0 the
    model's own parameters.
    """
    with loft.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(inner_steps):
            diffopt.step(F.mse_loss(fmodel(x_support), y_support))
        return F.mse_loss(fmodel(x_query), y_query)


def adapted_query_losses(model: nn.Module, inner_opt: torch.optim.Optimizer,
                         x_support: torch.Tensor, y_support: torch.Tensor,
                         x_query: torch.Tensor, y_query: torch.Tensor,
                         inner_steps: int) -> torch.Tensor:
    """The ``[N]`` query MSEs of all tasks at once, as :func:`adapted_query_loss` of each.

    ``tasks=N``: one inner loop over the stacked tasks (``[N, K, 1]``); each task's fast
    weights take their own SGD steps on the task's loss.
    """
    with loft.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                            tasks=x_support.shape[0]) as (fmodel, diffopt):
        for _ in range(inner_steps):
            diffopt.step(task_mse(fmodel(x_support), y_support))
        return task_mse(fmodel(x_query), y_query)


def evaluate(model: nn.Module, inner_opt: torch.optim.Optimizer,
             tasks: tuple[torch.Tensor, ...], steps: int, batched: bool = False) -> list[float]:
    """Mean query MSE over ``tasks`` after 0, 1, ..., ``steps`` steps of adaptation.

    Each task adapts its own copy of the fast weights (``batched``: all at once, with
    ``tasks=N``); ``model`` itself is unchanged.
    """
    x_support, y_support, x_query, y_query = tasks
    totals = [0.0] * (steps + 1)
    if batched:
        with loft.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                track_higher_grads=False,
                                tasks=x_support.shape[0]) as (fmodel, diffopt):
            for step in range(steps + 1):
                if step:
                    diffopt.step(task_mse(fmodel(x_support), y_support))
                with torch.no_grad():
                    totals[step] = task_mse(fmodel(x_query), y_query).mean().item()
        return totals
    for i in range(x_support.shape[0]):
        with loft.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                track_higher_grads=False) as (fmodel, diffopt):
            for step in range(steps + 1):
                if step:
                    diffopt.step(F.mse_loss(fmodel(x_support[i]), y_support[i]))
                with torch.no_grad():
                    totals[step] += F.mse_loss(fmodel(x_query[i]), y_query[i]).item()
    return [total / x_support.shape[0] for total in totals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-iterations", type=int, default=2000)
    parser.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-update")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--shots", type=int, default=10, help="support points per task (K)")
    parser.add_argument("--queries", type=int, default=10, help="query points per task")
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--meta-lr", type=float, default=0.001)
    parser.add_argument("--eval-tasks", type=int, default=100, help="held-out tasks")
    parser.add_argument("--eval-steps", type=int, default=10,
                        help="adaptation steps also reported on the held-out tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batched", action="store_true",
                        help="run each meta-batch as one innerloop_ctx(..., tasks=N)")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    train_generator = torch.Generator().manual_seed(args.seed)
    eval_generator = torch.Generator().manual_seed(args.seed + 1_000_003)
    print(f"loft backend: {loft.backend()} ({loft.backend_reason()})")

    model = make_model().to(device)
    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    meta_opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    eval_tasks = sample_tasks(args.eval_tasks, args.shots, args.queries, eval_generator,
                              device)

    bar = tqdm(range(args.meta_iterations), desc="meta-training")
    seconds = []
    for _ in bar:
        tasks = sample_tasks(args.meta_batch, args.shots, args.queries, train_generator,
                             device)
        start = time.perf_counter()
        meta_opt.zero_grad()
        if args.batched:
            losses = adapted_query_losses(model, inner_opt, *tasks,
                                          inner_steps=args.inner_steps)
            losses.mean().backward()  # the meta-gradient of every task at once
            meta_loss = losses.mean().item()
        else:
            meta_loss = 0.0
            for i in range(args.meta_batch):
                loss = adapted_query_loss(model, inner_opt, *(t[i] for t in tasks),
                                          inner_steps=args.inner_steps)
                (loss / args.meta_batch).backward()  # accumulates the meta-gradient per task
                meta_loss += loss.item() / args.meta_batch
        meta_opt.step()
        seconds.append(time.perf_counter() - start)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(query_mse=f"{meta_loss:.3f}")
    if seconds:
        mode = f"batched, tasks={args.meta_batch}" if args.batched else "one task at a time"
        print(f"time per meta-iteration: {1e3 * statistics.median(seconds):.2f} ms (median; "
              f"{mode})")
        print(f"last meta-batch's mean query MSE: {meta_loss:.6f}")

    curve = evaluate(model, inner_opt, eval_tasks, max(args.inner_steps, args.eval_steps),
                     batched=args.batched)
    print(f"held-out tasks: {args.eval_tasks}, shots: {args.shots}, "
          f"inner steps: {args.inner_steps}")
    print(f"mean query MSE before adaptation: {curve[0]:.4f}")
    print(f"mean query MSE after adaptation: {curve[args.inner_steps]:.4f}")
    if args.eval_steps != args.inner_steps:
        print(f"mean query MSE after {args.eval_steps} adaptation steps: "
              f"{curve[args.eval_steps]:.4f}")


if __name__ == "__main__":
    main()
