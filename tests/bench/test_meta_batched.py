"""``python -m loft.bench --batched``: the loft-batched peer (the meta-batch as one
``innerloop_ctx(..., tasks=N)``), its settings, ratios, memory figure, report and CLI.
No timing is asserted; every in-process measurement is tiny (2 tasks, 1 or 2 steps)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import loft.bench.__main__ as bench_cli
from loft.bench.meta_measure import (
    BATCHED,
    implementation_supports,
    make_peer,
    measure_meta,
    meta_gradients,
    saved_bytes_per_step,
)
from loft.bench.meta_results import META_TARGETS, MetaSuiteResult, meta_ratios
from loft.bench.meta_suite import DEFAULT_PEERS, make_meta_jobs
from loft.bench.meta_workloads import (
    META_WORKLOADS,
    MetaWorkload,
    build_meta,
    sample_tasks,
    stack_tasks,
)

from ._cli import fake_meta_suite, subprocess_env

ROOT = Path(__file__).resolve().parents[2]
HAS_HIGHER = importlib.util.find_spec("higher") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the workloads: batched setting, stacking, per-task losses ------------------------


def test_batched_setting_is_omniglot_with_16_tasks() -> None:
    assert MetaWorkload("omniglot", "sgd", batched=True).num_tasks == 16
    assert MetaWorkload("omniglot", "sgd").num_tasks == 4
    assert MetaWorkload("sinusoid", "sgd", batched=True).num_tasks == 25
    assert MetaWorkload("omniglot", "sgd", tasks=2, batched=True).num_tasks == 2
    assert "16 tasks x 5 SGD steps" in META_WORKLOADS["omniglot"].describe(16)
    assert "4 tasks x 5 SGD steps" in META_WORKLOADS["omniglot"].description
    assert "override={'lr': lrs}" in META_WORKLOADS["meta-sgd"].description
    assert len(sample_tasks(MetaWorkload("omniglot", "sgd", batched=True), 0)) == 16


@pytest.mark.parametrize("name", ["sinusoid", "omniglot"])
def test_task_losses_are_each_tasks_loss(name: str) -> None:
    workload = MetaWorkload(name, "sgd", tasks=3)
    tasks = sample_tasks(workload, 0)
    stacked = stack_tasks(tasks)
    xq, yq = stacked.query
    assert xq.shape == (3, *tasks[0].query[0].shape) and yq.shape == (3, *tasks[0].query[1].shape)
    torch.manual_seed(0)
    out = torch.randn(3, xq.shape[1], 1 if name == "sinusoid" else 5)
    expected = torch.stack([workload.loss(out[i], yq[i]) for i in range(3)])
    torch.testing.assert_close(workload.task_losses(out, yq), expected)


def test_loft_batched_runs_the_maml_workloads_with_sgd() -> None:
    supported = {(name, optimizer) for name, spec in META_WORKLOADS.items()
                 for optimizer in spec.optimizers
                 if implementation_supports(BATCHED, MetaWorkload(name, optimizer))}
    assert supported == {("sinusoid", "sgd"), ("omniglot", "sgd")}
    assert BATCHED not in DEFAULT_PEERS


# ---- the peer: the sequential loft peer's numbers -------------------------------------


def _query_losses(implementation: str, workload: MetaWorkload) -> torch.Tensor:
    """Each task's query loss after the inner steps (no meta-backward)."""
    peer = make_peer(implementation, build_meta(workload))
    losses = []
    for task in peer.group(sample_tasks(workload, 0)):
        peer.begin()
        for _ in range(workload.num_steps):
            peer.step(*task.support)
        losses.append(peer.query_loss(*task.query).detach().reshape(-1))
        peer.end()
    return torch.cat(losses)


