"""A sum of losses whose gradient is taken piece by piece, inside its forward pass.

MAML's meta-loss is a sum over tasks, ``Σ_t L_t(θ)``. Recorded as one expression, autograd keeps
every task's graph (``k`` inner steps each) until the backward pass: ``T`` times the memory of
one task. :func:`accumulate` makes the sum one custom autograd Function instead. Its forward pass
computes each piece's value and gradient in turn and frees that piece's graph before the next one
starts, adding the gradients up; its backward pass returns the stored gradient times the incoming
cotangent. The memory is one piece's graph, as in learn2learn's or higher's loop of
``loss.backward()`` per task, and the result is still an ordinary differentiable loss:
``.backward()``, ``torch.func.grad``, ``vjp`` and ``vmap(grad(...))`` all work.

Under ``torch.func.grad`` the Function's forward runs below the transform's level, so the pieces
run on plain autograd, without functorch's wrappers: the ``torch.func.grad`` path costs what the
``.backward()`` path costs.

When a derivative of the gradient is taken (``autograd.grad(..., create_graph=True)`` then
``.backward()``, or an enclosing ``torch.func`` level), the backward pass differentiates a
recomputation of the pieces with a graph instead: exact to any order.

The gradient is computed whenever an input is being differentiated (it requires grad, or a
``torch.func`` level tracks it), whether or not a backward pass follows: evaluate under
``torch.no_grad()`` to skip it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._C._functorch import TransformType, get_interpreter_stack

from fmaml import _compiled_pieces
from fmaml._autodiff import transforms_active
from fmaml._compile import Compile
from fmaml._rng import RngState, cuda_devices, preserve_rng
from fmaml._scan import _guard, _needs_graph, _tracked
from fmaml._tree import Spec, flatten, unflatten

__all__ = ["accumulate", "accumulate_with_grad", "eager_gradient_applies"]

Leaves = list[Any]
#: ``piece(*args) -> (scalar, aux)``: one term of the sum and a pytree of tensors (leading
#: dimension concatenated over the pieces; not differentiated).
Piece = Callable[..., tuple[torch.Tensor, Any]]


def eager_gradient_applies() -> bool:
    """Whether :func:`accumulate` may take gradients in its forward pass here.

    Not under forward mode (a ``Jvp`` level) and not under two or more ``Grad`` levels
    (``jacrev(grad(...))``, ``hessian``): those differentiate the gradient itself, and the plain
    sum, recorded by the transforms, is what they need.
    """
    levels = [i.key() for i in get_interpreter_stack() or ()]
    return TransformType.Jvp not in levels and levels.count(TransformType.Grad) <= 1


def accumulate(
    pieces: Sequence[Piece],
    args: tuple[Any, ...],
    *,
    check: Callable[[], None] | None = None,
    compile: Compile | None = None,
) -> tuple[torch.Tensor, Any]:
    """``(Σ_j value_j, concatenated aux)`` over ``pieces``, each ``piece(*args) -> (value, aux)``.

    The gradient with respect to every leaf of ``args`` that is being differentiated is taken
    one piece at a time during this call (see the module docstring). ``aux`` pytrees share one
    structure; their leaves are concatenated along dimension 0 and carry no gradient.

    The pieces must read every tensor being differentiated through ``args``: the gradient of a
    tensor they close over is lost. ``check()`` runs first when the gradient is taken here, to
    raise if they do (a cheap probe by the caller, who knows what the pieces read).
    ``compile``: each piece's value and gradient as one compiled graph where it can be
    (``fmaml._compiled_pieces.value_and_grad``).
    """
    leaves, spec = flatten(args)
    want = [_tracked(t) and _differentiable(t) for t in leaves]
    if not any(want) or not eager_gradient_applies():
        return _direct(pieces, args)
    if check is not None:
        check()
    static = _Static(list(pieces), spec, want, compile=compile)
    out = _Accumulated.apply(static, *leaves)
    value, aux_leaves = out[0], list(out[1 : 1 + static.n_aux])
    return value, unflatten(static.aux_spec, aux_leaves)


def accumulate_with_grad(
    pieces: Sequence[Piece],
    args: tuple[Any, ...],
    want: Sequence[bool],
    *,
    compile: Compile | None = None,
) -> tuple[torch.Tensor, Any, list[torch.Tensor]]:
    """``(Σ_j value_j, concatenated aux, gradient)``: what :func:`accumulate` computes in its
    forward pass, handed back directly instead of through an autograd Function.

    For :meth:`fmaml.MAML.meta_grad` outside ``torch.func`` transforms, whose result carries no
    graph: the gradient of the sum with respect to the leaves of ``args`` where ``want`` is
    True (in leaf order; zeros for a leaf the sum does not use), with no autograd graph around
    the call, no ``autograd.grad`` and no backward pass (the same numbers as
    ``torch.autograd.grad`` of :func:`accumulate`'s value, whose backward returns these
    gradients times the cotangent 1). Plain tensors only: no transform may be active.
    """
    if transforms_active():
        raise RuntimeError("accumulate_with_grad: a torch.func transform is active.")
    leaves, spec = flatten(args)
    static = _Static(list(pieces), spec, list(want), compile=compile)
    total, aux_leaves, grads = _take(static, leaves)
    return total.detach(), unflatten(static.aux_spec, aux_leaves), [g.detach() for g in grads]


def _take(
    static: _Static, leaves: Sequence[Any]
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The work of the forward pass: ``(Σ values, aux leaves concatenated and detached, the
    gradient of the sum at ``static.want``)``, piece by piece; sets ``static.wanted``,
    ``aux_spec`` and ``n_aux``."""
    static.wanted = [j for j, w in enumerate(static.want) if w]
    if static.compile is not None:
        total, grads, auxes = _accumulate_compiled(static, leaves)
    elif transforms_active():  # under vmap (the Function's generated rule)
        total, grads, auxes = _accumulate_func(static, leaves)
    else:
        total, grads, auxes = _accumulate_plain(static, leaves)
    aux_leaves, static.aux_spec = _concat(auxes)
    static.n_aux = len(aux_leaves)
    return total, [t.detach() for t in aux_leaves], grads


