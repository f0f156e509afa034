"""loft.patch and loft.utils: the patched module tree, side by side with higher 0.2.1.

Each scenario runs with ``lib=loft`` and ``lib=higher`` in float64 and compares forward
outputs, fast weights and meta-gradients (with respect to the model's weights, with
``copy_initial_weights=False``). Where higher 0.2.1 is broken (direct calls of a
submodule of a container, assignments to a submodule's weight), the oracle is the
layer's functional form.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any, Callable

import higher
import higher.patch
import higher.utils
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loft
import loft.patch
import loft.utils

F64 = dict(rtol=1e-12, atol=1e-12)
LIBS = (loft, higher)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _compare(a: Any, b: Any) -> None:
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            _compare(x, y)
    elif a is None or b is None:
        assert a is None and b is None, (a, b)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a.detach(), b.detach(), **F64)
    else:
        assert a == b, (a, b)


def _both(scenario: Callable[[Any], Any]) -> Any:
    results = [scenario(lib) for lib in LIBS]
    _compare(results[0], results[1])
    return results[0]


# ---- models ------------------------------------------------------------------------------


class _Locked(nn.Module):
    """Holds a lock it takes in forward (unpicklable: deepcopy fails on it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.fc(x)


class _Table(nn.Module):
    """A lookup table held as a plain tensor attribute (not a buffer): 32 MB."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.linspace(-1, 1, 4 * 2**20, dtype=torch.float64)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.table[:3]


class _Recurrent(nn.Module):
    def __init__(self, kind: type) -> None:
        super().__init__()
        self.rnn = kind(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x.unsqueeze(0).expand(3, -1, -1))[0]
        return self.head(out[-1])


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.decoder(torch.tanh(self.encoder(x))))


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.inner(x))


class _Shared(nn.Module):
    """One Linear reachable as first.inner and second.inner."""

    def __init__(self) -> None:
        super().__init__()
        self.first = _Wrap(nn.Linear(4, 4))
        self.second = _Wrap(self.first.inner)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.second(self.first(x)))


class _PartialFrozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)
        self.frozen = nn.Linear(3, 3).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.used(x))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "batchnorm": lambda: nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, momentum=0.5),
                                       nn.ReLU(), nn.Linear(5, 3)),
    "gru": lambda: _Recurrent(nn.GRU),
    "lstm": lambda: _Recurrent(nn.LSTM),
    "tied": _Tied,
    "shared_submodule": _Shared,
    "partial_frozen": _PartialFrozen,
    "lock": _Locked,
    "table": _Table,
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().double()


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_and_meta_gradients_match_higher(name: str) -> None:
    """Three SGD-momentum steps, then the query loss: outputs, fast weights and the
    meta-gradients on the model's own weights equal higher's."""
    x, xq = _x(6, 4), _x(6, 4, seed=1)

    def scenario(lib: Any) -> Any:
        model = _model(name)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            outputs = []
            for _ in range(3):
                out = fmodel(x)
                outputs.append(out)
                diffopt.step((out ** 2).mean())
            query = fmodel(xq)
            trainable = [p for p in model.parameters() if p.requires_grad]
            # (Zeros, not None, for the unused layer: loft's fast weights are views of one
            # buffer made from all the weights, so every one is on the graph.)
            grads = torch.autograd.grad((query ** 2).sum(), trainable, allow_unused=True,
                                        materialize_grads=True)
            return outputs, query, [list(fmodel.parameters(time=t)) for t in range(4)], grads

    _both(scenario)


# ---- the patched tree ------------------------------------------------------------------------


def test_patched_modules_are_instances_of_their_classes() -> None:
    def scenario(lib: Any) -> Any:
        model = _model("batchnorm")
        fmodel = lib.monkeypatch(model)
        assert isinstance(fmodel, nn.Sequential) and isinstance(fmodel[0], nn.Linear)
        assert isinstance(fmodel[1], nn.BatchNorm1d)
        assert isinstance(fmodel, lib.patch._MonkeyPatchBase)
        assert isinstance(fmodel[3], lib.patch._MonkeyPatchBase)
        return [type(m).__name__ for m in fmodel.modules()]

    names = _both(scenario)
    assert names[:2] == ["FunctionalSequential", "InnerFunctionalLinear"]
    fmodel = loft.monkeypatch(_model("batchnorm"))
    assert isinstance(fmodel, loft.patch.FunctionalModule)
    assert not isinstance(fmodel[0], loft.patch.FunctionalModule)
    assert fmodel.is_root and fmodel.root is fmodel
    assert not fmodel[0].is_root and fmodel[0].root is fmodel


def test_one_class_per_original_class_kept_for_the_class_lifetime() -> None:
    model = _model("tied")
    first, second = loft.monkeypatch(model), loft.monkeypatch(model)
    assert type(first) is type(second) and type(first.encoder) is type(second.out)

    class Local(nn.Linear):
        pass

    loft.monkeypatch(Local(2, 2))
    patched, local = weakref.ref(type(loft.monkeypatch(Local(2, 2)))), weakref.ref(Local)
    del Local
    gc.collect()
    assert local() is None and patched() is None, "the patched class kept its class alive"


def test_attributes_are_the_original_objects_and_rebinding_stays_local() -> None:
    def scenario(lib: Any) -> Any:
        model = _Table().double()
        model.config = {"scale": 2}
        fmodel = lib.monkeypatch(model)
        assert fmodel.table is model.table and fmodel.config is model.config
        fmodel.config = {"scale": 3}
        fmodel.table = None
        assert model.config == {"scale": 2} and model.table is not None
        return fmodel.config

    _both(scenario)
    model = _Locked().double()
    fmodel = loft.monkeypatch(model)
    assert fmodel.lock is model.lock
    fmodel.extra = 1
    assert not hasattr(model, "extra")


def test_shared_submodule_stays_one_patched_module() -> None:
    """higher 0.2.1 makes two patched modules of a shared one; loft keeps the original's
    structure (so a shared BatchNorm's statistics update once per use, as in the
    original)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), bn, nn.Tanh(), bn).double()
    fmodel = loft.monkeypatch(model)
    assert fmodel[1] is fmodel[3]
    assert [n for n, _ in fmodel.named_modules()] == [n for n, _ in model.named_modules()]
    x = _x(6, 4)
    out = fmodel(x)
    torch.testing.assert_close(out, model(x), **F64)
    patched = dict(fmodel.patched_buffers())
    for name, buf in model.named_buffers():
        torch.testing.assert_close(patched[name], buf, **F64)  # both updated twice


