"""``fmaml.optim`` against ``torch.optim`` and against naive unrolls, in float64.

Covered: every optimizer's trajectory equals the ``torch.optim`` optimizer run on a copy;
meta-gradients through ``k`` optimizer steps inside ``fmaml.scan`` (carry ``(params, state)``,
learned rates as ``consts=``) equal a naive Python unroll differentiated with ``torch.func.grad``,
for several checkpoint policies, with respect to the initial parameters and the learned rates;
``clip_by_global_norm`` against ``clip_grad_norm_``; ``chain``; ``clip_backward``; errors.
"""

from __future__ import annotations

import math

import optree
import pytest
import torch
from _models import single_thread  # noqa: F401 (autouse fixture)
from conftest import F64, assert_trees_close, policy_id
from hypothesis import given
from hypothesis import strategies as st
from torch.func import grad, jacrev, vmap

import fmaml
import fmaml.optim as optim

TOL = {"rtol": 1e-10, "atol": 1e-12}
POLICIES = [fmaml.StoreAll(), "binomial", fmaml.Binomial(2), "sqrt"]


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=F64) * scale


# --------------------------------------------------------------------------------------------
# problems: a coupled quadratic on any pytree of shapes, and a small MLP


def quadratic(gen: torch.Generator, shapes: dict[str, tuple[int, ...]]):
    """``L(p) = Σ ½ a ⊙ (p - t)² + 0.1 (Σ tanh p)²``: a diagonal quadratic, coupled by tanh."""
    a = {n: randn(gen, *s).abs() + 0.5 for n, s in shapes.items()}
    t = {n: randn(gen, *s) for n, s in shapes.items()}
    params = {n: randn(gen, *s) for n, s in shapes.items()}

    def loss(p):
        quad = sum((0.5 * a[n] * (p[n] - t[n]) ** 2).sum() for n in p)
        return quad + 0.1 * sum(torch.tanh(p[n]).sum() for n in p) ** 2

    return params, loss


def mlp_problem(gen: torch.Generator):
    """A 3-4-2 tanh MLP; ``loss(params, (x, y))`` is the mean squared error."""
    params = {
        "w1": randn(gen, 3, 4, scale=0.7),
        "b1": randn(gen, 4, scale=0.1),
        "w2": randn(gen, 4, 2, scale=0.7),
        "b2": randn(gen, 2, scale=0.1),
    }

    def loss(p, batch):
        x, y = batch
        out = torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return ((out - y) ** 2).mean()

    support = (randn(gen, 6, 3), randn(gen, 6, 2))
    query = (randn(gen, 5, 3), randn(gen, 5, 2))
    return params, loss, support, query


# --------------------------------------------------------------------------------------------
# 1. trajectories equal torch.optim's


def _torch_plain(cls, **kw):
    def make(ps):
        opt = cls(ps, **kw)

        def step(loss):
            opt.zero_grad()
            loss().backward()
            opt.step()

        return step

    return make


def _torch_clip_adam(max_norm, **kw):
    def make(ps):
        opt = torch.optim.Adam(ps, foreach=False, **kw)

        def step(loss):
            opt.zero_grad()
            loss().backward()
            torch.nn.utils.clip_grad_norm_(ps, max_norm)
            opt.step()

        return step

    return make


