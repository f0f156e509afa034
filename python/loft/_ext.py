"""JIT build and load of loft's C++ (and CUDA) ops.

The first call of :func:`backend` (made by the first op call) compiles ``csrc/ops.cpp``
and ``csrc/cpu/*.cpp`` with :func:`torch.utils.cpp_extension.load` (ninja, ``-O3``,
``-fopenmp``), plus ``csrc/cuda/*.cu`` when torch has CUDA and a GPU is visible, and
loads the library so that the ops appear under ``torch.ops.loft``.

- **Cache**: ``$LOFT_CACHE_DIR`` (default: torch's extensions directory) holds one
  folder per build key: a hash of the torch version, the CUDA version, the compiler
  flags, the CPU capability and the sources' contents. Changed sources rebuild;
  unchanged ones load the shared library directly (milliseconds).
- **Concurrency**: a file lock per build folder, so several processes that start cold
  at once build once and all load the same library.
- **Integrity**: a successful build writes a stamp with the library's SHA-256; a
  library that does not match its stamp (a partial or corrupted file) is rebuilt.
- **Fallback**: any failure gives one :class:`UserWarning` with the compiler's last
  lines, and loft runs on :mod:`loft.reference`. Nothing here raises.
- **Progress**: a build (not a cached load) prints one line to stderr when it starts
  (what is built, and where) and one when it ends (its duration), since it takes tens of
  seconds and happens inside the first op call.
- ``LOFT_BACKEND=reference`` skips the build altogether.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["backend", "backend_reason", "csrc_dir", "load", "has_device_kernels", "on_load"]

_LOCK = threading.Lock()
_STATE: dict[str, object] = {"loaded": None, "reason": "", "cuda": False}
_DEVICE_KERNELS: dict[str, bool] = {}
#: Called once the library is loaded (``loft.ops`` registers its fake kernels and autograd).
_ON_LOAD: list[Callable[[], None]] = []
_EXT_PREFIX = "loft_ops"
_WARNING_LINES = 25


def csrc_dir() -> Path:
    """Where the C++/CUDA sources are: inside the installed package, or the checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parents[1] / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    return here / "csrc"


def _cache_root() -> Path:
    root = os.environ.get("LOFT_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _want_cuda() -> bool:
    return bool(torch.version.cuda) and torch.cuda.is_available()


def _sources(src: Path, cuda: bool) -> list[Path]:
    """The translation units to build: the schemas, the step node, the CPU ops and, with
    ``cuda``, the CUDA kernels (``cuda/*.cu``, torch-free, nvcc) and their registration
    (``cuda/*.cpp``, host-compiled; it includes the CUDA runtime headers, so only a CUDA
    build has it)."""
    files = [src / "ops.cpp", src / "bucket_step.cpp"]
    files += sorted(Path(p) for p in glob.glob(str(src / "cpu" / "*.cpp")))
    if cuda:
        files += sorted(Path(p) for p in glob.glob(str(src / "cuda" / "*.cu")))
        files += sorted(Path(p) for p in glob.glob(str(src / "cuda" / "*.cpp")))
    return files


def _extra_flags() -> list[str]:
    """``$LOFT_EXTRA_CFLAGS``, split on whitespace: added to the host compiler's and the
    linker's flags (and so to the build key), e.g. ``-fsanitize=address`` for a build
    checked by AddressSanitizer (``tools/asan_ops.py``)."""
    return os.environ.get("LOFT_EXTRA_CFLAGS", "").split()


def _cflags() -> list[str]:
    # -fno-math-errno lets gcc vectorise sqrt (Adam is 2-8x slower without it).
    # -ffp-contract=off: a * b + c rounds twice, as two torch ops do; gcc would otherwise
    # fuse it into one multiply-add (csrc/segments.h, [note: rounding]).
    return ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off",
            "-march=native"] + _extra_flags()


