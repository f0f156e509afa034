"""``loft._step.bucket_step``, the flat step engine's one step of a bucket, with
per-element hyperparameters: gradients through the views, state and hyperparameters."""

from __future__ import annotations

import pytest
import torch

from ..ops.test_ops import ADAM, BUFFERS, ELEMENTWISE, HYPER, SGD, add_elementwise, make_case


@pytest.mark.parametrize("op", [SGD, ADAM])
@pytest.mark.parametrize("which", [("lr",), ("lr", "weight_decay")], ids=str)
def test_elementwise_through_bucket_step(op: str, which: tuple[str, ...], fused: None) -> None:
    """``loft._step.bucket_step(..., elementwise=...)``: float64 gradcheck and gradgradcheck
    with respect to the weights (views), gradients, state, hyperparameters and the
    per-element ones; the [G] weight decay is 0 while the per-element one is not (the
    weights' gradient is then not the upstream one), one tensor is inactive."""
    from loft import _contract
    from loft.flat import make_buckets
    from loft.step import bucket_step

    spec = _contract.SGD if op == SGD else _contract.ADAM
    shapes = [(2, 2), (3,), (1,)]
    bucket = make_buckets([torch.zeros(s, dtype=torch.float64) for s in shapes], [0, 1, 0])[0]
    case = make_case(op, [bucket.numel], torch.float64, [7, 2], seed=5)
    case["weight_decay"] = torch.zeros_like(case["weight_decay"])
    segments = bucket.segments([1, 0, 2], [True, True, False])
    case["segments"] = segments
    case = add_elementwise(case, which, seed=4)
    views = [t.clone().requires_grad_() for t in bucket.plain_views(case["params"])]
    grads = [t.clone().requires_grad_() for t in bucket.plain_views(case["grads"])][:2] + [None]
    state = [case[b].clone().requires_grad_() for b in BUFFERS[op][2:]]
    hyper = [case[h].clone().requires_grad_() for h in HYPER[op]]
    empty = torch.zeros(0, dtype=torch.float64)
    elementwise = [case[n].clone().requires_grad_() if n in case else empty for n in ELEMENTWISE]
    leaves = views + grads[:2] + state + hyper + [e for e in elementwise if e.numel()]

    def fn(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(xs)
        v = [next(it) for _ in views]
        g = [next(it), next(it), None]
        st = [next(it) for _ in state]
        hy = [next(it) for _ in hyper]
        el = [next(it) if e.numel() else e for e in elementwise]
        new_views, new_state = bucket_step(spec, bucket, None, v, g, st, hy, segments,
                                           case["group_flags"], elementwise=el)
        return tuple(new_views) + tuple(new_state)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)
    # Only the weights and a per-element lr that does not require grad: SGD's backward
    # then keeps no buffer values (the per-element lr is still a factor).
    lr_e = elementwise[0].detach()

    def weights_only(*v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        new_views, _ = bucket_step(spec, bucket, None, list(v), [g.detach() for g in grads[:2]]
                                   + [None], [s.detach() for s in state],
                                   [x.detach() for x in hyper], segments, case["group_flags"],
                                   elementwise=[lr_e, empty])
        return tuple(new_views)

    assert torch.autograd.gradcheck(weights_only, views, eps=1e-6, atol=1e-7, rtol=1e-5)
