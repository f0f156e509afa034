"""``python -m loft.bench``: run the benchmark and write its tables, JSON and plots.

Two suites, each measurement in a fresh process with a fixed thread count, after a
warm-up (see :mod:`loft.bench`):

- **the real workloads** (the headline; :mod:`loft.bench.meta_suite`): MAML sine
  regression with SGD and Adam inner loops, MAML Omniglot, Meta-SGD, and the cost of
  entering an inner-loop context; loft against higher, torchopt, a
  ``torch.func.functional_call`` loop and the floor, in several rounds; writes
  ``meta.txt``, ``meta.json``, ``meta.png``;
- **models A, B, C** (:mod:`loft.bench.suite`): three synthetic models, SGD-momentum and
  Adam, T = 10, 50, 200 inner steps, time, saved memory and graph size against loft's
  reference path, a per-tensor loop, higher and torchopt; writes ``results.*``.

What runs: the default runs both; ``--quick`` the real workloads against higher and the
floor (about a minute); naming ``--workloads`` selects the real workloads, naming
``--models`` or ``--steps`` the A/B/C suite (both when both are named).

``python -m loft.bench --batched`` runs the real workloads' batched variant: the MAML
workloads (sinusoid, and omniglot with 16 tasks) with SGD, where ``loft-batched`` runs
each meta-batch as one ``innerloop_ctx(..., tasks=N)``, against loft's and higher's
sequential loops and the floor; the report adds its speed-ups and the bytes it saves per
inner step against N x one task's (``--workloads``, ``--optimizers`` and
``--implementations`` widen or narrow it; see :mod:`loft.bench.meta_suite`).

``python -m loft.bench --long`` runs the long-inner-loop suite instead (full unroll,
checkpointing, truncation and first order on one fixed workload, peak memory and time
against T): see :mod:`loft.bench.long`.

``--check`` adds the maintainers' targets to the output (never printed otherwise).

The optional dependencies a run needs (``higher``, ``matplotlib``: the ``bench`` extra)
are checked before anything is measured (torchopt, also in the extra, is left out with a
note when missing unless named); the JSON and the table are written before the plot, and
a failing plot keeps them.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from loft.bench.long import DEFAULT_LONG_REPEATS, DEFAULT_LONG_STEPS, LONG_QUICK
from loft.bench.measure import DEFAULT_TIME_BUDGET_S, IMPLEMENTATIONS
from loft.bench.meta_measure import DEFAULT_META_TIME_BUDGET_S
from loft.bench.meta_suite import (
    DEFAULT_META_REPEATS,
    DEFAULT_PEERS,
    DEFAULT_ROUNDS,
    DEFAULT_WORKLOADS,
    META_BATCHED,
    META_QUICK,
    run_meta_suite,
)
from loft.bench.meta_workloads import META_WORKLOADS
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
    "torchopt": ("a peer (left out with a note when not installed, unless named)",
                 "--implementations without torchopt"),
    "matplotlib": ("the plot", "--no-plot"),
    "tqdm": ("the progress bar", "--no-progress"),
}
INSTALL_COMMAND = "pip install 'loft[bench]'   (from a checkout of loft: pip install '.[bench]')"
#: Every implementation name ``--implementations`` accepts (either suite's).
ALL_IMPLEMENTATIONS = tuple(dict.fromkeys(
    [i for i in IMPLEMENTATIONS if i != "floor"] + list(DEFAULT_PEERS)))


def _names(values: Sequence[str] | None) -> list[str] | None:
    """``["A,B", "C"]`` -> ``["A", "B", "C"]`` (commas or spaces both work)."""
    if values is None:
        return None
    return [part for value in values for part in value.split(",") if part]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    workloads = " ".join(META_WORKLOADS)
    parser = argparse.ArgumentParser(
        prog="python -m loft.bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark loft's differentiable inner loops on real meta-learning\n"
                    "workloads against higher, torchopt, a torch.func.functional_call loop\n"
                    "and the floor (forward + gradients, no update), then on three synthetic\n"
                    "models (A, B, C). Every measurement runs in a fresh process.",
        epilog=(
            "what runs:\n"
            "  python -m loft.bench             real workloads (all peers), then models A B C\n"
            "  python -m loft.bench --quick     real workloads, loft vs higher and the floor "
            "(about a minute)\n"
            "  --workloads ...                  selects the real workloads; --models/--steps "
            "the A B C suite\n"
            "  python -m loft.bench --batched   loft-batched (innerloop_ctx(..., tasks=N)) vs "
            "loft, higher:\n"
            "                                   sinusoid and omniglot (16 tasks), SGD\n"
            "  python -m loft.bench --long      the long-inner-loop suite instead\n"
            "\nreal workloads:\n" + "".join(
                f"  {name:<10} {spec.description}\n" for name, spec in META_WORKLOADS.items())
            + "\noutput: meta.txt/json/png (real workloads), results.txt/json/png (A B C), in "
              "--out"))
    parser.add_argument("--workloads", nargs="+", metavar="W",
                        help=f"real workloads (default: {workloads})")
    parser.add_argument("--models", nargs="+", metavar="M",
                        help=f"synthetic models (default run: {' '.join(DEFAULT_MODELS)}; "
                             f"naming them runs that suite)")
    parser.add_argument("--optimizers", nargs="+", metavar="O",
                        help=f"inner optimisers, both suites (default: "
                             f"{' '.join(DEFAULT_OPTIMIZERS)}; omniglot, meta-sgd and "
                             f"context have sgd only)")
    parser.add_argument("--steps", nargs="+", type=int, metavar="T",
                        help=f"inner steps of models A B C (default: "
                             f"{' '.join(map(str, DEFAULT_STEPS))}; --long: "
                             f"{' '.join(map(str, DEFAULT_LONG_STEPS))}; --long --quick: "
                             f"{' '.join(map(str, LONG_QUICK['steps']))}); the real "
                             f"workloads keep their published 5 steps")
    parser.add_argument("--implementations", nargs="+", metavar="I",
                        help=f"subset of: {' '.join(ALL_IMPLEMENTATIONS)} (default: every "
                             f"installed one that runs the suite; --quick, --batched: loft "
                             f"higher); the floor runs unless --no-floor; --batched adds "
                             f"loft-batched")
    parser.add_argument("--repeats", type=int,
                        help=f"timed runs per process (real workloads: meta-iterations, "
                             f"default {DEFAULT_META_REPEATS}; A B C: inner loops, default 5; "
                             f"--quick: 3; --long: {DEFAULT_LONG_REPEATS} fresh processes "
                             f"per mode and T; --long --quick: {LONG_QUICK['repeats']})")
    parser.add_argument("--rounds", type=int,
                        help=f"real workloads: fresh processes per measurement, the order of "
                             f"the implementations changing each round; the median over the "
                             f"rounds is reported (default: {DEFAULT_ROUNDS}; --quick: "
                             f"{META_QUICK['rounds']})")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: the real workloads, loft vs higher and the floor, "
                             "2 rounds of 3 meta-iterations (about a minute on 2 cores); with "
                             "--models: T = 50, 3 repeats; with --long: T = 20 40, 1 repeat")
    parser.add_argument("--batched", action="store_true",
                        help="the real workloads' batched variant: loft-batched (each "
                             "meta-batch as one innerloop_ctx(..., tasks=N)) against loft, "
                             "higher and the floor on sinusoid and omniglot (16 tasks) with "
                             "SGD, plus its saved bytes per inner step against N x one "
                             "task's; --workloads/--optimizers/--implementations override "
                             "those defaults")
    parser.add_argument("--long", action="store_true",
                        help="the long-inner-loop suite instead: 8 x Linear(128,128)"
                             "+ReLU, Adam, batch 32, on cpu; full unroll vs "
                             "checkpoint_every=17 vs truncate() every 20 steps vs "
                             "first_order; peak RSS growth and time against T, each run "
                             "in a fresh process; writes long.json, long.txt, long.png")
    parser.add_argument("--check", action="store_true",
                        help="for maintainers: also print (and save) the speed targets, "
                             "met or missed")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda[:i], models A B C only (default: cpu; the real "
                             "workloads run on cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP/MKL threads per worker (default: 1)")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare-floor runs")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds before a worker is abandoned (default: 600)")
    parser.add_argument("--time-budget", type=float,
                        help=f"seconds of timed runs per process: slow ones take fewer "
                             f"repeats (default: real workloads {DEFAULT_META_TIME_BUDGET_S:g}, "
                             f"--quick {META_QUICK['time_budget_s']:g}, at least 2 "
                             f"meta-iterations; A B C {DEFAULT_TIME_BUDGET_S:g}, at least 1)")
    parser.add_argument("--out", default="loft-bench",
                        help="output directory (default: ./loft-bench/)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.steps is not None and min(args.steps) < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    for name in _names(args.implementations) or []:
        if name not in ALL_IMPLEMENTATIONS:
            parser.error(f"--implementations: unknown {name!r}; choose from "
                         f"{' '.join(ALL_IMPLEMENTATIONS)}")
    for name in _names(args.workloads) or []:
        if name not in META_WORKLOADS:
            parser.error(f"--workloads: unknown {name!r}; choose from {workloads}")
    if args.long:
        _check_long_args(parser, args)
    elif (args.workloads is not None or args.batched) and args.device != "cpu":
        parser.error(f"the real workloads run on cpu only, got --device {args.device}")
    elif args.batched and (args.models is not None or args.steps is not None):
        parser.error("--batched measures the real workloads only, not --models/--steps")
    return args


def _check_long_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--long`` has one fixed workload: refuse the options that would change it."""
    for option in ("models", "optimizers", "implementations", "workloads", "rounds",
                   "batched"):
        if getattr(args, option) not in (None, False):
            parser.error(f"--{option} does not apply to --long (its workload is fixed)")
    if args.device != "cpu":
        parser.error(f"--long runs on cpu only, got --device {args.device}")


