"""What :class:`fmaml.MAML` compiles whole, when its inner loop keeps every graph.

With ``compile=`` and a policy that keeps every step's graph for ``k`` steps (``store_all``; the
default ``"auto"`` at ``k = 1``; first-order MAML), a chunk of tasks is one pure function: the
``vmap`` over tasks, the ``k`` inner steps (inside ``torch.compile``, :func:`fmaml.scan` traces as
its plain loop) and the query losses. Compiling that function whole removes the per-operator
overhead of the task batching and of the query loss as well, which per-step pieces cannot:

- :func:`meta_grad`: ``torch.func.grad_and_value`` of the chunk's meta-loss, for
  :meth:`fmaml.MAML.meta_grad` (and ``fmaml train``);
- :func:`task_losses`: the chunk's query losses and inner-loss history, for
  :meth:`fmaml.MAML.unrolled_loss`; ``.backward()`` through it is the compiled function's own
  backward (AOTAutograd, first order). Under a recording ``torch.func.grad`` it runs eagerly,
  with the scan's own compiled pieces.

Checkpointed policies keep the scan (its memory is the point) and compile its steps instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from fmaml._compile import run
from fmaml._policy import Binomial
from fmaml._scan import scan
from fmaml._tree import flatten, template, traced_fill

__all__ = ["compiles_whole", "meta_grad", "task_losses"]


def compiles_whole(maml: Any, k: int, hyper: Any) -> bool:
    """Whether a chunk of ``maml``'s tasks is compiled as one function for ``k`` inner steps."""
    if maml.compile is None or maml.check_finite or k < 1 or maml.max_grad_grad_norm is not None:
        return False
    if maml.first_order and hyper is None:
        return True  # its inner loop is a plain loop without a graph
    return maml.checkpoint.stores_all(k)


def _flat(*trees: Any) -> tuple[list[Any], list[Any], list[int], tuple]:
    leaves, templates, sizes, specs = [], [], [], []
    for tree in trees:
        tree_leaves, spec = flatten(tree)
        leaves += tree_leaves
        templates.append(template(spec))
        sizes.append(len(tree_leaves))
        specs.append(spec)
    return leaves, templates, sizes, tuple(specs)


def _unflat(templates: list[Any], sizes: list[int], flat: tuple) -> list[Any]:
    out, start = [], 0
    for tree, n in zip(templates, sizes, strict=True):
        out.append(traced_fill(tree, iter(flat[start : start + n])))
        start += n
    return out


def _flat_meta_grad(
    maml: Any,
    templates: list[Any],
    sizes: list[int],
    k: int,
    per_step: bool,
    n_tasks: int,
    *flat: Any,
) -> tuple[Any, tuple[torch.Tensor, None]]:
    params, hyper, chunk = _unflat(templates, sizes, flat)

    def loss(p: Any, h: Any) -> torch.Tensor:
        return maml._task_losses(p, chunk, k, per_step, h)[0].sum() / n_tasks

    argnums = 0 if hyper is None else (0, 1)
    grads, value = torch.func.grad_and_value(loss, argnums=argnums)(params, hyper)
    return grads, (value, None)


def meta_grad(
    maml: Any,
    params: Any,
    hyper: Any,
    chunk: Any,
    k: int,
    per_step: bool,
    n_tasks: int,
    eager: Callable[[], Any],
) -> tuple[Any, tuple[torch.Tensor, None]]:
    """``(grads, (loss, None))`` of one chunk, as ``eager()`` returns them.

    Only where nothing will differentiate the result (no input requires grad, or grad mode is
    off): the compiled function then keeps no graph (the gradient inside it is a traced
    ``torch.func.grad_and_value``, which ignores ``no_grad``).
    """
    try:
        leaves, templates, sizes, specs = _flat(params, hyper, chunk)
    except TypeError:  # a pytree node type the traced twins do not rebuild
        return eager()
    if torch.is_grad_enabled() and any(t.requires_grad for t in leaves):
        return eager()  # a differentiable meta-gradient: eager (with the scan's pieces)
    with torch.no_grad():
        return run(
            maml.compile,
            ("maml.meta_grad", id(maml), specs, k, per_step, n_tasks),
            functools.partial(_flat_meta_grad, maml, templates, sizes, k, per_step, n_tasks),
            leaves,
            eager,
            what="MAML's meta-gradient",
        )


def task_losses(
    maml: Any, params: Any, hyper: Any, chunk: Any, k: int, per_step: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query losses (T,), inner-loss history (T, k))`` of one chunk, differentiable.

    The chunk runs as the one step of a checkpointed :func:`fmaml.scan` of length 1, whose
    compiled pieces are the chunk without a graph (forward) and the chunk with its vjp
    (backward): so it composes with ``.backward()``, ``torch.func.grad``, ``vmap`` and
    ``jacrev`` exactly as any scan does, and both passes are single compiled graphs (a direct
    AOTAutograd backward of this function measured 5x slower than its vjp compiled whole).
    The backward recomputes the chunk once, in its vjp; the peak memory is ``store_all``'s.
    """

    def whole(carry: Any, x: Any, consts: Any) -> tuple[Any, Any]:
        p, h, c = consts
        return carry, maml._task_losses(p, c, k, per_step, h)

    _, (losses, history) = scan(
        whole,
        (),
        length=1,
        checkpoint=Binomial(1),
        consts=(params, hyper, chunk),
        compile=maml.compile,
    )
    return losses[0], history[0]
