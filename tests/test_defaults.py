"""The defaults choose: ``batching="auto"``, ``checkpoint="auto"`` and the eager meta-gradient.

Tested as choices: for given budgets and shapes, which batching ran and which plan each scan
made (``fmaml.record_scan()``), with the rule checked against the measured footprint; and the
results are the same whatever was chosen (float64, against the naive unroll). Also: the eager
meta-gradient holds one chunk's graphs at a time, refuses closures it would get wrong, and marks
its gradient so that differentiating it at the wrong level raises.
"""

from __future__ import annotations

import pytest
import torch
from _models import (
    F64,
    LR,
    conv_net,
    flat,
    image_tasks,
    mlp,
    mse,
    naive_meta_grad,
    regression_tasks,
    xent,
)
from conftest import assert_trees_close
from test_scan_memory import _Probe, _Token  # a graph's lifetime, counted
from torch import nn
from torch.func import grad, vmap

import fmaml
from fmaml._batching import LARGE_TENSOR_BYTES, Batching, TaskFootprint, choose
from fmaml._footprint import SavedBytes

TOL = {"rtol": 1e-10, "atol": 1e-12}
CPU = torch.device("cpu")
CUDA = torch.device("cuda")


# --------------------------------------------------------------------------------------------
# the rule, as a function of the measured footprint


def _footprint(step=1000, query=2000, carry=100, params=100, tensors=10) -> TaskFootprint:
    return TaskFootprint(step, query, carry, params, tensors)


def test_rule_loops_over_large_operations_on_the_cpu():
    big = _footprint(step=10 * LARGE_TENSOR_BYTES, query=10 * LARGE_TENSOR_BYTES, tensors=20)
    assert big.mean_tensor_bytes > LARGE_TENSOR_BYTES
    run = choose(big, n_tasks=16, k=5, device=CPU, budget=2**40, checkpoint_budget=2**26)
    assert (run.mode, run.chunk) == ("loop", None)
    assert "large operations" in run.reason
    # the same footprint on a GPU: vmap, all tasks at once when they fit
    run = choose(big, n_tasks=16, k=5, device=CUDA, budget=2**40, checkpoint_budget=2**26)
    assert (run.mode, run.chunk) == ("vmap", None)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [(10**9, ("vmap", None)), (4 * 7000, ("vmap", 4)), (7000, ("loop", None)), (1, ("loop", None))],
)
def test_rule_chunks_small_operations_to_the_budget(budget, expected):
    # per task: the query graph (2000) and k=5 steps of graph and carry (5 * 1100 = 5500),
    # or the checkpoint budget if smaller (5000 here): 7000 bytes
    small = _footprint()
    assert small.per_task_bytes(5, 5000) == 7000
    run = choose(small, n_tasks=16, k=5, device=CPU, budget=budget, checkpoint_budget=5000)
    assert (run.mode, run.chunk) == expected
    assert run.chunks(16)[0] == (0, {None: 16, 4: 4}[run.chunk] if run.mode == "vmap" else 1)


# --------------------------------------------------------------------------------------------
# what MAML measures and chooses


def _recorded(maml, params, tasks, k, route="grad"):
    with fmaml.record_scan() as stats:
        if route == "grad":
            out = grad(maml.unrolled_loss)(params, tasks, k)
        elif route == "backward":
            p = {n: t.clone().requires_grad_() for n, t in params.items()}
            maml.unrolled_loss(p, tasks, k).backward()
            out = {n: t.grad for n, t in p.items()}
        else:
            out = maml.meta_grad(params, tasks, k)[1]
    return stats, out


def test_the_measured_footprint_is_one_tasks_step_and_query():
    model = mlp()
    maml = fmaml.MAML(model, mse, inner_lr=LR)
    params = fmaml.params(model)
    tasks = regression_tasks(torch.Generator().manual_seed(0))
    stats, _ = _recorded(maml, params, tasks, 2)
    (run,) = stats.batching
    fp = run.footprint
    # the same measurement by hand, on task 0, outside fmaml's machinery
    p = {n: t.clone().requires_grad_() for n, t in params.items()}
    (xs, ys), (xq, yq) = tasks
    with SavedBytes(list(p.values())) as step:
        loss = mse(torch.func.functional_call(model, p, (xs[0],)), ys[0])
        g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        {n: t - LR * gi for (n, t), gi in zip(p.items(), g, strict=True)}
    with SavedBytes(list(p.values())) as query:
        mse(torch.func.functional_call(model, p, (xq[0],)), yq[0])
    assert fp.step_bytes == step.bytes > 0
    assert fp.query_bytes == query.bytes > 0
    assert fp.carry_bytes == fp.param_bytes == sum(t.numel() * 8 for t in params.values())


