"""Differentiable Adagrad, Adadelta, Adamax, ASGD, RMSprop and Rprop on flat buffers.

These optimisers have no fused kernel: each step is vectorised plain PyTorch over a whole
bucket (one flat buffer per quantity, as SGD and Adam), so autograd differentiates it
with respect to the old weights, the gradients, the optimiser state and every tensor
hyperparameter given through ``override``. The numbers are those of ``torch.optim``'s
single-tensor, non-capturable path (what torch runs on CPU), with per-tensor step
counts; a tensor that gets no gradient in a step keeps its weights, its state and its
step count exactly (as torch.optim and higher skip it).

Conventions shared by the six classes:

- per-group hyperparameters are ``[G]`` tensors gathered to the elements with
  ``hyper[name][layout.group]``; per-tensor scalars (learning-rate schedules, bias
  corrections, ASGD's eta and mu) are computed per segment in float64 and expanded with
  ``layout.per_segment``;
- elements of inactive segments are sanitised (zero gradient, denominators and square
  root arguments set to 1) *before* any division or square root, so that the branch that
  :func:`torch.where` masks out can never produce a NaN that a zero gradient multiplies;
- :math:`\\partial\\sqrt{v}/\\partial v` is taken as 0 where :math:`v = 0` (higher's
  rule, as loft's Adam), see :func:`_sqrt0`;
- float16/bfloat16 buffers compute in float32 and round once on store.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from loft import reference
from loft._contract import UnfusedFlag, compute_dtype
from loft.optim.engine import FlatOptimizer
from loft.optim.hyper import StepHyper

__all__ = [
    "DifferentiableAdagrad",
    "DifferentiableAdadelta",
    "DifferentiableAdamax",
    "DifferentiableASGD",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
]


def _sqrt0(u: Tensor) -> Tensor:
    """``sqrt(u)`` for ``u > 0`` and 0 elsewhere, with derivative 0 where ``u <= 0``.

    The argument of the square root is replaced by 1 where ``u <= 0`` so that the
    backward never evaluates ``1 / (2 sqrt(0))``.
    """
    pos = u > 0
    return torch.sqrt(torch.where(pos, u, 1)) * pos


def _flag(flags: Tensor, layout: Any, bit: int) -> Tensor:
    """The per-element boolean of a group flag bit."""
    return (flags[layout.group] & bit) != 0


class _ReferenceFlatOptimizer(FlatOptimizer):
    """A :class:`~loft.optim.engine.FlatOptimizer` whose step is plain differentiable PyTorch.

    Subclasses implement :meth:`_math` on the compute-dtype tensors; this class builds
    the layout, sanitises the gradient of inactive elements, applies ``maximize`` and
    casts the results back to the bucket dtype.
    """

    _op_name = "step"

    #: torch.optim's default of each hyperparameter a group may omit (``lr`` has none).
    _hyper_defaults: dict[str, float] = {}

    def _group_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's value of each of ``_hyper_names``, or torch.optim's default."""
        return {name: group.get(name, self._hyper_defaults[name])
                if name in self._hyper_defaults else group[name] for name in self._hyper_names}

    def _group_flags(self, group: dict[str, Any]) -> int:
        return int(UnfusedFlag.MAXIMIZE) if group.get("maximize", False) else 0

    def _reference_step(self, params, grads, state, segments, hyper, flags, elementwise):
        layout = reference.layout(self._op_name, params, segments, flags, check=False)
        ct = compute_dtype(params.dtype)
        act = layout.active
        p = params.to(ct)
        g = torch.where(act, grads.to(ct), 0)
        g = torch.where(_flag(flags, layout, UnfusedFlag.MAXIMIZE), -g, g)
        p_new, new_state = self._math(p, g, state, layout, segments,
                                      StepHyper(hyper, elementwise, layout), flags, ct)
        out_state = {name: value.to(state[name].dtype) for name, value in new_state.items()}
        return torch.where(act, p_new, p).to(params.dtype), out_state

    def _math(self, p: Tensor, g: Tensor, state: dict[str, Tensor], layout: Any,
              segments: Tensor, hyper: StepHyper, flags: Tensor,
              ct: torch.dtype) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class DifferentiableAdagrad(_ReferenceFlatOptimizer):
    r"""Differentiable ``torch.optim.Adagrad`` (higher's ``DifferentiableAdagrad``).

    Per tensor, with :math:`t` its step count after this update:

    .. math::
        g_2 = \pm g + \lambda p,\quad s' = s + g_2^2,\quad
        p' = p - \frac{\eta}{1 + (t - 1)\,\delta}\,\frac{g_2}{\sqrt{s'} + \epsilon}

    (:math:`\delta` = ``lr_decay``; :math:`s` starts at ``initial_accumulator_value``).
    Tensor hyperparameters: ``lr``, ``lr_decay``, ``weight_decay``, ``eps``.
    """

    _state_names = ("sum",)
    _hyper_names = ("lr", "lr_decay", "weight_decay", "eps")
    _op_name = "adagrad_step"

    _hyper_defaults = {"lr_decay": 0.0, "weight_decay": 0.0, "eps": 1e-10}

    def _default_state(self, name: str, group: dict[str, Any], shape: torch.Size,
                       b: Any) -> Tensor | None:
        # torch.optim.Adagrad creates its accumulator in __init__; fill it for a
        # parameter whose state is missing (an optimizer built some other way).
        value = float(group.get("initial_accumulator_value", 0.0))
        return torch.full(shape, value, dtype=b.dtype, device=b.device)

    def _math(self, p, g, state, layout, segments, hyper, flags, ct):
        act = layout.active
        g2 = g + hyper["weight_decay"] * p
        s = state["sum"].to(ct)
        s_new = s + g2 * g2
        std = _sqrt0(torch.where(act, s_new, 1)) + hyper["eps"]
        std = torch.where(act, std, 1)
        each = hyper.per_element("lr", "lr_decay")
        clr = hyper.to_elements(hyper.scalars("lr", each) / (
            1 + (hyper.steps(each) - 1) * hyper.scalars("lr_decay", each)), each, ct)
        p_new = p + (-clr) * g2 / std
        return p_new, {"sum": torch.where(act, s_new, s)}


