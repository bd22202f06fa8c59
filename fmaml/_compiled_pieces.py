"""What ``compile=`` compiles (each through :func:`fmaml._compile.run`).

Of :func:`fmaml.scan`:

- :func:`step`: one step without a graph (the forward sweep, the backward's recomputation);
- :func:`pull_back`: one step and its vjp (the first-order backward pass of a checkpointed scan).

Where the policy keeps every graph (``store_all``), ``fmaml._scan`` runs the whole loop as the one
step of a checkpointed scan of length 1 (so both pieces are the whole loop), and inside that
compiled step the loop is :func:`traced_unroll`.

Of :func:`fmaml._accumulate.accumulate` (the meta-loss of :class:`fmaml.MAML`):

- :func:`value_and_grad`: one chunk of tasks' loss and its gradient, as one graph, when every
  inner scan of the chunk keeps its graphs (``store_all``, or ``"auto"`` within its budget):
  the ``vmap`` over tasks, the inner steps and the query losses compile together, and inside
  the compiled chunk a scan is :func:`traced_loop`. Otherwise the chunk runs eagerly and its
  scans compile their steps.

``call`` is the scan's validated call (``fmaml._scan._Call``): the step ``f``, the pytree
structures of the carry, ``xs`` and ``consts``, and their leaf counts. Each piece is a pure
function of flat tensors that rebuilds the pytrees with :func:`fmaml._tree.traced_fill` (dynamo
traces it; it cannot trace optree's specs) and calls ``f`` as the eager scan does; the eager code
of the scan is the fallback, and its first call for each structure validates it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import optree
import torch

from fmaml._compile import Compile, run
from fmaml._tree import flatten, template, traced_fill, traced_leaves, traced_map, unflatten

__all__ = [
    "pull_back",
    "step",
    "templates",
    "traced_length",
    "traced_loop",
    "traced_unroll",
    "value_and_grad",
]


def _code(f: Any, depth: int = 0) -> tuple[Hashable, tuple]:
    """What identifies a function across calls: ``(its code, what it closes over)``.

    A fresh closure has the same code. Of what it closes over (or a ``functools.partial``
    binds), numbers, strings, flags, pytree structures and frozen dataclasses count by value,
    functions by their own identity (recursively), objects with a ``_compile_key()`` by that
    key, other objects
    (a model, a ``MAML``) by identity; tensors and containers do not count (dynamo guards on
    them: tensors are inputs of the graph).
    """
    if isinstance(f, functools.partial):
        code, closed = _code(f.func, depth)
        bound = [_closed(v, depth) for v in (*f.args, *f.keywords.values())]
        return code, (*closed, *bound)
    owner = getattr(f, "__self__", None)
    f = getattr(f, "__func__", f)
    code = getattr(f, "__code__", None)
    if code is None:
        return type(f), (("id", id(f)),)
    closed = [] if owner is None else [_closed(owner, depth)]
    for cell in getattr(f, "__closure__", None) or ():
        try:
            closed.append(_closed(cell.cell_contents, depth))
        except ValueError:  # an empty cell
            continue
    return code, tuple(closed)


def _closed(value: Any, depth: int) -> Hashable:
    if value is None or isinstance(value, bool | int | float | str | optree.PyTreeSpec):
        return value
    if isinstance(value, torch.Tensor | list | tuple | dict):
        return "-"
    if hasattr(value, "_compile_key"):
        return value._compile_key()
    if dataclasses.is_dataclass(value) and type(value).__dataclass_params__.frozen:
        try:  # a frozen dataclass (a policy, a batching choice) counts by value
            return type(value), hash(value), value
        except TypeError:
            pass
    if callable(value) and (hasattr(value, "__code__") or isinstance(value, functools.partial)):
        return _code(value, depth + 1) if depth < 3 else ("id", id(value))
    return ("id", id(value))


def _key(call: Any, piece: str, *rest: Hashable) -> tuple:
    return (
        piece,
        _code(call.f),
        call.init_spec,
        call.xs_spec,
        call.consts_spec,
        *rest,
    )


def _templates(call: Any) -> tuple[Any, Any, Any]:
    """Plain-Python templates of the carry, ``x`` and ``consts`` structures (TypeError for
    pytree nodes that :func:`fmaml._tree.traced_fill` does not rebuild)."""
    return (
        template(call.init_spec),
        None if call.xs_spec is None else template(call.xs_spec),
        None if call.consts_spec is None else template(call.consts_spec),
    )


def _split(flat: Sequence[Any], *sizes: int) -> list[list[Any]]:
    out, start = [], 0
    for n in sizes:
        out.append(list(flat[start : start + n]))
        start += n
    out.append(list(flat[start:]))
    return out


def _apply(
    call: Any, templates: tuple, carry: list, x: list, consts: list
) -> tuple[list[torch.Tensor], Any]:
    """``f`` on leaves, as ``fmaml._scan._Call.step`` (without its checks: the eager first call
    of each structure made them)."""
    t_carry, t_x, t_consts = templates
    carry_tree = traced_fill(t_carry, iter(carry))
    x_tree = None if t_x is None else traced_fill(t_x, iter(x))
    if t_consts is None:
        new, y = call.f(carry_tree, x_tree)
    else:
        new, y = call.f(carry_tree, x_tree, traced_fill(t_consts, iter(consts)))
    return traced_leaves(new), y


def _guarded(
    call: Any,
    piece: str,
    fn: Callable[..., Any],
    static: tuple,
    args: list,
    eager: Callable[[], Any],
    what: str,
) -> Any:
    """``fn(call, templates, *static, *args)`` through :func:`fmaml._compile.run`."""
    try:
        templates = _templates(call)
    except TypeError:
        return eager()  # a pytree node type the traced twins do not know
    return run(
        call.compiled,
        _key(call, piece, *static),
        functools.partial(fn, call, templates, *static),
        args,
        eager,
        what=what,
        family=(piece, _code(call.f)[0]),
    )


# --------------------------------------------------------------------------------------------
# the pieces of a scan


def _flat_step(call: Any, templates: tuple, *flat: torch.Tensor) -> tuple[list, Any]:
    carry, x, consts = _split(flat, call.n_init, call.n_xs)
    return _apply(call, templates, carry, x, consts)


def step(
    call: Any, carry: list, x: list, consts: list, eager: Callable[[], Any]
) -> tuple[list[torch.Tensor], Any]:
    """One step without a graph: ``(new carry leaves, y)``, as ``eager()`` returns them."""
    return _guarded(call, "step", _flat_step, (), [*carry, *x, *consts], eager, "the scan's step")


def _put(full: Sequence[Any], where: Sequence[int], values: Sequence[Any]) -> list[Any]:
    out = list(full)
    for j, v in zip(where, values, strict=True):
        out[j] = v
    return out


def _flat_pull_back(
    call: Any,
    templates: tuple,
    dc: tuple[int, ...],
    dx: tuple[int, ...],
    dk: tuple[int, ...],
    *flat: Any,
) -> tuple[list, list, list]:
    carry, x, consts, ct_c, ct_y = _split(flat, call.n_init, call.n_xs, call.n_consts, len(dc))

    def fn(c: list, xd: list, kd: list) -> tuple[list, list]:
        new, y = _apply(call, templates, _put(carry, dc, c), _put(x, dx, xd), _put(consts, dk, kd))
        ys = [t for t in traced_leaves(y) if t.is_floating_point() or t.is_complex()]
        return [new[j] for j in dc], ys

    primals = ([carry[j] for j in dc], [x[j] for j in dx], [consts[j] for j in dk])
    (out_c, out_y), vjp_fn = torch.func.vjp(fn, *primals)
    cts_c = [torch.zeros_like(o) if g is None else g for g, o in zip(ct_c, out_c, strict=True)]
    cts_y = [torch.zeros_like(o) if g is None else g for g, o in zip(ct_y, out_y, strict=True)]
    g_c, g_x, g_k = vjp_fn((cts_c, cts_y))
    return list(g_c), list(g_x), list(g_k)


def pull_back(
    call: Any,
    carry: list,
    x: list,
    consts: list,
    pieces: tuple[Sequence[int], Sequence[int], Sequence[int]],
    ct_c: list,
    ct_y: list,
    eager: Callable[[], Any],
) -> tuple[list, list, list]:
    """The vjp of one step at ``(carry, x, consts)`` with respect to the leaves at the positions
    ``pieces`` (of the carry, ``x`` and ``consts``), given the cotangents of its differentiable
    carry leaves and of its floating-point ``y`` leaves (None: zero); ``(g_carry, g_x, g_consts)``
    over ``pieces``, as ``eager()`` returns them. For a first-order backward pass (grad mode
    off): its result is not differentiated again."""
    static = tuple(tuple(p) for p in pieces)
    args = [*carry, *x, *consts, *ct_c, *ct_y]
    return _guarded(call, "pull_back", _flat_pull_back, static, args, eager, "the scan's pull-back")


# --------------------------------------------------------------------------------------------
# a scan inside a compiled region


def templates(call: Any) -> tuple[Any, Any, Any] | None:
    """The templates :func:`traced_unroll` needs (None: a pytree node it cannot rebuild)."""
    try:
        return _templates(call)
    except TypeError:
        return None


def traced_unroll(
    call: Any, templates: tuple, carry: Any, xs: list, consts: list
) -> tuple[Any, list]:
    """The whole loop of ``call`` on a carry pytree and leaves of ``xs`` and ``consts``, traced:
    ``(final carry pytree, stacked y leaves)``."""
    _, t_x, t_consts = templates
    consts_tree = None if t_consts is None else traced_fill(t_consts, iter(consts))
    ys = []
    for i in range(call.length):
        x = None if t_x is None else traced_fill(t_x, iter([leaf[i] for leaf in xs]))
        carry, y = call.f(carry, x) if t_consts is None else call.f(carry, x, consts_tree)
        ys.append(traced_leaves(y))
    return carry, [torch.stack(column) for column in zip(*ys, strict=True)]


def traced_length(xs: Any) -> int:
    """The length of a scan over ``xs`` (traceable)."""
    return traced_leaves(xs)[0].shape[0]


def traced_loop(
    f: Callable[..., Any], init: Any, xs: Any, length: int, consts: Any
) -> tuple[Any, Any]:
    """The scan's defining loop, for dynamo to trace: a scan inside ``torch.compile`` whose
    policy keeps every graph (the compiled function's own autograd then differentiates it)."""

    def call(carry: Any, x: Any) -> tuple[Any, Any]:
        return f(carry, x) if consts is None else f(carry, x, consts)

    if length == 0:  # the structure of y from a step on zeros, as the eager scan does
        x0 = None if xs is None else traced_map(lambda leaf: leaf.new_zeros(leaf.shape[1:]), xs)
        _, y = call(init, x0)
        return init, traced_map(lambda leaf: leaf.new_empty((0, *leaf.shape)), y)
    carry, ys = init, []
    for i in range(length):
        x = None if xs is None else traced_map(lambda leaf, i=i: leaf[i], xs)
        carry, y = call(carry, x)
        ys.append(y)
    return carry, traced_map(lambda *leaves: torch.stack(leaves), *ys)


# --------------------------------------------------------------------------------------------
# a piece of fmaml._accumulate.accumulate


def _flat_value_and_grad(
    piece: Callable[..., Any], t_args: Any, wanted: tuple[int, ...], *leaves: Any
) -> tuple[torch.Tensor, Any, list[torch.Tensor]]:
    def fn(*values: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return piece(*traced_fill(t_args, iter(_put(leaves, wanted, values))))

    argnums = tuple(range(len(wanted)))
    grads, (value, aux) = torch.func.grad_and_value(fn, argnums, has_aux=True)(
        *(leaves[j] for j in wanted)
    )
    return value, aux, list(grads)


def value_and_grad(
    spec: Compile,
    piece: Callable[..., Any],
    args_spec: Any,
    wanted: Sequence[int],
    leaves: Sequence[Any],
    eager: Callable[[], Any],
) -> tuple[torch.Tensor, Any, list[torch.Tensor]]:
    """``(value, aux, gradient)`` of ``piece(*unflatten(args_spec, leaves))`` with respect to the
    leaves at ``wanted``, as ``eager()`` returns them: compiled whole if every scan inside keeps
    its graphs (found on the first, eager call), else ``eager()``.

    A piece with a ``compiled_form(*args) -> (fn, fn_args)`` (a MAML chunk of tasks) compiles
    ``fn`` on ``fn_args`` instead, a function of its own slice of the arguments with the same
    structure, so that pieces of one shape share one graph; ``compiled_form`` returning None
    means: eagerly.
    """
    form = getattr(piece, "compiled_form", None)
    if form is not None:
        found = form(*unflatten(args_spec, list(leaves)))
        if found is None:
            return eager()
        piece, args = found
        leaves, args_spec = flatten(args)
    try:
        t_args = template(args_spec)
    except TypeError:  # a pytree node type the traced twins do not rebuild
        return eager()
    wanted = tuple(wanted)
    code = _code(piece)
    return run(
        spec,
        ("accumulate", code, args_spec, wanted),
        functools.partial(_flat_value_and_grad, piece, t_args, wanted),
        list(leaves),
        eager,
        what="a chunk of tasks (loss and gradient)",
        gate=_keeps_all_graphs,
        keep_graphs=True,
        family=("accumulate", code[0]),
    )


def _keeps_all_graphs(eager: Callable[[], Any]) -> tuple[Any, bool]:
    """Run ``eager()``; compile its piece whole only if every scan in it kept its graphs (a
    checkpointed scan cannot be traced: it compiles its own steps instead)."""
    from fmaml._scan import WholeLoop, record_scan  # fmaml._scan imports this module

    with record_scan() as stats:
        out = eager()
    kept = [c.keeps_graphs or isinstance(c.policy, WholeLoop) for c in stats.scans]
    return out, all(kept)
