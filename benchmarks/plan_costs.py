"""Snapshots and step evaluations of each checkpoint policy, straight from the planner.

No timing and no tensors: every number comes from the plan that ``fmaml.scan`` would run
(``policy.plan(length, carry_bytes, graph_bytes)``), checked against ``fmaml.binomial_cost``
for the binomial schedules. Prints the Markdown table of ``docs/scan.md``:

    bash scripts/dev python -m benchmarks.plan_costs
    bash scripts/dev python -m benchmarks.plan_costs --lengths 10 100 --auto 1000000,20000000

Columns, for a scan of ``length`` steps:

* snapshots: carries held at once (the initial carry counts as one); ``store_all`` holds every
  step's autograd graph instead.
* recomputed steps per step: steps evaluated again, without a graph, in the backward pass.
* total evaluations per step: the forward pass (each step once) + the recomputations + one
  evaluation with a graph per step before its backward; ``store_all`` evaluates each step once,
  with a graph.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import fmaml
from fmaml._policy import Auto, Binomial, Uniform

#: The ``auto`` rows, (carry, one step's graph) in bytes: a conv4's parameters (four 3x3 conv
#: layers of 64 filters, a 5-way linear head: 111,749 float32 numbers) with its inner step's graph
#: on 25 images of 28x28 (18,183,904 bytes, measured by ``fmaml.MAML.footprint`` on workload A of
#: ``benchmarks/suite.py``), and the sinusoid MLP 1-40-40-1 (1,761 float32 numbers) with its step
#: graph on 10 points (4,884 bytes, measured the same way).
AUTO_ROWS = ((446_996, 18_183_904), (7_044, 4_884))


def rows(lengths: Sequence[int], auto: Sequence[tuple[int, int]]) -> list[list[str]]:
    out = []
    for length in lengths:
        out.append([f"{length:,}", "`store_all`", f"{length:,} step graphs", "0", "1"])
        policies: list[tuple[str, fmaml.Policy, int, int | None]] = [
            ("`sqrt`", Uniform(), 0, None),
            ("`binomial`", Binomial(), 0, None),
        ]
        policies += [(f"`auto`, carry {c:,} B, graph {g:,} B", Auto(), c, g) for c, g in auto]
        for name, policy, nbytes, graph in policies:
            plan = policy.plan(length, nbytes, graph)
            if plan is None:  # auto keeps every graph
                out.append([f"{length:,}", name, f"{length:,} step graphs", "0", "1"])
                continue
            if not isinstance(policy, Uniform):
                assert plan.evaluations == fmaml.binomial_cost(length, plan.snapshots), plan
            recomputed = plan.evaluations - (length - 1)
            total = length + recomputed + length
            out.append(
                [
                    f"{length:,}",
                    name,
                    str(plan.snapshots),
                    f"{recomputed / length:.2f}",
                    f"{total / length:.2f}",
                ]
            )
    return out


def table(lengths: Sequence[int], auto: Sequence[tuple[int, int]]) -> str:
    header = [
        "length",
        "policy",
        "snapshots",
        "recomputed steps per step",
        "total evaluations per step",
    ]
    lines = ["| " + " | ".join(header) + " |", "| ---: | --- | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(lengths, auto)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plan_costs", description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument(
        "--auto",
        type=lambda text: tuple(int(n) for n in text.split(",")),
        nargs="+",
        default=list(AUTO_ROWS),
        metavar="CARRY,GRAPH",
        help="the auto rows: carry and step-graph bytes (default: conv4 and the sinusoid MLP)",
    )
    args = parser.parse_args(argv)
    print(table(args.lengths, args.auto))
    return 0


if __name__ == "__main__":
    sys.exit(main())
