"""fmaml's task loop against a hand-written ``torch.autograd`` loop (issue 12, item 5).

    bash scripts/dev python -m benchmarks.loop_overhead            # k = 5, 31 rounds
    bash scripts/dev python -m benchmarks.loop_overhead --k 1 --rounds 61

The sinusoid MLP 1-40-40-1, 16 tasks of 10 support and 10 query points, inner SGD lr 0.01. The
hand-written loop is what a user writes without a library: per task, ``k`` steps of
``torch.autograd.grad(..., create_graph=True)`` and ``p - lr * g`` through
``torch.func.functional_call``, then the query loss's ``.backward()``. fmaml runs
``MAML(batching="loop")`` through ``torch.func.grad(maml.unrolled_loss)``, ``.backward()`` and
``maml.meta_grad``.

The shared machine's speed drifts by 1.5x within minutes, more than the differences measured, so
each round times the hand-written loop, fmaml's three routes (in an order that rotates from round
to round) and the hand-written loop again, all in one process; a route's ratio in that round is
its CPU time over the mean of the two hand-written calls around it. Reported: each route's
median CPU time per call, and the median of its per-round ratios with their quartiles.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import fmaml


def routes(
    k: int, tasks_n: int = 16, lr: float = 0.01
) -> tuple[dict[str, Callable[[], object]], nn.Module]:
    """The hand-written loop and fmaml's three routes, each a call of one meta-gradient, and the
    module whose ``.grad`` the hand-written loop and ``.backward()`` fill."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    tasks, _ = fmaml.data.SinusoidTasks().sample(tasks_n, 10, 10, torch.Generator().manual_seed(0))
    (xs, ys), (xq, yq) = tasks.support, tasks.query
    named = dict(model.named_parameters())
    params = fmaml.params(model)
    maml = fmaml.MAML(model, F.mse_loss, inner_lr=lr, batching="loop")

    def hand() -> None:
        model.zero_grad()
        for t in range(tasks_n):
            p = named
            for _ in range(k):
                loss = F.mse_loss(functional_call(model, p, (xs[t],)), ys[t])
                g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
                p = {n: v - lr * gi for (n, v), gi in zip(p.items(), g, strict=True)}
            (F.mse_loss(functional_call(model, p, (xq[t],)), yq[t]) / tasks_n).backward()

    def backward() -> None:
        model.zero_grad()
        maml.unrolled_loss(named, tasks, k).backward()

    fns = {
        "hand-written": hand,
        "grad": lambda: grad(maml.unrolled_loss)(params, tasks, k),
        "backward": backward,
        "meta_grad": lambda: maml.meta_grad(params, tasks, k),
    }
    return fns, model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loop_overhead", description=__doc__)
    parser.add_argument("--k", type=int, default=5, help="inner steps")
    parser.add_argument("--rounds", type=int, default=31, help="rounds of calls, interleaved")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fns, _ = routes(args.k)
    for fn in fns.values():  # warm-up
        fn()
    hand, names = fns["hand-written"], [name for name in fns if name != "hand-written"]
    times: dict[str, list[float]] = {name: [] for name in fns}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        before = _cpu(hand)
        order = names[r % len(names) :] + names[: r % len(names)]
        took = {name: _cpu(fns[name]) for name in order}
        after = _cpu(hand)
        times["hand-written"] += [before, after]
        for name in names:
            times[name].append(took[name])
            ratios[name].append(took[name] / ((before + after) / 2))
    print(
        f"sinusoid MLP, 16 tasks, k = {args.k}, batching='loop', {args.rounds} rounds: median CPU "
        "per call; median of the per-round ratios to the hand-written loop [quartiles]"
    )
    print(f"  {'hand-written':13s} {statistics.median(times['hand-written']) * 1e3:7.1f} ms")
    for name in names:
        q1, q2, q3 = statistics.quantiles(ratios[name], n=4)
        median = statistics.median(times[name]) * 1e3
        print(f"  {name:13s} {median:7.1f} ms  {q2:5.2f}x  [{q1:.2f}, {q3:.2f}]")
    return 0


def _cpu(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


if __name__ == "__main__":
    raise SystemExit(main())
