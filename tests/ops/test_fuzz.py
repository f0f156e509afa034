"""Property-based tests (hypothesis): random models, optimisers, options and overrides.

For each drawn case, in float64:

- the fast weights after every inner step equal ``torch.optim``'s on the same gradients
  (a twin model trained with ``loss.backward(); opt.step()``);
- the meta-gradients, with respect to the initial weights and the override tensors, are
  the same on the fused kernels and on the reference backend;
- the ops pass ``gradcheck`` on small random buckets (every flag, group and segment mix,
  per-element lr and weight_decay).

``derandomize=True`` makes every run draw the same examples (CI is deterministic);
``max_examples`` keeps the file within about a minute on two cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import loft
from loft import _ext, ops, reference

#: Float64 trajectories against torch.optim (different operation order, up to four
#: steps): a few thousand float64 epsilons at most.
TRAJECTORY = dict(rtol=1e-10, atol=1e-12)
#: Meta-gradients, fused against reference (the same math, summed in another order).
META = dict(rtol=1e-9, atol=1e-11)
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
#: About 0.1-0.3 s per inner-loop example (three runs of up to four steps, two cores).
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=_HEALTH)
#: About 0.03 s per gradcheck example.
OP_SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                       suppress_health_check=_HEALTH)


@contextmanager
def _backend(name: str) -> Iterator[None]:
    """The fused kernels, or the pure-PyTorch reference path for every device."""
    if name == "fused":
        yield
        return
    with mock.patch.object(_ext, "has_device_kernels", lambda device: False):
        yield


# ---- the drawn inner loop ------------------------------------------------------------------


@dataclass
class Case:
    """One drawn meta-learning set-up (everything needed to rebuild it from scratch)."""

    widths: list[int]  # input, hidden..., output
    bias: list[bool]  # per layer
    frozen: int | None  # index of a parameter with requires_grad=False
    unused: bool  # an extra parameter the forward never reads
    opt_type: type
    hyper: dict[str, Any]  # shared options of every group
    group_lrs: list[float]  # one lr per group (1 or 2 groups)
    override_keys: list[str]  # hyperparameters given as tensors that require grad
    override_per_group: bool
    steps: int
    seed: int
    override_leaves: list[torch.Tensor] = field(default_factory=list)

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            layers += [nn.Linear(a, b, bias=self.bias[i]), nn.Tanh()]
        model = nn.Sequential(*layers[:-1]).double()
        if self.unused:
            model.register_parameter("unused", nn.Parameter(torch.randn(3, dtype=torch.float64)))
        if self.frozen is not None:
            list(model.parameters())[self.frozen].requires_grad_(False)
        return model

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        params = list(model.parameters())
        split = max(1, len(params) // 2)
        chunks = [params] if len(self.group_lrs) == 1 else [params[:split], params[split:]]
        groups = [{"params": chunk, "lr": lr} for chunk, lr in zip(chunks, self.group_lrs)]
        return self.opt_type(groups, **self.hyper)

    def override(self) -> dict[str, list[Any]]:
        """Fresh leaf tensors for the override keys, valued as the torch twin's options."""
        self.override_leaves = []

        def leaf(value: float) -> torch.Tensor:
            t = torch.tensor(value, dtype=torch.float64, requires_grad=True)
            self.override_leaves.append(t)
            return t

        out: dict[str, list[Any]] = {}
        groups = len(self.group_lrs)
        for key in self.override_keys:
            count = groups if (self.override_per_group or key == "lr") else 1
            values = [self.group_lrs[g] if key == "lr" else self.hyper[key] for g in range(count)]
            out[key] = [tuple(leaf(v) for v in value) if key == "betas" else leaf(value)
                        for value in values]
        return out

    def data(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 * self.seed + step)
        return (torch.randn(5, self.widths[0], generator=gen, dtype=torch.float64),
                torch.randn(5, self.widths[-1], generator=gen, dtype=torch.float64))


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


