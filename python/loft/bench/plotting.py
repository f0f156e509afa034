"""The suite's plot: time and saved memory against T, one line per implementation.

One row of panels per (model, optimiser): inner-loop time, meta-backward time and
saved-for-backward bytes, each against the number of inner steps T on log-log axes.
The bare floor (no update) is drawn dashed in every row of its model.

:func:`plot_meta` draws the real workloads: one panel per workload and optimiser, one
bar per implementation: the meta-iteration's median time split into inner loop,
meta-backward and the rest (context entry, query forward, meta step), the spread over
the rounds as an error bar, and loft's speed-up written over each peer's bar; on
``context``, the time per entry.

:func:`plot_long` draws the ``--long`` suite: peak RSS growth and total time against T,
one line per mode (full, checkpoint, truncate, first_order).

The plot is the one optional output (matplotlib, the ``bench`` extra): the results' JSON
and table are written first, and :func:`write_plot` turns any failure of the plot into a
:class:`PlotError` that lists the files already written.

This module imports nothing from loft: it reads only the attributes it draws
(:class:`SuiteFigures`, :class:`LongFigures`, which :class:`loft.bench.results.SuiteResult`
and :class:`loft.bench.results.LongResult` have), so that the results, which call it
from their ``save``, can import it without a cycle.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

__all__ = ["plot_results", "plot_long", "plot_meta", "write_plot", "PlotError",
           "SuiteFigures", "LongFigures", "MetaFigures"]


class SuiteFigures(Protocol):
    """What :func:`plot_results` reads (a :class:`loft.bench.results.SuiteResult`)."""

    meta: dict[str, Any]
    derived: list[dict[str, Any]]


class LongFigures(Protocol):
    """What :func:`plot_long` reads (a :class:`loft.bench.results.LongResult`)."""

    meta: dict[str, Any]

    @property
    def summary(self) -> list[dict[str, Any]]: ...


class MetaFigures(Protocol):
    """What :func:`plot_meta` reads (a :class:`loft.bench.meta_results.MetaSuiteResult`)."""

    meta: dict[str, Any]

    @property
    def summary(self) -> list[dict[str, Any]]: ...

    @property
    def ratios(self) -> list[dict[str, Any]]: ...


class PlotError(RuntimeError):
    """The plot failed after the results were written; ``paths`` names the written files."""

    def __init__(self, paths: dict[str, Path], cause: BaseException) -> None:
        self.paths = dict(paths)
        written = ", ".join(str(p) for p in self.paths.values())
        super().__init__(f"the plot failed ({type(cause).__name__}: {cause}); the results "
                         f"are saved in {written}")


def write_plot(draw: Callable[[Any, Path], Path], result: Any, path: Path,
               paths: dict[str, Path]) -> None:
    """``paths["png"] = draw(result, path)``; on any failure, remove what ``path`` holds
    (a partial or an earlier run's plot) and raise :class:`PlotError` naming ``paths``."""
    try:
        paths["png"] = draw(result, path)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the results are kept
        Path(path).unlink(missing_ok=True)
        raise PlotError(paths, exc) from exc

_STYLE = {
    "loft": {"color": "tab:blue", "marker": "o"},
    "loft-reference": {"color": "tab:cyan", "marker": "s"},
    "per-tensor": {"color": "tab:orange", "marker": "^"},
    "higher": {"color": "tab:red", "marker": "v"},
    "torchopt": {"color": "tab:green", "marker": "D"},
    "floor": {"color": "gray", "marker": "x", "linestyle": "--"},
}

_PANELS = (
    ("inner_s", 1e3, "inner loop (ms)"),
    ("meta_backward_s", 1e3, "meta-backward (ms)"),
    ("saved_bytes", 1e-6, "saved for backward (MB)"),
)


def plot_results(result: SuiteFigures, path: str | os.PathLike[str]) -> Path:
    """Draw ``result`` into the PNG file ``path`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    derived = result.derived
    rows = sorted({(d["model"], d["optimizer"]) for d in derived if d["optimizer"] != "none"})
    if not rows:  # only floors: one row per model
        rows = sorted({(d["model"], "none") for d in derived})
    fig, axes = plt.subplots(max(len(rows), 1), len(_PANELS),
                             figsize=(4.2 * len(_PANELS), 3.0 * max(len(rows), 1)),
                             squeeze=False)
    for r, (model, optimizer) in enumerate(rows):
        for c, (key, scale, label) in enumerate(_PANELS):
            ax = axes[r][c]
            for impl, style in _STYLE.items():
                wanted = "none" if impl == "floor" else optimizer
                points = sorted((d["steps"], d[key] * scale) for d in derived
                                if d["model"] == model and d["optimizer"] == wanted
                                and d["implementation"] == impl and d.get(key))
                if not points:
                    continue
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=impl, **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("inner steps T")
            ax.set_ylabel(label)
            ax.set_title(f"{model} / {optimizer}: {label.split(' (')[0]}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    meta = result.meta
    return _save(fig, f"loft.bench: {meta.get('device', 'cpu')}, {meta.get('threads')} "
                      f"thread(s), torch {meta.get('torch')}, {meta.get('date', '')}",
                 10, 0.98, path)


_META_ORDER = ("loft", "loft-batched", "higher", "torchopt", "functional_call", "floor")
_META_COLORS = {"loft": "tab:blue", "loft-batched": "tab:purple", "higher": "tab:red",
                "torchopt": "tab:green", "functional_call": "tab:orange", "floor": "gray"}
_META_PARTS = (("inner_s", "inner loop", 1.0), ("meta_backward_s", "meta-backward", 0.6),
               ("rest", "rest (context, query forward, meta step)", 0.25))


def plot_meta(result: MetaFigures, path: str | os.PathLike[str]) -> Path:
    """Draw the real workloads' medians into the PNG file ``path`` (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    summary = result.summary
    ratios = {(r["workload"], r["optimizer"], r["metric"], r["versus"]): r["value"]
              for r in result.ratios}
    # loft-batched's bar is labelled with its speed-up over higher (``--batched``).
    batched = {(r["workload"], r["optimizer"], r["metric"]): r["value"]
               for r in getattr(result, "batched_ratios", []) if r["versus"] == "higher"}
    groups = list(dict.fromkeys((row["workload"], row["optimizer"]) for row in summary
                                if row["optimizer"] != "none"))
    if not groups:
        groups = list(dict.fromkeys((row["workload"], "none") for row in summary))
    columns = min(3, max(len(groups), 1))
    rows_n = (len(groups) + columns - 1) // columns or 1
    fig, axes = plt.subplots(rows_n, columns, figsize=(5.2 * columns, 3.9 * rows_n),
                             squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (name, optimizer) in zip(axes.flat, groups):
        by_impl = {row["implementation"]: row for row in summary if row["workload"] == name
                   and row["optimizer"] in (optimizer, "none")}
        context = "entry_s" in next(iter(by_impl.values()))
        asked = result.meta.get("implementations", [])
        # A peer that was measured but cannot run this workload (torchopt: Meta-SGD) gets
        # an empty slot marked n/a; the context workload has no such slots.
        impls = [i for i in _META_ORDER if i in by_impl or (i in asked and not context)]
        key = "entry_s" if context else "iteration_s"
        for x, impl in enumerate(impls):
            row = by_impl.get(impl)
            color = _META_COLORS[impl]
            if row is None:
                ax.annotate("n/a", (x, 0), textcoords="offset points", xytext=(0, 3),
                            ha="center", fontsize=8, color=color)
                continue
            total = row[key] * 1e3
            if context:
                ax.bar(x, total, color=color)
            else:
                bottom = 0.0
                rest = max(row["iteration_s"] - row["inner_s"] - row["meta_backward_s"], 0.0)
                for part, _, alpha in _META_PARTS:
                    height = (rest if part == "rest" else row[part]) * 1e3
                    ax.bar(x, height, bottom=bottom, color=color, alpha=alpha,
                           edgecolor=color)
                    bottom += height
            lo, hi = (v * 1e3 for v in row[key + "_spread"])
            ax.errorbar(x, total, yerr=[[max(total - lo, 0.0)], [max(hi - total, 0.0)]],
                        color="black", capsize=3, linewidth=1)
            ratio = ratios.get((name, optimizer, key, impl))
            if impl == "loft-batched" and (name, optimizer, key) in batched:
                ax.annotate(f"{batched[(name, optimizer, key)]:.2f}x\nhigher's speed",
                            (x, max(hi, total)), textcoords="offset points", xytext=(0, 3),
                            ha="center", fontsize=7)
            elif ratio is not None:
                label = (f"loft is\n{ratio:.2f}x this" if impl == "floor" else
                         f"loft {ratio:.2f}x\nfaster" if ratio >= 1 else
                         f"loft {1 / ratio:.2f}x\nslower")
                ax.annotate(label, (x, max(hi, total)), textcoords="offset points",
                            xytext=(0, 3), ha="center", fontsize=7)
        ax.set_xticks(range(len(impls)))
        ax.set_xticklabels(["clone" if context and i == "floor" else i for i in impls],
                           rotation=20, fontsize=8)
        ax.set_ylabel("ms per entry" if context else "ms per meta-iteration")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.18)
        title = name if context else f"{name} / {optimizer}"
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    handles = [Patch(color="tab:blue", alpha=alpha, label=label)
               for _, label, alpha in _META_PARTS]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    meta = result.meta
    title = (f"loft.bench, real workloads: {meta.get('device', 'cpu')}, {meta.get('threads')} "
             f"thread(s), torch {meta.get('torch')}, median of {meta.get('rounds')} round(s) "
             f"(bars: lowest..highest round), {meta.get('date', '')}")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


_LONG_STYLE = {
    "full": {"color": "tab:red", "marker": "o"},
    "checkpoint": {"color": "tab:blue", "marker": "s"},
    "truncate": {"color": "tab:green", "marker": "^"},
    "first_order": {"color": "gray", "marker": "x", "linestyle": "--"},
}

_LONG_PANELS = (
    ("peak_rss_growth_bytes", 1e-6, "peak RSS growth (MB)"),
    ("total_s", 1.0, "inner loop + meta-backward (s)"),
)


def plot_long(result: LongFigures, path: str | os.PathLike[str]) -> Path:
    """Draw the ``--long`` suite's medians into the PNG file ``path`` (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    summary = result.summary
    steps = sorted({row["steps"] for row in summary})
    fig, axes = plt.subplots(1, len(_LONG_PANELS), figsize=(5.0 * len(_LONG_PANELS), 3.8),
                             squeeze=False)
    for ax, (key, scale, label) in zip(axes[0], _LONG_PANELS):
        for mode, style in _LONG_STYLE.items():
            points = sorted((row["steps"], row[key] * scale) for row in summary
                            if row["mode"] == mode and row.get(key))
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=mode, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(steps)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("inner steps T")
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    meta = result.meta
    return _save(fig, f"loft.bench --long: 8 x Linear(128,128), Adam, batch 32; "
                      f"{meta.get('threads')} thread(s), torch {meta.get('torch')}, "
                      f"{meta.get('date', '')}", 9, 0.95, path)


def _save(fig: Any, title: str, fontsize: int, top: float, path: str | Path) -> Path:
    """Title the figure, lay it out below the title, write it as a PNG and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout(rect=(0, 0, 1, top))
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
