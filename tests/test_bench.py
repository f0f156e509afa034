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


def test_bench_long_quick_writes_all_modes_and_plot(tmp_path: Path) -> None:
    """``--long --quick``: one fresh process per (mode, T), all four modes in the JSON."""
    pytest.importorskip("matplotlib")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(ROOT / "python"), env.get("PYTHONPATH", "")] if p)
    out = tmp_path / "long"
    cmd = [sys.executable, "-m", "loft.bench", "--long", "--quick", "--no-progress",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "long.png").stat().st_size > 0
    assert "peakRSS MB" in (out / "long.txt").read_text()
    data = json.loads((out / "long.json").read_text())
    assert not [r for r in data["records"] if "error" in r], data["records"]
    modes = {"full", "checkpoint", "truncate", "first_order"}
    assert {r["mode"] for r in data["records"]} == modes
    assert {row["mode"] for row in data["summary"]} == modes
    for r in data["records"]:
        for key in ("inner_s", "meta_backward_s", "total_s", "peak_rss_growth_bytes"):
            assert r[key] is not None and r[key] >= 0, (r["mode"], key)
    assert len({r["pid"] for r in data["records"]}) == len(data["records"])  # fresh processes
    assert data["meta"]["suite"] == "long" and data["meta"]["threads"] == 1
    assert set(data["ratios"]) == {str(t) for t in data["meta"]["steps"]}


def test_fork_server_runs_each_measurement_in_a_fresh_process() -> None:
    """The suite's launcher forks one child per measurement from a server that imported
    torch once: a new pid each time, the backend each spec asks for, and a failing
    measurement comes back as an error with the child's traceback."""
    from loft.bench.suite import ForkServer, _worker_env

    spec = {"suite": "long", "mode": "first_order", "steps": 2, "threads": 1}
    with ForkServer(1) as server:
        assert server._proc is not None, "the fork server did not start"
        fused = server.run(spec, _worker_env("loft", 1), 300)
        reference = server.run(spec, _worker_env("loft-reference", 1), 300)
        bad = server.run({**spec, "mode": "sideways"}, _worker_env("loft", 1), 300)
        server_pid = server._proc.pid
    assert "error" not in fused and "error" not in reference, (fused, reference)
    assert fused["loft_backend"] == "fused" and reference["loft_backend"] == "reference"
    assert len({fused["pid"], reference["pid"], server_pid, os.getpid()}) == 4
    assert "error" in bad and "mode must be one of" in bad["error"], bad
