"""Asking the patched model for a step outside its time-indexed history gives the range
(issue #7)."""

from __future__ import annotations

import pytest
import torch

import loft

from .._small_mlp import data as _data
from .._small_mlp import mlp as _mlp
from .._small_mlp import mse as _mse


def test_history_outside_the_recorded_steps_gives_the_range() -> None:
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with loft.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(_mse(fmodel(x), y))
        for time in (4, 100, -5):
            with pytest.raises(IndexError, match=rf"time={time}\b.*\b0 to 3\b"):
                fmodel.parameters(time=time)
        assert [p.shape for p in fmodel.parameters(time=-4)] == \
            [p.shape for p in model.parameters()]
    with loft.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(_mse(fmodel(x), y))
        with pytest.raises(ValueError, match=r"only the latest parameters \(time=2\)"):
            fmodel.parameters(time=1)
