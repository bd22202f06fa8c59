"""Peak memory and time of a 100-step MAML inner loop through ``fmaml.scan``, per checkpoint policy.

Workload: one sinusoid regression task (Finn et al., 2017), a tanh MLP 1-256-256-1 in float32 whose
parameters (a dict) are the scan's carry, ``--steps`` inner SGD steps
``params - lr * grad(support_loss)(params)`` on ``--support`` points, and ``torch.func.grad`` of
the query loss with respect to the initial parameters (the exact second-order meta-gradient).
Each policy runs in a fresh process (``benchmarks._memory.measure``); the table gives the peak
resident memory above the baseline taken just before the measured meta-gradient, the median time
of ``--repeats`` meta-gradients, and the largest difference from the ``store_all`` meta-gradient.

    bash scripts/dev python -m benchmarks.scan_memory    # writes docs/benchmarks/scan_memory.md
    bash scripts/dev python -m benchmarks.scan_memory --no-write --steps 20
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.func import grad

import fmaml
from benchmarks._memory import ROOT, machine, measure, serve_child

POLICIES = ("store_all", "sqrt", "binomial", "auto")
DOC = ROOT / "docs" / "benchmarks" / "scan_memory.md"
INNER_LR = 0.01
MB = 2**20

Params = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# the workload (runs in the child)


def init_mlp(widths: Sequence[int], gen: torch.Generator) -> Params:
    params: Params = {}
    for i in range(len(widths) - 1):
        fan_in, fan_out = widths[i], widths[i + 1]
        params[f"w{i}"] = torch.randn(fan_out, fan_in, generator=gen) / math.sqrt(fan_in)
        params[f"b{i}"] = torch.zeros(fan_out)
    return params


def mlp(params: Params, x: torch.Tensor) -> torch.Tensor:
    layers = len(params) // 2
    for i in range(layers):
        x = x @ params[f"w{i}"].T + params[f"b{i}"]
        if i < layers - 1:
            x = torch.tanh(x)
    return x


def mse(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((mlp(params, x) - y) ** 2).mean()


def setup(config: dict[str, Any]) -> Callable[[], Params]:
    """Build the task and the MLP; return the meta-gradient computation (warmed up once)."""
    gen = torch.Generator().manual_seed(int(config["seed"]))
    hidden = int(config["hidden"])
    params = init_mlp((1, hidden, hidden, 1), gen)
    amplitude = 0.1 + 4.9 * torch.rand((), generator=gen)
    phase = math.pi * torch.rand((), generator=gen)
    n_s, n_q = int(config["support"]), int(config["query"])
    x = 10 * torch.rand(n_s + n_q, 1, generator=gen) - 5
    y = amplitude * torch.sin(x + phase)
    x_s, y_s, x_q, y_q = x[:n_s], y[:n_s], x[n_s:], y[n_s:]
    steps, policy = int(config["steps"]), config["policy"]

    def inner_step(p: Params, _: None) -> tuple[Params, None]:
        g = grad(mse)(p, x_s, y_s)
        return {k: p[k] - INNER_LR * g[k] for k in p}, None

    def meta_loss(p0: Params) -> torch.Tensor:
        adapted, _ = fmaml.scan(inner_step, p0, length=steps, checkpoint=policy)
        return mse(adapted, x_q, y_q)

    def run() -> Params:
        return grad(meta_loss)(params)

    with fmaml.record_scan() as stats:  # the warm-up run, counted
        run()
    config["_stats"] = {  # read back by report()
        "snapshots": stats.plans[0].snapshots if stats.plans else None,
        "recomputations": stats.recomputations,
        "carry_bytes": sum(t.numel() * t.element_size() for t in params.values()),
    }
    return run


def report(config: dict[str, Any]) -> Callable[[Params], dict[str, Any]]:
    def save(meta_grad: Params) -> dict[str, Any]:
        if config.get("save"):
            torch.save(meta_grad, config["save"])
        norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in meta_grad.values()))
        return {"grad_norm": norm, **config["_stats"]}

    return save


# --------------------------------------------------------------------------------------------
# the parent: one child per policy, then the table


def run_all(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    base = {
        "steps": args.steps,
        "hidden": args.hidden,
        "support": args.support,
        "query": args.query,
        "seed": args.seed,
        "threads": args.threads,
        "warmup": 0,  # setup already ran the workload once
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        grads = {}
        for policy in args.policies:
            path = str(Path(tmp) / f"{policy}.pt")
            config = {**base, "policy": policy}
            peak = measure("scan_memory", {**config, "repeats": 1, "save": path})
            timed = measure("scan_memory", {**config, "repeats": args.repeats}, memory=False)
            grads[policy] = torch.load(path)
            rows.append(
                {
                    "policy": policy,
                    **peak,
                    "seconds": timed["seconds"],
                    "cpu_seconds": timed["cpu_seconds"],
                }
            )
            print(
                f"  {policy:<10} peak {peak['peak_bytes'] / MB:9.1f} MB  "
                f"time {timed['seconds']:7.3f} s (CPU {timed['cpu_seconds']:.3f} s)",
                flush=True,
            )
        ref = grads[args.policies[0]]
        for row in rows:
            g = grads[row["policy"]]
            row["max_abs_diff"] = max(float((g[k] - ref[k]).abs().max()) for k in ref)
    return rows, machine()


def table(rows: list[dict[str, Any]]) -> str:
    ref = rows[0]
    name = ref["policy"]
    lines = [
        f"| policy | snapshots | recomputed steps | peak MB above baseline | memory vs {name} "
        f"| CPU time s | CPU time vs {name} | wall time s | meta-grad max abs diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        snapshots = "-" if row["snapshots"] is None else str(row["snapshots"])
        lines.append(
            f"| `{row['policy']}` | {snapshots} | {row['recomputations']} | "
            f"{row['peak_bytes'] / MB:.1f} | {row['peak_bytes'] / ref['peak_bytes']:.3f} | "
            f"{row['cpu_seconds']:.2f} | {row['cpu_seconds'] / ref['cpu_seconds']:.2f} | "
            f"{row['seconds']:.2f} | {row['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def document(args: argparse.Namespace, rows: list[dict[str, Any]], where: str) -> str:
    by = {row["policy"]: row for row in rows}
    carry = rows[0]["carry_bytes"]
    notes = []
    if "store_all" in by:
        per_step = by["store_all"]["peak_bytes"] / args.steps
        notes.append(
            f"- `store_all` keeps every step's graph: about {per_step / MB:.1f} MB per inner step "
            f"here, {per_step / carry:.0f} times the carry ({carry / MB:.2f} MB of parameters)."
        )
    notes += [
        "- The checkpointed policies keep carry snapshots (plus, for `sqrt`, the carries of the "
        "segment being reversed) and one step's graph at a time; `auto` spends up to 64 MiB on "
        "snapshots, so at this carry size it stores every carry and recomputes nothing.",
        "- Recomputed steps: steps evaluated again without a graph in the backward pass "
        "(`fmaml.record_scan()`); every checkpointed policy also evaluates each step once more "
        "with a graph just before its backward.",
        "- MB are 2^20 bytes.",
        "- Peak: the resident-set high-water mark (`VmHWM`) during one meta-gradient minus "
        "`VmRSS` right after resetting it, after one warm-up, in a fresh process started with "
        "`MALLOC_MMAP_THRESHOLD_=65536` (`benchmarks/_memory.py`).",
        f"- Time: median of {args.repeats} meta-gradients after one warm-up, in a second fresh "
        "process without that variable (the fixed threshold slows allocation-heavy code), "
        f"{_threads(args.threads)}. CPU time is the process's (`time.process_time()`); wall "
        "time on a shared machine also counts waiting for the cores and varies far more.",
    ]
    return "\n".join(
        [
            "# Scan memory: checkpoint policies on a 100-step MAML inner loop"
            if args.steps == 100
            else f"# Scan memory: checkpoint policies on a {args.steps}-step MAML inner loop",
            "",
            "Generated by `benchmarks/scan_memory.py`; rerun with",
            "",
            "```",
            "bash scripts/dev python -m benchmarks.scan_memory",
            "```",
            "",
            f"Workload: one sinusoid regression task, a tanh MLP 1-{args.hidden}-{args.hidden}-1 "
            f"(float32, {carry / MB:.2f} MB of parameters, the scan's carry), {args.steps} inner "
            f"SGD steps (lr {INNER_LR}) on {args.support} support points through `fmaml.scan`, "
            f"then `torch.func.grad` of the loss on {args.query} query points with respect to the "
            "initial parameters (exact second order). One fresh process per policy.",
            "",
            f"Machine: {where}; {_threads(args.threads)}.",
            f"Measured {datetime.date.today().isoformat()}.",
            "",
            table(rows),
            "",
            *notes,
            "",
        ]
    )


def _threads(threads: int) -> str:
    if not threads:
        return "torch's default number of threads"
    return f"{threads} torch thread{'s' if threads > 1 else ''}"


# --------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scan_memory", description=__doc__)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=100, help="inner steps (default: 100)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden width (default: 256)")
    parser.add_argument("--support", type=int, default=512, help="support points (default: 512)")
    parser.add_argument("--query", type=int, default=512, help="query points (default: 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per policy")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default: 1; 0: torch's)"
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        help="policies, the first is the reference (default: %(default)s)",
    )
    parser.add_argument("--no-write", action="store_true", help=f"do not write {DOC.name}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if serve_child(args.child, setup, report):
        return 0
    print(
        f"scan_memory: MLP 1-{args.hidden}-{args.hidden}-1, {args.steps} inner steps, "
        f"{args.support} support points; one fresh process per policy",
        flush=True,
    )
    rows, where = run_all(args)
    text = document(args, rows, where)
    print()
    print(table(rows))
    print(f"\nMachine: {where}")
    if not args.no_write:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
