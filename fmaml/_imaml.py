"""Implicit MAML (Rajeswaran et al., 2019): the meta-gradient of a proximal inner problem.

The inner problem regularises the adapted parameters towards the meta-parameters ``θ``::

    φ*(θ) = argmin_φ  L_support(φ) + (λ/2) ||φ - θ||²

At its optimum ``∇L_s(φ*) + λ (φ* - θ) = 0``, so by the implicit function theorem
``dφ*/dθ = (I + H/λ)⁻¹`` with ``H = ∇²L_s(φ*)``, and the meta-gradient of ``L_query(φ*(θ))`` is

    ∇_θ L_q(φ*(θ)) = (I + H/λ)⁻¹ ∇L_q(φ*)

solved here by conjugate gradient with Hessian-vector products. It depends on ``φ`` only, not on
the path that led there: memory and cost are independent of the number of inner steps (one
linearisation of the support gradient plus one backward pass per CG iteration). It is exact
only when ``φ`` is the optimum of the proximal problem: :func:`imaml_grad` reports the
stationarity residual ``||∇L_s(φ) + λ(φ - θ)||`` so that this can be checked.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.func import grad, grad_and_value, vjp

from fmaml._tree import flatten, leaf_paths, unflatten
from fmaml._typing import Batch, Params

__all__ = ["IMAMLInfo", "imaml_adapt", "imaml_grad"]

_ON_FAIL = ("raise", "warn", "ignore")

Leaves = list[torch.Tensor]


class IMAMLInfo(NamedTuple):
    """What :func:`imaml_grad`'s conjugate-gradient solve did.

    Attributes:
        iterations: CG iterations run (Hessian-vector products beyond the linearisation).
        residual: the final relative residual ``||r|| / ||∇L_q(φ)||`` of ``(I + H/λ) x = ∇L_q``
            (CG's recursively updated residual; 0 when the query gradient is 0).
        converged: whether ``residual <= cg_tol``.
        stationarity: ``||∇L_s(φ) + λ (φ - θ)||``, the gradient norm of the proximal inner
            objective at ``φ``; the implicit gradient is exact only when it is 0.
        query_loss: ``L_query(φ)``.
    """

    iterations: int
    residual: float
    converged: bool
    stationarity: float
    query_loss: float


# --------------------------------------------------------------------------------------------
# validation


def _positive(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"fmaml.{owner}: `{name}` must be a positive number, got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"fmaml.{owner}: `{name}` must be a positive number, got {value!r}.")
    return float(value)


def _count(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"fmaml.{owner}: `{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def _params(owner: str, tree: Any, name: str) -> tuple[Leaves, Any]:
    leaves, spec = flatten(tree)
    if not leaves:
        raise ValueError(f"fmaml.{owner}: `{name}` has no tensors.")
    for path, leaf in zip(leaf_paths(tree, name), leaves, strict=True):
        if not (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()):
            what = type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else leaf.dtype
            raise TypeError(
                f"fmaml.{owner}: every leaf of `{name}` must be a floating-point tensor, but "
                f"{path} is {what}."
            )
    return [leaf.detach() for leaf in leaves], spec


def _same(owner: str, a: Any, b: Any, a_name: str, b_name: str) -> None:
    la, sa = flatten(a)
    lb, sb = flatten(b)
    if sa != sb:
        raise ValueError(
            f"fmaml.{owner}: `{a_name}` and `{b_name}` must have the same structure, got {sa} "
            f"and {sb}."
        )
    for path, x, y in zip(leaf_paths(a, a_name), la, lb, strict=True):
        if x.shape != y.shape:
            raise ValueError(
                f"fmaml.{owner}: {path} has shape {tuple(x.shape)} but the matching leaf of "
                f"`{b_name}` has shape {tuple(y.shape)}."
            )


def _scalar_loss(loss_fn: Callable, spec: Any, owner: str) -> Callable[[Leaves, Batch], Any]:
    def loss(leaves: Leaves, batch: Batch) -> torch.Tensor:
        value = loss_fn(unflatten(spec, leaves), batch)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"fmaml.{owner}: `loss_fn(params, batch)` must return a scalar tensor, got {got}."
            )
        return value

    return loss


# --------------------------------------------------------------------------------------------
# flat vector algebra on lists of leaves


def _dot(a: Leaves, b: Leaves) -> torch.Tensor:
    zero = torch.zeros((), dtype=a[0].dtype, device=a[0].device)
    return sum(((x * y).sum() for x, y in zip(a, b, strict=True)), zero)


def _axpy(alpha: torch.Tensor, x: Leaves, y: Leaves) -> Leaves:
    """``y + alpha * x``."""
    return [b + alpha * a for a, b in zip(x, y, strict=True)]


# --------------------------------------------------------------------------------------------
# the public functions


def imaml_adapt(
    loss_fn: Callable[[Params, Batch], torch.Tensor],
    meta_params: Params,
    support: Batch,
    *,
    lam: float,
    steps: int,
    lr: float,
) -> Params:
    """Solve iMAML's proximal inner problem approximately by gradient descent, without a graph.

    ``φ_0 = θ``,  ``φ_{i+1} = φ_i - lr · (∇L_s(φ_i) + λ (φ_i - θ))``. The result is the ``φ`` to
    hand to :func:`imaml_grad`; no graph is kept, so the memory is that of one gradient.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar tensor``.
        meta_params: ``θ``, a pytree of floating-point tensors (detached here).
        support: the support batch, passed to ``loss_fn`` as is.
        lam: the proximal regularisation ``λ`` (> 0).
        steps: the number of gradient steps (>= 0).
        lr: the step size (> 0); gradient descent converges for ``lr < 2 / (L + λ)`` with ``L``
            the largest Hessian eigenvalue of the support loss.

    Returns:
        ``φ``, detached, with the structure of ``meta_params``.

    Example:
        >>> phi = imaml_adapt(loss, theta, support, lam=1.0, steps=100, lr=0.1)  # doctest: +SKIP
    """
    owner = "imaml_adapt"
    if not callable(loss_fn):
        raise TypeError(f"fmaml.{owner}: `loss_fn` must be callable, got {type(loss_fn).__name__}.")
    lam = _positive(owner, "lam", lam)
    lr = _positive(owner, "lr", lr)
    steps = _count(owner, "steps", steps, 0)
    theta, spec = _params(owner, meta_params, "meta_params")
    objective = grad(_scalar_loss(loss_fn, spec, owner))
    phi = list(theta)
    with torch.no_grad():
        for _ in range(steps):
            g = objective(phi, support)
            phi = [p - lr * (gi + lam * (p - t)) for p, gi, t in zip(phi, g, theta, strict=True)]
    return unflatten(spec, phi)


def imaml_grad(
    loss_fn: Callable[[Params, Batch], torch.Tensor],
    meta_params: Params,
    adapted_params: Params,
    support: Batch,
    query: Batch,
    *,
    lam: float,
    cg_steps: int = 10,
    cg_tol: float = 1e-10,
    on_fail: str = "raise",
) -> tuple[Params, IMAMLInfo]:
    """The implicit MAML meta-gradient of one task, ``(I + H/λ)⁻¹ ∇L_query(φ)``.

    ``H = ∇²L_support(φ)``; the linear system is solved by conjugate gradient with
    Hessian-vector products (``torch.func.vjp`` of the support gradient, linearised once), on the
    flattened pytree. Exact when ``φ`` is the optimum of ``L_s(φ) + (λ/2)||φ - θ||²`` and CG
    converges (check ``info.stationarity`` and ``info.residual``). Not differentiable itself, and
    not for ``vmap`` (CG stops on the residual's value): loop over tasks and average.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar tensor``.
        meta_params: ``θ`` (only its values enter, through ``info.stationarity``).
        adapted_params: ``φ``, e.g. from :func:`imaml_adapt`; same structure and shapes as ``θ``.
        support: the support batch.
        query: the query batch.
        lam: the proximal regularisation ``λ`` (> 0), as in the inner problem.
        cg_steps: the most CG iterations (>= 1).
        cg_tol: stop when the relative residual ``||r|| / ||∇L_q(φ)||`` is at most ``cg_tol``
            (> 0). The default suits float64; with float32 use about ``1e-4``.
        on_fail: when CG does not reach ``cg_tol`` in ``cg_steps`` iterations, or meets a
            direction of non-positive curvature (``I + H/λ`` not positive definite: raise
            ``lam``): ``"raise"`` a ``RuntimeError``, ``"warn"`` (``RuntimeWarning``) or
            ``"ignore"``; the last two return the current iterate.

    Returns:
        ``(meta_grad, info)``: the meta-gradient with the structure of ``meta_params`` (detached)
        and an :class:`IMAMLInfo`.

    Example:
        >>> phi = imaml_adapt(loss, theta, support, lam=1.0, steps=200, lr=0.1)  # doctest: +SKIP
        >>> g, info = imaml_grad(loss, theta, phi, support, query, lam=1.0)  # doctest: +SKIP

    References: Rajeswaran, Finn, Kakade and Levine (2019), Meta-Learning with Implicit Gradients.
    """
    owner = "imaml_grad"
    if not callable(loss_fn):
        raise TypeError(f"fmaml.{owner}: `loss_fn` must be callable, got {type(loss_fn).__name__}.")
    lam = _positive(owner, "lam", lam)
    cg_steps = _count(owner, "cg_steps", cg_steps, 1)
    cg_tol = _positive(owner, "cg_tol", cg_tol)
    if on_fail not in _ON_FAIL:
        raise ValueError(f"fmaml.{owner}: `on_fail` must be one of {_ON_FAIL}, got {on_fail!r}.")
    theta, _ = _params(owner, meta_params, "meta_params")
    phi, spec = _params(owner, adapted_params, "adapted_params")
    _same(owner, adapted_params, meta_params, "adapted_params", "meta_params")
    loss = _scalar_loss(loss_fn, spec, owner)

    g_query, query_loss = grad_and_value(loss)(phi, query)
    g_support, hvp = vjp(lambda p: grad(loss)(p, support), phi)
    with torch.no_grad():
        stationary = [g + lam * (p - t) for g, p, t in zip(g_support, phi, theta, strict=True)]
        stationarity = math.sqrt(float(_dot(stationary, stationary)))
        x, iterations, residual, failure = _cg(
            lambda v: [vi + hi / lam for vi, hi in zip(v, hvp(v)[0], strict=True)],
            [g.detach() for g in g_query],
            cg_steps,
            cg_tol,
        )
    converged = failure is None
    info = IMAMLInfo(iterations, residual, converged, stationarity, float(query_loss))
    if not converged and on_fail != "ignore":
        message = (
            f"fmaml.imaml_grad: conjugate gradient {failure} after {iterations} iterations "
            f"(relative residual {residual:.3e}, `cg_tol`={cg_tol:g}, `cg_steps`={cg_steps}). "
            "Raise `cg_steps`, loosen `cg_tol`, raise `lam`, or pass on_fail='warn'."
        )
        if on_fail == "raise":
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return unflatten(spec, x), info


def _cg(
    matvec: Callable[[Leaves], Leaves], b: Leaves, max_iter: int, tol: float
) -> tuple[Leaves, int, float, str | None]:
    """Conjugate gradient for ``A x = b``, ``A`` symmetric positive definite, from ``x = 0``.

    Returns ``(x, iterations, relative residual, failure)``, ``failure`` None on convergence.
    """
    b_norm = math.sqrt(float(_dot(b, b)))
    x = [torch.zeros_like(t) for t in b]
    if b_norm == 0.0:
        return x, 0, 0.0, None
    r, p = list(b), list(b)
    rr = _dot(r, r)
    for k in range(1, max_iter + 1):
        ap = matvec(p)
        curvature = _dot(p, ap)
        if not float(curvature) > 0:
            return x, k - 1, math.sqrt(float(rr)) / b_norm, "met non-positive curvature"
        alpha = rr / curvature
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = _dot(r, r)
        residual = math.sqrt(float(rr_new)) / b_norm
        if residual <= tol:
            return x, k, residual, None
        p = _axpy(rr_new / rr, p, r)
        rr = rr_new
    return x, max_iter, residual, "did not converge"
