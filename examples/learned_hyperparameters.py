"""Learn an inner loop's learning rate and momentum by differentiating through it.

The classic example of ``higher``: fit ``y = 3.5 x`` with a one-weight linear model,
five steps of SGD with momentum whose ``lr`` and ``momentum`` are tensors that require
grad. The meta-loss is the squared distance of the final weight to 3.5; its gradient
with respect to ``lr`` and ``momentum`` flows back through every inner step (one fused
``loft::sgd_step`` per step, one fused backward per step).

First it prints the figures of one unroll (the same as higher's), then it meta-trains
``lr`` and ``momentum`` with Adam for ``--meta-steps`` iterations.

Run::

    python examples/learned_hyperparameters.py [--meta-steps 100] [--inner-steps 5]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: plain iteration without it
    def tqdm(iterable, **_):  # type: ignore[no-redef]
        return iterable

import loft


def unroll(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor,
           momentum: torch.Tensor, inner_steps: int) -> tuple[torch.Tensor, list[float]]:
    """Run the inner loop; return the meta-loss (w - 3.5)^2 and the weight history."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    with loft.innerloop_ctx(model, opt, override={"lr": [lr], "momentum": [momentum]}) as (
            fmodel, diffopt):
        for _ in range(inner_steps):
            diffopt.step(((fmodel(x) - y) ** 2).mean())
        history = [list(fmodel.parameters(time=t))[0].item() for t in range(inner_steps + 1)]
        weight = list(fmodel.parameters())[0]
        return ((weight - 3.5) ** 2).sum(), history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-steps", type=int, default=100)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--meta-lr", type=float, default=0.01)
    args = parser.parse_args()

    np.random.seed(1)
    torch.manual_seed(3)
    x = torch.tensor(np.random.rand(100, 1))
    y = 3.5 * x
    model = nn.Linear(1, 1, bias=False).double()
    lr = torch.tensor([0.3], requires_grad=True)
    momentum = torch.tensor([0.5], requires_grad=True)
    print(f"loft backend: {loft.backend()} ({loft.backend_reason()})")

    meta_loss, history = unroll(model, x, y, lr, momentum, args.inner_steps)
    meta_loss.backward()
    print("weights:", ", ".join(f"{w:.4f}" for w in history))
    print(f"meta-loss: {meta_loss.item():.15f}")
    print(f"d meta-loss / d lr = {lr.grad.item():.4f}, "
          f"d meta-loss / d momentum = {momentum.grad.item():.4f}")

    meta_opt = torch.optim.Adam([lr, momentum], lr=args.meta_lr)
    bar = tqdm(range(args.meta_steps), desc="meta-training lr and momentum")
    for _ in bar:
        meta_opt.zero_grad()
        meta_loss, _ = unroll(model, x, y, lr, momentum, args.inner_steps)
        meta_loss.backward()
        meta_opt.step()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(meta_loss=f"{meta_loss.item():.3e}")
    meta_loss, _ = unroll(model, x, y, lr, momentum, args.inner_steps)
    print(f"learned lr = {lr.item():.4f}, momentum = {momentum.item():.4f}, "
          f"final meta-loss = {meta_loss.item():.3e}")


if __name__ == "__main__":
    main()
