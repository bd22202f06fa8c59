"""Derivatives through ``fmaml.scan``: every policy against the reference loop, in float64.

Covers ``torch.func.grad`` (init, xs, consts), ``vjp`` with random cotangents, ``vmap``,
``vmap(grad)``, ``grad(vmap)``, ``jacrev(grad)``, plain ``.backward()``, autograd double backward,
``gradcheck``/``gradgradcheck``, learned learning rates (MAML), random-number replay, integer carry
leaves, and a hypothesis property test over lengths, policies and carry structures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import optree
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    F64,
    all_policies,
    assert_trees_close,
    checkpointed_policies,
    rand,
    reference_scan,
)
from hypothesis import given
from hypothesis import strategies as st
from torch.func import grad, jacrev, vjp, vmap

import fmaml

LENGTH = 7
TOL = {"rtol": 1e-12, "atol": 1e-12}


def _step(carry, x, consts):
    w, v = carry["w"], carry["v"]
    w2 = w - consts["lr"] * torch.tanh(w @ consts["A"] + x) + 0.1 * v.sum()
    v2 = 0.5 * v + w2[:2] ** 2
    return {"w": w2, "v": v2}, {"loss": (w2**2).sum(), "w": w2}


def _objective(carry, ys):
    return (
        (carry["w"] ** 3).sum()
        + (carry["v"] ** 2).sum()
        + (ys["loss"] * torch.linspace(0.5, 1.5, ys["loss"].shape[0], dtype=F64)).sum()
        + torch.sin(ys["w"]).sum()
    )


def _inputs(gen, length=LENGTH):
    init = {"w": rand(gen, 3, scale=0.5), "v": rand(gen, 2, scale=0.5)}
    xs = rand(gen, length, 3, scale=0.5)
    consts = {"A": rand(gen, 3, 3, scale=0.5), "lr": torch.tensor(0.3, dtype=F64)}
    return init, xs, consts


def _loss_fn(policy):
    """``loss(init, xs, consts)`` through ``fmaml.scan`` or, for ``policy=None``, the reference."""

    def loss(init, xs, consts):
        if policy is None:
            out = reference_scan(_step, init, xs, consts=consts)
        else:
            out = fmaml.scan(_step, init, xs, checkpoint=policy, consts=consts)
        return _objective(*out)

    return loss


def _scan_fn(policy):
    def run(init, xs, consts):
        if policy is None:
            return reference_scan(_step, init, xs, consts=consts)
        return fmaml.scan(_step, init, xs, checkpoint=policy, consts=consts)

    return run


def _requires_grad(tree):
    return optree.tree_map(lambda t: t.detach().clone().requires_grad_(), tree)


# --------------------------------------------------------------------------------------------
# first order


@all_policies
def test_grad_wrt_init_xs_and_consts(policy, gen):
    args = _inputs(gen)
    got = grad(_loss_fn(policy), argnums=(0, 1, 2))(*args)
    want = grad(_loss_fn(None), argnums=(0, 1, 2))(*args)
    assert_trees_close(got, want, **TOL)
    # each piece alone too (the backward skips what is not needed)
    for argnums in (0, 1, 2):
        assert_trees_close(grad(_loss_fn(policy), argnums=argnums)(*args), want[argnums], **TOL)


@all_policies
def test_vjp_with_random_cotangents(policy, gen):
    args = _inputs(gen)
    out, pullback = vjp(_scan_fn(policy), *args)
    ref_out, ref_pullback = vjp(_scan_fn(None), *args)
    assert_trees_close(out, ref_out, rtol=0, atol=0)
    cotangent = optree.tree_map(lambda t: rand(gen, *t.shape), out)
    assert_trees_close(pullback(cotangent), ref_pullback(cotangent), **TOL)
    # cotangent on the carry only, and on the ys only (the other part is zero)
    carry_only = (cotangent[0], optree.tree_map(torch.zeros_like, cotangent[1]))
    ys_only = (optree.tree_map(torch.zeros_like, cotangent[0]), cotangent[1])
    for ct in (carry_only, ys_only):
        assert_trees_close(pullback(ct), ref_pullback(ct), **TOL)


@all_policies
def test_plain_backward(policy, gen):
    leaves = [_requires_grad(a) for a in _inputs(gen)]
    ref_leaves = [_requires_grad(a) for a in leaves]
    _loss_fn(policy)(*leaves).backward()
    _loss_fn(None)(*ref_leaves).backward()
    got = optree.tree_map(lambda t: t.grad, leaves)
    want = optree.tree_map(lambda t: t.grad, ref_leaves)
    assert_trees_close(got, want, **TOL)


@all_policies
def test_plain_backward_only_some_inputs_require_grad(policy, gen):
    init, xs, consts = _inputs(gen)
    lr = consts["lr"].clone().requires_grad_()
    ref_lr = consts["lr"].clone().requires_grad_()
    _loss_fn(policy)(init, xs, {**consts, "lr": lr}).backward()
    _loss_fn(None)(init, xs, {**consts, "lr": ref_lr}).backward()
    torch.testing.assert_close(lr.grad, ref_lr.grad, **TOL)


# --------------------------------------------------------------------------------------------
# vmap


def _batch(gen, n=3):
    inits = {"w": rand(gen, n, 3, scale=0.5), "v": rand(gen, n, 2, scale=0.5)}
    xs = rand(gen, n, LENGTH, 3, scale=0.5)
    return inits, xs


def _per_task(fn, inits, xs, consts):
    outs = [
        fn(optree.tree_map(lambda t, b=b: t[b], inits), xs[b], consts) for b in range(xs.shape[0])
    ]
    return optree.tree_map(lambda *leaves: torch.stack(leaves), *outs)


@all_policies
def test_vmap_values(policy, gen):
    inits, xs = _batch(gen)
    consts = _inputs(gen)[2]
    got = vmap(_scan_fn(policy), in_dims=(0, 0, None))(inits, xs, consts)
    assert_trees_close(got, _per_task(_scan_fn(None), inits, xs, consts), **TOL)
    # a batch of inits only (xs shared)
    got = vmap(_scan_fn(policy), in_dims=(0, None, None))(inits, xs[0], consts)
    want = _per_task(_scan_fn(None), inits, xs[[0, 0, 0]], consts)
    assert_trees_close(got, want, **TOL)


@all_policies
def test_vmap_of_grad(policy, gen):
    inits, xs = _batch(gen)
    consts = _inputs(gen)[2]
    g = grad(_loss_fn(policy), argnums=(0, 2))
    got = vmap(g, in_dims=(0, 0, None))(inits, xs, consts)
    want = _per_task(grad(_loss_fn(None), argnums=(0, 2)), inits, xs, consts)
    assert_trees_close(got, want, **TOL)


@all_policies
def test_grad_of_vmap(policy, gen):
    inits, xs = _batch(gen)
    consts = _inputs(gen)[2]

    def total(policy):
        def fn(inits, consts):
            return vmap(_loss_fn(policy), in_dims=(0, 0, None))(inits, xs, consts).sum()

        return fn

    got = grad(total(policy), argnums=(0, 1))(inits, consts)
    want = grad(total(None), argnums=(0, 1))(inits, consts)
    assert_trees_close(got, want, **TOL)


# --------------------------------------------------------------------------------------------
# second order


@all_policies
def test_jacrev_of_grad(policy, gen):
    args = _inputs(gen)
    got = jacrev(grad(_loss_fn(policy), argnums=(0, 2)), argnums=(0, 2))(*args)
    want = jacrev(grad(_loss_fn(None), argnums=(0, 2)), argnums=(0, 2))(*args)
    assert_trees_close(got, want, **TOL)
    # the hyper-Hessian is not trivially zero
    assert want[1]["A"][1]["A"].abs().max() > 1e-3


@all_policies
def test_double_backward_with_create_graph(policy, gen):
    leaves = [_requires_grad(a) for a in _inputs(gen)]
    ref_leaves = [_requires_grad(a) for a in leaves]

    def second(loss_fn, init, xs, consts):
        flat = optree.tree_leaves((init, consts))
        g = torch.autograd.grad(loss_fn(init, xs, consts), flat, create_graph=True)
        meta = sum((gi**2).sum() for gi in g)
        return g, torch.autograd.grad(meta, [*flat, xs])

    got = second(_loss_fn(policy), *leaves)
    want = second(_loss_fn(None), *ref_leaves)
    assert_trees_close(got, want, **TOL)


def test_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(7)

    def fn(init, xs, lr):
        def f(c, x, k):
            return torch.tanh(c * k + x), (c * x).sum()

        return fmaml.scan(f, init, xs, checkpoint=fmaml.Binomial(2), consts=lr)

    args = (rand(gen, 2), rand(gen, 4, 2), torch.tensor(0.7, dtype=F64))
    args = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


# --------------------------------------------------------------------------------------------
# learned learning rates (MAML): inner gradients inside the step


def _inner_loss(params, batch):
    inputs, targets = batch
    pred = torch.tanh(inputs @ params["w"] + params["b"])
    return ((pred - targets) ** 2).mean()


def _sgd_step(params, batch, lr):
    """One inner SGD step with a torch.func inner gradient; ``lr`` a scalar or a per-leaf tree."""
    g = torch.func.grad(_inner_loss)(params, batch)
    if isinstance(lr, dict):
        return {k: params[k] - lr[k] * g[k] for k in params}
    return {k: params[k] - lr * g[k] for k in params}


def _reference_meta_loss(params, batches, lr, query):
    """The naive reference: a Python unroll with ``torch.autograd.grad(create_graph=True)``."""
    for i in range(batches[0].shape[0]):
        batch = (batches[0][i], batches[1][i])
        keys = sorted(params)
        g = torch.autograd.grad(
            _inner_loss(params, batch), [params[k] for k in keys], create_graph=True
        )
        rate = (lambda k: lr[k]) if isinstance(lr, dict) else (lambda k: lr)
        params = {k: params[k] - rate(k) * gk for k, gk in zip(keys, g, strict=True)}
    return _inner_loss(params, query)


def _maml_inputs(gen, steps=5):
    params = {"w": rand(gen, 3, 2, scale=0.5), "b": rand(gen, 2, scale=0.1)}
    batches = (rand(gen, steps, 4, 3), rand(gen, steps, 4, 2))
    query = (rand(gen, 6, 3), rand(gen, 6, 2))
    return params, batches, query


def _reference_meta_grad(params, batches, lr, query):
    leaves = [_requires_grad(params), _requires_grad(lr)]
    loss = _reference_meta_loss(leaves[0], batches, leaves[1], query)
    flat = optree.tree_leaves(leaves)
    grads = torch.autograd.grad(loss, flat)
    return optree.tree_unflatten(optree.tree_structure(leaves), grads)


@all_policies
@pytest.mark.parametrize("rates", ["scalar", "per_parameter"])
def test_learned_learning_rate_via_consts(policy, rates, gen):
    params, batches, query = _maml_inputs(gen)
    if rates == "scalar":
        lr = torch.tensor(0.4, dtype=F64)
    else:
        lr = {"w": torch.full((3, 2), 0.3, dtype=F64) + rand(gen, 3, 2, scale=0.05), "b": rand(gen)}

    def meta_loss(params, lr):
        def f(p, batch, lr):
            return _sgd_step(p, batch, lr), _inner_loss(p, batch)

        adapted, _ = fmaml.scan(f, params, batches, checkpoint=policy, consts=lr)
        return _inner_loss(adapted, query)

    got = grad(meta_loss, argnums=(0, 1))(params, lr)
    want = _reference_meta_grad(params, batches, lr, query)
    assert_trees_close(list(got), want, **TOL)


@all_policies
def test_learned_learning_rate_via_carry(policy, gen):
    params, batches, query = _maml_inputs(gen)
    lr = {"w": torch.tensor(0.5, dtype=F64), "b": torch.tensor(0.2, dtype=F64)}

    def meta_loss(params, lr):
        def f(carry, batch):
            # the rates ride along unchanged (the same tensor objects come back)
            return {"p": _sgd_step(carry["p"], batch, carry["lr"]), "lr": carry["lr"]}, None

        final, _ = fmaml.scan(f, {"p": params, "lr": lr}, batches, checkpoint=policy)
        return _inner_loss(final["p"], query)

    got = grad(meta_loss, argnums=(0, 1))(params, lr)
    want = _reference_meta_grad(params, batches, lr, query)
    assert_trees_close(list(got), want, **TOL)
    # and the meta-Hessian of the rates, through jacrev(grad)
    hess = jacrev(grad(meta_loss, argnums=1), argnums=1)(params, lr)

    # reference: plain autograd double backward through the naive unroll
    ref_lr = _requires_grad(lr)
    loss = _reference_meta_loss(_requires_grad(params), batches, ref_lr, query)
    keys = sorted(ref_lr)
    g = torch.autograd.grad(loss, [ref_lr[k] for k in keys], create_graph=True)
    rows = [torch.autograd.grad(gi, [ref_lr[k] for k in keys], retain_graph=True) for gi in g]
    want_hess = {a: {b: rows[i][j] for j, b in enumerate(keys)} for i, a in enumerate(keys)}
    assert_trees_close(hess, want_hess, **TOL)


@all_policies
def test_closed_form_meta_gradient(policy):
    # One linear layer, weight [[0.1, 0.2]], inputs [[1,2],[2,1],[2,2]], targets 0, loss mse * 3
    # (Hessian [[18,16],[16,18]]), inner lr 1e-3, two inner steps, outer loss on the same data:
    # g(w2) (I - lr H)(I - lr H) = [[4.341776216912, 4.540181010515]].
    inputs = torch.tensor([[1.0, 2.0], [2.0, 1.0], [2.0, 2.0]], dtype=F64)

    def loss(w):
        return F.mse_loss(inputs @ w.T, torch.zeros(3, 1, dtype=F64)) * 3

    def meta(w, lr):
        def f(w, _, lr):
            return w - lr * torch.func.grad(loss)(w), None

        return loss(fmaml.scan(f, w, length=2, checkpoint=policy, consts=lr)[0])

    w0 = torch.tensor([[0.1, 0.2]], dtype=F64)
    got = grad(meta)(w0, torch.tensor(1e-3, dtype=F64))
    torch.testing.assert_close(
        got, torch.tensor([[4.341776216912, 4.540181010515]], dtype=F64), rtol=1e-11, atol=0
    )


# --------------------------------------------------------------------------------------------
# random numbers inside the step are replayed exactly


def _dropout_step(c, x, A):
    h = torch.tanh(F.dropout(c, p=0.4, training=True) @ A + x)
    return h, F.dropout(h, p=0.2, training=True).sum()


def _dropout_loss(policy):
    def loss(init, xs, A):
        carry, ys = fmaml.scan(_dropout_step, init, xs, checkpoint=policy, consts=A)
        return (carry**2).sum() + ys.sum()

    return loss


def _seeded(fn, *args, seed=2024):
    torch.manual_seed(seed)
    out = fn(*args)
    return out, torch.get_rng_state()


@checkpointed_policies
def test_dropout_replays_under_grad(policy, gen):
    init, xs, A = rand(gen, 4), rand(gen, 9, 4), rand(gen, 4, 4, scale=0.5)
    g = grad(_dropout_loss(policy), argnums=(0, 2))
    ref = grad(_dropout_loss("store_all"), argnums=(0, 2))
    (got, state), (want, ref_state) = _seeded(g, init, xs, A), _seeded(ref, init, xs, A)
    assert_trees_close(got, want, **TOL)
    # the scan restores the generator after replaying: same state as a plain unroll
    assert torch.equal(state, ref_state)
    # and the dropout masks really differ between seeds (the test would notice a lost replay)
    other, _ = _seeded(ref, init, xs, A, seed=1)
    assert not torch.allclose(other[0], want[0])


@checkpointed_policies
@pytest.mark.parametrize("randomness", ["different", "same"])
def test_dropout_replays_under_vmap(policy, randomness, gen):
    inits, xs, A = rand(gen, 3, 4), rand(gen, 3, 6, 4), rand(gen, 4, 4, scale=0.5)

    def batched(policy):
        g = grad(_dropout_loss(policy), argnums=(0, 2))
        return vmap(g, in_dims=(0, 0, None), randomness=randomness)

    (got, state) = _seeded(batched(policy), inits, xs, A)
    (want, ref_state) = _seeded(batched("store_all"), inits, xs, A)
    assert_trees_close(got, want, **TOL)
    assert torch.equal(state, ref_state)


@checkpointed_policies
def test_dropout_replays_under_plain_backward_with_draws_in_between(policy, gen):
    init, xs, A = rand(gen, 4), rand(gen, 9, 4), rand(gen, 4, 4, scale=0.5)

    def run(policy):
        leaf = init.clone().requires_grad_()
        torch.manual_seed(5)
        loss = _dropout_loss(policy)(leaf, xs, A)
        noise = torch.rand(3)  # the user draws between forward and backward
        loss.backward()
        return loss.detach(), leaf.grad, noise, torch.get_rng_state()

    got, want = run(policy), run("store_all")
    assert_trees_close(got[:3], want[:3], **TOL)
    assert torch.equal(got[3], want[3])


# --------------------------------------------------------------------------------------------
# integer carry leaves


def _int_step(c, x, k):
    w, n = c["w"], c["n"]
    w2 = torch.sin(w * k) + x * n.to(w.dtype) / 10
    return {"w": w2, "n": n + 1}, {"w": w2, "n": n * 2}


@all_policies
def test_integer_carry_leaves(policy, gen):
    init = {"w": rand(gen, 3), "n": torch.tensor(1)}
    xs, k = rand(gen, 6, 3), torch.tensor(0.8, dtype=F64)

    def loss(policy):
        def fn(w, k):
            c0 = {"w": w, "n": init["n"]}
            if policy is None:
                carry, ys = reference_scan(_int_step, c0, xs, consts=k)
            else:
                carry, ys = fmaml.scan(_int_step, c0, xs, checkpoint=policy, consts=k)
            assert carry["n"].dtype == torch.int64 and int(carry["n"]) == 7
            assert ys["n"].tolist() == [2, 4, 6, 8, 10, 12]
            return (carry["w"] ** 2).sum() + ys["w"].sum()

        return fn

    assert_trees_close(
        grad(loss(policy), argnums=(0, 1))(init["w"], k),
        grad(loss(None), argnums=(0, 1))(init["w"], k),
        **TOL,
    )
    assert_trees_close(
        jacrev(grad(loss(policy)))(init["w"], k), jacrev(grad(loss(None)))(init["w"], k), **TOL
    )
    # plain autograd: the integer outputs do not require grad, the float ones do
    w = init["w"].clone().requires_grad_()
    carry, ys = fmaml.scan(_int_step, {"w": w, "n": init["n"]}, xs, checkpoint=policy, consts=k)
    assert not carry["n"].requires_grad and not ys["n"].requires_grad
    assert carry["w"].requires_grad
    ((carry["w"] ** 2).sum() + ys["w"].sum()).backward()
    torch.testing.assert_close(w.grad, grad(loss(None))(init["w"], k), **TOL)


# --------------------------------------------------------------------------------------------
# property test: random length, policy and carry structure


_SHAPES = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)

_POLICY = st.one_of(
    st.sampled_from(["store_all", "sqrt", "binomial", "auto"]),
    st.integers(1, 10).map(fmaml.Binomial),
    st.integers(1, 12).map(fmaml.Uniform),
    st.integers(1, 6).map(lambda s: fmaml.Auto(max_snapshots=s)),
)


@st.composite
def _carry_structure(draw):
    """1-3 float leaves with small shapes, in a dict, a tuple, or nested."""
    shapes = draw(st.lists(_SHAPES, min_size=1, max_size=3))
    kind = draw(st.sampled_from(["dict", "tuple", "nested"]))
    return kind, shapes


def _build_carry(kind, leaves):
    if kind == "dict":
        return {f"k{i}": t for i, t in enumerate(leaves)}
    if kind == "tuple":
        return tuple(leaves)
    return {"head": leaves[0], "rest": [tuple(leaves[1:]), None]}


class _Problem(NamedTuple):
    """The property tests' scan: a carry of random structure, ``length`` steps of a tanh map with
    constants; ``loss(policy)(leaves, consts)`` runs ``fmaml.scan`` (the reference loop for
    ``policy=None``)."""

    gen: torch.Generator
    kind: str
    leaves: list
    xs: torch.Tensor
    consts: dict
    f: Callable
    loss: Callable


def _property_problem(length, structure, seed):
    kind, shapes = structure
    gen = torch.Generator().manual_seed(seed)
    leaves = [rand(gen, *s, scale=0.5) for s in shapes]
    xs = rand(gen, length, 2)
    consts = {"a": rand(gen, scale=0.3), "b": rand(gen, 2, scale=0.3)}

    def f(carry, x, k):
        def update(t):
            return torch.tanh(t * (1 + k["a"]) + (x * k["b"]).sum()) * 0.9

        new = optree.tree_map(update, carry)
        return new, sum(t.sum() for t in optree.tree_leaves(new))

    def loss(policy):
        def fn(leaves, consts):
            init = _build_carry(kind, leaves)  # built inside: torch.func refuses None leaves
            if policy is None:
                carry, ys = reference_scan(f, init, xs, length=length, consts=consts)
                ys = torch.zeros(0, dtype=F64) if ys is None else ys
            else:
                carry, ys = fmaml.scan(f, init, xs, checkpoint=policy, consts=consts)
            return sum((t**2).sum() for t in optree.tree_leaves(carry)) + (ys**3).sum()

        return fn

    return _Problem(gen, kind, leaves, xs, consts, f, loss)


@given(
    length=st.integers(0, 64),
    policy=_POLICY,
    structure=_carry_structure(),
    seed=st.integers(0, 2**16),
)
def test_property_values_and_grads(length, policy, structure, seed):
    _, kind, leaves, xs, consts, f, loss = _property_problem(length, structure, seed)

    init = _build_carry(kind, leaves)
    got_carry, got_ys = fmaml.scan(f, init, xs, checkpoint=policy, consts=consts)
    ref_carry, ref_ys = reference_scan(f, init, xs, length=length, consts=consts)
    assert_trees_close(got_carry, ref_carry, rtol=0, atol=0)
    if length:
        assert_trees_close(got_ys, ref_ys, rtol=0, atol=0)
    else:
        assert got_ys.shape == (0,)
    got = grad(loss(policy), argnums=(0, 1))(leaves, consts)
    want = grad(loss(None), argnums=(0, 1))(leaves, consts)
    assert_trees_close(got, want, **TOL)
