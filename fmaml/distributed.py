"""Data-parallel meta-training on ``torch.distributed``: shard the meta-batch, average the grads.

Every rank holds the same parameters and the same full meta-batch of ``T`` tasks, takes its
contiguous share of the tasks (:func:`shard`), computes the meta-gradient of its share with
:meth:`fmaml.MAML.meta_grad`, and the ranks average their gradients with a bucketed all-reduce
(:func:`all_reduce_mean`) weighted by task count, so that the result is the single-process
meta-gradient over all ``T`` tasks::

    g = Σ_r n_r g_r / Σ_r n_r      (g_r: the mean over rank r's n_r tasks; Σ_r n_r = T)

Every rank then applies the same update, so the parameters stay identical without ever being
sent again (check it with :func:`check_in_sync`). One code path serves ``torch.func.grad`` dicts
and ``nn.Parameter.grad`` (:func:`all_reduce_module_grads`); see ``docs/distributed.md`` for
why this is not ``DistributedDataParallel``.

Launch with ``torchrun --nproc_per_node=N script.py``; under plain ``python`` (``WORLD_SIZE``
unset) :func:`setup` returns a single-process context and every function here is a no-op, so
the same script runs both ways::

    with fmaml.distributed.setup() as ctx:        # on error: every rank stops, then teardown
        fmaml.distributed.check_same_config(config)
        fmaml.distributed.broadcast_params(params)
        for step in range(steps):
            loss, grads = fmaml.distributed.distributed_meta_grad(maml, params, tasks, k, ctx)
            ...                                   # the same optimizer step on every rank
            if ctx.is_main:
                print(step, loss.item())
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fmaml._tree import describe_leaf, flatten, unflatten
from fmaml._typing import Params, Tasks

__all__ = [
    "Context",
    "all_reduce_mean",
    "all_reduce_module_grads",
    "any_rank",
    "broadcast_params",
    "check_in_sync",
    "check_same_config",
    "distributed_meta_grad",
    "fail_together",
    "gather_shards",
    "setup",
    "shard",
    "shard_bounds",
    "teardown",
]

#: The default bucket size of the all-reduce (the default of ``DistributedDataParallel``).
BUCKET_BYTES = 25 * 2**20
#: The store key under which the first rank to fail leaves its error for the others.
_FAILED_KEY = "fmaml/failed"
#: How long a rank stopped by another's failure waits before raising (see :func:`fail_together`).
_GRACE_S = 1.0
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------------------------
# the process group


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, the world size, its device and the backend.

    A single-process run (not launched by ``torchrun``) is ``Context()``: rank 0 of 1, no
    backend. As a context manager it runs the body under :func:`fail_together` and calls
    :func:`teardown` on the way out.

    Attributes:
        rank: this process's rank in ``[0, world_size)``.
        world_size: the number of processes.
        local_rank: the rank on this machine (``LOCAL_RANK``); it picks the GPU.
        device: where this rank computes (``cuda:LOCAL_RANK`` with NCCL, else the CPU).
        backend: ``"gloo"``, ``"nccl"``, ..., or ``None`` when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """Whether a process group was initialised (even one of world size 1)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, writes logs and saves checkpoints."""
        return self.rank == 0

    def shard(self, tasks: Tasks) -> Tasks:
        """This rank's share of ``tasks``: ``shard(tasks, self.rank, self.world_size)``."""
        return shard(tasks, self.rank, self.world_size)

    def __enter__(self) -> Context:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if isinstance(exc, Exception):
                _fail(exc)
        finally:
            teardown()


