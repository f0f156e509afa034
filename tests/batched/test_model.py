"""The batched patched model: shapes, the forward over the task dimension (native layers
and vmap) against each task's own module, BatchNorm statistics per task, Dropout masks
per task, ``write_back_buffers(task=...)`` and the errors of misuse."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import loft

from ._common import (
    MODELS,
    TASKS,
    Wrapped,
    close,
    convnet,
    input_shape,
    mlp,
    task_batches,
    task_losses,
)


def _x(model: str, tasks: int = TASKS, batch: int = 4, seed: int = 3) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tasks, batch, *input_shape(model), generator=gen, dtype=torch.float64)


def _vmap_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of torch.func.vmap from now on (one list entry per call)."""
    calls: list[int] = []
    original = torch.func.vmap

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.func, "vmap", counted)
    return calls


# ---- shapes and the forward ----------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
def test_shapes(model: str) -> None:
    """Fast weights, history and buffers are [N, *shape]; fmodel maps [N, B, ...] to [N, B, 2]."""
    net = MODELS[model]()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    batches = task_batches(model, steps=2)
    with loft.innerloop_ctx(net, opt, tasks=TASKS) as (fmodel, diffopt):
        assert fmodel.tasks == TASKS
        for x, y in batches[:-1]:
            diffopt.step(task_losses(fmodel(x), y))
        assert fmodel(batches[-1][0]).shape == (TASKS, 4, 2)
        for t in range(3):
            shapes = [p.shape for p in fmodel.parameters(time=t)]
            assert shapes == [(TASKS, *p.shape) for p in net.parameters()]
        buffers = dict(fmodel.patched_buffers())
        assert {n: b.shape for n, b in buffers.items()} == {
            n: (TASKS, *b.shape) for n, b in net.named_buffers()}
    assert loft.monkeypatch(net).tasks is None


@pytest.mark.parametrize("model", list(MODELS))
def test_every_task_starts_from_the_model(model: str) -> None:
    """Before any step, task k's output (train mode: BatchNorm's batch statistics) and
    its running statistics are those of the model run on task k's input alone."""
    net = MODELS[model]()
    x = _x(model)
    fmodel = loft.monkeypatch(net, tasks=TASKS)
    out = fmodel(x)
    buffers = dict(fmodel.patched_buffers())
    for k in range(TASKS):
        alone = copy.deepcopy(net)
        close(out[k], alone(x[k]), f"task {k}'s output")
        for name, b in alone.named_buffers():
            close(buffers[name][k].double(), b.double(), f"task {k}'s {name}")
    for p, q in zip(net.parameters(), fmodel.parameters()):
        assert torch.equal(q, p.detach().expand_as(q))


