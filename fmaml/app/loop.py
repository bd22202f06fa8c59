"""The meta-training loop of ``fmaml train``: Adam on the MAML meta-gradient, saved atomically.

One iteration samples a meta-batch of tasks from a dedicated ``torch.Generator``, computes
``(meta-loss, meta-gradient)`` with :meth:`fmaml.MAML.meta_grad` and takes one
``torch.optim.Adam`` step. Everything that determines the next iteration is explicit state:

    state.pt = {iteration, params, optimizer, task generator, torch and python RNG states, clocks}

so a run resumed from ``state.pt`` is bitwise identical to an uninterrupted run with the same
seed. Every file is written atomically (:mod:`fmaml.app.files`): a run killed mid-save leaves
the previous state loadable. A save writes ``state.pt``, then ``params.pt``, then
``metrics.csv``: after a crash ``state.pt`` leads, the other two can be one save behind, and
``metrics.jsonl`` can hold records past it (they are redone); a resume rewrites all three from
the state before it goes on.

The task-specific parts (model, task sampler, evaluation, figures) are a
:class:`fmaml.app.jobs.Job`.
"""

from __future__ import annotations

import io
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

import fmaml
from fmaml import distributed
from fmaml._typing import Params, Tasks
from fmaml.app.errors import RunStopped
from fmaml.app.files import WriteError, atomic_save, atomic_write
from fmaml.app.jobs import Job
from fmaml.app.metrics import csv_bytes, jsonl_bytes
from fmaml.app.progress import Progress
from fmaml.app.signals import stop_on_signals

__all__ = ["Start", "StateError", "TrainResult", "check_state", "load_state", "start", "train"]

STATE_FORMAT = 1


@dataclass
class TrainResult:
    """What :func:`train` did: iterations, clocks, and why it stopped."""

    iteration: int
    elapsed: float
    cpu_time: float
    stopped_by: str
    records: list[dict[str, float]] = field(repr=False, default_factory=list)


class StateError(ValueError):
    """A ``state.pt`` that cannot be this run's state (damaged, or of another model)."""


