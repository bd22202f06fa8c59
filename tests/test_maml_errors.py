"""Every validation message of ``fmaml.MAML``, each raised before any inner step runs.

The loss function counts its calls: a bad argument must be reported at the boundary, not after
(or halfway through) a computation.
"""

from __future__ import annotations

import math

import pytest
import torch
from _models import (
    F64,
    mlp,
    mse,
    regression_tasks,
    single_thread,  # noqa: F401 (autouse fixture)
    task,
)

import fmaml


class Counting:
    """``mse`` that counts its calls."""

    def __init__(self, fn=mse):
        self.fn, self.calls = fn, 0

    def __call__(self, out, y):
        self.calls += 1
        return self.fn(out, y)


@pytest.fixture
def setup():
    model = mlp()
    loss = Counting()
    maml = fmaml.MAML(model, loss, inner_lr=0.1, checkpoint="binomial")
    tasks = regression_tasks(torch.Generator().manual_seed(0))
    return maml, loss, fmaml.params(model), tasks


def _routes(maml, params, tasks, k, **kwargs):
    """Every public entry point that takes ``(params, tasks-or-support, k)``."""
    return {
        "unrolled_loss": lambda: maml.unrolled_loss(params, tasks, k, **kwargs),
        "meta_grad": lambda: maml.meta_grad(params, tasks, k, **kwargs),
        "grad": lambda: torch.func.grad(maml.unrolled_loss)(params, tasks, k, **kwargs),
        "adapt": lambda: maml.adapt(params, task(tasks, 0).support, k, **kwargs),
        "adapt-batched": lambda: maml.adapt(params, tasks.support, k, batched=True, **kwargs),
    }


def _raises_before_any_step(routes, loss, error, match):
    for name, call in routes.items():
        with pytest.raises(error, match=match):
            call()
        assert loss.calls == 0, f"{name} evaluated the loss before raising"


# --------------------------------------------------------------------------------------------
# k


@pytest.mark.parametrize(
    ("k", "error", "match"),
    [
        (-1, ValueError, r"`k` must be >= 0 \(inner steps\), got -1"),
        (2.0, TypeError, r"`k` must be an int \(inner steps\), got 2\.0"),
        (True, TypeError, r"`k` must be an int \(inner steps\), got True"),
        ("3", TypeError, r"`k` must be an int \(inner steps\), got '3'"),
        (torch.tensor(3), TypeError, r"`k` must be an int"),
    ],
)
def test_bad_k(setup, k, error, match):
    maml, loss, params, tasks = setup
    _raises_before_any_step(_routes(maml, params, tasks, k), loss, error, match)


# --------------------------------------------------------------------------------------------
# params


def test_params_missing_and_extra_keys_are_named(setup):
    maml, loss, params, tasks = setup
    bad = {n: p for n, p in params.items() if n != "2.bias"}
    bad["head.scale"] = torch.ones(2, dtype=F64)
    match = r"missing \['2\.bias'\], unexpected \['head\.scale'\].*fmaml\.params\(model\)"
    _raises_before_any_step(_routes(maml, bad, tasks, 2), loss, ValueError, match)
    only_missing = {n: p for n, p in params.items() if n != "0.weight"}
    match = r"missing \['0\.weight'\], unexpected \[\]"
    _raises_before_any_step(_routes(maml, only_missing, tasks, 2), loss, ValueError, match)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (torch.ones(2, dtype=torch.long), r"int64\[2\]"),
        (torch.ones(2, dtype=torch.bool), r"bool\[2\]"),
        ([0.0, 0.0], r"list"),
    ],
)
def test_params_non_floating(setup, value, shown):
    maml, loss, params, tasks = setup
    bad = {**params, "2.bias": value}
    match = rf"parameter '2\.bias' must be a floating-point tensor, got {shown}"
    routes = _routes(maml, bad, tasks, 2)
    del routes["grad"]  # torch.func.grad itself refuses non-float inputs before MAML runs
    _raises_before_any_step(routes, loss, TypeError, match)


def test_params_not_a_dict(setup):
    maml, loss, params, tasks = setup
    match = r"`params` must be a dict \{name: tensor\} \(fmaml\.params\(model\)\), got list"
    _raises_before_any_step(_routes(maml, list(params.values()), tasks, 2), loss, TypeError, match)


