"""Adagrad, Adadelta, Adamax, ASGD, RMSprop and Rprop: trajectories, state and meta-gradients.

(a) fast-weight trajectories and optimiser state equal torch.optim's (float64 rounding),
(b) meta-gradients (initial weights, every tensor hyperparameter) equal an independent
    per-tensor differentiable unroll written here,
(c) ``torch.autograd.gradcheck`` of a 2-step inner loop in its tensor hyperparameters.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import loft
from loft.optim.unfused import (
    DifferentiableAdadelta,
    DifferentiableAdagrad,
    DifferentiableAdamax,
    DifferentiableASGD,
    DifferentiableRMSprop,
    DifferentiableRprop,
)

EXTRA = {
    torch.optim.Adagrad: DifferentiableAdagrad,
    torch.optim.Adadelta: DifferentiableAdadelta,
    torch.optim.Adamax: DifferentiableAdamax,
    torch.optim.ASGD: DifferentiableASGD,
    torch.optim.RMSprop: DifferentiableRMSprop,
    torch.optim.Rprop: DifferentiableRprop,
}


@pytest.mark.parametrize("torch_type", list(EXTRA), ids=lambda t: t.__name__)
def test_built_in_without_registration(torch_type: type) -> None:
    """get_diff_optim knows all six out of the box (loft.optim's own mapping)."""
    model = nn.Linear(2, 2)
    diffopt = loft.get_diff_optim(torch_type(model.parameters(), lr=0.1), model.parameters())
    assert type(diffopt) is EXTRA[torch_type]
    assert getattr(loft.optim, EXTRA[torch_type].__name__) is EXTRA[torch_type]

#: Trajectories: both sides compute in float64 with the same formulas, up to the order
#: of a few roundings per step.
F64 = dict(rtol=1e-12, atol=1e-12)
#: Meta-gradients: the oracle's formulas differ in association order (lerp written out,
#: min/max instead of clamp), and ~10 chained steps amplify the last-bit differences.
META = dict(rtol=1e-10, atol=1e-12)

CONFIGS: list[tuple[type, dict[str, Any]]] = [
    (torch.optim.Adagrad, dict(lr=0.1)),
    (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.02,
                               initial_accumulator_value=0.1, eps=1e-6)),
    (torch.optim.Adagrad, dict(lr=0.05, maximize=True)),
    (torch.optim.Adadelta, dict(lr=1.0)),
    (torch.optim.Adadelta, dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.05)),
    (torch.optim.Adadelta, dict(lr=0.5, maximize=True)),
    (torch.optim.Adamax, dict(lr=0.02)),
    (torch.optim.Adamax, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)),
    (torch.optim.Adamax, dict(lr=0.01, maximize=True)),
    (torch.optim.ASGD, dict(lr=0.05)),
    (torch.optim.ASGD, dict(lr=0.05, lambd=0.01, alpha=0.6, t0=2.0, weight_decay=0.03)),
    (torch.optim.ASGD, dict(lr=0.02, t0=0.0, maximize=True)),
    (torch.optim.RMSprop, dict(lr=0.01)),
    (torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, centered=True, weight_decay=0.05)),
    (torch.optim.RMSprop, dict(lr=0.005, momentum=0.9, eps=1e-6)),
    (torch.optim.RMSprop, dict(lr=0.005, momentum=0.5, centered=True, maximize=True)),
    (torch.optim.Rprop, dict(lr=0.01)),
    (torch.optim.Rprop, dict(lr=0.02, etas=(0.3, 1.5), step_sizes=(1e-3, 0.03))),
    (torch.optim.Rprop, dict(lr=0.01, maximize=True)),
]

#: Two param groups with their own hyperparameters (and flags) per optimiser.
GROUPS: dict[type, tuple[dict[str, Any], dict[str, Any]]] = {
    torch.optim.Adagrad: (dict(lr=0.1, lr_decay=0.05, weight_decay=0.02,
                               initial_accumulator_value=0.1),
                          dict(lr=0.05, eps=1e-6, maximize=True)),
    torch.optim.Adadelta: (dict(lr=0.8, rho=0.85, weight_decay=0.02),
                           dict(lr=0.3, eps=1e-4, maximize=True)),
    torch.optim.Adamax: (dict(lr=0.02, betas=(0.8, 0.95), weight_decay=0.02),
                         dict(lr=0.01, eps=1e-6, maximize=True)),
    torch.optim.ASGD: (dict(lr=0.05, lambd=0.01, alpha=0.6, t0=0.5, weight_decay=0.02),
                       dict(lr=0.03, lambd=0.02, t0=2.5, maximize=True)),
    torch.optim.RMSprop: (dict(lr=0.01, alpha=0.9, centered=True, momentum=0.8,
                               weight_decay=0.02),
                          dict(lr=0.02, eps=1e-6, maximize=True)),
    torch.optim.Rprop: (dict(lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-3, 0.02)),
                        dict(lr=0.02, maximize=True)),
}

