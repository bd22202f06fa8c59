"""Where one configuration of the suite spends its time and memory.

    bash scripts/dev python -m benchmarks.maml_profile A 100 "fmaml auto" --against higher
    bash scripts/dev python -m benchmarks.maml_profile B 5 "fmaml store_all, loop" --against higher

Three views of one meta-gradient of a suite configuration (labels as in ``benchmarks.suite``),
each after a warm-up, with one torch thread:

1. **Phases** (cProfile, this process): CPU time of one meta-gradient split into fmaml's scan
   forward sweep (steps evaluated without a graph), the recomputations of its backward pass
   (``Advance`` actions), its pull-backs (each step evaluated again with a graph and
   differentiated, ``torch.func.vjp``), and the rest (query loss, meta-gradient bookkeeping).
   cProfile (timed with ``time.process_time``) adds overhead to Python calls, so the shares,
   not the seconds, are the result.
2. **Operators** (``torch.profiler``, this process): self CPU time per aten operator, grouped
   (convolutions, their backward passes, pooling, elementwise, ...), and the time outside any
   operator (Python, torch.func transforms, autograd bookkeeping), for the configuration and
   for ``--against`` (a peer) on the same workload. The profiler's clock is wall time: run it
   on a quiet machine.
3. **Memory** (fresh processes, ``benchmarks._memory``): the peak of the configuration and of
   ``--against`` at ``k`` and at ``k = 0`` (the query loss alone) and ``k = 1``, so that the
   peak splits into the query pass, one inner step, and what grows with ``k``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

MIB = 2**20

GROUPS = (
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("convolution", "conv2d", "mkldnn_convolution", "_convolution")),
    ("max-pool (fwd + bwd)", ("max_pool", "pool2d")),
    ("ReLU / threshold (fwd + bwd)", ("relu", "threshold")),
    ("linear / matmul", ("addmm", "mm", "bmm", "matmul", "linear")),
    ("loss (log-softmax, nll)", ("softmax", "nll", "cross_entropy")),
    ("elementwise (add, mul, sub, ...)", ("add", "mul", "sub", "div", "neg", "where")),
    ("copies, views, allocation", ("copy", "clone", "empty", "zeros", "fill", "view", "reshape",
                                   "expand", "as_strided", "permute", "transpose", "cat", "stack",
                                   "select", "slice", "unsqueeze", "squeeze", "contiguous", "_to",
                                   "detach", "alias", "t")),
)  # fmt: skip


#: Operators whose number of calls is printed (one call per convolution, whatever the backend).
COUNTED = ("aten::convolution", "aten::convolution_backward", "aten::max_pool2d_with_indices")


def _entry(label: str):
    from benchmarks import suite

    entries = {e.label: e for e in (*suite.entries_a(), *suite.entries_b(), *suite.entries_c(1))}
    if label not in entries:
        raise SystemExit(f"unknown label {label!r}; one of: {sorted(entries)}")
    return entries[label]


def _run(workload: str, k: int, label: str) -> Callable[[], Any]:
    from benchmarks import suite

    entry = _entry(label)
    config = {"workload": workload, "k": k, "library": entry.library, "options": entry.options}
    run = suite.setup({**config, "warmup_k": min(k, 3)} if workload != "B" else config)
    run()  # a full warm-up
    return run


# --------------------------------------------------------------------------------------------
# 1. phases


def phases(workload: str, k: int, label: str) -> dict[str, float]:
    run = _run(workload, k, label)
    prof = cProfile.Profile(time.process_time)  # CPU time: steady on a shared machine
    start = time.process_time()
    prof.enable()
    run()
    prof.disable()
    total = time.process_time() - start
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)

    def cumulative(file_end: str, name: str, caller: str | None = None) -> float:
        out = 0.0
        for (file, _, func), (_, _, _, ct, callers) in stats.items():
            if file.endswith(file_end) and func == name:
                if caller is None:
                    out += ct
                else:
                    out += sum(
                        c[3] for (f, _, fn), c in callers.items() if fn == caller and f == file
                    )
        return out

    fwd = cumulative("_scan.py", "forward")
    pull = cumulative("_scan.py", "_pull_back")
    recompute = cumulative("_scan.py", "call_step", caller="checkpointed")
    store_all = cumulative("_scan.py", "_store_all")
    profiled = sum(v[2] for v in stats.values())  # total internal time seen by cProfile
    out = {
        "total CPU s (under cProfile)": total,
        "scan forward sweep (no graph)": fwd,
        "backward: recomputation (no graph)": recompute,
        "backward: pull-backs (step with graph + vjp)": pull,
        "store_all unroll (steps with graph)": store_all,
    }
    out["rest (query loss, meta-gradient backward outside the scan, bookkeeping)"] = max(
        profiled - fwd - pull - recompute - store_all, 0.0
    )
    out["_profiled"] = profiled
    layers: dict[str, float] = defaultdict(float)
    for (file, _, func), (_, _, tt, _, _) in stats.items():
        layers[_layer(file, func)] += tt
    out["_layers"] = dict(layers)
    return out


def _layer(file: str, func: str) -> str:
    """Which software layer a cProfile entry's own time belongs to."""
    if file == "~":  # a C function called from Python
        if "run_backward" in func:
            return "C++: autograd engine (backward passes and their kernels)"
        if "functorch" in func:
            return "C++: torch.func levels and wrappers"
        return "C++: operators called from Python (forward kernels and others)"
    for key, name in (
        ("fmaml/", "Python: fmaml"),
        ("torch/_functorch", "Python: torch.func"),
        ("torch/nn/", "Python: torch.nn (modules, functional_call)"),
        ("torch/autograd", "Python: torch.autograd"),
        ("optree", "Python: optree"),
        ("higher/", "Python: the peer library"),
        ("torch_maml/", "Python: the peer library"),
        ("torchopt/", "Python: the peer library"),
    ):
        if key in file:
            return name
    return "Python: other (torch, benchmark)"


