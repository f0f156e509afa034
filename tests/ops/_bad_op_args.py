"""Malformed direct calls of the ops, shared by ``test_malformed_calls.py`` and
``tools/asan_ops.py``.

Each case is one call of ``torch.ops.loft.<op>`` (or its ``_backward``) with a single
argument broken: wrong sizes, dtypes, layouts or devices, segment tables that point
outside the buffers, group indices past the hyperparameter tensors, per-element
hyperparameters of the wrong size or layout. Every one must raise
``RuntimeError`` whose message names the broken argument, and must not touch memory
outside the tensors it was given (``tools/asan_ops.py`` runs them under
AddressSanitizer).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from loft import _contract

# The ops' names, buffers, hyperparameters and flags, from their contract.
SGD, ADAM = _contract.SGD.name, _contract.ADAM.name
_CONTRACTS = {contract.name: contract for contract in _contract.OPS}
BUFFERS = {op: contract.buffers for op, contract in _CONTRACTS.items()}
HYPER = {op: contract.hyper for op, contract in _CONTRACTS.items()}
#: The forward outputs, whose upstream gradients the backward op takes first.
OUTPUTS = {op: contract.outputs for op, contract in _CONTRACTS.items()}
#: The flags that make each op read its optional buffer (momentum, amsgrad).
NEEDS_OPTIONAL = {op: int(contract.optional_flag) for op, contract in _CONTRACTS.items()}
OPTIONAL = {op: contract.optional_state for op, contract in _CONTRACTS.items()}
SIZES = (4, 6)  # two segments, one per group
N = sum(SIZES)
GROUPS = 2
INT64_MAX = 2**63 - 1


@dataclass
class BadCall:
    """One malformed call: ``op(*args)`` must raise RuntimeError matching ``expected``."""

    name: str
    op: str  # e.g. "adam_step" or "adam_step_backward"
    args: list
    expected: str  # a regular expression: the argument's name, as the message gives it


def valid_inputs(op: str, device: str = "cpu", dtype: torch.dtype = torch.float64) -> dict:
    """Well-formed inputs of ``op`` over :data:`SIZES` in two groups, both segments active,
    the optional buffer present and used by group 0."""
    gen = torch.Generator().manual_seed(0)
    hdt = torch.float64 if dtype == torch.float64 else torch.float32
    case: dict[str, torch.Tensor] = {}
    for name in BUFFERS[op]:
        values = torch.rand(N, generator=gen, dtype=torch.float64) * 0.5 + 0.1
        case[name] = values.to(device=device, dtype=dtype)
    case["segments"] = torch.tensor([[0, SIZES[0], 0, 1, 1], [SIZES[0], SIZES[1], 1, 0, 1]],
                                    dtype=torch.int64, device=device)
    hyper_values = {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01,
                    "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
    for name in HYPER[op]:
        case[name] = torch.full((GROUPS,), hyper_values[name], dtype=hdt, device=device)
    case["group_flags"] = torch.tensor([NEEDS_OPTIONAL[op], 0], dtype=torch.int64,
                                       device=device)
    return case


#: The optional per-element hyperparameters, last in the schemas (after the mask in the
#: backward ops).
ELEMENTWISE = _contract.ELEMENTWISE


def elementwise_args(case: dict) -> list:
    """``[lr_elementwise, weight_decay_elementwise]`` (None where absent) when ``case``
    holds either, else nothing (the calls without them)."""
    if not any(name in case for name in ELEMENTWISE):
        return []
    return [case.get(name) for name in ELEMENTWISE]


def forward_args(op: str, case: dict) -> list:
    return ([case[b] for b in BUFFERS[op]] + [case["segments"]]
            + [case[h] for h in HYPER[op]] + [case["group_flags"]] + elementwise_args(case))


def backward_args(op: str, case: dict, upstream: dict | None = None) -> list:
    """The backward op's arguments: upstream gradients (``grad_<output>_out``: well-formed
    ones unless given in ``upstream``), the forward's inputs, the hyperparameter mask
    (every bit), the per-element hyperparameters."""
    upstream = upstream or {}
    device = case["segments"].device
    n = case["params"].numel()
    grads = [upstream.get(f"grad_{o}_out", torch.ones(n, dtype=torch.float64, device=device))
             for o in OUTPUTS[op]]
    without = {k: v for k, v in case.items() if k not in ELEMENTWISE}
    return (grads + forward_args(op, without) + [2 ** (len(HYPER[op]) + 2) - 1]
            + elementwise_args(case))


def _on(value: torch.Tensor, device: str) -> torch.Tensor:
    """``value`` on ``device`` with its strides (``.to`` would make a strided slice
    contiguous)."""
    if value.device == torch.device(device):
        return value
    out = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)
    return out.copy_(value)


def _rows(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.int64)


def _replacements(op: str) -> Iterator[tuple[str, str, object, str]]:
    """(case name, argument, replacement, expected text) for the forward's arguments."""
    f64 = torch.float64
    a, b = SIZES
    # The segment table: every way of pointing outside [0, N) or past the groups.
    yield "segment past the end", "segments", _rows([0, a, 0, 0, 1], [a, b + 1, 1, 0, 1]), \
        "segments"
    yield "segment far past the end", "segments", _rows([0, a, 0, 0, 1], [a, 10**9, 1, 0, 1]), \
        "segments"
    yield "segment numel overflowing int64", "segments", \
        _rows([0, a, 0, 0, 1], [a, INT64_MAX, 1, 0, 1]), "segments"
    yield "negative offset", "segments", _rows([-a, a, 0, 0, 1], [0, N, 1, 0, 1]), "segments"
    yield "offset overflowing int64", "segments", \
        _rows([0, a, 0, 0, 1], [INT64_MAX, b, 1, 0, 1]), "segments"
    yield "negative numel", "segments", _rows([0, -a, 0, 0, 1], [-a, N + a, 1, 0, 1]), \
        "segments"
    yield "gap between segments", "segments", _rows([0, a, 0, 0, 1], [a + 1, b - 1, 1, 0, 1]), \
        "segments"
    yield "segments cover too little", "segments", _rows([0, a, 0, 0, 1], [a, b - 1, 1, 0, 1]), \
        "segments"
    yield "no segments for a non-empty buffer", "segments", \
        torch.zeros(0, 5, dtype=torch.int64), "segments"
    yield "group == G", "segments", _rows([0, a, 0, 0, 1], [a, b, GROUPS, 0, 1]), "group"
    yield "group far past G", "segments", _rows([0, a, 0, 0, 1], [a, b, 10**9, 0, 1]), "group"
    yield "negative group", "segments", _rows([0, a, -1, 0, 1], [a, b, 1, 0, 1]), "group"
    yield "negative step", "segments", _rows([0, a, 0, -3, 1], [a, b, 1, 0, 1]), "step"
    yield "active not 0 or 1", "segments", _rows([0, a, 0, 0, 7], [a, b, 1, 0, 1]), "active"
    yield "segments with 6 columns", "segments", torch.zeros(2, 6, dtype=torch.int64), \
        "segments"
    yield "1-D segments", "segments", torch.zeros(10, dtype=torch.int64), "segments"
    yield "int32 segments", "segments", _rows([0, a, 0, 0, 1], [a, b, 1, 0, 1]).int(), \
        "segments"
    yield "float segments", "segments", _rows([0, a, 0, 0, 1], [a, b, 1, 0, 1]).double(), \
        "segments"
    yield "non-contiguous segments", "segments", \
        _rows([0, a], [a, b], [0, 1], [0, 0], [1, 1]).t(), "segments"
    # The buffers.
    yield "short grads", "grads", torch.zeros(N - 1, dtype=f64), "grads"
    yield "long grads", "grads", torch.zeros(N + 1, dtype=f64), "grads"
    yield "empty grads", "grads", torch.zeros(0, dtype=f64), "grads"
    yield "float32 grads", "grads", torch.zeros(N, dtype=torch.float32), "grads"
    yield "2-D grads", "grads", torch.zeros(2, N // 2, dtype=f64), "grads"
    yield "non-contiguous grads", "grads", torch.zeros(2 * N, dtype=f64)[::2], "grads"
    yield "integer params", "params", torch.zeros(N, dtype=torch.int64), "params"
    yield "2-D params", "params", torch.zeros(2, N // 2, dtype=f64), "params"
    state = BUFFERS[op][2]
    yield f"long {state}", state, torch.zeros(N + 3, dtype=f64), state
    yield f"float32 {state}", state, torch.zeros(N, dtype=torch.float32), state
    optional = OPTIONAL[op]
    yield f"{optional} of 3 elements", optional, torch.zeros(3, dtype=f64), optional
    yield f"{optional} empty but used", optional, torch.zeros(0, dtype=f64), optional
    # The hyperparameters and flags.
    yield "lr with G + 1 values", "lr", torch.zeros(GROUPS + 1, dtype=f64), "lr"
    yield "lr with no values", "lr", torch.zeros(0, dtype=f64), "lr"
    yield "float32 lr for float64 buffers", "lr", torch.zeros(GROUPS, dtype=torch.float32), "lr"
    yield "2-D lr", "lr", torch.zeros(GROUPS, 1, dtype=f64), "lr"
    yield "int64 weight_decay", "weight_decay", torch.zeros(GROUPS, dtype=torch.int64), \
        "weight_decay"
    last = HYPER[op][-2]
    yield f"short {last}", last, torch.zeros(GROUPS - 1, dtype=f64), last
    yield "group_flags with one group", "group_flags", torch.zeros(1, dtype=torch.int64), \
        "lr|group_flags"
    yield "int32 group_flags", "group_flags", torch.zeros(GROUPS, dtype=torch.int32), \
        "group_flags"
    yield "unknown flag bit", "group_flags", torch.tensor([8, 0]), "group_flags"
    yield "negative flags", "group_flags", torch.tensor([-1, 0]), "group_flags"
    # The per-element hyperparameters (absent in the valid case).
    yield "short lr_elementwise", "lr_elementwise", torch.zeros(N - 1, dtype=f64), \
        "lr_elementwise"
    yield "float32 lr_elementwise for float64 buffers", "lr_elementwise", \
        torch.zeros(N, dtype=torch.float32), "lr_elementwise"
    yield "2-D weight_decay_elementwise", "weight_decay_elementwise", \
        torch.zeros(2, N // 2, dtype=f64), "weight_decay_elementwise"
    yield "non-contiguous weight_decay_elementwise", "weight_decay_elementwise", \
        torch.zeros(2 * N, dtype=f64)[::2], "weight_decay_elementwise"


def bad_calls(device: str = "cpu") -> list[BadCall]:
    """Every malformed call, for both ops, forward and backward (on ``device``; with
    ``"cuda"`` each case also gets one argument moved to the CPU)."""
    calls: list[BadCall] = []
    for op in (SGD, ADAM):
        for name, arg, value, expected in _replacements(op):
            case = valid_inputs(op, device)
            case[arg] = _on(value, device)
            calls.append(BadCall(name, op, forward_args(op, case), expected))
            calls.append(BadCall(name, op + "_backward", backward_args(op, case), expected))
        for out in OUTPUTS[op]:
            upstream = f"grad_{out}_out"
            for what, value in (("short", torch.ones(N - 1, dtype=torch.float64)),
                                ("float32", torch.ones(N, dtype=torch.float32))):
                case = valid_inputs(op, device)
                args = backward_args(op, case, {upstream: _on(value, device)})
                calls.append(BadCall(f"{what} {upstream}", op + "_backward", args, upstream))
        if device != "cpu":
            for arg in BUFFERS[op][1:] + ("segments", "lr", "group_flags") + ELEMENTWISE:
                case = valid_inputs(op, device)
                if arg in ELEMENTWISE:
                    case[arg] = torch.full((N,), 0.1, dtype=torch.float64)
                case[arg] = case[arg].cpu()
                calls.append(BadCall(f"{arg} on the CPU", op, forward_args(op, case), arg))
                calls.append(BadCall(f"{arg} on the CPU", op + "_backward",
                                     backward_args(op, case), arg))
    return calls


def good_calls(device: str = "cpu") -> Iterator[tuple[str, list]]:
    """Well-formed calls at the edges (empty buckets, empty segments, inactive segments,
    sizes that are not a multiple of any vector width), to run under the sanitizer."""
    for op in (SGD, ADAM):
        for sizes in ((0,), (0, 0), (1,), (7, 0, 4097, 3), (4096, 1), (33, 1000)):
            n = sum(sizes)
            gen = torch.Generator().manual_seed(n)
            case = {b: (torch.rand(n, generator=gen, dtype=torch.float64) + 0.1).to(device)
                    for b in BUFFERS[op]}
            rows, off = [], 0
            for i, k in enumerate(sizes):
                rows.append([off, k, i % 2, i, int(i % 3 != 2)])
                off += k
            case["segments"] = torch.tensor(rows, dtype=torch.int64).reshape(-1, 5).to(device)
            for h in HYPER[op]:
                case[h] = torch.full((2,), 0.5, dtype=torch.float64, device=device)
            for flags in ([NEEDS_OPTIONAL[op], 7 - NEEDS_OPTIONAL[op]], [0, 0]):
                case["group_flags"] = torch.tensor(flags, dtype=torch.int64, device=device)
                if not any(f & NEEDS_OPTIONAL[op] for f in flags):
                    case[OPTIONAL[op]] = case[OPTIONAL[op]][:0]
                yield f"{op} {sizes} flags {flags}", [op, forward_args(op, case)]
                yield f"{op}_backward {sizes} flags {flags}", [op + "_backward",
                                                               backward_args(op, case)]
                # With per-element lr and weight decay (one of them 0 elements: absent).
                for absent in ELEMENTWISE:
                    each = dict(case)
                    for name in ELEMENTWISE:
                        each[name] = (torch.rand(n, generator=gen, dtype=torch.float64) * 0.2)[
                            :0 if name == absent else n].to(device)
                    what = f"{sizes} flags {flags} without {absent}"
                    yield f"{op} {what}", [op, forward_args(op, each)]
                    yield f"{op}_backward {what}", [op + "_backward", backward_args(op, each)]
