"""Float32 results rounded as the per-tensor torch ops loft stands for (docs/ops.md, "Rounding").

- SGD (plain, momentum, dampening, nesterov, weight decay, maximize): the fused kernels
  and the reference path equal higher 0.2.1's ``DifferentiableSGD`` (separate torch ops:
  ``g + wd * p``, ``buf * momentum + (1 - dampening) * g``, ``p + (-lr * d)``) bit for
  bit over a few steps, forward and backward (autograd's gradients through higher's ops
  with respect to the weights, every step's gradients and the momentum buffer).
- Adam / AdamW / amsgrad: every step from torch.optim's state equals
  ``torch.optim.Adam(W)``'s single-tensor path (``foreach=False``) bit for bit in the
  state, and in the params wherever torch's own float32 ``sqrt`` is correctly rounded
  (on the CPU it is MKL's, which is not: see :func:`_torch_sqrt_is_exact`).
- Through the public API: ``loft.innerloop_ctx`` and ``higher.innerloop_ctx`` give the
  same fast weights and meta-gradients, bit for bit, on a float32 MLP with plain SGD.

Hyperparameters reach loft's ops as float64 ``[G]`` tensors here (the values torch.optim
and higher hold as Python floats): a float32 ``dampening`` or ``beta2`` would already be
rounded before ``1 - dampening`` or ``1 - beta2`` is formed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from unittest import mock

import higher
import pytest
import torch
from torch import Tensor, nn

import loft
from loft import _contract, _ext, ops, reference


def ulp_distance(a: Tensor, b: Tensor) -> Tensor:
    """The number of float32 values from ``a`` to ``b`` (0 when equal; +0 and -0 are
    equal), elementwise, as int64."""
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())

    def ordered(x: Tensor) -> Tensor:
        bits = x.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    return (ordered(a) - ordered(b)).abs()


def test_ulp_distance() -> None:
    one = torch.tensor([1.0])
    assert int(ulp_distance(one, one)) == 0
    assert int(ulp_distance(one, torch.nextafter(one, torch.tensor([2.0])))) == 1
    assert int(ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0]))) == 0
    tiny = torch.nextafter(torch.tensor([0.0]), torch.tensor([1.0]))
    assert int(ulp_distance(tiny, -tiny)) == 2
    assert int(ulp_distance(torch.tensor([1.0]), torch.tensor([1.0 + 2**-22]))) == 2


@contextmanager
def _backend(name: str) -> Iterator[None]:
    """The fused kernels, or loft's pure-PyTorch reference path."""
    if name == "fused":
        assert loft.backend() == "fused", loft.backend_reason()
        yield
        return
    with mock.patch.object(_ext, "has_device_kernels", lambda device: False):
        yield


def _segments(sizes: Sequence[int], step: int) -> Tensor:
    rows, offset = [], 0
    for size in sizes:
        rows.append([offset, size, 0, step, 1])
        offset += size
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 5)


# ---- SGD against higher 0.2.1 ----------------------------------------------------------------

SGD_OPTIONS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.058, weight_decay=0.01),
    dict(lr=0.37, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(lr=0.1, momentum=0.5, nesterov=True, maximize=True),
    dict(lr=0.3, weight_decay=0.05, maximize=True),
]
#: Tensor shapes of one bucket: sizes below, at and above the vector widths (8 and 16
#: float32 lanes), and one past a 4096-element chunk.
SHAPES = [[(1,), (15,), (16, 3), (17,), (5, 33)], [(4097,), (7, 9)]]
STEPS = 3


def _sgd_inputs(shapes: Sequence[tuple[int, ...]], seed: int, with_buffer: bool
                ) -> tuple[list[Tensor], list[list[Tensor]], list[Tensor] | None]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(STEPS)]
    buffers = [torch.randn(s, generator=gen) for s in shapes] if with_buffer else None
    return params, grads, buffers


