"""``MAML(..., bn_stats="track")``: the module's BatchNorm running statistics after meta-training.

Each meta-step (``unrolled_loss`` or ``meta_grad`` in train mode) updates them once, by
PyTorch's rule, with the mean over tasks of the query passes' batch statistics at the adapted
parameters; the scan's recomputations never count. The reference is torch's own BatchNorm: a
copy of the module, loaded with a task's adapted parameters (adapted by the naive loop) and run
in train mode on the query with momentum 1, holds that task's batch statistics in its buffers.
Then ``model.eval()`` is right: eval-mode accuracy on held-out tasks is close to the batch-
statistics accuracy, and far above that of never-updated buffers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _models import (
    F64,
    LR,
    image_tasks,
    naive_adapt,
    requires_grad,
    single_thread,  # noqa: F401 (autouse fixture)
    task,
    xent,
)
from conftest import assert_trees_close
from torch import nn
from torch.func import grad, jacrev, vmap

import fmaml

TOL = {"rtol": 1e-10, "atol": 1e-12}
K = 3


def two_bn_net(momentum: float | None = 0.1) -> nn.Module:
    """conv 1->4, BatchNorm2d, ReLU, pool, Linear 36->6, BatchNorm1d(momentum), ReLU, Linear."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(36, 6),
            nn.BatchNorm1d(6, momentum=momentum),
            nn.ReLU(),
            nn.Linear(6, 3),
        ).to(F64)
    with torch.no_grad():  # a start that is not torch's zeros and ones
        for bn in (model[1], model[6]):
            bn.running_mean.fill_(0.3)
            bn.running_var.fill_(2.0)
            bn.num_batches_tracked.fill_(4)
    return model


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


def expected_step(model: nn.Module, tasks: fmaml.Tasks, k: int) -> dict[str, torch.Tensor]:
    """The module's buffers after one meta-step, by torch's BatchNorm and the naive loop."""
    params = fmaml.params(model)
    per_task = []
    for t in range(tasks.support[0].shape[0]):
        one = task(tasks, t)
        adapted, _ = naive_adapt(model, xent, requires_grad(params), one.support, k)
        probe = copy.deepcopy(model)
        fmaml.load_params(probe, adapted)
        for bn in _bns(probe):
            bn.reset_running_stats()
            bn.momentum = 1.0  # the buffers become this batch's mean and unbiased variance
        with torch.no_grad():
            probe(one.query[0])
        per_task.append(_stats(probe))
    out = _stats(model)
    for prefix, bn in [(n, m) for n, m in model.named_modules() if m in _bns(model)]:
        count = int(bn.num_batches_tracked) + 1
        m = 1.0 / count if bn.momentum is None else bn.momentum
        for name in ("running_mean", "running_var"):
            batch = torch.stack([s[f"{prefix}.{name}"] for s in per_task]).mean(0)
            out[f"{prefix}.{name}"] = (1 - m) * getattr(bn, name) + m * batch
        out[f"{prefix}.num_batches_tracked"] = torch.tensor(count)
    return out


@pytest.fixture(scope="module")
def case():
    tasks = image_tasks(torch.Generator().manual_seed(11))
    return tasks, expected_step(two_bn_net(), tasks, K), expected_step(two_bn_net(None), tasks, K)


ROUTES = {
    "grad": lambda maml, model, tasks: grad(maml.unrolled_loss)(fmaml.params(model), tasks, K),
    "backward": lambda maml, model, tasks: maml.unrolled_loss(
        dict(model.named_parameters()), tasks, K
    ).backward(),
    "meta_grad": lambda maml, model, tasks: maml.meta_grad(fmaml.params(model), tasks, K),
    "no_grad": lambda maml, model, tasks: maml.unrolled_loss(fmaml.params(model), tasks, K),
}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    "batching", [{"batching": "vmap"}, {"batching": "vmap", "task_chunk": 2}, {"batching": "loop"}]
)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_one_update_per_meta_step_matches_torch_batch_norm(case, route, batching, momentum):
    tasks, expected_m, expected_cumulative = case
    model = two_bn_net(momentum)
    maml = fmaml.MAML(
        model, xent, inner_lr=LR, checkpoint=fmaml.Binomial(1), bn_stats="track", **batching
    )
    with fmaml.record_scan() as stats:
        if route == "no_grad":
            with torch.no_grad():
                ROUTES[route](maml, model, tasks)
        else:
            ROUTES[route](maml, model, tasks)
    if route != "no_grad":
        assert stats.recomputations > 0  # the backward recomputed inner steps: not counted
    expected = expected_m if momentum is not None else expected_cumulative
    assert_trees_close(_stats(model), expected, **TOL)


def test_jacrev_of_grad_is_one_meta_step():
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 1))
        model = model.to(F64)
    gen = torch.Generator().manual_seed(2)
    tasks = fmaml.Tasks(
        (torch.randn(2, 4, 2, generator=gen, dtype=F64), torch.randn(2, 4, 1, dtype=F64)),
        (torch.randn(2, 5, 2, generator=gen, dtype=F64), torch.randn(2, 5, 1, dtype=F64)),
    )
    maml = fmaml.MAML(model, F.mse_loss, inner_lr=LR, checkpoint="binomial", bn_stats="track")
    jacrev(grad(maml.unrolled_loss))(fmaml.params(model), tasks, 3)
    assert int(model[1].num_batches_tracked) == 1


