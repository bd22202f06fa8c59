"""Inner-loop optimizers as pure ``(init, update)`` pairs, in the style of optax.

An optimizer is a :class:`GradientTransformation`: ``init(params) -> state`` and
``update(grads, state, params=None, hyper=None) -> (updates, state)``. The state is a pytree of
tensors (the step count is an ``int64`` tensor), the updates are *added* to the parameters
(:func:`apply_updates`). Every function is pure and differentiable: no in-place ops, no
``.item()``, no Python branch on a tensor value. They run inside ``torch.func.grad``, ``vmap``,
``jacrev`` and inside :func:`fmaml.scan`, whose recomputations are then exact.

One inner step of MAML with any optimizer, as the step of a scan whose carry is
``(params, state)``::

    def step(carry, _, consts):
        params, state = carry
        support, hyper = consts
        grads = torch.func.grad(loss)(params, support)
        updates, state = opt.update(grads, state, params, hyper)
        return (fmaml.optim.apply_updates(params, updates), state), None

    (adapted, _), _ = fmaml.scan(step, (params, opt.init(params)), length=k,
                                 consts=(support, hyper))

Learned rates (:func:`meta_sgd`, :func:`scalar_lr`, :func:`per_layer_lr`) are meta-parameters:
they are read from the explicit ``hyper`` argument of ``update``, never closed over, so passing
``hyper`` to :func:`fmaml.scan` as ``consts=`` gives them an exact meta-gradient.

The update rules are those of ``torch.optim`` (tested step for step against it); the argument
names are optax's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fmaml._tree import Spec, flat_dicts, flatten, leaf_paths, unflatten

__all__ = [
    "AdamState",
    "EmptyState",
    "GradientTransformation",
    "MomentumState",
    "RMSpropState",
    "adam",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_backward",
    "clip_by_global_norm",
    "global_norm",
    "meta_sgd",
    "momentum",
    "per_layer_lr",
    "rmsprop",
    "scalar_lr",
    "scale",
    "sgd",
]

#: A pytree of tensors shaped like the parameters (``dict[str, Tensor]`` in MAML).
Params = Any
#: The gradients, or the updates being transformed: a pytree shaped like the parameters.
Updates = Any
#: An optimizer's state: a pytree of tensors.
OptState = Any
#: Learned hyperparameters, e.g. ``{"lr": {name: tensor}}``; passed to ``fmaml.scan`` as
#: ``consts=`` so that their meta-gradient is exact.
Hyper = Any


class GradientTransformation(NamedTuple):
    """An optimizer: a pair of pure functions.

    Attributes:
        init: ``init(params) -> state``, the initial state, a pytree of tensors.
        update: ``update(grads, state, params=None, hyper=None) -> (updates, state)``; the
            updates are added to the parameters (:func:`apply_updates`). ``hyper`` holds learned
            hyperparameters (see :func:`meta_sgd`); transformations without any ignore it.
    """

    init: Callable[[Params], OptState]
    update: Callable[..., tuple[Updates, OptState]]


class EmptyState(NamedTuple):
    """The state of a stateless transformation (no leaves)."""


class MomentumState(NamedTuple):
    """The state of :func:`momentum`: the momentum buffer ``buf``, shaped like the parameters."""

    buf: Updates


class AdamState(NamedTuple):
    """The state of :func:`adam`: the step ``count`` (``int64``, 0-d) and the moments."""

    count: torch.Tensor
    mu: Updates
    nu: Updates


class RMSpropState(NamedTuple):
    """The state of :func:`rmsprop`: the averages of ``g²`` and ``g`` (``centered``; else ``()``)
    and the momentum buffer (``momentum > 0``; else ``()``)."""

    square_avg: Updates
    grad_avg: Updates
    buf: Updates


# --------------------------------------------------------------------------------------------
# validation


def _number(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"fmaml.optim.{owner}: `{name}` must be a number (int or float), got {value!r}."
        )
    if not math.isfinite(value):
        raise ValueError(f"fmaml.optim.{owner}: `{name}` must be finite, got {value!r}.")
    return float(value)


def _positive(owner: str, name: str, value: Any) -> float:
    value = _number(owner, name, value)
    if value <= 0:
        raise ValueError(f"fmaml.optim.{owner}: `{name}` must be a positive number, got {value:g}.")
    return value


def _nonnegative(owner: str, name: str, value: Any) -> float:
    value = _number(owner, name, value)
    if value < 0:
        raise ValueError(f"fmaml.optim.{owner}: `{name}` must be >= 0, got {value:g}.")
    return value


def _unit(owner: str, name: str, value: Any) -> float:
    value = _number(owner, name, value)
    if not 0 <= value < 1:
        raise ValueError(f"fmaml.optim.{owner}: `{name}` must be in [0, 1), got {value:g}.")
    return value


def _flag(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"fmaml.optim.{owner}: `{name}` must be True or False, got {value!r}.")
    return value


# --------------------------------------------------------------------------------------------
# pytree helpers (fmaml._tree conventions: None is an empty subtree)


def _map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    if flat_dicts(tree, *rest):  # the common case, {name: tensor}s, without optree's round trip
        return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}
    leaves, spec = flatten(tree)
    others = [flatten(r)[0] for r in rest]
    return unflatten(spec, [fn(*args) for args in zip(leaves, *others, strict=True)])


def _zeros(params: Params) -> Updates:
    return _map(torch.zeros_like, params)


def _count0(params: Params) -> torch.Tensor:
    leaves, _ = flatten(params)
    device = leaves[0].device if leaves else None
    return torch.zeros((), dtype=torch.int64, device=device)


def _check_same(owner: str, a: Any, a_name: str, b: Any, b_name: str) -> None:
    if flat_dicts(a, b):
        return
    spec_a, spec_b = flatten(a)[1], flatten(b)[1]
    if spec_a != spec_b:
        raise ValueError(
            f"fmaml.optim.{owner}: `{a_name}` and `{b_name}` must have the same structure"
            f"{_key_diff(a, b, a_name, b_name)}, got {spec_a} and {spec_b}."
        )


def _key_diff(a: Any, b: Any, a_name: str, b_name: str) -> str:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return ""
    missing = [k for k in b if k not in a]
    extra = [k for k in a if k not in b]
    if not (missing or extra):
        return ""
    return f" (missing from `{a_name}`: {missing}; not in `{b_name}`: {extra})"


def global_norm(tree: Any) -> torch.Tensor:
    """The 2-norm of all the leaves of ``tree`` together, ``sqrt(sum_i ||t_i||²)``, as
    ``torch.nn.utils.clip_grad_norm_`` computes it (the norm of the per-leaf norms)."""
    leaves, _ = flatten(tree)
    if not leaves:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in leaves]))


# --------------------------------------------------------------------------------------------
# building blocks


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates``, leaf by leaf (a new pytree; nothing is modified).

    Example:
        >>> fmaml.optim.apply_updates({"w": torch.ones(2)}, {"w": torch.full((2,), -0.5)})
        {'w': tensor([0.5000, 0.5000])}
    """
    _check_same("apply_updates", updates, "updates", params, "params")
    return _map(lambda p, u: p + u, params, updates)


