"""Metrics in the same pass: ``has_aux=True`` in ``unrolled_loss`` and ``meta_grad``.

``aux`` (a :class:`fmaml.MetaAux`) holds each task's query loss, the inner-loss history and the
``metrics`` of the query predictions, all from the forward pass that computes the meta-loss.
Checked against the naive loop of ``tests/_models.py`` under every route (``torch.func.grad``,
``meta_grad``, ``.backward()``), batching and a checkpointed policy, and by counting the model's
forward calls: asking for ``aux`` adds none.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import (
    LR,
    bn_conv_net,
    conv_net,
    image_tasks,
    naive_adapt,
    naive_buffers,
    naive_meta_grad,
    requires_grad,
    single_thread,  # noqa: F401 (autouse fixture)
    task,
    xent,
)
from conftest import assert_trees_close
from torch import nn
from torch.func import functional_call, grad, vmap

import fmaml

TOL = {"rtol": 1e-10, "atol": 1e-12}
BATCHINGS = {
    "vmap": {"batching": "vmap"},
    "vmap-chunk2": {"batching": "vmap", "task_chunk": 2},
    "loop": {"batching": "loop"},
}
K = 3


def accuracy(out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"accuracy": (out.argmax(-1) == y).to(out.dtype).mean(), "max_logit": out.max()}


def _naive_aux(model: nn.Module, params, tasks: fmaml.Tasks, k: int):
    """Per task: the query loss, the inner losses and the metrics, by the naive loop."""
    losses, histories, metrics = [], [], []
    for t in range(tasks.support[0].shape[0]):
        one = task(tasks, t)
        adapted, history = naive_adapt(model, xent, requires_grad(params), one.support, k)
        x, y = one.query
        out = functional_call(model, {**adapted, **naive_buffers(model)}, (x,))
        losses.append(xent(out, y).detach())
        histories.append(history)
        metrics.append(accuracy(out.detach(), y))
    stacked = {name: torch.stack([m[name] for m in metrics]) for name in metrics[0]}
    return torch.stack(losses), torch.stack(histories), stacked


def _check(aux: fmaml.MetaAux, expected) -> None:
    losses, history, metrics = expected
    assert isinstance(aux, fmaml.MetaAux)
    torch.testing.assert_close(aux.query_losses, losses, **TOL)
    torch.testing.assert_close(aux.inner_losses, history, **TOL)
    assert_trees_close(aux.metrics, metrics, **TOL)
    assert not any(t.requires_grad for t in (aux.query_losses, aux.inner_losses))
    assert not any(t.requires_grad for t in aux.metrics.values())


@pytest.fixture(scope="module")
def case():
    model = conv_net()
    tasks = image_tasks(torch.Generator().manual_seed(3))
    params = fmaml.params(model)
    return (
        model,
        params,
        tasks,
        _naive_aux(model, params, tasks, K),
        naive_meta_grad(model, xent, params, tasks, K),
    )


@pytest.mark.parametrize("batching", list(BATCHINGS))
@pytest.mark.parametrize("policy", ["store_all", fmaml.Binomial(1)], ids=["store_all", "Bin1"])
def test_aux_under_every_route_matches_naive(case, batching, policy):
    model, params, tasks, expected, (ref_loss, ref_grad) = case
    maml = fmaml.MAML(
        model, xent, inner_lr=LR, metrics=accuracy, checkpoint=policy, **BATCHINGS[batching]
    )
    # torch.func.grad: meta-gradient and metrics together
    grads, aux = grad(maml.unrolled_loss, has_aux=True)(params, tasks, K, has_aux=True)
    assert_trees_close(grads, ref_grad, **TOL)
    _check(aux, expected)
    # the forward value: the loss is the mean of the per-task query losses
    loss, aux = maml.unrolled_loss(params, tasks, K, has_aux=True)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(loss, aux.query_losses.mean(), **TOL)
    _check(aux, expected)
    # meta_grad: jax.value_and_grad's layout
    (loss, aux), grads = maml.meta_grad(params, tasks, K, has_aux=True)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_trees_close(grads, ref_grad, **TOL)
    _check(aux, expected)
    # .backward() on the module's own parameters
    module = copy.deepcopy(model)
    loss, aux = fmaml.MAML(
        module, xent, inner_lr=LR, metrics=accuracy, checkpoint=policy, **BATCHINGS[batching]
    ).unrolled_loss(dict(module.named_parameters()), tasks, K, has_aux=True)
    loss.backward()
    assert_trees_close({n: p.grad for n, p in module.named_parameters()}, ref_grad, **TOL)
    _check(aux, expected)


def test_without_metrics_aux_has_empty_metrics(case):
    model, params, tasks, expected, _ = case
    _, aux = fmaml.MAML(model, xent, inner_lr=LR).unrolled_loss(params, tasks, K, has_aux=True)
    assert aux.metrics == {}
    torch.testing.assert_close(aux.query_losses, expected[0], **TOL)


class CountingNet(nn.Module):
    """:func:`conv_net`, counting its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_metrics_cost_no_second_forward_pass(batching):
    """The model runs as often with ``has_aux`` and ``metrics`` as without them."""
    model = CountingNet()
    tasks = image_tasks(torch.Generator().manual_seed(4))
    params = fmaml.params(model)
    counted = {}
    calls = []

    def metric(out, y):
        calls.append(out.shape)
        return {"accuracy": (out.argmax(-1) == y).double().mean()}

    plain = fmaml.MAML(model, xent, inner_lr=LR, checkpoint="binomial", batching=batching)
    with_aux = fmaml.MAML(
        model, xent, inner_lr=LR, checkpoint="binomial", batching=batching, metrics=metric
    )
    for name, run in {
        "grad": lambda: grad(plain.unrolled_loss)(params, tasks, K),
        "grad, aux": lambda: grad(with_aux.unrolled_loss, has_aux=True)(
            params, tasks, K, has_aux=True
        ),
        "meta_grad": lambda: plain.meta_grad(params, tasks, K),
        "meta_grad, aux": lambda: with_aux.meta_grad(params, tasks, K, has_aux=True),
    }.items():
        model.calls = 0
        run()
        counted[name] = model.calls
    assert counted["grad"] == counted["grad, aux"] > 0
    assert counted["meta_grad"] == counted["meta_grad, aux"] > 0
    # the metric runs once per vmapped call (one call sees every task), or once per task
    assert len(calls) == 2 * (1 if batching == "vmap" else 3)


