"""loft's benchmark harness: real meta-learning workloads, then synthetic models.

``python -m loft.bench`` runs the real workloads (the headline), then models A, B, C;
``--quick`` runs the real workloads against higher and the floor in about a minute;
``--check`` adds the maintainers' targets. The same pieces are importable:

.. code-block:: python

    from loft.bench import run_suite
    from loft.bench.meta_measure import measure_meta
    from loft.bench.meta_suite import run_meta_suite
    from loft.bench.meta_workloads import MetaWorkload

    result = run_meta_suite(workloads=["sinusoid"], implementations=["loft", "higher"])
    print(result.table()); result.save("loft-bench")          # meta.txt/.json/.png
    measure_meta(MetaWorkload("sinusoid", "adam"), "loft")    # in this process
    result = run_suite(models=["A"], optimizers=["adam"], steps=[50])

**The real workloads** (:mod:`loft.bench.meta_workloads`, :mod:`loft.bench.meta_measure`,
:mod:`loft.bench.meta_suite`): MAML sine regression (MLP 1-40-40-1, 25 tasks x 5 inner
steps, SGD or Adam), MAML Omniglot (higher's conv network, 5-way 5-shot, 4 tasks x 5
SGD steps), Meta-SGD (learned per-element inner lr) and the cost of entering an
inner-loop context. Implementations: ``loft`` and ``higher`` (``innerloop_ctx`` +
``diffopt.step``), ``torchopt`` (``MetaSGD``/``MetaAdam``, when installed), a
``torch.func.functional_call`` loop with per-tensor updates, and the ``floor``
(forward and gradients with ``create_graph=True``, no update). A whole meta-iteration
is timed (inner loops + query backward + meta step), with its inner-loop and
meta-backward parts, in a fresh process per measurement after a warm-up, over several
rounds with the implementations in a different order each round; the report gives the
median over the rounds, its spread, and loft's speed-up over each peer.

**Models A, B, C** (:mod:`loft.bench.measure`, :mod:`loft.bench.suite`): for each
model, inner optimiser, number of inner steps T and implementation, in a fresh process
with a fixed thread count, after a warm-up, the median over repeats of

- the inner-loop time (T steps: forward, ``autograd.grad(create_graph=True)``, update),
- the meta-backward time (``backward()`` of one query loss through all T steps),
- the bytes of the distinct storages saved for backward (a deterministic figure, from
  ``saved_tensors_hooks``), and the peak RSS growth,
- the autograd nodes per inner step, and from these the ratios against higher and
  against the *bare floor* (forward + gradient with no update at all).

Implementations: ``loft`` (fused ops), ``loft-reference`` (``LOFT_BACKEND=reference``:
loft's pure-PyTorch math over the same flat buffers), ``per-tensor``
(:mod:`loft.bench.baselines`: a per-tensor differentiable loop, the way higher computes
it), ``higher`` and ``torchopt`` (when installed), and ``floor``.

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
