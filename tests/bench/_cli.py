"""Running ``python -m loft.bench`` in tests: its ``main`` without running a suite, or
the real command in a subprocess."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
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


def subprocess_env() -> dict[str, str]:
    """This process's environment with the repository's ``python/`` first on
    ``PYTHONPATH``, for ``python -m loft.bench`` in a subprocess."""
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(root / "python"), env.get("PYTHONPATH", "")] if p)
    return env
