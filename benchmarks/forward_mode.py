"""Forward-mode hypergradients against reverse mode, and the memory of forward mode in ``k``.

Workload ``maml`` (the table in ``docs/benchmarks/forward_mode.md``): the hypergradient of the
MAML query loss with respect to learned inner learning rates (``fmaml.optim.per_layer_lr``: one
rate per parameter tensor, 6 for the MLP; ``--rates scalar_lr``: one rate), after ``k`` inner
steps on one sinusoid regression task (tanh MLP 1-H-H-1, float32). Four ways:

* ``jacfwd``: ``torch.func.jacfwd(maml.unrolled_loss, argnums=3)``, forward-mode
  hypergradients (Franceschi et al., 2017): one tangent per rate rides with the parameters, and
  nothing is stored, so memory does not depend on ``k``; the time grows with the number of rates;
* ``grad``: ``torch.func.grad(maml.unrolled_loss, argnums=3)``, reverse mode through the
  checkpointed scan (``MAML`` with no options: the default policy, ``"auto"``);
* ``backward``: ``maml.unrolled_loss(...).backward()`` with the rates as leaves, the default too;
* ``grad store_all``: reverse mode keeping every step's graph (``--store-all-max-k``, 1,000).

Workload ``scan`` (used by ``tests/test_scan_memory.py``): a scan whose carry is one float64
tensor of ``numel`` entries and whose step is elementwise, differentiated by ``jvp``,
``jvp(grad)`` (forward over reverse) or ``grad``.

Each configuration runs in a fresh process (``benchmarks._memory.measure``): the memory run
(``MALLOC_MMAP_THRESHOLD_=65536``, peak resident memory above the baseline after warm-up) and,
for the table, a second run without that variable for the time.

    bash scripts/dev python -m benchmarks.forward_mode     # writes docs/benchmarks/forward_mode.md
    bash scripts/dev python -m benchmarks.forward_mode --ks 100 1000 --no-write
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

import optree
import torch

import fmaml
from benchmarks._memory import ROOT, machine, measure, serve_child

DOC = ROOT / "docs" / "benchmarks" / "forward_mode.md"
MODES = ("jacfwd", "grad", "backward", "grad store_all")
KS = (100, 1000, 10_000)
MB = 2**20


# --------------------------------------------------------------------------------------------
# the children


def mean_squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # written out: F.mse_loss's forward-mode formula of its double backward fails in PyTorch
    # (pytorch/pytorch#123996), and forward mode through MAML differentiates that double backward
    return ((out - y) ** 2).mean()


def _maml_setup(config: dict[str, Any]) -> Callable[[], Any]:
    from torch import nn
    from torch.func import grad, jacfwd

    dtype = getattr(torch, config["dtype"])
    torch.manual_seed(int(config["seed"]))
    gen = torch.Generator().manual_seed(int(config["seed"]))
    h, n = int(config["hidden"]), int(config["support"])
    model = nn.Sequential(
        nn.Linear(1, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 1)
    ).to(dtype)
    params = {name: p.detach() for name, p in fmaml.params(model).items()}
    x = (10 * torch.rand(1, 2 * n, 1, generator=gen) - 5).to(dtype)
    y = 2.0 * torch.sin(x + 0.5)
    tasks = fmaml.Tasks(support=(x[:, :n], y[:, :n]), query=(x[:, n:], y[:, n:]))
    opt = getattr(fmaml.optim, config["rates"])()
    hyper = opt.init_hyper(params, float(config["lr"]))
    mode, k = config["mode"], int(config["k"])
    options = {"checkpoint": "store_all"} if mode == "grad store_all" else {}
    maml = fmaml.MAML(model, mean_squared_error, inner_opt=opt, **options)

    def hypergradient(steps: int) -> Any:
        if mode == "jacfwd":
            return jacfwd(maml.unrolled_loss, argnums=3)(params, tasks, steps, hyper)
        if mode in ("grad", "grad store_all"):
            return grad(maml.unrolled_loss, argnums=3)(params, tasks, steps, hyper)
        leaves = optree.tree_map(lambda r: r.clone().requires_grad_(), hyper)
        maml.unrolled_loss(params, tasks, steps, leaves).backward()
        return optree.tree_map(lambda r: r.grad, leaves)

    hypergradient(min(k, 3))  # warm-up: the first forward-mode call compiles decompositions
    stats: list[fmaml.ScanStats] = []

    def run() -> Any:
        with fmaml.record_scan() as recorded:
            out = hypergradient(k)
        stats[:] = [recorded]
        return out

    config["_stats"] = stats
    return run


def _scan_setup(config: dict[str, Any]) -> Callable[[], Any]:
    from torch.func import grad, jvp

    k, policy, transform = int(config["k"]), config["policy"], config["transform"]
    gen = torch.Generator().manual_seed(int(config["seed"]))
    c0 = torch.randn(int(config["numel"]), generator=gen, dtype=torch.float64)
    a = torch.tensor(0.5, dtype=torch.float64)

    def step(c: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.tanh(c * a + x), None

    def compute(steps: int) -> Any:
        xs = torch.linspace(-1, 1, steps, dtype=torch.float64)

        def loss(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
            return (fmaml.scan(step, c, xs, checkpoint=policy, consts=a)[0] ** 2).sum()

        tangents = (torch.ones_like(c0), torch.ones_like(a))
        if transform == "jvp":
            return jvp(loss, (c0, a), tangents)
        if transform == "jvp_grad":
            return jvp(grad(loss, argnums=(0, 1)), (c0, a), tangents)
        return grad(loss, argnums=(0, 1))(c0, a)

    compute(min(k, 3))  # warm-up: the first forward-mode call compiles decompositions
    stats: list[fmaml.ScanStats] = []

    def run() -> Any:
        with fmaml.record_scan() as recorded:
            out = compute(k)
        stats[:] = [recorded]
        return out

    config["_stats"] = stats
    return run


def setup(config: dict[str, Any]) -> Callable[[], Any]:
    return _scan_setup(config) if config["workload"] == "scan" else _maml_setup(config)


def report(config: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
    def summary(output: Any) -> dict[str, Any]:
        (stats,) = config["_stats"]
        if config.get("save"):
            torch.save(output, config["save"])
        return {
            "tangent_evaluations": stats.tangent_evaluations,
            "graph_evaluations": stats.graph_evaluations,
            "recomputations": stats.recomputations,
            "max_live_snapshots": stats.max_live_snapshots,
            "max_held_bytes": stats.max_held_bytes,
            "plans": len(stats.plans),
        }

    return summary


# --------------------------------------------------------------------------------------------
# the parent: one child per configuration, then the table


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {
        "workload": "maml",
        "hidden": args.hidden,
        "support": args.support,
        "lr": args.lr,
        "dtype": args.dtype,
        "seed": args.seed,
        "threads": args.threads,
        "warmup": 0,  # setup warms up on a 3-step loop
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rates in args.rates:
            for k in args.ks:
                grads: dict[str, Any] = {}
                group = []
                for mode in args.modes:
                    if mode == "grad store_all" and k > args.store_all_max_k:
                        continue
                    path = str(Path(tmp) / f"{rates}-{k}-{mode}.pt")
                    config = {**base, "rates": rates, "k": k, "mode": mode}
                    peak = measure("forward_mode", {**config, "save": path}, timeout=args.timeout)
                    timed = measure("forward_mode", config, memory=False, timeout=args.timeout)
                    grads[mode] = torch.load(path)
                    row = {
                        "rates": rates,
                        "k": k,
                        "mode": mode,
                        **peak,
                        "seconds": timed["seconds"],
                        "cpu_seconds": timed["cpu_seconds"],
                    }
                    group.append(row)
                    print(
                        f"  {rates:<12} k={k:<6} {mode:<15} peak {peak['peak_bytes'] / MB:8.1f} MB"
                        f"  CPU {timed['cpu_seconds']:8.2f} s  wall {timed['seconds']:8.2f} s",
                        flush=True,
                    )
                ref = grads.get("grad", next(iter(grads.values())))
                for row in group:
                    row["rel_diff"] = _relative(grads[row["mode"]], ref)
                rows += group
    return rows


def _relative(a: Any, b: Any) -> float:
    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    num = math.sqrt(sum(float(((x - y).double() ** 2).sum()) for x, y in zip(la, lb, strict=True)))
    den = math.sqrt(sum(float((y.double() ** 2).sum()) for y in lb))
    return num / den


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| rates | k | hypergradient | peak MB above baseline | memory vs `grad` | CPU s "
        "| CPU vs `grad` | wall s | snapshots held | relative difference from `grad` |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        ref = next(
            r for r in rows if (r["rates"], r["k"], r["mode"]) == (row["rates"], row["k"], "grad")
        )
        lines.append(
            f"| `{row['rates']}` | {row['k']:,} | `{row['mode']}` | "
            f"{row['peak_bytes'] / MB:.1f} | {row['peak_bytes'] / ref['peak_bytes']:.2f} | "
            f"{row['cpu_seconds']:.1f} | {row['cpu_seconds'] / ref['cpu_seconds']:.2f} | "
            f"{row['seconds']:.1f} | {row['max_live_snapshots']} | {row['rel_diff']:.1e} |"
        )
    return "\n".join(lines)


RATES = {
    "per_layer_lr": "`fmaml.optim.per_layer_lr()`, one rate per parameter tensor (6 here)",
    "scalar_lr": "`fmaml.optim.scalar_lr()`, one rate for all",
}


def document(args: argparse.Namespace, rows: list[dict[str, Any]], where: str) -> str:
    h = args.hidden
    n_params = h * h + 4 * h + 1  # Linear(1, h), Linear(h, h), Linear(h, 1)
    rates = "; ".join(RATES[r] for r in args.rates)
    return "\n".join(
        [
            "# Forward-mode hypergradients against reverse mode",
            "",
            "Generated by `benchmarks/forward_mode.py`; rerun with",
            "",
            "```bash",
            "bash scripts/dev python -m benchmarks.forward_mode",
            "```",
            "",
            f"Workload: one sinusoid regression task, a tanh MLP 1-{h}-{h}-1 ({args.dtype}, "
            f"{n_params:,} parameters), `k` inner SGD steps on {args.support} support points with "
            f"learned rates ({rates}; initial value {args.lr}), and the gradient of the loss on "
            f"{args.support} query points with respect to the rates (`hyper`). "
            "`jacfwd`: `torch.func.jacfwd(maml.unrolled_loss, argnums=3)`; `grad`: "
            "`torch.func.grad(maml.unrolled_loss, argnums=3)`; `backward`: "
            "`maml.unrolled_loss(...).backward()`; all three with `fmaml.MAML`'s defaults "
            '(`checkpoint="auto"`); `grad store_all`: `checkpoint="store_all"`, up to '
            f"k = {args.store_all_max_k:,}. One fresh process per configuration.",
            "",
            f"Machine: {where}; {args.threads} torch thread{'s' if args.threads != 1 else ''}.",
            f"Measured {datetime.date.today().isoformat()}.",
            "",
            table(rows),
            "",
            "- Forward mode carries one tangent per rate beside the parameters and stores "
            "nothing for the way back: its peak does not grow with `k`. Its time is that of the "
            "unroll times a factor that grows with the number of rates (`jacfwd` batches the "
            "tangents with `vmap`). Reverse mode pays for one backward pass whatever the number "
            "of rates, and holds what the default policy keeps (every step's graph while they "
            "fit its 64 MiB budget, then snapshots and one step's graph); `store_all` keeps "
            "every step's graph.",
            "- Snapshots held: the most carries the scans held at once "
            "(`fmaml.record_scan().max_live_snapshots`), 0 in forward mode and where the "
            "default policy kept every graph.",
            "- Relative difference: `||g - g_grad|| / ||g_grad||` against `grad` at the same `k` "
            f"and rates: the round-off of a {args.dtype} unroll. The rates start small enough for "
            "the unroll to be stable: at 0.01 this one is chaotic beyond about 200 steps (in "
            "float64, a 1e-13 relative change of the rates moved the hypergradient by 5% at "
            "k = 400), and any two computations whose round-off differs, such as forward and "
            "reverse mode, disagree there, as long unrolls are known to (Metz et al., 2019).",
            "- MB are 2^20 bytes. Peak: resident-set high-water mark (`VmHWM`) during one "
            "hypergradient minus `VmRSS` right after resetting it, after a 3-step warm-up, in a "
            "fresh process started with `MALLOC_MMAP_THRESHOLD_=65536` "
            "(`benchmarks/_memory.py`). Time: a second fresh process without that variable, "
            "one hypergradient; CPU time is the process's (`time.process_time()`), wall time "
            "on this shared machine varies far more.",
            "",
        ]
    )


# --------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.forward_mode", description=__doc__)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--rates",
        nargs="+",
        default=["per_layer_lr", "scalar_lr"],
        choices=("per_layer_lr", "scalar_lr"),
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--support", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.003, help="initial rates (default 0.003)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--store-all-max-k", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {DOC.name}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if serve_child(args.child, setup, report):
        return 0
    print(
        f"forward_mode: MLP 1-{args.hidden}-{args.hidden}-1, {args.rates}, k in {args.ks}; one "
        "fresh process per configuration",
        flush=True,
    )
    rows = run_all(args)
    where = machine()
    print()
    print(table(rows))
    print(f"\nMachine: {where}")
    if not args.no_write:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(document(args, rows, where))
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
