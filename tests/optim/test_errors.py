"""Misuse of the differentiable optimisers gives a clear error (issue #7): each bad input
checks the error type and that the message names the problem."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import loft

from .._small_mlp import data as _data
from .._small_mlp import mlp as _mlp
from .._small_mlp import mse as _mse

# ---- errors from diffopt.step ----------------------------------------------------------------


def test_non_scalar_loss_is_rejected_naming_the_problem() -> None:
    model = _mlp()
    x, y = _data()
    with loft.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel,
                                                                                 diffopt):
        with pytest.raises(RuntimeError, match=r"loss must be a scalar.*shape \[6, 3\]"):
            diffopt.step((fmodel(x) - y) ** 2)
        with pytest.raises(RuntimeError, match=r"loss must be a scalar.*shape \[0\]"):
            diffopt.step(fmodel(x)[:0, 0])
        with pytest.raises(TypeError, match="loss must be a tensor, got float"):
            diffopt.step(1.0)
        assert len(list(fmodel.parameters(time=0))) == 4
        with pytest.raises(IndexError):  # nothing was recorded by the failed calls
            fmodel.parameters(time=1)


def test_one_element_loss_is_accepted_as_a_scalar() -> None:
    """As torch.autograd.grad (and higher): any one-element loss, e.g. shape [1, 1]."""
    model = _mlp()
    x, y = _data()
    results = []
    for shape in ([], [1, 1]):
        with loft.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (
                fmodel, diffopt):
            diffopt.step(_mse(fmodel(x), y).reshape(shape))
            results.append([p.detach() for p in fmodel.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("loss_from", ["original model", "other tensor", "no grad", "detached"])
def test_loss_not_connected_to_the_fast_weights(loss_from: str) -> None:
    """A loss computed without the fast weights would leave them unchanged, silently."""
    model = _mlp()
    x, y = _data()
    other = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with loft.innerloop_ctx(model, torch.optim.Adam(model.parameters(), lr=0.1)) as (fmodel,
                                                                                  diffopt):
        if loss_from == "original model":  # the classic slip: model(x), not fmodel(x)
            loss = _mse(model(x), y)
        elif loss_from == "other tensor":
            loss = (other * 2).sum()
        elif loss_from == "no grad":
            with torch.no_grad():
                loss = _mse(fmodel(x), y)
        else:
            loss = _mse(fmodel(x), y).detach()
        with pytest.raises(RuntimeError, match="not connected to the fast weights"):
            diffopt.step(loss)


def test_loss_of_parameters_the_optimizer_does_not_update() -> None:
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # the last layer is not in it
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        loss = fmodel(x).sum() * 0 + list(fmodel.parameters())[2].sum()
        with pytest.raises(RuntimeError, match="not connected to the fast weights the "
                                               "optimizer updates"):
            diffopt.step(list(fmodel.parameters())[2].sum())
        diffopt.step(loss + _mse(fmodel(x), y))  # connected to model[0] through fmodel(x)


def test_params_of_the_wrong_length_shape_or_type() -> None:
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diffopt = loft.get_diff_optim(opt, model.parameters())
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    loss = sum(p.sum() for p in params)
    with pytest.raises(ValueError, match="expected 4 parameters.*got 3"):
        diffopt.step(loss, params=params[:3])
    with pytest.raises(ValueError, match="expected 4 parameters.*got 5"):
        diffopt.step(loss, params=params + params[:1])
    wrong = list(params)
    wrong[2] = torch.zeros(5, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"params\[2\] has shape \[5, 3\], expected \[3, 5\]"):
        diffopt.step(loss + wrong[2].sum(), params=wrong)
    with pytest.raises(TypeError, match=r"params\[1\] must be a tensor, got list"):
        diffopt.step(loss, params=[params[0], [1.0], params[2], params[3]])
    # With a patched model: the same checks on explicitly passed params.
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        fast = list(fmodel.parameters())
        fast[0] = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)
        with pytest.raises(ValueError, match=r"params\[0\] has shape \[4, 5\], expected \[5, 4\]"):
            diffopt.step(sum(p.sum() for p in fast), params=fast)
        diffopt.step(_mse(fmodel(x), y))  # and the optimizer still works


def test_step_without_params_or_fmodel() -> None:
    model = _mlp()
    diffopt = loft.get_diff_optim(torch.optim.SGD(model.parameters(), lr=0.1),
                                  model.parameters())
    with pytest.raises(ValueError, match="params kwarg must be passed to step"):
        diffopt.step(model(_data()[0]).sum())


# ---- errors from the overrides and the optimiser types ----------------------------------------


def _two_groups(model: nn.Module, opt_type: type = torch.optim.SGD, **kwargs: Any) -> Any:
    return opt_type([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                    lr=0.1, **kwargs)


@pytest.mark.parametrize("where", ["constructor", "step"])
@pytest.mark.parametrize("count", [0, 3])
def test_override_length_names_the_key_and_the_group_count(where: str, count: int) -> None:
    model = _mlp()
    x, y = _data()
    values = [torch.tensor(0.1)] * count
    pattern = rf"override\['momentum'\] must hold 1 value or one per param group \(2\), " \
              rf"got {count}"
    opt = _two_groups(model, momentum=0.5)
    if where == "constructor":
        with pytest.raises(ValueError, match=pattern):
            loft.get_diff_optim(opt, model.parameters(), override={"momentum": values})
    else:
        with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
            with pytest.raises(ValueError, match=pattern):
                diffopt.step(_mse(fmodel(x), y), override={"momentum": values})


def test_override_values_are_checked() -> None:
    model = _mlp()
    sgd, adam = _two_groups(model), _two_groups(model, torch.optim.Adam)
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"override\['learning_rate'\].*no hyperparameter "
                                         r"'learning_rate'.*\blr\b"):
        loft.get_diff_optim(sgd, params, override={"learning_rate": [0.1]})
    with pytest.raises(ValueError, match=r"override\['betas'\] values must be tuples of 2"):
        loft.get_diff_optim(adam, params, override={"betas": [0.9]})
    with pytest.raises(ValueError, match=r"override\['betas'\] values must be tuples of 2"):
        loft.get_diff_optim(adam, params, override={"betas": [(0.9, 0.99, 0.5)]})
    # A tensor hyperparameter holds one value or broadcasts to each parameter of its
    # group (per element, as higher computes): [2] fits none of [5, 4], [5], [3, 5], [3].
    with pytest.raises(ValueError, match=r"override\['lr'\] for param group 0 has shape "
                                         r"\[2\].*shape \[5, 4\] of parameter 0"):
        loft.get_diff_optim(sgd, params, override={"lr": [torch.tensor([0.1, 0.2])]})
    with pytest.raises(ValueError, match=r"override\['betas\[0\]'\] for param group 0 has "
                                         r"shape \[2\]"):
        loft.get_diff_optim(adam, params, override={"betas": [(torch.ones(2), 0.9)]})
    # Well-formed values pass: a pair of tensors, a 2-element tensor for betas, per group.
    b = torch.tensor(0.9, requires_grad=True)
    loft.get_diff_optim(adam, params, override={"betas": [(b, 0.99), torch.tensor([0.8, 0.9])],
                                                "lr": [torch.tensor([0.1])]})


def test_unsupported_optimizer_type_names_the_type_and_register_optim() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=r"torch\.optim\.lbfgs\.LBFGS has no differentiable "
                                         r"version.*loft\.register_optim"):
        loft.get_diff_optim(torch.optim.LBFGS(model.parameters()), model.parameters())


def test_subclass_of_a_supported_optimizer_is_rejected_pointing_to_register_optim(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As higher: the exact type decides (a subclass may change the update)."""

    class ClippedSGD(torch.optim.SGD):
        pass

    model = _mlp()
    x, y = _data()
    opt = ClippedSGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"ClippedSGD has no differentiable version.*"
                                         r"subclasses torch\.optim\.sgd\.SGD.*"
                                         r"loft\.register_optim\(ClippedSGD, "
                                         r"loft\.optim\.DifferentiableSGD\)"):
        loft.get_diff_optim(opt, model.parameters())
    monkeypatch.setitem(loft.optim._OPT_MAPPING, ClippedSGD, loft.optim.DifferentiableSGD)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):  # registered, it works
        diffopt.step(_mse(fmodel(x), y))