def selected_suites(args: argparse.Namespace) -> list[str]:
    """The suites this run measures, in order: ``"meta"`` (the real workloads) and
    ``"abc"`` (models A B C); ``["long"]`` with ``--long``."""
    if args.long:
        return ["long"]
    named_abc = args.models is not None or args.steps is not None
    meta = args.workloads is not None or args.batched or (not named_abc and
                                                          args.device == "cpu")
    abc = named_abc or (not args.quick and not args.batched and args.workloads is None)
    return [name for name, wanted in (("meta", meta), ("abc", abc)) if wanted]


def suite_implementations(args: argparse.Namespace, suite: str) -> list[str] | None:
    """The implementations ``suite`` measures: those of ``--implementations`` it has
    (None: its default, every installed one; ``--quick``'s and ``--batched``'s real
    workloads: loft, higher; ``--batched`` adds loft-batched in the suite)."""
    names = _names(args.implementations)
    if names is None:
        if suite == "meta" and args.batched:
            return list(META_BATCHED["implementations"])
        if suite == "meta" and args.quick:
            return list(META_QUICK["implementations"])
        return None
    known = DEFAULT_PEERS if suite == "meta" else [i for i in IMPLEMENTATIONS if i != "floor"]
    return [name for name in names if name in known]


def needed_modules(args: argparse.Namespace) -> list[str]:
    """The optional modules this run imports: higher (when measured), torchopt (when
    named), matplotlib (unless ``--no-plot``), tqdm (unless ``--no-progress``)."""
    needed = []
    named = _names(args.implementations) or []
    if not args.long and (args.implementations is None or "higher" in named):
        needed.append("higher")
    if not args.long and "torchopt" in named:
        needed.append("torchopt")
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
    """Run a suite, print its table (and with ``--check`` its targets) and save its files;
    the exit status (2: bad arguments, 1: every measurement failed, or the plot failed:
    the JSON and the table are written all the same)."""
    try:
        result = run()
    except ValueError as exc:
        print(f"loft.bench: {exc}", file=sys.stderr)
        return 2
    print(result.table())
    if args.check:
        print()
        print(result._check_table())
    try:
        paths = result.save(args.out, plot=not args.no_plot, check=args.check)
    except PlotError as exc:
        print("\nwrote " + ", ".join(str(p) for p in exc.paths.values()))
        print(f"loft.bench: {exc}", file=sys.stderr)
        return 1
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if result.errors and len(result.errors) == len(result.records) else 0