@pytest.mark.parametrize("name", ["sinusoid", "omniglot"])
def test_batched_peer_gives_the_sequential_query_losses(name: str) -> None:
    """2 tasks x 1 step (float32): loft-batched's [N] query losses are the sequential loft
    peer's, task by task."""
    workload = MetaWorkload(name, "sgd", tasks=2, steps=1)
    batched = _query_losses(BATCHED, workload)
    assert batched.shape == (2,)
    torch.testing.assert_close(batched, _query_losses("loft", workload), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sinusoid", "omniglot"])
def test_batched_peer_gives_the_sequential_meta_gradients_in_float64(name: str) -> None:
    """2 tasks x 2 steps in float64: the same meta-gradients as the sequential loft peer.
    (In float32 the Omniglot network's meta-gradient is ill-conditioned: the sequential
    peers differ from the float64 value by a few percent, so float64 is compared.)"""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        workload = MetaWorkload(name, "sgd", tasks=2, steps=2)
        reference = meta_gradients(workload, "loft")
        grads = meta_gradients(workload, BATCHED)
    finally:
        torch.set_default_dtype(dtype)
    assert reference[0].dtype == torch.float64
    for k, (g, r) in enumerate(zip(grads, reference)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12,
                                   msg=lambda m, k=k: f"{name}, tensor {k}: {m}")


def test_saved_bytes_per_step_and_the_measurement() -> None:
    """The worker records one inner step's saved bytes, batched and of one task, and
    their ratio batched / (N x one task's)."""
    workload = MetaWorkload("sinusoid", "sgd", tasks=2, steps=1)
    built = build_meta(workload)
    one = saved_bytes_per_step(make_peer("loft", built), sample_tasks(workload, 0)[0])
    assert one > 0
    result = measure_meta(workload, BATCHED, repeats=1, time_budget_s=None)
    assert result["implementation"] == BATCHED and result["loft_backend"]
    assert result["saved_bytes_per_step_one_task"] == one
    assert result["saved_bytes_per_step"] >= one
    assert result["saved_bytes_ratio"] == pytest.approx(result["saved_bytes_per_step"] /
                                                        (2 * one))
    assert result["meta_grad_finite"] and result["iteration_s"] > 0


# ---- the suite's jobs ----------------------------------------------------------------


def test_batched_jobs() -> None:
    jobs = make_meta_jobs(list(META_WORKLOADS), None, ["loft", "higher"], batched=True)
    labels = [job.label for job in jobs]
    assert [label for label in labels if label.endswith(BATCHED)] == [
        "sinusoid/sgd/loft-batched", "omniglot/sgd/loft-batched"]
    assert all(job.workload.batched for job in jobs)
    omniglot = {job.implementation: job.workload.num_tasks for job in jobs
                if job.workload.name == "omniglot"}
    assert omniglot == {"loft": 16, "higher": 16, BATCHED: 16, "floor": 16}
    plain = make_meta_jobs(list(META_WORKLOADS), None, ["loft", "higher"])
    assert not any(job.implementation == BATCHED or job.workload.batched for job in plain)


# ---- ratios, report, targets ----------------------------------------------------------


def _record(name: str, optimizer: str, impl: str, t: float, tasks: int) -> dict[str, Any]:
    record: dict[str, Any] = {
        "workload": MetaWorkload(name, optimizer, batched=True).to_dict(),
        "implementation": impl, "round": 0, "tasks": tasks, "iteration_s": t,
        "iteration_s_min": t, "inner_s": t / 2, "inner_s_min": t / 2,
        "meta_backward_s": t / 4, "meta_backward_s_min": t / 4}
    if impl == BATCHED:
        record.update(saved_bytes_per_step=25_100, saved_bytes_per_step_one_task=1000,
                      saved_bytes_ratio=25_100 / (tasks * 1000))
    return record


def _batched_result() -> MetaSuiteResult:
    """sinusoid (25 tasks): loft 100 ms, higher 120 ms, loft-batched 10 ms, floor 60 ms;
    omniglot (16 tasks): loft 1000 ms, higher 1200 ms, loft-batched 1000 ms."""
    records = [_record("sinusoid", "sgd", "loft", 0.100, 25),
               _record("sinusoid", "sgd", "higher", 0.120, 25),
               _record("sinusoid", "sgd", BATCHED, 0.010, 25),
               _record("sinusoid", "none", "floor", 0.060, 25),
               _record("omniglot", "sgd", "loft", 1.0, 16),
               _record("omniglot", "sgd", "higher", 1.2, 16),
               _record("omniglot", "sgd", BATCHED, 1.0, 16)]
    meta = {"threads": 1, "device": "cpu", "torch": "x", "rounds": 1, "repeats": 5,
            "implementations": ["loft", "higher", BATCHED], "notes": [], "batched": True}
    return MetaSuiteResult(meta, records)


def test_batched_ratios_are_kept_apart_from_lofts() -> None:
    result = _batched_result()
    assert all(r["implementation"] == "loft" for r in result.ratios)
    assert not any(r["versus"] == BATCHED for r in result.ratios)
    ratios = {(r["workload"], r["metric"], r["versus"]): r["value"]
              for r in meta_ratios(result.records, BATCHED)}
    assert ratios[("sinusoid", "iteration_s", "loft")] == pytest.approx(10.0)
    assert ratios[("sinusoid", "iteration_s", "higher")] == pytest.approx(12.0)
    assert ratios[("omniglot", "iteration_s", "higher")] == pytest.approx(1.2)
    assert ("sinusoid", "iteration_s", "floor") not in ratios
    data = result.to_json(check=True)
    assert data["batched_ratios"] == result.batched_ratios
    assert "batched_ratios" not in MetaSuiteResult(result.meta, result.records[:2]).to_json()


def test_batched_report_and_targets() -> None:
    result = _batched_result()
    text = result.table()
    assert "loft-batched (--batched)" in text
    assert "omniglot, SGD inner loop: MAML Omniglot 5-way 5-shot" in text
    assert "16 tasks x 5 SGD steps" in " ".join(text.split())  # wrapped at 100 columns
    assert "loft-batched, meta-iteration: 10.00x faster than loft; 12.00x faster than " \
           "higher" in text
    assert "loft-batched, saved bytes per inner step: 25.1 kB for 25 tasks; 1.004x 25 x " \
           "one task's 1 kB" in text
    assert "target" not in text.lower()
    rows = {(r["workload"], r["target"]): r for r in result.check_rows()}
    assert rows[("sinusoid", "batched: speed-up vs higher, meta-iteration")]["met"] is True
    assert rows[("sinusoid", "batched: speed-up vs loft, meta-iteration")]["met"] is True
    omniglot = rows[("omniglot", "batched: speed-up vs higher, meta-iteration")]
    assert omniglot["value"] == pytest.approx(1.2) and omniglot["met"] is False
    memory = rows[("sinusoid", "batched saved bytes/step / (N x 1 task's)")]
    assert memory["value"] == pytest.approx(1.004) and memory["met"] is False
    assert rows[("omniglot", "batched saved bytes/step / (N x 1 task's)")]["met"] is False
    batched_targets = [t for t in META_TARGETS if t.implementation == BATCHED]
    assert len(batched_targets) == 5
    assert sum(1 for r in rows.values() if r["target"].startswith("batched")) == 5
    assert "batched: speed-up vs loft" in result._check_table()


# ---- the CLI --------------------------------------------------------------------------


def test_batched_parses_to_the_maml_workloads(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    args = bench_cli.parse_args(["--batched"])
    assert bench_cli.selected_suites(args) == ["meta"]
    assert bench_cli.suite_implementations(args, "meta") == ["loft", "higher"]
    calls = fake_meta_suite(monkeypatch, _batched_result())
    assert bench_cli.main(["--batched", "--no-plot", "--out", str(tmp_path)]) == 0
    assert (list(calls["workloads"]), list(calls["optimizers"])) == \
        (["sinusoid", "omniglot"], ["sgd"])
    assert calls["implementations"] == ["loft", "higher"] and calls["batched"] is True
    assert bench_cli.main(["--batched", "--workloads", "omniglot", "--optimizers", "sgd",
                           "adam", "--implementations", "loft", "--no-plot", "--out",
                           str(tmp_path)]) == 0
    assert (calls["workloads"], calls["optimizers"], calls["implementations"]) == \
        (["omniglot"], ["sgd", "adam"], ["loft"])
    bench_cli.main(["--quick", "--no-plot", "--out", str(tmp_path)])
    assert calls["batched"] is False


@pytest.mark.parametrize("argv,message", [
    (["--long", "--batched"], "--batched does not apply to --long"),
    (["--batched", "--models", "A"], "--batched measures the real workloads only"),
    (["--batched", "--device", "cuda"], "run on cpu only"),
])
def test_batched_bad_arguments(argv: list[str], message: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_batched_end_to_end(tmp_path: Path) -> None:
    """``python -m loft.bench --batched --workloads sinusoid --implementations loft``, one
    round of one meta-iteration: loft-batched runs in its own process with loft's fused
    backend, and the report, the JSON and the plot are written."""
    pytest.importorskip("matplotlib")
    env = subprocess_env()
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "loft.bench", "--batched", "--workloads", "sinusoid",
           "--implementations", "loft", "--no-floor", "--repeats", "1", "--rounds", "1",
           "--no-progress", "--check", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loft-batched, meta-iteration:" in proc.stdout, proc.stdout
    assert "loft-batched, saved bytes per inner step:" in proc.stdout
    assert "batched: speed-up vs loft, meta-iteration" in proc.stdout
    assert (out / "meta.png").stat().st_size > 0
    data = json.loads((out / "meta.json").read_text())
    assert not [r for r in data["records"] if "error" in r], data["records"]
    assert {r["implementation"] for r in data["records"]} == {"loft", BATCHED}
    batched = next(r for r in data["records"] if r["implementation"] == BATCHED)
    assert batched["loft_backend"] == "fused" and batched["tasks"] == 25
    assert batched["workload"]["batched"] is True and batched["saved_bytes_ratio"] > 0
    assert data["meta"]["batched"] is True and data["batched_ratios"]
