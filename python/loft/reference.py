"""The fused ops' math in plain PyTorch.

Same names and argument names as ``torch.ops.loft.*`` (see ``docs/ops.md`` for the
contract). This module is three things at once:

- the **fallback** when the C++ ops cannot be built (``loft.backend() == "reference"``),
- the **test oracle** the fused kernels are compared against,
- the **benchmark baseline** "loft reference" (pure PyTorch over flat buffers).

Every function here is written with differentiable PyTorch ops, so the backward
functions double as the derivative used under ``create_graph=True`` (double backward).
Per-element work is vectorised over the whole bucket: per-group and per-segment values
are gathered out to the elements, and inactive segments are masked with ``torch.where``
(after sanitising their inputs so that no NaN can leak through a masked branch).

The arithmetic rounds where the kernels round (``docs/ops.md``, "Rounding"): scalars
derived from the hyperparameters in float64 then cast once, a fused multiply-add
(``torch.addcmul``, ``torch.lerp``) exactly where torch.optim's own ops fuse one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "sgd_step",
    "sgd_step_backward",
    "adam_step",
    "adam_step_backward",
    "SGD_MAXIMIZE",
    "SGD_NESTEROV",
    "SGD_MOMENTUM",
    "ADAM_MAXIMIZE",
    "ADAM_AMSGRAD",
    "ADAM_DECOUPLED",
    "SEGMENT_COLUMNS",
    "SGD_ELEMENTWISE",
    "ADAM_ELEMENTWISE",
]

# group_flags bits (docs/ops.md).
SGD_MAXIMIZE = 1
SGD_NESTEROV = 2
SGD_MOMENTUM = 4
ADAM_MAXIMIZE = 1
ADAM_AMSGRAD = 2
ADAM_DECOUPLED = 4

#: Columns of a segment table row.
SEGMENT_COLUMNS = ("offset", "numel", "group", "step", "active")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Layout(NamedTuple):
    group: Tensor  # [N] int64, group of each element
    active: Tensor  # [N] bool
    first: Tensor  # [N] bool, the segment had no update before (step == 0)
    num_groups: int
    numels: Tensor  # [S] int64
    seg_group: Tensor  # [S] int64
    seg_t: Tensor  # [S] float64: t = step + 1, the step count after an update
    # True: every segment has the same group, step and active flag, and group, active
    # and first hold that one value ([1], broadcast against the elements).
    uniform: bool = False

    def per_segment(self, values: Tensor, dtype: torch.dtype) -> Tensor:
        """Expand a [S] per-segment value to the elements, cast to ``dtype``."""
        if self.uniform:
            return values[:1].to(dtype)
        n = int(self.group.numel())
        return torch.repeat_interleave(values.to(dtype), self.numels, output_size=n)


def _check_inputs(op: str, buffers: dict[str, Tensor], optional: str,
                  hyper: dict[str, Tensor], group_flags: Tensor,
                  upstream: dict[str, Tensor] | None = None) -> None:
    """The C++ ops' checks on buffers, hyperparameters and flags (segments: :func:`_layout`)."""
    params = buffers["params"]
    if params.dim() != 1:
        raise RuntimeError(f"{op}: params must be 1-D, got shape {list(params.shape)}")
    if params.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(f"{op}: params must be float64, float32, float16 or bfloat16, "
                           f"got {params.dtype}")
    n = params.numel()
    for name, t in list(buffers.items()) + list((upstream or {}).items()):
        allowed = (n, 0) if (name == optional or name.endswith("_out")) else (n,)
        if t.dim() != 1 or t.numel() not in allowed:
            raise RuntimeError(f"{op}: {name} must be 1-D with {n} elements"
                               + (" or 0" if len(allowed) > 1 else "")
                               + f", got shape {list(t.shape)}")
        if t.dtype != params.dtype:
            raise RuntimeError(f"{op}: {name} must have dtype {params.dtype}, got {t.dtype}")
        if t.device != params.device:
            raise RuntimeError(f"{op}: {name} must be on {params.device}, got {t.device}")
        if not t.is_contiguous():
            raise RuntimeError(f"{op}: {name} must be contiguous")
    hdt = compute_dtype(params.dtype)
    if group_flags.dim() != 1 or group_flags.dtype != torch.int64:
        raise RuntimeError(f"{op}: group_flags must be a 1-D int64 tensor, got "
                           f"{group_flags.dtype} of shape {list(group_flags.shape)}")
    g = group_flags.numel()
    # The [G] hyperparameters share one dtype, lr's: the compute dtype or float64.
    lr_dtype = hyper["lr"].dtype
    if lr_dtype not in (hdt, torch.float64):
        raise RuntimeError(f"{op}: lr must have dtype {hdt} or torch.float64 for "
                           f"{params.dtype} params, got {lr_dtype}")
    for name, t in hyper.items():
        if t.dim() != 1 or t.numel() != g:
            raise RuntimeError(f"{op}: {name} must be 1-D with {g} elements (one per group, "
                               f"as group_flags), got shape {list(t.shape)}")
        if t.dtype != lr_dtype:
            raise RuntimeError(f"{op}: {name} must have dtype {lr_dtype} (the dtype of lr), "
                               f"got {t.dtype}")
        if t.device != params.device:
            raise RuntimeError(f"{op}: {name} must be on {params.device}, got {t.device}")
    if group_flags.device != params.device:
        raise RuntimeError(f"{op}: group_flags must be on {params.device}, got "
                           f"{group_flags.device}")
    if g and bool((group_flags & ~7).any()):
        raise RuntimeError(f"{op}: group_flags may only use bits 1, 2 and 4, got "
                           f"{group_flags.tolist()}")


