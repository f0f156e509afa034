"""``python -m loft.bench``: run the benchmark suite and write the table, JSON and plot.

Every measurement runs in a fresh process (``python -m loft.bench._worker``) with a
fixed thread count, after a warm-up; the medians of ``--repeats`` runs are reported.
See :mod:`loft.bench` for what is measured and how.

``python -m loft.bench --long`` runs the long-inner-loop suite instead (issue 6: full
unroll, checkpointing, truncation and first order on one fixed workload, peak memory and
time against T): see :mod:`loft.bench.long`.

The optional dependencies a run needs (``higher``, ``matplotlib``: the ``bench`` extra)
are checked before anything is measured; the JSON and the table are written before the
plot, and a failing plot keeps them.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from loft.bench.long import DEFAULT_LONG_REPEATS, DEFAULT_LONG_STEPS, LONG_QUICK
from loft.bench.measure import DEFAULT_TIME_BUDGET_S
from loft.bench.plotting import PlotError
from loft.bench.suite import (
    DEFAULT_MODELS,
    DEFAULT_OPTIMIZERS,
    DEFAULT_STEPS,
    QUICK,
    run_suite,
)

#: What each optional dependency (setup.py's ``bench`` extra) is needed for, and the
#: option that runs without it.
OPTIONAL_DEPENDENCIES: dict[str, tuple[str, str]] = {
    "higher": ("the baseline of every ratio", "--implementations loft loft-reference per-tensor"),
    "matplotlib": ("the plot", "--no-plot"),
    "tqdm": ("the progress bar", "--no-progress"),
}
INSTALL_COMMAND = "pip install 'loft[bench]'   (from a checkout of loft: pip install '.[bench]')"


def _names(values: Sequence[str] | None) -> list[str] | None:
    """``["A,B", "C"]`` -> ``["A", "B", "C"]`` (commas or spaces both work)."""
    if values is None:
        return None
    return [part for value in values for part in value.split(",") if part]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loft.bench",
        description="Benchmark loft's differentiable inner loops against loft's reference "
                    "path, a per-tensor PyTorch loop and higher.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP/MKL threads per worker (default: 1)")
    parser.add_argument("--models", nargs="+", metavar="M",
                        help=f"models (default: {' '.join(DEFAULT_MODELS)}; --quick: A)")
    parser.add_argument("--optimizers", nargs="+", metavar="O",
                        help=f"inner optimisers (default: {' '.join(DEFAULT_OPTIMIZERS)})")
    parser.add_argument("--steps", nargs="+", type=int, metavar="T",
                        help=f"numbers of inner steps (default: "
                             f"{' '.join(map(str, DEFAULT_STEPS))}; --quick: "
                             f"{' '.join(map(str, QUICK['steps']))}; --long: "
                             f"{' '.join(map(str, DEFAULT_LONG_STEPS))}; --long --quick: "
                             f"{' '.join(map(str, LONG_QUICK['steps']))})")
    parser.add_argument("--repeats", type=int,
                        help=f"timed runs per measurement, median reported (default: 5; "
                             f"--quick: 3; --long: {DEFAULT_LONG_REPEATS} fresh processes "
                             f"per mode and T; --long --quick: {LONG_QUICK['repeats']})")
    parser.add_argument("--implementations", nargs="+", metavar="I",
                        help="subset of: loft loft-reference per-tensor higher "
                             "(default: all four; higher comes with the bench extra)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run (under a minute on a quiet machine): model A, "
                             "T = 50, 3 repeats; with --long: T = 20 40, 1 repeat")
    parser.add_argument("--long", action="store_true",
                        help="the long-inner-loop suite instead (issue 6): 8 x Linear(128,128)"
                             "+ReLU, Adam, batch 32, on cpu; full unroll vs "
                             "checkpoint_every=17 vs truncate() every 20 steps vs "
                             "first_order; peak RSS growth and time against T, each run "
                             "in a fresh process; writes long.json, long.txt, long.png")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare-floor runs")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds before a worker is abandoned (default: 600)")
    parser.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET_S,
                        help="seconds of timed runs per measurement: slow ones take fewer "
                             f"repeats (at least 1; default: {DEFAULT_TIME_BUDGET_S:g})")
    parser.add_argument("--out", default="loft-bench",
                        help="output directory (default: ./loft-bench/)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.steps is not None and min(args.steps) < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.long:
        _check_long_args(parser, args)
    return args


def _check_long_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--long`` has one fixed workload: refuse the options that would change it."""
    for option in ("models", "optimizers", "implementations"):
        if getattr(args, option) is not None:
            parser.error(f"--{option} does not apply to --long (its workload is fixed)")
    if args.device != "cpu":
        parser.error(f"--long runs on cpu only, got --device {args.device}")