def test_eval_mode_query_side_uses_the_running_statistics(case):
    """In eval mode ``predict``, ``loss`` and the query loss normalise with the module's
    buffers (as the real module does), the inner loop keeps batch statistics, and nothing is
    updated."""
    tasks, _, _ = case
    model = two_bn_net()
    maml = fmaml.MAML(model, xent, inner_lr=LR, bn_stats="track")
    params = fmaml.params(model)
    train_adapted = maml.adapt(params, tasks.support, K, batched=True)
    model.eval()
    before = _stats(model)
    adapted = maml.adapt(params, tasks.support, K, batched=True)
    assert_trees_close(adapted, train_adapted, **TOL)  # the inner loop: batch statistics
    logits = maml.predict(adapted, tasks.query[0], batched=True)
    module = copy.deepcopy(model)
    losses = []
    for t in range(3):
        fmaml.load_params(module, {n: p[t] for n, p in adapted.items()})
        torch.testing.assert_close(logits[t], module(tasks.query[0][t]), **TOL)
        one = {n: p[t] for n, p in adapted.items()}
        query = (tasks.query[0][t], tasks.query[1][t])
        losses.append(xent(module(query[0]), query[1]))
        torch.testing.assert_close(maml.loss(one, query), losses[-1], **TOL)
    torch.testing.assert_close(
        maml.unrolled_loss(params, tasks, K), torch.stack(losses).mean(), **TOL
    )
    assert_trees_close(_stats(model), before, rtol=0, atol=0)


def test_refusals():
    model = two_bn_net()
    tasks = image_tasks(torch.Generator().manual_seed(11))
    params = fmaml.params(model)
    maml = fmaml.MAML(model, xent, inner_lr=LR, bn_stats="track")
    for bn in _bns(model):
        bn.reset_running_stats()
    model.eval()
    match = r"BatchNorm '1' has never updated its running statistics \(num_batches_tracked is 0\)"
    with pytest.raises(ValueError, match=r"MAML\.predict: the model is in eval mode.*" + match):
        maml.predict(params, tasks.query[0], batched=True)
    with pytest.raises(ValueError, match=r"MAML\.unrolled_loss: .*" + match):
        maml.unrolled_loss(params, tasks, K)
    with pytest.raises(ValueError, match=r"MAML\.loss: .*" + match):
        maml.loss(params, task(tasks, 0).query)
    model.train()

    def one(p, support, query):
        return maml.unrolled_loss(p, fmaml.Tasks(support, query), K)

    split = lambda batch: tuple(t[:, None] for t in batch)  # noqa: E731
    with pytest.raises(ValueError, match=r"cannot be done inside torch\.func\.vmap"):
        vmap(grad(one), in_dims=(None, 0, 0))(params, split(tasks.support), split(tasks.query))
    assert int(model[1].num_batches_tracked) == 0
    with pytest.raises(ValueError, match=r"bn_stats='track' needs `loss_fn`"):
        fmaml.MAML(model, forward=lambda p, b: p["8.bias"].sum(), bn_stats="track")
    with pytest.raises(
        ValueError, match=r"`bn_stats` must be one of \('batch', 'carry', 'track'\)"
    ):
        fmaml.MAML(model, xent, bn_stats="running")


# --------------------------------------------------------------------------------------------
# model.eval() after meta-training


D, WAY = 16, 5
PROTOTYPES = torch.randn(WAY, D, generator=torch.Generator().manual_seed(0))


def label_permutation_tasks(gen: torch.Generator, n_tasks: int, shots: int = 2, queries: int = 6):
    """Five fixed classes (Gaussian around fixed prototypes, offset by 5 so that BatchNorm's
    initial zeros and ones are far off), each task labelling them in its own random order."""
    perm = torch.stack([torch.randperm(WAY, generator=gen) for _ in range(n_tasks)])

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.arange(WAY).repeat_interleave(n).expand(n_tasks, -1)
        x = PROTOTYPES[c] + 1.5 * torch.randn(n_tasks, c.shape[1], D, generator=gen)
        return 5.0 + x, perm.gather(1, c)

    return fmaml.Tasks(draw(shots), draw(queries))


def test_eval_mode_accuracy_after_meta_training_is_close_to_batch_statistics():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.BatchNorm1d(D), nn.Linear(D, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, WAY)
        )
    maml = fmaml.MAML(model, F.cross_entropy, inner_lr=0.5, bn_stats="track")
    params = fmaml.params(model)
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        meta_grads = grad(maml.unrolled_loss)(params, label_permutation_tasks(gen, 4), 1)
        for name, p in params.items():
            p.grad = meta_grads[name]
        opt.step()
    assert int(model[0].num_batches_tracked) == 60

    held_out = label_permutation_tasks(torch.Generator().manual_seed(99), 100)
    adapted = maml.adapt(params, held_out.support, 1, batched=True)

    def accuracy(module: nn.Module, maml: fmaml.MAML) -> float:
        with torch.no_grad():
            logits = maml.predict(adapted, held_out.query[0], batched=True)
        return (logits.argmax(-1) == held_out.query[1]).float().mean().item()

    batch_statistics = accuracy(model, maml)
    model.eval()
    eval_mode = accuracy(model, maml)
    untracked = copy.deepcopy(model)  # what model.eval() gave before: the initial buffers
    for bn in _bns(untracked):
        bn.reset_running_stats()
        bn.num_batches_tracked += 1
    stale = accuracy(untracked, fmaml.MAML(untracked, F.cross_entropy, bn_stats="track"))
    # measured: 0.856 with batch statistics, 0.853 in eval mode, 0.542 with the initial buffers
    assert batch_statistics > 0.7
    assert abs(eval_mode - batch_statistics) < 0.04
    assert stale < batch_statistics - 0.2
