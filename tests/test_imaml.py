"""Implicit MAML (``fmaml._imaml``) against closed forms, dense Hessians and unrolled gradients.

The quadratic inner problem ``L_s(φ) = ½ φᵀAφ - bᵀφ`` (``A`` SPD) with query
``L_q(φ) = ½||φ - c||²`` has the proximal optimum ``φ* = (A + λI)⁻¹(b + λθ)``, so
``dφ*/dθ = λ(A + λI)⁻¹`` and the meta-gradient is ``λ(A + λI)⁻¹(φ* - c)``. Everything is float64.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _models import single_thread  # noqa: F401 (autouse fixture)
from conftest import F64, assert_trees_close
from hypothesis import given
from hypothesis import strategies as st
from torch.func import grad

import fmaml
from fmaml._imaml import IMAMLInfo, imaml_adapt, imaml_grad


def _split(v: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat vector as a two-leaf pytree, so that the solver's flattening is exercised."""
    n = v.shape[0] // 2
    return {"u": v[:n], "v": v[n:].reshape(-1, 1)}


def _join(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p["u"], p["v"].reshape(-1)])


class Quadratic:
    """``L_s = ½ φᵀAφ - bᵀφ`` on the support, ``L_q = ½||φ - c||²`` on the query."""

    def __init__(self, gen: torch.Generator, d: int, lo: float = 0.5, hi: float = 2.0) -> None:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
        eig = lo + (hi - lo) * torch.rand(d, generator=gen, dtype=F64)
        self.A = q @ torch.diag(eig) @ q.T
        self.b = torch.randn(d, generator=gen, dtype=F64)
        self.c = torch.randn(d, generator=gen, dtype=F64)
        self.theta = _split(torch.randn(d, generator=gen, dtype=F64))
        self.L = float(eig.max())
        self.d = d

    def loss(self, params, batch):
        phi = _join(params)
        if batch == "support":
            return 0.5 * phi @ self.A @ phi - self.b @ phi
        return 0.5 * ((phi - self.c) ** 2).sum()

    def optimum(self, lam: float) -> dict[str, torch.Tensor]:
        eye = torch.eye(self.d, dtype=F64)
        return _split(torch.linalg.solve(self.A + lam * eye, self.b + lam * _join(self.theta)))

    def true_grad(self, lam: float) -> dict[str, torch.Tensor]:
        eye = torch.eye(self.d, dtype=F64)
        phi = _join(self.optimum(lam))
        return _split(lam * torch.linalg.solve(self.A + lam * eye, phi - self.c))

    def grad(self, phi, lam, **kw):
        return imaml_grad(self.loss, self.theta, phi, "support", "query", lam=lam, **kw)


# --------------------------------------------------------------------------------------------
# exactness


@given(
    d=st.integers(2, 8),
    lam=st.floats(0.05, 20.0),
    seed=st.integers(0, 2**16),
    spread=st.floats(1.0, 50.0),
)
def test_matches_closed_form_at_the_optimum(d, lam, seed, spread):
    problem = Quadratic(torch.Generator().manual_seed(seed), d, lo=0.1, hi=0.1 * spread)
    g, info = problem.grad(problem.optimum(lam), lam, cg_steps=4 * d + 10)
    assert_trees_close(g, problem.true_grad(lam), rtol=1e-8, atol=1e-10)
    assert info.converged and info.residual <= 1e-10
    assert 1 <= info.iterations <= 4 * d + 10
    assert info.stationarity < 1e-9
    assert info.query_loss == pytest.approx(float(problem.loss(problem.optimum(lam), "query")))


def test_imaml_adapt_reaches_the_optimum_and_the_gradient_converges():
    problem = Quadratic(torch.Generator().manual_seed(0), 6)
    lam = 1.0
    lr = 1.0 / (problem.L + lam)
    errors, stationarities = [], []
    for steps in (5, 20, 80):
        phi = imaml_adapt(problem.loss, problem.theta, "support", lam=lam, steps=steps, lr=lr)
        g, info = problem.grad(phi, lam)
        diff = _join(g) - _join(problem.true_grad(lam))
        errors.append(float(diff.norm()))
        stationarities.append(info.stationarity)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-10
    assert stationarities[0] > stationarities[1] > stationarities[2]
    phi = imaml_adapt(problem.loss, problem.theta, "support", lam=lam, steps=80, lr=lr)
    assert_trees_close(phi, problem.optimum(lam), rtol=1e-10, atol=1e-12)


def test_stationarity_is_the_proximal_gradient_norm():
    problem = Quadratic(torch.Generator().manual_seed(1), 4)
    lam = 0.5
    phi = imaml_adapt(problem.loss, problem.theta, "support", lam=lam, steps=3, lr=0.2)
    _, info = problem.grad(phi, lam)
    f = _join(phi)
    expected = problem.A @ f - problem.b + lam * (f - _join(problem.theta))
    assert info.stationarity == pytest.approx(float(expected.norm()), rel=1e-12)
    unchanged = imaml_adapt(problem.loss, problem.theta, "support", lam=lam, steps=0, lr=0.2)
    assert_trees_close(unchanged, problem.theta, rtol=0, atol=0)


