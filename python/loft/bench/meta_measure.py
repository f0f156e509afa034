"""The implementations ("peers") of a meta-iteration, and its in-process measurement.

A meta-iteration of a :class:`~loft.bench.meta_workloads.MetaWorkload` is, for each of
its tasks: enter the inner loop, take the inner steps on the support set, build the
query loss and ``backward()`` it into the model's weights (``copy_initial_weights=False``),
leave the inner loop; then one step of the meta optimiser. Every peer does exactly that,
its own way (:data:`META_IMPLEMENTATIONS`):

- ``loft``: ``with loft.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as
  (fmodel, diffopt)`` and ``diffopt.step(loss)``: higher's pattern;
- ``loft-batched`` (``python -m loft.bench --batched``; SGD on ``sinusoid`` and
  ``omniglot``): the meta-iteration's tasks stacked along a leading task dimension
  (:func:`~loft.bench.meta_workloads.stack_tasks`) and run as one
  ``loft.innerloop_ctx(model, inner_opt, copy_initial_weights=False, tasks=N)``:
  ``diffopt.step`` on the ``[N]`` per-task losses, one ``backward()`` of the sum of the
  ``[N]`` query losses (the same meta-gradient as the sequential peers' sum over tasks);
- ``higher``: the same code with ``higher`` (0.2.1);
- ``torchopt``: torchopt's MAML pattern: ``inner_opt = torchopt.MetaSGD(model, lr)`` (or
  ``MetaAdam``) made once, ``torchopt.extract_state_dict`` of the model and of
  ``inner_opt`` at the start of the meta-iteration, ``inner_opt.step(loss)`` on the model
  itself, ``torchopt.recover_state_dict`` of both after each task (its examples
  backpropagate the mean of the tasks' query losses once; here each task's query loss
  is backpropagated before the recovery, as for every peer). ``MetaAdam`` gets
  ``eps_root=1e-16`` (:data:`loft.bench.measure.TORCHOPT_EPS_ROOT`: with its default 0
  the meta-gradient is NaN wherever a gradient element is exactly 0). It has no
  per-element learning rate: no Meta-SGD. What it runs on (its compiled op is built
  for one torch release) is recorded as ``torchopt_backend``;
- ``functional_call``: a :func:`torch.func.functional_call` loop with per-tensor updates,
  ``params = [p - lr * g for p, g in zip(params, grads)]`` (Meta-SGD: ``p - lr_p * g``;
  Adam: :class:`loft.bench.baselines.PerTensorAdam`);
- ``floor``: the forward and ``autograd.grad(loss, params, create_graph=True)`` with no
  update; its meta-backward backpropagates the query loss *and* every step's gradients
  with fixed random cotangents (as :class:`loft.bench.measure.FloorRunner`), so it pays
  one Hessian-vector product per step: what any implementation must do. On the
  ``context`` workload the floor is cloning the weights.

:func:`measure_meta` (run by the suite in a fresh worker process per measurement): one
warm-up meta-iteration, then ``repeats`` timed ones, each on the tasks of its own
iteration index (:func:`~loft.bench.meta_workloads.sample_tasks`: the same data for every
peer). Per iteration it records the **whole iteration**, the **inner loop** (the sum
over the tasks of their inner steps) and the **meta-backward** (the sum over the tasks
of the query loss's ``backward()``); the median and the minimum over the repeats are
reported. On ``context`` it times ``ENTRIES`` entries and exits per repeat instead.
For ``loft-batched`` it also records, before the warm-up, the bytes autograd saves for
one inner step (:func:`saved_bytes_per_step`) of the batched context and of one task in
a sequential loft context, and their ratio ``saved_bytes_ratio`` = batched / (N x one
task's): at most 1 when batching saves nothing beyond the N tasks' own tensors.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loft.bench.baselines import PerTensorAdam
from loft.bench.measure import (
    SavedTensorMeter,
    _gc_paused,
    torchopt_backend,
    torchopt_optimizer,
)
from loft.bench.meta_workloads import (
    MetaBuilt,
    MetaWorkload,
    Task,
    build_meta,
    sample_tasks,
    stack_tasks,
)

__all__ = [
    "META_IMPLEMENTATIONS",
    "BATCHED",
    "BATCHED_WORKLOADS",
    "CONTEXT_IMPLEMENTATIONS",
    "DEFAULT_META_TIME_BUDGET_S",
    "ENTRIES",
    "Peer",
    "make_peer",
    "measure_meta",
    "meta_gradients",
    "run_iteration",
    "implementation_supports",
    "saved_bytes_per_step",
]

#: The batched peer: the meta-batch as one ``innerloop_ctx(..., tasks=N)`` (``--batched``).
BATCHED = "loft-batched"
#: The workloads the batched peer runs (with the SGD inner loop): the MAML ones.
BATCHED_WORKLOADS = ("sinusoid", "omniglot")
#: The peers, in report order.
META_IMPLEMENTATIONS = ("loft", BATCHED, "higher", "torchopt", "functional_call", "floor")
#: The peers measured on ``context``: only loft and higher have a context to enter; the
#: floor there is cloning the weights.
CONTEXT_IMPLEMENTATIONS = ("loft", "higher", "floor")
#: Seconds of timed meta-iterations per measurement: slow ones take fewer repeats
#: (at least 2).
DEFAULT_META_TIME_BUDGET_S = 8.0
#: Entries and exits per timed repeat of ``context``.
ENTRIES = 100


def implementation_supports(implementation: str, workload: MetaWorkload) -> bool:
    """Whether ``implementation`` runs ``workload`` (torchopt has no Meta-SGD; only loft,
    higher and the clone floor have a context to enter; loft-batched runs the MAML
    workloads with SGD)."""
    if workload.spec.kind == "context":
        return implementation in CONTEXT_IMPLEMENTATIONS
    if implementation == BATCHED:
        return workload.name in BATCHED_WORKLOADS and workload.optimizer == "sgd"
    if implementation == "torchopt" and workload.name == "meta-sgd":
        return False
    return implementation in META_IMPLEMENTATIONS


# ---- the peers ------------------------------------------------------------------------


class Peer:
    """One implementation of the per-task inner loop on a built workload.

    Per meta-iteration: ``start_iteration()``; per task of ``group(tasks)``: ``begin()``,
    ``step(x, y)`` per inner step, ``query_loss(x, y)``, ``meta_backward(loss)``, ``end()``.
    """

    def __init__(self, built: MetaBuilt) -> None:
        self.built = built
        self.model = built.model
        self.loss = built.workload.loss

    def start_iteration(self) -> None:
        """Anything done once per meta-iteration, before its first task."""

    def group(self, tasks: Sequence[Task]) -> list[Task]:
        """What one meta-iteration runs through ``begin()`` ... ``end()``: each task."""
        return list(tasks)

    def begin(self) -> None:
        raise NotImplementedError

    def step(self, x: Tensor, y: Tensor) -> None:
        raise NotImplementedError

    def query_loss(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def meta_backward(self, loss: Tensor) -> None:
        """Backpropagate the task's query loss into the meta-parameters."""
        loss.backward()

    def end(self) -> None:
        raise NotImplementedError


