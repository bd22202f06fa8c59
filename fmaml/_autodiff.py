"""Gradients by plain autograd where no ``torch.func`` transform is active.

``torch.func.grad`` always builds the graph of the gradient (``create_graph=True``), through
functorch's tensor wrappers, even under ``torch.no_grad()``. When no transform is active, plain
``torch.autograd.grad`` computes the same numbers with less: no graph when nothing will
differentiate the result, and no wrappers when something will. Measured on the conv4 MAML step
of workload A (``benchmarks/``), one inner step with its double backward holds about 45 MiB
less, and a forward step without a graph costs about 40% of a ``torch.func.grad`` one.

Under ``vmap``, ``grad``, ``vjp`` or ``jacrev`` the ``torch.func`` path is kept: plain autograd
cannot see through their levels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch._C._functorch import get_interpreter_stack
from torch.func import grad_and_value

from fmaml._tree import detached, flat_dicts

__all__ = ["transforms_active", "grad_and_value_any", "vjp_plain"]


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, vjp, jvp, ...) is active here.

    Inside a function that ``torch.compile`` traces (``compile=``), True: the compiled pieces
    differentiate with ``torch.func`` (dynamo traces it, and cannot read the transform stack).
    """
    if torch.compiler.is_compiling():
        return True
    return bool(get_interpreter_stack())


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in optree.tree_leaves(tree, none_is_leaf=False) if isinstance(t, torch.Tensor)]


def _is_floating(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _records(tree: Any) -> bool:
    """Whether plain autograd records a graph of anything in ``tree`` here."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(tree))


def _reads_other(value: torch.Tensor, leaves: list[torch.Tensor]) -> bool:
    """Whether ``value``'s graph reaches a leaf that is not one of ``leaves``."""
    own = {id(t) for t in leaves}
    todo, seen = [value.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in own:
            return True
        todo.extend(child for child, _ in node.next_functions)
    return False


def grad_and_value_any(
    fn: Callable[..., tuple[torch.Tensor, Any]],
    args: tuple[Any, ...],
    argnums: int | tuple[int, ...] = 0,
    *,
    context: Any = None,
) -> tuple[Any, tuple[torch.Tensor, Any]]:
    """``torch.func.grad_and_value(fn, argnums, has_aux=True)(*args)``, by plain autograd when
    no ``torch.func`` transform is active.

    ``fn(*args) -> (scalar, aux)``. ``context`` holds the other tensors ``fn`` reads (a closure):
    if autograd records any of them, or of ``args``, the gradient is built with a graph
    (``create_graph=True``) so that it can be differentiated again, exactly as
    ``torch.func.grad`` would. So does a tensor that ``fn`` reads and autograd records without
    ``args`` or ``context`` showing it (found on ``fn``'s graph). Otherwise the gradient is
    computed without a graph and ``value`` and ``aux`` come back detached. Gradients of inputs
    ``fn`` does not use are zeros, as in ``torch.func``.
    """
    nums = (argnums,) if isinstance(argnums, int) else argnums
    if transforms_active():  # (compiling: torch.autograd.grad would break dynamo's graph)
        return grad_and_value(fn, argnums=argnums, has_aux=True)(*args)
    flats = [_flatten(args[n]) for n in nums]
    if not all(_is_floating(t) for leaves, _ in flats for t in leaves):
        return grad_and_value(fn, argnums=argnums, has_aux=True)(*args)
    graph = torch.is_grad_enabled() and (
        any(t.requires_grad for leaves, _ in flats for t in leaves)
        or _records(([a for n, a in enumerate(args) if n not in nums], context))
    )
    with torch.enable_grad():
        inputs = list(args)
        wrt = []
        for n, (leaves, spec) in zip(nums, flats, strict=True):
            fresh = [
                t if graph and t.requires_grad else t.detach().requires_grad_() for t in leaves
            ]
            inputs[n] = _unflatten(spec, fresh)
            wrt.append(fresh)
        value, aux = fn(*inputs)
        flat = [t for group in wrt for t in group]
        if not graph and torch.is_grad_enabled() and isinstance(value, torch.Tensor):
            # fn may read a tensor autograd records that neither args nor context show (a
            # closure): then its gradient needs a graph too.
            graph = _reads_other(value, flat)
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            grads: list[torch.Tensor | None] = [None] * len(flat)
        else:
            grads = list(torch.autograd.grad(value, flat, create_graph=graph, allow_unused=True))
    filled = [torch.zeros_like(t) if g is None else g for t, g in zip(flat, grads, strict=True)]
    if not graph:
        value = value.detach() if isinstance(value, torch.Tensor) else value
        aux = detached(aux)
    out, start = [], 0
    for (_, spec), group in zip(flats, wrt, strict=True):
        out.append(_unflatten(spec, filled[start : start + len(group)]))
        start += len(group)
    return (out[0] if isinstance(argnums, int) else tuple(out)), (value, aux)


class _Keys(tuple):
    """A flat ``{name: tensor}`` dict's structure (its keys, in order), for :func:`_flatten`."""


def _flatten(tree: Any) -> tuple[list[Any], Any]:
    """optree's leaves and structure of ``tree``; a flat dict of tensors (the parameters, the
    common case) without optree's round trip, its values in key order."""
    if flat_dicts(tree):
        return list(tree.values()), _Keys(tree)
    return optree.tree_flatten(tree, none_is_leaf=False)


def _unflatten(spec: Any, leaves: list[Any]) -> Any:
    """Inverse of :func:`_flatten`."""
    if type(spec) is _Keys:
        return dict(zip(spec, leaves, strict=True))
    return optree.tree_unflatten(spec, leaves)


def vjp_plain(
    fn: Callable[..., tuple[list[torch.Tensor], list[torch.Tensor]]],
    primals: tuple[list[torch.Tensor], ...],
    cotangents: Callable[
        [list[torch.Tensor], list[torch.Tensor]], tuple[list[torch.Tensor], list[torch.Tensor]]
    ],
) -> list[list[torch.Tensor]]:
    """The vjp of ``fn(*primals) -> (outs_a, outs_b)`` by plain autograd, without a graph.

    For a checkpointed scan's first-order backward when no transform is active: each primal is a
    fresh leaf, the step is recorded once and pulled back once. ``cotangents(outs_a, outs_b)``
    gives the cotangents of the outputs. Returns one list of gradients per group of primals
    (zeros where an input is unused).
    """
    with torch.enable_grad():
        leaves = tuple([p.detach().requires_grad_() for p in group] for group in primals)
        outs_a, outs_b = fn(*leaves)
        cts_a, cts_b = cotangents(outs_a, outs_b)
        outs, cts = [], []
        for o, c in zip([*outs_a, *outs_b], [*cts_a, *cts_b], strict=True):
            if o.requires_grad:
                outs.append(o)
                cts.append(c)
        flat = [t for group in leaves for t in group]
        grads = (
            torch.autograd.grad(outs, flat, cts, allow_unused=True) if outs else [None] * len(flat)
        )
    result, start = [], 0
    for group in leaves:
        result.append(
            [
                torch.zeros_like(t) if g is None else g
                for t, g in zip(group, grads[start : start + len(group)], strict=True)
            ]
        )
        start += len(group)
    return result
