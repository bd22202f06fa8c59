"""``maml.predict`` and ``fmaml.load_params``: from adapted parameters back to predictions and
to the module, and the ``loss.backward()`` route on detached parameters explained.

``predict`` is checked against ``torch.func.functional_call`` with fmaml's buffer convention
(BatchNorm running statistics ``None``) task by task, and, for BatchNorm in eval mode, against a
real module loaded with ``load_params``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import (
    F64,
    LR,
    bn_conv_net,
    conv_net,
    dropout_mlp,
    image_tasks,
    mlp,
    mse,
    naive_buffers,
    regression_tasks,
    single_thread,  # noqa: F401 (autouse fixture)
    xent,
)
from conftest import assert_trees_close
from torch import nn
from torch.func import functional_call, grad, vmap

import fmaml

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _naive_predict(model: nn.Module, params, x):
    return functional_call(model, {**params, **naive_buffers(model)}, (x,))


# --------------------------------------------------------------------------------------------
# predict


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("build", [conv_net, bn_conv_net], ids=["conv", "bn_conv"])
def test_predict_one_and_batched_match_functional_call(build, batching):
    model = build()
    tasks = image_tasks(torch.Generator().manual_seed(1))
    maml = fmaml.MAML(model, xent, inner_lr=LR, batching=batching)
    params = fmaml.params(model)
    adapted = maml.adapt(params, tasks.support, 2, batched=True)
    xq = tasks.query[0]
    per_task = [
        _naive_predict(model, {n: p[t] for n, p in adapted.items()}, xq[t]) for t in range(3)
    ]
    got = maml.predict(adapted, xq, batched=True)
    assert got.shape == (3, 5, 3)
    torch.testing.assert_close(got, torch.stack(per_task), **TOL)
    one = maml.predict({n: p[1] for n, p in adapted.items()}, xq[1])
    torch.testing.assert_close(one, per_task[1], **TOL)
    # shared (unadapted) parameters for every task: no leading T on params
    shared = maml.predict(params, xq, batched=True)
    torch.testing.assert_close(shared[2], _naive_predict(model, params, xq[2]), **TOL)
    # the eval-mode convention of bn_stats="batch": batch statistics all the same
    model.eval()
    torch.testing.assert_close(maml.predict(adapted, xq, batched=True), got, **TOL)
    model.train()
    assert all(int(b) == 0 for n, b in model.named_buffers() if "num_batches" in n)


def test_plain_vmap_of_functional_call_fails_on_batch_norm():
    """What ``predict`` replaces: torch refuses the module's running buffers under vmap."""
    model = bn_conv_net()
    tasks = image_tasks(torch.Generator().manual_seed(1))
    adapted = fmaml.MAML(model, xent, inner_lr=LR).adapt(
        fmaml.params(model), tasks.support, 1, batched=True
    )
    buffers = dict(model.named_buffers())
    with pytest.raises(RuntimeError, match="running_mean"):
        vmap(lambda p, x: functional_call(model, {**p, **buffers}, (x,)))(adapted, tasks.query[0])


def test_predict_is_differentiable():
    model = mlp()
    tasks = regression_tasks(torch.Generator().manual_seed(2))
    maml = fmaml.MAML(model, mse, inner_lr=LR)
    params = fmaml.params(model)
    xq, yq = tasks.query

    def via_predict(p):
        return mse(maml.predict(p, xq, batched=True), yq)

    def naive(p):
        return mse(torch.stack([_naive_predict(model, p, xq[t]) for t in range(3)]), yq)

    assert_trees_close(grad(via_predict)(params), grad(naive)(params), **TOL)


