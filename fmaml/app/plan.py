"""``fmaml plan``: what each checkpoint policy costs for the ``K`` inner steps of one task."""

from __future__ import annotations

import argparse
import math
from typing import Any

from fmaml._policy import Auto, Binomial, Policy, StoreAll, Uniform
from fmaml.app import jobs
from fmaml.app.options import int_at_least

__all__ = ["add_command", "plan_policies", "run"]


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``plan`` to ``fmaml``'s commands."""
    parser = commands.add_parser(
        "plan",
        help="what a checkpoint policy costs for K inner steps",
        description="Print the cost of the checkpoint schedules for a scan of K steps: step "
        "evaluations (forward, recomputed, with a graph), snapshots and their memory, for "
        "store_all, sqrt, binomial and auto.",
    )
    _add_options(parser)
    parser.set_defaults(run=run)


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--length",
        "-k",
        type=int_at_least(1),
        required=True,
        metavar="K",
        help="scan length: the number of inner steps",
    )
    parser.add_argument(
        "--snapshots",
        type=int_at_least(1),
        metavar="S",
        help="snapshots for binomial and auto (default: binomial ceil(log2 K), auto its "
        "64 MiB budget)",
    )
    parser.add_argument(
        "--policy",
        default="binomial",
        choices=("store_all", "sqrt", "binomial", "auto"),
        help="the policy whose plan is shown in detail (default: binomial)",
    )
    parser.add_argument(
        "--model",
        default="sinusoid",
        choices=("sinusoid", "conv4"),
        help="carry size: the parameters of the sinusoid MLP 1-40-40-1 or of conv4-64 "
        "(20-way) in float32 (default: sinusoid)",
    )
    parser.add_argument(
        "--model-bytes",
        type=int_at_least(1),
        metavar="B",
        help="carry size in bytes instead of --model",
    )
    parser.add_argument(
        "--tasks",
        type=int_at_least(1),
        default=1,
        metavar="T",
        help="tasks vectorised together with vmap: the carry holds T copies (default: 1)",
    )


#: ``--model``: the job whose default model sets the carry size, and its description.
_MODELS = {
    "sinusoid": ("sinusoid", "the sinusoid MLP 1-40-40-1"),
    "conv4": ("omniglot", "conv4-64, 20-way"),
}


def _model_bytes(model: str) -> tuple[int, str]:
    task, label = _MODELS[model]
    job = jobs.module(task)
    n = sum(p.numel() for p in job.build_model(job.DEFAULTS).parameters())
    return n * 4, f"{label}: {n:,} float32 parameters"


def _cost(policy: Policy, length: int, carry: int) -> dict[str, Any]:
    """Step evaluations and snapshots of ``policy`` for one forward and backward pass."""
    if policy.stores_all(length):
        return {
            "snapshots": None,
            "forward": 0,
            "recomputed": 0,
            "graph": length,
            "evaluations": length,
            "memory": f"{length} step graphs, over {_bytes(length * carry)}",
        }
    plan = policy.plan(length, carry)
    forward = sum(a.stop - a.start for a in plan.forward if hasattr(a, "stop")) + 1
    recomputed = plan.evaluations - (forward - 1)
    return {
        "snapshots": plan.snapshots,
        "forward": forward,
        "recomputed": recomputed,
        "graph": length,
        "evaluations": forward + recomputed + length,
        "memory": _bytes(plan.snapshots * carry),
        "plan": plan,
    }


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _label(policy: Policy, length: int, carry: int) -> str:
    if isinstance(policy, StoreAll):
        return "store_all"
    if isinstance(policy, Uniform):
        every = policy.every or max(1, math.isqrt(length - 1) + 1)
        return f"sqrt (every {every})" if policy.every is None else f"uniform:{every}"
    if isinstance(policy, Binomial):
        return f"binomial:{policy.plan(length, carry).snapshots}"
    if policy.stores_all(length):
        return "auto (plain loop)"
    return f"auto ({policy.snapshots(length, carry)} snapshots)"


def plan_policies(length: int, snapshots: int | None) -> dict[str, Policy]:
    """The four policies compared by ``fmaml plan``, with ``--snapshots`` applied."""
    return {
        "store_all": StoreAll(),
        "sqrt": Uniform(),
        "binomial": Binomial(snapshots),
        "auto": Auto() if snapshots is None else Auto(max_snapshots=snapshots),
    }


def run(args: argparse.Namespace) -> int:
    """``fmaml plan``: the cost table and the chosen policy's plan."""
    length = args.length
    if args.model_bytes is not None:
        model_bytes, what = args.model_bytes, f"{args.model_bytes:,} bytes (--model-bytes)"
    else:
        model_bytes, what = _model_bytes(args.model)
    carry = model_bytes * args.tasks
    tasks = f" x {args.tasks} tasks" if args.tasks > 1 else ""
    print(f"Checkpoint plans for {length} inner steps; carry {_bytes(carry)} ({what}{tasks})")
    print(
        "Step evaluations for one gradient (forward and backward pass): forward = run without a "
        "graph\nin the forward pass, recomputed = run again without a graph in the backward "
        "pass, with graph =\nrun with a graph (store_all: all in the forward pass), per step = "
        "their sum / K. Memory: the\nsnapshots held at most (carries); store_all holds every "
        "step's autograd graph instead, each\nlarger than a carry."
    )
    header = (
        f"  {'policy':<24}{'snapshots':>10}{'forward':>10}{'recomputed':>12}{'with graph':>12}"
        f"{'per step':>10}  memory"
    )
    print()
    print(header)
    chosen = None
    for name, policy in plan_policies(length, args.snapshots).items():
        cost = _cost(policy, length, carry)
        snaps = "-" if cost["snapshots"] is None else str(cost["snapshots"])
        marker = "*" if name == args.policy else " "
        print(
            f"{marker} {_label(policy, length, carry):<24}{snaps:>10}{cost['forward']:>10}"
            f"{cost['recomputed']:>12}{cost['graph']:>12}{cost['evaluations'] / length:>10.2f}"
            f"  {cost['memory']}"
        )
        if name == args.policy:
            chosen = cost
    print()
    assert chosen is not None
    if "plan" in chosen:
        print(f"The plan of {args.policy} (*):")
        print("  " + chosen["plan"].describe(head=6).replace("\n", "\n  "))
    else:
        print(
            f"{args.policy} (*) has no plan: every step runs once, with a graph that is kept for "
            "the backward pass."
        )
    return 0
