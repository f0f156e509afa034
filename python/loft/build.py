"""Build helpers for loft's C++/CUDA sources.

``python -m loft.build cuda-check``
    Compiles every CUDA translation unit (``csrc/cuda/*.cu``, the torch-free kernels,
    and ``csrc/cuda/*.cpp``, their registration with torch) to object files with
    ``nvcc -c``, for sm_80 and sm_90, against the headers bundled with the installed
    torch, one process per file in parallel, in a temporary folder. It needs no GPU and
    works with a CPU-only torch (whose JIT builder refuses ``.cu`` files): this is how a
    CUDA compile error fails CI on a machine without a GPU. Prints one line per file with
    its time; exits 1 on any error, with the compiler's output.

``python -m loft.build cpu``
    Builds (or loads from the cache) the ops for this machine, as the first use of loft
    does (:func:`loft.backend`), and prints which backend is active and why; exits 1
    when loft falls back to the reference path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CompileResult", "cuda_check", "cuda_sources", "find_nvcc", "main", "nvcc_command"]

#: GPU architectures of the compile check: Ampere (A100) and Hopper (H100/H200).
DEFAULT_ARCHES = ("80", "90")

#: The flags torch's JIT builder gives nvcc (torch.utils.cpp_extension.COMMON_NVCC_FLAGS),
#: so that the check compiles the kernels as a real CUDA build would.
TORCH_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)


@dataclass(frozen=True)
class CompileResult:
    """The outcome of compiling one source file."""

    source: Path
    returncode: int
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def find_nvcc() -> str | None:
    """The nvcc to use: ``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on PATH, else
    ``/usr/local/cuda/bin/nvcc``; None when there is none."""
    candidates = []
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home:
            candidates.append(Path(home) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def cuda_sources(src: Path) -> list[Path]:
    """The CUDA translation units: ``cuda/*.cu`` then ``cuda/*.cpp`` under ``src``."""
    cuda = src / "cuda"
    return sorted(cuda.glob("*.cu")) + sorted(cuda.glob("*.cpp"))


def nvcc_command(nvcc: str, source: Path, output: Path, src: Path,
                 arches: Sequence[str] = DEFAULT_ARCHES) -> list[str]:
    """The ``nvcc -c`` command line that compiles ``source`` to ``output``.

    Torch's bundled headers come from :func:`torch.utils.cpp_extension.include_paths`.
    A CPU-only torch lacks the CMake-generated ``c10/cuda/impl/cuda_cmake_macros.h``;
    ``-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE`` tells c10 not to include it then.
    """
    from torch.utils.cpp_extension import include_paths

    from loft._ext import _cuda_cflags

    torch_includes = [Path(p) for p in include_paths()]
    # loft's own nvcc flags, as the JIT build's (--fmad=false: the kernels round as the
    # CPU build, csrc/segments.h); the host side without contraction as well.
    command = [nvcc, "-c", str(source), "-o", str(output), "-std=c++20", *_cuda_cflags(),
               f"-I{src}", "--compiler-options", "-fPIC,-ffp-contract=off"]
    for include in torch_includes:
        command += ["-isystem", str(include)]
    if not any((p / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file()
               for p in torch_includes):
        command.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    command += list(TORCH_NVCC_FLAGS)
    command += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches]
    return command


def _compile(command: list[str], source: Path) -> CompileResult:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    return CompileResult(source, proc.returncode, time.perf_counter() - start,
                         (proc.stdout + proc.stderr).strip())


def cuda_check(src: Path | None = None, arches: Sequence[str] = DEFAULT_ARCHES,
               jobs: int | None = None, nvcc: str | None = None,
               out=sys.stdout) -> int:
    """Compile every CUDA translation unit under ``src`` (default: loft's csrc/) with
    nvcc; print one line per file and the output of failures. Returns the exit status:
    0 when all compile, 1 on a compile error, 2 when there is nothing to check."""
    from loft._ext import csrc_dir

    src = Path(src) if src is not None else csrc_dir()
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        print("cuda-check: nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=out)
        return 2
    sources = cuda_sources(src)
    if not sources:
        print(f"cuda-check: no CUDA sources in {src / 'cuda'}", file=out)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loft-cuda-check-") as tmp:
        commands = [nvcc_command(nvcc, s, Path(tmp) / f"{s.name}.o", src, arches)
                    for s in sources]
        with ThreadPoolExecutor(max_workers=jobs or len(sources)) as pool:
            results = list(pool.map(_compile, commands, sources))
    arch_names = ", ".join(f"sm_{a}" for a in arches)
    for result in results:
        status = "ok  " if result.ok else "FAIL"
        print(f"{status} {result.source.relative_to(src).as_posix():<28} "
              f"{result.seconds:6.1f} s", file=out)
    failures = [r for r in results if not r.ok]
    for result in failures:
        print(f"\n---- {result.source.relative_to(src).as_posix()} "
              f"(exit {result.returncode}) ----\n{result.output}", file=out)
    print(f"cuda-check: {len(results) - len(failures)}/{len(results)} files compiled for "
          f"{arch_names} in {time.perf_counter() - start:.1f} s ({nvcc})", file=out)
    return 1 if failures else 0


def build_cpu(out=sys.stdout) -> int:
    """Build or load the ops as loft's first use does; print the backend and why.
    Returns 0 on the fused backend, 1 on the reference fallback."""
    import loft
    from loft._ext import backend_reason

    backend = loft.backend()
    print(backend, file=out)
    print(backend_reason(), file=out)
    return 0 if backend == "fused" else 1


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m loft.build`` command line."""
    parser = argparse.ArgumentParser(prog="python -m loft.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("cuda-check", help="compile the CUDA sources with nvcc (no GPU)")
    check.add_argument("--arch", action="append", default=None, metavar="SM",
                       help="a compute capability without the dot, e.g. 90 (repeatable; "
                            f"default: {' '.join(DEFAULT_ARCHES)})")
    check.add_argument("--jobs", type=int, default=None,
                       help="parallel compiles (default: one per file)")
    check.add_argument("--nvcc", default=None, help="the nvcc to use (default: found)")
    check.add_argument("--src", type=Path, default=None,
                       help="the csrc/ folder (default: loft's own)")
    commands.add_parser("cpu", help="build or load the ops and print the active backend")
    args = parser.parse_args(argv)
    if args.command == "cuda-check":
        return cuda_check(args.src, tuple(args.arch or DEFAULT_ARCHES), args.jobs, args.nvcc)
    return build_cpu()


if __name__ == "__main__":
    sys.exit(main())
