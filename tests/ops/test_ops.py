"""The fused ops against the reference: values, gradients, double gradients, opcheck, errors."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from loft import _contract, ops, reference

from ..conftest import DEVICES, DTYPES, assert_close

# The ops' names, buffers, hyperparameters and flags, from their contract.
from ._bad_op_args import ADAM, BUFFERS, HYPER, NEEDS_OPTIONAL, OPTIONAL, SGD

SIZE_SETS = [[0], [1], [7], [0, 1, 33, 5], [3, 0, 1000, 1, 4099], [2, 3]]


def make_case(op: str, sizes: list[int], dtype: torch.dtype, flags: list[int], *,
              seed: int = 0, device: str = "cpu", with_optional: bool | None = None,
              inactive_every: int = 3) -> dict[str, torch.Tensor]:
    """A random bucket: buffers, a segment table over ``sizes``, per-group hyperparameters.

    Segments alternate over the groups; every ``inactive_every``-th one gets no gradient;
    step counts are random (some 0, the first step).
    """
    gen = torch.Generator().manual_seed(seed)
    n, num_groups = sum(sizes), len(flags)
    hdt = reference.compute_dtype(dtype)

    def rand(*shape: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo)

    rows, off = [], 0
    for i, numel in enumerate(sizes):
        step = int(torch.randint(0, 4, (1,), generator=gen)) if i % 2 else 0
        active = 0 if (inactive_every and i % inactive_every == inactive_every - 1) else 1
        rows.append([off, numel, i % num_groups, step, active])
        off += numel
    case: dict[str, torch.Tensor] = {
        "params": torch.randn(n, generator=gen, dtype=torch.float64),
        "grads": torch.randn(n, generator=gen, dtype=torch.float64),
    }
    if with_optional is None:
        with_optional = any(f & NEEDS_OPTIONAL[op] for f in flags)
    if op == SGD:
        case["momentum_buffer"] = torch.randn(n if with_optional else 0, generator=gen,
                                              dtype=torch.float64)
    else:
        case["exp_avg"] = torch.randn(n, generator=gen, dtype=torch.float64) * 0.1
        case["exp_avg_sq"] = rand(n, lo=0.01, hi=0.5)
        case["max_exp_avg_sq"] = rand(n if with_optional else 0, lo=0.01, hi=0.5)
    case = {k: v.to(device=device, dtype=dtype) for k, v in case.items()}
    case["segments"] = torch.tensor(rows, dtype=torch.int64).reshape(-1, 5).to(device)
    if op == SGD:
        hyper = {"lr": rand(num_groups, lo=0.05, hi=0.5),
                 "momentum": rand(num_groups, lo=0.1, hi=0.9),
                 "dampening": rand(num_groups, lo=0.0, hi=0.5),
                 "weight_decay": rand(num_groups, lo=0.0, hi=0.1)}
    else:
        hyper = {"lr": rand(num_groups, lo=1e-3, hi=0.1),
                 "beta1": rand(num_groups, lo=0.5, hi=0.95),
                 "beta2": rand(num_groups, lo=0.8, hi=0.999),
                 "eps": rand(num_groups, lo=1e-3, hi=0.1),
                 "weight_decay": rand(num_groups, lo=0.0, hi=0.1)}
    for k, v in hyper.items():
        case[k] = v.to(device=device, dtype=hdt)
    case["group_flags"] = torch.tensor(flags, dtype=torch.int64, device=device)
    return case


def args_of(op: str, case: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return ([case[b] for b in BUFFERS[op]] + [case["segments"]]
            + [case[h] for h in HYPER[op]] + [case["group_flags"]])


def raw_op(op: str):
    return getattr(torch.ops.loft, op)


ALL_FLAGS = {SGD: list(range(8)), ADAM: list(range(8))}


def flag_pairs(op: str) -> list[tuple[int, int]]:
    """Two groups: every flag combination appears in group 0, paired with its complement."""
    return [(f, 7 - f) for f in ALL_FLAGS[op]]


# ---- forward and backward values ---------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_forward_matches_reference(op: str, dtype: torch.dtype, device: str, fused: None) -> None:
    for (flags, sizes) in itertools.product(flag_pairs(op), SIZE_SETS):
        case = make_case(op, sizes, dtype, list(flags), seed=hash((flags, tuple(sizes))) % 1000,
                         device=device)
        args = args_of(op, case)
        before = [a.clone() for a in args]
        got = raw_op(op)(*args)
        want = getattr(reference, op)(*args)
        for a, b in zip(args, before):
            assert torch.equal(a, b), "the forward wrote one of its inputs"
        for name, g, w in zip(["params"] + list(BUFFERS[op][2:]), got, want):
            assert g.dtype == dtype and g.shape == w.shape and g.is_contiguous()
            assert_close(g, w, dtype, f"{op} {name} flags={flags} sizes={sizes}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_backward_matches_reference(op: str, dtype: torch.dtype, device: str, fused: None) -> None:
    num_out = len(BUFFERS[op]) - 1
    for (flags, sizes) in itertools.product(flag_pairs(op), SIZE_SETS):
        case = make_case(op, sizes, dtype, list(flags), seed=7, device=device)
        args = args_of(op, case)
        n = case["params"].numel()
        gen = torch.Generator().manual_seed(11)
        upstream = []
        for k, out in enumerate(getattr(reference, op)(*args)):
            # Mix real upstream gradients with 0-element ones ("no gradient").
            if k == 1 and flags[0] % 2:
                upstream.append(out.new_empty(0))
            else:
                upstream.append(torch.randn(out.numel(), generator=gen,
                                            dtype=torch.float64).to(out))
        assert len(upstream) == num_out
        for mask in (2 ** len(HYPER[op]) - 1, 0b101):
            got = raw_op(op + "_backward")(*upstream, *args, mask)
            want = getattr(reference, op + "_backward")(*upstream, *args, mask)
            names = list(BUFFERS[op]) + list(HYPER[op])
            for name, g, w in zip(names, got, want):
                assert g.shape == w.shape and g.dtype == w.dtype, name
                rtol, atol = {torch.float64: (1e-10, 1e-12)}.get(dtype, (5e-3, 5e-3))
                if name in HYPER[op]:
                    # A sum over up to 5000 elements rounded from the buffer dtype.
                    scale = max(1.0, float(w.abs().max()))
                    torch.testing.assert_close(g.double(), w.double(), rtol=rtol,
                                               atol=atol * scale * max(1, n) ** 0.5,
                                               msg=f"{op} {name} flags={flags} sizes={sizes}")
                else:
                    assert_close(g, w, dtype, f"{op} grad {name} flags={flags} sizes={sizes}")


@pytest.mark.parametrize("op", [SGD, ADAM])
def test_reference_backward_is_autograd_of_reference_forward(op: str) -> None:
    """The explicit backward formulas equal autograd through the reference forward."""
    for flags in flag_pairs(op):
        case = make_case(op, [3, 1, 4, 2], torch.float64, list(flags), seed=3)
        args = args_of(op, case)
        leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        outs = getattr(reference, op)(*leaves)
        upstream = [torch.randn_like(o) for o in outs]
        pairs = [(o, u) for o, u in zip(outs, upstream) if o.numel()]
        want = torch.autograd.grad([o for o, _ in pairs], [x for x in leaves if x.requires_grad],
                                   [u for _, u in pairs], allow_unused=True)
        got = getattr(reference, op + "_backward")(*upstream, *args, 2 ** len(HYPER[op]) - 1)
        for g, w in zip(got, want):
            w = torch.zeros_like(g) if w is None else w
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", [SGD, ADAM])
def test_fused_is_deterministic(op: str, fused: None) -> None:
    case = make_case(op, [5000, 17, 30000], torch.float32, [7, 0], seed=5)
    args = args_of(op, case)
    upstream = [torch.randn(o.numel()).to(o) for o in raw_op(op)(*args)]
    first = raw_op(op + "_backward")(*upstream, *args, 31)
    for _ in range(3):
        again = raw_op(op + "_backward")(*upstream, *args, 31)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


# ---- gradcheck / gradgradcheck / opcheck ---------------------------------------------------


def _differentiable_inputs(op: str, case: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [a.detach().clone().requires_grad_(a.is_floating_point() and a.numel() > 0)
            for a in args_of(op, case)]


@pytest.mark.parametrize("op", [SGD, ADAM])
@pytest.mark.parametrize("flags", [(0, 7), (7, 0), (2, 5), (4, 3)], ids=str)
@pytest.mark.parametrize("entry", ["wrapper", "raw"])
def test_gradcheck_and_gradgradcheck(op: str, flags: tuple[int, int], entry: str,
                                     fused: None) -> None:
    """Float64 gradcheck and gradgradcheck with respect to every buffer and hyperparameter."""
    case = make_case(op, [3, 2, 1, 2], torch.float64, list(flags), seed=13)
    inputs = _differentiable_inputs(op, case)
    fn = getattr(ops, op) if entry == "wrapper" else raw_op(op)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("op", [SGD, ADAM])
def test_gradcheck_of_backward_op(op: str, fused: None) -> None:
    """The raw ``*_backward`` ops are differentiable too."""
    case = make_case(op, [2, 3, 1], torch.float64, [7, 2], seed=17)
    inputs = _differentiable_inputs(op, case)
    upstream = [torch.randn(o.numel(), dtype=torch.float64, requires_grad=True)
                for o in raw_op(op)(*[a.detach() for a in inputs])]
    mask = 2 ** len(HYPER[op]) - 1

    def fn(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return raw_op(op + "_backward")(*xs, mask)

    assert torch.autograd.gradcheck(fn, upstream + inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_opcheck(op: str, device: str, fused: None) -> None:
    case = make_case(op, [4, 0, 3], torch.float64, [7, 2], seed=19, device=device)
    inputs = _differentiable_inputs(op, case)
    with warnings.catch_warnings():
        # A missing autograd formula is only a warning in opcheck: make it a failure.
        warnings.simplefilter("error")
        torch.library.opcheck(raw_op(op), inputs)
        outs = raw_op(op)(*[a.detach() for a in inputs])
        upstream = [torch.randn_like(o) for o in outs]
        torch.library.opcheck(raw_op(op + "_backward"),
                              upstream + inputs + [2 ** len(HYPER[op]) - 1])


# ---- errors ---------------------------------------------------------------------------------


def _bad_cases(op: str) -> list[tuple[str, dict, str]]:
    """(description, replacement arguments, expected text in the message)."""
    n = 10
    return [
        ("short grads", {"grads": torch.zeros(n - 1, dtype=torch.float64)}, "grads"),
        ("wrong dtype", {"grads": torch.zeros(n, dtype=torch.float32)}, "grads"),
        ("2-D params", {"params": torch.zeros(2, 5, dtype=torch.float64)}, "params"),
        ("non-contiguous", {"grads": torch.zeros(2 * n, dtype=torch.float64)[::2]}, "grads"),
        ("segments past the end", {"segments": torch.tensor([[0, 4, 0, 0, 1], [4, 9, 0, 0, 1]])},
         "segments"),
        ("segments not tiling", {"segments": torch.tensor([[0, 4, 0, 0, 1], [5, 6, 0, 0, 1]])},
         "segments"),
        ("negative numel", {"segments": torch.tensor([[0, -2, 0, 0, 1], [-2, 12, 0, 0, 1]])},
         "segments"),
        ("group out of range", {"segments": torch.tensor([[0, 4, 2, 0, 1], [4, 6, 0, 0, 1]])},
         "group"),
        ("negative step", {"segments": torch.tensor([[0, 4, 0, -1, 1], [4, 6, 0, 0, 1]])},
         "step"),
        ("bad active", {"segments": torch.tensor([[0, 4, 0, 0, 2], [4, 6, 0, 0, 1]])}, "active"),
        ("segments dtype", {"segments": torch.tensor([[0, 4, 0, 0, 1], [4, 6, 0, 0, 1]],
                                                     dtype=torch.int32)}, "segments"),
        ("segments shape", {"segments": torch.zeros(2, 4, dtype=torch.int64)}, "segments"),
        ("lr size", {"lr": torch.zeros(3, dtype=torch.float64)}, "lr"),
        ("lr dtype", {"lr": torch.zeros(2, dtype=torch.float32)}, "lr"),
        ("flags size", {"group_flags": torch.zeros(1, dtype=torch.int64)}, "group_flags"),
        ("optional buffer missing",
         {OPTIONAL[op]: torch.zeros(0, dtype=torch.float64),
          "group_flags": torch.tensor([NEEDS_OPTIONAL[op], 0])}, OPTIONAL[op]),
        ("optional buffer size", {OPTIONAL[op]: torch.zeros(3, dtype=torch.float64)},
         OPTIONAL[op]),
    ]


@pytest.mark.parametrize("op", [SGD, ADAM])
def test_bad_input_raises_naming_the_argument(op: str, fused: None) -> None:
    for _what, replace, expected in _bad_cases(op):
        case = make_case(op, [4, 6], torch.float64, [0, 0], seed=1, with_optional=True)
        case.update(replace)
        args = args_of(op, case)
        for fn in (raw_op(op), getattr(reference, op)):
            with pytest.raises(RuntimeError, match=expected):
                fn(*args)
        upstream = [torch.zeros(10, dtype=torch.float64) for _ in BUFFERS[op][1:]]
        with pytest.raises(RuntimeError, match=expected):
            raw_op(op + "_backward")(*upstream, *args, 1)


@pytest.mark.parametrize("op", [SGD, ADAM])
def test_backward_rejects_bad_upstream(op: str, fused: None) -> None:
    case = make_case(op, [4, 6], torch.float64, [0, 0], seed=1, with_optional=True)
    upstream = [torch.zeros(10, dtype=torch.float64) for _ in BUFFERS[op][1:]]
    upstream[0] = torch.zeros(7, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="grad_params_out"):
        raw_op(op + "_backward")(*upstream, *args_of(op, case), 1)


def test_ops_are_registered(fused: None) -> None:
    for name in ("sgd_step", "sgd_step_backward", "adam_step", "adam_step_backward"):
        assert hasattr(torch.ops.loft, name)


@pytest.mark.parametrize("op", [SGD, ADAM])
@pytest.mark.parametrize("step", [0, 3])
@pytest.mark.parametrize("flags", [0, 1, 2, 3, 4, 5, 6, 7])
def test_reference_uniform_table_equals_the_expanded_layout(
        op: str, step: int, flags: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's broadcast path (one group, all active, one step count) gives what
    the per-element expansion gives, forward and backward with every hyperparameter."""
    sizes = [5, 1, 33, 4]
    case = make_case(op, sizes, torch.float64, [flags], seed=step + 10 * flags, inactive_every=0)
    case["segments"][:, 3] = step
    gen = torch.Generator().manual_seed(1)
    n_out = len(BUFFERS[op]) - 1
    upstream = [torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
                if case[b].numel() else case[b] for b in BUFFERS[op] if b != "grads"]
    forward = getattr(reference, op)
    backward = getattr(reference, op + "_backward")
    mask = (1 << len(HYPER[op])) - 1
    results = []
    for concrete in (True, False):
        monkeypatch.setattr(reference._layout, "_concrete", lambda t, c=concrete: c)
        outs = forward(*args_of(op, case))
        grads = backward(*upstream[:n_out], *args_of(op, case), mask)
        results.append([*outs, *grads])
    uniform, expanded = results
    assert len(uniform) == len(expanded)
    for a, b in zip(uniform, expanded):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


