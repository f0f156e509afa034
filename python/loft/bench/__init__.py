"""loft's benchmark harness: loft fused vs loft reference vs per-tensor PyTorch vs higher.

``python -m loft.bench`` runs the default suite (``--quick`` for a short one); the same
pieces are importable:

.. code-block:: python

    from loft.bench import run_suite, Workload, measure
    result = run_suite(models=["A"], optimizers=["adam"], steps=[50])
    print(result.table()); result.save("loft-bench")
    measure(Workload("A", "adam", 50), "loft", repeats=3)   # in this process

**What is measured** (see :mod:`loft.bench.measure` for the details): for each model,
inner optimiser, number of inner steps T and implementation, in a fresh process with a
fixed thread count, after a warm-up, the median over repeats of

- the inner-loop time (T steps: forward, ``autograd.grad(create_graph=True)``, update),
- the meta-backward time (``backward()`` of one query loss through all T steps),
- the bytes of the distinct storages saved for backward (a deterministic figure, from
  ``saved_tensors_hooks``), and the peak RSS growth,
- the autograd nodes per inner step, and from these the ratios against higher and
  against the *bare floor* (forward + gradient with no update at all).

Implementations: ``loft`` (fused ops), ``loft-reference`` (``LOFT_BACKEND=reference``:
loft's pure-PyTorch math over the same flat buffers), ``per-tensor``
(:mod:`loft.bench.baselines`: a per-tensor differentiable loop, the way higher computes
it), ``higher`` (when installed), and ``floor``.

``python -m loft.bench --long`` (:mod:`loft.bench.long`, :func:`run_long_suite`) measures
long inner loops instead: full unroll vs ``checkpoint_every`` vs ``truncate()`` vs
``first_order`` on one fixed workload, peak RSS growth and time against T.
"""

from __future__ import annotations

from loft.bench.baselines import PerTensorAdam, PerTensorInnerLoop, PerTensorSGD
from loft.bench.long import LONG_MODES, LongResult, measure_long, run_long_suite
from loft.bench.measure import IMPLEMENTATIONS, SavedTensorMeter, count_graph_nodes, measure
from loft.bench.suite import TARGETS, Job, SuiteResult, Target, derive, run_suite, run_worker
from loft.bench.workloads import MODELS, OPTIMIZERS, Workload, build

__all__ = [
    "run_suite",
    "run_long_suite",
    "measure_long",
    "LongResult",
    "LONG_MODES",
    "run_worker",
    "measure",
    "derive",
    "Workload",
    "Job",
    "SuiteResult",
    "Target",
    "TARGETS",
    "MODELS",
    "OPTIMIZERS",
    "IMPLEMENTATIONS",
    "build",
    "SavedTensorMeter",
    "count_graph_nodes",
    "PerTensorInnerLoop",
    "PerTensorSGD",
    "PerTensorAdam",
]
