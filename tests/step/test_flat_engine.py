"""Valid but unusual models run on the flat step engine (issue #7): several dtypes and
devices (several buckets), zero-size and non-contiguous parameters must give the
reference backend's numbers; the buckets' views and segment tables, and the weights'
gradient pass-through."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import loft

from .._small_mlp import backend as _backend
from .._small_mlp import data as _data
from .._small_mlp import mlp as _mlp
from .._small_mlp import mse as _mse

F64 = dict(rtol=1e-12, atol=1e-12)
#: Models mixing float32 into float64: both backends compute each bucket in its own
#: dtype, and float32 rounding (epsilon 1.2e-7) reaches every later quantity, amplified
#: by a few steps and a backward; the bound is a few hundred float32 epsilons.
MIXED = dict(rtol=5e-5, atol=5e-6)


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
            assert torch.equal(table, bucket.table(steps, active)), (step, active)
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
    from loft import step as _step

    opt_type, kwargs = opt_item
    original = _step._params_pass_through
    used: list[bool] = []

    def run(allow: bool, native: bool = False) -> list[torch.Tensor]:
        def check(spec: Any, hyper: Any) -> bool:
            used.append(original(spec, hyper))
            return used[-1] and allow

        # The Python twin of the step node, where the choice can be watched; the C++ node
        # makes the same choice and must give the same bits.
        monkeypatch.setattr(_step, "NATIVE_NODE", native)
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
    native = run(True, native=True)
    assert len(with_pass) == len(with_kernel) == len(native)
    for i, (a, b, c) in enumerate(zip(with_pass, with_kernel, native)):
        assert torch.equal(a, b), f"gradient {i} differs"
        assert torch.equal(c, b), f"gradient {i} of the C++ node differs"


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