class ContextPeer(Peer):
    """loft and higher: ``innerloop_ctx`` of either module, ``diffopt.step(loss)``."""

    def __init__(self, built: MetaBuilt, module: Any) -> None:
        super().__init__(built)
        self.module = module
        self._ctx: Any = None
        self.fmodel: Any = None
        self.diffopt: Any = None
        self._kwargs: dict[str, Any] = {"copy_initial_weights": False}
        if built.lrs is not None:
            self._kwargs["override"] = {"lr": built.lrs}

    def begin(self) -> None:
        assert self.built.inner_optimizer is not None
        self._ctx = self.module.innerloop_ctx(self.model, self.built.inner_optimizer,
                                              **self._kwargs)
        self.fmodel, self.diffopt = self._ctx.__enter__()

    def step(self, x: Tensor, y: Tensor) -> None:
        self.diffopt.step(self.loss(self.fmodel(x), y))

    def query_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(self.fmodel(x), y)

    def end(self) -> None:
        self._ctx.__exit__(None, None, None)
        self._ctx = self.fmodel = self.diffopt = None


class BatchedPeer(ContextPeer):
    """loft-batched: the meta-iteration's tasks as one task-batched inner loop
    (``innerloop_ctx(..., tasks=N)``), stepped on the ``[N]`` per-task losses."""

    def __init__(self, built: MetaBuilt) -> None:
        import loft

        super().__init__(built, loft)
        self.task_losses = built.workload.task_losses
        self._kwargs["tasks"] = built.workload.num_tasks

    def group(self, tasks: Sequence[Task]) -> list[Task]:
        """The tasks stacked into one task-batched :class:`Task` (``tasks=len(tasks)``)."""
        self._kwargs["tasks"] = len(tasks)
        return [stack_tasks(tasks)]

    def step(self, x: Tensor, y: Tensor) -> None:
        self.diffopt.step(self.task_losses(self.fmodel(x), y))

    def query_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The ``[N]`` per-task query losses."""
        return self.task_losses(self.fmodel(x), y)

    def meta_backward(self, loss: Tensor) -> None:
        """One ``backward()`` of the tasks' summed query losses."""
        loss.sum().backward()


