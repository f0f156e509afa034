"""The CUDA backend: a compile check that needs no GPU, and runtime tests that need one.

``test_cuda_check_compiles`` runs ``python -m loft.build cuda-check`` (nvcc against
torch's bundled headers, sm_80 and sm_90): on a CI machine without a GPU this is what
turns a CUDA compile error into a failure. Every other test here is skipped without a
CUDA GPU; they compare the CUDA ops with the CPU ops and the reference, check
gradients, determinism, CUDA-graph capture and the memory of a long inner loop.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import loft
from loft import build, ops, reference

from ..conftest import DTYPES, TOLERANCES, assert_close
from .test_ops import (
    ADAM,
    BUFFERS,
    ELEMENTWISE,
    ELEMENTWISE_SETS,
    HYPER,
    SGD,
    SIZE_SETS,
    _differentiable_inputs,
    add_elementwise,
    args_of,
    elementwise_of,
    flag_pairs,
    full_mask,
    make_case,
    raw_op,
)
from .test_rounding import ulp_distance

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: Besides test_ops' sizes: several tiles (2048 elements), segments straddling tile
#: borders, whole aligned tiles (the vector path) and empty segments between them.
CUDA_SIZE_SETS = SIZE_SETS + [[5000, 17, 30000], [2048, 2048, 1, 4095, 6000], [0, 70000, 0, 3]]


# ---- compile check (no GPU needed) ---------------------------------------------------------


@pytest.mark.slow
def test_cuda_check_compiles() -> None:
    """Every csrc/cuda source compiles with nvcc for sm_80 and sm_90 (about a minute on
    two cores; the files compile in parallel)."""
    if build.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    package_root = str(Path(loft.__file__).resolve().parents[1])
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH"))
                                         if p)}
    proc = subprocess.run([sys.executable, "-m", "loft.build", "cuda-check"], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout and "FAIL" not in proc.stdout, proc.stdout


def test_cuda_sources_are_torch_free_kernels_and_one_registration() -> None:
    """Kernels (*.cu) include no torch header (fast nvcc); only the registration does."""
    src = loft._ext.csrc_dir()
    sources = build.cuda_sources(src)
    kernels = [p for p in sources if p.suffix == ".cu"]
    registrations = [p for p in sources if p.suffix == ".cpp"]
    assert kernels and len(registrations) == 1
    for path in kernels + sorted((src / "cuda").glob("*.h")) + sorted((src / "cuda").glob("*.cuh")):
        text = path.read_text()
        for header in ("<torch/", "<ATen/", "<c10/"):
            assert header not in text, f"{path.name} includes {header}"
    text = registrations[0].read_text()
    assert "TORCH_LIBRARY_IMPL(loft, CUDA" in text
    assert "ATen/cuda/CUDAContext.h" not in text and "torch/extension.h" not in text
    names = [p.relative_to(src).as_posix() for p in loft._ext._sources(src, cuda=True)]
    assert all(p.relative_to(src).as_posix() in names for p in sources)
    assert not any(n.startswith("cuda/") for n in
                   (p.relative_to(src).as_posix() for p in loft._ext._sources(src, cuda=False)))


# ---- runtime (GPU) -------------------------------------------------------------------------


@pytest.fixture
def cuda_fused() -> None:
    assert loft.backend() == "fused", loft.backend_reason()
    assert loft._ext.has_device_kernels(torch.device("cuda")), loft.backend_reason()


def _to(args: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    return [a.to(device) for a in args]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values in a contiguous tensor whose data starts one element past an
    allocation (not 16-byte aligned): the kernels' scalar path."""
    if t.numel() == 0 or not t.is_floating_point():
        return t
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = base[1:]
    view.copy_(t)
    return view


def _upstream(op: str, args: list[torch.Tensor], flags: tuple[int, int],
              seed: int = 11) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    upstream = []
    for k, out in enumerate(getattr(reference, op)(*args)):
        if k == 1 and flags[0] % 2:  # a 0-element upstream gradient means zero
            upstream.append(out.new_empty(0))
        else:
            upstream.append(torch.randn(out.numel(), generator=gen, dtype=torch.float64).to(out))
    return upstream


def _hyper_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, n: int,
                 what: str) -> None:
    rtol, atol = {torch.float64: (1e-10, 1e-12)}.get(dtype, (5e-3, 5e-3))
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol,
                               atol=atol * scale * max(1, n) ** 0.5, msg=what)