def setup(
    backend: str | None = None,
    *,
    timeout_s: float = 60.0,
    device: str | torch.device | None = None,
) -> Context:
    """Initialise the default process group from ``torchrun``'s environment; return a Context.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (default: ``RANK``), ``MASTER_ADDR`` and
    ``MASTER_PORT``. Without ``WORLD_SIZE`` (plain ``python``) nothing is initialised and the
    single-process ``Context(device=...)`` comes back, so one script runs both ways. When a
    process group already exists it is reused.

    Args:
        backend: ``"gloo"`` (CPU), ``"nccl"`` (CUDA) or any ``torch.distributed`` backend;
            ``None`` picks by device: NCCL on CUDA, gloo on the CPU.
        timeout_s: how long a collective (and the start-up rendezvous) waits for the other
            ranks before raising, so that a dead or stuck peer cannot hang the rest forever.
            Work that only rank 0 does between two collectives (a long evaluation, a large
            checkpoint) must fit in it: shard evaluations instead, or raise it. With NCCL it is
            enforced by the watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default).
        device: the device to compute on; ``None``: ``cuda:LOCAL_RANK`` if CUDA is available
            and the backend is not gloo, else the CPU.

    Returns:
        The :class:`Context`.

    Example:
        >>> ctx = fmaml.distributed.setup()  # plain python: Context(rank=0, world_size=1, ...)
        >>> ctx.world_size
        1
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
        raise TypeError(
            f"fmaml.distributed.setup: `timeout_s` must be a number of seconds, got {timeout_s!r}."
        )
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(
            f"fmaml.distributed.setup: `timeout_s` must be positive and finite, got {timeout_s!r}."
        )
    if backend is not None and not isinstance(backend, str):
        raise TypeError(
            f"fmaml.distributed.setup: `backend` must be None, 'gloo' or 'nccl', got {backend!r}."
        )
    if dist.is_available() and dist.is_initialized():
        return _existing_context(device)
    if "WORLD_SIZE" not in os.environ:
        return Context(device=_pick_device(device, backend, 0))
    env = _read_env()
    rank, world_size, local_rank = env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]
    if not dist.is_available():
        raise RuntimeError(
            "fmaml.distributed.setup: WORLD_SIZE is set but this build of torch has no "
            "torch.distributed; run without torchrun, or install a build with it."
        )
    dev = _pick_device(device, backend, local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise RuntimeError(
            f"fmaml.distributed.setup: backend 'nccl' needs CUDA tensors, but the device is {dev}"
            f" (torch.cuda.is_available() is {torch.cuda.is_available()}); use backend='gloo' on "
            "the CPU."
        )
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    _import_dynamo()
    kwargs: dict[str, Any] = {}
    if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = dev  # eager NCCL init: a bad GPU fails here, not mid-training
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=float(timeout_s)),
        **kwargs,
    )
    return Context(rank, world_size, local_rank, dev, dist.get_backend())


def _import_dynamo() -> None:
    """Import ``torch._dynamo`` before the process group exists.

    ``torch.func`` imports it lazily on first use. Imported while a group exists, it keeps
    references to the group (seen with torch 2.13). The group then outlives
    ``destroy_process_group``, and at interpreter exit its gloo threads abort the process
    ("terminate called without an active exception", exit status -6).
    """
    with contextlib.suppress(ImportError):  # builds without dynamo
        importlib.import_module("torch._dynamo")


def teardown() -> None:
    """Destroy the default process group if there is one (idempotent; a no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _read_env() -> dict[str, int]:
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"fmaml.distributed.setup: WORLD_SIZE is set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not. Launch with torchrun (which sets "
            "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), or unset WORLD_SIZE "
            "to run as one process."
        )
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(name, os.environ["RANK"])
        try:
            values[name] = int(text)
        except ValueError:
            raise RuntimeError(
                f"fmaml.distributed.setup: the environment variable {name} must be an int, got "
                f"{text!r}."
            ) from None
    if values["WORLD_SIZE"] < 1 or not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise RuntimeError(
            f"fmaml.distributed.setup: RANK={values['RANK']} is not in [0, WORLD_SIZE="
            f"{values['WORLD_SIZE']}); check the launcher's environment."
        )
    return values


def _pick_device(device: str | torch.device | None, backend: str | None, local: int):
    if device is None:
        if backend == "gloo" or not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    dev = torch.device(device)
    if dev.type != "cuda" or dev.index is not None:
        return dev
    # no index (given as "cuda", or picked above): this rank's GPU, cuda:LOCAL_RANK
    if torch.cuda.is_available() and local >= torch.cuda.device_count():
        raise RuntimeError(
            f"fmaml.distributed.setup: LOCAL_RANK={local} but only "
            f"{torch.cuda.device_count()} CUDA devices are visible; launch at most that many "
            "processes per node (torchrun --nproc_per_node)."
        )
    return torch.device("cuda", local)


def _existing_context(device: str | torch.device | None) -> Context:
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if device is None:
        cuda = backend == "nccl" or (backend != "gloo" and torch.cuda.is_available())
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu"
    return Context(dist.get_rank(), dist.get_world_size(), local, torch.device(device), backend)