#: The hyperparameters made tensors for meta-gradients (tuples take a pair of tensors).
TENSOR_HYPERS: dict[type, tuple[str, ...]] = {
    torch.optim.Adagrad: ("lr", "lr_decay", "weight_decay", "eps"),
    torch.optim.Adadelta: ("lr", "rho", "eps", "weight_decay"),
    torch.optim.Adamax: ("lr", "betas", "eps", "weight_decay"),
    torch.optim.ASGD: ("lr", "lambd", "alpha", "t0", "weight_decay"),
    torch.optim.RMSprop: ("lr", "alpha", "eps", "weight_decay", "momentum"),
    torch.optim.Rprop: ("lr", "etas", "step_sizes"),
}


#: Whether the ``side`` layer is used in each inner step: it misses the first step, one in
#: the middle (with state and a step count to keep) and the last one.
SCHEDULE = [False, True, True, False, True, False]


def _id(item: Any) -> str:
    if isinstance(item, type):
        return item.__name__
    opt_type, kwargs = item
    return opt_type.__name__ + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


@contextlib.contextmanager
def torch_scalars_in_float64() -> Iterator[None]:
    """torch.optim.ASGD keeps its per-tensor ``eta``/``mu`` in the default dtype's scalar
    type (float32 unless the default is float64); loft computes them in float64 for
    float64 buffers. Make torch do the same for exact parity."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ---- models and data ---------------------------------------------------------------------


class Partial(nn.Module):
    """Three layers; ``side`` is used only when asked, so it misses some steps."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        self.side = nn.Linear(6, 3)

    def forward(self, x: Tensor, use_side: bool = True) -> Tensor:
        h = torch.tanh(self.first(x))
        out = self.head(h)
        return out + self.side(h) if use_side else out


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> Partial:
    torch.manual_seed(seed)
    return Partial().to(dtype)


def batches(steps: int, seed: int = 1, dtype: torch.dtype = torch.float64,
            zero_feature: bool = False) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        if zero_feature:
            # first.weight[:, 0] then gets gradients that are exactly 0 (sqrt(0) in the
            # accumulators: its derivative must be taken as 0, not NaN).
            x[:, 0] = 0
        out.append((x.to(dtype), torch.randn(5, 3, generator=gen, dtype=torch.float64).to(dtype)))
    return out


def mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean()


def two_groups(model: Partial, kwargs: tuple[dict, dict]) -> list[dict[str, Any]]:
    """first.* and side.* in group 0, head.* in group 1."""
    g0 = list(model.first.parameters()) + list(model.side.parameters())
    return [dict(params=g0, **kwargs[0]), dict(params=list(model.head.parameters()), **kwargs[1])]


# ---- (a) trajectories and state ----------------------------------------------------------


def _compare_state(diffopt: Any, twin_opt: torch.optim.Optimizer,
                   tol: dict[str, float]) -> None:
    """loft's state in higher's layout (``diffopt.state[group][index]``) equals torch's."""
    for g, group in enumerate(twin_opt.param_groups):
        for j, p in enumerate(group["params"]):
            ours, theirs = diffopt.state[g][j], twin_opt.state.get(p, {})
            where = f"group {g} param {j}"
            if not theirs:  # never stepped in torch: loft must not have counted a step
                assert ours["step"] == 0, f"{where}: step {ours['step']}"
                continue
            assert ours["step"] == int(theirs["step"]), f"{where}: step {ours['step']}"
            for name, value in theirs.items():
                if name == "step":
                    continue
                assert name in ours, f"{where}: loft has no state {name!r}"
                torch.testing.assert_close(ours[name].detach().to(value.dtype), value, **tol,
                                           msg=lambda m, w=f"{where} {name}": f"{w}: {m}")


