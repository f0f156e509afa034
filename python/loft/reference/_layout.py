"""The segment table expanded to the elements, and the C++ ops' checks on every input."""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from loft._contract import ELEMENTWISE, ELEMENTWISE_HYPER, OpContract, SegmentColumn, compute_dtype

__all__ = ["Layout", "layout", "checked_layout", "elementwise_values", "flag", "per_element",
           "present"]


class Layout(NamedTuple):
    """The segment table of one call, expanded to the ``N`` elements of the bucket."""

    group: Tensor  # [N] int64, group of each element
    active: Tensor  # [N] bool
    first: Tensor  # [N] bool, the segment had no update before (step == 0)
    num_groups: int
    numels: Tensor  # [S] int64
    seg_group: Tensor  # [S] int64
    seg_t: Tensor  # [S] float64: t = step + 1, the step count after an update
    # True: every segment has the same group, step and active flag, and group, active
    # and first hold that one value ([1], broadcast against the elements).
    uniform: bool = False

    def per_segment(self, values: Tensor, dtype: torch.dtype) -> Tensor:
        """Expand a [S] per-segment value to the elements, cast to ``dtype``."""
        if self.uniform:
            return values[:1].to(dtype)
        n = int(self.group.numel())
        return torch.repeat_interleave(values.to(dtype), self.numels, output_size=n)


def layout(op: str, params: Tensor, segments: Tensor, group_flags: Tensor,
           check: bool = True, broadcast: bool = False) -> Layout:
    """Check the segment table (as the C++ ops do) and expand it to the elements.

    ``check=False`` skips the data-dependent checks (inputs already validated), which
    also lets the function be traced with symbolic shapes.
    """
    n = params.numel()
    width = len(SegmentColumn)
    if (segments.dim() != 2 or segments.size(1) != width or segments.dtype != torch.int64
            or segments.device != params.device):
        raise RuntimeError(
            f"{op}: segments must be an int64 tensor of shape [S, {width}] on {params.device}, "
            f"got {segments.dtype} of shape {list(segments.shape)} on {segments.device}"
        )
    if check and not segments.is_contiguous():
        raise RuntimeError(f"{op}: segments must be contiguous")
    g = group_flags.numel()
    offsets, numels, groups, steps, active = segments.unbind(1)
    if check and segments.size(0) > 0:
        starts = torch.cat([numels.new_zeros(1), numels.cumsum(0)[:-1]])
        if (
            bool((numels < 0).any())
            or not bool((offsets == starts).all())
            or int(numels.sum()) != n
        ):
            raise RuntimeError(
                f"{op}: segments must tile the {n} elements of params in order "
                "(offsets 0, numel_0, numel_0 + numel_1, ...)"
            )
        if bool((groups < 0).any()) or bool((groups >= g).any()):
            raise RuntimeError(f"{op}: segments group column must lie in [0, {g})")
        if bool((steps < 0).any()):
            raise RuntimeError(f"{op}: segments step column must be >= 0")
        if bool(((active != 0) & (active != 1)).any()):
            raise RuntimeError(f"{op}: segments active column must be 0 or 1")
    elif check and n != 0:
        raise RuntimeError(f"{op}: segments must tile the {n} elements of params in order")
    seg_t = (steps + 1).to(torch.float64)
    rest = SegmentColumn.GROUP  # group, step, active: the columns that must agree
    if broadcast and segments.size(0) > 0 and _concrete(segments) and bool(
            (segments[:, rest:] == segments[:1, rest:]).all()):
        # The usual step (one group, every tensor active, one step count): one value
        # for all elements instead of [N] expansions (the fallback's main cost).
        return Layout(groups[:1], active[:1].bool(), steps[:1] == 0, g, numels, groups,
                      seg_t, uniform=True)
    group_el = torch.repeat_interleave(groups, numels, output_size=n)
    active_el = torch.repeat_interleave(active, numels, output_size=n).bool()
    first_el = torch.repeat_interleave(steps == 0, numels, output_size=n)
    return Layout(group_el, active_el, first_el, g, numels, groups, seg_t)


