"""``loft.unroll`` over batched tasks: with ``checkpoint_every`` it gives the full
unroll's weights, losses, buffers and meta-gradients (model weights and tensor
hyperparameters), which equal ``N`` sequential inner loops; dropout masks and BatchNorm
statistics are replayed exactly."""

from __future__ import annotations

import pytest
import torch

from ._common import (
    MODELS,
    OPTIMIZERS,
    Result,
    Wrapped,
    assert_nontrivial,
    assert_same,
    close,
    convnet,
    mlp,
    run,
    task_batches,
)


def _same_at_checkpoints(checkpointed: Result, full: Result) -> None:
    """``checkpointed`` keeps only some steps: those equal ``full``'s; the rest of the
    results (losses, buffers, meta-gradients) are compared whole."""
    assert set(checkpointed.times) <= set(full.times)
    kept = [full.times.index(t) for t in checkpointed.times]
    assert_same(checkpointed, Result(
        checkpointed.times, [full.weights[i] for i in kept], full.inner, full.query,
        full.model_grads, full.hyper_grads, full.buffers))


@pytest.mark.parametrize("opt", ["momentum", "adam"])
@pytest.mark.parametrize("model", ["mlp", "conv", "conv-vmap"])
def test_checkpointed_unroll(model: str, opt: str) -> None:
    """checkpoint_every=2 over 5 steps: the checkpoints [0, 2, 4, 5], weights at them,
    losses, BatchNorm statistics and meta-gradients equal the batched full unroll's,
    which equal the sequential inner loops'."""
    batches = task_batches(model, steps=5)
    checkpointed = run(model, OPTIMIZERS[opt], batches, batched=True, unroll=True,
                       checkpoint_every=2)
    full = run(model, OPTIMIZERS[opt], batches, batched=True, unroll=True)
    sequential = run(model, OPTIMIZERS[opt], batches, batched=False)
    assert checkpointed.times == [0, 2, 4, 5]
    assert full.times == list(range(6))
    assert_nontrivial(full)
    assert_same(full, sequential)
    _same_at_checkpoints(checkpointed, full)


def test_checkpointed_unroll_per_element_lr() -> None:
    """Meta-SGD lrs through a checkpointed batched unroll: the sequential meta-gradients."""
    from ._common import meta_sgd

    batches = task_batches("conv", steps=4)
    checkpointed = run("conv", meta_sgd, batches, batched=True, unroll=True, checkpoint_every=2)
    sequential = run("conv", meta_sgd, batches, batched=False)
    _same_at_checkpoints(checkpointed, sequential)


@pytest.mark.parametrize("model", ["mlp", "mlp-vmap", "conv"])
def test_checkpointed_unroll_replays_dropout(model: str) -> None:
    """With Dropout (independent masks per task), a checkpointed batched unroll has the
    full unroll's weights and meta-gradients when both start from the same seed."""
    make = mlp if model.startswith("mlp") else convnet
    wrap = model.endswith("vmap")
    name = "mlp" if model.startswith("mlp") else "conv"
    batches = task_batches(name, steps=4)

    def go(checkpoint_every: int | None) -> Result:
        net = make(dropout=0.3)
        torch.manual_seed(5)
        return run(name, OPTIMIZERS["adam"], batches, batched=True, unroll=True,
                   checkpoint_every=checkpoint_every, model=Wrapped(net) if wrap else net)

    full = go(None)
    assert_nontrivial(full)
    _same_at_checkpoints(go(2), full)
    other_seed = run(name, OPTIMIZERS["adam"], batches, batched=True, unroll=True,
                     model=Wrapped(make(dropout=0.3)) if wrap else make(dropout=0.3))
    assert not torch.allclose(other_seed.query, full.query)  # the masks matter


@pytest.mark.parametrize("model", list(MODELS))
def test_unroll_equals_step_loop(model: str) -> None:
    """loft.unroll without checkpoints is the loop of diffopt.step calls, batched."""
    batches = task_batches(model, steps=2)
    unrolled = run(model, OPTIMIZERS["nesterov"], batches, batched=True, unroll=True)
    looped = run(model, OPTIMIZERS["nesterov"], batches, batched=True)
    assert_same(unrolled, looped)


def test_checkpointed_unroll_then_parameters_time() -> None:
    """After a checkpointed batched unroll, parameters(time=t) at a checkpoint is [N, ...]
    and a step between checkpoints is an IndexError."""
    import loft

    batches = task_batches("mlp", steps=4)
    net = mlp()
    with loft.innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=0.1),
                            tasks=3) as (fmodel, diffopt):
        loft.unroll(fmodel, diffopt, lambda f, b: ((f(b[0]) - b[1]) ** 2).flatten(1).mean(1),
                    batches[:-1], checkpoint_every=2)
        assert fmodel.recorded_times == [0, 2, 4]
        for t in (0, 2, 4):
            assert [p.shape for p in fmodel.parameters(time=t)] == [
                (3, *p.shape) for p in net.parameters()]
        for t in (1, 3):
            with pytest.raises(IndexError, match=f"time={t}"):
                fmodel.parameters(time=t)
        close(torch.cat([p.flatten() for p in fmodel.parameters(time=0)]),
              torch.cat([p.detach().expand(3, *p.shape).flatten() for p in net.parameters()]),
              "the initial weights")
