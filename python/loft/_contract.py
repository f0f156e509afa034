"""The fused ops' contract, declared once: buffers, hyperparameters, flag bits, segment columns.

``csrc/ops.cpp`` holds the schemas; this module is their Python side. The reference
math (:mod:`loft.reference`), the typed wrappers (:mod:`loft.ops`), the step engine
(:mod:`loft.step`) and the optimisers read their names, orders and bits from here
(``tests/ops/test_contract.py`` checks them against the registered schemas).
Full contract and math: ``docs/ops.md``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = [
    "SegmentColumn",
    "SEGMENT_COLUMNS",
    "SGDFlag",
    "AdamFlag",
    "UnfusedFlag",
    "ELEMENTWISE",
    "ELEMENTWISE_HYPER",
    "OpContract",
    "ForwardSlots",
    "BackwardSlots",
    "GradSlots",
    "SGD",
    "ADAM",
    "OPS",
    "compute_dtype",
]


class SegmentColumn(enum.IntEnum):
    """The columns of a ``[S, 5]`` int64 segment table row (one row per parameter tensor)."""

    OFFSET = 0  # where the tensor starts in the flat buffer
    NUMEL = 1  # its number of elements
    GROUP = 2  # its param group
    STEP = 3  # its updates before this call (torch.optim's state["step"])
    ACTIVE = 4  # 1: it got a gradient this step; 0: copied through unchanged


#: The column names, in order (``docs/ops.md``).
SEGMENT_COLUMNS: tuple[str, ...] = tuple(c.name.lower() for c in SegmentColumn)


class SGDFlag(enum.IntFlag):
    """``group_flags`` bits of ``sgd_step``."""

    MAXIMIZE = 1
    NESTEROV = 2
    MOMENTUM = 4


class AdamFlag(enum.IntFlag):
    """``group_flags`` bits of ``adam_step``."""

    MAXIMIZE = 1
    AMSGRAD = 2
    DECOUPLED = 4  # AdamW's weight decay


class UnfusedFlag(enum.IntFlag):
    """``group_flags`` bits of the unfused optimisers' steps (:mod:`loft.optim.unfused`)."""

    MAXIMIZE = 1
    RMSPROP_CENTERED = 2
    RMSPROP_MOMENTUM = 4


#: The optional per-element arguments, last in every op's schema (the backward ops take
#: them after ``hyper_grad_mask``); bits H and H + 1 of ``hyper_grad_mask`` ask for their
#: gradients, with H the number of ``[G]`` hyperparameters.
ELEMENTWISE: tuple[str, ...] = ("lr_elementwise", "weight_decay_elementwise")
#: The ``[G]`` hyperparameter each of :data:`ELEMENTWISE` replaces, element by element.
ELEMENTWISE_HYPER: tuple[str, ...] = ("lr", "weight_decay")


class ForwardSlots(NamedTuple):
    """Where each argument of ``<op>(...)`` sits among its positional arguments."""

    buffers: slice  # params, grads, *state
    segments: int
    hyper: slice
    flags: int
    elementwise: slice


class BackwardSlots(NamedTuple):
    """Where each argument of ``<op>_backward(...)`` sits among its positional arguments."""

    upstream: slice  # the gradients of the forward's outputs
    buffers: slice
    segments: int
    hyper: slice
    flags: int
    mask: int  # hyper_grad_mask
    elementwise: slice


class GradSlots(NamedTuple):
    """Where each gradient sits in ``<op>_backward``'s result."""

    buffers: slice
    hyper: slice
    elementwise: slice