@needs_gpu
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_cuda_forward_matches_cpu_and_reference(op: str, dtype: torch.dtype, aligned: bool,
                                                cuda_fused: None) -> None:
    for flags, sizes in itertools.product(flag_pairs(op), CUDA_SIZE_SETS):
        case = make_case(op, sizes, dtype, list(flags), seed=hash((flags, tuple(sizes))) % 1000,
                         device="cuda")
        args = args_of(op, case)
        if not aligned:
            args = [_misaligned(a) for a in args]
        before = [a.clone() for a in args]
        got = raw_op(op)(*args)
        on_cpu = raw_op(op)(*_to(args, "cpu"))
        want = getattr(reference, op)(*args)
        for a, b in zip(args, before):
            assert torch.equal(a, b), "the forward wrote one of its inputs"
        for name, g, c, w in zip(["params"] + list(BUFFERS[op][2:]), got, on_cpu, want):
            what = f"{op} {name} flags={flags} sizes={sizes}"
            assert g.device.type == "cuda" and g.dtype == dtype and g.is_contiguous(), what
            assert g.shape == w.shape == c.shape, what
            assert_close(g.cpu(), c, dtype, what + " (vs CPU)")
            assert_close(g, w, dtype, what + " (vs reference)")


@needs_gpu
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_cuda_backward_matches_cpu_and_reference(op: str, dtype: torch.dtype, aligned: bool,
                                                 cuda_fused: None) -> None:
    names = list(BUFFERS[op]) + list(HYPER[op])
    full = 2 ** len(HYPER[op]) - 1
    for flags, sizes in itertools.product(flag_pairs(op), CUDA_SIZE_SETS):
        case = make_case(op, sizes, dtype, list(flags), seed=7, device="cuda")
        args = args_of(op, case)
        upstream = _upstream(op, args, flags)
        if not aligned:
            args = [_misaligned(a) for a in args]
            upstream = [_misaligned(u) for u in upstream]
        n = case["params"].numel()
        for mask in (full, 0b101, 0):
            got = raw_op(op + "_backward")(*upstream, *args, mask)
            on_cpu = raw_op(op + "_backward")(*_to(upstream, "cpu"), *_to(args, "cpu"), mask)
            want = getattr(reference, op + "_backward")(*upstream, *args, mask)
            for k, (name, g, c, w) in enumerate(zip(names, got, on_cpu, want)):
                what = f"{op} grad {name} flags={flags} sizes={sizes} mask={mask}"
                assert g.device.type == "cuda" and g.is_contiguous(), what
                assert g.shape == w.shape == c.shape and g.dtype == w.dtype == c.dtype, what
                if name in HYPER[op]:
                    if not (mask >> (k - len(BUFFERS[op]))) & 1:
                        assert not g.any(), what + ": a masked-off gradient must be zero"
                    _hyper_close(g, c, dtype, n, what + " (vs CPU)")
                    _hyper_close(g, w, dtype, n, what + " (vs reference)")
                else:
                    assert_close(g.cpu(), c, dtype, what + " (vs CPU)")
                    assert_close(g, w, dtype, what + " (vs reference)")


