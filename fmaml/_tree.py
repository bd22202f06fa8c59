"""The one pytree convention of fmaml (optree, with ``None`` as an empty subtree).

optree and ``torch.utils._pytree`` disagree on whether ``None`` is a leaf. fmaml decides once:
``None`` is *not* a leaf (optree's default), so a carry such as ``{"w": w, "state": None}`` carries
the ``None`` through unchanged and has one leaf. Every module goes through these helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree
import torch

__all__ = ["describe_leaf", "flatten", "leaf_paths", "unflatten"]

Spec = optree.PyTreeSpec


def flatten(tree: Any) -> tuple[list[Any], Spec]:
    """Leaves (depth first, dict keys sorted) and the structure of ``tree``."""
    return optree.tree_flatten(tree, none_is_leaf=False)


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