def _world(group: Any = None) -> int:
    """The number of ranks in ``group``; 1 when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _comm_device(group: Any = None) -> torch.device:
    """Where small control tensors (weights, checksums) live: CUDA for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# sharding


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous share of ``n`` items.

    The first ``n % world_size`` ranks take ``ceil(n / world_size)`` items, the others
    ``floor(n / world_size)`` (``numpy.array_split``'s rule): the shares are contiguous, in rank
    order, cover ``range(n)`` exactly once and differ in size by at most one. A rank may get
    none when ``n < world_size``.

    Example:
        >>> [fmaml.distributed.shard_bounds(7, r, 2) for r in range(2)]
        [(0, 4), (4, 7)]
    """
    return _bounds(n, rank, world_size, "shard_bounds")


def _bounds(n: int, rank: int, world_size: int, where: str) -> tuple[int, int]:
    for name, value in (("n", n), ("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"fmaml.distributed.{where}: `{name}` must be an int, got {value!r}.")
    if world_size < 1:
        raise ValueError(f"fmaml.distributed.{where}: `world_size` must be >= 1, got {world_size}.")
    if not 0 <= rank < world_size:
        raise ValueError(
            f"fmaml.distributed.{where}: `rank` must be in [0, world_size={world_size}), "
            f"got {rank}."
        )
    if n < 0:
        raise ValueError(f"fmaml.distributed.{where}: `n` must be >= 0, got {n}.")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(tasks: Tasks, rank: int, world_size: int) -> Tasks:
    """Rank ``rank``'s contiguous share of the meta-batch ``tasks`` (views, no copies).

    ``T`` need not be divisible by ``world_size``: the shares follow :func:`shard_bounds`
    (sizes differ by at most one, possibly zero), and :func:`distributed_meta_grad` weights
    each rank's mean by its task count, so the result is still the mean over all ``T`` tasks.

    Args:
        tasks: :class:`fmaml.Tasks` whose every leaf leads with the task dimension ``T``.
        rank: this rank, in ``[0, world_size)``.
        world_size: the number of ranks.

    Returns:
        The tasks ``start:stop`` of :func:`shard_bounds`, leaves ``(stop - start, ...)``.

    Example:
        >>> local = fmaml.distributed.shard(tasks, ctx.rank, ctx.world_size)  # doctest: +SKIP
    """
    n = _n_tasks(tasks, "shard")
    start, stop = _bounds(n, rank, world_size, "shard")
    leaves, spec = flatten(tasks)
    return unflatten(spec, [leaf[start:stop] for leaf in leaves])


def _n_tasks(tasks: object, where: str) -> int:
    if not isinstance(tasks, Tasks):
        raise TypeError(
            f"fmaml.distributed.{where}: `tasks` must be fmaml.Tasks(support=..., query=...), "
            f"got {type(tasks).__name__}."
        )
    leaves, _ = flatten(tasks)
    if not leaves or any(not isinstance(x, torch.Tensor) or x.dim() == 0 for x in leaves):
        bad = next((x for x in leaves if not isinstance(x, torch.Tensor) or x.dim() == 0), None)
        raise ValueError(
            f"fmaml.distributed.{where}: every leaf of `tasks` must be a tensor with a leading "
            f"task dimension, got {'no leaves' if not leaves else describe_leaf(bad)}."
        )
    sizes = {x.shape[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"fmaml.distributed.{where}: every leaf of `tasks` needs the same leading task "
            f"dimension, got sizes {sorted(sizes)}."
        )
    return sizes.pop()


# --------------------------------------------------------------------------------------------
# the bucketed all-reduce


def all_reduce_mean(
    grads: Mapping[str, torch.Tensor],
    *,
    weight: float = 1.0,
    bucket_bytes: int = BUCKET_BYTES,
    group: Any = None,
) -> dict[str, torch.Tensor]:
    """The weighted mean over ranks of ``grads``, by a bucketed all-reduce.

    ``Σ_r w_r grads_r / Σ_r w_r`` with ``w_r`` the ``weight`` of rank ``r``. The tensors are
    grouped by dtype and device and packed in order into flat buckets of at most
    ``bucket_bytes`` (a larger tensor gets a bucket of its own); each bucket's asynchronous
    all-reduce starts as soon as it is full, so packing the next bucket overlaps with sending
    the previous one. Then every bucket is awaited, divided by ``Σ_r w_r`` and unpacked.

    Every rank must pass the same names, shapes and dtypes in the same order (as the same model
    gives), or the collectives do not line up. Half-precision buckets are summed in their own
    precision. Without a process group (one process) the values come back as they are.

    Args:
        grads: ``{name: tensor}`` of floating-point tensors, e.g. from ``torch.func.grad``.
        weight: this rank's weight (>= 0), e.g. its number of tasks; a rank of weight 0
            contributes nothing (not even a NaN of its own).
        bucket_bytes: the largest bucket, in bytes (default 25 MiB, as DDP).
        group: the process group (default: the world).

    Returns:
        A new dict with the same keys in the same order; its tensors are views into the
        reduced buckets, identical on every rank.

    Example:
        >>> grads = torch.func.grad(maml.unrolled_loss)(params, local_tasks, 5)  # doctest: +SKIP
        >>> grads = fmaml.distributed.all_reduce_mean(grads, weight=n_local)  # doctest: +SKIP
    """
    names, tensors = _check_grads(grads, "all_reduce_mean")
    weight = _check_weight(weight, "all_reduce_mean")
    _check_bucket_bytes(bucket_bytes, "all_reduce_mean")
    if _world(group) == 1:
        if weight == 0:
            raise ValueError(_ZERO_WEIGHT.format(where="all_reduce_mean"))
        return dict(zip(names, tensors, strict=True))
    reduced, total = _all_reduce_weighted(tensors, weight, bucket_bytes, group)
    if total == 0:
        raise ValueError(_ZERO_WEIGHT.format(where="all_reduce_mean"))
    return dict(zip(names, _divide(reduced, total, tensors), strict=True))


def all_reduce_module_grads(
    module: nn.Module | Iterable[torch.Tensor],
    *,
    weight: float = 1.0,
    bucket_bytes: int = BUCKET_BYTES,
    group: Any = None,
) -> None:
    """:func:`all_reduce_mean` of ``p.grad`` over ``module``'s parameters, in place.

    For the ``loss.backward()`` route: after ``backward()`` and before ``optimizer.step()``.
    Parameters with ``requires_grad=False`` are skipped. A parameter whose ``.grad`` is ``None``
    (unused by this rank's tasks) counts as a zero gradient and gets one, so that every rank
    launches the same collectives.

    Args:
        module: a module, or an iterable of parameters.
        weight, bucket_bytes, group: as :func:`all_reduce_mean`.

    Example:
        >>> named = dict(model.named_parameters())  # doctest: +SKIP
        >>> maml.unrolled_loss(named, ctx.shard(tasks), 5).backward()  # doctest: +SKIP
        >>> fmaml.distributed.all_reduce_module_grads(model, weight=n_local)  # doctest: +SKIP
    """
    if isinstance(module, nn.Module):
        parameters = list(module.parameters())
    elif isinstance(module, torch.Tensor):
        parameters = [module]
    else:
        parameters = list(module)
    parameters = [p for p in parameters if p.requires_grad]
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    averaged = all_reduce_mean(
        {str(i): p.grad for i, p in enumerate(parameters)},
        weight=weight,
        bucket_bytes=bucket_bytes,
        group=group,
    )
    with torch.no_grad():
        for i, p in enumerate(parameters):
            if averaged[str(i)] is not p.grad:
                p.grad.copy_(averaged[str(i)])


def _bucket_key(tensor: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    return tensor.dtype, tensor.device


def _fill_buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> Iterator[list[int]]:
    """The buckets, as lists of indices into ``tensors``, in the order they are launched.

    One open bucket per (dtype, device); a tensor that would overflow its open bucket closes it
    (yielded at once) and opens the next. The buckets still open at the end are yielded in the
    order they were opened. A pure function of the shapes and dtypes, so identical on every
    rank that passes the same tensors.
    """
    open_buckets: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    for i, t in enumerate(tensors):
        key = _bucket_key(t)
        size = t.numel() * t.element_size()
        members, used = open_buckets.get(key, ([], 0))
        if members and used + size > bucket_bytes:
            yield members
            members, used = [], 0
        members.append(i)
        # re-insert so that the dict keeps the buckets in the order they were opened
        open_buckets.pop(key, None)
        open_buckets[key] = (members, used + size)
    yield from sorted((m for m, _ in open_buckets.values()), key=lambda m: m[0])


def _all_reduce_weighted(
    tensors: Sequence[torch.Tensor], weight: float, bucket_bytes: int, group: Any
) -> tuple[list[tuple[torch.Tensor, list[int]]], float]:
    """Launch ``all_reduce(w * bucket)`` per bucket as it fills; return the sums and ``Σ w``."""
    total = torch.tensor([weight], dtype=torch.float64, device=_comm_device(group))
    total_work = dist.all_reduce(total, group=group, async_op=True)
    pending = []
    for members in _fill_buckets(tensors, bucket_bytes):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in members])
        if weight == 0:
            flat.zero_()
        elif weight != 1:
            flat.mul_(weight)
        pending.append((dist.all_reduce(flat, group=group, async_op=True), flat, members))
    total_work.wait()
    for work, _, _ in pending:
        work.wait()
    return [(flat, members) for _, flat, members in pending], float(total.item())


def _divide(
    reduced: list[tuple[torch.Tensor, list[int]]], total: float, like: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Divide each summed bucket by ``total`` and cut it into tensors shaped as ``like``."""
    out: list[torch.Tensor | None] = [None] * len(like)
    for flat, members in reduced:
        flat.div_(total)
        offset = 0
        for i in members:
            n = like[i].numel()
            out[i] = flat[offset : offset + n].view(like[i].shape)
            offset += n
    return out  # type: ignore[return-value]


_ZERO_WEIGHT = (
    "fmaml.distributed.{where}: the weights of all ranks add up to 0, so there is nothing to "
    "average; give the ranks that hold data a positive `weight` (e.g. their number of tasks)."
)


def _check_grads(grads: object, where: str) -> tuple[list[Any], list[torch.Tensor]]:
    if not isinstance(grads, Mapping):
        raise TypeError(
            f"fmaml.distributed.{where}: `grads` must be a dict {{name: tensor}}, got "
            f"{type(grads).__name__}."
        )
    for name, g in grads.items():
        if not isinstance(g, torch.Tensor) or not (g.is_floating_point() or g.is_complex()):
            raise TypeError(
                f"fmaml.distributed.{where}: grads[{name!r}] must be a floating-point tensor, "
                f"got {describe_leaf(g)}."
            )
        if g.layout != torch.strided:
            raise TypeError(
                f"fmaml.distributed.{where}: grads[{name!r}] has layout {g.layout}; only dense "
                "tensors are supported (call .to_dense())."
            )
    return list(grads), list(grads.values())


def _check_weight(weight: object, where: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise TypeError(
            f"fmaml.distributed.{where}: `weight` must be a number >= 0 (e.g. this rank's task "
            f"count), got {weight!r}."
        )
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(
            f"fmaml.distributed.{where}: `weight` must be finite and >= 0, got {weight!r}."
        )
    return float(weight)


def _check_bucket_bytes(bucket_bytes: object, where: str) -> None:
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(
            f"fmaml.distributed.{where}: `bucket_bytes` must be an int >= 1, got {bucket_bytes!r}."
        )


# --------------------------------------------------------------------------------------------
# keeping the ranks identical


def _named_tensors(params: Any, owner: str) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a parameter dict, or of a module's parameters and buffers."""
    if isinstance(params, nn.Module):
        return [*params.named_parameters(), *params.named_buffers()]
    if isinstance(params, Mapping):
        return list(params.items())
    raise TypeError(
        f"fmaml.distributed.{owner}: `params` must be a dict {{name: tensor}} or a "
        f"torch.nn.Module, got {type(params).__name__}."
    )


def broadcast_params(
    params: Mapping[str, torch.Tensor] | nn.Module,
    src: int = 0,
    *,
    bucket_bytes: int = BUCKET_BYTES,
    group: Any = None,
) -> Mapping[str, torch.Tensor] | nn.Module:
    """Copy rank ``src``'s parameters into every rank's, in place (bucketed broadcasts).

    Call it once at the start, after building the model and before the optimizer's first step,
    so that every rank starts from the same point whatever its random initialisation. In place
    (``tensor.copy_``), so optimizers holding the tensors see the new values. A module's
    buffers (BatchNorm statistics) are broadcast too.

    Args:
        params: ``{name: tensor}`` (e.g. ``fmaml.params(model)``) or a module.
        src: the rank whose values win.
        bucket_bytes, group: as :func:`all_reduce_mean`.

    Returns:
        ``params``, now identical on every rank.
    """
    named = _named_tensors(params, "broadcast_params")
    _check_bucket_bytes(bucket_bytes, "broadcast_params")
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"fmaml.distributed.broadcast_params: params[{name!r}] must be a tensor, got "
                f"{describe_leaf(t)}."
            )
    world = _world(group)
    if world == 1:
        return params
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < world:
        raise ValueError(
            f"fmaml.distributed.broadcast_params: `src` must be a rank in [0, {world}), got "
            f"{src!r}."
        )
    tensors = [t for _, t in named]
    pending = []
    for members in _fill_buckets(tensors, bucket_bytes):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in members])
        pending.append((dist.broadcast(flat, src, group=group, async_op=True), flat, members))
    with torch.no_grad():
        for work, flat, members in pending:
            work.wait()
            offset = 0
            for i in members:
                n = tensors[i].numel()
                tensors[i].copy_(flat[offset : offset + n].view(tensors[i].shape))
                offset += n
    return params


