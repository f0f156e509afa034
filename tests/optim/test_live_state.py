"""``diffopt.state`` behaves as higher's plain dicts: reads, assignments, in-place changes
and deletions between steps take effect at the next step.

SGD cases run side by side with higher 0.2.1 in float64 (its numbers follow torch.optim
there); Adam cases compare with torch.optim, whose formula loft follows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import higher
import pytest
import torch
from torch import nn

import loft

from ._tiny import tiny_batches, tiny_mlp

F64 = dict(rtol=1e-12, atol=1e-12)


_model, _batches = tiny_mlp, tiny_batches


def _sgd_run(lib: Any, change: Callable[[Any, int], None], steps: int = 4,
             **sgd: Any) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """An inner loop of SGD with momentum that calls ``change(diffopt, t)`` after step t;
    returns the final fast weights and the meta-gradients on the model's weights."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), **{"lr": 0.1, "momentum": 0.9,
                                                  "dampening": 0.1, **sgd})
    xs = _batches(steps + 1)
    with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for t in range(steps):
            diffopt.step(fmodel(xs[t]).pow(2).sum())
            change(diffopt, t)
        loss = fmodel(xs[-1]).pow(2).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return [p.detach() for p in fmodel.parameters()], grads


def _detach_all(diffopt: Any, t: int) -> None:
    if t == 1:
        for group_state in diffopt.state:
            for entry in group_state.values():
                entry["momentum_buffer"].detach_()


def _zero_one(diffopt: Any, t: int) -> None:
    if t == 1:
        diffopt.state[0][0]["momentum_buffer"].zero_()


def _scale_one(diffopt: Any, t: int) -> None:
    if t == 2:
        diffopt.state[0][1]["momentum_buffer"].mul_(0.5)


def _assign_one(diffopt: Any, t: int) -> None:
    if t == 1:
        diffopt.state[0][2]["momentum_buffer"] = torch.full((2, 4), 0.25, dtype=torch.float64)


def _delete_one(diffopt: Any, t: int) -> None:
    if t == 1:
        del diffopt.state[0][3]["momentum_buffer"]


def _clear_one(diffopt: Any, t: int) -> None:
    if t == 2:
        diffopt.state[0][0].clear()


def _detach_then_leaf(diffopt: Any, t: int) -> None:
    if t == 1:
        diffopt.state[0][0]["momentum_buffer"].detach_().requires_grad_()


_HELD: dict[str, Any] = {}


def _hold_a_dict(diffopt: Any, t: int) -> None:
    """Keeps a tensor's dict across steps: it must show each step's new buffer."""
    if t == 0:
        _HELD["entry"] = diffopt.state[0][0]
    else:
        entry = _HELD["entry"]
        assert entry is diffopt.state[0][0]
        entry["momentum_buffer"] = entry["momentum_buffer"] * 1.5


CHANGES = [_detach_all, _zero_one, _scale_one, _assign_one, _delete_one, _clear_one,
           _detach_then_leaf, _hold_a_dict]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_changes_to_the_state_take_effect_as_in_higher(change: Callable[[Any, int], None]) -> None:
    weights, grads = _sgd_run(loft, change)
    ref_weights, ref_grads = _sgd_run(higher, change)
    for a, b in zip(weights + list(grads), ref_weights + list(ref_grads)):
        torch.testing.assert_close(a, b, **F64)


def test_the_changes_matter() -> None:
    """The scenarios above are not no-ops: each one changes the meta-gradients."""
    _, plain = _sgd_run(loft, lambda d, t: None)
    for change in CHANGES:
        _, changed = _sgd_run(loft, change)
        assert any(not torch.allclose(a, b) for a, b in zip(plain, changed)), change.__name__


def test_state_values_carry_the_graph_as_in_higher() -> None:
    """A meta-loss on a state tensor differentiates through the inner loop."""

    def scenario(lib: Any) -> tuple[torch.Tensor, ...]:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        xs = _batches(3)
        with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for x in xs:
                diffopt.step(fmodel(x).pow(2).sum())
            buffer = diffopt.state[0][2]["momentum_buffer"]
            assert buffer._base is None  # not a view: detach_() works on it
            return torch.autograd.grad(buffer.pow(2).sum(), list(model.parameters()))

    for a, b in zip(scenario(loft), scenario(higher)):
        torch.testing.assert_close(a, b, **F64)


