"""How loft's float32 steps round against higher's per-tensor ops and torch.optim.

- **SGD** (plain, momentum, nesterov + weight decay, dampening): one step of loft's fused
  kernel against higher 0.2.1's ``DifferentiableSGD._update`` (separate torch ops) on the
  same float32 weights, gradients and momentum buffers: the fraction of elements that
  differ, forward (new weights and buffers) and backward (gradients of the weights, the
  gradients and the buffer).
- **Adam / AdamW / amsgrad**: steps of loft's kernel against ``torch.optim``'s
  single-tensor step (``foreach=False``) from torch's own state: the fraction of params
  that differ, beyond 1 ulp, and where torch's own float32 ``sqrt`` is correctly rounded.

Run: ``python benchmarks/rounding_vs_torch.py [--numel 1000000] [--steps 8]``.
"""

from __future__ import annotations

import argparse

import higher
import torch

import loft
from loft import ops

_SGD = {"plain": {}, "momentum": {"momentum": 0.9},
        "nesterov+decay": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        "dampening": {"momentum": 0.9, "dampening": 0.058}}
_ADAM = {"adam": (torch.optim.Adam, {}), "adamw": (torch.optim.AdamW, {"weight_decay": 0.1}),
         "amsgrad+decay": (torch.optim.Adam, {"amsgrad": True, "weight_decay": 0.01})}


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in float32 units in the last place (bit patterns as ordered integers)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    return (ordered(a) - ordered(b)).abs()


def _sgd_step(n: int, options: dict, seed: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    p, g, b, up, ub = (torch.randn(n, generator=gen) for _ in range(5))
    f64 = dict(dtype=torch.float64)
    momentum = options.get("momentum", 0.0)
    flags = (ops.reference.SGD_MOMENTUM if momentum else 0) | (
        ops.reference.SGD_NESTEROV if options.get("nesterov") else 0)
    hyper = [torch.tensor([v], **f64) for v in (0.1, momentum, options.get("dampening", 0.0),
                                                options.get("weight_decay", 0.0))]
    segments = torch.tensor([[0, n, 0, 1, 1]])
    leaves = [t.clone().requires_grad_() for t in (p, g, b)]
    out = ops.sgd_step(*leaves, segments, *hyper, torch.tensor([flags]))
    grads = torch.autograd.grad([out[0], out[1]], leaves, [up, ub], allow_unused=True)
    # higher's per-tensor update on the same values (its state holds the buffer).
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD([model.weight], lr=0.1, **options)
    ref_leaves = [t.clone().requires_grad_() for t in (p, g, b)]
    diffopt = higher.optim.DifferentiableSGD(opt, [model.weight])
    diffopt.param_groups[0]["params"] = [ref_leaves[0]]
    if momentum:
        diffopt.state[0][0]["momentum_buffer"] = ref_leaves[2]
    diffopt._update([[ref_leaves[1]]])
    new_p = diffopt.param_groups[0]["params"][0]
    new_b = diffopt.state[0][0]["momentum_buffer"] if momentum else ref_leaves[2]
    ref_grads = torch.autograd.grad([new_p, new_b], ref_leaves, [up, ub], allow_unused=True)
    forward = [(out[0], new_p)] + ([(out[1], new_b)] if momentum else [])
    backward = [(a, r) for a, r in zip(grads, ref_grads) if r is not None]
    differ = lambda pairs: sum(int((a != r).sum()) for a, r in pairs) / sum(  # noqa: E731
        a.numel() for a, _ in pairs)
    return differ(forward), differ(backward)


def _adam_steps(n: int, opt_type: type, options: dict, steps: int,
                seed: int) -> tuple[int, int, int, int, int]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(n, generator=gen) * 0.1)
    opt = opt_type([weight], lr=1e-3, foreach=False, **options)
    loft_opt = loft.optim.get_diff_optim(opt_type([weight], lr=1e-3, **options), [weight],
                                         track_higher_grads=False)
    total = differ = beyond = inexact_sqrt = differ_exact = 0
    for _ in range(steps):
        grad = torch.randn(n, generator=gen)
        before = weight.detach().clone()
        state = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                 for k, v in opt.state[weight].items()}
        loft_opt.state = [{0: state}] if state else [{}]
        start = before.clone().requires_grad_()
        (ours,) = loft_opt.step((start * grad).sum(), params=[start])  # its gradient: grad
        weight.grad = grad
        opt.step()
        v = opt.state[weight]["exp_avg_sq"]
        u = torch.maximum(opt.state[weight]["max_exp_avg_sq"], v) if \
            "max_exp_avg_sq" in opt.state[weight] else v
        exact = u.sqrt() == u.double().sqrt().float()
        distance = _ulps(ours.detach(), weight.detach())
        total += n
        differ += int((distance > 0).sum())
        beyond += int((distance > 1).sum())
        inexact_sqrt += int((~exact).sum())
        differ_exact += int(((distance > 0) & exact).sum())
    return total, differ, beyond, inexact_sqrt, differ_exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"loft backend: {loft.backend()}; {args.numel} float32 elements")
    for name, options in _SGD.items():
        forward, backward = _sgd_step(args.numel, options, seed=0)
        print(f"SGD {name:15s} vs higher's per-tensor ops: {forward:.2%} of outputs differ "
              f"(forward), {backward:.2%} (backward)")
    for name, (opt_type, options) in _ADAM.items():
        total, differ, beyond, inexact, differ_exact = _adam_steps(
            args.numel, opt_type, options, args.steps, seed=1)
        print(f"{name:15s} {args.steps} steps vs torch.optim: params differ {differ / total:.3%}, "
              f"beyond 1 ulp {beyond / total:.3%}; torch's sqrt inexact for "
              f"{inexact / total:.1%}, and where it is exact {differ_exact} of "
              f"{total - inexact} differ")


if __name__ == "__main__":
    main()
