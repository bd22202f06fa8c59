"""The meta-training loop of ``fmaml train``: Adam on the MAML meta-gradient, saved atomically.

One iteration samples a meta-batch of tasks from a dedicated ``torch.Generator``, computes
``(meta-loss, meta-gradient)`` with :meth:`fmaml.MAML.meta_grad` and takes one
``torch.optim.Adam`` step. Everything that determines the next iteration is explicit state:

    state.pt = {iteration, params, optimizer, task generator, torch and python RNG states, clocks}

so a run resumed from ``state.pt`` is bitwise identical to an uninterrupted run with the same
seed. Every file is written atomically (a temporary file in the same directory, ``fsync``,
``os.replace``): a run killed mid-save leaves the previous state loadable.

The task-specific parts (model, task sampler, evaluation, figures) are a :class:`Job`
(``fmaml/_tasks_sinusoid.py``, ``fmaml/_tasks_omniglot.py``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch
from torch import nn
from torch.func import vmap

import fmaml
from fmaml import distributed
from fmaml._typing import Params, Tasks

__all__ = [
    "Job",
    "RunStopped",
    "TrainResult",
    "atomic_save",
    "atomic_write",
    "evaluate_steps",
    "interval",
    "load_state",
    "train",
]

STATE_FORMAT = 1
METRICS_FIELDS = ("iteration", "meta_loss", "time", "cpu_time")


class Job(Protocol):
    """What ``fmaml train`` needs from one benchmark (sinusoid regression, Omniglot)."""

    config: dict[str, Any]

    def describe(self) -> str:
        """One line: the benchmark, the model and the main hyperparameters."""

    def build_model(self) -> nn.Module:
        """A fresh model; its initial parameters come from torch's global RNG."""

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task loss, ``loss_fn(model(x), y) -> scalar``."""

    def sample(self, generator: torch.Generator) -> Tasks:
        """One meta-batch of training tasks, drawn from ``generator`` only."""

    def evaluate(self, model: nn.Module, params: Params) -> dict[str, Any]:
        """The final evaluation, as written to ``eval.json``."""

    def summary(self, evaluation: dict[str, Any]) -> list[str]:
        """The final lines printed for ``evaluation``."""

    def plot(self, run_dir: Path, model: nn.Module, params: Params) -> list[str]:
        """Task-specific figures in ``run_dir``; returns their file names."""


class RunStopped(Exception):
    """Training stopped early on purpose (a signal) or by failure; the last save is intact."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        #: whether every rank of a torchrun job stopped the same way (False: this rank alone)
        self.shared = True


@dataclass
class TrainResult:
    """What :func:`train` did: iterations, clocks, and why it stopped."""

    iteration: int
    elapsed: float
    cpu_time: float
    stopped_by: str
    records: list[dict[str, float]] = field(repr=False, default_factory=list)


