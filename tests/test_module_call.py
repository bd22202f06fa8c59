"""``fmaml._module_call.ModuleCall`` against ``torch.func.functional_call``, its definition.

Every test runs the same call both ways and asks for the same numbers bit for bit (outputs and
gradients), the module left as it was, and the same errors; and that a module changed after the
places were found (a submodule or parameter replaced, ``.double()``, a parameter added) is seen.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import fmaml
from fmaml._module_call import ModuleCall

F64 = torch.float64


def _mlp(widths: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(F64)


def _new_values(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()
    }


@contextlib.contextmanager
def _deferred() -> Iterator[list[int]]:
    """Counts the calls ModuleCall leaves to ``functional_call`` itself (its own path: none)."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return functional_call(*args, **kwargs)

    with mock.patch("fmaml._module_call.functional_call", counted):
        yield calls


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the module holds (identity matters: a swap must put the very tensors back)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _same_state(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    after = _state(model)
    return before.keys() == after.keys() and all(before[n] is after[n] for n in before)


@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=5),
    rows=st.integers(1, 4),
    seed=st.integers(0, 100),
)
def test_outputs_and_gradients_are_functional_calls(widths: list[int], rows: int, seed: int):
    model = _mlp(widths, seed)
    call = ModuleCall(model)
    before = _state(model)
    x = torch.randn(rows, widths[0], generator=torch.Generator().manual_seed(seed), dtype=F64)

    def loss(fn, p):
        return fn(p).pow(2).sum()

    values = _new_values(model, seed + 1)
    with _deferred() as deferred:
        mine = torch.func.grad_and_value(lambda p: loss(lambda q: call(q, (x,)), p))(values)
    assert not deferred
    torch_ = torch.func.grad_and_value(
        lambda p: loss(lambda q: functional_call(model, q, (x,)), p)
    )(values)
    assert torch.equal(mine[1], torch_[1])
    assert all(torch.equal(mine[0][n], torch_[0][n]) for n in values)
    assert _same_state(before, model)


def test_batch_norm_buffers_none_and_vmap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten()).to(F64)
    call = ModuleCall(model)
    before = _state(model)
    tensors = {
        **_new_values(model),
        **fmaml._functional.inner_buffers(model),  # running statistics as None
    }
    assert tensors["1.running_mean"] is None
    x = torch.randn(4, 2, 1, 5, 5, dtype=F64)  # (tasks, N, C, H, W)
    with _deferred() as deferred:
        mine = torch.vmap(lambda xi: call(tensors, (xi,)))(x)
    assert not deferred
    torch_ = torch.vmap(lambda xi: functional_call(model, tensors, (xi,)))(x)
    assert torch.equal(mine, torch_)
    assert _same_state(before, model)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(3, 3, bias=False)
        self.decode = nn.Linear(3, 3, bias=False)
        self.decode.weight = self.encode.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.tanh(self.encode(x)))


def test_tied_weights_as_functional_call():
    model = _Tied().to(F64)
    call = ModuleCall(model)
    before = _state(model)
    x = torch.randn(2, 3, dtype=F64)
    w = torch.randn(3, 3, dtype=F64)
    # one name of the tied pair sets both places
    assert torch.equal(
        call({"encode.weight": w}, (x,)), functional_call(model, {"encode.weight": w}, (x,))
    )
    # both names, the same tensor: fine; different tensors: functional_call's error
    both = {"encode.weight": w, "decode.weight": w}
    assert torch.equal(call(both, (x,)), functional_call(model, both, (x,)))
    with pytest.raises(ValueError, match="tied"), _deferred() as deferred:
        call({"encode.weight": w, "decode.weight": w + 1}, (x,))
    assert deferred
    assert _same_state(before, model)


