"""Native batched layers: a model built only of layers loft knows, run over ``N`` tasks as
batched PyTorch ops (no ``torch.func.vmap``), with the same numbers as ``N`` separate runs.

Each layer reads the full fast weights of its patched module (``[N, *shape]``) and one of
two layouts of the activations:

- **task-major** ``[N, B, ...]`` (the inputs and outputs of the model): ``Linear`` as one
  ``baddbmm``, ``Flatten`` on the dimensions after the task's own;
- **channel-folded** ``[B, N*C, ...]`` (task ``t``'s channels are ``t*C .. t*C + C-1``):
  ``Conv1d/2d/3d`` as one grouped convolution (``groups = N * groups``),
  ``BatchNorm1d/2d/3d`` with per-task statistics (the running statistics ``[N, C]``
  are updated in place, as a view ``[N*C]``), pooling;

and elementwise layers (activations, ``Dropout``: independent masks per element, hence
per task) take either. Only the exact classes in :data:`_LAYERS` run natively: a subclass
may have changed ``forward``. Anything else runs through ``torch.func.vmap``
(:mod:`loft._batched`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["is_native", "run_native", "runs_natively"]

#: Layers with no parameters or buffers that act on every element alike.
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Identity, nn.Dropout,
)
_CONV = {nn.Conv1d: (F.conv1d, 3), nn.Conv2d: (F.conv2d, 4), nn.Conv3d: (F.conv3d, 5)}
#: Convolutions and batch norms: their function or the dimensions of a task's input.
_BATCHNORM = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
#: Pooling layers and the dimensions of a task's input (batch, channels, spatial).
_POOL = {nn.MaxPool1d: 3, nn.MaxPool2d: 4, nn.MaxPool3d: 5, nn.AvgPool1d: 3, nn.AvgPool2d: 4,
         nn.AvgPool3d: 5}
#: Every class that runs natively.
_LAYERS = frozenset((nn.Sequential, nn.Linear, nn.Flatten, *_ELEMENTWISE, *_CONV, *_BATCHNORM,
                     *_POOL))


def runs_natively(module: nn.Module) -> bool:
    """Whether every module of ``module``'s (patched) tree is one of :data:`_LAYERS` in a
    configuration the native layers cover."""
    for m in nn.Module.modules(module):
        cls = m._loft_wrapped if hasattr(m, "_loft_wrapped") else type(m)
        if cls not in _LAYERS:
            return False
        if cls in _CONV and m.padding_mode != "zeros":
            return False
        if cls in _POOL and getattr(m, "return_indices", False):
            return False
    return True


def is_native(module: Any) -> bool:
    """:func:`runs_natively`, remembered per patched module (otherwise its forward runs
    through vmap)."""
    known = module.__dict__.get("_loft_native")
    if known is None:
        known = module.__dict__["_loft_native"] = runs_natively(module)
    return known


def run_native(module: Any, x: Tensor, tasks: int) -> tuple[Tensor, int]:
    """``module`` (native) on ``x`` (``[tasks, ...]``), reading the weights and buffers in
    its slots (``[tasks, ...]``); returns the output and the largest activation per task
    in bytes."""
    trace = [0]
    out = _Activation(x, tasks, trace=trace).run(module).task_major()
    return out, trace[0] // tasks


class _Activation:
    """An activation over all tasks, in whichever layout it was last produced."""

    def __init__(self, value: Tensor, tasks: int, folded: bool = False,
                 trace: list[int] | None = None) -> None:
        self.value, self.tasks, self.folded = value, tasks, folded
        #: ``[largest activation so far, in bytes]``, shared along the forward.
        self.trace = [0] if trace is None else trace
        size = value.numel() * value.element_size()
        if size > self.trace[0]:
            self.trace[0] = size

    def then(self, value: Tensor, folded: bool = False) -> _Activation:
        """The activation a layer made of this one."""
        return _Activation(value, self.tasks, folded, self.trace)

    def task_major(self) -> Tensor:
        """``[N, B, C, ...]``."""
        if not self.folded:
            return self.value
        x = self.value
        return x.view(x.shape[0], self.tasks, x.shape[1] // self.tasks,
                      *x.shape[2:]).transpose(0, 1)

    def channel_folded(self, m: Any, dims: tuple[int, ...]) -> Tensor:
        """``[B, N*C, ...]``, for layer ``m`` that takes a task's input of ``dims``
        dimensions (batch and channels first)."""
        x = self.value
        per_task = x.dim() if self.folded else x.dim() - 1
        if per_task not in dims:
            raise ValueError(
                f"{m._loft_wrapped.__name__}: with tasks={self.tasks} each task's input must "
                f"have {' or '.join(map(str, dims))} dimensions (a batch of samples first), "
                f"got {per_task} (shape {list(self.task_major().shape)} over all tasks)")
        if self.folded:
            return x
        return x.transpose(0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2], *x.shape[3:])

    def run(self, m: Any) -> _Activation:
        """The activation after layer ``m`` (a patched module)."""
        cls = m._loft_wrapped
        if cls is nn.Sequential:
            out = self
            for child in m._modules.values():
                out = out.run(child)
            return out
        if cls in _ELEMENTWISE:
            return self.then(cls.forward(m, self.value), self.folded)
        if cls is nn.Linear:
            return self.then(_linear(m, self.task_major()))
        if cls is nn.Flatten:
            return self.then(_flatten(m, self.task_major()))
        if cls in _CONV:
            conv, dims = _CONV[cls]
            return self.then(_conv(m, conv, self.channel_folded(m, (dims,)), self.tasks), True)
        if cls in _BATCHNORM:
            return self.then(_batch_norm(m, self.channel_folded(m, _BATCHNORM[cls])), True)
        if cls in _POOL:
            return self.then(cls.forward(m, self.channel_folded(m, (_POOL[cls],))), True)
        raise AssertionError(f"{cls.__name__} is not a native batched layer")


def _linear(m: Any, x: Tensor) -> Tensor:
    """``x @ W[t].T + b[t]`` per task ``t``: ``x`` is ``[N, ..., in]``."""
    weight, bias = m._parameters["weight"], m._parameters["bias"]
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    wt = weight.transpose(1, 2)
    out = torch.bmm(flat, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), flat, wt)
    return out.view(*x.shape[:-1], out.shape[-1])


def _flatten(m: nn.Flatten, x: Tensor) -> Tensor:
    """``Flatten(start, end)`` of each task's ``[B, ...]`` on ``[N, B, ...]``."""
    start, end = m.start_dim, m.end_dim
    return x.flatten(start + 1 if start >= 0 else start, end + 1 if end >= 0 else end)