def _present(t: Tensor | None) -> bool:
    """Whether an optional per-element hyperparameter is given (None or 0 elements: no)."""
    return t is not None and t.numel() > 0


def _check_elementwise(op: str, name: str, t: Tensor | None, params: Tensor) -> None:
    """A per-element hyperparameter, as the C++ ops check it: absent, or 1-D, contiguous,
    ``params.numel()`` elements of the compute dtype on the device of params."""
    if not _present(t):
        return
    assert t is not None
    n, want = params.numel(), compute_dtype(params.dtype)
    if t.dim() != 1 or t.numel() != n:
        raise RuntimeError(f"{op}: {name} must be 1-D with {n} elements (one per element of "
                           f"params) or 0 (none), got shape {list(t.shape)}")
    if t.dtype != want:
        raise RuntimeError(f"{op}: {name} must have dtype {want} for {params.dtype} params, "
                           f"got {t.dtype}")
    if t.device != params.device:
        raise RuntimeError(f"{op}: {name} must be on {params.device}, got {t.device}")
    if not t.is_contiguous():
        raise RuntimeError(f"{op}: {name} must be contiguous")


def _elementwise_values(op: str, elementwise: Mapping[str, Tensor] | None,
                        allowed: tuple[str, ...], params: Tensor,
                        check: bool) -> dict[str, Tensor]:
    """The reference-only per-element values of the hyperparameters other than lr and
    weight_decay (``elementwise=``), checked by name and, with ``check``, by shape."""
    if not elementwise:
        return {}
    for name in elementwise:
        if name in ("lr", "weight_decay"):
            raise ValueError(f"{op}: elementwise may not hold {name!r}; pass it as "
                             f"{name}_elementwise (the fused ops take it)")
        if name not in allowed:
            raise ValueError(f"{op}: elementwise names an unknown hyperparameter {name!r}; "
                             f"expected one of {', '.join(allowed)}")
    if check:
        for name, t in elementwise.items():
            _check_elementwise(op, f"elementwise[{name!r}]", t, params)
    return {k: v for k, v in elementwise.items() if _present(v)}