# ---- adam_step_: the state updated in place (CPU) ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_adam_equals_adam_step(dtype: torch.dtype, fused: None) -> None:
    """adam_step_ returns adam_step's new params bit for bit and leaves adam_step's new
    state in its state arguments; params and grads are not written."""
    for (flags, sizes) in itertools.product(flag_pairs(ADAM), SIZE_SETS):
        case = make_case(ADAM, sizes, dtype, list(flags), seed=hash((flags, tuple(sizes))) % 997)
        args = args_of(ADAM, case)
        want = raw_op(ADAM)(*args)
        state = [a.clone() for a in args[2:5]]
        params, grads = args[0].clone(), args[1].clone()
        got = raw_op("adam_step_")(params, grads, *state, *args[5:])
        assert torch.equal(params, args[0]) and torch.equal(grads, args[1])
        assert torch.equal(got, want[0]), f"params flags={flags} sizes={sizes}"
        for name, s, w in zip(BUFFERS[ADAM][2:], state, want[1:]):
            assert torch.equal(s, w), f"{name} flags={flags} sizes={sizes}"


def test_inplace_adam_opcheck(fused: None) -> None:
    case = make_case(ADAM, [3, 0, 40, 5], torch.float32, [0, 7], seed=3)
    torch.library.opcheck(torch.ops.loft.adam_step_.default, tuple(args_of(ADAM, case)),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("other", ["params", "grads", "exp_avg"])
def test_inplace_adam_rejects_shared_memory(other: str, fused: None) -> None:
    """A state buffer that shares memory with another argument would be read after it is
    written: refused, naming both."""
    case = make_case(ADAM, [4, 6], torch.float64, [4, 0], seed=1)
    args = args_of(ADAM, case)
    position = BUFFERS[ADAM].index(other)
    args[3] = args[position] if other != "exp_avg" else args[2][:]
    with pytest.raises(RuntimeError, match=f"exp_avg_sq is updated in place .* {other}"):
        raw_op("adam_step_")(*args)
    assert torch.equal(args[0], case["params"])


# ---- per-element lr and weight_decay (Meta-SGD) ---------------------------------------------

ELEMENTWISE = _contract.ELEMENTWISE
#: Which per-element hyperparameters a case gives.
ELEMENTWISE_SETS = [("lr",), ("weight_decay",), ("lr", "weight_decay")]


def element_groups(case: dict[str, torch.Tensor]) -> torch.Tensor:
    """The group of every element of a case's bucket."""
    seg = case["segments"].cpu()
    return torch.repeat_interleave(seg[:, 2], seg[:, 1]).to(case["params"].device)


def add_elementwise(case: dict[str, torch.Tensor], which: tuple[str, ...], *, seed: int = 0,
                    constant: bool = False) -> dict[str, torch.Tensor]:
    """``case`` with per-element ``<name>_elementwise`` ([N], compute dtype) for each name
    in ``which``: random values (a weight decay exactly 0 on about a quarter of the
    elements), or, with ``constant``, each element's group value."""
    case = dict(case)
    n = case["params"].numel()
    ct = reference.compute_dtype(case["params"].dtype)
    gen = torch.Generator().manual_seed(seed)
    for name in which:
        if constant:
            values = case[name].double()[element_groups(case)].cpu()
        elif name == "lr":
            values = torch.rand(n, generator=gen, dtype=torch.float64) * 0.2 + 0.01
        else:
            values = torch.rand(n, generator=gen, dtype=torch.float64) * 0.1
            values = torch.where(torch.rand(n, generator=gen) < 0.25, 0.0, values)
        case[name + "_elementwise"] = values.to(device=case["params"].device, dtype=ct)
    return case


def elementwise_of(case: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
    return [case.get(name) for name in ELEMENTWISE]


def full_mask(op: str) -> int:
    return 2 ** (len(HYPER[op]) + 2) - 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_elementwise_matches_reference(op: str, dtype: torch.dtype, fused: None) -> None:
    """Per-element lr and/or weight_decay: kernels against the reference, forward and
    backward (every flag combination, mixed groups, inactive segments, masks with and
    without the per-element bits), and the [G] gradient of a replaced hyperparameter is 0."""
    h = len(HYPER[op])
    names = list(BUFFERS[op]) + list(HYPER[op]) + list(ELEMENTWISE)
    size_sets = [[7], [0, 1, 33, 5], [3, 0, 1000, 1, 4099], [2, 4100]]
    for i, (flags, which) in enumerate(itertools.product(flag_pairs(op), ELEMENTWISE_SETS)):
        sizes = size_sets[i % len(size_sets)]
        case = add_elementwise(make_case(op, sizes, dtype, list(flags), seed=len(sizes)), which,
                               seed=flags[0])
        args, elementwise = args_of(op, case), elementwise_of(case)
        what = f"{op} flags={flags} sizes={sizes} per-element {which}"
        got = raw_op(op)(*args, *elementwise)
        want = getattr(reference, op)(*args, *elementwise)
        for name, g, w in zip(["params"] + list(BUFFERS[op][2:]), got, want):
            assert g.dtype == dtype and g.shape == w.shape
            assert_close(g, w, dtype, f"{what}: {name}")
        gen = torch.Generator().manual_seed(3)
        upstream = [torch.randn(o.numel(), generator=gen, dtype=torch.float64).to(o)
                    for o in want]
        n = case["params"].numel()
        for mask in (full_mask(op), ((1 << h) | 1) if i % 2 else ((1 << (h + 1)) | 2)):
            got = raw_op(op + "_backward")(*upstream, *args, mask, *elementwise)
            want = getattr(reference, op + "_backward")(*upstream, *args, mask, *elementwise)
            assert len(got) == len(want) == len(names)
            for k, (name, g, w) in enumerate(zip(names, got, want)):
                assert g.shape == w.shape and g.dtype == w.dtype, f"{what}: {name} mask={mask}"
                if name in HYPER[op]:
                    if not (mask >> k - len(BUFFERS[op])) & 1 or name in which:
                        assert not g.any(), f"{what}: {name} mask={mask} must be zero"
                    scale = max(1.0, float(w.abs().max()))
                    rtol, atol = {torch.float64: (1e-10, 1e-12)}.get(dtype, (5e-3, 5e-3))
                    torch.testing.assert_close(g.double(), w.double(), rtol=rtol,
                                               atol=atol * scale * max(1, n) ** 0.5)
                elif name in ELEMENTWISE:
                    bit = len(BUFFERS[op]) + h
                    present = name.removesuffix("_elementwise") in which and n > 0
                    wanted = present and (mask >> (k - bit + h)) & 1
                    assert g.numel() == (n if wanted else 0), f"{what}: {name} mask={mask}"
                    assert g.dtype == reference.compute_dtype(dtype)
                    assert_close(g, w, torch.float32 if dtype != torch.float64 else dtype,
                                 f"{what}: grad {name} mask={mask}")
                else:
                    assert_close(g, w, dtype, f"{what}: grad {name} mask={mask}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", [SGD, ADAM])
def test_elementwise_group_values_equal_the_per_group_path(op: str, dtype: torch.dtype,
                                                           fused: None) -> None:
    """Per-element values equal to each element's group value give the per-group path's
    results bit for bit: the forward (and adam_step_), the buffer gradients; the
    per-element gradients summed per group give the [G] gradients (summed in another
    order)."""
    h = len(HYPER[op])
    for flags, which in itertools.product(flag_pairs(op), ELEMENTWISE_SETS):
        case = make_case(op, [5, 1, 40, 3, 4100], dtype, list(flags), seed=flags[0])
        const = add_elementwise(case, which, constant=True)
        args, elementwise = args_of(op, case), elementwise_of(const)
        what = f"{op} flags={flags} per-element {which}"
        want = raw_op(op)(*args)
        got = raw_op(op)(*args, *elementwise)
        for g, w in zip(got, want):
            assert torch.equal(g, w), what
        if op == ADAM:
            state = [a.clone() for a in args[2:5]]
            params_out = raw_op("adam_step_")(args[0], args[1], *state, *args[5:], *elementwise)
            assert torch.equal(params_out, want[0]) and all(
                torch.equal(s, w) for s, w in zip(state, want[1:])), what
        upstream = [torch.randn(o.numel(), dtype=torch.float64).to(o) for o in want]
        per_group = raw_op(op + "_backward")(*upstream, *args, full_mask(op))
        per_element = raw_op(op + "_backward")(*upstream, *args, full_mask(op), *elementwise)
        for g, w in zip(per_element[:len(BUFFERS[op])], per_group[:len(BUFFERS[op])]):
            assert torch.equal(g, w), what
        groups = element_groups(case)
        for k, name in enumerate(ELEMENTWISE):
            hyper_name = name.removesuffix("_elementwise")
            grad_e = per_element[len(BUFFERS[op]) + h + k]
            if hyper_name not in which:
                assert grad_e.numel() == 0
                continue
            index = len(BUFFERS[op]) + HYPER[op].index(hyper_name)
            sums = torch.zeros(len(flags), dtype=torch.float64).index_add(
                0, groups, grad_e.double())
            torch.testing.assert_close(sums, per_group[index].double(), rtol=1e-4, atol=1e-3)
            assert not per_element[index].any()


@pytest.mark.parametrize("op", [SGD, ADAM])
def test_elementwise_opcheck(op: str, fused: None) -> None:
    case = add_elementwise(make_case(op, [4, 0, 3], torch.float64, [7, 2], seed=19),
                           ("lr", "weight_decay"))
    inputs = _differentiable_inputs(op, case)
    elementwise = [e.clone().requires_grad_() for e in elementwise_of(case)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.library.opcheck(raw_op(op), inputs + elementwise)
        torch.library.opcheck(raw_op(op), inputs + [elementwise[0], None])
        outs = raw_op(op)(*[a.detach() for a in inputs], *elementwise)
        upstream = [torch.randn_like(o) for o in outs]
        for mask in (full_mask(op), 1):
            torch.library.opcheck(raw_op(op + "_backward"),
                                  upstream + inputs + [mask] + elementwise)
    if op == ADAM:
        torch.library.opcheck(torch.ops.loft.adam_step_.default,
                              tuple(args_of(op, case) + elementwise_of(case)),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("op", [SGD, ADAM])
@pytest.mark.parametrize(("entry", "flags"), [("wrapper", (0, 7)), ("wrapper", (7, 0)),
                                              ("raw", (2, 5))], ids=str)
def test_elementwise_gradcheck_and_gradgradcheck(op: str, flags: tuple[int, int], entry: str,
                                                 fused: None) -> None:
    """Float64 gradcheck and gradgradcheck with respect to lr_elementwise,
    weight_decay_elementwise and every other input."""
    case = add_elementwise(make_case(op, [3, 2, 1, 2], torch.float64, list(flags), seed=13),
                           ("lr", "weight_decay"), seed=2)
    inputs = _differentiable_inputs(op, case)
    inputs += [e.clone().requires_grad_() for e in elementwise_of(case)]
    fn = getattr(ops, op) if entry == "wrapper" else raw_op(op)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("op", [SGD, ADAM])
def test_elementwise_gradcheck_of_backward_op(op: str, fused: None) -> None:
    case = add_elementwise(make_case(op, [2, 3, 1], torch.float64, [7, 2], seed=17),
                           ("lr", "weight_decay"))
    inputs = _differentiable_inputs(op, case)
    elementwise = [e.clone().requires_grad_() for e in elementwise_of(case)]
    upstream = [torch.randn(o.numel(), dtype=torch.float64, requires_grad=True)
                for o in raw_op(op)(*[a.detach() for a in inputs])]
    k = len(upstream) + len(inputs)

    def fn(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return raw_op(op + "_backward")(*xs[:k], full_mask(op), *xs[k:])

    assert torch.autograd.gradcheck(fn, upstream + inputs + elementwise, eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


def test_reference_rejects_elementwise_lr_weight_decay_and_unknown_names() -> None:
    for op, good in ((SGD, "momentum"), (ADAM, "beta1")):
        case = make_case(op, [3, 4], torch.float64, [0, 7], seed=2)
        args = args_of(op, case)
        ones = torch.ones(7, dtype=torch.float64)
        getattr(reference, op)(*args, elementwise={good: ones * 0.5})
        for bad, match in (("lr", "lr_elementwise"), ("weight_decay", "weight_decay_elementwise"),
                           ("betas" if op == ADAM else "nesterov", "unknown")):
            with pytest.raises(ValueError, match=match):
                getattr(reference, op)(*args, elementwise={bad: ones})
        with pytest.raises(RuntimeError, match=good):
            getattr(reference, op)(*args, elementwise={good: ones[:5]})


def _direct_sgd(p, g, b, lr, mom, damp, wd, flags, first):
    """One SGD step written per element for one group (every argument broadcasts)."""
    g = -g if flags & reference.SGD_MAXIMIZE else g
    g = g + wd * p
    if flags & reference.SGD_MOMENTUM:
        b = g if first else mom * b + (1 - damp) * g
        d = g + mom * b if flags & reference.SGD_NESTEROV else b
    else:
        d = g
    return p - lr * d, b


def _direct_adam(p, g, m, v, vmax, lr, b1, b2, eps, wd, flags, t):
    g = -g if flags & reference.ADAM_MAXIMIZE else g
    if flags & reference.ADAM_DECOUPLED:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = torch.maximum(vmax, v) if flags & reference.ADAM_AMSGRAD else v
    d = u.sqrt() / (1 - b2**t).sqrt() + eps
    return p - lr / (1 - b1**t) * m / d, m, v, u


@pytest.mark.parametrize("op", [SGD, ADAM])
def test_reference_elementwise_hyperparameters(op: str) -> None:
    """The reference forward's ``elementwise=`` (momentum, dampening; beta1, beta2, eps),
    with per-element lr and weight_decay too: equal to a direct per-element formula,
    the group values per element equal to the per-group path, and float64 gradcheck with
    respect to the per-element values."""
    names = reference.SGD_ELEMENTWISE if op == SGD else reference.ADAM_ELEMENTWISE
    for flags in ALL_FLAGS[op]:
        for step in (0, 2):
            case = make_case(op, [6], torch.float64, [flags], seed=flags + step,
                             with_optional=True)
            case["segments"][:, 3] = step
            args = args_of(op, case)
            gen = torch.Generator().manual_seed(flags)
            ranges = {"momentum": (0.1, 0.9), "dampening": (0.0, 0.5), "beta1": (0.5, 0.95),
                      "beta2": (0.8, 0.999), "eps": (1e-3, 0.1)}
            el = {k: torch.rand(6, generator=gen, dtype=torch.float64)
                  * (ranges[k][1] - ranges[k][0]) + ranges[k][0] for k in names}
            case = add_elementwise(case, ("lr", "weight_decay"), seed=flags)
            lr_e, wd_e = elementwise_of(case)
            got = getattr(reference, op)(*args, lr_e, wd_e, elementwise=el)
            if op == SGD:
                want = _direct_sgd(case["params"], case["grads"], case["momentum_buffer"], lr_e,
                                   el["momentum"], el["dampening"], wd_e, flags, step == 0)
                want = (want[0], want[1] if flags & reference.SGD_MOMENTUM
                        else case["momentum_buffer"])
            else:
                want = _direct_adam(case["params"], case["grads"], case["exp_avg"],
                                    case["exp_avg_sq"], case["max_exp_avg_sq"], lr_e, el["beta1"],
                                    el["beta2"], el["eps"], wd_e, flags, step + 1)
                want = want if flags & reference.ADAM_AMSGRAD else (*want[:3],
                                                                    case["max_exp_avg_sq"])
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
            groupwise = {k: case[k].expand(6).clone() for k in names}
            torch.testing.assert_close(
                getattr(reference, op)(*args, elementwise=groupwise), getattr(reference, op)(*args),
                rtol=0, atol=0)

    def fn(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return getattr(reference, op)(*args, xs[0], xs[1], elementwise=dict(zip(names, xs[2:])))

    leaves = [lr_e.clone().requires_grad_(), wd_e.clone().requires_grad_()] + [
        el[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("op", [SGD, ADAM])
def test_elementwise_bad_arguments_name_the_argument(op: str, fused: None) -> None:
    """Wrong size, dtype, shape or layout of lr_elementwise / weight_decay_elementwise:
    RuntimeError naming it, from the forward, the backward, adam_step_ and the reference;
    a 0-element tensor (any dtype) or None is the absent value."""
    case = make_case(op, [4, 6], torch.float64, [0, 7], seed=1, with_optional=True)
    args = args_of(op, case)
    upstream = [torch.zeros(10, dtype=torch.float64) for _ in BUFFERS[op][1:]]
    f64 = torch.float64
    bad = [torch.zeros(9, dtype=f64), torch.zeros(11, dtype=f64), torch.zeros(10),
           torch.zeros(10, dtype=torch.int64), torch.zeros(2, 5, dtype=f64),
           torch.zeros(20, dtype=f64)[::2]]
    for k, name in enumerate(ELEMENTWISE):
        for value in bad:
            elementwise = [None, None]
            elementwise[k] = value
            calls = [(raw_op(op), [*args, *elementwise]),
                     (getattr(reference, op), [*args, *elementwise]),
                     (raw_op(op + "_backward"), [*upstream, *args, full_mask(op), *elementwise]),
                     (getattr(reference, op + "_backward"),
                      [*upstream, *args, full_mask(op), *elementwise])]
            if op == ADAM:
                calls.append((raw_op("adam_step_"), [a.clone() for a in args] + elementwise))
            for fn, call_args in calls:
                with pytest.raises(RuntimeError, match=name):
                    fn(*call_args)
    want = raw_op(op)(*args)
    for absent in (None, torch.zeros(0), torch.zeros(0, dtype=torch.int64)):
        got = raw_op(op)(*args, absent, absent)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
