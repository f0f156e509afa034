"""higher's whole module surface: every top-level name of ``higher``, ``higher.optim``,
``higher.patch`` and ``higher.utils`` exists in loft's counterpart and behaves as higher's.

The names are read from higher 0.2.1 (a test dependency); higher HEAD (master) adds
``optim.DifferentiableAdamW``, and its unmerged pull request #101, which programs were
written against, adds ``optim.DifferentiableOptimizer.state_dict`` and
``utils._recursive_detach``. Left out: the modules and objects higher imports for its own
use (``_torch``, ``_typing``, ``_contextmanager``, ...).
"""

from __future__ import annotations

import types
import typing
from typing import Any

import higher
import pytest
import torch

import loft

MODULES = ["", "optim", "patch", "utils"]

#: What higher HEAD (and PR #101) added after 0.2.1, per module.
ADDED = {"": set(), "optim": {"DifferentiableAdamW"}, "patch": set(),
         "utils": {"_recursive_detach"}}


def _module(lib: Any, name: str) -> Any:
    return getattr(lib, name) if name else lib


def _own_names(module: types.ModuleType) -> set[str]:
    """The names a higher module defines, not those it imports for itself."""
    names = set()
    for name, value in vars(module).items():
        if name.startswith("__") and name.endswith("__"):
            continue
        if isinstance(value, types.ModuleType) and name.startswith("_"):
            continue  # _torch, _typing, _utils, ...
        owner = getattr(value, "__module__", None)
        if (isinstance(value, (types.FunctionType, type)) and owner
                and not owner.startswith("higher")):
            continue  # _contextmanager, _OrderedDict
        names.add(name)
    return names


@pytest.mark.parametrize("name", MODULES, ids=lambda n: f"higher.{n}" if n else "higher")
def test_every_name_of_higher_exists(name: str) -> None:
    theirs, ours = _module(higher, name), _module(loft, name)
    expected = _own_names(theirs) | ADDED[name]
    assert len(expected) > 5
    missing = sorted(n for n in expected if not hasattr(ours, n))
    assert not missing, f"loft.{name or '__init__'} lacks {missing}"


@pytest.mark.parametrize("name", MODULES, ids=lambda n: f"higher.{n}" if n else "higher")
def test_every_name_is_checked_below(name: str) -> None:
    """Each name has a behaviour check here or in the test module of its concept."""
    assert _own_names(_module(higher, name)) | ADDED[name] <= set(CHECKED[name])


# ---- behaviour, name by name ----------------------------------------------------------------


def test_optim_arithmetic_helpers() -> None:
    """higher's out-of-place ``add``/``addcdiv``/``addcmul``, with and without a scale."""
    gen = torch.Generator().manual_seed(0)
    t, a, b = (torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(3))
    calls = {"_add": [(t, a), (t, 0.5, a)],
             "_addcdiv": [(t, a, b), (t, 0.5, a, b)],
             "_addcmul": [(t, a, b), (t, 0.5, a, b)]}
    for name, arguments in calls.items():
        for args in arguments:
            assert torch.equal(getattr(loft.optim, name)(*args),
                               getattr(higher.optim, name)(*args)), (name, len(args))


def test_optim_masking_hooks() -> None:
    """``_maybe_mask`` zeroes a tensor's gradient where the mask holds (also of the
    gradient's own gradient); a tensor that does not require grad is left alone."""
    for lib in (loft, higher):
        x = torch.tensor([0.0, 4.0], requires_grad=True)
        mask = x == 0
        z = x * 2
        lib.optim._maybe_mask(z, mask)
        (g,) = torch.autograd.grad(z.sum(), [x])
        assert g.tolist() == [0.0, 2.0], lib
        assert lib.optim._get_mask_closure(mask)(torch.ones(2)).tolist() == [0.0, 1.0]
        w = torch.ones(2, requires_grad=True)
        masked = lib.optim._get_mask_closure(mask)(w * 3)
        (gw,) = torch.autograd.grad(masked.sum(), [w])
        assert gw.tolist() == [0.0, 3.0], lib
        constant = torch.ones(2)
        lib.optim._maybe_mask(constant, mask)
        assert not constant.requires_grad