def _layout(op: str, params: Tensor, segments: Tensor, group_flags: Tensor,
            check: bool = True, broadcast: bool = False) -> _Layout:
    """Check the segment table (as the C++ ops do) and expand it to the elements.

    ``check=False`` skips the data-dependent checks (inputs already validated), which
    also lets the function be traced with symbolic shapes.
    """
    n = params.numel()
    if (segments.dim() != 2 or segments.size(1) != 5 or segments.dtype != torch.int64
            or segments.device != params.device):
        raise RuntimeError(
            f"{op}: segments must be an int64 tensor of shape [S, 5] on {params.device}, got "
            f"{segments.dtype} of shape {list(segments.shape)} on {segments.device}"
        )
    if check and not segments.is_contiguous():
        raise RuntimeError(f"{op}: segments must be contiguous")
    g = group_flags.numel()
    offsets, numels, groups, steps, active = segments.unbind(1)
    if check and segments.size(0) > 0:
        starts = torch.cat([numels.new_zeros(1), numels.cumsum(0)[:-1]])
        if (
            bool((numels < 0).any())
            or not bool((offsets == starts).all())
            or int(numels.sum()) != n
        ):
            raise RuntimeError(
                f"{op}: segments must tile the {n} elements of params in order "
                "(offsets 0, numel_0, numel_0 + numel_1, ...)"
            )
        if bool((groups < 0).any()) or bool((groups >= g).any()):
            raise RuntimeError(f"{op}: segments group column must lie in [0, {g})")
        if bool((steps < 0).any()):
            raise RuntimeError(f"{op}: segments step column must be >= 0")
        if bool(((active != 0) & (active != 1)).any()):
            raise RuntimeError(f"{op}: segments active column must be 0 or 1")
    elif check and n != 0:
        raise RuntimeError(f"{op}: segments must tile the {n} elements of params in order")
    seg_t = (steps + 1).to(torch.float64)
    if broadcast and segments.size(0) > 0 and _concrete(segments) and bool(
            (segments[:, 2:] == segments[:1, 2:]).all()):
        # The usual step (one group, every tensor active, one step count): one value
        # for all elements instead of [N] expansions (the fallback's main cost).
        return _Layout(groups[:1], active[:1].bool(), steps[:1] == 0, g, numels, groups,
                       seg_t, uniform=True)
    group_el = torch.repeat_interleave(groups, numels, output_size=n)
    active_el = torch.repeat_interleave(active, numels, output_size=n).bool()
    first_el = torch.repeat_interleave(steps == 0, numels, output_size=n)
    return _Layout(group_el, active_el, first_el, g, numels, groups, seg_t)


def _concrete(t: Tensor) -> bool:
    """Whether ``t`` holds real values that may be read: a plain tensor, not a tracing
    subclass (fake or functional tensors) and not under torch.compile."""
    return (type(t) is torch.Tensor and t.device.type != "meta"
            and not torch.compiler.is_compiling())


def _flag(group_flags: Tensor, layout: _Layout, bit: int) -> Tensor:
    return (group_flags[layout.group] & bit) != 0


def _zeros_or(t: Tensor, n: int, like: Tensor) -> Tensor:
    """An upstream gradient: 0 elements mean zero."""
    return t.to(like.dtype) if t.numel() == n and n > 0 else torch.zeros_like(like)


def _group_sum(values: Tensor, layout: _Layout, mask: Tensor, hyper: Tensor) -> Tensor:
    """Sum ``values`` over the active elements of each group, in float64."""
    acc = torch.zeros(layout.num_groups, dtype=torch.float64, device=values.device)
    masked = torch.where(mask, values, 0).double()
    if layout.uniform:
        masked = masked.sum().reshape(1)
    acc = acc.index_add(0, layout.group, masked)
    return acc.to(hyper.dtype)


def _add_scaled(y: Tensor, a: Tensor, x: Tensor) -> Tensor:
    """``y + a * x`` (the product rounded, as higher's ``g + weight_decay * p``), and
    exactly ``y`` where ``a == 0`` (torch.optim skips a zero weight decay, so an infinite
    or NaN ``x`` must not make ``y`` NaN through ``0 * x``), as the kernels'
    ``loft_add_scaled``. The derivative in ``a`` stays ``x`` where it is finite."""
    return y + a * torch.where((a == 0) & ~torch.isfinite(x), 0, x)


