"""Batched tasks: a patched model's forward over a leading task dimension (``tasks=N``).

With ``innerloop_ctx(model, opt, tasks=N)`` every fast weight and every buffer of the
patched model carries a leading dimension of ``N``, one slice per task, and so does every
tensor argument of a forward. :func:`batched_call` runs task ``t``'s slice of the
arguments on task ``t``'s slice of the weights and buffers, for all ``t`` at once:

- **Native** (:mod:`loft._batched_layers`): a model built only of layers loft knows
  (``Sequential`` of ``Linear``, ``Conv*d``, ``BatchNorm*d``, activations, pooling,
  ``Flatten``, ``Dropout``) runs as batched PyTorch ops directly; on the CPU in chunks of
  tasks (:data:`CHUNK_BYTES`).
- **vmap**: any other model runs as ``torch.func.vmap`` over its own forward
  (``randomness="different"``: dropout draws independent masks per task). BatchNorm
  updates its per-task running statistics (``[N, C]``) in place.

A forward that cannot be batched (data-dependent control flow, ``.item()``, a buffer
replaced rather than updated) raises an error naming the module that failed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from loft._batched_layers import is_native, run_native

__all__ = ["check_tasks", "batched_call", "expand_to_tasks"]


def check_tasks(tasks: Any) -> int | None:
    """``tasks`` as given to ``innerloop_ctx``/``monkeypatch``: ``None`` or an int >= 1."""
    if tasks is None:
        return None
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ValueError(f"tasks must be None (one task) or an int >= 1 (the number of "
                         f"tasks batched into one inner loop), got {tasks!r}")
    return tasks


def expand_to_tasks(t: Tensor, tasks: int) -> Tensor:
    """``t`` repeated over a new leading task dimension, ``[tasks, *t.shape]`` (a new
    contiguous tensor; differentiable: its gradient sums over tasks)."""
    return t.unsqueeze(0).expand(tasks, *t.shape).clone()


def _check_inputs(tasks: int, args: tuple[Any, ...], kwargs: dict[str, Any],
                  root: Any, module: Any) -> tuple[list[Any], Any, list[int]]:
    """The leaves of ``(args, kwargs)``, their structure and the positions of the tensor
    leaves, after checking that each tensor has a leading task dimension of ``tasks``."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    positions = [k for k, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    for k in positions:
        leaf = leaves[k]
        if leaf.dim() == 0 or leaf.shape[0] != tasks:
            paths, _ = pytree.tree_flatten_with_path((args, kwargs))
            raise ValueError(
                f"{_call_name(root, module)}: with tasks={tasks} every tensor argument "
                f"carries a leading task "
                f"dimension of size {tasks}, but argument {_describe_path(paths[k][0])} has "
                f"shape {list(leaf.shape)}")
    return leaves, spec, positions


def _describe_path(path: tuple[Any, ...]) -> str:
    """A pytree path into ``(args, kwargs)`` in words: ``0``, ``'mask'``, ``0[1]``."""
    head, rest = path[0], path[1:]
    first = getattr(path[1], "idx", None) if head.idx == 0 else repr(getattr(path[1], "key", "?"))
    return f"{first}{pytree.keystr(rest[1:])}" if rest else "?"


def batched_call(root: Any, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``module``'s original forward (``module``: ``root`` or one of its patched
    submodules) on every task's slice of ``args``, the fast weights and the buffers."""
    tasks = root._loft_tasks
    one = args[0] if len(args) == 1 and not kwargs else None
    if type(one) is Tensor and one.dim() > 0 and one.shape[0] == tasks:
        leaves = spec = positions = None  # the common call: one tensor, checked
    else:
        leaves, spec, positions = _check_inputs(tasks, args, kwargs, root, module)
    fast = root.fast_params
    slots = [(m._buffers, key) for m in (root, *root._loft_inner)
             for key, b in m._buffers.items() if isinstance(b, Tensor)]
    state = root.__dict__
    state["_loft_calls"] = root._loft_calls + 1
    try:
        if isinstance(one, Tensor) and is_native(module):
            return _native(root, module, one, fast, slots)
        if leaves is None:
            leaves, spec, positions = _check_inputs(tasks, args, kwargs, root, module)
        return _vmapped(root, module, fast, slots, leaves, spec, positions)
    except RuntimeError as error:
        if not _is_batching_error(error):
            raise
        failed = _failing_module(error, root) or module
        raise RuntimeError(
            f"{_call_name(root, module)}: the forward of {_describe_module(root, failed)} "
            f"cannot be batched over "
            f"tasks={tasks} (torch.func.vmap: {error}). Make that module's forward "
            f"vmap-compatible, or run the tasks one at a time (tasks=None)") from error
    finally:
        state["_loft_calls"] -= 1


#: On the CPU the native path runs the tasks in chunks whose largest activation stays
#: under this many bytes. Note: glibc serves larger blocks with fresh ``mmap`` pages, so
#: every elementwise op on a tensor of all the tasks' activations pays a page fault per
#: 4 KiB (measured: 3x slower for a meta-batch of 16 Omniglot tasks than for chunks).
CHUNK_BYTES = 16 * 2**20


#: The largest activation of one task in bytes, per original module and input shape.
_TASK_BYTES: weakref.WeakKeyDictionary[nn.Module, dict[Any, int]] = weakref.WeakKeyDictionary()