def check_in_sync(
    params: Mapping[str, torch.Tensor] | nn.Module, *, atol: float = 0.0, group: Any = None
) -> None:
    """Raise ``RuntimeError`` if the parameters differ across ranks; cheap (two small gathers).

    Each rank reduces every tensor to two float64 checksums, ``Σ x`` and ``Σ x²``; the ranks
    all-gather them (and a hash of the names, shapes and dtypes) and compare with rank 0. Every
    rank raises the same error, naming the ranks that differ and the first parameter that
    drifted. NaNs compare equal to NaNs. A no-op in a single process.

    Args:
        params: ``{name: tensor}`` or a module (its parameters and buffers); any dict of tensors
            works, e.g. the meta-batch's leaves, to check that every rank sampled the same tasks.
        atol: the largest difference of a checksum that still counts as equal (0: identical,
            which the same all-reduced gradient and the same optimizer step give).
        group: the process group.

    Example:
        >>> if step % 100 == 0:  # doctest: +SKIP
        ...     fmaml.distributed.check_in_sync(params)
    """
    named = _named_tensors(params, "check_in_sync")
    if isinstance(atol, bool) or not isinstance(atol, int | float) or not atol >= 0:
        raise ValueError(f"fmaml.distributed.check_in_sync: `atol` must be >= 0, got {atol!r}.")
    world = _world(group)
    if world == 1:
        return
    device = _comm_device(group)
    layout = [(str(n), tuple(t.shape), str(t.dtype)) for n, t in named]
    digest = hashlib.sha256(repr(layout).encode()).digest()
    mine = torch.tensor([int.from_bytes(digest[:7], "little")], dtype=torch.int64, device=device)
    hashes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(hashes, mine, group=group)
    if any(int(h) != int(hashes[0]) for h in hashes):
        layouts: list[Any] = [None] * world
        dist.all_gather_object(layouts, layout, group=group)
        raise RuntimeError(_layout_message(layouts))
    with torch.no_grad():
        sums = [
            torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
            for _, t in named
        ]
        mine_sums = (torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.float64)).to(
            device
        )
    gathered = [torch.empty_like(mine_sums) for _ in range(world)]
    dist.all_gather(gathered, mine_sums, group=group)
    ref = gathered[0].cpu()
    drifted: dict[int, int] = {}
    for r in range(1, world):
        other = gathered[r].cpu()
        same = (other == ref) | (other.isnan() & ref.isnan()) | ((other - ref).abs() <= atol)
        bad = (~same).any(dim=1).nonzero()
        if len(bad):
            drifted[r] = int(bad[0])
    if drifted:
        first_rank, index = next(iter(drifted.items()))
        name = named[index][0]
        a, b = ref[index].tolist(), gathered[first_rank][index].cpu().tolist()
        values = f"Σx {a[0]!r} vs {b[0]!r}, Σx² {a[1]!r} vs {b[1]!r}"
        raise RuntimeError(
            f"fmaml.distributed.check_in_sync: the parameters differ across ranks: rank(s) "
            f"{sorted(drifted)} differ from rank 0 (in sync with rank 0: "
            f"{[r for r in range(world) if r not in drifted]}); rank {first_rank} first at "
            f"{name!r} ({values}; atol={atol}). Start with broadcast_params, and look for "
            "rank-dependent updates (a different seed, optimizer or gradient on some rank)."
        )


