"""Adam / AdamW: ``adam_step`` and ``adam_step_backward`` in plain differentiable PyTorch."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from loft._contract import ADAM, ELEMENTWISE_HYPER, AdamFlag, compute_dtype

from ._layout import checked_layout, elementwise_values, flag, per_element, present
from ._math import add_scaled, add_scaled_fused, hyper_grads, zeros_or

__all__ = ["adam_step", "adam_step_backward", "ADAM_ELEMENTWISE"]

#: The hyperparameters only this reference takes per element (``elementwise=``).
ADAM_ELEMENTWISE = ("beta1", "beta2", "eps")


def _adam_forward_math(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, layout, lr, beta1,
                       beta2, eps, weight_decay, group_flags, lr_elementwise=None,
                       weight_decay_elementwise=None, elementwise=None):
    """g2, m' = lerp(m, g2, 1-β1), v' = β2v + (1-β2)g2², u, d = √u/√(1-β2^t) + ε and the rest."""
    ct = compute_dtype(params.dtype)
    f64 = torch.float64
    act = layout.active
    grp = layout.group
    el = elementwise or {}
    p = params.to(ct)
    g = torch.where(act, grads.to(ct), 0)
    m, v = exp_avg.to(ct), exp_avg_sq.to(ct)
    has_lr_e, has_wd_e = present(lr_elementwise), present(weight_decay_elementwise)
    lr_e = lr_elementwise if has_lr_e else per_element(lr, layout, ct)
    wd_e = weight_decay_elementwise if has_wd_e else per_element(weight_decay, layout, ct)
    b1 = el["beta1"] if "beta1" in el else per_element(beta1, layout, ct)
    b2 = el["beta2"] if "beta2" in el else per_element(beta2, layout, ct)
    eps_e = el["eps"] if "eps" in el else per_element(eps, layout, ct)
    # 1 - beta in the hyperparameter's dtype, then cast: one rounding, as the kernels.
    omb1 = 1 - el["beta1"] if "beta1" in el else per_element(1 - beta1, layout, ct)
    omb2 = 1 - el["beta2"] if "beta2" in el else per_element(1 - beta2, layout, ct)
    maximize = flag(group_flags, layout, AdamFlag.MAXIMIZE)
    amsgrad = flag(group_flags, layout, AdamFlag.AMSGRAD) & act
    decoupled = flag(group_flags, layout, AdamFlag.DECOUPLED)

    # Scalars derived from the hyperparameters in float64, then cast to the compute type
    # (as the kernels, and torch.optim from Python floats): per segment, or per element
    # where a per-element value enters. t is each segment's step count after the update.
    t_seg = layout.seg_t
    seg = lambda values: layout.per_segment(values, ct)  # noqa: E731
    t_el = lambda: layout.per_segment(t_seg, f64)  # noqa: E731
    if "beta1" in el:
        b1_64, t1 = el["beta1"].to(f64), t_el()
        bc1_64 = 1 - b1_64**t1
        bc1, dbc1 = bc1_64.to(ct), (t1 * b1_64 ** (t1 - 1)).to(ct)
    else:
        b1_seg = beta1.to(f64)[layout.seg_group]
        bc1_seg = 1 - b1_seg**t_seg
        bc1_64 = None
        # d bc1 / d beta1 = -t beta1^(t-1), likewise for beta2.
        bc1, dbc1 = seg(bc1_seg), seg(t_seg * b1_seg ** (t_seg - 1))
    if "beta2" in el:
        b2_64, t2 = el["beta2"].to(f64), t_el()
        bc2_64 = 1 - b2_64**t2
        sqrt_bc2_64 = bc2_64.sqrt()
        bc2, sqrt_bc2, r = bc2_64.to(ct), sqrt_bc2_64.to(ct), (1 / sqrt_bc2_64).to(ct)
        dbc2 = (t2 * b2_64 ** (t2 - 1)).to(ct)
    else:
        b2_seg = beta2.to(f64)[layout.seg_group]
        bc2_seg = 1 - b2_seg**t_seg
        bc2, sqrt_bc2, r = seg(bc2_seg), seg(bc2_seg.sqrt()), seg(1 / bc2_seg.sqrt())
        dbc2 = seg(t_seg * b2_seg ** (t_seg - 1))
    lr64 = lr_elementwise.to(f64) if has_lr_e else None
    if has_lr_e or bc1_64 is not None:
        lr64 = lr64 if lr64 is not None else lr.to(f64)[grp]
        bc1_el = bc1_64 if bc1_64 is not None else layout.per_segment(bc1_seg, f64)
        c = (lr64 / bc1_el).to(ct)  # lr / bc1, torch.optim's step_size
    else:
        c = seg(lr.to(f64)[layout.seg_group] / bc1_seg)
    if has_lr_e or has_wd_e:
        lr64 = lr64 if lr64 is not None else lr.to(f64)[grp]
        wd64 = weight_decay_elementwise.to(f64) if has_wd_e else weight_decay.to(f64)[grp]
        decay = (1 - lr64 * wd64).to(ct)
    else:
        decay = per_element(1 - lr.to(f64) * weight_decay.to(f64), layout, ct)

    g1 = torch.where(maximize, -g, g)
    # torch.optim.Adam's grad.add(param, alpha=weight_decay): one rounding.
    g2 = torch.where(decoupled, g1, add_scaled_fused(g1, wd_e, p))
    p0 = torch.where(decoupled, p * decay, p)
    m_new = torch.lerp(m, g2, omb1)  # torch.optim's exp_avg.lerp_(grad, 1 - beta1)
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): one rounding each.
    v_new = torch.addcmul(b2 * v, omb2 * g2, g2)
    has_max = max_exp_avg_sq.numel() > 0
    if has_max:
        vmax = max_exp_avg_sq.to(ct)
        u = torch.where(amsgrad, torch.maximum(vmax, v_new), v_new)
    else:
        vmax = None
        u = v_new
    # Inactive elements may hold anything; keep their u positive so no masked branch
    # produces a NaN that a gradient could multiply by zero.
    u = torch.where(act, u, 1)
    pos = u > 0
    # sqrt(0) = 0 with a finite derivative; a NaN (or negative) u stays NaN, as in torch.
    s = torch.where(u == 0, 0, torch.sqrt(torch.where(u == 0, 1, u)))
    d = s / sqrt_bc2 + eps_e
    return dict(p=p, g2=g2, p0=p0, m=m, v=v, m_new=m_new, v_new=v_new, vmax=vmax, u=u, pos=pos,
                s=s, bc1=bc1, bc2=bc2, r=r, d=d, c=c, dbc1=dbc1, dbc2=dbc2, decay=decay,
                lr_e=lr_e, b1=b1, b2=b2, omb1=omb1, omb2=omb2, wd_e=wd_e,
                maximize=maximize, amsgrad=amsgrad, decoupled=decoupled, has_max=has_max,
                has_lr_e=has_lr_e, has_wd_e=has_wd_e)


def adam_step(params: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
              max_exp_avg_sq: Tensor, segments: Tensor, lr: Tensor, beta1: Tensor,
              beta2: Tensor, eps: Tensor, weight_decay: Tensor, group_flags: Tensor,
              lr_elementwise: Tensor | None = None,
              weight_decay_elementwise: Tensor | None = None, *,
              elementwise: Mapping[str, Tensor] | None = None,
              check: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""One Adam / AdamW step over a flat bucket, as ``torch.optim.Adam(W)``.

    For each active segment, with :math:`t` its step count after this update:

    .. math::
        m' &= \beta_1 m + (1 - \beta_1) g_2, \qquad v' = \beta_2 v + (1 - \beta_2) g_2^2 \\
        u &= \max(v_{max}, v') \text{ (amsgrad) or } v' \\
        p' &= p_0 - \frac{\eta}{1 - \beta_1^t}\,
              \frac{m'}{\sqrt{u} / \sqrt{1 - \beta_2^t} + \epsilon}

    with :math:`g_2 = \pm g + \lambda p, p_0 = p` (Adam, L2 decay) or
    :math:`g_2 = \pm g, p_0 = (1 - \eta\lambda) p` (AdamW, decoupled decay).

    ``lr_elementwise`` / ``weight_decay_elementwise``: ``[N]`` values (compute dtype) that
    replace the group's :math:`\eta` / :math:`\lambda` for every element, in every term
    that contains them (None or 0 elements: absent), as the fused op. ``elementwise``
    (this reference only): ``[N]`` values for ``beta1``, ``beta2`` and/or ``eps`` likewise;
    the bias corrections then become per element (:math:`\beta^t` with :math:`t` the
    segment's step count). A ``ValueError`` for any other name.

    Returns ``(params_out, exp_avg_out, exp_avg_sq_out, max_exp_avg_sq_out)``.
    """
    op = ADAM.name
    el = elementwise_values(op, elementwise, ADAM_ELEMENTWISE, params, check)
    layout = checked_layout(op, ADAM, (params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq),
                            segments, (lr, beta1, beta2, eps, weight_decay), group_flags,
                            (lr_elementwise, weight_decay_elementwise), check)
    f = _adam_forward_math(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, layout, lr,
                           beta1, beta2, eps, weight_decay, group_flags, lr_elementwise,
                           weight_decay_elementwise, el)
    act = layout.active
    p_new = torch.where(act, f["p0"] - f["c"] * f["m_new"] / f["d"], f["p"])
    m_out = torch.where(act, f["m_new"], f["m"])
    v_out = torch.where(act, f["v_new"], f["v"])
    if f["has_max"]:
        vmax_out = torch.where(f["amsgrad"], f["u"], f["vmax"]).to(params.dtype)
    else:
        vmax_out = max_exp_avg_sq.new_empty(0)
    dt = params.dtype
    return p_new.to(dt), m_out.to(dt), v_out.to(dt), vmax_out


