"""Meta-training on DistributedDataParallel at 2 and 3 processes (gloo on loopback,
float64): the meta-gradients equal the mean over ranks of each rank's sum of task
meta-gradients computed in one process, to 1e-10, and every rank holds the same."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import loft
from loft import distributed as loft_dist

from ._scenarios import SCENARIOS, reference
from ._worker import TIMEOUT_S, run_failure, run_scenarios

_SPAWN = multiprocessing.get_context("spawn")


def _spawn(target: Any, world: int, tmp: Path, *args: Any) -> list[Any]:
    store = tmp / "store"
    procs = [_SPAWN.Process(target=target, args=(rank, world, str(store), str(tmp), *args))
             for rank in range(world)]
    for p in procs:
        p.start()
    return procs


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request: Any, tmp_path_factory: Any) -> tuple[int, list[dict[str, list[Any]]]]:
    """Every scenario run once by ``world`` spawned ranks: each rank's gradients."""
    world = request.param
    tmp = tmp_path_factory.mktemp(f"ddp{world}")
    procs = _spawn(run_scenarios, world, tmp)
    for p in procs:
        p.join(timeout=240)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world, f"ranks exited with {codes}"
    return world, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_meta_gradients_are_the_mean_over_ranks(name: str, ranks: Any) -> None:
    """Each scenario: every rank's gradients equal the single-process reference."""
    world, results = ranks
    expected = reference(name, world)
    assert any(float(g.abs().max()) > 1e-3 for g in expected)
    for rank, result in enumerate(results):
        got = result[name]
        assert len(got) == len(expected)
        for k, (a, b) in enumerate(zip(got, expected)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10,
                                       msg=f"rank {rank}, gradient {k}")
        for a, b in zip(got, results[0][name]):
            assert torch.equal(a, b), f"rank {rank} differs from rank 0"


def _failure(mode: str, tmp: Path) -> tuple[float, str]:
    procs = _spawn(run_failure, 2, tmp, mode)
    procs[0].join(timeout=6 * TIMEOUT_S)
    alive = procs[0].is_alive()
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    assert not alive, "rank 0 hung"
    elapsed, outcome = (tmp / "rank0.txt").read_text().split("\n", 1)
    return float(elapsed), outcome.strip()


@pytest.mark.parametrize("mode", ["stall", "die"])
def test_a_stalled_or_dead_rank_fails_the_others(mode: str, tmp_path: Path) -> None:
    """Rank 1 sleeps or exits before the meta-backward: rank 0 raises (a timeout or a
    closed connection) within the process group's timeout, instead of hanging."""
    elapsed, outcome = _failure(mode, tmp_path)
    assert outcome.startswith(("RuntimeError", "DistBackendError", "DistError")), outcome
    assert elapsed < 3 * TIMEOUT_S


def test_parameters_that_differ_across_ranks_are_refused(tmp_path: Path) -> None:
    """A weight changed on one rank after DDP was built: entering the context raises on
    every rank, naming the parameter."""
    _, outcome = _failure("differ", tmp_path)
    assert outcome.startswith("ValueError") and "0.weight" in outcome, outcome


def test_an_uninitialised_process_group_is_an_error(tmp_path: Path) -> None:
    """A DDP model whose process group was destroyed, and average_gradients without one:
    RuntimeError saying to call init_process_group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    model = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
    dist.destroy_process_group()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="init_process_group"):
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False):
            pass
    with pytest.raises(RuntimeError, match="init_process_group"):
        loft_dist.average_gradients([torch.zeros(2, requires_grad=True)])


def test_the_example_runs_under_torchrun(tmp_path: Path) -> None:
    """examples/maml_distributed.py, 2 processes through torchrun (its own launcher
    module), sequential and batched: exits cleanly and reports its timing."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    for extra in ([], ["--batched"]):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node", "2", str(root / "examples" / "maml_distributed.py"),
             "--meta-iterations", "2", "--meta-batch", "4", "--inner-steps", "1",
             "--timeout", "30", *extra],
            capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "2 process(es), 2 task(s) each" in done.stdout, done.stdout
        assert "meta-loss" in done.stdout
