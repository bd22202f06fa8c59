"""Modules as pure functions of their parameters: ``fmaml.params`` and the buffer convention.

Buffers are an *input*, never a mutation. BatchNorm's running statistics are passed to
``torch.func.functional_call`` as ``None``, so BatchNorm normalises with the statistics of the
batch it sees (in the inner loop and on the query, in train and eval mode alike, as in the MAML
reference implementation) and the module's own buffers are never touched, however often the scan
recomputes a step. Every other buffer is passed as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import TransformType, get_interpreter_stack

from fmaml._typing import Params

__all__ = [
    "batch_norm_in_plain_ops",
    "collect_running_stats",
    "inner_buffers",
    "params",
    "running_stats",
]


def params(model: nn.Module) -> Params:
    """The parameters of ``model`` as a dict of detached copies, in ``named_parameters`` order.

    These are plain tensors: differentiate with ``torch.func.grad`` with respect to them. For the
    ``loss.backward()`` route pass ``dict(model.named_parameters())`` instead.

    Example:
        >>> p = fmaml.params(torch.nn.Linear(2, 1))
        >>> list(p), p["weight"].requires_grad
        (['weight', 'bias'], False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"fmaml.params: `model` must be a torch.nn.Module, got {type(model).__name__}."
        )
    return {name: p.detach().clone() for name, p in model.named_parameters()}


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def _batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (prefix, module)
        for prefix, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
    ]


def _name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def inner_buffers(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """The buffers to hand to ``functional_call``: BatchNorm running statistics become ``None``."""
    running = {_name(prefix, name) for prefix, _ in _batch_norms(model) for name in _RUNNING}
    return {name: (None if name in running else buffer) for name, buffer in model.named_buffers()}


def running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the BatchNorm running means and variances of ``model``, by name.

    The initial value of the per-task statistics that ``MAML(..., bn_stats="carry")`` carries
    through the inner loop.
    """
    stats = {}
    for prefix, module in _batch_norms(model):
        if module.momentum is None:
            raise ValueError(
                f"MAML: bn_stats='carry' needs BatchNorm momentum, but {prefix or 'the model'} "
                "has momentum=None (a cumulative average); set a momentum such as 0.1."
            )
        for name in ("running_mean", "running_var"):
            stats[_name(prefix, name)] = getattr(module, name).detach().clone()
    return stats


class _Collector:
    """Receives the momentum-updated running statistics of the BatchNorms of one forward pass."""

    def __init__(self, stats: dict[str, torch.Tensor]) -> None:
        self.names = {
            id(t): name.removesuffix("running_mean")
            for name, t in stats.items()
            if name.endswith("running_mean")
        }
        self.updated: dict[str, torch.Tensor] = {}


_COLLECTORS: list[_Collector] = []


@contextlib.contextmanager
def collect_running_stats(stats: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, BatchNorms reading the tensors of ``stats`` report their updates.

    Yields a dict that, after the block, maps each statistic's name to its momentum-updated
    value (PyTorch's rule: ``(1 - m) * running + m * batch``, the variance unbiased), detached:
    running statistics are buffers, never differentiated.
    """
    collector = _Collector(stats)
    _COLLECTORS.append(collector)
    try:
        with batch_norm_in_plain_ops():
            yield collector.updated
    finally:
        _COLLECTORS.remove(collector)


def _batch_norm_batch_stats(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    collector = _COLLECTORS[-1] if _COLLECTORS else None
    carried = collector is not None and id(running_mean) in collector.names
    plain = training and running_mean is None and running_var is None and _under_vmap()
    if not carried and not plain:
        return _NATIVE_BATCH_NORM(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    shape = [1, -1] + [1] * (input.dim() - 2)
    if carried and not training:  # eval mode: normalise with the carried statistics
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    else:
        dims = [0, *range(2, input.dim())]
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, unbiased=False, keepdim=True)
        if carried:
            n = input.numel() // input.shape[1]
            prefix = collector.names[id(running_mean)]
            m = float(momentum)
            unbiased = var.flatten() * (n / max(n - 1, 1))
            collector.updated[prefix + "running_mean"] = (
                (1 - m) * running_mean + m * mean.flatten()
            ).detach()
            collector.updated[prefix + "running_var"] = (
                (1 - m) * running_var + m * unbiased
            ).detach()
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


_NATIVE_BATCH_NORM = F.batch_norm


def _under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` level is active (where the native kernel's bug bites)."""
    return any(i.key() == TransformType.Vmap for i in get_interpreter_stack() or ())


@contextlib.contextmanager
def batch_norm_in_plain_ops() -> Iterator[None]:
    """Inside the block, BatchNorm on batch statistics under ``vmap`` uses plain tensor ops.

    Works around a PyTorch bug (seen in 2.13): the second derivative of the native batch norm
    under ``vmap`` (``grad(vmap(f))`` where ``f`` takes a ``grad`` through BatchNorm, i.e. MAML
    over a batch of tasks) is silently wrong, off by about 1e-2. The plain-ops formula is exact
    there. Outside ``vmap`` the native kernel is exact and about 1.5x faster, so only calls
    under ``vmap`` without running statistics in training mode are rerouted.
    """
    previous = F.batch_norm
    F.batch_norm = _batch_norm_batch_stats
    try:
        yield
    finally:
        F.batch_norm = previous
