"""The benchmark suite: every measurement in a fresh worker process, then the report.

:func:`run_suite` builds the list of (workload, implementation) jobs, runs each with
``python -m loft.bench._worker`` in a subprocess whose environment fixes the thread
count (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``; the worker also calls
``torch.set_num_threads``) and loft's backend (``LOFT_BACKEND=fused`` for "loft",
``reference`` for "loft-reference"), and collects the results into a
:class:`SuiteResult`: derived ratios (:func:`derive`), a text table, a JSON file and a
plot (and, asked for, the maintainers' targets at T=50).

Ratios are always within one run of the suite: "vs higher" divides higher's figure by
the implementation's (above 1: the implementation is faster / saves less; "vs torchopt"
likewise with torchopt's), "/ floor"
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loft.bench.measure import DEFAULT_TIME_BUDGET_S, IMPLEMENTATIONS
from loft.bench.results import TARGETS, SuiteResult, Target, derive
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
        "load_average": load_average(),
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


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


class Progress:
    """A suite's progress bar over ``total`` runs (tqdm), or nothing when not ``enabled``:
    ``start(label)`` before a run, ``done()`` after it; closed on leaving the ``with``."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


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

    ``implementations`` defaults to loft, loft-reference, per-tensor, and higher and
    torchopt where installed (one that is not is noted in ``meta["notes"]``). Nothing
    is written to disk here: see :meth:`SuiteResult.save`.
    """
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; choose from {sorted(MODELS)}")
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {o!r}; choose from {sorted(OPTIMIZERS)}")
    notes = []
    if implementations is None:
        implementations = [i for i in IMPLEMENTATIONS if i != "floor"]
        for optional in ("higher", "torchopt"):
            if importlib.util.find_spec(optional) is None:
                implementations.remove(optional)
                notes.append(f"{optional} is not installed: its rows are skipped (pip install "
                             f"'loft[bench]' installs it)")
    for i in implementations:
        if i not in IMPLEMENTATIONS or i == "floor":
            raise ValueError(f"unknown implementation {i!r}; choose from "
                             f"{[x for x in IMPLEMENTATIONS if x != 'floor']}")
    jobs = make_jobs(models, optimizers, steps, implementations, floor=floor)
    meta = machine_info(threads, device, command)
    meta.update(models=list(models), optimizers=list(optimizers), steps=list(steps),
                implementations=list(implementations), repeats=repeats,
                time_budget_s=time_budget_s, notes=notes)
    records = []
    with Progress(len(jobs), "loft.bench", progress) as bar, ForkServer(threads) as launcher:
        for job in jobs:
            bar.start(job.label)
            records.append(run_worker(job, repeats, device, threads, timeout,
                                      time_budget_s, launcher))
            bar.done()
    return SuiteResult(meta, records)
