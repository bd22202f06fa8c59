"""``fmaml train sinusoid``: the regression benchmark of MAML (Finn et al., 2017, section 5.1).

Tasks ``y = A sin(x - φ)``, ``A ~ U[0.1, 5]``, ``φ ~ U[0, π]``, ``x ~ U[-5, 5]``
(:class:`fmaml.data.SinusoidTasks`); an MLP 1-40-40-1 with ReLU; the mean squared error on
``K`` support points. Evaluation: the query MSE of 1,000 held-out tasks (a fixed evaluation
seed, distinct from any training seed) after 0, 1 and 10 inner steps, mean ± 1.96 std/sqrt(n).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fmaml
from fmaml._typing import Params, Tasks
from fmaml.app.evaluation import evaluate_steps, interval
from fmaml.app.files import atomic_write
from fmaml.data import SinusoidTasks, true_function

__all__ = ["DEFAULTS", "SinusoidJob", "build_model"]

#: The defaults of ``fmaml train sinusoid``: about two minutes on one core of a 2-core CPU.
DEFAULTS: dict[str, Any] = {
    "iterations": 25_000,
    "time_budget": None,
    "meta_batch": 25,
    "meta_lr": 1e-3,
    "inner_steps": 1,
    "inner_lr": 0.01,
    "first_order": False,
    "checkpoint": "auto",
    "batching": "auto",
    "compile": "auto",
    "eval_steps": [0, 1, 10],
    "eval_inner_lr": None,
    "eval_tasks": 1000,
    "eval_seed": 20170,
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "save_every": 1000,
    "log_every": 100,
    "width": 40,
    "k_shot": 10,
    "k_query": 10,
    "eval_query": 100,
}

#: Tasks shown in ``adaptation.png``.
PLOTTED_TASKS = 4


def build_model(config: dict[str, Any]) -> nn.Module:
    """The MLP ``1 - width - width - 1`` with ReLU (``config["width"]``, 40 in the paper)."""
    w = config["width"]
    return nn.Sequential(nn.Linear(1, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 1))


class SinusoidJob:
    """The sinusoid benchmark for :func:`fmaml.app.loop.train`."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.tasks = SinusoidTasks()

    def describe(self) -> str:
        c = self.config
        return (
            f"sinusoid regression, {c['k_shot']}-shot, MLP 1-{c['width']}-{c['width']}-1 ReLU, "
            f"meta-batch {c['meta_batch']}, {c['inner_steps']} inner step(s) of lr "
            f"{c['inner_lr']}, Adam {c['meta_lr']}"
        )

    def build_model(self) -> nn.Module:
        return build_model(self.config)

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)

    def sample(self, generator: torch.Generator) -> Tasks:
        c = self.config
        tasks, _ = self.tasks.sample(c["meta_batch"], c["k_shot"], c["k_query"], generator)
        return tasks

    def _eval_tasks(self) -> tuple[Tasks, Any]:
        c = self.config
        gen = torch.Generator().manual_seed(c["eval_seed"])
        return self.tasks.sample(c["eval_tasks"], c["k_shot"], c["eval_query"], gen)

    def _eval_maml(self, model: nn.Module) -> fmaml.MAML:
        c = self.config
        return fmaml.MAML(model, self.loss_fn, inner_lr=c["eval_inner_lr"], batching="vmap")

    def evaluate(self, model: nn.Module, params: Params) -> dict[str, Any]:
        c = self.config
        tasks, _ = self._eval_tasks()
        device = next(iter(params.values())).device
        tasks = Tasks(*(tuple(t.to(device) for t in part) for part in tasks))
        maml = self._eval_maml(model)
        mse = evaluate_steps(maml, params, tasks, c["eval_steps"], maml.loss, chunk=1000)
        return {
            "metric": "query MSE",
            "splits": {
                "held_out": {
                    "description": (
                        f"{c['eval_tasks']} held-out tasks (eval seed {c['eval_seed']}), "
                        f"{c['k_shot']} support and {c['eval_query']} query points each, inner "
                        f"lr {c['eval_inner_lr']}"
                    ),
                    "steps": {str(k): interval(mse[:, i]) for i, k in enumerate(c["eval_steps"])},
                }
            },
        }

    def summary(self, evaluation: dict[str, Any]) -> list[str]:
        c = self.config
        split = evaluation["splits"]["held_out"]
        lines = [
            f"sinusoid {c['k_shot']}-shot: query MSE on {c['eval_tasks']} held-out tasks "
            "(mean ± 95% interval)"
        ]
        for k, stats in split["steps"].items():
            label = f"{k} step{'' if k == '1' else 's'}:"
            if stats["n"] == 0:
                line = f"  {label:<10}diverged (inf/nan) on every task"
            else:
                line = f"  {label:<10}{stats['mean']:.4f} ± {stats['ci95']:.4f}"
            if stats["nonfinite"] and stats["n"]:
                total = stats["n"] + stats["nonfinite"]
                line += f"  ({stats['nonfinite']} of {total} tasks diverged to inf/nan: left out)"
            lines.append(line)
        return lines

    def plot(self, run_dir: Path, model: nn.Module, params: Params) -> list[str]:
        """``adaptation.png``: a few held-out tasks, the truth and the adapted predictions."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        c = self.config
        tasks, meta = self._eval_tasks()
        device = next(iter(params.values())).device
        maml = self._eval_maml(model)
        xs = torch.linspace(-5, 5, 200).reshape(-1, 1)
        steps = sorted(set(c["eval_steps"]))
        n = min(PLOTTED_TASKS, c["eval_tasks"])
        fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4), dpi=100, squeeze=False)
        axes = axes[0]
        for t, ax in enumerate(axes):
            support = (tasks.support[0][t].to(device), tasks.support[1][t].to(device))
            p, done = {n: v.detach() for n, v in params.items()}, 0
            ax.plot(
                xs,
                true_function(meta.amplitude[t], meta.phase[t], xs),
                "k-",
                lw=2,
                label="true function",
            )
            for k in steps:
                for _ in range(k - done):
                    p = maml.inner_step(p, support)
                done = k
                with torch.no_grad():
                    y = torch.func.functional_call(model, p, (xs.to(device),)).cpu()
                ax.plot(xs, y, "--", lw=1.3, label=f"after {k} step{'' if k == 1 else 's'}")
            ax.plot(support[0].cpu(), support[1].cpu(), "^", color="C3", ms=6, label="support")
            ax.set_title(f"A={float(meta.amplitude[t]):.2f}, φ={float(meta.phase[t]):.2f}")
            ax.set_xlabel("x")
        axes[0].legend(fontsize=7, loc="lower left")
        fig.suptitle(f"MAML, {c['k_shot']}-shot sinusoid regression: held-out tasks")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        atomic_write(run_dir / "adaptation.png", buffer.getvalue())
        return ["adaptation.png"]