def test_predict_with_dropout_follows_train_and_eval_mode():
    model = dropout_mlp()
    maml = fmaml.MAML(model, mse, inner_lr=LR)
    params = fmaml.params(model)
    x = torch.randn(4, 6, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    a = maml.predict(params, x, batched=True)
    torch.manual_seed(0)
    b = maml.predict(params, x, batched=True)
    torch.testing.assert_close(a, b, **TOL)  # reproducible from the global seed
    model.eval()
    assert torch.equal(maml.predict(params, x[0]), model(x[0]))  # eval mode: no dropout


def test_predict_carry_mode_in_eval_matches_a_loaded_module():
    """``bn_stats="carry"``: eval mode normalises with the task's carried statistics, as the
    real module does once ``load_params`` has written parameters and statistics into it."""
    model = bn_conv_net()
    tasks = image_tasks(torch.Generator().manual_seed(7))
    maml = fmaml.MAML(model, xent, inner_lr=LR, bn_stats="carry")
    adapted = maml.adapt(fmaml.params(model), tasks.support, 2, batched=True)
    assert "1.running_mean" in adapted
    model.eval()
    got = maml.predict(adapted, tasks.query[0], batched=True)
    module = copy.deepcopy(model)
    for t in range(3):
        fmaml.load_params(module, {n: p[t] for n, p in adapted.items()})
        torch.testing.assert_close(got[t], module(tasks.query[0][t]), **TOL)


def test_predict_errors():
    model = conv_net()
    maml = fmaml.MAML(model, xent, inner_lr=LR)
    params = fmaml.params(model)
    tasks = image_tasks(torch.Generator().manual_seed(1))
    adapted = maml.adapt(params, tasks.support, 1, batched=True)
    xq = tasks.query[0]
    with pytest.raises(
        ValueError,
        match=r"parameter '0\.weight' has shape \(3, 4, 1, 3, 3\).*"
        r"leading task dimension.*or pass batched=True",
    ):
        maml.predict(adapted, xq[0])
    with pytest.raises(ValueError, match=r"`params\['0\.weight'\]` has 3 tasks .* but `x` has 2"):
        maml.predict(adapted, xq[:2], batched=True)
    with pytest.raises(ValueError, match=r"missing \['4\.bias'\], unexpected \[\]"):
        maml.predict({n: p for n, p in params.items() if n != "4.bias"}, xq[0])
    with pytest.raises(ValueError, match=r"MAML\.predict: x has shape \(8,\); expected at least 2"):
        maml.predict(params, xq[0, 0, 0, 0], batched=True)


# --------------------------------------------------------------------------------------------
# load_params


def test_load_params_writes_values_without_history():
    model = mlp()
    before = [p for p in model.parameters()]
    params = {n: (p * 2).requires_grad_() for n, p in fmaml.params(model).items()}
    trained = {n: p * 3 for n, p in params.items()}  # has a graph
    assert fmaml.load_params(model, trained) is model
    for (name, p), old in zip(model.named_parameters(), before, strict=True):
        assert p is old  # the module's own Parameters, written in place
        assert p.is_leaf and p.requires_grad and p.grad_fn is None
        torch.testing.assert_close(p, trained[name].detach(), rtol=0, atol=0)


def test_load_params_checks_names_and_shapes():
    model = mlp()
    params = fmaml.params(model)
    with pytest.raises(
        ValueError,
        match=r"missing \['2\.bias'\], unexpected \['head'\].*"
        r"strict=False",
    ):
        fmaml.load_params(
            model, {**{n: p for n, p in params.items() if n != "2.bias"}, "head": torch.zeros(1)}
        )
    with pytest.raises(
        ValueError,
        match=r"`params\['0\.weight'\]` has shape \(3, 5\), but the "
        r"model's parameter '0\.weight' has shape \(5, 3\)",
    ):
        fmaml.load_params(model, {**params, "0.weight": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match=r"leading task dimension: pick one task"):
        fmaml.load_params(model, {**params, "0.weight": torch.zeros(4, 5, 3)})
    with pytest.raises(TypeError, match=r"`params\['0\.bias'\]` must be a tensor, got list"):
        fmaml.load_params(model, {**params, "0.bias": [0.0] * 5})
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module, got dict"):
        fmaml.load_params(params, params)
    with pytest.raises(TypeError, match=r"`params` must be a dict \{name: tensor\}"):
        fmaml.load_params(model, list(params.values()))
    untouched = fmaml.params(model)
    # a subset with strict=False; nothing was written by the failed calls above
    assert_trees_close(untouched, params, rtol=0, atol=0)
    fmaml.load_params(model, {"2.bias": torch.ones(2, dtype=F64)}, strict=False)
    torch.testing.assert_close(model[2].bias, torch.ones(2, dtype=F64))
    torch.testing.assert_close(model[0].weight, params["0.weight"])


def test_functional_training_loop_ends_with_a_trained_module():
    """fmaml.params + torch.func.grad + torch.optim, then load_params: the module is trained."""
    model = mlp()
    tasks = regression_tasks(torch.Generator().manual_seed(5))
    maml = fmaml.MAML(model, mse, inner_lr=0.1)
    params = fmaml.params(model)
    opt = torch.optim.SGD(params.values(), lr=0.1)
    start = maml.unrolled_loss(params, tasks, 2)
    for _ in range(20):
        meta_grads = grad(maml.unrolled_loss)(params, tasks, 2)
        for name, p in params.items():
            p.grad = meta_grads[name]
        opt.step()
    fmaml.load_params(model, params)
    module_loss = maml.unrolled_loss(dict(model.named_parameters()), tasks, 2)
    torch.testing.assert_close(module_loss, maml.unrolled_loss(params, tasks, 2), **TOL)
    assert module_loss < 0.9 * start


# --------------------------------------------------------------------------------------------
# .backward() on a loss of detached parameters


def test_backward_on_detached_params_explains_itself():
    model = mlp()
    tasks = regression_tasks(torch.Generator().manual_seed(1))
    maml = fmaml.MAML(model, mse, inner_lr=LR)
    loss = maml.unrolled_loss(fmaml.params(model), tasks, 2)
    match = (
        r"MAML\.unrolled_loss: loss\.backward\(\) found no parameter that requires grad.*"
        r"fmaml\.params\(model\) are detached copies.*dict\(model\.named_parameters\(\)\)"
    )
    with pytest.raises(RuntimeError, match=match):
        loss.backward()
    # summed with a loss that has a gradient, it would silently contribute nothing: also raises
    with pytest.raises(RuntimeError, match=match):
        (maml.unrolled_loss(fmaml.params(model), tasks, 2) + model[0].weight.sum()).backward()
    # the value is the loss; nothing changes where a gradient exists or none is asked for
    named = maml.unrolled_loss(dict(model.named_parameters()), tasks, 2)
    torch.testing.assert_close(loss.detach(), named.detach(), **TOL)
    assert named.grad_fn is not None and "ParamsDoNotRequireGrad" not in str(named.grad_fn)
    with torch.no_grad():
        assert maml.unrolled_loss(fmaml.params(model), tasks, 2).grad_fn is None