class TorchoptPeer(Peer):
    """torchopt's MAML pattern (see the module docstring)."""

    def __init__(self, built: MetaBuilt) -> None:
        super().__init__(built)
        import torchopt

        if built.lrs is not None:
            raise ValueError("torchopt has no per-element learning rate: no Meta-SGD peer")
        self.torchopt = torchopt
        assert built.inner_optimizer is not None
        self.inner = torchopt_optimizer(self.model, built.inner_optimizer)
        self._states: tuple[Any, Any] | None = None

    def start_iteration(self) -> None:
        self._states = (
            self.torchopt.extract_state_dict(self.model, by="reference", detach_buffers=True),
            self.torchopt.extract_state_dict(self.inner, by="reference"))

    def begin(self) -> None:
        """Nothing: torchopt steps the model in place."""

    def step(self, x: Tensor, y: Tensor) -> None:
        self.inner.step(self.loss(self.model(x), y))

    def query_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(self.model(x), y)

    def end(self) -> None:
        assert self._states is not None
        self.torchopt.recover_state_dict(self.model, self._states[0])
        self.torchopt.recover_state_dict(self.inner, self._states[1])


class FunctionalCallPeer(Peer):
    """A :func:`torch.func.functional_call` loop with per-tensor updates."""

    def __init__(self, built: MetaBuilt) -> None:
        super().__init__(built)
        self.names = [name for name, _ in self.model.named_parameters()]
        self.lr = built.workload.inner_lr
        self.adam = isinstance(built.inner_optimizer, torch.optim.Adam)
        self.params: list[Tensor] = []

    def _forward(self, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, dict(zip(self.names, self.params)), (x,))

    def begin(self) -> None:
        # copy_initial_weights=False: the fast weights start as the model's own leaves.
        self.params = list(self.model.parameters())
        if self.adam:
            group = self.built.inner_optimizer.param_groups[0]  # type: ignore[union-attr]
            self.rule = PerTensorAdam(self.lr, tuple(group["betas"]), group["eps"])

    def step(self, x: Tensor, y: Tensor) -> None:
        params = self.params
        grads = torch.autograd.grad(self.loss(self._forward(x), y), params, create_graph=True)
        lrs = self.built.lrs
        if self.adam:
            self.params = [self.rule.update(i, p, g)
                           for i, (p, g) in enumerate(zip(params, grads))]
        elif lrs is not None:
            self.params = [p - lr_p * g for p, lr_p, g in zip(params, lrs, grads)]
        else:
            lr = self.lr
            self.params = [p - lr * g for p, g in zip(params, grads)]

    def query_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(self._forward(x), y)

    def end(self) -> None:
        self.params = []


class FloorPeer(Peer):
    """The bare floor: forward and ``autograd.grad(create_graph=True)``, no update; the
    meta-backward also backpropagates every step's gradients (fixed random cotangents)."""

    def __init__(self, built: MetaBuilt) -> None:
        super().__init__(built)
        self.names = [name for name, _ in self.model.named_parameters()]
        gen = torch.Generator().manual_seed(1234)
        self.cotangents = [torch.randn(p.shape, generator=gen).to(p)
                           for p in self.model.parameters()]
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []

    def _forward(self, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, dict(zip(self.names, self.params)), (x,))

    def begin(self) -> None:
        # Differentiable clones, as innerloop_ctx(copy_initial_weights=False) makes.
        self.params = [p.clone() for p in self.model.parameters()]

    def step(self, x: Tensor, y: Tensor) -> None:
        grads = torch.autograd.grad(self.loss(self._forward(x), y), self.params,
                                    create_graph=True)
        self.grads.extend(grads)

    def query_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(self._forward(x), y)

    def meta_backward(self, loss: Tensor) -> None:
        k = len(self.cotangents)
        cotangents = [self.cotangents[i % k] for i in range(len(self.grads))]
        torch.autograd.backward([loss, *self.grads], [torch.ones_like(loss), *cotangents])

    def end(self) -> None:
        self.params, self.grads = [], []


