"""Running ``python -m loft.bench``'s ``main`` in a test without running a suite."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from loft.bench import __main__ as bench_cli
from loft.bench.meta_results import MetaSuiteResult


def fake_meta_suite(monkeypatch: pytest.MonkeyPatch, result: MetaSuiteResult) -> dict[str, Any]:
    """Make ``main`` return ``result`` from the real-workload suite (the A/B/C suite fails
    the test if it runs; no build, no higher, matplotlib or tqdm needed); returns the dict
    that receives the suite's keyword arguments."""
    calls: dict[str, Any] = {}

    def fake(**kwargs: Any) -> MetaSuiteResult:
        calls.update(kwargs)
        return result

    monkeypatch.setattr(bench_cli, "run_meta_suite", fake)
    monkeypatch.setattr(bench_cli, "run_suite", lambda **kw: pytest.fail("ran A/B/C"))
    monkeypatch.setattr(bench_cli, "build_ops", lambda: None)
    for name in ("higher", "matplotlib", "tqdm"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    return calls