class DifferentiableAdadelta(_ReferenceFlatOptimizer):
    r"""Differentiable ``torch.optim.Adadelta`` (higher's ``DifferentiableAdadelta``).

    .. math::
        g_2 = \pm g + \lambda p,\quad v' = \rho v + (1 - \rho) g_2^2,\quad
        \Delta = \frac{\sqrt{u + \epsilon}}{\sqrt{v' + \epsilon}}\,g_2,\quad
        u' = \rho u + (1 - \rho)\Delta^2,\quad p' = p - \eta\Delta

    (:math:`v` = ``square_avg``, :math:`u` = ``acc_delta``). Tensor hyperparameters:
    ``lr``, ``rho``, ``eps``, ``weight_decay``.
    """

    _state_names = ("square_avg", "acc_delta")
    _hyper_names = ("lr", "rho", "eps", "weight_decay")
    _op_name = "adadelta_step"

    _hyper_defaults = {"rho": 0.9, "eps": 1e-6, "weight_decay": 0.0}

    def _math(self, p, g, state, layout, segments, hyper, flags, ct):
        act = layout.active
        rho, eps = hyper["rho"], hyper["eps"]
        g2 = g + hyper["weight_decay"] * p
        v, u = state["square_avg"].to(ct), state["acc_delta"].to(ct)
        v_new = v * rho + (1 - rho) * g2 * g2
        std = torch.where(act, _sqrt0(torch.where(act, v_new + eps, 1)), 1)
        delta = _sqrt0(torch.where(act, u + eps, 1)) / std * g2
        u_new = u * rho + (1 - rho) * delta * delta
        p_new = p + (-hyper["lr"]) * delta
        return p_new, {"square_avg": torch.where(act, v_new, v),
                       "acc_delta": torch.where(act, u_new, u)}


