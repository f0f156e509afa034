"""Batched loft against ``higher`` 0.2.1 run one task at a time (plain and momentum SGD,
whose steps match loft's exactly in float64), and ``torch.autograd.gradcheck`` through a
batched inner loop."""

from __future__ import annotations

from typing import Any

import higher
import pytest
import torch
from torch import Tensor, nn

import loft

from ._common import (
    MODELS,
    TASKS,
    assert_same,
    close,
    hyper,
    run,
    task_batches,
    task_losses,
)

SGDS: dict[str, dict[str, Any]] = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov-decay": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
}


def _sgd(kwargs: dict[str, Any]) -> Any:
    """loft's run() optimiser: torch SGD with a tensor lr through override."""
    def make(model: nn.Module) -> tuple[torch.optim.Optimizer, dict[str, list[Any]], list[Tensor]]:
        lr = hyper(kwargs["lr"])
        return torch.optim.SGD(model.parameters(), **kwargs), {"lr": [lr]}, [lr]
    return make


def _higher_sequential(model_name: str, kwargs: dict[str, Any],
                       batches: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """higher's innerloop_ctx once per task (tensor lr, copy_initial_weights=False): the
    weights at every step, the query losses, the buffers (stacked over tasks) and the
    meta-gradients of the model and the lr (summed over tasks)."""
    model = MODELS[model_name]()
    lr = hyper(kwargs["lr"])
    opt = torch.optim.SGD(model.parameters(), **kwargs)
    support, (xq, yq) = batches[:-1], batches[-1]
    weights, queries, buffers = [], [], []
    for k in range(xq.shape[0]):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
                                  override={"lr": [lr]}) as (fmodel, diffopt):
            for x, y in support:
                diffopt.step(((fmodel(x[k]) - y[k]) ** 2).mean())
            weights.append([[p.detach().clone() for p in fmodel.parameters(time=t)]
                            for t in range(len(support) + 1)])
            query = ((fmodel(xq[k]) - yq[k]) ** 2).mean()
            query.backward()
            queries.append(query.detach())
            buffers.append({n: b.detach().clone() for n, b in fmodel.named_buffers()})
    return dict(
        weights=[[torch.stack([w[t][j] for w in weights]) for j in range(len(weights[0][t]))]
                 for t in range(len(support) + 1)],
        query=torch.stack(queries),
        buffers={n: torch.stack([b[n] for b in buffers]) for n in buffers[0]},
        grads=[p.grad for p in model.parameters()] + [lr.grad])


@pytest.mark.parametrize("sgd", list(SGDS))
@pytest.mark.parametrize("model", list(MODELS))
def test_batched_loft_equals_sequential_higher(model: str, sgd: str) -> None:
    """Every step's weights, query losses, BatchNorm statistics and the meta-gradients
    (model weights, tensor lr) of batched loft equal higher's, task by task."""
    batches = task_batches(model)
    ours = run(model, _sgd(SGDS[sgd]), batches, batched=True)
    theirs = _higher_sequential(model, SGDS[sgd], batches)
    assert ours.times == list(range(len(theirs["weights"])))
    for t, (a, b) in enumerate(zip(ours.weights, theirs["weights"])):
        for j, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"fast weight {j} at time {t}")
    close(ours.query, theirs["query"], "query losses")
    assert ours.buffers.keys() == theirs["buffers"].keys()
    for name, b in ours.buffers.items():
        close(b, theirs["buffers"][name], name)
    for j, (x, y) in enumerate(zip([*ours.model_grads, *ours.hyper_grads], theirs["grads"])):
        assert y is not None and y.abs().sum() > 0
        close(x, y, f"meta-gradient {j}")


def test_loft_sequential_is_higher_sequential() -> None:
    """The sequential reference itself (loft, one task at a time) is higher's."""
    batches = task_batches("conv")
    ours = run("conv", _sgd(SGDS["momentum"]), batches, batched=False)
    theirs = _higher_sequential("conv", SGDS["momentum"], batches)
    close(ours.query, theirs["query"], "query losses")
    for j, (x, y) in enumerate(zip([*ours.model_grads, *ours.hyper_grads], theirs["grads"])):
        close(x, y, f"meta-gradient {j}")
    assert_same(ours, run("conv", _sgd(SGDS["momentum"]), batches, batched=True))


@pytest.mark.parametrize("model, opt", [("mlp", "momentum"), ("mlp", "adam"),
                                        ("mlp-vmap", "momentum"), ("conv", "sgd")])
def test_gradcheck_through_two_batched_steps(model: str, opt: str) -> None:
    """gradcheck (float64) of the summed query loss after two batched steps, as a
    function of the initial weights and a tensor lr."""
    net = MODELS[model]()
    params = list(net.parameters())
    batches = task_batches(model, steps=2, batch=3)
    support, (xq, yq) = batches[:-1], batches[-1]
    make = {"sgd": lambda: torch.optim.SGD(params, lr=0.1),
            "momentum": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
            "adam": lambda: torch.optim.Adam(params, lr=0.05)}[opt]

    def query_loss(*inputs: Tensor) -> Tensor:
        # gradcheck perturbs its inputs in place: the model's own parameters, and the lr
        assert all(a is p for a, p in zip(inputs, params))
        with loft.innerloop_ctx(net, make(), tasks=TASKS, copy_initial_weights=False,
                                override={"lr": [inputs[-1]]}) as (fmodel, diffopt):
            for x, y in support:
                diffopt.step(task_losses(fmodel(x), y))
            return task_losses(fmodel(xq), yq).sum()

    lr = hyper(0.1 if opt != "adam" else 0.05)
    assert torch.autograd.gradcheck(query_loss, (*params, lr), eps=1e-6, atol=1e-5, rtol=1e-4)
