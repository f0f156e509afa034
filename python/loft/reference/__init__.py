"""The fused ops' math in plain PyTorch.

Same names and argument names as ``torch.ops.loft.*`` (see ``docs/ops.md`` for the
contract; names, orders and flag bits come from :mod:`loft._contract`). This package is
three things at once:

- the **fallback** when the C++ ops cannot be built (``loft.backend() == "reference"``),
- the **test oracle** the fused kernels are compared against,
- the **benchmark baseline** "loft reference" (pure PyTorch over flat buffers).

Every function here is written with differentiable PyTorch ops, so the backward
functions double as the derivative used under ``create_graph=True`` (double backward).
Per-element work is vectorised over the whole bucket: per-group and per-segment values
are gathered out to the elements (:func:`layout`), and inactive segments are masked with
``torch.where`` (after sanitising their inputs so that no NaN can leak through a masked
branch).

The arithmetic rounds where the kernels round (``docs/ops.md``, "Rounding"): scalars
derived from the hyperparameters in float64 then cast once, a fused multiply-add
(``torch.addcmul``, ``torch.lerp``) exactly where torch.optim's own ops fuse one.

Modules: :mod:`~loft.reference.sgd`, :mod:`~loft.reference.adam` (the ops),
``_layout`` (segment layout and input checks), ``_math`` (shared arithmetic).
"""

from __future__ import annotations

from loft._contract import AdamFlag, SGDFlag, compute_dtype

from ._layout import (
    Layout,
    layout,
)
from .adam import ADAM_ELEMENTWISE, adam_step, adam_step_backward
from .sgd import SGD_ELEMENTWISE, sgd_step, sgd_step_backward

__all__ = [
    "sgd_step",
    "sgd_step_backward",
    "adam_step",
    "adam_step_backward",
    "compute_dtype",
    "layout",
    "Layout",
    "SGD_MAXIMIZE",
    "SGD_NESTEROV",
    "SGD_MOMENTUM",
    "ADAM_MAXIMIZE",
    "ADAM_AMSGRAD",
    "ADAM_DECOUPLED",
    "SGD_ELEMENTWISE",
    "ADAM_ELEMENTWISE",
]

# group_flags bits (docs/ops.md).
SGD_MAXIMIZE = SGDFlag.MAXIMIZE
SGD_NESTEROV = SGDFlag.NESTEROV
SGD_MOMENTUM = SGDFlag.MOMENTUM
ADAM_MAXIMIZE = AdamFlag.MAXIMIZE
ADAM_AMSGRAD = AdamFlag.AMSGRAD
ADAM_DECOUPLED = AdamFlag.DECOUPLED
