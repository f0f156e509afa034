"""Entering and leaving an inner-loop context, and a MAML meta-iteration, loft vs higher.

Two measurements, each in a fresh process per (implementation, workload), on one
intra-op thread, implementations alternating within every run:

- ``context``: ``with innerloop_ctx(model, SGD, copy_initial_weights=False): pass``
  (monkeypatch + get_diff_optim + leaving the block), median over ``--repeats``, on
  higher's MAML-Omniglot network (3 x [Conv2d(., 64, 3), BatchNorm2d(64, momentum=1),
  ReLU, MaxPool2d(2)] + Flatten + Linear(64, 5)) and on a Linear(64, 5) that holds a
  32 MB tensor attribute (a lookup table);
- ``step``: the patched model's share of an inner step on the sine MLP below:
  ``fmodel.update_params(new weights)`` (as the optimiser calls it) then ``fmodel(x)``
  on 10 points, with grad mode on, median over ``--repeats`` x 10;
- ``sine``: one MAML sine-regression meta-iteration (MLP 1-40-40-1, plain SGD, 5 inner
  steps on 10 support points for each of 25 tasks, query loss, meta-backward), median
  over ``--repeats`` meta-iterations; also reported per inner step (the iteration's
  time over its 125 steps, context entry and meta-backward included).

Implementations are named on the command line: ``higher`` (the installed package) or
``NAME=PATH``, a loft checkout's ``python/`` folder put first on ``PYTHONPATH``::

    git archive BASE python | tar -x -C /tmp/loft-before
    python benchmarks/context_entry.py --impl before=/tmp/loft-before/python \\
        --impl after=python --impl higher --runs 3 --json context_entry.json

Prints one line per (run, workload, implementation) and a summary: the median of each
run's median, with the spread (min to max over the runs). Timings on a shared 2-core VM
move by 5 to 30 % between runs: compare implementations within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKLOADS = ("omniglot", "table32mb", "step", "sine")


def _omniglot() -> Any:
    from torch import nn

    layers: list[nn.Module] = []
    for channels_in in (1, 64, 64):
        layers += [nn.Conv2d(channels_in, 64, 3), nn.BatchNorm2d(64, momentum=1, affine=True),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, 5))


def _table() -> Any:
    import torch
    from torch import nn

    class WithTable(nn.Module):
        """A small layer and a 32 MB plain tensor attribute (not a buffer)."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 5)
            self.table = torch.randn(8 * 2**20)  # 8 Mi float32 = 32 MB

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    return WithTable()


def _median_ms(fn: Any, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6


def _worker(impl: str, workload: str, repeats: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    lib: Any
    if impl == "higher":
        import higher as lib
    else:
        import loft as lib

        if lib.backend() != "fused":  # also loads the kernels before timing
            print(f"warning: loft runs on its reference path: {lib.backend_reason()}",
                  file=sys.stderr)
    if workload in ("omniglot", "table32mb"):
        model = _omniglot() if workload == "omniglot" else _table()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def enter_and_leave() -> None:
            with lib.innerloop_ctx(model, opt, copy_initial_weights=False):
                pass

        return {"ms": _median_ms(enter_and_leave, repeats, warmup=max(5, repeats // 10))}
    from torch import nn

    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 1))
    if workload == "step":
        fmodel = lib.monkeypatch(model, copy_initial_weights=False)
        new = [p.clone() for p in model.parameters()]
        points = torch.rand(10, 1)
        if impl == "higher":
            def update() -> None:
                fmodel.update_params(new)
        else:
            def update() -> None:
                fmodel.update_params(new, _checked=True)  # what loft's optimisers call

        def step() -> None:
            update()
            fmodel(points)
            if len(fmodel._fast_params) > 100:  # keep the history short
                del fmodel._fast_params[1:]
                if hasattr(fmodel, "_times"):
                    del fmodel._times[1:]

        return {"ms": _median_ms(step, repeats * 10, warmup=200)}
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    meta = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    tasks, shots, steps = 25, 10, 5

    def meta_iteration() -> None:
        amplitude = 0.1 + 4.9 * torch.rand(tasks, 1, 1, generator=gen)
        phase = torch.pi * torch.rand(tasks, 1, 1, generator=gen)
        x = 10 * torch.rand(tasks, 2 * shots, 1, generator=gen) - 5
        y = amplitude * torch.sin(x - phase)
        meta.zero_grad()
        for t in range(tasks):
            with lib.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(((fmodel(x[t, :shots]) - y[t, :shots]) ** 2).mean())
                (((fmodel(x[t, shots:]) - y[t, shots:]) ** 2).mean() / tasks).backward()
        meta.step()

    ms = _median_ms(meta_iteration, repeats, warmup=3)
    return {"ms": ms, "per_step_us": ms * 1e3 / (tasks * steps)}


def _run(name: str, path: str | None, workload: str, repeats: int) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if path is not None:
        others = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([str(Path(path).resolve()), *others])
    impl = "higher" if path is None else "loft"
    out = subprocess.run([sys.executable, __file__, "--worker", impl, workload, str(repeats)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} {workload} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", action="append", default=[],
                        help="higher, or NAME=PATH (a loft python/ folder); repeatable")
    parser.add_argument("--workload", action="append", choices=WORKLOADS, default=[])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed repeats per process (default: 400 contexts, "
                             "15 meta-iterations)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, workload, repeats = args.worker
        print(json.dumps(_worker(impl, workload, int(repeats))))
        return
    impls = []
    for spec in args.impl or ["loft=" + str(Path(__file__).resolve().parents[1] / "python"),
                              "higher"]:
        name, _, path = spec.partition("=")
        impls.append((name, path or None))
    workloads = args.workload or list(WORKLOADS)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for run in range(args.runs):
        for workload in workloads:
            repeats = args.repeats or {"sine": 15, "step": 300}.get(workload, 400)
            order = impls if run % 2 == 0 else impls[::-1]
            for name, path in order:
                figures = _run(name, path, workload, repeats)
                results.setdefault(workload, {}).setdefault(name, []).append(figures)
                extra = f"  ({figures['per_step_us']:.0f} us/step)" \
                    if "per_step_us" in figures else ""
                print(f"run {run + 1} {workload:10s} {name:8s} {figures['ms']:9.3f} ms{extra}",
                      flush=True)
    print(f"\nmedian of {args.runs} runs (min..max), torch threads 1")
    for workload, by_impl in results.items():
        for name, runs in by_impl.items():
            ms = [r["ms"] for r in runs]
            line = (f"{workload:10s} {name:8s} {statistics.median(ms):9.3f} ms  "
                    f"({min(ms):.3f}..{max(ms):.3f})")
            if "per_step_us" in runs[0]:
                steps = [r["per_step_us"] for r in runs]
                line += (f"  {statistics.median(steps):.0f} us/step "
                         f"({min(steps):.0f}..{max(steps):.0f})")
            print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