def _layout_message(layouts: list[list[tuple[str, tuple[int, ...], str]]]) -> str:
    ref = {name: rest for name, *rest in layouts[0]}
    parts = []
    for r, layout in enumerate(layouts[1:], start=1):
        other = {name: rest for name, *rest in layout}
        if other == ref and list(other) == list(ref):
            continue
        missing = [n for n in ref if n not in other]
        extra = [n for n in other if n not in ref]
        changed = [
            f"{n!r} {tuple(ref[n][0])} {ref[n][1]} vs {tuple(other[n][0])} {other[n][1]}"
            for n in ref
            if n in other and ref[n] != other[n]
        ]
        detail = []
        if missing:
            detail.append(f"missing {missing}")
        if extra:
            detail.append(f"unexpected {extra}")
        if changed:
            detail.append("shape/dtype " + ", ".join(changed[:3]))
        parts.append(f"rank {r}: " + ("; ".join(detail) or "a different order"))
    return (
        "fmaml.distributed.check_in_sync: the ranks hold different sets of parameters (names, "
        "shapes or dtypes), compared with rank 0: " + " | ".join(parts) + ". Every rank must "
        "build the same model."
    )


def check_same_config(config: Mapping[str, Any], *, group: Any = None) -> None:
    """Raise ``ValueError`` on every rank if the ranks were started with different configs.

    Each rank canonicalises ``config`` (JSON, keys sorted; values that JSON cannot hold are
    compared by ``str``), the ranks all-gather it, and every rank raises the same error listing
    each differing key with every rank's value. Call it once at the start, with everything
    that must agree (``k``, checkpoint policy, inner and outer learning rates, meta-batch size,
    seed, model); leave out what may differ (the rank, the host). A no-op in a single process.

    Example:
        >>> fmaml.distributed.check_same_config({"k": 5, "policy": "auto", "meta_batch": 16})
    """
    if not isinstance(config, Mapping):
        raise TypeError(
            "fmaml.distributed.check_same_config: `config` must be a dict, got "
            f"{type(config).__name__}."
        )
    canonical = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    world = _world(group)
    if world == 1:
        return
    texts: list[Any] = [None] * world
    dist.all_gather_object(texts, canonical, group=group)
    if all(t == texts[0] for t in texts):
        return
    configs = [json.loads(t) for t in texts]
    keys = sorted({k for c in configs for k in c})
    missing = object()
    lines = []
    for key in keys:
        values = [c.get(key, missing) for c in configs]
        if any(v != values[0] for v in values):
            shown = ", ".join(
                f"rank {r}: {'<missing>' if v is missing else json.dumps(v)}"
                for r, v in enumerate(values)
            )
            lines.append(f"{key!r} ({shown})")
    raise ValueError(
        "fmaml.distributed.check_same_config: the ranks were started with different "
        f"configurations; differing keys: {'; '.join(lines)}. Launch every rank with the same "
        "arguments."
    )


