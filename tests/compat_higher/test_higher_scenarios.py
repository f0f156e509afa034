"""The scenarios higher's own test-suite exercises, run on ``import loft as higher``.

Written for loft (not copied): a sweep of model shapes (plain, a submodule shared under
two names, a layer reused in a Sequential, a partially used model, BatchNorm) through
the patched forward, backward, a hand-written unroll via ``fast_params``, innerloop_ctx,
mini-MAML at train and test time, and recurrent modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import loft as higher


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _SharedSubmodule(nn.Module):
    """One Linear reachable as ``first.inner`` and ``second.inner``."""

    def __init__(self) -> None:
        super().__init__()
        self.first = _Wrap(nn.Linear(4, 2))
        self.second = _Wrap(self.first.inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x) * self.second(x).tanh()


class _HalfUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Parameter(torch.rand(4, 3))
        self.unused = nn.Parameter(torch.rand(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.used


def _plain() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 4, bias=False), nn.Sigmoid(),
                         nn.Linear(4, 2))


def _reused_in_sequential() -> nn.Module:
    layer = nn.Linear(4, 4)
    return nn.Sequential(layer, nn.Tanh(), layer, nn.Sigmoid(), nn.Linear(4, 2))


def _batchnorm() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3), nn.Linear(3, 2))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "plain": _plain,
    "shared_submodule": _SharedSubmodule,
    "reused_in_sequential": _reused_in_sequential,
    "partially_used": _HalfUsed,
    "batchnorm": _batchnorm,
}


@pytest.fixture(params=list(MODELS))
def model(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[request.param]()


def _used_mask(model: nn.Module) -> list[bool]:
    loss = model(torch.rand(8, 4)).sum().pow(2)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return [g is not None for g in grads]


def test_make_functional_is_callable() -> None:
    assert callable(higher.patch.make_functional(nn.Linear(4, 3)))


def test_patched_weights_equal_the_module_weights(model: nn.Module) -> None:
    fmodel = higher.patch.monkeypatch(model)
    copies = higher.utils.get_func_params(model)
    for original, copied, fast in zip(model.parameters(), copies, fmodel.parameters()):
        assert torch.equal(original, copied) and torch.equal(original, fast)
        assert fast is not original


def test_forward_and_backward_match_the_module(model: nn.Module) -> None:
    fmodel = higher.patch.monkeypatch(model)
    for _ in range(3):
        x = torch.rand(8, 4)
        torch.testing.assert_close(fmodel(x), model(x))
        model(x).sum().pow(2).backward()
        fmodel(x).sum().pow(2).backward()
    for ref, fast in zip(model.parameters(), fmodel.parameters()):
        assert (ref.grad is None) == (fast.grad is None)
        if ref.grad is not None:
            torch.testing.assert_close(fast.grad, ref.grad)


def test_unroll_by_assigning_fast_params(model: nn.Module) -> None:
    mask = _used_mask(model)
    fmodel = higher.patch.monkeypatch(model)
    for _ in range(5):
        loss = fmodel(torch.rand(8, 4)).sum().pow(2)
        grads = torch.autograd.grad(loss, list(fmodel.parameters()), allow_unused=True,
                                    create_graph=True)
        fmodel.fast_params = [p if g is None else p - 0.1 * g
                              for p, g in zip(fmodel.parameters(), grads)]
    loss = fmodel(torch.rand(8, 4)).sum().pow(2)
    initial = [p for p, used in zip(fmodel.parameters(time=0), mask) if used]
    assert all(g is not None for g in torch.autograd.grad(loss, initial))


def test_innerloop_ctx_gradients_reach_initial_weights(model: nn.Module) -> None:
    mask = _used_mask(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(5):
            diffopt.step(fmodel(torch.rand(8, 4)).sum().pow(2))
        loss = fmodel(torch.rand(8, 4)).sum().pow(2)
        initial = [p for p, used in zip(fmodel.parameters(time=0), mask) if used]
        assert all(g is not None for g in torch.autograd.grad(loss, initial))


def test_mini_maml_gradients_land_on_the_model(model: nn.Module) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # 0.1 diverges on the BatchNorm model
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(5):
            diffopt.step(fmodel(torch.rand(8, 4)).sum().pow(2))
        total = sum(p.sum() for p in fmodel.parameters())
        via_history = torch.autograd.grad(total, list(fmodel.parameters(time=0)),
                                          retain_graph=True)
        total.backward()
    for p, g in zip(model.parameters(), via_history):
        torch.testing.assert_close(p.grad, g)


def test_mini_maml_at_test_time_keeps_no_graph(model: nn.Module) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
                              track_higher_grads=False) as (fmodel, diffopt):
        initial = list(fmodel.parameters(time=0))
        for _ in range(5):
            diffopt.step(fmodel(torch.rand(8, 4)).sum().pow(2))
        total = sum(p.sum() for p in fmodel.parameters())
        grads = torch.autograd.grad(total, initial, allow_unused=True)
        total.backward()
    assert all(g is None for g in grads)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("rnn_type", [nn.RNN, nn.LSTM, nn.GRU])
def test_recurrent_forward_and_unroll(rnn_type: type) -> None:
    torch.manual_seed(0)
    rnn = rnn_type(6, 8, 2)
    frnn = higher.patch.monkeypatch(rnn)
    x = torch.randn(5, 3, 6)
    out, state = rnn(x)
    fout, fstate = frnn(x)
    torch.testing.assert_close(fout, out)
    for s, fs in zip(state if isinstance(state, tuple) else (state,),
                     fstate if isinstance(fstate, tuple) else (fstate,)):
        torch.testing.assert_close(fs, s)
    loss = fout[-1].sum().pow(2)
    grads = torch.autograd.grad(loss, list(frnn.parameters()), allow_unused=True,
                                create_graph=True)
    frnn.fast_params = [p if g is None else p - 0.1 * g for p, g in zip(frnn.parameters(), grads)]
    final = frnn(torch.randn(5, 3, 6))[0].sum().pow(2)
    assert all(g is not None for g in torch.autograd.grad(final, list(frnn.parameters(time=0))))


@pytest.mark.parametrize("cell_type,select", [(nn.RNNCell, lambda s: s),
                                              (nn.LSTMCell, lambda s: s[0]),
                                              (nn.GRUCell, lambda s: s)])
def test_recurrent_cell_forward_and_unroll(cell_type: type, select: Callable) -> None:
    torch.manual_seed(0)
    cell = cell_type(6, 8)
    fcell = higher.patch.monkeypatch(cell)
    state = fstate = None
    for _ in range(4):
        x = torch.randn(3, 6)
        state, fstate = cell(x, state), fcell(x, fstate)
        torch.testing.assert_close(select(fstate), select(state))
    loss = select(fstate).sum().pow(2)
    grads = torch.autograd.grad(loss, list(fcell.parameters()), allow_unused=True,
                                create_graph=True)
    fcell.fast_params = [p if g is None else p - 0.1 * g
                         for p, g in zip(fcell.parameters(), grads)]
    final = select(fcell(torch.randn(3, 6), fstate)).sum().pow(2)
    assert all(g is not None for g in torch.autograd.grad(final, list(fcell.parameters(time=0))))


def test_submodule_direct_call_equals_root_call() -> None:
    module = _Wrap(nn.Linear(3, 4))
    fmodule = higher.monkeypatch(module)
    x = torch.randn(2, 3)
    assert torch.equal(fmodule(x), fmodule.inner(x))


def test_state_dicts_carry_an_inner_loop_back() -> None:
    """``opt.load_state_dict(diffopt.state_dict())`` and ``model.load_state_dict(
    fmodel.state_dict())`` continue exactly as plain torch training would."""
    import copy

    torch.manual_seed(0)
    model = _batchnorm().double()
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.01, amsgrad=True)
    data = [torch.rand(8, 4, dtype=torch.float64) for _ in range(6)]
    for chunk in (data[:3], data[3:]):
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for x in chunk:
                diffopt.step(fmodel(x).pow(2).sum())
                twin_opt.zero_grad()
                twin(x).pow(2).sum().backward()
                twin_opt.step()
        opt.load_state_dict(diffopt.state_dict())
        model.load_state_dict(fmodel.state_dict())
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert int(opt.state[p]["step"]) == int(twin_opt.state[q]["step"]) == 6
        torch.testing.assert_close(opt.state[p]["max_exp_avg_sq"], twin_opt.state[q]["max_exp_avg_sq"])


def test_sgd_state_dict_matches_torch_layout() -> None:
    torch.manual_seed(0)
    model = _plain()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(fmodel(torch.rand(8, 4)).sum().pow(2))
    exported = diffopt.state_dict()
    assert sorted(exported["state"]) == list(range(len(list(model.parameters()))))
    assert all(set(st) == {"momentum_buffer"} for st in exported["state"].values())
    opt.load_state_dict(exported)
    assert opt.param_groups[0]["lr"] == 0.1


def _assert_same_setting(key: str, actual: Any, expected: Any) -> None:
    """``actual`` has ``expected``'s type and value: exactly for None, bools, ints and
    strings, to 1e-7 relative for floats (element by element in tuples such as betas)."""
    assert type(actual) is type(expected), (key, actual, expected)
    if isinstance(expected, tuple):
        assert len(actual) == len(expected), (key, actual, expected)
        for actual_item, expected_item in zip(actual, expected):
            _assert_same_setting(key, actual_item, expected_item)
    elif isinstance(expected, float):
        # The learnable copies are float32 tensors (as in higher): equal to 1e-7.
        assert actual == pytest.approx(expected, rel=1e-7), (key, actual, expected)
    else:
        assert actual == expected, (key, actual, expected)


def test_apply_trainable_opt_params_keeps_types() -> None:
    model = _plain()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    override = higher.optim.get_trainable_opt_params(opt)
    other = torch.optim.Adam(model.parameters(), lr=5.0)
    higher.optim.apply_trainable_opt_params(other, override)
    assert other.param_groups[0].keys() == opt.param_groups[0].keys()
    for key, value in opt.param_groups[0].items():
        if key != "params":
            _assert_same_setting(key, other.param_groups[0][key], value)


@pytest.mark.parametrize("opt_type,kwargs", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.optim.Adam, {"lr": 0.01}), (torch.optim.AdamW, {"lr": 0.01}),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}), (torch.optim.Adadelta, {"lr": 1.0}),
    (torch.optim.Adamax, {"lr": 0.01}), (torch.optim.ASGD, {"lr": 0.01, "t0": 1}),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    (torch.optim.Rprop, {"lr": 0.01}),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_every_optimizer_state_dict_continues_in_torch(opt_type: type, kwargs: dict) -> None:
    """Two inner steps, then the torch optimiser takes over with diffopt's state: the
    third step equals three plain torch steps."""
    import copy

    torch.manual_seed(0)
    model = _plain().double()
    twin = copy.deepcopy(model)
    opt, twin_opt = opt_type(model.parameters(), **kwargs), opt_type(twin.parameters(), **kwargs)
    data = [torch.rand(8, 4, dtype=torch.float64) for _ in range(3)]
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x in data[:2]:
            diffopt.step(fmodel(x).pow(2).sum())
    opt.load_state_dict(diffopt.state_dict())
    model.load_state_dict(fmodel.state_dict())
    opt.zero_grad()
    model(data[2]).pow(2).sum().backward()
    opt.step()
    for x in data:
        twin_opt.zero_grad()
        twin(x).pow(2).sum().backward()
        twin_opt.step()
    # torch keeps ASGD's eta and mu as float32 scalars under the default dtype: its steps
    # then differ from loft's float64 eta within float32's epsilon (1.2e-7) relative.
    rtol = 5e-7 if opt_type is torch.optim.ASGD else 1e-10
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-12)
