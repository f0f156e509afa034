"""The real-workload suite: every (workload, optimiser, implementation) in a fresh process,
in rounds, the implementations in a different order each round.

:func:`run_meta_suite` makes the jobs (:func:`make_meta_jobs`: each workload with each of
its optimisers and each implementation that runs it, plus one floor per workload), then
runs them ``rounds`` times through the suite's fork server
(:class:`loft.bench.suite.ForkServer`: a fresh forked process per measurement, one
thread, ``LOFT_BACKEND=fused`` for loft). Within a round the workloads come in report
order, and for each workload the implementations in an order rotated by the round's
index (:func:`round_order`), so that a slow minute of a shared machine falls on
different implementations in different rounds. The records carry their round;
:class:`loft.bench.meta_results.MetaSuiteResult` reports the median over the rounds and
the spread.

Peers that are not installed (torchopt, higher) are left out of the default list with a
note in the result (``meta["notes"]``); asked for by name, they are an error.

``batched=True`` (``python -m loft.bench --batched``) adds the ``loft-batched`` peer (the
meta-batch as one ``innerloop_ctx(..., tasks=N)``) on the workloads it runs (SGD on
``sinusoid`` and ``omniglot``) and measures every workload in its batched setting
(:class:`~loft.bench.meta_workloads.MetaWorkload` ``batched``: Omniglot with 16 tasks),
every peer alike; :data:`META_BATCHED` is what the CLI runs by default then: the MAML
workloads with SGD, loft-batched against loft, higher and the floor.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loft.bench.meta_measure import (
    BATCHED,
    BATCHED_WORKLOADS,
    DEFAULT_META_TIME_BUDGET_S,
    META_IMPLEMENTATIONS,
    implementation_supports,
)
from loft.bench.meta_results import MetaSuiteResult
from loft.bench.meta_workloads import META_WORKLOADS, MetaWorkload
from loft.bench.suite import ForkServer, Progress, _worker_env, load_average, machine_info

__all__ = [
    "MetaJob",
    "DEFAULT_WORKLOADS",
    "DEFAULT_PEERS",
    "DEFAULT_ROUNDS",
    "DEFAULT_META_REPEATS",
    "META_QUICK",
    "META_BATCHED",
    "make_meta_jobs",
    "round_order",
    "run_meta_suite",
    "missing_peers",
]

DEFAULT_WORKLOADS = tuple(META_WORKLOADS)
#: Every peer but the floor (which runs unless ``floor=False``) and loft-batched (which
#: runs with ``batched=True``).
DEFAULT_PEERS = tuple(i for i in META_IMPLEMENTATIONS if i not in ("floor", BATCHED))
DEFAULT_ROUNDS = 3
DEFAULT_META_REPEATS = 5
#: ``python -m loft.bench --quick``: loft against higher and the floor, about a minute of
#: measuring on a 2-core machine (Omniglot gets 2 meta-iterations per process).
META_QUICK: dict[str, Any] = {"workloads": DEFAULT_WORKLOADS, "implementations": ("loft", "higher"),
                              "repeats": 3, "rounds": 2, "time_budget_s": 3.0}
#: ``python -m loft.bench --batched``'s defaults (each overridden by its option): the
#: MAML workloads with SGD, loft-batched against loft, higher (and the floor). Omniglot's
#: 16 tasks take seconds per meta-iteration: the time budget gives it the minimum, a
#: warm-up and 2 timed meta-iterations per process.
META_BATCHED: dict[str, Any] = {"workloads": BATCHED_WORKLOADS, "optimizers": ("sgd",),
                                "implementations": ("loft", "higher")}

#: The importable module behind each optional peer.
_PEER_MODULES = {"higher": "higher", "torchopt": "torchopt"}


@dataclass(frozen=True)
class MetaJob:
    """One measurement: a real workload and an implementation."""

    workload: MetaWorkload
    implementation: str

    @property
    def label(self) -> str:
        return f"{self.workload.name}/{self.workload.optimizer}/{self.implementation}"


def missing_peers(implementations: Sequence[str]) -> list[str]:
    """Those of ``implementations`` whose module is not installed."""
    return [i for i in implementations
            if i in _PEER_MODULES and importlib.util.find_spec(_PEER_MODULES[i]) is None]


def make_meta_jobs(workloads: Sequence[str], optimizers: Sequence[str] | None,
                   implementations: Sequence[str], floor: bool = True,
                   tasks: int | None = None, steps: int | None = None,
                   batched: bool = False) -> list[MetaJob]:
    """Each workload with each of its optimisers (those in ``optimizers``, if given) and
    each implementation that runs it, then the workload's floor; ``batched``: every
    workload in its batched setting, and loft-batched where it runs."""
    if batched and BATCHED not in implementations:
        implementations = [*implementations, BATCHED]
    jobs = []
    for name in workloads:
        spec = META_WORKLOADS[name]
        chosen = [o for o in spec.optimizers if optimizers is None or o in optimizers]
        if not chosen:
            continue
        for optimizer in chosen:
            workload = MetaWorkload(name, optimizer, tasks, steps, batched=batched)
            jobs += [MetaJob(workload, impl) for impl in implementations
                     if implementation_supports(impl, workload)]
        if floor:
            jobs.append(MetaJob(MetaWorkload(name, "none", tasks, steps, batched=batched),
                                "floor"))
    return jobs


def round_order(jobs: Sequence[MetaJob], round_index: int) -> list[MetaJob]:
    """``jobs`` for round ``round_index``: workloads in their order; within each, the
    implementations rotated by ``round_index`` (each implementation's jobs together)."""
    ordered: list[MetaJob] = []
    names = list(dict.fromkeys(job.workload.name for job in jobs))
    for name in names:
        mine = [job for job in jobs if job.workload.name == name]
        impls = list(dict.fromkeys(job.implementation for job in mine))
        shift = round_index % len(impls)
        for impl in impls[shift:] + impls[:shift]:
            ordered += [job for job in mine if job.implementation == impl]
    return ordered


def _check_names(workloads: Sequence[str], optimizers: Sequence[str] | None,
                 implementations: Sequence[str]) -> None:
    for name in workloads:
        if name not in META_WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; choose from {list(META_WORKLOADS)}")
    for optimizer in optimizers or ():
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {optimizer!r} for the real workloads; "
                             f"choose from ['sgd', 'adam']")
    for impl in implementations:
        if impl not in DEFAULT_PEERS:
            raise ValueError(f"unknown implementation {impl!r} for the real workloads; "
                             f"choose from {list(DEFAULT_PEERS)}")