def any_rank(flag: object, *, group: Any = None) -> bool:
    """Whether ``flag`` is true on any rank: a decision every rank takes together.

    Use it for whatever can differ between ranks and must not: a signal that reached only some
    of them, a wall-clock time budget (each rank reads its own clock), a file that appeared.
    If one rank stopped alone, the others would wait in their next collective until the
    timeout. One tiny all-reduce (max); ``bool(flag)`` in a single process.

    Example:
        >>> if fmaml.distributed.any_rank(elapsed >= budget):  # doctest: +SKIP
        ...     break  # every rank leaves the loop at the same iteration
    """
    mine = bool(flag)
    if _world(group) == 1:
        return mine
    t = torch.tensor([int(mine)], dtype=torch.int32, device=_comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def gather_shards(local: torch.Tensor, n: int, *, group: Any = None) -> torch.Tensor:
    """The ``(n, ...)`` per-task results of all ranks, in task order: the inverse of :func:`shard`.

    Rank ``r`` passes its results for the tasks ``start:stop`` of ``shard_bounds(n, r, N)``
    (leading size ``stop - start``, possibly 0; the same trailing shape and dtype on every
    rank); every rank gets all ``n`` in task order. For sharded evaluations that need every
    task's value (a confidence interval), not just the mean (:func:`all_reduce_mean`). One
    all-gather of the largest share, padded. ``local`` itself in a single process.

    Example:
        >>> losses = evaluate_each(params, ctx.shard(eval_tasks))  # doctest: +SKIP
        >>> losses = fmaml.distributed.gather_shards(losses, n_eval)  # doctest: +SKIP
    """
    world = _world(group)
    rank = dist.get_rank(group) if world > 1 else 0
    start, stop = _bounds(n, rank, world, "gather_shards")
    if not isinstance(local, torch.Tensor) or local.dim() == 0 or local.shape[0] != stop - start:
        raise ValueError(
            f"fmaml.distributed.gather_shards: rank {rank} of {world} holds tasks {start}:{stop} "
            f"of n={n}, so `local` needs a leading size of {stop - start}; got "
            f"{describe_leaf(local)}."
        )
    if world == 1 or n == 0:
        return local
    bounds = [_bounds(n, r, world, "gather_shards") for r in range(world)]
    size = bounds[0][1] - bounds[0][0]  # the first share is the largest
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: stop - start] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[: b - a] for part, (a, b) in zip(parts, bounds, strict=True)])


