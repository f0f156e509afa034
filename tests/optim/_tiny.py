"""A tiny float64 model and its inputs, shared by the tests of higher-style optimiser use."""

from __future__ import annotations

import torch
from torch import nn


def tiny_mlp(seed: int = 0) -> nn.Module:
    """Linear(3, 4), Tanh, Linear(4, 2) in float64, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def tiny_batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    """``n`` float64 batches of 5 inputs for :func:`tiny_mlp`."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(n)]
