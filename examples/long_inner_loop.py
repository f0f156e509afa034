"""Learning the learning rate of a long inner loop, in bounded memory.

The inner loop trains a 1-64-64-1 tanh MLP on a sine wave ``y = sin(x)`` with Adam for
``--inner-steps`` steps (a batch of 32 points per step); the meta-loss is the mean
squared error on held-out points after the loop, and the meta-parameter is the inner
learning rate, ``exp(log_lr)``, trained by Adam on ``log_lr``. The meta-gradient goes
through every inner step, kept in bounded memory by one of:

- ``--mode checkpoint``: ``loft.unroll(..., checkpoint_every=k)``, the flat state every
  ``k`` steps, the rest recomputed in the meta-backward (the same gradient as the full
  unroll; the script checks it first, in float64);
- ``--mode truncate``: ``diffopt.truncate()`` every ``k`` steps (the meta-gradient of the
  last ``k`` steps only);
- ``--mode first-order``: ``first_order=True`` (the inner gradients are constants);
- ``--mode full``: the whole graph of the loop, as higher keeps it.

Run::

    python examples/long_inner_loop.py [--mode checkpoint] [--inner-steps 300]
        [--checkpoint-every 20] [--meta-steps 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import loft


def make_model(seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 1)).to(dtype)


def make_batches(steps: int, seed: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """One batch of 32 points of ``sin(x)``, ``x`` in [-5, 5], per inner step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.rand(32, 1, generator=gen, dtype=dtype) * 10 - 5
        out.append((x, torch.sin(x)))
    return out


def inner_loss(fmodel: Any, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(fmodel(x), y)


def meta_loss(model: nn.Module, log_lr: torch.Tensor, batches: list, query: tuple,
              mode: str, k: int) -> torch.Tensor:
    """The query loss after the inner loop, differentiable with respect to ``log_lr``."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with loft.innerloop_ctx(model, opt, override={"lr": [log_lr.exp()]},
                            first_order=(mode == "first-order")) as (fmodel, diffopt):
        if mode == "checkpoint":
            loft.unroll(fmodel, diffopt, inner_loss, batches, checkpoint_every=k)
        elif mode == "truncate":
            for t, batch in enumerate(batches):
                if t > 0 and t % k == 0:
                    diffopt.truncate()
                diffopt.step(inner_loss(fmodel, batch))
        else:
            loft.unroll(fmodel, diffopt, inner_loss, batches)
        return inner_loss(fmodel, query)


def check_checkpointing(args: argparse.Namespace) -> float:
    """The checkpointed meta-gradient against the full unroll's, in float64."""
    grads = []
    for mode in ("full", "checkpoint"):
        model = make_model(args.seed, torch.float64)
        log_lr = torch.tensor(math.log(args.inner_lr), dtype=torch.float64, requires_grad=True)
        batches = make_batches(args.inner_steps, args.seed + 1, torch.float64)
        query = make_batches(1, args.seed + 2, torch.float64)[0]
        loss = meta_loss(model, log_lr, batches, query, mode, args.checkpoint_every)
        grads.append(torch.autograd.grad(loss, log_lr)[0])
    return abs(grads[0] - grads[1]).item() / max(abs(grads[0]).item(), 1e-300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["checkpoint", "truncate", "first-order", "full"],
                        default="checkpoint")
    parser.add_argument("--inner-steps", type=int, default=300)
    parser.add_argument("--checkpoint-every", type=int, default=20,
                        help="k: checkpoint (or truncate) every k steps")
    parser.add_argument("--meta-steps", type=int, default=20)
    parser.add_argument("--inner-lr", type=float, default=1e-3, help="initial inner lr")
    parser.add_argument("--meta-lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.inner_steps < 1 or args.checkpoint_every < 1 or args.meta_steps < 0:
        parser.error("--inner-steps and --checkpoint-every must be >= 1, --meta-steps >= 0")

    print(f"loft backend: {loft.backend()}")
    print(f"checkpointed vs full meta-gradient (float64), relative difference: "
          f"{check_checkpointing(args):.1e}")

    model = make_model(args.seed, torch.float32)
    batches = make_batches(args.inner_steps, args.seed + 1, torch.float32)
    query = make_batches(1, args.seed + 2, torch.float32)[0]
    log_lr = torch.tensor(math.log(args.inner_lr), requires_grad=True)
    meta_opt = torch.optim.Adam([log_lr], lr=args.meta_lr)
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for it in range(args.meta_steps):
        loss = meta_loss(model, log_lr, batches, query, args.mode, args.checkpoint_every)
        meta_opt.zero_grad()
        loss.backward()
        if it == 0:
            print(f"first meta-gradient d(query loss)/d(log lr): {log_lr.grad.item():.6e}")
        meta_opt.step()
        print(f"meta-step {it:3d}: query loss {loss.item():.5f}, inner lr "
              f"{log_lr.exp().item():.5f}")
    print(f"mode {args.mode}: final query loss {loss.item():.5f}, learned inner lr "
          f"{log_lr.exp().item():.5f}, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
