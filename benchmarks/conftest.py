"""pytest-benchmark suite settings (``python -m pytest benchmarks``; not part of ``tests``).

One intra-op thread by default (``LOFT_BENCH_THREADS`` overrides): on the 2-core
machines this project runs on, OpenMP barriers stall intermittently with 2 threads.
"""

from __future__ import annotations

import os

import pytest
import torch

THREADS = int(os.environ.get("LOFT_BENCH_THREADS", "1"))


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def fused_ops() -> None:
    """The fused ops are built and loaded (skips the op benchmarks otherwise)."""
    import loft

    if loft.backend() != "fused":
        pytest.skip(f"fused ops unavailable: {loft.backend_reason()}")
