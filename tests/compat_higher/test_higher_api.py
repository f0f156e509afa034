"""``import loft as higher``: each behaviour run side by side with higher 0.2.1, in float64.

Every test runs the same scenario with ``lib=loft`` and ``lib=higher`` and compares the
fast weights, histories and meta-gradients. SGD (with momentum) is used where higher's
numbers follow torch.optim; Adam cases compare with torch.optim elsewhere.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import higher
import pytest
import torch
from torch import nn

import loft

F64 = dict(rtol=1e-12, atol=1e-12)
LIBS = (loft, higher)


def _data(seed: int = 0, n: int = 6, d_in: int = 4, d_out: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=gen, dtype=torch.float64),
            torch.randn(n, d_out, generator=gen, dtype=torch.float64))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _compare(a: Any, b: Any, **tol: float) -> None:
    """Nested lists/tuples of tensors (or None) are equal."""
    tol = tol or F64
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            _compare(x, y, **tol)
    elif a is None or b is None:
        assert a is None and b is None, (a, b)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
    else:
        assert a == b


def _both(scenario: Callable[[Any], Any], **tol: float) -> Any:
    results = [scenario(lib) for lib in LIBS]
    _compare(results[0], results[1], **tol)
    return results[0]


def _history(fmodel: Any, steps: int) -> list[list[torch.Tensor]]:
    return [[p.detach().clone() for p in fmodel.parameters(time=t)] for t in range(steps + 1)]


# ---- parameters ---------------------------------------------------------------------------


def test_param_groups_with_per_group_hyperparameters() -> None:
    def scenario(lib: Any) -> Any:
        model = _mlp()
        opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.3, "momentum": 0.9},
                               {"params": model[2].parameters(), "weight_decay": 0.1}],
                              lr=0.1, momentum=0.5)
        x, y = _data()
        with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(((fmodel(x) - y) ** 2).mean())
            meta = ((fmodel(x) - y) ** 2).sum()
            return _history(fmodel, 3), torch.autograd.grad(meta, list(model.parameters()))

    _both(scenario)


class _TiedInModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.encoder(x)))


@pytest.mark.parametrize("kind", ["module", "sequential"])
def test_tied_parameters(kind: str) -> None:
    def scenario(lib: Any) -> Any:
        torch.manual_seed(0)
        if kind == "module":
            model = _TiedInModule().double()
        else:
            shared = nn.Linear(4, 4)
            model = nn.Sequential(shared, nn.Tanh(), shared).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, _ = _data(d_out=4)
        with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step((fmodel(x) ** 2).mean())
            meta = (fmodel(x) ** 2).sum()
            assert len(list(fmodel.parameters())) == len(list(model.parameters()))
            return _history(fmodel, 3), torch.autograd.grad(meta, list(model.parameters()))

    _both(scenario)


class _Partial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()
        self.extra = nn.Linear(3, 3).double()
        self.frozen = nn.Linear(3, 3).double().requires_grad_(False)

    def forward(self, x: torch.Tensor, use_extra: bool = True) -> torch.Tensor:
        out = self.frozen(self.body(x))
        return self.extra(out) if use_extra else out


def test_partially_used_and_frozen_parameters() -> None:
    def scenario(lib: Any) -> Any:
        model = _Partial()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _data()
        with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for step in range(4):
                # "extra" is used in every other step only; "frozen" always, never trained.
                diffopt.step(((fmodel(x, use_extra=bool(step % 2)) - y) ** 2).mean())
            meta = ((fmodel(x) - y) ** 2).sum()
            trainable = [p for p in model.parameters() if p.requires_grad]
            return _history(fmodel, 4), torch.autograd.grad(meta, trainable)

    _both(scenario)


# ---- optimiser options ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["construction", "step"])
def test_grad_callback(where: str) -> None:
    def clip(grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        return [None if g is None else g.clamp(-0.05, 0.05) * 2 for g in grads]

    def scenario(lib: Any) -> Any:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        x, y = _data()
        fmodel = lib.monkeypatch(model, copy_initial_weights=False)
        kwargs = {"grad_callback": clip} if where == "construction" else {}
        diffopt = lib.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel, **kwargs)
        for _ in range(3):
            step_kwargs = {"grad_callback": clip} if where == "step" else {}
            diffopt.step(((fmodel(x) - y) ** 2).mean(), **step_kwargs)
        meta = ((fmodel(x) - y) ** 2).sum()
        return _history(fmodel, 3), torch.autograd.grad(meta, list(model.parameters()))

    _both(scenario)


@pytest.mark.parametrize("where", ["construction", "step"])
def test_override_with_tensors(where: str) -> None:
    def scenario(lib: Any) -> Any:
        model = _mlp()
        lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        mom = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        wd = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
        override = {"lr": [lr], "momentum": [mom], "weight_decay": [wd]}
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, weight_decay=0.1)
        x, y = _data()
        ctx_override = override if where == "construction" else None
        with lib.innerloop_ctx(model, opt, override=ctx_override) as (fmodel, diffopt):
            for step in range(3):
                step_override = override if where == "step" and step == 0 else None
                diffopt.step(((fmodel(x) - y) ** 2).mean(), override=step_override)
            meta = ((fmodel(x) - y) ** 2).sum()
            return _history(fmodel, 3), torch.autograd.grad(meta, [lr, mom, wd])

    _both(scenario, rtol=1e-10, atol=1e-12)


def test_track_higher_grads_false() -> None:
    def scenario(lib: Any) -> Any:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _data()
        with lib.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
            for _ in range(3):
                new = diffopt.step(((fmodel(x) - y) ** 2).mean())
            assert all(p.grad_fn is None and p.requires_grad for p in new)
            return [p.detach() for p in fmodel.parameters()]

    _both(scenario)


@pytest.mark.parametrize("copy_initial_weights", [True, False])
def test_copy_initial_weights(copy_initial_weights: bool) -> None:
    def scenario(lib: Any) -> Any:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _data()
        with lib.innerloop_ctx(model, opt, copy_initial_weights=copy_initial_weights) as (
                fmodel, diffopt):
            for _ in range(2):
                diffopt.step(((fmodel(x) - y) ** 2).mean())
            ((fmodel(x) - y) ** 2).sum().backward()
            initial = [p.grad if p.is_leaf else None for p in fmodel.parameters(time=0)]
        return [p.grad for p in model.parameters()], initial

    model_grads, initial_grads = _both(scenario)
    assert all((g is None) == copy_initial_weights for g in model_grads)
    assert all((g is not None) == copy_initial_weights for g in initial_grads)


def test_device_argument() -> None:
    def scenario(lib: Any) -> Any:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _data()
        with lib.innerloop_ctx(model, opt, device=torch.device("cpu")) as (fmodel, diffopt):
            diffopt.step(((fmodel(x) - y) ** 2).mean())
            assert all(p.device.type == "cpu" for p in fmodel.parameters())
            return [p.detach() for p in fmodel.parameters()]

    _both(scenario)


def test_create_diff_optim_and_register_optim() -> None:
    def scenario(lib: Any) -> Any:
        model = _mlp()
        fmodel = lib.monkeypatch(model)
        diffopt = lib.create_diff_optim(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9},
                                        fmodel=fmodel)
        x, y = _data()
        for _ in range(2):
            diffopt.step(((fmodel(x) - y) ** 2).mean())
        return [p.detach() for p in fmodel.parameters()]

    _both(scenario)


def test_user_subclass_with_per_tensor_update_is_registrable() -> None:
    """higher-style user code: subclass DifferentiableOptimizer, write _update, register."""

    class SignSGD(torch.optim.SGD):
        pass

    def make_diff(lib: Any) -> type:
        class DifferentiableSignSGD(lib.optim.DifferentiableOptimizer):
            def _update(self, grouped_grads: list, **kwargs: Any) -> None:
                for group, grads in zip(self.param_groups, grouped_grads):
                    for i, (p, g) in enumerate(zip(group["params"], grads)):
                        if g is not None:
                            group["params"][i] = p - group["lr"] * torch.tanh(g * 10)

        return DifferentiableSignSGD

    def scenario(lib: Any) -> Any:
        lib.register_optim(SignSGD, make_diff(lib))
        model = _mlp()
        opt = SignSGD(model.parameters(), lr=0.05)
        x, y = _data()
        with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(((fmodel(x) - y) ** 2).mean())
            meta = ((fmodel(x) - y) ** 2).sum()
            return _history(fmodel, 2), torch.autograd.grad(meta, list(model.parameters()))

    _both(scenario)


def test_trainable_opt_params_round_trip() -> None:
    def scenario(lib: Any) -> Any:
        model = _mlp()
        opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.3},
                               {"params": model[2].parameters()}], lr=0.1, momentum=0.9)
        override = lib.optim.get_trainable_opt_params(opt)
        assert all(t.requires_grad for t in override["lr"])
        x, y = _data()
        with lib.innerloop_ctx(model, opt, override={"lr": override["lr"]}) as (fmodel, diffopt):
            diffopt.step(((fmodel(x) - y) ** 2).mean())
            meta = ((fmodel(x) - y) ** 2).sum()
            grads = torch.autograd.grad(meta, override["lr"])
        with torch.no_grad():
            for t, g in zip(override["lr"], grads):
                t -= g
        lib.optim.apply_trainable_opt_params(opt, {"lr": override["lr"]})
        return grads, [g["lr"] for g in opt.param_groups], sorted(override)

    _both(scenario)


# ---- the functional module -----------------------------------------------------------------


def test_fmodel_with_explicit_params_records_history() -> None:
    def scenario(lib: Any) -> Any:
        model = _mlp()
        fmodel = lib.monkeypatch(model)
        x, _ = _data()
        params = [p * 2 for p in fmodel.parameters()]
        out = fmodel(x, params=params)
        assert fmodel.fast_params[0] is params[0]
        assert len(fmodel._fast_params) == 2
        init = fmodel.init_fast_params
        fmodel.update_params([p + 1 for p in params])
        return out, [p.detach() for p in init], [p.detach() for p in fmodel.fast_params], \
            _history(fmodel, 2)

    _both(scenario)


def test_direct_call_of_patched_submodule() -> None:
    """``fmodel[0](x)`` runs that layer on the current fast weights. (higher 0.2.1 fails
    here with an AttributeError, so the oracle is the layer's functional form.)"""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(((fmodel(x) - y) ** 2).mean())
        w0, b0, w2, b2 = fmodel.parameters()
        assert fmodel[0].weight is w0 and fmodel[2].bias is b2
        hidden = fmodel[0](x)
        torch.testing.assert_close(hidden, torch.nn.functional.linear(x, w0, b0), **F64)
        out = fmodel[2](torch.tanh(hidden))
        torch.testing.assert_close(out, fmodel(x), **F64)
        assert [p is q for p, q in zip(fmodel[2].parameters(), (w2, b2))] == [True, True]
        # Gradients flow from a direct call back into the fast weights.
        assert torch.autograd.grad(out.sum(), w0) is not None


def test_assigning_a_tensor_to_a_patched_parameter() -> None:
    def scenario(lib: Any) -> Any:
        torch.manual_seed(0)
        model = nn.Linear(4, 3).double()
        fmodel = lib.monkeypatch(model)
        x, _ = _data()
        new_weight = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
        fmodel.weight = new_weight
        out = fmodel(x)
        assert fmodel.weight is new_weight
        return out, len(fmodel._fast_params), torch.autograd.grad(out.sum(), new_weight)

    _both(scenario)


def test_assigning_a_tensor_to_a_patched_submodule_parameter() -> None:
    """Also on submodules (where higher 0.2.1 raises AttributeError)."""
    model = _mlp()
    fmodel = loft.monkeypatch(model)
    x, _ = _data()
    new_weight = torch.ones(3, 5, dtype=torch.float64, requires_grad=True)
    fmodel[2].weight = new_weight
    assert fmodel[2].weight is new_weight and len(fmodel._fast_params) == 2
    w0, b0, _, b2 = fmodel.parameters()
    want = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, w0, b0)),
                                      new_weight, b2)
    torch.testing.assert_close(fmodel(x), want, **F64)
    with pytest.raises(TypeError, match="expected a tensor"):
        fmodel[2].weight = 3.0


