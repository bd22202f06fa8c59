"""Sinusoid regression tasks, the toy benchmark of MAML (Finn et al., 2017).

Each task is ``y = A sin(x - φ)`` with amplitude ``A`` and phase ``φ`` drawn uniformly per task
and inputs ``x`` drawn uniformly per point; the support and query points of a task share ``A, φ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fmaml._typing import Tasks

__all__ = ["SinusoidMeta", "SinusoidTasks", "true_function"]


class SinusoidMeta(NamedTuple):
    """The hidden parameters of a batch of sinusoid tasks, for plotting and checks.

    Attributes:
        amplitude: ``A`` per task, shape ``(T,)``.
        phase: ``φ`` per task, shape ``(T,)``.
    """

    amplitude: torch.Tensor
    phase: torch.Tensor


def true_function(
    amplitude: torch.Tensor | float, phase: torch.Tensor | float, x: torch.Tensor
) -> torch.Tensor:
    """The task's function ``y = A sin(x - φ)``.

    Args:
        amplitude: ``A``, a number or a tensor of shape ``(T,)`` (one per task).
        phase: ``φ``, like ``amplitude``.
        x: the inputs; with per-task ``amplitude``/``phase`` of shape ``(T,)`` its leading
            dimension is the task, e.g. ``(T, K, 1)``; the parameters broadcast over the rest.

    Returns:
        ``A sin(x - φ)``, shaped like ``x``.

    Example:
        >>> true_function(2.0, 0.0, torch.tensor([math.pi / 2]))
        tensor([2.])
    """
    return _per_task(amplitude, x) * torch.sin(x - _per_task(phase, x))


def _per_task(value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """``value`` of shape ``(T, ...)`` with singleton dims appended to broadcast against ``x``."""
    if not isinstance(value, torch.Tensor) or value.dim() >= x.dim():
        return value
    return value.reshape(value.shape + (1,) * (x.dim() - value.dim()))


@dataclass(frozen=True)
class SinusoidTasks:
    """The sinusoid regression task distribution of Finn et al. (2017).

    ``A ~ U(amplitude)``, ``φ ~ U(phase)`` per task, ``x ~ U(x_range)`` per point, and
    ``y = A sin(x - φ)`` without noise.

    Args:
        amplitude: ``(low, high)`` of the amplitude ``A``.
        phase: ``(low, high)`` of the phase ``φ``.
        x_range: ``(low, high)`` of the inputs ``x``.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> tasks, meta = SinusoidTasks().sample(25, 10, 10, gen)
        >>> xs, ys = tasks.support
        >>> xs.shape, ys.shape, meta.amplitude.shape
        (torch.Size([25, 10, 1]), torch.Size([25, 10, 1]), torch.Size([25]))

    References:
        Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
        Networks", ICML 2017, section 5.1.
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        for name in ("amplitude", "phase", "x_range"):
            object.__setattr__(self, name, _check_range(name, getattr(self, name)))

    def sample(
        self,
        n_tasks: int,
        k_support: int,
        k_query: int,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tasks, SinusoidMeta]:
        """Draw ``n_tasks`` tasks with ``k_support`` support and ``k_query`` query points each.

        The numbers are drawn in float64 from ``generator`` (amplitudes, then phases, then all
        inputs) and then cast to ``dtype``, so one generator state gives the same tasks in any
        dtype, up to rounding; ``y`` is computed in ``dtype`` from the cast values, so
        ``y == true_function(meta.amplitude, meta.phase, x)`` holds exactly.

        Args:
            n_tasks: the number of tasks ``T`` (>= 1).
            k_support: support points per task ``K`` (>= 1).
            k_query: query points per task ``M`` (>= 1).
            generator: the source of randomness; tensors are created on its device.
            dtype: a floating dtype for ``x``, ``y`` and the metadata.

        Returns:
            ``(tasks, meta)``: ``tasks.support = (x, y)`` with ``x, y`` of shape ``(T, K, 1)``,
            ``tasks.query`` likewise with ``(T, M, 1)``; ``meta`` the amplitude and phase per task.
        """
        for name, value in (("n_tasks", n_tasks), ("k_support", k_support), ("k_query", k_query)):
            _check_count(name, value)
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                "SinusoidTasks.sample: `generator` must be a torch.Generator, got "
                f"{type(generator).__name__}; pass e.g. torch.Generator().manual_seed(0)."
            )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(
                f"SinusoidTasks.sample: `dtype` must be a floating torch.dtype, got {dtype!r}."
            )

        def uniform(shape: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
            u = torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)
            return (bounds[0] + (bounds[1] - bounds[0]) * u).to(dtype)

        amplitude = uniform((n_tasks,), self.amplitude)
        phase = uniform((n_tasks,), self.phase)
        x = uniform((n_tasks, k_support + k_query, 1), self.x_range)
        y = true_function(amplitude, phase, x)
        tasks = Tasks(
            support=(x[:, :k_support], y[:, :k_support]),
            query=(x[:, k_support:], y[:, k_support:]),
        )
        return tasks, SinusoidMeta(amplitude, phase)


def _check_range(name: str, value: object) -> tuple[float, float]:
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not all(math.isfinite(v) for v in value):
        raise ValueError(
            f"SinusoidTasks: `{name}` must be a pair of finite numbers (low, high), got {value!r}."
        )
    low, high = float(value[0]), float(value[1])
    if low > high:
        raise ValueError(
            f"SinusoidTasks: `{name}` must be ordered (low, high) with low <= high, got "
            f"{value!r}; swap the bounds: ({high}, {low})."
        )
    return (low, high)


def _check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"SinusoidTasks.sample: `{name}` must be an int >= 1, got {value!r}.")
