"""The benchmark workloads: a model, its data, and the inner optimiser to unroll.

A :class:`Workload` is plain data (it crosses process boundaries as JSON): a model
name from :data:`MODELS`, an optimiser name from :data:`OPTIMIZERS`, the number of
inner steps ``T`` and the batch size. :func:`build` turns it into a seeded model,
a ``torch.optim`` optimiser over the model's parameters, one support batch (used by
every inner step) and one query batch (used by the meta-loss), so that every
implementation of a measurement sees exactly the same numbers.

Default models (issue 5):

- ``A``: 16 x ``Linear(64, 64)`` with ReLU between them (32 parameter tensors),
  batch 8, 64-class cross-entropy: many small tensors, where per-tensor Python and
  autograd overhead dominates.
- ``B``: MLP 64 -> 1024 -> 1024 -> 10, batch 8: few large tensors, memory-bound.
- ``C``: 4 x ``Conv2d(., 32, 3, stride=2, padding=1)`` with ReLU on 1 x 28 x 28, then
  ``Linear(32 * 2 * 2, 10)``, batch 16: compute in the convolutions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Workload",
    "Built",
    "MODELS",
    "OPTIMIZERS",
    "build",
    "build_model",
    "make_optimizer",
    "loss_fn",
]


def _model_a() -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(16):
        layers.append(nn.Linear(64, 64))
        if i < 15:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _model_b() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def _model_c() -> nn.Module:
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, 32, kernel_size=3, stride=2, padding=1), nn.ReLU()]
        channels = 32
    # 28 -> 14 -> 7 -> 4 -> 2
    layers += [nn.Flatten(), nn.Linear(32 * 2 * 2, 10)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model and its inputs."""

    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example, without the batch dimension
    num_classes: int
    batch: int
    description: str


#: The models by name (``--models``).
MODELS: dict[str, ModelSpec] = {
    "A": ModelSpec(_model_a, (64,), 64, 8, "16 x Linear(64,64)+ReLU, batch 8"),
    "B": ModelSpec(_model_b, (64,), 10, 8, "MLP 64-1024-1024-10, batch 8"),
    "C": ModelSpec(_model_c, (1, 28, 28), 10, 16, "4 x Conv(32, s2) on 28x28 + Linear, batch 16"),
}

#: The inner optimisers by name (``--optimizers``): ``torch.optim`` type and kwargs.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
}


@dataclass(frozen=True)
class Workload:
    """One benchmark setting: model, inner optimiser, inner steps ``T``.

    ``optimizer`` may be ``"none"`` for the bare floor (no update at all).
    """

    model: str
    optimizer: str
    steps: int
    batch: int | None = None  # None: the model's default batch size
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"Workload.model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.optimizer not in (*OPTIMIZERS, "none"):
            raise ValueError(f"Workload.optimizer must be one of {sorted(OPTIMIZERS)} or 'none', "
                             f"got {self.optimizer!r}")
        if self.steps < 1:
            raise ValueError(f"Workload.steps must be >= 1, got {self.steps}")

    @property
    def batch_size(self) -> int:
        return self.batch if self.batch is not None else MODELS[self.model].batch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        return cls(**data)


@dataclass
class Built:
    """A workload made concrete: seeded model, optimiser and data."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    param_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())


def build_model(name: str, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The seeded model ``name`` on ``device``."""
    torch.manual_seed(seed)
    return MODELS[name].factory().to(device=device, dtype=dtype)


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    """``torch.optim`` optimiser ``name`` (see :data:`OPTIMIZERS`) over ``params``."""
    opt_type, kwargs = OPTIMIZERS[name]
    return opt_type(params, **kwargs)


def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
    """The inner and query loss of every workload: mean cross-entropy."""
    return nn.functional.cross_entropy(logits, target)


def build(workload: Workload, device: torch.device | str = "cpu") -> Built:
    """Model, optimiser, support and query batches of ``workload`` (deterministic)."""
    dtype = getattr(torch, workload.dtype)
    spec = MODELS[workload.model]
    model = build_model(workload.model, device, dtype, workload.seed)
    gen = torch.Generator().manual_seed(workload.seed + 1)

    def batch() -> tuple[Tensor, Tensor]:
        x = torch.randn((workload.batch_size, *spec.input_shape), generator=gen, dtype=dtype)
        y = torch.randint(0, spec.num_classes, (workload.batch_size,), generator=gen)
        return x.to(device), y.to(device)

    support, query = batch(), batch()
    opt = None if workload.optimizer == "none" else make_optimizer(workload.optimizer,
                                                                  model.parameters())
    return Built(model, opt, support, query)
