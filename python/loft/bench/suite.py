"""The benchmark suite: every measurement in a fresh worker process, then the report.

:func:`run_suite` builds the list of (workload, implementation) jobs, runs each with
``python -m loft.bench._worker`` in a subprocess whose environment fixes the thread
count (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``; the worker also calls
``torch.set_num_threads``) and loft's backend (``LOFT_BACKEND=fused`` for "loft",
``reference`` for "loft-reference"), and collects the results into a
:class:`SuiteResult`: derived ratios (:func:`derive`), a text table, the issue's
targets checked at T=50, a JSON file and a plot.

Ratios are always within one run of the suite: "vs higher" divides higher's figure by
the implementation's (above 1: the implementation is faster / saves less), "/ floor"
divides the implementation's inner-loop time by the bare floor's at the same model
and T. "buffers/step" is the saved bytes above the floor's, per inner step, in units
of the model's parameter bytes; "opt nodes/step" is the autograd nodes per step above
the floor's; both are marginal per-step figures (step T minus step 1, over T - 1).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loft.bench.measure import DEFAULT_TIME_BUDGET_S, IMPLEMENTATIONS
from loft.bench.workloads import MODELS, OPTIMIZERS, Workload

__all__ = [
    "Job",
    "SuiteResult",
    "Target",
    "TARGETS",
    "run_suite",
    "run_worker",
    "spawn_worker",
    "ForkServer",
    "derive",
    "machine_info",
]

DEFAULT_STEPS = (10, 50, 200)
DEFAULT_MODELS = tuple(MODELS)
DEFAULT_OPTIMIZERS = tuple(OPTIMIZERS)
QUICK = {"models": ("A",), "optimizers": ("sgd", "adam"), "steps": (50,), "repeats": 3}


@dataclass(frozen=True)
class Job:
    """One measurement: a workload and an implementation."""

    workload: Workload
    implementation: str

    @property
    def label(self) -> str:
        w = self.workload
        return f"{w.model}/{w.optimizer}/T={w.steps}/{self.implementation}"


@dataclass(frozen=True)
class Target:
    """A goal of issue 5: ``metric`` of loft vs higher (or floor) on a workload at T=50."""

    model: str
    optimizer: str
    metric: str  # a key of a derived record
    bound: float
    at_most: bool = False  # True: metric <= bound, else metric >= bound
    steps: int = 50
    implementation: str = "loft"
    tolerance: float = 0.0  # slack allowed beyond the bound

    def check(self, value: float | None) -> bool | None:
        if value is None:
            return None
        if self.at_most:
            return value <= self.bound + self.tolerance
        return value >= self.bound - self.tolerance

    @property
    def text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.bound:g}"


#: The issue's targets (CPU, 1 thread, loft fused vs higher 0.2.1, same run, T=50).
TARGETS: tuple[Target, ...] = (
    Target("A", "adam", "inner_speedup", 2.8),
    Target("A", "adam", "meta_speedup", 2.4),
    Target("A", "adam", "memory_ratio", 1.4),
    Target("A", "sgd", "inner_speedup", 1.7),
    Target("A", "sgd", "meta_speedup", 1.5),
    Target("A", "sgd", "memory_ratio", 0.95),
    Target("B", "adam", "inner_speedup", 1.6),
    Target("B", "adam", "meta_speedup", 1.4),
    Target("B", "adam", "memory_ratio", 1.4),
    Target("C", "adam", "inner_speedup", 1.35),
    Target("C", "adam", "meta_speedup", 1.25),
    Target("C", "adam", "memory_ratio", 1.1),
    Target("A", "adam", "inner_over_floor", 1.3, at_most=True),
    Target("A", "sgd", "inner_over_floor", 1.3, at_most=True),
    Target("A", "adam", "optimizer_nodes_per_step", 1.0, at_most=True),
    Target("A", "sgd", "optimizer_nodes_per_step", 1.0, at_most=True),
    # 0.02 buffer of slack: the per-step segment table (S x 5 int64) is saved too.
    Target("A", "adam", "buffers_per_step", 4.0, at_most=True, tolerance=0.02),
    Target("A", "sgd", "buffers_per_step", 3.0, at_most=True, tolerance=0.02),
)


def machine_info(threads: int, device: str, command: str | None = None) -> dict[str, Any]:
    """What the numbers were measured on (and the command that ran, if given)."""
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads,
        "device": device,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    spec = importlib.util.find_spec("higher")
    if spec is not None:
        try:
            from importlib.metadata import version

            info["higher"] = version("higher")
        except Exception:  # noqa: BLE001 - metadata is informative only
            info["higher"] = "installed"
    return info


def _worker_env(implementation: str, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    if implementation == "loft-reference":
        env["LOFT_BACKEND"] = "reference"
    elif implementation == "loft":
        env["LOFT_BACKEND"] = "fused"
    # The worker must import this very loft (the checkout or the installed one).
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _worker_failure(code: int | None, output: str) -> dict[str, Any]:
    """The error record of a worker that exited with ``code``: the last lines it wrote."""
    tail = output.strip().splitlines()[-15:]
    return {"error": f"worker exited with {code}: " + "\n".join(tail)}


class ForkServer:
    """The worker launcher of one suite run: a :mod:`loft.bench._zygote` process that has
    imported torch (and ``higher``) once and forks a fresh child per measurement, instead
    of a new interpreter per measurement (seconds of imports each). Where ``fork`` is
    missing or the server does not start, :func:`spawn_worker` starts a new interpreter.

    Use as a context manager; :meth:`run` has :func:`spawn_worker`'s signature.
    """

    def __init__(self, threads: int) -> None:
        self._proc: subprocess.Popen[str] | None = None
        if not hasattr(os, "fork") or os.environ.get("LOFT_BENCH_NO_FORK"):
            return
        env = _worker_env("floor", threads)  # no LOFT_BACKEND: each child sets its own
        script = Path(__file__).with_name("_zygote.py")
        try:
            proc = subprocess.Popen([sys.executable, str(script)], env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline() or "{}").get("ready")
        except (OSError, ValueError):
            return
        if ready:
            self._proc = proc
        else:
            proc.kill()
            proc.wait()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait()
            self._proc = None

    def run(self, spec: dict[str, Any], env: dict[str, str],
            timeout: float | None = 600.0) -> dict[str, Any]:
        """One measurement in a fresh (forked) process: the result or ``{"error": ...}``."""
        if self._proc is None or self._proc.poll() is not None:
            return spawn_worker(spec, env, timeout)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        keys = ("LOFT_BACKEND", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        child_env = {k: env[k] for k in keys if k in env}
        with tempfile.TemporaryDirectory(prefix="loft-bench-") as tmp:
            output, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
            request = {"spec": spec, "env": child_env, "output": str(output), "log": str(log),
                       "timeout": timeout}
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            reply = json.loads(self._proc.stdout.readline() or '{"returncode": null}')
            code = reply.get("returncode")
            if code == -9:
                return {"error": f"timed out after {timeout} s"}
            if code != 0 or not output.is_file():
                return _worker_failure(code, log.read_text() if log.is_file() else "")
            return json.loads(output.read_text())


def spawn_worker(spec: dict[str, Any], env: dict[str, str],
                 timeout: float | None = 600.0) -> dict[str, Any]:
    """Run ``python -m loft.bench._worker --json spec`` in a fresh process.

    Returns the worker's result, or ``{"error": ...}`` if it failed or timed out.
    """
    with tempfile.TemporaryDirectory(prefix="loft-bench-") as tmp:
        output = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "loft.bench._worker", "--json", json.dumps(spec),
               "--output", str(output)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not output.is_file():
            return _worker_failure(proc.returncode, proc.stderr or proc.stdout or "")
        return json.loads(output.read_text())


def run_worker(job: Job, repeats: int, device: str = "cpu", threads: int = 1,
               timeout: float | None = 600.0,
               time_budget_s: float | None = DEFAULT_TIME_BUDGET_S,
               launcher: ForkServer | None = None) -> dict[str, Any]:
    """Measure ``job`` in a fresh process: forked by ``launcher``, else a new
    ``python -m loft.bench._worker``.

    Returns the worker's result, or ``{"error": ...}`` if it failed or timed out.
    """
    spec = {"workload": job.workload.to_dict(), "implementation": job.implementation,
            "repeats": repeats, "device": device, "threads": threads,
            "time_budget_s": time_budget_s}
    launch = launcher.run if launcher is not None else spawn_worker
    result = launch(spec, _worker_env(job.implementation, threads), timeout)
    if "error" in result:
        return {"workload": job.workload.to_dict(), "implementation": job.implementation,
                **result}
    return result


def make_jobs(models: Sequence[str], optimizers: Sequence[str], steps: Sequence[int],
              implementations: Sequence[str], floor: bool = True) -> list[Job]:
    """Every (model, optimiser, T, implementation), plus one floor per (model, T)."""
    jobs = []
    for model in models:
        for t in steps:
            if floor:
                jobs.append(Job(Workload(model, "none", t), "floor"))
            for optimizer in optimizers:
                for impl in implementations:
                    jobs.append(Job(Workload(model, optimizer, t), impl))
    return jobs


def _key(record: dict[str, Any]) -> tuple[str, str, int]:
    w = record["workload"]
    return w["model"], w["optimizer"], int(w["steps"])


def derive(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios of every successful record against higher and the floor of its run.

    Adds, where the reference measurement exists: ``inner_speedup``, ``meta_speedup``
    (higher's time / this one's), ``memory_ratio`` (higher's saved bytes / this one's),
    ``inner_over_floor``, ``meta_over_floor``, ``optimizer_nodes_per_step``,
    ``saved_bytes_per_step`` (marginal saved bytes per inner step above the floor's)
    and ``buffers_per_step`` (that over the parameter bytes).
    """
    records = [r for r in records if "error" not in r]
    higher = {_key(r): r for r in records if r["implementation"] == "higher"}
    floors = {(_key(r)[0], _key(r)[2]): r for r in records if r["implementation"] == "floor"}
    out = []
    for r in records:
        model, optimizer, steps = _key(r)
        d: dict[str, Any] = {"model": model, "optimizer": optimizer, "steps": steps,
                             "implementation": r["implementation"]}
        for k in ("inner_s", "meta_backward_s", "saved_bytes", "peak_mem_growth_bytes",
                  "nodes_per_step"):
            d[k] = r.get(k)
        h = higher.get((model, optimizer, steps))
        if h is not None and r["implementation"] != "floor":
            d["inner_speedup"] = h["inner_s"] / r["inner_s"]
            d["meta_speedup"] = h["meta_backward_s"] / r["meta_backward_s"]
            if r.get("saved_bytes"):
                d["memory_ratio"] = h["saved_bytes"] / r["saved_bytes"]
        f = floors.get((model, steps))
        if f is not None and r["implementation"] != "floor":
            d["inner_over_floor"] = r["inner_s"] / f["inner_s"]
            d["meta_over_floor"] = r["meta_backward_s"] / f["meta_backward_s"]
            if r.get("nodes_per_step") is not None and f.get("nodes_per_step") is not None:
                d["optimizer_nodes_per_step"] = r["nodes_per_step"] - f["nodes_per_step"]
                d["optimizer_nodes_by_type"] = {
                    k: v - f["nodes_per_step_by_type"].get(k, 0.0)
                    for k, v in r["nodes_per_step_by_type"].items()
                    if v - f["nodes_per_step_by_type"].get(k, 0.0)
                }
            if r.get("saved_bytes_per_step") is not None and \
                    f.get("saved_bytes_per_step") is not None:
                per_step = r["saved_bytes_per_step"] - f["saved_bytes_per_step"]
                d["saved_bytes_per_step"] = per_step
                d["buffers_per_step"] = per_step / r["param_bytes"]
        out.append(d)
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