def _concrete(t: Tensor) -> bool:
    """Whether ``t`` holds real values that may be read: a plain tensor, not a tracing
    subclass (fake or functional tensors) and not under torch.compile."""
    return (type(t) is torch.Tensor and t.device.type != "meta"
            and not torch.compiler.is_compiling())


def flag(group_flags: Tensor, layout: Layout, bit: int) -> Tensor:
    """Whether each element's group sets flag ``bit``."""
    return (group_flags[layout.group] & bit) != 0


def per_element(values: Tensor, layout: Layout, ct: torch.dtype) -> Tensor:
    """A [G] hyperparameter (or a value derived from it, computed in its dtype) gathered
    out to the elements and cast once to the compute dtype ``ct``."""
    return values[layout.group].to(ct)


def checked_layout(op: str, contract: OpContract, buffers: tuple[Tensor, ...],
                   segments: Tensor, hyper: tuple[Tensor, ...], group_flags: Tensor,
                   elementwise: tuple[Tensor | None, ...], check: bool,
                   upstream: tuple[Tensor, ...] = ()) -> Layout:
    """:func:`layout` after the C++ ops' checks on every input (with ``check``).

    ``buffers``, ``hyper`` and ``elementwise`` are the op's inputs in schema order
    (``contract.buffers``, ``contract.hyper``, :data:`ELEMENTWISE`); ``upstream`` the
    backward's incoming gradients, one per ``contract.outputs``.
    """
    params = buffers[0]
    if check:
        _check_inputs(op, contract, dict(zip(contract.buffers, buffers)),
                      dict(zip(contract.hyper, hyper)), group_flags,
                      dict(zip((f"grad_{name}_out" for name in contract.outputs), upstream)))
        for name, t in zip(ELEMENTWISE, elementwise):
            _check_elementwise(op, name, t, params)
    lay = layout(op, params, segments, group_flags, check, broadcast=True)
    if check:
        name = contract.optional_state
        _check_optional(op, name, buffers[contract.buffers.index(name)], params.numel(),
                        flag(group_flags, lay, contract.optional_flag) & lay.active)
    return lay


def _check_inputs(op: str, contract: OpContract, buffers: dict[str, Tensor],
                  hyper: dict[str, Tensor], group_flags: Tensor,
                  upstream: dict[str, Tensor]) -> None:
    """The C++ ops' checks on buffers, hyperparameters and flags (segments: :func:`layout`)."""
    params = buffers["params"]
    if params.dim() != 1:
        raise RuntimeError(f"{op}: params must be 1-D, got shape {list(params.shape)}")
    if params.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(f"{op}: params must be float64, float32, float16 or bfloat16, "
                           f"got {params.dtype}")
    n = params.numel()
    for name, t in list(buffers.items()) + list(upstream.items()):
        if name == contract.optional_state or name.endswith("_out"):
            _check_1d(op, name, t, (n, 0), f"{n} elements or 0", params, str(params.dtype))
        else:
            _check_1d(op, name, t, (n,), f"{n} elements", params, str(params.dtype))
    hdt = compute_dtype(params.dtype)
    if group_flags.dim() != 1 or group_flags.dtype != torch.int64:
        raise RuntimeError(f"{op}: group_flags must be a 1-D int64 tensor, got "
                           f"{group_flags.dtype} of shape {list(group_flags.shape)}")
    g = group_flags.numel()
    # The [G] hyperparameters share one dtype, lr's: the compute dtype or float64.
    lr_dtype = hyper["lr"].dtype
    if lr_dtype not in (hdt, torch.float64):
        raise RuntimeError(f"{op}: lr must have dtype {hdt} or torch.float64 for "
                           f"{params.dtype} params, got {lr_dtype}")
    for name, t in hyper.items():
        _check_1d(op, name, t, (g,), f"{g} elements (one per group, as group_flags)", params,
                  f"{lr_dtype} (the dtype of lr)", dtype=lr_dtype, contiguous=False)
    if group_flags.device != params.device:
        raise RuntimeError(f"{op}: group_flags must be on {params.device}, got "
                           f"{group_flags.device}")
    # int(): the complement of an IntFlag stays inside its bits (~all_bits would be 0).
    bits = [int(f) for f in contract.flags]
    all_bits = functools.reduce(operator.or_, bits, 0)
    if g and bool((group_flags & ~all_bits).any()):
        raise RuntimeError(f"{op}: group_flags may only use bits "
                           f"{', '.join(map(str, bits[:-1]))} and {bits[-1]}, got "
                           f"{group_flags.tolist()}")


