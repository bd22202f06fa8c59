"""MAML on linear least squares, where the meta-gradient has a closed form (float64).

With ``L(w) = 0.5/n ||X w - y||^2``, the gradient is ``A w - b`` (``A = X^T X / n``,
``b = X^T y / n``), so the inner loop is affine::

    w_k = M^k w + (sum_{i<k} M^i) lr b_s,    M = I - lr A_s,

and the meta-gradient of the query loss is ``(M^k)^T (A_q w_k - b_q)``; over tasks, the mean.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import F64, single_thread  # noqa: F401 (autouse fixture)
from conftest import all_policies, policy_id
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import grad

import fmaml

SEED_THREAD = torch.tensor([[4.341776216912, 4.540181010515]], dtype=F64)


@all_policies
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_seed_thread_example(policy, batching):
    """NOTES.md: Linear(2, 1) without bias, weight [[0.1, 0.2]], mse * 3, lr 1e-3, k=2."""
    model = nn.Linear(2, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, 0.2]], dtype=F64))
    x = torch.tensor([[1.0, 2.0], [2.0, 1.0], [2.0, 2.0]], dtype=F64)
    y = torch.zeros(3, 1, dtype=F64)
    tasks = fmaml.Tasks(support=(x[None], y[None]), query=(x[None], y[None]))
    maml = fmaml.MAML(
        model,
        lambda out, target: F.mse_loss(out, target) * 3,
        inner_lr=1e-3,
        checkpoint=policy,
        batching=batching,
    )
    params = fmaml.params(model)
    tol = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(
        grad(maml.unrolled_loss)(params, tasks, 2)["weight"], SEED_THREAD, **tol
    )
    torch.testing.assert_close(maml.meta_grad(params, tasks, 2)[1]["weight"], SEED_THREAD, **tol)
    named = dict(model.named_parameters())
    maml.unrolled_loss(named, tasks, 2).backward()
    torch.testing.assert_close(model.weight.grad, SEED_THREAD, **tol)


# --------------------------------------------------------------------------------------------
# the general closed form, property-tested


def _moments(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    return x.T @ x / n, x.T @ y / n


def closed_form(w, xs, ys, xq, yq, lr, k):
    """``(meta-loss, meta-gradient, adapted w_k per task)`` of mean-over-tasks MAML."""
    d = w.shape[0]
    loss, meta_grad, adapted = 0.0, torch.zeros(d, dtype=F64), []
    n_tasks = xs.shape[0]
    for t in range(n_tasks):
        a_s, b_s = _moments(xs[t], ys[t])
        a_q, b_q = _moments(xq[t], yq[t])
        m = torch.eye(d, dtype=F64) - lr * a_s
        powers = [torch.linalg.matrix_power(m, i) for i in range(k + 1)]
        w_k = powers[k] @ w + sum((p for p in powers[:k]), torch.zeros(d, d, dtype=F64)) @ (
            lr * b_s
        )
        adapted.append(w_k)
        loss = loss + 0.5 * ((xq[t] @ w_k - yq[t]) ** 2).mean() / n_tasks
        meta_grad = meta_grad + powers[k].T @ (a_q @ w_k - b_q) / n_tasks
    return loss, meta_grad, torch.stack(adapted)


#: How the batch pytree is laid out, and how ``forward`` reads ``(x, y)`` back out of it.
LAYOUTS = {
    "dict": (lambda x, y: {"x": x, "y": y}, lambda b: (b["x"], b["y"])),
    "tuple": (lambda x, y: (x, y), lambda b: b),
    "nested": (
        lambda x, y: {"data": (x,), "target": [y]},
        lambda b: (b["data"][0], b["target"][0]),
    ),
}

FORM_POLICIES = ["store_all", "binomial", fmaml.Binomial(1), fmaml.Uniform(2), "auto"]


@given(
    d=st.integers(1, 4),
    n_support=st.integers(1, 6),
    n_query=st.integers(1, 6),
    n_tasks=st.integers(1, 3),
    k=st.integers(0, 8),
    rate=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
    policy=st.sampled_from(FORM_POLICIES),
    batching=st.sampled_from([("vmap", None), ("vmap", 2), ("loop", None)]),
    layout=st.sampled_from(list(LAYOUTS)),
)
def test_linear_regression_closed_form(
    d, n_support, n_query, n_tasks, k, rate, seed, policy, batching, layout
):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=F64)

    w = rand(d)
    xs, ys = rand(n_tasks, n_support, d), rand(n_tasks, n_support)
    xq, yq = rand(n_tasks, n_query, d), rand(n_tasks, n_query)
    # lr = rate / the largest curvature of any support loss: the inner loop contracts
    top = max(float(torch.linalg.eigvalsh(_moments(xs[t], ys[t])[0])[-1]) for t in range(n_tasks))
    lr = rate / max(top, 1e-3)
    pack, unpack = LAYOUTS[layout]

    def forward(params, batch):
        x, y = unpack(batch)
        return 0.5 * ((x @ params["w"] - y) ** 2).mean()

    maml = fmaml.MAML(
        nn.Identity(),
        forward=forward,
        inner_lr=lr,
        checkpoint=policy,
        batching=batching[0],
        task_chunk=batching[1],
    )
    tasks = fmaml.Tasks(support=pack(xs, ys), query=pack(xq, yq))
    params = {"w": w}
    ref_loss, ref_grad, ref_adapted = closed_form(w, xs, ys, xq, yq, lr, k)
    tol = {"rtol": 1e-9, "atol": 1e-11}
    grads, loss = torch.func.grad_and_value(maml.unrolled_loss)(params, tasks, k)
    torch.testing.assert_close(grads["w"], ref_grad, **tol)
    torch.testing.assert_close(loss, ref_loss, **tol)
    loss, grads = maml.meta_grad(params, tasks, k)
    torch.testing.assert_close(grads["w"], ref_grad, **tol)
    torch.testing.assert_close(loss, ref_loss, **tol)
    adapted, history = maml.adapt(params, tasks.support, k, batched=True, return_history=True)
    torch.testing.assert_close(adapted["w"], ref_adapted, **tol)
    assert history.shape == (n_tasks, k)
    if k:
        # the last inner loss is the support loss at w_{k-1}
        _, _, before_last = closed_form(w, xs, ys, xq, yq, lr, k - 1)
        expected = 0.5 * ((xs @ before_last[..., None]).squeeze(-1) - ys).pow(2).mean(-1)
        torch.testing.assert_close(history[:, -1], expected, **tol)


@pytest.mark.parametrize("policy", FORM_POLICIES, ids=policy_id)
def test_closed_form_is_not_first_order(policy):
    """The closed form's Jacobian factor (M^k)^T matters: FO-MAML drops it and differs."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=gen, dtype=F64)
    xs, ys = (
        torch.randn(2, 5, 3, generator=gen, dtype=F64),
        torch.randn(2, 5, generator=gen, dtype=F64),
    )
    xq, yq = (
        torch.randn(2, 4, 3, generator=gen, dtype=F64),
        torch.randn(2, 4, generator=gen, dtype=F64),
    )
    lr, k = 0.2, 4
    _, ref_grad, adapted = closed_form(w, xs, ys, xq, yq, lr, k)
    first_order = (
        sum(_moments(xq[t], yq[t])[0] @ adapted[t] - _moments(xq[t], yq[t])[1] for t in range(2))
        / 2
    )

    def forward(params, batch):
        x, y = batch
        return 0.5 * ((x @ params["w"] - y) ** 2).mean()

    tasks = fmaml.Tasks((xs, ys), (xq, yq))
    for fo, expected in ((False, ref_grad), (True, first_order)):
        maml = fmaml.MAML(
            nn.Identity(), forward=forward, inner_lr=lr, checkpoint=policy, first_order=fo
        )
        torch.testing.assert_close(
            maml.meta_grad({"w": w}, tasks, k)[1]["w"], expected, rtol=1e-10, atol=1e-12
        )
    assert (ref_grad - first_order).abs().max() > 1e-3