def run_meta(args: argparse.Namespace, argv: Sequence[str]) -> Callable[[], Any]:
    """The real-workload suite as ``args`` ask for it (``--quick``: :data:`META_QUICK`;
    ``--batched``: :data:`META_BATCHED`)."""
    quick, batched = args.quick, args.batched
    budget = args.time_budget if args.time_budget is not None else (
        META_QUICK["time_budget_s"] if quick else DEFAULT_META_TIME_BUDGET_S)
    return lambda: run_meta_suite(
        workloads=_names(args.workloads) or (META_BATCHED["workloads"] if batched
                                             else DEFAULT_WORKLOADS),
        optimizers=_names(args.optimizers) or (META_BATCHED["optimizers"] if batched
                                               else None),
        implementations=suite_implementations(args, "meta"),
        repeats=args.repeats or (META_QUICK["repeats"] if quick else DEFAULT_META_REPEATS),
        rounds=args.rounds or (META_QUICK["rounds"] if quick else DEFAULT_ROUNDS),
        threads=args.threads,
        floor=not args.no_floor,
        progress=not args.no_progress,
        timeout=args.timeout,
        command=shlex.join(["python", "-m", "loft.bench", *argv]),
        time_budget_s=budget,
        batched=batched,
    )


def run_abc(args: argparse.Namespace, argv: Sequence[str]) -> Callable[[], Any]:
    """The models A B C suite as ``args`` ask for it (``--quick``: :data:`QUICK`)."""
    defaults = QUICK if args.quick else {"models": DEFAULT_MODELS,
                                         "optimizers": DEFAULT_OPTIMIZERS,
                                         "steps": DEFAULT_STEPS, "repeats": 5}
    return lambda: run_suite(
        models=_names(args.models) or defaults["models"],
        optimizers=_names(args.optimizers) or defaults["optimizers"],
        steps=args.steps or defaults["steps"],
        implementations=suite_implementations(args, "abc"),
        repeats=args.repeats or defaults["repeats"],
        device=args.device,
        threads=args.threads,
        floor=not args.no_floor,
        progress=not args.no_progress,
        timeout=args.timeout,
        command=shlex.join(["python", "-m", "loft.bench", *argv]),
        time_budget_s=args.time_budget if args.time_budget is not None
        else DEFAULT_TIME_BUDGET_S,
    )


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
    status = 0
    suites = selected_suites(args)
    for k, suite in enumerate(suites):
        if k:
            print("\n")
        if suite_implementations(args, suite) == []:
            print(f"loft.bench: no implementation of --implementations runs the "
                  f"{'real workloads' if suite == 'meta' else 'models A B C'}: skipped")
            continue
        run = run_meta(args, argv) if suite == "meta" else run_abc(args, argv)
        status = max(status, _report(args, run))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
