"""The fused optimisers: SGD, Adam and AdamW as hyperparameter and flag mappings onto the fused ops.

Each class says which op it runs (:mod:`loft._contract`), how a torch param group's
settings map to the op's hyperparameters and flag bits, and how a tensor's state reads
and exports; :class:`loft.optim.engine.FlatOptimizer` does the rest.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from loft import reference
from loft._contract import ADAM, ELEMENTWISE_HYPER, SGD, AdamFlag, SGDFlag
from loft.optim.engine import FlatOptimizer
from loft.optim.hyper import nonzero

__all__ = ["DifferentiableSGD", "DifferentiableAdam", "DifferentiableAdamW"]


class FusedOptimizer(FlatOptimizer):
    """A flat optimiser whose step is a fused op (``_op``)."""

    def _reference_step(self, params: Tensor, grads: Tensor, state: dict[str, Tensor],
                        segments: Tensor, hyper: dict[str, Tensor], flags: Tensor,
                        elementwise: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The op's reference math as differentiable PyTorch: where a hyperparameter the
        kernels read per group is given per element, and on higher's per-tensor path."""
        op = self._op
        assert op is not None
        per_element: dict[str, Any] = {}
        if elementwise:
            per_element = {"lr_elementwise": elementwise.get("lr"),
                           "weight_decay_elementwise": elementwise.get("weight_decay"),
                           "elementwise": {n: t for n, t in elementwise.items()
                                           if n not in ELEMENTWISE_HYPER} or None}
        outs = getattr(reference, op.name)(
            params, grads, *[state[n] for n in op.state], segments,
            *[hyper[n] for n in op.hyper], flags, check=False, **per_element)
        return outs[0], dict(zip(op.state, outs[1:]))

    def _needs_optional(self, flags: list[int]) -> bool:
        op = self._op
        assert op is not None
        return any(f & op.optional_flag for f in flags)


class DifferentiableSGD(FusedOptimizer):
    r"""Differentiable ``torch.optim.SGD`` (higher's ``DifferentiableSGD``).

    Per parameter: :math:`g_2 = \pm g + \lambda p`; with momentum
    :math:`b' = g_2` on the first step, else :math:`\mu b + (1 - \tau) g_2`;
    :math:`p' = p - \eta d` with :math:`d = g_2 + \mu b'` (nesterov), :math:`b'`
    (momentum) or :math:`g_2`. One fused node per bucket and step (``torch.ops.loft.sgd_step``).
    """

    _op = SGD
    _state_names = SGD.state
    _step_key = None  # torch.optim.SGD and higher keep no step count
    _hyper_names = SGD.hyper
    _optional_state = SGD.optional_state
    _first_step_only = True

    def _read_entry(self, entry: dict[str, Any]) -> tuple[int, bool, torch.dtype | None,
                                                          dict[str, Any]]:
        # A momentum buffer means "not the first step" (as in torch.optim and higher).
        buffer = entry.get("momentum_buffer") if entry else None
        if buffer is None:
            return 0, False, None, {}
        return 1, True, None, {"momentum_buffer": buffer}

    def _exported_entry(self, i: int, unused: set[str]) -> dict[str, Any]:
        # No momentum buffer before a tensor's first momentum step.
        flat = self.flat_state
        return super()._exported_entry(i, unused) if flat and flat.steps[i] > 0 else {}

    def _export_state(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        exported = super()._export_state(entry)
        if exported is None or "momentum_buffer" not in exported:
            return None
        return {"momentum_buffer": exported["momentum_buffer"]}

    def _group_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "lr": group["lr"],
            "momentum": group.get("momentum", 0.0),
            "dampening": group.get("dampening", 0.0),
            "weight_decay": group.get("weight_decay", 0.0),
        }

    def _group_flags(self, group: dict[str, Any]) -> int:
        flags = 0
        if group.get("maximize", False):
            flags |= SGDFlag.MAXIMIZE
        if group.get("nesterov", False):
            flags |= SGDFlag.NESTEROV
        if nonzero(group.get("momentum", 0.0)):
            flags |= SGDFlag.MOMENTUM
        return int(flags)


class DifferentiableAdam(FusedOptimizer):
    r"""Differentiable ``torch.optim.Adam`` (higher's ``DifferentiableAdam``, HEAD numbers).

    .. math::
        m' = \beta_1 m + (1-\beta_1) g_2,\quad v' = \beta_2 v + (1-\beta_2) g_2^2,\quad
        p' = p_0 - \frac{\eta}{1-\beta_1^t}\frac{m'}{\sqrt{u}/\sqrt{1-\beta_2^t}+\epsilon}

    with per-tensor step counts :math:`t`, :math:`u = \max(v_{max}, v')` under amsgrad,
    :math:`g_2 = \pm g + \lambda p`, :math:`p_0 = p`. One fused node per bucket and step
    (``torch.ops.loft.adam_step``).
    """

    _op = ADAM
    _state_names = ADAM.state
    _hyper_names = ADAM.hyper
    _hyper_keys = {"beta1": "betas[0]", "beta2": "betas[1]"}
    _optional_state = ADAM.optional_state
    _decoupled = False

    def _group_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        betas = group["betas"]
        return {
            "lr": group["lr"],
            "beta1": betas[0],
            "beta2": betas[1],
            "eps": group["eps"],
            "weight_decay": group.get("weight_decay", 0.0),
        }

    def _group_flags(self, group: dict[str, Any]) -> int:
        flags = AdamFlag.DECOUPLED if (self._decoupled or group.get(
            "decoupled_weight_decay", False)) else 0
        if group.get("maximize", False):
            flags |= AdamFlag.MAXIMIZE
        if group.get("amsgrad", False):
            flags |= AdamFlag.AMSGRAD
        return int(flags)


class DifferentiableAdamW(DifferentiableAdam):
    r"""Differentiable ``torch.optim.AdamW``: Adam with decoupled weight decay,
    :math:`g_2 = \pm g`, :math:`p_0 = (1 - \eta\lambda) p`."""

    _decoupled = True