def make_peer(implementation: str, built: MetaBuilt) -> Peer:
    """The :class:`Peer` of ``implementation`` (one of :data:`META_IMPLEMENTATIONS`)."""
    if implementation not in META_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {META_IMPLEMENTATIONS}, got "
                         f"{implementation!r}")
    if not implementation_supports(implementation, built.workload):
        raise ValueError(f"implementation {implementation!r} does not run workload "
                         f"{built.workload.name!r}")
    if implementation == "loft":
        import loft

        return ContextPeer(built, loft)
    if implementation == BATCHED:
        return BatchedPeer(built)
    if implementation == "higher":
        import higher

        return ContextPeer(built, higher)
    if implementation == "torchopt":
        return TorchoptPeer(built)
    if implementation == "functional_call":
        return FunctionalCallPeer(built)
    return FloorPeer(built)


# ---- one meta-iteration ---------------------------------------------------------------


@dataclass
class IterationTimes:
    """Seconds of one meta-iteration: whole, inner loops, meta-backwards."""

    iteration_s: float
    inner_s: float
    meta_backward_s: float


def run_iteration(peer: Peer, tasks: Sequence[Task], meta_step: bool = True) -> IterationTimes:
    """One meta-iteration of ``peer`` over ``tasks``, timed (the collector paused)."""
    built = peer.built
    steps = built.workload.num_steps
    inner = backward = 0.0
    clock = time.perf_counter
    # No full collection right before the clock starts: walking every object evicts the
    # caches, which cost a batched sine meta-iteration (7 ms) 1.5 to 2 ms in one process;
    # measure_meta collects once before the timed iterations instead.
    with _gc_paused(collect=False):
        start = clock()
        built.meta_optimizer.zero_grad(set_to_none=True)
        peer.start_iteration()
        for task in peer.group(tasks):
            peer.begin()
            (xs, ys), (xq, yq) = task.support, task.query
            t0 = clock()
            for _ in range(steps):
                peer.step(xs, ys)
            t1 = clock()
            loss = peer.query_loss(xq, yq)
            t2 = clock()
            peer.meta_backward(loss)
            t3 = clock()
            del loss
            peer.end()
            inner += t1 - t0
            backward += t3 - t2
        if meta_step:
            built.meta_optimizer.step()
        end = clock()
    return IterationTimes(end - start, inner, backward)


def _meta_parameters(built: MetaBuilt) -> list[Tensor]:
    return list(built.model.parameters()) + list(built.lrs or [])


def meta_gradients(workload: MetaWorkload, implementation: str) -> list[Tensor]:
    """The meta-gradients (model weights, then Meta-SGD's lrs) of ``implementation``'s
    first meta-iteration on ``workload``, before the meta step; in this process."""
    built = build_meta(workload)
    peer = make_peer(implementation, built)
    run_iteration(peer, sample_tasks(workload, 0), meta_step=False)
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for p in _meta_parameters(built)]


def _grad_summary(built: MetaBuilt) -> dict[str, Any]:
    grads = [p.grad for p in _meta_parameters(built) if p.grad is not None]
    if not grads:
        return {"meta_grad_norm": None, "meta_grad_finite": None}
    flat = torch.cat([g.flatten() for g in grads])
    finite = bool(torch.isfinite(flat).all())
    return {"meta_grad_norm": float(torch.linalg.vector_norm(flat)) if finite else None,
            "meta_grad_finite": finite}


# ---- the measurement ------------------------------------------------------------------


def saved_bytes_per_step(peer: Peer, task: Task) -> int:
    """Bytes autograd saves for one inner step of ``peer`` on ``task`` (for loft-batched
    a stacked meta-batch): the live saved bytes (:class:`SavedTensorMeter`) after a
    second step minus after the first; no meta-backward, nothing timed."""
    xs, ys = task.support
    meter = SavedTensorMeter()
    peer.begin()
    try:
        with meter:
            peer.step(xs, ys)
            first = meter.live_bytes()
            peer.step(xs, ys)
            second = meter.live_bytes()
    finally:
        peer.end()
    return second - first