def scale(factor: float) -> GradientTransformation:
    """Multiply the updates by a constant: ``u ← factor · u``.

    Args:
        factor: a finite number (negative for descent: ``scale(-lr)`` is SGD).

    Returns:
        A stateless :class:`GradientTransformation`.

    Example:
        >>> opt = fmaml.optim.chain(fmaml.optim.clip_by_global_norm(1.0), fmaml.optim.scale(-0.1))
    """
    return GradientTransformation(
        lambda params: EmptyState(), _Scale(_number("scale", "factor", factor))
    )


class _Scale:
    """:func:`scale`'s update, ``u ← factor · u``; a class so that :func:`update_and_apply` can
    recognise it and fuse it with the parameter update."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(
        self, updates: Updates, state: OptState, params: Params = None, hyper: Hyper = None
    ) -> tuple[Updates, OptState]:
        return _map(lambda u: self.factor * u, updates), state


def elementwise(opt: GradientTransformation) -> bool:
    """Whether ``opt`` treats every entry of every leaf on its own (as :func:`sgd` and
    :func:`scale` do), so that it gives the same on a batch of tasks stacked along a leading
    dimension as on each task."""
    return isinstance(opt.update, _Scale)


def update_and_apply(
    opt: GradientTransformation,
    grads: Updates,
    state: OptState,
    params: Params,
    hyper: Hyper = None,
) -> tuple[Params, OptState]:
    """``apply_updates(params, updates)`` after ``opt.update``: one optimizer step.

    For :func:`sgd` (and :func:`scale`) the two are fused into one ``torch.add(θ, g,
    alpha=-lr)`` per leaf, which halves the operations of the step and of its graph (MAML
    differentiates through it); the result is the same up to float rounding.
    """
    # Not while torch.compile traces (compile=): inductor (torch 2.13, CPU) miscompiles the
    # second derivative through add(..., alpha=) after a convolution (measured off by 2 to 14x
    # relative; aot_eager is exact), and a compiled graph fuses the two operations anyway.
    fuse = not torch.compiler.is_compiling()
    if fuse and isinstance(opt.update, _Scale) and flat_dicts(params, grads):
        factor = opt.update.factor
        return {n: torch.add(p, grads[n], alpha=factor) for n, p in params.items()}, state
    updates, state = opt.update(grads, state, params, hyper)
    return apply_updates(params, updates), state


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """Add L2 weight decay to the gradient: ``g ← g + weight_decay · θ``.

    ``chain(add_decayed_weights(wd), momentum(lr))`` is ``torch.optim.SGD(weight_decay=wd,
    momentum=...)``; in front of :func:`adam` it is ``torch.optim.Adam(weight_decay=wd)``.

    Args:
        weight_decay: the decay coefficient (>= 0).

    Returns:
        A stateless :class:`GradientTransformation`; its ``update`` needs ``params``.
    """
    weight_decay = _nonnegative("add_decayed_weights", "weight_decay", weight_decay)

    def update(updates, state, params=None, hyper=None):
        if params is None:
            raise ValueError(
                "fmaml.optim.add_decayed_weights: `update` needs `params` (the decay is "
                "weight_decay * params); call update(grads, state, params)."
            )
        _check_same("add_decayed_weights", updates, "grads", params, "params")
        return _map(lambda u, p: u + weight_decay * p, updates, params), state

    return GradientTransformation(lambda params: EmptyState(), update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale the gradient so that its global norm is at most ``max_norm``.

    ``g ← g · min(1, max_norm / (||g|| + 1e-6))`` with ``||g||`` the 2-norm of all leaves together:
    ``torch.nn.utils.clip_grad_norm_``'s formula, computed functionally (``torch.clamp``, so the
    result is differentiable; where it does not clip it is the identity).

    Args:
        max_norm: the largest global norm (> 0).

    Returns:
        A stateless :class:`GradientTransformation`.

    Example:
        >>> opt = fmaml.optim.chain(fmaml.optim.clip_by_global_norm(1.0), fmaml.optim.adam(1e-3))
    """
    max_norm = _positive("clip_by_global_norm", "max_norm", max_norm)

    def update(updates, state, params=None, hyper=None):
        coef = torch.clamp(max_norm / (global_norm(updates) + 1e-6), max=1.0)
        return _map(lambda u: u * coef.to(u.dtype), updates), state

    return GradientTransformation(lambda params: EmptyState(), update)


