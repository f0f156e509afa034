"""Inner loops through innerloop_ctx: trajectories, meta-gradients, higher parity."""

from __future__ import annotations

import copy
from typing import Any

import higher
import numpy as np
import pytest
import torch
from torch import nn

import loft

from ..conftest import DEVICES
from ._per_tensor import PerTensorOptimizer

F64 = dict(rtol=1e-12, atol=1e-12)

SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.5, dampening=0.3, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02),
    dict(lr=0.1, momentum=0.7, maximize=True),
]
ADAM_CONFIGS = [
    dict(lr=0.01),
    dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05),
    dict(lr=0.02, amsgrad=True),
    dict(lr=0.01, maximize=True, weight_decay=0.01),
]
OPTIMIZERS = (
    [(torch.optim.SGD, c) for c in SGD_CONFIGS]
    + [(torch.optim.Adam, c) for c in ADAM_CONFIGS]
    + [(torch.optim.AdamW, c) for c in ADAM_CONFIGS]
)


def _id(item: tuple[type, dict]) -> str:
    return item[0].__name__ + "-" + "-".join(f"{k}={v}" for k, v in item[1].items())


def make_model(seed: int = 0, device: str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    return model.double().to(device)


def batches(steps: int, seed: int = 1, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=gen, dtype=torch.float64).to(device),
             torch.randn(6, 2, generator=gen, dtype=torch.float64).to(device))
            for _ in range(steps)]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_item", OPTIMIZERS, ids=_id)
def test_trajectory_equals_torch_optim(opt_item: tuple[type, dict], device: str) -> None:
    """The fast weights after every step equal torch.optim's, to float64 rounding."""
    opt_type, kwargs = opt_item
    model = make_model(device=device)
    data = batches(6, device=device)
    twin = copy.deepcopy(model)
    twin_opt = opt_type(twin.parameters(), **kwargs)
    with loft.innerloop_ctx(model, opt_type(model.parameters(), **kwargs)) as (fmodel, diffopt):
        for x, y in data:
            diffopt.step(mse(fmodel(x), y))
            twin_opt.zero_grad()
            mse(twin(x), y).backward()
            twin_opt.step()
            for fast, ref in zip(fmodel.parameters(), twin.parameters()):
                torch.testing.assert_close(fast, ref.detach(), **F64)


def _per_tensor_kind(opt_type: type) -> str:
    return {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}[opt_type]


def _tensor_hyper(opt_type: type, kwargs: dict) -> tuple[dict[str, Any], dict[str, Any], list]:
    """Turn every numeric hyperparameter into a float64 tensor that requires grad."""
    hyper: dict[str, Any] = {}
    override: dict[str, Any] = {}
    leaves = []
    defaults = {"lr": kwargs["lr"], "weight_decay": kwargs.get("weight_decay", 0.0)}
    if opt_type is torch.optim.SGD:
        defaults.update(momentum=kwargs.get("momentum", 0.0), dampening=kwargs.get("dampening", 0.0))
    else:
        defaults.update(eps=kwargs.get("eps", 1e-8))
        b1, b2 = kwargs.get("betas", (0.9, 0.999))
        t1 = torch.tensor(b1, dtype=torch.float64, requires_grad=True)
        t2 = torch.tensor(b2, dtype=torch.float64, requires_grad=True)
        hyper["betas"] = (t1, t2)
        override["betas"] = [(t1, t2)]
        leaves += [t1, t2]
    for k, v in defaults.items():
        if k == "momentum" and v == 0:
            hyper[k] = v  # momentum 0 means "no buffer": a mode, not a value
            continue
        t = torch.tensor(v, dtype=torch.float64, requires_grad=True)
        hyper[k], override[k] = t, [t]
        leaves.append(t)
    for k in ("nesterov", "maximize", "amsgrad"):
        if k in kwargs:
            hyper[k] = kwargs[k]
    return hyper, override, leaves


