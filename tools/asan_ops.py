"""Malformed direct calls of ``torch.ops.loft.*`` under AddressSanitizer (or valgrind).

The ops must answer every malformed call (``bad_calls`` of ``tests/ops/_bad_op_args.py``:
sizes, dtypes, segment tables outside the buffers, group indices past the
hyperparameters) with a ``RuntimeError`` naming the argument, and must stay inside their
tensors' memory for well-formed calls at the edges (empty buckets, empty or inactive
segments, odd sizes).

    python tools/asan_ops.py                     # AddressSanitizer (the default)
    python tools/asan_ops.py --tool valgrind     # valgrind memcheck (slow: minutes)
    python tools/asan_ops.py --tool none         # the same checks, no sanitizer
    python tools/asan_ops.py --canary            # a deliberate overflow: must be reported

With ``asan`` the ops are built with ``LOFT_EXTRA_CFLAGS=-fsanitize=address`` into their
own cache (``--cache``, default a folder under the system's temporary directory) and run
with the ASan runtime preloaded. The exit status is 0 when every check passed and the
tool reported nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Exit status of the checked process when the tool found an error.
TOOL_ERROR_EXIT = 86
ASAN_OPTIONS = ("detect_leaks=0:halt_on_error=1:abort_on_error=0:"
                f"exitcode={TOOL_ERROR_EXIT}:allocator_may_return_null=1")


def _compiler_library(name: str) -> str | None:
    """The path of a runtime library of the C++ compiler, or None without one."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        return None
    out = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True,
                         text=True)
    path = Path(out.stdout.strip())
    return str(path.resolve()) if out.returncode == 0 and path.is_absolute() and \
        path.exists() else None


def asan_preload() -> str | None:
    """``LD_PRELOAD`` for an ASan run of Python: gcc's ASan runtime, then libstdc++ (the
    runtime's ``__cxa_throw`` interceptor must find the real one when it starts, and
    Python itself does not link libstdc++). None without an ASan runtime."""
    runtime = _compiler_library("libasan.so")
    cxx = _compiler_library("libstdc++.so")
    if runtime is None:
        return None
    return " ".join(p for p in (runtime, cxx) if p)


def child_command(tool: str, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run this file's checks under ``tool``."""
    env = dict(os.environ)
    python_path = str(HERE.parent / "python")
    # The repository root too: the cases are tests/ops/_bad_op_args.py.
    env["PYTHONPATH"] = os.pathsep.join([python_path, str(HERE.parent), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(Path(__file__).resolve()), "--child"] + extra
    if tool == "asan":
        preload = asan_preload()
        if preload is None:
            raise SystemExit("asan_ops: no libasan.so for the C++ compiler; use --tool "
                             "valgrind or --tool none")
        env["LOFT_EXTRA_CFLAGS"] = "-fsanitize=address -fno-omit-frame-pointer"
        env["LD_PRELOAD"] = preload
        env["ASAN_OPTIONS"] = ASAN_OPTIONS
    elif tool == "valgrind":
        command = ["valgrind", "--tool=memcheck", f"--error-exitcode={TOOL_ERROR_EXIT}",
                   "--errors-for-leak-kinds=none", "--suppressions=/dev/null"] + command
        env.setdefault("PYTHONMALLOC", "malloc")
    return command, env


def run_checks() -> int:
    """Every malformed call raises naming its argument; the edge cases match the
    reference. Returns the number of failed checks (each printed)."""
    import torch
    from tests.ops import _bad_op_args as cases

    import loft
    from loft import reference

    if loft.backend() != "fused":
        print(f"asan_ops: the fused ops did not build: {loft.backend_reason()}")
        return 1
    failures = 0
    calls = cases.bad_calls()
    for call in calls:
        try:
            getattr(torch.ops.loft, call.op)(*call.args)
        except RuntimeError as error:
            first_line = str(error).splitlines()[0] if str(error) else ""
            if not re.search(rf"\b(?:{call.expected})\b", first_line):
                failures += 1
                print(f"FAIL {call.op} [{call.name}]: message does not name "
                      f"{call.expected!r}: {first_line}")
        else:
            failures += 1
            print(f"FAIL {call.op} [{call.name}]: no error")
    good = list(cases.good_calls())
    for name, (op, args) in good:
        fused = getattr(torch.ops.loft, op)(*args)
        expected = getattr(reference, op)(*args)
        for a, b in zip(fused, expected):
            if not torch.allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=True):
                failures += 1
                print(f"FAIL {name}: differs from the reference")
    print(f"asan_ops: {len(calls)} malformed calls, {len(good)} edge calls, "
          f"{failures} failures")
    return failures


def instrumented() -> str:
    """Which of the process's sanitizers are live: 'asan' when the ASan runtime is mapped
    and loft's library calls it, else ''."""
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    if "libasan" not in maps:
        return ""
    libraries = [line.split()[-1] for line in maps.splitlines() if "loft_ops_" in line]
    return "asan" if libraries and b"__asan_report" in Path(libraries[0]).read_bytes() else ""


def canary() -> None:
    """A deliberate 8-byte read past a tensor's storage (through libc's memmove, which
    the sanitizer intercepts): proof that the tool reports what it should."""
    import torch

    source = torch.zeros(10, dtype=torch.float64)
    target = torch.zeros(11, dtype=torch.float64)
    ctypes.memmove(target.data_ptr(), source.data_ptr(), 11 * 8)
    print("asan_ops: the canary overflow was not reported")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", choices=("asan", "valgrind", "none"), default="asan")
    parser.add_argument("--cache", help="LOFT_CACHE_DIR for the instrumented build")
    parser.add_argument("--canary", action="store_true",
                        help="make a deliberate overflow, which the tool must report")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import loft

        loft.backend()
        print(f"asan_ops: sanitizer live: {instrumented() or 'none'}")
        if args.canary:
            canary()
            return 1
        return 1 if run_checks() else 0
    extra = ["--canary"] if args.canary else []
    command, env = child_command(args.tool, extra)
    if args.tool == "asan":
        env["LOFT_CACHE_DIR"] = args.cache or str(Path(tempfile.gettempdir()) / "loft-asan-cache")
    elif args.cache:
        env["LOFT_CACHE_DIR"] = args.cache
    return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