@dataclass(frozen=True, eq=False)
class OpContract:
    """One fused op: ``<name>(params, grads, *state, segments, *hyper, group_flags,
    *ELEMENTWISE) -> (params_out, *state_out)`` and its ``<name>_backward``.

    Args:
        name: the op under ``torch.ops.loft``.
        state: the optimiser's flat state buffers, in schema order.
        hyper: the ``[G]`` hyperparameters, in schema order (bit k of
            ``hyper_grad_mask`` asks for the k-th one's gradient).
        flags: the ``group_flags`` bits.
        optional_state: the state buffer that may have 0 elements when no group sets
            ``optional_flag``.
        optional_flag: the flag that needs ``optional_state``.
        linear: the step is linear in its buffers, so its backward reads none of their
            values when no hyperparameter gradient is wanted.
        inplace: ``<name>_`` exists (CPU): the step with the state updated in place.
    """

    name: str
    state: tuple[str, ...]
    hyper: tuple[str, ...]
    flags: type[enum.IntFlag]
    optional_state: str
    optional_flag: int
    linear: bool
    inplace: bool
    buffers: tuple[str, ...] = field(init=False)
    outputs: tuple[str, ...] = field(init=False)
    inputs: tuple[str, ...] = field(init=False)
    forward_slots: ForwardSlots = field(init=False)
    backward_slots: BackwardSlots = field(init=False)
    grad_slots: GradSlots = field(init=False)

    def __post_init__(self) -> None:
        buffers = ("params", "grads", *self.state)
        nb, nh, ne = len(buffers), len(self.hyper), len(ELEMENTWISE)
        no = nb - 1  # every buffer but grads comes out
        fields = {
            "buffers": buffers,
            "outputs": ("params", *self.state),
            "inputs": (*buffers, "segments", *self.hyper, "group_flags", *ELEMENTWISE),
            "forward_slots": ForwardSlots(slice(0, nb), nb, slice(nb + 1, nb + 1 + nh),
                                          nb + 1 + nh, slice(nb + 2 + nh, nb + 2 + nh + ne)),
            "backward_slots": BackwardSlots(
                slice(0, no), slice(no, no + nb), no + nb, slice(no + nb + 1, no + nb + 1 + nh),
                no + nb + 1 + nh, no + nb + 2 + nh, slice(no + nb + 3 + nh, no + nb + 3 + nh + ne)),
            "grad_slots": GradSlots(slice(0, nb), slice(nb, nb + nh),
                                    slice(nb + nh, nb + nh + ne)),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def backward_name(self) -> str:
        return self.name + "_backward"

    def hyper_bit(self, name: str) -> int:
        """The ``hyper_grad_mask`` bit of ``[G]`` hyperparameter ``name``."""
        return 1 << self.hyper.index(name)

    def elementwise_bit(self, k: int) -> int:
        """The ``hyper_grad_mask`` bit of the k-th per-element hyperparameter (bit H + k)."""
        return 1 << (len(self.hyper) + k)

    def hyper_grad_mask(self, hyper_wanted: tuple[bool, ...] | list[bool],
                        elementwise_wanted: tuple[bool, ...] | list[bool] = ()) -> int:
        """The backward's ``hyper_grad_mask`` for the gradients wanted, in schema order."""
        mask = 0
        for k, wanted in enumerate(hyper_wanted):
            if wanted:
                mask |= 1 << k
        for k, wanted in enumerate(elementwise_wanted):
            if wanted:
                mask |= self.elementwise_bit(k)
        return mask


SGD = OpContract(
    name="sgd_step",
    state=("momentum_buffer",),
    hyper=("lr", "momentum", "dampening", "weight_decay"),
    flags=SGDFlag,
    optional_state="momentum_buffer",
    optional_flag=SGDFlag.MOMENTUM,
    linear=True,
    inplace=False,
)

ADAM = OpContract(
    name="adam_step",
    state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    hyper=("lr", "beta1", "beta2", "eps", "weight_decay"),
    flags=AdamFlag,
    optional_state="max_exp_avg_sq",
    optional_flag=AdamFlag.AMSGRAD,
    linear=False,
    inplace=True,
)

#: Every fused op.
OPS: tuple[OpContract, ...] = (SGD, ADAM)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 stays; float32, float16 and bfloat16 run in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
