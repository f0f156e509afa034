"""Shared pieces of the batched-task tests: small float64 models (native and vmap paths),
per-task data, optimisers with tensor hyperparameters, and one inner loop run either as
one batched context (``tasks=N``) or as ``N`` sequential contexts (one per task), with
everything the tests compare collected in a :class:`Result`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

import loft

#: float64 comparisons: a batched op and the per-task op differ only by rounding.
F64: dict[str, float] = dict(rtol=1e-12, atol=1e-12)
TASKS = 3
STEPS = 3

Batch = tuple[Tensor, Tensor]
#: An optimiser for a model: (torch optimiser, override for innerloop_ctx, the tensor
#: hyperparameters in it that require grad).
# (a runtime alias: Optional, not ``X | None``, for Python 3.9)
Spec = tuple[torch.optim.Optimizer, Optional[dict[str, list[Any]]], list[Tensor]]  # noqa: UP007
OptFactory = Callable[[nn.Module], Spec]


class Wrapped(nn.Module):
    """A custom module whose forward calls the network it wraps: loft cannot run it
    natively, so a batched forward goes through ``torch.func.vmap``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(3, 5), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(5, 2))
    return nn.Sequential(*layers).double()


def convnet(seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    """Conv2d, ReLU, BatchNorm2d (with non-trivial initial statistics), MaxPool2d, Linear
    on ``[B, 1, 6, 6]`` inputs. (The ReLU comes before the BatchNorm so that the conv
    bias has a gradient: with BatchNorm right after it, its gradient is rounding noise,
    which Adam's normalised step would blow up.)"""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(3),
                               nn.MaxPool2d(2), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(3 * 3 * 3, 2))
    net = nn.Sequential(*layers).double()
    bn = net[2]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.num_batches_tracked.fill_(3)
        bn.weight.uniform_(0.1, 0.3)  # small features: SGD with lr=0.1 stays stable
        bn.bias.uniform_(-0.05, 0.05)
    return net


#: name -> a fresh model (the same weights and buffers at every call).
MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "conv": convnet,
    "mlp-vmap": lambda: Wrapped(mlp()),
    "conv-vmap": lambda: Wrapped(convnet()),
}


def input_shape(model_name: str) -> tuple[int, ...]:
    """One sample's shape for the model ``model_name``."""
    return (1, 6, 6) if model_name.startswith("conv") else (3,)


def task_batches(model_name: str, tasks: int = TASKS, steps: int = STEPS, batch: int = 4,
                 seed: int = 1) -> list[Batch]:
    """``steps`` support batches then one query batch: ``x [tasks, batch, *sample]``,
    ``y [tasks, batch, 2]``, different data for every task."""
    gen = torch.Generator().manual_seed(seed)
    shape = input_shape(model_name)
    return [(torch.randn(tasks, batch, *shape, generator=gen, dtype=torch.float64),
             torch.randn(tasks, batch, 2, generator=gen, dtype=torch.float64))
            for _ in range(steps + 1)]


def task_losses(out: Tensor, y: Tensor) -> Tensor:
    """Per-task MSE over ``[N, B, ...]``: ``[N]``."""
    return ((out - y) ** 2).flatten(1).mean(1)


def mse(out: Tensor, y: Tensor) -> Tensor:
    """One task's MSE (a scalar)."""
    return ((out - y) ** 2).mean()


# ---- optimisers with tensor hyperparameters ----------------------------------------------


def hyper(value: float) -> Tensor:
    """A float64 hyperparameter that requires grad."""
    return torch.tensor(value, dtype=torch.float64, requires_grad=True)


def sgd(model: nn.Module) -> Spec:
    lr = hyper(0.1)
    return torch.optim.SGD(model.parameters(), lr=0.1), {"lr": [lr]}, [lr]


def momentum(model: nn.Module) -> Spec:
    lr, mom = hyper(0.1), hyper(0.9)
    return (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            {"lr": [lr], "momentum": [mom]}, [lr, mom])


def nesterov(model: nn.Module) -> Spec:
    lr = hyper(0.05)
    return (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.8, nesterov=True,
                            weight_decay=0.01), {"lr": [lr]}, [lr])


def adam(model: nn.Module) -> Spec:
    lr, b1, b2 = hyper(0.02), hyper(0.8), hyper(0.95)
    return (torch.optim.Adam(model.parameters(), lr=0.02),
            {"lr": [lr], "betas": [(b1, b2)]}, [lr, b1, b2])