class DifferentiableAdamax(_ReferenceFlatOptimizer):
    r"""Differentiable ``torch.optim.Adamax`` (higher's ``DifferentiableAdamax``).

    Per tensor, with :math:`t` its step count after this update:

    .. math::
        g_2 = \pm g + \lambda p,\quad m' = \mathrm{lerp}(m, g_2, 1 - \beta_1),\quad
        u' = \max(\beta_2 u, |g_2| + \epsilon),\quad
        p' = p - \frac{\eta}{1 - \beta_1^t}\,\frac{m'}{u'}

    (:math:`u` = ``exp_inf``). Tensor hyperparameters: ``lr``, ``betas`` (a tuple),
    ``eps``, ``weight_decay``.
    """

    _state_names = ("exp_avg", "exp_inf")
    _hyper_names = ("lr", "beta1", "beta2", "eps", "weight_decay")
    _hyper_keys = {"beta1": "betas[0]", "beta2": "betas[1]"}
    _op_name = "adamax_step"

    def _group_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        betas = group.get("betas", (0.9, 0.999))
        return {
            "lr": group["lr"],
            "beta1": betas[0],
            "beta2": betas[1],
            "eps": group.get("eps", 1e-8),
            "weight_decay": group.get("weight_decay", 0.0),
        }

    def _math(self, p, g, state, layout, segments, hyper, flags, ct):
        act = layout.active
        b1 = hyper["beta1"]
        g2 = g + hyper["weight_decay"] * p
        m, u = state["exp_avg"].to(ct), state["exp_inf"].to(ct)
        m_new = torch.lerp(m, g2, 1 - b1)
        u_new = torch.maximum(u * hyper["beta2"], g2.abs() + hyper["eps"])
        denom = torch.where(act, u_new, 1)
        each = hyper.per_element("lr", "beta1")
        clr = hyper.to_elements(hyper.scalars("lr", each) / (
            1 - hyper.scalars("beta1", each) ** hyper.steps(each)), each, ct)
        p_new = p + (-clr) * m_new / denom
        return p_new, {"exp_avg": torch.where(act, m_new, m),
                       "exp_inf": torch.where(act, u_new, u)}


class DifferentiableASGD(_ReferenceFlatOptimizer):
    r"""Differentiable ``torch.optim.ASGD`` (higher's ``DifferentiableASGD``).

    Per tensor, with its own :math:`\eta_t, \mu_t` (state, one value per tensor) and
    :math:`t` its step count after this update:

    .. math::
        g_2 = \pm g + \lambda_w p,\quad p' = (1 - \lambda\eta_t) p - \eta_t g_2,\quad
        a' = p' \text{ if } \mu_t = 1 \text{ else } a + \mu_t (p' - a) \\
        \eta_{t+1} = \frac{\eta}{(1 + \lambda\eta t)^\alpha},\quad
        \mu_{t+1} = \frac{1}{\max(1, t - t_0)}

    with :math:`\eta_1 = \eta` (``lr``), :math:`\mu_1 = 1` for a tensor's first update
    and :math:`a` = ``ax``. The state ``eta`` and ``mu`` are ``[S]`` tensors (one value
    per parameter tensor of the bucket) in the compute dtype, differentiable with respect
    to ``lr``, ``lambd``, ``alpha`` and ``t0``; a torch optimizer that already stepped
    hands its ``eta``/``mu`` over. Tensor hyperparameters: ``lr``, ``lambd``, ``alpha``,
    ``t0``, ``weight_decay``.

    torch.optim keeps ``eta`` and ``mu`` in ``torch.get_default_dtype()``'s scalar type
    (float32 unless the default dtype is float64) and rounds them there; loft computes
    them in the buffers' compute dtype, so float64 parameters match torch.optim to
    float64 rounding when the default dtype is float64, and to ~1e-8 relative otherwise.
    """

    _state_names = ("ax",)
    # A tensor without state (never stepped) takes lr and 1 at its first step.
    _segment_state_names = {"eta": 0.0, "mu": 1.0}
    _hyper_names = ("lr", "lambd", "alpha", "t0", "weight_decay")
    _op_name = "asgd_step"

    _hyper_defaults = {"lambd": 1e-4, "alpha": 0.75, "t0": 1e6, "weight_decay": 0.0}

    def _math(self, p, g, state, layout, segments, hyper, flags, ct):
        act = layout.active
        seg_first = segments[:, 3] == 0
        seg_active = segments[:, 4] != 0
        if hyper.per_element("lr", "lambd", "alpha", "t0"):
            raise ValueError(
                "DifferentiableASGD keeps eta and mu per tensor (as torch.optim and higher): "
                "lr, lambd, alpha and t0 must be numbers or one-element tensors (only "
                "weight_decay may be given per element)")
        lr_s, lambd_s = hyper.scalars("lr", False), hyper.scalars("lambd", False)
        eta_state, mu_state = state["eta"], state["mu"]
        eta_s = torch.where(seg_first, lr_s, eta_state.double())
        mu_s = torch.where(seg_first, 1, mu_state.double())
        eta, mu = layout.per_segment(eta_s, ct), layout.per_segment(mu_s, ct)
        g2 = g + hyper["weight_decay"] * p
        p_new = p * (1 - hyper["lambd"] * eta) + (-eta) * g2
        ax = state["ax"].to(ct)
        ax_new = torch.where(mu == 1, p_new, ax + (p_new - ax) * mu)
        t = layout.seg_t
        eta_next = lr_s / (1 + lambd_s * lr_s * t) ** hyper.scalars("alpha", False)
        mu_next = 1 / torch.clamp(t - hyper.scalars("t0", False), min=1)
        return p_new, {
            "ax": torch.where(act, ax_new, ax),
            "eta": torch.where(seg_active, eta_next, eta_state.double()).to(ct),
            "mu": torch.where(seg_active, mu_next, mu_state.double()).to(ct),
        }


