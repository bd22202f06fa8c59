"""``fmaml train TASK``: resolve the options, prepare the run directory, train, evaluate, report.

The resolved configuration is the job's defaults, overridden by the saved ``config.json`` of a
``--resume``-d run, overridden by the options given (:mod:`fmaml.app.options`). Everything is
checked before anything is written: the options, the data, and a resumed run's ``config.json``,
``state.pt`` (against the model) and metrics. A bad command writes nothing; a run directory
that cannot be continued says why and what to do. Exit statuses: :mod:`fmaml.app.errors`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from argparse import ArgumentTypeError
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fmaml import __version__, distributed
from fmaml.app import jobs, options
from fmaml.app.errors import CLIError, Interrupted, RunStopped
from fmaml.app.files import WriteError, atomic_write, write_json
from fmaml.app.jobs import Job
from fmaml.app.loop import Start, StateError, start, train
from fmaml.app.metrics import DAMAGED, plot_training_curve, recover_metrics
from fmaml.app.options import FIXED_ON_RESUME, add_train_options, parse_policy, show
from fmaml.app.rundir import check_writable, damaged_state, locked, new_run_dir, read_run, tidy

__all__ = ["add_command", "run"]


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``train`` (with one subcommand per job) to ``fmaml``'s commands."""
    train_p = commands.add_parser(
        "train",
        help="meta-train MAML on sinusoid regression or Omniglot, then evaluate",
        description="Meta-train MAML with Adam, evaluate on held-out tasks, write a run "
        "directory (metrics, config, parameters, resume state, evaluation, figures).",
    )
    tasks = train_p.add_subparsers(dest="task", metavar="TASK", required=True)
    sin = tasks.add_parser(
        "sinusoid",
        help="sinusoid regression (Finn et al., 2017), about two minutes",
        description="MAML's sinusoid regression: amplitude in [0.1, 5], phase in [0, pi], "
        "x in [-5, 5], MLP 1-40-40-1 ReLU, K-shot MSE. Prints the query MSE of 1000 "
        "held-out tasks after 0, 1 and 10 steps with 95% intervals.",
    )
    add_train_options(sin, "sinusoid")
    sin.set_defaults(run=run)
    omni = tasks.add_parser(
        "omniglot",
        help="N-way K-shot Omniglot with conv4 (default 20-way 1-shot)",
        description="MAML on Omniglot: conv4, 28x28, N-way K-shot episodes with rotation "
        "augmentation, trained on the background characters, evaluated after 1 and 10 steps "
        "on held-out characters and on the 20 official one-shot runs.",
    )
    add_train_options(omni, "omniglot")
    omni.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``fmaml train TASK``: returns the exit status; errors are one line on stderr.

    Under ``torchrun --nproc-per-node=N`` the same command trains data-parallel: every rank
    checks that it was started with the same options, rank 0 prepares the run directory, the
    ranks share each meta-batch (:func:`fmaml.distributed.distributed_meta_grad`) and the
    evaluation, and only rank 0 prints and writes. An error every rank shares is printed once.
    Ctrl-C or SIGTERM outside the training loop (which saves first) stops with one line too.
    """
    prog = f"fmaml train {args.task}"
    session = _Session(args.task, resuming=getattr(args, "resume", None) is not None)
    threads = torch.get_num_threads()
    main = True
    with _terminate_interrupts():
        try:
            device = _requested_device(args)
            backend = None if device.startswith("cuda") else "gloo"
            with distributed.setup(backend=backend, device=device) as ctx:
                main = ctx.is_main
                try:
                    return _train(args, ctx, session)
                except (CLIError, RunStopped) as e:
                    if ctx.world_size > 1 and not getattr(e, "shared", True):
                        # this rank alone failed (a save): stop the others too (fail_together)
                        _print_error(prog, e)
                        distributed._fail(e)
                    elif main:  # the same on every rank: print it once, no need to abort
                        _print_error(prog, e)
                    return e.status
        except CLIError as e:
            if main:
                _print_error(prog, e)
            return e.status
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            if main:
                print(f"{prog}: {session.interrupted(signum)}", file=sys.stderr, flush=True)
            return 130 if signum == signal.SIGINT else 143
        finally:
            torch.set_num_threads(threads)


def _print_error(prog: str, e: CLIError | RunStopped) -> None:
    label = "error: " if isinstance(e, CLIError) else ""
    print(f"{prog}: {label}{e}", file=sys.stderr, flush=True)


@dataclass
class _Session:
    """How far the command got: what an interruption leaves, in words."""

    task: str
    resuming: bool
    phase: str = "start"  # "start", "training", "evaluation"
    run_dir: Path | None = None
    written: bool = False  # config.json of this session is written

    def interrupted(self, signum: int) -> str:
        name = signal.Signals(signum).name
        resume = f"fmaml train {self.task} --resume {self.run_dir}"
        if self.phase == "start" and not self.written:
            where = "the run directory is unchanged" if self.resuming else "nothing was written"
            return f"interrupted by {name} before the run started; {where}"
        if self.phase == "start":
            return f"interrupted by {name} while the run was starting; continue with: {resume}"
        if self.phase == "training":
            return (
                f"stopped at once by a second {name}; the last save is intact. Continue with: "
                f"{resume}"
            )
        return (
            f"interrupted by {name} during the evaluation; the training is saved. Evaluate "
            f"again with: {resume}"
        )


@contextlib.contextmanager
def _terminate_interrupts() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` as Ctrl-C raises ``KeyboardInterrupt``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _requested_device(args: argparse.Namespace) -> str:
    """The device the run will use (given, or a resumed run's, or the default), checked."""
    device = getattr(args, "device", None)
    resume = getattr(args, "resume", None)
    if device is None and resume is not None:
        saved = Path(resume) / "config.json"
        # a damaged config.json is reported later, with the rest of the run directory
        with contextlib.suppress(OSError, ValueError, LookupError, TypeError, ArgumentTypeError):
            device = options.device(json.loads(saved.read_bytes())["device"])
    device = device if isinstance(device, str) else jobs.defaults(args.task)["device"]
    _check_device(device)
    if device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError(
            f"--device {device}: under torchrun each rank takes its own GPU (cuda:LOCAL_RANK); "
            "pass --device cuda"
        )
    return device


def _together(ctx: distributed.Context, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; if it raises :class:`CLIError` on any, the same error on all."""
    try:
        value, error = fn(), None
    except CLIError as e:
        value, error = None, e
    if ctx.world_size == 1:
        if error is not None:
            raise error
        return value
    errors: list[Any] = [None] * ctx.world_size
    mine = None if error is None else (str(error), error.status)
    torch.distributed.all_gather_object(errors, mine)
    bad = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if bad:
        messages = {m for _, (m, _) in bad}
        if len(messages) == 1 and len(bad) == ctx.world_size:
            text = bad[0][1][0]
        else:
            text = "; ".join(f"rank {rank}: {m}" for rank, (m, _) in bad)
        raise CLIError(text, bad[0][1][1])
    return value


def _on_main(ctx: distributed.Context, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only; every rank gets its result, or raises its :class:`CLIError`."""
    if ctx.world_size == 1:
        return fn()
    box: list[Any] = [None]
    if ctx.is_main:
        try:
            box[0] = ("ok", fn())
        except CLIError as e:
            box[0] = ("error", str(e), e.status)
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise CLIError(box[0][1], box[0][2])
    return box[0][1]


@dataclass
class _Prepared:
    """What rank 0 resolves for every rank before anything is written."""

    config: dict[str, Any]
    state: dict[str, Any] | None
    run_dir: Path
    records: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warning: str | None = None
    damaged: bytes = b""


def _resolve(args: argparse.Namespace, hold: contextlib.ExitStack) -> _Prepared:
    """The resolved configuration, the run directory, a resumed run's state and metrics.

    A resumed run directory is locked (``hold`` keeps the lock), checked to be writable and
    cleared of temporary files left by killed writers, then read and checked.
    """
    task = args.task
    given = {k: v for k, v in vars(args).items() if k not in ("task", "command", "run")}
    resume_dir = given.pop("resume", None)
    out = given.pop("out", None)
    quiet = given.pop("quiet", False)
    config = dict(jobs.defaults(task))
    if resume_dir is None:
        prepared = _Prepared(config, None, new_run_dir(task, out))
    else:
        run_dir = Path(resume_dir)
        if run_dir.is_dir():
            hold.enter_context(locked(run_dir))
            check_writable(run_dir, f"--resume {resume_dir}")
            tidy(run_dir)
        saved, checked, state = read_run(run_dir, task)
        if out is not None and Path(out).resolve() != run_dir.resolve():
            raise CLIError(
                f"--out {out} and --resume {resume_dir} name different directories; a resumed "
                "run continues in its own directory, so drop --out"
            )
        for key in FIXED_ON_RESUME:
            if key in given and key in checked and given[key] != checked[key]:
                flag = "--" + key.replace("_", "-")
                raise CLIError(
                    f"--resume {resume_dir}: that run was trained with {flag} "
                    f"{show(checked[key])}, not {show(given[key])}; drop {flag} to continue it, "
                    "or start a new run without --resume"
                )
        config.update(checked)
        for key in ("data", "history"):
            if key in saved:
                config[key] = saved[key]
        prepared = _Prepared(config, state, run_dir)
        upto = 0 if state is None else state["iteration"]
        if state is None:
            prepared.notes.append(
                f"{run_dir} has no state.pt (the run stopped before its first save): starting "
                "it from iteration 0, the same run"
            )
        log_every = given.get("log_every", config["log_every"])
        recovered = recover_metrics(run_dir, upto, log_every)
        prepared.records, prepared.damaged = recovered.records, recovered.damaged
        prepared.warning = recovered.warning
    config.update(given)
    if "time_budget" in given and "iterations" not in given:
        config["iterations"] = None
    if config["eval_inner_lr"] is None:
        config["eval_inner_lr"] = config["inner_lr"]
    config["task"] = task
    config["quiet"] = quiet
    return prepared


def _check(config: dict[str, Any], given: dict[str, Any]) -> None:
    _check_device(config["device"])
    if config["task"] == "omniglot":
        _check_data_dir(config, given)


def _check_data_dir(config: dict[str, Any], given: dict[str, Any]) -> None:
    """``--data-dir`` exists; it becomes absolute (relative paths are from the working dir)."""
    text = config.get("data_dir")
    if not text:
        raise CLIError("--data-dir is required: the folder with the Omniglot zips")
    path = Path(text).expanduser().absolute()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        source = f"--data-dir {text}" if "data_dir" in given else "the run's data directory"
        raise CLIError(
            f"{source}: {path} {what}; pass --data-dir with the folder that holds the Omniglot "
            "zips (images_background*.zip and all_runs.zip)"
        )
    config["data_dir"] = str(path)


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(
                f"--device {device}: CUDA is not available (torch {torch.__version__}); use "
                "--device cpu"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise CLIError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0"
            )


def _make_job(
    config: dict[str, Any], state: dict[str, Any] | None, run_dir: Path, device: torch.device
) -> tuple[Job, Start]:
    """The job (its data read and checked) and its starting point (a saved state checked)."""
    job = _job(config, state)
    try:
        begin = start(job, state, device)
    except StateError as e:
        raise CLIError(damaged_state(run_dir, config["task"], str(e))) from e
    return job, begin


def _job(config: dict[str, Any], state: dict[str, Any] | None) -> Job:
    if config["task"] == "sinusoid":
        from fmaml.app.jobs.sinusoid import SinusoidJob

        return SinusoidJob(config)
    from fmaml.app.jobs.omniglot import DataError, OmniglotJob, load_data

    try:
        data = load_data(config)
    except DataError as e:
        raise CLIError(str(e).rstrip(".")) from e
    fingerprint = data.fingerprint()
    saved = config.get("data")
    if state is not None and saved is not None and saved != fingerprint:
        trained = saved.get("train_classes") if isinstance(saved, dict) else None
        raise CLIError(
            f"--data-dir {config['data_dir']} holds other characters than the run was trained "
            f"on ({fingerprint['train_classes']} training classes, not {trained}); pass the "
            "run's original --data-dir"
        )
    config["data"] = fingerprint
    config["data_dir"] = str(Path(config["data_dir"]).resolve())  # resumable from anywhere
    return OmniglotJob(config, data)


def _train(args: argparse.Namespace, ctx: distributed.Context, session: _Session) -> int:
    try:
        distributed.check_same_config({k: v for k, v in vars(args).items() if k != "run"})
    except ValueError as e:
        raise CLIError(str(e).replace("fmaml.distributed.check_same_config: ", "")) from e
    with contextlib.ExitStack() as hold:  # rank 0: the run directory's lock, until the end
        return _train_holding(args, ctx, session, hold)


def _train_holding(
    args: argparse.Namespace,
    ctx: distributed.Context,
    session: _Session,
    hold: contextlib.ExitStack,
) -> int:
    def prepare() -> _Prepared:
        prepared = _resolve(args, hold)
        _check(prepared.config, vars(args))
        return prepared

    # rank 0 picks the run directory (and reads a resumed state and log) for every rank
    prepared = _on_main(ctx, prepare)
    config, state, run_dir = prepared.config, prepared.state, prepared.run_dir
    session.run_dir = run_dir
    task = config["task"]
    policy = parse_policy(config["checkpoint"])
    torch.set_num_threads(config["threads"])
    job, begin = _together(ctx, lambda: _make_job(config, state, run_dir, ctx.device))
    quiet = config.pop("quiet") or not ctx.is_main

    # all checks passed: only now is anything written
    def create() -> dict[str, Any]:
        if not session.resuming:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CLIError(
                    f"cannot create the run directory {run_dir} ({e}); pass another --out"
                ) from e
            hold.enter_context(locked(run_dir))
            tidy(run_dir)
        config.update(_provenance(config, run_dir, begin, session.resuming, ctx.world_size))
        try:
            write_json(run_dir / "config.json", config)
            if prepared.damaged:
                _keep(run_dir / DAMAGED, prepared.damaged)
        except WriteError as e:
            raise CLIError(
                f"{e}; free space or fix permissions, then run the same command again (the run "
                "directory is as it was)"
            ) from e
        return config

    config = _on_main(ctx, create)
    session.written = True
    if ctx.is_main:
        if prepared.warning:
            print(f"fmaml train {task}: warning: {prepared.warning}", file=sys.stderr)
        for note in prepared.notes if not quiet else ():
            print(f"note: {note}")
    if not quiet:
        at = f", resuming at iteration {begin.iteration}" if begin.iteration else ""
        print(f"fmaml train {task}: {job.describe()}")
        print(
            f"  {_limit(config)}, checkpoint {config['checkpoint']}, batching "
            f"{config['batching']}, {config['threads']} thread(s), {config['device']}{at}"
            + (f", {ctx.world_size} processes ({ctx.backend})" if ctx.world_size > 1 else "")
        )
        print(f"  run directory: {run_dir}", flush=True)
    session.phase = "training"
    try:
        result = train(
            job, run_dir, begin, policy=policy, records=prepared.records, quiet=quiet, ctx=ctx
        )
    except WriteError as e:  # rank 0 only: the previous state.pt is intact
        stopped = RunStopped(
            f"error: {e}; the last save is intact. Free space or fix permissions, then "
            f"continue with: fmaml train {task} --resume {run_dir}",
            2,
        )
        stopped.shared = False
        raise stopped from e
    session.phase = "evaluation"
    if not quiet:
        print("evaluating ...", file=sys.stderr, flush=True)
    model, params = begin.model, begin.params
    wall0, cpu0 = time.perf_counter(), time.process_time()
    evaluation = job.evaluate(model, params)  # sharded over the ranks
    eval_wall, eval_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if not ctx.is_main:
        return 0
    for line in job.summary(evaluation):
        print(line)
    per_it = result.elapsed / result.iteration * 1e3 if result.iteration else math.nan
    print(
        f"trained {result.iteration} iterations"
        f"{' (time budget reached)' if result.stopped_by == 'time budget' else ''} in "
        f"{result.elapsed:.1f} s, CPU {result.cpu_time:.1f} s ({per_it:.2f} ms per iteration); "
        f"evaluated in {eval_wall:.1f} s",
        flush=True,
    )
    report = {
        "task": task,
        "iterations": result.iteration,
        "stopped_by": result.stopped_by,
        "train_time_s": round(result.elapsed, 3),
        "train_cpu_time_s": round(result.cpu_time, 3),
        "eval_time_s": round(eval_wall, 3),
        "eval_cpu_time_s": round(eval_cpu, 3),
        **evaluation,
    }
    try:
        write_json(run_dir / "eval.json", report)
        _figures(run_dir, job, result.records, model, params, title=f"fmaml train {task}")
    except WriteError as e:
        raise CLIError(
            f"{e}; the results above are not all saved. Free space or fix permissions, then "
            f"write them with: fmaml train {task} --resume {run_dir} (it evaluates again, "
            "without training)"
        ) from e
    print(f"run directory: {run_dir}", flush=True)
    return 0


def _figures(run_dir: Path, job: Job, records: list, model: Any, params: Any, title: str) -> None:
    try:
        import matplotlib  # noqa: F401  (figures are optional: matplotlib is not a dependency)
    except ImportError:
        print("note: matplotlib is not installed, so no figures (pip install matplotlib)")
        return
    plot_training_curve(run_dir / "training_curve.png", records, title)
    job.plot(run_dir, model, params)


def _keep(path: Path, lines: bytes) -> None:
    """Append ``lines`` to ``path`` (atomically: the old content and the new, replaced)."""
    old = path.read_bytes() if path.is_file() else b""
    atomic_write(path, old + lines)


def _limit(config: dict[str, Any]) -> str:
    parts = []
    if config["iterations"] is not None:
        parts.append(f"{config['iterations']} iterations")
    if config["time_budget"] is not None:
        parts.append(f"time budget {config['time_budget']:g} min")
    return " or ".join(parts)


def _provenance(
    config: dict[str, Any], run_dir: Path, begin: Start, resumed: bool, processes: int
) -> dict[str, Any]:
    now = datetime.datetime.now().isoformat(timespec="seconds")
    history = config.get("history", [])
    history = list(history) if isinstance(history, list) else [{"unreadable": history}]
    history.append(
        {"started": now, "resumed": resumed, "argv": sys.argv[1:], "processes": processes}
    )
    return {
        "model": " ".join(repr(begin.model).split()),
        "parameters": sum(p.numel() for p in begin.params.values()),
        "run_dir": str(run_dir),
        "fmaml": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "history": history,
    }