def _run_trajectory(opt_type: type, make_groups: Callable[[Partial], Any], schedule: list[bool],
                    pre_steps: int = 0, dtype: torch.dtype = torch.float64,
                    tol: dict[str, float] = F64) -> None:
    """Step loft and torch.optim side by side (``schedule[k]``: is ``side`` used in step
    k); after every step compare the fast weights, at the end the whole state."""
    model = make_model(dtype=dtype)
    opt = opt_type(make_groups(model))
    data = batches(pre_steps + len(schedule), dtype=dtype)
    for x, y in data[:pre_steps]:  # torch.optim steps before handing its state over
        opt.zero_grad()
        mse(model(x, use_side=False), y).backward()
        opt.step()
    twin, twin_opt = copy.deepcopy((model, opt))
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for (x, y), use_side in zip(data[pre_steps:], schedule):
            diffopt.step(mse(fmodel(x, use_side=use_side), y))
            twin_opt.zero_grad()
            mse(twin(x, use_side=use_side), y).backward()
            twin_opt.step()
            for fast, ref in zip(fmodel.parameters(), twin.parameters()):
                torch.testing.assert_close(fast.detach(), ref.detach(), **tol)
        _compare_state(diffopt, twin_opt, tol)


@pytest.mark.parametrize("opt_item", CONFIGS, ids=_id)
def test_trajectory_and_state_equal_torch_optim(opt_item: tuple[type, dict]) -> None:
    """Every step's fast weights, and the final state, equal torch.optim's."""
    opt_type, kwargs = opt_item
    with torch_scalars_in_float64():
        _run_trajectory(opt_type, lambda m: [dict(params=list(m.parameters()), **kwargs)],
                        [True] * 6)


@pytest.mark.parametrize("pre_steps", [0, 2], ids=["fresh", "stepped_twice"])
@pytest.mark.parametrize("opt_type", list(EXTRA), ids=_id)
def test_groups_partial_use_and_handed_over_state(opt_type: type, pre_steps: int) -> None:
    """Two param groups with different hyperparameters (and flags), a layer that gets no
    gradient in some steps (no update, no state change, no step), and a torch optimizer
    that already stepped twice (``side`` unused there, so it starts fresh in loft)."""
    with torch_scalars_in_float64():
        _run_trajectory(opt_type, lambda m: two_groups(m, GROUPS[opt_type]),
                        SCHEDULE, pre_steps=pre_steps)


@pytest.mark.parametrize("opt_type", list(EXTRA), ids=_id)
def test_float32_trajectory(opt_type: type) -> None:
    """float32 buffers compute in float32 (per-tensor scalars in float64, then cast)."""
    _run_trajectory(opt_type, lambda m: two_groups(m, GROUPS[opt_type]),
                    [True, False, True, True], dtype=torch.float32,
                    tol=dict(rtol=2e-5, atol=2e-6))


def test_asgd_with_float32_torch_scalars_is_within_float32_rounding() -> None:
    """With a float32 default dtype torch.optim.ASGD rounds eta to float32; loft keeps it
    in float64 for float64 buffers, so they agree to ~1e-8 relative (not 1e-12)."""
    assert torch.get_default_dtype() == torch.float32
    _run_trajectory(torch.optim.ASGD, lambda m: [dict(params=list(m.parameters()), lr=0.05,
                                                       lambd=0.01, t0=2.0)],
                    [True] * 5, tol=dict(rtol=1e-7, atol=1e-9))


@pytest.mark.parametrize("opt_type", list(EXTRA), ids=_id)
def test_track_higher_grads_false_same_numbers(opt_type: type) -> None:
    model = make_model()
    kwargs = GROUPS[opt_type][0]
    data = batches(3)
    results = []
    for track in (True, False):
        opt = opt_type(model.parameters(), **kwargs)
        with torch_scalars_in_float64(), loft.innerloop_ctx(
                model, opt, track_higher_grads=track) as (fmodel, diffopt):
            for x, y in data:
                diffopt.step(mse(fmodel(x), y))
            results.append([p.detach() for p in fmodel.parameters()])
            if not track:
                assert all(p.grad_fn is None for p in fmodel.parameters())
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- (b) meta-gradients against an independent per-tensor unroll --------------------------


