"""Misuse gives a clear error; unusual but valid input works; non-finite values propagate.

Issue #7. Each bad input checks the error type and that the message names the problem.
Valid but unusual models (several dtypes, several devices, zero-size and non-contiguous
parameters) must give the reference backend's numbers. NaN and Inf in gradients (and
weights) must propagate as torch.optim propagates them. Malformed direct op calls raise
``RuntimeError`` naming the argument (``_bad_op_args``), also under AddressSanitizer
(``tools/asan_ops.py``).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import loft
from loft import _ext, reference

from ..conftest import DEVICES
from . import _bad_op_args


def _load_asan_ops() -> ModuleType:
    """``tools/asan_ops.py`` (a script, not a package module), loaded from its path."""
    path = Path(__file__).resolve().parents[2] / "tools" / "asan_ops.py"
    spec = importlib.util.spec_from_file_location("asan_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


asan_ops = _load_asan_ops()

F64 = dict(rtol=1e-12, atol=1e-12)
#: Models mixing float32 into float64: both backends compute each bucket in its own
#: dtype, and float32 rounding (epsilon 1.2e-7) reaches every later quantity, amplified
#: by a few steps and a backward; the bound is a few hundred float32 epsilons.
MIXED = dict(rtol=5e-5, atol=5e-6)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(seed: int = 0, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randn(n, 3, generator=gen, dtype=torch.float64))


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


@contextmanager
def _backend(name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Run the optimisers on ``"fused"`` kernels or the ``"reference"`` PyTorch path.

    Yields a counter of the reference op calls, so a test can show which path ran.
    """
    calls = {"reference": 0}
    with monkeypatch.context() as patch:
        for op in ("sgd_step", "adam_step"):
            original = getattr(reference, op)

            def counted(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
                calls["reference"] += 1
                return _original(*args, **kwargs)

            patch.setattr(reference, op, counted)
        if name == "reference":
            patch.setattr(_ext, "has_device_kernels", lambda device: False)
        yield calls


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


# ---- errors from the time-indexed history --------------------------------------------------


def test_history_outside_the_recorded_steps_gives_the_range() -> None:
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(_mse(fmodel(x), y))
        for time in (4, 100, -5):
            with pytest.raises(IndexError, match=rf"time={time}\b.*\b0 to 3\b"):
                fmodel.parameters(time=time)
        assert [p.shape for p in fmodel.parameters(time=-4)] == \
            [p.shape for p in model.parameters()]
    with loft.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(_mse(fmodel(x), y))
        with pytest.raises(ValueError, match=r"only the latest parameters \(time=2\)"):
            fmodel.parameters(time=1)


# ---- input that must work: the same numbers as the reference backend -------------------------


class _Unusual(nn.Module):
    """A small model with one kind of unusual parameter (``kind``):

    - ``dtypes``: a float64 layer feeding a float32 layer (two buckets);
    - ``zero_size``: a [0, 5] parameter in the float64 bucket, and a float32 bucket that
      holds only a zero-size parameter;
    - ``non_contiguous``: parameters created as a transposed tensor and a strided slice;
    - ``devices``: the second layer on the GPU.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.kind = kind
        self.first = nn.Linear(4, 5).double()
        second = nn.Linear(5, 3).double()
        if kind == "dtypes":
            second = second.float()
        if kind == "devices":
            second = second.cuda()
        self.second = second
        if kind == "zero_size":
            self.empty = nn.Parameter(torch.zeros(0, 5, dtype=torch.float64))
            self.empty32 = nn.Parameter(torch.zeros(0, dtype=torch.float32))
        if kind == "non_contiguous":
            self.transposed = nn.Parameter(torch.randn(3, 4, dtype=torch.float64).t())
            self.strided = nn.Parameter(torch.randn(5, 2, dtype=torch.float64)[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if self.kind == "zero_size":
            h = h + self.empty.sum(0) + self.empty32.sum().double()
        if self.kind == "non_contiguous":
            h = h + self.strided + (x @ self.transposed).sum(1, keepdim=True)
        h = torch.tanh(h)
        w = self.second.weight
        out = self.second(h.to(device=w.device, dtype=w.dtype))
        return out.to(device=x.device, dtype=x.dtype)


UNUSUAL = ["dtypes", "zero_size", "non_contiguous"] + (
    ["devices"] if torch.cuda.is_available() else [])
UNUSUAL_OPTIMIZERS = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
    (torch.optim.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.01)),
    (torch.optim.AdamW, dict(lr=0.05, betas=(0.3, 0.9))),
]


def _unusual_run(kind: str, opt_type: type, kwargs: dict) -> list[torch.Tensor]:
    """Three inner steps with a learned lr; the whole trajectory, then the meta-gradients
    with respect to the initial weights and the lr."""
    model = _Unusual(kind)
    assert kind != "non_contiguous" or not any(p.is_contiguous() for n, p in
                                               model.named_parameters() if n in ("transposed",
                                                                                 "strided"))
    lr = torch.tensor(kwargs["lr"], dtype=torch.float64, requires_grad=True)
    opt = opt_type(model.parameters(), **kwargs)
    x, y = _data(seed=1)
    y = y[:, :3]
    out: list[torch.Tensor] = []
    with loft.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (
            fmodel, diffopt):
        for step in range(3):
            diffopt.step(_mse(fmodel(x), y))
            out += [p.detach().double().cpu() for p in fmodel.parameters(time=step + 1)]
        meta = _mse(fmodel(x * 0.5), y)
        grads = torch.autograd.grad(meta, list(model.parameters()) + [lr])
    return out + [g.double().cpu() for g in grads]


@pytest.mark.parametrize("opt_item", UNUSUAL_OPTIMIZERS, ids=lambda o: o[0].__name__)
@pytest.mark.parametrize("kind", UNUSUAL)
def test_unusual_parameters_match_the_reference_backend(kind: str, opt_item: tuple[type, dict],
                                                        fused: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    opt_type, kwargs = opt_item
    with _backend("fused", monkeypatch) as calls:
        fused_result = _unusual_run(kind, opt_type, kwargs)
    assert calls["reference"] == 0
    with _backend("reference", monkeypatch) as calls:
        reference_result = _unusual_run(kind, opt_type, kwargs)
    assert calls["reference"] > 0
    tol = MIXED if kind == "dtypes" else F64
    assert len(fused_result) == len(reference_result)
    for i, (a, b) in enumerate(zip(fused_result, reference_result)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"entry {i}: {m}")
    assert all(torch.isfinite(t).all() for t in fused_result)


def test_views_of_a_flat_buffer_are_the_same_with_and_without_grad_mode() -> None:
    """Outside grad mode, a step cuts its new flat buffer with one as_strided per
    tensor; the views must be those of split + view (shape, strides, offset, base,
    values), also for 0-d, empty and size-1 dimensions and a buffer that does not start
    its storage."""
    from loft.flat import make_buckets

    shapes = [(3, 4), (), (0, 5), (2, 1, 3), (7,), (1,)]
    bucket = make_buckets([torch.zeros(s) for s in shapes], [0] * len(shapes))[0]
    storage = torch.arange(bucket.numel + 3, dtype=torch.float32)
    flat = storage[3:]
    with torch.no_grad():
        fast = bucket.plain_views(flat)
    slow = bucket.plain_views(flat)  # grad mode: torch's split and view
    assert [tuple(v.shape) for v in fast] == shapes
    for a, b in zip(fast, slow):
        assert (a.shape, a.stride(), a.storage_offset()) == (b.shape, b.stride(),
                                                             b.storage_offset())
        assert a._base is flat._base and torch.equal(a, b)


def test_segment_tables_of_usual_steps_equal_the_built_ones() -> None:
    """The usual step's segment table is a slice of a batch of tables made several step
    counts at a time; across batch boundaries, backwards in step count and next to
    steps with an inactive tensor, each must equal the table built row by row, be
    contiguous, and stay unchanged when later tables are made."""
    from loft.flat import make_buckets

    bucket = make_buckets([torch.zeros(3, 4), torch.zeros(5), torch.zeros(2, 2)], [0, 1, 0])[0]
    kept = []
    for step in [0, 1, 2, 31, 32, 33, 64, 5, 100, 0]:
        for active in ([True, True, True], [True, False, True]):
            steps = [step] * 3
            table = bucket.segments(steps, active)
            assert table.is_contiguous()
            assert torch.equal(table, bucket._table(steps, active)), (step, active)
            kept.append((table, table.clone()))
    assert all(torch.equal(table, copy) for table, copy in kept)


def test_sgd_steps_after_the_first_share_one_segment_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SGD reads only whether a tensor's step count is 0, so its steps after the first
    pass the same table (one storage kept by the backward for the whole loop, not one
    per step); Adam's tables carry the true step counts."""
    from loft.flat import Bucket

    tables: list[torch.Tensor] = []
    original = Bucket.segments

    def recording(self: Bucket, steps: Any, active: Any) -> torch.Tensor:
        table = original(self, steps, active)
        tables.append(table)
        return table

    monkeypatch.setattr(Bucket, "segments", recording)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    for opt_type, kwargs in ((torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                             (torch.optim.Adam, dict(lr=0.1))):
        tables.clear()
        model = nn.Linear(3, 2)
        with loft.innerloop_ctx(model, opt_type(model.parameters(), **kwargs)) as (f, opt):
            for _ in range(5):
                opt.step(((f(x) - y) ** 2).mean())
        steps = [t[:, 3].tolist() for t in tables]
        if opt_type is torch.optim.SGD:
            assert steps == [[0, 0]] + [[1, 1]] * 4
            assert len({t.untyped_storage().data_ptr() for t in tables[1:]}) == 1
            assert len({t.data_ptr() for t in tables[1:]}) == 1
        else:
            assert steps == [[k, k] for k in range(5)]


class _WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.unused = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


PASS_THROUGH_OPTIMIZERS = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.Adam, dict(lr=0.05, amsgrad=True, maximize=True)),
    (torch.optim.AdamW, dict(lr=0.05, weight_decay=0.0)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),  # no pass-through
    (torch.optim.Adam, dict(lr=0.05, weight_decay=0.01)),  # no pass-through
]


