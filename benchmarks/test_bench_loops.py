"""Loop-level benchmarks: the suite's workloads as pytest-benchmark cases, in-process.

Each case times one full run of a :class:`loft.bench.workloads.Workload` (T inner
steps, then the query loss's ``backward()``) with the same runners as
``python -m loft.bench`` (:func:`loft.bench.measure.make_runner`). Unlike the suite,
cases share one process (pytest's), so use them for quick A/B comparisons while
working on loft; ``python -m loft.bench`` (one fresh process per measurement, saved
memory and graph size) is the reference. loft's backend is whatever this process has
(``LOFT_BACKEND=reference python -m pytest benchmarks`` for the reference path).

Run: ``python -m pytest benchmarks/test_bench_loops.py`` (``-k "A and adam"`` to narrow).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from loft.bench.measure import make_runner
from loft.bench.workloads import MODELS, OPTIMIZERS, Workload, build

STEPS = [10, 50]
IMPLS = ["loft", "per-tensor"] + (["higher"] if importlib.util.find_spec("higher") else [])


def _one_run(runner: Any, steps: int) -> None:
    runner.built.model.zero_grad(set_to_none=True)
    runner.setup()
    for _ in range(steps):
        runner.step()
    runner.meta_backward(runner.query_loss())
    runner.teardown()


@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T={t}")
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("impl", IMPLS)
def test_inner_loop_and_meta_backward(benchmark: Any, impl: str, model: str, optimizer: str,
                                      steps: int) -> None:
    runner = make_runner(impl, build(Workload(model, optimizer, steps)))
    _one_run(runner, 1)  # warm-up
    benchmark.extra_info.update(model=model, optimizer=optimizer, steps=steps)
    benchmark.pedantic(_one_run, args=(runner, steps), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T={t}")
@pytest.mark.parametrize("model", list(MODELS))
def test_bare_floor(benchmark: Any, model: str, steps: int) -> None:
    """Forward + ``autograd.grad(create_graph=True)`` per step, no update."""
    runner = make_runner("floor", build(Workload(model, "none", steps)))
    _one_run(runner, 1)
    benchmark.pedantic(_one_run, args=(runner, steps), rounds=3, warmup_rounds=1)
