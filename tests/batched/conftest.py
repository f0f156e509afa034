"""The batched-task tests run tiny float64 ops: one intra-op thread is an order of
magnitude faster for them than a contended pool (and gives the same numbers)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """torch.set_num_threads(1) for each test of this folder, restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
