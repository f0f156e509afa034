"""The real meta-learning workloads: MAML sine regression, MAML Omniglot, Meta-SGD, and
the cost of entering an inner-loop context.

A :class:`MetaWorkload` is plain data (it crosses process boundaries as JSON): a name
from :data:`META_WORKLOADS`, an inner optimiser (``"sgd"``, ``"adam"``, or ``"none"``
for the floor), and optionally fewer tasks or inner steps than the published setting
(the tests use 2 tasks and 1 step). :func:`build_meta` makes it concrete: the seeded
model, the inner ``torch.optim`` optimiser, the meta optimiser (``Adam(lr=1e-3)``) and,
for Meta-SGD, the learned per-element learning rates; :func:`sample_tasks` draws the
tasks of one meta-iteration from a generator seeded by the iteration's index, so that
every implementation sees the same numbers. ``batched=True`` (``python -m loft.bench
--batched``) selects the setting of the batched comparison, where it differs from the
default (Omniglot: 16 tasks instead of 4); :func:`stack_tasks` stacks a meta-batch's
tasks along a leading task dimension for ``innerloop_ctx(..., tasks=N)``, and
:meth:`MetaWorkload.task_losses` is the workload's loss per task over such a batch.

The workloads (the settings of the MAML and Meta-SGD papers and of higher's examples):

- ``sinusoid``: MLP 1-40-40-1 with ReLU (1761 parameters); 25 tasks per
  meta-iteration, each ``y = A sin(x - phase)`` with ``A ~ U[0.1, 5]``,
  ``phase ~ U[0, pi]``, ``x ~ U[-5, 5]``; K = 10 support and 10 query points; 5 inner
  steps of SGD (lr 0.01) or Adam (lr 0.01); MSE loss.
- ``omniglot``: higher's MAML-Omniglot network, 3 x [Conv2d(., 64, 3), BatchNorm2d(64,
  momentum=1, affine=True), ReLU, MaxPool2d(2)], Flatten, Linear(64, 5) (in train mode:
  BatchNorm uses the batch's statistics), on synthetic 28 x 28 images; 5-way 5-shot
  (25 support images), 15 queries per class (75 query images); 4 tasks per
  meta-iteration (``--batched``: 16, the setting of the batched comparison); 5 inner SGD
  steps, lr 0.1; cross-entropy.
- ``meta-sgd``: the sine regression with a learned per-element learning rate: one
  parameter group per parameter and ``override={"lr": lrs}`` with ``lrs`` tensors shaped
  like the parameters, initialised to 0.01 and meta-learned with the weights.
- ``context``: entering and leaving ``innerloop_ctx(model, SGD(lr=0.1),
  copy_initial_weights=False)`` on the Omniglot network, no step (the floor: cloning
  the weights, ``[p.clone() for p in model.parameters()]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "MetaWorkload",
    "MetaSpec",
    "MetaBuilt",
    "Task",
    "META_WORKLOADS",
    "META_LR",
    "build_meta",
    "build_meta_model",
    "sample_tasks",
    "stack_tasks",
    "sine_mlp",
    "omniglot_net",
]

#: The meta optimiser's learning rate (``torch.optim.Adam``), every workload.
META_LR = 1e-3


def sine_mlp() -> nn.Module:
    """MLP 1-40-40-1 with ReLU: :math:`1 \\cdot 40 + 40 + 40 \\cdot 40 + 40 + 40 + 1 = 1761`
    parameters."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                         nn.Linear(40, 1))


def omniglot_net(ways: int = 5) -> nn.Module:
    """higher's MAML-Omniglot network: 28 -> 26 -> 13 -> 11 -> 5 -> 3 -> 1 pixels, 64
    channels, then ``Linear(64, ways)``."""
    layers: list[nn.Module] = []
    for channels_in in (1, 64, 64):
        layers += [nn.Conv2d(channels_in, 64, 3), nn.BatchNorm2d(64, momentum=1, affine=True),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, ways))


@dataclass(frozen=True)
class MetaSpec:
    """The published setting of one workload."""

    model: str  # "sine" or "omniglot"
    optimizers: tuple[str, ...]  # the inner optimisers it is measured with
    tasks: int  # tasks per meta-iteration
    steps: int  # inner steps per task
    inner_lr: dict[str, float]  # per inner optimiser
    kind: str  # "iteration" (a meta-iteration is timed) or "context" (entry and exit)
    template: str  # one line for the report; "{tasks}" is the tasks per meta-iteration
    batched_tasks: int | None = None  # tasks per meta-iteration with --batched, if others

    def describe(self, tasks: int | None = None) -> str:
        """The report's line for ``tasks`` tasks per meta-iteration (default: the spec's)."""
        return self.template.format(tasks=self.tasks if tasks is None else tasks)

    @property
    def description(self) -> str:
        """The report's line for the published setting."""
        return self.describe()


