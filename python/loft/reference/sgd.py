"""SGD: ``sgd_step`` and ``sgd_step_backward`` in plain differentiable PyTorch."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from loft._contract import ELEMENTWISE_HYPER, SGD, SGDFlag, compute_dtype

from ._layout import checked_layout, elementwise_values, flag, per_element, present
from ._math import add_scaled, hyper_grads, zeros_or

__all__ = ["sgd_step", "sgd_step_backward", "SGD_ELEMENTWISE"]

#: The hyperparameters only this reference takes per element (``elementwise=``).
SGD_ELEMENTWISE = ("momentum", "dampening")


def _sgd_forward_math(params, grads, momentum_buffer, layout, lr, momentum, dampening,
                      weight_decay, group_flags, lr_elementwise=None,
                      weight_decay_elementwise=None, elementwise=None):
    """g2 = ±g + λp, b' = g2 (first) or μb + (1-τ)g2, d = g2 + μb' / b' / g2, and the rest."""
    ct = compute_dtype(params.dtype)
    act = layout.active
    el = elementwise or {}
    p = params.to(ct)
    g = torch.where(act, grads.to(ct), 0)
    has_lr_e, has_wd_e = present(lr_elementwise), present(weight_decay_elementwise)
    lr_e = lr_elementwise if has_lr_e else per_element(lr, layout, ct)
    wd_e = weight_decay_elementwise if has_wd_e else per_element(weight_decay, layout, ct)
    maximize = flag(group_flags, layout, SGDFlag.MAXIMIZE)
    nesterov = flag(group_flags, layout, SGDFlag.NESTEROV)
    use_mom = flag(group_flags, layout, SGDFlag.MOMENTUM) & act
    g2 = add_scaled(torch.where(maximize, -g, g), wd_e, p)
    has_buf = momentum_buffer.numel() > 0
    if has_buf:
        mom_e = el["momentum"] if "momentum" in el else per_element(momentum, layout, ct)
        # 1 - dampening in the hyperparameter's dtype, then cast: one rounding, as the
        # kernels' float64 scalar and higher's Python-number `1 - dampening`.
        omd_e = 1 - el["dampening"] if "dampening" in el else per_element(1 - dampening,
                                                                           layout, ct)
        b = momentum_buffer.to(ct)
        b_mom = torch.where(layout.first, g2, mom_e * b + omd_e * g2)
        b_new = torch.where(use_mom, b_mom, b)
        d = torch.where(use_mom, torch.where(nesterov, g2 + mom_e * b_new, b_new), g2)
    else:
        mom_e = omd_e = b = b_new = None
        d = g2
    return dict(p=p, g2=g2, b=b, b_new=b_new, d=d, lr_e=lr_e, wd_e=wd_e, mom_e=mom_e,
                omd_e=omd_e, maximize=maximize, nesterov=nesterov, use_mom=use_mom,
                has_buf=has_buf, has_lr_e=has_lr_e, has_wd_e=has_wd_e)


def sgd_step(params: Tensor, grads: Tensor, momentum_buffer: Tensor, segments: Tensor,
             lr: Tensor, momentum: Tensor, dampening: Tensor, weight_decay: Tensor,
             group_flags: Tensor, lr_elementwise: Tensor | None = None,
             weight_decay_elementwise: Tensor | None = None, *,
             elementwise: Mapping[str, Tensor] | None = None,
             check: bool = True) -> tuple[Tensor, Tensor]:
    r"""One SGD step over a flat bucket, as ``torch.optim.SGD`` (rounded as higher's
    per-tensor ops).

    For each active segment (``first`` = the segment's step is 0):

    .. math::
        g_2 &= \pm g + \lambda p \\
        b' &= g_2 \text{ if first else } \mu b + (1 - \tau) g_2 \\
        d &= g_2 + \mu b' \text{ (nesterov) or } b' \text{ (momentum) or } g_2 \\
        p' &= p - \eta d

    ``lr_elementwise`` / ``weight_decay_elementwise``: ``[N]`` values (compute dtype) that
    replace the group's :math:`\eta` / :math:`\lambda` for every element (None or 0
    elements: absent), as the fused op. ``elementwise`` (this reference only): ``[N]``
    values for ``momentum`` and/or ``dampening`` likewise; a ``ValueError`` for any other
    name.

    Returns ``(params_out, momentum_buffer_out)``.
    """
    op = SGD.name
    el = elementwise_values(op, elementwise, SGD_ELEMENTWISE, params, check)
    layout = checked_layout(op, SGD, (params, grads, momentum_buffer), segments,
                            (lr, momentum, dampening, weight_decay), group_flags,
                            (lr_elementwise, weight_decay_elementwise), check)
    f = _sgd_forward_math(params, grads, momentum_buffer, layout, lr, momentum, dampening,
                          weight_decay, group_flags, lr_elementwise, weight_decay_elementwise,
                          el)
    p_new = torch.where(layout.active, f["p"] - f["lr_e"] * f["d"], f["p"])
    b_out = f["b_new"].to(params.dtype) if f["has_buf"] else momentum_buffer.new_empty(0)
    return p_new.to(params.dtype), b_out


