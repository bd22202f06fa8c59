"""The benchmark suite: fmaml against the established MAML libraries, memory and time.

    bash scripts/dev python -m benchmarks.suite              # full grid (about an hour on 2 cores)
    bash scripts/dev python -m benchmarks.suite --quick      # reduced grid (a few minutes)
    bash scripts/dev python -m benchmarks.suite --only B     # one workload, merged into the CSV
    bash scripts/dev python -m benchmarks.suite --render     # tables and plots from the CSV
    bash scripts/dev python -m benchmarks.maml_profile A 100 "fmaml auto"   # where time goes

Workloads (``benchmarks/_workloads.py``): A, long inner loops (conv4, one 5-way task, k = 1 to
400); B, typical MAML (16 tasks of 5-way 1-shot, k = 5, median of several meta-steps); C,
scaling (a lighter conv4, one task, k = 10 to 10,000). Libraries (``benchmarks/_peers.py``):
fmaml under each checkpoint policy and batching, a plain ``torch.func`` unroll, higher,
torch_maml, torchopt, and learn2learn when it imports.

Protocol. Every configuration (workload, k, library and options) runs twice, each time in a fresh
process (``benchmarks/_memory.py``) with one torch thread:

1. the *memory* run, started with ``MALLOC_MMAP_THRESHOLD_=65536``: build, warm up, reset the
   resident-set high-water mark, one meta-gradient; ``VmHWM - VmRSS`` (after the reset) is the
   peak. Its meta-gradient is saved and compared with fmaml ``store_all``'s (relative error
   ``||g - g_ref|| / ||g_ref||``);
2. the *time* run, without that variable (the fixed threshold slows allocation-heavy code):
   build, warm up, the median wall time (``time.perf_counter``) and CPU time
   (``time.process_time``) of ``repeats`` meta-gradients.

The warm-up is one meta-gradient with ``min(k, 3)`` inner steps for A and C (a full one would
double the cost of long loops) and one full meta-step for B. Modules that torch imports lazily
(sympy, through ``torch.fx.experimental.symbolic_shapes``, on the first ``torch.autograd.grad``
with ``grad_outputs``: 31 MB) are imported before the baseline, for every library
(``benchmarks/_memory.py``): a short warm-up that keeps every graph would otherwise leave that
import to the measured meta-step. A configuration whose peak,
extrapolated linearly from its own largest measured ``k``, would exceed ``--cap-gb`` (8 GB) is
skipped and marked so. Ratios are only taken between numbers from the same run of a workload.

Writes ``results.csv``, ``results.md`` and PNG plots to ``--out`` (``docs/benchmarks``; with
``--quick``, ``build/benchmarks-quick``) and prints the targets as PASS/FAIL lines.

``--device cuda`` runs every configuration in one fresh process on the GPU and measures
``torch.cuda.max_memory_allocated`` above the allocation after warm-up, with synchronised timing
(TF32 off, deterministic cuDNN: ``benchmarks/_memory.py``). ``--ks`` and ``--labels`` cut the
grid to fit a short lease. Figures from an H200: ``docs/benchmarks/gpu/``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks._memory import ROOT, MeasureError, machine, measure, serve_child

MIB = 2**20
GIB = 2**30
AGREEMENT_TOL = 1e-3  # float32 relative error above which a library "disagrees"


# --------------------------------------------------------------------------------------------
# what runs


@dataclass(frozen=True)
class Entry:
    """One library configuration of a workload."""

    label: str
    library: str
    options: dict[str, Any] = field(default_factory=dict)
    reference: bool = False  # fmaml store_all: the meta-gradient the others are compared with
    max_k: int | None = None  # not run beyond this k (time)

    @property
    def family(self) -> str:
        return "fmaml" if self.library == "fmaml" else "peer"


def _tm(every: int | None) -> Entry:
    label = (
        "torch_maml, ckpt every ceil(sqrt(k))" if every is None else "torch_maml, ckpt every step"
    )
    return Entry(label, "torch_maml", {"checkpoint_steps": every})


#: fmaml with no options passed, through the two routes users take.
DEFAULTS = (
    Entry("fmaml defaults, grad", "fmaml", {"route": "grad"}),
    Entry("fmaml defaults, backward", "fmaml", {"route": "backward"}),
)


def entries_a() -> list[Entry]:
    return [
        *DEFAULTS,
        Entry("fmaml store_all", "fmaml", {"policy": "store_all"}, reference=True),
        Entry("fmaml sqrt", "fmaml", {"policy": "sqrt"}),
        Entry("fmaml binomial", "fmaml", {"policy": "binomial"}),
        Entry("torch.func unroll", "torch.func", {"batching": "loop"}),
        Entry("higher", "higher"),
        _tm(None),
        _tm(1),
        Entry("torchopt MetaSGD", "torchopt"),
        Entry("learn2learn", "learn2learn"),
    ]


def entries_b() -> list[Entry]:
    out = []
    for policy in ("store_all", "auto"):
        for name, opts in (
            ("vmap", {"batching": "vmap"}),
            ("vmap chunk 4", {"batching": "vmap", "task_chunk": 4}),
            ("loop", {"batching": "loop"}),
        ):
            out.append(
                Entry(
                    f"fmaml {policy}, {name}",
                    "fmaml",
                    {"policy": policy, **opts},
                    reference=(policy, name) == ("store_all", "vmap"),
                )
            )
    return [
        *DEFAULTS,
        *out,
        Entry("torch.func, vmap", "torch.func", {"batching": "vmap"}),
        Entry("torch.func, loop", "torch.func", {"batching": "loop"}),
        Entry("higher", "higher"),
        _tm(None),
        _tm(1),
        Entry("torchopt MetaSGD", "torchopt"),
        Entry("learn2learn", "learn2learn"),
    ]


def entries_c(peer_max_k: int) -> list[Entry]:
    peers = [
        Entry("torch.func unroll", "torch.func", {"batching": "loop"}),
        Entry("higher", "higher"),
        _tm(None),
        _tm(1),
        Entry("torchopt MetaSGD", "torchopt"),
        Entry("learn2learn", "learn2learn"),
    ]
    return [
        *DEFAULTS,
        Entry("fmaml binomial", "fmaml", {"policy": "binomial"}),
        Entry(
            "fmaml store_all", "fmaml", {"policy": "store_all"}, reference=True, max_k=peer_max_k
        ),
        *[replace(e, max_k=peer_max_k) for e in peers],
    ]


@dataclass
class Grid:
    a_ks: list[int]
    b_repeats: int
    c_ks: list[int]
    c_peer_max_k: int
    c_extrapolate_from: int | None = None  # fmaml: extrapolate beyond this k instead of running


FULL = Grid(
    a_ks=[1, 10, 25, 50, 100, 200, 400],
    b_repeats=5,
    c_ks=[10, 100, 1000, 3000, 10000],
    c_peer_max_k=3000,
)
QUICK = Grid(a_ks=[1, 10, 25], b_repeats=2, c_ks=[10, 100], c_peer_max_k=100)


def repeats_for(workload: str, k: int, grid: Grid) -> int:
    if workload == "B":
        return grid.b_repeats
    if k <= 10:
        return 5
    return 3 if (workload == "A" and k <= 50) or (workload == "C" and k <= 100) else 1


# --------------------------------------------------------------------------------------------
# the child: one configuration


def setup(config: dict[str, Any]) -> Callable[[], Any]:
    import torch

    from benchmarks._peers import make
    from benchmarks._workloads import build

    torch.manual_seed(0)
    wl = build(config["workload"], int(config["k"]), device=config.get("device", "cpu"))
    warm_k = config.get("warmup_k")
    if warm_k:
        warm = make(config["library"], replace(wl, k=int(warm_k)), **config["options"])
        warm()
        del warm
    run = make(config["library"], wl, **config["options"])

    def recorded() -> Any:
        out = run()
        _CHOICE.clear()
        _CHOICE.update(getattr(run, "choice", {}))
        return out

    return recorded


def report(config: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
    def save(output: Any) -> dict[str, Any]:
        import torch

        loss, grads = output
        if config.get("save"):
            torch.save({n: g.detach().cpu() for n, g in grads.items()}, config["save"])
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
        return {"loss": float(loss), "grad_norm": norm, "choice": dict(_CHOICE)}

    return save


#: What the child's fmaml run chose (filled by setup's wrapper; reported with the result).
_CHOICE: dict[str, str] = {}


# --------------------------------------------------------------------------------------------
# the parent: run the grid


COLUMNS = [
    "workload",
    "k",
    "label",
    "library",
    "options",
    "status",
    "note",
    "peak_mib",
    "mem_run_wall_s",
    "wall_s",
    "cpu_s",
    "wall_times",
    "cpu_times",
    "repeats",
    "loss",
    "grad_norm",
    "rel_err",
    "reference",
    "batching",
    "snapshots",
    "evals_per_step",
    "device",
    "measured",
    "load",
    "fmaml_source",
]


def fmaml_source() -> str:
    """A short hash of fmaml's Python sources: which library version a row measured (the
    library is edited while the suite runs)."""
    import hashlib

    digest = hashlib.sha1()
    for path in sorted((ROOT / "fmaml").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def _plan_info(entry: Entry, workload: str, k: int) -> tuple[str, str]:
    """Snapshots and step evaluations per step of an fmaml configuration, from the planner."""
    if entry.library != "fmaml":
        return "", ""
    from benchmarks._workloads import WORKLOADS, conv4
    from fmaml._policy import resolve_policy

    spec = WORKLOADS[workload]
    carry = sum(p.numel() * 4 for p in conv4(spec.filters, spec.ways).parameters())
    if entry.options.get("batching", "vmap") == "vmap":
        carry *= entry.options.get("task_chunk") or spec.tasks
    if "route" in entry.options:  # the defaults: what they chose is reported by the run
        return "", ""
    policy = resolve_policy(entry.options.get("policy", "auto"))
    if policy.stores_all(k):
        return "all graphs", "1.00"
    plan = policy.plan(k, carry)
    evals = 2 * k + plan.evaluations - (k - 1)
    return str(plan.snapshots), f"{evals / k:.2f}"


def _skip(entry: Entry, workload: str, k: int, note: str, device: str) -> dict[str, Any]:
    return {
        "workload": workload,
        "k": k,
        "label": entry.label,
        "library": entry.library,
        "options": json.dumps(entry.options),
        "status": "skipped",
        "note": note,
        "device": device,
    }


def run_workload(
    workload: str,
    ks: Sequence[int],
    entries: Sequence[Entry],
    args: argparse.Namespace,
    grid: Grid,
    checkpoint: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure ``entries`` at each ``k``; ``checkpoint(rows so far)`` after every configuration
    (the caller writes them out, so that a run stopped midway keeps what it measured)."""
    import torch

    from benchmarks._peers import available, relative_error

    rows: list[dict[str, Any]] = []
    last: dict[str, tuple[int, float]] = {}  # label -> (k, peak bytes) of the largest measured k
    dead: dict[str, str] = {}  # label -> why larger k are skipped
    if args.labels:
        entries = [e for e in entries if e.label in args.labels]
    importable = {e.library: available(e.library) for e in entries}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            grads: dict[str, Any] = {}
            k_rows: list[dict[str, Any]] = []
            for entry in entries:
                if not importable[entry.library]:
                    if k == ks[0]:
                        rows.append(_skip(entry, workload, k, "not importable", args.device))
                    continue
                if entry.max_k is not None and k > entry.max_k:
                    k_rows.append(_skip(entry, workload, k, f"k > {entry.max_k}", args.device))
                    continue
                if entry.label in dead:
                    k_rows.append(_skip(entry, workload, k, dead[entry.label], args.device))
                    continue
                if entry.label in last:
                    k0, peak0 = last[entry.label]
                    estimate = peak0 * k / k0
                    if estimate > args.cap_gb * 1e9:
                        note = f"extrapolated peak {estimate / 1e9:.1f} GB > {args.cap_gb:g} GB cap"
                        dead[entry.label] = note
                        k_rows.append(_skip(entry, workload, k, note, args.device))
                        continue
                row = _measure_one(entry, workload, k, args, grid, tmp)
                k_rows.append(row)
                if row["status"] == "ok":
                    last[entry.label] = (k, row["peak_mib"] * MIB)
                    grads[entry.label] = row.pop("_grads")
                else:
                    dead[entry.label] = f"failed at k={k}"
                _progress(row, start)
                if checkpoint is not None:
                    checkpoint([*rows, *k_rows])  # "_grads" is popped from k_rows above
            ref_label = next(
                (e.label for e in entries if e.reference and e.label in grads),
                next((e.label for e in entries if e.library == "fmaml" and e.label in grads), None),
            )
            if ref_label is not None:
                ref = torch.load(grads[ref_label])
                for row in k_rows:
                    if row["label"] in grads:
                        row["rel_err"] = relative_error(torch.load(grads[row["label"]]), ref)
                        row["reference"] = ref_label
                        flag = "" if row["rel_err"] <= AGREEMENT_TOL else "   <-- DISAGREES"
                        print(
                            f"    agreement {workload} k={k} {row['label']:<40} "
                            f"rel err {row['rel_err']:.1e} vs {ref_label}{flag}",
                            flush=True,
                        )
            rows.extend(k_rows)
    return rows