def test_native_and_vmap_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Sequential of known layers runs without vmap; a custom module through vmap;
    both give the same outputs and buffers."""
    calls = _vmap_calls(monkeypatch)
    x = _x("conv")
    native = loft.monkeypatch(convnet(), tasks=TASKS)
    out_native = native(x)
    assert calls == []
    wrapped = loft.monkeypatch(Wrapped(convnet()), tasks=TASKS)
    out_vmap = wrapped(x)
    assert len(calls) == 1
    close(out_native, out_vmap, "outputs")
    for (_, a), (_, b) in zip(native.patched_buffers(), wrapped.patched_buffers()):
        close(a.double(), b.double(), "buffers")


_BATCHNORMS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "1d": (lambda: nn.BatchNorm1d(3), (3,)),
    "1d-seq": (lambda: nn.BatchNorm1d(3, momentum=0.5), (3, 5)),
    "2d-cumulative": (lambda: nn.BatchNorm2d(3, momentum=None), (3, 4, 4)),
    "2d-no-affine": (lambda: nn.BatchNorm2d(3, affine=False), (3, 4, 4)),
    "2d-untracked": (lambda: nn.BatchNorm2d(3, track_running_stats=False), (3, 4, 4)),
    "3d": (lambda: nn.BatchNorm3d(3, momentum=0.3), (3, 2, 2, 2)),
}


@pytest.mark.parametrize("path, kind", [("native", kind) for kind in _BATCHNORMS] + [
    ("vmap", kind) for kind in _BATCHNORMS if kind != "2d-cumulative"])
def test_batchnorm_statistics_per_task(path: str, kind: str) -> None:
    """Three train-mode forwards then one in eval mode: each task's outputs and running
    statistics are those of its own copy of the layer (natively: cumulative averages
    included; under vmap see the next test)."""
    layer, sample = _BATCHNORMS[kind]
    _check_batchnorm(layer().double(), sample, path)


def test_cumulative_batchnorm_inside_a_custom_module_is_refused_by_name() -> None:
    """BatchNorm(momentum=None) under a custom module (vmap path) raises an error naming
    it: torch's BatchNorm forward computes 1 / float(num_batches_tracked), a .item() that
    vmap refuses (the native path, a Sequential, runs it: tested above)."""
    fmodel = loft.monkeypatch(Wrapped(nn.BatchNorm1d(3, momentum=None).double()), tasks=TASKS)
    with pytest.raises(RuntimeError, match=r"fmodel\.\w+ \(BatchNorm1d\) cannot be batched"):
        fmodel(torch.randn(TASKS, 6, 3, dtype=torch.float64))


def _check_batchnorm(bn: nn.Module, sample: tuple[int, ...], path: str) -> None:
    torch.manual_seed(0)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    net = nn.Sequential(bn) if path == "native" else Wrapped(bn)
    fmodel = loft.monkeypatch(net, tasks=TASKS)
    copies = [copy.deepcopy(net) for _ in range(TASKS)]
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        if step == 3:
            fmodel.eval()
            for c in copies:
                c.eval()
        x = torch.randn(TASKS, 6, *sample, generator=gen, dtype=torch.float64) * (1 + step)
        out = fmodel(x)
        for k, c in enumerate(copies):
            close(out[k], c(x[k]), f"step {step}, task {k}'s output")
    buffers = dict(fmodel.patched_buffers())
    assert buffers.keys() == dict(net.named_buffers()).keys()
    for k, c in enumerate(copies):
        for name, b in c.named_buffers():
            close(buffers[name][k].double(), b.double(), f"task {k}'s {name}")
    if bn.track_running_stats:
        assert not torch.allclose(buffers[f"{'0' if path == 'native' else 'net'}.running_mean"][0],
                                  buffers[f"{'0' if path == 'native' else 'net'}.running_mean"][1])


def test_fast_weights_are_views_of_one_buffer() -> None:
    """After a step every fast weight [N, *shape] is a view of one flat buffer."""
    net = convnet()
    with loft.innerloop_ctx(net, torch.optim.Adam(net.parameters()), tasks=TASKS) as (fmodel,
                                                                                     diffopt):
        x, y = task_batches("conv", steps=1)[0]
        diffopt.step(task_losses(fmodel(x), y))
        storages = {p.untyped_storage().data_ptr() for p in fmodel.parameters()}
        assert len(storages) == 1
        assert [p.shape[0] for p in fmodel.parameters()] == [TASKS] * len(list(net.parameters()))


def test_direct_submodule_call_batches() -> None:
    """fmodel.net(x), a direct call of a patched submodule, runs over the tasks too."""
    fmodel = loft.monkeypatch(Wrapped(mlp()), tasks=TASKS)
    x = _x("mlp")
    close(fmodel.net(x), fmodel(x), "fmodel.net(x)")
    with pytest.raises(ValueError, match=r"fmodel\.net.*argument 0"):
        fmodel.net(x[:2])


# ---- Dropout ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "conv", "mlp-vmap", "conv-vmap"])
def test_dropout_masks_differ_between_tasks(model: str) -> None:
    """Train mode: the same input for every task gives different outputs (independent
    masks per task); eval mode: the same output for every task."""
    make = mlp if model.startswith("mlp") else convnet
    net = make(dropout=0.5)
    if model.endswith("vmap"):
        net = Wrapped(net)
    alone = copy.deepcopy(net)  # runs the same train-mode forward (BatchNorm statistics)
    fmodel = loft.monkeypatch(net, tasks=4)
    one = _x(model, tasks=1, batch=8)
    x = one.expand(4, *one.shape[1:])
    torch.manual_seed(0)
    out = fmodel(x)
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(out[i], out[j]), f"tasks {i} and {j} share a mask"
    alone(one[0])
    fmodel.eval()
    alone.eval()
    out = fmodel(x)
    for k in range(4):
        close(out[k], alone(one[0]), f"task {k}'s eval output")


# ---- write_back_buffers -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["conv", "conv-vmap"])
def test_write_back_buffers_per_task(model: str) -> None:
    """write_back_buffers(task=i) copies task i's statistics into the model; without
    task (or with one out of range) it is a ValueError naming task."""
    net = MODELS[model]()
    fmodel = loft.monkeypatch(net, tasks=TASKS)
    fmodel(_x(model))
    buffers = {n: b.clone() for n, b in fmodel.patched_buffers()}
    for bad in (None, TASKS, -1, True, 1.0):
        with pytest.raises(ValueError, match="task"):
            fmodel.write_back_buffers(task=bad)
    for k in (2, 1):
        fmodel.write_back_buffers(task=k)
        for name, b in net.named_buffers():
            assert torch.equal(b, buffers[name][k]), name


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [0, -1, 2.0, True, "2"])
def test_tasks_must_be_an_int_of_at_least_one(tasks: Any) -> None:
    """tasks=0, negative, a float, a bool or a string: ValueError naming tasks."""
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="tasks"):
        with loft.innerloop_ctx(net, opt, tasks=tasks):
            pass
    with pytest.raises(ValueError, match="tasks"):
        loft.monkeypatch(net, tasks=tasks)


class _Scaled(nn.Module):
    """A custom module with a keyword tensor argument (vmap path)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        out = self.lin(x)
        return out if scale is None else out * scale