def _grads_or_zeros(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients, with zeros for inputs the output does not depend on (dampening
    without momentum, say)."""
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


@pytest.mark.parametrize("opt_item", OPTIMIZERS, ids=_id)
def test_meta_gradients_equal_per_tensor_unroll(opt_item: tuple[type, dict]) -> None:
    """Meta-gradients (initial weights and every tensor hyperparameter) equal a per-tensor
    pure-PyTorch unroll, to float64 rounding."""
    opt_type, kwargs = opt_item
    data, (xq, yq) = batches(5), batches(1, seed=9)[0]

    def run_loft() -> list[torch.Tensor]:
        model = make_model()
        hyper, override, leaves = _tensor_hyper(opt_type, kwargs)
        opt = opt_type(model.parameters(), **kwargs)
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False,
                                override=override) as (fmodel, diffopt):
            for x, y in data:
                diffopt.step(mse(fmodel(x), y))
            meta = mse(fmodel(xq), yq)
        return _grads_or_zeros(meta, list(model.parameters()) + leaves)

    def run_per_tensor() -> list[torch.Tensor]:
        model = make_model()
        hyper, _, leaves = _tensor_hyper(opt_type, kwargs)
        opt = PerTensorOptimizer(_per_tensor_kind(opt_type), **hyper)
        names = [n for n, _ in model.named_parameters()]
        params = list(model.parameters())
        for x, y in data:
            loss = mse(torch.func.functional_call(model, dict(zip(names, params)), (x,)), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            params = opt.step(params, list(grads))
        meta = mse(torch.func.functional_call(model, dict(zip(names, params)), (xq,)), yq)
        return _grads_or_zeros(meta, list(model.parameters()) + leaves)

    for got, want in zip(run_loft(), run_per_tensor()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs", [c for c in SGD_CONFIGS if "maximize" not in c], ids=str)
def test_sgd_agrees_with_higher(kwargs: dict) -> None:
    """SGD and momentum: fast weights and meta-gradients equal higher 0.2.1's (which
    predates ``maximize``)."""
    data, (xq, yq) = batches(4), batches(1, seed=9)[0]
    results = []
    for lib in (loft, higher):
        model = make_model()
        lr = torch.tensor(kwargs["lr"], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD(model.parameters(), **kwargs)
        with lib.innerloop_ctx(model, opt, copy_initial_weights=False,
                               override={"lr": [lr]}) as (fmodel, diffopt):
            for x, y in data:
                diffopt.step(mse(fmodel(x), y))
            history = [[p.detach().clone() for p in fmodel.parameters(time=t)]
                       for t in range(len(data) + 1)]
            meta = mse(fmodel(xq), yq)
            grads = torch.autograd.grad(meta, list(model.parameters()) + [lr])
        results.append((history, grads))
    (h_loft, g_loft), (h_higher, g_higher) = results
    for step_loft, step_higher in zip(h_loft, h_higher):
        for a, b in zip(step_loft, step_higher):
            torch.testing.assert_close(a, b, **F64)
    for a, b in zip(g_loft, g_higher):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _classic(copy_initial_weights: bool, lib: Any = loft):
    """higher's learned-lr-and-momentum example."""
    np.random.seed(1)
    torch.manual_seed(3)
    x = torch.tensor(np.random.rand(100, 1))
    y = 3.5 * x
    model = nn.Linear(1, 1, bias=False).double()
    lr = torch.tensor([0.3], requires_grad=True)
    momentum = torch.tensor([0.5], requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    with lib.innerloop_ctx(model, opt, copy_initial_weights=copy_initial_weights,
                           override={"lr": [lr], "momentum": [momentum]}) as (fmodel, diffopt):
        for _ in range(5):
            diffopt.step(((fmodel(x) - y) ** 2).mean())
        history = [list(fmodel.parameters(time=t))[0].item() for t in range(6)]
        meta = ((list(fmodel.parameters())[0] - 3.5) ** 2).sum()
        meta.backward()
    return model, lr, momentum, history, meta


def test_classic_learned_lr_and_momentum() -> None:
    model, lr, momentum, history, meta = _classic(copy_initial_weights=True)
    np.testing.assert_allclose(history, [-0.9915, -0.1217, 1.0145, 2.0640, 2.8668, 3.3908],
                               atol=5e-5)
    assert meta.item() == pytest.approx(0.011927987982895, abs=1e-15)
    assert lr.grad.item() == pytest.approx(-1.6295, abs=5e-5)
    assert momentum.grad.item() == pytest.approx(-0.9496, abs=5e-5)
    assert model.weight.grad is None
    # And exactly higher's figures, run side by side.
    _, lr_h, mom_h, history_h, meta_h = _classic(copy_initial_weights=True, lib=higher)
    assert history == pytest.approx(history_h, abs=1e-15)
    assert meta.item() == pytest.approx(meta_h.item(), abs=1e-15)
    assert lr.grad.item() == pytest.approx(lr_h.grad.item(), rel=1e-12)
    assert momentum.grad.item() == pytest.approx(mom_h.grad.item(), rel=1e-12)


def test_classic_weight_gradient_matches_finite_difference() -> None:
    model, _, _, _, meta = _classic(copy_initial_weights=False)
    grad = model.weight.grad.item()
    assert grad == pytest.approx(-0.005311, abs=5e-7)
    # One meta-SGD step of lr 1e-5 lowers the meta-loss by lr * grad^2 (first order).
    w0 = model.weight.detach().clone()
    step = 1e-5

    def meta_loss_at(w: torch.Tensor) -> float:
        np.random.seed(1)
        torch.manual_seed(3)
        x = torch.tensor(np.random.rand(100, 1))
        y = 3.5 * x
        m = nn.Linear(1, 1, bias=False).double()
        with torch.no_grad():
            m.weight.copy_(w)
        lr, momentum = torch.tensor([0.3]), torch.tensor([0.5])
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5)
        with loft.innerloop_ctx(m, opt, override={"lr": [lr], "momentum": [momentum]}) as (f, d):
            for _ in range(5):
                d.step(((f(x) - y) ** 2).mean())
            return ((list(f.parameters())[0] - 3.5) ** 2).sum().item()

    before = meta_loss_at(w0)
    after = meta_loss_at(w0 - step * grad)
    assert (after - before) / (-step * grad) == pytest.approx(grad, rel=1e-3)
    central = (meta_loss_at(w0 + 1e-6) - meta_loss_at(w0 - 1e-6)) / 2e-6
    assert central == pytest.approx(grad, rel=1e-5)