def test_small_operations_vmap_every_task_and_keep_every_graph():
    model = mlp()
    maml = fmaml.MAML(model, mse, inner_lr=LR)
    stats, _ = _recorded(maml, fmaml.params(model), regression_tasks(torch.Generator()), 3)
    (run,) = stats.batching
    assert (run.mode, run.chunk) == ("vmap", None)
    (scan,) = stats.scans  # one scan for the whole batch of tasks
    assert scan.keeps_graphs and stats.recomputations == 0
    assert scan.graph_bytes == 3 * run.footprint.step_bytes  # three tasks' graphs


def _wide(seed: int = 0) -> nn.Module:
    """An MLP whose activations are large (1000 points x 256 units, float64: 2 MiB each)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 256), nn.Tanh(), nn.Linear(256, 2)).to(F64)


def test_large_operations_loop_on_the_cpu():
    model = _wide()
    maml = fmaml.MAML(model, mse, inner_lr=LR)
    tasks = regression_tasks(torch.Generator().manual_seed(1), n_support=1000, n_query=1000)
    stats, got = _recorded(maml, fmaml.params(model), tasks, 1)
    (run,) = stats.batching
    assert run.footprint.mean_tensor_bytes > LARGE_TENSOR_BYTES
    assert run.mode == "loop"
    assert len(stats.scans) == 3 and all(s.keeps_graphs for s in stats.scans)  # one per task
    _, want = naive_meta_grad(model, mse, fmaml.params(model), tasks, 1)
    assert_trees_close(got, want, **TOL)


@pytest.mark.parametrize(
    ("tasks_per_chunk", "expected"), [(3, ("vmap", None)), (2, ("vmap", 2)), (1, ("loop", None))]
)
def test_memory_budget_sets_the_chunks(tasks_per_chunk, expected):
    model = mlp()
    params = fmaml.params(model)
    tasks = regression_tasks(torch.Generator().manual_seed(2))
    probe = fmaml.MAML(model, mse, inner_lr=LR)
    stats, _ = _recorded(probe, params, tasks, 4)
    per_task = stats.batching[0].footprint.per_task_bytes(4, fmaml.Auto().budget)
    maml = fmaml.MAML(model, mse, inner_lr=LR, memory_budget=tasks_per_chunk * per_task)
    stats, got = _recorded(maml, params, tasks, 4)
    (run,) = stats.batching
    assert (run.mode, run.chunk) == expected
    n_chunks = {None: 1, 2: 2}[run.chunk] if run.mode == "vmap" else 3
    assert len(stats.scans) == n_chunks
    _, want = naive_meta_grad(model, mse, params, tasks, 4)
    assert_trees_close(got, want, **TOL)


def test_auto_checkpoints_each_task_beyond_its_budget():
    """The default budget is per task: a tiny one makes every task's scan checkpoint, with the
    snapshots the budget buys, whatever the batching."""
    model = mlp()
    params = fmaml.params(model)
    tasks = regression_tasks(torch.Generator().manual_seed(3))
    k = 12
    for batching in ("loop", "vmap"):
        budget = 2 * 8 * sum(t.numel() for t in params.values())  # a step graph won't fit
        maml = fmaml.MAML(
            model, mse, inner_lr=LR, batching=batching, checkpoint=fmaml.Auto(budget_bytes=budget)
        )
        stats, got = _recorded(maml, params, tasks, k)
        assert all(not s.keeps_graphs for s in stats.scans)
        assert stats.recomputations > 0
        _, want = naive_meta_grad(model, mse, params, tasks, k)
        assert_trees_close(got, want, **TOL)


# --------------------------------------------------------------------------------------------
# the same answer whatever runs


CHOICES = {
    "defaults": {},
    "loop": {"batching": "loop"},
    "vmap": {"batching": "vmap"},
    "chunks": {"task_chunk": 2},
    "checkpointed": {"checkpoint": fmaml.Auto(budget_bytes=1)},
    "functorch vmap": {"batching": "vmap", "max_grad_grad_norm": 1e30},  # torch.func inside vmap
}


@pytest.mark.parametrize("choice", list(CHOICES))
@pytest.mark.parametrize("route", ["grad", "backward", "meta_grad"])
@pytest.mark.parametrize("case", ["mlp", "conv"])
def test_every_choice_gives_the_naive_meta_gradient(choice, route, case):
    build, data, loss_fn = {
        "mlp": (mlp, regression_tasks, mse),
        "conv": (conv_net, image_tasks, xent),
    }[case]
    model = build()
    params = fmaml.params(model)
    tasks = data(torch.Generator().manual_seed(4))
    maml = fmaml.MAML(model, loss_fn, inner_lr=LR, **CHOICES[choice])
    _, got = _recorded(maml, params, tasks, 3, route)
    _, want = naive_meta_grad(model, loss_fn, params, tasks, 3)
    assert_trees_close(got, want, **TOL)


# --------------------------------------------------------------------------------------------
# the eager meta-gradient


class _Probed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return _Probe.apply(self.net(x))


@pytest.mark.parametrize("route", ["grad", "backward", "meta_grad"])
def test_the_loop_holds_one_tasks_graphs_at_a_time(route):
    """Each task's graphs (k inner steps and the query pass) are freed before the next task
    starts: ``.backward()`` and ``torch.func.grad`` included, not only ``meta_grad``."""
    model = _Probed()
    params = fmaml.params(model)
    k, n = 4, 5
    tasks = regression_tasks(torch.Generator().manual_seed(5), n_tasks=n)
    maml = fmaml.MAML(model, mse, inner_lr=LR, batching="loop", checkpoint="store_all")
    _Token.live = _Token.peak = 0
    _recorded(maml, params, tasks, k, route)
    # one task: k inner passes and one query pass (the closure probe's forward comes first)
    assert _Token.peak == k + 1
    assert _Token.live == 0


def test_without_the_eager_gradient_every_task_is_held():
    """The probe has teeth: under two grad levels (where the eager gradient steps aside), the
    plain sum keeps every task's graphs."""
    model = _Probed()
    params = fmaml.params(model)
    k, n = 2, 3
    tasks = regression_tasks(torch.Generator().manual_seed(5), n_tasks=n)
    maml = fmaml.MAML(model, mse, inner_lr=LR, batching="loop", checkpoint="store_all")
    _Token.live = _Token.peak = 0
    v = torch.ones(())
    grad(lambda s: (s * flat(grad(maml.unrolled_loss)(params, tasks, k))).sum())(v)
    assert _Token.peak >= n * (k + 1)


