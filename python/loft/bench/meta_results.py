"""The results of the real-workload suite: per-job summaries over rounds, loft's
speed-ups, the report, the JSON file, the plot, and the maintainers' checks.

The suite (:mod:`loft.bench.meta_suite`) measures every (workload, optimiser,
implementation) once per round, each in a fresh process, the order of the
implementations changing from round to round. :class:`MetaSuiteResult` turns its
records into

- a **summary** per job: for each figure (the whole meta-iteration, the inner loop, the
  meta-backward; or one context entry) the median over the rounds of each process's
  median, the **spread** (the lowest and highest round median) and the best single
  repeat;
- **ratios** for loft: the speed-up over each peer (the peer's time / loft's, above 1:
  loft is faster) and loft over the floor (loft's time / the floor's, at least 1), each
  from the medians above, with the same ratio per round in the JSON;
- with ``--batched``, **batched ratios** for ``loft-batched`` (the meta-batch as one
  ``innerloop_ctx(..., tasks=N)``): the speed-up over sequential loft and each peer
  (``batched_ratios`` in the JSON), and its memory figure: the bytes saved for one inner
  step batched over N times one task's (``saved_bytes_ratio``);
- :meth:`MetaSuiteResult.table`, the report a newcomer reads; ``_check_table()``, the
  maintainers' targets (``python -m loft.bench --check``), never in the normal report.
"""

from __future__ import annotations

import json
import os
import statistics
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loft.bench import plotting
from loft.bench.meta_measure import BATCHED, META_IMPLEMENTATIONS
from loft.bench.meta_workloads import META_WORKLOADS
from loft.bench.results import Bounded, RunRecords, write_result

__all__ = [
    "MetaSuiteResult",
    "MetaTarget",
    "META_TARGETS",
    "METRICS",
    "summarize_meta",
    "meta_ratios",
    "speedup_text",
]

#: The figures of each kind of workload: key, label.
METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "iteration": (("iteration_s", "meta-iteration"), ("inner_s", "inner loop"),
                  ("meta_backward_s", "meta-backward")),
    "context": (("entry_s", "context entry"),),
}
_OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam"}
#: The report's line width.
WIDTH = 100
#: Why a peer has no row on a workload (reported as n/a).
NOT_APPLICABLE = {("torchopt", "meta-sgd"): "no per-element lr"}
#: The peers loft is compared with (the floor is a bound, not a peer; loft-batched is
#: loft itself, compared with these and with loft).
PEERS = tuple(i for i in META_IMPLEMENTATIONS if i not in ("loft", BATCHED, "floor"))
#: What each implementation with ratios is compared with.
VERSUS = {"loft": (*PEERS, "floor"), BATCHED: ("loft", *PEERS)}
#: The batched peer's memory figures (bytes saved for one inner step; see
#: :mod:`loft.bench.meta_measure`), carried into its summary row.
MEMORY_KEYS = ("saved_bytes_per_step", "saved_bytes_per_step_one_task", "saved_bytes_ratio")


def _kind(workload: str) -> str:
    return META_WORKLOADS[workload].kind


def _job(record: dict[str, Any]) -> tuple[str, str, str]:
    w = record["workload"]
    return w["name"], w["optimizer"], record["implementation"]


def summarize_meta(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, optimiser, implementation): per figure the median over the
    rounds, the spread (lowest and highest round median) and the best repeat."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        if "error" not in r:
            groups.setdefault(_job(r), []).append(r)
    rows = []
    for (name, optimizer, impl), runs in groups.items():
        row: dict[str, Any] = {"workload": name, "optimizer": optimizer,
                               "implementation": impl, "rounds": len(runs),
                               "tasks": runs[0].get("tasks")}
        for key, _ in METRICS[_kind(name)]:
            values = [r[key] for r in runs]
            row[key] = statistics.median(values)
            row[key + "_spread"] = [min(values), max(values)]
            row[key + "_best"] = min(r.get(key + "_min", r[key]) for r in runs)
            row[key + "_rounds"] = values
        for key in MEMORY_KEYS:
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                row[key] = statistics.median(values)
        rows.append(row)
    return sorted(rows, key=_row_order)


