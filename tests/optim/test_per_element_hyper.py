"""Per-element hyperparameters (Meta-SGD): a hyperparameter may be a tensor broadcastable
to each parameter of its group, as higher computes ``p - lr * g`` with broadcasting.

SGD's per-element lr runs side by side with higher 0.2.1 in float64; what higher cannot
run (a per-element weight decay or momentum, any other optimiser's) compares loft's flat
path with its per-tensor path (higher's ``_update``, one tensor at a time), and with the
per-group path where the values agree.
"""

from __future__ import annotations

from typing import Any

import higher
import pytest
import torch
from torch import nn

import loft

F64 = dict(rtol=1e-11, atol=1e-12)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 1)).double()


def _task(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(20, 1, generator=gen, dtype=torch.float64) * 10 - 5
    return x, torch.sin(x + 0.3) * 2


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **F64)


def _meta_sgd(lib: Any, lrs: list[torch.Tensor], steps: int = 3, opt_type: type = torch.optim.SGD,
              how: str = "override", **opt_kwargs: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Meta-SGD: one param group per parameter, each with a learned lr tensor shaped like
    it (or broadcastable to it); returns the final fast weights and the meta-gradients
    on the model's weights and on the lrs."""
    model = _model()
    x, y = _task()
    opt = opt_type([{"params": [p]} for p in model.parameters()], lr=0.01, **opt_kwargs)
    override = {"lr": lrs} if how == "override" else None
    with lib.innerloop_ctx(model, opt, copy_initial_weights=False,
                           override=override) as (fmodel, diffopt):
        for t in range(steps):
            if how == "param_groups":
                for group, lr in zip(diffopt.param_groups, lrs):
                    group["lr"] = lr * (1 + 0.1 * t)  # a new value at every step
            diffopt.step(nn.functional.mse_loss(fmodel(x[:10]), y[:10]))
        query = nn.functional.mse_loss(fmodel(x[10:]), y[10:])
        grads = torch.autograd.grad(query, [*model.parameters(), *lrs])
        return [p.detach() for p in fmodel.parameters()], list(grads)


def _lrs(shapes: list[torch.Size], seed: int = 2, broadcast: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        shape = (shape[0], 1) if broadcast and len(shape) == 2 else shape
        out.append((torch.rand(shape, generator=gen, dtype=torch.float64) * 0.02 + 0.005)
                   .requires_grad_())
    return out


@pytest.mark.parametrize("how", ["override", "param_groups"])
@pytest.mark.parametrize("broadcast", [False, True], ids=["shaped", "broadcast"])
@pytest.mark.parametrize("sgd", [{}, {"momentum": 0.9, "nesterov": True},
                                 {"momentum": 0.5, "weight_decay": 0.01}],
                         ids=["plain", "nesterov", "decay"])
def test_meta_sgd_as_in_higher(how: str, broadcast: bool, sgd: dict[str, Any]) -> None:
    shapes = [p.shape for p in _model().parameters()]
    weights, grads = _meta_sgd(loft, _lrs(shapes, broadcast=broadcast), how=how, **sgd)
    ref_weights, ref_grads = _meta_sgd(higher, _lrs(shapes, broadcast=broadcast), how=how, **sgd)
    _close(weights + grads, ref_weights + ref_grads)


def test_mixed_groups_as_in_higher() -> None:
    """Some groups per element, some a number, some a one-element tensor, in one bucket."""
    shapes = [p.shape for p in _model().parameters()]

    def lrs() -> list[Any]:
        per_element = _lrs(shapes)
        return [per_element[0], 0.01, torch.tensor(0.02, dtype=torch.float64,
                                                   requires_grad=True),
                per_element[3], 0.015, per_element[5]]

    def run(lib: Any) -> list[torch.Tensor]:
        values = lrs()
        model = _model()
        x, y = _task()
        opt = torch.optim.SGD([{"params": [p]} for p in model.parameters()], lr=0.01,
                              momentum=0.9)
        with lib.innerloop_ctx(model, opt, copy_initial_weights=False,
                               override={"lr": values}) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(nn.functional.mse_loss(fmodel(x[:10]), y[:10]))
            query = nn.functional.mse_loss(fmodel(x[10:]), y[10:])
            learned = [v for v in values if isinstance(v, torch.Tensor)]
            return list(torch.autograd.grad(query, [*model.parameters(), *learned]))

    _close(run(loft), run(higher))


def _per_tensor(cls: type) -> type:
    """A subclass that overrides ``_update`` (calling the parent's): higher's per-tensor
    path, which the flat path must equal."""

    class PerTensor(cls):  # type: ignore[misc, valid-type]
        def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
            super()._update(grouped_grads, **kwargs)

    return PerTensor


def _flat_and_per_tensor(opt_type: type, key: str, values: Any, steps: int = 3,
                         **opt_kwargs: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Meta-gradients (weights and learned values) of the same loop on loft's flat path
    and on its per-tensor path."""
    results = []
    for per_tensor in (False, True):
        model = _model()
        x, y = _task()
        learned = [v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v
                   for v in values]
        opt = opt_type([{"params": [p]} for p in model.parameters()], **opt_kwargs)
        fmodel = loft.monkeypatch(model, copy_initial_weights=False)
        cls = type(loft.optim.get_diff_optim(opt, model.parameters()))
        cls = _per_tensor(cls) if per_tensor else cls
        diffopt = cls(opt, model.parameters(), fmodel=fmodel, override={key: learned})
        for _ in range(steps):
            diffopt.step(nn.functional.mse_loss(fmodel(x[:10]), y[:10]))
        query = nn.functional.mse_loss(fmodel(x[10:]), y[10:])
        wrt = [*model.parameters(), *[v for v in learned if isinstance(v, torch.Tensor)]]
        results.append([*fmodel.parameters(), *torch.autograd.grad(query, wrt)])
    return results[0], results[1]


def _values(seed: int, low: float, high: float, pairs: bool = False) -> list[Any]:
    shapes = [p.shape for p in _model().parameters()]
    gen = torch.Generator().manual_seed(seed)
    out: list[Any] = []
    for shape in shapes:
        value = torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low
        out.append((value, 0.999) if pairs else value)
    return out


_CASES = [
    (torch.optim.SGD, "lr", _values(3, 0.005, 0.02), dict(lr=0.01, momentum=0.9)),
    (torch.optim.SGD, "momentum", _values(4, 0.5, 0.9), dict(lr=0.01, momentum=0.9)),
    (torch.optim.SGD, "dampening", _values(4, 0.0, 0.3), dict(lr=0.01, momentum=0.9)),
    # higher 0.2.1 fails on these (``if weight_decay != 0`` on a tensor of many values)
    (torch.optim.SGD, "weight_decay", _values(16, 0.0, 0.1), dict(lr=0.05, momentum=0.9)),
    (torch.optim.Adam, "lr", _values(5, 0.001, 0.01), dict(lr=0.01, amsgrad=True)),
    (torch.optim.Adam, "weight_decay", _values(6, 0.0, 0.1), dict(lr=0.01)),
    (torch.optim.Adam, "betas", _values(7, 0.8, 0.95, pairs=True), dict(lr=0.01)),
    (torch.optim.Adam, "eps", _values(8, 1e-8, 1e-3), dict(lr=0.01)),
    (torch.optim.AdamW, "lr", _values(9, 0.001, 0.01), dict(lr=0.01, weight_decay=0.1)),
    (torch.optim.Adagrad, "lr", _values(10, 0.01, 0.1), dict(lr=0.05, lr_decay=0.01)),
    (torch.optim.Adadelta, "rho", _values(11, 0.8, 0.95), dict(lr=0.5)),
    (torch.optim.Adamax, "betas", _values(12, 0.8, 0.95, pairs=True), dict(lr=0.01)),
    (torch.optim.RMSprop, "alpha", _values(13, 0.9, 0.99), dict(lr=0.01, momentum=0.5,
                                                                centered=True)),
    (torch.optim.Rprop, "lr", _values(14, 0.001, 0.01), dict(lr=0.01)),
    (torch.optim.ASGD, "weight_decay", _values(15, 0.0, 0.1), dict(lr=0.01)),
]


@pytest.mark.parametrize("opt_type,key,values,kwargs", _CASES,
                         ids=[f"{t.__name__}-{k}" for t, k, _, _ in _CASES])
def test_flat_path_equals_the_per_tensor_path(opt_type: type, key: str, values: list[Any],
                                              kwargs: dict[str, Any]) -> None:
    """Every optimiser and hyperparameter given per element: the flat engine (fused
    kernels for lr and weight_decay of SGD and Adam(W), the reference math otherwise)
    computes what higher's per-tensor update does, meta-gradients included."""
    flat, per_tensor = _flat_and_per_tensor(opt_type, key, values, **kwargs)
    _close([t.detach() for t in flat], [t.detach() for t in per_tensor])


@pytest.mark.parametrize("opt_type,kwargs", [(torch.optim.SGD, dict(momentum=0.9)),
                                             (torch.optim.Adam, dict()),
                                             (torch.optim.AdamW, dict(weight_decay=0.1))])
def test_constant_per_element_values_equal_the_per_group_path(opt_type: type,
                                                              kwargs: dict[str, Any]) -> None:
    """A per-element lr filled with one value gives the per-group path's numbers."""

    def run(per_element: bool) -> list[torch.Tensor]:
        model = _model()
        x, y = _task()
        lr = [torch.full(p.shape, 0.01, dtype=torch.float64) if per_element
              else torch.tensor(0.01, dtype=torch.float64) for p in model.parameters()]
        opt = opt_type([{"params": [p]} for p in model.parameters()], lr=0.01, **kwargs)
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False,
                                override={"lr": lr}) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(nn.functional.mse_loss(fmodel(x[:10]), y[:10]))
            query = nn.functional.mse_loss(fmodel(x[10:]), y[10:])
            return list(torch.autograd.grad(query, list(model.parameters())))

    _close(run(True), run(False))


def test_gradcheck_through_two_steps() -> None:
    """float64 gradcheck and gradgradcheck of the final weights with respect to
    per-element lrs and weight decays (fused SGD with momentum, and Adam)."""
    model = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shapes = [p.shape for p in model.parameters()]

    for opt_type in (torch.optim.SGD, torch.optim.Adam):
        def final(lr_w: torch.Tensor, lr_b: torch.Tensor, wd_w: torch.Tensor,
                  opt_type: type = opt_type) -> torch.Tensor:
            opt = opt_type([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1,
                           **({"momentum": 0.9} if opt_type is torch.optim.SGD else {}))
            with loft.innerloop_ctx(model, opt, copy_initial_weights=True,
                                    override={"lr": [lr_w, lr_b],
                                              "weight_decay": [wd_w, 0.0]}) as (f, d):
                for _ in range(2):
                    d.step(f(x).pow(2).sum())
                return torch.cat([p.reshape(-1) for p in f.parameters()])

        gen = torch.Generator().manual_seed(1)
        inputs = (torch.rand(shapes[0], generator=gen, dtype=torch.float64) * 0.1 + 0.05,
                  torch.rand(shapes[1], generator=gen, dtype=torch.float64) * 0.1 + 0.05,
                  torch.rand(shapes[0], generator=gen, dtype=torch.float64) * 0.1)
        inputs = tuple(t.requires_grad_() for t in inputs)
        assert torch.autograd.gradcheck(final, inputs)
        assert torch.autograd.gradgradcheck(final, inputs)


def test_shapes_that_do_not_broadcast_are_named() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"override\['lr'\] for param group 0 has shape "
                                         r"\[3\].*shape \[8, 1\] of parameter 0"):
        loft.innerloop_ctx(model, opt, override={"lr": [torch.ones(3)]}).__enter__()
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        x, y = _task()
        diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        diffopt.param_groups[0]["lr"] = torch.full((8, 2), 0.1, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] has shape \[8, 2\].*"
                                             r"shape \[8, 1\] of parameter 0"):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))


