"""Forward-mode AD through ``fmaml.scan``, every policy against ``store_all`` and the reference.

Covers, in float64 at 1e-10: ``jvp`` (tangents on init, xs and consts, and on some of them),
``jacfwd``, ``vmap`` over tangents and over inputs, ``torch.func.hessian``, forward over reverse
(``jvp(grad)``, ``jacfwd(jacrev)``), reverse over forward (``grad(jvp)``, ``jacrev(jacfwd)``),
integer carry leaves, dropout replay, nested scans, plain ``torch.autograd.forward_ad``, a
learned learning rate (MAML) with an inner gradient in the step, the errors for what stays
unsupported, and a hypothesis property test over lengths, policies and carry structures.
The memory of forward mode is tested in ``test_scan_memory.py``.
"""

from __future__ import annotations

import optree
import pytest
import torch
import torch.autograd.forward_ad as fwAD
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
from test_scan_transforms import (
    _POLICY,
    _carry_structure,
    _inputs,
    _int_step,
    _loss_fn,
    _property_problem,
    _scan_fn,
)
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fmaml

TOL = {"rtol": 1e-10, "atol": 1e-10}


def _tangents(gen, tree):
    return optree.tree_map(lambda t: rand(gen, *t.shape), tree)


def _dot(a, b):
    pairs = zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True)
    return sum((x * y).sum() for x, y in pairs)


def _norm(tree):
    return sum(float((t**2).sum()) for t in optree.tree_leaves(tree)) ** 0.5


# --------------------------------------------------------------------------------------------
# forward mode alone


@all_policies
def test_jvp_wrt_init_xs_and_consts(policy, gen):
    args = _inputs(gen)
    tangents = _tangents(gen, args)
    got = jvp(_scan_fn(policy), args, tangents)
    want = jvp(_scan_fn(None), args, tangents)
    assert_trees_close(got, want, **TOL)
    assert _norm(want[1]) > 1.0  # the tangents are not trivially zero
    # against reverse mode, which the other test files check against the reference:
    # <u, J v> = <J^T u, v> for a random cotangent u
    out, pullback = vjp(_scan_fn(policy), *args)
    u = _tangents(gen, out)
    lhs = _dot(u, got[1])
    rhs = _dot(pullback(u), tangents)
    torch.testing.assert_close(lhs, rhs, **TOL)


@all_policies
@pytest.mark.parametrize("wrt", [0, 1, 2])
def test_jvp_wrt_one_argument(policy, wrt, gen):
    args = _inputs(gen)
    tangent = _tangents(gen, args[wrt])

    def fn(policy):
        def run(a):
            return _scan_fn(policy)(*(a if i == wrt else args[i] for i in range(3)))

        return run

    assert_trees_close(
        jvp(fn(policy), (args[wrt],), (tangent,)), jvp(fn(None), (args[wrt],), (tangent,)), **TOL
    )


@all_policies
def test_jacfwd_is_jacrev(policy, gen):
    args = _inputs(gen)
    got = jacfwd(_loss_fn(policy), argnums=(0, 1, 2))(*args)
    assert_trees_close(got, jacfwd(_loss_fn(None), argnums=(0, 1, 2))(*args), **TOL)
    assert_trees_close(got, jacrev(_loss_fn(None), argnums=(0, 1, 2))(*args), **TOL)


