"""The examples run, in a tiny configuration, and print their final figures."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


#: One intra-op thread: the tiny runs gain nothing from more, and when the tests share the
#: cores with other processes, OpenMP threads spinning on busy cores slow them down by
#: ten times or more (measured: 0.07 s against 0.5-4 s per Omniglot meta-step).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                         text=True, timeout=600, env=ENV)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _figure(stdout: str, label: str) -> float:
    """The number printed after ``label`` on one line of ``stdout``."""
    match = re.search(re.escape(label) + r"\s*([-+0-9.eE]+|nan)", stdout)
    assert match, f"no {label!r} in:\n{stdout}"
    return float(match.group(1))


def _figures(stdout: str) -> list[float]:
    """Every number ``stdout`` prints, but the timing line's (which changes run to run)."""
    kept = [line for line in stdout.splitlines()
            if not line.startswith(("time per meta-iteration:", "loft backend:"))]
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+(?:[eE][-+]?\d+)?", "\n".join(kept))]


def _without_timing(stdout: str) -> str:
    return "\n".join(line for line in stdout.splitlines()
                     if not line.startswith("time per meta-iteration:"))


def _import_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learned_hyperparameters() -> None:
    stdout = _run("learned_hyperparameters.py", "--meta-steps", "3").stdout
    assert "loft backend: fused" in stdout
    assert "weights: -0.9915, -0.1217, 1.0145, 2.0640, 2.8668, 3.3908" in stdout
    assert "meta-loss: 0.011927987982896" in stdout
    assert "d meta-loss / d lr = -1.6295, d meta-loss / d momentum = -0.9496" in stdout
    assert "learned lr = " in stdout


# --------------------------------------------------------------------------- sinusoid

SINUSOID_TINY = ("--meta-iterations", "10", "--meta-batch", "4", "--eval-tasks", "20",
                 "--eval-steps", "1", "--seed", "0")


def test_maml_sinusoid() -> None:
    first = _run("maml_sinusoid.py", *SINUSOID_TINY).stdout
    assert "loft backend: fused" in first
    assert "held-out tasks: 20, shots: 10, inner steps: 1" in first
    before = _figure(first, "mean query MSE before adaptation:")
    after = _figure(first, "mean query MSE after adaptation:")
    # Sine tasks have amplitudes in [0.1, 5]: the mean of A^2/2 is about 4.2. One SGD
    # step on 10 support points brings the 20 held-out tasks' query MSE down (here by
    # about 0.04, far beyond float noise on any machine).
    assert 0.5 < before < 20 and 0.5 < after < 20
    assert after < before
    assert _figure(first, "time per meta-iteration:") > 0
    assert "(median; one task at a time)" in first
    # Seeded: the same command prints the same figures (the time aside).
    assert _without_timing(_run("maml_sinusoid.py", *SINUSOID_TINY).stdout) == \
        _without_timing(first)


def test_maml_sinusoid_batched_gives_the_sequential_figures() -> None:
    """``--batched`` (one innerloop_ctx(..., tasks=4) per meta-batch) prints the loop over
    tasks' figures, up to float32 rounding, and its time per meta-iteration."""
    sequential = _run("maml_sinusoid.py", *SINUSOID_TINY).stdout
    batched = _run("maml_sinusoid.py", *SINUSOID_TINY, "--batched").stdout
    assert "(median; batched, tasks=4)" in batched
    assert _figure(batched, "time per meta-iteration:") > 0
    assert _figure(batched, "last meta-batch's mean query MSE:") == pytest.approx(
        _figure(sequential, "last meta-batch's mean query MSE:"), rel=1e-5)
    expected = _figures(sequential)
    assert len(expected) >= 3
    assert _figures(batched) == pytest.approx(expected, rel=1e-3, abs=2e-4)


# --------------------------------------------------------------------------- omniglot

OMNIGLOT_TINY = ("--n-way", "3", "--k-shot", "1", "--k-query", "2", "--task-num", "2",
                 "--inner-steps", "1", "--epochs", "2", "--iterations", "3",
                 "--eval-tasks", "4", "--seed", "0")


