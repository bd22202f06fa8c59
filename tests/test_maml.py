"""``fmaml.MAML`` against the naive MAML loop (``tests/_models.py``), in float64.

One test body per property runs over every checkpoint policy of ``conftest.POLICIES`` and every
way of batching tasks (vmap over all tasks, vmap two tasks at a time, a Python loop). Covered:
meta-gradients by ``torch.func.grad``, ``meta_grad`` and ``loss.backward()``; ``inner_step``;
``adapt`` (single, batched, per-step batches, loss history, its gradient); ``vmap(grad)`` per-task
meta-gradients; ``jacrev(grad)`` and autograd double backward (Hessians); BatchNorm (buffers never
touched, vmap equal to a loop); dropout (random numbers replayed); first-order MAML against its
closed form; ``check_finite``.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import optree
import pytest
import torch
from _models import (
    F64,
    LR,
    bn_conv_net,
    conv_net,
    dropout_mlp,
    flat,
    image_tasks,
    mlp,
    mse,
    naive_adapt,
    naive_first_order_grad,
    naive_loss,
    naive_meta_grad,
    naive_unrolled_loss,
    regression_tasks,
    requires_grad,
    single_thread,  # noqa: F401 (autouse fixture)
    task,
    tiny_mlp,
    unflat,
    xent,
)
from conftest import all_policies, assert_trees_close, policy_id
from torch import nn
from torch.func import grad, grad_and_value, jacfwd, jacrev, vmap

import fmaml

TOL = {"rtol": 1e-10, "atol": 1e-12}

#: Every way of batching tasks; with T=3 tasks, ``task_chunk=2`` makes a chunk of 2 and one of 1.
BATCHINGS = {
    "auto": {},
    "vmap": {"batching": "vmap"},
    "vmap-chunk2": {"batching": "vmap", "task_chunk": 2},
    "loop": {"batching": "loop"},
}
all_batchings = pytest.mark.parametrize("batching", list(BATCHINGS))

MODELS = {
    "mlp": (mlp, regression_tasks, mse),
    "conv": (conv_net, image_tasks, xent),
}


def _maml(model: nn.Module, loss_fn, policy="auto", batching="vmap", **kwargs) -> fmaml.MAML:
    return fmaml.MAML(
        model, loss_fn, inner_lr=LR, checkpoint=policy, **BATCHINGS[batching], **kwargs
    )


@functools.cache
def _case(name: str, k: int, seed: int = 0):
    """``(model, loss_fn, params, tasks, (naive loss, naive meta-gradient))``, computed once."""
    build, data, loss_fn = MODELS[name]
    model = build(seed)
    tasks = data(torch.Generator().manual_seed(100 + seed))
    params = fmaml.params(model)
    return model, loss_fn, params, tasks, naive_meta_grad(model, loss_fn, params, tasks, k)


def _clone(tree):
    return optree.tree_map(lambda t: t.clone(), tree)


def _unchanged(before, after) -> None:
    assert_trees_close(after, before, rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------------------------
# the meta-gradient, every policy x every batching x both routes


@all_policies
@all_batchings
@pytest.mark.parametrize("k", [0, 1, 5])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("route", ["grad", "meta_grad"])
def test_meta_grad_matches_naive(route, name, k, batching, policy):
    model, loss_fn, params, tasks, (ref_loss, ref_grad) = _case(name, k)
    maml = _maml(model, loss_fn, policy, batching)
    before = _clone((params, tasks))
    if route == "grad":
        grads, loss = grad_and_value(maml.unrolled_loss)(params, tasks, k)
    else:
        loss, grads = maml.meta_grad(params, tasks, k)
    assert_trees_close(grads, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    _unchanged(before, (params, tasks))


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("learned", [False, True])
def test_meta_grad_is_grad_and_value_bitwise(batching, learned):
    """meta_grad hands back the gradients its pieces take (no autograd Function, no backward
    pass around them): the very numbers of grad_and_value(unrolled_loss), learned rates
    included; tasks that require grad take grad_and_value's route (same to round-off)."""
    model, loss_fn, params, tasks, _ = _case("mlp", 3)
    rates = {"inner_opt": fmaml.optim.per_layer_lr()} if learned else {"inner_lr": LR}
    maml = fmaml.MAML(model, loss_fn, **rates, **BATCHINGS[batching])
    hyper = (
        {"lr": {n: torch.tensor(0.1 + 0.05 * i, dtype=torch.float64) for i, n in enumerate(params)}}
        if learned
        else None
    )
    argnums = (0, 3) if learned else 0  # unrolled_loss(params, tasks, k, hyper)
    want_grads, want_loss = grad_and_value(maml.unrolled_loss, argnums)(params, tasks, 3, hyper)
    loss, grads = maml.meta_grad(params, tasks, 3, hyper)
    assert_trees_close(grads, want_grads, rtol=0.0, atol=0.0)
    assert torch.equal(loss, want_loss)
    tracked = optree.tree_map(lambda t: t.clone().requires_grad_(), tasks)
    loss, grads = maml.meta_grad(params, tracked, 3, hyper)  # (recomputed with a graph)
    assert_trees_close(grads, want_grads, **TOL)
    torch.testing.assert_close(loss.detach(), want_loss, **TOL)