def test_unrolled_gradient_through_scan_approaches_the_implicit_one():
    """Differentiating k proximal gradient steps (fmaml.scan, checkpointed) tends to the
    implicit gradient as k grows; iMAML gets it without the k steps."""
    problem = Quadratic(torch.Generator().manual_seed(2), 6)
    lam = 1.0
    lr = 1.0 / (problem.L + lam)
    implicit, _ = problem.grad(problem.optimum(lam), lam)

    def step(phi, _, theta):
        g = grad(problem.loss)(phi, "support")
        return {n: phi[n] - lr * (g[n] + lam * (phi[n] - theta[n])) for n in phi}, None

    def unrolled_loss(theta, k):
        phi, _ = fmaml.scan(step, theta, length=k, checkpoint="binomial", consts=theta)
        return problem.loss(phi, "query")

    errors = []
    for k in (2, 8, 30, 80):
        unrolled = grad(unrolled_loss)(problem.theta, k)
        errors.append(float((_join(unrolled) - _join(implicit)).norm()))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-10


def _mlp_problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    theta = {
        "w1": torch.randn(2, 5, generator=gen, dtype=F64) * 0.8,
        "b1": torch.randn(5, generator=gen, dtype=F64) * 0.1,
        "w2": torch.randn(5, 1, generator=gen, dtype=F64) * 0.8,
    }

    def loss(p, batch):
        x, y = batch
        return ((torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2).mean()

    def batch(n):
        x = torch.randn(n, 2, generator=gen, dtype=F64)
        return x, torch.sin(2 * x[:, :1])

    return theta, loss, batch(10), batch(8)


def test_mlp_matches_dense_hessian_solve():
    """On a non-quadratic loss, at any φ: (I + H/λ)⁻¹ ∇L_q(φ) with the dense Hessian."""
    theta, loss, support, query = _mlp_problem(3)
    lam = 2.0
    phi = imaml_adapt(loss, theta, support, lam=lam, steps=50, lr=0.1)
    names = list(theta)
    sizes = [theta[n].numel() for n in names]

    def unflat(v):
        return {n: t.reshape(theta[n].shape) for n, t in zip(names, v.split(sizes), strict=True)}

    flat_phi = torch.cat([phi[n].reshape(-1) for n in names])
    hess = torch.func.hessian(lambda v: loss(unflat(v), support))(flat_phi)
    gq = torch.cat([t.reshape(-1) for t in grad(loss)(phi, query).values()])
    expected = torch.linalg.solve(torch.eye(len(gq), dtype=F64) + hess / lam, gq)
    g, info = imaml_grad(loss, theta, phi, support, query, lam=lam, cg_steps=60)
    assert info.converged
    assert_trees_close(g, unflat(expected), rtol=1e-8, atol=1e-10)


def test_mlp_implicit_equals_long_unroll_at_convergence():
    theta, loss, support, query = _mlp_problem(4)
    lam, lr, k = 4.0, 0.1, 300

    def step(phi, _, theta):
        g = grad(loss)(phi, support)
        return {n: phi[n] - lr * (g[n] + lam * (phi[n] - theta[n])) for n in phi}, None

    def unrolled_loss(theta):
        phi, _ = fmaml.scan(step, theta, length=k, checkpoint="binomial", consts=theta)
        return loss(phi, query)

    phi = imaml_adapt(loss, theta, support, lam=lam, steps=k, lr=lr)
    g, info = imaml_grad(loss, theta, phi, support, query, lam=lam, cg_steps=60)
    assert info.stationarity < 1e-10
    assert_trees_close(g, grad(unrolled_loss)(theta), rtol=1e-7, atol=1e-9)


def test_zero_query_gradient_gives_zero_without_iterations():
    problem = Quadratic(torch.Generator().manual_seed(5), 4)
    problem.c = _join(problem.optimum(1.0))  # the query optimum is φ itself
    g, info = problem.grad(problem.optimum(1.0), 1.0)
    assert info == IMAMLInfo(0, 0.0, True, info.stationarity, 0.0)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in g.values())


def test_inputs_that_require_grad_give_detached_results():
    problem = Quadratic(torch.Generator().manual_seed(6), 4)
    theta = {n: torch.nn.Parameter(t.clone()) for n, t in problem.theta.items()}
    phi = imaml_adapt(problem.loss, theta, "support", lam=1.0, steps=3, lr=0.3)
    g, _ = imaml_grad(problem.loss, theta, phi, "support", "query", lam=1.0)
    assert not any(t.requires_grad for t in [*phi.values(), *g.values()])


# --------------------------------------------------------------------------------------------
# failures


def test_cg_failure_raises_with_residual_and_iterations():
    problem = Quadratic(torch.Generator().manual_seed(7), 8, lo=0.1, hi=10.0)
    phi = problem.optimum(0.1)
    with pytest.raises(
        RuntimeError,
        match=r"imaml_grad: conjugate gradient did not converge after 2 iterations "
        r"\(relative residual \d\.\d{3}e[-+]\d\d, `cg_tol`=1e-10, `cg_steps`=2\)",
    ):
        problem.grad(phi, 0.1, cg_steps=2)