def test_optim_recursive_apply() -> None:
    for lib in (loft, higher):
        target = [0.1, (0.9, 0.999), torch.zeros(2)]
        out = lib.optim._recursive_apply(
            [torch.tensor(0.5), (torch.tensor(0.8), torch.tensor(0.99)), torch.ones(2)], target)
        assert out[0] == 0.5 and type(out[0]) is float and type(out[1]) is tuple
        assert out[1] == (pytest.approx(0.8), pytest.approx(0.99))
        assert out[2] is target[2] and out[2].tolist() == [1.0, 1.0]
        with pytest.raises(ValueError):
            lib.optim._recursive_apply([torch.tensor(1.0)], 0.1)


def test_optim_type_aliases_are_typing_forms() -> None:
    for name in ("_GroupedGradsType", "_StateType", "_GradClosureType", "_OverrideType",
                 "_GradCallbackType", "_OptMappingType"):
        alias = getattr(loft.optim, name)
        assert typing.get_origin(alias) is not None, name  # usable in annotations


def test_optim_registry_and_classes() -> None:
    assert loft.optim._opt_mapping is loft.optim._OPT_MAPPING
    for torch_type, theirs in higher.optim._opt_mapping.items():
        ours = loft.optim._opt_mapping[torch_type]
        assert ours.__name__ == theirs.__name__
        assert issubclass(ours, loft.optim.DifferentiableOptimizer)
        assert hasattr(ours, "_update") and hasattr(ours, "step")
    assert loft.optim._opt_mapping[torch.optim.AdamW] is loft.optim.DifferentiableAdamW

    class Custom(torch.optim.SGD):
        pass

    loft.optim.register_optim(Custom, loft.optim.DifferentiableSGD)
    try:
        assert loft.optim._opt_mapping[Custom] is loft.optim.DifferentiableSGD
    finally:
        del loft.optim._opt_mapping[Custom]


def test_utils_type_variables() -> None:
    assert isinstance(loft.utils._T, typing.TypeVar) and isinstance(loft.utils._U, typing.TypeVar)


def test_patch_members_and_constants() -> None:
    for member in ("_param_mapping", "_expand_params", "fast_params", "init_fast_params",
                   "track_higher_grads", "root", "is_root", "forward",
                   "direct_submodule_call", "_original_params"):
        assert hasattr(loft.patch._MonkeyPatchBase, member), member
    assert set(higher.patch._internal_attrs) <= set(loft.patch._internal_attrs)
    assert typing.get_origin(loft.patch._BufferType) is not None
    assert typing.get_origin(loft.patch._EncapsulatorType) is not None


#: Where each name's behaviour is checked (this file, or the test module of its concept).
CHECKED: dict[str, list[str]] = {
    "": ["innerloop_ctx", "monkeypatch", "get_diff_optim", "create_diff_optim",
         "register_optim", "optim", "patch", "utils"],  # test_higher_api, test_innerloop
    "optim": [
        "_add", "_addcdiv", "_addcmul", "_maybe_mask", "_get_mask_closure",
        "_recursive_apply", "_GroupedGradsType", "_StateType", "_GradClosureType",
        "_OverrideType", "_GradCallbackType", "_OptMappingType", "_opt_mapping",
        "register_optim",  # above
        "DifferentiableOptimizer", "DifferentiableSGD", "DifferentiableAdam",
        "DifferentiableAdamW", "DifferentiableAdagrad", "DifferentiableAdadelta",
        "DifferentiableAdamax", "DifferentiableASGD", "DifferentiableRMSprop",
        "DifferentiableRprop",  # test_per_tensor_update, test_optim_extra, test_innerloop
        "get_diff_optim", "create_diff_optim", "get_trainable_opt_params",
        "apply_trainable_opt_params",  # test_higher_api, test_higher_scenarios
    ],
    "patch": [
        "_MonkeyPatchBase", "_internal_attrs", "_BufferType", "_EncapsulatorType",  # above
        "_ParameterPlaceholder", "_modify_internally", "_patched_parameters",
        "_make_functional", "_update_patched_params", "buffer_sync", "make_functional",
        "monkeypatch",  # test_patch
    ],
    "utils": ["_T", "_U",  # above
              "_copy_tensor", "_recursive_copy_and_cast", "_recursive_map", "_is_container",
              "_find_param_in_list", "_get_param_mapping", "flatten", "get_func_params",
              "_recursive_detach"],  # test_patch.test_utils_match_higher
}
