"""The benchmark suite's workloads: a conv4 network and few-shot image tasks.

Every library in the suite (``benchmarks/_peers.py``) gets the same :class:`Workload`: the same
network (same initial weights), the same tasks, inner SGD learning rate, number of inner steps
and loss (``F.cross_entropy``, mean reduction), so that their meta-gradients are the same
computation and must agree.

The meta-loss is MAML's: ``mean_t L(θ_k^t; query_t)`` with ``θ_{i+1} = θ_i - lr ∇L(θ_i; support_t)``
and ``θ_0 = θ``; its exact (second-order) gradient with respect to ``θ`` is what every library
computes.

Workloads (``build(name, k)``):

- ``"A"`` long inner loops: conv4 with 64 filters, one 5-way task with 25 support and 75 query
  images (1x28x28), lr 0.01.
- ``"B"`` typical MAML: the same conv4, 16 tasks of 5-way 1-shot (5 support, 75 query), lr 0.4.
- ``"C"`` scaling: conv4 with 32 filters, one 5-way task with 10 support and 10 query images,
  lr 0.01.

The data are random images (a fixed generator) with labels ``0..ways-1``: the benchmark measures
memory and time, which do not depend on what the pixels show. The keyword arguments of
:func:`build` shrink a workload for the smoke test (``tests/test_benchmarks_smoke.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fmaml

__all__ = ["WORKLOADS", "Workload", "build", "conv4", "describe"]


@dataclass(frozen=True)
class Spec:
    """The sizes of a workload (everything but ``k``)."""

    filters: int
    tasks: int
    ways: int
    support: int  # images per task (not per class)
    query: int
    lr: float
    image: int = 28
    channels: int = 1


WORKLOADS: dict[str, Spec] = {
    "A": Spec(filters=64, tasks=1, ways=5, support=25, query=75, lr=0.01),
    "B": Spec(filters=64, tasks=16, ways=5, support=5, query=75, lr=0.4),
    "C": Spec(filters=32, tasks=1, ways=5, support=10, query=10, lr=0.01),
}


@dataclass
class Workload:
    """One benchmark problem: a model, its tasks and the inner loop.

    Attributes:
        name: ``"A"``, ``"B"`` or ``"C"``.
        model: the conv4 network (its parameters are the meta-parameters θ).
        tasks: :class:`fmaml.Tasks`, support ``(T, N, C, H, W)`` / ``(T, N)`` and query alike.
        k: inner SGD steps.
        lr: inner SGD learning rate.
        spec: the sizes it was built from.
    """

    name: str
    model: nn.Module
    tasks: fmaml.Tasks
    k: int
    lr: float
    spec: Spec

    @property
    def n_tasks(self) -> int:
        return int(self.tasks.support[0].shape[0])

    def task(self, t: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
        """Task ``t``'s ``(support, query)`` batches, each ``(x, y)`` without the task dimension."""
        (xs, ys), (xq, yq) = self.tasks
        return (xs[t], ys[t]), (xq[t], yq[t])

    def to(self, device: str | torch.device) -> Workload:
        """The same workload on ``device`` (model moved in place; tasks copied)."""
        self.model.to(device)
        tasks = fmaml.Tasks(*(tuple(t.to(device) for t in batch) for batch in self.tasks))
        return replace(self, tasks=tasks)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss every library uses: mean cross-entropy."""
    return F.cross_entropy(out, y)


def conv4(filters: int = 64, ways: int = 5, image: int = 28, channels: int = 1) -> nn.Module:
    """Finn et al.'s conv4 without batch norm: 4 x [conv 3x3 (padding 1), ReLU, maxpool 2], linear.

    With 28x28 inputs the feature map after four poolings is 1x1, so the head is
    ``Linear(filters, ways)``.
    """
    layers: list[nn.Module] = []
    c, size = channels, image
    for _ in range(4):
        layers += [nn.Conv2d(c, filters, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c, size = filters, size // 2
    if size < 1:
        raise ValueError(f"conv4: images of {image} pixels vanish after four 2x2 poolings.")
    layers += [nn.Flatten(), nn.Linear(filters * size * size, ways)]
    return nn.Sequential(*layers)


def build(
    name: str,
    k: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    **overrides: Any,
) -> Workload:
    """Workload ``name`` (``"A"``, ``"B"``, ``"C"``) with ``k`` inner steps.

    ``overrides`` replace fields of its :class:`Spec` (``filters``, ``tasks``, ``support``,
    ``query``, ``image``, ...), e.g. to build a toy version for a test.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; expected one of {sorted(WORKLOADS)}")
    spec = replace(WORKLOADS[name], **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = conv4(spec.filters, spec.ways, spec.image, spec.channels).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(
            (spec.tasks, n, spec.channels, spec.image, spec.image), generator=gen, dtype=dtype
        )
        y = torch.arange(n).remainder(spec.ways).repeat(spec.tasks, 1)  # balanced classes
        return x, y

    tasks = fmaml.Tasks(support=batch(spec.support), query=batch(spec.query))
    workload = Workload(name, model, tasks, int(k), spec.lr, spec)
    return workload.to(device) if str(device) != "cpu" else workload


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(name: str) -> str:
    """One line describing workload ``name``'s sizes."""
    s = WORKLOADS[name]
    model = conv4(s.filters, s.ways, s.image, s.channels)
    params = n_parameters(model)
    return (
        f"conv4 ({s.filters} filters, {params:,} parameters = {params * 4 / 2**20:.2f} MiB in "
        f"float32), {s.tasks} task{'s' if s.tasks > 1 else ''} of {s.ways}-way with "
        f"{s.support} support and {s.query} query images ({s.channels}x{s.image}x{s.image}), "
        f"inner SGD lr {s.lr}, exact second-order meta-gradient"
    )