class _FirstTwo(nn.Module):
    """Three layers, of which the forward uses two."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_layout_and_keys_as_in_higher() -> None:
    """Per group a dict of per-tensor dicts; SGD without momentum keeps nothing, with
    momentum only its buffer; a tensor without a gradient has no entry."""
    for lib in (loft, higher):
        model = _FirstTwo().double()
        opt = torch.optim.SGD([{"params": model.a.parameters()},
                               {"params": list(model.b.parameters())
                                + list(model.c.parameters()), "momentum": 0.9}], lr=0.1)
        with lib.innerloop_ctx(model, opt) as (fmodel, diffopt):
            diffopt.step(fmodel(_batches(1)[0]).sum())  # model.c gets no gradient
            state = diffopt.state
            assert isinstance(state, list) and len(state) == 2, lib
            assert dict(state[0]) == {}, lib
            assert sorted(state[1]) == [0, 1], lib
            assert all(sorted(entry) == ["momentum_buffer"] for entry in state[1].values())


def test_adam_state_keys_and_step_counts_as_in_higher() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert all(len(group) == 0 for group in diffopt.state)
        for x in _batches(2):
            diffopt.step(fmodel(x).pow(2).sum())
        entry = diffopt.state[0][0]
        assert sorted(entry) == ["exp_avg", "exp_avg_sq", "step"]
        assert entry["step"] == 2 and isinstance(entry["step"], int)


def _adam_reference(change: Callable[[dict, int], None], steps: int = 4,
                    **adam: Any) -> list[torch.Tensor]:
    """The same loop with torch.optim.Adam on detached copies, ``change`` applied to its
    per-parameter state (the fast weights' values, which loft's Adam must follow)."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, **adam)
    for t, x in enumerate(_batches(steps)):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        change({j: opt.state[p] for j, p in enumerate(model.parameters())}, t)
    return [p.detach() for p in model.parameters()]


def _adam_loft(change: Callable[[dict, int], None], steps: int = 4,
               **adam: Any) -> list[torch.Tensor]:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, **adam)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for t, x in enumerate(_batches(steps)):
            diffopt.step(fmodel(x).pow(2).sum())
            change(diffopt.state[0], t)
        return [p.detach() for p in fmodel.parameters()]


def _adam_zero_moments(state: dict, t: int) -> None:
    if t == 1:
        state[0]["exp_avg"].zero_()
        state[1]["exp_avg_sq"].mul_(4.0)


def _adam_restart_counts(state: dict, t: int) -> None:
    if t == 2:
        for entry in state.values():
            entry["step"] = entry["step"] * 0 if isinstance(entry["step"], torch.Tensor) else 0


def _adam_reset(state: dict, t: int) -> None:
    if t == 1:
        state[2].clear()  # torch.optim.Adam then starts the tensor afresh


