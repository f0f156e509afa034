"""Profile one (workload, implementation) with ``torch.profiler``.

``python -m loft.bench.profile --model A --optimizer adam --steps 50 --impl loft``
warms up twice, then profiles one run and prints two tables of self CPU time by op,
one for the inner loop and one for the meta-backward, with their wall times (the
profiler adds overhead to every op: compare implementations under it, not with the
suite's figures). ``--trace PREFIX`` writes Chrome traces ``PREFIX.inner.json`` and
``PREFIX.meta.json``. Single-threaded by default, like the suite.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from loft.bench.measure import make_runner
from loft.bench.workloads import Workload, build


def profile_run(workload: Workload, implementation: str, row_limit: int = 25,
                trace: str | None = None) -> dict[str, Any]:
    """Profile one warm run: the two tables as text, and the wall times in seconds."""
    runner = make_runner(implementation, build(workload))
    for _ in range(2):  # warm-up
        runner.built.model.zero_grad(set_to_none=True)
        runner.setup()
        for _ in range(workload.steps):
            runner.step()
        runner.meta_backward(runner.query_loss())
        runner.teardown()
    runner.built.model.zero_grad(set_to_none=True)
    runner.setup()
    activities = [ProfilerActivity.CPU]
    with profile(activities=activities) as inner_prof:
        t0 = time.perf_counter()
        with record_function("inner_loop"):
            for _ in range(workload.steps):
                runner.step()
        t1 = time.perf_counter()
    query = runner.query_loss()
    with profile(activities=activities) as meta_prof:
        t2 = time.perf_counter()
        with record_function("meta_backward"):
            runner.meta_backward(query)
        t3 = time.perf_counter()
    runner.teardown()
    if trace:
        inner_prof.export_chrome_trace(trace + ".inner.json")
        meta_prof.export_chrome_trace(trace + ".meta.json")
    return {
        "inner_table": inner_prof.key_averages().table(sort_by="self_cpu_time_total",
                                                       row_limit=row_limit),
        "meta_table": meta_prof.key_averages().table(sort_by="self_cpu_time_total",
                                                     row_limit=row_limit),
        "inner_s": t1 - t0,
        "meta_backward_s": t3 - t2,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loft.bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="A")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--impl", default="loft",
                        help="loft, per-tensor, higher or floor (default: loft)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", help="write Chrome traces PREFIX.inner.json, PREFIX.meta.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    optimizer = "none" if args.impl == "floor" else args.optimizer
    result = profile_run(Workload(args.model, optimizer, args.steps), args.impl, args.rows,
                         args.trace)
    print(f"{args.impl} {args.model}/{optimizer}/T={args.steps}: inner loop "
          f"{result['inner_s'] * 1e3:.1f} ms, meta-backward {result['meta_backward_s'] * 1e3:.1f} "
          f"ms (under the profiler)")
    print("== inner loop ==")
    print(result["inner_table"])
    print("== meta-backward ==")
    print(result["meta_table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
