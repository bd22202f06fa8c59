"""The types fmaml's functions take and return, in one place."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch

__all__ = ["Batch", "ForwardFn", "LossFn", "Params", "Tasks"]

#: Model parameters by name, as ``dict(model.named_parameters())`` orders them.
Params = dict[str, torch.Tensor]

#: One batch: a pytree of tensors, usually ``(inputs, targets)``.
Batch = Any


class LossFn(Protocol):
    """``loss_fn(model_output, target) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``."""

    def __call__(self, output: Any, target: Any, /) -> torch.Tensor: ...


class ForwardFn(Protocol):
    """``forward(params, batch) -> scalar loss``, for batches that are not ``(input, target)``."""

    def __call__(self, params: Params, batch: Batch, /) -> torch.Tensor: ...


class Tasks(NamedTuple):
    """A batch of ``T`` tasks: a pytree whose every leaf has a leading task dimension ``T``.

    Attributes:
        support: the adaptation batch, leaves ``(T, N, ...)``; with ``per_step=True`` in
            :meth:`fmaml.MAML.unrolled_loss`, leaves ``(T, k, N, ...)``, one batch per inner step.
        query: the evaluation batch, leaves ``(T, M, ...)``.

    Example:
        >>> tasks = fmaml.Tasks(support=(xs, ys), query=(xq, yq))  # doctest: +SKIP
    """

    support: Batch
    query: Batch