@all_policies
def test_vmap_of_jvp(policy, gen):
    args = _inputs(gen)
    batch = [_tangents(gen, args) for _ in range(3)]
    stacked = optree.tree_map(lambda *t: torch.stack(t), *batch)

    def tangent_of(policy):
        return lambda t: jvp(_scan_fn(policy), args, t)[1]

    got = vmap(tangent_of(policy))(stacked)
    want = optree.tree_map(lambda *t: torch.stack(t), *(tangent_of(None)(t) for t in batch))
    assert_trees_close(got, want, **TOL)
    # and a batch of inputs (tasks), each with its tangent
    inits = optree.tree_map(lambda t: torch.stack([t, 2 * t, -t]), args[0])
    d_inits = optree.tree_map(lambda t: rand(gen, 3, *t.shape), args[0])

    def per_task(policy):
        return lambda i, d: jvp(lambda i: _scan_fn(policy)(i, *args[1:]), (i,), (d,))

    got = vmap(per_task(policy))(inits, d_inits)
    rows = [
        per_task(None)(*(optree.tree_map(lambda t, b=b: t[b], tree) for tree in (inits, d_inits)))
        for b in range(3)
    ]
    assert_trees_close(got, optree.tree_map(lambda *t: torch.stack(t), *rows), **TOL)


# --------------------------------------------------------------------------------------------
# forward over reverse, reverse over forward


@all_policies
def test_jvp_of_grad(policy, gen):
    args = _inputs(gen)
    tangents = _tangents(gen, args)
    got = jvp(grad(_loss_fn(policy), argnums=(0, 1, 2)), args, tangents)
    want = jvp(grad(_loss_fn(None), argnums=(0, 1, 2)), args, tangents)
    assert_trees_close(got, want, **TOL)
    assert _norm(want[1]) > 1.0


@all_policies
def test_hessian_and_jacfwd_of_jacrev(policy, gen):
    init, xs, consts = _inputs(gen)

    def loss(policy):
        return lambda w, A: _loss_fn(policy)({**init, "w": w}, xs, {**consts, "A": A})

    args = (init["w"], consts["A"])
    want = jacrev(jacrev(loss(None), argnums=(0, 1)), argnums=(0, 1))(*args)
    assert_trees_close(hessian(loss(policy), argnums=(0, 1))(*args), want, **TOL)
    got = jacfwd(jacrev(loss(policy), argnums=(0, 1)), argnums=(0, 1))(*args)
    assert_trees_close(got, want, **TOL)
    assert want[1][1].abs().max() > 1e-3


@all_policies
def test_reverse_over_forward(policy, gen):
    args = _inputs(gen)
    tangents = _tangents(gen, args)

    def tangent_loss(policy):
        def fn(*args):
            carry, ys = jvp(_scan_fn(policy), args, tangents)[1]
            return (carry["w"] ** 2).sum() + (ys["loss"] * ys["w"].sum(-1)).sum()

        return fn

    got = grad(tangent_loss(policy), argnums=(0, 1, 2))(*args)
    assert_trees_close(got, grad(tangent_loss(None), argnums=(0, 1, 2))(*args), **TOL)
    init, xs, consts = args

    def loss(policy):
        return lambda w: _loss_fn(policy)({**init, "w": w}, xs, consts)

    got = jacrev(jacfwd(loss(policy)))(init["w"])
    assert_trees_close(got, jacrev(jacrev(loss(None)))(init["w"]), **TOL)


# --------------------------------------------------------------------------------------------
# special carries and steps


@all_policies
def test_integer_carry_leaves(policy, gen):
    w, xs, k = rand(gen, 3), rand(gen, 6, 3), torch.tensor(0.8, dtype=F64)

    def run(policy):
        def fn(w, k):
            c0 = {"w": w, "n": torch.tensor(1)}
            return fmaml.scan(_int_step, c0, xs, checkpoint=policy, consts=k)

        return fn

    tangents = (rand(gen, 3), torch.tensor(0.3, dtype=F64))
    (carry, ys), (d_carry, d_ys) = jvp(run(policy), (w, k), tangents)
    assert int(carry["n"]) == 7 and ys["n"].tolist() == [2, 4, 6, 8, 10, 12]
    assert not d_carry["n"].is_floating_point()  # torch.func's tangent of an integer output
    want = jvp(run("store_all"), (w, k), tangents)[1]
    assert_trees_close((d_carry["w"], d_ys["w"]), (want[0]["w"], want[1]["w"]), **TOL)

    def loss(policy):
        def fn(w, k):
            carry, ys = run(policy)(w, k)
            return (carry["w"] ** 2).sum() + ys["w"].sum()

        return fn

    assert_trees_close(
        jvp(grad(loss(policy), argnums=(0, 1)), (w, k), tangents),
        jvp(grad(loss("store_all"), argnums=(0, 1)), (w, k), tangents),
        **TOL,
    )