SGD, ADAM, RMS = torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop
TORCH_CASES = {
    "sgd": (lambda: optim.sgd(0.1), _torch_plain(SGD, lr=0.1)),
    "momentum": (lambda: optim.momentum(0.1, 0.9), _torch_plain(SGD, lr=0.1, momentum=0.9)),
    "nesterov": (
        lambda: optim.momentum(0.05, beta=0.8, nesterov=True),
        _torch_plain(SGD, lr=0.05, momentum=0.8, nesterov=True),
    ),
    "adam": (lambda: optim.adam(0.05), _torch_plain(ADAM, lr=0.05, foreach=False)),
    "adam-betas": (
        lambda: optim.adam(0.02, b1=0.5, b2=0.9, eps=1e-3),
        _torch_plain(ADAM, lr=0.02, betas=(0.5, 0.9), eps=1e-3, foreach=False),
    ),
    "rmsprop": (lambda: optim.rmsprop(0.01), _torch_plain(RMS, lr=0.01, foreach=False)),
    "rmsprop-momentum": (
        lambda: optim.rmsprop(0.01, decay=0.9, momentum=0.5),
        _torch_plain(RMS, lr=0.01, alpha=0.9, momentum=0.5, foreach=False),
    ),
    "rmsprop-centered": (
        lambda: optim.rmsprop(0.01, centered=True),
        _torch_plain(RMS, lr=0.01, centered=True, foreach=False),
    ),
    "rmsprop-centered-momentum": (
        lambda: optim.rmsprop(0.02, decay=0.95, eps=1e-6, momentum=0.7, centered=True),
        _torch_plain(RMS, lr=0.02, alpha=0.95, eps=1e-6, momentum=0.7, centered=True),
    ),
    "sgd-weight-decay": (
        lambda: optim.chain(optim.add_decayed_weights(0.1), optim.momentum(0.1, 0.9)),
        _torch_plain(SGD, lr=0.1, momentum=0.9, weight_decay=0.1),
    ),
    "adam-weight-decay": (
        lambda: optim.chain(optim.add_decayed_weights(0.01), optim.adam(0.05)),
        _torch_plain(ADAM, lr=0.05, weight_decay=0.01, foreach=False),
    ),
    "clip-adam": (
        lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.adam(0.05)),
        _torch_clip_adam(0.5, lr=0.05),
    ),
}
torch_cases = pytest.mark.parametrize("case", list(TORCH_CASES))


def ours_trajectory(opt, params, loss, k):
    state, out = opt.init(params), []
    for _ in range(k):
        updates, state = opt.update(grad(loss)(params), state, params)
        params = optim.apply_updates(params, updates)
        out.append(params)
    return out


def torch_trajectory(make_step, params, loss, k):
    ps = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    step = make_step(list(ps.values()))
    out = []
    for _ in range(k):
        step(lambda: loss(ps))
        out.append({n: p.detach().clone() for n, p in ps.items()})
    return out


@torch_cases
def test_trajectory_equals_torch_optim_on_mlp(case):
    ours, theirs = TORCH_CASES[case]
    params, loss, support, _ = mlp_problem(torch.Generator().manual_seed(0))
    k = 8
    expected = torch_trajectory(theirs, params, lambda p: loss(p, support), k)
    actual = ours_trajectory(ours(), params, lambda p: loss(p, support), k)
    for a, e in zip(actual, expected, strict=True):
        assert_trees_close(a, e, **TOL)
    assert not torch.allclose(actual[-1]["w1"], params["w1"])  # it moved


shapes_st = st.dictionaries(
    st.sampled_from("abcd"), st.lists(st.integers(1, 3), max_size=2).map(tuple), min_size=1
)


