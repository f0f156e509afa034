"""A small float64 MLP, its data and loss, and a switch between the fused kernels and the
reference path: shared by the misuse, unusual-input and non-finite tests (issue #7)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from loft import _ext, reference
from loft._contract import OPS


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data(seed: int = 0, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randn(n, 3, generator=gen, dtype=torch.float64))


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


@contextmanager
def backend(name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Run the optimisers on ``"fused"`` kernels or the ``"reference"`` PyTorch path.

    Yields a counter of the reference op calls, so a test can show which path ran.
    """
    calls = {"reference": 0}
    with monkeypatch.context() as patch:
        for op in (contract.name for contract in OPS):
            original = getattr(reference, op)

            def counted(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
                calls["reference"] += 1
                return _original(*args, **kwargs)

            patch.setattr(reference, op, counted)
        if name == "reference":
            patch.setattr(_ext, "has_device_kernels", lambda device: False)
        yield calls