def _row_order(row: dict[str, Any]) -> tuple[int, int, int]:
    names = list(META_WORKLOADS)
    optimizers = ("sgd", "adam", "none")
    return (names.index(row["workload"]), optimizers.index(row["optimizer"]),
            META_IMPLEMENTATIONS.index(row["implementation"]))


def _per_round(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], dict[int, Any]]:
    out: dict[tuple[str, str, str], dict[int, Any]] = {}
    for r in records:
        if "error" not in r:
            out.setdefault(_job(r), {})[int(r.get("round", 0))] = r
    return out


def meta_ratios(records: Sequence[dict[str, Any]],
                implementation: str = "loft") -> list[dict[str, Any]]:
    """``implementation``'s ratios (loft, or loft-batched) per (workload, optimiser,
    figure): ``speedup`` over each peer (the peer's time / its own; loft-batched: also over
    loft) and, for loft, ``over_floor`` (loft's time / the floor's), from the medians over
    the rounds; ``rounds``: the same ratio within each round."""
    summary = {(r["workload"], r["optimizer"], r["implementation"]): r
               for r in summarize_meta(records)}
    rounds = _per_round(records)
    out = []
    for (name, optimizer, impl), loft in summary.items():
        if impl != implementation:
            continue
        for key, label in METRICS[_kind(name)]:
            for versus in VERSUS[implementation]:
                wanted = "none" if versus == "floor" else optimizer
                other = summary.get((name, wanted, versus))
                if other is None or not loft[key] or not other[key]:
                    continue
                ours, theirs = rounds[(name, optimizer, impl)], rounds[(name, wanted, versus)]
                if versus == "floor":
                    value = loft[key] / other[key]
                    per_round = [ours[k][key] / theirs[k][key] for k in sorted(ours)
                                 if k in theirs]
                else:
                    value = other[key] / loft[key]
                    per_round = [theirs[k][key] / ours[k][key] for k in sorted(ours)
                                 if k in theirs]
                out.append({"workload": name, "optimizer": optimizer, "metric": key,
                            "label": label, "implementation": impl, "versus": versus,
                            "kind": "over_floor" if versus == "floor" else "speedup",
                            "value": value, "rounds": per_round})
    return out


def speedup_text(value: float, peer: str) -> str:
    """``2.1x faster than higher`` (value = peer's time / loft's), ``1.3x slower than
    higher``, or ``as fast as higher`` within half a percent."""
    if abs(value - 1.0) < 0.005:
        return f"as fast as {peer}"
    if value >= 1.0:
        return f"{value:.2f}x faster than {peer}"
    return f"{1.0 / value:.2f}x slower than {peer}"


# ---- targets (maintainers only: python -m loft.bench --check) -------------------------


@dataclass(frozen=True)
class MetaTarget(Bounded):
    """A goal on one workload for ``implementation`` (loft or loft-batched): a
    ``speedup`` over ``versus`` (at least ``bound``), ``over_floor`` (at most ``bound``),
    its ``time_ms`` (at most ``bound``), or its ``memory`` figure (``metric``, a key of
    :data:`MEMORY_KEYS`, at most ``bound``)."""

    workload: str
    optimizer: str
    kind: str  # "speedup", "over_floor", "time_ms" or "memory"
    metric: str  # a key of METRICS (memory: of MEMORY_KEYS)
    bound: float
    versus: str | None = None  # the peer of a speedup
    implementation: str = "loft"

    def __post_init__(self) -> None:
        if self.kind not in ("speedup", "over_floor", "time_ms", "memory"):
            raise ValueError(f"MetaTarget.kind must be speedup, over_floor, time_ms or "
                             f"memory, got {self.kind!r}")

    @property
    def at_most(self) -> bool:  # type: ignore[override]
        return self.kind != "speedup"

    @property
    def description(self) -> str:
        if self.kind == "memory":
            return "batched saved bytes/step / (N x 1 task's)"
        label = dict(METRICS[_kind(self.workload)])[self.metric]
        who = "batched: " if self.implementation == BATCHED else ""
        if self.kind == "speedup":
            return f"{who}speed-up vs {self.versus}, {label}"
        if self.kind == "over_floor":
            return f"loft / floor, {label}"
        return f"loft, {label} (ms)"