def chain(*transformations: GradientTransformation) -> GradientTransformation:
    """Compose transformations: each one transforms the updates of the one before, in order.

    The state is the tuple of the states; ``params`` and ``hyper`` are passed to every
    transformation. If exactly one of them has learned rates, the chain has its ``init_hyper``.

    Args:
        *transformations: :class:`GradientTransformation`\\ s, applied left to right.

    Returns:
        A :class:`GradientTransformation`.

    Example:
        >>> opt = fmaml.optim.chain(fmaml.optim.clip_by_global_norm(1.0), fmaml.optim.adam(1e-3))
        >>> state = opt.init({"w": torch.zeros(2)})
        >>> len(state)
        2
    """
    for i, t in enumerate(transformations):
        if not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
            raise TypeError(
                f"fmaml.optim.chain: argument {i} must be a GradientTransformation "
                f"(init, update), got {type(t).__name__}."
            )
    learned = [t for t in transformations if isinstance(t, _LearnedRate)]
    if len(learned) > 1:
        raise ValueError(
            "fmaml.optim.chain: at most one learned-rate transformation (meta_sgd, scalar_lr, "
            f"per_layer_lr) per chain, got {len(learned)}: they would share `hyper['lr']`."
        )

    def init(params):
        return tuple(t.init(params) for t in transformations)

    def update(updates, state, params=None, hyper=None):
        if not isinstance(state, tuple) or len(state) != len(transformations):
            raise ValueError(
                f"fmaml.optim.chain: `state` must be the tuple of {len(transformations)} states "
                "that `init` returns."
            )
        new_state = []
        for t, s in zip(transformations, state, strict=True):
            updates, s = t.update(updates, s, params, hyper)
            new_state.append(s)
        return updates, tuple(new_state)

    if learned:
        return type(learned[0])(init, update)
    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------------