class DifferentiableRMSprop(_ReferenceFlatOptimizer):
    r"""Differentiable ``torch.optim.RMSprop`` (higher's ``DifferentiableRMSprop``).

    .. math::
        g_2 = \pm g + \lambda p,\quad v' = \alpha v + (1 - \alpha) g_2^2,\quad
        \bar g' = \mathrm{lerp}(\bar g, g_2, 1 - \alpha) \text{ (centered)} \\
        d = \sqrt{v' - \bar g'^2} \text{ (centered) or } \sqrt{v'},\ \text{ plus } \epsilon \\
        b' = \mu b + g_2 / d,\ p' = p - \eta b' \text{ (momentum > 0)};\quad
        p' = p - \eta g_2 / d \text{ otherwise}

    Tensor hyperparameters: ``lr``, ``alpha``, ``eps``, ``weight_decay``, ``momentum``
    (whether momentum is used is the group's ``momentum > 0``, a mode). Where rounding
    makes :math:`v' - \bar g'^2` negative, torch.optim's square root gives NaN; loft
    takes it as 0.
    """

    _state_names = ("square_avg", "momentum_buffer", "grad_avg")
    _hyper_names = ("lr", "alpha", "eps", "weight_decay", "momentum")
    _op_name = "rmsprop_step"

    _hyper_defaults = {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0}

    def _group_flags(self, group: dict[str, Any]) -> int:
        flags = super()._group_flags(group)
        if group.get("centered", False):
            flags |= UnfusedFlag.RMSPROP_CENTERED
        momentum = group.get("momentum", 0.0)
        if bool((momentum > 0).any()) if isinstance(momentum, Tensor) else momentum > 0:
            flags |= UnfusedFlag.RMSPROP_MOMENTUM
        return int(flags)

    def _optional_needed(self, flags: list[int]) -> dict[str, bool]:
        return {"momentum_buffer": any(f & UnfusedFlag.RMSPROP_MOMENTUM for f in flags),
                "grad_avg": any(f & UnfusedFlag.RMSPROP_CENTERED for f in flags)}

    def _unused_state(self, flags: list[int]) -> set[str]:
        return {name for name, needed in self._optional_needed(flags).items() if not needed}

    def _math(self, p, g, state, layout, segments, hyper, flags, ct):
        act = layout.active
        n = p.numel()
        # A group may have switched momentum / centered on through ``override``.
        for name, needed in self._optional_needed(flags.tolist()).items():
            if needed and state[name].numel() == 0 and n > 0:
                state[name] = torch.zeros(n, dtype=state["square_avg"].dtype, device=p.device)
        alpha = hyper["alpha"]
        g2 = g + hyper["weight_decay"] * p
        v = state["square_avg"].to(ct)
        v_new = v * alpha + (1 - alpha) * g2 * g2
        out = {"square_avg": torch.where(act, v_new, v)}
        centered = _flag(flags, layout, UnfusedFlag.RMSPROP_CENTERED) & act
        if state["grad_avg"].numel() > 0:
            ga = state["grad_avg"].to(ct)
            ga_new = torch.lerp(ga, g2, 1 - alpha)
            radicand = torch.where(centered, v_new + (-1) * ga_new * ga_new, v_new)
            out["grad_avg"] = torch.where(centered, ga_new, ga)
        else:
            radicand = v_new
            out["grad_avg"] = state["grad_avg"]
        avg = _sqrt0(torch.where(act, radicand, 1)) + hyper["eps"]
        avg = torch.where(act, avg, 1)
        lr = hyper["lr"]
        p_plain = p + (-lr) * g2 / avg
        if state["momentum_buffer"].numel() > 0:
            use_mom = _flag(flags, layout, UnfusedFlag.RMSPROP_MOMENTUM) & act
            b = state["momentum_buffer"].to(ct)
            b_new = b * hyper["momentum"] + g2 / avg
            p_new = torch.where(use_mom, p + (-lr) * b_new, p_plain)
            out["momentum_buffer"] = torch.where(use_mom, b_new, b)
        else:
            p_new = p_plain
            out["momentum_buffer"] = state["momentum_buffer"]
        return p_new, out


