"""The suite's plot: time and saved memory against T, one line per implementation.

One row of panels per (model, optimiser): inner-loop time, meta-backward time and
saved-for-backward bytes, each against the number of inner steps T on log-log axes.
The bare floor (no update) is drawn dashed in every row of its model.

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

__all__ = ["plot_results", "plot_long", "write_plot", "PlotError", "SuiteFigures",
           "LongFigures"]


class SuiteFigures(Protocol):
    """What :func:`plot_results` reads (a :class:`loft.bench.results.SuiteResult`)."""

    meta: dict[str, Any]
    derived: list[dict[str, Any]]


class LongFigures(Protocol):
    """What :func:`plot_long` reads (a :class:`loft.bench.results.LongResult`)."""

    meta: dict[str, Any]

    @property
    def summary(self) -> list[dict[str, Any]]: ...


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