def _direct(pieces: Sequence[Piece], args: tuple[Any, ...]) -> tuple[torch.Tensor, Any]:
    total, auxes = None, []
    for piece in pieces:
        value, aux = piece(*args)
        total = value if total is None else total + value
        auxes.append(aux)
    leaves, spec = _concat(auxes)
    return total, unflatten(spec, leaves)


def _concat(auxes: list[Any]) -> tuple[Leaves, Spec]:
    flat = [flatten(a) for a in auxes]
    spec = flat[0][1]
    columns = zip(*(f[0] for f in flat), strict=True)
    return [c[0] if len(c) == 1 else torch.cat(c) for c in columns], spec


def _differentiable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


@dataclass
class _Static:
    pieces: list[Piece]
    spec: Spec
    want: list[bool]
    compile: Compile | None = None
    rng: RngState | None = None
    devices: tuple[int, ...] = ()
    aux_spec: Spec | None = None
    n_aux: int = 0
    wanted: list[int] = field(default_factory=list)
    tensors: list[int] = field(default_factory=list)
    others: Leaves = field(default_factory=list)

    def call(self, piece: Piece, leaves: Sequence[Any]) -> tuple[torch.Tensor, Any]:
        return piece(*unflatten(self.spec, list(leaves)))


_GUARD = "fmaml: a meta-gradient computed in the forward pass (MAML's eager gradient)"


