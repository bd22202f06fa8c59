"""``fmaml demo``: what a checkpoint plan costs, and a meta-gradient that does not depend on it.

Part one prints the plan of a scan under the default policy and under ``"binomial"``: how many
carry snapshots it keeps and how many steps it evaluates. Part two is MAML (Finn et al., 2017)
written directly with :func:`fmaml.scan`: the parameters of a small MLP are the carry, one step
is ``params - lr * grad(inner_loss)(params, x, y)`` on a sinusoid regression task, and
``torch.func.grad`` of the query loss after ``k`` steps is the meta-gradient. It is computed with
``checkpoint="store_all"`` (every step's graph kept), with the default policy and with
``"binomial"``, and the three must agree to rounding.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable

import torch
from torch.func import grad

import fmaml
from fmaml._policy import resolve_policy
from fmaml.app.options import int_at_least
from fmaml.app.plan import PER_STEP, describe_plan, plural, step_cost

__all__ = ["add_command", "run"]

Params = dict[str, torch.Tensor]

DTYPE = torch.float64
WIDTHS = (1, 40, 40, 1)
INNER_LR = 0.01
POLICIES = ("store_all", "auto", "binomial")
#: The demo fails (exit status 1) when a checkpointed meta-gradient differs by more than this.
TOLERANCE = 1e-10


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``demo`` to ``fmaml``'s commands."""
    parser = commands.add_parser(
        "demo",
        help="checkpoint plans and an exact meta-gradient (a few seconds)",
        description=(
            "Print the checkpoint plans of a scan under the default policy and 'binomial', then "
            "compute a MAML meta-gradient with fmaml.scan under 'store_all', the default policy "
            "and 'binomial' and check that they agree."
        ),
    )
    parser.add_argument(
        "--length",
        type=int_at_least(1),
        default=100,
        help="scan length for the plans (default: 100)",
    )
    parser.add_argument(
        "--steps",
        type=int_at_least(1),
        default=25,
        help="inner SGD steps of the MAML (default: 25)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the task and the MLP")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the plans and the meta-gradients; return 0 if the policies agree, else 1."""
    gen = torch.Generator().manual_seed(args.seed)
    params = init_mlp(WIDTHS, gen)
    carry_bytes = sum(t.numel() * t.element_size() for t in params.values())
    print_plans(args.length, carry_bytes)
    print()
    # The tensors are tiny: one thread is several times faster than contended intra-op threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return print_meta_gradients(params, sinusoid_task(gen), args.steps)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# part one: plans


def print_plans(length: int, carry_bytes: int) -> None:
    """The checkpoint plans of a ``length``-step scan whose carry takes ``carry_bytes``."""
    print(
        f"Checkpoint plans for a scan of {length} step{'' if length == 1 else 's'} "
        f"(carry: the demo MLP's parameters, {carry_bytes:,} bytes)"
    )
    print("Compute is counted as in fmaml plan:")
    print("  " + PER_STEP.replace("\n", "\n  "))
    for name, title in (
        ("auto", "default policy fmaml.Auto()"),
        ("binomial", '"binomial"'),
        ("store_all", '"store_all"'),
    ):
        cost = step_cost(resolve_policy(name), length, carry_bytes)
        print(
            f"\n{title}: forward {cost.forward}, recomputed {cost.recomputed}, with graph "
            f"{cost.graph}: {cost.per_step:.2f} evals/step; memory {cost.memory()}"
        )
        if cost.plan is None:
            print("  no plan: every step runs once, with a graph kept for the backward pass")
        else:
            print(f"  {plural(cost.snapshots, 'snapshot')}; {describe_plan(cost.plan)}")


# --------------------------------------------------------------------------------------------
# part two: a meta-gradient


def init_mlp(widths: tuple[int, ...], gen: torch.Generator) -> Params:
    """A tanh MLP's parameters, ``{"w0": (out, in), "b0": (out,), ...}``, in float64."""
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        scale = 1 / math.sqrt(fan_in)
        params[f"w{i}"] = scale * torch.randn(fan_out, fan_in, generator=gen, dtype=DTYPE)
        params[f"b{i}"] = torch.zeros(fan_out, dtype=DTYPE)
    return params