def _dropout_loss(policy):
    def loss(init, A):
        def step(c, x, A):
            h = torch.tanh(F.dropout(c, p=0.4, training=True) @ A + x)
            return h, F.dropout(h, p=0.2, training=True).sum()

        xs = torch.linspace(-1, 1, 27, dtype=F64).reshape(9, 3)
        carry, ys = fmaml.scan(step, init, xs, checkpoint=policy, consts=A)
        return (carry**2).sum() + ys.sum()

    return loss


@checkpointed_policies
def test_dropout_replays_under_forward_over_reverse(policy, gen):
    args = (rand(gen, 3), rand(gen, 3, 3, scale=0.5))
    tangents = (rand(gen, 3), rand(gen, 3, 3))

    def seeded(policy, seed=11):
        torch.manual_seed(seed)
        out = jvp(grad(_dropout_loss(policy), argnums=(0, 1)), args, tangents)
        return out, torch.get_rng_state()

    (got, state), (want, ref_state) = seeded(policy), seeded("store_all")
    assert_trees_close(got, want, **TOL)
    assert torch.equal(state, ref_state)  # the generator is left as a plain loop leaves it
    other, _ = seeded("store_all", seed=12)
    assert not torch.allclose(other[1][0], want[1][0])  # the masks matter


@checkpointed_policies
def test_nested_scans(policy, gen):
    xs, w = rand(gen, 4, 3), rand(gen, 3)
    lr = torch.tensor(0.3, dtype=F64)

    def outer(policy):
        def fn(w, lr):
            def step(c, x, lr):
                inner, _ = fmaml.scan(
                    lambda d, _, k: (d - k[0] * torch.tanh(d + k[1]), None),
                    c,
                    length=3,
                    checkpoint=policy,
                    consts=(lr, x),  # passed, not closed over: vmap (jacfwd) wraps x
                )
                return inner, (inner**2).sum()

            carry, ys = fmaml.scan(step, w, xs, checkpoint=policy, consts=lr)
            return (carry**3).sum() + ys.sum()

        return fn

    tangents = (rand(gen, 3), torch.tensor(0.7, dtype=F64))
    assert_trees_close(
        jvp(outer(policy), (w, lr), tangents), jvp(outer("store_all"), (w, lr), tangents), **TOL
    )
    assert_trees_close(
        hessian(outer(policy), argnums=(0, 1))(w, lr),
        hessian(outer("store_all"), argnums=(0, 1))(w, lr),
        **TOL,
    )


@pytest.mark.parametrize("policy", ["binomial", "auto"], ids=str)
def test_long_scan_per_step_outputs(policy, gen):
    """300 steps: the per-step outputs and their tangents are stacked in chunks of 256."""
    xs, w, a = rand(gen, 300, 2, scale=0.5), rand(gen, 2), torch.tensor(0.9, dtype=F64)

    def run(policy):
        def fn(w, a):
            def step(c, x, a):
                c = torch.tanh(a * c + x)
                return c, {"sum": c.sum(), "n": (c > 0).sum(), "c": c}

            if policy is None:
                return reference_scan(step, w, xs, consts=a)
            return fmaml.scan(step, w, xs, checkpoint=policy, consts=a)

        return fn

    def loss(policy):
        def fn(w, a):
            carry, ys = run(policy)(w, a)
            return (carry**2).sum() + (ys["sum"] * ys["c"][:, 0]).sum()

        return fn

    tangents = (rand(gen, 2), torch.tensor(0.5, dtype=F64))
    (out, d_out), (ref, d_ref) = (jvp(run(p), (w, a), tangents) for p in (policy, None))
    assert out[1]["n"].tolist() == ref[1]["n"].tolist()
    floats = [(t[0], t[1]["sum"], t[1]["c"]) for t in (out, d_out, ref, d_ref)]
    assert_trees_close(floats[:2], floats[2:], **TOL)
    assert_trees_close(
        jvp(grad(loss(policy), argnums=(0, 1)), (w, a), tangents),
        jvp(grad(loss(None), argnums=(0, 1)), (w, a), tangents),
        **TOL,
    )


