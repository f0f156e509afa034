"""The spawned ranks of the multi-process tests (gloo on loopback, a file rendezvous)."""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import loft
from loft import distributed as loft_dist

from ._scenarios import SCENARIOS, gradients, make_model, meta_iteration, new_lr

#: The process group's timeout: a stalled peer fails a collective after this long.
TIMEOUT_S = 5


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))


def run_scenarios(rank: int, world: int, store: str, out: str) -> None:
    """Every scenario of :data:`SCENARIOS` through DDP; writes each one's gradients."""
    _init(rank, world, store)
    results = {}
    try:
        for name, s in SCENARIOS.items():
            model = nn.parallel.DistributedDataParallel(
                make_model(), find_unused_parameters=s.find_unused)
            lr = new_lr(s)
            meta_iteration(s, model, rank, lr)
            if lr is not None:
                loft_dist.average_gradients([lr])
            results[name] = gradients(model.module, lr)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_failure(rank: int, world: int, store: str, out: str, mode: str) -> None:
    """``mode``: "stall" (rank 1 sleeps before the meta-backward), "die" (rank 1 exits
    there) or "differ" (rank 1 changes a weight after DDP was built). Rank 0 writes what
    it raised and how long that took."""
    _init(rank, world, store)
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, dtype=torch.float64)
    start = time.monotonic()
    try:
        if mode == "differ" and rank == 1:
            with torch.no_grad():
                model.module[0].weight[0, 0] += 1.0
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(fmodel(x).square().mean())
            if rank == 1 and mode == "stall":
                time.sleep(6 * TIMEOUT_S)
            if rank == 1 and mode == "die":
                os._exit(0)
            fmodel(x).square().mean().backward()
        outcome = "finished"
    except Exception as error:  # noqa: BLE001 - reported to the test
        outcome = f"{type(error).__name__}: {error}"
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(f"{time.monotonic() - start:.3f}\n{outcome}\n")
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group: the peer may be gone or asleep