# --------------------------------------------------------------------------------------------
# tasks


def test_tasks_not_a_tasks(setup):
    maml, loss, params, tasks = setup
    for bad in (tuple(tasks), {"support": tasks.support, "query": tasks.query}):
        for route in ("unrolled_loss", "meta_grad"):
            with pytest.raises(TypeError, match=r"`tasks` must be fmaml\.Tasks\(support=\.\.\."):
                getattr(maml, route)(params, bad, 2)
    assert loss.calls == 0


def test_leaf_leading_sizes_disagree_names_the_path(setup):
    maml, loss, params, tasks = setup
    (xs, ys), query = tasks
    bad = fmaml.Tasks((xs, ys[:2]), query)
    match = r"tasks\.support\[0\] has 3 tasks and tasks\.support\[1\] has 2"
    for route in ("unrolled_loss", "meta_grad"):
        with pytest.raises(ValueError, match=match):
            getattr(maml, route)(params, bad, 2)
    with pytest.raises(ValueError, match=r"but support\[0\] has 3 tasks and support\[1\] has 2"):
        maml.adapt(params, (xs, ys[:2]), 2, batched=True)
    assert loss.calls == 0


def test_support_and_query_task_counts_differ(setup):
    maml, loss, params, tasks = setup
    xq, yq = tasks.query
    bad = fmaml.Tasks(tasks.support, (xq[:1], yq[:1]))
    match = r"tasks\.support\[0\] has 3 tasks and tasks\.query\[0\] has 1"
    for route in ("unrolled_loss", "meta_grad"):
        with pytest.raises(ValueError, match=match):
            getattr(maml, route)(params, bad, 2)
    assert loss.calls == 0


def test_no_tasks(setup):
    maml, loss, params, tasks = setup
    empty = fmaml.Tasks(*(tuple(leaf[:0] for leaf in batch) for batch in tasks))
    for route in ("unrolled_loss", "meta_grad"):
        with pytest.raises(ValueError, match=r"`tasks` holds no tasks"):
            getattr(maml, route)(params, empty, 2)
    with pytest.raises(ValueError, match=r"`support` holds no tasks"):
        maml.adapt(params, empty.support, 2, batched=True)
    assert loss.calls == 0


def test_task_leaves_must_be_tensors_with_a_task_dimension(setup):
    maml, loss, params, tasks = setup
    (xs, ys), (xq, yq) = tasks
    with pytest.raises(TypeError, match=r"tasks\.query\[1\] must be a tensor, got float \(1\.0\)"):
        maml.meta_grad(params, fmaml.Tasks((xs, ys), (xq, 1.0)), 2)
    with pytest.raises(
        ValueError, match=r"tasks\.support\[1\] has shape \(3,\); expected at least 2"
    ):
        maml.unrolled_loss(params, fmaml.Tasks((xs, ys[:, 0, 0]), (xq, yq)), 2)
    with pytest.raises(ValueError, match=r"`tasks\.support` has no tensors"):
        maml.unrolled_loss(params, fmaml.Tasks((), (xq, yq)), 2)
    assert loss.calls == 0


def test_per_step_with_wrong_k_dimension(setup):
    maml, loss, params, _ = setup
    tasks = regression_tasks(torch.Generator().manual_seed(0), steps=3)
    match = r"with per_step=True, tasks\.support\[0\] needs 4 per-step batches in dimension 1"
    for route in ("unrolled_loss", "meta_grad"):
        with pytest.raises(ValueError, match=match):
            getattr(maml, route)(params, tasks, 4, per_step=True)
    with pytest.raises(ValueError, match=r"MAML\.adapt: with per_step=True, support\[0\] needs 4"):
        maml.adapt(params, tasks.support, 4, batched=True, per_step=True)
    with pytest.raises(
        ValueError, match=r": with per_step=True, support\[0\] needs 4 .* dimension 0"
    ):
        maml.adapt(params, task(tasks, 0).support, 4, per_step=True)
    # per_step needs the step dimension at all: (T, N, d) is one dimension short of (T, k, N, d)
    flat_tasks = regression_tasks(torch.Generator().manual_seed(0), d_in=3)
    xs = flat_tasks.support[0][:, :, 0]
    bad = fmaml.Tasks((xs, flat_tasks.support[1][:, :, 0]), flat_tasks.query)
    with pytest.raises(ValueError, match=r"has shape \(3, 4\); expected at least 3 dimensions"):
        maml.unrolled_loss(params, bad, 4, per_step=True)
    assert loss.calls == 0