class _Scaled(nn.Module):
    """A module that reads a tensor that is not a parameter or buffer (``holder["s"]``)."""

    def __init__(self, holder: dict) -> None:
        super().__init__()
        self.net = mlp()
        self.holder = holder

    def forward(self, x):
        return self.net(x) * self.holder["s"]


@pytest.mark.parametrize("where", ["loss_fn", "module", "inner_opt"])
@pytest.mark.parametrize("route", ["grad", "backward", "meta_grad"])
def test_a_closure_over_a_differentiated_tensor_raises(where, route):
    """The eager gradient differentiates the arguments only: a tensor the loss reads from
    elsewhere, if differentiated, would silently get no gradient. Refused before any work.
    ``meta_grad`` returns the gradient with respect to ``params`` alone, where the closure is a
    constant (as under ``torch.func.grad_and_value``): exact, nothing refused."""
    tasks = regression_tasks(torch.Generator().manual_seed(6))
    holder = {"s": torch.tensor(1.5, dtype=F64)}
    model, loss_fn, kwargs = mlp(), mse, {"inner_lr": LR}
    if where == "loss_fn":
        loss_fn = lambda out, y: mse(out * holder["s"], y)  # noqa: E731
    elif where == "module":
        model = _Scaled(holder)
    else:
        sgd = fmaml.optim.sgd(LR)

        def update(u, state, params=None, hyper=None):
            return sgd.update({n: g * holder["s"] for n, g in u.items()}, state)

        kwargs = {"inner_opt": fmaml.optim.GradientTransformation(sgd.init, update)}
    maml = fmaml.MAML(model, loss_fn, **kwargs)
    params = fmaml.params(model)
    match = r"MAML: the loss reads a tensor that is being differentiated .* not an argument"
    if route == "grad":  # tracked by the transform, not by plain autograd

        def outer(p, s):
            holder["s"] = s
            return maml.unrolled_loss(p, tasks, 2)

        with pytest.raises(ValueError, match=match):
            grad(outer, argnums=(0, 1))(params, torch.tensor(1.5, dtype=F64))
        return
    holder["s"] = torch.tensor(1.5, dtype=F64, requires_grad=True)
    if route == "meta_grad":
        _, got = _recorded(maml, params, tasks, 2, route)
        holder["s"] = holder["s"].detach()
        want = grad(maml.unrolled_loss)(params, tasks, 2)  # the closure now a constant
        assert_trees_close(got, want, rtol=1e-10, atol=1e-12)
        return
    with pytest.raises(ValueError, match=match):
        _recorded(maml, params, tasks, 2, route)