def present(t: Tensor | None) -> bool:
    """Whether an optional per-element hyperparameter is given (None or 0 elements: no)."""
    return t is not None and t.numel() > 0


def _check_elementwise(op: str, name: str, t: Tensor | None, params: Tensor) -> None:
    """A per-element hyperparameter, as the C++ ops check it: absent, or 1-D, contiguous,
    ``params.numel()`` elements of the compute dtype on the device of params."""
    if not present(t):
        return
    assert t is not None
    n, want = params.numel(), compute_dtype(params.dtype)
    _check_1d(op, name, t, (n,), f"{n} elements (one per element of params) or 0 (none)",
              params, f"{want} for {params.dtype} params", dtype=want)


def _check_1d(op: str, name: str, t: Tensor, sizes: tuple[int, ...], sizes_text: str,
              params: Tensor, dtype_text: str, dtype: torch.dtype | None = None,
              contiguous: bool = True) -> None:
    """One 1-D input: ``sizes`` elements, ``dtype`` (default: that of params), on the
    device of params and, with ``contiguous``, contiguous."""
    if t.dim() != 1 or t.numel() not in sizes:
        raise RuntimeError(f"{op}: {name} must be 1-D with {sizes_text}, "
                           f"got shape {list(t.shape)}")
    if t.dtype != (params.dtype if dtype is None else dtype):
        raise RuntimeError(f"{op}: {name} must have dtype {dtype_text}, got {t.dtype}")
    if t.device != params.device:
        raise RuntimeError(f"{op}: {name} must be on {params.device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise RuntimeError(f"{op}: {name} must be contiguous")


def elementwise_values(op: str, elementwise: Mapping[str, Tensor] | None,
                       allowed: tuple[str, ...], params: Tensor,
                       check: bool) -> dict[str, Tensor]:
    """The reference-only per-element values of the hyperparameters other than lr and
    weight_decay (``elementwise=``), checked by name and, with ``check``, by shape."""
    if not elementwise:
        return {}
    for name in elementwise:
        if name in ELEMENTWISE_HYPER:
            raise ValueError(f"{op}: elementwise may not hold {name!r}; pass it as "
                             f"{name}_elementwise (the fused ops take it)")
        if name not in allowed:
            raise ValueError(f"{op}: elementwise names an unknown hyperparameter {name!r}; "
                             f"expected one of {', '.join(allowed)}")
    if check:
        for name, t in elementwise.items():
            _check_elementwise(op, f"elementwise[{name!r}]", t, params)
    return {k: v for k, v in elementwise.items() if present(v)}


def _check_optional(op: str, name: str, t: Tensor, n: int, needed: Tensor) -> None:
    """The optional state buffer: ``n`` elements, or 0 when no active group needs it."""
    if t.numel() not in (0, n):
        raise RuntimeError(f"{op}: {name} must have {n} or 0 elements, got {t.numel()}")
    if t.numel() == 0 and n > 0 and bool(needed.any()):
        raise RuntimeError(f"{op}: {name} has 0 elements but a group that needs it is active")
