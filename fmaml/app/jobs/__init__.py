"""The training jobs of ``fmaml train``, one module per benchmark.

A job is what :func:`fmaml.app.loop.train` needs from a benchmark: the model, the loss, a task
sampler, the evaluation, the summary lines and the figures (:class:`Job`). Each module holds its
``DEFAULTS`` (the defaults of the command's options) and ``build_model(config)``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn

from fmaml._typing import Params, Tasks

__all__ = ["TASKS", "Job", "defaults", "module"]

#: The benchmarks of ``fmaml train``, each a module of this package.
TASKS = ("sinusoid", "omniglot")


class Job(Protocol):
    """What ``fmaml train`` needs from one benchmark (sinusoid regression, Omniglot)."""

    config: dict[str, Any]

    def describe(self) -> str:
        """One line: the benchmark, the model and the main hyperparameters."""

    def build_model(self) -> nn.Module:
        """A fresh model; its initial parameters come from torch's global RNG."""

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task loss, ``loss_fn(model(x), y) -> scalar``."""

    def sample(self, generator: torch.Generator) -> Tasks:
        """One meta-batch of training tasks, drawn from ``generator`` only."""

    def evaluate(self, model: nn.Module, params: Params) -> dict[str, Any]:
        """The final evaluation, as written to ``eval.json``."""

    def summary(self, evaluation: dict[str, Any]) -> list[str]:
        """The final lines printed for ``evaluation``."""

    def plot(self, run_dir: Path, model: nn.Module, params: Params) -> list[str]:
        """Task-specific figures in ``run_dir``; returns their file names."""


def module(task: str) -> ModuleType:
    """The module of the job ``task`` (imported on first use: Omniglot needs Pillow)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return importlib.import_module(f"fmaml.app.jobs.{task}")


def defaults(task: str) -> dict[str, Any]:
    """The defaults of ``fmaml train TASK``'s options."""
    return module(task).DEFAULTS
