"""Print the deterministic figures of a `loft.bench` results.json, one line a record.

Usage: python tools/bench_figures.py RESULTS.json
(diff two runs' output to check that a refactor changed none of them)
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    results = json.load(open(sys.argv[1]))
    for record in sorted(
        results["records"],
        key=lambda r: (r["workload"]["model"], r["workload"]["optimizer"],
                       r["workload"]["steps"], r["implementation"]),
    ):
        workload = record["workload"]
        print(
            workload["model"], workload["optimizer"], workload["steps"], record["implementation"],
            "saved_bytes", record["saved_bytes"], "saved_bytes_inner", record["saved_bytes_inner"],
            "saved_storages", record["saved_storages"], "graph_nodes", record["graph_nodes"],
            "nodes_per_step", record["nodes_per_step"],
            "saved_bytes_per_step", record["saved_bytes_per_step"],
        )


if __name__ == "__main__":
    main()