def run_meta_suite(
    workloads: Sequence[str] = DEFAULT_WORKLOADS,
    optimizers: Sequence[str] | None = None,
    implementations: Sequence[str] | None = None,
    repeats: int = DEFAULT_META_REPEATS,
    rounds: int = DEFAULT_ROUNDS,
    threads: int = 1,
    floor: bool = True,
    progress: bool = True,
    timeout: float | None = 600.0,
    command: str | None = None,
    time_budget_s: float | None = DEFAULT_META_TIME_BUDGET_S,
    tasks: int | None = None,
    steps: int | None = None,
    batched: bool = False,
) -> MetaSuiteResult:
    """Run every job ``rounds`` times, each in a fresh process, and collect the records.

    ``implementations`` defaults to every installed peer (a missing one is noted in
    ``meta["notes"]``); ``tasks`` and ``steps`` override the published settings (tests);
    ``batched`` adds loft-batched and the batched settings (see the module docstring).
    Nothing is written to disk here: see :meth:`MetaSuiteResult.save`.
    """
    notes = []
    if implementations is None:
        absent = missing_peers(DEFAULT_PEERS)
        implementations = [i for i in DEFAULT_PEERS if i not in absent]
        notes += [f"{name} is not installed: its rows are skipped (pip install "
                  f"'loft[bench]' installs it)" for name in absent]
    _check_names(workloads, optimizers, implementations)
    absent = missing_peers(implementations)
    if absent:
        raise ValueError(f"not installed: {', '.join(absent)} (pip install 'loft[bench]')")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    jobs = make_meta_jobs(workloads, optimizers, implementations, floor, tasks, steps,
                          batched)
    if batched:
        implementations = [*implementations, BATCHED]
    meta = machine_info(threads, "cpu", command)
    meta.update(suite="meta", workloads=list(workloads), optimizers=optimizers and
                list(optimizers), implementations=list(implementations), repeats=repeats,
                rounds=rounds, time_budget_s=time_budget_s, floor=floor, notes=notes,
                settings={name: META_WORKLOADS[name].describe(_num_tasks(name, tasks, batched))
                          for name in workloads},
                tasks_override=tasks, steps_override=steps, batched=batched)
    torchopt_version = _version("torchopt") if "torchopt" in implementations else None
    if torchopt_version:
        meta["torchopt"] = torchopt_version
    records = []
    with Progress(len(jobs) * rounds, "loft.bench real workloads", progress) as bar, \
            ForkServer(threads) as launcher:
        for k in range(rounds):
            for job in round_order(jobs, k):
                bar.start(f"round {k + 1}: {job.label}")
                spec = {"suite": "meta", "workload": job.workload.to_dict(),
                        "implementation": job.implementation, "repeats": repeats,
                        "threads": threads, "time_budget_s": time_budget_s}
                # loft-batched is loft: its worker gets loft's (fused) backend.
                env = _worker_env("loft" if job.implementation == BATCHED
                                  else job.implementation, threads)
                record = launcher.run(spec, env, timeout)
                if "error" in record:
                    record.update(workload=job.workload.to_dict(),
                                  implementation=job.implementation)
                record["round"] = k
                records.append(record)
                bar.done()
    meta["load_average_after"] = load_average()
    return MetaSuiteResult(meta, records)


def _num_tasks(name: str, tasks: int | None, batched: bool) -> int:
    """The tasks per meta-iteration of workload ``name`` in this run."""
    spec = META_WORKLOADS[name]
    return MetaWorkload(name, spec.optimizers[0], tasks, batched=batched).num_tasks


def _version(distribution: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:  # noqa: BLE001 - metadata is informative only
        return None
