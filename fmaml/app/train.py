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
import math
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fmaml import __version__, distributed
from fmaml.app.config import Prepared, check, requested_device, resolve
from fmaml.app.errors import CLIError, RunStopped
from fmaml.app.files import WriteError, atomic_write, write_json
from fmaml.app.jobs import Job
from fmaml.app.loop import Start, StateError, start, train
from fmaml.app.metrics import DAMAGED, plot_training_curve
from fmaml.app.options import add_train_options, parse_policy
from fmaml.app.ranks import every_rank, on_main
from fmaml.app.rundir import damaged_state, locked, tidy
from fmaml.app.signals import Session, terminate_interrupts

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
    session = Session(args.task, resuming=getattr(args, "resume", None) is not None)
    threads = torch.get_num_threads()
    main = True
    with terminate_interrupts():
        try:
            device = requested_device(args)
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


def _train(args: argparse.Namespace, ctx: distributed.Context, session: Session) -> int:
    try:
        distributed.check_same_config({k: v for k, v in vars(args).items() if k != "run"})
    except ValueError as e:
        raise CLIError(str(e).replace("fmaml.distributed.check_same_config: ", "")) from e
    with contextlib.ExitStack() as hold:  # rank 0: the run directory's lock, until the end
        return _train_holding(args, ctx, session, hold)


def _train_holding(
    args: argparse.Namespace,
    ctx: distributed.Context,
    session: Session,
    hold: contextlib.ExitStack,
) -> int:
    def prepare() -> Prepared:
        prepared = resolve(args, hold)
        check(prepared.config, vars(args))
        return prepared

    # rank 0 picks the run directory (and reads a resumed state and log) for every rank
    prepared = on_main(ctx, prepare)
    config, state, run_dir = prepared.config, prepared.state, prepared.run_dir
    session.run_dir = run_dir
    task = config["task"]
    policy = parse_policy(config["checkpoint"])
    torch.set_num_threads(config["threads"])
    job, begin = every_rank(ctx, lambda: _make_job(config, state, run_dir, ctx.device))
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

    config = on_main(ctx, create)
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
