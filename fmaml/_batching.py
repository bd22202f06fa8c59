"""How MAML batches its tasks: one at a time, all in one ``vmap``, or ``vmap`` in chunks.

``batching="auto"`` (the default) measures one task once per shape: the graph its inner step
saves, the graph its query loss saves, and its parameters (``fmaml._footprint``). Then:

- **loop** on the CPU when the tensors those graphs save are large on average (more than
  ``LARGE_TENSOR_BYTES``, 256 KiB, parameters included): each operation then has enough work of
  its own, and ``vmap``'s batched operations (``bmm``, grouped convolutions with per-task
  weights) are slower on the CPU than the same work in a loop, while holding every task's graphs
  at once. Measured on a 2-core CPU (``python -m benchmarks.batching``): the loop is 1.2x-1.9x
  faster for a conv4 with 64 filters on 75 query images, and 1.2x-1.5x for an MLP on 1,000
  points; ``vmap`` is 1.3x-5x faster for small MLPs and small conv nets.
- **vmap** otherwise (always on a GPU, where one batched kernel beats many small launches), in
  chunks of ``c`` tasks with ``c = memory_budget // per_task`` (every task when they fit), where
  ``per_task`` is the query graph plus the inner loop's graphs or the checkpoint budget,
  whichever is smaller.

``memory_budget`` defaults to 1 GiB on the CPU and half the free memory of a CUDA device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LARGE_TENSOR_BYTES", "Batching", "TaskFootprint", "choose", "default_budget"]

#: Mean saved-tensor size above which the CPU runs tasks in a loop.
LARGE_TENSOR_BYTES = 256 * 2**10
#: Default ``memory_budget`` of a meta-step's chunk of tasks on the CPU.
CPU_BUDGET_BYTES = 2**30


@dataclass(frozen=True)
class TaskFootprint:
    """What one task's meta-loss holds, measured on its first inner step and its query loss.

    Attributes:
        step_bytes: the graph of one inner step, beyond its inputs.
        query_bytes: the graph of the query loss, beyond its inputs.
        carry_bytes: the inner loop's carry (adapted parameters and optimizer state).
        param_bytes: all parameters.
        tensors: how many tensors the two graphs save, plus the parameter tensors.
    """

    step_bytes: int
    query_bytes: int
    carry_bytes: int
    param_bytes: int
    tensors: int

    @property
    def mean_tensor_bytes(self) -> float:
        """The average size of a tensor the task's graphs save (parameters included)."""
        total = self.step_bytes + self.query_bytes + self.param_bytes
        return total / max(self.tensors, 1)

    def per_task_bytes(self, k: int, checkpoint_budget: int) -> int:
        """Bytes one task holds at once: its query graph and its inner loop's graphs (or the
        checkpoint budget, when they do not fit it)."""
        unroll = k * (self.step_bytes + self.carry_bytes)
        return self.query_bytes + min(unroll, checkpoint_budget)


@dataclass(frozen=True)
class Batching:
    """How the tasks of one call run: ``mode`` ``"loop"`` or ``"vmap"``, ``chunk`` tasks per
    ``vmap`` (None: all at once), why, and the task's measured ``footprint`` (if any)."""

    mode: str
    chunk: int | None
    reason: str
    footprint: TaskFootprint | None = None

    def chunks(self, n_tasks: int) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` covering ``n_tasks`` tasks."""
        size = 1 if self.mode == "loop" else (self.chunk or n_tasks)
        return [(s, min(s + size, n_tasks)) for s in range(0, n_tasks, size)]


def default_budget(device: torch.device) -> int:
    """The default ``memory_budget``: 1 GiB on the CPU, half the free memory of a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(free // 2, 1)
    return CPU_BUDGET_BYTES


def choose(
    footprint: TaskFootprint,
    n_tasks: int,
    k: int,
    device: torch.device,
    budget: int,
    checkpoint_budget: int,
) -> Batching:
    """The automatic rule (see the module docstring)."""
    mean = footprint.mean_tensor_bytes
    if device.type == "cpu" and mean > LARGE_TENSOR_BYTES:
        why = f"CPU, large operations (mean saved tensor {_mib(mean)} > 0.25 MiB)"
        return Batching("loop", None, why, footprint)
    per_task = max(footprint.per_task_bytes(k, checkpoint_budget), 1)
    chunk = max(1, min(n_tasks, budget // per_task))
    why = (
        f"{device.type.upper()}, {'small operations' if device.type == 'cpu' else 'GPU'}; "
        f"{_mib(per_task)} per task, budget {_mib(budget)}"
    )
    if chunk >= n_tasks:
        return Batching("vmap", None, why, footprint)
    if chunk == 1:
        return Batching("loop", None, why + ": one task at a time", footprint)
    return Batching("vmap", chunk, why + f": chunks of {chunk}", footprint)


def _mib(n: float) -> str:
    return f"{n / 2**20:.3g} MiB" if math.isfinite(n) else str(n)
