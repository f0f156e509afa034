"""In-process measurement of one (workload, implementation): time, saved memory, graph size.

One *run* is: build the fast weights (setup, not timed), ``T`` inner steps (each a
forward on the support batch, the gradients with ``create_graph=True`` and the
update: **inner-loop time**), then the query loss on the query batch and its
``backward()`` into the model's weights (``copy_initial_weights=False``): the
backward alone is the **meta-backward time**. The query forward is in neither.

:func:`measure` does, in this order, in the calling process (the suite runs each
measurement in a fresh process, see :mod:`loft.bench._worker`):

1. a one-step warm-up (loads kernels, primes the allocator);
2. one instrumented run for the memory and graph figures (no timing taken):

   - **saved bytes**: the bytes of the distinct storages that autograd saves for
     backward during the inner loop and the query loss. A
     :func:`torch.autograd.graph.saved_tensors_hooks` pack hook sees every tensor a
     node saves (forward ops, the double-backward graph built by
     ``autograd.grad(create_graph=True)``, custom ``autograd.Function``s); it records
     the tensor's storage (by identity, see :class:`SavedTensorMeter`), its
     ``nbytes()`` and a weak reference to the tensor. Storages still referenced by the
     graph when the query loss is built are summed, each once (views of one flat
     buffer count once). It is deterministic: it does not depend on the allocator (a
     freed storage's address reused by another is a new storage) or on timing.
   - **peak RSS growth**: ``VmHWM`` (reset through ``/proc/self/clear_refs`` where
     allowed, else ``ru_maxrss``) minus ``VmRSS`` before the inner loop, over the
     inner loop and the meta-backward. Allocator-dependent; a sanity check.
     On CUDA: ``torch.cuda.max_memory_allocated`` growth instead.
     ``saved_bytes_per_step`` is the marginal figure: the live saved bytes after step
     ``T`` minus after step 1, over ``T - 1`` (one-time costs such as the initial
     weights and the query loss excluded).
   - **autograd nodes per step**: the nodes reachable from the fast weights'
     ``grad_fn`` (for the floor: from the gradients') after step ``T`` minus after
     step 1, over ``T - 1``; broken down by node type.

3. ``repeats`` timed runs (the instrumented run was the full-length warm-up; with
   ``memory=False`` a plain warm-up run replaces it); the medians are reported. If one
   run takes long, fewer repeats are taken so that they fit in ``time_budget_s``
   (at least 1; the JSON records how many ran). ``gc.collect()`` runs before each
   timed run and the collector is off during it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import statistics
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from loft.bench.baselines import PerTensorInnerLoop
from loft.bench.workloads import Built, Workload, build, loss_fn

__all__ = [
    "IMPLEMENTATIONS",
    "TORCHOPT_EPS_ROOT",
    "Runner",
    "make_runner",
    "measure",
    "SavedTensorMeter",
    "storages_have_identity",
    "count_graph_nodes",
    "torchopt_backend",
    "torchopt_optimizer",
]

#: Implementation names, in table order. ``loft-reference`` is loft with
#: ``LOFT_BACKEND=reference`` (set by the suite for its subprocess); ``torchopt`` is
#: torchopt's ``MetaSGD``/``MetaAdam`` stepping the model in place (its MAML pattern);
#: ``floor`` is the bare floor: forward + ``autograd.grad(create_graph=True)``, no update.
IMPLEMENTATIONS = ("loft", "loft-reference", "per-tensor", "higher", "torchopt", "floor")

#: torchopt's ``MetaAdam(eps_root=...)``: its default 0 makes the derivative of
#: ``sqrt(nu)`` infinite where a gradient element is exactly 0 (a dead ReLU unit) and the
#: meta-gradient NaN; torchopt's documentation asks for an ``eps_root`` when
#: differentiating through Adam. 1e-16 keeps its update torch.optim's to float32
#: precision (the other implementations' formula) at the same cost.
TORCHOPT_EPS_ROOT = 1e-16

#: Seconds of timed runs per measurement by default: runs that take longer get fewer
#: repeats (at least one). 5 s keeps 5 repeats of every T = 10 and T = 50 run (the
#: targets' T) and gives the long T = 200 runs of model B one or two.
DEFAULT_TIME_BUDGET_S = 5.0


class Runner:
    """One implementation of the inner loop on a built workload.

    ``setup()`` makes fresh fast weights; ``step()`` does one inner step;
    ``query_loss()`` builds the meta-loss; ``graph_roots()`` are the tensors whose
    ``grad_fn`` reaches everything the inner loop recorded so far.
    """

    def __init__(self, built: Built) -> None:
        self.built = built

    def setup(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def query_loss(self) -> Tensor:
        raise NotImplementedError

    def graph_roots(self) -> list[Tensor]:
        raise NotImplementedError

    def meta_backward(self, query: Tensor) -> None:
        """Backpropagate the meta-loss into the model's weights."""
        query.backward()

    def teardown(self) -> None:
        """Drop every reference to this run's graph."""