def test_one_fused_op_per_bucket_and_no_per_tensor_math(fused: None) -> None:
    """Profiler: one inner Adam step on a 16-layer MLP (32 tensors) runs one loft op per
    bucket and no aten::sqrt/addcdiv; the meta-backward runs one loft backward per step."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(16) for m in (nn.Linear(16, 16), nn.ReLU())])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(4, 16)
    steps = 3
    with loft.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).mean())  # warm-up outside the profile
        with torch.profiler.profile() as prof:
            diffopt.step(fmodel(x).pow(2).mean())
        counts = _op_counts(prof)
        assert counts.get("loft::adam_step", 0) == 1, counts
        assert counts.get("aten::sqrt", 0) == 0 and counts.get("aten::addcdiv", 0) == 0, counts
        for _ in range(steps - 2):
            diffopt.step(fmodel(x).pow(2).mean())
        meta = fmodel(x).pow(2).mean()
        with torch.profiler.profile() as prof:
            meta.backward()
        counts = _op_counts(prof)
        assert counts.get("loft::adam_step_backward", 0) == steps, counts
        assert counts.get("aten::sqrt", 0) == 0, counts


def _op_counts(prof: torch.profiler.profile) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def test_two_buckets_one_op_each(fused: None) -> None:
    """Parameters of two dtypes make two buckets: two fused calls per step."""
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x).double())

    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(3, 4)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with torch.profiler.profile() as prof:
            diffopt.step(fmodel(x).pow(2).mean())
        assert _op_counts(prof).get("loft::sgd_step", 0) == 2
        dtypes = [p.dtype for p in fmodel.parameters()]
        assert dtypes == [torch.float32] * 2 + [torch.float64] * 2


@pytest.mark.parametrize("opt_type", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_fused_and_reference_backends_agree(opt_type: type, fused: None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The same inner loop on both paths agrees to float64 rounding."""
    from loft import _ext

    kwargs = dict(lr=0.05, momentum=0.9) if opt_type is torch.optim.SGD else dict(lr=0.01)

    def run() -> list[torch.Tensor]:
        model = make_model()
        lr = torch.tensor(kwargs["lr"], dtype=torch.float64, requires_grad=True)
        opt = opt_type(model.parameters(), **kwargs)
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False,
                                override={"lr": [lr]}) as (fmodel, diffopt):
            for x, y in batches(4):
                diffopt.step(mse(fmodel(x), y))
            meta = mse(fmodel(batches(1, seed=5)[0][0]), batches(1, seed=5)[0][1])
            return [p.detach() for p in fmodel.parameters()] + list(
                torch.autograd.grad(meta, list(model.parameters()) + [lr]))

    fused_result = run()
    monkeypatch.setattr(_ext, "has_device_kernels", lambda device: False)
    reference_result = run()
    for a, b in zip(fused_result, reference_result):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_partially_used_and_frozen_parameters_are_skipped() -> None:
    """No gradient: no update, no state change, no step count increment (as higher)."""
    torch.manual_seed(0)

    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 3).double()
            self.unused = nn.Linear(3, 3).double()
            self.frozen = nn.Linear(3, 3).double()
            self.frozen.requires_grad_(False)

        def forward(self, x: torch.Tensor, second: bool = False) -> torch.Tensor:
            out = self.frozen(self.used(x))
            return self.unused(out) if second else out

    model = Partial()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, dtype=torch.float64)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        initial = [p.detach().clone() for p in fmodel.parameters()]
        diffopt.step(fmodel(x).pow(2).sum())
        after1 = list(fmodel.parameters())
        for i in (2, 3, 4, 5):  # unused.* and frozen.*
            torch.testing.assert_close(after1[i], initial[i], rtol=0, atol=0)
        assert not after1[4].requires_grad and not after1[5].requires_grad
        # Now "unused" gets its first gradient: its bias correction is that of step 1.
        diffopt.step(fmodel(x, second=True).pow(2).sum())
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.1)
    twin_opt.zero_grad()
    twin(x).pow(2).sum().backward()
    twin_opt.step()
    twin_opt.zero_grad()
    twin(x, second=True).pow(2).sum().backward()
    twin_opt.step()
    for fast, ref in zip(fmodel.parameters(), twin.parameters()):
        torch.testing.assert_close(fast.detach(), ref.detach(), **F64)


