"""The ``--long`` suite: long inner loops (issue 6), memory and time against T.

``python -m loft.bench --long`` measures one fixed workload with four ways of running a
long differentiable inner loop, each (mode, T, repeat) in a fresh worker process:

- **workload** (fixed by the issue): CPU, 1 thread; 8 x (``Linear(128, 128)``, ``ReLU``);
  inner optimiser ``torch.optim.Adam(lr=1e-3)``; a different batch of 32 random inputs
  per step, the loss an MSE to random targets in [0, 1) (:func:`make_batches`); ``innerloop_ctx(...,
  copy_initial_weights=False)``; after the T inner steps one query loss and its
  ``backward()`` (the meta-gradient reaches the model's weights).
- **modes** (:data:`LONG_MODES`):

  - ``full``: ``loft.unroll(fmodel, diffopt, loss_fn, batches)``;
  - ``checkpoint``: the same with ``checkpoint_every=17`` (segments recomputed in the
    meta-backward);
  - ``truncate``: a loop of ``diffopt.step(loss_fn(fmodel, batch))`` that calls
    ``diffopt.truncate()`` before steps 20, 40, ... (so the meta-backward runs through
    the last 1 to 20 steps and reaches the fast weights of the last cut, not the
    model's own weights);
  - ``first_order``: the full unroll under ``innerloop_ctx(..., first_order=True)``.

- **one worker process** (:func:`measure_long`): builds the model and all T batches, runs
  a short warm-up of the same mode (:data:`WARMUP_STEPS` steps and its meta-backward),
  collects garbage and returns freed heap to the OS (``malloc_trim``), then times one run:
  inner loop, query forward, meta-backward, and their total. Its **peak RSS growth** is
  the peak resident set over that run minus the RSS before it: ``VmHWM`` reset through
  ``/proc/self/clear_refs`` where allowed, else the growth of ``ru_maxrss`` (a
  process-lifetime peak, hence the fresh process and the short warm-up); see
  :class:`loft.bench.measure.PeakMemory`.
- **the report** (:class:`LongResult`): medians over the repeats per (mode, T), the
  issue's ratios at every T and its targets at T = 300 (:data:`RATIOS`), a text table,
  a JSON file and a plot of peak memory and total time against T.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

# The report (medians, ratios, targets, table, JSON, plot) lives with the suite's in
# loft.bench.results; its names stay importable from here.
from loft.bench.results import (  # noqa: F401 - TARGET_STEPS, summarize: their old home
    LONG_MODES,
    RATIOS,
    TARGET_STEPS,
    WARMUP_STEPS,
    LongResult,
    Ratio,
    summarize,
)

__all__ = [
    "LONG_MODES",
    "DEFAULT_LONG_STEPS",
    "LONG_QUICK",
    "RATIOS",
    "Ratio",
    "LongResult",
    "build_long_model",
    "measure_long",
    "run_long_suite",
]

DEFAULT_LONG_STEPS = (100, 300, 600, 1000)
DEFAULT_LONG_REPEATS = 5
LONG_QUICK: dict[str, Any] = {"steps": (20, 40), "repeats": 1}

WIDTH = 128
DEPTH = 8
BATCH = 32
LR = 1e-3
CHECKPOINT_EVERY = 17
TRUNCATE_EVERY = 20


# ---- the workload ---------------------------------------------------------------------


def build_long_model(seed: int = 0) -> nn.Module:
    """8 x (``Linear(128, 128)``, ``ReLU``), seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers)