def test_buffers_are_copies_that_diverge_and_write_back() -> None:
    def scenario(lib: Any) -> Any:
        model = _model("batchnorm")
        before = [b.clone() for b in model.buffers()]
        fmodel = lib.monkeypatch(model, copy_initial_weights=False)
        for (name, mine), theirs in zip(fmodel.named_buffers(), model.buffers()):
            assert mine is not theirs and torch.equal(mine, theirs), name
        fmodel(_x(6, 4))
        assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
        return [b.clone() for b in fmodel.buffers()]

    after = _both(scenario)
    model = _model("batchnorm")
    fmodel = loft.monkeypatch(model)
    fmodel(_x(6, 4))
    fmodel.write_back_buffers()
    _compare(list(model.buffers()), after)


def test_train_and_eval() -> None:
    x = _x(6, 4)

    def scenario(lib: Any) -> Any:
        model = _model("batchnorm")
        fmodel = lib.monkeypatch(model)
        fmodel(x)  # updates the patched running statistics
        fmodel.eval()
        flags = [m.training for m in fmodel.modules()]
        assert model.training and all(m.training for m in model.modules())
        evaluated = fmodel(x)
        fmodel.train()
        return flags, evaluated, [m.training for m in fmodel.modules()]

    flags, _, trained = _both(scenario)
    assert not any(flags) and all(trained)


def test_hooks_are_not_carried_and_stay_local() -> None:
    """As in higher, the original's hooks do not run on the patched module; hooks
    registered on the patched module do not reach the original."""
    calls: list[str] = []
    model = _model("batchnorm")
    model[0].register_forward_hook(lambda *_: calls.append("original"))
    fmodel = loft.monkeypatch(model)
    fmodel[0].register_forward_hook(lambda *_: calls.append("patched"))
    fmodel(_x(6, 4))
    model(_x(6, 4))
    assert calls == ["patched", "original"]


# ---- fast weights ------------------------------------------------------------------------------


def test_params_keyword_records_fast_weights_first() -> None:
    x = _x(6, 4)

    def scenario(lib: Any) -> Any:
        model = _model("tied")
        fmodel = lib.monkeypatch(model)
        params = [p * 1.5 for p in fmodel.parameters()]
        out = fmodel(x, params=params)
        assert fmodel.fast_params[0] is params[0] and len(fmodel._fast_params) == 2
        return out, fmodel(x), list(fmodel.parameters(time=0))

    _both(scenario)