#: The goals of the speed work (CPU, 1 thread, loft vs peers in the same run). Besides
#: these, :meth:`MetaSuiteResult.check_rows` asks that loft be no slower than any peer
#: on any figure of any measured workload.
META_TARGETS: tuple[MetaTarget, ...] = (
    MetaTarget("sinusoid", "sgd", "over_floor", "iteration_s", 1.3),
    MetaTarget("sinusoid", "adam", "speedup", "iteration_s", 2.5, "higher"),
    MetaTarget("omniglot", "sgd", "over_floor", "iteration_s", 1.05),
    MetaTarget("meta-sgd", "sgd", "speedup", "iteration_s", 1.5, "higher"),
    MetaTarget("context", "sgd", "time_ms", "entry_s", 0.3),
    # --batched: the meta-batch as one innerloop_ctx(..., tasks=N).
    MetaTarget("sinusoid", "sgd", "speedup", "iteration_s", 10.0, "higher", BATCHED),
    MetaTarget("sinusoid", "sgd", "speedup", "iteration_s", 5.0, "loft", BATCHED),
    MetaTarget("omniglot", "sgd", "speedup", "iteration_s", 1.3, "higher", BATCHED),
    MetaTarget("sinusoid", "sgd", "memory", "saved_bytes_ratio", 1.0, None, BATCHED),
    MetaTarget("omniglot", "sgd", "memory", "saved_bytes_ratio", 1.0, None, BATCHED),
)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _bytes(value: float) -> str:
    """Bytes as ``812 B``, ``11.9 kB``, ``1.23 MB`` (decimal units)."""
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def _ms(value: float) -> str:
    """Milliseconds with three significant digits or more (``0.241``, ``61.3``, ``1821``)."""
    ms = value * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 1:
        return f"{ms:.1f}"
    return f"{ms:.3f}"


