"""The suite's plot: time and saved memory against T, one line per implementation.

One row of panels per (model, optimiser): inner-loop time, meta-backward time and
saved-for-backward bytes, each against the number of inner steps T on log-log axes.
The bare floor (no update) is drawn dashed in every row of its model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loft.bench.suite import SuiteResult

__all__ = ["plot_results"]

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


def plot_results(result: SuiteResult, path: str | os.PathLike[str]) -> Path:
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
    fig.suptitle(f"loft.bench: {meta.get('device', 'cpu')}, {meta.get('threads')} thread(s), "
                 f"torch {meta.get('torch')}, {meta.get('date', '')}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
