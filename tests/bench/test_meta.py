"""The real-workload benchmark: workloads, peers, ratios, report, CLI. No timing is
asserted (the machines are shared and noisy); every measurement
here is tiny (2 tasks, 1 inner step) unless said otherwise."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import loft.bench.__main__ as bench_cli
import loft.bench.meta_suite as meta_suite
from loft.bench.measure import measure
from loft.bench.meta_measure import (
    CONTEXT_IMPLEMENTATIONS,
    META_IMPLEMENTATIONS,
    implementation_supports,
    measure_meta,
    meta_gradients,
)
from loft.bench.meta_results import (
    META_TARGETS,
    MetaSuiteResult,
    meta_ratios,
    speedup_text,
    summarize_meta,
)
from loft.bench.meta_suite import MetaJob, make_meta_jobs, round_order, run_meta_suite
from loft.bench.meta_workloads import (
    META_WORKLOADS,
    MetaWorkload,
    build_meta,
    omniglot_net,
    sample_tasks,
    sine_mlp,
)
from loft.bench.suite import SuiteResult
from loft.bench.workloads import Workload

from ._cli import fake_meta_suite, subprocess_env

ROOT = Path(__file__).resolve().parents[2]
HAS_TORCHOPT = importlib.util.find_spec("torchopt") is not None
HAS_HIGHER = importlib.util.find_spec("higher") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


def _available(implementation: str) -> bool:
    return {"higher": HAS_HIGHER, "torchopt": HAS_TORCHOPT}.get(implementation, True)


# ---- the workloads --------------------------------------------------------------------


def test_sine_mlp_has_1761_parameters() -> None:
    shapes = [tuple(p.shape) for p in sine_mlp().parameters()]
    assert shapes == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    assert sum(p.numel() for p in sine_mlp().parameters()) == 1761


def test_omniglot_net_sizes() -> None:
    """higher's MAML-Omniglot network: three 3x3 convolutions of 64 channels with
    BatchNorm(64, momentum=1, affine), 28 -> 1 pixel, then Linear(64, 5)."""
    net = omniglot_net()
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(64, 1, 3, 3), (64,), (64,), (64,),
                      (64, 64, 3, 3), (64,), (64,), (64,),
                      (64, 64, 3, 3), (64,), (64,), (64,), (5, 64), (5,)]
    assert sum(p.numel() for p in net.parameters()) == 75205
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 3 and all(m.momentum == 1 and m.affine for m in norms)
    assert net(torch.rand(7, 1, 28, 28)).shape == (7, 5)


def test_tasks_are_the_published_settings_and_deterministic() -> None:
    sine = sample_tasks(MetaWorkload("sinusoid", "sgd"), 3)
    assert len(sine) == 25
    for task in sine:
        (xs, ys), (xq, yq) = task.support, task.query
        assert xs.shape == ys.shape == xq.shape == yq.shape == (10, 1)
        assert xs.abs().max() <= 5 and ys.abs().max() <= 5
    again = sample_tasks(MetaWorkload("sinusoid", "adam"), 3)  # same data, any peer
    assert all(torch.equal(a.support[1], b.support[1]) for a, b in zip(sine, again))
    other = sample_tasks(MetaWorkload("sinusoid", "sgd"), 4)
    assert not torch.equal(sine[0].support[0], other[0].support[0])

    omniglot = sample_tasks(MetaWorkload("omniglot", "sgd"), 0)
    assert len(omniglot) == 4
    (xs, ys), (xq, yq) = omniglot[0].support, omniglot[0].query
    assert xs.shape == (25, 1, 28, 28) and xq.shape == (75, 1, 28, 28)
    assert torch.bincount(ys).tolist() == [5] * 5 and torch.bincount(yq).tolist() == [15] * 5


def test_build_meta_optimisers() -> None:
    sgd = build_meta(MetaWorkload("sinusoid", "sgd"))
    assert isinstance(sgd.inner_optimizer, torch.optim.SGD) and sgd.lrs is None
    assert sgd.inner_optimizer.param_groups[0]["lr"] == 0.01
    adam = build_meta(MetaWorkload("sinusoid", "adam"))
    assert isinstance(adam.inner_optimizer, torch.optim.Adam)
    assert adam.inner_optimizer.param_groups[0]["lr"] == 0.01
    assert isinstance(adam.meta_optimizer, torch.optim.Adam)
    assert adam.meta_optimizer.param_groups[0]["lr"] == 1e-3
    meta_sgd = build_meta(MetaWorkload("meta-sgd", "sgd"))
    params = list(meta_sgd.model.parameters())
    assert len(meta_sgd.inner_optimizer.param_groups) == len(params) == 6
    assert meta_sgd.lrs is not None
    assert [lr.shape for lr in meta_sgd.lrs] == [p.shape for p in params]
    assert all(lr.requires_grad and torch.all(lr == 0.01) for lr in meta_sgd.lrs)
    meta_params = meta_sgd.meta_optimizer.param_groups[0]["params"]
    assert len(meta_params) == 12  # the weights and the learned lrs
    omniglot = build_meta(MetaWorkload("omniglot", "sgd"))
    assert omniglot.inner_optimizer.param_groups[0]["lr"] == 0.1 and omniglot.model.training


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "sine", "optimizer": "sgd"}, "MetaWorkload.name must be one of"),
    ({"name": "omniglot", "optimizer": "adam"}, "MetaWorkload.optimizer of 'omniglot'"),
    ({"name": "sinusoid", "optimizer": "sgd", "tasks": 0}, "MetaWorkload.tasks must be >= 1"),
])
def test_bad_workloads_name_the_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetaWorkload(**kwargs)


# ---- the peers: the same meta-gradients -----------------------------------------------


def _assert_same(grads: list[torch.Tensor], reference: list[torch.Tensor], what: str) -> None:
    scale = max(float(g.abs().max()) for g in reference)
    for k, (g, r) in enumerate(zip(grads, reference)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, k=k: f"{what}, tensor {k}: {m}")


@pytest.mark.parametrize("name", ["sinusoid", "omniglot", "meta-sgd"])
@pytest.mark.parametrize("implementation", ["higher", "torchopt", "functional_call"])
def test_sgd_peers_give_loft_meta_gradients(name: str, implementation: str) -> None:
    """Plain SGD: loft, higher, torchopt and the functional_call loop compute the same
    meta-gradients (weights; for Meta-SGD also the learned lrs) on 2 tasks x 2 steps."""
    workload = MetaWorkload(name, "sgd", tasks=2, steps=2)
    if not _available(implementation):
        pytest.skip(f"{implementation} is not installed")
    if not implementation_supports(implementation, workload):
        pytest.skip(f"{implementation} does not run {name} (torchopt: no per-element lr)")
    reference = meta_gradients(workload, "loft")
    assert any(float(g.abs().max()) > 0 for g in reference)
    _assert_same(meta_gradients(workload, implementation), reference,
                 f"{implementation} vs loft on {name}")


def test_adam_peers_meta_gradients() -> None:
    """Adam: the functional_call loop (torch.optim's formula, as loft) gives loft's
    meta-gradients; torchopt (MetaAdam with a 1e-16 eps_root inside the square root) the
    same to a few percent. higher 0.2.1 adds eps outside sqrt(v)/sqrt(1 - beta2^t)
    differently, and these meta-gradients are dominated by eps where |g| is tiny, so
    only finiteness is asked of it."""
    workload = MetaWorkload("sinusoid", "adam", tasks=2, steps=2)
    reference = meta_gradients(workload, "loft")
    _assert_same(meta_gradients(workload, "functional_call"), reference,
                 "functional_call vs loft, Adam")
    flat_reference = torch.cat([g.flatten() for g in reference])
    if HAS_TORCHOPT:
        flat = torch.cat([g.flatten() for g in meta_gradients(workload, "torchopt")])
        assert torch.isfinite(flat).all()
        assert float((flat - flat_reference).norm() / flat_reference.norm()) < 0.1
    if HAS_HIGHER:
        assert all(torch.isfinite(g).all() for g in meta_gradients(workload, "higher"))


def test_floor_meta_backward_includes_the_hessian_vector_products() -> None:
    """The floor's meta-backward also backpropagates each step's gradients: its
    meta-gradient differs from the query loss's alone."""
    workload = MetaWorkload("sinusoid", "none", tasks=2, steps=2)
    floor = meta_gradients(workload, "floor")
    plain = meta_gradients(MetaWorkload("sinusoid", "sgd", tasks=2, steps=2),
                           "functional_call")
    assert all(torch.isfinite(g).all() for g in floor)
    assert any(not torch.allclose(f, p) for f, p in zip(floor, plain))


def _jobs_of(implementation: str) -> list[MetaWorkload]:
    out = []
    for name, spec in META_WORKLOADS.items():
        for optimizer in spec.optimizers:
            opt = "none" if implementation == "floor" else optimizer
            workload = MetaWorkload(name, opt, tasks=2, steps=1)
            if implementation_supports(implementation, workload) and workload not in out:
                out.append(workload)
    return out


@pytest.mark.parametrize("implementation", META_IMPLEMENTATIONS)
def test_every_implementation_runs_a_tiny_meta_iteration(implementation: str) -> None:
    if not _available(implementation):
        pytest.skip(f"{implementation} is not installed")
    for workload in _jobs_of(implementation):
        result = measure_meta(workload, implementation, repeats=1, time_budget_s=None)
        assert result["implementation"] == implementation
        if workload.spec.kind == "context":
            assert implementation in CONTEXT_IMPLEMENTATIONS
            assert result["entry_s"] > 0 and result["entries_per_repeat"] > 0
            continue
        for key in ("iteration_s", "inner_s", "meta_backward_s"):
            assert result[key] > 0 and result[key + "_min"] <= result[key], key
        assert result["iteration_s"] >= result["inner_s"] + result["meta_backward_s"]
        assert result["meta_grad_finite"], (workload, result)
        if implementation == "torchopt":
            assert result["torchopt_backend"].startswith("pure-PyTorch")


def test_measure_meta_refuses_mismatched_floor() -> None:
    with pytest.raises(ValueError, match="the floor and only the floor"):
        measure_meta(MetaWorkload("sinusoid", "sgd", tasks=1, steps=1), "floor")
    with pytest.raises(ValueError, match="does not run workload 'meta-sgd'"):
        measure_meta(MetaWorkload("meta-sgd", "sgd", tasks=1, steps=1), "torchopt")


@pytest.mark.skipif(not HAS_TORCHOPT, reason="torchopt is not installed")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_torchopt_in_the_model_suite(optimizer: str) -> None:
    """torchopt as an implementation of the A/B/C suite: measured like the others, with
    its backend recorded; its meta-gradient with SGD-momentum is loft's."""
    result = measure(Workload("A", optimizer, 3), "torchopt", repeats=1, time_budget_s=None)
    assert result["inner_s"] > 0 and result["meta_backward_s"] > 0
    assert result["saved_bytes"] > 0 and result["nodes_per_step"] is not None
    assert result["torchopt_backend"].startswith("pure-PyTorch")
    if optimizer == "sgd":
        from loft.bench.measure import make_runner
        from loft.bench.workloads import build

        grads = {}
        for impl in ("loft", "torchopt"):
            built = build(Workload("A", "sgd", 3))
            runner = make_runner(impl, built)
            runner.setup()
            for _ in range(3):
                runner.step()
            runner.query_loss().backward()
            runner.teardown()
            grads[impl] = [p.grad.clone() for p in built.model.parameters()]
        _assert_same(grads["torchopt"], grads["loft"], "torchopt vs loft, A-SGD momentum")


# ---- the suite: jobs and rounds -------------------------------------------------------


def test_jobs_cover_what_each_peer_runs() -> None:
    jobs = make_meta_jobs(list(META_WORKLOADS), None, ["loft", "higher", "torchopt",
                                                     "functional_call"])
    labels = {job.label for job in jobs}
    assert "meta-sgd/sgd/torchopt" not in labels and "context/sgd/torchopt" not in labels
    assert "context/sgd/functional_call" not in labels
    assert {"sinusoid/adam/torchopt", "context/sgd/higher", "meta-sgd/none/floor",
            "context/none/floor", "omniglot/none/floor"} <= labels
    assert sum(1 for job in jobs if job.implementation == "floor") == 4
    adam_only = make_meta_jobs(list(META_WORKLOADS), ["adam"], ["loft"], floor=False)
    assert [job.label for job in adam_only] == ["sinusoid/adam/loft"]


def test_rounds_rotate_the_implementations() -> None:
    jobs = make_meta_jobs(["sinusoid", "context"], None, ["loft", "higher"])
    orders = [round_order(jobs, k) for k in range(3)]
    for order in orders:
        assert sorted(order, key=str) == sorted(jobs, key=str)  # every job once per round
    firsts = [order[0].implementation for order in orders]
    assert firsts == ["loft", "higher", "floor"]
    # each workload's jobs stay together, in report order
    assert [job.workload.name for job in orders[1]][:5] == ["sinusoid"] * 5


class _FakeLauncher:
    """Stands in for the fork server: records the specs, answers made-up times."""

    specs: list[dict[str, Any]] = []

    def __init__(self, threads: int) -> None:
        pass

    def __enter__(self) -> _FakeLauncher:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def run(self, spec: dict[str, Any], env: dict[str, str], timeout: Any) -> dict[str, Any]:
        _FakeLauncher.specs.append(spec)
        times = {"loft": 0.010, "higher": 0.030, "torchopt": 0.020,
                 "functional_call": 0.015, "floor": 0.008}
        t = times[spec["implementation"]]
        record = {"workload": spec["workload"], "implementation": spec["implementation"]}
        if spec["workload"]["name"] == "context":
            return {**record, "entry_s": t / 100, "entry_s_min": t / 100}
        return {**record, "iteration_s": t, "iteration_s_min": t, "inner_s": t / 2,
                "inner_s_min": t / 2, "meta_backward_s": t / 4, "meta_backward_s_min": t / 4}


def test_missing_torchopt_is_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchopt absent (its import made to fail): the default peers leave it out with a
    note, the suite runs the others; asked for by name, it is an error."""
    monkeypatch.setitem(sys.modules, "torchopt", None)
    monkeypatch.setattr(meta_suite, "ForkServer", _FakeLauncher)
    _FakeLauncher.specs = []
    result = run_meta_suite(workloads=["sinusoid"], rounds=2, progress=False)
    impls = {spec["implementation"] for spec in _FakeLauncher.specs}
    assert impls == {"loft", "functional_call", "floor"} | ({"higher"} if HAS_HIGHER else set())
    assert any("torchopt is not installed" in note for note in result.meta["notes"])
    assert "note: torchopt is not installed" in result.table()
    assert {r["round"] for r in result.records} == {0, 1}
    with pytest.raises(ValueError, match="not installed: torchopt"):
        run_meta_suite(workloads=["sinusoid"], implementations=["loft", "torchopt"],
                       progress=False)


# ---- ratios, report, targets ----------------------------------------------------------


def _record(name: str, optimizer: str, impl: str, round_index: int, t: float) -> dict[str, Any]:
    record: dict[str, Any] = {"workload": MetaWorkload(name, optimizer).to_dict(),
                              "implementation": impl, "round": round_index}
    if name == "context":
        return {**record, "entry_s": t, "entry_s_min": t * 0.9}
    return {**record, "iteration_s": t, "iteration_s_min": t * 0.9, "inner_s": t / 2,
            "inner_s_min": t / 2, "meta_backward_s": t / 4, "meta_backward_s_min": t / 4}


def _synthetic() -> MetaSuiteResult:
    """Three rounds; loft 10, 12, 11 ms; higher 30, 20, 40 ms; torchopt 9 ms each round
    (loft slower); floor 8 ms; context entry: loft 0.2 ms, higher 1 ms, clone 0.05 ms."""
    records = []
    for k, (loft, higher) in enumerate([(0.010, 0.030), (0.012, 0.020), (0.011, 0.040)]):
        records += [_record("sinusoid", "sgd", "loft", k, loft),
                    _record("sinusoid", "sgd", "higher", k, higher),
                    _record("sinusoid", "sgd", "torchopt", k, 0.009),
                    _record("sinusoid", "none", "floor", k, 0.008),
                    _record("context", "sgd", "loft", k, 0.0002),
                    _record("context", "sgd", "higher", k, 0.001),
                    _record("context", "none", "floor", k, 0.00005)]
    records.append({"workload": MetaWorkload("sinusoid", "sgd").to_dict(),
                    "implementation": "functional_call", "round": 0,
                    "error": "worker exited with 1: boom"})
    meta = {"threads": 1, "device": "cpu", "torch": "x", "rounds": 3, "repeats": 5,
            "implementations": ["loft", "higher", "torchopt"], "notes": []}
    return MetaSuiteResult(meta, records)


def test_summary_is_the_median_over_rounds_with_its_spread() -> None:
    rows = {(r["workload"], r["optimizer"], r["implementation"]): r
            for r in summarize_meta(_synthetic().records)}
    loft = rows[("sinusoid", "sgd", "loft")]
    assert loft["rounds"] == 3
    assert loft["iteration_s"] == pytest.approx(0.011)
    assert loft["iteration_s_spread"] == pytest.approx([0.010, 0.012])
    assert loft["iteration_s_best"] == pytest.approx(0.009)
    assert loft["inner_s"] == pytest.approx(0.0055)
    assert ("sinusoid", "sgd", "functional_call") not in rows  # only an error
    assert rows[("context", "none", "floor")]["entry_s"] == pytest.approx(0.00005)


def test_ratios_are_peer_over_loft_and_loft_over_floor() -> None:
    ratios = {(r["workload"], r["metric"], r["versus"]): r for r in
              meta_ratios(_synthetic().records)}
    higher = ratios[("sinusoid", "iteration_s", "higher")]
    assert higher["kind"] == "speedup" and higher["value"] == pytest.approx(0.030 / 0.011)
    assert higher["rounds"] == pytest.approx([3.0, 20 / 12, 40 / 11])
    assert ratios[("sinusoid", "inner_s", "torchopt")]["value"] == pytest.approx(9 / 11)
    floor = ratios[("sinusoid", "meta_backward_s", "floor")]
    assert floor["kind"] == "over_floor" and floor["value"] == pytest.approx(11 / 8)
    assert ratios[("context", "entry_s", "higher")]["value"] == pytest.approx(5.0)
    assert ratios[("context", "entry_s", "floor")]["value"] == pytest.approx(4.0)
    assert ("sinusoid", "iteration_s", "functional_call") not in ratios


def test_speedup_text() -> None:
    assert speedup_text(2.14, "higher") == "2.14x faster than higher"
    assert speedup_text(0.8, "torchopt") == "1.25x slower than torchopt"
    assert speedup_text(0.998, "functional_call") == "as fast as functional_call"


def test_report_reads_well_and_hides_the_targets() -> None:
    text = _synthetic().table()
    assert "MAML sine regression" in text and "context entry ms" in text
    assert "loft, meta-iteration: 2.73x faster than higher; 1.22x slower than torchopt; " \
           "1.38x the floor" in text
    assert "loft, context entry: 5.00x faster than higher; 4.00x cloning the weights" in text
    assert "11.0 (10.0..12.0)" in text
    assert "error: sinusoid/sgd/functional_call (round 0): worker exited with 1: boom" in text
    lowered = text.lower()
    assert "target" not in lowered and "issue" not in lowered and "missed" not in lowered


def test_check_rows_list_every_target_and_every_peer_comparison() -> None:
    result = _synthetic()
    rows = result.check_rows()
    by = {(r["workload"], r["target"]): r for r in rows}
    floor = by[("sinusoid", "loft / floor, meta-iteration")]
    assert floor["value"] == pytest.approx(11 / 8) and floor["met"] is False  # > 1.3
    assert by[("context", "loft, context entry (ms)")]["met"] is True  # 0.2 <= 0.3
    assert by[("sinusoid", "no slower than higher, inner loop")]["met"] is True
    assert by[("sinusoid", "no slower than torchopt, meta-iteration")]["met"] is False
    measured = {("sinusoid", "sgd"), ("context", "sgd")}
    assert sum(1 for t in META_TARGETS if (t.workload, t.optimizer) in measured
               and t.implementation == "loft") == \
        sum(1 for r in rows if not r["target"].startswith("no slower"))
    text = result._check_table()
    assert "MISSED" in text and " met" in text and f"of {len(rows)} met" in text


# ---- the CLI --------------------------------------------------------------------------


@pytest.mark.parametrize("argv,suites,meta_impls", [
    (["--quick"], ["meta"], ["loft", "higher"]),
    ([], ["meta", "abc"], None),
    (["--models", "A"], ["abc"], None),
    (["--quick", "--steps", "50"], ["abc"], ["loft", "higher"]),
    (["--workloads", "sinusoid", "--models", "B"], ["meta", "abc"], None),
    (["--workloads", "sinusoid,context", "--implementations", "loft", "functional_call"],
     ["meta"], ["loft", "functional_call"]),
    (["--device", "cuda"], ["abc"], None),
    (["--long"], ["long"], None),
])
def test_which_suites_run(argv: list[str], suites: list[str],
                          meta_impls: list[str] | None) -> None:
    args = bench_cli.parse_args(argv)
    assert bench_cli.selected_suites(args) == suites
    assert bench_cli.suite_implementations(args, "meta") == meta_impls


def test_quick_parses_to_a_short_run_of_the_real_workloads(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = fake_meta_suite(monkeypatch, _synthetic())
    assert bench_cli.main(["--quick", "--no-plot", "--out", str(tmp_path)]) == 0
    assert list(calls["workloads"]) == list(META_WORKLOADS)
    assert calls["implementations"] == ["loft", "higher"]
    assert (calls["repeats"], calls["rounds"], calls["time_budget_s"]) == (3, 2, 3.0)
    assert calls["floor"] is True
    data = json.loads((tmp_path / "meta.json").read_text())
    assert "targets" not in data and data["summary"] and data["ratios"]


@pytest.mark.parametrize("argv,message", [
    (["--implementations", "jax"], "--implementations: unknown 'jax'"),
    (["--workloads", "mnist"], "--workloads: unknown 'mnist'"),
    (["--workloads", "sinusoid", "--device", "cuda"], "run on cpu only"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--long", "--workloads", "sinusoid"], "--workloads does not apply to --long"),
])
def test_bad_arguments_are_named(argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_cli.parse_args(argv)
    assert message in capsys.readouterr().err


def _abc_result() -> SuiteResult:
    meta = {"threads": 1, "device": "cpu", "torch": "x"}
    records = [{"workload": {"model": "B", "optimizer": "sgd", "steps": 50},
                "implementation": impl, "inner_s": t, "meta_backward_s": t,
                "saved_bytes": 1000, "peak_mem_growth_bytes": 0, "nodes_per_step": 1.0}
               for impl, t in (("loft", 0.010), ("higher", 0.015), ("torchopt", 0.02))]
    return SuiteResult(meta, records)


@pytest.mark.parametrize("check", [False, True])
def test_check_prints_the_targets_only_when_asked(
        check: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench_cli, "run_meta_suite", lambda **kw: _synthetic())
    monkeypatch.setattr(bench_cli, "run_suite", lambda **kw: _abc_result())
    monkeypatch.setattr(bench_cli, "build_ops", lambda: None)
    for name in ("higher", "matplotlib", "tqdm"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    argv = ["--workloads", "sinusoid", "context", "--models", "B", "--no-plot",
            "--no-progress", "--out", str(tmp_path)] + (["--check"] if check else [])
    assert bench_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "loft, meta-iteration:" in out and "inner ms" in out
    assert "loft vs torchopt (torchopt's time / loft's): B-sgd T=50 inner 2.00x" in out
    assert ("Targets, real workloads" in out) is check
    assert ("Targets, models A B C" in out) is check
    if check:
        assert "B-sgd   meta_speedup                  1.50  target >= 1.2" in out
        assert "no slower than torchopt, meta-iteration" in out
    assert ("targets" in json.loads((tmp_path / "meta.json").read_text())) is check
    assert ("targets" in json.loads((tmp_path / "results.json").read_text())) is check


def test_real_workloads_end_to_end(tmp_path: Path) -> None:
    """``python -m loft.bench --workloads sinusoid context`` with loft and higher, one
    round of one meta-iteration: fresh processes, the table, the JSON and the plot."""
    pytest.importorskip("matplotlib")
    if not HAS_HIGHER:
        pytest.skip("higher is not installed")
    env = subprocess_env()
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "loft.bench", "--workloads", "sinusoid", "context",
           "--optimizers", "sgd", "--implementations", "loft", "higher", "--repeats", "1",
           "--rounds", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "than higher" in proc.stdout and "the floor" in proc.stdout, proc.stdout
    assert "cloning the weights" in proc.stdout and "target" not in proc.stdout.lower()
    assert not (out / "results.json").exists()  # the A/B/C suite was not asked for
    assert (out / "meta.png").stat().st_size > 0
    data = json.loads((out / "meta.json").read_text())
    assert not [r for r in data["records"] if "error" in r], data["records"]
    jobs = {(r["workload"]["name"], r["implementation"]) for r in data["records"]}
    assert jobs == {("sinusoid", "loft"), ("sinusoid", "higher"), ("sinusoid", "floor"),
                    ("context", "loft"), ("context", "higher"), ("context", "floor")}
    assert len({r["pid"] for r in data["records"]}) == len(data["records"])
    loft = next(r for r in data["records"] if r["implementation"] == "loft"
                and r["workload"]["name"] == "sinusoid")
    assert loft["loft_backend"] == "fused" and loft["tasks"] == 25 and loft["steps"] == 5
    assert loft["num_params"] == 1761 and loft["threads"] == 1


def test_jobs_are_plain_data() -> None:
    job = MetaJob(MetaWorkload("omniglot", "sgd"), "loft")
    assert job.label == "omniglot/sgd/loft"
    assert MetaWorkload.from_dict(json.loads(json.dumps(job.workload.to_dict()))) == job.workload
