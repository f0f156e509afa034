"""Worker entry point: one measurement in this (fresh) process, written as JSON.

``python -m loft.bench._worker --json SPEC [--output FILE]`` where ``SPEC`` is

.. code-block:: json

    {"workload": {"model": "A", "optimizer": "adam", "steps": 50},
     "implementation": "loft", "repeats": 5, "device": "cpu", "threads": 1}

It fixes the thread count (``torch.set_num_threads``; the suite also sets
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` in this process's environment before Python
starts, and ``LOFT_BACKEND`` for the loft implementations), runs
:func:`loft.bench.measure.measure` and writes its result (one JSON object) to
``FILE``, or to stdout after the line ``--- loft.bench result ---``.

A spec ``{"suite": "long", "mode": "checkpoint", "steps": 300, "threads": 1}`` runs one
measurement of the ``--long`` suite instead (:func:`loft.bench.long.measure_long`), and
``{"suite": "meta", "workload": {"name": "sinusoid", "optimizer": "adam"},
"implementation": "torchopt", "repeats": 5}`` one of the real workloads
(:func:`loft.bench.meta_measure.measure_meta`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from typing import Any

RESULT_MARKER = "--- loft.bench result ---"

#: The ``LOFT_BACKEND`` each loft implementation must run under.
EXPECTED_BACKEND = {"loft": "fused", "loft-reference": "reference"}


def _freeze_imports() -> None:
    """Move every object alive now (torch's modules, mostly) to the collector's permanent
    generation. The harness calls ``gc.collect()`` before each timed run; with torch
    imported, a full collection walks a million objects (about 0.13 s on a 2-core VM),
    so a worker spent most of its life collecting. Frozen objects are never freed, which
    is right for the imports of a process that exits after one measurement."""
    gc.collect()
    gc.freeze()


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement described by ``spec`` (see the module docstring)."""
    import torch

    threads = int(spec.get("threads", 1))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set by a parallel region
        pass
    if spec.get("suite") == "long":
        from loft.bench.long import run_long_spec

        _freeze_imports()
        return run_long_spec(spec)
    implementation = spec["implementation"]
    if spec.get("suite") == "meta":
        from loft.bench.meta_measure import run_meta_spec

        _freeze_imports()
        result = run_meta_spec(spec)
    else:
        from loft.bench.measure import DEFAULT_TIME_BUDGET_S, measure
        from loft.bench.workloads import Workload

        _freeze_imports()
        result = measure(Workload.from_dict(spec["workload"]), implementation,
                         repeats=int(spec.get("repeats", 5)), device=spec.get("device", "cpu"),
                         memory=bool(spec.get("memory", True)),
                         time_budget_s=spec.get("time_budget_s", DEFAULT_TIME_BUDGET_S))
    result["env"] = {k: os.environ.get(k) for k in
                     ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOFT_BACKEND")}
    expected = EXPECTED_BACKEND.get(implementation)
    if expected is not None and result.get("loft_backend") != expected:
        result["warning"] = (f"{implementation} ran on loft's {result.get('loft_backend')!r} "
                             f"backend, not {expected!r}: {result.get('loft_backend_reason')}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loft.bench._worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="the measurement spec, a JSON object")
    parser.add_argument("--output", help="write the result here (default: stdout)")
    args = parser.parse_args(argv)
    result = run_spec(json.loads(args.json))
    text = json.dumps(result)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(f"{RESULT_MARKER}\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