@dataclass
class MetaSuiteResult(RunRecords):
    """Everything one real-workload run produced: meta data and one record per process
    (``round`` says which round it belongs to)."""

    @property
    def summary(self) -> list[dict[str, Any]]:
        return summarize_meta(self.records)

    @property
    def ratios(self) -> list[dict[str, Any]]:
        return meta_ratios(self.records)

    @property
    def batched_ratios(self) -> list[dict[str, Any]]:
        """loft-batched's ratios (``--batched``; empty otherwise)."""
        return meta_ratios(self.records, BATCHED)

    def _groups(self) -> list[tuple[str, str]]:
        """The measured (workload, optimiser) pairs, in report order (floors excluded)."""
        seen: dict[tuple[str, str], None] = {}
        for row in self.summary:
            if row["optimizer"] != "none":
                seen[(row["workload"], row["optimizer"])] = None
        return list(seen)

    def _row(self, name: str, optimizer: str, impl: str) -> dict[str, Any] | None:
        wanted = "none" if impl == "floor" else optimizer
        for row in self.summary:
            if (row["workload"], row["optimizer"], row["implementation"]) == \
                    (name, wanted, impl):
                return row
        return None

    def _ratio(self, name: str, optimizer: str, metric: str, versus: str,
               implementation: str = "loft") -> float | None:
        ratios = self.batched_ratios if implementation == BATCHED else self.ratios
        for r in ratios:
            if (r["workload"], r["optimizer"], r["metric"], r["versus"]) == \
                    (name, optimizer, metric, versus):
                return r["value"]
        return None

    # ---- the report -------------------------------------------------------------------

    def table(self) -> str:
        """The report: per workload a line saying what it is, the medians with their
        spread per implementation, and loft's speed-ups."""
        meta = self.meta
        paragraphs = [
            f"Real meta-learning workloads ({meta.get('device', 'cpu')}, "
            f"{meta.get('threads')} thread(s), torch {meta.get('torch')}). Each figure: the "
            f"median over {meta.get('rounds')} round(s) of a fresh process's median of up "
            f"to {meta.get('repeats')} meta-iterations after a warm-up one; (lo..hi): the "
            f"lowest and highest round; ms. Meta optimiser: Adam(lr=1e-3).",
            "Implementations: loft and higher: innerloop_ctx + diffopt.step(loss); torchopt: "
            "MetaSGD/MetaAdam; functional_call: torch.func.functional_call with per-tensor "
            "updates; floor: forward + gradients with create_graph=True and no update "
            "(what any implementation must compute).",
        ]
        if any(r["implementation"] == BATCHED for r in self.summary):
            paragraphs.append(
                "loft-batched (--batched): the meta-batch's N tasks as one "
                "innerloop_ctx(..., tasks=N), stepped on the [N] per-task losses; saved "
                "bytes per inner step: what autograd keeps for one step, batched, against "
                "N x one task's in a sequential loft context.")
        lines = [textwrap.fill(p, WIDTH) for p in paragraphs]
        for name, optimizer in self._groups():
            lines += [""] + self._group_lines(name, optimizer)
        for note in meta.get("notes", []):
            lines.append(f"note: {note}")
        backend = next((r.get("torchopt_backend") for r in self.records
                        if r.get("torchopt_backend")), None)
        if backend:
            lines.append(f"torchopt {next(r['torchopt'] for r in self.records if 'torchopt' in r)}"
                         f": {backend.split(' (')[0]} ({_short_reason(backend)})")
        for r in self.records:
            if "warning" in r:
                lines.append(f"warning: {r['warning']}")
        for r in self.errors:
            name, optimizer, impl = _job(r)
            lines.append(f"error: {name}/{optimizer}/{impl} (round {r.get('round')}): "
                         f"{r['error']}")
        return "\n".join(lines)

    def _group_lines(self, name: str, optimizer: str) -> list[str]:
        spec = META_WORKLOADS[name]
        kind = spec.kind
        title = name if kind == "context" else f"{name}, {_OPTIMIZER_NAMES[optimizer]} inner loop"
        tasks = next((row.get("tasks") for row in self.summary
                      if (row["workload"], row["optimizer"]) == (name, optimizer)), None)
        lines = [textwrap.fill(f"{title}: {spec.describe(tasks)}", WIDTH,
                               subsequent_indent="  ")]
        metrics = METRICS[kind]
        header = f"  {'implementation':<16}" + "".join(f"{label + ' ms':>26}"
                                                     for _, label in metrics)
        lines.append(header)
        impls = [i for i in META_IMPLEMENTATIONS if self._row(name, optimizer, i)]
        asked = self.meta.get("implementations", [])
        for impl in META_IMPLEMENTATIONS:
            if impl not in impls:
                reason = NOT_APPLICABLE.get((impl, name))
                if impl in asked and reason:
                    lines.append(f"  {impl:<16}{'n/a: ' + reason:>26}")
                continue
            row = self._row(name, optimizer, impl)
            assert row is not None
            label = "floor (clone)" if impl == "floor" and kind == "context" else impl
            cells = []
            for key, _ in metrics:
                lo, hi = row[key + "_spread"]
                cells.append(f"{_ms(row[key])} ({_ms(lo)}..{_ms(hi)})".rjust(26))
            lines.append(f"  {label:<16}" + "".join(cells))
        lines += self._speedup_lines(name, optimizer, impls)
        lines += self._speedup_lines(name, optimizer, impls, BATCHED)
        return lines

    def _speedup_lines(self, name: str, optimizer: str, impls: Sequence[str],
                       implementation: str = "loft") -> list[str]:
        if implementation not in impls:
            return []
        metrics = METRICS[_kind(name)]
        lines = []
        for key, label in metrics:
            parts = [speedup_text(v, peer) for peer in VERSUS[implementation]
                     if peer != "floor" and (v := self._ratio(name, optimizer, key, peer,
                                                              implementation)) is not None]
            floor = self._ratio(name, optimizer, key, "floor", implementation)
            if floor is not None:
                what = "cloning the weights" if _kind(name) == "context" else "the floor"
                parts.append(f"{floor:.2f}x {what}")
            if parts:
                lines.append(textwrap.fill(f"  {implementation}, {label}: " + "; ".join(parts),
                                           WIDTH, subsequent_indent="      "))
        row = self._row(name, optimizer, implementation)
        if row is not None and row.get("saved_bytes_ratio") is not None:
            tasks = row["tasks"]
            lines.append(textwrap.fill(
                f"  {implementation}, saved bytes per inner step: "
                f"{_bytes(row['saved_bytes_per_step'])} for {tasks} tasks; "
                f"{row['saved_bytes_ratio']:.3f}x {tasks} x one task's "
                f"{_bytes(row['saved_bytes_per_step_one_task'])}", WIDTH,
                subsequent_indent="      "))
        return lines

    # ---- the checks ------------------------------------------------------------------

    def check_rows(self) -> list[dict[str, Any]]:
        """The maintainers' targets on what was measured: :data:`META_TARGETS`, and loft
        no slower than any peer on any figure (a speed-up of at least 1)."""
        rows = []
        for t in META_TARGETS:
            row = self._row(t.workload, t.optimizer, t.implementation)
            if row is None:
                continue
            if t.kind == "time_ms":
                value = row[t.metric] * 1e3
            elif t.kind == "memory":
                value = row.get(t.metric)
            else:
                versus = "floor" if t.kind == "over_floor" else t.versus
                assert versus is not None
                value = self._ratio(t.workload, t.optimizer, t.metric, versus,
                                    t.implementation)
            rows.append({"workload": t.workload, "optimizer": t.optimizer,
                         "target": t.description, "bound": t.text, "value": value,
                         "met": t.check(value)})
        for name, optimizer in self._groups():
            for key, label in METRICS[_kind(name)]:
                for peer in PEERS:
                    value = self._ratio(name, optimizer, key, peer)
                    if value is not None:
                        rows.append({"workload": name, "optimizer": optimizer,
                                     "target": f"no slower than {peer}, {label}",
                                     "bound": ">= 1", "value": value, "met": value >= 1.0})
        return rows

    def _check_table(self) -> str:
        """The targets as text, one line each, ``met`` or ``MISSED``."""
        rows = self.check_rows()
        lines = [f"Targets, real workloads ({self.meta.get('threads')} thread(s), "
                 f"{self.meta.get('device', 'cpu')}; medians over {self.meta.get('rounds')} "
                 f"round(s); noisy on a shared machine):"]
        if not rows:
            lines.append("  (no target's workload was measured with loft)")
        for row in rows:
            mark = {True: "met", False: "MISSED", None: "n/a"}[row["met"]]
            lines.append(f"  {row['workload'] + '/' + row['optimizer']:<14} "
                         f"{row['target']:<46} {_fmt(row['value'], '8.3f')}  "
                         f"target {row['bound']:<7} {mark}")
        missed = sum(1 for row in rows if row["met"] is False)
        lines.append(f"  {len(rows) - missed} of {len(rows)} met")
        return "\n".join(lines)

    # ---- files ------------------------------------------------------------------------

    def to_json(self, check: bool = False) -> dict[str, Any]:
        data = {"meta": self.meta, "records": self.records, "summary": self.summary,
                "ratios": self.ratios}
        if self.batched_ratios:
            data["batched_ratios"] = self.batched_ratios
        if check:
            data["targets"] = self.check_rows()
        return data

    def save(self, out_dir: str | os.PathLike[str], plot: bool = True,
             check: bool = False) -> dict[str, Path]:
        """Write ``meta.json``, ``meta.txt`` and (if ``plot``) ``meta.png``, as
        :meth:`loft.bench.results.SuiteResult.save`."""
        return write_result(self, out_dir, "meta", plotting.plot_meta if plot else None,
                            check=check)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MetaSuiteResult:
        data = json.loads(Path(path).read_text())
        return cls(data["meta"], data["records"])


def _short_reason(backend: str) -> str:
    """``compiled op unavailable: ImportError`` from :func:`torchopt_backend`'s text."""
    inside = backend.split(" (", 1)[1] if " (" in backend else backend
    head = inside.split(":", 2)
    if inside.startswith("compiled op unavailable") and len(head) >= 2:
        return f"its compiled op does not load here: {head[1].strip()}; see the JSON"
    return inside.rstrip(")")