@st.composite
def cases(draw: st.DrawFn) -> Case:
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 6), min_size=depth + 1, max_size=depth + 1))
    bias = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    num_params = depth + sum(bias)
    frozen = draw(st.none() | st.integers(1, num_params - 1)) if num_params > 1 else None
    unused = draw(st.booleans())
    kind = draw(st.sampled_from(["SGD", "Adam", "AdamW"]))
    unit = st.floats(0.0, 1.0)
    if kind == "SGD":
        variant = draw(st.sampled_from(["plain", "momentum", "nesterov"]))
        momentum = 0.0 if variant == "plain" else draw(st.floats(0.1, 0.95))
        nesterov = variant == "nesterov"
        hyper = dict(momentum=momentum,
                     dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])),
                     nesterov=nesterov,
                     weight_decay=draw(st.sampled_from([0.0, draw(unit) * 0.1])),
                     maximize=draw(st.booleans()))
        lr = st.floats(0.01, 0.5)
        keys = ["lr", "momentum", "dampening", "weight_decay"]
    else:
        hyper = dict(betas=(draw(st.floats(0.0, 0.95)), draw(st.floats(0.5, 0.999))),
                     eps=draw(st.sampled_from([1e-8, 1e-3, 0.05])),
                     weight_decay=draw(st.sampled_from([0.0, draw(unit) * 0.1])),
                     amsgrad=draw(st.booleans()), maximize=draw(st.booleans()))
        lr = st.floats(1e-3, 0.1)
        keys = ["lr", "betas", "eps", "weight_decay"]
    group_lrs = draw(st.lists(lr, min_size=1, max_size=2 if num_params + unused > 1 else 1))
    return Case(widths=widths, bias=bias, frozen=frozen, unused=unused,
                opt_type=getattr(torch.optim, kind), hyper=hyper, group_lrs=group_lrs,
                override_keys=draw(st.lists(st.sampled_from(keys), unique=True, max_size=3)),
                override_per_group=draw(st.booleans()), steps=draw(st.integers(1, 4)),
                seed=draw(st.integers(0, 2**16)))


def _torch_trajectory(case: Case) -> list[list[torch.Tensor]]:
    """The weights after each step of torch.optim on a twin model."""
    model = case.model()
    opt = case.optimizer(model)
    out = [[p.detach().clone() for p in model.parameters()]]
    for step in range(case.steps):
        x, y = case.data(step)
        opt.zero_grad()
        _mse(model(x), y).backward()
        opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def _loft_run(case: Case, backend: str) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """loft's trajectory (``fmodel.parameters(time=t)``) and its meta-gradients with
    respect to the trainable initial weights and the override tensors (zeros: none)."""
    model = case.model()
    opt = case.optimizer(model)
    with _backend(backend), loft.innerloop_ctx(model, opt, copy_initial_weights=False,
                                               override=case.override()) as (fmodel, diffopt):
        for step in range(case.steps):
            diffopt.step(_mse(fmodel(case.data(step)[0]), case.data(step)[1]))
        trajectory = [[p.detach().clone() for p in fmodel.parameters(time=t)]
                      for t in range(case.steps + 1)]
        wrt = [p for p in model.parameters() if p.requires_grad] + case.override_leaves
        x, y = case.data(case.steps)
        grads = torch.autograd.grad(_mse(fmodel(x), y), wrt, allow_unused=True)
    return trajectory, [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


@SETTINGS
@given(case=cases())
def test_fuzz_inner_loop_matches_torch_optim_and_reference(case: Case) -> None:
    expected = _torch_trajectory(case)
    trajectory, fused_grads = _loft_run(case, "fused")
    for t, (got, want) in enumerate(zip(trajectory, expected)):
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, **TRAJECTORY,
                                       msg=lambda m, t=t, i=i: f"step {t}, parameter {i}: {m}")
    _, reference_grads = _loft_run(case, "reference")
    assert len(fused_grads) == len(reference_grads)
    for i, (a, b) in enumerate(zip(fused_grads, reference_grads)):
        torch.testing.assert_close(a, b, **META, msg=lambda m, i=i: f"meta-gradient {i}: {m}")


# ---- gradcheck of the ops ------------------------------------------------------------------


@dataclass
class OpCase:
    """A small random bucket for one op: segments, groups, flags, hyperparameters."""

    op: str
    sizes: list[int]
    groups: list[int]  # group of each segment
    steps: list[int]
    active: list[bool]
    flags: list[int]  # per group
    hyper: dict[str, list[float]]
    seed: int
    # Which of lr and weight_decay are given per element (lr_elementwise, ...).
    elementwise: tuple[bool, bool] = (False, False)