def _native(root: Any, module: Any, x: Tensor, fast: list[Tensor],
            slots: list[tuple[dict[str, Any], str]]) -> Tensor:
    """``module``'s native batched forward on ``x``, in chunks of tasks on the CPU."""
    tasks = root._loft_tasks
    buffers = [d[key] for d, key in slots]
    if x.device.type != "cpu" or tasks == 1:
        return run_native(module, x, tasks)[0]
    # Kept per original module (a new patched model is made for every inner loop).
    sizes = _TASK_BYTES.setdefault(module._loft_source, {})
    key = (tuple(x.shape[1:]), x.dtype)
    per_task = sizes.get(key)
    if per_task is None:
        per_task = sizes[key] = _task_bytes(root, module, x, fast, slots, buffers)
    chunk = max(1, CHUNK_BYTES // max(per_task, 1))
    if chunk >= tasks:
        return run_native(module, x, tasks)[0]
    outs = []
    for start in range(0, tasks, chunk):
        count = min(chunk, tasks - start)
        outs.append(_on_tasks(root, module, x.narrow(0, start, count),
                              [w.narrow(0, start, count) for w in fast], slots,
                              [b.narrow(0, start, count) for b in buffers])[0])
    return torch.cat(outs)


def _task_bytes(root: Any, module: Any, x: Tensor, fast: list[Tensor],
                slots: list[tuple[dict[str, Any], str]], buffers: list[Tensor]) -> int:
    """The largest activation of one task in bytes, from a run on the meta device (no
    computation, no random numbers drawn, no buffer changed)."""
    def meta(t: Tensor) -> Tensor:
        return t[:1].detach().to("meta")

    with torch.no_grad():
        return _on_tasks(root, module, meta(x), [meta(w) for w in fast], slots,
                         [meta(b) for b in buffers])[1]


@contextlib.contextmanager
def _slots_holding(root: Any, slots: list[tuple[dict[str, Any], str]], fast: list[Tensor],
                   buffers: list[Tensor]) -> Iterator[None]:
    """Inside, the patched model's parameter and buffer slots hold ``fast`` and
    ``buffers`` (some tasks' slices, or one task's under vmap); the model's full fast
    weights and buffers are back in them after."""
    full_fast = root.fast_params
    full_buffers = [d[key] for d, key in slots]
    root._write(fast)
    for (d, key), b in zip(slots, buffers):
        d[key] = b
    try:
        yield
    finally:
        for (d, key), b in zip(slots, full_buffers):
            d[key] = b
        root._write(full_fast)


def _on_tasks(root: Any, module: Any, x: Tensor, fast: list[Tensor],
              slots: list[tuple[dict[str, Any], str]], buffers: list[Tensor],
              ) -> tuple[Tensor, int]:
    """:func:`run_native` on some of the tasks alone: ``x``, ``fast`` and ``buffers`` are
    their slices."""
    with _slots_holding(root, slots, fast, buffers):
        return run_native(module, x, x.shape[0])


def _vmapped(root: Any, module: Any, fast: list[Tensor],
             slots: list[tuple[dict[str, Any], str]],
             leaves: list[Any], spec: Any, positions: list[int]) -> Any:
    """``module``'s forward under ``torch.func.vmap`` over the fast weights, buffers and
    inputs."""
    forward = module._loft_wrapped.forward

    def one_task(task_fast: list[Tensor], task_buffers: list[Tensor],
                 task_inputs: list[Tensor]) -> Any:
        with _slots_holding(root, slots, task_fast, task_buffers):
            task_leaves = list(leaves)
            for k, value in zip(positions, task_inputs):
                task_leaves[k] = value
            args, kwargs = pytree.tree_unflatten(task_leaves, spec)
            out = forward(module, *args, **kwargs)
            for (d, key), b in zip(slots, task_buffers):
                if d.get(key) is not b:
                    raise RuntimeError(
                        f"vmap: the buffer {key!r} was replaced during the forward (batched "
                        f"buffers must be updated in place)")
            return out

    buffers = [d[key] for d, key in slots]
    inputs = [leaves[k] for k in positions]
    return torch.func.vmap(one_task, randomness="different")(fast, buffers, inputs)


#: Phrases of the errors torch.func.vmap raises for an operation it cannot batch.
_BATCHING_PHRASES = ("vmap", "batching rule", "batched tensor", "BatchedTensor")


def _is_batching_error(error: BaseException) -> bool:
    text = str(error)
    return any(phrase.lower() in text.lower() for phrase in _BATCHING_PHRASES)


def _failing_module(error: BaseException, root: Any) -> nn.Module | None:
    """The innermost module of ``root``'s patched tree whose code raised ``error``."""
    tree = [root, *root._loft_inner]
    found = None
    tb = error.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if any(candidate is m for m in tree):
            found = candidate
        tb = tb.tb_next
    return found


def _call_name(root: Any, module: Any) -> str:
    """How the call of ``module`` reads: ``fmodel`` or ``fmodel.encoder`` (for errors)."""
    return "fmodel" if module is root else f"fmodel.{_module_name(root, module)}"


def _module_name(root: Any, module: Any) -> str:
    for name, m in nn.Module.named_modules(root):
        if m is module:
            return name
    return type(module).__name__


def _describe_module(root: Any, module: Any) -> str:
    name = _module_name(root, module) if module is not root else ""
    kind = module._loft_wrapped.__name__
    return f"fmodel.{name} ({kind})" if name else f"the model ({kind})"

