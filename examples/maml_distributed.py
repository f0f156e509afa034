"""MAML sine regression across processes: each rank adapts its share of the meta-batch, and
DistributedDataParallel averages the meta-gradients during the meta-backward.

Launch with torchrun (one process per core or GPU)::

    torchrun --standalone --nproc_per_node 2 examples/maml_distributed.py [--meta-iterations 200]
        [--meta-batch 16] [--inner-steps 5] [--batched] [--hidden 40] [--measure-overlap]

Several machines: the same command on each, with ``--nnodes N --node_rank i
--rdzv_backend c10d --rdzv_endpoint HOST:PORT --rdzv_id JOB`` (see docs/distributed.md).

Every rank draws the same meta-batch (the same seed) and adapts its own slice of it:
``--batched`` as one ``innerloop_ctx(DDP(model), opt, tasks=k)``, otherwise one context
per task, all but the last inside ``ddp.no_sync()`` so that the meta-gradients are
averaged once per meta-iteration. Each task's query loss is scaled by ``world size /
meta-batch``: DDP's average over ranks then gives the mean over the whole meta-batch,
the same meta-gradient as one process running ``maml_sinusoid.py`` on it.

Rank 0 prints the meta-loss, the median time per meta-iteration and, with
``--measure-overlap``, how much of the all-reduce the meta-backward hides: the time per
meta-iteration with and without communication (everything under ``no_sync``) against the
time of the all-reduce alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import loft

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from maml_sinusoid import sample_tasks, task_mse  # noqa: E402 - the example next door


def make_model(hidden: int) -> nn.Module:
    """The MAML paper's ReLU regressor, 1-``hidden``-``hidden``-1."""
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


def meta_iteration(ddp: DistributedDataParallel, inner_opt: torch.optim.Optimizer,
                   tasks: tuple[torch.Tensor, ...], scale: float, inner_steps: int,
                   batched: bool, sync: bool = True) -> float:
    """This rank's tasks: inner loops and the meta-backward (averaged across ranks by DDP
    unless ``sync`` is false). Returns the rank's summed scaled query loss."""
    x_support, y_support, x_query, y_query = tasks
    count = x_support.shape[0]
    groups = [range(count)] if batched else [range(i, i + 1) for i in range(count)]
    total = 0.0
    for k, group in enumerate(groups):
        quiet = not sync or k < len(groups) - 1
        with ddp.no_sync() if quiet else contextlib.nullcontext():
            with loft.innerloop_ctx(ddp, inner_opt, copy_initial_weights=False,
                                    tasks=len(group)) as (fmodel, diffopt):
                xs, ys = x_support[group.start:group.stop], y_support[group.start:group.stop]
                for _ in range(inner_steps):
                    diffopt.step(task_mse(fmodel(xs), ys))
                loss = task_mse(fmodel(x_query[group.start:group.stop]),
                                y_query[group.start:group.stop]).sum() * scale
                loss.backward()
        total += loss.item()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-iterations", type=int, default=200)
    parser.add_argument("--meta-batch", type=int, default=16,
                        help="tasks per meta-update, over all ranks")
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--meta-lr", type=float, default=0.001)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=40, help="hidden units per layer")
    parser.add_argument("--batched", action="store_true",
                        help="each rank's tasks as one innerloop_ctx(..., tasks=k)")
    parser.add_argument("--measure-overlap", action="store_true",
                        help="also time meta-iterations without communication and the "
                             "all-reduce alone")
    parser.add_argument("--overlap-repeats", type=int, default=40,
                        help="interleaved repeats of --measure-overlap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds before a stalled peer fails a collective")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.meta_batch % world:
        raise SystemExit(f"--meta-batch {args.meta_batch} must be a multiple of the "
                         f"{world} processes")
    per_rank = args.meta_batch // world
    torch.manual_seed(args.seed)
    ddp = DistributedDataParallel(make_model(args.hidden))
    inner_opt = torch.optim.SGD(ddp.parameters(), lr=args.inner_lr)
    meta_opt = torch.optim.Adam(ddp.parameters(), lr=args.meta_lr)
    generator = torch.Generator().manual_seed(args.seed)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    scale = world / args.meta_batch

    last_loss = [0.0]

    def run(sync: bool = True) -> float:
        tasks = sample_tasks(args.meta_batch, args.shots, args.shots, generator,
                             torch.device("cpu"))
        meta_opt.zero_grad()
        start = time.perf_counter()
        loss = meta_iteration(ddp, inner_opt, tuple(t[mine] for t in tasks), scale,
                              args.inner_steps, args.batched, sync)
        seconds = time.perf_counter() - start
        if sync:
            meta_opt.step()
        last_loss[0] = loss
        return seconds

    seconds = []
    for i in range(args.meta_iterations):
        seconds.append(run())
        if i % max(args.meta_iterations // 10, 1) == 0 or i == args.meta_iterations - 1:
            loss = torch.tensor([last_loss[0]])
            dist.all_reduce(loss)  # world x the mean query loss over the meta-batch
            if rank == 0:
                print(f"meta-iteration {i}: meta-loss {loss.item() / world:.4f}")
    if rank == 0:
        print(f"{world} process(es), {per_rank} task(s) each"
              f"{' (batched)' if args.batched else ''}: median "
              f"{1e3 * statistics.median(seconds[len(seconds) // 5:]):.2f} ms per "
              f"meta-iteration")
    if args.measure_overlap:
        _measure_overlap(ddp, run, rank, args.overlap_repeats)
    dist.destroy_process_group()


def _measure_overlap(ddp: DistributedDataParallel, run: Callable[[bool], float],
                     rank: int, repeats: int) -> None:
    """Medians over interleaved repeats, each the slowest rank's time: a meta-iteration
    with and without communication (no_sync everywhere; the meta-optimiser does not
    step), and the all-reduce of the meta-gradients alone; prints the fraction of the
    all-reduce that the overlap hides."""
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
    synced, silent, alone = [], [], []
    for _ in range(repeats):
        dist.barrier()
        synced.append(run(sync=True))
        dist.barrier()
        silent.append(run(sync=False))
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat.clone())
        alone.append(time.perf_counter() - start)
    # Each repeat counts as long as its slowest rank (a synchronised iteration waits for
    # it; an unsynchronised one would not, which is load imbalance, not communication).
    times = torch.tensor([synced, silent, alone], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    t_sync, t_silent, t_comm = (statistics.median(v) for v in times.tolist())
    # Paired: each repeat's synchronised iteration against the unsynchronised one right
    # after it (the machine's drift cancels).
    exposed = max(statistics.median((times[0] - times[1]).tolist()), 0.0)
    hidden = 1.0 - min(exposed / t_comm, 1.0) if t_comm > 0 else 1.0
    if rank == 0:
        print(f"overlap: {1e3 * t_sync:.2f} ms with communication, {1e3 * t_silent:.2f} ms "
              f"without (paired difference {1e3 * exposed:.3f} ms), all-reduce of "
              f"{flat.numel()} meta-gradients alone {1e3 * t_comm:.3f} ms: "
              f"{100 * hidden:.0f}% of it hidden")


if __name__ == "__main__":
    main()