@torch_cases
@given(shapes=shapes_st, k=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_trajectory_equals_torch_optim_on_quadratics(case, shapes, k, seed):
    ours, theirs = TORCH_CASES[case]
    params, loss = quadratic(torch.Generator().manual_seed(seed), shapes)
    expected = torch_trajectory(theirs, params, loss, k)
    actual = ours_trajectory(ours(), params, loss, k)
    for a, e in zip(actual, expected, strict=True):
        assert_trees_close(a, e, **TOL)


def test_state_is_a_pytree_of_tensors_with_an_integer_count():
    params = {"w": torch.zeros(2, 3, dtype=F64), "b": torch.zeros(3, dtype=F64)}
    state = optim.adam().init(params)
    assert isinstance(state, optim.AdamState)
    assert state.count.dtype == torch.int64 and state.count.dim() == 0
    leaves = optree.tree_leaves(state)
    assert len(leaves) == 5 and all(isinstance(t, torch.Tensor) for t in leaves)
    _, state = optim.adam().update(params, state, params)
    assert int(state.count) == 1
    init, _ = optim.sgd(0.1)  # a plain pair, as in optax
    assert optree.tree_leaves(init(params)) == []
    plain = optim.rmsprop().init(params)
    assert plain.grad_avg == () and plain.buf == ()


# --------------------------------------------------------------------------------------------
# 2. meta-gradients through fmaml.scan equal a naive unroll


def _meta_sgd():
    return optim.meta_sgd(), 0.1


META_CASES = {
    "sgd": lambda: (optim.sgd(0.3), None),
    "momentum": lambda: (optim.momentum(0.2, 0.9), None),
    "nesterov": lambda: (optim.momentum(0.2, 0.9, nesterov=True), None),
    "adam": lambda: (optim.adam(0.05), None),
    "rmsprop": lambda: (optim.rmsprop(0.01), None),
    "rmsprop-centered-momentum": lambda: (
        optim.rmsprop(0.01, momentum=0.5, centered=True),
        None,
    ),
    "clip-adam": lambda: (optim.chain(optim.clip_by_global_norm(0.3), optim.adam(0.05)), None),
    "meta_sgd": lambda: (optim.meta_sgd(), 0.2),
    "scalar_lr": lambda: (optim.scalar_lr(), 0.2),
    "per_layer_lr": lambda: (optim.per_layer_lr(), 0.2),
    "clip-meta_sgd": lambda: (optim.chain(optim.clip_by_global_norm(0.3), optim.meta_sgd()), 0.2),
}
meta_cases = pytest.mark.parametrize("case", list(META_CASES))
policies = pytest.mark.parametrize("policy", POLICIES, ids=policy_id)


def scan_meta_loss(opt, loss, support, query, k, policy, clip=None):
    def step(carry, _, consts):
        params, state = carry
        batch, hyper = consts
        if clip is not None:
            params = optim.clip_backward(params, clip)
        updates, state = opt.update(grad(loss)(params, batch), state, params, hyper)
        return (optim.apply_updates(params, updates), state), None

    def meta_loss(params, hyper=None):
        init = (params, opt.init(params))
        (adapted, _), _ = fmaml.scan(
            step, init, length=k, checkpoint=policy, consts=(support, hyper)
        )
        return loss(adapted, query)

    return meta_loss


def naive_meta_loss(opt, loss, support, query, k, clip=None):
    def meta_loss(params, hyper=None):
        state = opt.init(params)
        for _ in range(k):
            if clip is not None:
                params = optim.clip_backward(params, clip)
            updates, state = opt.update(grad(loss)(params, support), state, params, hyper)
            params = optim.apply_updates(params, updates)
        return loss(params, query)

    return meta_loss


def _meta_grads(meta_loss, params, hyper):
    if hyper is None:
        return grad(meta_loss)(params)
    return grad(meta_loss, argnums=(0, 1))(params, hyper)


@meta_cases
@policies
def test_meta_gradient_through_scan_equals_naive_unroll(case, policy):
    opt, rate = META_CASES[case]()
    params, loss, support, query = mlp_problem(torch.Generator().manual_seed(1))
    hyper = None if rate is None else opt.init_hyper(params, rate)
    k = 6
    ours = scan_meta_loss(opt, loss, support, query, k, policy)
    naive = naive_meta_loss(opt, loss, support, query, k)
    torch.testing.assert_close(ours(params, hyper), naive(params, hyper), **TOL)
    actual = _meta_grads(ours, params, hyper)
    expected = _meta_grads(naive, params, hyper)
    assert_trees_close(actual, expected, **TOL)
    assert all(torch.isfinite(t).all() for t in optree.tree_leaves(actual))


@pytest.mark.parametrize("case", ["adam", "rmsprop-centered-momentum", "meta_sgd"])
@given(k=st.integers(1, 9), snapshots=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_meta_gradient_any_length_and_snapshots(case, k, snapshots, seed):
    opt, rate = META_CASES[case]()
    params, loss, support, query = mlp_problem(torch.Generator().manual_seed(seed))
    hyper = None if rate is None else opt.init_hyper(params, rate)
    ours = scan_meta_loss(opt, loss, support, query, k, fmaml.Binomial(snapshots))
    naive = naive_meta_loss(opt, loss, support, query, k)
    assert_trees_close(_meta_grads(ours, params, hyper), _meta_grads(naive, params, hyper), **TOL)


@pytest.mark.parametrize("case", ["adam", "clip-meta_sgd"])
def test_meta_gradient_per_task_under_vmap(case):
    """vmap over tasks (the MAML layer's batching) equals a loop over tasks, hyper shared."""
    gen = torch.Generator().manual_seed(2)
    params, loss, _, _ = mlp_problem(gen)
    opt, rate = META_CASES[case]()
    hyper = None if rate is None else opt.init_hyper(params, rate)
    tasks = [(randn(gen, 3, 6, 3), randn(gen, 3, 6, 2)), (randn(gen, 3, 5, 3), randn(gen, 3, 5, 2))]

    def task_grad(support, query):
        meta_loss = scan_meta_loss(opt, loss, support, query, 4, "binomial")
        return _meta_grads(meta_loss, params, hyper)

    batched = vmap(task_grad)(tasks[0], tasks[1])
    for t in range(3):
        one = task_grad((tasks[0][0][t], tasks[0][1][t]), (tasks[1][0][t], tasks[1][1][t]))
        assert_trees_close(optree.tree_map(lambda x, t=t: x[t], batched), one, **TOL)


@pytest.mark.parametrize("make", [optim.scalar_lr, optim.per_layer_lr, optim.meta_sgd])
def test_learned_rate_gradient_matches_finite_differences(make):
    opt = make()
    params, loss, support, query = mlp_problem(torch.Generator().manual_seed(3))
    meta_loss = scan_meta_loss(opt, loss, support, query, 4, "binomial")
    hyper = opt.init_hyper(params, 0.3)
    leaves, spec = optree.tree_flatten(hyper)
    leaves = [t.requires_grad_() for t in leaves]
    assert torch.autograd.gradcheck(
        lambda *ls: meta_loss(params, optree.tree_unflatten(spec, list(ls))), tuple(leaves)
    )


def test_init_hyper_structures():
    params = {"w": torch.zeros(2, 3, dtype=F64), "b": torch.zeros(3, dtype=F64)}
    per = optim.meta_sgd().init_hyper(params, 0.1)
    assert per["lr"]["w"].shape == (2, 3) and per["lr"]["w"].dtype == F64
    assert torch.equal(per["lr"]["b"], torch.full((3,), 0.1, dtype=F64))
    layer = optim.per_layer_lr().init_hyper(params, 0.1)
    assert {n: t.shape for n, t in layer["lr"].items()} == {"w": (), "b": ()}
    scalar = optim.scalar_lr().init_hyper(params, 0.1)
    assert scalar["lr"].shape == () and scalar["lr"].dtype == F64
    chained = optim.chain(optim.clip_by_global_norm(1.0), optim.per_layer_lr())
    assert_trees_close(chained.init_hyper(params, 0.1), layer)


def test_learned_rates_update_rule():
    params = {"w": torch.tensor([1.0, 2.0], dtype=F64), "b": torch.tensor(3.0, dtype=F64)}
    g = {"w": torch.tensor([1.0, -1.0], dtype=F64), "b": torch.tensor(2.0, dtype=F64)}
    lrs = {"w": torch.tensor([0.1, 0.2], dtype=F64), "b": torch.tensor(0.5, dtype=F64)}
    updates, _ = optim.meta_sgd().update(g, optim.EmptyState(), params, {"lr": lrs})
    assert_trees_close(updates, {"w": torch.tensor([-0.1, 0.2], dtype=F64), "b": -lrs["b"] * 2})
    layer = {"w": torch.tensor(0.1, dtype=F64), "b": torch.tensor(0.5, dtype=F64)}
    updates, _ = optim.per_layer_lr().update(g, optim.EmptyState(), params, {"lr": layer})
    assert_trees_close(updates, {"w": -0.1 * g["w"], "b": -0.5 * g["b"]})
    updates, _ = optim.scalar_lr().update(g, (), params, {"lr": torch.tensor(0.5, dtype=F64)})
    assert_trees_close(updates, {"w": -0.5 * g["w"], "b": -0.5 * g["b"]})


def test_adam_meta_gradient_at_a_zero_gradient_needs_eps_root():
    """sqrt has an infinite derivative at 0: a gradient entry that is exactly 0 makes the
    meta-gradient NaN under torch's rule (eps_root=0); eps_root > 0 keeps it finite."""

    def loss(p, batch):
        return ((p["w"] * batch) ** 2).sum()  # dL/dw = 0 where batch = 0

    params = {"w": torch.tensor([1.0, 2.0], dtype=F64)}
    batch = torch.tensor([1.0, 0.0], dtype=F64)
    for eps_root, finite in [(0.0, False), (1e-30, True)]:
        opt = optim.adam(0.1, eps_root=eps_root)
        meta_loss = naive_meta_loss(opt, loss, batch, torch.ones(2, dtype=F64), 2)
        assert bool(torch.isfinite(grad(meta_loss)(params)["w"]).all()) == finite


# --------------------------------------------------------------------------------------------
# 3. clip_by_global_norm and chain


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0])
def test_clip_by_global_norm_equals_clip_grad_norm(max_norm):
    gen = torch.Generator().manual_seed(4)
    grads = {"w": randn(gen, 3, 2), "b": randn(gen, 2), "c": randn(gen)}
    ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for p, g in zip(ps, grads.values(), strict=True):
        p.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=False)
    clipped, state = optim.clip_by_global_norm(max_norm).update(grads, optim.EmptyState())
    torch.testing.assert_close(optim.global_norm(grads), norm, **TOL)
    for p, c in zip(ps, clipped.values(), strict=True):
        torch.testing.assert_close(c, p.grad, **TOL)
    assert state == optim.EmptyState()


