"""The JIT build: cache keys, warm loads, the forced reference path, a broken compiler."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import loft
from loft import _ext


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=600)


def test_backend_is_fused_here() -> None:
    assert loft.backend() == "fused", loft.backend_reason()
    assert "built" in loft.backend_reason()


def test_build_key_follows_sources(tmp_path: Path) -> None:
    src = tmp_path / "csrc"
    shutil.copytree(_ext.csrc_dir(), src)
    sources = _ext._sources(src, cuda=False)
    key = _ext._build_key(src, sources, cuda=False)
    assert key == _ext._build_key(src, sources, cuda=False)
    (src / "cpu").joinpath(sources[-1].name).write_text(sources[-1].read_text() + "\n// edit\n")
    assert _ext._build_key(src, sources, cuda=False) != key
    header = next(src.glob("*.h"))
    key2 = _ext._build_key(src, sources, cuda=False)
    header.write_text(header.read_text() + "\n// edit\n")
    assert _ext._build_key(src, sources, cuda=False) != key2


def test_sources_are_the_cpu_files_and_no_extension_header() -> None:
    src = _ext.csrc_dir()
    names = [p.relative_to(src).as_posix() for p in _ext._sources(src, cuda=False)]
    assert names[:2] == ["ops.cpp", "bucket_step.cpp"]
    assert all(n.startswith("cpu/") for n in names[2:]) and len(names) >= 3
    for path in list(src.rglob("*.cpp")) + list(src.rglob("*.h")) + list(src.rglob("*.cu")):
        assert "torch/extension.h" not in path.read_text(), path


def test_warm_load_reuses_the_cached_library() -> None:
    """A second process loads the library built by this one, without rebuilding it."""
    libraries = list(_ext._cache_root().glob(f"{_ext._EXT_PREFIX}_*/{_ext._EXT_PREFIX}_*.so"))
    assert libraries
    before = {p: p.stat().st_mtime_ns for p in libraries}
    out = _run("import loft; print(loft.backend())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fused"
    assert {p: p.stat().st_mtime_ns for p in libraries} == before


def test_forced_reference_backend() -> None:
    out = _run("import loft; print(loft.backend()); print(loft.backend_reason())",
               LOFT_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["reference",
                                       "LOFT_BACKEND=reference forces the reference path"]


def test_broken_compiler_falls_back_with_one_warning(tmp_path: Path) -> None:
    code = """
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import loft, torch
        backend = loft.backend()
        loft.backend()
    mine = [w for w in caught if "loft could not build" in str(w.message)]
    print(backend, len(mine), mine[0].category.__name__ if mine else None)
    print(repr(str(mine[0].message)) if mine else None)
    print(loft.backend_reason())
    # And the reference path gives the right numbers.
    m = torch.nn.Linear(2, 1).double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x = torch.ones(3, 2, dtype=torch.float64)
    with loft.innerloop_ctx(m, opt) as (f, d):
        d.step(f(x).pow(2).mean())
        w = list(f.parameters())[0]
    g = 2 * (m(x).detach() * x).mean(0)
    print(torch.allclose(w, m.weight - 0.1 * g))
    # Adam, three steps, against torch.optim on a twin.
    twin = torch.nn.Linear(2, 1).double()
    twin.load_state_dict(m.state_dict())
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.1, amsgrad=True)
    with loft.innerloop_ctx(m, torch.optim.Adam(m.parameters(), lr=0.1, amsgrad=True)) as (f, d):
        for k in range(3):
            d.step(f(x * k).pow(2).mean())
            twin_opt.zero_grad()
            twin(x * k).pow(2).mean().backward()
            twin_opt.step()
        print(all(torch.allclose(a, b, rtol=1e-12, atol=1e-12)
                  for a, b in zip(f.parameters(), twin.parameters())))
    """
    out = _run(code, CXX="/bin/false", LOFT_CACHE_DIR=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "reference 1 UserWarning", out.stdout
    # The one warning says why: the compiler that failed, and what loft does instead.
    assert "/bin/false" in lines[1] and "reference path" in lines[1], lines[1]
    assert lines[2].startswith("the C++ build failed") and "/bin/false" in lines[2], lines[2]
    assert lines[3:] == ["True", "True"], out.stdout
    assert not list((tmp_path / "cache").glob("*/*.so"))  # nothing half-built was kept
    # The start line is closed by one saying that the build failed (then the warning).
    start, end = _progress_lines(out.stderr)
    assert start.startswith("loft: building the C++ ops (CPU) in "), out.stderr
    assert re.fullmatch(r"loft: the build \(CPU\) failed after \d+\.\d s", end), out.stderr


def _progress_lines(stderr: str) -> list[str]:
    """The build's progress lines (``loft: ...``) among a process's stderr."""
    return [line for line in stderr.splitlines() if line.startswith("loft: ")]


@pytest.mark.slow
def test_cold_build_prints_start_and_end_and_warm_load_prints_nothing(tmp_path: Path) -> None:
    """A cold build says on stderr what it builds, where, that it happens once, and then
    how long it took; a later process that loads the cached library prints nothing."""
    cache = tmp_path / "cache"
    code = "import loft; print(loft.backend())"
    cold = _run(code, LOFT_CACHE_DIR=str(cache))
    assert cold.returncode == 0 and cold.stdout.strip() == "fused", cold.stderr[-2000:]
    (build_dir,) = cache.glob(f"{_ext._EXT_PREFIX}_*")
    what = "CPU and CUDA" if _ext._want_cuda() else "CPU"
    start, end = _progress_lines(cold.stderr)
    assert start == (f"loft: building the C++ ops ({what}) in {build_dir}; this happens once "
                     f"per torch version and change of loft's sources"), cold.stderr
    match = re.fullmatch(rf"loft: built the C\+\+ ops \({what}\) in (\d+\.\d) s", end)
    assert match and float(match.group(1)) > 0, end
    warm = _run(code, LOFT_CACHE_DIR=str(cache))
    assert warm.returncode == 0 and warm.stdout.strip() == "fused", warm.stderr[-2000:]
    assert _progress_lines(warm.stderr) == [], warm.stderr


@pytest.mark.slow
def test_changed_sources_rebuild_and_concurrent_cold_builds(tmp_path: Path) -> None:
    """Edited sources get a new cache entry; two processes building cold both end fused."""
    src = tmp_path / "csrc"
    shutil.copytree(_ext.csrc_dir(), src)
    ops = src / "ops.cpp"
    ops.write_text(ops.read_text() + "\n// a change that must trigger a rebuild\n")
    cache = tmp_path / "cache"
    code = f"""
    from pathlib import Path
    import loft._ext as e
    e.csrc_dir = lambda: Path({str(src)!r})
    print(e.backend())
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "LOFT_CACHE_DIR": str(cache)})
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [o[0].strip() for o in outs] == ["fused", "fused"], [o[1][-2000:] for o in outs]
    # One built (and said so, start and end); the other waited on the lock and loaded it.
    assert sorted(len(_progress_lines(o[1])) for o in outs) == [0, 2], [o[1] for o in outs]
    entries = list(cache.glob(f"{_ext._EXT_PREFIX}_*"))
    assert len(entries) == 1
    original = _ext.csrc_dir()
    original_key = _ext._build_key(original, _ext._sources(original, cuda=False), cuda=False)
    assert entries[0].name != f"{_ext._EXT_PREFIX}_{original_key}"
    # A truncated library is detected and rebuilt.
    library = next(entries[0].glob("*.so"))
    library.write_bytes(library.read_bytes()[:1000])
    out = _run(code, LOFT_CACHE_DIR=str(cache))
    assert out.stdout.strip() == "fused", out.stderr[-2000:]
    assert library.stat().st_size > 1000
    assert len(_progress_lines(out.stderr)) == 2, out.stderr  # a rebuild says so too