def _batched_memory(peer: Peer, workload: MetaWorkload) -> dict[str, Any]:
    """One inner step's saved bytes, batched (``peer``, all tasks) and of one task in a
    sequential loft context, and batched / (N x one task's)."""
    tasks = sample_tasks(workload, 0)
    batched = saved_bytes_per_step(peer, peer.group(tasks)[0])
    one = saved_bytes_per_step(make_peer("loft", peer.built), tasks[0])
    return {"saved_bytes_per_step": batched, "saved_bytes_per_step_one_task": one,
            "saved_bytes_ratio": batched / (len(tasks) * one) if one else None}


def _stats(values: Sequence[float], key: str) -> dict[str, Any]:
    return {key: statistics.median(values), f"{key}_min": min(values), f"{key}_all": list(values)}


def _measure_context(peer: Peer, repeats: int) -> dict[str, Any]:
    """Median over ``repeats`` of the mean time of ``ENTRIES`` entries and exits."""
    peer.begin()
    peer.end()  # warm-up
    per_entry = []
    clock = time.perf_counter
    for _ in range(repeats):
        with _gc_paused():
            t0 = clock()
            for _ in range(ENTRIES):
                peer.begin()
                peer.end()
            per_entry.append((clock() - t0) / ENTRIES)
    return {"repeats": repeats, "entries_per_repeat": ENTRIES, **_stats(per_entry, "entry_s")}


def measure_meta(workload: MetaWorkload, implementation: str, repeats: int = 5,
                 time_budget_s: float | None = DEFAULT_META_TIME_BUDGET_S) -> dict[str, Any]:
    """Measure ``implementation`` on ``workload`` in this process (see the module
    docstring). Returns a JSON-serialisable dict: medians, minima and every repeat
    (seconds), the first meta-gradient's norm, and what ran (backends, versions)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if (implementation == "floor") != (workload.optimizer == "none"):
        raise ValueError(f"the floor and only the floor runs optimizer='none'; got "
                         f"{implementation!r} with {workload.optimizer!r}")
    built = build_meta(workload)
    peer = make_peer(implementation, built)
    result: dict[str, Any] = {
        "workload": workload.to_dict(),
        "implementation": implementation,
        "model": workload.model,
        "tasks": workload.num_tasks,
        "steps": workload.num_steps,
        "num_params": sum(p.numel() for p in built.model.parameters()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pid": os.getpid(),
    }
    result.update(_versions(implementation))
    if workload.spec.kind == "context":
        result.update(_measure_context(peer, repeats))
        return result
    if implementation == BATCHED:
        result.update(_batched_memory(peer, workload))
    run_iteration(peer, sample_tasks(workload, 0), meta_step=False)  # warm-up
    result.update(_grad_summary(built))
    built.meta_optimizer.step()
    gc.collect()
    runs = [run_iteration(peer, sample_tasks(workload, 1))]
    wanted = repeats
    if time_budget_s is not None and runs[0].iteration_s > 0:
        wanted = max(min(2, repeats), min(repeats, int(time_budget_s / runs[0].iteration_s)))
    runs += [run_iteration(peer, sample_tasks(workload, k + 1)) for k in range(1, wanted)]
    result.update(repeats=len(runs), repeats_requested=repeats,
                  **_stats([r.iteration_s for r in runs], "iteration_s"),
                  **_stats([r.inner_s for r in runs], "inner_s"),
                  **_stats([r.meta_backward_s for r in runs], "meta_backward_s"))
    return result


def _versions(implementation: str) -> dict[str, Any]:
    """loft's backend, higher's or torchopt's version and backend, for the record."""
    if implementation in ("loft", BATCHED):
        import loft

        return {"loft_backend": loft.backend(), "loft_backend_reason": loft.backend_reason()}
    if implementation == "higher":
        import higher

        return {"higher": getattr(higher, "__version__", "unknown")}
    if implementation == "torchopt":
        import torchopt

        return {"torchopt": torchopt.__version__, "torchopt_backend": torchopt_backend()}
    return {}


def run_meta_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The worker's entry for ``{"suite": "meta", "workload": {...}, "implementation": ...}``."""
    return measure_meta(MetaWorkload.from_dict(spec["workload"]), spec["implementation"],
                        repeats=int(spec.get("repeats", 5)),
                        time_budget_s=spec.get("time_budget_s", DEFAULT_META_TIME_BUDGET_S))

