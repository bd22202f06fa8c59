"""The MAML algorithm family of ``fmaml.MAML`` against naive unrolls written here, in float64.

The reference is the textbook loop with nothing of fmaml in it but the loss: for each task, ``k``
inner steps whose update rule is ``torch.optim``'s written out by hand (:class:`Naive`), with
``torch.autograd.grad(create_graph=True)``, then the query loss, the mean over tasks,
differentiated by autograd. Covered, over the checkpoint policies of ``conftest.POLICIES``:
inner optimizers (Adam, momentum and Nesterov, centered RMSprop with momentum, clipping that is
and is not active); learned rates (Meta-SGD, one rate, one rate per layer) with the gradient of
``hyper``; ANIL (``adapt_only``) and its memory; first-order MAML with Adam and with learned
rates; Reptile (also in closed form on linear regression); ``max_grad_grad_norm`` (per task,
also under vmap and in chunks); ``bn_stats="carry"``; implicit MAML in closed form; and a
hypothesis test over random shapes, ``k``, optimizers and policies.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import pytest
import torch
from _models import (
    F64,
    bn_conv_net,
    conv_net,
    flat,
    image_tasks,
    mlp,
    mse,
    naive_loss,
    regression_tasks,
    requires_grad,
    single_thread,  # noqa: F401 (autouse fixture)
    task,
    xent,
)
from conftest import POLICIES, assert_trees_close, policy_id
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jacfwd, jacrev

import fmaml
from fmaml import optim

TOL = {"rtol": 1e-10, "atol": 1e-12}
K = 4
T = 3

#: The algorithms run under every policy of conftest.POLICIES (the plain loop, each kind of
#: checkpointing, which recompute steps at K=4, and the default).
algo_policies = pytest.mark.parametrize("policy", POLICIES, ids=policy_id)


# --------------------------------------------------------------------------------------------
# the naive inner optimizers: torch.optim's update rules, written out


class Naive(NamedTuple):
    """A hand-written inner optimizer. ``leaf(name, p, g, state, hyper) -> (p, state)`` updates
    one parameter (``state`` starts as ``{}``, as in ``torch.optim``); ``pre(grads)`` transforms
    the whole gradient dict first (global-norm clipping)."""

    leaf: Callable[..., tuple[torch.Tensor, dict]]
    pre: Callable[[dict], dict] | None = None


def naive_sgd(lr: float) -> Naive:
    return Naive(lambda n, p, g, s, h: (p - lr * g, s))


def naive_momentum(lr: float, beta: float = 0.9, nesterov: bool = False) -> Naive:
    def leaf(n, p, g, s, h):
        buf = g if "buf" not in s else beta * s["buf"] + g  # torch: the first buffer is g
        return p - lr * (g + beta * buf if nesterov else buf), {"buf": buf}

    return Naive(leaf)


def naive_adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Naive:
    def leaf(n, p, g, s, h):
        t = s.get("step", 0) + 1
        m = b1 * s.get("m", 0.0) + (1 - b1) * g
        v = b2 * s.get("v", 0.0) + (1 - b2) * g * g
        denom = (v / (1 - b2**t)).sqrt() + eps
        return p - lr * (m / (1 - b1**t)) / denom, {"step": t, "m": m, "v": v}

    return Naive(leaf)


def naive_rmsprop(lr: float, alpha: float, eps: float, momentum: float, centered: bool) -> Naive:
    def leaf(n, p, g, s, h):
        new = {"sq": alpha * s.get("sq", 0.0) + (1 - alpha) * g * g}
        if centered:
            new["ga"] = alpha * s.get("ga", 0.0) + (1 - alpha) * g
            avg = (new["sq"] - new["ga"] * new["ga"]).sqrt() + eps
        else:
            avg = new["sq"].sqrt() + eps
        if momentum > 0:
            new["buf"] = momentum * s.get("buf", 0.0) + g / avg
            return p - lr * new["buf"], new
        return p - lr * g / avg, new

    return Naive(leaf)


def naive_clip(max_norm: float, then: Naive) -> Naive:
    """``clip_grad_norm_``'s formula on the whole gradient, then ``then``."""

    def pre(grads):
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return {n: g * coef for n, g in grads.items()}

    return Naive(then.leaf, pre)


def naive_learned(kind: str) -> Naive:
    """``p - α g`` with ``α = hyper["lr"]`` (per entry, per tensor) or ``hyper["lr"]`` (one)."""
    if kind == "scalar":
        return Naive(lambda n, p, g, s, h: (p - h["lr"] * g, s))
    return Naive(lambda n, p, g, s, h: (p - h["lr"][n] * g, s))