#: The workloads by name (``--workloads``), in report order.
META_WORKLOADS: dict[str, MetaSpec] = {
    "sinusoid": MetaSpec(
        "sine", ("sgd", "adam"), 25, 5, {"sgd": 0.01, "adam": 0.01}, "iteration",
        "MAML sine regression: MLP 1-40-40-1, {tasks} tasks x 5 inner steps (lr 0.01), "
        "10 support + 10 query points"),
    "omniglot": MetaSpec(
        "omniglot", ("sgd",), 4, 5, {"sgd": 0.1}, "iteration",
        "MAML Omniglot 5-way 5-shot: 4-layer conv net (64 channels, BatchNorm), {tasks} tasks "
        "x 5 SGD steps (lr 0.1), 75 queries", batched_tasks=16),
    "meta-sgd": MetaSpec(
        "sine", ("sgd",), 25, 5, {"sgd": 0.01}, "iteration",
        "Meta-SGD: the sine regression with a learned per-element inner lr "
        "(override={{'lr': lrs}})"),
    "context": MetaSpec(
        "omniglot", ("sgd",), 1, 0, {"sgd": 0.1}, "context",
        "entering + leaving innerloop_ctx on the Omniglot network, no step (floor: cloning "
        "its weights)"),
}

_MODELS: dict[str, Callable[[], nn.Module]] = {"sine": sine_mlp, "omniglot": omniglot_net}

#: Sine tasks: amplitude, phase and input ranges; points per support and query set.
SINE_AMPLITUDE = (0.1, 5.0)
SINE_PHASE = (0.0, math.pi)
SINE_X = (-5.0, 5.0)
SINE_K = 10
#: Omniglot tasks: classes, support images and query images per class, image side.
OMNIGLOT_WAYS = 5
OMNIGLOT_SHOTS = 5
OMNIGLOT_QUERIES = 15
OMNIGLOT_SIDE = 28