def _measure_one(
    entry: Entry, workload: str, k: int, args: argparse.Namespace, grid: Grid, tmp: str
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "workload": workload,
        "k": k,
        "library": entry.library,
        "options": entry.options,
        "threads": args.threads,
        "device": args.device,
    }
    if workload == "B":
        config["warmup"] = 1
    else:
        config["warmup"] = 0
        config["warmup_k"] = min(k, 3)
    path = str(Path(tmp) / f"{workload}-{k}-{entry.label.replace(' ', '_')}.pt")
    snapshots, evals = _plan_info(entry, workload, k)
    row: dict[str, Any] = {
        "workload": workload,
        "k": k,
        "label": entry.label,
        "library": entry.library,
        "options": json.dumps(entry.options),
        "snapshots": snapshots,
        "evals_per_step": evals,
        "device": args.device,
        "measured": datetime.datetime.now().isoformat(timespec="seconds"),
        "fmaml_source": fmaml_source(),
    }
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    repeats = repeats_for(workload, k, grid)
    load = os.getloadavg()[0]
    try:
        if args.quick or str(args.device).startswith("cuda"):
            # one process: on the CPU (--quick) the times then come from the memory-mode run
            # (inflated, development only); on CUDA the allocator's peak needs no such mode
            mem = timed = measure(
                "suite", {**config, "repeats": repeats, "save": path}, timeout=args.timeout, env=env
            )
        else:
            mem = measure(
                "suite", {**config, "repeats": 1, "save": path}, timeout=args.timeout, env=env
            )
            timed = measure(
                "suite", {**config, "repeats": repeats}, memory=False, timeout=args.timeout, env=env
            )
    except MeasureError as error:
        why = "timed out" if error.returncode is None else f"exit status {error.returncode}"
        if error.returncode == -9:
            why += " (killed: out of memory?)"
        print(f"  FAILED {workload} k={k} {entry.label}: {why}\n{error.stderr[-1500:]}", flush=True)
        return {**row, "status": "failed", "note": why}
    return {
        **row,
        "status": "ok",
        "note": "",
        "peak_mib": mem["peak_bytes"] / MIB,
        "mem_run_wall_s": mem["seconds"],
        "wall_s": timed["seconds"],
        "cpu_s": timed["cpu_seconds"],
        "wall_times": json.dumps([round(t, 4) for t in timed["times"]]),
        "cpu_times": json.dumps([round(t, 4) for t in timed["cpu_times"]]),
        "repeats": repeats,
        "load": round((load + os.getloadavg()[0]) / 2, 2),
        "loss": mem["loss"],
        "grad_norm": mem["grad_norm"],
        "_grads": path,
        **mem.get("choice", {}),  # what fmaml chose, where it reports it (over the planner's)
    }