def test_asgd_keeps_eta_per_tensor() -> None:
    model = _model()
    opt = torch.optim.ASGD([{"params": [p]} for p in model.parameters()], lr=0.1)
    lr = [torch.full(p.shape, 0.1, dtype=torch.float64) for p in model.parameters()]
    with loft.innerloop_ctx(model, opt, override={"lr": lr}) as (fmodel, diffopt):
        x, y = _task()
        with pytest.raises(ValueError, match="ASGD keeps eta and mu per tensor"):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))


def test_first_order_keeps_the_lr_gradient() -> None:
    """first_order=True treats the inner gradients as constants but still differentiates
    the update with respect to a learned per-element lr."""

    def run(first_order: bool) -> list[torch.Tensor]:
        model = _model()
        x, y = _task()
        lrs = _lrs([p.shape for p in model.parameters()])
        opt = torch.optim.SGD([{"params": [p]} for p in model.parameters()], lr=0.01)
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": lrs},
                                first_order=first_order) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(nn.functional.mse_loss(fmodel(x[:10]), y[:10]))
            query = nn.functional.mse_loss(fmodel(x[10:]), y[10:])
            return list(torch.autograd.grad(query, lrs))

    first, full = run(True), run(False)
    assert all(g.abs().sum() > 0 for g in first)
    assert any(not torch.allclose(a, b) for a, b in zip(first, full))
