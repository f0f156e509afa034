"""An independent per-tensor differentiable optimiser, written the way higher HEAD does it.

One Python loop over the parameter tensors, a dozen autograd nodes per tensor per step.
It is the oracle for loft's meta-gradients (it shares no code with loft).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _sqrt_zero_safe(v: Tensor) -> Tensor:
    """sqrt whose derivative is 0 where v == 0 (higher's rule), via a gradient hook."""
    s = v.sqrt()
    if s.requires_grad:
        mask = v == 0
        s.register_hook(lambda g: g.masked_fill(mask, 0.0))
    return s


class PerTensorOptimizer:
    """SGD / Adam / AdamW over a list of tensors; hyperparameters may be tensors."""

    def __init__(self, kind: str, **hp: Any) -> None:
        self.kind = kind
        self.hp = hp
        self.state: dict[int, dict[str, Any]] = {}

    def step(self, params: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                out.append(p)
                continue
            st = self.state.setdefault(i, {"step": 0})
            out.append(getattr(self, "_" + self.kind)(p, g, st))
        return out

    def _sgd(self, p: Tensor, g: Tensor, st: dict[str, Any]) -> Tensor:
        hp = self.hp
        lr, mom = hp["lr"], hp.get("momentum", 0.0)
        damp, wd = hp.get("dampening", 0.0), hp.get("weight_decay", 0.0)
        if hp.get("maximize", False):
            g = -g
        g = g + wd * p
        if float(mom.detach() if isinstance(mom, Tensor) else mom) != 0:
            if st["step"] == 0:
                buf = g
            else:
                buf = mom * st["buf"] + (1 - damp) * g
            st["buf"] = buf
            g = g + mom * buf if hp.get("nesterov", False) else buf
        st["step"] += 1
        return p - lr * g

    def _adam(self, p: Tensor, g: Tensor, st: dict[str, Any], decoupled: bool = False) -> Tensor:
        hp = self.hp
        lr, (b1, b2), eps = hp["lr"], hp["betas"], hp["eps"]
        wd = hp.get("weight_decay", 0.0)
        if hp.get("maximize", False):
            g = -g
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        if st["step"] == 0:
            st["m"] = torch.zeros_like(p)
            st["v"] = torch.zeros_like(p)
            st["vmax"] = torch.zeros_like(p)
        st["step"] += 1
        t = st["step"]
        m = b1 * st["m"] + (1 - b1) * g
        v = b2 * st["v"] + (1 - b2) * g * g
        st["m"], st["v"] = m, v
        if hp.get("amsgrad", False):
            u = torch.maximum(st["vmax"], v)
            st["vmax"] = u
        else:
            u = v
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        denom = _sqrt_zero_safe(u) / bc2**0.5 + eps
        return p - (lr / bc1) * m / denom

    def _adamw(self, p: Tensor, g: Tensor, st: dict[str, Any]) -> Tensor:
        return self._adam(p, g, st, decoupled=True)
