"""Tiny models, task data and the naive MAML reference shared by the ``test_maml*`` files.

The reference is the textbook MAML loop, written without fmaml: for each task, ``k`` plain SGD
steps with ``torch.autograd.grad(create_graph=True)`` on ``torch.func.functional_call``, the query
loss at the adapted parameters, the mean over tasks, differentiated with autograd. Everything is
float64 and every random draw comes from an explicit generator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fmaml

F64 = torch.float64
LR = 0.3


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: these tensors are tiny, and on a shared 2-core machine a second
    thread's spin-waits cost up to 100x. Import it into a test module to make it autouse there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# models (float64, deterministic initialisation)


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().to(F64)


def mlp(seed: int = 0, d_in: int = 3, hidden: int = 5, d_out: int = 2) -> nn.Module:
    """``Linear(d_in, hidden) -> tanh -> Linear(hidden, d_out)`` (tanh: curvature everywhere)."""
    return _seeded(
        lambda: nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)), seed
    )


def tiny_mlp(seed: int = 0) -> nn.Module:
    """``Linear(2, 2) -> tanh -> Linear(2, 1)``: 9 parameters, for Hessians."""
    return mlp(seed, d_in=2, hidden=2, d_out=1)


def conv_net(seed: int = 0) -> nn.Module:
    """conv 1->4 3x3, ReLU, maxpool 2, linear 36->3, on ``1x8x8`` images."""
    return _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(36, 3),
        ),
        seed,
    )


def bn_conv_net(seed: int = 0) -> nn.Module:
    """:func:`conv_net` with ``BatchNorm2d(4)`` after the convolution (running stats tracked)."""
    return _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(36, 3),
        ),
        seed,
    )


def dropout_mlp(seed: int = 0) -> nn.Module:
    """:func:`mlp` with ``Dropout(0.5)`` after the hidden layer (train mode)."""
    return _seeded(
        lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)), seed
    )


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y)


def xent(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


# --------------------------------------------------------------------------------------------
# task data: Tasks whose leaves lead with T (and k with per_step)


def regression_tasks(
    gen: torch.Generator,
    n_tasks: int = 3,
    n_support: int = 4,
    n_query: int = 5,
    d_in: int = 3,
    d_out: int = 2,
    steps: int | None = None,
) -> fmaml.Tasks:
    """Support ``(T, N, d_in)``/``(T, N, d_out)`` (``(T, steps, N, ...)`` when ``steps``)."""
    lead = (n_tasks,) if steps is None else (n_tasks, steps)
    xs = torch.randn((*lead, n_support, d_in), generator=gen, dtype=F64)
    ys = torch.randn((*lead, n_support, d_out), generator=gen, dtype=F64)
    xq = torch.randn((n_tasks, n_query, d_in), generator=gen, dtype=F64)
    yq = torch.randn((n_tasks, n_query, d_out), generator=gen, dtype=F64)
    return fmaml.Tasks(support=(xs, ys), query=(xq, yq))


def image_tasks(
    gen: torch.Generator, n_tasks: int = 3, n_support: int = 4, n_query: int = 5
) -> fmaml.Tasks:
    """``1x8x8`` images and labels in ``{0, 1, 2}``."""

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn((n_tasks, n, 1, 8, 8), generator=gen, dtype=F64)
        y = torch.randint(0, 3, (n_tasks, n), generator=gen)
        return x, y

    return fmaml.Tasks(support=batch(n_support), query=batch(n_query))


def task(tasks: fmaml.Tasks, t: int) -> fmaml.Tasks:
    """Task ``t`` without its leading dimension."""
    return optree.tree_map(lambda leaf: leaf[t], tasks)


def n_tasks(tasks: fmaml.Tasks) -> int:
    return optree.tree_leaves(tasks)[0].shape[0]


# --------------------------------------------------------------------------------------------
# the naive reference


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def naive_buffers(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Buffers for ``functional_call``; BatchNorm running statistics ``None`` (batch statistics)."""
    return {
        name: None if name.rsplit(".", 1)[-1] in _RUNNING else buf
        for name, buf in model.named_buffers()
    }


def naive_loss(model: nn.Module, loss_fn: Callable, params: dict, batch: Any) -> torch.Tensor:
    x, y = batch
    return loss_fn(functional_call(model, {**params, **naive_buffers(model)}, (x,)), y)


def requires_grad(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh leaf copies that require grad."""
    return {n: p.detach().clone().requires_grad_() for n, p in params.items()}


def naive_adapt(
    model: nn.Module,
    loss_fn: Callable,
    params: dict[str, torch.Tensor],
    support: Any,
    k: int,
    lr: float = LR,
    *,
    per_step: bool = False,
    create_graph: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``k`` SGD steps on one task; ``params`` must require grad. Returns (adapted, history)."""
    history = []
    for i in range(k):
        batch = optree.tree_map(lambda leaf, i=i: leaf[i], support) if per_step else support
        loss = naive_loss(model, loss_fn, params, batch)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        history.append(loss.detach())
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
    return params, torch.stack(history) if history else torch.zeros(0, dtype=F64)


def naive_unrolled_loss(
    model: nn.Module,
    loss_fn: Callable,
    params: dict[str, torch.Tensor],
    tasks: fmaml.Tasks,
    k: int,
    lr: float = LR,
    *,
    per_step: bool = False,
) -> torch.Tensor:
    """The mean over tasks of the query loss after ``k`` steps (``params`` require grad)."""
    total = 0.0
    for t in range(n_tasks(tasks)):
        one = task(tasks, t)
        adapted, _ = naive_adapt(model, loss_fn, params, one.support, k, lr, per_step=per_step)
        total = total + naive_loss(model, loss_fn, adapted, one.query)
    return total / n_tasks(tasks)


def naive_meta_grad(
    model: nn.Module,
    loss_fn: Callable,
    params: dict[str, torch.Tensor],
    tasks: fmaml.Tasks,
    k: int,
    lr: float = LR,
    *,
    per_step: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(meta-loss, meta-gradient)`` of :func:`naive_unrolled_loss` by plain autograd."""
    p0 = requires_grad(params)
    loss = naive_unrolled_loss(model, loss_fn, p0, tasks, k, lr, per_step=per_step)
    grads = torch.autograd.grad(loss, list(p0.values()))
    return loss.detach(), dict(zip(p0, grads, strict=True))


def naive_first_order_grad(
    model: nn.Module,
    loss_fn: Callable,
    params: dict[str, torch.Tensor],
    tasks: fmaml.Tasks,
    k: int,
    lr: float = LR,
) -> dict[str, torch.Tensor]:
    """FO-MAML's closed form: the mean query gradient at the (detached) adapted parameters."""
    total: dict[str, torch.Tensor] = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in range(n_tasks(tasks)):
        one = task(tasks, t)
        adapted, _ = naive_adapt(
            model, loss_fn, requires_grad(params), one.support, k, lr, create_graph=False
        )
        adapted = requires_grad(adapted)
        loss = naive_loss(model, loss_fn, adapted, one.query)
        for n, g in zip(adapted, torch.autograd.grad(loss, list(adapted.values())), strict=True):
            total[n] = total[n] + g / n_tasks(tasks)
    return total


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflat(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, p in like.items():
        out[name] = vector[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out