class HigherStyleRunner(Runner):
    """loft and higher: the same code, ``innerloop_ctx`` of either module."""

    def __init__(self, built: Built, module: Any) -> None:
        super().__init__(built)
        self.module = module
        self._stack: contextlib.ExitStack | None = None
        self.fmodel: Any = None
        self.diffopt: Any = None

    def setup(self) -> None:
        self.teardown()
        self._stack = contextlib.ExitStack()
        assert self.built.optimizer is not None
        self.fmodel, self.diffopt = self._stack.enter_context(self.module.innerloop_ctx(
            self.built.model, self.built.optimizer, copy_initial_weights=False))

    def step(self) -> None:
        x, y = self.built.support
        self.diffopt.step(loss_fn(self.fmodel(x), y))

    def query_loss(self) -> Tensor:
        x, y = self.built.query
        return loss_fn(self.fmodel(x), y)

    def graph_roots(self) -> list[Tensor]:
        return list(self.fmodel.parameters())

    def teardown(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = self.fmodel = self.diffopt = None


def torchopt_backend() -> str:
    """What torchopt runs on here: its ``MetaSGD``/``MetaAdam`` default to pure-PyTorch
    transforms (``use_accelerated_op=False``); says whether its compiled op
    ``torchopt._C`` loads (it is built against one torch release)."""
    try:
        from torchopt._C import adam_op  # noqa: F401
    except ImportError as exc:
        return (f"pure-PyTorch (compiled op unavailable: {type(exc).__name__}: {exc}; "
                f"MetaSGD/MetaAdam run their default pure-PyTorch transforms, and "
                f"use_accelerated_op=True would fall back to torchopt.accelerated_op._src, "
                f"also pure PyTorch)")
    return ("pure-PyTorch (MetaSGD/MetaAdam's default use_accelerated_op=False; the compiled "
            "op torchopt._C loads but is not used)")


def torchopt_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """torchopt's ``MetaSGD``/``MetaAdam`` over ``module`` with the hyperparameters of a
    one-group ``torch.optim`` SGD or Adam ``optimizer``."""
    import torchopt

    if len(optimizer.param_groups) != 1:
        raise ValueError(f"torchopt_optimizer: expected 1 param group, got "
                         f"{len(optimizer.param_groups)}")
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.SGD):
        return torchopt.MetaSGD(module, lr=group["lr"], momentum=group["momentum"],
                                dampening=group["dampening"], nesterov=group["nesterov"],
                                weight_decay=group["weight_decay"])
    if type(optimizer) is torch.optim.Adam and not group.get("amsgrad"):
        return torchopt.MetaAdam(module, lr=group["lr"], betas=tuple(group["betas"]),
                                 eps=group["eps"], weight_decay=group["weight_decay"],
                                 eps_root=TORCHOPT_EPS_ROOT)
    raise TypeError(f"torchopt_optimizer: SGD or Adam expected, got "
                    f"{type(optimizer).__name__}")


class TorchoptRunner(Runner):
    """torchopt's MAML pattern: ``MetaSGD``/``MetaAdam`` made once, the model's and the
    optimiser's state extracted in ``setup()`` and recovered in ``teardown()``; each
    ``step()`` replaces the model's parameters with the updated (non-leaf) tensors."""

    def __init__(self, built: Built) -> None:
        super().__init__(built)
        import torchopt

        assert built.optimizer is not None
        self.torchopt = torchopt
        self.inner = torchopt_optimizer(built.model, built.optimizer)
        self._states: tuple[Any, Any] | None = None

    def setup(self) -> None:
        self.teardown()
        model = self.built.model
        self._states = (
            self.torchopt.extract_state_dict(model, by="reference", detach_buffers=True),
            self.torchopt.extract_state_dict(self.inner, by="reference"))

    def step(self) -> None:
        x, y = self.built.support
        self.inner.step(loss_fn(self.built.model(x), y))

    def query_loss(self) -> Tensor:
        x, y = self.built.query
        return loss_fn(self.built.model(x), y)

    def graph_roots(self) -> list[Tensor]:
        return list(self.built.model.parameters())

    def teardown(self) -> None:
        if self._states is not None:
            self.torchopt.recover_state_dict(self.built.model, self._states[0])
            self.torchopt.recover_state_dict(self.inner, self._states[1])
        self._states = None


