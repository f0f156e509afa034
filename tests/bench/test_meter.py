"""The saved-tensor meter of the A/B/C suite: storages told apart by identity, not address,
so that the saved-bytes figures do not depend on where the allocator puts things."""

from __future__ import annotations

import torch

from loft.bench.measure import SavedTensorMeter, _instrumented_run, make_runner
from loft.bench.workloads import Workload, build


def test_meter_tells_storages_at_one_address_apart() -> None:
    """Two storages at one address (``torch.frombuffer`` on one buffer, as a freed storage's
    address reused by a new one): each is counted with its own size. Keyed by
    ``data_ptr()``, the second was counted at the first one's size."""
    buffer = bytearray(400)
    weight = torch.randn(100, requires_grad=True)
    meter = SavedTensorMeter()
    with meter:
        small = torch.frombuffer(buffer, dtype=torch.float32, count=10)
        first = (weight[:10] * small).sum()  # saves small (40 bytes)
        del small, first  # the graph and its saved tensor are gone
        large = torch.frombuffer(buffer, dtype=torch.float32, count=100)
        assert large.data_ptr() == torch.frombuffer(buffer, dtype=torch.float32).data_ptr()
        second = (weight * large).sum()  # saves large (400 bytes) at the same address
    assert (meter.live_bytes(), meter.num_storages) == (400, 1)
    with meter:
        other = torch.frombuffer(buffer, dtype=torch.float32, count=10)
        third = (weight[:10] * other).sum()  # a second live storage at that address
    assert (meter.live_bytes(), meter.num_storages) == (440, 2)
    del second, third, large, other  # the graphs and the saved tensors are gone
    assert (meter.live_bytes(), meter.num_storages) == (0, 0)


def test_meter_counts_views_of_one_storage_once() -> None:
    flat = torch.randn(100)
    weight = torch.randn(50, requires_grad=True)
    meter = SavedTensorMeter()
    with meter:
        loss = (weight * flat[:50]).sum() + (weight * flat[50:]).sum()
    assert (meter.live_bytes(), meter.num_storages) == (400, 1)
    del loss


def test_saved_bytes_are_the_same_in_every_run() -> None:
    """The instrumented figures of one workload, three times in one process (the
    allocator reuses addresses differently each time): identical."""
    built = build(Workload("C", "adam", 4))
    runner = make_runner("loft", built)
    figures = []
    for _ in range(3):
        run = _instrumented_run(runner, 4, torch.device("cpu"))
        figures.append((run["saved_bytes"], run["saved_storages"], run["saved_bytes_inner"]))
        garbage = [torch.empty(n) for n in (3, 7000, 123, 50000)]  # move the allocator on
        del garbage
    assert figures[0] == figures[1] == figures[2], figures