#: name -> (the fmaml optimizer, its naive twin). "clip-active" clips at every step here (the
#: gradient norms are about 0.5-1); "clip-inactive" never does (tested below).
OPTIMIZERS: dict[str, tuple[Callable[[], optim.GradientTransformation], Naive]] = {
    "adam": (lambda: optim.adam(0.1), naive_adam(0.1)),
    "momentum": (lambda: optim.momentum(0.2, beta=0.8), naive_momentum(0.2, 0.8)),
    "nesterov": (
        lambda: optim.momentum(0.2, beta=0.8, nesterov=True),
        naive_momentum(0.2, 0.8, nesterov=True),
    ),
    "rmsprop": (
        lambda: optim.rmsprop(0.02, decay=0.9, eps=1e-6, momentum=0.5, centered=True),
        naive_rmsprop(0.02, 0.9, 1e-6, 0.5, True),
    ),
    "clip-active": (
        lambda: optim.chain(optim.clip_by_global_norm(0.05), optim.sgd(0.3)),
        naive_clip(0.05, naive_sgd(0.3)),
    ),
    "clip-inactive": (
        lambda: optim.chain(optim.clip_by_global_norm(100.0), optim.sgd(0.3)),
        naive_clip(100.0, naive_sgd(0.3)),
    ),
}

#: name -> (the fmaml optimizer, its naive twin, how to build hyper from params).
LEARNED: dict[str, tuple[Callable[[], optim.GradientTransformation], Naive, Callable]] = {
    "meta_sgd": (
        optim.meta_sgd,
        naive_learned("per-leaf"),
        lambda params: {"lr": {n: 0.1 + 0.2 * _spread(p) for n, p in params.items()}},
    ),
    "scalar_lr": (
        optim.scalar_lr,
        naive_learned("scalar"),
        lambda params: {"lr": torch.tensor(0.25, dtype=F64)},
    ),
    "per_layer_lr": (
        optim.per_layer_lr,
        naive_learned("per-leaf"),
        lambda params: {
            "lr": {n: torch.tensor(0.1 + 0.05 * i, dtype=F64) for i, n in enumerate(params)}
        },
    ),
    "clip+meta_sgd": (
        lambda: optim.chain(optim.clip_by_global_norm(0.3), optim.meta_sgd()),
        naive_clip(0.3, naive_learned("per-leaf")),
        lambda params: {"lr": {n: 0.1 + 0.2 * _spread(p) for n, p in params.items()}},
    ),
}


def _spread(p: torch.Tensor) -> torch.Tensor:
    """Deterministic values in [0, 1] shaped like ``p``: rates that differ entry by entry."""
    return torch.linspace(0.0, 1.0, p.numel(), dtype=F64).reshape(p.shape)


# --------------------------------------------------------------------------------------------
# the naive unroll


def naive_adapt(
    model: nn.Module,
    loss_fn: Callable,
    params: dict[str, torch.Tensor],
    support: Any,
    k: int,
    rule: Naive,
    hyper: Any = None,
    *,
    adapt: list[str] | None = None,
    clip: float | None = None,
    create_graph: bool = True,
) -> dict[str, torch.Tensor]:
    """``k`` steps of ``rule`` on one task; only the parameters named in ``adapt`` change.

    With ``clip``, each step starts by passing the adapted parameters through
    ``fmaml.optim.clip_backward`` (the cotangent entering the step is clipped).
    """
    names = list(params) if adapt is None else adapt
    p, state = dict(params), {n: {} for n in names}
    for _ in range(k):
        a = {n: p[n] for n in names}
        if clip is not None:
            a = optim.clip_backward(a, clip)
        loss = naive_loss(model, loss_fn, {**p, **a}, support)
        g = torch.autograd.grad(loss, list(a.values()), create_graph=create_graph)
        g = dict(zip(names, g, strict=True))
        if rule.pre is not None:
            g = rule.pre(g)
        for n in names:
            p[n], state[n] = rule.leaf(n, a[n], g[n], state[n], hyper)
    return p