def test_history_and_track_higher_grads_false() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(3)
    with loft.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for x, y in data:
            diffopt.step(mse(fmodel(x), y))
        latest = list(fmodel.parameters())
        assert all(p.requires_grad and p.grad_fn is None for p in latest)
        assert list(fmodel.parameters(time=3))[0] is latest[0]
        with pytest.raises(ValueError, match="not tracking"):
            fmodel.parameters(time=0)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x, y in data:
            diffopt.step(mse(fmodel(x), y))
        for t in range(4):
            assert len(list(fmodel.parameters(time=t))) == len(list(model.parameters()))
        torch.testing.assert_close(list(fmodel.parameters(time=0))[0], model[0].weight)
        with pytest.raises(IndexError, match="0 to 3"):
            fmodel.parameters(time=4)


def test_step_with_explicit_params_and_no_fmodel() -> None:
    """get_diff_optim without a patched model: params are passed to step."""
    model = make_model()
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    diffopt = loft.get_diff_optim(opt, model.parameters())
    names = [n for n, _ in model.named_parameters()]
    for x, y in batches(2):
        loss = mse(torch.func.functional_call(model, dict(zip(names, params)), (x,)), y)
        params = diffopt.step(loss, params=params)
    assert all(p.grad_fn is not None for p in params)
    with pytest.raises(ValueError, match="params"):
        diffopt.step(loss)


def test_override_betas_tuple_of_tensors_gets_gradients() -> None:
    model = make_model()
    b1 = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    b2 = torch.tensor(0.99, dtype=torch.float64, requires_grad=True)
    eps = torch.tensor(1e-3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with loft.innerloop_ctx(model, opt, override={"betas": [(b1, b2)], "eps": [eps]}) as (
            fmodel, diffopt):
        for x, y in batches(3):
            diffopt.step(mse(fmodel(x), y))
        meta = mse(*[fmodel(batches(1, seed=4)[0][0]), batches(1, seed=4)[0][1]])
        grads = torch.autograd.grad(meta, [b1, b2, eps])
    assert all(torch.isfinite(g) and g != 0 for g in grads)


def test_override_length_is_checked() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'lr'.*1 value or one per param group"):
        loft.get_diff_optim(opt, model.parameters(), override={"lr": [0.1, 0.2]})


def test_unsupported_optimizer_names_register_optim() -> None:
    model = make_model()
    opt = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match="register_optim"):
        loft.get_diff_optim(opt, model.parameters())