def test_vmap_grad_per_task_metrics(case):
    """``vmap(grad(..., has_aux=True))``: per-task meta-gradients with per-task metrics."""
    model, params, tasks, expected, _ = case
    maml = fmaml.MAML(model, xent, inner_lr=LR, metrics=accuracy, checkpoint="binomial")

    def one(p, support, query):
        return maml.unrolled_loss(p, fmaml.Tasks(support, query), K, has_aux=True)

    split = lambda batch: tuple(t[:, None] for t in batch)  # noqa: E731 (T tasks of one task)
    grads, aux = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0))(
        params, split(tasks.support), split(tasks.query)
    )
    losses, history, metrics = expected
    torch.testing.assert_close(aux.query_losses[:, 0], losses, **TOL)
    torch.testing.assert_close(aux.inner_losses[:, 0], history, **TOL)
    assert_trees_close({n: m[:, 0] for n, m in aux.metrics.items()}, metrics, **TOL)
    mean = {n: g.mean(0) for n, g in grads.items()}
    assert_trees_close(mean, grad(maml.unrolled_loss)(params, tasks, K), **TOL)


def test_metrics_with_batch_norm_under_vmap():
    """A BatchNorm net: the metrics see the same (batch-statistics) outputs as the loss."""
    model = bn_conv_net()
    tasks = image_tasks(torch.Generator().manual_seed(6))
    params = fmaml.params(model)
    maml = fmaml.MAML(model, xent, inner_lr=LR, metrics=accuracy)
    _, aux = grad(maml.unrolled_loss, has_aux=True)(params, tasks, 2, has_aux=True)
    losses, history, metrics = _naive_aux(model, params, tasks, 2)
    torch.testing.assert_close(aux.query_losses, losses, **TOL)
    torch.testing.assert_close(aux.inner_losses, history, **TOL)
    assert_trees_close(aux.metrics, metrics, **TOL)


def test_return_history_is_deprecated_and_still_works(case):
    model, params, tasks, expected, _ = case
    maml = fmaml.MAML(model, xent, inner_lr=LR)
    with pytest.deprecated_call(match=r"return_history=True` is deprecated; use has_aux=True"):
        loss, history = maml.unrolled_loss(params, tasks, K, return_history=True)
    torch.testing.assert_close(history, expected[1], **TOL)
    torch.testing.assert_close(loss, maml.unrolled_loss(params, tasks, K), **TOL)
    with pytest.raises(TypeError, match=r"pass `has_aux=True` alone"):
        maml.unrolled_loss(params, tasks, K, has_aux=True, return_history=True)


def test_metrics_must_return_a_dict_of_tensors(case):
    model, params, tasks, _, _ = case
    for bad, shown in (
        (lambda out, y: (out.argmax(-1) == y).double().mean(), r"got float64\[\]"),
        (lambda out, y: {"accuracy": 0.5}, r"got \{'accuracy': 'float \(0\.5\)'\}"),
    ):
        maml = fmaml.MAML(model, xent, inner_lr=LR, metrics=bad)
        with pytest.raises(
            TypeError, match=r"`metrics` must return a dict \{name: tensor\}.*" + shown
        ):
            maml.unrolled_loss(params, tasks, K, has_aux=True)


def test_metrics_need_loss_fn_and_must_be_callable():
    model = conv_net()
    with pytest.raises(ValueError, match=r"`metrics` needs `loss_fn`"):
        fmaml.MAML(model, forward=lambda p, b: p["4.bias"].sum(), metrics=accuracy)
    with pytest.raises(TypeError, match=r"`metrics` must be a function.*got str \('accuracy'\)"):
        fmaml.MAML(model, xent, metrics="accuracy")