def naive_meta_grad(
    model: nn.Module,
    loss_fn: Callable,
    params: dict[str, torch.Tensor],
    tasks: fmaml.Tasks,
    k: int,
    rule: Naive,
    hyper: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
    """``(meta-loss, gradient of params, gradient of hyper)`` of the naive unroll."""
    p0 = requires_grad(params)
    h0 = optree.tree_map(lambda t: t.detach().clone().requires_grad_(), hyper)
    total = 0.0
    n_tasks = optree.tree_leaves(tasks)[0].shape[0]
    for t in range(n_tasks):
        one = task(tasks, t)
        adapted = naive_adapt(model, loss_fn, p0, one.support, k, rule, h0, **kwargs)
        total = total + naive_loss(model, loss_fn, adapted, one.query)
    loss = total / n_tasks
    h_leaves, h_spec = optree.tree_flatten(h0)
    grads = torch.autograd.grad(
        loss, [*p0.values(), *h_leaves], allow_unused=True, materialize_grads=True
    )
    g_params = dict(zip(p0, grads[: len(p0)], strict=True))
    g_hyper = optree.tree_unflatten(h_spec, list(grads[len(p0) :])) if hyper is not None else None
    return loss.detach(), g_params, g_hyper


MODELS = {"mlp": (mlp, regression_tasks, mse), "conv": (conv_net, image_tasks, xent)}
HEAD = {"mlp": "2", "conv": "4"}


@functools.cache
def _data(name: str = "mlp"):
    build, data, loss_fn = MODELS[name]
    model = build(0)
    return model, loss_fn, fmaml.params(model), data(torch.Generator().manual_seed(100))


@functools.cache
def _reference(name: str, opt: str, k: int = K, anil: bool = False):
    model, loss_fn, params, tasks = _data(name)
    adapt = [n for n in params if n.startswith(HEAD[name] + ".")] if anil else None
    return naive_meta_grad(model, loss_fn, params, tasks, k, OPTIMIZERS[opt][1], adapt=adapt)


@functools.cache
def _learned_reference(opt: str, k: int = K):
    model, loss_fn, params, tasks = _data()
    _, rule, make_hyper = LEARNED[opt]
    return naive_meta_grad(model, loss_fn, params, tasks, k, rule, make_hyper(params))


def _maml(name: str, inner_opt, policy: Any = "auto", **kwargs: Any) -> fmaml.MAML:
    model, loss_fn, _, _ = _data(name)
    return fmaml.MAML(model, loss_fn, inner_opt=inner_opt, checkpoint=policy, **kwargs)


def _head(params: dict[str, torch.Tensor], name: str = "mlp") -> list[str]:
    return [n for n in params if n.startswith(HEAD[name] + ".")]


# --------------------------------------------------------------------------------------------
# 1. inner optimizers


@algo_policies
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_inner_optimizer_meta_grad_matches_naive(opt, policy):
    _, _, params, tasks = _data()
    ref_loss, ref_grad, _ = _reference("mlp", opt)
    maml = _maml("mlp", OPTIMIZERS[opt][0](), policy)
    grads, loss = grad_and_value(maml.unrolled_loss)(params, tasks, K)
    assert_trees_close(grads, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    loss, grads = maml.meta_grad(params, tasks, K)
    assert_trees_close(grads, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_inner_optimizer_loop_batching_and_adapt(opt):
    """``batching="loop"`` gives the same meta-gradient; ``adapt`` gives the naive trajectory."""
    model, loss_fn, params, tasks = _data()
    _, ref_grad, _ = _reference("mlp", opt)
    maml = _maml("mlp", OPTIMIZERS[opt][0](), "binomial", batching="loop")
    assert_trees_close(grad(maml.unrolled_loss)(params, tasks, K), ref_grad, **TOL)
    adapted = maml.adapt(params, tasks.support, K, batched=True)
    for t in range(T):
        p = requires_grad(params)
        expected = naive_adapt(model, loss_fn, p, task(tasks, t).support, K, OPTIMIZERS[opt][1])
        assert_trees_close({n: a[t] for n, a in adapted.items()}, expected, **TOL)


@pytest.mark.parametrize("policy", [fmaml.StoreAll(), fmaml.Binomial(1)], ids=policy_id)
@pytest.mark.parametrize("opt", ["adam", "rmsprop", "clip-active"])
def test_inner_optimizer_conv_matches_naive(opt, policy):
    _, _, params, tasks = _data("conv")
    ref_loss, ref_grad, _ = _reference("conv", opt, 3)
    maml = _maml("conv", OPTIMIZERS[opt][0](), policy)
    loss, grads = maml.meta_grad(params, tasks, 3)
    assert_trees_close(grads, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)


def test_clipping_is_active_or_not_as_named():
    """The two clipping cases have teeth: one clips every inner step, the other none."""
    model, loss_fn, params, tasks = _data()
    seen = []

    def spy(grads):
        seen.append(
            float(
                torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]).detach())
            )
        )
        return grads

    rule = Naive(naive_sgd(0.3).leaf, spy)
    for t in range(T):
        naive_adapt(model, loss_fn, requires_grad(params), task(tasks, t).support, K, rule)
    assert len(seen) == T * K and min(seen) > 0.05 and max(seen) < 100.0
    plain = naive_meta_grad(model, loss_fn, params, tasks, K, naive_sgd(0.3))[1]
    assert_trees_close(_reference("mlp", "clip-inactive")[1], plain, **TOL)
    assert (flat(_reference("mlp", "clip-active")[1]) - flat(plain)).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# 2. learned rates