def _progress(row: dict[str, Any], start: float) -> None:
    elapsed = time.time() - start
    if row["status"] != "ok":
        print(
            f"  [{elapsed:6.0f}s] {row['workload']} k={row['k']:<6} {row['label']:<40} "
            f"{row['status']}: {row['note']}",
            flush=True,
        )
        return
    print(
        f"  [{elapsed:6.0f}s] {row['workload']} k={row['k']:<6} {row['label']:<40} "
        f"peak {row['peak_mib']:9.1f} MiB  wall {row['wall_s']:8.3f} s  CPU {row['cpu_s']:8.3f} s",
        flush=True,
    )


# --------------------------------------------------------------------------------------------
# CSV in and out


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_value(row.get(c)) for c in COLUMNS})


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_csv(path: Path) -> list[dict[str, Any]]:
    numeric = {
        "peak_mib",
        "mem_run_wall_s",
        "wall_s",
        "cpu_s",
        "loss",
        "grad_norm",
        "rel_err",
        "load",
    }
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if value == "":
                    row[key] = None
                elif key in numeric:
                    row[key] = float(value)
                elif key in ("k", "repeats"):
                    row[key] = int(value)
                else:
                    row[key] = value
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# analysis: lookups, extrapolation, targets


class Results:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def get(self, workload: str, k: int, label: str) -> dict[str, Any] | None:
        for row in self.rows:
            if (row["workload"], row["k"], row["label"]) == (workload, k, label):
                return row if row["status"] == "ok" else None
        return None

    def labels(self, workload: str) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            if row["workload"] == workload:
                seen.setdefault(row["label"])
        return list(seen)

    def ks(self, workload: str) -> list[int]:
        return sorted({row["k"] for row in self.rows if row["workload"] == workload})

    def series(self, workload: str, label: str) -> list[dict[str, Any]]:
        return sorted(
            (
                r
                for r in self.rows
                if r["workload"] == workload and r["label"] == label and r["status"] == "ok"
            ),
            key=lambda r: r["k"],
        )

    def note(self, workload: str, label: str) -> str | None:
        for row in self.rows:
            if row["workload"] == workload and row["label"] == label and row["status"] != "ok":
                return row["note"]
        return None