def needed_modules(args: argparse.Namespace) -> list[str]:
    """The optional modules this run imports: higher (when measured), matplotlib (unless
    ``--no-plot``), tqdm (unless ``--no-progress``)."""
    needed = []
    if not args.long and (args.implementations is None
                          or "higher" in (_names(args.implementations) or [])):
        needed.append("higher")
    if not args.no_plot:
        needed.append("matplotlib")
    if not args.no_progress:
        needed.append("tqdm")
    return needed


def missing_modules(names: Sequence[str]) -> list[str]:
    """Those of ``names`` that do not import (absent or broken installs)."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def missing_message(missing: Sequence[str]) -> str:
    """What is missing, what for, the install command and the options that skip it."""
    lines = [f"loft.bench: missing optional dependencies: {', '.join(missing)}."]
    lines += [f"  {name}: {OPTIONAL_DEPENDENCIES[name][0]} (or run with "
              f"{OPTIONAL_DEPENDENCIES[name][1]})" for name in missing]
    lines.append(f"Install them with: {INSTALL_COMMAND}")
    return "\n".join(lines)


def measures_fused(args: argparse.Namespace) -> bool:
    """Whether this run measures loft's fused ops (``--long`` always does)."""
    names = _names(args.implementations)
    return args.long or names is None or "loft" in names


def build_ops() -> None:
    """Build (or load) the fused ops in this process before any worker starts: a cold
    build then reports its start and end here (a worker's output goes to its log), and
    every worker loads the cached library."""
    import loft

    loft.backend()


def main_long(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--long``: run :func:`loft.bench.long.run_long_suite` and write its files."""
    from loft.bench.long import run_long_suite

    defaults = LONG_QUICK if args.quick else {"steps": DEFAULT_LONG_STEPS,
                                              "repeats": DEFAULT_LONG_REPEATS}
    return _report(args, lambda: run_long_suite(
        steps=args.steps or defaults["steps"],
        repeats=args.repeats or defaults["repeats"],
        threads=args.threads,
        progress=not args.no_progress,
        timeout=args.timeout,
        command=shlex.join(["python", "-m", "loft.bench", *argv]),
    ))


def _report(args: argparse.Namespace, run: Callable[[], Any]) -> int:
    """Run a suite, print its table and save its files; the exit status (2: bad
    arguments, 1: every measurement failed, or the plot failed: the JSON and the table
    are written all the same)."""
    try:
        result = run()
    except ValueError as exc:
        print(f"loft.bench: {exc}", file=sys.stderr)
        return 2
    print(result.table())
    try:
        paths = result.save(args.out, plot=not args.no_plot)
    except PlotError as exc:
        print("\nwrote " + ", ".join(str(p) for p in exc.paths.values()))
        print(f"loft.bench: {exc}", file=sys.stderr)
        return 1
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if result.errors and len(result.errors) == len(result.records) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loft.bench``: check the optional dependencies, measure, report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    missing = missing_modules(needed_modules(args))
    if missing:
        print(missing_message(missing), file=sys.stderr)
        return 2
    if measures_fused(args):
        build_ops()
    if args.long:
        return main_long(args, argv)
    defaults = QUICK if args.quick else {"models": DEFAULT_MODELS,
                                         "optimizers": DEFAULT_OPTIMIZERS,
                                         "steps": DEFAULT_STEPS, "repeats": 5}
    return _report(args, lambda: run_suite(
        models=_names(args.models) or defaults["models"],
        optimizers=_names(args.optimizers) or defaults["optimizers"],
        steps=args.steps or defaults["steps"],
        implementations=_names(args.implementations),
        repeats=args.repeats or defaults["repeats"],
        device=args.device,
        threads=args.threads,
        floor=not args.no_floor,
        progress=not args.no_progress,
        timeout=args.timeout,
        command=shlex.join(["python", "-m", "loft.bench", *argv]),
        time_budget_s=args.time_budget,
    ))


if __name__ == "__main__":
    raise SystemExit(main())
