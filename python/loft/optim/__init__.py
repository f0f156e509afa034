"""Differentiable optimisers (higher's ``higher.optim`` API) on fused flat buffers.

The package, by layer: :mod:`~loft.optim.base` (higher's ``DifferentiableOptimizer``
API), :mod:`~loft.optim.engine` (the flat engine), :mod:`~loft.optim.fused` (SGD, Adam,
AdamW), :mod:`~loft.optim.unfused` (Adagrad, Adadelta, Adamax, ASGD, RMSprop, Rprop),
:mod:`~loft.optim.registry` (``get_diff_optim`` and friends). Programs import everything
from here, as from ``higher.optim``, private helpers included (:mod:`~loft.optim.compat`).
"""

from __future__ import annotations

from loft.optim.base import DifferentiableOptimizer
from loft.optim.compat import (  # noqa: F401 - higher.optim's private names, for its users
    _add,
    _addcdiv,
    _addcmul,
    _get_mask_closure,
    _GradCallbackType,
    _GradClosureType,
    _GroupedGradsType,
    _maybe_mask,
    _OverrideType,
    _recursive_apply,
    _StateType,
)
from loft.optim.engine import FlatOptimizer
from loft.optim.fused import DifferentiableAdam, DifferentiableAdamW, DifferentiableSGD
from loft.optim.registry import (  # noqa: F401 - higher's names
    _OPT_MAPPING,
    _opt_mapping,
    _OptMappingType,
    apply_trainable_opt_params,
    create_diff_optim,
    get_diff_optim,
    get_trainable_opt_params,
    register_optim,
)
from loft.optim.unfused import (
    DifferentiableAdadelta,
    DifferentiableAdagrad,
    DifferentiableAdamax,
    DifferentiableASGD,
    DifferentiableRMSprop,
    DifferentiableRprop,
)

__all__ = [
    "DifferentiableOptimizer", "FlatOptimizer", "DifferentiableSGD", "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdagrad", "DifferentiableAdadelta", "DifferentiableAdamax", "DifferentiableASGD",
    "DifferentiableRMSprop", "DifferentiableRprop",
    "get_diff_optim", "create_diff_optim", "register_optim", "get_trainable_opt_params",
    "apply_trainable_opt_params",
]

# Their public home, as before the package split (messages and reprs name loft.optim.X).
for _name in __all__:
    if isinstance(globals()[_name], type):
        globals()[_name].__module__ = __name__
del _name