@pytest.mark.parametrize("opt_item", PASS_THROUGH_OPTIMIZERS,
                         ids=lambda o: f"{o[0].__name__}-{o[1]}")
@pytest.mark.parametrize("learned_wd", [False, True])
def test_weights_gradient_pass_through_equals_the_kernels(
        opt_item: tuple[type, dict], learned_wd: bool, fused: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without weight decay, a step's backward hands the upstream gradient of the new
    weights to the old ones as it is instead of the kernel's copy. The meta-gradients
    with respect to every recorded step's weights (one tensor unused, so inactive) must
    equal, bit for bit, those of the kernel's copy; and it must be used exactly when the
    weight decay is 0 and does not require grad."""
    from loft import _step

    opt_type, kwargs = opt_item
    original = _step._params_pass_through
    used: list[bool] = []

    def run(allow: bool) -> list[torch.Tensor]:
        def check(spec: Any, hyper: Any) -> bool:
            used.append(original(spec, hyper))
            return used[-1] and allow

        monkeypatch.setattr(_step, "_params_pass_through", check)
        torch.manual_seed(0)
        model = _WithUnusedLayer()
        opt = opt_type(model.parameters(), **kwargs)
        override = None
        if learned_wd:
            override = {"weight_decay": [torch.tensor(kwargs.get("weight_decay", 0.0),
                                                      requires_grad=True)]}
        x, y = torch.randn(5, 3), torch.randn(5, 2)
        with loft.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(((fmodel(x) - y) ** 2).mean())
            meta = ((fmodel(x * 0.5) - y) ** 2).mean()
            weights = [w for t in range(4) for w in fmodel.parameters(time=t)][:-2]
            grads = torch.autograd.grad(meta, weights, allow_unused=True)
        return [g if g is not None else torch.zeros(0) for g in grads]

    with_pass = run(True)
    expect_used = kwargs.get("weight_decay", 0.0) == 0 and not learned_wd
    assert used and all(u == expect_used for u in used)
    used.clear()
    with_kernel = run(False)
    assert len(with_pass) == len(with_kernel)
    for i, (a, b) in enumerate(zip(with_pass, with_kernel)):
        assert torch.equal(a, b), f"gradient {i} differs"


def test_non_contiguous_params_passed_to_step(fused: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a patched model: non-contiguous views given as ``params=``."""
    model = _mlp()
    x, y = _data()
    names = [n for n, _ in model.named_parameters()]

    def run() -> list[torch.Tensor]:
        bases = [p.detach().clone().t().contiguous().requires_grad_() if p.dim() == 2 else
                 p.detach().clone().repeat(2).requires_grad_() for p in model.parameters()]
        params = [b.t() if b.dim() == 2 else b[::2] for b in bases]
        assert not any(p.is_contiguous() for p in params)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        diffopt = loft.get_diff_optim(opt, model.parameters())
        for _ in range(3):
            out = torch.func.functional_call(model, dict(zip(names, params)), (x,))
            params = diffopt.step(_mse(out, y), params=params)
        meta = _mse(torch.func.functional_call(model, dict(zip(names, params)), (x,)), y)
        return [p.detach() for p in params] + list(torch.autograd.grad(meta, bases))

    with _backend("fused", monkeypatch):
        fused_result = run()
    with _backend("reference", monkeypatch):
        reference_result = run()
    for a, b in zip(fused_result, reference_result):
        torch.testing.assert_close(a, b, **F64)


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


# ---- direct op calls with malformed arguments --------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_malformed_op_calls_raise_naming_the_argument(device: str, fused: None) -> None:
    """Every case of ``_bad_op_args`` on the fused op and on the reference function."""
    calls = _bad_op_args.bad_calls(device)
    assert len(calls) > 150
    for call in calls:
        for fn in (getattr(torch.ops.loft, call.op), getattr(reference, call.op)):
            with pytest.raises(RuntimeError) as caught:
                fn(*call.args)
            first_line = str(caught.value).splitlines()[0]
            assert re.search(rf"\b(?:{call.expected})\b", first_line), \
                f"{call.op} [{call.name}]: {first_line}"


@pytest.mark.parametrize("device", DEVICES)
def test_edge_calls_match_the_reference(device: str, fused: None) -> None:
    """Empty buckets, empty and inactive segments, sizes around the vector widths."""
    for name, (op, args) in _bad_op_args.good_calls(device):
        for a, b in zip(getattr(torch.ops.loft, op)(*args), getattr(reference, op)(*args)):
            torch.testing.assert_close(a, b, **F64, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_malformed_op_calls_under_address_sanitizer() -> None:
    """``asan_ops.py`` under AddressSanitizer: every check passes and ASan reports
    nothing; a deliberate overflow (``--canary``) is reported, so the sanitizer is live.
    Without an ASan runtime the same checks run unsanitised."""
    script = str(Path(asan_ops.__file__).resolve())
    tool = "asan" if asan_ops.asan_preload() else "none"
    cache = str(_ext._cache_root())  # the instrumented build has its own key there

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, "--tool", tool, "--cache", cache,
                               *extra], capture_output=True, text=True, timeout=900)

    out = run()
    report = out.stdout + out.stderr[-4000:]
    assert out.returncode == 0, report
    assert re.search(r"asan_ops: 1\d\d malformed calls, \d+ edge calls, 0 failures", out.stdout)
    assert "AddressSanitizer" not in out.stderr, report
    if tool == "asan":
        assert f"sanitizer live: {tool}" in out.stdout, report
        canary = run("--canary")
        assert canary.returncode == asan_ops.TOOL_ERROR_EXIT, canary.stdout + canary.stderr[-4000:]
        assert "AddressSanitizer: heap-buffer-overflow" in canary.stderr