def largest_k_within(points: list[tuple[int, float]], limit: float) -> tuple[float, str]:
    """The largest ``k`` whose peak stays within ``limit``, from measured ``(k, peak)`` points.

    Inside the measured range: linear interpolation between the bracketing points. Beyond it: a
    power law ``peak = c * k**a`` through the two largest measured points (``a`` about 1 for
    store-everything libraries, 1/2 for sqrt checkpointing, 0 when the peak stops growing).
    """
    points = sorted(points)
    for (k0, p0), (k1, p1) in itertools.pairwise(points):
        if p0 <= limit < p1:
            return k0 + (k1 - k0) * (limit - p0) / (p1 - p0), "interpolated"
    if points[0][1] > limit:
        return 0.0, "exceeds the limit at the smallest k"
    if len(points) < 2:
        return float("nan"), "one point"
    (k0, p0), (k1, p1) = points[-2], points[-1]
    a = math.log(p1 / p0) / math.log(k1 / k0) if p0 > 0 and p1 > 0 else 0.0
    if a < 0.05:
        return math.inf, f"extrapolated: peak flat beyond k={k1:,} (exponent {a:.2f})"
    return k1 * (limit / p1) ** (1 / a), f"extrapolated (peak ~ k^{a:.2f})"


@dataclass
class Target:
    name: str
    passed: bool | None  # None: not measured
    detail: str

    def line(self) -> str:
        word = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"{word}  {self.name}: {self.detail}"