class PerTensorRunner(Runner):
    """:class:`loft.bench.baselines.PerTensorInnerLoop`."""

    def setup(self) -> None:
        assert self.built.optimizer is not None
        self.loop = PerTensorInnerLoop(self.built.model, self.built.optimizer)

    def step(self) -> None:
        x, y = self.built.support
        self.loop.step(loss_fn(self.loop(x), y))

    def query_loss(self) -> Tensor:
        x, y = self.built.query
        return loss_fn(self.loop(x), y)

    def graph_roots(self) -> list[Tensor]:
        return list(self.loop.params)

    def teardown(self) -> None:
        self.loop = None  # type: ignore[assignment]


class FloorRunner(Runner):
    """The bare floor: each step is the forward and ``autograd.grad(create_graph=True)``
    with respect to fixed weights, and no update.

    Its meta-backward backpropagates the query loss *and* every step's gradients
    (with fixed random cotangents), so it pays one Hessian-vector product per step: the
    part of a meta-backward that any implementation must do.
    """

    def setup(self) -> None:
        model = self.built.model
        self.names = [n for n, _ in model.named_parameters()]
        # Differentiable clones, as innerloop_ctx(copy_initial_weights=False) makes.
        self.params = [p.clone() for p in model.parameters()]
        self.grads: list[Tensor] = []
        gen = torch.Generator().manual_seed(1234)
        self.cotangents = [torch.randn(p.shape, generator=gen).to(p) for p in self.params]

    def _forward(self, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.built.model, dict(zip(self.names, self.params)),
                                          (x,))

    def step(self) -> None:
        x, y = self.built.support
        grads = torch.autograd.grad(loss_fn(self._forward(x), y), self.params, create_graph=True)
        self.grads.extend(grads)

    def query_loss(self) -> Tensor:
        x, y = self.built.query
        return loss_fn(self._forward(x), y)

    def meta_backward(self, query: Tensor) -> None:
        k = len(self.cotangents)
        cotangents = [self.cotangents[i % k] for i in range(len(self.grads))]
        torch.autograd.backward([query, *self.grads], [torch.ones_like(query), *cotangents])

    def graph_roots(self) -> list[Tensor]:
        return list(self.grads)

    def teardown(self) -> None:
        self.grads = []


def make_runner(implementation: str, built: Built) -> Runner:
    """The :class:`Runner` of ``implementation`` (one of :data:`IMPLEMENTATIONS`)."""
    if implementation in ("loft", "loft-reference"):
        import loft

        return HigherStyleRunner(built, loft)
    if implementation == "higher":
        import higher

        return HigherStyleRunner(built, higher)
    if implementation == "per-tensor":
        return PerTensorRunner(built)
    if implementation == "torchopt":
        return TorchoptRunner(built)
    if implementation == "floor":
        return FloorRunner(built)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


# ---- memory ---------------------------------------------------------------------------


@dataclass
class _SavedStorage:
    """One storage saved for backward: its size, the storage itself (weakly; ``None`` when
    keyed by address) and every saved tensor on it (weakly)."""

    nbytes: int
    storage: weakref.ref[torch.UntypedStorage] | None
    tensors: list[weakref.ref[Tensor]]

    def held(self) -> bool:
        """Whether the graph still holds one of its saved tensors."""
        return any(ref() is not None for ref in self.tensors)


_PRESERVED: list[bool] = []  # computed once: whether torch keeps one object per storage


def storages_have_identity() -> bool:
    """Whether torch keeps one Python object per live storage (torch >= 2.1: the same
    ``untyped_storage()`` object while the storage lives, dropped with it), so that the
    object's identity is the storage's."""
    if not _PRESERVED:
        tensor = torch.empty(1)
        first = tensor.untyped_storage()
        ref = weakref.ref(first)
        first_id = id(first)
        del first
        kept = ref()
        _PRESERVED.append(kept is not None and id(kept) == first_id
                          and kept is tensor.untyped_storage())
    return _PRESERVED[0]