@needs_gpu
@pytest.mark.parametrize("op", [SGD, ADAM])
@pytest.mark.parametrize("flags", [(0, 7), (7, 0), (2, 5), (4, 3)], ids=str)
@pytest.mark.parametrize("entry", ["wrapper", "raw"])
def test_cuda_gradcheck_and_gradgradcheck(op: str, flags: tuple[int, int], entry: str,
                                          cuda_fused: None) -> None:
    """Float64 gradcheck and gradgradcheck on CUDA, every buffer and hyperparameter."""
    case = make_case(op, [3, 2, 1, 2], torch.float64, list(flags), seed=13, device="cuda")
    inputs = _differentiable_inputs(op, case)
    fn = getattr(ops, op) if entry == "wrapper" else raw_op(op)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_cuda_is_bitwise_deterministic(op: str, dtype: torch.dtype, cuda_fused: None) -> None:
    """Two runs (on fresh copies of the inputs) give bitwise-identical results, the
    hyperparameter gradients included (fixed-order reductions, no atomics)."""
    sizes = [5000, 17, 30000, 1 << 20, 3]  # more tiles than the grid has blocks
    case = make_case(op, sizes, dtype, [7, 0], seed=5, device="cuda")
    args = args_of(op, case)
    upstream = [torch.randn(o.numel(), device="cuda").to(o) for o in raw_op(op)(*args)]
    mask = 2 ** len(HYPER[op]) - 1
    first = raw_op(op)(*args) + raw_op(op + "_backward")(*upstream, *args, mask)
    for _ in range(2):
        copies = [a.clone() for a in args]
        again = raw_op(op)(*copies) + raw_op(op + "_backward")(*[u.clone() for u in upstream],
                                                                *copies, mask)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_cuda_graph_capture_and_replay(op: str, cuda_fused: None) -> None:
    """One inner step (forward op and its backward op on static buffers) captured in a
    CUDA graph and replayed on new values equals the eager ops bitwise."""
    sizes, flags = [5000, 17, 3000, 1, 0], [7, 0]
    static = args_of(op, make_case(op, sizes, torch.float32, flags, seed=21, device="cuda"))
    forward, backward = raw_op(op), raw_op(op + "_backward")
    mask = 2 ** len(HYPER[op]) - 1
    upstream = [torch.randn(o.numel(), device="cuda") for o in forward(*static)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up; it also runs the value checks skipped in capture
        for _ in range(2):
            forward(*static)
            backward(*upstream, *static, mask)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = forward(*static)
        grads = backward(*upstream, *static, mask)

    for seed in (1, 2, 3):
        fresh = args_of(op, make_case(op, sizes, torch.float32, flags, seed=seed, device="cuda"))
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        for u in upstream:
            u.normal_()
        graph.replay()
        torch.cuda.synchronize()
        want = forward(*static) + backward(*upstream, *static, mask)
        for got, expected in zip(tuple(outs) + tuple(grads), want):
            assert torch.equal(got, expected)


@needs_gpu
@pytest.mark.parametrize("opt_type", [torch.optim.SGD, torch.optim.Adam])
def test_cuda_inner_loop_memory_is_the_saved_buffers(opt_type: type, cuda_fused: None) -> None:
    """100 inner steps keep, per step, what the meta-backward needs and nothing more: the
    new flat params, the new state buffers and the flat gradient (N elements each).

    A 1024x1024 linear layer (N = 1,049,600 float32) and a batch of 4: activations are
    negligible next to the ~4 MB buffers, so the peak growth over the loop is about
    steps x (1 + state buffers + 1) x N x 4 bytes.
    """
    torch.manual_seed(0)
    model = nn.Linear(1024, 1024).cuda()
    n = sum(p.numel() for p in model.parameters())
    if opt_type is torch.optim.SGD:
        opt, kept_per_step = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), 3
    else:
        opt, kept_per_step = torch.optim.Adam(model.parameters(), lr=1e-3), 4  # p, m, v, g
    x = torch.randn(4, 1024, device="cuda")
    steps = 100
    element = 4
    expected = steps * kept_per_step * n * element
    with loft.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).mean())  # first step: state created, kernels warm
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            diffopt.step(fmodel(x).pow(2).mean())
        torch.cuda.synchronize()
        growth = torch.cuda.max_memory_allocated() - baseline
        # Transients of the last step (per-tensor gradients before flattening, the op's
        # outputs) add a few N; nothing else may grow with the number of steps.
        slack = 6 * n * element
        assert 0.95 * expected <= growth <= expected + slack, (
            f"peak growth {growth / 2**20:.1f} MiB over {steps} steps, expected "
            f"{expected / 2**20:.1f} MiB (+ {slack / 2**20:.1f} MiB transients)")
        meta = fmodel(x).pow(2).mean()
        torch.cuda.reset_peak_memory_stats()
        before_backward = torch.cuda.memory_allocated()
        meta.backward()
        torch.cuda.synchronize()
        # The backward frees each step's saved buffers as it goes: it never needs more
        # than a few extra N at once.
        assert torch.cuda.max_memory_allocated() - before_backward <= 12 * n * element
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@needs_gpu
@pytest.mark.slow
def test_cuda_int64_indexing_past_2_31_elements(cuda_fused: None) -> None:
    """A float16 bucket of more than 2^31 elements (about 13 GB for three buffers): the
    elements past index 2^31 are updated like the others."""
    n = (1 << 31) + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2 + (2 << 30):
        pytest.skip("needs about 15 GB of free GPU memory")
    first = (1 << 31) - 5  # the second segment straddles element 2^31
    segments = torch.tensor([[0, first, 0, 0, 1], [first, n - first, 0, 3, 1]], device="cuda")
    params = torch.randn(n, dtype=torch.float16, device="cuda")
    grads = torch.randn(n, dtype=torch.float16, device="cuda")
    hyper = [torch.tensor([v], device="cuda") for v in (0.1, 0.0, 0.0, 0.01)]
    flags = torch.zeros(1, dtype=torch.int64, device="cuda")
    empty = params.new_empty(0)
    params_out, _ = torch.ops.loft.sgd_step(params, grads, empty, segments, *hyper, flags)
    tail = slice(n - 10_000, n)
    tail_segments = torch.tensor([[0, 10_000, 0, 3, 1]], device="cuda")
    want, _ = reference.sgd_step(params[tail].clone(), grads[tail].clone(), empty, tail_segments,
                                 *hyper, flags)
    assert_close(params_out[tail], want, torch.float16, "past 2^31")
    head = slice(0, 10_000)
    want_head, _ = reference.sgd_step(params[head].clone(), grads[head].clone(), empty,
                                      tail_segments, *hyper, flags)
    assert_close(params_out[head], want_head, torch.float16, "head")
    del params, grads, params_out