def test_clip_by_global_norm_is_differentiable():
    gen = torch.Generator().manual_seed(5)
    g = randn(gen, 5)
    clip = optim.clip_by_global_norm(float(g.norm()) * 2)

    def f(x):
        return clip.update({"g": x}, ())[0]["g"]

    # where it does not clip it is the identity, derivative included
    torch.testing.assert_close(jacrev(f)(g), torch.eye(5, dtype=F64), **TOL)
    # where it clips it is smooth: exact against finite differences
    clip = optim.clip_by_global_norm(float(g.norm()) / 2)
    assert torch.autograd.gradcheck(f, (g.clone().requires_grad_(),))
    assert torch.autograd.gradgradcheck(f, (g.clone().requires_grad_(),))


def test_chain_equals_manual_composition_and_order_matters():
    params, loss, support, _ = mlp_problem(torch.Generator().manual_seed(6))
    clip, adam = optim.clip_by_global_norm(0.05), optim.adam(0.1)
    chained = optim.chain(clip, adam)
    c_state, a_state = (), adam.init(params)
    state = chained.init(params)
    assert isinstance(state, tuple) and len(state) == 2
    p_chain, p_manual = params, params
    for _ in range(4):
        u, state = chained.update(grad(loss)(p_chain, support), state, p_chain)
        p_chain = optim.apply_updates(p_chain, u)
        g = grad(loss)(p_manual, support)
        g, c_state = clip.update(g, c_state, p_manual)
        g, a_state = adam.update(g, a_state, p_manual)
        p_manual = optim.apply_updates(p_manual, g)
        assert_trees_close(p_chain, p_manual, rtol=0, atol=0)
    # adam then clip: the updates themselves are clipped to norm 0.05
    reverse = optim.chain(adam, clip)
    u, _ = reverse.update(grad(loss)(params, support), reverse.init(params), params)
    first, _ = chained.update(grad(loss)(params, support), chained.init(params), params)
    assert float(optim.global_norm(u)) == pytest.approx(0.05, rel=1e-4)
    assert (
        float(optim.global_norm(first)) > 0.1
    )  # adam's first step: lr * sign(g), norm 0.1*sqrt(n)