# optimizers with fixed hyperparameters (torch.optim's rules)


def sgd(lr: float) -> GradientTransformation:
    """Stochastic gradient descent: ``θ ← θ - lr · g``.

    Args:
        lr: the learning rate (> 0).

    Returns:
        A stateless :class:`GradientTransformation` (as ``torch.optim.SGD(lr=lr)``).

    Example:
        >>> opt = fmaml.optim.sgd(0.1)
        >>> params = {"w": torch.ones(2)}
        >>> updates, state = opt.update({"w": torch.ones(2)}, opt.init(params))
        >>> fmaml.optim.apply_updates(params, updates)
        {'w': tensor([0.9000, 0.9000])}
    """
    return scale(-_positive("sgd", "lr", lr))


def momentum(lr: float, beta: float = 0.9, nesterov: bool = False) -> GradientTransformation:
    """SGD with (heavy-ball or Nesterov) momentum, as ``torch.optim.SGD(momentum=beta)``.

    ``b ← beta · b + g``;  ``θ ← θ - lr · b``, or with ``nesterov`` ``θ ← θ - lr · (g + beta · b)``
    (``b = 0`` initially, so the first step is ``b = g`` as in torch; no dampening).

    Args:
        lr: the learning rate (> 0).
        beta: the momentum coefficient, in ``[0, 1)``.
        nesterov: Nesterov momentum.

    Returns:
        A :class:`GradientTransformation` with state :class:`MomentumState`.

    Example:
        >>> opt = fmaml.optim.momentum(0.1, beta=0.9, nesterov=True)
    """
    lr = _positive("momentum", "lr", lr)
    beta = _unit("momentum", "beta", beta)
    nesterov = _flag("momentum", "nesterov", nesterov)

    def init(params):
        return MomentumState(_zeros(params))

    def update(updates, state, params=None, hyper=None):
        buf = _map(lambda b, g: beta * b + g, state.buf, updates)
        if nesterov:
            return _map(lambda g, b: -lr * (g + beta * b), updates, buf), MomentumState(buf)
        return _map(lambda b: -lr * b, buf), MomentumState(buf)

    return GradientTransformation(init, update)


