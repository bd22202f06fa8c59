"""Every validation message of the MAML algorithm options, raised before any inner step runs.

``adapt_only``, learned rates (``hyper``), ``inner_opt``, learning rates of every optimizer
factory, ``max_grad_grad_norm``, and a conjugate-gradient failure of implicit MAML. The loss
function counts its calls: a bad argument is reported at the boundary, not after (or halfway
through) a computation.
"""

from __future__ import annotations

import math
import re

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
from torch import nn

import fmaml
from fmaml import optim

PARAM_NAMES = r"\['0\.weight', '0\.bias', '2\.weight', '2\.bias'\]"


class Counting:
    """``mse`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, out, y):
        self.calls += 1
        return mse(out, y)


def _routes(maml, params, tasks, k, hyper):
    """Every public entry point, each with ``hyper``."""
    one = task(tasks, 0).support
    return {
        "unrolled_loss": lambda: maml.unrolled_loss(params, tasks, k, hyper),
        "meta_grad": lambda: maml.meta_grad(params, tasks, k, hyper),
        "grad": lambda: torch.func.grad(maml.unrolled_loss, argnums=(0, 3))(
            params, tasks, k, hyper
        ),
        "adapt": lambda: maml.adapt(params, one, k, hyper=hyper),
        "adapt-batched": lambda: maml.adapt(params, tasks.support, k, batched=True, hyper=hyper),
        "reptile_grad": lambda: maml.reptile_grad(params, tasks.support, k, hyper),
        "inner_step": lambda: maml.inner_step(params, one, hyper),
    }


def _raises_before_any_step(routes, loss, error, match):
    for name, call in routes.items():
        with pytest.raises(error, match=match):
            call()
        assert loss.calls == 0, f"{name} evaluated the loss before raising"


@pytest.fixture
def data():
    model = mlp()
    return model, fmaml.params(model), regression_tasks(torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------
# adapt_only


@pytest.mark.parametrize(
    ("adapt_only", "unknown"),
    [
        (["head"], r"\['head'\]"),
        (["2", "0.w", "1"], r"\['0\.w', '1'\]"),  # "1" is the Tanh: a module without parameters
        (["2.weight.0"], r"\['2\.weight\.0'\]"),
    ],
)
def test_adapt_only_unknown_names_are_listed_with_the_parameters(adapt_only, unknown):
    match = rf"`adapt_only` names no parameter for {unknown}; the model's parameters are "
    with pytest.raises(ValueError, match=match + PARAM_NAMES):
        fmaml.MAML(mlp(), mse, adapt_only=adapt_only)


@pytest.mark.parametrize("adapt_only", ["2", [2], ["2", None], [b"2"], "2.weight"])
def test_adapt_only_must_be_a_list_of_strings(adapt_only):
    match = r"`adapt_only` must be a list of parameter names or module prefixes, e\.g\. \['head'\]"
    with pytest.raises(TypeError, match=match):
        fmaml.MAML(mlp(), mse, adapt_only=adapt_only)


# --------------------------------------------------------------------------------------------
# learned rates: hyper


LEARNED = {"meta_sgd": optim.meta_sgd, "per_layer_lr": optim.per_layer_lr}


@pytest.mark.parametrize("opt", list(LEARNED))
def test_hyper_missing_and_extra_keys(data, opt):
    model, params, tasks = data
    loss = Counting()
    inner = LEARNED[opt]()
    maml = fmaml.MAML(model, loss, inner_opt=inner, checkpoint="binomial")
    good = inner.init_hyper(params, 0.1)["lr"]
    missing = {"lr": {n: r for n, r in good.items() if n != "0.bias"}}
    match = r"`hyper\['lr'\]` must be a dict with one rate per adapted parameter: missing "
    _raises_before_any_step(
        _routes(maml, params, tasks, 2, missing),
        loss,
        ValueError,
        match + r"\['0\.bias'\], unexpected \[\]\. Build it with inner_opt\.init_hyper\(params",
    )
    extra = {"lr": {**good, "head.scale": torch.ones((), dtype=F64)}}
    _raises_before_any_step(
        _routes(maml, params, tasks, 2, extra),
        loss,
        ValueError,
        match + r"\[\], unexpected \['head\.scale'\]",
    )
    not_a_dict = {"lr": torch.tensor(0.1, dtype=F64)}
    _raises_before_any_step(
        _routes(maml, params, tasks, 2, not_a_dict),
        loss,
        ValueError,
        r"one rate per adapted parameter \(got Tensor\)",
    )


@pytest.mark.parametrize(
    ("opt", "name", "bad", "want"),
    [
        ("meta_sgd", "2.bias", torch.ones(3, dtype=F64), r"\(2,\), got float64\[3\]"),
        ("meta_sgd", "0.weight", torch.ones((), dtype=F64), r"\(5, 3\), got float64\[\]"),
        ("per_layer_lr", "2.weight", torch.ones(2, 5, dtype=F64), r"\(\), got float64\[2, 5\]"),
        ("per_layer_lr", "0.bias", 0.1, r"\(\), got float \(0\.1\)"),
    ],
)
def test_hyper_wrong_shape_names_the_rate(data, opt, name, bad, want):
    model, params, tasks = data
    loss = Counting()
    inner = LEARNED[opt]()
    maml = fmaml.MAML(model, loss, inner_opt=inner)
    hyper = inner.init_hyper(params, 0.1)
    hyper["lr"][name] = bad
    match = rf"hyper\['lr'\]\['{name}'\] must be a tensor of shape {want}"
    routes = _routes(maml, params, tasks, 2, hyper)
    if not isinstance(bad, torch.Tensor):
        del routes["grad"]  # torch.func.grad itself refuses a float among its inputs
    _raises_before_any_step(routes, loss, ValueError, match)


def test_scalar_lr_must_be_0d(data):
    model, params, tasks = data
    loss = Counting()
    maml = fmaml.MAML(model, loss, inner_opt=optim.scalar_lr())
    hyper = {"lr": torch.full((1,), 0.1, dtype=F64)}
    match = r"hyper\['lr'\] must be a tensor of shape \(\), got float64\[1\]"
    _raises_before_any_step(_routes(maml, params, tasks, 2, hyper), loss, ValueError, match)


@pytest.mark.parametrize(
    "inner",
    [
        optim.meta_sgd(),
        optim.scalar_lr(),
        optim.chain(optim.clip_by_global_norm(1.0), optim.per_layer_lr()),
    ],
)
def test_hyper_missing_for_a_learned_rate_optimizer(data, inner):
    model, params, tasks = data
    loss = Counting()
    maml = fmaml.MAML(model, loss, inner_opt=inner)
    match = r"`inner_opt` has learned rates, so `hyper` is required: pass hyper=inner_opt\."
    for k in (0, 3):  # even k=0, where no step runs: the call is wrong either way
        routes = _routes(maml, params, tasks, k, None)
        del routes["grad"]  # (argnums=3 of None: torch.func.grad refuses it itself)
        routes["grad-params"] = lambda k=k: torch.func.grad(maml.unrolled_loss)(params, tasks, k)
        _raises_before_any_step(routes, loss, ValueError, match)
    for bad, shown in (({"rate": 1}, r"\['rate'\]"), ([0.1], "list")):
        routes = _routes(maml, params, tasks, 2, bad)
        del routes["grad"]  # torch.func.grad refuses non-tensor inputs itself
        match = rf"`hyper` must be a dict with the key 'lr', got {shown}"
        _raises_before_any_step(routes, loss, ValueError, match)


def test_hyper_with_adapt_only_covers_the_adapted_parameters(data):
    """With ANIL, the rates are those of the head: the message says how to build them."""
    model, params, tasks = data
    loss = Counting()
    inner = optim.meta_sgd()
    maml = fmaml.MAML(model, loss, inner_opt=inner, adapt_only=["2"])
    match = (
        r"missing \[\], unexpected \['0\.weight', '0\.bias'\]\. Build it with "
        r"inner_opt\.init_hyper\(\{n: params\[n\] for n in maml\.adapt_only\}, 0\.01\)"
    )
    full = inner.init_hyper(params, 0.1)
    _raises_before_any_step(_routes(maml, params, tasks, 2, full), loss, ValueError, match)
    head = inner.init_hyper({n: params[n] for n in maml.adapt_only}, 0.1)
    maml.unrolled_loss(params, tasks, 2, head)  # the fix works
    assert loss.calls > 0


# --------------------------------------------------------------------------------------------
# inner_opt and learning rates


def test_inner_lr_together_with_inner_opt():
    with pytest.raises(
        TypeError, match=r"pass `inner_lr` \(plain SGD\) or `inner_opt` .* not both"
    ):
        fmaml.MAML(mlp(), mse, inner_lr=0.1, inner_opt=optim.adam(1e-3))


@pytest.mark.parametrize(
    ("inner_opt", "shown"),
    [
        (torch.optim.Adam, "type"),
        ("adam", "str"),
        ((lambda p: (), lambda g, s, p=None, h=None: (g, s)), "tuple"),
        (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), "SGD"),
    ],
)
def test_inner_opt_of_the_wrong_type(inner_opt, shown):
    match = rf"`inner_opt` must be a fmaml\.optim\.GradientTransformation .* got {shown}\."
    with pytest.raises(TypeError, match=match):
        fmaml.MAML(mlp(), mse, inner_opt=inner_opt)


POSITIVE = [0, -0.1, -1]


@pytest.mark.parametrize("lr", POSITIVE)
@pytest.mark.parametrize(
    ("owner", "make", "name"),
    [
        ("sgd", lambda v: optim.sgd(v), "lr"),
        ("momentum", lambda v: optim.momentum(v), "lr"),
        ("momentum", lambda v: optim.momentum(v, nesterov=True), "lr"),
        ("adam", lambda v: optim.adam(v), "lr"),
        ("adam", lambda v: optim.adam(1e-3, eps=v), "eps"),
        ("rmsprop", lambda v: optim.rmsprop(v), "lr"),
        ("rmsprop", lambda v: optim.rmsprop(1e-2, eps=v), "eps"),
        ("clip_by_global_norm", lambda v: optim.clip_by_global_norm(v), "max_norm"),
        ("clip_backward", lambda v: optim.clip_backward(torch.ones(2), v), "max_norm"),
        (
            "meta_sgd().init_hyper",
            lambda v: optim.meta_sgd().init_hyper({"w": torch.ones(2)}, v),
            "value",
        ),
        (
            "scalar_lr().init_hyper",
            lambda v: optim.scalar_lr().init_hyper({"w": torch.ones(2)}, v),
            "value",
        ),
        (
            "per_layer_lr().init_hyper",
            lambda v: optim.per_layer_lr().init_hyper({"w": torch.ones(2)}, v),
            "value",
        ),
    ],
)
def test_non_positive_rates_in_every_factory(owner, make, name, lr):
    match = re.escape(f"fmaml.optim.{owner}: `{name}` must be a positive number, got {lr:g}.")
    with pytest.raises(ValueError, match=match):
        make(lr)


@pytest.mark.parametrize(("lr", "shown"), [(0, "0"), (-0.5, r"-0\.5"), (math.inf, "inf")])
def test_non_positive_inner_lr(lr, shown):
    with pytest.raises(ValueError, match=rf"`inner_lr` must be positive and finite, got {shown}"):
        fmaml.MAML(mlp(), mse, inner_lr=lr)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0"),
        (0.0, r"0\.0"),
        (-1.0, r"-1\.0"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (True, "True"),
        ("1", "'1'"),
        (torch.tensor(1.0), r"tensor\(1\.\)"),
    ],
)
def test_max_grad_grad_norm_must_be_positive(value, shown):
    match = rf"`max_grad_grad_norm` must be a positive number or None, got {shown}\."
    with pytest.raises(ValueError, match=match):
        fmaml.MAML(mlp(), mse, max_grad_grad_norm=value)


# --------------------------------------------------------------------------------------------
# implicit MAML


def test_imaml_cg_failure_reports_residual_and_iterations():
    """On a MAML model's loss: a linear model whose support Hessian is ill-conditioned, with
    too few CG iterations for the 6-dimensional system."""
    gen = torch.Generator().manual_seed(3)
    model = nn.Linear(5, 1).to(F64)
    maml = fmaml.MAML(model, mse)
    params = fmaml.params(model)
    x = torch.randn(12, 5, generator=gen, dtype=F64) * torch.logspace(-1, 1, 5, dtype=F64)
    support = (x, torch.randn(12, 1, generator=gen, dtype=F64))
    query = (
        torch.randn(7, 5, generator=gen, dtype=F64),
        torch.randn(7, 1, generator=gen, dtype=F64),
    )
    phi = fmaml.imaml_adapt(maml.loss, params, support, lam=0.1, steps=5, lr=0.01)
    match = (
        r"fmaml\.imaml_grad: conjugate gradient did not converge after 2 iterations "
        r"\(relative residual \d\.\d{3}e[-+]\d\d, `cg_tol`=1e-10, `cg_steps`=2\)\. Raise `cg_steps`"
    )
    with pytest.raises(RuntimeError, match=match):
        fmaml.imaml_grad(maml.loss, params, phi, support, query, lam=0.1, cg_steps=2)
    _, info = fmaml.imaml_grad(maml.loss, params, phi, support, query, lam=0.1, cg_steps=20)
    assert info.converged  # with enough iterations


def test_adapt_only_empty_is_rejected():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"`adapt_only` is empty, so the inner loop would adapt"):
        fmaml.MAML(model, torch.nn.functional.mse_loss, adapt_only=[])
