"""Per-tensor pure-PyTorch differentiable inner loops: the way ``higher`` computes them.

This is the benchmark's third implementation, "per-tensor": one Python loop over the
parameter tensors per step, each update built from ordinary differentiable PyTorch
ops (a dozen or so autograd nodes per tensor per Adam step), the model run with
:func:`torch.func.functional_call`. It has the numbers of ``torch.optim`` (Adam's
bias correction applied as torch.optim does, per tensor), and, like higher HEAD, takes
d sqrt(v)/dv as 0 where v == 0 so that an all-zero second moment yields no NaN.

It shares no code with loft (nor with higher): it is a baseline for speed and memory,
written independently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PerTensorSGD", "PerTensorAdam", "PerTensorInnerLoop", "make_per_tensor"]


def _sqrt_with_zero_rule(v: Tensor) -> Tensor:
    """``v.sqrt()`` whose derivative is taken as 0 (not inf) where ``v == 0``.

    A hook on the ``SqrtBackward`` node replaces the gradient it sends to ``v`` (which
    is ``upstream * inf`` or NaN there) with 0 at those elements; other paths into
    ``v`` are untouched. Registered every step, as higher masks every step (no
    data-dependent branch, no device sync).
    """
    root = torch.sqrt(v)
    if root.grad_fn is not None:
        zero = v == 0

        def mask(grad_inputs: tuple[Tensor | None, ...],
                 grad_outputs: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
            (grad,) = grad_inputs
            return (None if grad is None else grad.masked_fill(zero, 0.0),)

        root.grad_fn.register_hook(mask)
    return root


class PerTensorSGD:
    r"""Differentiable SGD with momentum, one tensor at a time.

    :math:`b_t = \mu b_{t-1} + (1 - \tau) g` (:math:`b_1 = g`),
    :math:`p_t = p_{t-1} - \eta b_t`; plain SGD when :math:`\mu = 0`.
    """

    def __init__(self, lr: float | Tensor, momentum: float | Tensor = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0) -> None:
        self.lr = lr
        self.momentum = momentum
        self.dampening = dampening
        self.weight_decay = weight_decay
        self.buffers: dict[int, Tensor] = {}

    def update(self, index: int, param: Tensor, grad: Tensor) -> Tensor:
        """The new value of parameter ``index`` (differentiable in everything)."""
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        if isinstance(self.momentum, Tensor) or self.momentum != 0:
            previous = self.buffers.get(index)
            if previous is None:
                direction = grad
            else:
                direction = self.momentum * previous + (1.0 - self.dampening) * grad
            self.buffers[index] = direction
        else:
            direction = grad
        return param - self.lr * direction


class PerTensorAdam:
    r"""Differentiable Adam (torch.optim's formula), one tensor at a time.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2,\quad
        p_t = p_{t-1} - \frac{\eta}{1-\beta_1^t}\,
              \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}
    """

    def __init__(self, lr: float | Tensor, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.moments: dict[int, tuple[Tensor, Tensor, int]] = {}

    def update(self, index: int, param: Tensor, grad: Tensor) -> Tensor:
        """The new value of parameter ``index`` (differentiable in everything)."""
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        if index not in self.moments:  # zero-initialised, as torch.optim
            self.moments[index] = (torch.zeros_like(param), torch.zeros_like(param), 0)
        first, second, count = self.moments[index]
        first = self.beta1 * first + (1.0 - self.beta1) * grad
        second = self.beta2 * second + (1.0 - self.beta2) * (grad * grad)
        count += 1
        self.moments[index] = (first, second, count)
        correction1 = 1.0 - self.beta1 ** count
        correction2_root = (1.0 - self.beta2 ** count) ** 0.5
        denominator = _sqrt_with_zero_rule(second) / correction2_root + self.eps
        return param - (self.lr / correction1) * (first / denominator)


def make_per_tensor(optimizer: torch.optim.Optimizer) -> PerTensorSGD | PerTensorAdam:
    """The per-tensor twin of a one-group SGD or Adam ``torch.optim`` optimiser."""
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"make_per_tensor: expected 1 param group, got "
                         f"{len(optimizer.param_groups)}")
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.SGD):
        if group.get("nesterov") or group.get("maximize"):
            raise ValueError("make_per_tensor: nesterov/maximize SGD is not implemented")
        return PerTensorSGD(group["lr"], group["momentum"], group["dampening"],
                            group["weight_decay"])
    if type(optimizer) is torch.optim.Adam:
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("make_per_tensor: amsgrad/maximize Adam is not implemented")
        return PerTensorAdam(group["lr"], tuple(group["betas"]), group["eps"],
                             group["weight_decay"])
    raise TypeError(f"make_per_tensor: SGD or Adam expected, got {type(optimizer).__name__}")


class PerTensorInnerLoop:
    """Fast weights of ``model`` driven by a per-tensor optimiser.

    ``copy_initial_weights=False`` semantics: the initial fast weights are the model's
    parameters themselves, so meta-gradients accumulate into ``model``'s ``.grad``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 track_higher_grads: bool = True) -> None:
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        self.params: list[Tensor] = [p for _, p in model.named_parameters()]
        self.buffers = dict(model.named_buffers())
        self.rule = make_per_tensor(optimizer)
        self.create_graph = track_higher_grads

    def __call__(self, *args: Any) -> Tensor:
        """The model's forward with the current fast weights."""
        mapping = dict(zip(self.names, self.params))
        mapping.update(self.buffers)
        return torch.func.functional_call(self.model, mapping, args)

    def step(self, loss: Tensor) -> list[Tensor]:
        """One differentiable update of every fast weight that gets a gradient."""
        grads: Sequence[Tensor | None] = torch.autograd.grad(
            loss, self.params, create_graph=self.create_graph, allow_unused=True)
        new = []
        for i, (p, g) in enumerate(zip(self.params, grads)):
            new.append(p if g is None else self.rule.update(i, p, g))
        self.params = new
        return new

