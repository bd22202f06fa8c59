"""Evaluation on held-out tasks: the metric after each number of inner steps, 95% intervals."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import vmap

import fmaml
from fmaml import distributed
from fmaml._typing import Params, Tasks

__all__ = ["evaluate_steps", "interval"]


def interval(values: torch.Tensor) -> dict[str, float | None]:
    """Mean and 95% normal interval half-width ``1.96 std / sqrt(n)`` of per-task values.

    Non-finite values (a task whose adaptation diverged) are left out of the statistics and
    counted in ``"nonfinite"``; ``n`` is the number of finite values (mean and interval are
    ``None`` when there are none).
    """
    v = values.detach().double().cpu().flatten()
    finite = v[torch.isfinite(v)]
    n = finite.numel()
    std = float(finite.std()) if n > 1 else 0.0
    return {
        "mean": float(finite.mean()) if n else None,
        "ci95": 1.96 * std / math.sqrt(n) if n else None,
        "std": std,
        "n": n,
        "nonfinite": v.numel() - n,
    }


def evaluate_steps(
    maml: fmaml.MAML,
    params: Params,
    tasks: Tasks,
    steps: Sequence[int],
    metric: Callable[[Params, Any], torch.Tensor],
    chunk: int,
) -> torch.Tensor:
    """``metric`` on each task's query set after each number of inner steps in ``steps``.

    The inner steps run once per task (``0 .. max(steps)``) and the metric is read off at each
    requested count. Tasks are vectorised ``chunk`` at a time or run one by one, as
    ``maml.batching_for`` says (``batching="auto"``: from the model and the device).

    Returns:
        ``(T, len(steps))`` values, detached.
    """
    wanted = sorted(set(steps))
    params = {name: p.detach() for name, p in params.items()}

    def one(support: Any, query: Any) -> torch.Tensor:
        p, done, out = params, 0, {}
        for k in wanted:
            for _ in range(k - done):
                p = maml.inner_step(p, support)
            p = {name: t.detach() for name, t in p.items()}
            done = k
            out[k] = metric(p, query)
        return torch.stack([out[k] for k in steps])

    n_tasks = tasks.query[0].shape[0]
    # under torchrun each rank evaluates its share of the tasks; all of them get every value
    world = distributed._world()
    rank = torch.distributed.get_rank() if world > 1 else 0
    first, last = distributed.shard_bounds(n_tasks, rank, world)
    parts = []
    loop = maml.batching_for(params, tasks, max(wanted)).mode == "loop"
    size = 1 if loop else chunk
    for start in range(first, last, size):
        stop = min(start + size, last)
        sup = _slice(tasks.support, start, stop)
        qry = _slice(tasks.query, start, stop)
        if loop:
            parts.append(one(_slice(sup, 0, None, True), _slice(qry, 0, None, True))[None])
        else:
            parts.append(vmap(one, randomness="different")(sup, qry))
    if not parts:  # a rank without tasks (fewer tasks than ranks)
        like = next(iter(params.values()))
        parts.append(like.new_empty(0, len(steps)))
    local = torch.cat(parts).detach()
    return distributed.gather_shards(local, n_tasks) if world > 1 else local


def _slice(tree: Any, start: int, stop: int | None, index: bool = False) -> Any:
    return tuple(t[start] if index else t[start:stop] for t in tree)
