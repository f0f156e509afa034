"""The results of both benchmark suites: what a run produced, its ratios and targets,
its text table, JSON file and plot.

:class:`SuiteResult` (``python -m loft.bench``) and :class:`LongResult` (``--long``) are
built from the workers' records; both are re-exported by the modules that produce them
(:mod:`loft.bench.suite`, :mod:`loft.bench.long`) and by :mod:`loft.bench`. Their
``save`` writes the JSON and the table first and the plot last
(:mod:`loft.bench.plotting`, whose failure is a :class:`~loft.bench.plotting.PlotError`
naming the files already written).

The real workloads' results (:class:`loft.bench.meta_results.MetaSuiteResult`) live in
their own module and write their files with :func:`write_result`.

The bench modules import one way: workloads, meta_workloads, baselines -> measure ->
meta_measure -> plotting -> results -> meta_results -> suite -> meta_suite, long -> the
CLI (plotting reads only the attributes it draws, so it imports no result type).

The targets (:data:`TARGETS`, :data:`RATIOS`) are the maintainers': the tables print
them only when asked (``check=True``, ``python -m loft.bench --check``), through each
result's package-internal ``_check_table()``.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loft.bench import plotting
from loft.bench.measure import IMPLEMENTATIONS
from loft.bench.plotting import PlotError
from loft.bench.workloads import OPTIMIZERS

__all__ = [
    "SuiteResult",
    "Target",
    "TARGETS",
    "derive",
    "LongResult",
    "Ratio",
    "RATIOS",
    "LONG_MODES",
    "summarize",
    "PlotError",
    "write_result",
]

# ---- the suite ------------------------------------------------------------------------


class Bounded:
    """A bound on a figure: ``bound``, ``at_most`` (the figure must be <= it, else >=)
    and ``tolerance``, slack allowed beyond it; shared by every suite's targets."""

    bound: float
    at_most: bool
    tolerance: float = 0.0

    def check(self, value: float | None) -> bool | None:
        """Whether ``value`` meets the bound (``None``: not measured)."""
        if value is None:
            return None
        if self.at_most:
            return value <= self.bound + self.tolerance
        return value >= self.bound - self.tolerance

    @property
    def text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.bound:g}"


@dataclass(frozen=True)
class Target(Bounded):
    """A goal of issue 5: ``metric`` of loft vs higher (or floor) on a workload at T=50."""

    model: str
    optimizer: str
    metric: str  # a key of a derived record
    bound: float
    at_most: bool = False  # True: metric <= bound, else metric >= bound
    steps: int = 50
    implementation: str = "loft"
    tolerance: float = 0.0  # slack allowed beyond the bound


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
    Target("B", "sgd", "meta_speedup", 1.2),
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


def _key(record: dict[str, Any]) -> tuple[str, str, int]:
    w = record["workload"]
    return w["model"], w["optimizer"], int(w["steps"])