def targets(res: Results) -> list[Target]:
    """The targets of issue 12 ("fast by default"), judged on CPU time: the defaults, through
    ``torch.func.grad`` and through ``.backward()``, each against the peers."""
    out: list[Target] = []
    labels = [e.label for e in DEFAULTS]
    b_rows = [r for r in res.rows if r["workload"] == "B" and r["status"] == "ok"]
    peers = [r for r in b_rows if r["library"] != "fmaml"]
    for label in labels:
        mine = next((r for r in b_rows if r["label"] == label), None)
        if not (mine and peers):
            out.append(Target(f"B: {label} vs the fastest peer", None, "not measured"))
            continue
        best = min(peers, key=lambda r: r["cpu_s"])
        cpu, mem = mine["cpu_s"] / best["cpu_s"], mine["peak_mib"] / best["peak_mib"]
        out.append(
            Target(
                f"B: {label} <= 1.0x the fastest peer's time",
                cpu <= 1.0,
                f"CPU {mine['cpu_s']:.3f} s vs {best['label']} {best['cpu_s']:.3f} s = {cpu:.2f}x",
            )
        )
        out.append(
            Target(
                f"B: {label} <= 1.5x the fastest peer's peak",
                mem <= 1.5,
                f"{mine['peak_mib']:.1f} MiB vs {best['label']} {best['peak_mib']:.1f} MiB = "
                f"{mem:.2f}x",
            )
        )
    l2l = res.get("A", 100, "learn2learn")
    name = "learn2learn" if l2l else "higher"
    peer = l2l or res.get("A", 100, "higher")
    rows = {label: res.get("A", 100, label) for label in labels}
    for label, mine in rows.items():
        if not (mine and peer):
            out.append(Target(f"A k=100: {label} vs {name}", None, "not measured"))
            continue
        cpu, mem = mine["cpu_s"] / peer["cpu_s"], mine["peak_mib"] / peer["peak_mib"]
        out.append(
            Target(
                f"A k=100: {label} <= 1.3x {name}'s time",
                cpu <= 1.3,
                f"CPU {mine['cpu_s']:.2f} s vs {peer['cpu_s']:.2f} s = {cpu:.2f}x",
            )
        )
        out.append(
            Target(
                f"A k=100: {label} <= 1/20 of {name}'s peak",
                mem <= 1 / 20,
                f"{mine['peak_mib']:.1f} MiB vs {peer['peak_mib']:.1f} MiB = 1/{1 / mem:.1f}",
            )
        )
    g, b = rows.values()
    if g and b:
        cpu, mem = g["cpu_s"] / b["cpu_s"], g["peak_mib"] / b["peak_mib"]
        out.append(
            Target(
                "A k=100: the torch.func.grad route within 1.1x of .backward() (time and peak)",
                cpu <= 1.1 and mem <= 1.1,
                f"CPU {cpu:.2f}x, peak {mem:.2f}x ({g['peak_mib']:.1f} vs {b['peak_mib']:.1f} MiB)",
            )
        )
    binomial = res.get("C", 10000, "fmaml binomial")
    for label in labels:
        mine = res.get("C", 10000, label)
        if not mine:
            out.append(Target(f"C k=10,000: {label}", None, "not measured"))
            continue
        out.append(
            Target(
                f"C k=10,000: {label} inside 1 GiB",
                mine["peak_mib"] * MIB <= GIB,
                f"peak {mine['peak_mib']:.1f} MiB",
            )
        )
        if binomial:
            cpu = mine["cpu_s"] / binomial["cpu_s"]
            out.append(
                Target(
                    f"C k=10,000: {label} no slower than binomial",
                    cpu <= 1.0,
                    f"CPU {mine['cpu_s']:.0f} s vs {binomial['cpu_s']:.0f} s = {cpu:.2f}x",
                )
            )
    return out


def _fmt_k(k: float) -> str:
    if math.isinf(k):
        return "unbounded"
    if math.isnan(k):
        return "?"
    return f"{k:,.0f}"


# --------------------------------------------------------------------------------------------
# markdown


def _cell(row: dict[str, Any] | None, key: str, fmt: str) -> str:
    return "-" if row is None or row.get(key) is None else format(row[key], fmt)


def _grid_table(res: Results, workload: str, key: str, fmt: str, what: str) -> str:
    ks = res.ks(workload)
    lines = [
        f"| {what} | " + " | ".join(f"k={k:,}" for k in ks) + " |",
        "| --- | " + " | ".join("---:" for _ in ks) + " |",
    ]
    for label in res.labels(workload):
        if not res.series(workload, label):
            continue
        cells = []
        for k in ks:
            row = res.get(workload, k, label)
            cells.append(_cell(row, key, fmt) if row else _skipped_mark(res, workload, k, label))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _skipped_mark(res: Results, workload: str, k: int, label: str) -> str:
    for row in res.rows:
        if (row["workload"], row["k"], row["label"]) == (workload, k, label):
            return "failed" if row["status"] == "failed" else "skipped"
    return "-"


def _missing(res: Results, workload: str) -> list[str]:
    out = []
    for label in res.labels(workload):
        notes = sorted(
            {
                f"k={r['k']:,}: {r['note']}"
                for r in res.rows
                if r["workload"] == workload and r["label"] == label and r["status"] != "ok"
            },
            key=lambda s: int(s.split(":")[0][2:].replace(",", "")),
        )
        if notes:
            shown = notes if len(notes) <= 3 else [notes[0], "...", notes[-1]]
            out.append(f"- {label}: " + "; ".join(shown))
    return out


def _agreement(res: Results, workload: str) -> str:
    parts = []
    for label in res.labels(workload):
        errs = [r["rel_err"] for r in res.series(workload, label) if r.get("rel_err") is not None]
        if errs:
            flag = "" if max(errs) <= AGREEMENT_TOL else " **(disagrees)**"
            parts.append(f"{label} {max(errs):.1e}{flag}")
    return "; ".join(parts)