def make_batches(count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``count`` batches: ``BATCH`` standard normal inputs, targets uniform in [0, 1).

    The targets are nonnegative because the last layer is followed by a ReLU: with
    standard normal targets Adam drives every output unit dead within about 200 steps,
    and the meta-gradient is then exactly zero.
    """
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, WIDTH, generator=gen), torch.rand(BATCH, WIDTH, generator=gen))
            for _ in range(count)]


def long_loss(fmodel: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The inner and query loss: MSE of the model's outputs to the batch's targets."""
    x, y = batch
    return nn.functional.mse_loss(fmodel(x), y)


def _inner_loop(mode: str, fmodel: Any, diffopt: Any,
                batches: Sequence[tuple[Tensor, Tensor]]) -> None:
    """The T inner steps of ``mode`` (see the module docstring)."""
    import loft

    if mode == "checkpoint":
        loft.unroll(fmodel, diffopt, long_loss, batches, checkpoint_every=CHECKPOINT_EVERY)
    elif mode == "truncate":
        for t, batch in enumerate(batches):
            if t and t % TRUNCATE_EVERY == 0:  # never after the last step: keep a graph
                diffopt.truncate()
            diffopt.step(long_loss(fmodel, batch))
    else:  # full, first_order (the difference is in innerloop_ctx)
        loft.unroll(fmodel, diffopt, long_loss, batches)


# ---- one run, one process -------------------------------------------------------------


def _one_run(mode: str, model: nn.Module, optimizer: torch.optim.Optimizer,
             batches: Sequence[tuple[Tensor, Tensor]],
             query: tuple[Tensor, Tensor]) -> dict[str, Any]:
    """One inner loop + query loss + meta-backward, timed, with its peak RSS growth."""
    import loft
    from loft.bench.measure import PeakMemory

    model.zero_grad(set_to_none=True)
    gc.collect()
    gc.disable()  # no collector pauses inside the timed region
    try:
        with PeakMemory(torch.device("cpu")) as peak:
            with loft.innerloop_ctx(model, optimizer, copy_initial_weights=False,
                                    first_order=mode == "first_order") as (fmodel, diffopt):
                t0 = time.perf_counter()
                _inner_loop(mode, fmodel, diffopt, batches)
                t1 = time.perf_counter()
                meta_loss = long_loss(fmodel, query)
                t2 = time.perf_counter()
                meta_loss.backward()
                t3 = time.perf_counter()
                del meta_loss, fmodel, diffopt
    finally:
        gc.enable()
    return {"inner_s": t1 - t0, "query_s": t2 - t1, "meta_backward_s": t3 - t2,
            "total_s": t3 - t0, "peak_rss_growth_bytes": peak.peak_growth,
            "peak_mem_method": peak.method, "meta_grad_norm": _grad_norm(model)}


def _grad_norm(model: nn.Module) -> float | None:
    """The norm of the meta-gradient on the model's weights (None: it got none, as
    in ``truncate`` mode, whose gradient stops at the fast weights of the last cut)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))


def _release_free_heap() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so the measured run
    does not reuse pages the warm-up left resident. False where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)  # returns whether it released anything; either is fine
    except (OSError, AttributeError, TypeError):
        return False
    return True


def _rss_bytes() -> int | None:
    """The current resident set (``/proc/self/statm``), in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def measure_long(mode: str, steps: int, seed: int = 0) -> dict[str, Any]:
    """Warm up, then measure one run of ``mode`` with ``steps`` inner steps, in this
    process (call it in a fresh one: the peak RSS is a process-wide figure)."""
    if mode not in LONG_MODES:
        raise ValueError(f"mode must be one of {LONG_MODES}, got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    import loft

    model = build_long_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    batches = make_batches(steps, seed + 1)
    query = make_batches(1, seed + 2)[0]
    warmup = min(WARMUP_STEPS, steps)
    _one_run(mode, model, optimizer, batches[:warmup], query)
    gc.collect()
    trimmed = _release_free_heap()
    rss_before = _rss_bytes()
    result = _one_run(mode, model, optimizer, batches, query)
    result.update(mode=mode, steps=steps, warmup_steps=warmup, malloc_trim=trimmed,
                  rss_before_bytes=rss_before, threads=torch.get_num_threads(),
                  loft_backend=loft.backend(), torch=torch.__version__, pid=os.getpid())
    return result


def run_long_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The worker's entry for ``{"suite": "long", "mode": ..., "steps": ...}``."""
    return measure_long(spec["mode"], int(spec["steps"]), int(spec.get("seed", 0)))


# ---- the suite ------------------------------------------------------------------------


def long_specs(steps: Sequence[int], repeats: int,
               modes: Sequence[str] = LONG_MODES) -> list[dict[str, Any]]:
    """One worker spec per (repeat, T, mode); repeats outermost, so that a change of
    machine load during the run falls on every mode alike."""
    return [{"suite": "long", "mode": mode, "steps": int(t), "repeat": k}
            for k in range(repeats) for t in steps for mode in modes]


def run_long_suite(steps: Sequence[int] = DEFAULT_LONG_STEPS,
                   repeats: int = DEFAULT_LONG_REPEATS,
                   modes: Sequence[str] = LONG_MODES, threads: int = 1,
                   progress: bool = True, timeout: float | None = 600.0,
                   command: str | None = None) -> LongResult:
    """Run every (mode, T, repeat) in its own worker process and collect the results."""
    from loft.bench.suite import ForkServer, Progress, _worker_env, load_average, machine_info

    for mode in modes:
        if mode not in LONG_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {list(LONG_MODES)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {list(steps)}")
    specs = long_specs(steps, repeats, modes)
    meta = machine_info(threads, "cpu", command)
    meta.update(suite="long", modes=list(modes), steps=list(steps), repeats=repeats,
                workload=f"{DEPTH} x (Linear({WIDTH},{WIDTH}), ReLU), Adam(lr={LR}), batch "
                         f"{BATCH}, MSE to uniform [0, 1) targets, "
                         f"copy_initial_weights=False",
                checkpoint_every=CHECKPOINT_EVERY, truncate_every=TRUNCATE_EVERY,
                warmup_steps=WARMUP_STEPS)
    env = _worker_env("loft", threads)
    records = []
    with Progress(len(specs), "loft.bench --long", progress) as bar, \
            ForkServer(threads) as launcher:
        for spec in specs:
            bar.start(f"{spec['mode']}/T={spec['steps']}/#{spec['repeat']}")
            record = launcher.run({**spec, "threads": threads}, env, timeout)
            record.update(mode=spec["mode"], steps=spec["steps"], repeat=spec["repeat"])
            records.append(record)
            bar.done()
    meta["load_average_after"] = load_average()
    return LongResult(meta, records)
