"""Modules as pure functions of their parameters: ``fmaml.params``, ``fmaml.load_params`` and
the buffer convention.

Buffers are an *input*, never a mutation. BatchNorm's running statistics are passed to
``torch.func.functional_call`` as ``None``, so BatchNorm normalises with the statistics of the
batch it sees (in the inner loop and on the query, in train and eval mode alike, as in the MAML
reference implementation) and the module's own buffers are never touched, however often the scan
recomputes a step. Every other buffer is passed as it is.

``MAML(..., bn_stats="track")`` is the one exception, and it writes outside any transform's
sight: once per meta-step it folds the query passes' batch statistics into the module's running
statistics (:func:`update_running_stats`), so that ``model.eval()`` normalises with them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch._C import _functorch
from torch._C._functorch import TransformType, get_interpreter_stack

from fmaml._tree import describe_leaf
from fmaml._typing import Params

__all__ = [
    "BufferReader",
    "batch_norm_in_plain_ops",
    "check_trackable",
    "check_tracked",
    "collect_running_stats",
    "inner_buffers",
    "load_params",
    "module_running_stats",
    "params",
    "running_stats",
    "update_running_stats",
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


def load_params(
    model: nn.Module, params: Mapping[str, torch.Tensor], *, strict: bool = True
) -> nn.Module:
    """Write a parameter dict back into ``model``, in place, without autograd history.

    The inverse of :func:`fmaml.params`: after a functional training loop (``torch.func.grad``
    on ``fmaml.params(model)`` and an optimizer updating those tensors), ``load_params(model,
    params)`` makes ``model`` the trained network. Names and shapes are checked before anything
    is written; values are copied under ``torch.no_grad()`` into the module's own
    ``nn.Parameter``\\ s (cast to their dtype and device, as ``load_state_dict`` does), which stay
    leaves. Names of buffers are accepted too: the BatchNorm running statistics that
    ``MAML(..., bn_stats="carry")``'s ``adapt`` returns beside the parameters go into the module's
    buffers.

    Args:
        model: the module to write into.
        params: ``{name: tensor}`` with the module's parameter names and shapes (one task's
            parameters: pick task ``t`` of a batched ``adapt`` with ``{n: p[t] for n, p in
            adapted.items()}``).
        strict: every parameter of ``model`` must be in ``params`` (default); with
            ``strict=False`` a subset is written (unknown names still raise).

    Returns:
        ``model``.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> p = {name: torch.zeros_like(t) for name, t in fmaml.params(model).items()}
        >>> fmaml.load_params(model, p).weight
        Parameter containing:
        tensor([[0., 0.]], requires_grad=True)
    """
    where = "fmaml.load_params"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: `model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{where}: `params` must be a dict {{name: tensor}} (as fmaml.params(model) builds), "
            f"got {type(params).__name__}."
        )
    targets = dict(model.named_parameters())
    buffers = {name: b for name, b in model.named_buffers() if b is not None}
    unknown = [n for n in params if n not in targets and n not in buffers]
    missing = [n for n in targets if n not in params] if strict else []
    if unknown or missing:
        raise ValueError(
            f"{where}: `params` does not match the model's parameters: missing {missing}, "
            f"unexpected {unknown}. The model's parameters are {list(targets)}"
            + "; build the dict with fmaml.params(model)"
            + (" (or pass strict=False to write a subset)." if missing else ".")
        )
    for name, value in params.items():
        target = targets[name] if name in targets else buffers[name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{where}: `params[{name!r}]` must be a tensor, got {describe_leaf(value)}."
            )
        if value.shape != target.shape:
            hint = ""
            if value.dim() == target.dim() + 1 and value.shape[1:] == target.shape:
                hint = (
                    " It has a leading task dimension: pick one task, e.g. "
                    "{n: p[0] for n, p in adapted.items()}."
                )
            raise ValueError(
                f"{where}: `params[{name!r}]` has shape {tuple(value.shape)}, but the model's "
                f"{'parameter' if name in targets else 'buffer'} {name!r} has shape "
                f"{tuple(target.shape)}.{hint}"
            )
    with torch.no_grad():
        for name, value in params.items():
            (targets[name] if name in targets else buffers[name]).copy_(value)
    return model


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
    return BufferReader(model)()


class BufferReader:
    """:func:`inner_buffers` for one module, its buffers' places found once.

    Walking the module tree costs more than a small model's forward pass, so the places
    (owning submodule and attribute) are found when the reader is made; the tensors themselves
    are read at every call, so ``model.to(...)`` and replaced buffers are seen.
    """

    def __init__(self, model: nn.Module) -> None:
        running = {_name(prefix, name) for prefix, _ in _batch_norms(model) for name in _RUNNING}
        self._slots = []
        seen: set[int] = set()
        for prefix, module in model.named_modules():
            for attr, buffer in module._buffers.items():
                if buffer is None or id(buffer) in seen:
                    continue
                seen.add(id(buffer))
                name = _name(prefix, attr)
                self._slots.append((name, module, attr, name in running))

    def __call__(self) -> dict[str, torch.Tensor | None]:
        return {
            name: None if running else module._buffers[attr]
            for name, module, attr, running in self._slots
        }


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


def module_running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own BatchNorm running means and variances, by name (the tensors themselves).

    For ``bn_stats="track"``'s query passes: handed to :func:`collect_running_stats`, they are
    read (eval mode) or stand for their BatchNorm (train mode), never written.
    """
    return {
        _name(prefix, name): getattr(module, name)
        for prefix, module in _batch_norms(model)
        for name in ("running_mean", "running_var")
    }


