"""Forward-mode AD through ``fmaml.scan``: tangents ride with the carry, one step at a time.

A scan's tangent obeys the scan's own recursion. With ``ċ`` the tangent of the carry::

    (c_{i+1}, y_i) = f(c_i, x_i, k)
    (ċ_{i+1}, ẏ_i) = ∂f(c_i, x_i, k) · (ċ_i, ẋ_i, k̇)

so forward mode needs the primal carry beside its tangent and nothing else: no snapshot, no graph.
Three pieces, one per way a Jvp level meets the scan:

* **Forward mode alone** (``jvp``, ``jacfwd``, ``vmap`` over tangents; no reverse-mode level
  tracks the inputs): nothing will ever run a backward pass, so :func:`forward_scan` runs the
  steps as a loop of dual evaluations. It holds one carry and its tangent, whatever the policy.
* **The scan's forward-mode rule** (:func:`tangents`, the custom Function's ``jvp``), for when a
  reverse-mode level is also active. It recomputes the primal carry beside the tangent, from the
  saved inputs, one step at a time. When a reverse level below the Jvp level differentiates the
  tangents (reverse over forward: ``grad(jvp(f))``, ``jacrev(jacfwd(f))``), the tangent
  recursion is itself a checkpointed scan of the step's jvp, with the scan's own plan, so that
  reverse pass is checkpointed too.
* **Forward over reverse** (``jvp(grad(f))``, ``hessian(f)``, ``jacfwd(jacrev(f))``): the scan's
  backward pass runs on dual tensors. Its recomputations and per-step ``torch.func.vjp`` are
  forward-differentiated as they go; only the snapshots, which the forward pass takes without
  tangents, must be re-taken: :func:`resweep` runs the plan's forward sweep again from the saved
  inputs and keeps each snapshot with its tangent. When the scan sees, as it starts, that its
  backward will run under a Jvp level (:func:`backward_under_forward_mode`), its forward pass
  keeps no snapshot at all. Memory stays the policy's: the snapshots and their tangents, one
  step's graph and its tangents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch._C._functorch import (
    TransformType,
    get_interpreter_stack,
    get_unwrapped,
    is_functorch_wrapped_tensor,
    maybe_get_level,
)
from torch._functorch.autograd_function import WrappedCtx
from torch._functorch.pyfunctorch import coerce_cinterpreter
from torch.autograd import forward_ad

from fmaml import _scan
from fmaml import _schedule as sch
from fmaml._rng import preserve_rng
from fmaml._tree import flatten

if TYPE_CHECKING:
    from fmaml._scan import _Call, _Static

__all__ = [
    "PLAIN_DUALS",
    "ZERO_TENSORS",
    "backward_under_forward_mode",
    "explain_pytorch_bugs",
    "extra_tangents",
    "forward_mode",
    "forward_only",
    "forward_scan",
    "has_tangent",
    "refuse_plain_duals",
    "resweep",
    "tangents",
]

Leaves = list[Any]


# --------------------------------------------------------------------------------------------
# which levels are active


def forward_mode() -> bool:
    """Whether forward-mode AD may be active here: a ``torch.func`` Jvp level (``jvp``,
    ``jacfwd``, ``hessian``) or a dual level of ``torch.autograd.forward_ad``."""
    stack = get_interpreter_stack() or ()
    return any(i.key() == TransformType.Jvp for i in stack) or forward_ad._current_level >= 0


def _reverse_mode(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a reverse-mode level may differentiate a scan of ``tensors``: a ``torch.func``
    Grad level (``grad``, ``vjp``, ``jacrev``), or plain autograd recording one of them."""
    stack = get_interpreter_stack() or ()
    if any(i.key() == TransformType.Grad for i in stack):
        return True
    return torch.is_grad_enabled() and any(_scan._base(t).requires_grad for t in tensors)


