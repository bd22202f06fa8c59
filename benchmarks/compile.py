"""``compile=``: fmaml compiled against fmaml eager with the same options, one process each.

    bash scripts/dev python -m benchmarks.compile                  # everything (about 90 min)
    bash scripts/dev python -m benchmarks.compile --only sinusoid  # one group, merged
    bash scripts/dev python -m benchmarks.compile --render         # the table from the CSV

Groups:

- ``sinusoid``: one meta-step of the sinusoid MLP 1-40-40-1 (25 tasks, 10 support and 10 query
  points, inner lr 0.01), ``k`` = 1 and 5, through ``maml.meta_grad`` (what ``fmaml train``
  calls), ``torch.func.grad(maml.unrolled_loss)`` and ``.backward()``; fmaml's defaults
  otherwise (``checkpoint="auto"``, ``batching="vmap"``). Path ``plain`` is no fmaml at all: the
  meta-gradient written by hand with ``torch.func`` (``grad`` of the mean over ``vmap``ped tasks
  of the query loss after ``k`` SGD steps), eager and compiled whole with ``torch.compile``:
  compiled, the floor of any compiled meta-step of this workload.
- ``conv4``: workload B of the suite (conv4-64, 16 tasks of 5-way 1-shot with 75 queries,
  ``k`` = 5, lr 0.4; ``benchmarks/_workloads.py``), ``meta_grad`` and ``.backward()``, with
  ``compile`` off, on and ``"auto"``.
- ``train``: ``fmaml train sinusoid`` with its defaults (25,000 meta-steps; ``--compile auto``,
  which compiles a run this long) and with ``--compile off``, end to end: training time
  (compilation included), its compile time, the final held-out MSEs.

Protocol. Each configuration runs in a fresh process (``benchmarks/_memory.py``) with one torch
thread and an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` in a new temporary directory,
so compile times are cold); a sinusoid row is the best of ``--rounds`` such processes (3; the
rounds go over the whole grid in turn, so a loaded moment of the shared machine spreads over
every row). The child times its first two calls (compilation; a structure's
first call runs eagerly, the second compiles) and reports the *compile time* as their wall time
minus two steady calls; then one more warm-up call and the median of ``repeats`` calls, wall
and CPU time. The compiled child also computes the eager gradient once and reports the largest
relative difference ``max |g - g_eager| / max |g_eager|`` (float32). Ratios are only taken
between rows of the same run. Writes ``docs/benchmarks/compile.csv`` and
``docs/benchmarks/compile.md``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks._memory import ROOT, MeasureError, machine, measure, serve_child

OUT = ROOT / "docs" / "benchmarks"
CSV = OUT / "compile.csv"
DOC = OUT / "compile.md"
FIELDS = [
    "group",
    "k",
    "path",
    "compile",
    "seconds",
    "cpu_seconds",
    "compile_seconds",
    "relerr",
    "note",
]
GROUPS = ("sinusoid", "conv4", "train")


# --------------------------------------------------------------------------------------------
# the child: one configuration


def _sinusoid(config: dict[str, Any]) -> tuple[Any, Any, Any, float]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import fmaml

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    gen = torch.Generator().manual_seed(1)
    tasks, _ = fmaml.data.SinusoidTasks().sample(25, 10, 10, gen)
    return model, F.mse_loss, tasks, 0.01


def _conv4(config: dict[str, Any]) -> tuple[Any, Any, Any, float]:
    from benchmarks import _workloads

    w = _workloads.build("B", config["k"])
    return w.model, _workloads.loss_fn, w.tasks, w.lr


def _meta_step(maml: Any, params: Any, tasks: Any, k: int, path: str) -> Callable[[], Any]:
    import torch

    if path == "meta_grad":
        return lambda: maml.meta_grad(params, tasks, k)[1]
    if path == "grad":
        return lambda: torch.func.grad(maml.unrolled_loss)(params, tasks, k)

    def backward() -> Any:
        leaves = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        maml.unrolled_loss(leaves, tasks, k).backward()
        return {n: p.grad for n, p in leaves.items()}

    return backward


def _plain(model: Any, loss_fn: Any, tasks: Any, k: int, lr: float) -> Callable[[Any], Any]:
    """The meta-gradient written by hand with ``torch.func``, no fmaml: ``grad`` of the mean
    over ``vmap``ped tasks of the query loss after ``k`` plain SGD steps (the issue's
    reference; compiled whole, the floor of any compiled meta-step of this workload)."""
    from torch.func import functional_call, grad, vmap

    (xs, ys), (xq, yq) = tasks.support, tasks.query

    def task_loss(p: Any, xs: Any, ys: Any, xq: Any, yq: Any) -> Any:
        for _ in range(k):
            g = grad(lambda q: loss_fn(functional_call(model, q, (xs,)), ys))(p)
            p = {n: p[n] - lr * g[n] for n in p}
        return loss_fn(functional_call(model, p, (xq,)), yq)

    def meta(p: Any) -> Any:
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq).mean()

    return grad(meta)


def setup(config: dict[str, Any]) -> Callable[[], Any]:
    import torch

    import fmaml

    build = _sinusoid if config["group"] == "sinusoid" else _conv4
    model, loss_fn, tasks, lr = build(config)
    params = fmaml.params(model)
    compile = {"off": False, "on": True, "auto": "auto"}[config["compile"]]
    if config["path"] == "plain":
        plain = _plain(model, loss_fn, tasks, config["k"], lr)
        plain = torch.compile(plain) if compile else plain

        def run() -> Any:
            return plain(params)

    else:
        maml = fmaml.MAML(model, loss_fn, inner_lr=lr, compile=compile)
        run = _meta_step(maml, params, tasks, config["k"], config["path"])
    first = time.perf_counter()
    run()
    out = run()
    first = time.perf_counter() - first
    steady = time.perf_counter()
    run()
    steady = time.perf_counter() - steady
    config["_compile_seconds"] = max(first - 2 * steady, 0.0)
    config["_relerr"] = None
    if compile or config["path"] == "plain":
        eager = fmaml.MAML(model, loss_fn, inner_lr=lr)
        path = "meta_grad" if config["path"] == "plain" else config["path"]
        want = _meta_step(eager, params, tasks, config["k"], path)()
        scale = max(float(g.abs().max()) for g in want.values())
        diff = max(float((out[n] - want[n]).abs().max()) for n in want)
        config["_relerr"] = diff / scale
    return run


def report(config: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
    def fields(_: Any) -> dict[str, Any]:
        return {"compile_seconds": config["_compile_seconds"], "relerr": config["_relerr"]}

    return fields


# --------------------------------------------------------------------------------------------
# the parent


def _fresh_cache() -> dict[str, str]:
    return {
        "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="fmaml-inductor-"),
        "OMP_NUM_THREADS": "1",
    }


def _step_rows(group: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    if group == "sinusoid":
        grid = [
            (k, path, c)
            for k in (1, 5)
            for path in ("meta_grad", "grad", "backward", "plain")
            for c in ("off", "on")
        ]
        repeats = args.repeats
    else:
        grid = [(5, "meta_grad", c) for c in ("off", "on", "auto")]
        grid += [(5, "backward", c) for c in ("off", "on")]
        repeats = max(3, args.repeats // 10)
    rounds = args.rounds if group == "sinusoid" else 1
    results: dict[tuple, list[dict[str, Any]]] = {}
    for r in range(rounds):  # rounds outermost: a loaded moment spreads over every row
        for k, path, c in grid:
            config = {
                "group": group,
                "k": k,
                "path": path,
                "compile": c,
                "threads": 1,
                "warmup": 1,
                "repeats": repeats,
            }
            print(f"  {group} k={k} {path} compile={c} (round {r + 1}) ...", end=" ", flush=True)
            try:
                result = measure(
                    "compile", config, memory=False, timeout=args.timeout, env=_fresh_cache()
                )
            except MeasureError as error:
                print("failed")
                results.setdefault((k, path, c), []).append(
                    {"note": f"failed: {str(error).splitlines()[0]}"}
                )
                continue
            ms, compile_s = result["seconds"] * 1e3, result["compile_seconds"]
            print(f"{ms:.1f} ms (compile {compile_s:.0f} s)")
            results.setdefault((k, path, c), []).append(result)
    rows = []
    for (k, path, c), runs in results.items():
        ok = [run for run in runs if "seconds" in run]
        row: dict[str, Any] = {"group": group, "k": k, "path": path, "compile": c}
        if not ok:
            rows.append({**row, "note": runs[0]["note"]})
            continue
        errors = [run["relerr"] for run in ok if run["relerr"] is not None]
        rows.append(
            {
                **row,
                # the least disturbed of the fresh processes (the machine is shared)
                "seconds": min(run["seconds"] for run in ok),
                "cpu_seconds": min(run["cpu_seconds"] for run in ok),
                "compile_seconds": min(run["compile_seconds"] for run in ok),
                "relerr": max(errors) if errors else None,
                "note": f"best of {len(ok)}" if len(ok) > 1 else "",
            }
        )
    return rows


def _train_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for c in ("off", "auto"):  # "auto": the job's default (compiles a run this long)
        out = Path(tempfile.mkdtemp(prefix="fmaml-train-")) / "run"
        cmd = [sys.executable, "-m", "fmaml", "train", "sinusoid", "--out", str(out), "--quiet"]
        cmd += ["--iterations", str(args.train_iterations), "--compile", c]
        print(f"  fmaml train sinusoid, compile={c} ...", end=" ", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=ROOT, env={**os.environ, **_fresh_cache()}, capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print("failed")
            rows.append({"group": "train", "compile": c, "note": proc.stderr[-300:]})
            continue
        evaluation = json.loads((out / "eval.json").read_text())
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        per_step = statistics.median(
            (b["time"] - a["time"]) / (b["iteration"] - a["iteration"])
            for a, b in itertools.pairwise(records)
        )
        first = records[0]
        compile_s = max(first["time"] - first["iteration"] * per_step, 0.0)
        mse = evaluation["splits"]["held_out"]["steps"]
        print(f"{evaluation['train_time_s']:.0f} s (compile {compile_s:.0f} s)")
        rows.append(
            {
                "group": "train",
                "k": 1,
                "path": f"{args.train_iterations} meta-steps",
                "compile": c,
                "seconds": evaluation["train_time_s"],
                "cpu_seconds": evaluation["train_cpu_time_s"],
                "compile_seconds": compile_s,
                "relerr": None,
                "note": "held-out MSE "
                + ", ".join(
                    f"{k} step{'s' if k != '1' else ''} {v['mean']:.3f} ± {v['ci95']:.3f}"
                    for k, v in mse.items()
                )
                + f"; process {wall:.0f} s",
            }
        )
    return rows


def _read() -> list[dict[str, Any]]:
    if not CSV.exists():
        return []
    with CSV.open() as f:
        return list(csv.DictReader(f))


def _write(rows: list[dict[str, Any]]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with CSV.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def render(rows: list[dict[str, Any]], where: str) -> str:
    """The Markdown page: one table per group, compiled against eager with the same options."""
    lines = [
        "# Compiled against eager (`compile=`)",
        "",
        "Written by `bash scripts/dev python -m benchmarks.compile` (protocol in its docstring; "
        "the reading in [docs/compile.md](../compile.md)). Every row is a fresh process with one "
        "thread and a cold inductor cache; *speed-up* is eager time / compiled time, both from "
        "the same run; *compile* is the cold compile time, reported apart from the per-step "
        "times; *rel. error* is the compiled gradient's largest difference from eager's "
        "(float32).",
        "",
        f"Machine: {where}",
        "",
    ]
    titles = {
        "sinusoid": "Sinusoid MLP 1-40-40-1, 25 tasks, one meta-step (defaults: auto, vmap)",
        "conv4": "conv4-64, workload B (16 tasks 5-way 1-shot, 75 queries, k = 5), one meta-step",
        "train": "`fmaml train sinusoid` end to end (defaults), compile time included",
    }
    for group in GROUPS:
        part = [r for r in rows if r.get("group") == group]
        if not part:
            continue
        lines += [f"## {titles[group]}", ""]
        lines += [
            "| k | path | compile | time (wall) | CPU time | speed-up | compile | rel. error "
            "| note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in part:
            base = next(
                (
                    b
                    for b in part
                    if b.get("compile") == "off" and (b["k"], b["path"]) == (r["k"], r["path"])
                ),
                None,
            )
            sec, cpu, comp = _num(r.get("seconds")), _num(r.get("cpu_seconds")), None
            comp = _num(r.get("compile_seconds"))
            unit, scale = ("s", 1.0) if group != "sinusoid" else ("ms", 1e3)
            speed = ""
            if base is not None and sec and _num(base.get("seconds")):
                speed = f"{_num(base['seconds']) / sec:.2f}x"
            err = _num(r.get("relerr"))
            note = r.get("note", "")
            fmaml_eager = next(
                (
                    _num(b.get("seconds"))
                    for b in part
                    if (b["k"], b["path"], b.get("compile")) == (r["k"], "meta_grad", "off")
                ),
                None,
            )
            if r["path"] == "plain" and r["compile"] == "on" and sec and fmaml_eager:
                note += f"; fmaml eager meta_grad / this: {fmaml_eager / sec:.2f}x (the ceiling)"
            lines.append(
                f"| {r['k']} | {r['path']} | {r['compile']} | "
                + (f"{sec * scale:.2f} {unit}" if sec is not None else "-")
                + " | "
                + (f"{cpu * scale:.2f} {unit}" if cpu is not None else "-")
                + f" | {speed} | "
                + (f"{comp:.0f} s" if comp is not None and r["compile"] != "off" else "-")
                + " | "
                + (f"{err:.1e}" if err is not None else "-")
                + f" | {note} |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile", description=__doc__)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=GROUPS, help="run these groups, merged")
    parser.add_argument("--render", action="store_true", help="only rewrite the table")
    parser.add_argument("--repeats", type=int, default=30, help="timed meta-steps (sinusoid)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="fresh processes per sinusoid row (the best counts)"
    )
    parser.add_argument("--train-iterations", type=int, default=25_000)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if serve_child(args.child, setup, report):
        return 0
    rows = _read()
    where = machine()
    if not args.render:
        groups = args.only or GROUPS
        rows = [r for r in rows if r.get("group") not in groups]
        for group in groups:
            print(f"{group}:", flush=True)
            rows += _train_rows(args) if group == "train" else _step_rows(group, args)
            rows.sort(key=lambda r: GROUPS.index(r["group"]))
            _write(rows)  # after every group: an interrupted run keeps what it measured
    text = render(rows, where)
    DOC.write_text(text + "\n")
    print(text)
    print(f"wrote {DOC.relative_to(ROOT)} and {CSV.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
