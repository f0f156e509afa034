"""A batched inner loop (``tasks=N``) equals ``N`` sequential ones to float64 rounding:
every fast weight at every step, the inner and query losses, the BatchNorm statistics,
and the meta-gradients of the model's weights and of tensor hyperparameters (which sum
over the tasks)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import loft

from ._common import (
    MODELS,
    OPTIMIZERS,
    TASKS,
    Spec,
    adagrad,
    adam,
    assert_nontrivial,
    assert_same,
    close,
    meta_sgd,
    plain,
    run,
    sgd,
    task_batches,
    task_losses,
)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("model", list(MODELS))
def test_batched_equals_sequential(model: str, opt: str) -> None:
    """Weights at every step, losses, buffers, model and hyperparameter meta-gradients."""
    batches = task_batches(model)
    batched = run(model, OPTIMIZERS[opt], batches, batched=True)
    sequential = run(model, OPTIMIZERS[opt], batches, batched=False)
    assert batched.times == list(range(len(batches)))
    assert_nontrivial(sequential)
    assert_same(batched, sequential)


@pytest.mark.parametrize("model", ["mlp", "conv-vmap"])
def test_second_unfused_optimizer(model: str) -> None:
    """Adagrad (unfused) batched equals sequential, tensor lr included."""
    batches = task_batches(model)
    sequential = run(model, adagrad, batches, batched=False)
    assert_nontrivial(sequential)
    assert_same(run(model, adagrad, batches, batched=True), sequential)


@pytest.mark.parametrize("model", list(MODELS))
def test_per_element_lr_broadcasts_over_tasks(model: str) -> None:
    """Meta-SGD: lrs shaped like each parameter are shared by the tasks; their
    meta-gradients are the sum of the sequential ones."""
    batches = task_batches(model)
    sequential = run(model, meta_sgd, batches, batched=False)
    assert_nontrivial(sequential)
    assert_same(run(model, meta_sgd, batches, batched=True), sequential)


@pytest.mark.parametrize("opt", ["momentum", "adam"])
@pytest.mark.parametrize("model", ["mlp", "conv-vmap"])
def test_first_order(model: str, opt: str) -> None:
    """first_order=True batched equals first_order=True sequential, and differs from
    the second-order meta-gradient."""
    batches = task_batches(model)
    first = run(model, OPTIMIZERS[opt], batches, batched=True, first_order=True)
    assert_same(first, run(model, OPTIMIZERS[opt], batches, batched=False, first_order=True))
    second = run(model, OPTIMIZERS[opt], batches, batched=True)
    assert not torch.allclose(first.model_grads[0], second.model_grads[0])


@pytest.mark.parametrize("opt", ["nesterov", "adamw"])
@pytest.mark.parametrize("model", ["conv", "mlp-vmap"])
def test_truncate_mid_loop(model: str, opt: str) -> None:
    """diffopt.truncate() after step 2 of 4: the same history, weights and hyperparameter
    gradients as sequential; nothing reaches the model's weights."""
    batches = task_batches(model, steps=4)
    batched = run(model, OPTIMIZERS[opt], batches, batched=True, truncate_after=2)
    sequential = run(model, OPTIMIZERS[opt], batches, batched=False, truncate_after=2)
    assert batched.times == [2, 3, 4]
    assert all(g is None for g in batched.model_grads)
    assert all(g is not None and g.abs().sum() > 0 for g in batched.hyper_grads)
    assert_same(batched, sequential)


@pytest.mark.parametrize("model", ["mlp", "conv", "conv-vmap"])
def test_track_higher_grads_false(model: str) -> None:
    """track_higher_grads=False keeps only the latest weights, equal to sequential."""
    batches = task_batches(model)
    batched = run(model, OPTIMIZERS["adam"], batches, batched=True, track=False)
    sequential = run(model, OPTIMIZERS["adam"], batches, batched=False, track=False)
    assert batched.times == [len(batches) - 1]
    assert_same(batched, sequential, grads=False)
    assert all(g is None for g in batched.model_grads)


@pytest.mark.parametrize("opt", ["momentum", "adam", "rmsprop"])
@pytest.mark.parametrize("model", ["mlp", "conv-vmap"])
def test_summed_loss_equals_per_task_losses(model: str, opt: str) -> None:
    """step(losses.sum()) is step(losses) ([N]): each task's step sees its own gradient."""
    batches = task_batches(model)
    per_task = run(model, OPTIMIZERS[opt], batches, batched=True, form="tasks")
    summed = run(model, OPTIMIZERS[opt], batches, batched=True, form="sum")
    assert_same(summed, per_task)


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_mean_loss_is_summed_loss_with_lr_over_n(model: str) -> None:
    """step(losses.mean()) scales every task's step by 1/N: for plain SGD it equals
    step(losses.sum()) with lr/N (and differs from it with lr)."""
    batches = task_batches(model)
    mean = run(model, plain(0.3), batches, batched=True, form="mean")
    scaled = run(model, plain(0.3 / TASKS), batches, batched=True, form="sum")
    full = run(model, plain(0.3), batches, batched=True, form="sum")
    assert_same(mean, scaled)
    assert not torch.allclose(mean.weights[-1][0], full.weights[-1][0])