class SavedTensorMeter:
    """Bytes of the distinct storages saved for backward while active.

    Use as a context manager around the code that builds the graph; then
    :meth:`live_bytes` sums, once per storage, the storages whose saved tensor is still
    held by the graph (a tensor saved by a node that was later freed is not counted).

    Storages are told apart by identity, not address: torch keeps one Python object per
    live storage, so the key is that object's ``id`` checked against a weak reference
    that dies with the storage. A storage allocated where a freed one was (same address,
    or an object at the same ``id``) is a new entry with its own size, whatever the
    allocator does. (Keyed by ``data_ptr()``, as this meter once was, such a storage was
    counted at the freed one's size, so the figures moved from run to run.) Where torch
    does not keep the object (:func:`storages_have_identity` false), the key is the
    address and an entry none of whose saved tensors is alive any more is replaced by
    the next storage saved at that address: a live tensor keeps its storage alive, so an
    entry with one is the same storage.
    """

    def __init__(self) -> None:
        self._by_identity = storages_have_identity()
        self._current: dict[int, _SavedStorage] = {}  # id (or address) -> latest entry
        self._entries: list[_SavedStorage] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes:
            if self._by_identity:
                key = id(storage)
                entry = self._current.get(key)
                same = entry is not None and entry.storage is not None \
                    and entry.storage() is storage
            else:
                key = storage.data_ptr()
                entry = self._current.get(key)
                same = entry is not None and entry.held()
            if not same:
                entry = _SavedStorage(nbytes, weakref.ref(storage) if self._by_identity
                                      else None, [])
                self._current[key] = entry
                self._entries.append(entry)
            assert entry is not None
            entry.tensors.append(weakref.ref(tensor))
        return tensor

    @staticmethod
    def _unpack(tensor: Tensor) -> Tensor:
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def live_bytes(self) -> int:
        """Sum of ``nbytes`` over saved storages that are still referenced."""
        return sum(entry.nbytes for entry in self._entries if entry.held())

    @property
    def num_storages(self) -> int:
        """Saved storages that are still referenced."""
        return sum(1 for entry in self._entries if entry.held())


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory growth over a region: RSS on CPU, allocated bytes on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        self._reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self._reset = _proc_status_kib("VmHWM") is not None
        except OSError:
            pass
        rss = _proc_status_kib("VmRSS")
        if self._reset and rss is not None:
            self._start = rss * 1024
            self.method = "VmHWM - VmRSS (clear_refs reset)"
        else:
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss growth"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_growth = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self.method.startswith("VmHWM"):
            self.peak_growth = (_proc_status_kib("VmHWM") or 0) * 1024 - self._start
        else:
            self.peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - \
                self._start
        self.peak_growth = max(int(self.peak_growth), 0)


# ---- graph ----------------------------------------------------------------------------


def count_graph_nodes(roots: list[Tensor]) -> Counter[str]:
    """Autograd nodes reachable from the ``grad_fn`` of ``roots``, counted by type name.

    Includes ``AccumulateGrad`` (leaves); each node is counted once.
    """
    seen: dict[int, Any] = {}  # holds the node objects so their ids stay unique
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    counts: Counter[str] = Counter()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        counts[type(node).__name__] += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return counts


# ---- timing ---------------------------------------------------------------------------


@dataclass
class RunTimes:
    setup_s: float
    inner_s: float
    meta_backward_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _gc_paused(collect: bool = True) -> Iterator[None]:
    """The cyclic collector off inside; ``collect``: a full collection first (which also
    evicts the CPU caches: a few milliseconds of the next few milliseconds' work)."""
    if collect:
        gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _timed_run(runner: Runner, steps: int, device: torch.device) -> RunTimes:
    model = runner.built.model
    model.zero_grad(set_to_none=True)
    with _gc_paused():
        _sync(device)
        t0 = time.perf_counter()
        runner.setup()
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(steps):
            runner.step()
        _sync(device)
        t2 = time.perf_counter()
        query = runner.query_loss()
        _sync(device)
        t3 = time.perf_counter()
        runner.meta_backward(query)
        _sync(device)
        t4 = time.perf_counter()
        del query
        runner.teardown()
    return RunTimes(t1 - t0, t2 - t1, t4 - t3)