def load_state(path: Path) -> dict[str, Any]:
    """The resume state saved by :func:`train` (``torch.load(weights_only=True)``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an fmaml training state (format {STATE_FORMAT}).")
    return state


# --------------------------------------------------------------------------------------------
# the starting point: built, and a saved state checked, before anything is written


@dataclass
class Start:
    """Where training starts: everything that determines the next iteration, at ``iteration``.

    Attributes:
        model: the job's model (the skeleton; its parameters are not trained).
        params: the meta-parameters, ``{name: tensor}`` on the run's device.
        optimizer: Adam over ``params.values()``.
        generator: the task generator (CPU: the same tasks on any device).
        torch_rng, python_rng: the global RNG states to install before the first iteration.
        iteration: iterations done.
        elapsed, cpu_time: training seconds so far (wall, process CPU).
        window: ``[sum, count]`` of the meta-losses of the open logging window.
    """

    model: nn.Module
    params: Params
    optimizer: torch.optim.Adam
    generator: torch.Generator
    torch_rng: torch.Tensor
    python_rng: Any
    iteration: int = 0
    elapsed: float = 0.0
    cpu_time: float = 0.0
    window: list[float] = field(default_factory=lambda: [0.0, 0])


def start(job: Job, state: dict[str, Any] | None, device: torch.device) -> Start:
    """The model, meta-parameters, Adam and task generator of ``job``: fresh or from ``state``.

    Every part of ``state`` is checked against the model (parameter names and shapes, Adam's
    moments, the RNG states), so a damaged or foreign ``state.pt`` raises :class:`StateError`
    here, before anything is written, rather than in the middle of training.
    """
    cfg = job.config
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    generator = torch.Generator().manual_seed(cfg["seed"])
    model = job.build_model().to(device)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    # fused: one kernel for every parameter (36 us a step for the sinusoid MLP on the CPU,
    # against 119 us for the per-tensor loop); the same update to rounding
    optimizer = torch.optim.Adam(list(params.values()), lr=cfg["meta_lr"], fused=True)
    fresh = Start(model, params, optimizer, generator, torch.get_rng_state(), random.getstate())
    if state is None:
        return fresh
    try:
        return _restore(fresh, state)
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise StateError(f"{type(e).__name__}: {e}") from e


def check_state(state: dict[str, Any]) -> None:
    """Raise :class:`StateError` unless ``state`` has every part, with an iteration count.

    The parts are checked against the model by :func:`start`.
    """
    for key in _STATE_KEYS:
        if key not in state:
            raise StateError(f"it has no `{key}`")
    iteration = state["iteration"]
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise StateError(f"`iteration` is {iteration!r}, not an integer >= 0")


def _restore(begin: Start, state: dict[str, Any]) -> Start:
    check_state(state)
    iteration = state["iteration"]
    saved = state["params"]
    if not isinstance(saved, dict) or set(saved) != set(begin.params):
        names = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise StateError(f"its parameters {names} are not the model's {sorted(begin.params)}")
    for name, p in begin.params.items():
        value = saved[name]
        if not isinstance(value, torch.Tensor) or value.shape != p.shape:
            what = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise StateError(
                f"parameter {name!r} has shape {what}, the model's has {tuple(p.shape)}"
            )
        p.copy_(value.to(p.device))
    begin.optimizer.load_state_dict(state["optimizer"])
    for p in begin.optimizer.param_groups[0]["params"]:
        for key, t in begin.optimizer.state.get(p, {}).items():
            if key in ("exp_avg", "exp_avg_sq") and t.shape != p.shape:
                raise StateError(f"Adam's `{key}` has shape {tuple(t.shape)}, not {tuple(p.shape)}")
    torch.Generator().set_state(state["torch_rng"])  # checks it, without touching the global one
    random.Random().setstate(_as_tuple(state["python_rng"]))
    begin.generator.set_state(state["task_rng"])
    window = state["window"]
    if not isinstance(window, list | tuple) or len(window) != 2:
        raise StateError(f"`window` is {window!r}, not [sum, count]")
    begin.torch_rng, begin.python_rng = state["torch_rng"], _as_tuple(state["python_rng"])
    begin.iteration = iteration
    begin.elapsed, begin.cpu_time = float(state["elapsed"]), float(state["cpu_time"])
    begin.window = [float(window[0]), int(window[1])]
    return begin


_STATE_KEYS = (
    "iteration",
    "params",
    "optimizer",
    "torch_rng",
    "python_rng",
    "task_rng",
    "elapsed",
    "cpu_time",
    "window",
)


# --------------------------------------------------------------------------------------------
# the loop


def train(
    job: Job,
    run_dir: Path,
    begin: Start,
    *,
    policy: Any,
    records: list[dict[str, float]],
    quiet: bool,
    stream: TextIO | None = None,
    ctx: distributed.Context | None = None,
) -> TrainResult:
    """Meta-train ``job`` in ``run_dir`` from ``begin`` (see :func:`start`).

    ``records`` are the metrics already logged, up to ``begin.iteration`` (rank 0; see
    :func:`fmaml.app.metrics.recover_metrics`). Writes ``metrics.jsonl``/``metrics.csv`` as it
    logs and ``state.pt``/``params.pt`` every ``save_every`` iterations and at the end, and a
    resumed run's ``params.pt`` and metrics first, so that they agree with its state. Raises
    :class:`RunStopped` on a signal (after saving) or a non-finite meta-loss or meta-gradient
    (without saving; the message names the task and inner step that went non-finite), and
    :class:`fmaml.app.files.WriteError` when a file cannot be written (the previous version of
    it is intact).

    Under ``torchrun`` (``ctx`` from :func:`fmaml.distributed.setup`) every rank draws the same
    meta-batch, computes the meta-gradient of its share and the ranks average them
    (:func:`fmaml.distributed.distributed_meta_grad`): the same update as one process with the
    whole meta-batch. Stop decisions (time budget, signals) are taken by all ranks together;
    only rank 0 writes files and draws the progress line; the parameters are checked to be
    identical on every rank at each save.
    """
    cfg = job.config
    ctx = ctx if ctx is not None else distributed.Context(device=torch.device(cfg["device"]))
    main = ctx.is_main
    device = ctx.device
    model, params, opt, gen = begin.model, begin.params, begin.optimizer, begin.generator
    torch.set_rng_state(begin.torch_rng)
    random.setstate(begin.python_rng)
    elapsed, cpu_time, window = begin.elapsed, begin.cpu_time, list(begin.window)
    first = begin.iteration
    metrics_path = run_dir / "metrics.jsonl"
    distributed.broadcast_params(params)  # identical by construction; now by fiat as well
    records = list(records) if main else []

    maml = fmaml.MAML(
        model,
        job.loss_fn,
        inner_lr=cfg["inner_lr"],
        checkpoint=policy,
        first_order=cfg["first_order"],
        batching=cfg["batching"],
        compile=compile_option(cfg.get("compile", "off"), cfg["iterations"], first),
    )
    total = cfg["iterations"]
    budget = None if cfg["time_budget"] is None else 60.0 * cfg["time_budget"]
    save_every, log_every = cfg["save_every"], cfg["log_every"]
    progress = Progress(total, budget, first, enabled=main and not quiet, stream=stream)

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
        # state.pt first: after a crash between these writes it leads (see the module doc)
        atomic_save(state, run_dir / "state.pt")
        atomic_save(_state_dict(model, params), run_dir / "params.pt")
        atomic_write(run_dir / "metrics.csv", csv_bytes(records))

    if main:
        # what is known up to the saved iteration; the records after it are redone
        atomic_write(metrics_path, jsonl_bytes(records))
        if first > 0:
            atomic_save(_state_dict(model, params), run_dir / "params.pt")
        atomic_write(run_dir / "metrics.csv", csv_bytes(records))
    if first == 0:
        save(0)  # a run killed before its first periodic save can still be resumed
    it, last_loss, stopped_by = first, math.nan, "iterations"
    log = _open_log(metrics_path) if main else io.StringIO()
    try:
        with stop_on_signals() as received:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            base_elapsed, base_cpu = elapsed, cpu_time

            def cpu_now() -> float:  # read where it is written: a read can cost a millisecond
                return base_cpu + time.process_time() - cpu0

            while total is None or it < total:
                # each rank reads its own clock and receives its own signals: decide together
                if distributed.any_rank(budget is not None and elapsed >= budget):
                    stopped_by = "time budget"
                    break
                if distributed.any_rank(received):
                    cpu_time = cpu_now()
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
                flat = torch.cat([g.reshape(-1) for g in grads.values()])
                finite = bool(torch.isfinite(flat).all())  # three operators, not two per leaf
                if not (math.isfinite(value) and finite):
                    raise RunStopped(
                        f"{_non_finite(value, grads)} at iteration {it + 1}: "
                        f"{diagnose(maml, params, tasks, cfg['inner_steps'])}. Lower --meta-lr "
                        f"or --inner-lr and start a new run (the last good state is "
                        f"{run_dir}/state.pt, iteration {saved_at[0]})",
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
                # (CLOCK_PROCESS_CPUTIME_ID: 0.6 ms per read measured here, a quarter of a step)
                if it % log_every == 0 or it % save_every == 0:
                    cpu_time = cpu_now()
                if it % log_every == 0:
                    _log_window(log, metrics_path, records, it, window, elapsed, cpu_time)
                    window = [0.0, 0]
                if it % save_every == 0:
                    save(it)
                progress.update(it, value, elapsed)
            cpu_time = cpu_now()
            if window[1]:
                # The last, partial logging window. It stays open in the state: a resumed run
                # drops this record and carries on with the window, as if never stopped.
                _log_window(log, metrics_path, records, it, window, elapsed, cpu_time)
            if saved_at[0] != it or window[1]:
                save(it)
    finally:
        log.close()
        progress.close(it, last_loss, elapsed)
    return TrainResult(it, elapsed, cpu_time, stopped_by, records)


#: ``--compile auto`` compiles only a run with at least this many meta-steps to go: a compilation
#: takes tens of seconds on the CPU (a cold inductor cache; measured 25 to 50 s for the sinusoid
#: MLP) and saves about 2 to 3 ms per sinusoid meta-step (docs/benchmarks/compile.md), so a
#: shorter run would not win it back.
AUTO_COMPILE_ITERATIONS = 10_000


def compile_option(when: str, iterations: int | None, first: int = 0) -> bool | str:
    """``--compile`` as :class:`fmaml.MAML` takes it: ``on`` is ``True``, ``off`` is ``False``,
    and ``auto`` is ``"auto"`` (compile the pieces whose operators are small, see
    ``docs/compile.md``) for a run with at least :data:`AUTO_COMPILE_ITERATIONS` meta-steps
    left from ``first`` (or no iteration limit), else ``False``."""
    if when == "auto":
        left = None if iterations is None else iterations - first
        return "auto" if left is None or left >= AUTO_COMPILE_ITERATIONS else False
    return {"off": False, "on": True}[when]


def _non_finite(loss: float, grads: Params) -> str:
    if not math.isfinite(loss):
        return f"the meta-loss is {loss}"
    name = next(n for n, g in grads.items() if not bool(torch.isfinite(g).all()))
    return f"the meta-gradient of {name!r} is not finite (the meta-loss is {loss:.4g})"


def diagnose(maml: fmaml.MAML, params: Params, tasks: Tasks, steps: int) -> str:
    """Where a meta-batch first goes non-finite: the task, and the inner step or the query.

    Replays each task's inner loop on its own, without the outer gradient: the support loss
    before each inner step, the adapted parameters after it, then the query loss.
    """
    n = tasks.support[0].shape[0]
    p0 = {name: t.detach() for name, t in params.items()}
    if not all(bool(torch.isfinite(t).all()) for t in p0.values()):
        return "the meta-parameters themselves are not finite"
    for t in range(n):
        support = tuple(x[t] for x in tasks.support)
        query = tuple(x[t] for x in tasks.query)
        p = p0
        for k in range(steps):
            loss = float(maml.loss(p, support))
            if not math.isfinite(loss):
                return f"task {t} of {n}: the support loss is {loss} before inner step {k + 1}"
            p = {name: v.detach() for name, v in maml.inner_step(p, support).items()}
            bad = [name for name, v in p.items() if not bool(torch.isfinite(v).all())]
            if bad:
                return f"task {t} of {n}: inner step {k + 1} makes {bad[0]!r} non-finite"
        loss = float(maml.loss(p, query))
        if not math.isfinite(loss):
            return f"task {t} of {n}: the query loss is {loss} after {steps} inner step(s)"
    return (
        f"every task's inner steps and query loss are finite ({n} tasks): the outer "
        "(second-order) gradient overflowed"
    )


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


def _open_log(path: Path) -> TextIO:
    try:
        return path.open("a")
    except OSError as e:
        raise WriteError(path, e) from e


def _log_window(
    log: TextIO,
    path: Path,
    records: list[dict],
    it: int,
    window: list,
    elapsed: float,
    cpu_time: float,
) -> None:
    """Append the mean meta-loss of the logging window ending at ``it`` to the metrics."""
    record = {
        "iteration": it,
        "meta_loss": window[0] / window[1],
        "time": round(elapsed, 4),
        "cpu_time": round(cpu_time, 4),
    }
    records.append(record)
    try:
        log.write(json.dumps(record) + "\n")
        log.flush()
    except OSError as e:  # a torn last line is repaired on resume (the state leads)
        raise WriteError(path, e) from e
