"""The examples run, in a tiny configuration, and print their final figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_learned_hyperparameters() -> None:
    stdout = _run("learned_hyperparameters.py", "--meta-steps", "3")
    assert "loft backend: fused" in stdout
    assert "weights: -0.9915, -0.1217, 1.0145, 2.0640, 2.8668, 3.3908" in stdout
    assert "meta-loss: 0.011927987982896" in stdout
    assert "d meta-loss / d lr = -1.6295, d meta-loss / d momentum = -0.9496" in stdout
    assert "learned lr = " in stdout
