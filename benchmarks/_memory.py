"""Peak memory and time of one benchmark configuration, each in a fresh process.

Why a fresh process, and why the environment variable (see ``../shared/NOTES.md``, "Measuring peak
memory on the CPU"): glibc raises its mmap threshold after large blocks are freed, so later
tensors come from the heap and the resident set stays high after they die. A process started with
``MALLOC_MMAP_THRESHOLD_=65536`` keeps the threshold fixed, so freed tensors go back to the system
and the high-water mark measures live memory. One configuration per process keeps runs from
inheriting each other's heap.

Protocol. The parent calls :func:`measure` ``(module, config)``, which runs
``python -m benchmarks.<module> --child '<config as JSON>'``. That module's ``main`` hands the
config to :func:`child` with a ``setup(config) -> run`` function. :func:`child`:

1. calls ``setup`` (build data and models) and ``run()`` ``config["warmup"]`` times (default 1);
2. resets the high-water mark (``/proc/self/clear_refs`` <- ``5``) and takes ``VmRSS`` as the
   baseline (on CUDA: ``torch.cuda.reset_peak_memory_stats()`` and ``memory_allocated()``);
3. calls ``run()`` ``config["repeats"]`` times (default 1), timing each;
4. reads ``VmHWM`` (CUDA: ``max_memory_allocated()``) and prints one result line, which
   :func:`measure` parses: ``peak_bytes`` (above the baseline), ``seconds`` (median wall time),
   ``cpu_seconds`` (median CPU time of the process, all its threads; steadier than wall time on
   a shared machine), ``baseline_bytes``, and whatever the optional ``report(output)`` returns.

Pass ``memory=False`` to :func:`measure` for runs whose time you report: the fixed mmap
threshold slows allocation-heavy code down. A child that fails (an exception, a kill by the
out-of-memory killer, a timeout) raises :class:`MeasureError`, whose ``returncode`` tells which.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "MeasureError", "child", "machine", "measure"]

ROOT = Path(__file__).resolve().parent.parent
_MARK = "BENCHMARK-RESULT "
_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


class MeasureError(RuntimeError):
    """A measured child failed. ``returncode``: its exit status (negative: killed by that signal,
    e.g. -9 by the out-of-memory killer; None: timed out); ``stderr``: the end of its stderr."""

    def __init__(self, message: str, returncode: int | None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def measure(
    module: str,
    config: dict[str, Any],
    *,
    memory: bool = True,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``config`` of ``benchmarks.<module>`` in a fresh process; return its result.

    Args:
        module: the benchmark module's name inside ``benchmarks`` (e.g. ``"scan_memory"``); its
            ``main`` must pass ``--child JSON`` on to :func:`child`.
        config: a JSON-serialisable dict, given to the module's ``setup``. :func:`child` reads
            ``warmup`` (default 1), ``repeats`` (default 1), ``threads`` (default: torch's) and
            ``device`` (default ``"cpu"``).
        memory: start the child with ``MALLOC_MMAP_THRESHOLD_=65536`` so that its CPU peak is
            meaningful. The fixed threshold makes every large allocation an ``mmap`` and costs
            time (measured here: the 20-step meta-gradient of ``scan_memory`` ran 1.5 to 2 times
            slower), so pass ``memory=False`` for a run whose time you report; its
            ``peak_bytes`` then overstates.
        timeout: seconds before the child is killed (None: no limit).
        env: extra environment variables for the child (e.g. ``{"OMP_NUM_THREADS": "1"}``).

    Returns:
        ``{"peak_bytes", "seconds", "times", "cpu_seconds", "cpu_times", "baseline_bytes",
        "memory", ...}``
        plus the fields returned by the child's ``report``.
    """
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--child", json.dumps(config)]
    child_env = dict(os.environ)
    child_env.pop("MALLOC_MMAP_THRESHOLD_", None)
    child_env.update(env or {})
    if memory:
        child_env.update(_ENV)
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise MeasureError(
            f"measure: benchmarks.{module} timed out after {timeout} s on {config}.", None
        ) from error
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        raise MeasureError(
            f"measure: benchmarks.{module} failed on {config} (exit status {proc.returncode}).\n"
            f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}",
            proc.returncode,
            proc.stderr[-4000:],
        )
    return json.loads(lines[-1][len(_MARK) :])


def serve_child(
    spec: str | None,
    setup: Callable[[dict[str, Any]], Callable[[], Any]],
    report: Callable[[dict[str, Any]], Callable[[Any], dict[str, Any]] | None] | None = None,
) -> bool:
    """A benchmark script's child side: with ``spec`` (its ``--child`` JSON, which
    :func:`measure` passes), measure that configuration (:func:`child`; ``report(config)`` gives
    the extra fields) and return True; without, return False (this is the parent)."""
    if spec is None:
        return False
    config = json.loads(spec)
    child(config, setup, None if report is None else report(config))
    return True


def child(
    config: dict[str, Any],
    setup: Callable[[dict[str, Any]], Callable[[], Any]],
    report: Callable[[Any], dict[str, Any]] | None = None,
) -> None:
    """The child side of :func:`measure`: set up, warm up, measure, print the result line."""
    import torch

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    cuda = str(config.get("device", "cpu")).startswith("cuda")
    if cuda:
        # True float32: TF32 convolutions and matmuls (on by default for cuDNN on Ampere and
        # later) round to 10 mantissa bits, and a long unroll amplifies that into meta-gradients
        # that differ between libraries and between runs (docs/benchmarks.md, GPU section).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
    # Modules that torch imports on first use belong to the baseline, not to a meta-step: any
    # `torch.autograd.grad(..., grad_outputs)` (a checkpointed backward pass, but not a warm-up
    # short enough to keep every graph) first imports sympy through this one, 31 MB of modules.
    import torch.fx.experimental.symbolic_shapes

    run = setup(config)
    output = None
    for _ in range(int(config.get("warmup", 1))):
        output = run()
    del output
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        baseline = _status_bytes("VmRSS")
    times, cpu_times = [], []
    for _ in range(int(config.get("repeats", 1))):
        start, cpu_start = time.perf_counter(), time.process_time()
        output = run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    result = {
        "peak_bytes": peak - baseline,
        "seconds": statistics.median(times),
        "times": times,
        "cpu_seconds": statistics.median(cpu_times),
        "cpu_times": cpu_times,
        "baseline_bytes": baseline,
        "memory": os.environ.get("MALLOC_MMAP_THRESHOLD_") == _ENV["MALLOC_MMAP_THRESHOLD_"],
    }
    if report is not None:
        result.update(report(output))
    print(_MARK + json.dumps(result), flush=True)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"benchmarks._memory: no {field} in /proc/self/status")


def machine() -> str:
    """One line describing the machine and software the numbers come from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        mem = f", {mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        mem = ""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}{gpu}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