class _Collector:
    """Receives the statistics of the BatchNorms of one forward pass in training mode.

    ``batch``: each BatchNorm's batch mean and unbiased variance; ``updated``: its running
    statistics after PyTorch's momentum update (when it has a momentum).
    """

    def __init__(self, stats: dict[str, torch.Tensor]) -> None:
        self.names = {
            id(t): name.removesuffix("running_mean")
            for name, t in stats.items()
            if name.endswith("running_mean")
        }
        self.updated: dict[str, torch.Tensor] = {}
        self.batch: dict[str, torch.Tensor] = {}


_COLLECTORS: list[_Collector] = []


@contextlib.contextmanager
def collect_running_stats(stats: dict[str, torch.Tensor]) -> Iterator[_Collector]:
    """Inside the block, BatchNorms reading the tensors of ``stats`` report their statistics.

    In training mode they normalise with the batch statistics; in eval mode with ``stats``.
    Yields a collector whose dicts, after the block, map each statistic's name to its
    momentum-updated value (``updated``; PyTorch's rule ``(1 - m) * running + m * batch``, the
    variance unbiased) and to the batch's own statistic (``batch``), detached: running
    statistics are buffers, never differentiated.
    """
    collector = _Collector(stats)
    _COLLECTORS.append(collector)
    try:
        with batch_norm_in_plain_ops():
            yield collector
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
            unbiased = (var.flatten() * (n / max(n - 1, 1))).detach()
            collector.batch[prefix + "running_mean"] = mean.flatten().detach()
            collector.batch[prefix + "running_var"] = unbiased
            if momentum is not None:
                m = float(momentum)
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


def check_tracked(model: nn.Module, where: str) -> None:
    """For ``bn_stats="track"`` in eval mode: refuse BatchNorms whose running statistics were
    never updated (they would normalise with their initial zeros and ones)."""
    for prefix, module in _batch_norms(model):
        count = module.num_batches_tracked
        if count is not None and int(count) == 0:
            raise ValueError(
                f"{where}: the model is in eval mode and bn_stats='track', but the BatchNorm "
                f"{prefix!r} has never updated its running statistics (num_batches_tracked is "
                "0), so it would normalise with its initial zeros and ones. Meta-train in train "
                "mode first (model.train(); unrolled_loss or meta_grad update them), or call "
                "model.train() to normalise with batch statistics."
            )


def check_trackable(where: str) -> None:
    """``bn_stats="track"`` in train mode: refuse to start a meta-step under ``vmap``."""
    if _under_vmap():
        raise ValueError(
            f"{where}: bn_stats='track' updates the module's BatchNorm running statistics "
            "once per meta-step, which cannot be done inside torch.func.vmap (each vmapped "
            "call would be a meta-step of its own). Call it outside vmap, put the module in "
            "eval mode, or use a MAML with bn_stats='batch' there (the same loss and gradients "
            "in train mode)."
        )


def _plain(t: torch.Tensor, where: str) -> torch.Tensor:
    """``t`` without the ``torch.func`` grad wrappers around it (its value, detached)."""
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            check_trackable(where)  # raises (under vmap)
        t = _functorch.get_unwrapped(t)
    return t.detach()


def update_running_stats(model: nn.Module, batch: dict[str, torch.Tensor], where: str) -> None:
    """One meta-step of ``bn_stats="track"``: fold the tasks' batch statistics into the module.

    ``batch`` maps ``"<bn>.running_mean"`` and ``"<bn>.running_var"`` to ``(T, C)``: each task's
    query batch mean and unbiased variance at its adapted parameters. Each BatchNorm then takes
    one step of PyTorch's rule with their mean over tasks ``b``: ``num_batches_tracked += 1``,
    ``running = (1 - m) running + m b`` with ``m`` its momentum (``1 / num_batches_tracked``
    when the momentum is None, a cumulative average). Works under ``torch.func.grad`` and
    ``jacrev``: the values are unwrapped and written outside functorch's sight.
    """
    if not batch:
        return
    plain = {name: _plain(value, where) for name, value in batch.items()}
    with torch.no_grad(), torch._C._DisableFuncTorch():
        for prefix, module in _batch_norms(model):
            mean = plain.get(_name(prefix, "running_mean"))
            if mean is None:  # a BatchNorm the query pass did not reach
                continue
            var = plain[_name(prefix, "running_var")]
            if module.num_batches_tracked is not None:
                module.num_batches_tracked.add_(1)
            if module.momentum is None:
                m = 1.0 / float(module.num_batches_tracked)
            else:
                m = float(module.momentum)
            module.running_mean.mul_(1 - m).add_(mean.mean(0).to(module.running_mean), alpha=m)
            module.running_var.mul_(1 - m).add_(var.mean(0).to(module.running_var), alpha=m)