class _Accumulated(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(static: _Static, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        static.devices = cuda_devices(leaves)  # for the backward's recomputation (_exact)
        static.rng = RngState.capture(static.devices)
        total, aux_leaves, grads = _take(static, leaves)
        return (total, *aux_leaves, *grads)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        static: _Static = inputs[0]
        leaves = inputs[1:]
        rest = output[1:]
        ctx.static = static
        grads = rest[static.n_aux :]
        static.tensors = [j for j, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        static.others = [None if j in static.tensors else t for j, t in enumerate(leaves)]
        ctx.save_for_backward(*(leaves[j] for j in static.tensors), *grads)
        if rest:
            ctx.mark_non_differentiable(*rest)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, ct: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
        static: _Static = ctx.static
        n_leaves = len(static.want)
        if ct is None:
            return (None,) * (1 + n_leaves)
        saved = ctx.saved_tensors
        n = len(static.tensors)
        full = _put(static.others, static.tensors, saved[:n])
        inputs, grads = [full[j] for j in static.wanted], saved[n:]
        out: list[torch.Tensor | None] = [None] * n_leaves
        if _needs_graph([*inputs, ct]):
            values = _exact(static, full, ct)
        else:
            values = [ct * g for g in grads]
            anchors = [t for t in (ct, *inputs) if _tracked(t)]
            if anchors and torch.is_grad_enabled():
                values = _guard(anchors[0], _GUARD)(values)
        for j, v in zip(static.wanted, values, strict=True):
            out[j] = v
        return (None, *out)


def _accumulate_plain(
    static: _Static, leaves: Sequence[Any]
) -> tuple[torch.Tensor, list[torch.Tensor], list[Any]]:
    """Plain autograd: each piece's backward pass accumulates into the ``.grad`` of one set of
    fresh leaves (as ``loss.backward()`` per task does), and its graph goes with it."""
    with torch.enable_grad():
        fresh = [leaves[j].detach().requires_grad_() for j in static.wanted]
        full = _put(leaves, static.wanted, fresh)
        total, auxes = None, []
        for piece in static.pieces:
            value, aux = static.call(piece, full)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                torch.autograd.backward(value, inputs=fresh)
            value = value.detach()
            total = value if total is None else total + value
            auxes.append(aux)
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in fresh]
    return total, grads, auxes


def _accumulate_func(
    static: _Static, leaves: Sequence[Any]
) -> tuple[torch.Tensor, list[torch.Tensor], list[Any]]:
    """Under ``torch.func`` levels (``vmap``): ``torch.func.grad_and_value`` piece by piece."""
    wanted = static.wanted
    total, grads, auxes = None, [None] * len(wanted), []
    for piece in static.pieces:

        def fn(*values: torch.Tensor, piece: Piece = piece) -> tuple[torch.Tensor, Any]:
            return static.call(piece, _put(leaves, wanted, values))

        argnums = tuple(range(len(wanted)))
        g, (value, aux) = torch.func.grad_and_value(fn, argnums, has_aux=True)(
            *(leaves[j] for j in wanted)
        )
        total = value if total is None else total + value
        grads = [b if a is None else a + b for a, b in zip(grads, g, strict=True)]
        auxes.append(aux)
    return total, grads, auxes


def _accumulate_compiled(
    static: _Static, leaves: Sequence[Any]
) -> tuple[torch.Tensor, list[torch.Tensor], list[Any]]:
    """With ``compile=``: each piece's value and gradient compiled whole where it can be, else
    as :func:`_accumulate_func` or :func:`_accumulate_plain` would take them."""
    eager = _accumulate_func if transforms_active() else _accumulate_plain
    total, grads, auxes = None, [None] * len(static.wanted), []
    for piece in static.pieces:
        one = dataclasses.replace(static, pieces=[piece])

        def fallback(one: _Static = one) -> tuple[torch.Tensor, Any, list[torch.Tensor]]:
            value, g, (aux,) = eager(one, leaves)
            return value, aux, g

        value, aux, g = _compiled_pieces.value_and_grad(
            static.compile, piece, static.spec, static.wanted, leaves, fallback
        )
        total = value if total is None else total + value
        grads = [b if a is None else a + b for a, b in zip(grads, g, strict=True)]
        auxes.append(aux)
    return total, grads, auxes


def _exact(static: _Static, full: Leaves, ct: torch.Tensor) -> list[torch.Tensor]:
    """The gradient by differentiating a recomputation of every piece (exact to any order)."""

    def total(*values: torch.Tensor) -> torch.Tensor:
        leaves = _put(full, static.wanted, values)
        result = None
        for piece in static.pieces:
            value, _ = static.call(piece, leaves)
            result = value if result is None else result + value
        return result

    with preserve_rng(static.devices), torch.enable_grad():
        static.rng.restore()
        _, vjp_fn = torch.func.vjp(total, *(full[j] for j in static.wanted))
        return list(vjp_fn(ct))


def _put(full: Sequence[Any], where: list[int], values: Sequence[Any]) -> Leaves:
    out = list(full)
    for j, v in zip(where, values, strict=True):
        out[j] = v
    return out
