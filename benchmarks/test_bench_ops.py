"""Op-level benchmarks: ``torch.ops.loft.{sgd,adam}_step`` and their ``_backward``.

Each benchmark calls the raw op once per round on ``N`` float32 elements (1e3 to 1e7)
split into 8 segments of one param group, every segment active and past its first
step. The forward reads 3 (SGD momentum: params, grads, buffer) or 4 (Adam: params,
grads, exp_avg, exp_avg_sq) buffers and writes 2 or 3; the backward reads the upstream
gradients and the saved inputs and writes the input gradients. ``extra_info`` records
the bytes moved per call, so GB/s = bytes / mean time.

Run: ``python -m pytest benchmarks/test_bench_ops.py`` (``--benchmark-json FILE`` to keep
the numbers).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

SIZES = [10**3, 10**4, 10**5, 10**6, 10**7]
NUM_SEGMENTS = 8
SGD_MOMENTUM_FLAG = 4  # group_flags bit: the group uses momentum (docs/ops.md)


def _segments(n: int, step: int = 3) -> Tensor:
    bounds = [n * i // NUM_SEGMENTS for i in range(NUM_SEGMENTS + 1)]
    rows = [[lo, hi - lo, 0, step, 1] for lo, hi in zip(bounds[:-1], bounds[1:])]
    return torch.tensor(rows, dtype=torch.int64)


def _scalar(value: float) -> Tensor:
    return torch.tensor([value], dtype=torch.float32)


def _sgd_inputs(n: int) -> list[Any]:
    gen = torch.Generator().manual_seed(0)
    p, g, b = (torch.randn(n, generator=gen) for _ in range(3))
    return [p, g, b, _segments(n), _scalar(0.01), _scalar(0.9), _scalar(0.0), _scalar(0.0),
            torch.tensor([SGD_MOMENTUM_FLAG], dtype=torch.int64)]


def _adam_inputs(n: int) -> list[Any]:
    gen = torch.Generator().manual_seed(0)
    p, g, m = (torch.randn(n, generator=gen) for _ in range(3))
    v = torch.rand(n, generator=gen)
    return [p, g, m, v, p.new_empty(0), _segments(n), _scalar(1e-3), _scalar(0.9),
            _scalar(0.999), _scalar(1e-8), _scalar(0.0), torch.zeros(1, dtype=torch.int64)]


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n=1e{len(str(n)) - 1}")
def test_sgd_step_forward(benchmark: Any, fused_ops: None, n: int) -> None:
    inputs = _sgd_inputs(n)
    benchmark.extra_info["bytes"] = 5 * 4 * n  # read p, g, b; write p', b'
    benchmark(torch.ops.loft.sgd_step, *inputs)


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n=1e{len(str(n)) - 1}")
def test_sgd_step_backward(benchmark: Any, fused_ops: None, n: int) -> None:
    inputs = _sgd_inputs(n)
    upstream = [torch.randn(n), torch.randn(n)]
    benchmark.extra_info["bytes"] = 8 * 4 * n  # read 2 upstream + p, g, b; write 3 grads
    benchmark(torch.ops.loft.sgd_step_backward, *upstream, *inputs, 0)


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n=1e{len(str(n)) - 1}")
def test_adam_step_forward(benchmark: Any, fused_ops: None, n: int) -> None:
    inputs = _adam_inputs(n)
    benchmark.extra_info["bytes"] = 7 * 4 * n  # read p, g, m, v; write p', m', v'
    benchmark(torch.ops.loft.adam_step, *inputs)


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n=1e{len(str(n)) - 1}")
def test_adam_step_backward(benchmark: Any, fused_ops: None, n: int) -> None:
    inputs = _adam_inputs(n)
    upstream = [torch.randn(n), torch.randn(n), torch.randn(n), torch.empty(0)]
    benchmark.extra_info["bytes"] = 11 * 4 * n  # read 3 upstream + p, g, m, v; write 4 grads
    benchmark(torch.ops.loft.adam_step_backward, *upstream, *inputs, 0)


@pytest.mark.parametrize("n", [10**6], ids=["n=1e6"])
def test_adam_step_backward_with_hyper_grads(benchmark: Any, fused_ops: None, n: int) -> None:
    """All five hyperparameter gradients (block reductions) on top of the backward."""
    inputs = _adam_inputs(n)
    upstream = [torch.randn(n), torch.randn(n), torch.randn(n), torch.empty(0)]
    benchmark(torch.ops.loft.adam_step_backward, *upstream, *inputs, 0b11111)


# Per-element lr (Meta-SGD): one more [N] buffer read in the forward, its gradient written
# in the backward. Compare with the per-group rows of the same n.


@pytest.mark.parametrize("n", [10**6], ids=["n=1e6"])
def test_sgd_step_forward_lr_elementwise(benchmark: Any, fused_ops: None, n: int) -> None:
    inputs = _sgd_inputs(n)
    lr_elementwise = torch.full((n,), 0.01)
    benchmark.extra_info["bytes"] = 6 * 4 * n  # read p, g, b, lr; write p', b'
    benchmark(torch.ops.loft.sgd_step, *inputs, lr_elementwise)


@pytest.mark.parametrize("n", [10**6], ids=["n=1e6"])
def test_sgd_step_backward_lr_elementwise(benchmark: Any, fused_ops: None, n: int) -> None:
    inputs = _sgd_inputs(n)
    upstream = [torch.randn(n), torch.randn(n)]
    lr_elementwise = torch.full((n,), 0.01)
    benchmark.extra_info["bytes"] = 10 * 4 * n  # read 2 upstream, p, g, b, lr; write 4 grads
    benchmark(torch.ops.loft.sgd_step_backward, *upstream, *inputs, 0b10000, lr_elementwise)


@pytest.mark.parametrize("n", [10**6], ids=["n=1e6"])
def test_adam_step_forward_lr_elementwise(benchmark: Any, fused_ops: None, n: int) -> None:
    inputs = _adam_inputs(n)
    lr_elementwise = torch.full((n,), 1e-3)
    benchmark.extra_info["bytes"] = 8 * 4 * n  # read p, g, m, v, lr; write p', m', v'
    benchmark(torch.ops.loft.adam_step, *inputs, lr_elementwise)


@pytest.mark.parametrize("n", [10**6], ids=["n=1e6"])
def test_adam_step_backward_lr_elementwise(benchmark: Any, fused_ops: None, n: int) -> None:
    inputs = _adam_inputs(n)
    upstream = [torch.randn(n), torch.randn(n), torch.randn(n), torch.empty(0)]
    lr_elementwise = torch.full((n,), 1e-3)
    benchmark.extra_info["bytes"] = 13 * 4 * n  # read 3 upstream, p, g, m, v, lr; write 5
    benchmark(torch.ops.loft.adam_step_backward, *upstream, *inputs, 0b100000, lr_elementwise)