def test_direct_submodule_calls_run_on_the_fast_weights() -> None:
    """``fmodel.encoder(x)``, with and without ``params=`` (the full list, recorded)."""
    model = _model("tied")
    fmodel = loft.monkeypatch(model)
    x = _x(6, 4)
    w, b_enc, b_dec, w_out, b_out = fmodel.parameters()
    torch.testing.assert_close(fmodel.encoder(x), F.linear(x, w, b_enc), **F64)
    new = [p + 0.5 for p in fmodel.parameters()]
    out = fmodel.decoder(x, params=new)
    assert fmodel.fast_params[0] is new[0] and len(fmodel._fast_params) == 2
    torch.testing.assert_close(out, F.linear(x, new[0], new[2]), **F64)
    assert fmodel.decoder.weight is new[0] and fmodel.encoder.weight is new[0]
    grad, = torch.autograd.grad(fmodel.out(x).sum(), new[3])
    torch.testing.assert_close(grad, torch.ones(3, 1, dtype=torch.float64) * x.sum(0), **F64)


def test_slices_of_patched_containers_run_on_the_fast_weights() -> None:
    """``Sequential.__getitem__`` builds ``self.__class__(...)`` for a slice: a plain
    Sequential of the patched modules (higher 0.2.1 raises a TypeError)."""
    model = _model("batchnorm").eval()
    fmodel = loft.monkeypatch(model)
    fmodel.update_params([p * 2 for p in fmodel.parameters()])
    head = fmodel[2:]
    assert type(head) is nn.Sequential and head[1] is fmodel[3]
    hidden = fmodel[:2](_x(6, 4))
    torch.testing.assert_close(head(hidden), fmodel(_x(6, 4)), **F64)
    with pytest.raises(TypeError, match="not constructed directly"):
        loft.patch._MonkeyPatchBase()


def test_assigning_a_tensor_to_a_slot_records_new_fast_weights() -> None:
    """At the root side by side with higher (whose submodules cannot take assignments),
    in a submodule against the functional form."""
    x = _x(6, 4)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.inner = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * self.scale

    def scenario(lib: Any) -> Any:
        torch.manual_seed(0)
        fmodel = lib.monkeypatch(Scaled().double())
        new = torch.full((3,), 2.0, dtype=torch.float64, requires_grad=True)
        fmodel.scale = new
        assert fmodel.scale is new and fmodel.fast_params[0] is new
        out = fmodel(x)
        return out, len(fmodel._fast_params), torch.autograd.grad(out.sum(), new)

    _both(scenario)
    torch.manual_seed(0)
    fmodel = loft.monkeypatch(Scaled().double())
    weight = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
    fmodel.inner.weight = weight
    scale, _, bias = fmodel.parameters()
    assert fmodel.fast_params[1] is weight and len(fmodel._fast_params) == 2
    torch.testing.assert_close(fmodel(x), F.linear(x, weight, bias) * scale, **F64)
    # Tied slots share one fast weight: assigning to one name changes both.
    fmodel = loft.monkeypatch(_model("tied"))
    new = torch.zeros(4, 4, dtype=torch.float64)
    fmodel.decoder.weight = new
    assert fmodel.encoder.weight is new and fmodel.fast_params[0] is new
    with pytest.raises(TypeError, match="expected a tensor"):
        fmodel.encoder.weight = 1.0
    with pytest.raises(ValueError, match="shape"):
        fmodel.encoder.weight = torch.zeros(2, dtype=torch.float64)


def test_history_changed_directly_is_what_the_next_call_runs_on() -> None:
    """higher reads the history at every call; code that edits ``_fast_params`` itself
    gets the same result from loft."""
    x = _x(6, 4)

    def scenario(lib: Any) -> Any:
        fmodel = lib.monkeypatch(_model("tied"))
        first = fmodel(x)
        fmodel._fast_params.append([p * 3 for p in fmodel.parameters()])
        appended = fmodel(x)
        fmodel._fast_params = fmodel._fast_params[:1]
        return first, appended, fmodel(x), fmodel.boxed_forward(x)

    first, appended, cut, _ = _both(scenario)
    assert not torch.allclose(first, appended)
    torch.testing.assert_close(first, cut, **F64)


def test_modify_internally_sets_a_slot_without_history() -> None:
    def scenario(lib: Any) -> Any:
        fmodel = lib.monkeypatch(_model("batchnorm"))
        new = torch.zeros(5, 4, dtype=torch.float64)
        with lib.patch._modify_internally(fmodel[0]):
            fmodel[0].weight = new
        assert fmodel[0].weight is new
        return len(fmodel._fast_params), fmodel[0]._being_modified_internally

    _both(scenario)