def _add_scaled_fused(y: Tensor, a: Tensor, x: Tensor) -> Tensor:
    """:func:`_add_scaled` rounded once (``torch.addcmul``, a fused multiply-add on the CPU),
    as torch.optim.Adam's ``grad.add(param, alpha=weight_decay)`` and the kernels'
    ``loft_add_scaled_fused``."""
    return torch.addcmul(y, a, torch.where((a == 0) & ~torch.isfinite(x), 0, x))


def _per_element(values: Tensor, layout: _Layout, ct: torch.dtype) -> Tensor:
    """A [G] hyperparameter (or a value derived from it, computed in its dtype) gathered
    out to the elements and cast once to the compute dtype ``ct``."""
    return values[layout.group].to(ct)


def _elementwise_grad(present: bool, wanted: bool, term, act: Tensor, like: Tensor) -> Tensor:
    """The gradient of a per-element hyperparameter: ``term()`` on the active elements and 0
    on the others, or 0 elements when the hyperparameter is absent or not wanted."""
    if not (present and wanted):
        return like.new_empty(0)
    return torch.where(act, term(), torch.zeros_like(like)).contiguous()


def _check_optional(op: str, name: str, t: Tensor, n: int, needed: Tensor) -> None:
    if t.numel() not in (0, n):
        raise RuntimeError(f"{op}: {name} must have {n} or 0 elements, got {t.numel()}")
    if t.numel() == 0 and n > 0 and bool(needed.any()):
        raise RuntimeError(f"{op}: {name} has 0 elements but a group that needs it is active")


# --------------------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------------------

SGD_ELEMENTWISE = ("momentum", "dampening")