def derive(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios of every successful record against higher and the floor of its run.

    Adds, where the reference measurement exists: ``inner_speedup``, ``meta_speedup``
    (higher's time / this one's), ``inner_speedup_torchopt``, ``meta_speedup_torchopt``
    (torchopt's time / this one's), ``memory_ratio`` (higher's saved bytes / this one's),
    ``inner_over_floor``, ``meta_over_floor``, ``optimizer_nodes_per_step``,
    ``saved_bytes_per_step`` (marginal saved bytes per inner step above the floor's)
    and ``buffers_per_step`` (that over the parameter bytes).
    """
    records = [r for r in records if "error" not in r]
    higher = {_key(r): r for r in records if r["implementation"] == "higher"}
    torchopt = {_key(r): r for r in records if r["implementation"] == "torchopt"}
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
        o = torchopt.get((model, optimizer, steps))
        if o is not None and r["implementation"] not in ("floor", "torchopt"):
            d["inner_speedup_torchopt"] = o["inner_s"] / r["inner_s"]
            d["meta_speedup_torchopt"] = o["meta_backward_s"] / r["meta_backward_s"]
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
class RunRecords:
    """What every suite's run produces: its meta data and one record per process (a
    record with an ``"error"`` key is a process that failed)."""

    meta: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "error" in r]


@dataclass
class SuiteResult(RunRecords):
    """Everything one suite run produced."""

    derived: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.derived:
            self.derived = derive(self.records)

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
        versus = [d for d in rows if d["implementation"] == "loft"
                  and d.get("meta_speedup_torchopt") is not None]
        if versus:
            lines.append("loft vs torchopt (torchopt's time / loft's): " + "; ".join(
                f"{d['model']}-{d['optimizer']} T={d['steps']} inner "
                f"{d['inner_speedup_torchopt']:.2f}x, meta {d['meta_speedup_torchopt']:.2f}x"
                for d in versus))
        for note in self.meta.get("notes", []):
            lines.append(f"note: {note}")
        for r in self.records:
            if "warning" in r:
                lines.append(f"warning: {r['warning']}")
        for r in self.errors:
            w = r["workload"]
            lines.append(f"error: {w['model']}/{w['optimizer']}/T={w['steps']}/"
                         f"{r['implementation']}: {r['error']}")
        return "\n".join(lines)

    def _check_table(self) -> str:
        """The targets of :data:`TARGETS` that were measured, one line each."""
        lines = [f"Targets, models A B C (loft fused, T=50; {self.meta.get('threads')} "
                 f"thread(s), {self.meta.get('device')}):"]
        targets = self.target_rows()
        if not targets:
            lines.append("  (no target's workload was measured: they are stated at T=50 with "
                         "loft and higher)")
        for row in targets:
            mark = {True: "met", False: "MISSED", None: "n/a"}[row["met"]]
            lines.append(f"  {row['model']}-{row['optimizer']:<5} {row['metric']:<25} "
                         f"{_fmt(row['value'], '8.2f')}  target {row['target']:<8} {mark}")
        return "\n".join(lines)

    def to_json(self, check: bool = False) -> dict[str, Any]:
        data = {"meta": self.meta, "records": self.records, "derived": self.derived}
        if check:
            data["targets"] = self.target_rows()
        return data

    def save(self, out_dir: str | os.PathLike[str], plot: bool = True,
             check: bool = False) -> dict[str, Path]:
        """Write ``results.json``, ``results.txt`` and (if ``plot``) ``results.png``
        (with ``check``, the targets too).

        The plot comes last: if it fails, :class:`loft.bench.plotting.PlotError` is
        raised with the JSON and the table already written.
        """
        return write_result(self, out_dir, "results", plotting.plot_results if plot else None,
                            check=check)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SuiteResult:
        data = json.loads(Path(path).read_text())
        return cls(data["meta"], data["records"], data.get("derived", []))


# ---- the --long suite ----------------------------------------------------------------

#: The ways of running the inner loop, in table order.
LONG_MODES = ("full", "checkpoint", "truncate", "first_order")
#: Steps of the warm-up run: enough for one checkpoint segment boundary and one cut,
#: small enough that its peak stays far below the measured run's.
WARMUP_STEPS = 24
#: The number of inner steps at which the issue's targets are stated.
TARGET_STEPS = 300


@dataclass(frozen=True)
class Ratio(Bounded):
    """``numerator_mode``'s ``metric`` over ``denominator_mode``'s, and its bound."""

    name: str
    numerator_mode: str
    denominator_mode: str
    metric: str  # a key of a summary row
    bound: float
    at_most: bool

    def value(self, rows: dict[str, dict[str, Any]]) -> float | None:
        """The ratio from the summary rows of one T, keyed by mode (None if missing)."""
        top = rows.get(self.numerator_mode, {}).get(self.metric)
        bottom = rows.get(self.denominator_mode, {}).get(self.metric)
        if top is None or not bottom:
            return None
        return top / bottom


#: The issue's ratios (targets stated at T = 300).
RATIOS: tuple[Ratio, ...] = (
    Ratio("checkpoint/full peak memory", "checkpoint", "full", "peak_rss_growth_bytes",
          0.25, True),
    Ratio("checkpoint/full total time", "checkpoint", "full", "total_s", 2.0, True),
    Ratio("truncate/full peak memory", "truncate", "full", "peak_rss_growth_bytes",
          0.15, True),
    Ratio("full/first_order inner time", "full", "first_order", "inner_s", 1.5, False),
)

_SUMMED = ("inner_s", "query_s", "meta_backward_s", "total_s", "peak_rss_growth_bytes")


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over the repeats of each (mode, T), with every repeat's values."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        if "error" not in r:
            groups.setdefault((r["mode"], int(r["steps"])), []).append(r)
    order = {m: i for i, m in enumerate(LONG_MODES)}
    rows = []
    for (mode, steps), runs in sorted(groups.items(), key=lambda kv: (kv[0][1],
                                                                      order[kv[0][0]])):
        row: dict[str, Any] = {"mode": mode, "steps": steps, "repeats": len(runs)}
        for key in _SUMMED:
            values = [r[key] for r in runs]
            row[key] = statistics.median(values)
            row[key + "_all"] = values
        row["meta_grad_norm"] = runs[0].get("meta_grad_norm")
        rows.append(row)
    return rows


@dataclass
class LongResult(RunRecords):
    """Everything one ``--long`` run produced: meta data and one record per process."""

    @property
    def summary(self) -> list[dict[str, Any]]:
        return summarize(self.records)

    def _by_steps(self) -> dict[int, dict[str, dict[str, Any]]]:
        by: dict[int, dict[str, dict[str, Any]]] = {}
        for row in self.summary:
            by.setdefault(row["steps"], {})[row["mode"]] = row
        return by

    def ratios(self) -> dict[int, dict[str, float | None]]:
        """Every ratio of :data:`RATIOS` at every measured T."""
        return {steps: {r.name: r.value(rows) for r in RATIOS}
                for steps, rows in sorted(self._by_steps().items())}

    def target_rows(self) -> list[dict[str, Any]]:
        """The issue's targets at T = 300, if T = 300 was measured."""
        rows = self._by_steps().get(TARGET_STEPS)
        if rows is None:
            return []
        return [{"ratio": r.name, "steps": TARGET_STEPS, "value": r.value(rows),
                 "target": r.text, "met": r.check(r.value(rows))} for r in RATIOS]

    def table(self) -> str:
        """The medians per (mode, T) and the ratios per T, as text."""
        lines = self._summary_lines() + [""] + self._ratio_lines()
        for r in self.errors:
            lines.append(f"error: {r.get('mode')}/T={r.get('steps')}: {r['error']}")
        return "\n".join(lines)

    def _check_table(self) -> str:
        """The targets at T = 300 (:data:`RATIOS`), one line each."""
        targets = self.target_rows()
        if not targets:
            return f"(The targets are stated at T={TARGET_STEPS}, not measured in this run.)"
        lines = [f"Targets at T={TARGET_STEPS} ({self.meta.get('threads')} thread(s), cpu; "
                 f"noisy on a loaded machine):"]
        for row in targets:
            mark = {True: "met", False: "MISSED", None: "n/a"}[row["met"]]
            lines.append(f"  {row['ratio']:<30} {_fmt_padded(row['value'], '8.3f')}  "
                         f"target {row['target']:<7} {mark}")
        return "\n".join(lines)

    def _summary_lines(self) -> list[str]:
        header = (f"{'mode':<12} {'T':>5} {'inner ms':>10} {'meta-bwd ms':>11} "
                  f"{'total ms':>10} {'peakRSS MB':>10} {'runs':>4}")
        lines = [header, "-" * len(header)]
        previous = None
        for row in self.summary:
            if previous is not None and row["steps"] != previous:
                lines.append("")
            previous = row["steps"]
            lines.append(f"{row['mode']:<12} {row['steps']:>5} {row['inner_s'] * 1e3:>10.1f} "
                         f"{row['meta_backward_s'] * 1e3:>11.1f} {row['total_s'] * 1e3:>10.1f} "
                         f"{row['peak_rss_growth_bytes'] / 1e6:>10.1f} {row['repeats']:>4}")
        lines.append("")
        lines.append(f"Medians over fresh processes (one timed run each, after a "
                     f"{WARMUP_STEPS}-step warm-up). total = inner + query forward + "
                     f"meta-backward; peakRSS: peak RSS growth over that run.")
        return lines

    def _ratio_lines(self) -> list[str]:
        names = [r.name for r in RATIOS]
        lines = [f"{'T':>5}  " + "  ".join(f"{n:>28}" for n in names)]
        for steps, values in self.ratios().items():
            lines.append(f"{steps:>5}  " + "  ".join(f"{_fmt_padded(values[n], '28.3f')}"
                                                     for n in names))
        return lines

    def to_json(self, check: bool = False) -> dict[str, Any]:
        data = {"meta": self.meta, "records": self.records, "summary": self.summary,
                "ratios": {str(k): v for k, v in self.ratios().items()}}
        if check:
            data["targets"] = self.target_rows()
        return data

    def save(self, out_dir: str | os.PathLike[str], plot: bool = True,
             check: bool = False) -> dict[str, Path]:
        """Write ``long.json``, ``long.txt`` and ``long.png``, as :meth:`SuiteResult.save`."""
        return write_result(self, out_dir, "long", plotting.plot_long if plot else None,
                            check=check)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LongResult:
        data = json.loads(Path(path).read_text())
        return cls(data["meta"], data["records"])


def _fmt_padded(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or a dash as wide (``spec`` starts with the width)."""
    if value is None:
        return "-".rjust(int(spec.split(".")[0]))
    return format(value, spec)


def write_result(result: Any, out_dir: str | os.PathLike[str], stem: str, plot: Any,
                 check: bool = False) -> dict[str, Path]:
    """``<stem>.json`` and ``<stem>.txt`` of ``result`` (a suite's result: ``to_json``,
    ``table``, ``_check_table``) in ``out_dir``, then the plot ``<stem>.png`` with
    ``plot`` (if not ``None``; its failure raises PlotError last). With ``check``, the
    targets go into both files too."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "table": out / f"{stem}.txt"}
    paths["json"].write_text(json.dumps(result.to_json(check=check), indent=1))
    text = result.table() + ("\n\n" + result._check_table() if check else "")
    paths["table"].write_text(text + "\n")
    if plot is not None:
        plotting.write_plot(plot, result, out / f"{stem}.png", paths)
    return paths