@dataclass
class SuiteResult:
    """Everything one suite run produced."""

    meta: dict[str, Any]
    records: list[dict[str, Any]]
    derived: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.derived:
            self.derived = derive(self.records)

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "error" in r]

    def target_rows(self) -> list[dict[str, Any]]:
        """Each target of :data:`TARGETS` whose workload was measured, with its value."""
        rows = []
        by_key = {(d["model"], d["optimizer"], d["steps"], d["implementation"]): d
                  for d in self.derived}
        for t in TARGETS:
            d = by_key.get((t.model, t.optimizer, t.steps, t.implementation))
            if d is None:
                continue
            value = d.get(t.metric)
            rows.append({"model": t.model, "optimizer": t.optimizer, "steps": t.steps,
                         "metric": t.metric, "target": t.text, "value": value,
                         "met": t.check(value)})
        return rows

    def table(self) -> str:
        """The results as a fixed-width text table, then the targets."""
        header = (f"{'model':<5} {'opt':<5} {'T':>4} {'impl':<15} {'inner ms':>9} "
                  f"{'meta-bwd ms':>11} {'saved MB':>9} {'peakRSS MB':>10} "
                  f"{'inner x':>8} {'meta x':>7} {'mem x':>6} {'/floor':>7} "
                  f"{'opt nodes/T':>11} {'buf/T':>6}")
        lines = [header, "-" * len(header)]
        order = {name: i for i, name in enumerate(IMPLEMENTATIONS)}
        opt_order = {name: i for i, name in enumerate((*OPTIMIZERS, "none"))}
        rows = sorted(self.derived, key=lambda d: (d["model"], d["steps"],
                                                   opt_order.get(d["optimizer"], 9),
                                                   order.get(d["implementation"], 99)))
        previous = None
        for d in rows:
            group = (d["model"], d["steps"], d["optimizer"])
            if previous is not None and group != previous:
                lines.append("")
            previous = group
            lines.append(
                f"{d['model']:<5} {d['optimizer']:<5} {d['steps']:>4} {d['implementation']:<15} "
                f"{_fmt(d['inner_s'] and d['inner_s'] * 1e3, '9.1f')} "
                f"{_fmt(d['meta_backward_s'] and d['meta_backward_s'] * 1e3, '11.1f')} "
                f"{_fmt(d['saved_bytes'] and d['saved_bytes'] / 1e6, '9.2f')} "
                f"{_fmt(d['peak_mem_growth_bytes'] and d['peak_mem_growth_bytes'] / 1e6, '10.1f')} "
                f"{_fmt(d.get('inner_speedup'), '8.2f')} {_fmt(d.get('meta_speedup'), '7.2f')} "
                f"{_fmt(d.get('memory_ratio'), '6.2f')} {_fmt(d.get('inner_over_floor'), '7.2f')} "
                f"{_fmt(d.get('optimizer_nodes_per_step'), '11.1f')} "
                f"{_fmt(d.get('buffers_per_step'), '6.2f')}"
            )
        lines.append("")
        lines.append("inner x / meta x: higher's time / this one's; mem x: higher's saved bytes / "
                     "this one's; /floor: inner-loop time / the bare floor's;")
        lines.append("opt nodes/T: autograd nodes per inner step above the floor's; buf/T: saved "
                     "bytes per inner step above the floor's, in parameter-sized buffers")
        lines.append("(both marginal: step T minus step 1, over T - 1). Times: medians of the "
                     "repeats, each measurement in a fresh process.")
        targets = self.target_rows()
        if targets:
            lines.append("")
            lines.append(f"Targets (loft fused, T=50; {self.meta.get('threads')} thread(s), "
                         f"{self.meta.get('device')}):")
            for row in targets:
                mark = {True: "met", False: "MISSED", None: "n/a"}[row["met"]]
                lines.append(f"  {row['model']}-{row['optimizer']:<5} {row['metric']:<25} "
                             f"{_fmt(row['value'], '8.2f')}  target {row['target']:<8} {mark}")
        for r in self.records:
            if "warning" in r:
                lines.append(f"warning: {r['warning']}")
        for r in self.errors:
            w = r["workload"]
            lines.append(f"error: {w['model']}/{w['optimizer']}/T={w['steps']}/"
                         f"{r['implementation']}: {r['error']}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "records": self.records, "derived": self.derived,
                "targets": self.target_rows()}

    def save(self, out_dir: str | os.PathLike[str], plot: bool = True) -> dict[str, Path]:
        """Write ``results.json``, ``results.txt`` and (if ``plot``) ``results.png``.

        The plot comes last: if it fails, :class:`loft.bench.plotting.PlotError` is
        raised with the JSON and the table already written.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "results.json", "table": out / "results.txt"}
        paths["json"].write_text(json.dumps(self.to_json(), indent=1))
        paths["table"].write_text(self.table() + "\n")
        if plot:
            from loft.bench.plotting import plot_results, write_plot

            write_plot(plot_results, self, out / "results.png", paths)
        return paths

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SuiteResult:
        data = json.loads(Path(path).read_text())
        return cls(data["meta"], data["records"], data.get("derived", []))


def run_suite(
    models: Sequence[str] = DEFAULT_MODELS,
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    steps: Sequence[int] = DEFAULT_STEPS,
    implementations: Sequence[str] | None = None,
    repeats: int = 5,
    device: str = "cpu",
    threads: int = 1,
    floor: bool = True,
    progress: bool = True,
    timeout: float | None = 600.0,
    command: str | None = None,
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S,
) -> SuiteResult:
    """Run every measurement in its own worker process and collect the results.

    ``implementations`` defaults to loft, loft-reference, per-tensor, and higher when
    it is installed. Nothing is written to disk here: see :meth:`SuiteResult.save`.
    """
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; choose from {sorted(MODELS)}")
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {o!r}; choose from {sorted(OPTIMIZERS)}")
    if implementations is None:
        implementations = [i for i in IMPLEMENTATIONS if i != "floor"]
        if importlib.util.find_spec("higher") is None:
            implementations.remove("higher")
    for i in implementations:
        if i not in IMPLEMENTATIONS or i == "floor":
            raise ValueError(f"unknown implementation {i!r}; choose from "
                             f"{[x for x in IMPLEMENTATIONS if x != 'floor']}")
    jobs = make_jobs(models, optimizers, steps, implementations, floor=floor)
    meta = machine_info(threads, device, command)
    meta.update(models=list(models), optimizers=list(optimizers), steps=list(steps),
                implementations=list(implementations), repeats=repeats,
                time_budget_s=time_budget_s)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="loft.bench", unit="run", dynamic_ncols=True)
    records = []
    try:
        with ForkServer(threads) as launcher:
            for job in jobs:
                if bar is not None:
                    bar.set_postfix_str(job.label)
                records.append(run_worker(job, repeats, device, threads, timeout,
                                          time_budget_s, launcher))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return SuiteResult(meta, records)