@pytest.mark.parametrize("change", [_adam_zero_moments, _adam_restart_counts, _adam_reset],
                         ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_state_changes_follow_torch(change: Callable[[dict, int], None],
                                         amsgrad: bool) -> None:
    expected = _adam_reference(change, amsgrad=amsgrad)
    got = _adam_loft(change, amsgrad=amsgrad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **F64)
    unchanged = _adam_loft(lambda s, t: None, amsgrad=amsgrad)
    assert any(not torch.allclose(a, b) for a, b in zip(got, unchanged))


def test_state_imported_from_the_torch_optimizer() -> None:
    """Before the first step diffopt.state is a copy of the torch optimizer's state
    (step counts as torch keeps them); changing it changes the first step."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for x in _batches(2, seed=5):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    params = list(model.parameters())
    for lib in (loft, higher):
        diffopt = lib.optim.get_diff_optim(opt, params, fmodel=lib.monkeypatch(model))
        entry = diffopt.state[0][0]
        assert torch.equal(entry["exp_avg"], opt.state[params[0]]["exp_avg"])
        assert entry["exp_avg"] is not opt.state[params[0]]["exp_avg"]
        assert isinstance(entry["step"], torch.Tensor) and float(entry["step"]) == 2.0

    def first_step(zero: bool) -> list[torch.Tensor]:
        fmodel = loft.monkeypatch(model)
        diffopt = loft.optim.get_diff_optim(opt, params, fmodel=fmodel)
        if zero:
            diffopt.state[0][0]["exp_avg"].zero_()
        diffopt.step(fmodel(_batches(1)[0]).pow(2).sum())
        return [p.detach() for p in fmodel.parameters()]

    expected = []
    for zero in (False, True):
        torch_model = _model()
        torch_model.load_state_dict(model.state_dict())
        torch_opt = torch.optim.Adam(torch_model.parameters(), lr=0.05)
        torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if zero:
            torch_opt.state[next(iter(torch_model.parameters()))]["exp_avg"].zero_()
        torch_model(_batches(1)[0]).pow(2).sum().backward()
        torch_opt.step()
        expected.append([p.detach() for p in torch_model.parameters()])
    for zero, want in zip((False, True), expected):
        for a, b in zip(first_step(zero), want):
            torch.testing.assert_close(a, b, **F64)
    # A step count imported as a tensor stays a tensor after a step (as in higher).
    fmodel = loft.monkeypatch(model)
    diffopt = loft.optim.get_diff_optim(opt, params, fmodel=fmodel)
    diffopt.step(fmodel(_batches(1)[0]).pow(2).sum())
    step = diffopt.state[0][0]["step"]
    assert isinstance(step, torch.Tensor) and float(step) == 3.0


def test_assigning_the_whole_state() -> None:
    """``diffopt.state = other.state`` hands one inner loop's state to another."""

    def scenario(lib: Any) -> list[torch.Tensor]:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        xs = _batches(4)
        first = lib.optim.get_diff_optim(opt, model.parameters(),
                                         fmodel=lib.monkeypatch(model))
        for x in xs[:2]:
            first.step(first._fmodel(x).pow(2).sum())
        fmodel = lib.monkeypatch(model)
        second = lib.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
        second.state = first.state
        for x in xs[2:]:
            second.step(fmodel(x).pow(2).sum())
        return [p.detach() for p in fmodel.parameters()]

    for a, b in zip(scenario(loft), scenario(higher)):
        torch.testing.assert_close(a, b, **F64)


def _graph_size(tensors: list[torch.Tensor]) -> int:
    seen: set[int] = set()
    stack = [t.grad_fn for t in tensors]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def test_reading_the_state_leaves_the_fast_path_as_it_is() -> None:
    """Reading the state (without changing it) adds nothing to the steps' graph: the next
    step still takes the flat state as it is; a change rebuilds it from the dicts."""

    def graph(read: bool, change: bool) -> int:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for t, x in enumerate(_batches(3)):
                diffopt.step(fmodel(x).pow(2).sum())
                if read and t == 0:
                    _ = [entry["momentum_buffer"].sum() for entry in diffopt.state[0].values()]
                if change and t == 0:
                    diffopt.state[0][0]["momentum_buffer"].mul_(1.0)
            return _graph_size(list(fmodel.parameters()))

    untouched = graph(read=False, change=False)
    assert graph(read=True, change=False) == untouched
    assert graph(read=True, change=True) > untouched


def test_truncate_and_unroll_after_changing_the_state() -> None:
    """``truncate()`` and ``loft.unroll`` start from the changed state."""

    def run(kind: str) -> list[torch.Tensor]:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        xs = _batches(5)
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(fmodel(xs[0]).pow(2).sum())
            diffopt.state[0][0]["momentum_buffer"].zero_()
            if kind == "truncate":
                diffopt.truncate()
                for x in xs[1:]:
                    diffopt.step(fmodel(x).pow(2).sum())
            elif kind == "unroll":
                loft.unroll(fmodel, diffopt, lambda f, x: f(x).pow(2).sum(), xs[1:],
                            checkpoint_every=2)
            else:
                for x in xs[1:]:
                    diffopt.step(fmodel(x).pow(2).sum())
            return [p.detach() for p in fmodel.parameters()]

    plain = run("plain")
    for kind in ("truncate", "unroll"):
        for a, b in zip(run(kind), plain):
            torch.testing.assert_close(a, b, **F64)


def test_a_state_value_of_the_wrong_shape_is_named() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(fmodel(_batches(1)[0]).sum())
        diffopt.state[0][1]["momentum_buffer"] = torch.zeros(7, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"diffopt\.state\[0\]\[1\]\['momentum_buffer'\] "
                                             r"has shape \[7\].*\[4\]"):
            diffopt.step(fmodel(_batches(1)[0]).sum())
