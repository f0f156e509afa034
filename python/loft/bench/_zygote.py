"""A fork server for the benchmark workers (run as a script, not imported by loft).

Starting a worker with ``python -m loft.bench._worker`` costs a few seconds before it
measures anything: importing torch, the first ``torch.optim`` optimiser (which pulls in
more of torch), ``torch.utils.cpp_extension`` and ``higher``. The default suite runs
about 80 workers, so that was most of its wall time. This server imports those once,
then forks one child per measurement: each measurement still runs in a fresh process
(its own memory, its own peak RSS, nothing measured before it), and the server itself
never imports loft or runs an op, so the children start from the same clean state.

Protocol: one JSON request per line on stdin,
``{"spec": {...}, "env": {...}, "output": PATH, "log": PATH, "timeout": SECONDS}``;
one JSON reply per line on stdout, ``{"returncode": RC}`` (``-9`` after a timeout). The
child sets ``env`` (``LOFT_BACKEND`` and so on) before it imports loft, runs
:func:`loft.bench._worker.run_spec`, writes the result to ``output`` and its own
stdout/stderr to ``log``.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder heads sys.path: its modules (profile.py, ...) would
# shadow the standard library's. The children import loft from PYTHONPATH instead.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import json  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402


def _warm_imports() -> None:
    import torch  # noqa: F401
    import torch.utils.cpp_extension  # noqa: F401

    # The first optimiser imports torch's compiler stack (lazily, about a second).
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        import higher  # noqa: F401
    except ImportError:
        pass
    try:
        import tqdm  # noqa: F401
    except ImportError:
        pass


def _child(request: dict[str, Any]) -> None:
    """In the forked child: run one measurement; never returns."""
    code = 1
    try:
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(request.get("env", {}))
        from loft.bench._worker import run_spec

        result = run_spec(request["spec"])
        with open(request["output"], "w") as f:
            f.write(json.dumps(result))
        code = 0
    except BaseException:  # reported through the log and the exit status
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float | None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if deadline is not None and time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.02)


def serve() -> None:
    _warm_imports()
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        code = _wait(pid, request.get("timeout"))
        out.write(json.dumps({"returncode": code}) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
