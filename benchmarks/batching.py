"""The measurements behind ``batching="auto"``: a loop over tasks against ``vmap``, by model size.

For MLPs 1-H-H-1 (H hidden units, N points per task) and conv4 nets (F filters on 1x28x28
images, N support and Q query images), 16 tasks, k=5 inner SGD steps, the exact meta-gradient
through ``torch.func.grad(maml.unrolled_loss)``: the CPU time with ``batching="loop"`` and with
``batching="vmap"`` (each in a fresh process, ``store_all``), and what ``batching="auto"``
measures and picks for the same shapes (the mean size of a tensor that one task's graphs save,
parameters included; the rule loops above 256 KiB on the CPU, ``fmaml._batching``).

    bash scripts/dev python -m benchmarks.batching            # writes docs/benchmarks/batching.md
    bash scripts/dev python -m benchmarks.batching --no-write --quick
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

import fmaml
from benchmarks._memory import ROOT, machine, measure, serve_child
from benchmarks._workloads import conv4

DOC = ROOT / "docs" / "benchmarks" / "batching.md"
TASKS, STEPS = 16, 5

#: (kind, size, support, query): MLP 1-size-size-1 on support/query points; conv4 with `size`
#: filters on support/query 28x28 images.
SHAPES = [
    ("mlp", 40, 10, 10),
    ("mlp", 40, 100, 100),
    ("mlp", 256, 10, 10),
    ("mlp", 256, 100, 100),
    ("mlp", 256, 1000, 1000),
    ("mlp", 1024, 100, 100),
    ("conv", 8, 2, 2),
    ("conv", 16, 5, 5),
    ("conv", 32, 5, 5),
    ("conv", 64, 5, 5),
    ("conv", 16, 5, 75),
    ("conv", 64, 5, 75),
    ("conv", 64, 25, 75),
]
QUICK = [("mlp", 40, 10, 10), ("conv", 16, 5, 5)]


def _build(kind: str, size: int, support: int, query: int) -> tuple[nn.Module, Any, fmaml.Tasks]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(
            nn.Linear(1, size), nn.ReLU(), nn.Linear(size, size), nn.ReLU(), nn.Linear(size, 1)
        )

        def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.randn(TASKS, n, 1, generator=gen), torch.randn(TASKS, n, 1, generator=gen)

        return model, F.mse_loss, fmaml.Tasks(batch(support), batch(query))
    model = conv4(size, 5)

    def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(TASKS, n, 1, 28, 28, generator=gen)
        return x, torch.randint(0, 5, (TASKS, n), generator=gen)

    return model, F.cross_entropy, fmaml.Tasks(images(support), images(query))


def setup(config: dict[str, Any]) -> Callable[[], Any]:
    model, loss_fn, tasks = _build(
        config["kind"], config["size"], config["support"], config["query"]
    )
    maml = fmaml.MAML(model, loss_fn, inner_lr=0.01, batching=config["batching"])
    params = fmaml.params(model)

    def run() -> Any:
        return grad(maml.unrolled_loss)(params, tasks, STEPS)

    return run


def report(config: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
    def out(_: Any) -> dict[str, Any]:
        if config["batching"] != "auto":
            return {}
        model, loss_fn, tasks = _build(
            config["kind"], config["size"], config["support"], config["query"]
        )
        maml = fmaml.MAML(model, loss_fn, inner_lr=0.01)
        with fmaml.record_scan() as stats:
            grad(maml.unrolled_loss)(fmaml.params(model), tasks, STEPS)
        run = stats.batching[0]
        return {
            "mean_tensor_kib": run.footprint.mean_tensor_bytes / 1024,
            "choice": run.mode + (f" ({run.chunk})" if run.chunk else ""),
        }

    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batching", description=__doc__)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="two shapes, one repeat")
    parser.add_argument("--no-write", action="store_true", help="print, do not write the doc")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if serve_child(args.child, setup, report):
        return 0
    shapes = QUICK if args.quick else SHAPES
    repeats = 1 if args.quick else args.repeats
    env = {"OMP_NUM_THREADS": "1"}
    rows = []
    for kind, size, support, query in shapes:
        base = {"kind": kind, "size": size, "support": support, "query": query, "threads": 1}
        row: dict[str, Any] = dict(base)
        for batching in ("loop", "vmap", "auto"):
            config = {**base, "batching": batching, "repeats": repeats, "warmup": 1}
            result = measure("batching", config, memory=False, env=env)
            row[f"{batching}_s"] = result["cpu_seconds"]
            row.update({k: v for k, v in result.items() if k in ("mean_tensor_kib", "choice")})
        rows.append(row)
        print(_line(row), flush=True)
    text = _markdown(rows)
    print(text)
    if not args.no_write:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    return 0


def _shape(row: dict[str, Any]) -> str:
    if row["kind"] == "mlp":
        return f"MLP 1-{row['size']}-{row['size']}-1, {row['support']}+{row['query']} points"
    return f"conv4-{row['size']}, {row['support']}+{row['query']} images"


def _line(row: dict[str, Any]) -> str:
    best = "loop" if row["loop_s"] < row["vmap_s"] else "vmap"
    return (
        f"| {_shape(row)} | {row['mean_tensor_kib']:.0f} | {row['loop_s'] * 1e3:.1f} | "
        f"{row['vmap_s'] * 1e3:.1f} | {row['loop_s'] / row['vmap_s']:.2f} | {best} | "
        f"{row['choice']} | {row['auto_s'] * 1e3:.1f} |"
    )


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        '# Loop or vmap over tasks (`batching="auto"`)',
        "",
        f"Measured {datetime.date.today().isoformat()} on {machine()}, one thread, each "
        f"configuration in a fresh process: {TASKS} tasks, k={STEPS}, `torch.func.grad` of "
        "`maml.unrolled_loss`, median CPU time of the meta-gradient. *mean tensor*: the average "
        "size of a tensor that one task's inner step and query pass save (parameters included), "
        "what the rule reads; it loops on the CPU above 256 KiB.",
        "",
        "| shape | mean tensor (KiB) | loop (ms) | vmap (ms) | loop / vmap | faster | auto picks"
        " | auto (ms) |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    lines += [_line(row) for row in rows]
    lines += ["", "Command: `bash scripts/dev python -m benchmarks.batching`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
