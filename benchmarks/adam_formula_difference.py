"""How much loft's Adam (torch.optim's formula) and higher 0.2.1's Adam differ on real programs.

higher 0.2.1 (the PyPI release) computes ``denom = sqrt(v) + eps`` and folds the bias
correction of ``v`` into the step size; torch.optim (and loft, and higher HEAD) compute
``denom = sqrt(v) / sqrt(1 - beta2^t) + eps``. The two agree where ``eps`` is negligible
against ``sqrt(v)`` and part where it is not (small gradients, early steps). This script
runs two programs written for higher, once with ``higher`` and once with
``import loft as higher``, in float64, and prints the relative difference of their losses
and meta-gradients:

- **dataset distillation**: learn 10 synthetic examples such that an MLP trained on them
  for 20 inner Adam steps classifies real data; meta-gradient with respect to the
  synthetic examples.
- **learned learning rate**: MAML-style sine regression with a learnable inner Adam lr;
  meta-gradient with respect to the model's weights and the lr.

Run: ``python benchmarks/adam_formula_difference.py [--seeds 5]``.
"""

from __future__ import annotations

import argparse
from typing import Any

import higher
import torch
from torch import nn

import loft


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def distillation(lib: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query loss and meta-gradient on the synthetic examples."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 10, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 3, (300,), generator=gen)
    x_real = centers[labels] + torch.randn(300, 10, generator=gen, dtype=torch.float64)
    x_syn = torch.randn(9, 10, generator=gen, dtype=torch.float64).requires_grad_()
    y_syn = torch.arange(9) % 3
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    with lib.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(20):
            diffopt.step(loss_fn(fmodel(x_syn), y_syn))
        query = loss_fn(fmodel(x_real), labels)
        (grad,) = torch.autograd.grad(query, [x_syn])
    return query.detach(), grad


def learned_lr(lib: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query loss and meta-gradient on the weights and the learnable inner lr."""
    gen = torch.Generator().manual_seed(seed)
    amplitude = torch.rand(1, generator=gen, dtype=torch.float64) * 4.9 + 0.1
    phase = torch.rand(1, generator=gen, dtype=torch.float64) * 3.14159
    x = torch.rand(20, 1, generator=gen, dtype=torch.float64) * 10 - 5
    y = amplitude * torch.sin(x + phase)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 1)).double()
    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with lib.innerloop_ctx(model, opt, copy_initial_weights=False,
                           override={"lr": [lr]}) as (fmodel, diffopt):
        for _ in range(5):
            diffopt.step(nn.functional.mse_loss(fmodel(x[:10]), y[:10]))
        query = nn.functional.mse_loss(fmodel(x[10:]), y[10:])
        grads = torch.autograd.grad(query, [*model.parameters(), lr])
    return query.detach(), torch.cat([g.reshape(-1) for g in grads])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for program in (distillation, learned_lr):
        losses, grads = [], []
        for seed in range(args.seeds):
            loss_h, grad_h = program(higher, seed)
            loss_l, grad_l = program(loft, seed)
            losses.append(abs(float(loss_l - loss_h)) / abs(float(loss_h)))
            grads.append(_relative(grad_l, grad_h))
        print(f"{program.__name__}: over {args.seeds} seeds, query loss differs by "
              f"{min(losses):.2%} to {max(losses):.2%}, meta-gradient by "
              f"{min(grads):.1%} to {max(grads):.1%} (relative norm of the difference)")


if __name__ == "__main__":
    main()