# --------------------------------------------------------------------------------------------
# failing together


@contextmanager
def fail_together() -> Iterator[None]:
    """On an exception in the body, make every rank stop with an error naming the failing rank.

    The failing rank records ``"rank R: ExcType: message"`` in the process group's store,
    aborts the process group and re-raises. Aborting closes its connections, so the other ranks
    fail at once in their next (or current) collective instead of waiting for the timeout;
    in *their* ``fail_together`` they read the store, abort too, wait one second and raise
    ``RuntimeError("... rank 0 of 2 stopped because rank 1 failed: ValueError: ...")`` from the
    collective's error. The wait lets the launcher see the failing rank exit first, so that
    torchrun's summary names it as the root cause (it terminates the waiting ranks). Without a
    process group it only re-raises. ``with setup() as ctx:`` does the same.

    The other mechanisms, which need no cooperation from the failing rank: torchrun (and
    ``torch.multiprocessing.spawn``) terminate the remaining ranks as soon as one exits with an
    error; and the process group's timeout (:func:`setup`'s ``timeout_s``) turns a collective
    that a dead or stuck peer never joins into an error.

    Example:
        >>> with fmaml.distributed.fail_together():  # doctest: +SKIP
        ...     train(ctx)
    """
    try:
        yield
    except Exception as exc:
        _fail(exc)
        raise


