"""Batched tasks against sequential loops, interleaved in one process (issue 16).

One MAML meta-iteration (the meta-gradient, no meta step) by higher's sequential loop,
loft's sequential loop and loft's batched loop (``tasks=N``), alternated ``--rounds``
times on the same data, 1 thread: ``sinusoid`` (MLP 1-40-40-1, 25 tasks, 5 plain-SGD
steps, lr 0.01, 10 support and 10 query points) or ``omniglot`` (higher's MAML-Omniglot
network, 16 tasks of 5-way 5-shot with 15 queries per class on random 28 x 28 images, 5
SGD steps, lr 0.1). Prints each implementation's minimum and
median and the ratios of both: the minimum is the machine at its quietest, which a
noisy VM reaches for every implementation in turn.

    python benchmarks/batched_interleaved.py [--workload sinusoid|omniglot] [--rounds 100]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import higher
import torch
import torch.nn.functional as F
from torch import Tensor

import loft
from loft.bench.meta_workloads import omniglot_net, sine_mlp

STEPS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--workload", choices=("sinusoid", "omniglot"), default="sinusoid")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.workload == "sinusoid":
        tasks, lr, model = 25, 0.01, sine_mlp()
        amplitude = torch.empty(tasks, 1, 1).uniform_(0.1, 5.0)
        phase = torch.empty(tasks, 1, 1).uniform_(0.0, 3.14159)
        xs, xq = (torch.empty(tasks, 10, 1).uniform_(-5, 5) for _ in range(2))
        ys, yq = amplitude * torch.sin(xs - phase), amplitude * torch.sin(xq - phase)

        def losses(out: Tensor, y: Tensor) -> Tensor:  # [N] (or a scalar for one task)
            return (out - y).square().flatten(-2).mean(-1)
    else:
        tasks, lr, model = 16, 0.1, omniglot_net()
        xs, xq = torch.randn(tasks, 25, 1, 28, 28), torch.randn(tasks, 75, 1, 28, 28)
        ys = torch.arange(5).repeat_interleave(5).repeat(tasks, 1)
        yq = torch.arange(5).repeat_interleave(15).repeat(tasks, 1)

        def losses(out: Tensor, y: Tensor) -> Tensor:
            if out.dim() == 2:
                return F.cross_entropy(out, y)
            return F.cross_entropy(out.flatten(0, 1), y.flatten(),
                                   reduction="none").view(out.shape[0], -1).mean(1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def sequential(lib: object) -> Callable[[], None]:
        def run() -> None:
            for t in range(tasks):
                with lib.innerloop_ctx(model, opt,  # type: ignore[attr-defined]
                                       copy_initial_weights=False) as (fmodel, diffopt):
                    for _ in range(STEPS):
                        diffopt.step(losses(fmodel(xs[t]), ys[t]))
                    losses(fmodel(xq[t]), yq[t]).backward()
        return run

    def batched() -> None:
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False,
                                tasks=tasks) as (fmodel, diffopt):
            for _ in range(STEPS):
                diffopt.step(losses(fmodel(xs), ys))
            losses(fmodel(xq), yq).sum().backward()

    runs = {"higher": sequential(higher), "loft": sequential(loft), "loft-batched": batched}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.rounds):
        for name, run in runs.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:13s} min {1e3 * min(values):7.2f} ms   median "
              f"{1e3 * statistics.median(values):7.2f} ms")
    for versus in ("higher", "loft"):
        low = min(times[versus]) / min(times["loft-batched"])
        mid = statistics.median(times[versus]) / statistics.median(times["loft-batched"])
        print(f"loft-batched vs {versus}: {low:.2f}x (minima), {mid:.2f}x (medians)")


if __name__ == "__main__":
    main()