@pytest.mark.parametrize("module_type", [nn.RNN, nn.GRU, nn.LSTM, nn.RNNCell, nn.GRUCell,
                                         nn.LSTMCell])
def test_recurrent_modules(module_type: type) -> None:
    def scenario(lib: Any) -> Any:
        torch.manual_seed(0)
        model = module_type(3, 4).double()
        gen = torch.Generator().manual_seed(1)
        cell = module_type in (nn.RNNCell, nn.GRUCell, nn.LSTMCell)
        x = torch.randn(*((2, 3) if cell else (5, 2, 3)), generator=gen, dtype=torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def loss(out: Any) -> torch.Tensor:
            while isinstance(out, tuple):
                out = out[0]
            return (out ** 2).mean()

        with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(loss(fmodel(x)))
            meta = loss(fmodel(x))
            return _history(fmodel, 3), torch.autograd.grad(meta, list(model.parameters()))

    _both(scenario, rtol=1e-10, atol=1e-12)


def test_batchnorm_buffers_copied_then_diverge() -> None:
    def scenario(lib: Any) -> Any:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
        original = [b.clone() for b in model.buffers()]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _data()
        with lib.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(((fmodel(x) - y) ** 2).mean())
        for a, b in zip(original, model.buffers()):
            assert torch.equal(a, b), "the original model's buffers changed"
        patched = dict(fmodel.named_buffers()) if lib is higher else dict(fmodel.patched_buffers())
        return [patched[name] for name, _ in model.named_buffers()]

    running = _both(scenario)
    assert not torch.equal(running[0], torch.zeros_like(running[0]))


def test_batchnorm_write_back() -> None:
    """loft copies the patched module's running statistics back on request."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, _ = _data()
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).mean())
        fmodel.write_back_buffers()
        patched = dict(fmodel.patched_buffers())
    for name, buf in model.named_buffers():
        assert torch.equal(buf, patched[name])
    assert int(model[1].num_batches_tracked) == 1
    other = copy.deepcopy(model)
    with pytest.raises(KeyError, match="no buffer named"):
        fmodel.write_back_buffers(nn.Linear(1, 1))
    fmodel.write_back_buffers(other)


def test_train_and_eval_follow_the_patched_module() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).double()
    fmodel = loft.monkeypatch(model)
    x, _ = _data()
    fmodel.eval()
    assert model.training and not fmodel.training
    torch.testing.assert_close(fmodel(x), model.eval()(x))


# ---- errors: the same types as higher ---------------------------------------------------------


def _error_type(fn: Callable[[Any], Any], lib: Any) -> type | None:
    try:
        fn(lib)
    except Exception as error:  # noqa: BLE001 - the type is what we compare
        return type(error)
    return None


@pytest.mark.parametrize("misuse", [
    "step_without_params", "override_length", "unsupported_optimizer", "non_bool_tracking",
    "init_params_not_tracking", "history_before_weights", "call_without_weights",
])
def test_same_error_types_as_higher(misuse: str) -> None:
    def fn(lib: Any) -> None:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _data()
        if misuse == "step_without_params":
            lib.optim.get_diff_optim(opt, model.parameters()).step(model(x).sum())
        elif misuse == "override_length":
            lib.optim.get_diff_optim(opt, model.parameters(), override={"lr": [0.1, 0.2]})
        elif misuse == "unsupported_optimizer":
            lib.optim.get_diff_optim(torch.optim.LBFGS(model.parameters()), model.parameters())
        elif misuse == "non_bool_tracking":
            lib.monkeypatch(model).track_higher_grads = 1
        elif misuse == "init_params_not_tracking":
            _ = lib.monkeypatch(model, track_higher_grads=False).init_fast_params
        elif misuse == "history_before_weights":
            list(lib.patch.make_functional(model).parameters())
        elif misuse == "call_without_weights":
            lib.patch.make_functional(model)(x)

    expected = _error_type(fn, higher)
    assert expected is not None
    assert _error_type(fn, loft) is expected


# ---- where higher is wrong, loft is right ---------------------------------------------------


def test_not_tracking_time_zero_raises_instead_of_returning_latest() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        diffopt.step(((fmodel(x) - y) ** 2).mean())
        # higher's bug: time=0 silently returns the latest weights.
        assert list(fmodel.parameters(time=0))[0] is list(fmodel.parameters())[0]
    with loft.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        diffopt.step(((fmodel(x) - y) ** 2).mean())
        with pytest.raises(ValueError, match="only the latest parameters"):
            fmodel.parameters(time=0)
        assert list(fmodel.parameters(time=1))[0] is list(fmodel.parameters())[0]


@pytest.mark.parametrize("opt_type", [torch.optim.Adam, torch.optim.AdamW])
def test_gradcheck_with_respect_to_betas_and_eps(opt_type: type) -> None:
    """higher turns tensor betas/eps into floats; loft's meta-gradients pass gradcheck."""
    model = _mlp()
    x, y = _data()

    def meta_loss(b1: torch.Tensor, b2: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        opt = opt_type(model.parameters(), lr=0.05, weight_decay=0.01)
        with loft.innerloop_ctx(model, opt, override={"betas": [(b1, b2)], "eps": [eps]}) as (
                fmodel, diffopt):
            for _ in range(3):
                diffopt.step(((fmodel(x) - y) ** 2).mean())
            return ((fmodel(x) - y) ** 2).sum()

    inputs = (torch.tensor(0.8, dtype=torch.float64, requires_grad=True),
              torch.tensor(0.95, dtype=torch.float64, requires_grad=True),
              torch.tensor(0.01, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(meta_loss, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("opt_kwargs", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, nesterov=True),
                                        dict(lr=0.05, momentum=0.5, weight_decay=0.1)])
def test_meta_gradient_with_respect_to_intermediate_weights(opt_kwargs: dict) -> None:
    """d(meta-loss)/d(weights at step t) includes the path through every later update."""
    x, y = _data(3)

    def scenario(lib: Any) -> Any:
        model = _mlp(4)
        opt = torch.optim.SGD(model.parameters(), **opt_kwargs)
        with lib.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for _ in range(4):
                diffopt.step(nn.functional.mse_loss(fmodel(x), y))
            meta = nn.functional.mse_loss(fmodel(x), y)
            return [torch.autograd.grad(meta, list(fmodel.parameters(time=t)), retain_graph=True)
                    for t in range(5)]

    grads = _both(scenario)
    assert all(g.abs().sum() > 0 for g in grads[1])