@needs_gpu
def test_cuda_bad_input_raises_naming_the_argument(cuda_fused: None) -> None:
    """The CUDA ops check their arguments as the CPU ops do (values on a host copy)."""
    for op in (SGD, ADAM):
        case = make_case(op, [4, 6], torch.float32, [0, 0], seed=1, with_optional=True,
                         device="cuda")
        bad = {
            "segments": torch.tensor([[0, 4, 0, 0, 1], [5, 6, 0, 0, 1]], device="cuda"),
            "group_flags": torch.tensor([8, 0], device="cuda"),
            "lr": torch.zeros(2, device="cuda", dtype=torch.float64),
        }
        for name, value in bad.items():
            args = args_of(op, {**case, name: value})
            with pytest.raises(RuntimeError, match=name):
                raw_op(op)(*args)
            upstream = [torch.zeros(10, device="cuda") for _ in BUFFERS[op][1:]]
            with pytest.raises(RuntimeError, match=name):
                raw_op(op + "_backward")(*upstream, *args, 1)
        on_cpu = args_of(op, {**case, "segments": case["segments"].cpu()})
        with pytest.raises(RuntimeError, match="segments"):
            raw_op(op)(*on_cpu)


@needs_gpu
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_cuda_elementwise_matches_cpu_and_reference(op: str, dtype: torch.dtype, aligned: bool,
                                                    cuda_fused: None) -> None:
    """Per-element lr and/or weight_decay on CUDA: forward and backward (with the
    per-element gradients) against the CPU ops and the reference, over several tiles,
    inactive segments and both groups' flags."""
    names = list(BUFFERS[op]) + list(HYPER[op]) + list(ELEMENTWISE)
    for i, (flags, which) in enumerate(itertools.product(flag_pairs(op), ELEMENTWISE_SETS)):
        sizes = CUDA_SIZE_SETS[i % len(CUDA_SIZE_SETS)]
        case = add_elementwise(make_case(op, sizes, dtype, list(flags), seed=i, device="cuda"),
                               which, seed=i)
        args = args_of(op, case) + elementwise_of(case)
        if not aligned:
            args = [a if a is None else _misaligned(a) for a in args]
        cpu = [a if a is None else a.cpu() for a in args]
        what = f"{op} flags={flags} sizes={sizes} per-element {which}"
        got, on_cpu = raw_op(op)(*args), raw_op(op)(*cpu)
        want = getattr(reference, op)(*args)
        for g, c, w in zip(got, on_cpu, want):
            assert_close(g.cpu(), c, dtype, what + " (vs CPU)")
            assert_close(g, w, dtype, what + " (vs reference)")
        upstream = [torch.randn(o.numel(), device="cuda").to(o) for o in want]
        k = len(args) - 2
        n = case["params"].numel()
        for mask in (full_mask(op), 1 << len(HYPER[op])):
            got = raw_op(op + "_backward")(*upstream, *args[:k], mask, *args[k:])
            on_cpu = raw_op(op + "_backward")(*[u.cpu() for u in upstream], *cpu[:k], mask,
                                              *cpu[k:])
            want = getattr(reference, op + "_backward")(*upstream, *args[:k], mask, *args[k:])
            for name, g, c, w in zip(names, got, on_cpu, want):
                assert g.shape == c.shape == w.shape, f"{what}: {name} mask={mask}"
                if name in HYPER[op]:
                    _hyper_close(g, c, dtype, n, f"{what}: {name} (vs CPU)")
                else:
                    tol_dtype = dtype if name not in ELEMENTWISE or dtype == torch.float64 \
                        else torch.float32
                    assert_close(g.cpu(), c, tol_dtype, f"{what}: grad {name} (vs CPU)")
                    assert_close(g, w, tol_dtype, f"{what}: grad {name} (vs reference)")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_cuda_elementwise_group_values_equal_the_per_group_path(op: str, dtype: torch.dtype,
                                                                cuda_fused: None) -> None:
    """Per-element values equal to the group's give the per-group kernel's results bit for
    bit on CUDA too (forward, and the buffer gradients of the backward)."""
    for flags, which in itertools.product(flag_pairs(op), ELEMENTWISE_SETS):
        case = make_case(op, [5, 1, 4000, 3, 2048], dtype, list(flags), seed=flags[0],
                         device="cuda")
        elementwise = elementwise_of(add_elementwise(case, which, constant=True))
        args = args_of(op, case)
        want = raw_op(op)(*args)
        for g, w in zip(raw_op(op)(*args, *elementwise), want):
            assert torch.equal(g, w), f"{op} flags={flags} per-element {which}"
        upstream = [torch.randn(o.numel(), device="cuda").to(o) for o in want]
        per_group = raw_op(op + "_backward")(*upstream, *args, full_mask(op))
        per_element = raw_op(op + "_backward")(*upstream, *args, full_mask(op), *elementwise)
        for g, w in zip(per_element[:len(BUFFERS[op])], per_group[:len(BUFFERS[op])]):
            assert torch.equal(g, w), f"{op} flags={flags} per-element {which}"


