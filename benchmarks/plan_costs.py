"""Snapshots and step evaluations of each checkpoint policy, straight from the planner.

No timing and no tensors: every number comes from the plan that ``fmaml.scan`` would run
(``policy.plan(length, carry_bytes)``), checked against ``fmaml.binomial_cost`` for the binomial
schedules. Prints the Markdown table of ``docs/scan.md``:

    bash scripts/dev python -m benchmarks.plan_costs
    bash scripts/dev python -m benchmarks.plan_costs --lengths 10 100 --carry-bytes 1000000

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

#: The carries of the ``auto`` rows: a conv4's parameters (four 3x3 conv layers of 64 filters, a
#: 5-way linear head: 111,749 float32 numbers) and 4 MiB.
CARRY_BYTES = (446_996, 4 * 2**20)


def rows(lengths: Sequence[int], carry_bytes: Sequence[int]) -> list[list[str]]:
    out = []
    for length in lengths:
        out.append([f"{length:,}", "`store_all`", f"{length:,} step graphs", "0", "1"])
        policies: list[tuple[str, fmaml.Policy, int]] = [
            ("`sqrt`", Uniform(), 0),
            ("`binomial`", Binomial(), 0),
        ]
        policies += [(f"`auto`, carry {n:,} B", Auto(), n) for n in carry_bytes]
        for name, policy, nbytes in policies:
            plan = policy.plan(length, nbytes)
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


def table(lengths: Sequence[int], carry_bytes: Sequence[int]) -> str:
    header = [
        "length",
        "policy",
        "snapshots",
        "recomputed steps per step",
        "total evaluations per step",
    ]
    lines = ["| " + " | ".join(header) + " |", "| ---: | --- | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(lengths, carry_bytes)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plan_costs", description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument(
        "--carry-bytes",
        type=int,
        nargs="+",
        default=list(CARRY_BYTES),
        help="carry sizes of the auto rows (default: a conv4's parameters and 4 MiB)",
    )
    args = parser.parse_args(argv)
    print(table(args.lengths, args.carry_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