def test_maml_omniglot_synthetic() -> None:
    stdout = _run("maml_omniglot.py", "--synthetic", *OMNIGLOT_TINY).stdout
    assert "loft backend: fused" in stdout
    assert "data: synthetic, 100 training classes, 50 held-out classes" in stdout
    assert "before meta-training: held-out query loss " in stdout
    assert "epoch 1: train query loss " in stdout and "epoch 2: train query loss " in stdout
    accuracy = _figure(stdout, "held-out query accuracy after adaptation:")
    assert 0.0 <= accuracy <= 1.0
    assert "(3-way 1-shot, inner steps: 1, chance: 0.3333)" in stdout
    assert _figure(stdout, "time per meta-iteration:") > 0


def test_maml_omniglot_batched_gives_the_sequential_figures() -> None:
    """``--batched`` (one innerloop_ctx(..., tasks=2) per meta-batch, BatchNorm statistics
    per task; the evaluation batched too) prints the loop over tasks' losses and
    accuracies, up to float32 rounding, and its time per meta-iteration."""
    sequential = _run("maml_omniglot.py", "--synthetic", *OMNIGLOT_TINY).stdout
    batched = _run("maml_omniglot.py", "--synthetic", *OMNIGLOT_TINY, "--batched").stdout
    assert "(median; batched, tasks=2)" in batched
    assert "(median; one task at a time)" in sequential
    expected = _figures(sequential)
    assert len(expected) >= 10
    assert _figures(batched) == pytest.approx(expected, rel=1e-3, abs=2e-4)


#: A fake Omniglot: {split: {alphabet: characters}}, DRAWINGS PNGs per character.
FAKE_LAYOUT = {"images_background": {"Alpha": 2, "Beta": 2, "Gamma": 1},
               "images_evaluation": {"Delta": 3}}
DRAWINGS = 4


def _fake_omniglot(root: Path) -> Path:
    """Omniglot's layout and file format (105x105 one-bit PNGs, black ink on white), with
    a different block glyph per character, slightly moved in each drawing."""
    pil_image = pytest.importorskip("PIL.Image")
    pil_draw = pytest.importorskip("PIL.ImageDraw")
    glyph = 0
    for split, alphabets in FAKE_LAYOUT.items():
        for alphabet, characters in alphabets.items():
            for c in range(1, characters + 1):
                folder = root / split / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True)
                glyph += 1
                for d in range(1, DRAWINGS + 1):
                    image = pil_image.new("1", (105, 105), 1)
                    draw = pil_draw.Draw(image)
                    x0, y0 = 5 + 8 * glyph + d, 10 + 6 * glyph + d
                    draw.rectangle((x0, y0, x0 + 20, y0 + 30), fill=0)
                    image.save(folder / f"{glyph:04d}_{d:02d}.png")
    (root / "images_background" / "Alpha" / "empty_character").mkdir()  # no PNG: skipped
    (root / "images_background" / "README.txt").write_text("not an alphabet")
    return root


def test_maml_omniglot_real_loader_end_to_end(tmp_path: Path) -> None:
    root = _fake_omniglot(tmp_path / "omniglot")
    stdout = _run("maml_omniglot.py", "--data", str(root), "--rotations",
                  *OMNIGLOT_TINY).stdout
    # 5 background characters, times 4 rotations; 3 evaluation characters.
    assert f"data: {root}, 20 training classes, 3 held-out classes" in stdout
    accuracy = _figure(stdout, "held-out query accuracy after adaptation:")
    assert 0.0 <= accuracy <= 1.0


