"""Long inner loops: ``loft.unroll`` with checkpointing, ``diffopt.truncate()`` and
``first_order=True``, checked in float64 against the full unroll."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import nn

import loft

F64 = dict(rtol=1e-11, atol=1e-12)

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.05)),
    "momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": (torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.95), weight_decay=0.01)),
    "adamw": (torch.optim.AdamW, dict(lr=0.02, weight_decay=0.1, amsgrad=True)),
}


def _model(seed: int = 0, dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(3, 6), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    if batchnorm:
        layers.append(nn.BatchNorm1d(6))
    layers.append(nn.Linear(6, 2))
    return nn.Sequential(*layers).double()


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 3, generator=gen, dtype=torch.float64),
             torch.randn(5, 2, generator=gen, dtype=torch.float64)) for _ in range(n)]


def _loss(fmodel: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(fmodel(x), y)


def _hyper(name: str) -> dict[str, list[Any]]:
    """Tensor hyperparameters that require grad, for every optimiser of the table."""
    t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True)  # noqa: E731
    _, kwargs = OPTIMIZERS[name]
    override: dict[str, list[Any]] = {"lr": [t(kwargs["lr"])]}
    if name == "momentum":
        override["momentum"] = [t(0.9)]
    if name == "adam":
        override["betas"] = [(t(0.8), t(0.95))]
    if name == "adamw":
        override["weight_decay"] = [t(0.1)]
    return override


def _leaves(override: dict[str, list[Any]]) -> list[torch.Tensor]:
    return [x for values in override.values() for v in values
            for x in (v if isinstance(v, tuple) else (v,))]


def _run(name: str, batches: Sequence[Any], checkpoint_every: int | None, *,
         model: nn.Module | None = None, loss_fn: Callable[..., torch.Tensor] = _loss,
         query: tuple[torch.Tensor, torch.Tensor] | None = None,
         ) -> tuple[torch.Tensor, list[torch.Tensor], list[list[torch.Tensor]], list[int]]:
    """Unroll, then the meta-loss and its gradients with respect to the model's weights
    and the tensor hyperparameters; also the recorded weights and their steps."""
    model = _model() if model is None else model
    opt_type, kwargs = OPTIMIZERS[name]
    opt = opt_type(model.parameters(), **kwargs)
    override = _hyper(name)
    query = _batches(1, seed=9)[0] if query is None else query
    with loft.innerloop_ctx(model, opt, copy_initial_weights=False,
                            override=override) as (fmodel, diffopt):
        loft.unroll(fmodel, diffopt, loss_fn, batches, checkpoint_every=checkpoint_every)
        meta = _loss(fmodel, query)
        wrt = list(model.parameters()) + _leaves(override)
        grads = list(torch.autograd.grad(meta, wrt))
        times = fmodel.recorded_times
        history = [[p.detach().clone() for p in fmodel.parameters(time=t)] for t in times]
    return meta.detach(), grads, history, times


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("k", [1, 3, 7, 20])
def test_checkpointed_unroll_equals_full_unroll(name: str, k: int) -> None:
    """Gradients with respect to the initial weights and every tensor hyperparameter equal
    the full unroll's, also when k does not divide T (T=7, k=3) and when k > T."""
    batches = _batches(7)
    meta_full, grads_full, history_full, times_full = _run(name, batches, None)
    meta, grads, history, times = _run(name, batches, k)
    torch.testing.assert_close(meta, meta_full, **F64)
    for g, ref in zip(grads, grads_full, strict=True):
        torch.testing.assert_close(g, ref, **F64)
    assert times_full == list(range(8))
    assert times == sorted({0, *range(k, 7, k), 7})
    for t, weights in zip(times, history):
        for w, ref in zip(weights, history_full[t]):
            torch.testing.assert_close(w, ref, **F64)


class _Replayable(Sequence):
    """An indexable sequence that records which steps were asked for."""

    def __init__(self, items: list[Any]) -> None:
        self.items, self.asked = items, []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: Any) -> Any:
        self.asked.append(i)
        return self.items[i]


def test_batches_as_any_sequence_and_replayed_identically() -> None:
    batches = _batches(5)
    reference = _run("adam", batches, None)
    seq = _Replayable(batches)
    seen: list[torch.Tensor] = []

    def loss_fn(fmodel: Any, batch: Any) -> torch.Tensor:
        seen.append(batch[0])
        return _loss(fmodel, batch)

    for given in (tuple(batches), seq):
        seen.clear()
        got = _run("adam", given, 2, loss_fn=loss_fn)
        for g, ref in zip(got[1], reference[1]):
            torch.testing.assert_close(g, ref, **F64)
    # Forward: one dry look at step 0, then steps 0..4; backward: segments [4], [2,3], [0,1].
    assert seq.asked == [0, 0, 1, 2, 3, 4, 4, 2, 3, 0, 1]
    assert all(seen[i] is batches[j][0] for i, j in enumerate(seq.asked))