# --------------------------------------------------------------------------------------------
# the constructor


@pytest.mark.parametrize(
    ("lr", "error", "match"),
    [
        (0, ValueError, r"`inner_lr` must be positive and finite, got 0"),
        (-0.1, ValueError, r"`inner_lr` must be positive and finite, got -0\.1"),
        (math.nan, ValueError, r"`inner_lr` must be positive and finite, got nan"),
        (math.inf, ValueError, r"`inner_lr` must be positive and finite, got inf"),
        (True, TypeError, r"`inner_lr` must be a positive number, got True"),
        ("0.1", TypeError, r"`inner_lr` must be a positive number, got '0\.1'"),
        (torch.tensor(0.1), TypeError, r"`inner_lr` must be a positive number"),
    ],
)
def test_bad_inner_lr(lr, error, match):
    with pytest.raises(error, match=match):
        fmaml.MAML(mlp(), mse, inner_lr=lr)


def test_loss_fn_and_forward_exactly_one():
    match = r"pass exactly one of `loss_fn` .* and `forward`"
    with pytest.raises(TypeError, match=match):
        fmaml.MAML(mlp())
    with pytest.raises(TypeError, match=match):
        fmaml.MAML(mlp(), mse, forward=lambda p, b: b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"batching": "map"},
            ValueError,
            r"`batching` must be one of \('auto', 'vmap', 'loop'\), got 'map'",
        ),
        ({"task_chunk": 0}, ValueError, r"`task_chunk` must be an int >= 1 or None, got 0"),
        ({"task_chunk": -2}, ValueError, r"`task_chunk` must be an int >= 1 or None, got -2"),
        ({"task_chunk": 2.0}, ValueError, r"`task_chunk` must be an int >= 1 or None, got 2\.0"),
        ({"task_chunk": True}, ValueError, r"`task_chunk` must be an int >= 1 or None, got True"),
        ({"checkpoint": "revolve"}, ValueError, r"MAML: unknown `checkpoint` 'revolve'"),
        ({"checkpoint": 3}, ValueError, r"MAML: unknown `checkpoint` 3"),
        ({"randomness": "fixed"}, ValueError, r"`randomness` must be one of"),
        ({"memory_budget": -1}, ValueError, r"MAML: `memory_budget` must be a number of bytes"),
        ({"memory_budget": "1G"}, ValueError, r"`memory_budget` must be .* got '1G'"),
        ({"memory_budget": float("nan")}, ValueError, r"`memory_budget` must be .* got nan"),
    ],
)
def test_bad_constructor_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        fmaml.MAML(mlp(), mse, **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module, got function"):
        fmaml.MAML(lambda x: x, mse)
    with pytest.raises(TypeError, match=r"fmaml\.params: `model` must be a torch\.nn\.Module"):
        fmaml.params({"w": torch.ones(1)})


# --------------------------------------------------------------------------------------------
# the loss


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")
@pytest.mark.parametrize(
    ("fn", "shown"),
    [
        (lambda out, y: (out - y) ** 2, r"float64\[4, 2\]"),
        (lambda out, y: float(((out - y) ** 2).mean()), r"float \(\d"),
    ],
)
def test_loss_fn_must_return_a_scalar_tensor(setup, fn, shown):
    _, _, params, tasks = setup
    maml = fmaml.MAML(mlp(), fn, inner_lr=0.1)
    match = rf"the loss must be a scalar tensor, but `loss_fn` returned {shown}.*Reduce it"
    with pytest.raises(ValueError, match=match):
        maml.inner_step(params, task(tasks, 0).support)
    if "float64" in shown:  # (a float() of a tensor cannot run under vmap at all)
        with pytest.raises(ValueError, match=r"the loss must be a scalar tensor, but `loss_fn`"):
            maml.meta_grad(params, tasks, 2)


def test_forward_must_return_a_scalar_tensor(setup):
    _, _, params, tasks = setup
    maml = fmaml.MAML(mlp(), forward=lambda p, batch: batch[0].sum(-1), inner_lr=0.1)
    with pytest.raises(ValueError, match=r"but `forward` returned float64\[4\]"):
        maml.adapt(params, task(tasks, 0).support, 1)


# --------------------------------------------------------------------------------------------
# mistakes that used to fail deep inside torch (or not at all)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_fn": "mse"}, r"`loss_fn` must be a function, .*got str \('mse'\)\. Pass the "),
        ({"forward": 3}, r"`forward` must be a function, forward\(params, batch\).*got int \(3\)"),
    ],
)
def test_loss_fn_and_forward_must_be_callable(kwargs, match):
    with pytest.raises(TypeError, match=r"MAML: " + match):
        fmaml.MAML(mlp(), **kwargs)


