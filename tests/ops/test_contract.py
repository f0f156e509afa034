"""loft._contract against what it describes: the registered schemas, the reference and the docs."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from loft import _contract, reference

DOCS = Path(__file__).resolve().parents[2] / "docs" / "ops.md"


def _schema(name: str) -> torch.FunctionSchema:
    return getattr(torch.ops.loft, name).default._schema


@pytest.mark.parametrize("op", _contract.OPS, ids=lambda op: op.name)
def test_forward_schema_is_the_contract(op: _contract.OpContract, fused: None) -> None:
    schema = _schema(op.name)
    assert tuple(a.name for a in schema.arguments) == op.inputs
    assert len(schema.returns) == len(op.outputs)
    slots = op.forward_slots
    names = list(op.inputs)
    assert names[slots.buffers] == list(op.buffers)
    assert names[slots.segments] == "segments" and names[slots.flags] == "group_flags"
    assert names[slots.hyper] == list(op.hyper)
    assert names[slots.elementwise] == list(_contract.ELEMENTWISE)


@pytest.mark.parametrize("op", _contract.OPS, ids=lambda op: op.name)
def test_backward_schema_is_the_contract(op: _contract.OpContract, fused: None) -> None:
    schema = _schema(op.backward_name)
    names = [a.name for a in schema.arguments]
    slots = op.backward_slots
    assert names[slots.upstream] == [f"grad_{name}_out" for name in op.outputs]
    assert names[slots.buffers] == list(op.buffers)
    assert names[slots.segments] == "segments" and names[slots.flags] == "group_flags"
    assert names[slots.hyper] == list(op.hyper)
    assert names[slots.mask] == "hyper_grad_mask"
    assert names[slots.elementwise] == list(_contract.ELEMENTWISE)
    assert len(names) == slots.elementwise.stop
    grads = op.grad_slots
    assert len(schema.returns) == grads.elementwise.stop
    assert grads.hyper.stop - grads.hyper.start == len(op.hyper)


@pytest.mark.parametrize("op", _contract.OPS, ids=lambda op: op.name)
def test_reference_takes_the_contract_arguments(op: _contract.OpContract) -> None:
    """The reference keeps the ops' argument names and order (STYLE: no drift)."""
    forward = list(inspect.signature(getattr(reference, op.name)).parameters)
    assert tuple(forward[:len(op.inputs)]) == op.inputs
    backward = list(inspect.signature(getattr(reference, op.backward_name)).parameters)
    slots = op.backward_slots
    assert backward[slots.buffers] == list(op.buffers)
    assert backward[slots.mask] == "hyper_grad_mask"


def test_mask_bits_follow_the_schema_order() -> None:
    for op in _contract.OPS:
        for k, name in enumerate(op.hyper):
            assert op.hyper_bit(name) == 1 << k
        assert op.hyper_grad_mask([True] * len(op.hyper), [True, True]) == (
            (1 << (len(op.hyper) + 2)) - 1)
        assert op.hyper_grad_mask([False] * len(op.hyper), [False, True]) == op.elementwise_bit(1)


def test_flag_bits_and_segment_columns_are_the_documented_ones() -> None:
    text = DOCS.read_text()
    assert "`offset, numel, group, step, active`" in text
    assert ", ".join(_contract.SEGMENT_COLUMNS) == "offset, numel, group, step, active"
    lines = [line for line in text.splitlines() if line.startswith("`group_flags` bits:")]
    words = {"MOMENTUM": "use momentum", "DECOUPLED": "decoupled weight decay"}
    for flags, line in zip((_contract.SGDFlag, _contract.AdamFlag), lines):  # SGD's first
        for flag in flags:
            assert f"`{int(flag)}` {words.get(flag.name, flag.name.lower())}" in line, flag
    assert reference.SGD_MOMENTUM == _contract.SGDFlag.MOMENTUM
    assert reference.ADAM_DECOUPLED == _contract.AdamFlag.DECOUPLED
