"""Shared test settings: tolerances derived from the dtype, stated once."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

import loft

#: (rtol, atol) for comparing fused kernels with the reference, per buffer dtype. Both
#: compute in float64 or float32 and round once; the bounds are a few units of the
#: dtype's machine epsilon (float64: 2.2e-16, float32: 1.2e-7, float16: 9.8e-4,
#: bfloat16: 7.8e-3), widened where float32 sums over thousands of elements enter.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a longer case (run by default; -m 'not slow' skips)")


@pytest.fixture(scope="session", autouse=True)
def _fused_backend() -> None:
    """Build the ops once, up front, so that a build failure shows as a failure here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loft.backend()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch.set_num_threads(1) for the test, restored after it: tiny ops run an order of
    magnitude faster on one intra-op thread than on a contended pool (same numbers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def fused() -> None:
    """Cases that compare the fused kernels with the reference need them built."""
    assert loft.backend() == "fused", loft.backend_reason()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 what: str = "") -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")
