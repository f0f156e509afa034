"""Helpers of higher's ``higher.utils`` that user code reaches for."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["get_func_params"]


def get_func_params(module: torch.nn.Module, device: torch.device | str | None = None,
                    safe_copy: bool = True) -> list[Tensor]:
    """Detached copies of ``module``'s parameters that keep their ``requires_grad``."""
    out = []
    for p in module.parameters():
        q = p.detach().clone() if safe_copy else p.detach()
        q = q.requires_grad_(p.requires_grad)
        out.append(q if device is None else q.to(device))
    return out