def test_maml_omniglot_loader(tmp_path: Path) -> None:
    root = _fake_omniglot(tmp_path / "omniglot")
    omniglot = _import_example("maml_omniglot")
    characters = omniglot.find_characters(root / "images_background")
    assert [c.relative_to(root / "images_background").as_posix() for c in characters] == [
        "Alpha/character01", "Alpha/character02", "Beta/character01", "Beta/character02",
        "Gamma/character01"]
    pools = omniglot.load_omniglot(root)
    assert [len(pools["train"]), len(pools["test"])] == [5, 3]
    for images in pools["train"] + pools["test"]:
        assert images.shape == (DRAWINGS, 28, 28) and images.dtype == np.uint8
        # Inverted: the white background is 0, the black rectangle's inside is 255.
        assert images[:, 0, 0].max() == 0 and images.max() == 255
    # Every character is its own glyph: no two classes have the same first drawing.
    firsts = {images[0].tobytes() for images in pools["train"] + pools["test"]}
    assert len(firsts) == 8

    rotated = omniglot.with_rotations(pools["train"])
    assert len(rotated) == 20
    np.testing.assert_array_equal(rotated[5], np.rot90(pools["train"][0], 1, axes=(1, 2)))

    sampler = omniglot.TaskSampler(pools["train"], n_way=3, k_shot=1, k_query=2,
                                   rng=np.random.default_rng(0))
    x_support, y_support, x_query, y_query = sampler.sample(2)
    assert tuple(x_support.shape) == (2, 3, 1, 28, 28)
    assert tuple(x_query.shape) == (2, 6, 1, 28, 28)
    assert float(x_support.min()) >= 0.0 and float(x_support.max()) <= 1.0
    assert y_support.tolist() == [[0, 1, 2]] * 2
    assert y_query.tolist() == [[0, 0, 1, 1, 2, 2]] * 2
    with pytest.raises(ValueError, match="drawings per class"):
        omniglot.TaskSampler(pools["train"], n_way=3, k_shot=2, k_query=3,
                             rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="6-way tasks need 6 classes"):
        omniglot.TaskSampler(pools["train"], n_way=6, k_shot=1, k_query=1,
                             rng=np.random.default_rng(0))


def test_maml_omniglot_loader_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    omniglot = _import_example("maml_omniglot")
    with pytest.raises(FileNotFoundError, match="images_background/<alphabet>/<character>"):
        omniglot.find_characters(tmp_path / "images_background")
    (tmp_path / "images_background" / "Alpha" / "character01").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no <alphabet>/<character>/\\*.png"):
        omniglot.find_characters(tmp_path / "images_background")
    # Without Pillow, --data fails with a clear message (and --synthetic still works).
    monkeypatch.setattr(omniglot, "Image", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        omniglot.load_omniglot(tmp_path)
    assert len(omniglot.synthetic_classes(2, 3, np.random.default_rng(0))) == 2


def test_maml_omniglot_missing_data_is_a_usage_error(tmp_path: Path) -> None:
    out = _run("maml_omniglot.py", "--data", str(tmp_path / "nowhere"), check=False)
    assert out.returncode == 2
    assert "images_background" in out.stderr and "is not a directory" in out.stderr


def test_long_inner_loop_modes() -> None:
    """Checkpointing gives the full unroll's meta-gradient (checked in float64 by the script)
    and the same meta-training; truncation and first order run and learn something else."""
    common = ("--inner-steps", "30", "--checkpoint-every", "7", "--meta-steps", "2")
    outputs = {mode: _run("long_inner_loop.py", "--mode", mode, *common).stdout
               for mode in ("full", "checkpoint", "truncate", "first-order")}
    assert _figure(outputs["checkpoint"], "relative difference:") < 1e-10
    grad = {mode: _figure(out, "d(log lr):") for mode, out in outputs.items()}
    final = {mode: (_figure(out, "final query loss"), _figure(out, "learned inner lr"))
             for mode, out in outputs.items()}
    assert grad["checkpoint"] == pytest.approx(grad["full"], rel=1e-4)
    assert final["checkpoint"] == pytest.approx(final["full"], rel=1e-4)
    assert all(np.isfinite(v).all() for v in final.values())
    # Truncation sees only the last 7 of 30 steps, first order drops the second-order terms.
    assert grad["truncate"] != pytest.approx(grad["full"], rel=1e-2)
    assert grad["first-order"] != pytest.approx(grad["full"], rel=1e-2)