@dataclass(frozen=True)
class MetaWorkload:
    """One real workload with one inner optimiser (``"none"``: the floor, no update).

    ``tasks`` and ``steps`` default to the published setting (:data:`META_WORKLOADS`);
    ``batched``: the setting of the batched comparison (``--batched``: its
    ``batched_tasks``, where the spec has them), for every implementation alike.
    """

    name: str
    optimizer: str
    tasks: int | None = None
    steps: int | None = None
    seed: int = 0
    batched: bool = False

    def __post_init__(self) -> None:
        if self.name not in META_WORKLOADS:
            raise ValueError(f"MetaWorkload.name must be one of {list(META_WORKLOADS)}, got "
                             f"{self.name!r}")
        spec = META_WORKLOADS[self.name]
        if self.optimizer not in (*spec.optimizers, "none"):
            raise ValueError(f"MetaWorkload.optimizer of {self.name!r} must be one of "
                             f"{list(spec.optimizers)} or 'none', got {self.optimizer!r}")
        if self.tasks is not None and self.tasks < 1:
            raise ValueError(f"MetaWorkload.tasks must be >= 1, got {self.tasks}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"MetaWorkload.steps must be >= 1, got {self.steps}")

    @property
    def spec(self) -> MetaSpec:
        return META_WORKLOADS[self.name]

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def num_tasks(self) -> int:
        if self.tasks is not None:
            return self.tasks
        if self.batched and self.spec.batched_tasks is not None:
            return self.spec.batched_tasks
        return self.spec.tasks

    @property
    def num_steps(self) -> int:
        return self.steps if self.steps is not None else self.spec.steps

    @property
    def inner_lr(self) -> float:
        return self.spec.inner_lr.get(self.optimizer, self.spec.inner_lr["sgd"])

    @property
    def loss(self) -> Callable[[Tensor, Tensor], Tensor]:
        """MSE for the sine workloads, cross-entropy for Omniglot."""
        if self.model == "sine":
            return nn.functional.mse_loss
        return nn.functional.cross_entropy

    def task_losses(self, out: Tensor, target: Tensor) -> Tensor:
        """:attr:`loss` of each task of a task-batched output ``[N, K, ...]`` against its
        targets ``[N, K, ...]``: the ``[N]`` per-task means (each task's ``loss``).

        Each mean is a sum over the task's terms divided by their count: ``mean(1)``'s
        backward (or a reshape across the task dimension) would materialise the ``[N]``
        gradient per term and save it for the inner step's double backward, where one
        task's loss saves a scalar."""
        if self.model == "sine":
            terms = (out - target).flatten(1).pow(2)
        else:
            terms = nn.functional.cross_entropy(out.flatten(0, 1), target.flatten(0, 1),
                                                reduction="none").view(out.shape[0], -1)
        return terms.sum(1) / terms.shape[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaWorkload:
        return cls(**data)


@dataclass
class Task:
    """One task: a support set (the inner steps' loss) and a query set (the meta-loss)."""

    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]


@dataclass
class MetaBuilt:
    """A workload made concrete: the seeded model and its optimisers.

    ``lrs`` (Meta-SGD only): the learned per-element inner learning rates, one tensor
    per parameter, in the meta optimiser with the weights.
    """

    workload: MetaWorkload
    model: nn.Module
    inner_optimizer: torch.optim.Optimizer | None
    meta_optimizer: torch.optim.Optimizer
    lrs: list[Tensor] | None


def build_meta_model(model: str, seed: int = 0) -> nn.Module:
    """The seeded model ``"sine"`` or ``"omniglot"``, in train mode."""
    if model not in _MODELS:
        raise ValueError(f"model must be one of {list(_MODELS)}, got {model!r}")
    torch.manual_seed(seed)
    return _MODELS[model]().train()


def build_meta(workload: MetaWorkload) -> MetaBuilt:
    """Model, inner optimiser, meta optimiser (and Meta-SGD's lrs) of ``workload``."""
    model = build_meta_model(workload.model, workload.seed)
    params = list(model.parameters())
    lr = workload.inner_lr
    lrs = None
    inner: torch.optim.Optimizer | None
    if workload.optimizer == "none":
        inner = None
    elif workload.name == "meta-sgd":
        inner = torch.optim.SGD([{"params": [p]} for p in params], lr=lr)
        lrs = [torch.full_like(p, lr, requires_grad=True) for p in params]
    elif workload.optimizer == "sgd":
        inner = torch.optim.SGD(params, lr=lr)
    else:
        inner = torch.optim.Adam(params, lr=lr)
    meta = torch.optim.Adam(params + (lrs or []), lr=META_LR)
    return MetaBuilt(workload, model, inner, meta, lrs)


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def _sine_task(gen: torch.Generator) -> Task:
    amplitude = _uniform(gen, (1,), *SINE_AMPLITUDE)
    phase = _uniform(gen, (1,), *SINE_PHASE)

    def points() -> tuple[Tensor, Tensor]:
        x = _uniform(gen, (SINE_K, 1), *SINE_X)
        return x, amplitude * torch.sin(x - phase)

    return Task(points(), points())


def _omniglot_task(gen: torch.Generator) -> Task:
    def images(per_class: int) -> tuple[Tensor, Tensor]:
        x = torch.rand((OMNIGLOT_WAYS * per_class, 1, OMNIGLOT_SIDE, OMNIGLOT_SIDE),
                       generator=gen)
        y = torch.arange(OMNIGLOT_WAYS).repeat_interleave(per_class)
        return x, y

    return Task(images(OMNIGLOT_SHOTS), images(OMNIGLOT_QUERIES))


def sample_tasks(workload: MetaWorkload, iteration: int) -> list[Task]:
    """The tasks of meta-iteration ``iteration`` (the same for every implementation)."""
    gen = torch.Generator().manual_seed(1_000_003 * (workload.seed + 1) + iteration)
    make = _sine_task if workload.model == "sine" else _omniglot_task
    return [make(gen) for _ in range(workload.num_tasks)]


def stack_tasks(tasks: Sequence[Task]) -> Task:
    """``tasks`` as one task-batched :class:`Task`: every tensor stacked along a new leading
    task dimension (``[N, K, ...]``), as ``innerloop_ctx(..., tasks=N)`` takes them."""
    def stack(tensors: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(tensors))

    return Task((stack([t.support[0] for t in tasks]), stack([t.support[1] for t in tasks])),
                (stack([t.query[0] for t in tasks]), stack([t.query[1] for t in tasks])))