def adamw(model: nn.Module) -> Spec:
    lr, b1, b2 = hyper(0.02), hyper(0.85), hyper(0.99)
    return (torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1),
            {"lr": [lr], "betas": [(b1, b2)]}, [lr, b1, b2])


def rmsprop(model: nn.Module) -> Spec:
    """An unfused optimiser (loft.optim.unfused), with a tensor lr."""
    lr = hyper(0.01)
    return (torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, momentum=0.5),
            {"lr": [lr]}, [lr])


def adagrad(model: nn.Module) -> Spec:
    """Another unfused optimiser, with a tensor lr."""
    lr = hyper(0.05)
    return torch.optim.Adagrad(model.parameters(), lr=0.05), {"lr": [lr]}, [lr]


def meta_sgd(model: nn.Module) -> Spec:
    """Meta-SGD: one param group per parameter, each with a learned lr shaped like it."""
    gen = torch.Generator().manual_seed(7)
    params = list(model.parameters())
    lrs = [(torch.rand(p.shape, generator=gen, dtype=torch.float64) * 0.1 + 0.05)
           .requires_grad_() for p in params]
    return torch.optim.SGD([{"params": [p]} for p in params], lr=0.1), {"lr": lrs}, lrs


def plain(lr: float = 0.1, **kwargs: Any) -> OptFactory:
    """A torch SGD with number hyperparameters (no override)."""
    def make(model: nn.Module) -> Spec:
        return torch.optim.SGD(model.parameters(), lr=lr, **kwargs), None, []
    return make


OPTIMIZERS: dict[str, OptFactory] = {
    "sgd": sgd, "momentum": momentum, "nesterov": nesterov, "adam": adam, "adamw": adamw,
    "rmsprop": rmsprop,
}


# ---- one inner loop, batched or sequential ----------------------------------------------------


@dataclass
class Result:
    """What an inner loop leaves; batched values lead with the task dimension."""

    times: list[int]
    #: per recorded step, per fast weight: ``[N, *shape]``
    weights: list[list[Tensor]]
    #: per inner step: ``[N]`` (the per-task losses)
    inner: list[Tensor]
    #: ``[N]``
    query: Tensor
    #: the model parameters' ``.grad`` after the meta-backward (``None``: no gradient)
    model_grads: list[Tensor | None]
    #: the tensor hyperparameters' ``.grad``
    hyper_grads: list[Tensor | None]
    #: the patched buffers by name, ``[N, *shape]``
    buffers: dict[str, Tensor]


def _inner_loop(fmodel: Any, diffopt: Any, support: list[Batch], reduce: Callable[[Tensor], Tensor],
                truncate_after: int | None, unroll: bool, checkpoint_every: int | None
                ) -> list[Tensor]:
    """The inner steps; returns the inner losses (as given to ``step``), detached."""
    if unroll:
        def loss_fn(f: Any, batch: Batch) -> Tensor:
            return reduce(_loss(f(batch[0]), batch[1]))

        return loft.unroll(fmodel, diffopt, loss_fn, support, checkpoint_every=checkpoint_every)
    out = []
    for t, (x, y) in enumerate(support):
        losses = _loss(fmodel(x), y)
        out.append(losses.detach().clone())
        diffopt.step(reduce(losses))
        if truncate_after is not None and t + 1 == truncate_after:
            diffopt.truncate()
    return out


def _loss(out: Tensor, y: Tensor) -> Tensor:
    """``[N]`` per-task losses for batched ``[N, B, 2]`` outputs, a scalar for one task's."""
    return task_losses(out, y) if out.dim() == 3 else mse(out, y)


REDUCE: dict[str, Callable[[Tensor], Tensor]] = {
    "tasks": lambda losses: losses,
    "sum": lambda losses: losses.sum(),
    "mean": lambda losses: losses.mean(),
}


