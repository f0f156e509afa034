"""Long inner loops in bounded memory: :func:`unroll` with checkpointing.

A differentiable inner loop of ``T`` steps normally keeps the graph of every step until
the meta-backward: memory grows linearly with ``T``. ``unroll(..., checkpoint_every=k)``
keeps only the flat state (weights and optimiser buffers) after every ``k``-th step and
runs the steps in between without a graph; the meta-backward recomputes each segment of
``k`` steps with its graph, back-propagates through it, and frees it before the next.

Memory is then about ``T/k`` flat states plus the graph of ``k`` steps, for about one
more forward pass of the inner loop; the gradients equal the full unroll's (the same
operations, recomputed in the same order, with the same random numbers and buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from loft import utils as _utils
from loft.flat import FlatState
from loft.optim.base import DifferentiableOptimizer
from loft.optim.engine import FlatOptimizer, uses_flat_engine
from loft.patch import FunctionalModule

__all__ = ["unroll"]

LossFn = Callable[[FunctionalModule, Any], Tensor]


def unroll(fmodel: FunctionalModule, diffopt: DifferentiableOptimizer, loss_fn: LossFn,
           batches: Sequence[Any] | Iterable[Any],
           checkpoint_every: int | None = None) -> list[Tensor]:
    r"""Run one inner step per batch: ``diffopt.step(loss_fn(fmodel, batch))``.

    Args:
        fmodel: the patched model (``diffopt``'s ``fmodel``).
        diffopt: its differentiable optimiser.
        loss_fn: ``loss_fn(fmodel, batch)`` returns the scalar inner loss. It may use
            randomness (dropout) and update buffers (BatchNorm): both are replayed
            exactly when a segment is recomputed.
        batches: one batch per step. With checkpointing it must be a sequence
            (``len`` and indexing), since segments are replayed in the meta-backward.
        checkpoint_every: ``k``: keep the flat state after every ``k``-th step (and the
            last) and recompute the steps in between during the meta-backward.
            ``None`` unrolls fully, exactly as a loop of ``diffopt.step`` calls.

    Returns:
        The inner losses, detached.

    The final fast weights are differentiable with respect to the initial weights, the
    optimiser state, every tensor hyperparameter, and any tensor that requires grad
    used by ``loss_fn``, with the same gradients as the full unroll. After a
    checkpointed unroll ``fmodel.parameters(time=t)`` holds only the checkpoints
    (``fmodel.recorded_times``). The backward of a checkpointed segment is not itself
    differentiable (no ``create_graph`` through it).
    """
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) \
                or checkpoint_every < 1:
            raise ValueError(f"unroll: checkpoint_every must be None or an int >= 1, got "
                             f"{checkpoint_every!r}")
    if not isinstance(fmodel, FunctionalModule):
        raise TypeError(f"unroll: fmodel must be a patched module (loft.monkeypatch or "
                        f"innerloop_ctx), got {type(fmodel).__name__}")
    if not isinstance(diffopt, DifferentiableOptimizer):
        raise TypeError(f"unroll: diffopt must be a loft differentiable optimizer, got "
                        f"{type(diffopt).__name__}")
    if diffopt.fmodel is not fmodel:
        raise ValueError("unroll: diffopt must have been built with fmodel=fmodel (as "
                         "innerloop_ctx does), so that its steps update fmodel")
    if not callable(loss_fn):
        raise TypeError(f"unroll: loss_fn must be callable, got {type(loss_fn).__name__}")
    checkpointed = checkpoint_every is not None and fmodel.track_higher_grads \
        and diffopt.track_higher_grads
    if checkpointed:
        if not (hasattr(batches, "__len__") and hasattr(batches, "__getitem__")):
            raise TypeError(
                f"unroll: with checkpoint_every, batches must be a sequence (len() and "
                f"indexing) so that the meta-backward can replay each segment; got a "
                f"{type(batches).__name__}, which cannot be replayed. Pass list(batches).")
        if not isinstance(diffopt, FlatOptimizer) or not uses_flat_engine(type(diffopt)):
            raise TypeError(f"unroll: checkpointing needs one of loft's own optimizers; "
                            f"{type(diffopt).__name__} updates per tensor")
    if not checkpointed:
        losses = []
        for batch in batches:
            loss = loss_fn(fmodel, batch)
            diffopt.step(loss)
            losses.append(loss.detach())
        return losses
    assert isinstance(diffopt, FlatOptimizer) and checkpoint_every is not None
    steps = len(batches)  # type: ignore[arg-type]
    if steps == 0:
        return []
    with torch.enable_grad():
        diffopt.sync_flat_state(list(fmodel.fast_params))
    # The graph of a checkpointed unroll holds the runner (for the recomputation), and
    # fmodel's history holds that graph: if the runner held fmodel itself, the two would
    # form a cycle through autograd's nodes, which Python's collector cannot see, and
    # every such inner loop would stay in memory. So the runner steps private copies:
    # fmodel's independent twin (its own patched modules, slots and history, fmodel's
    # own buffers, so BatchNorm statistics it updates are fmodel's) and diffopt's replica
    # (the same hyperparameters and layout, its own flat state); neither points back.
    twin = fmodel.twin()
    runner = _Runner(twin, diffopt.replica(twin), loss_fn, batches)  # type: ignore[arg-type]
    return runner.run(fmodel, diffopt, checkpoint_every)


class _Saved(NamedTuple):
    """What a replay changes and must put back: the flat state, the tracking mode, the history."""

    flat: FlatState
    track: bool
    times: list[int]
    history: list[list[Tensor]]


class _Runner:
    """Runs the segments of one checkpointed unroll and replays them in the backward."""

    def __init__(self, fmodel: FunctionalModule, diffopt: FlatOptimizer, loss_fn: LossFn,
                 batches: Sequence[Any]) -> None:
        self.fmodel, self.diffopt, self.loss_fn, self.batches = fmodel, diffopt, loss_fn, batches
        flat = diffopt.flat_state
        assert flat is not None
        self.flat = flat  # the replica's flat state (its object, changed in place)
        self.losses: list[Tensor] = []
        self.extras: list[Tensor] = []  # tensors loss_fn uses that require grad

    # ---- the optimiser's and the model's mutable state -----------------------------------

    def _save(self) -> _Saved:
        times, history = self.fmodel.history()
        return _Saved(self.flat.snapshot(), self.diffopt.track_higher_grads, times, history)

    def _restore(self, saved: _Saved) -> None:
        self.flat.restore(saved.flat)
        self.diffopt.track_higher_grads = saved.track
        self.fmodel.set_history(saved.times, saved.history)

    def _buffers(self) -> list[Tensor]:
        return [b for _, b in self.fmodel.patched_buffers()]

    def _load(self, flats: Sequence[Tensor], steps: list[int]) -> None:
        """Make ``flats`` (weights per bucket, then state per bucket) the current state."""
        self.fmodel.fast_params = self.flat.load(flats, steps, list(self.fmodel.fast_params))

    def _outputs(self, differentiable: bool) -> list[Tensor]:
        """The current flat state. ``differentiable``: the weights are concatenated from
        the fast weights (the flat buffer behind them is not itself on the graph)."""
        flats = self.flat.flats()
        if differentiable:
            fast = self.fmodel.fast_params
            flats[:len(self.flat.buckets)] = [b.flatten([fast[i] for i in b.indices])
                                              for b in self.flat.buckets]
        return flats

    def _find_extras(self, loss: Tensor, ours: list[Tensor]) -> None:
        """Record the leaves that require grad in ``loss``'s graph other than ``ours``
        (tensors ``loss_fn`` closes over), so that they get their gradients too."""
        known = {id(t) for t in ours} | {id(t) for t in self.extras}
        seen: set[int] = set()
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) not in known:
                self.extras.append(variable)
                known.add(id(variable))
            stack.extend(next_node for next_node, _ in node.next_functions)

    # ---- segments -------------------------------------------------------------------------

    def steps(self, start: int, stop: int, find_extras: bool) -> None:
        """Steps ``start`` to ``stop - 1`` on the current state, keeping one history entry."""
        for t in range(start, stop):
            loss = self.loss_fn(self.fmodel, self.batches[t])
            if find_extras and t == start:
                self._find_extras(loss, self._known())
            if len(self.losses) <= t:
                self.losses.append(loss.detach())
            self.diffopt.step(loss)
            times, history = self.fmodel.history()
            self.fmodel.set_history(times[-1:], history[-1:])

    def _known(self) -> list[Tensor]:
        weights = [w for w in self.flat.weights if w is not None]
        return weights + list(self.fmodel.fast_params) + self.hyper()

    def _dry_run(self, flats: list[Tensor]) -> None:
        """Evaluate the first inner loss once, without side effects, to find the tensors
        that require grad ``loss_fn`` closes over (they become inputs of every segment)."""
        saved = self._save()
        buffers = [b.detach().clone() for b in self._buffers()]
        nb = len(self.flat.buckets)
        try:
            with torch.enable_grad(), _replay_rng(_rng_state(flats)):
                self._load([x.detach().requires_grad_(k < nb) for k, x in enumerate(flats)],
                           list(self.flat.steps))
                loss = self.loss_fn(self.fmodel, self.batches[0])
                if isinstance(loss, Tensor) and loss.grad_fn is not None:
                    self._find_extras(loss, self._known())
        finally:
            self._restore(saved)
            _copy_into(self._buffers(), buffers)

    def hyper(self) -> list[Tensor]:
        """The tensor hyperparameters of the param groups that require grad."""
        found: list[Tensor] = []
        for group in self.diffopt.param_groups:
            for key, value in group.items():
                if key == "params":
                    continue
                for leaf in _utils.flatten(value):
                    if isinstance(leaf, Tensor) and leaf.requires_grad and \
                            all(leaf is not h for h in found):
                        found.append(leaf)
        return found

    def run(self, fmodel: FunctionalModule, diffopt: FlatOptimizer, k: int) -> list[Tensor]:
        """Run the segments on the private copies, recording each checkpoint in the
        user's ``fmodel`` history and leaving ``diffopt`` at the final state."""
        start_params = list(self.fmodel.fast_params)
        buckets = self.flat.buckets
        nb = len(buckets)
        # The first segment's flat weights: a differentiable concatenation of the current
        # fast weights (whatever graph they hang on).
        flats = [b.flatten([start_params[i] for i in b.indices]) for b in buckets]
        flats += self.flat.flats()[nb:]
        hyper = self.hyper()
        times, history = fmodel.history()
        t0 = times[-1]
        total = len(self.batches)
        self._dry_run(flats)
        for start in range(0, total, k):
            stop = min(start + k, total)
            outs = _Segment.apply(self, start, stop, len(flats), len(hyper), *flats, *hyper,
                                  *self.extras)
            flats = list(outs)
            entry = list(start_params)
            for b, base in zip(buckets, flats[:nb]):
                for i, view in zip(b.indices, b.views(base)):
                    entry[i] = view
            history.append(entry)
            times.append(t0 + stop)
        fmodel.set_history(times, history)
        # diffopt continues from the final state: the checkpoint's flat buffers, the
        # replica's step counts, and the history's last views as its last weights.
        final = self.flat.snapshot()
        final.set_flats(flats)
        final.last_views = list(history[-1])
        final.private, final.keep_buffers = set(), False  # the graph may hold this state
        diffopt.set_flat_state(final)
        return self.losses


class _Segment(torch.autograd.Function):
    """Steps ``start`` to ``stop - 1`` of an unroll as one node: run without a graph,
    recomputed with one in the backward."""

    @staticmethod
    def forward(ctx: Any, runner: _Runner, start: int, stop: int, n_flat: int,  # type: ignore[override]
                n_hyper: int, *inputs: Tensor) -> tuple[Tensor, ...]:
        flat = runner.flat
        flats = inputs[:n_flat]
        ctx.runner, ctx.start, ctx.stop, ctx.n_flat = runner, start, stop, n_flat
        ctx.n_hyper = n_hyper
        ctx.steps = list(flat.steps)
        ctx.rng = _rng_state(flats)
        ctx.buffers = [b.detach().clone() for b in runner._buffers()]
        ctx.others = list(inputs[n_flat:])  # hyperparameters, then loss_fn's own tensors
        n_extras = len(runner.extras)
        nb = len(flat.buckets)
        saved = runner._save()
        try:
            with torch.enable_grad():
                runner._load([x.detach().requires_grad_(k < nb) for k, x in enumerate(flats)],
                             ctx.steps)
                runner.diffopt.track_higher_grads = False
                runner.steps(start, stop, find_extras=True)
                outs = [x.detach() for x in runner._outputs(False)]
            steps_after = list(flat.steps)
        finally:
            runner._restore(saved)
        flat.steps = steps_after
        if len(runner.extras) > n_extras:
            raise RuntimeError(
                f"unroll: at step {start}, loss_fn used tensors that require grad which the "
                f"first batch did not use; checkpointing needs them from the start. Use "
                f"them in every step, or unroll with checkpoint_every=None.")
        ctx.save_for_backward(*flats)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        runner: _Runner = ctx.runner
        flats = ctx.saved_tensors
        others = ctx.others
        nb = len(runner.flat.buckets)
        saved = runner._save()
        current_buffers = [b.detach().clone() for b in runner._buffers()]
        try:
            with torch.enable_grad(), _replay_rng(ctx.rng):
                _copy_into(runner._buffers(), ctx.buffers)
                leaves = [x.detach().requires_grad_(k < nb or needs)
                          for k, (x, needs) in enumerate(zip(flats, ctx.needs_input_grad[5:]))]
                runner._load(leaves, ctx.steps)
                runner.diffopt.track_higher_grads = True
                runner.steps(ctx.start, ctx.stop, find_extras=False)
                outs = runner._outputs(True)
                pairs = [(o, g) for o, g in zip(outs, grads)
                         if g is not None and o.requires_grad]
                wrt = [x for x in leaves if x.requires_grad] + others
                got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                          allow_unused=True) if pairs else [None] * len(wrt)
        finally:
            runner._restore(saved)
            _copy_into(runner._buffers(), current_buffers)
        it = iter(got)
        flat_grads = [next(it) if x.requires_grad else None for x in leaves]
        other_grads = list(it)
        return (None,) * 5 + tuple(flat_grads) + tuple(other_grads)


def _copy_into(targets: list[Tensor], sources: list[Tensor]) -> None:
    with torch.no_grad():
        for t, s in zip(targets, sources):
            t.copy_(s)


def _rng_state(tensors: Sequence[Tensor]) -> tuple[Tensor, dict[int, Tensor]]:
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    return torch.get_rng_state(), {i: torch.cuda.get_rng_state(i) for i in devices}


class _replay_rng:
    """Fork the RNGs, set them to a saved state, and restore the originals on exit."""

    def __init__(self, state: tuple[Tensor, dict[int, Tensor]]) -> None:
        self.cpu, self.cuda = state

    def __enter__(self) -> None:
        self.saved = (torch.get_rng_state(),
                      {i: torch.cuda.get_rng_state(i) for i in self.cuda})
        torch.set_rng_state(self.cpu)
        for i, s in self.cuda.items():
            torch.cuda.set_rng_state(s, i)

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self.saved[0])
        for i, s in self.saved[1].items():
            torch.cuda.set_rng_state(s, i)