@pytest.mark.parametrize("model", ["mlp", "conv", "mlp-vmap"])
def test_input_without_the_task_dimension(model: str) -> None:
    """An input whose leading dimension is not N: ValueError naming the argument."""
    fmodel = loft.monkeypatch(MODELS[model](), tasks=TASKS)
    x = _x(model)
    for bad in (x[:2], x[0], torch.cat([x, x])):
        with pytest.raises(ValueError, match=re.escape(f"argument 0 has shape {list(bad.shape)}")):
            fmodel(bad)


def test_keyword_argument_without_the_task_dimension() -> None:
    """A keyword tensor without the task dimension: ValueError naming it; with it, each
    task gets its own slice."""
    fmodel = loft.monkeypatch(_Scaled().double(), tasks=TASKS)
    x = _x("mlp")
    with pytest.raises(ValueError, match="argument 'scale' has shape"):
        fmodel(x, scale=torch.ones(4, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="argument 'scale' has shape"):
        fmodel(x, scale=torch.tensor(2.0, dtype=torch.float64))
    scale = torch.arange(1.0, TASKS + 1, dtype=torch.float64).view(TASKS, 1, 1)
    close(fmodel(x, scale=scale), fmodel(x) * scale, "scaled outputs")


def test_native_layer_with_a_sample_missing() -> None:
    """A conv net given [N, C, H, W] (no batch per task): ValueError naming Conv2d."""
    fmodel = loft.monkeypatch(convnet(), tasks=TASKS)
    with pytest.raises(ValueError, match="Conv2d.*4 dimensions"):
        fmodel(torch.randn(TASKS, 1, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(TASKS + 1,), (TASKS, 1), (1, TASKS), (2 * TASKS,)])
def test_loss_of_the_wrong_shape(shape: tuple[int, ...]) -> None:
    """step() with a loss neither [N] nor one element: ValueError naming the shape."""
    net = mlp()
    with loft.innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=0.1),
                            tasks=TASKS) as (fmodel, diffopt):
        x, y = task_batches("mlp", steps=1)[0]
        losses = task_losses(fmodel(x), y)
        bad = losses.sum() * torch.ones(shape, dtype=torch.float64)
        expected = rf"tasks={TASKS}.*got shape {re.escape(str(list(shape)))}"
        with pytest.raises(ValueError, match=expected):
            diffopt.step(bad)
        diffopt.step(losses.view(TASKS))  # the right shape still works afterwards


class _ItemBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) * float(x.abs().max().item())


class _BranchBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.lin(x)
        return x


class _Net(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Linear(3, 3)
        self.block = block
        self.out = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.block(self.pre(x)))


@pytest.mark.parametrize("block, name", [(_ItemBlock, "_ItemBlock"),
                                         (_BranchBlock, "_BranchBlock")])
def test_forward_that_vmap_cannot_batch(block: type[nn.Module], name: str) -> None:
    """.item() or data-dependent control flow in a custom module: RuntimeError naming
    that module (fmodel.block (its class)); the same model runs unbatched."""
    net = _Net(block()).double()
    fmodel = loft.monkeypatch(net, tasks=TASKS)
    with pytest.raises(RuntimeError, match=rf"fmodel\.block \({name}\).*cannot be batched"):
        fmodel(_x("mlp"))
    loft.monkeypatch(net)(_x("mlp")[0])


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.count = self.count + 1  # replaces the buffer instead of updating it
        return self.lin(x)


def test_buffer_replaced_in_the_forward() -> None:
    """A forward that replaces a buffer (not in place) cannot be batched: RuntimeError
    naming the buffer and the model."""
    fmodel = loft.monkeypatch(_Counter().double(), tasks=TASKS)
    with pytest.raises(RuntimeError, match=r"_Counter.*'count' was replaced"):
        fmodel(_x("mlp"))