class DifferentiableRprop(_ReferenceFlatOptimizer):
    r"""Differentiable ``torch.optim.Rprop`` (higher's ``DifferentiableRprop``).

    Per element, with :math:`s = \mathrm{sign}(g\,g_{prev})` (:math:`g` after
    ``maximize``):

    .. math::
        f = \eta_+ \ (s > 0),\ \eta_- \ (s < 0),\ 1 \ (s = 0),\quad
        \delta' = \mathrm{clamp}(f\,\delta, \delta_{min}, \delta_{max}) \\
        \tilde g = 0 \text{ if } s < 0 \text{ else } g,\quad
        p' = p - \mathrm{sign}(\tilde g)\,\delta',\quad g_{prev}' = \tilde g

    with the per-element step size :math:`\delta` = ``step_size`` starting at ``lr``.
    Differentiable with respect to ``lr``, ``etas`` and ``step_sizes`` (tuples; tensor
    entries allowed) through :math:`\delta`; the signs have zero derivative.
    """

    _state_names = ("prev", "step_size")
    _hyper_names = ("lr", "etaminus", "etaplus", "step_size_min", "step_size_max")
    _hyper_keys = {"etaminus": "etas[0]", "etaplus": "etas[1]",
                   "step_size_min": "step_sizes[0]", "step_size_max": "step_sizes[1]"}
    _op_name = "rprop_step"

    def _group_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        etas = group.get("etas", (0.5, 1.2))
        step_sizes = group.get("step_sizes", (1e-6, 50))
        return {
            "lr": group["lr"],
            "etaminus": etas[0],
            "etaplus": etas[1],
            "step_size_min": step_sizes[0],
            "step_size_max": step_sizes[1],
        }

    def _math(self, p, g, state, layout, segments, hyper, flags, ct):
        act = layout.active
        prev = state["prev"].to(ct)
        size = state["step_size"].to(ct)
        # A tensor's first update starts from step_size = lr (torch's state init).
        size_in = torch.where(layout.first, hyper["lr"], size)
        s = torch.sign(g * prev)
        factor = torch.where(s > 0, hyper["etaplus"],
                             torch.where(s < 0, hyper["etaminus"], 1))
        size_new = torch.clamp(size_in * factor, min=hyper["step_size_min"],
                               max=hyper["step_size_max"])
        g_kept = torch.where(s < 0, 0, g)
        p_new = p + (-1) * torch.sign(g_kept) * size_new
        return p_new, {"prev": torch.where(act, g_kept, prev),
                       "step_size": torch.where(act, size_new, size)}