@pytest.mark.parametrize("policy", ["binomial", fmaml.Binomial(2), "sqrt"], ids=policy_id)
def test_meta_grad_long_unroll(policy):
    """k=50: the binomial schedule recomputes steps in a deep, irregular order."""
    k = 50
    model, loss_fn, params, tasks, (ref_loss, ref_grad) = _case("mlp", k)
    maml = _maml(model, loss_fn, policy)
    with fmaml.record_scan() as stats:
        loss, grads = maml.meta_grad(params, tasks, k)
    assert stats.recomputations > 0  # the test exercised recomputation
    assert_trees_close(grads, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_trees_close(grad(maml.unrolled_loss)(params, tasks, k), ref_grad, **TOL)


@pytest.mark.parametrize("policy", ["store_all", "binomial", fmaml.Uniform(2)], ids=policy_id)
@all_batchings
def test_backward_drop_in_for_torch_optim(policy, batching):
    """``unrolled_loss(dict(model.named_parameters()), ...).backward()`` fills ``.grad``."""
    k = 3
    model0, loss_fn, params, tasks, (ref_loss, ref_grad) = _case("mlp", k)
    model = copy.deepcopy(model0)
    maml = _maml(model, loss_fn, policy, batching)
    named = dict(model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(maml.unrolled_loss(named, tasks, k), ref_loss, **TOL)
    loss = maml.unrolled_loss(named, tasks, k)
    torch.testing.assert_close(loss.detach(), ref_loss, **TOL)
    loss.backward()
    assert_trees_close({n: p.grad for n, p in named.items()}, ref_grad, **TOL)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    expected = {n: params[n] - 0.1 * ref_grad[n] for n in params}
    assert_trees_close(dict(model.named_parameters()), expected, **TOL)


# --------------------------------------------------------------------------------------------
# inner_step, adapt, history


@pytest.mark.parametrize("name", list(MODELS))
def test_inner_step_is_one_pure_sgd_step(name):
    model, loss_fn, params, tasks, _ = _case(name, 0)
    maml = _maml(model, loss_fn)
    batch = task(tasks, 1).support
    before = _clone((params, batch))
    versions = [p._version for p in params.values()]
    new = maml.inner_step(params, batch)
    p = requires_grad(params)
    grads = torch.autograd.grad(naive_loss(model, loss_fn, p, batch), list(p.values()))
    expected = {n: params[n] - LR * g for n, g in zip(params, grads, strict=True)}
    assert_trees_close(new, expected, **TOL)
    assert list(new) == list(params)
    _unchanged(before, (params, batch))
    assert [p._version for p in params.values()] == versions
    assert all(new[n] is not params[n] for n in params)
    torch.testing.assert_close(maml.loss(params, batch), naive_loss(model, loss_fn, p, batch))


@all_policies
@all_batchings
def test_adapt_single_and_batched_match_naive(policy, batching):
    k = 4
    model, loss_fn, params, tasks, _ = _case("mlp", k)
    maml = _maml(model, loss_fn, policy, batching)
    ref = [
        naive_adapt(model, loss_fn, requires_grad(params), task(tasks, t).support, k)
        for t in range(3)
    ]
    before = _clone((params, tasks))
    for t in range(3):
        adapted, history = maml.adapt(params, task(tasks, t).support, k, return_history=True)
        assert history.shape == (k,)
        assert_trees_close(adapted, ref[t][0], **TOL)
        torch.testing.assert_close(history, ref[t][1], **TOL)
        assert_trees_close(maml.adapt(params, task(tasks, t).support, k), ref[t][0], **TOL)
    adapted, history = maml.adapt(params, tasks.support, k, batched=True, return_history=True)
    assert history.shape == (3, k)
    expected = {n: torch.stack([r[0][n] for r in ref]) for n in params}
    assert_trees_close(adapted, expected, **TOL)
    torch.testing.assert_close(history, torch.stack([r[1] for r in ref]), **TOL)
    _unchanged(before, (params, tasks))


@all_policies
@all_batchings
def test_adapt_is_differentiable(policy, batching):
    """The gradient of a function of the adapted parameters flows through the checkpointed scan."""
    k = 4
    model, loss_fn, params, tasks, _ = _case("mlp", k)
    maml = _maml(model, loss_fn, policy, batching)
    weights = {
        n: torch.linspace(-1, 1, p.numel(), dtype=F64).reshape(p.shape) for n, p in params.items()
    }

    def objective(adapted):
        return sum((torch.sin(adapted[n]) * weights[n]).sum() for n in adapted)

    got = grad(lambda p: objective(maml.adapt(p, tasks.support, k, batched=True)))(params)
    p0 = requires_grad(params)
    total = 0.0
    for t in range(3):
        adapted, _ = naive_adapt(model, loss_fn, p0, task(tasks, t).support, k)
        total = total + objective(adapted)
    expected = dict(zip(p0, torch.autograd.grad(total, list(p0.values())), strict=True))
    assert_trees_close(got, expected, **TOL)


@all_batchings
@pytest.mark.parametrize("k", [0, 3])
def test_unrolled_loss_history(batching, k):
    """history[t, i] is task t's inner loss before step i (shape (T, k)); grad's aux passes it."""
    model, loss_fn, params, tasks, (ref_loss, ref_grad) = _case("mlp", k)
    maml = _maml(model, loss_fn, "binomial", batching)
    expected = torch.stack(
        [
            naive_adapt(model, loss_fn, requires_grad(params), task(tasks, t).support, k)[1]
            for t in range(3)
        ]
    )
    loss, aux = maml.unrolled_loss(params, tasks, k, has_aux=True)
    history = aux.inner_losses
    assert history.shape == (3, k)
    torch.testing.assert_close(history, expected, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    grads, aux = grad(maml.unrolled_loss, has_aux=True)(params, tasks, k, has_aux=True)
    torch.testing.assert_close(aux.inner_losses, expected, **TOL)
    assert_trees_close(grads, ref_grad, **TOL)


@all_policies
@all_batchings
def test_per_step_batches_match_naive(policy, batching):
    """Support leaves (T, k, N, ...) with per_step=True: step i uses batch i."""
    k = 3
    model = mlp(1)
    tasks = regression_tasks(torch.Generator().manual_seed(7), steps=k)
    params = fmaml.params(model)
    maml = _maml(model, mse, policy, batching)
    ref_loss, ref_grad = naive_meta_grad(model, mse, params, tasks, k, per_step=True)
    loss, grads = maml.meta_grad(params, tasks, k, per_step=True)
    assert_trees_close(grads, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    grads = grad(maml.unrolled_loss)(params, tasks, k, per_step=True)
    assert_trees_close(grads, ref_grad, **TOL)
    # the per-step batches really differ: using batch 0 at every step gives another answer
    _, other = naive_meta_grad(
        model,
        mse,
        params,
        fmaml.Tasks(optree.tree_map(lambda x: x[:, 0], tasks.support), tasks.query),
        k,
    )
    assert not torch.allclose(flat(other), flat(ref_grad))
    # adapt, single task and batched
    ref = [
        naive_adapt(model, mse, requires_grad(params), task(tasks, t).support, k, per_step=True)
        for t in range(3)
    ]
    adapted, history = maml.adapt(
        params, task(tasks, 2).support, k, per_step=True, return_history=True
    )
    assert_trees_close(adapted, ref[2][0], **TOL)
    torch.testing.assert_close(history, ref[2][1], **TOL)
    adapted, history = maml.adapt(
        params, tasks.support, k, batched=True, per_step=True, return_history=True
    )
    assert_trees_close(adapted, {n: torch.stack([r[0][n] for r in ref]) for n in params}, **TOL)
    torch.testing.assert_close(history, torch.stack([r[1] for r in ref]), **TOL)


# --------------------------------------------------------------------------------------------
# composition with torch.func transforms


@all_policies
@all_batchings
def test_vmap_grad_gives_per_task_meta_gradients(policy, batching):
    k = 3
    model, loss_fn, params, tasks, _ = _case("mlp", k)
    maml = _maml(model, loss_fn, policy, batching)

    def per_task(p, support, query):
        one = optree.tree_map(lambda leaf: leaf[None], fmaml.Tasks(support, query))
        return maml.unrolled_loss(p, one, k)

    got = vmap(grad(per_task), in_dims=(None, 0, 0))(params, tasks.support, tasks.query)
    for t in range(3):
        one = optree.tree_map(lambda leaf, t=t: leaf[t : t + 1], tasks)
        _, expected = naive_meta_grad(model, loss_fn, params, one, k)
        assert_trees_close({n: g[t] for n, g in got.items()}, expected, **TOL)


HESSIAN_POLICIES = ["store_all", "binomial", fmaml.Binomial(1), fmaml.Uniform(2), "auto"]


def _tiny():
    model = tiny_mlp()
    tasks = regression_tasks(torch.Generator().manual_seed(3), n_tasks=2, d_in=2, d_out=1)
    return model, tasks, fmaml.params(model)


@pytest.fixture(scope="module")
def tiny_hessian():
    model, tasks, params = _tiny()
    return torch.autograd.functional.hessian(
        lambda v: naive_unrolled_loss(model, mse, unflat(v, params), tasks, 3), flat(params)
    )


@pytest.mark.parametrize("policy", HESSIAN_POLICIES, ids=policy_id)
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_jacrev_grad_is_the_naive_hessian(policy, batching, tiny_hessian):
    model, tasks, params = _tiny()
    maml = _maml(model, mse, policy, batching)
    hessian = jacrev(grad(lambda v: maml.unrolled_loss(unflat(v, params), tasks, 3)))(flat(params))
    assert hessian.shape == (9, 9)
    torch.testing.assert_close(hessian, tiny_hessian, **TOL)
    torch.testing.assert_close(hessian, hessian.T, **TOL)


def _mean_squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss`` written out: PyTorch's own raises "ZeroTensors are immutable" under forward
    over reverse over reverse (pytorch/pytorch#123996), a PyTorch bug that fmaml reports."""
    return ((out - y) ** 2).mean()


@pytest.mark.parametrize("policy", HESSIAN_POLICIES, ids=policy_id)
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_forward_over_reverse_is_the_naive_hessian(policy, batching, tiny_hessian):
    """``jacfwd(grad)`` and ``torch.func.hessian``: forward mode through the checkpointed
    backward pass (``fmaml._forward``), under every policy."""
    model, tasks, params = _tiny()
    maml = _maml(model, _mean_squared_error, policy, batching)

    def loss(v):
        return maml.unrolled_loss(unflat(v, params), tasks, 3)

    torch.testing.assert_close(jacfwd(grad(loss))(flat(params)), tiny_hessian, **TOL)
    torch.testing.assert_close(torch.func.hessian(loss)(flat(params)), tiny_hessian, **TOL)


@pytest.mark.parametrize("policy", HESSIAN_POLICIES, ids=policy_id)
def test_autograd_double_backward_is_the_naive_hessian(policy, tiny_hessian):
    """``autograd.grad(create_graph=True)`` then a Hessian-vector product by ``.backward()``."""
    model, tasks, params = _tiny()
    maml = _maml(model, mse, policy)
    p = requires_grad(params)
    grads = torch.autograd.grad(
        maml.unrolled_loss(p, tasks, 3), list(p.values()), create_graph=True
    )
    v = torch.linspace(-1.0, 2.0, 9, dtype=F64)
    (torch.cat([g.reshape(-1) for g in grads]) @ v).backward()
    torch.testing.assert_close(flat({n: t.grad for n, t in p.items()}), tiny_hessian @ v, **TOL)


# --------------------------------------------------------------------------------------------
# BatchNorm


def _bn_case():
    model = bn_conv_net()
    tasks = image_tasks(torch.Generator().manual_seed(5))
    return model, tasks, fmaml.params(model)


def _buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.fixture(scope="module")
def bn_reference():
    model, tasks, params = _bn_case()
    return naive_meta_grad(model, xent, params, tasks, 2)


@pytest.mark.parametrize("policy", ["store_all", fmaml.Binomial(1)], ids=policy_id)
@all_batchings
def test_batch_norm_vmap_equals_loop_and_naive(policy, batching, bn_reference):
    """BatchNorm on batch statistics, k=2: vmap over tasks is exact (the plain-ops workaround)."""
    model, tasks, params = _bn_case()
    maml = _maml(model, xent, policy, batching)
    ref_loss, ref_grad = bn_reference
    loss, grads = maml.meta_grad(params, tasks, 2)
    assert_trees_close(grads, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_trees_close(grad(maml.unrolled_loss)(params, tasks, 2), ref_grad, **TOL)


@pytest.mark.parametrize("policy", [fmaml.Binomial(1), fmaml.Uniform(2)], ids=policy_id)
@all_batchings
def test_batch_norm_buffers_untouched_by_recomputation(policy, batching):
    """Running statistics and num_batches_tracked never change, however often steps rerun."""
    k = 4
    model, tasks, params = _bn_case()
    buffers = _buffers(model)
    maml = _maml(model, xent, policy, batching)
    with fmaml.record_scan() as stats:
        grad(maml.unrolled_loss)(params, tasks, k)
        maml.meta_grad(params, tasks, k)
        maml.unrolled_loss(dict(copy.deepcopy(model).named_parameters()), tasks, k).backward()
    assert stats.recomputations > 0
    maml.adapt(params, tasks.support, k, batched=True)
    maml.adapt(params, task(tasks, 0).support, k)
    _unchanged(buffers, _buffers(model))
    assert int(model[1].num_batches_tracked) == 0
    assert model.training


def test_batch_norm_workaround_is_needed(bn_reference, monkeypatch):
    """Without the plain-ops BatchNorm, vmap over tasks is off where a torch.func.grad runs
    inside the vmap: the test above has teeth. (``max_grad_grad_norm`` takes that route; a huge
    one clips nothing. The default route, plain autograd over vmapped forward passes, does not
    meet the bug.)"""
    model, tasks, params = _bn_case()
    monkeypatch.setattr("fmaml._maml.batch_norm_in_plain_ops", contextlib.nullcontext)
    maml = _maml(model, xent, "store_all", max_grad_grad_norm=1e30)
    grads = grad(maml.unrolled_loss)(params, tasks, 2)
    error = (flat(grads) - flat(bn_reference[1])).abs().max()
    if error < 1e-8:
        pytest.skip("PyTorch's native batch norm is exact under vmap now; the workaround may go")
    assert error > 1e-6


# --------------------------------------------------------------------------------------------
# dropout: random numbers replayed in recomputation


@pytest.mark.parametrize("policy", ["store_all", fmaml.Uniform(2), "binomial"], ids=policy_id)
def test_dropout_loop_matches_naive_with_same_seed(policy):
    k = 3
    model = dropout_mlp()
    tasks = regression_tasks(torch.Generator().manual_seed(9))
    params = fmaml.params(model)
    maml = _maml(model, mse, policy, "loop")
    torch.manual_seed(11)
    ref_loss, ref_grad = naive_meta_grad(model, mse, params, tasks, k)
    torch.manual_seed(11)
    loss, grads = maml.meta_grad(params, tasks, k)
    assert_trees_close(grads, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.manual_seed(11)
    assert_trees_close(grad(maml.unrolled_loss)(params, tasks, k), ref_grad, **TOL)
    torch.manual_seed(12)  # dropout is live: another seed, another gradient
    assert not torch.allclose(flat(maml.meta_grad(params, tasks, k)[1]), flat(ref_grad))


@pytest.mark.parametrize("batching", ["loop", "vmap-chunk2"])
def test_dropout_adapt_batched_follows_batching(batching):
    """``adapt(batched=True)`` batches tasks as ``batching`` says: with "loop" it draws the
    masks of a loop over tasks, and with chunks those of one vmap per chunk."""
    k = 3
    model = dropout_mlp()
    tasks = regression_tasks(torch.Generator().manual_seed(9))
    params = fmaml.params(model)
    maml = _maml(model, mse, "binomial", batching)
    torch.manual_seed(11)
    adapted, history = maml.adapt(params, tasks.support, k, batched=True, return_history=True)
    torch.manual_seed(11)
    if batching == "loop":
        parts = [
            maml.adapt(params, task(tasks, t).support, k, return_history=True) for t in range(3)
        ]
    else:
        whole = _maml(model, mse, "binomial", "vmap")
        parts = [
            whole.adapt(
                params,
                optree.tree_map(lambda x, s=s: x[s], tasks.support),
                k,
                batched=True,
                return_history=True,
            )
            for s in (slice(0, 2), slice(2, 3))
        ]
        parts = [({n: a[n][t] for n in a}, h[t]) for a, h in parts for t in range(len(h))]
    expected = {n: torch.stack([a[n] for a, _ in parts]) for n in params}
    assert_trees_close(adapted, expected, **TOL)
    torch.testing.assert_close(history, torch.stack([h for _, h in parts]), **TOL)
    if batching == "loop":
        torch.manual_seed(11)
        ref = [
            naive_adapt(model, mse, requires_grad(params), task(tasks, t).support, k)
            for t in range(3)
        ]
        assert_trees_close(adapted, {n: torch.stack([r[0][n] for r in ref]) for n in params}, **TOL)


@pytest.mark.parametrize("policy", [fmaml.Uniform(2), "binomial"], ids=policy_id)
@pytest.mark.parametrize("randomness", ["different", "same"])
def test_dropout_vmap_checkpointed_equals_store_all(policy, randomness):
    """Under vmap, a checkpointed scan replays the masks that store_all drew."""
    k = 3
    model = dropout_mlp()
    tasks = regression_tasks(torch.Generator().manual_seed(9))
    params = fmaml.params(model)
    torch.manual_seed(11)
    expected = _maml(model, mse, "store_all", randomness=randomness).meta_grad(params, tasks, k)
    torch.manual_seed(11)
    got = _maml(model, mse, policy, randomness=randomness).meta_grad(params, tasks, k)
    assert_trees_close(got, expected, **TOL)


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_dropout_randomness_across_tasks(randomness):
    """Three copies of one task under vmap: "same" draws one mask for all, "different" one each."""
    k = 2
    model = dropout_mlp()
    one = task(regression_tasks(torch.Generator().manual_seed(9)), 0)
    tasks = optree.tree_map(lambda leaf: leaf.expand(3, *leaf.shape), one)
    params = fmaml.params(model)
    maml = _maml(model, mse, "binomial", randomness=randomness)
    history = maml.unrolled_loss(params, tasks, k, has_aux=True)[1].inner_losses
    adapted = maml.adapt(params, tasks.support, k, batched=True)
    same = randomness == "same"
    assert torch.equal(history[0], history[1]) == same
    assert torch.equal(adapted["0.weight"][0], adapted["0.weight"][2]) == same
    with pytest.raises(RuntimeError, match="randomness"):
        _maml(model, mse, randomness="error").unrolled_loss(params, tasks, k)


# --------------------------------------------------------------------------------------------
# first-order MAML


@pytest.mark.parametrize("policy", ["store_all", "binomial", fmaml.Uniform(2)], ids=policy_id)
@all_batchings
def test_first_order_is_the_query_gradient_at_the_adapted_params(policy, batching):
    k = 3
    model, loss_fn, params, tasks, (_, second_order) = _case("mlp", k)
    maml = _maml(model, loss_fn, policy, batching, first_order=True)
    expected = naive_first_order_grad(model, loss_fn, params, tasks, k)
    loss, grads = maml.meta_grad(params, tasks, k)
    assert_trees_close(grads, expected, **TOL)
    assert_trees_close(grad(maml.unrolled_loss)(params, tasks, k), expected, **TOL)
    # the loss and the adapted parameters are those of second-order MAML
    torch.testing.assert_close(loss, _case("mlp", k)[4][0], **TOL)
    assert_trees_close(
        maml.adapt(params, tasks.support, k, batched=True),
        _maml(model, loss_fn, policy, batching).adapt(params, tasks.support, k, batched=True),
        **TOL,
    )
    assert (flat(grads) - flat(second_order)).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------
# check_finite


def _per_step_nan_tasks(bad_task: int, bad_step: int, k: int = 5):
    tasks = regression_tasks(torch.Generator().manual_seed(4), steps=k)
    xs = tasks.support[0].clone()
    xs[bad_task, bad_step, 1, 2] = float("nan")
    return fmaml.Tasks((xs, tasks.support[1]), tasks.query)


@all_batchings
@pytest.mark.parametrize(("bad_task", "bad_step"), [(1, 3), (2, 0), (0, 4)])
def test_check_finite_names_task_and_step(batching, bad_task, bad_step):
    k = 5
    model = mlp()
    params = fmaml.params(model)
    tasks = _per_step_nan_tasks(bad_task, bad_step, k)
    maml = _maml(model, mse, "binomial", batching, check_finite=True)
    match = rf"task {bad_task}, inner step {bad_step} "
    calls = {
        "unrolled_loss": lambda: maml.unrolled_loss(params, tasks, k, per_step=True),
        "grad": lambda: grad(maml.unrolled_loss)(params, tasks, k, per_step=True),
        "meta_grad": lambda: maml.meta_grad(params, tasks, k, per_step=True),
        "adapt": lambda: maml.adapt(params, tasks.support, k, batched=True, per_step=True),
    }
    for name, call in calls.items():
        with pytest.raises(FloatingPointError, match=match):
            call()
        assert name  # (for the traceback)
    # without check_finite: no error, a NaN loss
    quiet = _maml(model, mse, "binomial", batching)
    loss, aux = quiet.unrolled_loss(params, tasks, k, per_step=True, has_aux=True)
    history = aux.inner_losses
    assert torch.isnan(loss)
    bad = (~torch.isfinite(history)).nonzero()[0].tolist()
    assert bad == [bad_task, bad_step]
    assert torch.isnan(flat(quiet.meta_grad(params, tasks, k, per_step=True)[1])).any()


@all_batchings
def test_check_finite_overflow_on_one_task(batching):
    """Task 2's inputs are so large that SGD at this rate diverges: inf after a few steps."""
    k = 6
    model = _seeded_linear()
    params = fmaml.params(model)
    tasks = regression_tasks(torch.Generator().manual_seed(4))
    xs = tasks.support[0].clone()
    xs[2] *= 1e25
    tasks = fmaml.Tasks((xs, tasks.support[1]), tasks.query)
    history = torch.stack(
        [
            naive_adapt(model, mse, requires_grad(params), task(tasks, t).support, k)[1]
            for t in range(3)
        ]
    )
    bad = ~torch.isfinite(history)
    assert not bad[:2].any() and bad[2].any() and not bad[2, 0]
    step = int(bad[2].nonzero()[0])
    maml = _maml(model, mse, "sqrt", batching, check_finite=True)
    with pytest.raises(FloatingPointError, match=rf"task 2, inner step {step} "):
        maml.meta_grad(params, tasks, k)
    with pytest.raises(FloatingPointError, match=rf"task 2, inner step {step} "):
        maml.unrolled_loss(params, tasks, k)
    with pytest.raises(FloatingPointError, match=r"task 0, inner step"):
        maml.adapt(params, task(tasks, 2).support, k)
    maml.adapt(params, task(tasks, 1).support, k)  # a finite task passes
    quiet = _maml(model, mse, "sqrt", batching)
    got = quiet.unrolled_loss(params, tasks, k, has_aux=True)[1].inner_losses
    torch.testing.assert_close(got, history, **TOL, equal_nan=True)


@pytest.mark.parametrize("route", ["unrolled_loss", "meta_grad"])
def test_check_finite_query_loss(route):
    """Finite inner losses but a NaN query: both routes raise (meta_grad is grad_and_value)."""
    model, loss_fn, params, tasks, _ = _case("mlp", 2)
    xq = tasks.query[0].clone()
    xq[1, 0, 0] = float("nan")
    bad = fmaml.Tasks(tasks.support, (xq, tasks.query[1]))
    maml = _maml(model, loss_fn, check_finite=True)
    with pytest.raises(FloatingPointError, match="query loss is nan"):
        getattr(maml, route)(params, bad, 2)


def _seeded_linear() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Linear(3, 2).to(F64)