@pytest.mark.parametrize("model", ["mlp", "conv-vmap"])
def test_hyperparameter_meta_gradients_by_autograd_grad(model: str) -> None:
    """torch.autograd.grad of the summed batched query loss w.r.t. Adam's tensor lr and
    betas (and the initial weights) is the sum of the sequential tasks' gradients."""
    batches = task_batches(model)
    support, (xq, yq) = batches[:-1], batches[-1]

    def grads(batched: bool) -> list[torch.Tensor]:
        net = MODELS[model]()
        opt, override, hypers = adam(net)
        inputs = [*net.parameters(), *hypers]
        if batched:
            with loft.innerloop_ctx(net, opt, tasks=TASKS, copy_initial_weights=False,
                                    override=override) as (fmodel, diffopt):
                for x, y in support:
                    diffopt.step(task_losses(fmodel(x), y))
                return list(torch.autograd.grad(task_losses(fmodel(xq), yq).sum(), inputs))
        total = [torch.zeros_like(t) for t in inputs]
        for k in range(TASKS):
            with loft.innerloop_ctx(net, opt, copy_initial_weights=False,
                                    override=override) as (fmodel, diffopt):
                for x, y in support:
                    diffopt.step(((fmodel(x[k]) - y[k]) ** 2).mean())
                query = ((fmodel(xq[k]) - yq[k]) ** 2).mean()
                total = [a + b for a, b in zip(total, torch.autograd.grad(query, inputs))]
        return total

    expected = grads(batched=False)
    assert all(g.abs().sum() > 0 for g in expected)
    for j, (a, b) in enumerate(zip(grads(batched=True), expected)):
        close(a, b, f"gradient {j}")


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_copy_initial_weights_true(model: str) -> None:
    """copy_initial_weights=True: the same trajectory and hyperparameter gradients as
    sequential, and no gradient on the model's weights."""
    batches = task_batches(model)
    batched = run(model, OPTIMIZERS["momentum"], batches, batched=True, copy_initial_weights=True)
    sequential = run(model, OPTIMIZERS["momentum"], batches, batched=False,
                     copy_initial_weights=True)
    assert all(g is None for g in batched.model_grads)
    assert_same(batched, sequential)


@pytest.mark.parametrize("opt_type, kwargs", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (torch.optim.Adam, dict(lr=0.02)),
], ids=["momentum", "adam"])
def test_existing_optimizer_state_is_copied_per_task(opt_type: type, kwargs: dict) -> None:
    """An optimiser that has already stepped: its momentum buffers / moments start every
    task, as they start every sequential context."""
    batches = task_batches("mlp")

    def stepped(clear: bool) -> Callable[[nn.Module], Spec]:
        def make(model: nn.Module) -> Spec:
            opt = opt_type(model.parameters(), **kwargs)
            x, y = batches[0][0][0], batches[0][1][0]
            for _ in range(2):
                opt.zero_grad()
                ((model(x) - y) ** 2).mean().backward()
                opt.step()
            for p in model.parameters():
                p.grad = None
            if clear:
                opt.state.clear()
            return opt, None, []
        return make

    batched = run("mlp", stepped(False), batches, batched=True)
    sequential = run("mlp", stepped(False), batches, batched=False)
    stateless = run("mlp", stepped(True), batches, batched=True)
    assert torch.equal(batched.weights[0][0], stateless.weights[0][0])  # the same start
    assert not torch.allclose(batched.weights[-1][0], stateless.weights[-1][0])
    assert_same(batched, sequential)


@pytest.mark.parametrize("model", ["mlp", "conv-vmap"])
def test_one_task(model: str) -> None:
    """tasks=1 is one unbatched inner loop with a leading dimension of 1."""
    batches = task_batches(model, tasks=1)
    batched = run(model, OPTIMIZERS["adam"], batches, batched=True)
    assert batched.query.shape == (1,)
    assert_same(batched, run(model, OPTIMIZERS["adam"], batches, batched=False))


def test_device_argument() -> None:
    """device='cpu' with tasks gives the same results as no device."""
    batches = task_batches("conv")
    with_device = run("conv", sgd, batches, batched=True, extra=dict(device="cpu"))
    assert_same(with_device, run("conv", sgd, batches, batched=False))