def test_scale_and_empty_chain():
    g = {"w": torch.tensor([1.0, -2.0], dtype=F64)}
    u, _ = optim.scale(-0.5).update(g, ())
    assert_trees_close(u, {"w": torch.tensor([-0.5, 1.0], dtype=F64)})
    empty = optim.chain()
    assert empty.init(g) == ()
    assert_trees_close(empty.update(g, ())[0], g)


# --------------------------------------------------------------------------------------------
# 4. clip_backward


def test_clip_backward_forward_is_the_identity():
    tree = {"a": torch.randn(3, dtype=F64), "n": torch.tensor(3), "t": (torch.ones(2),)}
    out = optim.clip_backward(tree, 1.0)
    assert optree.tree_structure(out) == optree.tree_structure(tree)
    assert out["n"] is tree["n"]  # integer leaves pass through untouched
    assert_trees_close(out, tree, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [10.0, 0.01])
def test_clip_backward_clips_the_cotangent(scale):
    gen = torch.Generator().manual_seed(7)
    a, b = randn(gen, 3).requires_grad_(), randn(gen, 2, 2).requires_grad_()
    ca, cb = randn(gen, 3) * scale, randn(gen, 2, 2) * scale
    out = optim.clip_backward({"a": a, "b": b}, 1.0)
    ((out["a"] * ca).sum() + (out["b"] * cb).sum()).backward()
    norm = math.sqrt(float((ca**2).sum() + (cb**2).sum()))
    if norm > 1.0:
        coef = 1.0 / (norm + 1e-6)
        torch.testing.assert_close(a.grad, ca * coef, **TOL)
        torch.testing.assert_close(b.grad, cb * coef, **TOL)
        assert float(optim.global_norm([a.grad, b.grad])) == pytest.approx(1.0, abs=1e-5)
    else:  # unchanged, bit for bit
        assert torch.equal(a.grad, ca) and torch.equal(b.grad, cb)


