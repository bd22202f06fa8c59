"""The one pytree convention of fmaml (optree, with ``None`` as an empty subtree).

optree and ``torch.utils._pytree`` disagree on whether ``None`` is a leaf. fmaml decides once:
``None`` is *not* a leaf (optree's default), so a carry such as ``{"w": w, "state": None}`` carries
the ``None`` through unchanged and has one leaf. Every module goes through these helpers.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import optree
import torch

__all__ = [
    "describe_leaf",
    "detached",
    "flat_dicts",
    "flatten",
    "leaf_paths",
    "template",
    "traced_fill",
    "traced_leaves",
    "traced_map",
    "tree_map",
    "unflatten",
]

Spec = optree.PyTreeSpec


def flatten(tree: Any) -> tuple[list[Any], Spec]:
    """Leaves (depth first, dict keys sorted) and the structure of ``tree``."""
    return optree.tree_flatten(tree, none_is_leaf=False)


def tree_map(fn: Any, tree: Any) -> Any:
    """``fn`` applied to every leaf of ``tree``."""
    return optree.tree_map(fn, tree, none_is_leaf=False)


def detached(tree: Any) -> Any:
    """``tree`` with every tensor leaf detached (other leaves as they are)."""
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def flat_dicts(tree: Any, *rest: Any) -> bool:
    """Whether every argument is a dict with the same keys and ``tree``'s values are tensors
    (the common case, ``{name: tensor}``: a leaf-by-leaf map, or the leaves themselves, need no
    optree round trip; pair the values by key)."""
    return (
        type(tree) is dict
        and all(type(r) is dict and r.keys() == tree.keys() for r in rest)
        and all(isinstance(v, torch.Tensor) for v in tree.values())
    )


def unflatten(spec: Spec, leaves: Sequence[Any]) -> Any:
    """Inverse of :func:`flatten`."""
    return optree.tree_unflatten(spec, list(leaves))


def leaf_paths(tree: Any, name: str) -> list[str]:
    """Python-like paths of the leaves of ``tree``, e.g. ``["carry['w']", "carry['b'][0]"]``."""
    accessors, _, _ = optree.tree_flatten_with_accessor(tree, none_is_leaf=False)
    return [accessor.codify(name) for accessor in accessors]


def describe_leaf(leaf: Any) -> str:
    """``float64[3, 2]`` for a tensor, the type name otherwise."""
    if isinstance(leaf, torch.Tensor):
        dtype = str(leaf.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(str(d) for d in leaf.shape)}]"
    return f"{type(leaf).__name__} ({leaf!r:.40})"


# --------------------------------------------------------------------------------------------
# pure-Python twins for code that torch.compile traces (dynamo cannot trace optree's C++ specs)


class _Slot:
    """Marks a leaf's place in a :func:`template`."""

    __slots__ = ()


_SLOT = _Slot()


@functools.lru_cache(maxsize=256)
def template(spec: Spec) -> Any:
    """The structure ``spec`` as a plain Python object with a marker at each leaf, for
    :func:`traced_fill`. Raises TypeError for node types other than dict, OrderedDict, list,
    tuple, namedtuple and None."""
    tree = unflatten(spec, [_SLOT] * spec.num_leaves)
    _check_template(tree)
    return tree


def _check_template(tree: Any) -> None:
    if tree is _SLOT or tree is None:
        return
    if isinstance(tree, dict) and type(tree) in (dict, collections.OrderedDict):
        for value in tree.values():
            _check_template(value)
        return
    if type(tree) in (list, tuple) or _is_namedtuple(tree):
        for value in tree:
            _check_template(value)
        return
    raise TypeError(
        f"a pytree node of type {type(tree).__name__} (only dict, OrderedDict, list, tuple, "
        "namedtuple and None are compiled)"
    )


def _is_namedtuple(tree: Any) -> bool:
    return isinstance(tree, tuple) and hasattr(type(tree), "_fields")


def _keys(tree: dict) -> list:
    """The order optree visits a dict's keys in: sorted, except for an OrderedDict."""
    return list(tree) if type(tree) is collections.OrderedDict else sorted(tree)


def traced_fill(tree: Any, leaves: Iterator[Any]) -> Any:
    """``unflatten`` for a :func:`template`: its markers replaced by ``leaves`` in order."""
    if tree is _SLOT:
        return next(leaves)
    if tree is None:
        return None
    if isinstance(tree, dict):
        filled = {key: traced_fill(tree[key], leaves) for key in _keys(tree)}
        return type(tree)((key, filled[key]) for key in tree)
    if _is_namedtuple(tree):
        return type(tree)(*[traced_fill(value, leaves) for value in tree])
    return type(tree)(traced_fill(value, leaves) for value in tree)


def traced_leaves(tree: Any) -> list[Any]:
    """``flatten(tree)[0]`` for trees of dicts, lists, tuples and None (traceable)."""
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [leaf for key in _keys(tree) for leaf in traced_leaves(tree[key])]
    if isinstance(tree, list | tuple):
        return [leaf for value in tree for leaf in traced_leaves(value)]
    return [tree]


def traced_map(fn: Any, tree: Any, *rest: Any) -> Any:
    """``optree.tree_map(fn, tree, *rest)`` for trees of dicts, lists, tuples and None
    (traceable; the structure of ``tree`` decides)."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return type(tree)((key, traced_map(fn, tree[key], *(r[key] for r in rest))) for key in tree)
    if not isinstance(tree, list | tuple):
        return fn(tree, *rest)
    children = [traced_map(fn, *c) for c in zip(tree, *rest, strict=True)]
    if _is_namedtuple(tree):
        return type(tree)(*children)
    return type(tree)(children)
