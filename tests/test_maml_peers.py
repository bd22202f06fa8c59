"""fmaml's meta-gradients equal those of the established MAML libraries (float64).

Same model, data, tasks, inner SGD rate and loss reduction for every library: higher
(``innerloop_ctx``), torch_maml (``GradientCheckpointMAML``, its own checkpointing, and
``NaiveMAML``), torchopt (``MetaSGD``) and learn2learn (``MAML``); each library that is not
installed is skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import (
    LR,
    mlp,
    mse,
    regression_tasks,
    single_thread,  # noqa: F401 (autouse fixture)
    task,
)
from conftest import assert_trees_close
from torch import nn
from torch.func import grad

import fmaml

K = 5
N_TASKS = 3
TOL = {"rtol": 1e-10, "atol": 1e-12}
PEER_POLICIES = ["store_all", "binomial", fmaml.Uniform(2), "auto"]


def _setup(per_step: bool = False):
    model = mlp(2)
    tasks = regression_tasks(
        torch.Generator().manual_seed(21), n_tasks=N_TASKS, steps=K if per_step else None
    )
    return model, tasks


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _fmaml(model, tasks, per_step=False):
    """The reference side: fmaml's meta-gradient for a few policies and batchings (all equal)."""
    params = fmaml.params(model)
    results = []
    for policy in PEER_POLICIES:
        for batching in ("vmap", "loop"):
            maml = fmaml.MAML(model, mse, inner_lr=LR, checkpoint=policy, batching=batching)
            results.append(maml.meta_grad(params, tasks, K, per_step=per_step))
    results.append((None, grad(maml.unrolled_loss)(params, tasks, K, per_step=per_step)))
    return results


def _assert_same(peer_loss, peer_grads, results):
    for loss, grads in results:
        assert_trees_close(grads, peer_grads, **TOL)
        if loss is not None:
            torch.testing.assert_close(loss, peer_loss, **TOL)


# --------------------------------------------------------------------------------------------
# higher


def _higher(model, tasks):
    higher = pytest.importorskip("higher")
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    total = 0.0
    for t in range(N_TASKS):
        one = task(tasks, t)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(K):
                diffopt.step(mse(fmodel(one.support[0]), one.support[1]))
            loss = mse(fmodel(one.query[0]), one.query[1]) / N_TASKS
            loss.backward()
            total = total + loss.detach()
    return total, _grads(model)


def test_higher():
    model, tasks = _setup()
    _assert_same(*_higher(model, tasks), _fmaml(model, tasks))


# --------------------------------------------------------------------------------------------
# torch_maml


def _torch_maml(model, tasks, kind: str, per_step: bool):
    torch_maml = pytest.importorskip("torch_maml")
    model = copy.deepcopy(model)

    def compute_loss(net, batch):
        return mse(net(batch[0]), batch[1])

    # IngraphGradientDescent: w - lr * grad, no clipping (max_grad_grad_norm=None by default);
    # the loss is ours, so the reduction is the same.
    optimizer = torch_maml.IngraphGradientDescent(learning_rate=LR)
    if kind == "checkpoint":
        maml = torch_maml.GradientCheckpointMAML(
            model, compute_loss, optimizer=optimizer, checkpoint_steps=2
        )
    else:
        maml = torch_maml.NaiveMAML(model, compute_loss, optimizer=optimizer)
    total = 0.0
    for t in range(N_TASKS):
        one = task(tasks, t)
        if per_step:
            inputs = [(one.support[0][i], one.support[1][i]) for i in range(K)]
        else:
            inputs = [one.support] * K
        updated, _, _ = maml(inputs)
        loss = mse(updated(one.query[0]), one.query[1]) / N_TASKS
        loss.backward()
        total = total + loss.detach()
    return total, _grads(model)


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint. the use_reentrant:UserWarning")
@pytest.mark.parametrize("kind", ["checkpoint", "naive"])
@pytest.mark.parametrize("per_step", [False, True], ids=["same-batch", "per-step"])
def test_torch_maml(kind, per_step):
    model, tasks = _setup(per_step)
    _assert_same(*_torch_maml(model, tasks, kind, per_step), _fmaml(model, tasks, per_step))


# --------------------------------------------------------------------------------------------
# torchopt


def test_torchopt_meta_sgd():
    torchopt = pytest.importorskip("torchopt")
    model, tasks = _setup()
    net = copy.deepcopy(model)
    inner = torchopt.MetaSGD(net, lr=LR)
    total = 0.0
    for t in range(N_TASKS):
        one = task(tasks, t)
        net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner, by="reference")
        for _ in range(K):
            inner.step(mse(net(one.support[0]), one.support[1]))
        loss = mse(net(one.query[0]), one.query[1]) / N_TASKS
        loss.backward()
        total = total + loss.detach()
        torchopt.recover_state_dict(net, net_state)
        torchopt.recover_state_dict(inner, opt_state)
    _assert_same(total, _grads(net), _fmaml(model, tasks))


# --------------------------------------------------------------------------------------------
# learn2learn


def test_learn2learn():
    l2l = pytest.importorskip("learn2learn")
    model, tasks = _setup()
    net = copy.deepcopy(model)
    maml = l2l.algorithms.MAML(net, lr=LR, first_order=False)
    total = 0.0
    for t in range(N_TASKS):
        one = task(tasks, t)
        learner = maml.clone()
        for _ in range(K):
            learner.adapt(mse(learner(one.support[0]), one.support[1]))
        loss = mse(learner(one.query[0]), one.query[1]) / N_TASKS
        loss.backward()
        total = total + loss.detach()
    _assert_same(total, _grads(net), _fmaml(model, tasks))