def mlp(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Apply the MLP to ``x`` of shape ``(N, 1)``; returns ``(N, 1)``."""
    layers = len(params) // 2
    for i in range(layers):
        x = x @ params[f"w{i}"].T + params[f"b{i}"]
        if i < layers - 1:
            x = torch.tanh(x)
    return x


def mse(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((mlp(params, x) - y) ** 2).mean()


def sinusoid_task(gen: torch.Generator, shots: int = 10, queries: int = 20) -> tuple:
    """One task of Finn et al.'s sinusoid regression: ``(x_support, y_support, x_query, y_query)``.

    Amplitude in [0.1, 5], phase in [0, pi], inputs uniform in [-5, 5].
    """
    amplitude = 0.1 + 4.9 * torch.rand((), generator=gen, dtype=DTYPE)
    phase = math.pi * torch.rand((), generator=gen, dtype=DTYPE)
    x = 10 * torch.rand(shots + queries, 1, generator=gen, dtype=DTYPE) - 5
    y = amplitude * torch.sin(x + phase)
    return x[:shots], y[:shots], x[shots:], y[shots:]


def meta_loss_fn(task: tuple, steps: int, checkpoint: str) -> Callable[[Params], torch.Tensor]:
    """``params0 -> query loss after `steps` inner SGD steps``, the inner loop an ``fmaml.scan``."""
    x_s, y_s, x_q, y_q = task

    def inner_step(params: Params, _: None) -> tuple[Params, None]:
        g = grad(mse)(params, x_s, y_s)
        return {k: params[k] - INNER_LR * g[k] for k in params}, None

    def meta_loss(params0: Params) -> torch.Tensor:
        adapted, _ = fmaml.scan(inner_step, params0, length=steps, checkpoint=checkpoint)
        return mse(adapted, x_q, y_q)

    return meta_loss


def print_meta_gradients(params: Params, task: tuple, steps: int) -> int:
    """Meta-gradients under each policy, their agreement with store_all and their step counts."""
    widths = "-".join(map(str, WIDTHS))
    print(
        f"Meta-gradient: MAML on one sinusoid task, MLP {widths} (float64), "
        f"{steps} inner SGD steps (lr {INNER_LR}), torch.func.grad of the query loss"
    )
    print(
        f"  {'policy':<10} {'|meta-grad|':>18} {'max abs diff':>13} "
        f"{'forward':>8} {'recomputed':>11} {'with graph':>11} {'evals/step':>11} "
        f"{'snapshots':>10}"
    )
    reference: Params | None = None
    worst = 0.0
    for policy in POLICIES:
        with fmaml.record_scan() as stats:
            g = grad(meta_loss_fn(task, steps, policy))(params)
        norm = math.sqrt(sum(float((t**2).sum()) for t in g.values()))
        if reference is None:
            reference = g
        diff = max(float((g[k] - reference[k]).abs().max()) for k in g)
        worst = max(worst, diff)
        forward = stats.forward_evaluations
        if not stats.plans:  # store_all: record_scan counts its graph evaluations as forward too
            forward -= stats.graph_evaluations
        per_step = (forward + stats.recomputations + stats.graph_evaluations) / steps
        snapshots = str(stats.plans[0].snapshots) if stats.plans else "-"
        print(
            f"  {policy:<10} {norm:>18.12f} {diff:>13.3e} {forward:>8} "
            f"{stats.recomputations:>11} {stats.graph_evaluations:>11} {per_step:>11.2f} "
            f"{snapshots:>10}"
        )
    print(f"max abs difference vs store_all: {worst:.3e}")
    print(
        "Counts measured by fmaml.record_scan(): forward = steps evaluated without a graph in "
        "the forward pass,\nrecomputed = evaluated again without a graph in the backward pass, "
        "with graph = evaluated with a\ngraph (store_all: in the forward pass), snapshots = "
        "carry snapshots of the plan; evals/step as above."
    )
    if worst > TOLERANCE:
        print(f"FAILED: the policies disagree by more than {TOLERANCE:g}")
        return 1
    return 0
