"""The types fmaml's functions take and return, in one place."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch

__all__ = ["Batch", "ForwardFn", "LossFn", "MetaAux", "MetricsFn", "Params", "Tasks"]

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


class MetricsFn(Protocol):
    """``metrics(output, target) -> {name: tensor}``, per task, e.g. the query accuracy."""

    def __call__(self, output: Any, target: Any, /) -> dict[str, torch.Tensor]: ...


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


class MetaAux(NamedTuple):
    """What :meth:`fmaml.MAML.unrolled_loss` returns beside the loss with ``has_aux=True``.

    Every field comes from the forward pass that computed the loss (no second pass) and is
    detached: it is for logging, not for differentiating.

    Attributes:
        query_losses: ``(T,)``, each task's query loss after ``k`` inner steps (their mean is
            the meta-loss).
        inner_losses: ``(T, k)``, ``inner_losses[t, i]`` is task ``t``'s support loss before
            inner step ``i``.
        metrics: ``{name: (T, ...)}``, what ``fmaml.MAML(..., metrics=fn)`` computed from each
            task's query outputs and targets (``{}`` without ``metrics``).

    Example:
        >>> loss, aux = maml.unrolled_loss(params, tasks, 5, has_aux=True)  # doctest: +SKIP
        >>> aux.metrics["accuracy"].mean()  # doctest: +SKIP
    """

    query_losses: torch.Tensor
    inner_losses: torch.Tensor
    metrics: dict[str, torch.Tensor]
