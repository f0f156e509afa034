"""The batched-task tests run tiny float64 ops, each on one intra-op thread (the shared
``one_thread`` fixture)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test of this folder runs with ``one_thread``."""