# --------------------------------------------------------------------------------------------
# a learned learning rate: an inner gradient inside the step (MAML)


def _maml_loss(policy):
    """The query loss after 5 inner SGD steps, with the rate ``lr`` passed as ``consts``."""

    def inner(params, batch):
        inputs, targets = batch
        return ((torch.tanh(inputs @ params["w"] + params["b"]) - targets) ** 2).mean()

    def meta_loss(params, lr, batches, query):
        def step(p, batch, lr):
            g = torch.func.grad(inner)(p, batch)
            return {k: p[k] - lr[k] * g[k] for k in p}, inner(p, batch)

        adapted, history = fmaml.scan(step, params, batches, checkpoint=policy, consts=lr)
        return inner(adapted, query) + 0.1 * history.sum()

    return meta_loss


@all_policies
def test_learned_rates_forward_mode(policy, gen):
    params = {"w": rand(gen, 3, 2, scale=0.5), "b": rand(gen, 2, scale=0.1)}
    lr = {"w": torch.tensor(0.4, dtype=F64), "b": torch.tensor(0.2, dtype=F64)}
    batches = (rand(gen, 5, 4, 3), rand(gen, 5, 4, 2))
    query = (rand(gen, 6, 3), rand(gen, 6, 2))
    args = (params, lr, batches, query)
    # the hypergradient by forward mode, against reverse mode through the reference loop
    got = jacfwd(_maml_loss(policy), argnums=1)(*args)
    ref = torch.func.grad(_maml_loss("store_all"), argnums=1)(*args)
    assert_trees_close(got, ref, **TOL)
    # the hyper-Hessian, forward over reverse, against reverse over reverse
    got = jacfwd(grad(_maml_loss(policy), argnums=1), argnums=1)(*args)
    want = jacrev(grad(_maml_loss("store_all"), argnums=1), argnums=1)(*args)
    assert_trees_close(got, want, **TOL)
    # mixed: the tangent of the meta-gradient of the parameters along the rates
    d_lr = {"w": torch.tensor(1.0, dtype=F64), "b": torch.tensor(-0.5, dtype=F64)}

    def meta_grad(policy):
        return lambda lr: grad(_maml_loss(policy))(params, lr, batches, query)

    assert_trees_close(
        jvp(meta_grad(policy), (lr,), (d_lr,)), jvp(meta_grad("store_all"), (lr,), (d_lr,)), **TOL
    )


@checkpointed_policies
def test_mse_loss_bug_of_pytorch_is_named(policy, gen):
    """PyTorch's F.mse_loss (reduction='mean') raises "ZeroTensors are immutable" under
    ``jvp`` of a gradient through an inner gradient (pytorch/pytorch#123996). Where the bug is
    present, fmaml says so; where it is fixed, the result is right."""
    x, y, w = rand(gen, 4, 3), rand(gen, 4), rand(gen, 3)
    lr = torch.tensor(0.1, dtype=F64)

    def meta(policy, lr):
        def step(w, _, lr):
            return w - lr * torch.func.grad(lambda w: F.mse_loss(x @ w, y))(w), None

        return F.mse_loss(x @ fmaml.scan(step, w, length=3, checkpoint=policy, consts=lr)[0], y)

    def run(policy):
        return jvp(grad(lambda lr: meta(policy, lr)), (lr,), (torch.ones_like(lr),))

    try:
        got = run(policy)
    except RuntimeError as error:
        assert "pytorch/pytorch#123996" in str(error)
        assert "((out - y) ** 2).mean()" in str(error)
    else:
        assert_trees_close(got, run("store_all"), **TOL)