def detail_table(res: Results, workload: str, k: int, base: str) -> str:
    ref = res.get(workload, k, base)
    lines = [
        f"| library (k={k:,}) | peak MiB | peak vs {base} | CPU s | CPU vs {base} | wall s "
        f"| wall vs {base} | snapshots | step evaluations per step | rel. error vs store_all |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in res.labels(workload):
        row = res.get(workload, k, label)
        if row is None:
            continue

        def ratio(key: str, row: dict[str, Any] = row) -> str:
            return f"{row[key] / ref[key]:.3f}" if ref and ref.get(key) else "-"

        lines.append(
            f"| {label} | {row['peak_mib']:.1f} | {ratio('peak_mib')} | {row['cpu_s']:.2f} | "
            f"{ratio('cpu_s')} | {row['wall_s']:.2f} | {ratio('wall_s')} | "
            f"{row.get('snapshots') or '-'} | {row.get('evals_per_step') or '-'} | "
            f"{_rel_err(row)} |"
        )
    return "\n".join(lines)


def _rel_err(row: dict[str, Any]) -> str:
    """The relative error, naming its reference when that is not fmaml store_all."""
    text = _cell(row, "rel_err", ".1e")
    ref = row.get("reference") or ""
    if text != "-" and ref and "store_all" not in ref:
        text += f" (vs {ref})"
    return text


def b_table(res: Results) -> str:
    rows = [r for r in res.rows if r["workload"] == "B" and r["status"] == "ok"]
    if not rows:
        return "(not measured)"
    peers = [r for r in rows if r["library"] != "fmaml"]
    best_cpu = min(peers, key=lambda r: r["cpu_s"]) if peers else None
    best_wall = min(peers, key=lambda r: r["wall_s"]) if peers else None
    lines = [
        "| configuration | median CPU s | CPU vs fastest peer | median wall s | wall vs fastest "
        "peer | peak MiB | snapshots | step evaluations per step | rel. error vs store_all |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cpu = f"{r['cpu_s'] / best_cpu['cpu_s']:.2f}" if best_cpu else "-"
        wall = f"{r['wall_s'] / best_wall['wall_s']:.2f}" if best_wall else "-"
        lines.append(
            f"| {r['label']} | {r['cpu_s']:.3f} | {cpu} | {r['wall_s']:.3f} | {wall} | "
            f"{r['peak_mib']:.1f} | {r.get('snapshots') or '-'} | {r.get('evals_per_step') or '-'} "
            f"| {_rel_err(r)} |"
        )
    if best_cpu:
        lines.append("")
        lines.append(
            f"Fastest peer: {best_cpu['label']} (CPU), {best_wall['label']} (wall). Median of "
            f"{rows[0]['repeats']} meta-steps after one warm-up meta-step."
        )
    return "\n".join(lines)


def c_limit_table(res: Results) -> str:
    lines = [
        "| library | largest measured k | its peak MiB | largest k within 1 GiB | how |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for label in res.labels("C"):
        series = res.series("C", label)
        if not series:
            continue
        points = [(r["k"], r["peak_mib"] * MIB) for r in series]
        k_max, how = largest_k_within(points, GIB)
        if how == "interpolated":
            how = "interpolated between measured points"
        last = series[-1]
        shown = _fmt_k(k_max)
        if math.isinf(k_max):
            shown = f"> {last['k']:,} (memory flat)"
        lines.append(f"| {label} | {last['k']:,} | {last['peak_mib']:.1f} | {shown} | {how} |")
    return "\n".join(lines)


def _provenance(res: Results, workload: str) -> str:
    rows = [r for r in res.rows if r["workload"] == workload and r["status"] == "ok"]
    if not rows:
        return ""
    times = sorted(r["measured"] for r in rows if r.get("measured"))
    loads = [r["load"] for r in rows if r.get("load") is not None]
    sources = sorted({r["fmaml_source"] for r in rows if r.get("fmaml_source")})
    parts = []
    if times:
        parts.append(f"measured {times[0].replace('T', ' ')} to {times[-1].replace('T', ' ')}")
    if loads:
        parts.append(f"load average {min(loads):.1f} to {max(loads):.1f}")
    if sources:
        parts.append(f"fmaml sources {', '.join(sources)}")
    return "Provenance: " + "; ".join(parts) + "." if parts else ""


def _protocol(device: str) -> str:
    """How peak and time were taken on ``device``."""
    if device.startswith("cuda"):
        how = (
            "Peak: `torch.cuda.max_memory_allocated()` above the allocation after warm-up, one "
            "meta-gradient. Time: the same fresh process, `torch.cuda.synchronize()` before "
            "each clock reading"
        )
    else:
        how = (
            "Peak: resident-set high-water mark above the baseline after warm-up, one "
            "meta-gradient, fresh process with `MALLOC_MMAP_THRESHOLD_=65536`. Time: a second "
            "fresh process without it"
        )
    return (
        f"{how}; median wall and CPU time (`time.process_time`). MiB = 2^20 bytes. Relative "
        "error: `||g - g_store_all|| / ||g_store_all||` (float32)."
    )


def markdown(res: Results, meta: dict[str, str], target_list: list[Target]) -> str:
    from benchmarks._workloads import describe

    out = [
        "# fmaml benchmark suite: results",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        f"Machine: {meta['machine']}; {meta['threads']} torch thread(s) per process; device "
        f"{meta['device']}.",
        "",
        _protocol(meta["device"]),
        "",
        "## Targets",
        "",
        "```",
        *[t.line() for t in target_list],
        "```",
    ]
    if any(r["workload"] == "A" for r in res.rows):
        out += [
            "",
            "## A: long inner loops",
            "",
            f"Workload: {describe('A')}.",
            "",
            _provenance(res, "A"),
            "",
            "Peak memory, MiB above baseline:",
            "",
            _grid_table(res, "A", "peak_mib", ".1f", "library"),
            "",
            "CPU time of one meta-gradient, s:",
            "",
            _grid_table(res, "A", "cpu_s", ".2f", "library"),
            "",
            "Wall time of one meta-gradient, s:",
            "",
            _grid_table(res, "A", "wall_s", ".2f", "library"),
            "",
        ]
        k_detail = 100 if res.get("A", 100, "higher") else max(res.ks("A"))
        out += [detail_table(res, "A", k_detail, "higher"), ""]
        if res.get("A", 400, DEFAULTS[0].label):
            out += [detail_table(res, "A", 400, "higher"), ""]
        out += [
            "Not measured:",
            "",
            *_missing(res, "A"),
            "",
            f"Largest relative error over k: {_agreement(res, 'A')}.",
            "",
            "![A: peak memory vs k, and CPU time relative to higher](a_scaling.png)",
        ]
    if any(r["workload"] == "B" for r in res.rows):
        out += [
            "",
            "## B: typical MAML (16 tasks, 5-way 1-shot, k=5)",
            "",
            f"Workload: {describe('B')}.",
            "",
            _provenance(res, "B"),
            "",
            b_table(res),
            "",
            *_missing(res, "B"),
            "",
            "![B: meta-step time](b_times.png)",
        ]
    if any(r["workload"] == "C" for r in res.rows):
        out += [
            "",
            "## C: scaling to long inner loops",
            "",
            f"Workload: {describe('C')}.",
            "",
            _provenance(res, "C"),
            "",
            "Peak memory, MiB above baseline:",
            "",
            _grid_table(res, "C", "peak_mib", ".1f", "library"),
            "",
            "CPU time of one meta-gradient, s:",
            "",
            _grid_table(res, "C", "cpu_s", ".2f", "library"),
            "",
            "Wall time of one meta-gradient, s:",
            "",
            _grid_table(res, "C", "wall_s", ".2f", "library"),
            "",
            "Largest k whose meta-gradient fits in 1 GiB (peak above baseline):",
            "",
            c_limit_table(res),
            "",
            *_missing(res, "C"),
            "",
            f"Largest relative error over k: {_agreement(res, 'C')}.",
            "",
            "![C: peak memory and CPU time per inner step vs k](c_scaling.png)",
        ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# plots

_STYLE = {
    "fmaml store_all": ("tab:blue", ":", "o"),
    "fmaml sqrt": ("tab:cyan", "--", "s"),
    "fmaml binomial": ("tab:purple", "--", "D"),
    "fmaml defaults, grad": ("tab:blue", "-", "o"),
    "fmaml defaults, backward": ("navy", "-.", "x"),
    "fmaml auto": ("tab:blue", "--", "o"),
    "torch.func unroll": ("tab:gray", "-", "v"),
    "higher": ("tab:red", "-", "^"),
    "torch_maml, ckpt every ceil(sqrt(k))": ("tab:orange", "-", "<"),
    "torch_maml, ckpt every step": ("tab:brown", "-", ">"),
    "torchopt MetaSGD": ("tab:green", "-", "P"),
    "learn2learn": ("tab:pink", "-", "*"),
}


def plot_scaling(
    res: Results, workload: str, path: Path, limit_gib: float | None, relative_to: str | None
) -> None:
    """Peak memory vs k (log-log) and CPU time: relative to ``relative_to`` at the same k when
    given, else per inner step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(13, 5.2))
    base = {r["k"]: r["cpu_s"] for r in res.series(workload, relative_to)} if relative_to else {}
    for label in res.labels(workload):
        series = res.series(workload, label)
        if not series:
            continue
        color, ls, marker = _STYLE.get(label, (None, "-", "o"))
        kw = {"color": color, "linestyle": ls, "marker": marker, "label": label, "markersize": 5}
        ax_mem.plot([r["k"] for r in series], [max(r["peak_mib"], 0.1) for r in series], **kw)
        if relative_to:
            pts = [(r["k"], r["cpu_s"] / base[r["k"]]) for r in series if r["k"] in base]
        else:
            pts = [(r["k"], 1000 * r["cpu_s"] / r["k"]) for r in series]
        if pts:
            ax_time.plot(*zip(*pts, strict=True), **kw)
    if limit_gib:
        ax_mem.axhline(limit_gib * 1024, color="black", lw=0.8, ls="--")
        ax_mem.annotate(
            f"{limit_gib:g} GiB",
            (0.02, limit_gib * 1024),
            xycoords=("axes fraction", "data"),
            textcoords="offset points",
            xytext=(0, 4),
            fontsize=8,
        )
    ax_mem.set_yscale("log")
    ax_mem.set_ylabel("peak memory above baseline (MiB)")
    ax_mem.set_title(f"Workload {workload}: peak memory of one meta-gradient")
    if relative_to:
        ax_time.axhline(1.0, color="black", lw=0.8)
        ax_time.set_ylabel(f"CPU time / CPU time of {relative_to} at the same k")
        ax_time.set_title(f"Workload {workload}: CPU time relative to {relative_to}")
    else:
        ax_time.set_yscale("log")
        ax_time.set_ylabel("CPU time per inner step (ms)")
        ax_time.set_title(f"Workload {workload}: CPU time per inner step")
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log")
        ax.set_xlabel("inner steps k")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax_mem.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_b(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res.rows if r["workload"] == "B" and r["status"] == "ok"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    ys = range(len(rows))
    colors = ["tab:blue" if r["library"] == "fmaml" else "tab:red" for r in rows]
    ax.barh(list(ys), [r["cpu_s"] for r in rows], color=colors, alpha=0.8, label="CPU time")
    ax.scatter(
        [r["wall_s"] for r in rows],
        list(ys),
        color="black",
        marker="|",
        s=120,
        label="wall time",
        zorder=3,
    )
    ax.set_yticks(list(ys), [r["label"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median meta-step time (s), 16 tasks, k=5")
    ax.set_title("Workload B: typical MAML meta-step (blue: fmaml, red: peers)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="reduced grid, a few minutes")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["A", "B", "C"],
        help="run these workloads and merge them into the existing results.csv",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="no runs: tables and plots from the existing results.csv",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: docs/benchmarks; with --quick: build/benchmarks-quick)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--cap-gb",
        type=float,
        default=8.0,
        help="skip configurations whose extrapolated peak exceeds this (default 8 GB)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="per child, seconds")
    parser.add_argument(
        "--ks",
        type=lambda text: [int(k) for k in text.split(",")],
        help="comma-separated k values for workloads A and C instead of the grid's",
    )
    parser.add_argument(
        "--labels",
        type=lambda text: text.split(";"),
        help="';'-separated library labels to run (labels hold commas; default: all)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda: CUDA peak allocated memory, synchronised wall time, one "
        "process per configuration",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = ROOT / ("build/benchmarks-quick" if args.quick else "docs/benchmarks")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if serve_child(args.child, setup, report):
        return 0
    csv_path = args.out / "results.csv"
    grid = QUICK if args.quick else FULL
    rows: list[dict[str, Any]] = []
    if args.render or args.only:
        rows = read_csv(csv_path) if csv_path.exists() else []
    if not args.render:
        workloads = args.only or ["B", "A", "C"]
        rows = [r for r in rows if r["workload"] not in workloads]
        print(
            f"benchmarks.suite: {'quick' if args.quick else 'full'} grid, workloads "
            f"{', '.join(workloads)}; {machine()}; {args.threads} thread(s)",
            flush=True,
        )
        began = time.time()
        for workload in workloads:
            print(f"workload {workload}", flush=True)
            done = list(rows)

            def save(measured: list[dict[str, Any]], done: list[dict[str, Any]] = done) -> None:
                write_csv([*done, *measured], csv_path)  # a run stopped midway keeps its rows

            if workload == "A":
                new = run_workload("A", args.ks or grid.a_ks, entries_a(), args, grid, save)
            elif workload == "B":
                new = run_workload("B", [5], entries_b(), args, grid, save)
            else:
                c_ks, c_max = args.ks or grid.c_ks, grid.c_peer_max_k
                new = run_workload("C", c_ks, entries_c(c_max), args, grid, save)
            rows += new
            write_csv(rows, csv_path)
        print(f"benchmarks.suite: measured in {(time.time() - began) / 60:.1f} min", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    machine_file = args.out / "machine.txt"  # the measuring machine, for a later --render
    if args.render and machine_file.exists():
        measured_on = machine_file.read_text().strip()
    else:
        measured_on = machine()
        if not args.render:
            machine_file.write_text(measured_on + "\n")
    res = Results(rows)
    target_list = targets(res)
    meta = {
        "command": "bash scripts/dev python -m benchmarks.suite"
        + (" --quick" if args.quick else "")
        + (" --render" if args.render else "")
        + (f" --only {' '.join(args.only)}" if args.only else "")
        + (f" --device {args.device}" if args.device != "cpu" else ""),
        "date": datetime.date.today().isoformat(),
        "machine": measured_on,
        "threads": str(args.threads),
        "device": args.device,
    }
    (args.out / "results.md").write_text(markdown(res, meta, target_list))
    if res.series("A", DEFAULTS[0].label):
        plot_scaling(res, "A", args.out / "a_scaling.png", None, relative_to="higher")
    plot_b(res, args.out / "b_times.png")
    if res.series("C", DEFAULTS[0].label):
        plot_scaling(res, "C", args.out / "c_scaling.png", 1.0, relative_to=None)
    print()
    for t in target_list:
        print(t.line())
    print(f"\nwrote {csv_path}, results.md and plots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