def _higher_sgd(params: list[Tensor], grads: list[list[Tensor]], buffers: list[Tensor] | None,
                options: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    """STEPS steps of higher 0.2.1's DifferentiableSGD on the given gradients (maximize,
    which higher 0.2.1 lacks, as torch.optim does it: the update of the negated gradient)."""
    opts = {k: v for k, v in options.items() if k != "maximize"}
    sign = -1 if options.get("maximize") else 1
    reference_params = [torch.zeros_like(p, requires_grad=True) for p in params]
    opt = torch.optim.SGD(reference_params, **opts)
    diffopt = higher.optim.get_diff_optim(opt, reference_params, track_higher_grads=True)
    if buffers is not None:
        for i, b in enumerate(buffers):
            diffopt.state[0][i]["momentum_buffer"] = b
    current = list(params)
    for step_grads in grads:
        loss = sum((p * 0).sum() for p in current)
        step = [-g for g in step_grads] if sign < 0 else list(step_grads)
        current = diffopt.step(loss, params=current, grad_callback=lambda _, s=step: s)
    new_buffers = [diffopt.state[0][i].get("momentum_buffer") for i in range(len(params))]
    return list(current), [b for b in new_buffers if b is not None]


def _loft_sgd(params: list[Tensor], grads: list[list[Tensor]], buffers: list[Tensor] | None,
              options: dict[str, Any], hyper_dtype: torch.dtype
              ) -> tuple[list[Tensor], list[Tensor]]:
    """The same STEPS steps with loft.ops.sgd_step over one flat bucket."""
    sizes = [p.numel() for p in params]
    momentum = options.get("momentum", 0.0)
    flags = ((reference.SGD_MAXIMIZE if options.get("maximize") else 0)
             | (reference.SGD_NESTEROV if options.get("nesterov") else 0)
             | (reference.SGD_MOMENTUM if momentum else 0))
    hyper = [torch.tensor([options.get(k, 0.0)], dtype=hyper_dtype)
             for k in _contract.SGD.hyper]
    flat = torch.cat([p.reshape(-1) for p in params])
    if buffers is not None:
        buf = torch.cat([b.reshape(-1) for b in buffers])
    else:
        buf = torch.zeros(sum(sizes) if momentum else 0)
    for t, step_grads in enumerate(grads):
        # loft's SGD reads only whether a tensor had an update before (min(step, 1)).
        first = buffers is None and t == 0
        segments = _segments(sizes, 0 if first else 1)
        flat, buf = ops.sgd_step(flat, torch.cat([g.reshape(-1) for g in step_grads]), buf,
                                 segments, *hyper, torch.tensor([flags]))
    new_params = [part.view(p.shape) for part, p in zip(flat.split(sizes), params)]
    new_buffers = ([part.view(p.shape) for part, p in zip(buf.split(sizes), params)]
                   if momentum else [])
    return new_params, new_buffers


def _sgd_run(run: Any, seed: int, shapes: Sequence[tuple[int, ...]], options: dict[str, Any],
             with_buffer: bool, **kwargs: Any) -> list[Tensor]:
    """The new weights and buffers, then autograd's gradients of a random linear function
    of them with respect to the initial weights, every step's gradients and the initial
    buffer."""
    params, grads, buffers = _sgd_inputs(shapes, seed, with_buffer)
    leaves = [t.requires_grad_() for t in params + sum(grads, []) + (buffers or [])]
    new_params, new_buffers = run(params, grads, buffers, options, **kwargs)
    outputs = new_params + new_buffers
    gen = torch.Generator().manual_seed(seed + 1000)
    upstream = [torch.randn(o.shape, generator=gen) for o in outputs]
    gradients = torch.autograd.grad(outputs, leaves, upstream, allow_unused=True)
    return [o.detach() for o in outputs] + [
        torch.zeros_like(x) if g is None else g for g, x in zip(gradients, leaves)]


#: Each option set from the first step (no buffer yet), and with a given momentum buffer.
SGD_CASES = [(o, with_buffer) for o in SGD_OPTIONS
             for with_buffer in ([False, True] if o.get("momentum") else [False])]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize(("options", "with_buffer"), SGD_CASES,
                         ids=[",".join(f"{k}={v}" for k, v in o.items())
                              + (",with-buffer" if b else "") for o, b in SGD_CASES])
def test_sgd_equals_higher_per_tensor_ops_bit_for_bit(options: dict[str, Any], with_buffer: bool,
                                                      backend: str) -> None:
    for seed, shapes in enumerate(SHAPES * 2):
        want = _sgd_run(_higher_sgd, seed, shapes, options, with_buffer)
        with _backend(backend):
            got = _sgd_run(_loft_sgd, seed, shapes, options, with_buffer,
                           hyper_dtype=torch.float64)
        assert len(got) == len(want)
        for k, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype == torch.float32 and g.shape == w.shape
            assert torch.equal(g, w), (
                f"output {k} (seed {seed}): {int((g != w).sum())} of {g.numel()} elements "
                f"differ, up to {int(ulp_distance(g, w).max())} ulp")


def test_sgd_float32_hyperparameters_round_dampening_first() -> None:
    """With float32 ``[G]`` hyperparameter tensors, ``1 - dampening`` is formed from a
    dampening already rounded to float32: for 0.058 that gives another float32 than
    higher's ``1 - 0.058`` (one of many such values); without dampening (0) the float32
    tensors are exact and the results equal higher's bit for bit."""
    rounded_first = torch.tensor(1 - torch.tensor(0.058).item(), dtype=torch.float32)
    assert rounded_first != torch.tensor(1 - 0.058, dtype=torch.float32)
    options = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    want = _sgd_run(_higher_sgd, 3, SHAPES[0], options, True)
    got = _sgd_run(_loft_sgd, 3, SHAPES[0], options, True, hyper_dtype=torch.float32)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---- Adam / AdamW against torch.optim ---------------------------------------------------------

ADAM_OPTIONS = [
    (torch.optim.Adam, dict(lr=1e-3)),
    (torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
    (torch.optim.Adam, dict(lr=3e-3, amsgrad=True, weight_decay=0.01, maximize=True)),
    (torch.optim.AdamW, dict(lr=1e-3)),
    (torch.optim.AdamW, dict(lr=0.02, betas=(0.6, 0.95), weight_decay=0.05, amsgrad=True)),
]
ADAM_STEPS = 5


def _adam_flags(opt_type: type, options: dict[str, Any]) -> int:
    return ((reference.ADAM_MAXIMIZE if options.get("maximize") else 0)
            | (reference.ADAM_AMSGRAD if options.get("amsgrad") else 0)
            | (reference.ADAM_DECOUPLED if opt_type is torch.optim.AdamW else 0))


def _torch_sqrt_is_exact(u: Tensor) -> Tensor:
    """Where torch's float32 ``sqrt`` on this machine is the correctly rounded square root.
    torch 2.13's CPU kernel calls MKL's ``vsSqrt`` (VML's high-accuracy mode: under 1 ulp,
    not correctly rounded; about one element in five is 1 ulp off here), which loft's
    ``sqrtf``, and any IEEE square root, does not reproduce."""
    return u.sqrt() == u.double().sqrt().float()


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("opt_item", ADAM_OPTIONS,
                         ids=lambda o: o[0].__name__ + "-" + ",".join(f"{k}={v}" for k, v in
                                                                      o[1].items()))
def test_adam_rounds_as_torch_optim_every_step(opt_item: tuple[type, dict], backend: str) -> None:
    """Each step from torch.optim's own state, against torch.optim's single-tensor step:
    exp_avg, exp_avg_sq and max_exp_avg_sq bit for bit; the params bit for bit wherever
    torch's square root of the second moment is correctly rounded, and within 1 ulp
    almost everywhere else (more only where the update nearly cancels the weight, which
    magnifies a 1-ulp difference of torch's sqrt; see :func:`_torch_sqrt_is_exact`)."""
    opt_type, options = opt_item
    weight_decay = options.get("weight_decay", 0.0 if opt_type is torch.optim.Adam else 0.01)
    beta1, beta2 = options.get("betas", (0.9, 0.999))
    hyper = [torch.tensor([v], dtype=torch.float64)
             for v in (options["lr"], beta1, beta2, options.get("eps", 1e-8), weight_decay)]
    flags = torch.tensor([_adam_flags(opt_type, options)])
    amsgrad = bool(options.get("amsgrad"))
    if backend == "fused":
        assert loft.backend() == "fused", loft.backend_reason()
    op = torch.ops.loft.adam_step if backend == "fused" else reference.adam_step
    within_one_ulp = total = 0
    for seed, shapes in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(seed)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        opt = opt_type(params, foreach=False, **options)
        sizes = [p.numel() for p in params]
        for step in range(ADAM_STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 10 ** (step % 3 - 1)
            flat = lambda ts: torch.cat([t.detach().reshape(-1) for t in ts])  # noqa: E731
            state = [opt.state[p] for p in params]
            before = [flat(params), flat([p.grad for p in params])]
            if step == 0:
                zeros = torch.zeros(sum(sizes))
                before += [zeros, zeros, zeros if amsgrad else zeros[:0]]
            else:
                before += [flat([s["exp_avg"] for s in state]),
                           flat([s["exp_avg_sq"] for s in state]),
                           flat([s["max_exp_avg_sq"] for s in state]) if amsgrad
                           else torch.zeros(0)]
            got = op(*before, _segments(sizes, step), *hyper, flags)
            opt.step()
            names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
            for name, g in zip(names, got[1:]):
                w = flat([s[name] for s in state])
                assert torch.equal(g, w), (
                    f"{name} at step {step + 1} (seed {seed}): {int((g != w).sum())} elements "
                    f"differ, up to {int(ulp_distance(g, w).max())} ulp")
            new_params = flat(params)
            u = flat([s["max_exp_avg_sq" if amsgrad else "exp_avg_sq"] for s in state])
            exact = _torch_sqrt_is_exact(u)
            distance = ulp_distance(got[0], new_params)
            assert not bool(distance[exact].any()), (
                f"params at step {step + 1} (seed {seed}) differ where torch's sqrt is "
                f"exact: {int((distance[exact] > 0).sum())} elements")
            within_one_ulp += int((distance <= 1).sum())
            total += distance.numel()
    # (At most 0.2% of the elements in these cases.)
    assert within_one_ulp >= 0.99 * total, f"{total - within_one_ulp} of {total} beyond 1 ulp"


# ---- the public API against higher ------------------------------------------------------------


def _mlp_inner_loop(lib: Any, seed: int, steps: int = 10, **options: Any
                    ) -> tuple[list[Tensor], list[Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 33), nn.ReLU(), nn.Linear(33, 17), nn.ReLU(),
                          nn.Linear(17, 3))
    opt = torch.optim.SGD(model.parameters(), **options)
    x, y = torch.randn(19, 7), torch.randn(19, 3)
    with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(((fmodel(x) - y) ** 2).mean())
        fast = [p.detach().clone() for p in fmodel.parameters()]
        meta = ((fmodel(x) - y) ** 2).mean()
        meta_grads = torch.autograd.grad(meta, list(model.parameters()))
    return fast, list(meta_grads)


def _assert_innerloop_equal(seed: int, **options: Any) -> None:
    fast, meta = _mlp_inner_loop(loft, seed, **options)
    fast_h, meta_h = _mlp_inner_loop(higher, seed, **options)
    for a, b in zip(fast + meta, fast_h + meta_h):
        assert torch.equal(a, b), f"{int((a != b).sum())} of {a.numel()} elements differ"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_innerloop_ctx_equals_higher_bit_for_bit(seed: int) -> None:
    """A float32 MLP with ReLUs, plain SGD, 10 inner steps: loft's fast weights and
    meta-gradients with respect to the initial weights equal higher's bit for bit."""
    _assert_innerloop_equal(seed, lr=0.1)


@pytest.mark.parametrize("options", [
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, dampening=0.5),  # 0.5: exact in float32
    # 1 - float32(0.058) is another float32 than higher's 1 - 0.058: loft's optimiser
    # passes float64 [G] hyperparameters (docs/ops.md, Rounding).
    dict(lr=0.05, momentum=0.9, dampening=0.058),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_innerloop_ctx_with_momentum_equals_higher_bit_for_bit(options: dict[str, Any]) -> None:
    """The same with momentum, nesterov (its first step's summation order), weight decay
    and dampening."""
    _assert_innerloop_equal(0, **options)