def test_clip_backward_under_grad_and_vmap_clips_each_example():
    c = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=F64)  # cotangent norms 5 and 0.5
    x = torch.ones(2, dtype=F64)

    def f(x, c):
        return (optim.clip_backward(x, 1.0) * c).sum()

    grads = vmap(grad(f), in_dims=(None, 0))(x, c)
    torch.testing.assert_close(grads[0], c[0] / (5 + 1e-6), **TOL)
    assert torch.equal(grads[1], c[1])


@pytest.mark.parametrize("policy", ["binomial", fmaml.Binomial(2)], ids=policy_id)
def test_clip_backward_inside_scan(policy):
    """Inside a checkpointed scan it equals the naive unroll with the same clipping; with a
    large max_norm it is exact; with a small one the meta-gradient changes (intentionally)."""
    opt = optim.adam(0.05)
    params, loss, support, query = mlp_problem(torch.Generator().manual_seed(8))
    exact = grad(naive_meta_loss(opt, loss, support, query, 6))(params)
    for clip in (1e6, 1e-3):
        ours = grad(scan_meta_loss(opt, loss, support, query, 6, policy, clip=clip))(params)
        naive = grad(naive_meta_loss(opt, loss, support, query, 6, clip=clip))(params)
        assert_trees_close(ours, naive, **TOL)
        if clip > 1:
            assert_trees_close(ours, exact, **TOL)
        else:
            assert float(optim.global_norm(ours)) <= 1e-3 * 1.0001
            assert float(optim.global_norm(exact)) > 1e-2


# --------------------------------------------------------------------------------------------
# 5. errors