def _cuda_cflags() -> list[str]:
    # --fmad=false: no multiply-add contraction, as -ffp-contract=off for the CPU build, so
    # that both backends round as the per-tensor torch ops (csrc/segments.h).
    return ["-O3", "--fmad=false"]


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; pip installs it next to this Python."""
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if scripts and scripts not in path.split(os.pathsep):
        os.environ["PATH"] = path + os.pathsep + scripts if path else scripts


def _build_key(src: Path, sources: list[Path], cuda: bool) -> str:
    h = hashlib.sha256()
    h.update(f"torch={torch.__version__};cuda={torch.version.cuda};py={sys.version_info[:2]}".encode())
    h.update(f"cap={torch.backends.cpu.get_cpu_capability()};cflags={_cflags()}".encode())
    if cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        h.update(f"nvcc={_cuda_cflags()};arch={arch}".encode())
    headers = sorted(src.rglob("*.h")) + sorted(src.rglob("*.cuh"))
    for path in sources + headers:
        h.update(str(path.relative_to(src)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _last_lines(text: str, n: int = _WARNING_LINES) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def _say(message: str) -> None:
    """One progress line on stderr, flushed at once (a build runs for tens of seconds)."""
    print(f"loft: {message}", file=sys.stderr, flush=True)


def _build_and_load(src: Path, cuda: bool) -> None:
    """Build (if needed) into the cache and load the library into torch.ops.loft."""
    from filelock import FileLock
    from torch.utils import cpp_extension

    sources = _sources(src, cuda)
    key = _build_key(src, sources, cuda)
    name = f"{_EXT_PREFIX}_{key}"
    build_dir = _cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}.so"
    stamp = build_dir / "loft_stamp.json"
    with FileLock(str(build_dir / "loft.lock")):
        if library.is_file() and stamp.is_file():
            try:
                recorded = json.loads(stamp.read_text()).get("sha256")
            except (OSError, ValueError):
                recorded = None
            if recorded == _sha256(library):
                torch.ops.load_library(str(library))
                return
        # A stale or partial build: start from a clean folder. Holding our lock, no other
        # loft process is building here, so torch's own baton file is stale too.
        for leftover in (library, stamp, build_dir / "lock"):
            leftover.unlink(missing_ok=True)
        _ninja_on_path()
        what = "CPU and CUDA" if cuda else "CPU"
        _say(f"building the C++ ops ({what}) in {build_dir}; this happens once per torch "
             f"version and change of loft's sources")
        start = time.perf_counter()
        try:
            cpp_extension.load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=_cflags(),
                extra_cuda_cflags=_cuda_cflags() if cuda else None,
                extra_ldflags=["-fopenmp"] + _extra_flags(),
                extra_include_paths=[str(src)],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=os.environ.get("LOFT_VERBOSE_BUILD", "0") == "1",
            )
        except Exception:
            _say(f"the build ({what}) failed after {time.perf_counter() - start:.1f} s")
            raise
        stamp.write_text(json.dumps({"sha256": _sha256(library), "torch": torch.__version__}))
        _say(f"built the C++ ops ({what}) in {time.perf_counter() - start:.1f} s")


def load() -> bool:
    """Build and load the ops once per process; return whether the fused path is active."""
    with _LOCK:
        if _STATE["loaded"] is not None:
            return bool(_STATE["loaded"])
        choice = os.environ.get("LOFT_BACKEND", "").strip().lower()
        if choice == "reference":
            _STATE.update(loaded=False, reason="LOFT_BACKEND=reference forces the reference path")
            return False
        if choice not in ("", "fused"):
            warnings.warn(
                f"LOFT_BACKEND must be 'fused' or 'reference', got {choice!r}; using 'fused'",
                UserWarning,
                stacklevel=2,
            )
        src = csrc_dir()
        cuda = _want_cuda()
        try:
            if not (src / "ops.cpp").is_file():
                raise RuntimeError(f"loft's C++ sources were not found (looked in {src})")
            try:
                _build_and_load(src, cuda)
            except Exception as cuda_error:  # noqa: BLE001
                if not cuda:
                    raise
                # A CUDA build problem must not cost the CPU kernels: build those alone.
                warnings.warn(
                    "loft could not build its CUDA ops; CUDA tensors use the reference path. "
                    f"Compiler output:\n{_last_lines(str(cuda_error))}",
                    UserWarning,
                    stacklevel=2,
                )
                cuda = False
                _build_and_load(src, cuda)
        except Exception as error:  # noqa: BLE001 - any failure means the fallback
            detail = _last_lines(str(error))
            _STATE.update(loaded=False, reason=f"the C++ build failed: {detail}")
            warnings.warn(
                "loft could not build its C++ ops and falls back to its pure-PyTorch "
                f"reference path (slower, same results). Compiler output:\n{detail}",
                UserWarning,
                stacklevel=2,
            )
            return False
        for callback in _ON_LOAD:
            callback()
        _STATE.update(loaded=True, cuda=cuda, reason="C++ ops built and loaded"
                      + (" (CPU and CUDA)" if cuda else " (CPU)"))
        return True


def on_load(callback: Callable[[], None]) -> None:
    """Call ``callback()`` once the ops are loaded: now if they already are, else after
    the build succeeds (never if it fails). This module imports nothing from loft; the
    modules that add Python parts to the ops register them through here."""
    with _LOCK:
        _ON_LOAD.append(callback)
        if _STATE["loaded"]:
            callback()


def backend() -> str:
    """``"fused"`` when loft's compiled ops are in use, else ``"reference"``.

    The first call builds the ops (see the module docstring); :func:`backend_reason`
    says why the reference path is active.
    """
    return "fused" if load() else "reference"


def backend_reason() -> str:
    """A sentence saying why :func:`backend` returns what it returns."""
    load()
    return str(_STATE["reason"])


def has_device_kernels(device: torch.device) -> bool:
    """Whether the fused ops have kernels for tensors on ``device`` (cached per type)."""
    known = _DEVICE_KERNELS.get(device.type)
    if known is not None:
        return known
    available = load() and (device.type == "cpu"
                            or (device.type == "cuda" and bool(_STATE["cuda"])))
    _DEVICE_KERNELS[device.type] = available
    return available