class _SqrtZeroAtZero(torch.autograd.Function):
    """sqrt with derivative 0 where v == 0 (higher's rule)."""

    @staticmethod
    def forward(ctx: Any, v: Tensor) -> Tensor:
        s = v.sqrt()
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (s,) = ctx.saved_tensors
        return torch.where(s > 0, grad / (2 * torch.where(s > 0, s, 1)), 0)


def sqrt0(v: Tensor) -> Tensor:
    return _SqrtZeroAtZero.apply(v)


def _f(x: Any) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


class PerTensorUnroll:
    """One Python loop over the parameter tensors, torch.optim's formulas written out.

    ``state[i]`` uses torch.optim's state names and may start from a torch optimizer's
    state. Shares no code with loft.
    """

    def __init__(self, kind: str, groups: list[dict[str, Any]], group_of: list[int],
                 state: list[dict[str, Any]]) -> None:
        self.kind, self.groups, self.group_of = kind, groups, group_of
        self.state = [{k: (int(v) if k == "step" else v.detach().clone())
                       for k, v in st.items()} for st in state]

    def step(self, params: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                out.append(p)
                continue
            hp = self.groups[self.group_of[i]]
            st = self.state[i]
            if hp.get("maximize", False):
                g = -g
            out.append(getattr(self, "_" + self.kind)(p, g, st, hp))
        return out

    @staticmethod
    def _adagrad(p, g, st, hp):
        if "sum" not in st:
            st.update(step=0, sum=torch.full_like(p, hp.get("initial_accumulator_value", 0.0)))
        st["step"] += 1
        g = g + hp.get("weight_decay", 0.0) * p
        st["sum"] = st["sum"] + g * g
        clr = hp["lr"] / (1 + (st["step"] - 1) * hp.get("lr_decay", 0.0))
        return p - clr * g / (sqrt0(st["sum"]) + hp.get("eps", 1e-10))

    @staticmethod
    def _adadelta(p, g, st, hp):
        if not st:
            st.update(step=0, square_avg=torch.zeros_like(p), acc_delta=torch.zeros_like(p))
        st["step"] += 1
        rho, eps = hp.get("rho", 0.9), hp.get("eps", 1e-6)
        g = g + hp.get("weight_decay", 0.0) * p
        st["square_avg"] = rho * st["square_avg"] + (1 - rho) * g * g
        delta = sqrt0(st["acc_delta"] + eps) * g / sqrt0(st["square_avg"] + eps)
        st["acc_delta"] = rho * st["acc_delta"] + (1 - rho) * delta * delta
        return p - hp["lr"] * delta

    @staticmethod
    def _adamax(p, g, st, hp):
        if not st:
            st.update(step=0, exp_avg=torch.zeros_like(p), exp_inf=torch.zeros_like(p))
        st["step"] += 1
        b1, b2 = hp.get("betas", (0.9, 0.999))
        g = g + hp.get("weight_decay", 0.0) * p
        st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
        st["exp_inf"] = torch.maximum(b2 * st["exp_inf"], g.abs() + hp.get("eps", 1e-8))
        return p - hp["lr"] / (1 - b1 ** st["step"]) * st["exp_avg"] / st["exp_inf"]

    @staticmethod
    def _asgd(p, g, st, hp):
        lr, lambd = hp["lr"], hp.get("lambd", 1e-4)
        if not st:
            st.update(step=0, eta=lr, mu=1.0, ax=torch.zeros_like(p))
        eta, mu = st["eta"], st["mu"]
        g = g + hp.get("weight_decay", 0.0) * p
        p = p * (1 - lambd * eta) - eta * g
        st["ax"] = p if _f(mu) == 1 else st["ax"] + mu * (p - st["ax"])
        st["step"] += 1
        t = st["step"]
        st["eta"] = lr / (1 + lambd * lr * t) ** hp.get("alpha", 0.75)
        span = t - hp.get("t0", 1e6)
        st["mu"] = 1 / span if _f(span) > 1 else 1.0
        return p

    @staticmethod
    def _rmsprop(p, g, st, hp):
        alpha, eps = hp.get("alpha", 0.99), hp.get("eps", 1e-8)
        momentum = hp.get("momentum", 0.0)
        if not st:
            st.update(step=0, square_avg=torch.zeros_like(p))
            if _f(momentum) > 0:
                st["momentum_buffer"] = torch.zeros_like(p)
            if hp.get("centered", False):
                st["grad_avg"] = torch.zeros_like(p)
        st["step"] += 1
        g = g + hp.get("weight_decay", 0.0) * p
        st["square_avg"] = alpha * st["square_avg"] + (1 - alpha) * g * g
        if hp.get("centered", False):
            st["grad_avg"] = alpha * st["grad_avg"] + (1 - alpha) * g
            avg = sqrt0(st["square_avg"] - st["grad_avg"] ** 2) + eps
        else:
            avg = sqrt0(st["square_avg"]) + eps
        if _f(momentum) > 0:
            st["momentum_buffer"] = momentum * st["momentum_buffer"] + g / avg
            return p - hp["lr"] * st["momentum_buffer"]
        return p - hp["lr"] * g / avg

    @staticmethod
    def _rprop(p, g, st, hp):
        if not st:
            st.update(step=0, prev=torch.zeros_like(p),
                      step_size=hp["lr"] * torch.ones_like(p))
        st["step"] += 1
        etaminus, etaplus = hp.get("etas", (0.5, 1.2))
        lo, hi = (torch.as_tensor(v, dtype=p.dtype) for v in hp.get("step_sizes", (1e-6, 50)))
        s = g * st["prev"]
        factor = torch.where(s > 0, etaplus, torch.where(s < 0, etaminus, 1.0))
        st["step_size"] = torch.minimum(torch.maximum(st["step_size"] * factor, lo), hi)
        g = torch.where(s < 0, 0.0, g)
        st["prev"] = g
        return p - g.sign() * st["step_size"]


def _tensorise(opt_type: type, kwargs: dict[str, Any], defaults: dict[str, Any]
               ) -> tuple[dict[str, Any], list[Tensor]]:
    """The group's hyperparameters with those of TENSOR_HYPERS as leaf tensors."""
    hp = dict(kwargs)
    leaves = []
    for name in TENSOR_HYPERS[opt_type]:
        value = kwargs.get(name, defaults[name])
        if isinstance(value, tuple):
            value = tuple(torch.tensor(float(v), dtype=torch.float64, requires_grad=True)
                          for v in value)
            leaves += list(value)
        else:
            value = torch.tensor(float(value), dtype=torch.float64, requires_grad=True)
            leaves.append(value)
        hp[name] = value
    return hp, leaves


def _grads_or_zeros(out: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


SCENARIOS = ["one_group_zero_grads", "groups_partial", "groups_partial_stepped_twice"]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("opt_type", list(EXTRA), ids=_id)
def test_meta_gradients_equal_per_tensor_unroll(opt_type: type, scenario: str) -> None:
    """Gradients of a query loss with respect to the initial weights and every tensor
    hyperparameter (``override``) equal the per-tensor unroll's."""
    kind = opt_type.__name__.lower()
    defaults = {k: v for k, v in opt_type([torch.zeros(1, requires_grad=True)]).defaults.items()}
    if scenario == "one_group_zero_grads":
        # No weight decay and no initial accumulator, so that the zero gradients reach
        # the square roots as exact zeros.
        group_kwargs = [{k: v for k, v in GROUPS[opt_type][0].items()
                         if k not in ("weight_decay", "initial_accumulator_value")}]
        schedule, pre_steps, zero_feature = [True] * 5, 0, True
    else:
        group_kwargs = list(GROUPS[opt_type])
        schedule, zero_feature = SCHEDULE, False
        pre_steps = 2 if scenario.endswith("stepped_twice") else 0
    data = batches(pre_steps + len(schedule), zero_feature=zero_feature)
    xq, yq = batches(1, seed=9)[0]

    def build() -> tuple[Partial, torch.optim.Optimizer]:
        model = make_model()
        if len(group_kwargs) == 1:
            opt = opt_type(model.parameters(), **group_kwargs[0])
        else:
            opt = opt_type(two_groups(model, (group_kwargs[0], group_kwargs[1])))
        for x, y in data[:pre_steps]:
            opt.zero_grad()
            mse(model(x, use_side=False), y).backward()
            opt.step()
        opt.zero_grad()
        return model, opt

    with torch_scalars_in_float64():
        # loft, with the hyperparameters given as tensors through override.
        model, opt = build()
        hps, leaves = zip(*[_tensorise(opt_type, kw, defaults) for kw in group_kwargs])
        override = {name: [hp[name] for hp in hps] for name in TENSOR_HYPERS[opt_type]}
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False,
                                override=override) as (fmodel, diffopt):
            for (x, y), use_side in zip(data[pre_steps:], schedule):
                diffopt.step(mse(fmodel(x, use_side=use_side), y))
            meta = mse(fmodel(xq), yq)
        got = _grads_or_zeros(meta, list(model.parameters()) + [t for lv in leaves for t in lv])

        # The per-tensor unroll from the same (possibly stepped) model and state.
        model, opt = build()
        params = list(model.parameters())
        hps, leaves = zip(*[_tensorise(opt_type, kw, defaults) for kw in group_kwargs])
        group_of = [next(g for g, group in enumerate(opt.param_groups)
                         if any(q is p for q in group["params"])) for p in params]
        unroll = PerTensorUnroll(kind, [{**defaults, **hp} for hp in hps], group_of,
                                 [opt.state.get(p, {}) for p in params])
        names = [n for n, _ in model.named_parameters()]
        fast: list[Tensor] = params
        for (x, y), use_side in zip(data[pre_steps:], schedule):
            out = torch.func.functional_call(model, dict(zip(names, fast)), (x,),
                                             dict(use_side=use_side))
            grads = torch.autograd.grad(mse(out, y), fast, create_graph=True, allow_unused=True)
            fast = unroll.step(fast, list(grads))
        meta = mse(torch.func.functional_call(model, dict(zip(names, fast)), (xq,)), yq)
        want = _grads_or_zeros(meta, params + [t for lv in leaves for t in lv])

    labels = names + [f"hyper{k}" for k in range(len(got) - len(names))]
    assert any(bool(w.abs().sum() > 0) for w in want[len(names):]), "no hypergradient at all"
    for label, a, b in zip(labels, got, want):
        assert torch.isfinite(a).all(), f"{label}: non-finite meta-gradient"
        torch.testing.assert_close(a, b, **META, msg=lambda m, n=label: f"{n}: {m}")


# ---- (c) gradcheck in the tensor hyperparameters -----------------------------------------

#: Hyperparameters for gradcheck: eps away from 0 (finite differences step 1e-6), an
#: Rprop step_size_max that clamps, an ASGD t0 that makes mu != 1 in step 2.
GRADCHECK: dict[type, dict[str, Any]] = {
    torch.optim.Adagrad: dict(lr=0.1, lr_decay=0.3, weight_decay=0.05, eps=1e-2,
                              initial_accumulator_value=0.1),
    torch.optim.Adadelta: dict(lr=0.7, rho=0.8, eps=1e-2, weight_decay=0.05),
    torch.optim.Adamax: dict(lr=0.05, betas=(0.8, 0.9), eps=1e-2, weight_decay=0.05),
    torch.optim.ASGD: dict(lr=0.1, lambd=0.2, alpha=0.7, t0=-0.5, weight_decay=0.05),
    torch.optim.RMSprop: dict(lr=0.02, alpha=0.8, eps=1e-2, weight_decay=0.05, momentum=0.6,
                              centered=True),
    torch.optim.Rprop: dict(lr=0.02, etas=(0.4, 1.3), step_sizes=(1e-3, 0.022)),
}


@pytest.mark.parametrize("opt_type", list(EXTRA), ids=_id)
def test_gradcheck_two_steps_in_hyperparameters(opt_type: type) -> None:
    kwargs = GRADCHECK[opt_type]
    defaults = opt_type([torch.zeros(1, requires_grad=True)]).defaults
    hp, leaves = _tensorise(opt_type, kwargs, defaults)
    names = TENSOR_HYPERS[opt_type]
    torch.manual_seed(3)
    model = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)

    def inner_loop(*values: Tensor) -> Tensor:
        it = iter(values)
        override = {}
        for name in names:
            override[name] = [(next(it), next(it)) if isinstance(hp[name], tuple) else next(it)]
        opt = opt_type(model.parameters(), **kwargs)
        with loft.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
            for k in range(2):
                diffopt.step(mse(fmodel(x * (1 + k)), y))
            outs = [p.reshape(-1) for p in fmodel.parameters()]
            if opt_type is torch.optim.ASGD:  # ax is where t0 enters
                outs += [diffopt.state[0][j]["ax"].reshape(-1) for j in range(2)]
        return torch.cat(outs)

    with torch_scalars_in_float64():
        assert torch.autograd.gradcheck(inner_loop, tuple(leaves), eps=1e-6, atol=1e-7,
                                        rtol=1e-5)