# --------------------------------------------------------------------------------------------
# atomic files


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, replace.

    If anything fails before ``os.replace`` the temporary file is removed and ``path`` keeps its
    previous content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def load_state(path: Path) -> dict[str, Any]:
    """The resume state saved by :func:`train` (``torch.load(weights_only=True)``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an fmaml training state (format {STATE_FORMAT}).")
    return state


# --------------------------------------------------------------------------------------------
# statistics and evaluation


def interval(values: torch.Tensor) -> dict[str, float | None]:
    """Mean and 95% normal interval half-width ``1.96 std / sqrt(n)`` of per-task values.

    Non-finite values (a task whose adaptation diverged) are left out of the statistics and
    counted in ``"nonfinite"``; ``n`` is the number of finite values (mean and interval are
    ``None`` when there are none).
    """
    v = values.detach().double().cpu().flatten()
    finite = v[torch.isfinite(v)]
    n = finite.numel()
    std = float(finite.std()) if n > 1 else 0.0
    return {
        "mean": float(finite.mean()) if n else None,
        "ci95": 1.96 * std / math.sqrt(n) if n else None,
        "std": std,
        "n": n,
        "nonfinite": v.numel() - n,
    }


def evaluate_steps(
    maml: fmaml.MAML,
    params: Params,
    tasks: Tasks,
    steps: Sequence[int],
    metric: Callable[[Params, Any], torch.Tensor],
    chunk: int,
) -> torch.Tensor:
    """``metric`` on each task's query set after each number of inner steps in ``steps``.

    The inner steps run once per task (``0 .. max(steps)``) and the metric is read off at each
    requested count. Tasks are vectorised ``chunk`` at a time (``maml.batching == "vmap"``) or
    run one by one (``"loop"``).

    Returns:
        ``(T, len(steps))`` values, detached.
    """
    wanted = sorted(set(steps))
    params = {name: p.detach() for name, p in params.items()}

    def one(support: Any, query: Any) -> torch.Tensor:
        p, done, out = params, 0, {}
        for k in wanted:
            for _ in range(k - done):
                p = maml.inner_step(p, support)
            p = {name: t.detach() for name, t in p.items()}
            done = k
            out[k] = metric(p, query)
        return torch.stack([out[k] for k in steps])

    n_tasks = tasks.query[0].shape[0]
    # under torchrun each rank evaluates its share of the tasks; all of them get every value
    world = distributed._world()
    rank = torch.distributed.get_rank() if world > 1 else 0
    first, last = distributed.shard_bounds(n_tasks, rank, world)
    parts = []
    size = 1 if maml.batching == "loop" else chunk
    for start in range(first, last, size):
        stop = min(start + size, last)
        sup = _slice(tasks.support, start, stop)
        qry = _slice(tasks.query, start, stop)
        if maml.batching == "loop":
            parts.append(one(_slice(sup, 0, None, True), _slice(qry, 0, None, True))[None])
        else:
            parts.append(vmap(one, randomness="different")(sup, qry))
    if not parts:  # a rank without tasks (fewer tasks than ranks)
        like = next(iter(params.values()))
        parts.append(like.new_empty(0, len(steps)))
    local = torch.cat(parts).detach()
    return distributed.gather_shards(local, n_tasks) if world > 1 else local


def _slice(tree: Any, start: int, stop: int | None, index: bool = False) -> Any:
    return tuple(t[start] if index else t[start:stop] for t in tree)


# --------------------------------------------------------------------------------------------
# progress


class Progress:
    """A dependency-free progress line on ``stream``, refreshed in place on a terminal.

    ``  37%|███████▍            | 7400/20000 [00:27<00:46, 270.1 it/s] meta-loss 0.5123``.
    Off a terminal (a log file, a pipe) it writes a plain line every 30 seconds instead.
    """

    BAR = 20

    def __init__(
        self,
        total: int | None,
        budget_s: float | None,
        start: int,
        enabled: bool,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.budget_s, self.start = total, budget_s, start
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.last_draw = -math.inf
        self.width = 0

    def update(self, iteration: int, loss: float, elapsed: float, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        interval_s = 0.2 if self.tty else 30.0
        if not force and now - self.last_draw < interval_s:
            return
        self.last_draw = now
        line = self._line(iteration, loss, elapsed, now - self.t0)
        if self.tty:
            pad = " " * max(self.width - len(line), 0)
            self.stream.write("\r" + line + pad)
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, iteration: int, loss: float, elapsed: float) -> None:
        if not self.enabled:
            return
        self.last_draw = -math.inf
        self.update(iteration, loss, elapsed, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, iteration: int, loss: float, elapsed: float, wall: float) -> str:
        rate = (iteration - self.start) / wall if wall > 0 else 0.0
        fractions = []
        if self.total:
            fractions.append(iteration / self.total)
        if self.budget_s:
            fractions.append(elapsed / self.budget_s)
        frac = min(max(fractions, default=0.0), 1.0)
        if self.total is not None and (not self.budget_s or rate <= 0):
            left = (self.total - iteration) / rate if rate > 0 else math.nan
        elif self.budget_s:
            left = max(self.budget_s - elapsed, 0.0)
            if self.total is not None and rate > 0:
                left = min(left, (self.total - iteration) / rate)
        else:
            left = math.nan
        filled = frac * self.BAR
        full = int(filled)
        partial = " ▏▎▍▌▋▊▉"[int((filled - full) * 8)] if full < self.BAR else ""
        bar = ("█" * full + partial).ljust(self.BAR)
        count = f"{iteration}/{self.total}" if self.total is not None else f"{iteration}"
        return (
            f"{100 * frac:3.0f}%|{bar}| {count} [{_clock(elapsed)}<{_clock(left)}, "
            f"{rate:.1f} it/s] meta-loss {loss:.4f}"
        )


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


# --------------------------------------------------------------------------------------------
# metrics files


def read_metrics(path: Path, upto: int) -> list[dict[str, float]]:
    """The records of ``metrics.jsonl`` up to iteration ``upto`` (a resumed run drops the rest)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash: everything after it is redone
            break
        if record.get("iteration", math.inf) > upto:
            break
        records.append(record)
    return records


def _jsonl(records: list[dict[str, float]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _csv(records: list[dict[str, float]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRICS_FIELDS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: record.get(k) for k in METRICS_FIELDS})
    return out.getvalue().encode()


def plot_training_curve(path: Path, records: list[dict[str, float]], title: str) -> None:
    """``training_curve.png``: the logged meta-loss against the iteration (log scale)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    its = [r["iteration"] for r in records]
    losses = [r["meta_loss"] for r in records]
    ax.plot(its, losses, lw=1)
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("meta-loss (mean over the logging window)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


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
        atomic_write(metrics_path, _jsonl(records))
        atomic_write(run_dir / "metrics.csv", _csv(records))

    maml = fmaml.MAML(
        model,
        job.loss_fn,
        inner_lr=cfg["inner_lr"],
        checkpoint=policy,
        first_order=cfg["first_order"],
        batching=cfg["batching"],
        compile={"off": False, "on": True, "auto": "auto"}[cfg.get("compile", "off")],
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
        atomic_write(run_dir / "metrics.csv", _csv(records))

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