def _sgd_forward_math(params, grads, momentum_buffer, layout, lr, momentum, dampening,
                      weight_decay, group_flags, lr_elementwise=None,
                      weight_decay_elementwise=None, elementwise=None):
    ct = compute_dtype(params.dtype)
    act = layout.active
    el = elementwise or {}
    p = params.to(ct)
    g = torch.where(act, grads.to(ct), 0)
    has_lr_e, has_wd_e = _present(lr_elementwise), _present(weight_decay_elementwise)
    lr_e = lr_elementwise if has_lr_e else _per_element(lr, layout, ct)
    wd_e = weight_decay_elementwise if has_wd_e else _per_element(weight_decay, layout, ct)
    maximize = _flag(group_flags, layout, SGD_MAXIMIZE)
    nesterov = _flag(group_flags, layout, SGD_NESTEROV)
    use_mom = _flag(group_flags, layout, SGD_MOMENTUM) & act
    g2 = _add_scaled(torch.where(maximize, -g, g), wd_e, p)
    has_buf = momentum_buffer.numel() > 0
    if has_buf:
        mom_e = el["momentum"] if "momentum" in el else _per_element(momentum, layout, ct)
        # 1 - dampening in the hyperparameter's dtype, then cast: one rounding, as the
        # kernels' float64 scalar and higher's Python-number `1 - dampening`.
        omd_e = 1 - el["dampening"] if "dampening" in el else _per_element(1 - dampening,
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


def sgd_step(
    params: Tensor,
    grads: Tensor,
    momentum_buffer: Tensor,
    segments: Tensor,
    lr: Tensor,
    momentum: Tensor,
    dampening: Tensor,
    weight_decay: Tensor,
    group_flags: Tensor,
    lr_elementwise: Tensor | None = None,
    weight_decay_elementwise: Tensor | None = None,
    *,
    elementwise: Mapping[str, Tensor] | None = None,
    check: bool = True,
) -> tuple[Tensor, Tensor]:
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
    op = "sgd_step"
    el = _elementwise_values(op, elementwise, SGD_ELEMENTWISE, params, check)
    if check:
        _check_inputs(op, dict(params=params, grads=grads, momentum_buffer=momentum_buffer),
                      "momentum_buffer", dict(lr=lr, momentum=momentum, dampening=dampening,
                                              weight_decay=weight_decay), group_flags)
        _check_elementwise(op, "lr_elementwise", lr_elementwise, params)
        _check_elementwise(op, "weight_decay_elementwise", weight_decay_elementwise, params)
    layout = _layout(op, params, segments, group_flags, check, broadcast=True)
    n = params.numel()
    if check:
        _check_optional(op, "momentum_buffer", momentum_buffer, n,
                        _flag(group_flags, layout, SGD_MOMENTUM) & layout.active)
    f = _sgd_forward_math(params, grads, momentum_buffer, layout, lr, momentum, dampening,
                          weight_decay, group_flags, lr_elementwise, weight_decay_elementwise,
                          el)
    p_new = torch.where(layout.active, f["p"] - f["lr_e"] * f["d"], f["p"])
    b_out = f["b_new"].to(params.dtype) if f["has_buf"] else momentum_buffer.new_empty(0)
    return p_new.to(params.dtype), b_out


def sgd_step_backward(
    grad_params_out: Tensor,
    grad_momentum_buffer_out: Tensor,
    params: Tensor,
    grads: Tensor,
    momentum_buffer: Tensor,
    segments: Tensor,
    lr: Tensor,
    momentum: Tensor,
    dampening: Tensor,
    weight_decay: Tensor,
    group_flags: Tensor,
    hyper_grad_mask: int = 63,
    lr_elementwise: Tensor | None = None,
    weight_decay_elementwise: Tensor | None = None,
    *,
    check: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Vector-Jacobian product of :func:`sgd_step` (formulas in ``docs/ops.md``).

    Returns ``(grad_params, grad_grads, grad_momentum_buffer, grad_lr, grad_momentum,
    grad_dampening, grad_weight_decay, grad_lr_elementwise, grad_weight_decay_elementwise)``;
    the last two are ``[N]`` (0 on inactive segments), or 0 elements when that
    per-element hyperparameter is absent or its bit (16, 32) in ``hyper_grad_mask`` is
    clear. A ``[G]`` hyperparameter given per element gets a zero gradient.
    """
    op = "sgd_step_backward"
    if check:
        _check_inputs(op, dict(params=params, grads=grads, momentum_buffer=momentum_buffer),
                      "momentum_buffer", dict(lr=lr, momentum=momentum, dampening=dampening,
                                              weight_decay=weight_decay), group_flags,
                      dict(grad_params_out=grad_params_out,
                           grad_momentum_buffer_out=grad_momentum_buffer_out))
        _check_elementwise(op, "lr_elementwise", lr_elementwise, params)
        _check_elementwise(op, "weight_decay_elementwise", weight_decay_elementwise, params)
    layout = _layout(op, params, segments, group_flags, check, broadcast=True)
    n = params.numel()
    if check:
        _check_optional(op, "momentum_buffer", momentum_buffer, n,
                        _flag(group_flags, layout, SGD_MOMENTUM) & layout.active)
    f = _sgd_forward_math(params, grads, momentum_buffer, layout, lr, momentum, dampening,
                          weight_decay, group_flags, lr_elementwise, weight_decay_elementwise)
    act, p, g2 = layout.active, f["p"], f["g2"]
    P = _zeros_or(grad_params_out, n, p)
    D = -f["lr_e"] * P
    if f["has_buf"]:
        B = _zeros_or(grad_momentum_buffer_out, n, p)
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
    grad_p = torch.where(act, _add_scaled(P, f["wd_e"], G2), P)
    grad_g = torch.where(act, torch.where(f["maximize"], -G2, G2), 0)

    def hyper(bit: int, values_fn, replaced: bool = False) -> Tensor:
        if replaced or not hyper_grad_mask & bit:
            return torch.zeros_like(lr)
        return _group_sum(values_fn(), layout, act, lr)

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
    lr_fn = lambda: P * -f["d"]  # noqa: E731
    wd_fn = lambda: G2 * p  # noqa: E731
    return (
        grad_p.to(params.dtype),
        grad_g.to(params.dtype),
        grad_b_out,
        hyper(1, lr_fn, f["has_lr_e"]),
        hyper(2, grad_mom_fn),
        hyper(4, grad_damp_fn),
        hyper(8, wd_fn, f["has_wd_e"]),
        _elementwise_grad(f["has_lr_e"], bool(hyper_grad_mask & 16), lr_fn, act, p),
        _elementwise_grad(f["has_wd_e"], bool(hyper_grad_mask & 32), wd_fn, act, p),
    )


# --------------------------------------------------------------------------------------
# Adam / AdamW
# --------------------------------------------------------------------------------------

ADAM_ELEMENTWISE = ("beta1", "beta2", "eps")


def _adam_forward_math(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, layout, lr, beta1,
                       beta2, eps, weight_decay, group_flags, lr_elementwise=None,
                       weight_decay_elementwise=None, elementwise=None):
    ct = compute_dtype(params.dtype)
    f64 = torch.float64
    act = layout.active
    grp = layout.group
    el = elementwise or {}
    p = params.to(ct)
    g = torch.where(act, grads.to(ct), 0)
    m, v = exp_avg.to(ct), exp_avg_sq.to(ct)
    has_lr_e, has_wd_e = _present(lr_elementwise), _present(weight_decay_elementwise)
    lr_e = lr_elementwise if has_lr_e else _per_element(lr, layout, ct)
    wd_e = weight_decay_elementwise if has_wd_e else _per_element(weight_decay, layout, ct)
    b1 = el["beta1"] if "beta1" in el else _per_element(beta1, layout, ct)
    b2 = el["beta2"] if "beta2" in el else _per_element(beta2, layout, ct)
    eps_e = el["eps"] if "eps" in el else _per_element(eps, layout, ct)
    # 1 - beta in the hyperparameter's dtype, then cast: one rounding, as the kernels.
    omb1 = 1 - el["beta1"] if "beta1" in el else _per_element(1 - beta1, layout, ct)
    omb2 = 1 - el["beta2"] if "beta2" in el else _per_element(1 - beta2, layout, ct)
    maximize = _flag(group_flags, layout, ADAM_MAXIMIZE)
    amsgrad = _flag(group_flags, layout, ADAM_AMSGRAD) & act
    decoupled = _flag(group_flags, layout, ADAM_DECOUPLED)

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
        decay = _per_element(1 - lr.to(f64) * weight_decay.to(f64), layout, ct)

    g1 = torch.where(maximize, -g, g)
    # torch.optim.Adam's grad.add(param, alpha=weight_decay): one rounding.
    g2 = torch.where(decoupled, g1, _add_scaled_fused(g1, wd_e, p))
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


def adam_step(
    params: Tensor,
    grads: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor,
    segments: Tensor,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    group_flags: Tensor,
    lr_elementwise: Tensor | None = None,
    weight_decay_elementwise: Tensor | None = None,
    *,
    elementwise: Mapping[str, Tensor] | None = None,
    check: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
    op = "adam_step"
    el = _elementwise_values(op, elementwise, ADAM_ELEMENTWISE, params, check)
    if check:
        _check_inputs(op, dict(params=params, grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                               max_exp_avg_sq=max_exp_avg_sq), "max_exp_avg_sq",
                      dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay),
                      group_flags)
        _check_elementwise(op, "lr_elementwise", lr_elementwise, params)
        _check_elementwise(op, "weight_decay_elementwise", weight_decay_elementwise, params)
    layout = _layout(op, params, segments, group_flags, check, broadcast=True)
    n = params.numel()
    if check:
        _check_optional(op, "max_exp_avg_sq", max_exp_avg_sq, n,
                        _flag(group_flags, layout, ADAM_AMSGRAD) & layout.active)
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


def adam_step_backward(
    grad_params_out: Tensor,
    grad_exp_avg_out: Tensor,
    grad_exp_avg_sq_out: Tensor,
    grad_max_exp_avg_sq_out: Tensor,
    params: Tensor,
    grads: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor,
    segments: Tensor,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    group_flags: Tensor,
    hyper_grad_mask: int = 127,
    lr_elementwise: Tensor | None = None,
    weight_decay_elementwise: Tensor | None = None,
    *,
    check: bool = True,
) -> tuple[Tensor, ...]:
    r"""Vector-Jacobian product of :func:`adam_step` (formulas in ``docs/ops.md``).

    :math:`\partial\sqrt{u}/\partial u` is taken as 0 where :math:`u = 0`, as higher does.

    Returns ``(grad_params, grad_grads, grad_exp_avg, grad_exp_avg_sq,
    grad_max_exp_avg_sq, grad_lr, grad_beta1, grad_beta2, grad_eps, grad_weight_decay,
    grad_lr_elementwise, grad_weight_decay_elementwise)``; the last two are ``[N]`` (0 on
    inactive segments), or 0 elements when that per-element hyperparameter is absent or
    its bit (32, 64) in ``hyper_grad_mask`` is clear. A ``[G]`` hyperparameter given per
    element gets a zero gradient.
    """
    op = "adam_step_backward"
    if check:
        _check_inputs(op, dict(params=params, grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                               max_exp_avg_sq=max_exp_avg_sq), "max_exp_avg_sq",
                      dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay),
                      group_flags,
                      dict(grad_params_out=grad_params_out, grad_exp_avg_out=grad_exp_avg_out,
                           grad_exp_avg_sq_out=grad_exp_avg_sq_out,
                           grad_max_exp_avg_sq_out=grad_max_exp_avg_sq_out))
        _check_elementwise(op, "lr_elementwise", lr_elementwise, params)
        _check_elementwise(op, "weight_decay_elementwise", weight_decay_elementwise, params)
    layout = _layout(op, params, segments, group_flags, check, broadcast=True)
    n = params.numel()
    if check:
        _check_optional(op, "max_exp_avg_sq", max_exp_avg_sq, n,
                        _flag(group_flags, layout, ADAM_AMSGRAD) & layout.active)
    f = _adam_forward_math(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, layout, lr,
                           beta1, beta2, eps, weight_decay, group_flags, lr_elementwise,
                           weight_decay_elementwise)
    act, p = layout.active, f["p"]
    P = _zeros_or(grad_params_out, n, p)
    M = _zeros_or(grad_exp_avg_out, n, p)
    V = _zeros_or(grad_exp_avg_sq_out, n, p)
    d, c, m_new, s, r = f["d"], f["c"], f["m_new"], f["s"], f["r"]
    Q = P * c * m_new / (d * d)
    Mt = M - P * c / d
    ds = torch.where(f["pos"], 0.5 / torch.where(f["pos"], s, 1), 0)
    U = Q * r * ds
    if f["has_max"]:
        X = _zeros_or(grad_max_exp_avg_sq_out, n, p)
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
    grad_p = torch.where(dec, P * f["decay"], _add_scaled(P, wd_e, G2))
    grad_p = torch.where(act, grad_p, P)
    grad_g = torch.where(act, torch.where(f["maximize"], -G2, G2), 0)
    grad_m = torch.where(act, Mt * b1, M)
    grad_v = torch.where(act, Vt * b2, V)
    bc1, bc2, dbc1, dbc2 = f["bc1"], f["bc2"], f["dbc1"], f["dbc2"]

    def hyper(bit: int, values_fn, replaced: bool = False) -> Tensor:
        if replaced or not hyper_grad_mask & bit:
            return torch.zeros_like(lr)
        return _group_sum(values_fn(), layout, act, lr)

    lr_fn = lambda: P * (-m_new / (bc1 * d)) - torch.where(dec, P * wd_e * p, 0)  # noqa: E731
    wd_fn = lambda: torch.where(dec, -P * lr_e * p, G2 * p)  # noqa: E731
    dt = params.dtype
    return (
        grad_p.to(dt),
        grad_g.to(dt),
        grad_m.to(dt),
        grad_v.to(dt),
        grad_vmax_out,
        hyper(1, lr_fn, f["has_lr_e"]),
        hyper(2, lambda: Mt * (f["m"] - g2)
              - P * (m_new / d) * lr_e * dbc1 / (bc1 * bc1)),
        hyper(4, lambda: Vt * (f["v"] - g2 * g2)
              + Q * (0.5 * s * bc2 ** (-1.5)) * dbc2),
        hyper(8, lambda: Q),
        hyper(16, wd_fn, f["has_wd_e"]),
        _elementwise_grad(f["has_lr_e"], bool(hyper_grad_mask & 32), lr_fn, act, p),
        _elementwise_grad(f["has_wd_e"], bool(hyper_grad_mask & 64), wd_fn, act, p),
    )
