"""``fmaml._autodiff``: plain-autograd gradients equal ``torch.func``'s, with a graph only when
something will differentiate them.

Every check compares against ``torch.func.grad_and_value`` (float64) on random pytrees, for the
three cases the MAML layer meets: no graph wanted (a checkpointed scan's forward sweep, under
``no_grad``), a graph wanted because an input is tracked (a pull-back, ``.backward()``), and a
graph wanted because ``fn`` closes over a tracked tensor that neither ``args`` nor ``context``
shows. Second derivatives are checked against ``torch.func.hessian``.
"""

from __future__ import annotations

import pytest
import torch
from _models import mlp, mse, regression_tasks, single_thread  # noqa: F401 (autouse fixture)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad_and_value, vmap

import fmaml
from fmaml._autodiff import grad_and_value_any, transforms_active, vjp_plain

F64 = torch.float64


def _loss(params: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.tanh(x @ params["w"] + params["b"])
    value = (h**2).sum() + (params["w"] ** 3).sum() * 0.1
    return value, h.mean(0)


def _params(n_in: int, n_out: int, seed: int, requires_grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    p = {
        "w": torch.randn(n_in, n_out, generator=g, dtype=F64),
        "b": torch.randn(n_out, generator=g, dtype=F64),
    }
    return {k: v.requires_grad_(requires_grad) for k, v in p.items()}


def _sumsq(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((t * t).sum() for t in tree.values())


@settings(max_examples=25, deadline=None)
@given(
    n_in=st.integers(1, 5),
    n_out=st.integers(1, 4),
    batch=st.integers(1, 6),
    seed=st.integers(0, 99),
)
def test_equals_torch_func_without_a_graph(n_in, n_out, batch, seed):
    params = _params(n_in, n_out, seed)
    x = torch.randn(batch, n_in, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    want_g, (want_v, want_aux) = grad_and_value(_loss, has_aux=True)(params, x)
    g, (v, aux) = grad_and_value_any(_loss, (params, x), context=None)
    for name in params:
        torch.testing.assert_close(g[name], want_g[name], rtol=1e-12, atol=1e-12)
        assert not g[name].requires_grad  # nothing tracked: no graph
    torch.testing.assert_close(v, want_v, rtol=1e-12, atol=0)
    torch.testing.assert_close(aux, want_aux, rtol=1e-12, atol=0)
    assert not v.requires_grad and not aux.requires_grad


def test_no_graph_under_no_grad_even_for_tracked_inputs():
    params = _params(3, 2, 0, requires_grad=True)
    x = torch.randn(4, 3, dtype=F64)
    with torch.no_grad():
        g, _ = grad_and_value_any(_loss, (params, x))
    want, _ = grad_and_value(_loss, has_aux=True)({k: p.detach() for k, p in params.items()}, x)
    for name in params:
        assert not g[name].requires_grad
        torch.testing.assert_close(g[name], want[name], rtol=1e-12, atol=1e-12)


def _second_derivative_check(make_fn, params, extra):
    """d/dθ of a scalar of the gradient, plain path vs torch.func, both exact."""

    def via(grad_fn):
        def outer(p, e):
            g, _ = grad_fn(p, e)
            return sum((t * t).sum() for t in g.values())

        return outer

    def plain(p, e):
        return grad_and_value_any(make_fn(e), (p,), context=None)

    def func(p, e):
        return grad_and_value(make_fn(e), has_aux=True)(p)

    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    e = extra.detach().requires_grad_()
    total = via(plain)(leaves, e)
    got = torch.autograd.grad(total, [*leaves.values(), e])
    want = torch.func.grad(via(func), argnums=(0, 1))(
        {k: v.detach() for k, v in params.items()}, extra.detach()
    )
    for a, b in zip(got, [*want[0].values(), want[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_tracked_inputs_get_a_graph_and_exact_second_derivatives():
    x = torch.randn(5, 3, dtype=F64)
    _second_derivative_check(
        lambda e: lambda p: _loss(p, x * e), _params(3, 2, 1), torch.tensor(1.3, dtype=F64)
    )


def test_a_closure_over_a_tracked_tensor_is_found():
    """``fn`` reads ``scale`` (tracked), which neither ``args`` nor ``context`` shows."""
    params = _params(3, 2, 2)
    x = torch.randn(5, 3, dtype=F64)
    scale = torch.tensor(0.7, dtype=F64, requires_grad=True)
    g, _ = grad_and_value_any(lambda p: _loss(p, x * scale), (params,))
    assert all(t.requires_grad for t in g.values())  # the graph was built after all
    total = sum((t * t).sum() for t in g.values())
    (got,) = torch.autograd.grad(total, scale)

    def outer(s):
        gs, _ = grad_and_value(lambda p: _loss(p, x * s), has_aux=True)(params)
        return sum((t * t).sum() for t in gs.values())

    torch.testing.assert_close(got, torch.func.grad(outer)(scale.detach()), rtol=1e-10, atol=0)


def test_unused_inputs_get_zeros_like_torch_func():
    params = {**_params(2, 2, 3), "unused": torch.ones(3, dtype=F64)}
    x = torch.randn(4, 2, dtype=F64)
    g, _ = grad_and_value_any(_loss, (params, x))
    assert torch.equal(g["unused"], torch.zeros(3, dtype=F64))


def test_argnums_tuple():
    params, other = _params(2, 2, 4), {"s": torch.tensor(2.0, dtype=F64)}

    def fn(p, o):
        value, aux = _loss(p, torch.ones(3, 2, dtype=F64) * o["s"])
        return value, aux

    got, _ = grad_and_value_any(fn, (params, other), (0, 1))
    want, _ = grad_and_value(fn, argnums=(0, 1), has_aux=True)(params, other)
    for a, b in zip(
        [*got[0].values(), got[1]["s"]], [*want[0].values(), want[1]["s"]], strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_under_a_transform_the_torch_func_path_is_taken():
    params = _params(3, 2, 5)
    xs = torch.randn(4, 5, 3, dtype=F64)

    def per_task(x):
        assert transforms_active()
        return grad_and_value_any(_loss, (params, x))[0]["w"]

    got = vmap(per_task)(xs)
    for t in range(4):
        want, _ = grad_and_value(_loss, has_aux=True)(params, xs[t])
        torch.testing.assert_close(got[t], want["w"], rtol=1e-12, atol=1e-12)
    assert not transforms_active()


def test_vjp_plain_equals_torch_func_vjp():
    g = torch.Generator().manual_seed(6)
    a, b, c = (torch.randn(3, dtype=F64, generator=g) for _ in range(3))

    def fn(first, second):
        (u,), (v,) = first, second
        return [u * v, u.sin()], [(u * v).sum(), torch.ones(())]  # a constant output too

    cts_a = [torch.randn(3, dtype=F64, generator=g), torch.randn(3, dtype=F64, generator=g)]
    cts_b = [torch.tensor(0.5, dtype=F64), torch.tensor(2.0, dtype=F64)]
    got = vjp_plain(fn, ([a], [b]), lambda oa, ob: (cts_a, cts_b))
    _, pull = torch.func.vjp(fn, [a], [b])
    want = pull((cts_a, cts_b))
    for x, y in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    del c


@pytest.mark.parametrize("requires_grad", [False, True])
def test_maml_loop_meta_grad_without_transforms_matches_torch_func(requires_grad):
    """The whole MAML loop path (plain autograd outside and inside) against torch.func.grad of
    the same unrolled loss (which takes the torch.func path everywhere)."""
    model = mlp()
    maml = fmaml.MAML(
        model, mse, inner_lr=0.05, batching="loop", checkpoint=fmaml.Binomial(snapshots=2)
    )
    params = {k: v.requires_grad_(requires_grad) for k, v in fmaml.params(model).items()}
    tasks = regression_tasks(torch.Generator().manual_seed(0))
    _, grads = maml.meta_grad(params, tasks, 6)
    want = torch.func.grad(maml.unrolled_loss)({k: v.detach() for k, v in params.items()}, tasks, 6)
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-10, atol=1e-12)
    # meta_grad is for training loops: no graph of the meta-gradient outside torch.func, even
    # for tracked params (differentiate unrolled_loss to go to second order)
    assert not grads[name].requires_grad