# --------------------------------------------------------------------------------------------
# plain torch.autograd.forward_ad


@all_policies
def test_plain_forward_ad(policy, gen):
    init, xs, consts = _inputs(gen)
    d_w = rand(gen, 3)
    with fwAD.dual_level():
        w = fwAD.make_dual(init["w"], d_w)
        got = fwAD.unpack_dual(_loss_fn(policy)({**init, "w": w}, xs, consts)).tangent
    want = jvp(lambda w: _loss_fn(None)({**init, "w": w}, xs, consts), (init["w"],), (d_w,))[1]
    torch.testing.assert_close(got, want, **TOL)


# --------------------------------------------------------------------------------------------
# what stays unsupported raises, naming the way out


@checkpointed_policies
def test_plain_forward_ad_over_reverse_raises(policy, gen):
    init, xs, consts = _inputs(gen)
    with fwAD.dual_level():
        w = fwAD.make_dual(init["w"].clone().requires_grad_(), rand(gen, 3))
        with pytest.raises(NotImplementedError, match=r"forward_ad.*torch\.func\.jvp.*store_all"):
            _loss_fn(policy)({**init, "w": w}, xs, consts)
    # store_all is a plain loop, which plain autograd handles
    with fwAD.dual_level():
        leaf = init["w"].clone().requires_grad_()
        w = fwAD.make_dual(leaf, rand(gen, 3))
        (g,) = torch.autograd.grad(_loss_fn("store_all")({**init, "w": w}, xs, consts), leaf)
    assert torch.isfinite(g).all()


@checkpointed_policies
def test_closure_over_a_forward_mode_input_raises(policy, gen):
    xs, w = rand(gen, 5, 3), rand(gen, 3)

    def meta_grad(policy):
        def fn(a):  # `a` is jvp's input; the step closes over it
            def loss(w):
                step = lambda c, x: (torch.tanh(c * a + x), None)  # noqa: E731
                return (fmaml.scan(step, w, xs, checkpoint=policy)[0] ** 2).sum()

            return grad(loss)(w)

        return fn

    a, d_a = torch.tensor(0.7, dtype=F64), torch.tensor(1.0, dtype=F64)
    with pytest.raises(ValueError, match=r"closes over a tensor .* forward mode.*consts="):
        jvp(meta_grad(policy), (a,), (d_a,))
    # store_all's plain loop sees the closure; forward mode alone needs no backward pass at all
    want = jvp(meta_grad("store_all"), (a,), (d_a,))
    assert _norm(want[1]) > 0

    def final(policy):
        def fn(a):
            def step(c, x):
                return c * a + x, None

            if policy is None:
                return reference_scan(step, w, xs)[0]
            return fmaml.scan(step, w, xs, checkpoint=policy)[0]

        return fn

    assert_trees_close(jvp(final(policy), (a,), (d_a,)), jvp(final(None), (a,), (d_a,)), **TOL)


# --------------------------------------------------------------------------------------------
# property test


@given(
    length=st.integers(0, 24),
    policy=_POLICY,
    structure=_carry_structure(),
    seed=st.integers(0, 2**16),
)
def test_property_forward_mode(length, policy, structure, seed):
    gen, _, leaves, _, consts, _, loss = _property_problem(length, structure, seed)

    tangents = (_tangents(gen, leaves), _tangents(gen, consts))
    args = (leaves, consts)
    assert_trees_close(jvp(loss(policy), args, tangents), jvp(loss(None), args, tangents), **TOL)
    assert_trees_close(
        jvp(grad(loss(policy), argnums=(0, 1)), args, tangents),
        jvp(grad(loss(None), argnums=(0, 1)), args, tangents),
        **TOL,
    )