def adam_step_backward(grad_params_out: Tensor, grad_exp_avg_out: Tensor,
                       grad_exp_avg_sq_out: Tensor, grad_max_exp_avg_sq_out: Tensor,
                       params: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                       max_exp_avg_sq: Tensor, segments: Tensor, lr: Tensor, beta1: Tensor,
                       beta2: Tensor, eps: Tensor, weight_decay: Tensor, group_flags: Tensor,
                       hyper_grad_mask: int = 127, lr_elementwise: Tensor | None = None,
                       weight_decay_elementwise: Tensor | None = None, *,
                       check: bool = True) -> tuple[Tensor, ...]:
    r"""Vector-Jacobian product of :func:`adam_step` (formulas in ``docs/ops.md``).

    :math:`\partial\sqrt{u}/\partial u` is taken as 0 where :math:`u = 0`, as higher does.

    Returns ``(grad_params, grad_grads, grad_exp_avg, grad_exp_avg_sq,
    grad_max_exp_avg_sq, grad_lr, grad_beta1, grad_beta2, grad_eps, grad_weight_decay,
    grad_lr_elementwise, grad_weight_decay_elementwise)``; the last two are ``[N]`` (0 on
    inactive segments), or 0 elements when that per-element hyperparameter is absent or
    its bit (32, 64) in ``hyper_grad_mask`` is clear. A ``[G]`` hyperparameter given per
    element gets a zero gradient.
    """
    op = ADAM.backward_name
    layout = checked_layout(op, ADAM, (params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq),
                            segments, (lr, beta1, beta2, eps, weight_decay), group_flags,
                            (lr_elementwise, weight_decay_elementwise), check,
                            (grad_params_out, grad_exp_avg_out, grad_exp_avg_sq_out,
                             grad_max_exp_avg_sq_out))
    n = params.numel()
    f = _adam_forward_math(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, layout, lr,
                           beta1, beta2, eps, weight_decay, group_flags, lr_elementwise,
                           weight_decay_elementwise)
    act, p = layout.active, f["p"]
    P = zeros_or(grad_params_out, n, p)
    M = zeros_or(grad_exp_avg_out, n, p)
    V = zeros_or(grad_exp_avg_sq_out, n, p)
    d, c, m_new, s, r = f["d"], f["c"], f["m_new"], f["s"], f["r"]
    Q = P * c * m_new / (d * d)
    Mt = M - P * c / d
    ds = torch.where(f["pos"], 0.5 / torch.where(f["pos"], s, 1), 0)
    U = Q * r * ds
    if f["has_max"]:
        X = zeros_or(grad_max_exp_avg_sq_out, n, p)
        ams = f["amsgrad"]
        Ux = U + X
        vmax, v_new = f["vmax"], f["v_new"]
        share_v = torch.where(v_new > vmax, 1.0, torch.where(v_new == vmax, 0.5, 0.0)).to(p.dtype)
        Vt = V + torch.where(ams, Ux * share_v, U)
        grad_vmax = torch.where(ams, Ux * (1 - share_v), X)
        grad_vmax_out = torch.where(act, grad_vmax, X).to(params.dtype)
    else:
        Vt = V + U
        grad_vmax_out = max_exp_avg_sq.new_empty(0)
    g2, b1, b2, wd_e, lr_e = f["g2"], f["b1"], f["b2"], f["wd_e"], f["lr_e"]
    dec = f["decoupled"]
    G2 = Mt * f["omb1"] + Vt * f["omb2"] * 2 * g2
    grad_p = torch.where(dec, P * f["decay"], add_scaled(P, wd_e, G2))
    grad_p = torch.where(act, grad_p, P)
    grad_g = torch.where(act, torch.where(f["maximize"], -G2, G2), 0)
    grad_m = torch.where(act, Mt * b1, M)
    grad_v = torch.where(act, Vt * b2, V)
    bc1, bc2, dbc1, dbc2 = f["bc1"], f["bc2"], f["dbc1"], f["dbc2"]
    terms = dict(
        lr=lambda: P * (-m_new / (bc1 * d)) - torch.where(dec, P * wd_e * p, 0),
        beta1=lambda: Mt * (f["m"] - g2) - P * (m_new / d) * lr_e * dbc1 / (bc1 * bc1),
        beta2=lambda: Vt * (f["v"] - g2 * g2) + Q * (0.5 * s * bc2 ** (-1.5)) * dbc2,
        eps=lambda: Q,
        weight_decay=lambda: torch.where(dec, -P * lr_e * p, G2 * p),
    )
    given = dict(zip(ELEMENTWISE_HYPER, (f["has_lr_e"], f["has_wd_e"])))
    dt = params.dtype
    return (
        grad_p.to(dt),
        grad_g.to(dt),
        grad_m.to(dt),
        grad_v.to(dt),
        grad_vmax_out,
        *hyper_grads(ADAM, terms, given, hyper_grad_mask, layout, lr, p),
    )