@algo_policies
@pytest.mark.parametrize("opt", list(LEARNED))
def test_learned_rates_grad_of_params_and_hyper(opt, policy):
    _, _, params, tasks = _data()
    make_opt, _, make_hyper = LEARNED[opt]
    hyper = make_hyper(params)
    ref_loss, ref_grad, ref_hyper = _learned_reference(opt)
    maml = _maml("mlp", make_opt(), policy)
    (g_params, g_hyper), loss = grad_and_value(maml.unrolled_loss, argnums=(0, 3))(
        params, tasks, K, hyper
    )
    assert_trees_close(g_params, ref_grad, **TOL)
    assert_trees_close(g_hyper, ref_hyper, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    loss, (g_params, g_hyper) = maml.meta_grad(params, tasks, K, hyper)
    assert_trees_close(g_params, ref_grad, **TOL)
    assert_trees_close(g_hyper, ref_hyper, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert _flat_any(g_hyper).abs().min() > 0  # every rate gets a gradient


def _mean_squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mse`` written out. PyTorch's ``F.mse_loss`` raises "ZeroTensors are immutable" under
    forward mode through its double backward (pytorch/pytorch#123996); fmaml names that bug."""
    return ((out - y) ** 2).mean()


@algo_policies
@pytest.mark.parametrize("opt", list(LEARNED))
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_learned_rates_forward_mode_hypergradient(opt, policy, batching):
    """``jacfwd`` over ``hyper``: forward-mode hypergradients (Franceschi et al., 2017), the
    naive unroll's reverse-mode gradient, with no snapshot and no step graph kept."""
    model, _, params, tasks = _data()
    make_opt, _, make_hyper = LEARNED[opt]
    _, _, ref_hyper = _learned_reference(opt)
    maml = fmaml.MAML(
        model, _mean_squared_error, inner_opt=make_opt(), checkpoint=policy, batching=batching
    )
    with fmaml.record_scan() as stats:
        got = jacfwd(maml.unrolled_loss, argnums=3)(params, tasks, K, make_hyper(params))
    assert_trees_close(got, ref_hyper, **TOL)
    scans = 1 if batching == "vmap" else T
    assert (stats.plans, stats.max_live_snapshots) == ([], 0)
    assert (stats.tangent_evaluations, stats.graph_evaluations) == (scans * K, 0)


@pytest.mark.parametrize("policy", ["binomial", "auto"], ids=policy_id)
def test_learned_rates_hyper_hessian_forward_over_reverse(policy):
    """``jacfwd(grad)`` over ``hyper`` equals ``jacrev(grad)`` (reverse over reverse)."""
    model, _, params, tasks = _data()
    hyper = LEARNED["per_layer_lr"][2](params)
    hessians = []
    for transform, p in ((jacfwd, policy), (jacrev, "store_all")):
        opt = optim.per_layer_lr()
        maml = fmaml.MAML(model, _mean_squared_error, inner_opt=opt, checkpoint=p)
        g = grad(maml.unrolled_loss, argnums=3)
        hessians.append(transform(g, argnums=3)(params, tasks, K, hyper))
    assert_trees_close(hessians[0], hessians[1], **TOL)
    assert _flat_any(hessians[1]).abs().max() > 1e-3


def _flat_any(tree: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in optree.tree_leaves(tree)])


@pytest.mark.parametrize("opt", list(LEARNED))
def test_learned_rates_loop_adapt_and_inner_step(opt):
    model, loss_fn, params, tasks = _data()
    make_opt, rule, make_hyper = LEARNED[opt]
    hyper = make_hyper(params)
    _, ref_grad, ref_hyper = _learned_reference(opt)
    maml = _maml("mlp", make_opt(), fmaml.Binomial(1), batching="loop")
    g_params, g_hyper = grad(maml.unrolled_loss, argnums=(0, 3))(params, tasks, K, hyper)
    assert_trees_close(g_params, ref_grad, **TOL)
    assert_trees_close(g_hyper, ref_hyper, **TOL)
    adapted = maml.adapt(params, tasks.support, K, batched=True, hyper=hyper)
    for t in range(T):
        p = requires_grad(params)
        expected = naive_adapt(model, loss_fn, p, task(tasks, t).support, K, rule, hyper)
        assert_trees_close({n: a[t] for n, a in adapted.items()}, expected, **TOL)
    batch = task(tasks, 0).support
    expected = naive_adapt(model, loss_fn, requires_grad(params), batch, 1, rule, hyper)
    assert_trees_close(maml.inner_step(params, batch, hyper), expected, **TOL)
    # the rates matter: other rates, another adapted model
    doubled = optree.tree_map(lambda r: 2 * r, hyper)
    assert not torch.allclose(flat(maml.inner_step(params, batch, doubled)), flat(expected))


# --------------------------------------------------------------------------------------------
# 3. ANIL: only the head adapts


@algo_policies
@pytest.mark.parametrize("opt", ["clip-inactive", "adam"])
def test_anil_meta_grad_matches_naive(opt, policy):
    """Every parameter, adapted or frozen, gets the gradient of the head-only naive unroll."""
    _, _, params, tasks = _data()
    ref_loss, ref_grad, _ = _reference("mlp", opt, anil=True)
    maml = _maml("mlp", OPTIMIZERS[opt][0](), policy, adapt_only=[HEAD["mlp"]])
    assert maml.adapt_only == frozenset(_head(params))
    grads, loss = grad_and_value(maml.unrolled_loss)(params, tasks, K)
    assert_trees_close(grads, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_trees_close(maml.meta_grad(params, tasks, K)[1], ref_grad, **TOL)
    # the body's gradient is not zero, and not that of full MAML
    assert flat({n: ref_grad[n] for n in params if n not in _head(params)}).abs().max() > 1e-4
    full = _reference("mlp", opt)[1]
    assert (flat(ref_grad) - flat(full)).abs().max() > 1e-4


def test_anil_adapt_inner_step_loop_and_conv():
    model, loss_fn, params, tasks = _data()
    head = _head(params)
    rule = OPTIMIZERS["adam"][1]
    maml = _maml("mlp", optim.adam(0.1), "binomial", adapt_only=head, batching="loop")
    assert_trees_close(
        grad(maml.unrolled_loss)(params, tasks, K), _reference("mlp", "adam", anil=True)[1], **TOL
    )
    adapted = maml.adapt(params, task(tasks, 1).support, K)
    expected = naive_adapt(
        model, loss_fn, requires_grad(params), task(tasks, 1).support, K, rule, adapt=head
    )
    assert_trees_close(adapted, expected, **TOL)
    stepped = maml.inner_step(params, task(tasks, 1).support)
    for n in params:
        if n in head:
            assert not torch.equal(stepped[n], params[n])
        else:
            assert stepped[n] is params[n] and adapted[n] is params[n]
    # conv: only the linear head adapts
    _, _, conv_params, conv_tasks = _data("conv")
    ref_loss, ref_grad, _ = _reference("conv", "adam", 3, anil=True)
    conv = _maml("conv", optim.adam(0.1), fmaml.Binomial(1), adapt_only=["4"])
    loss, grads = conv.meta_grad(conv_params, conv_tasks, 3)
    assert_trees_close(grads, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)


def _nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in optree.tree_leaves(tree))


@pytest.mark.parametrize(
    "policy", ["sqrt", "binomial", fmaml.Binomial(1), fmaml.Auto(max_snapshots=3)], ids=policy_id
)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_anil_snapshots_hold_only_the_head(opt, policy):
    """The scan's carry is the head (and its optimizer state), never the body: memory follows
    the adapted subset. Adam's carry is the head three times (parameters, m, v) and a count."""
    k = 6
    _, _, params, tasks = _data()
    head = {n: params[n] for n in _head(params)}
    make = {"sgd": lambda: optim.sgd(0.3), "adam": lambda: optim.adam(0.1)}[opt]
    inner = make()
    per_task = _nbytes(head) + _nbytes(inner.init(head))
    assert per_task == {"sgd": 1, "adam": 3}[opt] * _nbytes(head) + (8 if opt == "adam" else 0)
    anil = _maml("mlp", inner, policy, adapt_only=[HEAD["mlp"]])
    with fmaml.record_scan() as stats:
        grad(anil.unrolled_loss)(params, tasks, k)
    assert stats.max_held_bytes > 0
    assert stats.max_held_bytes <= stats.max_live_snapshots * T * per_task
    # the same run adapting everything holds more than that bound allows
    full = _maml("mlp", make(), policy)
    with fmaml.record_scan() as full_stats:
        grad(full.unrolled_loss)(params, tasks, k)
    assert full_stats.max_live_snapshots == stats.max_live_snapshots
    assert full_stats.max_held_bytes > stats.max_live_snapshots * T * per_task


# --------------------------------------------------------------------------------------------
# 4. first-order MAML and Reptile


def naive_first_order(model, loss_fn, params, tasks, k, rule, hyper=None):
    """The query gradient at the adapted parameters, the adaptation treated as a constant."""
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in range(T):
        one = task(tasks, t)
        adapted = naive_adapt(
            model, loss_fn, requires_grad(params), one.support, k, rule, hyper, create_graph=False
        )
        adapted = requires_grad(adapted)
        g = torch.autograd.grad(
            naive_loss(model, loss_fn, adapted, one.query), list(adapted.values())
        )
        total = {n: total[n] + gi / T for n, gi in zip(adapted, g, strict=True)}
    return total


@pytest.mark.parametrize("policy", ["store_all", "binomial"], ids=policy_id)
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_first_order_adam_is_the_query_gradient_at_the_adapted_params(policy, batching):
    model, loss_fn, params, tasks = _data()
    expected = naive_first_order(model, loss_fn, params, tasks, K, naive_adam(0.1))
    maml = _maml("mlp", optim.adam(0.1), policy, first_order=True, batching=batching)
    loss, grads = maml.meta_grad(params, tasks, K)
    assert_trees_close(grads, expected, **TOL)
    assert_trees_close(grad(maml.unrolled_loss)(params, tasks, K), expected, **TOL)
    ref_loss, second_order, _ = _reference("mlp", "adam")
    torch.testing.assert_close(loss, ref_loss, **TOL)  # the same loss as second order
    assert (flat(grads) - flat(second_order)).abs().max() > 1e-4
    with fmaml.record_scan() as stats:  # the inner loop runs once, as a plain loop
        maml.meta_grad(params, tasks, K)
    assert stats.recomputations == 0 and stats.plans == []


@pytest.mark.parametrize("policy", ["store_all", "binomial"], ids=policy_id)
def test_first_order_learned_rates_get_their_first_order_gradient(policy):
    """With learned rates, first-order MAML treats the inner gradients as constants but not the
    rates: ``θ_k = θ - Σ_i α ⊙ g_i`` gives ``∂L/∂α = -Σ_i g_i ⊙ ∇L_q(θ_k)`` (as learn2learn's
    first-order Meta-SGD), never silently zero."""
    model, loss_fn, params, tasks = _data()
    make_opt, rule, make_hyper = LEARNED["meta_sgd"]
    hyper = make_hyper(params)
    maml = _maml("mlp", make_opt(), policy, first_order=True)
    g_params, g_hyper = grad(maml.unrolled_loss, argnums=(0, 3))(params, tasks, K, hyper)
    assert_trees_close(
        g_params, naive_first_order(model, loss_fn, params, tasks, K, rule, hyper), **TOL
    )
    h = requires_grad(hyper["lr"])
    total = 0.0
    for t in range(T):
        one = task(tasks, t)
        adapted = naive_adapt(
            model,
            loss_fn,
            requires_grad(params),
            one.support,
            K,
            rule,
            {"lr": h},
            create_graph=False,
        )
        total = total + naive_loss(model, loss_fn, adapted, one.query) / T
    expected = dict(zip(h, torch.autograd.grad(total, list(h.values())), strict=True))
    assert_trees_close(g_hyper, {"lr": expected}, **TOL)
    assert flat(expected).abs().max() > 1e-4
    _, (_, g_hyper) = maml.meta_grad(params, tasks, K, hyper)
    assert_trees_close(g_hyper, {"lr": expected}, **TOL)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_reptile_grad_is_params_minus_mean_adapted(opt, batching):
    model, loss_fn, params, tasks = _data()
    make, rule = {
        "sgd": (lambda: optim.sgd(0.3), naive_sgd(0.3)),
        "adam": (lambda: optim.adam(0.1), naive_adam(0.1)),
    }[opt]
    maml = _maml("mlp", make(), "binomial", batching=batching)
    got = maml.reptile_grad(params, tasks.support, K)
    adapted = [
        naive_adapt(model, loss_fn, requires_grad(params), task(tasks, t).support, K, rule)
        for t in range(T)
    ]
    expected = {n: params[n] - sum(a[n] for a in adapted) / T for n in params}
    assert_trees_close(got, expected, **TOL)
    assert not any(g.requires_grad for g in got.values())
    stacked = {n: torch.stack([a[n].detach() for a in adapted]) for n in params}
    assert_trees_close(fmaml.reptile_direction(params, stacked), expected, **TOL)


def test_reptile_linear_regression_closed_form():
    """Linear regression with SGD: ``w_{i+1} = (I - lr A) w_i + lr b`` with ``A = 2 ZᵀZ / N``,
    ``b = 2 Zᵀy / N`` (``Z = [x, 1]``), so Reptile's direction is ``w - mean_t w_k^t``."""
    lr, k, d, n = 0.1, 6, 3, 8
    gen = torch.Generator().manual_seed(21)
    model = nn.Linear(d, 1).to(F64)
    params = {n_: p + 0.1 for n_, p in fmaml.params(model).items()}
    xs = torch.randn(T, n, d, generator=gen, dtype=F64)
    ys = torch.randn(T, n, 1, generator=gen, dtype=F64)
    maml = fmaml.MAML(model, mse, inner_lr=lr, checkpoint="binomial")
    w0 = torch.cat([params["weight"].reshape(-1), params["bias"]])
    adapted = []
    for t in range(T):
        z = torch.cat([xs[t], torch.ones(n, 1, dtype=F64)], 1)
        a, b = 2 * z.T @ z / n, 2 * z.T @ ys[t, :, 0] / n
        w = w0
        for _ in range(k):
            w = (torch.eye(d + 1, dtype=F64) - lr * a) @ w + lr * b
        adapted.append(w)
    expected = w0 - torch.stack(adapted).mean(0)
    got = maml.reptile_grad(params, (xs, ys), k)
    torch.testing.assert_close(torch.cat([got["weight"].reshape(-1), got["bias"]]), expected, **TOL)


# --------------------------------------------------------------------------------------------
# 5. max_grad_grad_norm


@pytest.mark.parametrize("policy", ["store_all", "binomial", fmaml.Binomial(1)], ids=policy_id)
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_max_grad_grad_norm(policy, batching):
    """Huge threshold: exactly the unclipped gradient. Tiny threshold: the naive unroll with
    ``clip_backward`` on the parameters entering each step. What is bounded is the cotangent
    entering each inner step, per task: the meta-gradient of one task is the (clipped)
    cotangent entering step 0, so its norm is at most the threshold, and the mean over ``T``
    tasks (the 1/T is inside each cotangent) at most ``T`` times it."""
    model, loss_fn, params, tasks = _data()
    plain = _maml("mlp", optim.sgd(0.3), policy, batching=batching)
    unclipped = grad(plain.unrolled_loss)(params, tasks, K)
    huge = _maml("mlp", optim.sgd(0.3), policy, max_grad_grad_norm=1e30, batching=batching)
    # the coefficient is exactly 1; only the order of some additions differs (store_all)
    got = grad(huge.unrolled_loss)(params, tasks, K)
    assert_trees_close(got, unclipped, rtol=1e-13, atol=1e-16)

    tiny_norm = 1e-3
    tiny = _maml("mlp", optim.sgd(0.3), policy, max_grad_grad_norm=tiny_norm, batching=batching)
    loss, grads = tiny.meta_grad(params, tasks, K)
    ref_loss, expected, _ = naive_meta_grad(
        model, loss_fn, params, tasks, K, naive_sgd(0.3), clip=tiny_norm
    )
    assert_trees_close(grads, expected, **TOL)
    assert_trees_close(grad(tiny.unrolled_loss)(params, tasks, K), expected, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)  # the forward pass is untouched
    assert flat(unclipped).norm() > 10 * T * tiny_norm  # so the clipping is active
    assert flat(grads).norm() <= T * tiny_norm
    for t in range(T):
        one = optree.tree_map(lambda leaf, t=t: leaf[t : t + 1], tasks)
        g = flat(grad(tiny.unrolled_loss)(params, one, K))
        assert g.norm() <= tiny_norm * (1 + 1e-12)
    # k = 0: no inner step, nothing to clip
    assert_trees_close(
        grad(tiny.unrolled_loss)(params, tasks, 0), grad(plain.unrolled_loss)(params, tasks, 0)
    )


@pytest.mark.parametrize("policy", ["store_all", fmaml.Binomial(1)], ids=policy_id)
def test_max_grad_grad_norm_with_anil_and_task_chunks(policy):
    """Only the adapted head is clipped (the body's gradient flows around the steps), each task
    on its own also within a vmapped chunk of two tasks."""
    model, loss_fn, params, tasks = _data()
    head = _head(params)
    maml = _maml(
        "mlp", optim.adam(0.1), policy, adapt_only=head, max_grad_grad_norm=1e-3, task_chunk=2
    )
    ref_loss, expected, _ = naive_meta_grad(
        model, loss_fn, params, tasks, K, naive_adam(0.1), adapt=head, clip=1e-3
    )
    loss, grads = maml.meta_grad(params, tasks, K)
    assert_trees_close(grads, expected, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_trees_close(grad(maml.unrolled_loss)(params, tasks, K), expected, **TOL)
    assert flat({n: expected[n] for n in head}).norm() <= T * 1e-3
    assert flat({n: g for n, g in expected.items() if n not in head}).norm() > 10 * T * 1e-3
    # adapt(batched=True) is differentiable with the same per-task clipping
    weights = {n: _spread(p) for n, p in params.items()}

    def objective(p):
        adapted = maml.adapt(p, tasks.support, K, batched=True)
        return sum((adapted[n] * weights[n]).sum() for n in head)

    p0 = requires_grad(params)
    total = 0.0
    for t in range(T):
        adapted = naive_adapt(
            model, loss_fn, p0, task(tasks, t).support, K, naive_adam(0.1), adapt=head, clip=1e-3
        )
        total = total + sum((adapted[n] * weights[n]).sum() for n in head)
    expected = dict(zip(p0, torch.autograd.grad(total, list(p0.values())), strict=True))
    assert_trees_close(grad(objective)(params), expected, **TOL)


# --------------------------------------------------------------------------------------------
# 6. BatchNorm running statistics carried per task


def _has_bn_carry() -> bool:
    try:
        fmaml.MAML(bn_conv_net(), xent, bn_stats="carry")
    except TypeError:
        return False
    return True


@pytest.mark.skipif(not _has_bn_carry(), reason="MAML has no bn_stats='carry' option yet")
@pytest.mark.parametrize("policy", ["store_all", fmaml.Binomial(1)], ids=policy_id)
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_bn_stats_carry_follows_torch_running_stat_rule(policy, batching):
    """Per task, the carried statistics are those of a naive loop whose real ``BatchNorm2d``
    (train mode) updates its running buffers at each inner step's forward pass; the module's
    own buffers stay untouched, however often the scan recomputes."""
    k = 3
    model = bn_conv_net()
    with torch.no_grad():  # non-trivial initial statistics
        model[1].running_mean.copy_(torch.linspace(-1, 1, 4, dtype=F64))
        model[1].running_var.copy_(torch.linspace(0.5, 2, 4, dtype=F64))
    model[1].momentum = 0.3
    before = {n: b.clone() for n, b in model.named_buffers()}
    tasks = image_tasks(torch.Generator().manual_seed(5))
    params = fmaml.params(model)
    maml = fmaml.MAML(
        model, xent, inner_lr=0.3, checkpoint=policy, batching=batching, bn_stats="carry"
    )
    with fmaml.record_scan():
        adapted = maml.adapt(params, tasks.support, k, batched=True)
        loss, grads = maml.meta_grad(params, tasks, k)
    stat_names = ["1.running_mean", "1.running_var"]
    ref_total = 0.0
    p0 = requires_grad(params)
    for t in range(T):
        naive = copy.deepcopy(model)
        buffers = {n: b.clone() for n, b in naive.named_buffers()}
        p = dict(p0)
        for _ in range(k):
            x, y = task(tasks, t).support
            out = functional_call(naive, {**p, **buffers}, (x,))  # updates `buffers` in place
            g = torch.autograd.grad(xent(out, y), list(p.values()), create_graph=True)
            p = {n: p[n] - 0.3 * gi for n, gi in zip(p, g, strict=True)}
        for n in stat_names:
            torch.testing.assert_close(adapted[n][t], buffers[n], **TOL)
        assert int(buffers["1.num_batches_tracked"]) == k
        x, y = task(tasks, t).query
        # eval mode: the query loss normalises with the task's carried statistics
        naive.eval()
        model.eval()
        try:
            one = {n: a[t] for n, a in adapted.items()}
            expected = xent(functional_call(naive, {**p, **buffers}, (x,)), y).detach()
            torch.testing.assert_close(maml.loss(one, (x, y)), expected, **TOL)
        finally:
            model.train()
            naive.train()
        ref_total = ref_total + xent(functional_call(naive, {**p, **buffers}, (x,)), y)
    # in train mode the statistics do not enter the loss: the meta-gradient is MAML's
    ref_grad = torch.autograd.grad(ref_total / T, list(p0.values()))
    assert_trees_close(grads, dict(zip(params, ref_grad, strict=True)), **TOL)
    torch.testing.assert_close(loss, (ref_total / T).detach(), **TOL)
    assert not torch.allclose(adapted["1.running_mean"][0], before["1.running_mean"])
    assert_trees_close({n: b for n, b in model.named_buffers()}, before, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# 7. implicit MAML, end to end on linear regression


def test_imaml_linear_regression_closed_form():
    """The support loss of a linear model is quadratic, ``L_s(w) = ½ wᵀAw - bᵀw + c`` with
    ``A = 2ZᵀZ/N``, so ``φ* = (A + λI)⁻¹(b + λθ)`` and the meta-gradient is
    ``λ(A + λI)⁻¹ ∇L_q(φ*)``. ``maml.loss`` is the loss; the mean over tasks is the
    meta-gradient. With a huge ``λ`` (``φ* → θ``) it tends to MAML's with ``k = 0``."""
    lam, d, n = 2.0, 3, 8
    gen = torch.Generator().manual_seed(31)
    torch.manual_seed(31)  # the initialisation, so the test is the same on every run
    model = nn.Linear(d, 1).to(F64)
    params = fmaml.params(model)
    tasks = fmaml.Tasks(
        (
            torch.randn(T, n, d, generator=gen, dtype=F64),
            torch.randn(T, n, 1, generator=gen, dtype=F64),
        ),
        (
            torch.randn(T, n, d, generator=gen, dtype=F64),
            torch.randn(T, n, 1, generator=gen, dtype=F64),
        ),
    )
    maml = fmaml.MAML(model, mse)
    w0 = torch.cat([params["weight"].reshape(-1), params["bias"]])
    eye = torch.eye(d + 1, dtype=F64)

    def quadratic(x, y):
        z = torch.cat([x, torch.ones(x.shape[0], 1, dtype=F64)], 1)
        return 2 * z.T @ z / x.shape[0], 2 * z.T @ y[:, 0] / x.shape[0]

    def implicit(lam, steps, lr):
        total, expected = None, torch.zeros(d + 1, dtype=F64)
        for t in range(T):
            one = task(tasks, t)
            phi = fmaml.imaml_adapt(maml.loss, params, one.support, lam=lam, steps=steps, lr=lr)
            g, info = fmaml.imaml_grad(maml.loss, params, phi, one.support, one.query, lam=lam)
            assert info.converged and info.stationarity < 1e-9 * lam
            total = g if total is None else {m: total[m] + g[m] for m in g}
            a, b = quadratic(*one.support)
            aq, bq = quadratic(*one.query)
            phi_star = torch.linalg.solve(a + lam * eye, b + lam * w0)
            expected += lam * torch.linalg.solve(a + lam * eye, aq @ phi_star - bq) / T
        return {m: v / T for m, v in total.items()}, expected

    got, expected = implicit(lam, steps=400, lr=0.1)
    got = torch.cat([got["weight"].reshape(-1), got["bias"]])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    # λ = 1e5: φ* = θ + O(‖A‖/λ), so the implicit gradient is MAML's k = 0 one up to ~1e-4
    # relative (a larger λ amplifies float64 rounding, ~λ·1e-16, into the comparison).
    far, _ = implicit(1e5, steps=3, lr=1.0 / (1e5 + 10.0))
    _, k0 = maml.meta_grad(params, tasks, 0)
    assert_trees_close(far, k0, rtol=1e-3, atol=1e-6)
    assert not all(torch.equal(far[m], k0[m]) for m in far)  # a limit, not an identity


# --------------------------------------------------------------------------------------------
# 8. hypothesis: random shapes, k, optimizers and policies


ALL_OPTIMIZERS = [*OPTIMIZERS, *LEARNED]


@given(
    k=st.integers(0, 6),
    d_in=st.integers(1, 4),
    hidden=st.integers(1, 6),
    d_out=st.integers(1, 3),
    opt=st.sampled_from(ALL_OPTIMIZERS),
    policy=st.sampled_from(POLICIES),
    seed=st.integers(0, 2**16),
)
def test_random_cases_match_naive(k, d_in, hidden, d_out, opt, policy, seed):
    model = mlp(seed, d_in=d_in, hidden=hidden, d_out=d_out)
    params = fmaml.params(model)
    tasks = regression_tasks(torch.Generator().manual_seed(seed), d_in=d_in, d_out=d_out)
    if opt in LEARNED:
        make_opt, rule, make_hyper = LEARNED[opt]
        hyper = make_hyper(params)
    else:
        (make_opt, rule), hyper = OPTIMIZERS[opt], None
    maml = fmaml.MAML(model, mse, inner_opt=make_opt(), checkpoint=policy)
    ref_loss, ref_grad, ref_hyper = naive_meta_grad(model, mse, params, tasks, k, rule, hyper)
    if hyper is None:
        grads, loss = grad_and_value(maml.unrolled_loss)(params, tasks, k)
    else:
        (grads, g_hyper), loss = grad_and_value(maml.unrolled_loss, argnums=(0, 3))(
            params, tasks, k, hyper
        )
        assert_trees_close(g_hyper, ref_hyper, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_trees_close(grads, ref_grad, **TOL)