@st.composite
def op_cases(draw: st.DrawFn) -> OpCase:
    op = draw(st.sampled_from(["sgd_step", "adam_step"]))
    num_groups = draw(st.integers(1, 2))
    sizes = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3).filter(lambda s: sum(s)))
    n = len(sizes)
    if op == "sgd_step":
        ranges = dict(lr=(0.05, 0.5), momentum=(0.1, 0.9), dampening=(0.0, 0.5),
                      weight_decay=(0.0, 0.1))
    else:
        ranges = dict(lr=(1e-3, 0.1), beta1=(0.3, 0.95), beta2=(0.8, 0.999), eps=(1e-3, 0.1),
                      weight_decay=(0.0, 0.1))
    hyper = {k: draw(st.lists(st.floats(*r), min_size=num_groups, max_size=num_groups))
             for k, r in ranges.items()}
    return OpCase(op=op, sizes=sizes,
                  groups=draw(st.lists(st.integers(0, num_groups - 1), min_size=n, max_size=n)),
                  steps=draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)),
                  active=draw(st.lists(st.booleans(), min_size=n, max_size=n)),
                  flags=draw(st.lists(st.integers(0, 7), min_size=num_groups,
                                      max_size=num_groups)),
                  hyper=hyper, seed=draw(st.integers(0, 2**16)),
                  elementwise=(draw(st.booleans()), draw(st.booleans())))


def _op_inputs(case: OpCase) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(differentiable inputs in the op's order without segments/flags, segments, flags)."""
    gen = torch.Generator().manual_seed(case.seed)
    n = sum(case.sizes)
    rows, offset = [], 0
    for size, group, step, active in zip(case.sizes, case.groups, case.steps, case.active):
        rows.append([offset, size, group, step, int(active)])
        offset += size
    segments = torch.tensor(rows, dtype=torch.int64)
    flags = torch.tensor(case.flags, dtype=torch.int64)

    def buffer(lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
        return torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo

    lr_range, wd_range = ((0.05, 0.5) if case.op == "sgd_step" else (1e-3, 0.1)), (0.0, 0.1)
    elementwise = [buffer(*r) if given else None
                   for given, r in zip(case.elementwise, (lr_range, wd_range))]
    if case.op == "sgd_step":
        buffers = [buffer(), buffer(), buffer()]
    else:
        params, grads, exp_avg, exp_avg_sq = buffer(), buffer(), buffer(-0.1, 0.1), buffer(0.01,
                                                                                           0.5)
        # Keep max_exp_avg_sq away from the new exp_avg_sq: torch.maximum has a kink there.
        hyper = {k: torch.tensor(v, dtype=torch.float64) for k, v in case.hyper.items()}
        new_v = reference.adam_step(params, grads, exp_avg, exp_avg_sq, exp_avg_sq.clone(),
                                    segments, *hyper.values(), flags & ~2, *elementwise)[2]
        vmax = buffer(0.01, 0.5)
        vmax = torch.where((vmax - new_v).abs() < 1e-3, vmax + 5e-3, vmax)
        buffers = [params, grads, exp_avg, exp_avg_sq, vmax]
    hyper_tensors = [torch.tensor(v, dtype=torch.float64) for v in case.hyper.values()]
    leaves = [t.requires_grad_() for t in buffers + hyper_tensors
              + [e for e in elementwise if e is not None]]
    return leaves, segments, flags


@OP_SETTINGS
@given(case=op_cases())
def test_fuzz_gradcheck_of_the_ops(case: OpCase, fused: None) -> None:
    """``loft.ops.<op>`` (fused forward and backward) against finite differences, with
    lr and / or weight_decay per element in some cases."""
    leaves, segments, flags = _op_inputs(case)
    num_buffers = 3 if case.op == "sgd_step" else 5
    num_hyper = len(case.hyper)
    op = getattr(ops, case.op)

    def fn(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = iter(xs[num_buffers + num_hyper:])
        elementwise = [next(given) if present else None for present in case.elementwise]
        return op(*xs[:num_buffers], segments, *xs[num_buffers:num_buffers + num_hyper], flags,
                  *elementwise)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_fuzz_cases_cover_the_options() -> None:
    """The drawn cases reach every optimiser, option and structure at least once."""
    seen: set[str] = set()

    @settings(max_examples=SETTINGS.max_examples, deadline=None, derandomize=True,
              database=None)
    @given(case=cases())
    def collect(case: Case) -> None:
        seen.add(case.opt_type.__name__)
        seen.update(k for k, v in case.hyper.items() if v is True)
        seen.update(f"override:{k}" for k in case.override_keys)
        seen.add(f"groups:{len(case.group_lrs)}")
        seen.add(f"steps:{case.steps}")
        if case.frozen is not None:
            seen.add("frozen")
        if case.unused:
            seen.add("unused")
        if case.hyper.get("momentum"):
            seen.add("momentum")
        if case.hyper.get("weight_decay"):
            seen.add("weight_decay")

    collect()
    wanted = {"SGD", "Adam", "AdamW", "nesterov", "maximize", "amsgrad", "momentum",
              "weight_decay", "frozen", "unused", "groups:1", "groups:2", "steps:1", "steps:4",
              "override:lr", "override:betas", "override:momentum", "override:eps"}
    assert wanted <= seen, wanted - seen
