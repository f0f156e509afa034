"""The benchmark harness runs end to end (``python -m loft.bench``); no timing is asserted."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, NoReturn

import pytest

import loft.bench.__main__ as bench_cli
import loft.bench.long as bench_long
import loft.bench.plotting as bench_plotting
from loft.bench.long import LongResult
from loft.bench.plotting import PlotError
from loft.bench.suite import SuiteResult

from ._cli import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def test_bench_cli_writes_table_json_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    env = subprocess_env()
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
    env = subprocess_env()
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


# ---- optional dependencies and the plot: in this process, nothing measured ------------


def _no_measuring(*args: Any, **kwargs: Any) -> NoReturn:
    pytest.fail("the suite started measuring")


def _suite_result() -> SuiteResult:
    """A made-up result of one loft measurement and one failed one (no worker runs)."""
    meta = {"threads": 1, "device": "cpu", "torch": "x", "command": "python -m loft.bench"}
    ok = {"workload": {"model": "A", "optimizer": "adam", "steps": 2}, "implementation": "loft",
          "inner_s": 0.01, "meta_backward_s": 0.02, "saved_bytes": 4000,
          "peak_mem_growth_bytes": 8000, "nodes_per_step": 3.0}
    failed = {"workload": {"model": "A", "optimizer": "adam", "steps": 2},
              "implementation": "per-tensor", "error": "worker exited with 1: boom"}
    return SuiteResult(meta, [ok, failed])


def _long_result() -> LongResult:
    """A made-up ``--long`` result: one record per mode at T = 20."""
    records = [{"mode": mode, "steps": 20, "repeat": 0, "inner_s": 0.1, "query_s": 0.01,
                "meta_backward_s": 0.2, "total_s": 0.31, "peak_rss_growth_bytes": 1e6}
               for mode in bench_long.LONG_MODES]
    return LongResult({"threads": 1, "torch": "x"}, records)


@pytest.mark.parametrize("argv,needed", [
    (["--quick"], ["higher", "matplotlib", "tqdm"]),
    (["--implementations", "loft,per-tensor", "--no-progress"], ["matplotlib"]),
    (["--implementations", "loft", "higher", "--no-plot", "--no-progress"], ["higher"]),
    (["--long", "--quick"], ["matplotlib", "tqdm"]),
    (["--long", "--no-plot", "--no-progress"], []),
])
def test_needed_modules_follow_the_options(argv: list[str], needed: list[str]) -> None:
    assert bench_cli.needed_modules(bench_cli.parse_args(argv)) == needed


@pytest.mark.parametrize("long", [False, True], ids=["suite", "long"])
def test_missing_dependencies_stop_before_measuring(
        long: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A missing higher or matplotlib (``sys.modules[name] = None`` makes its import fail)
    exits with status 2 and one message naming each and the install command, before any
    measurement and with no file written."""
    monkeypatch.setitem(sys.modules, "higher", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(bench_cli, "build_ops", _no_measuring)
    monkeypatch.setattr(bench_cli, "run_suite", _no_measuring)
    monkeypatch.setattr(bench_long, "run_long_suite", _no_measuring)
    out = tmp_path / "out"
    argv = ["--quick", "--no-progress", "--out", str(out)] + (["--long"] if long else [])
    assert bench_cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    first = captured.err.splitlines()[0]
    expected = "matplotlib" if long else "higher, matplotlib"
    assert first == f"loft.bench: missing optional dependencies: {expected}.", captured.err
    assert "pip install 'loft[bench]'" in captured.err
    assert "pip install '.[bench]'" in captured.err
    assert "--no-plot" in captured.err
    assert ("higher" in captured.err) is not long  # --long never measures higher
    assert not out.exists()


@pytest.mark.parametrize("implementations,builds", [
    (None, True), ("loft,higher", True), ("per-tensor,higher", False)])
def test_present_dependencies_let_the_suite_run(
        implementations: str | None, builds: bool, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With every needed module importable (stand-ins here), the fused ops are built here
    first when the run measures them (so a cold build reports on this terminal), then the
    suite runs and saves."""
    for name in ("higher", "matplotlib", "tqdm"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    calls: list[str] = []

    def fake_run_suite(**kwargs: Any) -> SuiteResult:
        calls.append(f"run {kwargs['implementations']}")
        return _suite_result()

    monkeypatch.setattr(bench_cli, "build_ops", lambda: calls.append("build"))
    monkeypatch.setattr(bench_cli, "run_suite", fake_run_suite)
    out = tmp_path / "out"
    argv = ["--quick", "--models", "A", "--no-plot", "--out", str(out)]
    if implementations is not None:
        argv += ["--implementations", implementations]
    assert bench_cli.main(argv) == 0
    expected_run = f"run {None if implementations is None else implementations.split(',')}"
    assert calls == (["build"] if builds else []) + [expected_run]
    assert (out / "results.json").is_file() and not (out / "results.png").exists()


def test_results_survive_a_failing_plot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The plot fails after writing half a PNG: the JSON and the table are kept whole, the
    partial PNG (and an earlier run's) is removed, the error names the saved files, and
    the exit status is 1."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.png").write_bytes(b"an earlier run's plot")

    def failing_plot(result: SuiteResult, path: Path) -> Path:
        Path(path).write_bytes(b"\x89PNG half")
        raise RuntimeError("no display")

    monkeypatch.setattr(bench_plotting, "plot_results", failing_plot)
    monkeypatch.setattr(bench_cli, "run_suite", lambda **kwargs: _suite_result())
    assert bench_cli.main(["--quick", "--models", "A", "--no-progress", "--implementations",
                           "loft", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "inner ms" in captured.out  # the table was printed
    assert "the plot failed (RuntimeError: no display)" in captured.err, captured.err
    assert str(out / "results.json") in captured.err
    data = json.loads((out / "results.json").read_text())
    assert data["records"] == _suite_result().records
    table = (out / "results.txt").read_text()
    assert "inner ms" in table and "worker exited with 1: boom" in table
    assert not (out / "results.png").exists()


def test_long_results_survive_a_missing_matplotlib(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real plot with matplotlib gone at plot time: :class:`PlotError` after the JSON
    and the table were written, naming both."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = _long_result()
    with pytest.raises(PlotError) as caught:
        result.save(tmp_path, plot=True)
    assert isinstance(caught.value.__cause__, ImportError)
    assert set(caught.value.paths) == {"json", "table"}
    assert str(tmp_path / "long.json") in str(caught.value)
    assert json.loads((tmp_path / "long.json").read_text())["records"] == result.records
    assert "peakRSS MB" in (tmp_path / "long.txt").read_text()
    assert not (tmp_path / "long.png").exists()


def _setup_list(name: str) -> list[str]:
    """The list literal assigned to ``name`` in setup.py (``*OTHER`` spliced in)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    lists = {node.targets[0].id: node.value for node in tree.body
             if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
             and isinstance(node.value, ast.List)}
    items: list[str] = []
    for element in lists[name].elts:
        if isinstance(element, ast.Starred):
            assert isinstance(element.value, ast.Name)
            items += _setup_list(element.value.id)
        else:
            items.append(ast.literal_eval(element))
    return items


def test_bench_extra_quick_start_and_ci_agree() -> None:
    """The bench extra holds every optional module the benchmark checks for (tqdm is a
    requirement of loft itself), the test extra includes it, and the README's Quick start
    is two commands: install with the bench extra and run the benchmark; install the test
    extra and run .ci/run's test command."""
    bench = _setup_list("BENCH_REQUIRES")
    names = {re.split(r"[=<>!~\[ ]", requirement)[0].lower() for requirement in bench}
    assert names == set(bench_cli.OPTIONAL_DEPENDENCIES) - {"tqdm"}, bench
    assert set(bench) <= set(_setup_list("TEST_REQUIRES"))
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    first, second = block.strip().splitlines()
    assert first == ("pip install torch==2.13.0 && pip install '.[bench]' && "
                     "python -m loft.bench --quick")
    ci = (ROOT / ".ci" / "run").read_text()
    (test_cmd,) = re.findall(r'^test_cmd="([^"]+)"', ci, flags=re.MULTILINE)
    assert second == f"pip install '.[test]' && {test_cmd}"
    assert re.search(r"^python3 -m pip install .*'\.\[test\]'$", ci, flags=re.MULTILINE), ci