def test_a_submodule_used_twice():
    """``Sequential(lin, lin)``: two names, one slot; the given tensor is used at both, and the
    module keeps its parameter (torch 2.13's functional_call leaves the given tensor in that
    slot, so the reference runs on a copy)."""
    torch.manual_seed(0)
    lin = nn.Linear(2, 2).to(F64)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    call = ModuleCall(model)
    before = _state(model)
    values = _new_values(model)
    assert list(values) == ["0.weight", "0.bias"]
    x = torch.randn(3, 2, dtype=F64)
    with _deferred() as deferred:
        mine = call(values, (x,))
    assert not deferred
    assert _same_state(before, model)
    assert torch.equal(mine, functional_call(copy.deepcopy(model), values, (x,)))


def test_the_module_is_restored_when_forward_raises():
    model = _mlp([2, 3, 1])
    call = ModuleCall(model)
    before = _state(model)
    with pytest.raises(RuntimeError):
        call(_new_values(model), (torch.randn(4, 5, dtype=F64),))  # wrong input width
    assert _same_state(before, model)


def test_a_name_the_module_does_not_have_is_functional_calls():
    model = _mlp([2, 1])
    call = ModuleCall(model)
    x = torch.randn(3, 2, dtype=F64)
    extra = {**_new_values(model), "scale": torch.ones(())}
    with _deferred() as deferred:
        assert torch.equal(call(extra, (x,)), functional_call(model, extra, (x,)))
    assert deferred  # (the reference's own call is not counted)
    assert not hasattr(model, "scale")


@pytest.mark.parametrize(
    "change",
    ["replace submodule", "replace parameter", "double", "add parameter", "reparametrize"],
)
def test_a_changed_module_is_seen(change: str):
    """Each change leaves places found before it stale; the call must use the module as it is
    now (functional_call's answer), never the old places."""
    model = _mlp([2, 3, 1]).float()
    call = ModuleCall(model)
    x = torch.randn(4, 2)
    call(_new_values(model), (x,))  # the places are found and used once
    if change == "replace submodule":
        model[0] = nn.Linear(2, 3)
    elif change == "replace parameter":
        model[2].weight = nn.Parameter(torch.randn(1, 3))
    elif change == "double":
        model.double()
        x = x.double()
    elif change == "add parameter":
        model[2].register_parameter("shift", nn.Parameter(torch.zeros(1)))
        model[2].forward = lambda inp, m=model[2]: F.linear(inp, m.weight, m.bias) + m.shift
    else:
        nn.utils.parametrize.register_parametrization(model[0], "weight", _Double())
    before = _state(model)
    values = _new_values(model, seed=7)
    with _deferred() as deferred:
        mine = call(values, (x,))
    assert not deferred  # found again, and used
    assert torch.equal(mine, functional_call(model, values, (x,)))
    assert _same_state(before, model)


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_maml_sees_a_replaced_layer():
    """Through MAML: a layer replaced after MAML was made is the layer its loss runs."""
    model = _mlp([1, 4, 1])
    maml = fmaml.MAML(model, F.mse_loss, inner_lr=0.1)
    x, y = torch.randn(5, 1, dtype=F64), torch.randn(5, 1, dtype=F64)
    maml.loss(fmaml.params(model), (x, y))
    model[2] = nn.Linear(4, 1).to(F64)
    p = fmaml.params(model)
    expected = F.mse_loss(functional_call(model, p, (x,)), y)
    assert torch.equal(maml.loss(p, (x, y)), expected)


def test_maml_leaves_a_shared_submodule_as_it_was():
    """``Sequential(lin, act, lin)`` through MAML: the module's parameters are its own after a
    meta-gradient (torch 2.13's functional_call left a tensor of the inner loop in the slot)."""
    torch.manual_seed(0)
    lin = nn.Linear(1, 1).to(F64)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    before = _state(model)
    maml = fmaml.MAML(model, F.mse_loss, inner_lr=0.1)
    tasks = fmaml.Tasks(
        support=(torch.randn(2, 4, 1, dtype=F64), torch.randn(2, 4, 1, dtype=F64)),
        query=(torch.randn(2, 4, 1, dtype=F64), torch.randn(2, 4, 1, dtype=F64)),
    )
    torch.func.grad(maml.unrolled_loss)(fmaml.params(model), tasks, 2)
    assert _same_state(before, model)
    assert isinstance(lin.weight, nn.Parameter)
