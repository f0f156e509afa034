"""On the CPU the native path runs the tasks in chunks (``loft._batched.CHUNK_BYTES``): any
chunking gives the numbers of one batched call and of the sequential loop, and the chunk
size is found without drawing random numbers or changing buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loft
import loft._batched as batched_module

from ._common import OPTIMIZERS, assert_nontrivial, assert_same, run, task_batches


@pytest.mark.parametrize("limit", [1, 400, 7000])
@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_chunked_equals_sequential(model: str, limit: int, monkeypatch: pytest.MonkeyPatch
                                   ) -> None:
    """Chunks of one task (limit 1 byte) or of two (MLP at 400 bytes, conv at 7000):
    weights, losses, BatchNorm statistics and meta-gradients as the sequential loop."""
    monkeypatch.setattr(batched_module, "CHUNK_BYTES", limit)
    batches = task_batches(model)
    sequential = run(model, OPTIMIZERS["momentum"], batches, batched=False)
    assert_nontrivial(sequential)
    assert_same(run(model, OPTIMIZERS["momentum"], batches, batched=True), sequential)


def test_chunk_size_found_without_side_effects(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call for an input shape draws the same dropout masks and leaves the same
    BatchNorm statistics as every later call from the same random state."""
    monkeypatch.setattr(batched_module, "CHUNK_BYTES", 1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.5),
                        nn.Linear(5, 2)).double()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    outs, stats = [], []
    for _ in range(2):
        fmodel = loft.monkeypatch(net, tasks=3)
        for _ in range(2):
            torch.manual_seed(5)
            outs.append(fmodel(x))
        stats.append(fmodel[1].running_mean.clone())
    assert all(torch.equal(outs[0], out) for out in outs[1:])
    assert not torch.equal(outs[0][0], outs[0][1])  # the tasks' masks differ
    assert torch.equal(stats[0], stats[1])
