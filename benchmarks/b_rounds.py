"""Workload B's time target in rounds: the defaults against the peers, interleaved.

    bash scripts/dev python -m benchmarks.b_rounds              # 5 rounds, 3 meta-steps each
    bash scripts/dev python -m benchmarks.b_rounds --rounds 7

``benchmarks.suite`` measures each configuration once, one after the other, minutes apart; on
this shared machine, whose speed drifts by 1.5x within minutes, that decides a comparison of
near-equal times by when each row ran (on B, the same defaults measured 0.91x the fastest peer
in one run and 1.32x in the next). Here every round runs each configuration once, in a fresh
process (the suite's own child: build, one warm-up meta-step, the median CPU time of
``--repeats`` meta-steps), in an order that rotates from round to round; a configuration's
ratio in a round is its CPU time over the fastest peer's in that round. Reported: the median of
those ratios per configuration, with their range, and the median CPU times. Written to
``docs/benchmarks/b_rounds.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

from benchmarks._memory import ROOT, machine, measure
from benchmarks._peers import available
from benchmarks.suite import DEFAULTS, Entry, _tm

PEERS = (Entry("higher", "higher"), Entry("torchopt MetaSGD", "torchopt"), _tm(None), _tm(1))
PEERS_L2L = (Entry("learn2learn", "learn2learn"),)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.b_rounds", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="rounds (each config once)")
    parser.add_argument("--repeats", type=int, default=3, help="timed meta-steps per process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    peers = [e for e in (*PEERS, *PEERS_L2L) if available(e.library)]
    entries = [*DEFAULTS, *peers]
    cpu: dict[str, list[float]] = {e.label: [] for e in entries}
    ratio: dict[str, list[float]] = {e.label: [] for e in entries}
    for r in range(args.rounds):
        order = entries[r % len(entries) :] + entries[: r % len(entries)]
        took = {}
        for entry in order:
            config = {
                "workload": "B",
                "k": 5,
                "library": entry.library,
                "options": entry.options,
                "threads": args.threads,
                "warmup": 1,
                "repeats": args.repeats,
            }
            took[entry.label] = measure("suite", config, memory=False)["cpu_seconds"]
        best = min(took[e.label] for e in peers)
        for label, seconds in took.items():
            cpu[label].append(seconds)
            ratio[label].append(seconds / best)
        shown = ", ".join(f"{label} {took[label]:.3f} s" for label in cpu)
        print(f"round {r + 1}/{args.rounds}: {shown}", flush=True)
    lines = [
        "# Workload B in rounds",
        "",
        f"`python -m benchmarks.b_rounds --rounds {args.rounds} --repeats {args.repeats}`; "
        f"{machine()}; {args.threads} thread(s). conv4-64, 16 tasks of 5-way 1-shot with 75 "
        "query images, k = 5. Each round runs every configuration once in a fresh process, in "
        "a rotating order; ratio = CPU time over the fastest peer's in the same round.",
        "",
        "| configuration | median CPU s | median ratio to the fastest peer | range |",
        "| --- | ---: | ---: | --- |",
    ]
    for label in cpu:
        low, high = min(ratio[label]), max(ratio[label])
        lines.append(
            f"| {label} | {statistics.median(cpu[label]):.3f} | "
            f"{statistics.median(ratio[label]):.2f}x | {low:.2f}x to {high:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "b_rounds.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
