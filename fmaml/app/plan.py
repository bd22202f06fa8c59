"""``fmaml plan``: what each checkpoint policy costs for the ``K`` inner steps of one task."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fmaml
from fmaml._policy import Auto, Binomial, Policy, StoreAll, Uniform
from fmaml._schedule import Plan
from fmaml.app import jobs
from fmaml.app.options import int_at_least

__all__ = [
    "PER_STEP",
    "StepCost",
    "add_command",
    "describe_plan",
    "label",
    "plan_policies",
    "plural",
    "run",
    "step_cost",
]


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
        help="snapshots for binomial and auto (default: binomial ceil(log2 K); auto keeps every "
        "graph when they fit its 64 MiB budget, else what the rest of the budget buys)",
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
        "--graph-bytes",
        type=int_at_least(0),
        metavar="B",
        help="the autograd graph of one inner step in bytes, for auto's choice (default: "
        "measured on --model's default task; with --model-bytes, unknown: auto checkpoints)",
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


def _model_bytes(model: str) -> tuple[int, int, str]:
    """The carry (the parameters) and one inner step's graph of ``--model`` on its job's default
    support set (sinusoid: 10 points; omniglot: 20-way 1-shot, 28x28), both in bytes."""
    task, label = _MODELS[model]
    job = jobs.module(task)
    config = job.DEFAULTS
    net = job.build_model(config)
    n = sum(p.numel() for p in net.parameters())
    if task == "sinusoid":
        x, y = torch.zeros(1, config["k_shot"], 1), torch.zeros(1, config["k_shot"], 1)
        loss = F.mse_loss
    else:
        side, ways = config["image_size"], config["n_way"]
        x = torch.zeros(1, ways * config["k_shot"], 1, side, side)
        y = torch.zeros(1, ways * config["k_shot"], dtype=torch.int64)
        loss = F.cross_entropy
    maml = fmaml.MAML(net, loss, inner_lr=0.1)
    graph = maml.footprint(fmaml.params(net), fmaml.Tasks((x, y), (x, y))).step_bytes
    return n * 4, graph, f"{label}: {n:,} float32 parameters"


#: The one measure of compute that ``fmaml plan`` and ``fmaml demo`` print, and its definition.
PER_STEP = (
    "evals/step = (forward + recomputed + with graph) / K: every evaluation of the step\n"
    "function for one gradient, per inner step (1.00: store_all; 2.00: no recomputation)"
)


@dataclass(frozen=True)
class StepCost:
    """What one gradient (forward and backward pass) through a ``length``-step scan costs.

    Attributes:
        length: the number of steps ``K``.
        snapshots: carries the plan holds at most (the initial carry counts as one); ``None``
            when every step's graph is kept (no plan).
        forward: steps evaluated without a graph in the forward pass (the last one included).
        recomputed: steps evaluated again without a graph in the backward pass.
        graph: steps evaluated with a graph (``store_all``: in the forward pass, and kept).
        carry_bytes: the size of one carry.
        plan: the plan, or ``None``.
        graph_bytes: one step's autograd graph, when known.
    """

    length: int
    snapshots: int | None
    forward: int
    recomputed: int
    graph: int
    carry_bytes: int
    plan: Plan | None
    graph_bytes: int | None = None

    @property
    def evaluations(self) -> int:
        """Every evaluation of the step function for one gradient."""
        return self.forward + self.recomputed + self.graph

    @property
    def per_step(self) -> float:
        """:attr:`evaluations` divided by ``K`` (see :data:`PER_STEP`)."""
        return self.evaluations / self.length if self.length else 0.0

    def memory(self) -> str:
        """The snapshots' bytes and one step graph, or for no plan the step graphs kept."""
        graph = self.graph_bytes
        if self.snapshots is None:
            graphs = plural(self.length, "step graph")
            if graph is None:  # each graph holds at least the carry its step started from
                return f"{graphs}, over {_bytes(self.length * self.carry_bytes)}"
            return f"{graphs}, {_bytes(self.length * (graph + self.carry_bytes))}"
        held = _bytes(self.snapshots * self.carry_bytes)
        return held if graph is None else f"{held} + one step graph {_bytes(graph)}"


