"""Every optimiser loft registers runs batched: the unfused ones (reference math over the
same ``[N, ...]`` buffers) and AMSGrad give the sequential loop's query losses and
meta-gradients to float64 rounding."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch
from torch import Tensor, nn

import loft

TASKS = 3

OPTIMIZERS: dict[str, Callable[[Iterable[Tensor]], torch.optim.Optimizer]] = {
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=0.5),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=0.05),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=0.05),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
    "AdamW-amsgrad": lambda p: torch.optim.AdamW(p, lr=0.05, amsgrad=True),
}


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def _losses(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).square().flatten(-2).mean(-1)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_batched_equals_sequential(name: str) -> None:
    """Three steps per task: query losses and the model's meta-gradients."""
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(TASKS, 4, 2, generator=gen, dtype=torch.float64)
    ys = torch.randn(TASKS, 4, 1, generator=gen, dtype=torch.float64)
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    sequential = []
    for t in range(TASKS):
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(_losses(fmodel(xs[t]), ys[t]))
            loss = _losses(fmodel(xs[t]), ys[t])
            loss.backward()
            sequential.append(loss.detach())
    expected = [p.grad.clone() for p in model.parameters()]
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    with loft.innerloop_ctx(model, opt, copy_initial_weights=False,
                            tasks=TASKS) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(_losses(fmodel(xs), ys))
        batched = _losses(fmodel(xs), ys)
        batched.sum().backward()
    torch.testing.assert_close(batched.detach(), torch.stack(sequential), rtol=1e-12, atol=1e-12)
    assert max(float(g.abs().max()) for g in expected) > 1e-3
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
