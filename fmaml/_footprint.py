"""How many bytes one step's autograd graph holds, measured by running the step once.

The automatic choices (``checkpoint="auto"``, ``batching="auto"``) weigh the memory of keeping
graphs against the time of recomputing them. The size of a graph is the bytes of the tensors it
saves for its backward pass (``torch.autograd.graph.saved_tensors_hooks``), counted once per
storage and without the storages of the step's inputs, which exist anyway.

Saved-tensor hooks are refused under ``torch.func.grad``-like levels. Under ``torch.func``
transforms the step is therefore measured on a *sample*: every argument reduced to one element of
every ``vmap`` batch, as a plain tensor, run with the interpreter stack cleared, and the result
scaled by the batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch._C._functorch import (
    get_unwrapped,
    is_batchedtensor,
    is_functorch_wrapped_tensor,
    maybe_get_bdim,
)
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

__all__ = [
    "SavedBytes",
    "batch_factor",
    "hooks_allowed",
    "measured",
    "plain_autograd",
    "sample",
    "sampled_graph_bytes",
]


class SavedBytes:
    """Counts the bytes that autograd saves inside the ``with`` block (plain autograd only).

    Example:
        >>> with SavedBytes(exclude=[w]) as saved:  # doctest: +SKIP
        ...     loss = (x @ w).tanh().sum()
        >>> saved.bytes  # doctest: +SKIP
    """

    def __init__(self, exclude: Sequence[Any] = ()) -> None:
        self._seen = {_storage(t) for t in exclude if isinstance(t, torch.Tensor)}
        self.bytes = 0
        self.tensors = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage(t)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
            self.tensors += 1
        # A detached alias: returning ``t`` itself would tie a saved output to its own node in
        # a reference cycle that nothing collects. Autograd restores what it needs on unpack.
        return t.detach()

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def measured(fn: Callable[[], Any], exclude: Sequence[Any]) -> tuple[Any, int | None]:
    """``(fn(), bytes its graph saved)``, for plain autograd (no ``torch.func`` level active).
    The bytes are None where hooks are refused (``fn`` enters ``torch.func.grad`` itself, say),
    and ``fn`` then runs again without them."""
    try:
        with hooks_allowed(), SavedBytes(exclude) as saved:
            return fn(), saved.bytes
    except RuntimeError as error:
        if "saved tensor hooks" not in str(error):
            raise
    return fn(), None


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _storage(t: torch.Tensor) -> tuple[int, str]:
    return t.untyped_storage().data_ptr(), str(t.device)


def sample(t: Any) -> Any:
    """A plain tensor holding element 0 of every ``vmap`` batch of ``t`` (others as they are)."""
    if not isinstance(t, torch.Tensor):
        return t
    while is_functorch_wrapped_tensor(t):
        if is_batchedtensor(t):
            bdim = maybe_get_bdim(t)
            t = get_unwrapped(t)
            if bdim is not None and bdim >= 0:
                t = t.select(bdim, 0)
        else:
            t = get_unwrapped(t)
    return t.detach()


def batch_factor(t: torch.Tensor) -> int:
    """How many ``vmap`` elements ``t`` stands for: its physical size over its logical size."""
    physical = t
    while is_functorch_wrapped_tensor(physical):
        physical = get_unwrapped(physical)
    return max(1, physical.numel() // max(1, t.numel()))


@contextlib.contextmanager
def hooks_allowed() -> Iterator[None]:
    """Saved-tensor hooks allowed in the block: an enclosing ``torch.func.grad`` disables them
    for its own level, and the block must not touch that level (plain tensors only)."""
    autograd = torch._C._autograd
    message = autograd._saved_tensors_hooks_get_disabled_error_message()
    autograd._saved_tensors_hooks_enable()
    try:
        yield
    finally:
        if message is not None:
            autograd._saved_tensors_hooks_disable(message)


@contextlib.contextmanager
def plain_autograd() -> Iterator[None]:
    """No ``torch.func`` level in the block, and saved-tensor hooks allowed."""
    with hooks_allowed(), temporarily_clear_interpreter_stack():
        yield


def sampled_graph_bytes(
    fn: Callable[..., Any], args: Sequence[Any], tracked: Sequence[bool]
) -> int | None:
    """The bytes of ``fn(*args)``'s graph for one element of every ``vmap`` batch, times the
    batch size: ``fn`` runs once on plain samples, the ``tracked`` ones requiring grad (None
    where the hooks are refused)."""
    factor = max([batch_factor(a) for a in args if isinstance(a, torch.Tensor)] or [1])
    with plain_autograd(), torch.enable_grad():
        plain = [
            sample(a).requires_grad_() if want else sample(a)
            for a, want in zip(args, tracked, strict=True)
        ]
        _, graph = measured(lambda: fn(*plain), plain)
    return None if graph is None else graph * factor