def test_tasks_of_bare_tensors(setup):
    """``fmaml.Tasks(xs, ys)``: support and query are tensors, not ``(inputs, targets)`` pairs
    (with ``T = 2`` tasks ``x, y = xs`` would even have unpacked without an error)."""
    maml, loss, params, tasks = setup
    (xs, ys), _ = tasks
    match = (
        r"MAML\.\w+: `tasks\.support` must be an \(inputs, targets\) pair, e\.g\. "
        r"fmaml\.Tasks\(support=\(xs, ys\), query=\(xq, yq\)\) with leaves \(T, N, \.\.\.\); "
        r"got a tensor float64\[3, 4, 3\]\. For batches of another form pass `forward=fn`"
    )
    routes = _routes(maml, params, fmaml.Tasks(xs, ys), 2)
    del routes["adapt"], routes["adapt-batched"]
    _raises_before_any_step(routes, loss, TypeError, match)
    for bad, shown in (((xs, ys, ys), r"a tuple of 3"), ({"x": xs, "y": ys}, r"dict \(")):
        with pytest.raises(
            TypeError, match=r"`tasks\.query` must be an \(inputs, targets\) pair.*" + shown
        ):
            maml.unrolled_loss(params, fmaml.Tasks(tasks.support, bad), 2)
        with pytest.raises(
            TypeError,
            match=r"MAML\.adapt: `support` must be an \(inputs, "
            r"targets\) pair, e\.g\. \(x, y\); got " + shown,
        ):
            maml.adapt(params, bad, 2, batched=True)
    assert loss.calls == 0


def test_a_tasks_given_to_adapt(setup):
    maml, loss, params, tasks = setup
    match = (
        r"MAML\.adapt: `support` is an fmaml\.Tasks \(support and query\); adapt takes the "
        r"support batch only: maml\.adapt\(params, tasks\.support, k, batched=True\)"
    )
    for call in (
        lambda: maml.adapt(params, tasks, 2, batched=True),
        lambda: maml.adapt(params, task(tasks, 0), 2),
        lambda: maml.reptile_grad(params, tasks, 2),
    ):
        with pytest.raises(TypeError, match=match):
            call()
    assert loss.calls == 0


def test_a_parameter_of_the_wrong_shape_is_named_with_both_shapes(setup):
    maml, loss, params, tasks = setup
    bad = {**params, "2.weight": torch.zeros(5, 2, dtype=F64)}
    match = (
        r"MAML\.\w+: parameter '2\.weight' has shape \(5, 2\), but the model's '2\.weight' has "
        r"shape \(2, 5\)\. Build `params` with fmaml\.params\(model\)"
    )
    _raises_before_any_step(_routes(maml, bad, tasks, 2), loss, ValueError, match)
    # parameters with a task dimension (from a batched adapt) where one task's are expected
    batched = {n: p.expand(3, *p.shape) for n, p in params.items()}
    with pytest.raises(
        ValueError,
        match=r"has shape \(3, 5, 3\).*leading task dimension .*"
        r"pick one task, \{n: p\[t\] for n, p in adapted\.items\(\)\}\.",
    ):
        maml.unrolled_loss(batched, tasks, 2)
    assert loss.calls == 0