def forward_only(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether only forward-mode levels (and ``vmap``) will differentiate a scan of ``tensors``:
    then no backward pass will run, and the scan keeps nothing for one."""
    return forward_mode() and not _reverse_mode(tensors)


def backward_under_forward_mode() -> bool:
    """Whether a scan called here will be reversed under a Jvp level (forward over reverse:
    ``jvp(grad(f))``, ``hessian(f)``): a Jvp level encloses the innermost Grad level. Its
    backward then re-takes the snapshots with their tangents, so the forward pass keeps none."""
    keys = [i.key() for i in get_interpreter_stack() or ()]
    if TransformType.Grad not in keys:
        return False
    innermost = len(keys) - 1 - keys[::-1].index(TransformType.Grad)
    return TransformType.Jvp in keys[:innermost]


def has_tangent(t: torch.Tensor) -> bool:
    """Whether ``t`` carries a forward-mode tangent at some active level (a ``torch.func`` Jvp
    level, or a ``torch.autograd.forward_ad`` dual level)."""
    if not forward_mode():
        return False
    stack = [coerce_cinterpreter(i) for i in get_interpreter_stack() or ()]
    if not stack:
        return forward_ad.unpack_dual(t).tangent is not None
    # A Jvp level's tangent is visible only from that level: walk down the stack, lowering the
    # levels above as functorch itself does when it runs a custom Function's jvp.
    with contextlib.ExitStack() as lowered:
        for interpreter in reversed(stack):
            level, view = interpreter.level(), t
            while is_functorch_wrapped_tensor(view) and maybe_get_level(view) > level:
                view = get_unwrapped(view)
            if (
                interpreter.key() == TransformType.Jvp
                and maybe_get_level(view) == level
                and forward_ad.unpack_dual(view).tangent is not None
            ):
                return True
            lowered.enter_context(interpreter.lower())
    return False


def refuse_plain_duals(tensors: Sequence[torch.Tensor | None]) -> None:
    """Raise for ``torch.autograd.forward_ad`` dual tensors (outside any ``torch.func``
    transform) in a checkpointed scan that reverse mode also differentiates."""
    if forward_ad._current_level < 0 or get_interpreter_stack():
        return
    if any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(PLAIN_DUALS)


PLAIN_DUALS = (
    "fmaml.scan: dual tensors of torch.autograd.forward_ad (make_dual inside dual_level) cannot "
    "go through a checkpointed scan that reverse mode also differentiates: the scan's "
    "forward-mode rule needs torch.func.jvp, which does not nest inside a forward_ad dual level. "
    "Use torch.func.jvp, jacfwd or hessian instead (jvp(grad(f)) and hessian(f) compose with "
    "every checkpoint policy), or pass checkpoint='store_all'."
)


@contextlib.contextmanager
def explain_pytorch_bugs() -> Iterator[None]:
    """Point at the known PyTorch bug behind "ZeroTensors are immutable" under forward mode."""
    try:
        yield
    except RuntimeError as error:
        if "ZeroTensors are immutable" not in str(error):
            raise
        raise RuntimeError(ZERO_TENSORS) from error


ZERO_TENSORS = (
    "fmaml.scan: PyTorch raised 'ZeroTensors are immutable' while forward-mode AD (jvp, jacfwd, "
    "hessian) ran through the scan's step. That is a PyTorch bug in the forward-mode formula of "
    "a double backward, not in `f`: F.mse_loss with reduction='mean' (pytorch/pytorch#123996) "
    "when forward mode differentiates a gradient of it, as in every MAML inner step. Write that "
    "loss out, e.g. ((out - y) ** 2).mean()."
)


# --------------------------------------------------------------------------------------------
# forward mode alone: a loop of dual evaluations


def forward_scan(call: _Call, carry: Leaves, xs: Leaves, consts: Leaves) -> tuple[Any, Any]:
    """The scan as a plain loop, for forward mode alone: the enclosing Jvp levels carry each
    step's tangents, and every step's dual tensors die with the step (no snapshot, no graph)."""
    ys, spec = _Rows(), None
    with explain_pytorch_bugs():
        for i in range(call.length):
            new, y = call.step(i, carry, call.x_at(xs, i), consts)
            if i == 0:
                call.check_carry(carry, new)
            leaves, spec = _scan._y_spec(y, i, spec)
            carry = new
            ys.append(leaves)
    _scan._count("forward_evaluations", call.length)
    _scan._count("tangent_evaluations", call.length)
    return _scan.unflatten(call.init_spec, carry), _scan.unflatten(spec, ys.stacked())


class _Rows:
    """Per-step outputs (lists of leaves, None for no tangent), stacked along a new dimension 0.

    Stacked every ``chunk`` steps: a long scan's per-step outputs then cost their own bytes,
    not a Python tensor (and, under transforms, its wrappers) per step and leaf.
    """

    def __init__(self, chunk: int = 256) -> None:
        self.chunk = chunk
        self.done: list[Leaves] = []
        self.pending: list[Leaves] = []

    def append(self, leaves: Leaves) -> None:
        self.pending.append(leaves)
        if len(self.pending) == self.chunk:
            self.done.append(self._stack(self.pending))
            self.pending = []

    @staticmethod
    def _stack(rows: list[Leaves]) -> Leaves:
        columns = zip(*rows, strict=True)
        return [None if any(t is None for t in c) else torch.stack(c) for c in columns]

    def stacked(self) -> Leaves:
        parts = self.done + ([self._stack(self.pending)] if self.pending else [])
        return [
            None if any(t is None for t in c) else c[0] if len(c) == 1 else torch.cat(c)
            for c in zip(*parts, strict=True)
        ]


# --------------------------------------------------------------------------------------------
# the scan's forward-mode rule


def tangents(
    static: _Static,
    primals: tuple[Leaves, Leaves, Leaves],
    dots: tuple[Leaves, Leaves, Leaves],
) -> Leaves:
    """The tangents of the scan's outputs: the final carry, then the stacked ``ys``.

    Every floating-point output gets a tensor, zeros where it does not depend on the tangents
    (PyTorch 2.13 mishandles None for a differentiable output of a custom Function); integer
    outputs get None.

    Args:
        static: the scan (its step, plan and random-number states).
        primals: ``(init, xs, consts)`` leaves, as the Function saved them.
        dots: their tangents, same layout (None: zero).
    """
    init, xs, consts = primals
    d_init, d_xs, d_consts = ([_nonzero(d) for d in group] for group in dots)
    d_init = [
        _zeros_if_none(d, t) if _scan._differentiable(t) else None
        for t, d in zip(init, d_init, strict=True)
    ]
    everything = [*init, *xs, *consts, *(d for d in (*d_init, *d_xs, *d_consts) if d is not None)]
    with preserve_rng(static.devices), explain_pytorch_bugs():
        static.rng0.restore()
        if any(_scan._tracked(t) for t in everything) and not _scan._nested():
            d_carry, d_ys = _tangent_scan(static, init, xs, consts, d_init, d_xs, d_consts)
        else:
            d_carry, d_ys = _tangent_loop(static, init, xs, consts, d_init, d_xs, d_consts)
    return [*d_carry, *d_ys]


def _step_jvp(
    call: _Call,
    y_float: list[bool],
    i: int,
    carry: Leaves,
    d_carry: Leaves,
    x: Leaves,
    d_x: Leaves,
    consts: Leaves,
    d_consts: Leaves,
) -> tuple[Leaves, Leaves, Leaves]:
    """One step and its tangent: ``(new carry, its tangents, the tangents of y)`` (None where
    a leaf is not differentiable)."""
    dc = [j for j, d in enumerate(d_carry) if d is not None]
    dx = [j for j, d in enumerate(d_x) if d is not None]
    dk = [j for j, d in enumerate(d_consts) if d is not None]

    def fn(c: Leaves, xd: Leaves, kd: Leaves) -> tuple[tuple[Leaves, Leaves], Leaves]:
        full = _scan._put(carry, dc, c), _scan._put(x, dx, xd), _scan._put(consts, dk, kd)
        new, y = call.step(i, *full)
        ys = flatten(y)[0]
        diff = [new[j] for j in dc], [t for t, f in zip(ys, y_float, strict=True) if f]
        return diff, new

    primals = ([carry[j] for j in dc], [x[j] for j in dx], [consts[j] for j in dk])
    dots = ([d_carry[j] for j in dc], [d_x[j] for j in dx], [d_consts[j] for j in dk])
    _, (d_new, d_y), new = torch.func.jvp(fn, primals, dots, has_aux=True)
    d_y_full = _scan._scatter(d_y, [j for j, f in enumerate(y_float) if f], len(y_float))
    return new, _scan._scatter(d_new, dc, call.n_init), d_y_full


def _tangent_loop(
    static: _Static,
    init: Leaves,
    xs: Leaves,
    consts: Leaves,
    d_init: Leaves,
    d_xs: Leaves,
    d_consts: Leaves,
) -> tuple[Leaves, Leaves]:
    """The tangent recursion as a loop: one carry and its tangent alive at a time."""
    call = static.call
    carry, d_carry, d_ys = init, d_init, _Rows()
    for i in range(call.length):
        x, d_x = call.x_at(xs, i), [None if d is None else d[i] for d in d_xs]
        carry, d_carry, d_y = _step_jvp(
            call, static.y_float, i, carry, d_carry, x, d_x, consts, d_consts
        )
        d_ys.append(d_y)
    _scan._count("tangent_evaluations", call.length)
    return d_carry, d_ys.stacked() if static.n_y else []


def _tangent_scan(
    static: _Static,
    init: Leaves,
    xs: Leaves,
    consts: Leaves,
    d_init: Leaves,
    d_xs: Leaves,
    d_consts: Leaves,
) -> tuple[Leaves, Leaves]:
    """The tangent recursion as a checkpointed scan of the step's jvp, with the scan's own plan,
    for a reverse-mode level that differentiates the tangents (reverse-over-forward)."""
    call = static.call

    def step(carry: Any, x: Any, k: Any) -> tuple[Any, Any]:
        (c, d_c), (x_t, d_x), (kk, d_k) = carry, ([], []) if x is None else x, k
        # the step index only labels error messages, which the forward pass has already raised
        new, d_new, d_y = _step_jvp(call, static.y_float, -1, c, d_c, x_t, d_x, kk, d_k)
        return (new, d_new), d_y

    pair_call, *leaves = _scan._build_call(
        step, (init, d_init), (xs, d_xs) if xs else None, call.length, (consts, d_consts)
    )
    (_, d_carry), d_ys = _scan._checkpointed(pair_call, _SamePlan(static.plan), *leaves)
    _scan._count("tangent_evaluations", call.length)
    return list(d_carry), list(d_ys)


@dataclass(frozen=True)
class _SamePlan:
    """The policy of the tangent scan: the schedule its scan already runs."""

    schedule: sch.Plan

    def stores_all(self, length: int) -> bool:
        return False

    def plan(self, length: int, carry_bytes: int, graph_bytes: int | None = None) -> sch.Plan:
        return self.schedule


def extra_tangents(ctx: Any, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Tangents for the Function's extra outputs (the snapshots, marked non-differentiable).

    None, except under ``vmap``'s generated rule, which does not carry ``mark_non_differentiable``
    over to its own outputs and then needs a tensor: zeros, as a stride-0 view that allocates
    nothing.
    """
    if not isinstance(ctx, WrappedCtx):
        return [None] * len(outputs)
    return [t.new_zeros(()).expand(t.shape) if _scan._differentiable(t) else None for t in outputs]


def _nonzero(d: torch.Tensor | None) -> torch.Tensor | None:
    """``d``, or None for a tangent that autograd passes as an (immutable) efficient zero."""
    return None if d is None or _scan._base(d)._is_zerotensor() else d


def _zeros_if_none(d: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if d is None else d


# --------------------------------------------------------------------------------------------
# forward-over-reverse: the snapshots with their tangents


def resweep(static: _Static, init: Leaves, xs: Leaves, consts: Leaves) -> dict[int, Leaves]:
    """The plan's forward sweep again, from the saved (dual) inputs: the snapshots with their
    tangents, for a backward pass under a Jvp level (the forward pass kept them without)."""
    call, plan = static.call, static.plan
    stored: dict[int, Leaves] = {}
    held = _scan._Held(stored, [*init, *xs, *consts]) if _scan._RECORDERS else None
    current = init
    with preserve_rng(static.devices):
        static.rng0.restore()
        for action in plan.forward:
            if isinstance(action, sch.Snapshot):
                stored[action.index] = current
                if held is not None:
                    held.add(current)
            elif isinstance(action, sch.Advance):
                for i in range(action.start, action.stop):
                    current, _ = call.call_step(i, current, xs, consts)
                _scan._count("recomputations", action.stop - action.start)
            if held is not None:
                held.observe(current)
    stored[call.length - 1] = current
    return stored