def test_param_groups_with_their_own_hyperparameters() -> None:
    model = make_model()
    groups = [{"params": model[0].parameters(), "lr": 0.1, "momentum": 0.9},
              {"params": model[2].parameters(), "lr": 0.01, "nesterov": True, "momentum": 0.5},
              {"params": model[4].parameters()}]
    twin = copy.deepcopy(model)
    twin_groups = [{"params": twin[0].parameters(), "lr": 0.1, "momentum": 0.9},
                   {"params": twin[2].parameters(), "lr": 0.01, "nesterov": True, "momentum": 0.5},
                   {"params": twin[4].parameters()}]
    opt = torch.optim.SGD(groups, lr=0.05)
    twin_opt = torch.optim.SGD(twin_groups, lr=0.05)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x, y in batches(4):
            diffopt.step(mse(fmodel(x), y))
            twin_opt.zero_grad()
            mse(twin(x), y).backward()
            twin_opt.step()
        for fast, ref in zip(fmodel.parameters(), twin.parameters()):
            torch.testing.assert_close(fast.detach(), ref.detach(), **F64)


def test_optimizer_state_is_copied_from_torch_optimizer() -> None:
    """A torch optimizer that already stepped hands its moments and step counts over."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = batches(1, seed=3)[0]
    for _ in range(2):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.01)
    twin_opt.load_state_dict(opt.state_dict())
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for xb, yb in batches(2):
            diffopt.step(mse(fmodel(xb), yb))
            twin_opt.zero_grad()
            mse(twin(xb), yb).backward()
            twin_opt.step()
        for fast, ref in zip(fmodel.parameters(), twin.parameters()):
            torch.testing.assert_close(fast.detach(), ref.detach(), **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inner_loop_tracks_float64(dtype: torch.dtype) -> None:
    """A low-precision bucket follows the float64 trajectory within its precision."""
    results = {}
    for dt in (torch.float64, dtype):
        torch.manual_seed(0)
        model = nn.Linear(5, 3).to(dt)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for x, y in batches(3):
                diffopt.step(mse(fmodel(x.to(dt)), y[:, :1].expand(-1, 3).to(dt)))
            results[dt] = [p.detach().double() for p in fmodel.parameters()]
            assert all(p.dtype == dt for p in fmodel.parameters())
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    for a, b in zip(results[dtype], results[torch.float64]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_state_is_exposed_in_highers_layout() -> None:
    """``diffopt.state[group][index]`` holds the current moments and step counts."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.01)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x, y in batches(2):
            diffopt.step(mse(fmodel(x), y))
            twin_opt.zero_grad()
            mse(twin(x), y).backward()
            twin_opt.step()
    for j, p in enumerate(twin.parameters()):
        mine, theirs = diffopt.state[0][j], twin_opt.state[p]
        assert mine["step"] == int(theirs["step"]) == 2
        torch.testing.assert_close(mine["exp_avg"].detach(), theirs["exp_avg"], **F64)
        torch.testing.assert_close(mine["exp_avg_sq"].detach(), theirs["exp_avg_sq"], **F64)


@pytest.mark.parametrize("opt_type", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("tensor_lr", [True, False])
def test_inner_loop_is_twice_differentiable(opt_type: type, tensor_lr: bool) -> None:
    """gradgradcheck through two fused steps: the bucket step's backward is differentiable
    with respect to the initial weights and a tensor learning rate (without one, SGD's
    step keeps no buffer values: its backward is linear)."""
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kwargs = dict(momentum=0.9) if opt_type is torch.optim.SGD else dict(betas=(0.8, 0.9))

    def final_loss(w: torch.Tensor, lr: torch.Tensor | None = None) -> torch.Tensor:
        model = torch.nn.Linear(3, 2, bias=False).double()
        opt = opt_type(model.parameters(), lr=0.1, **kwargs)
        fmodel = loft.monkeypatch(model)
        diffopt = loft.get_diff_optim(opt, model.parameters(), fmodel=fmodel,
                                      override={"lr": [lr]} if tensor_lr else None)
        params = [w]
        for _ in range(2):
            params = diffopt.step(fmodel(x, params=params).pow(3).mean(), params=params)
        return fmodel(x, params=params).pow(2).mean()

    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=tensor_lr)
    assert torch.autograd.gradgradcheck(final_loss, (w, lr) if tensor_lr else (w,))