def test_dropout_is_replayed_with_the_same_random_numbers() -> None:
    batches = _batches(6)
    results = []
    for k in (None, 4):
        torch.manual_seed(123)
        results.append(_run("adam", batches, k, model=_model(dropout=0.4)))
        after = torch.rand(())  # the global stream continues as after the full unroll
        results[-1][1].append(after)
    for g, ref in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g, ref, **F64)


def test_batchnorm_buffers_are_restored_per_segment() -> None:
    batches = _batches(6)
    outcomes = []
    for k in (None, 4):
        model = _model(batchnorm=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            loft.unroll(fmodel, diffopt, _loss, batches, checkpoint_every=k)
            stats = [b.clone() for _, b in fmodel.patched_buffers()]
            meta = _loss(fmodel, _batches(1, seed=5)[0])
            grads = torch.autograd.grad(meta, list(model.parameters()))
            after_backward = [b.clone() for _, b in fmodel.patched_buffers()]
        outcomes.append((stats, grads, after_backward))
    (stats_full, grads_full, after_full), (stats, grads, after_backward) = outcomes
    for a, b in zip(stats, stats_full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The query forward updated them once more; the recomputation left them as they were.
    for a, b in zip(after_backward, after_full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for g, ref in zip(grads, grads_full):
        torch.testing.assert_close(g, ref, **F64)
    assert int(stats[-1]) == 6  # num_batches_tracked


def test_loss_fn_tensors_that_require_grad_get_their_gradients() -> None:
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)

    def loss_fn(fmodel: Any, batch: Any) -> torch.Tensor:
        return scale * _loss(fmodel, batch)

    batches = _batches(5)
    grads = []
    for k in (None, 2):
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
            loft.unroll(fmodel, diffopt, loss_fn, batches, checkpoint_every=k)
            grads.append(torch.autograd.grad(_loss(fmodel, batches[0]), scale)[0])
    torch.testing.assert_close(grads[1], grads[0], **F64)
    assert grads[0].abs() > 0


def test_edge_cases_and_errors() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert loft.unroll(fmodel, diffopt, _loss, [], checkpoint_every=3) == []
        assert fmodel.recorded_times == [0]
        with pytest.raises(TypeError, match="cannot be replayed"):
            loft.unroll(fmodel, diffopt, _loss, iter(_batches(3)), checkpoint_every=2)
        for bad in (0, -1, 2.5, True, "2"):
            with pytest.raises(ValueError, match="checkpoint_every must be None or an int"):
                loft.unroll(fmodel, diffopt, _loss, _batches(2), checkpoint_every=bad)
        other = loft.monkeypatch(model)
        with pytest.raises(ValueError, match="fmodel=fmodel"):
            loft.unroll(other, diffopt, _loss, _batches(2), checkpoint_every=2)
        losses = loft.unroll(fmodel, diffopt, _loss, _batches(5), checkpoint_every=2)
        assert len(losses) == 5 and all(not loss.requires_grad for loss in losses)
        assert fmodel.recorded_times == [0, 2, 4, 5]
        with pytest.raises(IndexError, match=r"steps 0, 2, 4, 5 only"):
            fmodel.parameters(time=3)
        # A one-shot iterator is fine without checkpointing (nothing is replayed).
        loft.unroll(fmodel, diffopt, _loss, iter(_batches(2)))
        assert fmodel.recorded_times == [0, 2, 4, 5, 6, 7]


# ---- truncate ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_truncate_stops_the_meta_gradient_at_the_cut(name: str) -> None:
    """After truncate() at step 3, the meta-gradient with respect to the hyperparameters
    equals that of a loop started at step 3 from the same (detached) weights and state,
    and none reaches the initial weights."""
    batches = _batches(7)
    opt_type, kwargs = OPTIMIZERS[name]
    model = _model()
    override = _hyper(name)
    with loft.innerloop_ctx(model, opt_type(model.parameters(), **kwargs),
                            copy_initial_weights=False, override=override) as (fmodel, diffopt):
        for batch in batches[:3]:
            diffopt.step(_loss(fmodel, batch))
        cut = diffopt.truncate()
        assert all(p.grad_fn is None and p.requires_grad for p in cut)
        assert fmodel.recorded_times == [3]
        with pytest.raises(IndexError, match="cut by diffopt.truncate"):
            fmodel.parameters(time=1)
        with pytest.raises(ValueError, match="starts at step 3"):
            _ = fmodel.init_fast_params
        for entry in diffopt.state[0].values():
            assert all(v.grad_fn is None for v in entry.values() if isinstance(v, torch.Tensor))
        weights_at_cut = [p.detach().clone() for p in cut]
        state_at_cut = diffopt.state_dict()
        for batch in batches[3:]:
            diffopt.step(_loss(fmodel, batch))
        meta = _loss(fmodel, batches[0])
        grads = torch.autograd.grad(meta, _leaves(override))
        assert torch.autograd.grad(meta, list(model.parameters()), allow_unused=True) == \
            (None,) * len(list(model.parameters()))
        assert fmodel.recorded_times == [3, 4, 5, 6, 7]

    # The same from step 3, with a fresh optimiser carrying the cut's state.
    model2 = _model()
    with torch.no_grad():
        for p, w in zip(model2.parameters(), weights_at_cut):
            p.copy_(w)
    opt2 = opt_type(model2.parameters(), **kwargs)
    opt2.load_state_dict(state_at_cut)
    override2 = _hyper(name)
    with loft.innerloop_ctx(model2, opt2, override=override2) as (fmodel2, diffopt2):
        for batch in batches[3:]:
            diffopt2.step(_loss(fmodel2, batch))
        expected = torch.autograd.grad(_loss(fmodel2, batches[0]), _leaves(override2))
    for g, ref in zip(grads, expected):
        torch.testing.assert_close(g, ref, **F64)


def test_truncate_frees_the_graph_of_earlier_steps() -> None:
    """The flat buffers of the steps before a cut are no longer referenced."""
    import weakref

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(_loss(fmodel, _batches(1)[0]))
        watched = weakref.ref(list(fmodel.parameters())[0]._base)
        diffopt.step(_loss(fmodel, _batches(1)[0]))
        assert watched() is not None
        diffopt.truncate()
        diffopt.step(_loss(fmodel, _batches(1)[0]))
        assert watched() is None


# ---- first order ---------------------------------------------------------------------------

def test_first_order_sgd_gradient_is_the_query_gradient_at_the_final_weights() -> None:
    batches = _batches(4)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with loft.innerloop_ctx(model, opt, copy_initial_weights=False,
                            first_order=True) as (fmodel, diffopt):
        for batch in batches:
            diffopt.step(_loss(fmodel, batch))
        final = list(fmodel.parameters())
        meta = _loss(fmodel, batches[0])
        at_final = torch.autograd.grad(meta, final, retain_graph=True)
        at_initial = torch.autograd.grad(meta, list(model.parameters()))
    for a, b in zip(at_initial, at_final):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("tensor_hyper", [False, True])
def test_first_order_equals_detached_inner_gradients(name: str, tensor_hyper: bool) -> None:
    """first_order=True gives the meta-gradients of the full loop whose inner gradients
    are detached (by a grad_callback): the gradients are constants of the update."""
    batches = _batches(5)
    opt_type, kwargs = OPTIMIZERS[name]
    results = []
    for first_order in (True, False):
        model = _model()
        override = _hyper(name) if tensor_hyper else None
        detach = None if first_order else (lambda gs: [g.detach() for g in gs])
        opt = opt_type(model.parameters(), **kwargs)
        fmodel = loft.monkeypatch(model, copy_initial_weights=False)
        diffopt = loft.get_diff_optim(opt, model.parameters(), fmodel=fmodel, override=override,
                                      grad_callback=detach, first_order=first_order)
        for batch in batches:
            diffopt.step(_loss(fmodel, batch))
        meta = _loss(fmodel, batches[0])
        wrt = list(model.parameters()) + (_leaves(override) if override else [])
        results.append(torch.autograd.grad(meta, wrt))
    for g, ref in zip(*results):
        torch.testing.assert_close(g, ref, **F64)


def test_first_order_keeps_no_second_order_graph() -> None:
    """The inner gradients do not require grad, and without tensor hyperparameters or
    weight decay an Adam step keeps no optimiser state alive for the backward."""
    import weakref

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with loft.innerloop_ctx(model, opt, first_order=True) as (fmodel, diffopt):
        seen = []
        diffopt._grad_callback = lambda gs: seen.extend(gs) or gs
        diffopt.step(_loss(fmodel, _batches(1)[0]))
        assert seen and all(not g.requires_grad for g in seen if g is not None)
        watched = weakref.ref(diffopt.flat_state.buffers[0]["exp_avg"])
        diffopt.step(_loss(fmodel, _batches(1)[0]))
        # The state may have been updated in place (then it is still the optimiser's
        # current state): once the optimiser lets go of it, nothing holds it.
        diffopt.flat_state.buffers[0] = {}
        assert watched() is None
        assert list(fmodel.parameters())[0].requires_grad


def _count_in_place(monkeypatch: pytest.MonkeyPatch, enabled: bool) -> list[int]:
    """Counts the in-place-state kernel calls (``enabled=False``: there is none), through
    the step engine's use of :func:`loft.ops.inplace_kernel`."""
    calls = [0]
    original = loft.ops.inplace_kernel

    def inplace_kernel(op: Any, device: torch.device) -> Any:
        fn = original(op, device) if enabled else None
        if fn is None:
            return None

        def counted(*args: Any) -> Any:
            calls[0] += 1
            return fn(*args)

        return counted

    monkeypatch.setattr(loft.step, "inplace_kernel", inplace_kernel)
    return calls


@pytest.mark.parametrize("loop", ["steps", "truncate", "checkpoint", "state_views"])
def test_first_order_adam_state_in_place_changes_nothing(
        loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first-order Adam step updates the state in place when the optimiser alone holds
    it: the weights at every step, the state and the meta-gradients are bit for bit those
    of the step that makes new state; a view of the state the user holds, a truncation
    and the checkpoints of an unroll keep their values."""
    if loft.backend() != "fused":
        pytest.skip("the in-place state kernel is part of the fused ops")
    batches = _batches(9)
    runs = []
    for enabled in (True, False):
        with monkeypatch.context() as m:
            calls = _count_in_place(m, enabled)
            model = _model()
            opt = torch.optim.Adam(model.parameters(), lr=0.02, betas=(0.8, 0.95))
            held: list[tuple[torch.Tensor, torch.Tensor]] = []
            with loft.innerloop_ctx(model, opt, copy_initial_weights=False,
                                    first_order=True) as (fmodel, diffopt):
                if loop == "checkpoint":
                    loft.unroll(fmodel, diffopt, _loss, batches, checkpoint_every=4)
                else:
                    for t, batch in enumerate(batches):
                        if loop == "truncate" and t in (3, 6):
                            diffopt.truncate()
                        if loop == "state_views" and t in (2, 5):
                            view = diffopt.state[0][0]["exp_avg"]
                            held.append((view, view.clone()))
                        diffopt.step(_loss(fmodel, batch))
                weights = [p.detach().clone() for p in fmodel.parameters(time=len(batches))]
                state = diffopt.state_dict()["state"]
                _loss(fmodel, batches[0]).backward()
            for view, copy in held:
                assert torch.equal(view, copy), "a view of the state changed under the user"
            # (After a truncation the meta-gradient stops at the cut: no grad here.)
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            assert grads or loop == "truncate"
            runs.append((weights, state, grads, calls[0]))
    (w1, s1, g1, n1), (w2, s2, g2, n2) = runs
    # An unroll's checkpoints hold the state: it is never updated in place there.
    assert n2 == 0 and (n1 == 0 if loop == "checkpoint" else n1 >= 5), n1
    assert len(g1) == len(g2)
    for a, b in zip(w1 + g1, w2 + g2):
        assert torch.equal(a, b)
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s1[k][name], s2[k][name])


def test_checkpointed_unroll_leaves_no_reference_cycle() -> None:
    """The graph keeps what the recomputation needs, not the patched model: once the
    caller drops it (here before the meta-backward), everything is freed without the
    cyclic garbage collector."""
    import gc
    import weakref

    batches = _batches(6)

    def meta_loss(k: int | None) -> tuple[torch.Tensor, weakref.ref, nn.Module]:
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            loft.unroll(fmodel, diffopt, _loss, batches, checkpoint_every=k)
            return _loss(fmodel, batches[0]), weakref.ref(fmodel), model

    meta_loss(4)  # the first torch.optim.Adam in a process leaves frames in a cycle
    gc.collect()
    gc.disable()
    try:
        grads = []
        for k in (None, 4):
            loss, fmodel_ref, model = meta_loss(k)
            grads.append(torch.autograd.grad(loss, list(model.parameters())))
            del loss
            assert fmodel_ref() is None
    finally:
        gc.enable()
    for g, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, ref, **F64)