def test_cg_failure_warn_and_ignore_return_the_iterate():
    problem = Quadratic(torch.Generator().manual_seed(7), 8, lo=0.1, hi=10.0)
    phi = problem.optimum(0.1)
    with pytest.warns(RuntimeWarning, match=r"did not converge after 2 iterations"):
        g_warn, info = problem.grad(phi, 0.1, cg_steps=2, on_fail="warn")
    assert not info.converged and info.iterations == 2 and info.residual > 1e-10
    g_ignore, info_ignore = problem.grad(phi, 0.1, cg_steps=2, on_fail="ignore")
    assert info_ignore == info
    assert_trees_close(g_warn, g_ignore, rtol=0, atol=0)
    # a loose tolerance is met within the same budget
    problem_easy = Quadratic(torch.Generator().manual_seed(7), 8)
    _, info = problem_easy.grad(problem_easy.optimum(5.0), 5.0, cg_steps=3, cg_tol=0.5)
    assert info.converged and info.residual <= 0.5


def test_non_positive_curvature_is_a_failure():
    def loss(p, batch):
        return -(p["w"] ** 2).sum()  # H = -2I, so I + H/λ = (1 - 2/λ) I

    theta = {"w": torch.ones(3, dtype=F64)}
    with pytest.raises(RuntimeError, match=r"met non-positive curvature after 0 iterations"):
        imaml_grad(loss, theta, theta, None, None, lam=1.0)
    # with a larger λ the operator I - 2I/λ is positive definite again
    g, info = imaml_grad(loss, theta, theta, None, None, lam=4.0)
    assert info.converged and info.iterations == 1
    assert_trees_close(g, {"w": -2 * theta["w"] / 0.5})


_Q = Quadratic(torch.Generator().manual_seed(8), 4)
_PHI = _Q.optimum(1.0)
BAD = [
    (lambda: _Q.grad(_PHI, 0.0), ValueError, r"imaml_grad: `lam` must be a positive number, got 0"),
    (lambda: _Q.grad(_PHI, True), TypeError, r"`lam` must be a positive number, got True"),
    (lambda: _Q.grad(_PHI, 1.0, cg_steps=0), ValueError, r"`cg_steps` must be an int >= 1, got 0"),
    (lambda: _Q.grad(_PHI, 1.0, cg_steps=2.0), ValueError, r"`cg_steps` must be an int >= 1"),
    (lambda: _Q.grad(_PHI, 1.0, cg_tol=-1e-3), ValueError, r"`cg_tol` must be a positive number"),
    (lambda: _Q.grad(_PHI, 1.0, on_fail="skip"), ValueError, r"`on_fail` must be one of \("),
    (
        lambda: _Q.grad({"u": _PHI["u"]}, 1.0),
        ValueError,
        r"`adapted_params` and `meta_params` must have the same structure",
    ),
    (
        lambda: _Q.grad({"u": _PHI["u"][:1], "v": _PHI["v"]}, 1.0),
        ValueError,
        r"adapted_params\['u'\] has shape \(1,\) but the matching leaf of `meta_params` has",
    ),
    (
        lambda: _Q.grad({"u": _PHI["u"], "v": 1.0}, 1.0),
        TypeError,
        r"every leaf of `adapted_params` must be a floating-point tensor, but "
        r"adapted_params\['v'\] is float",
    ),
    (
        lambda: imaml_grad(lambda p, b: _join(p), _Q.theta, _PHI, None, None, lam=1.0),
        ValueError,
        r"`loss_fn\(params, batch\)` must return a scalar tensor, got \(4,\)",
    ),
    (
        lambda: imaml_grad("loss", _Q.theta, _PHI, None, None, lam=1.0),
        TypeError,
        r"imaml_grad: `loss_fn` must be callable",
    ),
    (
        lambda: imaml_adapt(_Q.loss, _Q.theta, "support", lam=1.0, steps=-1, lr=0.1),
        ValueError,
        r"imaml_adapt: `steps` must be an int >= 0, got -1",
    ),
    (
        lambda: imaml_adapt(_Q.loss, _Q.theta, "support", lam=1.0, steps=3, lr=0),
        ValueError,
        r"imaml_adapt: `lr` must be a positive number, got 0",
    ),
    (
        lambda: imaml_adapt(_Q.loss, _Q.theta, "support", lam=-2, steps=3, lr=0.1),
        ValueError,
        r"imaml_adapt: `lam` must be a positive number, got -2",
    ),
    (
        lambda: imaml_adapt(_Q.loss, {}, "support", lam=1.0, steps=3, lr=0.1),
        ValueError,
        r"imaml_adapt: `meta_params` has no tensors",
    ),
    (
        lambda: imaml_adapt(
            _Q.loss, {"w": torch.ones(2, dtype=torch.long)}, "s", lam=1.0, steps=3, lr=0.1
        ),
        TypeError,
        r"meta_params\['w'\] is torch.int64",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
