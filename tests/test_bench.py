"""The benchmark harness runs end to end (``python -m loft.bench``); no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cli_writes_table_json_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(ROOT / "python"), env.get("PYTHONPATH", "")] if p)
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "loft.bench", "--quick", "--models", "A", "--optimizers",
           "adam", "--steps", "2", "--repeats", "1", "--implementations", "loft",
           "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "inner ms" in proc.stdout and "meta-bwd ms" in proc.stdout, proc.stdout
    assert "floor" in proc.stdout, proc.stdout
    assert (out / "results.png").stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    assert {r["implementation"] for r in data["records"]} == {"loft", "floor"}
    assert not [r for r in data["records"] if "error" in r], data["records"]
    loft_record = next(r for r in data["records"] if r["implementation"] == "loft")
    for key in ("inner_s", "meta_backward_s", "saved_bytes", "peak_mem_growth_bytes",
                "nodes_per_step"):
        assert loft_record[key] is not None and loft_record[key] >= 0, key
    assert data["meta"]["threads"] == 1
    assert "--quick" in data["meta"]["command"]
