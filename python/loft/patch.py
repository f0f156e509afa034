"""Functional ("monkey-patched") modules with time-indexed fast weights (higher's API).

``monkeypatch(module)`` returns ``fmodel``: calling ``fmodel(x)`` runs ``module``'s
forward with the *fast weights* in place of its parameters (via
:func:`torch.func.functional_call`), and with its own copy of the module's buffers, so
BatchNorm statistics diverge from the original module without touching it.

``fmodel.parameters(time=i)`` returns the fast weights after ``i`` updates (``time=0``:
the initial weights). Unlike higher, asking for a step that is not recorded (any step
but the latest when ``track_higher_grads=False``) raises instead of silently returning
the latest weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["monkeypatch", "make_functional", "buffer_sync", "FunctionalModule"]


class FunctionalModule(nn.Module):
    """A stateless view of ``module`` driven by a history of fast weights."""

    def __init__(self, module: nn.Module, track_higher_grads: bool = True) -> None:
        super().__init__()
        # Stored outside nn.Module's registries so that the original module's parameters
        # are not reported as this module's own.
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_param_names",
                           [name for name, _ in module.named_parameters()])
        object.__setattr__(self, "_own_buffers", {})
        object.__setattr__(self, "_fast_params", None)
        object.__setattr__(self, "_track_higher_grads", bool(track_higher_grads))
        object.__setattr__(self, "_time_offset", 0)

    # ---- fast weights ------------------------------------------------------------------

    @property
    def track_higher_grads(self) -> bool:
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"Expected boolean argument. Got: {type(value)}.")
        object.__setattr__(self, "_track_higher_grads", value)

    @property
    def fast_params(self) -> list[Tensor] | None:
        """The latest fast weights (``None`` before any are set)."""
        return None if self._fast_params is None else self._fast_params[-1]

    @fast_params.setter
    def fast_params(self, value: Iterable[Tensor]) -> None:
        value = list(value)
        if self._fast_params is None:
            object.__setattr__(self, "_fast_params", [])
        if self._track_higher_grads or not self._fast_params:
            self._fast_params.append(value)
        else:
            self._fast_params[0] = value
            object.__setattr__(self, "_time_offset", self._time_offset + 1)

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The initial fast weights (only while tracking higher-order gradients)."""
        if not self._track_higher_grads:
            raise Exception(
                "Cannot get initial parameters when not tracking higher gradients."
            )
        return self._fast_params[0]

    def update_params(self, params: Iterable[Tensor]) -> None:
        """Record ``params`` as the new fast weights (one more step of history)."""
        params = list(params)
        if len(params) != len(self._param_names):
            raise ValueError(
                f"update_params: expected {len(self._param_names)} tensors (one per "
                f"parameter of the module), got {len(params)}"
            )
        self.fast_params = params

    def parameters(self, recurse: bool = True, time: int | None = None) -> Iterator[Tensor]:
        """The fast weights after ``time`` updates (default: the latest).

        Raises ``ValueError`` for a step that is not recorded: with
        ``track_higher_grads=False`` only the latest weights are kept.
        """
        if self._fast_params is None:
            raise Exception(
                "Tried to get fast weights of a monkey patched module which does not "
                "encapsulate fast weights."
            )
        if time is None:
            return iter(self._fast_params[-1])
        latest = self._time_offset + len(self._fast_params) - 1
        if not self._track_higher_grads:
            if time not in (-1, latest):
                raise ValueError(
                    f"The patched model is not tracking higher gradients: only the latest "
                    f"parameters (time={latest}) are available, not time={time}."
                )
            return iter(self._fast_params[-1])
        if not -len(self._fast_params) <= time <= latest:
            raise IndexError(
                f"time={time} is outside the recorded fast weights: 0 to {latest} "
                f"(or -1 for the latest)"
            )
        return iter(self._fast_params[time])

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Tensor]]:
        return iter(zip(self._param_names, self.parameters()))

    # ---- forward -----------------------------------------------------------------------

    def forward(self, *args: Any, params: Iterable[Tensor] | None = None, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` with the fast weights (or ``params``, which are then
        recorded as the new fast weights, as higher does)."""
        if params is not None:
            self.update_params(params)
        elif self.fast_params is None:
            raise ValueError(
                "params keyword must be provided if patched module not tracking its own "
                "fast parameters"
            )
        mapping: dict[str, Tensor] = dict(zip(self._param_names, self.fast_params))
        mapping.update(self._own_buffers)
        return torch.func.functional_call(self._module, mapping, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._module, name)

    def __repr__(self) -> str:
        return f"MonkeyPatched({self._module!r})"


def buffer_sync(module: nn.Module, fmodule: FunctionalModule,
                device: torch.device | str | None = None) -> None:
    """Give ``fmodule`` its own copies of ``module``'s buffers (on ``device``)."""
    own = {}
    for name, buf in module.named_buffers():
        if buf is None:
            continue
        copied = buf.detach().clone()
        own[name] = copied if device is None else copied.to(device)
    object.__setattr__(fmodule, "_own_buffers", own)


def make_functional(module: nn.Module, encapsulator: Any = None) -> FunctionalModule:
    """A :class:`FunctionalModule` over ``module``; ``encapsulator(fmodule, module)`` sets
    its initial fast weights and buffers."""
    fmodule = FunctionalModule(module)
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule


def _copy_param(p: Tensor, device: torch.device | str | None, detach: bool) -> Tensor:
    q = p.detach().clone().requires_grad_(p.requires_grad) if detach else p.clone()
    return q if device is None else q.to(device)


def monkeypatch(
    module: nn.Module,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> FunctionalModule:
    """A stateless version of ``module`` with its own fast weights (higher's ``monkeypatch``).

    Args:
        module: the module to patch (left unchanged).
        device: where the fast weights and buffers go.
        copy_initial_weights: ``True``: the initial fast weights are detached copies
            (no meta-gradient reaches ``module``); ``False``: they are differentiable
            clones of ``module``'s parameters, so meta-gradients flow into them.
        track_higher_grads: ``False`` keeps only the latest fast weights (test mode).
    """

    def encapsulator(fmodule: FunctionalModule, mod: nn.Module) -> None:
        params = [_copy_param(p, device, copy_initial_weights) for p in mod.parameters()]
        buffer_sync(mod, fmodule, device)
        fmodule.update_params(params)

    fmodule = make_functional(module, encapsulator=encapsulator)
    fmodule.track_higher_grads = track_higher_grads
    return fmodule