def sgd_step_backward(grad_params_out: Tensor, grad_momentum_buffer_out: Tensor,
                      params: Tensor, grads: Tensor, momentum_buffer: Tensor,
                      segments: Tensor, lr: Tensor, momentum: Tensor, dampening: Tensor,
                      weight_decay: Tensor, group_flags: Tensor, hyper_grad_mask: int = 63,
                      lr_elementwise: Tensor | None = None,
                      weight_decay_elementwise: Tensor | None = None, *, check: bool = True
                      ) -> tuple[Tensor, ...]:
    r"""Vector-Jacobian product of :func:`sgd_step` (formulas in ``docs/ops.md``).

    Returns ``(grad_params, grad_grads, grad_momentum_buffer, grad_lr, grad_momentum,
    grad_dampening, grad_weight_decay, grad_lr_elementwise, grad_weight_decay_elementwise)``;
    the last two are ``[N]`` (0 on inactive segments), or 0 elements when that
    per-element hyperparameter is absent or its bit (16, 32) in ``hyper_grad_mask`` is
    clear. A ``[G]`` hyperparameter given per element gets a zero gradient.
    """
    op = SGD.backward_name
    layout = checked_layout(op, SGD, (params, grads, momentum_buffer), segments,
                            (lr, momentum, dampening, weight_decay), group_flags,
                            (lr_elementwise, weight_decay_elementwise), check,
                            (grad_params_out, grad_momentum_buffer_out))
    n = params.numel()
    f = _sgd_forward_math(params, grads, momentum_buffer, layout, lr, momentum, dampening,
                          weight_decay, group_flags, lr_elementwise, weight_decay_elementwise)
    act, p, g2 = layout.active, f["p"], f["g2"]
    P = zeros_or(grad_params_out, n, p)
    D = -f["lr_e"] * P
    if f["has_buf"]:
        B = zeros_or(grad_momentum_buffer_out, n, p)
        nest, use_mom, mom_e, first = f["nesterov"], f["use_mom"], f["mom_e"], layout.first
        Bt = B + torch.where(nest, mom_e * D, D)
        from_b = f["omd_e"] * Bt
        # First step with nesterov: (B + D) + momentum * D, the order in which autograd
        # adds the three gradients of g2 = b' through higher's ops (docs/ops.md).
        G2_first = torch.where(nest, (B + D) + mom_e * D, Bt)
        G2_later = torch.where(nest, D + from_b, from_b)
        G2 = torch.where(use_mom, torch.where(first, G2_first, G2_later), D)
        grad_b = torch.where(use_mom, torch.where(first, 0, mom_e * Bt), B)
        grad_b_out = grad_b.to(params.dtype)
    else:
        G2 = D
        grad_b_out = momentum_buffer.new_empty(0)
    grad_p = torch.where(act, add_scaled(P, f["wd_e"], G2), P)
    grad_g = torch.where(act, torch.where(f["maximize"], -G2, G2), 0)

    zero = torch.zeros_like(p)
    if f["has_buf"]:
        not_first = f["use_mom"] & ~layout.first
        grad_mom_fn = lambda: (  # noqa: E731
            torch.where(not_first, Bt * f["b"], zero)
            + torch.where(f["use_mom"] & f["nesterov"], D * f["b_new"], zero)
        )
        grad_damp_fn = lambda: torch.where(not_first, -Bt * g2, zero)  # noqa: E731
    else:
        grad_mom_fn = grad_damp_fn = lambda: zero  # noqa: E731
    terms = dict(lr=lambda: P * -f["d"], momentum=grad_mom_fn, dampening=grad_damp_fn,
                 weight_decay=lambda: G2 * p)
    given = dict(zip(ELEMENTWISE_HYPER, (f["has_lr_e"], f["has_wd_e"])))
    return (
        grad_p.to(params.dtype),
        grad_g.to(params.dtype),
        grad_b_out,
        *hyper_grads(SGD, terms, given, hyper_grad_mask, layout, lr, p),
    )
