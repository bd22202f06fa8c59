"""The meta-training loop of ``fmaml train``: Adam on the MAML meta-gradient, saved atomically.

One iteration samples a meta-batch of tasks from a dedicated ``torch.Generator``, computes
``(meta-loss, meta-gradient)`` with :meth:`fmaml.MAML.meta_grad` and takes one
``torch.optim.Adam`` step. Everything that determines the next iteration is explicit state:

    state.pt = {iteration, params, optimizer, task generator, torch and python RNG states, clocks}

so a run resumed from ``state.pt`` is bitwise identical to an uninterrupted run with the same
seed. Every file is written atomically (:mod:`fmaml.app.files`): a run killed mid-save leaves
the previous state loadable.

The task-specific parts (model, task sampler, evaluation, figures) are a
:class:`fmaml.app.jobs.Job`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

import fmaml
from fmaml import distributed
from fmaml._typing import Params, Tasks
from fmaml.app.errors import RunStopped
from fmaml.app.files import atomic_save, atomic_write
from fmaml.app.jobs import Job
from fmaml.app.metrics import csv_bytes, jsonl_bytes, read_metrics
from fmaml.app.progress import Progress

__all__ = ["TrainResult", "load_state", "train"]

STATE_FORMAT = 1


@dataclass
class TrainResult:
    """What :func:`train` did: iterations, clocks, and why it stopped."""

    iteration: int
    elapsed: float
    cpu_time: float
    stopped_by: str
    records: list[dict[str, float]] = field(repr=False, default_factory=list)


def load_state(path: Path) -> dict[str, Any]:
    """The resume state saved by :func:`train` (``torch.load(weights_only=True)``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an fmaml training state (format {STATE_FORMAT}).")
    return state


# --------------------------------------------------------------------------------------------
# signals


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """SIGINT/SIGTERM set a flag that the loop checks between iterations (main thread only)."""
    received: list[int] = []
    if not _in_main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        if received:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------------------------
# the loop


def train(
    job: Job,
    run_dir: Path,
    *,
    policy: Any,
    resume: dict[str, Any] | None,
    quiet: bool,
    stream: TextIO | None = None,
    ctx: distributed.Context | None = None,
) -> tuple[TrainResult, nn.Module, Params]:
    """Meta-train ``job`` in ``run_dir`` (from scratch, or from the ``resume`` state).

    Writes ``metrics.jsonl``/``metrics.csv`` as it logs and ``state.pt``/``params.pt`` every
    ``save_every`` iterations and at the end. Raises :class:`RunStopped` on a signal (after
    saving) or a non-finite meta-loss (without saving).

    Under ``torchrun`` (``ctx`` from :func:`fmaml.distributed.setup`) every rank draws the same
    meta-batch, computes the meta-gradient of its share and the ranks average them
    (:func:`fmaml.distributed.distributed_meta_grad`): the same update as one process with the
    whole meta-batch. Stop decisions (time budget, signals) are taken by all ranks together;
    only rank 0 writes files and draws the progress line; the parameters are checked to be
    identical on every rank at each save.

    Returns:
        ``(result, model, params)``: the model skeleton and the trained meta-parameters.
    """
    cfg = job.config
    ctx = ctx if ctx is not None else distributed.Context(device=torch.device(cfg["device"]))
    main = ctx.is_main
    device = ctx.device
    gen = torch.Generator()  # tasks are drawn on the CPU: the same tasks on any device
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    gen.manual_seed(cfg["seed"])
    model = job.build_model().to(device)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.Adam(list(params.values()), lr=cfg["meta_lr"])
    start, elapsed, cpu_time, window = 0, 0.0, 0.0, [0.0, 0]
    metrics_path = run_dir / "metrics.jsonl"
    if resume is not None:
        start = int(resume["iteration"])
        for name, p in params.items():
            p.copy_(resume["params"][name].to(device))
        opt.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["torch_rng"])
        random.setstate(_as_tuple(resume["python_rng"]))
        gen.set_state(resume["task_rng"])
        elapsed, cpu_time = float(resume["elapsed"]), float(resume["cpu_time"])
        window = [float(resume["window"][0]), int(resume["window"][1])]
    distributed.broadcast_params(params)  # identical by construction; now by fiat as well
    # records up to the saved iteration, without a partial window's (it goes on from the state)
    records = []
    if main:
        records = [
            r for r in read_metrics(metrics_path, start) if r["iteration"] % cfg["log_every"] == 0
        ]
        atomic_write(metrics_path, jsonl_bytes(records))
        atomic_write(run_dir / "metrics.csv", csv_bytes(records))

    maml = fmaml.MAML(
        model,
        job.loss_fn,
        inner_lr=cfg["inner_lr"],
        checkpoint=policy,
        first_order=cfg["first_order"],
        batching=cfg["batching"],
    )
    total = cfg["iterations"]
    budget = None if cfg["time_budget"] is None else 60.0 * cfg["time_budget"]
    save_every, log_every = cfg["save_every"], cfg["log_every"]
    progress = Progress(total, budget, start, enabled=main and not quiet, stream=stream)

    saved_at = [-1]

    def save(iteration: int) -> None:
        saved_at[0] = iteration
        distributed.check_in_sync(params)  # raises on every rank if they have drifted apart
        if not main:
            return
        state = {
            "format": STATE_FORMAT,
            "iteration": iteration,
            "params": {n: p.detach().cpu().clone() for n, p in params.items()},
            "optimizer": opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "task_rng": gen.get_state(),
            "elapsed": elapsed,
            "cpu_time": cpu_time,
            "window": [window[0], window[1]],
        }
        atomic_save(state, run_dir / "state.pt")
        atomic_save(_state_dict(model, params), run_dir / "params.pt")
        atomic_write(run_dir / "metrics.csv", csv_bytes(records))

    if resume is None:
        save(0)  # a run killed before its first periodic save can still be resumed
    it, last_loss, stopped_by = start, math.nan, "iterations"
    log = metrics_path.open("a") if main else io.StringIO()
    try:
        with _stop_on_signals() as received:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            base_elapsed, base_cpu = elapsed, cpu_time
            while total is None or it < total:
                # each rank reads its own clock and receives its own signals: decide together
                if distributed.any_rank(budget is not None and elapsed >= budget):
                    stopped_by = "time budget"
                    break
                if distributed.any_rank(received):
                    save(it)
                    signum = received[0] if received else signal.SIGTERM
                    name = signal.Signals(signum).name
                    raise RunStopped(
                        f"stopped by {name} at iteration {it}; state saved. Continue with: "
                        f"fmaml train {cfg['task']} --resume {run_dir}",
                        130 if signum == signal.SIGINT else 143,
                    )
                tasks = _to_device(job.sample(gen), device)
                loss, grads = distributed.distributed_meta_grad(
                    maml, params, tasks, cfg["inner_steps"], ctx
                )
                value = float(loss)
                if not math.isfinite(value):
                    raise RunStopped(
                        f"the meta-loss is {value} at iteration {it + 1}; lower --meta-lr or "
                        f"--inner-lr (the last good state, if any, is in {run_dir}/state.pt)",
                        1,
                    )
                for name, p in params.items():
                    p.grad = grads[name]
                opt.step()
                it += 1
                last_loss = value
                window[0] += value
                window[1] += 1
                elapsed = base_elapsed + time.perf_counter() - wall0
                cpu_time = base_cpu + time.process_time() - cpu0
                if it % log_every == 0:
                    _log_window(log, records, it, window, elapsed, cpu_time)
                    window = [0.0, 0]
                if it % save_every == 0:
                    save(it)
                progress.update(it, value, elapsed)
            if window[1]:
                # The last, partial logging window. It stays open in the state: a resumed run
                # drops this record and carries on with the window, as if never stopped.
                _log_window(log, records, it, window, elapsed, cpu_time)
            if saved_at[0] != it or window[1]:
                save(it)
    finally:
        log.close()
        progress.close(it, last_loss, elapsed)
    result = TrainResult(it, elapsed, cpu_time, stopped_by, records)
    return result, model, params


def _state_dict(model: nn.Module, params: Params) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` with the meta-parameters in place of its own parameters."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for name, p in params.items():
        state[name] = p.detach().cpu().clone()
    return state


def _to_device(tasks: Tasks, device: torch.device) -> Tasks:
    if device.type == "cpu":
        return tasks
    move = lambda tree: tuple(t.to(device, non_blocking=True) for t in tree)  # noqa: E731
    return Tasks(move(tasks.support), move(tasks.query))


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` wants tuples; a state that went through ``torch.load`` may hold lists."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def _log_window(
    log: Any, records: list[dict], it: int, window: list, elapsed: float, cpu_time: float
) -> None:
    """Append the mean meta-loss of the logging window ending at ``it`` to the metrics."""
    record = {
        "iteration": it,
        "meta_loss": window[0] / window[1],
        "time": round(elapsed, 4),
        "cpu_time": round(cpu_time, 4),
    }
    records.append(record)
    log.write(json.dumps(record) + "\n")
    log.flush()