def _fail(exc: Exception) -> None:
    """Record ``exc`` in the store (first failure wins), abort, and raise what to raise."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = dist.get_backend()
    store = _store()
    _KEEP_ALIVE.append(store)  # if this rank hosts the store, keep serving it until exit
    mine = f"rank {rank}: {type(exc).__name__}: {exc}"[:2000]
    first = mine
    if store is not None:
        try:
            store.set_timeout(datetime.timedelta(seconds=5))
            first = store.compare_set(_FAILED_KEY, "", mine).decode()
        except Exception:  # the store's host may be gone already
            first = mine
    if first == mine:
        why = f"{type(exc).__name__}: {exc}"[:300]
    else:
        why = f"{first.split(':', 1)[0]} failed first"
    print(
        f"fmaml.distributed: rank {rank} of {world} stopping ({why}); aborting the process "
        "group so that the other ranks stop too.",
        file=sys.stderr,
        flush=True,
    )
    try:
        if backend == "nccl":
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception:
        pass
    if first != mine:
        # Let the launcher see the failing rank exit first: torchrun names the first failure it
        # observes as the root cause, and terminates this rank during the wait.
        time.sleep(_GRACE_S)
        raise RuntimeError(
            f"fmaml.distributed: rank {rank} of {world} stopped because {first.split(':', 1)[0]}"
            f" failed: {first.split(': ', 1)[1]}"
        ) from exc


_KEEP_ALIVE: list[Any] = []


def _store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# the data-parallel meta-gradient


def distributed_meta_grad(
    maml: Any,
    params: Params,
    tasks: Tasks,
    k: int,
    ctx: Context | None = None,
    *,
    per_step: bool = False,
    bucket_bytes: int = BUCKET_BYTES,
    group: Any = None,
) -> tuple[torch.Tensor, Params]:
    """``maml.meta_grad(params, tasks, k)`` over all ``T`` tasks, computed by all the ranks.

    Rank ``r`` takes its share of ``n_r`` tasks (:func:`shard`), computes its mean meta-loss and
    meta-gradient with ``maml.meta_grad``, and the ranks average them weighted by task count
    (:func:`all_reduce_mean` with ``weight=n_r``)::

        (loss, g) = Σ_r n_r (loss_r, g_r) / T

    which is the single-process ``maml.meta_grad(params, tasks, k)`` up to the summation order.
    A rank without tasks (``T < world_size``) contributes nothing.

    Args:
        maml: an :class:`fmaml.MAML`.
        params: ``{name: tensor}``, identical on every rank (:func:`broadcast_params`).
        tasks: the *full* meta-batch, identical on every rank (sample it from a seed shared by
            all ranks); leaves ``(T, ...)``.
        k: the number of inner steps.
        ctx: the :class:`Context` from :func:`setup` (default: the default process group's
            rank and size, or one process).
        per_step: as :meth:`fmaml.MAML.meta_grad`.
        bucket_bytes, group: as :func:`all_reduce_mean`.

    Returns:
        ``(meta-loss, meta-gradient)``, identical on every rank.

    Example:
        >>> dmg = fmaml.distributed.distributed_meta_grad
        >>> loss, grads = dmg(maml, params, tasks, 5, ctx)  # doctest: +SKIP
    """
    n_tasks = _n_tasks(tasks, "distributed_meta_grad")
    if ctx is None:
        world = _world(group)
        rank = dist.get_rank(group) if world > 1 else 0
    elif isinstance(ctx, Context):
        rank, world = ctx.rank, ctx.world_size
    else:
        raise TypeError(
            "fmaml.distributed.distributed_meta_grad: `ctx` must be the Context from setup() or "
            f"None, got {type(ctx).__name__}."
        )
    _check_bucket_bytes(bucket_bytes, "distributed_meta_grad")
    if world == 1:
        return maml.meta_grad(params, tasks, k, per_step=per_step)
    local = shard(tasks, rank, world)
    n_local = _n_tasks(local, "distributed_meta_grad")
    if n_local:
        loss, grads = maml.meta_grad(params, local, k, per_step=per_step)
    else:
        maml._check_params(params, "meta_grad")
        loss = None
        grads = {name: torch.zeros_like(p).detach() for name, p in params.items()}
    # The loss travels with the gradients, in float64 so every rank packs the same buckets.
    dtype = next(iter(params.values())).dtype if params else torch.float64
    loss64 = (
        loss.detach().reshape(1).to(torch.float64)
        if loss is not None
        else torch.zeros(1, dtype=torch.float64, device=_param_device(params))
    )
    names, tensors = list(grads), [*grads.values(), loss64]
    reduced, total = _all_reduce_weighted(tensors, float(n_local), bucket_bytes, group)
    if total != n_tasks:
        raise RuntimeError(
            f"fmaml.distributed.distributed_meta_grad: the ranks hold different meta-batches: "
            f"rank {rank} has T={n_tasks} tasks, but the shards of all ranks add up to "
            f"{total:g}. Give every rank the same full meta-batch (sample it from the same seed)."
        )
    *grad_list, loss_sum = _divide(reduced, total, tensors)
    loss_out = loss_sum.reshape(()).to(loss.dtype if loss is not None else dtype)
    return loss_out, dict(zip(names, grad_list, strict=True))


def _param_device(params: Params) -> torch.device:
    for p in params.values():
        return p.device
    return torch.device("cpu")