def test_a_closure_alone_is_differentiated_exactly():
    """Differentiating only the closed-over tensor needs no eager gradient: the plain sum runs
    and its gradient is exact."""
    tasks = regression_tasks(torch.Generator().manual_seed(6))
    holder = {}
    maml = fmaml.MAML(mlp(), lambda out, y: mse(out * holder["s"], y), inner_lr=LR)
    params = fmaml.params(maml.model)

    def outer(s):
        holder["s"] = s
        return maml.unrolled_loss(params, tasks, 2)

    s = torch.tensor(1.5, dtype=F64)
    got = grad(outer)(s)
    eps = 1e-6
    want = (outer(s + eps) - outer(s - eps)) / (2 * eps)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_differentiating_the_eager_gradient_at_its_own_level_raises():
    model = mlp()
    maml = fmaml.MAML(model, mse, inner_lr=LR)
    params = fmaml.params(model)
    tasks = regression_tasks(torch.Generator().manual_seed(7))

    def outer(p):
        loss = maml.unrolled_loss(p, tasks, 2)
        g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        return sum((t**2).sum() for t in g)

    with pytest.raises(RuntimeError, match=r"computed in the forward pass .* without a graph"):
        grad(outer)(params)


def test_batched_route_equals_vmap_of_grad_route():
    """The default vmap route (plain autograd over vmapped forward passes) and ``torch.func``'s
    grad inside vmap agree to round-off, values and inner-loss histories included."""
    model = mlp()
    params = fmaml.params(model)
    tasks = regression_tasks(torch.Generator().manual_seed(8), n_tasks=4)
    fast = fmaml.MAML(model, mse, inner_lr=LR, batching="vmap")
    slow = fmaml.MAML(model, mse, inner_lr=LR, batching="vmap", max_grad_grad_norm=1e30)
    (a_loss, a_aux), a = fast.meta_grad(params, tasks, 3, has_aux=True)
    (b_loss, b_aux), b = slow.meta_grad(params, tasks, 3, has_aux=True)
    assert_trees_close(a, b, **TOL)
    torch.testing.assert_close(a_loss, b_loss, **TOL)
    torch.testing.assert_close(a_aux.inner_losses, b_aux.inner_losses, **TOL)
    per_task = vmap(
        grad(lambda p, s, q: fast.unrolled_loss(p, fmaml.Tasks(s, q), 3)), in_dims=(None, 0, 0)
    )
    split = lambda b: tuple(t[:, None] for t in b)  # noqa: E731
    g = per_task(params, split(tasks.support), split(tasks.query))
    assert_trees_close({n: t.mean(0) for n, t in g.items()}, a, **TOL)


def test_batching_choice_is_reported():
    assert Batching("loop", None, "why").chunks(3) == [(0, 1), (1, 2), (2, 3)]
    assert Batching("vmap", 2, "why").chunks(5) == [(0, 2), (2, 4), (4, 5)]
    assert Batching("vmap", None, "why").chunks(5) == [(0, 5)]