# --------------------------------------------------------------------------------------------
# 2. operators


def operators(workload: str, k: int, label: str) -> tuple[float, dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    run = _run(workload, k, label)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    wall = time.perf_counter() - start
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    calls = {}
    for event in prof.key_averages():
        if event.key in COUNTED:
            calls[event.key.removeprefix("aten::")] = int(event.count)
        name = event.key.removeprefix("aten::")
        if not event.key.startswith("aten::"):
            continue
        group = "other aten ops"
        for title, keys in GROUPS:
            if any(name == key or name.startswith(key) for key in keys):
                group = title
                break
        groups[group][0] += event.self_cpu_time_total / 1e6
        groups[group][1] += event.count
    out: dict[str, Any] = {g: (v[0], int(v[1])) for g, v in groups.items()}
    out["_calls"] = calls
    return wall, out


# --------------------------------------------------------------------------------------------
# 3. memory


def memory(workload: str, ks: Sequence[int], label: str) -> dict[int, float]:
    from benchmarks._memory import MeasureError, measure

    entry = _entry(label)
    out = {}
    for k in ks:
        config = {
            "workload": workload,
            "k": k,
            "library": entry.library,
            "options": entry.options,
            "threads": 1,
            "warmup": 1,
            "repeats": 1,
        }
        try:
            out[k] = measure("suite", config, env={"OMP_NUM_THREADS": "1"})["peak_bytes"] / MIB
        except MeasureError:
            out[k] = float("nan")
    return out


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.maml_profile", description=__doc__)
    parser.add_argument("workload", choices=["A", "B", "C"])
    parser.add_argument("k", type=int)
    parser.add_argument("label", help='a suite label, e.g. "fmaml auto"')
    parser.add_argument("--against", default="higher", help="a peer's label (default: higher)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["phases", "ops", "memory"])
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    w, k = args.workload, args.k
    print(f"maml_profile: workload {w}, k={k}, {args.label} (against {args.against})\n")
    if "phases" not in args.skip:
        for label in (args.label, args.against):
            p = phases(w, k, label)
            seen = p.pop("_profiled")
            layers = p.pop("_layers")
            total = p.pop("total CPU s (under cProfile)")
            print(f"phases of {label}: {total:.2f} s CPU under cProfile ({seen:.2f} s profiled)")
            for name, sec in p.items():
                if sec > 0:
                    print(f"  {name:<72} {sec:8.2f} s  {100 * sec / seen:5.1f} %")
            print("  own time by layer:")
            for name, sec in sorted(layers.items(), key=lambda kv: -kv[1]):
                print(f"    {name:<70} {sec:8.2f} s  {100 * sec / seen:5.1f} %")
            print()
    if "ops" not in args.skip:
        results = {label: operators(w, k, label) for label in (args.label, args.against)}
        names = sorted(
            {g for _, groups in results.values() for g in groups if g != "_calls"},
            key=lambda g: -results[args.label][1].get(g, (0, 0))[0],
        )
        a, b = args.label, args.against
        print(
            "operators (torch.profiler, self time per group as a share of the time inside aten "
            "ops; the profiler's clock is wall time, so on a busy machine read the shares):"
        )
        print(f"  {'group':<36} {a[:24]:>24} {b[:24]:>24}")
        inside = {
            label: sum(v[0] for g, v in results[label][1].items() if g != "_calls")
            for label in (a, b)
        }
        for g in names:
            ta = results[a][1].get(g, (0.0, 0))[0]
            tb = results[b][1].get(g, (0.0, 0))[0]
            print(f"  {g:<36} {100 * ta / inside[a]:23.1f}% {100 * tb / inside[b]:23.1f}%")
        for label in (a, b):
            wall, groups = results[label]
            calls = groups.get("_calls", {})
            print(
                f"  {label}: {wall:.2f} s wall under the profiler, {inside[label]:.2f} s inside "
                f"aten ops, {100 * (wall - inside[label]) / wall:.0f} % outside (Python, "
                f"torch.func, autograd engine, profiler); calls: {calls}"
            )
        print()
    if "memory" not in args.skip:
        ks = sorted({0, 1, k})
        print("memory (fresh processes, MiB above baseline):")
        for label in (args.label, args.against):
            peaks = memory(w, ks, label)
            shown = ", ".join(f"k={kk}: {v:.1f}" for kk, v in peaks.items())
            print(f"  {label:<40} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
