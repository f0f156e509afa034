"""Malformed direct op calls raise ``RuntimeError`` naming the argument
(``_bad_op_args``), also under AddressSanitizer (``tools/asan_ops.py``); well-formed
calls at the edges match the reference (issue #7)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from loft import _ext, reference

from ..conftest import DEVICES
from . import _bad_op_args

F64 = dict(rtol=1e-12, atol=1e-12)


def _load_asan_ops() -> ModuleType:
    """``tools/asan_ops.py`` (a script, not a package module), loaded from its path."""
    path = Path(__file__).resolve().parents[2] / "tools" / "asan_ops.py"
    spec = importlib.util.spec_from_file_location("asan_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


asan_ops = _load_asan_ops()


# ---- direct op calls with malformed arguments --------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_malformed_op_calls_raise_naming_the_argument(device: str, fused: None) -> None:
    """Every case of ``_bad_op_args`` on the fused op and on the reference function."""
    calls = _bad_op_args.bad_calls(device)
    assert len(calls) > 150
    for call in calls:
        for fn in (getattr(torch.ops.loft, call.op), getattr(reference, call.op)):
            with pytest.raises(RuntimeError) as caught:
                fn(*call.args)
            first_line = str(caught.value).splitlines()[0]
            assert re.search(rf"\b(?:{call.expected})\b", first_line), \
                f"{call.op} [{call.name}]: {first_line}"


@pytest.mark.parametrize("device", DEVICES)
def test_edge_calls_match_the_reference(device: str, fused: None) -> None:
    """Empty buckets, empty and inactive segments, sizes around the vector widths."""
    for name, (op, args) in _bad_op_args.good_calls(device):
        for a, b in zip(getattr(torch.ops.loft, op)(*args), getattr(reference, op)(*args)):
            torch.testing.assert_close(a, b, **F64, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_malformed_op_calls_under_address_sanitizer() -> None:
    """``asan_ops.py`` under AddressSanitizer: every check passes and ASan reports
    nothing; a deliberate overflow (``--canary``) is reported, so the sanitizer is live.
    Without an ASan runtime the same checks run unsanitised."""
    script = str(Path(asan_ops.__file__).resolve())
    tool = "asan" if asan_ops.asan_preload() else "none"
    cache = str(_ext._cache_root())  # the instrumented build has its own key there

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, "--tool", tool, "--cache", cache,
                               *extra], capture_output=True, text=True, timeout=900)

    out = run()
    report = out.stdout + out.stderr[-4000:]
    assert out.returncode == 0, report
    assert re.search(r"asan_ops: 1\d\d malformed calls, \d+ edge calls, 0 failures", out.stdout)
    assert "AddressSanitizer" not in out.stderr, report
    if tool == "asan":
        assert f"sanitizer live: {tool}" in out.stdout, report
        canary = run("--canary")
        assert canary.returncode == asan_ops.TOOL_ERROR_EXIT, canary.stdout + canary.stderr[-4000:]
        assert "AddressSanitizer: heap-buffer-overflow" in canary.stderr