def test_higher_private_members() -> None:
    def scenario(lib: Any) -> Any:
        model = _Shared().double()
        fmodel = lib.monkeypatch(model)
        expanded = fmodel._expand_params(fmodel.fast_params)
        assert all(e is fmodel.fast_params[i] for e, i in zip(expanded, fmodel._param_mapping))
        offset = lib.patch._update_patched_params(fmodel, [[e * 2 for e in expanded]], 0)
        return (fmodel._param_mapping, offset, fmodel.out._param_mapping, fmodel.out._param_names,
                fmodel.track_higher_grads, len(fmodel.init_fast_params),
                lib.patch._make_functional(model, [None], 3)[0])

    mapping = _both(scenario)[0]
    assert mapping == higher.utils._get_param_mapping(_Shared(), [], []) == [0, 1, 0, 1, 2, 3]
    fmodel = loft.monkeypatch(_Shared().double())
    loft.patch._update_patched_params(fmodel, [[p * 2 for p in
                                                fmodel._expand_params(fmodel.fast_params)]], 0)
    assert torch.equal(fmodel.out.weight, fmodel.fast_params[2] * 2)


def test_make_functional_with_an_encapsulator_and_placeholders() -> None:
    x = _x(6, 4)

    def scenario(lib: Any) -> Any:
        model = _model("batchnorm")
        fmodel = lib.patch.make_functional(model)
        assert repr(fmodel[0]._parameters["weight"]) == 'Parameter placeholder ("weight")'
        assert type(fmodel[0]._parameters["weight"]).__name__ == "ParameterPlaceholder"

        def encapsulator(fmodule: Any, module: nn.Module) -> None:
            lib.patch.buffer_sync(module, fmodule)
            fmodule.update_params([p.clone() for p in module.parameters()])

        fmodel = lib.patch.make_functional(model, encapsulator=encapsulator)
        return fmodel(x), list(fmodel.named_buffers())

    _both(scenario)
    fmodel = loft.patch.FunctionalModule(_model("batchnorm"))
    assert fmodel.fast_params is None and isinstance(fmodel, nn.Sequential)