def adam(
    lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> GradientTransformation:
    """Adam (Kingma and Ba, 2015), as ``torch.optim.Adam``, bias correction included.

    ``t ← t + 1``;  ``m ← b1 · m + (1 - b1) · g``;  ``v ← b2 · v + (1 - b2) · g²``;
    ``θ ← θ - lr · m̂ / (sqrt(v̂ + eps_root) + eps)`` with ``m̂ = m / (1 - b1ᵗ)``,
    ``v̂ = v / (1 - b2ᵗ)``.

    Args:
        lr: the learning rate (> 0).
        b1: the decay of the first moment, in ``[0, 1)``.
        b2: the decay of the second moment, in ``[0, 1)``.
        eps: added to the denominator (> 0).
        eps_root: added under the square root (>= 0; 0 is torch's rule). The derivative of
            ``sqrt`` is infinite at 0, so a meta-gradient through Adam is NaN where a gradient
            entry is exactly 0 (a dead ReLU, an unused embedding row); ``eps_root=1e-16`` (or
            ``1e-30`` in float64) keeps it finite.

    Returns:
        A :class:`GradientTransformation` with state :class:`AdamState` (``count`` an ``int64``
        tensor).

    Example:
        >>> opt = fmaml.optim.adam(1e-2)
        >>> state = opt.init({"w": torch.zeros(3)})
        >>> int(state.count)
        0
    """
    lr = _positive("adam", "lr", lr)
    b1 = _unit("adam", "b1", b1)
    b2 = _unit("adam", "b2", b2)
    eps = _positive("adam", "eps", eps)
    eps_root = _nonnegative("adam", "eps_root", eps_root)

    def init(params):
        return AdamState(_count0(params), _zeros(params), _zeros(params))

    def update(updates, state, params=None, hyper=None):
        count = state.count + 1
        mu = _map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = _map(lambda v, g: b2 * v + (1 - b2) * (g * g), state.nu, updates)

        def step(m, v):
            t = count.to(m.dtype)
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            return -lr * m_hat / (torch.sqrt(v_hat + eps_root) + eps)

        return _map(step, mu, nu), AdamState(count, mu, nu)

    return GradientTransformation(init, update)


def rmsprop(
    lr: float = 1e-2,
    decay: float = 0.99,
    eps: float = 1e-8,
    momentum: float = 0.0,
    centered: bool = False,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """RMSprop (Hinton, 2012), as ``torch.optim.RMSprop(alpha=decay)``.

    ``s ← decay · s + (1 - decay) · g²``; centered: ``ḡ ← decay · ḡ + (1 - decay) · g``,
    ``d = sqrt(s - ḡ² + eps_root) + eps``, else ``d = sqrt(s + eps_root) + eps``; then
    ``θ ← θ - lr · g / d``, or with momentum ``b ← momentum · b + g / d``, ``θ ← θ - lr · b``.

    Args:
        lr: the learning rate (> 0).
        decay: the decay of the averages (torch's ``alpha``), in ``[0, 1)``.
        eps: added to the denominator (> 0).
        momentum: the momentum coefficient, in ``[0, 1)`` (0: none).
        centered: normalise by the variance estimate instead of the raw second moment.
        eps_root: added under the square root (>= 0; 0 is torch's rule); see :func:`adam`.

    Returns:
        A :class:`GradientTransformation` with state :class:`RMSpropState` (unused slots ``()``).

    Example:
        >>> opt = fmaml.optim.rmsprop(1e-2, momentum=0.9, centered=True)
    """
    lr = _positive("rmsprop", "lr", lr)
    decay = _unit("rmsprop", "decay", decay)
    eps = _positive("rmsprop", "eps", eps)
    mom = _unit("rmsprop", "momentum", momentum)
    centered = _flag("rmsprop", "centered", centered)
    eps_root = _nonnegative("rmsprop", "eps_root", eps_root)

    def init(params):
        grad_avg = _zeros(params) if centered else ()
        buf = _zeros(params) if mom > 0 else ()
        return RMSpropState(_zeros(params), grad_avg, buf)

    def update(updates, state, params=None, hyper=None):
        square_avg = _map(lambda s, g: decay * s + (1 - decay) * (g * g), state.square_avg, updates)
        if centered:
            grad_avg = _map(lambda a, g: decay * a + (1 - decay) * g, state.grad_avg, updates)
            var = _map(lambda s, a: s - a * a, square_avg, grad_avg)
        else:
            grad_avg, var = (), square_avg
        scaled = _map(lambda g, v: g / (torch.sqrt(v + eps_root) + eps), updates, var)
        if mom > 0:
            buf = _map(lambda b, u: mom * b + u, state.buf, scaled)
            return _map(lambda b: -lr * b, buf), RMSpropState(square_avg, grad_avg, buf)
        return _map(lambda u: -lr * u, scaled), RMSpropState(square_avg, grad_avg, ())

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------------
# learned rates: meta-parameters read from `hyper`


class _LearnedRate(GradientTransformation):
    """A :class:`GradientTransformation` whose rates are read from ``hyper["lr"]``."""

    __slots__ = ()
    _owner = "learned_rate"

    def init_hyper(self, params: Params, value: float) -> Hyper:
        """The initial ``hyper`` pytree, every rate ``value``: ``{"lr": ...}``."""
        value = _positive(f"{self._owner}().init_hyper", "value", value)
        leaves, _ = flatten(params)
        for path, leaf in zip(leaf_paths(params, "params"), leaves, strict=True):
            if not (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()):
                raise TypeError(
                    f"fmaml.optim.{self._owner}().init_hyper: every leaf of `params` must be a "
                    f"floating-point tensor, but {path} is {type(leaf).__name__}."
                )
        return {"lr": self._rates(params, value)}

    def _rates(self, params: Params, value: float) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError


class _MetaSGD(_LearnedRate):
    __slots__ = ()
    _owner = "meta_sgd"

    def _rates(self, params, value):
        return _map(lambda p: torch.full_like(p.detach(), value), params)


class _ScalarLR(_LearnedRate):
    __slots__ = ()
    _owner = "scalar_lr"

    def _rates(self, params, value):
        leaves, _ = flatten(params)
        if not leaves:
            return torch.tensor(value)
        return torch.tensor(value, dtype=leaves[0].dtype, device=leaves[0].device)


class _PerLayerLR(_LearnedRate):
    __slots__ = ()
    _owner = "per_layer_lr"

    def _rates(self, params, value):
        return _map(lambda p: p.detach().new_full((), value), params)


def _hyper_lr(owner: str, hyper: Any) -> Any:
    if hyper is None:
        raise ValueError(
            f"fmaml.optim.{owner}: `update` needs the learned rates: pass "
            f"hyper=opt.init_hyper(params, 0.01) (a meta-parameter; inside fmaml.scan pass it "
            "as `consts=` and hand it to `update` from there)."
        )
    if not isinstance(hyper, dict) or "lr" not in hyper:
        got = sorted(hyper) if isinstance(hyper, dict) else type(hyper).__name__
        raise ValueError(
            f"fmaml.optim.{owner}: `hyper` must be a dict with the key 'lr' "
            f"(opt.init_hyper(params, value)), got {got}."
        )
    return hyper["lr"]


_LR = "hyper['lr']"


def _check_rates(owner: str, lr: Any, updates: Updates, per_leaf_shape: bool) -> None:
    """``lr`` matches ``updates``: same structure, and same shapes (``per_leaf_shape``) or 0-d."""
    lr_spec: Spec = flatten(lr)[1]
    u_spec: Spec = flatten(updates)[1]
    if lr_spec != u_spec:
        raise ValueError(
            f"fmaml.optim.{owner}: `hyper['lr']` must match the parameters' structure"
            f"{_key_diff(lr, updates, _LR, 'params')}, got {lr_spec} for {u_spec}. Build it "
            "with opt.init_hyper(params, value)."
        )
    paths = leaf_paths(lr, _LR)
    for path, r, u in zip(paths, flatten(lr)[0], flatten(updates)[0], strict=True):
        want = tuple(u.shape) if per_leaf_shape else ()
        if not isinstance(r, torch.Tensor) or tuple(r.shape) != want:
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(
                f"fmaml.optim.{owner}: {path} must be a tensor of shape {want}, got {got}."
            )


def meta_sgd() -> GradientTransformation:
    """Meta-SGD (Li et al., 2017): gradient descent with a learned rate per parameter entry.

    ``θ ← θ - α ⊙ g`` with ``α = hyper["lr"]``, a pytree of tensors shaped like the parameters.
    The rates are meta-parameters: pass them explicitly (``hyper=``), and inside
    :func:`fmaml.scan` as ``consts=``, so that their meta-gradient is exact. Composes after a
    preconditioner: ``chain(clip_by_global_norm(1.0), meta_sgd())``.

    Returns:
        A stateless :class:`GradientTransformation` with ``init_hyper(params, value)``, which
        returns ``{"lr": {name: full_like(param, value)}}``.

    Example:
        >>> opt = fmaml.optim.meta_sgd()
        >>> params = {"w": torch.ones(2)}
        >>> hyper = opt.init_hyper(params, 0.1)
        >>> updates, _ = opt.update({"w": torch.ones(2)}, opt.init(params), params, hyper)
        >>> updates
        {'w': tensor([-0.1000, -0.1000])}
    """

    def update(updates, state, params=None, hyper=None):
        lr = _hyper_lr("meta_sgd", hyper)
        _check_rates("meta_sgd", lr, updates, per_leaf_shape=True)
        return _map(lambda u, r: -r * u, updates, lr), state

    return _MetaSGD(lambda params: EmptyState(), update)


def per_layer_lr() -> GradientTransformation:
    """Gradient descent with one learned rate per parameter tensor.

    ``θ_l ← θ_l - α_l · g_l`` with ``α = hyper["lr"]``, a pytree of 0-d tensors with the
    structure of the parameters. Pass ``hyper`` as for :func:`meta_sgd`.

    Returns:
        A stateless :class:`GradientTransformation` with ``init_hyper(params, value)``, which
        returns ``{"lr": {name: tensor(value)}}``.

    Example:
        >>> opt = fmaml.optim.per_layer_lr()
        >>> opt.init_hyper({"w": torch.ones(2), "b": torch.ones(1)}, 0.1)
        {'lr': {'w': tensor(0.1000), 'b': tensor(0.1000)}}
    """

    def update(updates, state, params=None, hyper=None):
        lr = _hyper_lr("per_layer_lr", hyper)
        _check_rates("per_layer_lr", lr, updates, per_leaf_shape=False)
        return _map(lambda u, r: -r * u, updates, lr), state

    return _PerLayerLR(lambda params: EmptyState(), update)


def scalar_lr() -> GradientTransformation:
    """Gradient descent with one learned rate for all parameters: ``θ ← θ - α · g``.

    ``α = hyper["lr"]``, a 0-d tensor. Pass ``hyper`` as for :func:`meta_sgd`.

    Returns:
        A stateless :class:`GradientTransformation` with ``init_hyper(params, value)``, which
        returns ``{"lr": tensor(value)}`` (the dtype and device of the first parameter).

    Example:
        >>> opt = fmaml.optim.scalar_lr()
        >>> opt.init_hyper({"w": torch.ones(2)}, 0.1)
        {'lr': tensor(0.1000)}
    """

    def update(updates, state, params=None, hyper=None):
        lr = _hyper_lr("scalar_lr", hyper)
        if not isinstance(lr, torch.Tensor) or lr.dim() != 0:
            got = tuple(lr.shape) if isinstance(lr, torch.Tensor) else type(lr).__name__
            raise ValueError(
                f"fmaml.optim.scalar_lr: `hyper['lr']` must be a 0-d tensor "
                f"(opt.init_hyper(params, value)), got {got}."
            )
        return _map(lambda u: -lr * u, updates), state

    return _ScalarLR(lambda params: EmptyState(), update)


# --------------------------------------------------------------------------------------------
# clipping the meta-gradient in the backward pass


class _ClipBackward(torch.autograd.Function):
    """Identity whose backward rescales the cotangents to a global norm of at most max_norm."""

    generate_vmap_rule = True

    @staticmethod
    def forward(max_norm: float, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.view_as(t) for t in leaves)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.max_norm = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        coef = torch.clamp(ctx.max_norm / (global_norm(list(grads)) + 1e-6), max=1.0)
        return (None, *(g * coef.to(g.dtype) for g in grads))


def clip_backward(tree: Any, max_norm: float) -> Any:
    """Identity in the forward pass; in the backward pass, clip the cotangent's global norm.

    Forward: returns ``tree`` (its tensors as views). Backward: the cotangent ``ḡ`` of the
    floating-point leaves, taken together, becomes ``ḡ · min(1, max_norm / (||ḡ|| + 1e-6))``
    (``clip_grad_norm_``'s formula); when ``||ḡ|| + 1e-6 <= max_norm`` it passes unchanged.
    torch_maml calls this ``max_grad_grad_norm``.

    Use it on very long unrolls, where the meta-gradient pulled back through many inner steps
    can explode: apply it to the carry at the start of the scan step,
    ``params = clip_backward(params, 10.0)``, and the cotangent entering every inner step is
    clipped. The meta-gradient is then *intentionally inexact* (a biased, bounded surrogate, as in
    gradient clipping); without clipping events it is exact. Under ``vmap`` each batch element
    (task) is clipped on its own. A custom ``torch.autograd.Function``: works under
    ``torch.func.grad``, ``vmap`` and plain autograd, and inside :func:`fmaml.scan`.

    Args:
        tree: a pytree of tensors (integer leaves pass through untouched).
        max_norm: the largest global norm of the cotangent (> 0).

    Returns:
        ``tree``, with the same structure and values.

    Example:
        >>> w = torch.full((4,), 1.0, requires_grad=True)
        >>> (fmaml.optim.clip_backward(w, 1.0) * 10).sum().backward()
        >>> w.grad.norm()
        tensor(1.0000)
    """
    max_norm = _positive("clip_backward", "max_norm", max_norm)
    leaves, spec = flatten(tree)
    for path, leaf in zip(leaf_paths(tree, "tree"), leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"fmaml.optim.clip_backward: every leaf of `tree` must be a tensor, but {path} "
                f"is {type(leaf).__name__}."
            )
    where = [i for i, t in enumerate(leaves) if t.is_floating_point() or t.is_complex()]
    if not where:
        return tree
    clipped = _ClipBackward.apply(max_norm, *(leaves[i] for i in where))
    out = list(leaves)
    for i, t in zip(where, clipped, strict=True):
        out[i] = t
    return unflatten(spec, out)