BAD_ARGUMENTS = [
    (
        lambda: optim.adam(lr=-1),
        ValueError,
        r"fmaml.optim.adam: `lr` must be a positive number, got -1\.",
    ),
    (lambda: optim.sgd(True), TypeError, r"fmaml.optim.sgd: `lr` must be a number .*got True"),
    (lambda: optim.sgd("0.1"), TypeError, r"`lr` must be a number"),
    (lambda: optim.sgd(float("inf")), ValueError, r"`lr` must be finite, got inf"),
    (lambda: optim.momentum(0.1, beta=1.0), ValueError, r"momentum: `beta` must be in \[0, 1\)"),
    (lambda: optim.momentum(0.1, nesterov=1), TypeError, r"`nesterov` must be True or False"),
    (lambda: optim.adam(b1=-0.1), ValueError, r"adam: `b1` must be in \[0, 1\), got -0.1"),
    (lambda: optim.adam(b2=1), ValueError, r"adam: `b2` must be in \[0, 1\), got 1"),
    (lambda: optim.adam(eps=0), ValueError, r"adam: `eps` must be a positive number, got 0"),
    (lambda: optim.adam(eps_root=-1e-8), ValueError, r"adam: `eps_root` must be >= 0"),
    (lambda: optim.rmsprop(decay=1.5), ValueError, r"rmsprop: `decay` must be in \[0, 1\)"),
    (lambda: optim.rmsprop(momentum=-0.5), ValueError, r"rmsprop: `momentum` must be in"),
    (lambda: optim.rmsprop(centered="yes"), TypeError, r"rmsprop: `centered` must be True"),
    (
        lambda: optim.clip_by_global_norm(0.0),
        ValueError,
        r"clip_by_global_norm: `max_norm` must be a positive",
    ),
    (lambda: optim.scale(float("nan")), ValueError, r"scale: `factor` must be finite"),
    (lambda: optim.add_decayed_weights(-1), ValueError, r"`weight_decay` must be >= 0"),
    (
        lambda: optim.chain(optim.sgd(0.1), "adam"),
        TypeError,
        r"chain: argument 1 must be a Gradient",
    ),
    (
        lambda: optim.chain(optim.meta_sgd(), optim.scalar_lr()),
        ValueError,
        r"chain: at most one learned-rate transformation",
    ),
    (
        lambda: optim.clip_backward(torch.ones(2), -1),
        ValueError,
        r"clip_backward: `max_norm` must be",
    ),
    (lambda: optim.clip_backward({"a": 1.0}, 1.0), TypeError, r"tree\['a'\] is float"),
    (
        lambda: optim.meta_sgd().init_hyper({"w": torch.ones(2)}, 0),
        ValueError,
        r"meta_sgd\(\).init_hyper: `value` must be a positive number",
    ),
    (
        lambda: optim.per_layer_lr().init_hyper({"w": 1.0}, 0.1),
        TypeError,
        r"params\['w'\] is float",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_ARGUMENTS)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


_P = {"w": torch.ones(2), "b": torch.ones(1)}
BAD_UPDATES = [
    (optim.meta_sgd(), None, r"meta_sgd: `update` needs the learned rates: pass hyper=opt"),
    (
        optim.scalar_lr(),
        {"rate": torch.tensor(0.1)},
        r"`hyper` must be a dict with the key 'lr'.*\['rate'\]",
    ),
    (
        optim.meta_sgd(),
        {"lr": {"w": torch.ones(2), "c": torch.ones(1)}},
        r"missing from `hyper\['lr'\]`: \['b'\]; not in `params`: \['c'\]",
    ),
    (
        optim.meta_sgd(),
        {"lr": {"w": torch.ones(3), "b": torch.ones(1)}},
        r"hyper\['lr'\]\['w'\] must be a tensor of shape \(2,\), got \(3,\)",
    ),
    (
        optim.per_layer_lr(),
        {"lr": {"w": torch.ones(2), "b": torch.tensor(1.0)}},
        r"per_layer_lr: hyper\['lr'\]\['w'\] must be a tensor of shape \(\), got \(2,\)",
    ),
    (optim.scalar_lr(), {"lr": torch.ones(2)}, r"scalar_lr: `hyper\['lr'\]` must be a 0-d tensor"),
    (optim.add_decayed_weights(0.1), None, r"add_decayed_weights: `update` needs `params`"),
]


@pytest.mark.parametrize("opt, hyper, match", BAD_UPDATES)
def test_bad_update_calls(opt, hyper, match):
    params = None if hyper is None and "decayed" in match else _P
    with pytest.raises(ValueError, match=match):
        opt.update(_P, opt.init(_P), params, hyper)


def test_bad_structures():
    with pytest.raises(
        ValueError, match=r"apply_updates: `updates` and `params` must have the same"
    ):
        optim.apply_updates(_P, {"w": torch.ones(2)})
    opt = optim.chain(optim.sgd(0.1), optim.adam())
    with pytest.raises(ValueError, match=r"chain: `state` must be the tuple of 2 states"):
        opt.update(_P, optim.adam().init(_P))