@needs_gpu
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_cuda_elementwise_gradcheck_and_gradgradcheck(op: str, cuda_fused: None) -> None:
    case = add_elementwise(make_case(op, [3, 2, 1, 2], torch.float64, [7, 2], seed=13,
                                     device="cuda"), ("lr", "weight_decay"), seed=2)
    inputs = _differentiable_inputs(op, case)
    inputs += [e.clone().requires_grad_() for e in elementwise_of(case)]
    for fn in (getattr(ops, op), raw_op(op)):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@needs_gpu
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_cuda_float32_rounds_as_the_cpu(op: str, cuda_fused: None) -> None:
    """Both backends build without multiply-add contraction and fuse exactly where the
    math says (docs/ops.md, "Rounding"): float32 SGD gives the CPU's bits, forward and
    backward; Adam the CPU's exp_avg and exp_avg_sq bits, and params within 1 ulp (the
    float64 bias corrections use the device's pow, which may differ in the last bit)."""
    for flags, sizes in itertools.product(flag_pairs(op), CUDA_SIZE_SETS):
        case = make_case(op, sizes, torch.float32, list(flags), seed=len(sizes), device="cuda")
        args = args_of(op, case)
        cpu = [a.cpu() for a in args]
        got, want = raw_op(op)(*args), raw_op(op)(*cpu)
        what = f"{op} flags={flags} sizes={sizes}"
        for k, (g, w) in enumerate(zip(got, want)):
            if op == SGD or k in (1, 2):
                assert torch.equal(g.cpu(), w), what
            elif g.numel():
                assert int(ulp_distance(g.cpu(), w).max()) <= 1, what
        if op == SGD:
            upstream = [torch.randn(o.numel()) for o in want]
            got = raw_op(op + "_backward")(*[u.cuda() for u in upstream], *args, 0)
            want = raw_op(op + "_backward")(*upstream, *cpu, 0)
            for g, w in zip(got[:len(BUFFERS[op])], want[:len(BUFFERS[op])]):
                assert torch.equal(g.cpu(), w), what


def test_tolerances_cover_every_dtype() -> None:
    assert set(TOLERANCES) == set(DTYPES)