def _instrumented_run(runner: Runner, steps: int, device: torch.device) -> dict[str, Any]:
    model = runner.built.model
    model.zero_grad(set_to_none=True)
    gc.collect()
    runner.setup()
    nodes_after_1: Counter[str] | None = None
    meter = SavedTensorMeter()
    with PeakMemory(device) as peak:
        with meter:
            t0 = time.perf_counter()
            for k in range(steps):
                runner.step()
                if k == 0:
                    nodes_after_1 = count_graph_nodes(runner.graph_roots())
                    bytes_after_1 = meter.live_bytes()
            nodes_after_t = count_graph_nodes(runner.graph_roots())
            inner_bytes = meter.live_bytes()
            query = runner.query_loss()
        saved_bytes = meter.live_bytes()
        num_storages = meter.num_storages
        runner.meta_backward(query)
        del query
    runner.teardown()
    elapsed = time.perf_counter() - t0
    assert nodes_after_1 is not None
    if steps > 1:
        per_step = {name: (nodes_after_t[name] - nodes_after_1[name]) / (steps - 1)
                    for name in nodes_after_t}
        per_step = {k: v for k, v in sorted(per_step.items()) if v}
        nodes_per_step: float | None = sum(per_step.values())
        saved_per_step: float | None = (inner_bytes - bytes_after_1) / (steps - 1)
    else:
        per_step, nodes_per_step, saved_per_step = {}, None, None
    return {
        "saved_bytes_per_step": saved_per_step,
        "instrumented_run_s": elapsed,
        "saved_bytes": saved_bytes,
        "saved_bytes_inner": inner_bytes,
        "saved_storages": num_storages,
        "peak_mem_growth_bytes": peak.peak_growth,
        "peak_mem_method": peak.method,
        "graph_nodes": sum(nodes_after_t.values()),
        "nodes_per_step": nodes_per_step,
        "nodes_per_step_by_type": per_step,
    }


def measure(workload: Workload, implementation: str, repeats: int = 5,
            device: torch.device | str = "cpu", memory: bool = True,
            time_budget_s: float | None = DEFAULT_TIME_BUDGET_S) -> dict[str, Any]:
    """Measure ``implementation`` on ``workload`` in this process (see module docstring).

    Returns a JSON-serialisable dict: medians and every repeat of the times (seconds),
    the memory and graph figures, and what ran (loft's backend, versions).
    """
    device = torch.device(device)
    if implementation == "floor" and workload.optimizer != "none":
        raise ValueError("the floor has no optimiser: use Workload(optimizer='none')")
    if implementation != "floor" and workload.optimizer == "none":
        raise ValueError(f"{implementation} needs an optimiser, got optimizer='none'")
    built = build(workload, device)
    runner = make_runner(implementation, built)
    result: dict[str, Any] = {
        "workload": workload.to_dict(),
        "implementation": implementation,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "param_bytes": built.param_bytes,
        "num_param_tensors": sum(1 for _ in built.model.parameters()),
        "torch": torch.__version__,
    }
    if implementation.startswith("loft"):
        import loft

        result["loft_backend"] = loft.backend()
        result["loft_backend_reason"] = loft.backend_reason()
    if implementation == "higher":
        import higher

        result["higher"] = getattr(higher, "__version__", "unknown")
    if implementation == "torchopt":
        import torchopt

        result["torchopt"] = torchopt.__version__
        result["torchopt_backend"] = torchopt_backend()

    _timed_run(runner, 1, device)  # warm-up: kernels, allocator, lazy imports
    if memory:  # also the full-length warm-up
        result.update(_instrumented_run(runner, workload.steps, device))
    runs = [_timed_run(runner, workload.steps, device)]
    if not memory:  # that one was the warm-up
        runs = [_timed_run(runner, workload.steps, device)]
    one_run = runs[0].inner_s + runs[0].meta_backward_s + runs[0].setup_s
    wanted = repeats
    if time_budget_s is not None and one_run > 0:
        wanted = max(1, min(repeats, int(time_budget_s / one_run)))
    runs += [_timed_run(runner, workload.steps, device) for _ in range(wanted - 1)]
    result.update(
        repeats=len(runs),
        repeats_requested=repeats,
        setup_s=statistics.median(r.setup_s for r in runs),
        inner_s=statistics.median(r.inner_s for r in runs),
        meta_backward_s=statistics.median(r.meta_backward_s for r in runs),
        inner_s_all=[r.inner_s for r in runs],
        meta_backward_s_all=[r.meta_backward_s for r in runs],
        pid=os.getpid(),
    )
    return result
