"""NaN and Inf in gradients (and weights) propagate as torch.optim propagates them, on
the fused kernels and on the reference path (issue #7)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loft

from .._small_mlp import backend as _backend

# ---- NaN and Inf propagate as in torch.optim ---------------------------------------------------

NAN_CONFIGS = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    (torch.optim.Adam, dict(lr=0.1)),
    (torch.optim.Adam, dict(lr=0.1, amsgrad=True, weight_decay=0.1)),
    (torch.optim.Adam, dict(lr=0.1, betas=(0.3, 0.4))),  # torch's lerp, weight >= 0.5
    (torch.optim.AdamW, dict(lr=0.1, weight_decay=0.1)),
    (torch.optim.AdamW, dict(lr=0.1, amsgrad=True, maximize=True, weight_decay=0.0)),
]
NON_FINITE = (float("nan"), float("inf"), -float("inf"))


def _non_finite_gradients(shapes: list[torch.Size], steps: int,
                          seed: int) -> list[list[torch.Tensor]]:
    """Random gradients with two NaN/Inf entries per tensor per step."""
    gen = torch.Generator().manual_seed(seed)
    sequence = []
    for _ in range(steps):
        grads = []
        for shape in shapes:
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            flat = g.view(-1)
            for _ in range(2):
                where = int(torch.randint(0, flat.numel(), (1,), generator=gen))
                flat[where] = NON_FINITE[int(torch.randint(0, 3, (1,), generator=gen))]
            grads.append(g)
        sequence.append(grads)
    return sequence


def _assert_same_numbers(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal NaN positions, equal infinities, finite values equal up to rounding."""
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("opt_item", NAN_CONFIGS,
                         ids=lambda o: o[0].__name__ + "-" + "-".join(o[1]))
def test_nan_and_inf_propagate_as_in_torch_optim(opt_item: tuple[type, dict], seed: int,
                                                 backend: str, fused: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients with NaN/Inf entries, and weights starting with an Inf and a NaN: every
    step's weights and optimiser state equal torch.optim's, NaN for NaN and Inf for Inf."""
    opt_type, kwargs = opt_item
    torch.manual_seed(seed)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
        model.bias[1] = float("nan")
    steps = 4
    sequence = _non_finite_gradients([p.shape for p in model.parameters()], steps, seed)
    twins = [p.detach().clone() for p in model.parameters()]
    twin_opt = opt_type(twins, **kwargs)
    expected = []
    for grads in sequence:
        for p, g in zip(twins, grads):
            p.grad = g.clone()
        twin_opt.step()
        expected.append(([p.detach().clone() for p in twins],
                         [{k: v.clone() for k, v in twin_opt.state[p].items() if k != "step"}
                          for p in twins]))
    assert any(p.isnan().any() for p in expected[-1][0])
    with _backend(backend, monkeypatch) as calls:
        opt = opt_type(model.parameters(), **kwargs)
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for t, grads in enumerate(sequence):
                diffopt.step(fmodel(torch.ones(1, 4, dtype=torch.float64)).sum(),
                             grad_callback=lambda _, grads=grads: [g.clone() for g in grads])
                weights, state = expected[t]
                for j, (p, q) in enumerate(zip(fmodel.parameters(), weights)):
                    _assert_same_numbers(p.detach(), q, f"step {t + 1}, parameter {j}")
                    for name, value in state[j].items():
                        _assert_same_numbers(diffopt.state[0][j][name].detach(), value,
                                             f"step {t + 1}, parameter {j}, {name}")
            # The meta-backward runs through the non-finite values without failing.
            grads = torch.autograd.grad(sum(p.sum() for p in fmodel.parameters()),
                                        list(model.parameters()))
    assert (calls["reference"] > 0) == (backend == "reference")
    assert all(g.shape == p.shape for g, p in zip(grads, model.parameters()))


def test_nan_meta_gradients_agree_between_backends(fused: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Meta-gradients through NaN/Inf gradients: NaN where the math has one, on both paths
    (no path repairs a NaN into a number)."""
    def run(opt_type: type, kwargs: dict) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(4, 3).double()
        lr = torch.tensor(kwargs["lr"], dtype=torch.float64, requires_grad=True)
        opt = opt_type(model.parameters(), **kwargs)
        scale = torch.ones(3, 4, dtype=torch.float64)
        scale[0, 1] = float("nan")
        scale[2, 2] = float("inf")
        x = torch.randn(5, 4, dtype=torch.float64)
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False,
                                override={"lr": [lr]}) as (fmodel, diffopt):
            for _ in range(2):
                w, b = fmodel.parameters()
                diffopt.step(((x @ (w * scale).t() + b) ** 2).mean())
            meta = sum(p.sum() for p in fmodel.parameters())
            return list(torch.autograd.grad(meta, list(model.parameters()) + [lr]))

    for opt_type, kwargs in [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                             (torch.optim.Adam, dict(lr=0.1))]:
        with _backend("fused", monkeypatch):
            fused_result = run(opt_type, kwargs)
        with _backend("reference", monkeypatch):
            reference_result = run(opt_type, kwargs)
        assert fused_result[0].isnan().any()
        for a, b in zip(fused_result, reference_result):
            _assert_same_numbers(a, b, opt_type.__name__)