def step_cost(
    policy: Policy, length: int, carry_bytes: int, graph_bytes: int | None = None
) -> StepCost:
    """The :class:`StepCost` of ``policy`` for a scan of ``length`` steps of ``carry_bytes``
    (``graph_bytes``: one step's graph, for :class:`fmaml.Auto`'s choice).

    These are the counts :func:`fmaml.record_scan` reports for a real scan (tested).
    """
    plan = policy.plan(length, carry_bytes, graph_bytes)
    if plan is None:
        return StepCost(length, None, 0, 0, length, carry_bytes, None, graph_bytes)
    swept = sum(a.stop - a.start for a in plan.forward if hasattr(a, "stop"))
    # the forward sweep, then the last step (its output is the scan's result)
    return StepCost(
        length,
        plan.snapshots,
        swept + 1,
        plan.evaluations - swept,
        length,
        carry_bytes,
        plan,
        graph_bytes,
    )


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun``, with an s unless ``n`` is 1: ``1 step graph``, ``2 step graphs``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def describe_plan(plan: Plan, head: int = 6) -> str:
    """One line: the plan's actions and the first ``head`` of them."""
    actions = plan.forward + plan.backward
    shown = ", ".join(
        f"{type(a).__name__}({', '.join(map(str, dataclasses.astuple(a)))})" for a in actions[:head]
    )
    more = f", ... ({len(actions) - head} more)" if len(actions) > head else ""
    return (
        f"{plural(len(plan.forward), 'action')} in the forward pass, {len(plan.backward)} in the "
        f"backward pass: {shown}{more}"
    )


def label(policy: Policy, length: int) -> str:
    """A policy as ``--checkpoint`` spells it (``sqrt`` with its interval)."""
    if isinstance(policy, StoreAll):
        return "store_all"
    if isinstance(policy, Uniform):
        if policy.every is None:
            return f"sqrt (every {max(1, math.isqrt(length - 1) + 1)})"
        return f"uniform:{policy.every}"
    if isinstance(policy, Binomial):
        return "binomial" if policy.snapshots is None else f"binomial:{policy.snapshots}"
    return "auto" if policy.max_snapshots is None else f"auto:{policy.max_snapshots}"


def plan_policies(length: int, snapshots: int | None) -> dict[str, Policy]:
    """The policies compared by ``fmaml plan`` (its rows), with ``--snapshots`` applied."""
    return {
        "store_all": StoreAll(),
        "sqrt": Uniform(),
        "binomial": Binomial(snapshots),
        "auto": Auto() if snapshots is None else Auto(max_snapshots=snapshots),
    }


@dataclass(frozen=True)
class Column:
    """A column of ``fmaml plan``'s table: its header, width and value."""

    header: str
    width: int
    value: Callable[[StepCost], str]


#: The columns of ``fmaml plan``'s table, after the policy.
COLUMNS = (
    Column("snapshots", 10, lambda c: "-" if c.snapshots is None else str(c.snapshots)),
    Column("forward", 10, lambda c: str(c.forward)),
    Column("recomputed", 12, lambda c: str(c.recomputed)),
    Column("with graph", 12, lambda c: str(c.graph)),
    Column("evals/step", 12, lambda c: f"{c.per_step:.2f}"),
    Column("  memory", 0, lambda c: f"  {c.memory()}"),
)

_LEGEND = """\
Columns, for one gradient (forward and backward pass):
  snapshots   carries held at most (the initial carry counts as one)
  forward     steps run without a graph in the forward pass (the last step included)
  recomputed  steps run again without a graph in the backward pass
  with graph  steps run with a graph (store_all: in the forward pass, all kept)
  evals/step  (forward + recomputed + with graph) / K: every evaluation of the step function
              for one gradient, per inner step (1.00: store_all; 2.00: no recomputation)
  memory      the snapshots (carries); store_all, and auto when they fit its budget, keep
              every step's autograd graph instead"""


def run(args: argparse.Namespace) -> int:
    """``fmaml plan``: the cost table and the chosen policy's plan."""
    length = args.length
    if args.model_bytes is not None:
        model_bytes, graph, what = (
            args.model_bytes,
            None,
            f"{args.model_bytes:,} bytes (--model-bytes)",
        )
    else:
        model_bytes, graph, what = _model_bytes(args.model)
    if args.graph_bytes is not None:
        graph = args.graph_bytes
    carry = model_bytes * args.tasks
    graph = None if graph is None else graph * args.tasks
    tasks = f" x {args.tasks} tasks" if args.tasks > 1 else ""
    step = "unknown" if graph is None else _bytes(graph)
    print(
        f"Checkpoint plans for {plural(length, 'inner step')}; carry {_bytes(carry)} "
        f"({what}{tasks}); one step's graph {step}"
    )
    print(_LEGEND)
    print()
    print(f"  {'policy':<24}" + "".join(f"{c.header:>{c.width}}" for c in COLUMNS))
    chosen = None
    for name, policy in plan_policies(length, args.snapshots).items():
        cost = step_cost(policy, length, carry, graph)
        marker = "*" if name == args.policy else " "
        cells = "".join(f"{c.value(cost):>{c.width}}" for c in COLUMNS)
        print(f"{marker} {label(policy, length):<24}{cells}")
        if name == args.policy:
            chosen = policy, cost
    print()
    assert chosen is not None
    policy, cost = chosen
    if cost.plan is not None:
        print(f"The plan of {label(policy, length)} (*): {describe_plan(cost.plan)}")
    else:
        print(
            f"{label(policy, length)} (*) has no plan: every step runs once, with a graph that is "
            "kept for the backward pass."
        )
    return 0