def _conv(m: Any, conv: Callable[..., Tensor], x: Tensor, tasks: int) -> Tensor:
    """Each task's convolution with its own weights: one grouped convolution over the
    channel-folded ``[B, N*C, ...]``."""
    weight, bias = m._parameters["weight"], m._parameters["bias"]
    return conv(x, weight.reshape(-1, *weight.shape[2:]),
                None if bias is None else bias.reshape(-1), m.stride, m.padding, m.dilation,
                m.groups * tasks)


def _batch_norm(m: Any, x: Tensor) -> Tensor:
    """``nn.BatchNorm*d.forward`` per task, on the channel-folded ``[B, N*C, ...]``: each
    task's statistics, its own running statistics (``[N, C]``, updated in place)."""
    buffers = m._buffers
    running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
    factor = 0.0 if m.momentum is None else m.momentum
    if m.training and m.track_running_stats:
        counter = buffers.get("num_batches_tracked")
        if counter is not None:
            counter.add_(1)
            if m.momentum is None and counter.device.type != "meta":
                factor = 1.0 / float(counter.reshape(-1)[0])
    training = m.training or (running_mean is None and running_var is None)
    track = not m.training or m.track_running_stats
    weight, bias = m._parameters.get("weight"), m._parameters.get("bias")
    return F.batch_norm(
        x, running_mean.view(-1) if track and running_mean is not None else None,
        running_var.view(-1) if track and running_var is not None else None,
        None if weight is None else weight.reshape(-1),
        None if bias is None else bias.reshape(-1), training, factor, m.eps)