def test_same_errors_as_higher() -> None:
    x = _x(6, 4)

    def errors(lib: Any) -> list[type | None]:
        found: list[type | None] = []
        fmodel = lib.monkeypatch(_Wrap(nn.Linear(4, 4)).double())
        for action in (lambda: lib.patch.make_functional(_Wrap(nn.Linear(4, 4)))(x),
                       lambda: setattr(fmodel, "inner", 3),
                       lambda: lib.monkeypatch(fmodel),
                       lambda: lib.patch.buffer_sync(_Wrap(nn.Linear(4, 4)),
                                                     lib.patch.make_functional(nn.Linear(4, 4)))):
            try:
                action()
                found.append(None)
            except Exception as error:  # noqa: BLE001 - the type is what we compare
                found.append(type(error))
        return found

    assert errors(loft) == errors(higher) == [ValueError, TypeError, ValueError, KeyError]
    fmodel = loft.patch.make_functional(_Wrap(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="params keyword must be provided"):
        fmodel.inner(x)  # higher 0.2.1: the same ValueError (AttributeError in containers)


# ---- recurrent modules --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
def test_recurrent_submodule_direct_call_and_flat_weights(kind: type) -> None:
    model = _Recurrent(kind).double()
    fmodel = loft.monkeypatch(model)
    x = _x(3, 2, 4)
    fmodel.update_params([p * 0.5 for p in fmodel.parameters()])
    rnn = fmodel.rnn
    count = len(rnn._flat_weights)
    assert all(a is b for a, b in zip(rnn._flat_weights, fmodel.fast_params[:count]))
    fmodel.rnn.flatten_parameters()  # a no-op, as in higher
    twin = kind(4, 5).double()
    with torch.no_grad():
        for p, fast in zip(twin.parameters(), fmodel.parameters()):
            p.copy_(fast)
    torch.testing.assert_close(rnn(x)[0], twin(x)[0], **F64)
    assert model.rnn._flat_weights[0] is model.rnn.weight_ih_l0


# ---- lifetimes -----------------------------------------------------------------------------------


def test_step_and_forward_after_the_context_ends() -> None:
    x = _x(6, 4)

    def scenario(lib: Any) -> Any:
        model = _model("batchnorm")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step((fmodel(x) ** 2).mean())
        diffopt.step((fmodel(x) ** 2).mean())
        out = fmodel(x)
        return out, torch.autograd.grad((out ** 2).sum(), list(model.parameters()))

    _both(scenario)


def test_the_patched_tree_is_freed_without_the_cyclic_collector() -> None:
    model = _model("gru")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = _x(6, 4)
    gc.collect()
    gc.disable()
    try:
        with loft.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step((fmodel(x) ** 2).mean())
            fmodel.head.weight = fmodel.head.weight * 2
            refs = [weakref.ref(m) for m in fmodel.modules()] + [weakref.ref(fmodel.twin())]
            refs.append(weakref.ref(fmodel.fast_params[0]))
        del fmodel, diffopt
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_twin_has_its_own_weights_and_shares_the_buffers() -> None:
    fmodel = loft.monkeypatch(_model("batchnorm"))
    twin = fmodel.twin()
    assert twin[0] is not fmodel[0] and type(twin[0]) is type(fmodel[0])
    assert twin[1].running_mean is fmodel[1].running_mean
    twin.update_params([p * 0 for p in twin.parameters()])
    assert not torch.equal(fmodel[0].weight, twin[0].weight)
    assert len(fmodel._fast_params) == 1 and twin.recorded_times == [0, 1]
    twin(_x(6, 4))
    assert int(fmodel[1].num_batches_tracked) == 1


# ---- wrapped models ----------------------------------------------------------------------


def test_distributed_data_parallel_patches_the_wrapped_model(tmp_path: Any) -> None:
    """A DDP model patches the model it wraps (meta-gradients as without DDP, one rank);
    DDP as a submodule of another model is refused."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Linear(4, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(5, 4)
        grads = []
        for wrapped in (model, model.module):
            with loft.innerloop_ctx(wrapped, opt, copy_initial_weights=False) as (fmodel, diffopt):
                assert isinstance(fmodel, nn.Linear)
                diffopt.step(fmodel(x).square().mean())
                fmodel(x).square().mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.zero_grad()
        assert all(torch.allclose(a, b) for a, b in zip(*grads))
        with pytest.raises(TypeError, match="DistributedDataParallel.*not as a submodule"):
            loft.monkeypatch(nn.Sequential(model))
    finally:
        dist.destroy_process_group()


def test_data_parallel_is_refused() -> None:
    model = nn.DataParallel(nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"DataParallel.*model\.module"):
        loft.monkeypatch(model)


def test_fsdp_is_refused(tmp_path: Any) -> None:
    import torch.distributed as dist
    from torch.distributed import fsdp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        try:
            model = fsdp.fully_shard(nn.Sequential(nn.Linear(4, 3)))
        except Exception as error:  # noqa: BLE001 - FSDP on this CPU build
            pytest.skip(f"fully_shard unavailable here: {error}")
        with pytest.raises(TypeError, match="FSDP"):
            loft.monkeypatch(model)
    finally:
        dist.destroy_process_group()


# ---- utils ---------------------------------------------------------------------------------


def test_utils_match_higher() -> None:
    t = _x(3).requires_grad_()
    nested = {"a": [t, (t * 2, 3)], "b": {t}, "c": "text"}
    for lib in LIBS:
        copied = lib.utils._copy_tensor(t, True)
        assert copied.requires_grad and copied.grad_fn is None and copied is not t
        shared = lib.utils._copy_tensor(t, False)
        assert shared.data_ptr() == t.data_ptr()
    mapped = [lib.utils._recursive_map(nested, lambda v: v * 2 if isinstance(v, int) else v)
              for lib in LIBS]
    assert mapped[0]["a"][1][1] == mapped[1]["a"][1][1] == 6
    casted = [lib.utils._recursive_copy_and_cast(nested, None) for lib in LIBS]
    _compare(casted[0]["a"], casted[1]["a"])
    assert all(type(c["a"][1]) is tuple for c in casted)
    assert [lib.utils._is_container(v) for lib in LIBS for v in ([], (), {}, set(), t)] == \
        [True, True, True, True, False] * 2
    assert [lib.utils._find_param_in_list(t, [t * 1, t]) for lib in LIBS] == [1, 1]
    assert [lib.utils._find_param_in_list(t, [t * 1]) for lib in LIBS] == [None, None]
    assert loft.utils.flatten(nested)[:3] == higher.utils.flatten(nested)[:3]
    for name in ("tied", "shared_submodule", "partial_frozen"):
        assert loft.utils._get_param_mapping(_model(name), [], []) == \
            higher.utils._get_param_mapping(_model(name), [], [])
        _compare(loft.utils.get_func_params(_model(name)),
                 higher.utils.get_func_params(_model(name)))
    detached = loft.utils._recursive_detach({"a": [t * 2, (t,)], "b": 1})
    assert detached["a"][0].grad_fn is None and not detached["a"][1][0].requires_grad
    assert detached["b"] == 1 and type(detached["a"][1]) is tuple
