"""Subclasses written for higher: every built-in optimiser has higher's per-tensor
``_update``, which runs when a subclass overrides ``step`` or ``_update``.

Both ways programs subclass (override ``_update`` and call ``super()._update``; override
``step`` and call ``self._update``) run side by side with higher 0.2.1 (SGD, float64),
and the per-tensor path of every optimiser equals loft's flat path.
"""

from __future__ import annotations

from typing import Any

import higher
import pytest
import torch

import loft
from loft.step import is_step_node

from ._tiny import tiny_batches, tiny_mlp

F64 = dict(rtol=1e-11, atol=1e-12)


_model, _batches = tiny_mlp, tiny_batches


def _clipping_update(base: type) -> type:
    """Overrides ``_update``: clips the gradients, then calls the parent's."""

    class Clipped(base):  # type: ignore[misc, valid-type]
        def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
            grouped_grads = [[None if g is None else g.clamp(-0.5, 0.5) for g in grads]
                             for grads in grouped_grads]
            super()._update(grouped_grads, **kwargs)

    return Clipped


def _own_step(base: type) -> type:
    """Overrides ``step`` (higher's, reduced to its core) and calls ``self._update``."""

    class OwnStep(base):  # type: ignore[misc, valid-type]
        def step(self, loss: torch.Tensor, params: Any = None, override: Any = None,
                 grad_callback: Any = None, **kwargs: Any) -> list[torch.Tensor]:
            params = list(self._fmodel.fast_params)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            grouped = []
            for group, mapping in zip(self.param_groups, self._group_to_param_list):
                grouped.append([grads[i] for i in mapping])
                for j, i in enumerate(mapping):
                    group["params"][j] = params[i]
            self._update(grouped)
            new_params = list(params)
            for group, mapping in zip(self.param_groups, self._group_to_param_list):
                for p, i in zip(group["params"], mapping):
                    new_params[i] = p
            self._fmodel.update_params(new_params)
            return new_params

    return OwnStep


def _run(lib: Any, cls: type, opt_type: type = torch.optim.SGD, steps: int = 3,
         **opt_kwargs: Any) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...], Any]:
    model = _model()
    opt = opt_type([{"params": model[0].parameters()},
                    {"params": model[2].parameters(), "lr": 0.05}], **opt_kwargs)
    xs = _batches(steps + 1)
    fmodel = lib.monkeypatch(model, copy_initial_weights=False)
    diffopt = cls(opt, model.parameters(), fmodel=fmodel)
    for x in xs[:-1]:
        diffopt.step(fmodel(x).pow(2).sum())
    loss = fmodel(xs[-1]).pow(2).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return [p.detach() for p in fmodel.parameters()], grads, diffopt


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **F64)


@pytest.mark.parametrize("subclass", [_clipping_update, _own_step], ids=["update", "step"])
@pytest.mark.parametrize("sgd", [dict(lr=0.3), dict(lr=0.3, momentum=0.9, nesterov=True),
                                 dict(lr=0.3, momentum=0.5, dampening=0.2, weight_decay=0.1)])
def test_sgd_subclasses_as_in_higher(subclass: Any, sgd: dict[str, Any]) -> None:
    weights, grads, diffopt = _run(loft, subclass(loft.optim.DifferentiableSGD), **sgd)
    ref_weights, ref_grads, ref = _run(higher, subclass(higher.optim.DifferentiableSGD), **sgd)
    _close(weights + list(grads), ref_weights + list(ref_grads))
    for group, ref_group in zip(diffopt.state, ref.state):
        assert sorted(group) == sorted(ref_group)
        for j in group:
            assert sorted(group[j]) == sorted(ref_group[j])
            _close(list(group[j].values()), list(ref_group[j].values()))


_EVERY_OPTIMIZER = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (torch.optim.SGD, dict(lr=0.1, maximize=True)),
    (torch.optim.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.01)),
    (torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1)),
    (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    (torch.optim.Adadelta, dict(lr=0.5)),
    (torch.optim.Adamax, dict(lr=0.05)),
    (torch.optim.ASGD, dict(lr=0.05, t0=1)),
    (torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
    (torch.optim.Rprop, dict(lr=0.01)),
]


@pytest.mark.parametrize("subclass", [_clipping_update, _own_step], ids=["update", "step"])
@pytest.mark.parametrize("opt_type,kwargs", _EVERY_OPTIMIZER,
                         ids=[f"{t.__name__}{i}" for i, (t, _) in enumerate(_EVERY_OPTIMIZER)])
def test_per_tensor_path_equals_the_flat_path(subclass: Any, opt_type: type,
                                              kwargs: dict[str, Any]) -> None:
    """The per-tensor ``_update`` of every optimiser computes what its flat engine does
    (the clipping subclass is compared with a grad_callback doing the same)."""
    model = _model()
    cls = type(loft.optim.get_diff_optim(opt_type(model.parameters(), **kwargs),
                                         model.parameters()))
    weights, grads, diffopt = _run(loft, subclass(cls), opt_type, **kwargs)

    def flat(opt: Any, params: Any, fmodel: Any) -> Any:
        clip = (lambda gs: [None if g is None else g.clamp(-0.5, 0.5) for g in gs]) \
            if subclass is _clipping_update else None
        return cls(opt, params, fmodel=fmodel, grad_callback=clip)

    ref_weights, ref_grads, ref = _run(loft, flat, opt_type, **kwargs)
    _close(weights + list(grads), ref_weights + list(ref_grads))
    for group, ref_group in zip(diffopt.state, ref.state):
        assert sorted(group) == sorted(ref_group)
        for j in group:
            assert sorted(group[j]) == sorted(ref_group[j])
            for key, value in group[j].items():
                expected = ref_group[j][key]
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(value, expected, **F64)
                    assert value._base is None  # not a view: detach_() works as in higher
                else:
                    assert value == expected


def test_unmodified_classes_run_fused_and_subclasses_per_tensor() -> None:
    """One fused node per bucket per step for loft's own class (and a subclass that only
    adds a method); per-tensor nodes for a subclass that overrides ``_update``."""

    class Named(loft.optim.DifferentiableSGD):
        def describe(self) -> str:
            return "sgd"

    for cls, fused in ((loft.optim.DifferentiableSGD, True), (Named, True),
                       (_clipping_update(loft.optim.DifferentiableSGD), False)):
        _, _, diffopt = _run(loft, cls, lr=0.1)
        nodes = [p.grad_fn for p in diffopt._fmodel.parameters()]
        assert any(map(is_step_node, nodes)) == fused, (cls, [n.name() for n in nodes])