def run(model_name: str, make_opt: OptFactory, batches: list[Batch], batched: bool, *,
        form: str = "tasks", first_order: bool = False, truncate_after: int | None = None,
        track: bool = True, unroll: bool = False, checkpoint_every: int | None = None,
        copy_initial_weights: bool = False, model: nn.Module | None = None,
        extra: dict[str, Any] | None = None) -> Result:
    """The inner loop on ``batches`` (support batches, then the query batch) as one
    batched context (``batched=True``) or as one context per task, from the same fresh
    model (``MODELS[model_name]()``, or ``model``) and optimiser; the meta-backward is
    the summed query loss's (``.grad`` accumulates over the sequential tasks)."""
    model = MODELS[model_name]() if model is None else model
    opt, override, hypers = make_opt(model)
    options = dict(copy_initial_weights=copy_initial_weights, override=override,
                   track_higher_grads=track, first_order=first_order, **(extra or {}))
    tasks = batches[0][0].shape[0]
    support, (xq, yq) = batches[:-1], batches[-1]
    runs = [None] if batched else list(range(tasks))
    collected: list[tuple[list[int], list[list[Tensor]], list[Tensor], Tensor,
                          dict[str, Tensor]]] = []
    for k in runs:
        if k is None:
            ctx = loft.innerloop_ctx(model, opt, tasks=tasks, **options)
            data, query_batch = support, (xq, yq)
        else:
            ctx = loft.innerloop_ctx(model, opt, **options)
            data, query_batch = [(x[k], y[k]) for x, y in support], (xq[k], yq[k])
        with ctx as (fmodel, diffopt):
            inner = _inner_loop(fmodel, diffopt, data, REDUCE[form] if k is None else REDUCE["sum"],
                                truncate_after, unroll, checkpoint_every)
            times = fmodel.recorded_times
            weights = [[p.detach().clone() for p in fmodel.parameters(time=t)] for t in times]
            query = _loss(fmodel(query_batch[0]), query_batch[1])
            if query.requires_grad:
                query.sum().backward()
            buffers = {name: b.detach().clone() for name, b in fmodel.patched_buffers()}
        collected.append((times, weights, inner, query.detach(), buffers))
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    hyper_grads = [None if h.grad is None else h.grad.clone() for h in hypers]
    if batched:
        times, weights, inner, query, buffers = collected[0]
        return Result(times, weights, inner, query, grads, hyper_grads, buffers)
    times = collected[0][0]
    assert all(c[0] == times for c in collected)
    return Result(
        times,
        [[torch.stack([c[1][i][j] for c in collected]) for j in range(len(collected[0][1][i]))]
         for i in range(len(times))],
        [torch.stack([c[2][t] for c in collected]) for t in range(len(collected[0][2]))],
        torch.stack([c[3] for c in collected]),
        grads, hyper_grads,
        {name: torch.stack([c[4][name] for c in collected]) for name in collected[0][4]})


# ---- comparisons -------------------------------------------------------------------------------


def close(actual: Tensor | None, expected: Tensor | None, what: str) -> None:
    """Equal to float64 rounding (or both ``None``)."""
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{what}: {actual} vs {expected}"
        return
    assert actual.shape == expected.shape, f"{what}: {list(actual.shape)} vs {list(expected.shape)}"
    torch.testing.assert_close(actual, expected, **F64, msg=lambda m: f"{what}: {m}")


def assert_same(a: Result, b: Result, grads: bool = True) -> None:
    """Every recorded fast weight, inner and query loss, buffer and (``grads``) meta-gradient."""
    assert a.times == b.times
    for t, wa, wb in zip(a.times, a.weights, b.weights):
        assert len(wa) == len(wb)
        for j, (x, y) in enumerate(zip(wa, wb)):
            close(x, y, f"fast weight {j} at time {t}")
    assert len(a.inner) == len(b.inner)
    for t, (x, y) in enumerate(zip(a.inner, b.inner)):
        close(x, y, f"inner loss at step {t}")
    close(a.query, b.query, "query losses")
    assert a.buffers.keys() == b.buffers.keys()
    for name in a.buffers:
        close(a.buffers[name], b.buffers[name], f"buffer {name}")
    if grads:
        for j, (x, y) in enumerate(zip(a.model_grads, b.model_grads)):
            close(x, y, f"meta-gradient of model parameter {j}")
        for j, (x, y) in enumerate(zip(a.hyper_grads, b.hyper_grads)):
            close(x, y, f"meta-gradient of hyperparameter {j}")


def assert_nontrivial(r: Result) -> None:
    """The run is worth comparing: the weights moved, the tasks went different ways, and
    the meta-gradients exist and are not zero."""
    first, last = r.weights[0], r.weights[-1]
    assert any(not torch.equal(x, y) for x, y in zip(first, last)), "the weights did not move"
    assert any(not torch.allclose(w[0], w[1]) for w in last), "tasks 0 and 1 ended equal"
    for g in [*r.model_grads, *r.hyper_grads]:
        assert g is not None and g.abs().sum() > 0
