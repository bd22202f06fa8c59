"""``fmaml train`` and ``fmaml plan``: options, validation, run directories, resume.

Every option of ``fmaml train`` is parsed with no default (``argparse.SUPPRESS``), so the
options given on the command line are known; the resolved configuration is the benchmark's
defaults, overridden by the saved ``config.json`` of a ``--resume``-d run, overridden by the
options given. Everything is checked, the data read included, before the run directory is
created: a bad command writes nothing.

Exit statuses: 0 success; 2 a usage error (a bad option, path or data directory, an
incompatible ``--resume``); 1 a failure while training (a non-finite loss, a failed save);
130/143 stopped by SIGINT/SIGTERM after saving the state.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from fmaml import __version__, distributed
from fmaml._policy import Auto, Binomial, Policy, StoreAll, Uniform, resolve_policy
from fmaml._train import RunStopped, load_state, plot_training_curve, train, write_json

__all__ = ["CLIError", "add_commands", "parse_policy", "run_plan", "run_train"]

TASKS = ("sinusoid", "omniglot")

#: Options that shape the training trajectory: a ``--resume`` must not change them.
FIXED_ON_RESUME = (
    "seed",
    "meta_batch",
    "meta_lr",
    "inner_steps",
    "inner_lr",
    "first_order",
    "width",
    "k_shot",
    "k_query",
    "n_way",
    "queries",
    "val_chars",
    "rotate",
    "image_size",
    "log_every",
)


class CLIError(Exception):
    """A one-line error for stderr, with the exit status (2: usage)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``prog: error: message``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------
# argument types


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated step counts such as 0,1,10, got {text!r}"
        ) from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated step counts >= 0 such as 0,1,10, got {text!r}"
        )
    return sorted(set(steps))


def parse_policy(text: str) -> Policy:
    """A checkpoint policy from its CLI spelling.

    ``store_all``, ``sqrt``, ``binomial``, ``auto`` (the shorthands of :func:`fmaml.scan`), or
    with a number: ``binomial:S`` (``Binomial(snapshots=S)``), ``sqrt:N``/``uniform:N``
    (``Uniform(every=N)``), ``auto:S`` (``Auto(max_snapshots=S)``).
    """
    name, _, number = text.partition(":")
    if not number:
        try:
            return resolve_policy(name, owner="--checkpoint")
        except ValueError:
            pass
    else:
        try:
            n = int(number)
        except ValueError:
            n = 0
        if n >= 1:
            if name == "binomial":
                return Binomial(snapshots=n)
            if name in ("sqrt", "uniform"):
                return Uniform(every=n)
            if name == "auto":
                return Auto(max_snapshots=n)
    raise argparse.ArgumentTypeError(
        f"unknown policy {text!r}; use store_all, sqrt, binomial, auto, binomial:S (S "
        "snapshots), uniform:N (a snapshot every N steps) or auto:S (at most S snapshots)"
    )


def _policy_text(text: str) -> str:
    parse_policy(text)
    return text


def _device(text: str) -> str:
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


# --------------------------------------------------------------------------------------------
# the parsers


def _defaults(task: str) -> dict[str, Any]:
    if task == "sinusoid":
        from fmaml._tasks_sinusoid import DEFAULTS
    else:
        from fmaml._tasks_omniglot import DEFAULTS
    return DEFAULTS


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _add_train_options(parser: argparse.ArgumentParser, task: str) -> None:
    d = _defaults(task)
    S = argparse.SUPPRESS

    groups: list[Any] = []

    def opt(flag: str, key: str, help: str, **kw: Any) -> None:
        if key in d and d[key] is not None and kw.get("action") != "store_true":
            if kw.get("action") is not argparse.BooleanOptionalAction:
                help = f"{help} (default: {_show(d[key])})"
            else:
                help = f"{help} (default: {'yes' if d[key] else 'no'})"
        if "metavar" not in kw and "type" in kw:
            kw["metavar"] = "X" if kw["type"] is _positive_float else "N"
        groups[-1].add_argument(flag, dest=key, default=S, help=help, **kw)

    groups.append(parser.add_argument_group("run"))
    opt("--out", "out", "run directory (default: runs/<task>-<timestamp>)", metavar="DIR")
    opt(
        "--resume",
        "resume",
        "continue the run in DIR from its last saved state (bitwise the same result as "
        "an uninterrupted run)",
        metavar="DIR",
    )
    opt("--iterations", "iterations", "meta-training iterations", type=_int_at_least(1))
    opt(
        "--time-budget",
        "time_budget",
        "stop training after MINUTES of training time (without --iterations: no iteration limit)",
        type=_positive_float,
        metavar="MINUTES",
    )
    opt("--save-every", "save_every", "save state.pt every N iterations", type=_int_at_least(1))
    opt("--log-every", "log_every", "log the meta-loss every N iterations", type=_int_at_least(1))
    opt("--seed", "seed", "seed of the model's initialisation and of the tasks", type=int)
    opt("--device", "device", "cpu, cuda or cuda:N", type=_device)
    opt("--threads", "threads", "torch CPU threads", type=_int_at_least(1))
    opt("--quiet", "quiet", "print only the final lines", action="store_true")

    groups.append(parser.add_argument_group("meta-learning"))
    opt("--meta-batch", "meta_batch", "tasks per meta-batch", type=_int_at_least(1))
    opt("--meta-lr", "meta_lr", "Adam learning rate of the meta-parameters", type=_positive_float)
    opt("--inner-steps", "inner_steps", "inner SGD steps in training", type=_int_at_least(1))
    opt("--inner-lr", "inner_lr", "inner SGD learning rate", type=_positive_float)
    opt(
        "--first-order",
        "first_order",
        "first-order MAML (no second derivatives)",
        action="store_true",
    )
    opt(
        "--checkpoint",
        "checkpoint",
        "checkpoint policy of the inner loop: store_all, sqrt, binomial, auto, binomial:S, "
        "uniform:N or auto:S (see fmaml plan)",
        type=_policy_text,
        metavar="POLICY",
    )
    opt(
        "--batching",
        "batching",
        "tasks vectorised (vmap) or one by one (loop)",
        choices=("vmap", "loop"),
    )
    opt(
        "--compile",
        "compile",
        "compile the meta-gradient with torch.compile: on (bare --compile), off, or auto "
        "(where measured to win: small models); see docs/compile.md",
        nargs="?",
        const="on",
        choices=("off", "on", "auto"),
        metavar="WHEN",
    )
    opt("--width", "width", "hidden width of the model", type=_int_at_least(1))

    groups.append(parser.add_argument_group("evaluation"))
    opt(
        "--eval-steps",
        "eval_steps",
        "adaptation steps at which to evaluate, comma-separated",
        type=_steps_list,
        metavar="LIST",
    )
    opt(
        "--eval-inner-lr",
        "eval_inner_lr",
        "inner learning rate in evaluation (default: --inner-lr)",
        type=_positive_float,
    )
    opt("--eval-tasks", "eval_tasks", "held-out tasks to evaluate on", type=_int_at_least(1))
    opt("--eval-seed", "eval_seed", "seed of the held-out tasks", type=int)

    groups.append(parser.add_argument_group(task))
    if task == "sinusoid":
        opt("--k-shot", "k_shot", "support points per task (K)", type=_int_at_least(1))
        opt("--k-query", "k_query", "query points per training task", type=_int_at_least(1))
        opt("--eval-query", "eval_query", "query points per held-out task", type=_int_at_least(1))
    else:
        opt(
            "--data-dir",
            "data_dir",
            "folder with images_background*.zip and all_runs.zip (required, except with --resume)",
            metavar="DIR",
        )
        opt("--n-way", "n_way", "classes per task (N)", type=_int_at_least(2))
        opt("--k-shot", "k_shot", "support drawings per class (K)", type=_int_at_least(1))
        opt("--queries", "queries", "query drawings per class", type=_int_at_least(1))
        opt(
            "--val-chars",
            "val_chars",
            "background characters held out for validation (0: none)",
            type=_int_at_least(0),
        )
        opt(
            "--rotate",
            "rotate",
            "add the 90/180/270-degree rotations of each character as new classes",
            action=argparse.BooleanOptionalAction,
        )
        opt("--image-size", "image_size", "image side in pixels", type=_int_at_least(16))
        opt(
            "--official-runs",
            "official_runs",
            "evaluate on the 20 official one-shot runs (all_runs.zip)",
            action=argparse.BooleanOptionalAction,
        )


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--length",
        "-k",
        type=_int_at_least(1),
        required=True,
        metavar="K",
        help="scan length: the number of inner steps",
    )
    parser.add_argument(
        "--snapshots",
        type=_int_at_least(1),
        metavar="S",
        help="snapshots for binomial and auto (default: binomial ceil(log2 K), auto its "
        "64 MiB budget)",
    )
    parser.add_argument(
        "--policy",
        default="binomial",
        choices=("store_all", "sqrt", "binomial", "auto"),
        help="the policy whose plan is shown in detail (default: binomial)",
    )
    parser.add_argument(
        "--model",
        default="sinusoid",
        choices=("sinusoid", "conv4"),
        help="carry size: the parameters of the sinusoid MLP 1-40-40-1 or of conv4-64 "
        "(20-way) in float32 (default: sinusoid)",
    )
    parser.add_argument(
        "--model-bytes",
        type=_int_at_least(1),
        metavar="B",
        help="carry size in bytes instead of --model",
    )
    parser.add_argument(
        "--tasks",
        type=_int_at_least(1),
        default=1,
        metavar="T",
        help="tasks vectorised together with vmap: the carry holds T copies (default: 1)",
    )


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``train`` (with ``sinusoid`` and ``omniglot``) and ``plan`` to ``fmaml``'s parser."""
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
    _add_train_options(sin, "sinusoid")
    sin.set_defaults(run=run_train)
    omni = tasks.add_parser(
        "omniglot",
        help="N-way K-shot Omniglot with conv4 (default 20-way 1-shot)",
        description="MAML on Omniglot: conv4, 28x28, N-way K-shot episodes with rotation "
        "augmentation, trained on the background characters, evaluated after 1 and 10 steps "
        "on held-out characters and on the 20 official one-shot runs.",
    )
    _add_train_options(omni, "omniglot")
    omni.set_defaults(run=run_train)
    plan = commands.add_parser(
        "plan",
        help="what a checkpoint policy costs for K inner steps",
        description="Print the cost of the checkpoint schedules for a scan of K steps: step "
        "evaluations (forward, recomputed, with a graph), snapshots and their memory, for "
        "store_all, sqrt, binomial and auto.",
    )
    _add_plan_options(plan)
    plan.set_defaults(run=run_plan)


# --------------------------------------------------------------------------------------------
# fmaml train


def run_train(args: argparse.Namespace) -> int:
    """``fmaml train TASK``: returns the exit status; errors are one line on stderr.

    Under ``torchrun --nproc-per-node=N`` the same command trains data-parallel: every rank
    checks that it was started with the same options, rank 0 prepares the run directory, the
    ranks share each meta-batch (:func:`fmaml.distributed.distributed_meta_grad`) and the
    evaluation, and only rank 0 prints and writes. An error every rank shares is printed once.
    """
    prog = f"fmaml train {args.task}"
    threads = torch.get_num_threads()
    main = True
    try:
        device = _requested_device(args)
        backend = None if device.startswith("cuda") else "gloo"
        with distributed.setup(backend=backend, device=device) as ctx:
            main = ctx.is_main
            try:
                return _train(args, ctx)
            except (CLIError, RunStopped) as e:
                if ctx.world_size > 1 and not getattr(e, "shared", True):
                    # this rank alone failed (a save): stop the others too (see fail_together)
                    _print_error(prog, e)
                    distributed._fail(e)
                elif main:  # the same on every rank: print it once, no need to abort
                    _print_error(prog, e)
                return e.status
    except CLIError as e:
        if main:
            _print_error(prog, e)
        return e.status
    finally:
        torch.set_num_threads(threads)


def _print_error(prog: str, e: CLIError | RunStopped) -> None:
    label = "error: " if isinstance(e, CLIError) else ""
    print(f"{prog}: {label}{e}", file=sys.stderr)


def _requested_device(args: argparse.Namespace) -> str:
    """The device the run will use (given, or a resumed run's, or the default), checked."""
    device = getattr(args, "device", None)
    resume = getattr(args, "resume", None)
    if device is None and resume is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            device = json.loads((Path(resume) / "config.json").read_text()).get("device")
    device = device if isinstance(device, str) else _defaults(args.task)["device"]
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


def _resolve(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any] | None, Path]:
    """The resolved configuration, the resume state (or None) and the run directory."""
    task = args.task
    given = {k: v for k, v in vars(args).items() if k not in ("task", "command", "run")}
    resume_dir = given.pop("resume", None)
    out = given.pop("out", None)
    quiet = given.pop("quiet", False)
    config = dict(_defaults(task))
    state = None
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        saved, state = _read_run(run_dir, task)
        if out is not None and Path(out).resolve() != run_dir.resolve():
            raise CLIError(
                f"--out {out} and --resume {resume_dir} name different directories; a resumed "
                "run continues in its own directory, so drop --out"
            )
        for key in FIXED_ON_RESUME:
            if key in given and key in saved and given[key] != saved[key]:
                flag = "--" + key.replace("_", "-")
                raise CLIError(
                    f"--resume {resume_dir}: that run was trained with {flag} "
                    f"{_show(saved[key])}, not {_show(given[key])}; drop {flag} to continue it, "
                    "or start a new run without --resume"
                )
        config.update({k: v for k, v in saved.items() if k in config})
        for key in ("data", "history"):
            if key in saved:
                config[key] = saved[key]
    else:
        run_dir = _new_run_dir(task, out)
    config.update(given)
    if "time_budget" in given and "iterations" not in given:
        config["iterations"] = None
    if config["eval_inner_lr"] is None:
        config["eval_inner_lr"] = config["inner_lr"]
    config["task"] = task
    config["quiet"] = quiet
    return config, state, run_dir


def _read_run(run_dir: Path, task: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if not run_dir.is_dir():
        raise CLIError(
            f"--resume {run_dir}: no such directory; pass a run directory that fmaml train "
            "wrote (it holds config.json and state.pt)"
        )
    config_path, state_path = run_dir / "config.json", run_dir / "state.pt"
    if not config_path.is_file() or not state_path.is_file():
        missing = "config.json" if not config_path.is_file() else "state.pt"
        raise CLIError(
            f"--resume {run_dir}: not a resumable run directory (no {missing}); pass a "
            "directory that fmaml train wrote, or start a new run without --resume"
        )
    try:
        saved = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CLIError(f"--resume {run_dir}: cannot read config.json ({e})") from e
    if saved.get("task") != task:
        raise CLIError(
            f"--resume {run_dir}: that is a {saved.get('task')!r} run, not {task!r}; use "
            f"fmaml train {saved.get('task')} --resume {run_dir}"
        )
    try:
        state = load_state(state_path)
    except Exception as e:
        raise CLIError(
            f"--resume {run_dir}: cannot load state.pt ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the run cannot be continued"
        ) from e
    return saved, state


def _new_run_dir(task: str, out: str | None) -> Path:
    """The run directory to create, checked to be creatable (nothing is created here)."""
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path("runs") / f"{task}-{stamp}"
        path, n = base, 1
        while path.exists():
            path, n = Path(f"{base}-{n}"), n + 1
    else:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise CLIError(f"--out {out} is a file; pass a directory for the run")
        if path.is_dir() and any(path.iterdir()):
            raise CLIError(
                f"--out {out} already holds files; choose a new directory, or continue that "
                f"run with --resume {out}"
            )
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CLIError(
            f"cannot create the run directory {path}: {ancestor} is not a directory; pass "
            "another --out"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CLIError(
            f"cannot create the run directory {path}: {ancestor} is not writable; pass an --out "
            "in a writable place"
        )
    return path


def _check(config: dict[str, Any]) -> None:
    _check_device(config["device"])
    if config["task"] == "omniglot" and not config.get("data_dir"):
        raise CLIError("--data-dir is required: the folder with the Omniglot zips")


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


def _make_job(config: dict[str, Any], state: dict[str, Any] | None) -> Any:
    if config["task"] == "sinusoid":
        from fmaml._tasks_sinusoid import SinusoidJob

        return SinusoidJob(config)
    from fmaml._tasks_omniglot import DataError, OmniglotJob, load_data

    try:
        data = load_data(config)
    except DataError as e:
        raise CLIError(str(e).rstrip(".")) from e
    fingerprint = data.fingerprint()
    saved = config.get("data")
    if state is not None and saved is not None and saved != fingerprint:
        raise CLIError(
            f"--data-dir {config['data_dir']} holds other characters than the run was trained "
            f"on ({fingerprint['train_classes']} training classes, not "
            f"{saved['train_classes']}); pass the run's original --data-dir"
        )
    config["data"] = fingerprint
    config["data_dir"] = str(Path(config["data_dir"]).resolve())  # resumable from anywhere
    return OmniglotJob(config, data)


def _train(args: argparse.Namespace, ctx: distributed.Context) -> int:
    try:
        distributed.check_same_config({k: v for k, v in vars(args).items() if k != "run"})
    except ValueError as e:
        raise CLIError(str(e).replace("fmaml.distributed.check_same_config: ", "")) from e

    def prepare() -> tuple[dict[str, Any], dict[str, Any] | None, Path]:
        config, state, run_dir = _resolve(args)
        _check(config)
        return config, state, run_dir

    # rank 0 picks the run directory (and reads a resumed state) for every rank
    config, state, run_dir = _on_main(ctx, prepare)
    policy = parse_policy(config["checkpoint"])
    torch.set_num_threads(config["threads"])
    job = _together(ctx, lambda: _make_job(config, state))
    quiet = config.pop("quiet") or not ctx.is_main
    # all checks passed: only now is anything written
    resumed = state is not None

    def create() -> dict[str, Any]:
        try:
            run_dir.mkdir(parents=True, exist_ok=resumed)
        except OSError as e:
            raise CLIError(
                f"cannot create the run directory {run_dir} ({e}); pass another --out"
            ) from e
        config.update(_provenance(config, run_dir, job, resumed, ctx.world_size))
        write_json(run_dir / "config.json", config)
        return config

    config = _on_main(ctx, create)
    if not quiet:
        start = f", resuming at iteration {state['iteration']}" if resumed else ""
        limit = _limit(config)
        print(f"fmaml train {config['task']}: {job.describe()}")
        print(
            f"  {limit}, checkpoint {config['checkpoint']}, batching {config['batching']}, "
            + ("" if config["compile"] == "off" else f"compile {config['compile']}, ")
            + f"{config['threads']} thread(s), {config['device']}{start}"
            + (f", {ctx.world_size} processes ({ctx.backend})" if ctx.world_size > 1 else "")
        )
        print(f"  run directory: {run_dir}", flush=True)
    try:
        result, model, params = train(
            job, run_dir, policy=policy, resume=state, quiet=quiet, ctx=ctx
        )
    except OSError as e:  # a failed save (rank 0 only): the previous state.pt is intact
        stopped = RunStopped(
            f"error: cannot write to the run directory ({e}); free space or fix permissions, "
            f"then continue with: fmaml train {config['task']} --resume {run_dir}",
            1,
        )
        stopped.shared = False
        raise stopped from e
    if not quiet:
        print("evaluating ...", file=sys.stderr, flush=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    evaluation = job.evaluate(model, params)  # sharded over the ranks
    eval_wall, eval_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if not ctx.is_main:
        return 0
    report = {
        "task": config["task"],
        "iterations": result.iteration,
        "stopped_by": result.stopped_by,
        "train_time_s": round(result.elapsed, 3),
        "train_cpu_time_s": round(result.cpu_time, 3),
        "eval_time_s": round(eval_wall, 3),
        "eval_cpu_time_s": round(eval_cpu, 3),
        **evaluation,
    }
    write_json(run_dir / "eval.json", report)
    try:
        import matplotlib  # noqa: F401  (figures are optional: matplotlib is not a dependency)
    except ImportError:
        print("note: matplotlib is not installed, so no figures (pip install matplotlib)")
    else:
        title = f"fmaml train {config['task']}"
        plot_training_curve(run_dir / "training_curve.png", result.records, title)
        job.plot(run_dir, model, params)
    for line in job.summary(evaluation):
        print(line)
    per_it = result.elapsed / result.iteration * 1e3 if result.iteration else math.nan
    print(
        f"trained {result.iteration} iterations"
        f"{' (time budget reached)' if result.stopped_by == 'time budget' else ''} in "
        f"{result.elapsed:.1f} s, CPU {result.cpu_time:.1f} s ({per_it:.2f} ms per iteration); "
        f"evaluated in {eval_wall:.1f} s"
    )
    print(f"run directory: {run_dir}", flush=True)
    return 0


def _limit(config: dict[str, Any]) -> str:
    parts = []
    if config["iterations"] is not None:
        parts.append(f"{config['iterations']} iterations")
    if config["time_budget"] is not None:
        parts.append(f"time budget {config['time_budget']:g} min")
    return " or ".join(parts)


def _provenance(
    config: dict[str, Any], run_dir: Path, job: Any, resumed: bool, processes: int
) -> dict[str, Any]:
    model = job.build_model()
    now = datetime.datetime.now().isoformat(timespec="seconds")
    history = list(config.get("history", []))
    history.append(
        {"started": now, "resumed": resumed, "argv": sys.argv[1:], "processes": processes}
    )
    return {
        "model": " ".join(repr(model).split()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "run_dir": str(run_dir),
        "fmaml": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "history": history,
    }


# --------------------------------------------------------------------------------------------
# fmaml plan


def _model_bytes(model: str) -> tuple[int, str]:
    if model == "sinusoid":
        from fmaml._tasks_sinusoid import DEFAULTS, build_model

        m = build_model(DEFAULTS)
        label = "the sinusoid MLP 1-40-40-1"
    else:
        from fmaml._tasks_omniglot import DEFAULTS, build_model

        m = build_model(DEFAULTS)
        label = "conv4-64, 20-way"
    n = sum(p.numel() for p in m.parameters())
    return n * 4, f"{label}: {n:,} float32 parameters"


def _cost(policy: Policy, length: int, carry: int) -> dict[str, Any]:
    """Step evaluations and snapshots of ``policy`` for one forward and backward pass."""
    if policy.stores_all(length):
        return {
            "snapshots": None,
            "forward": 0,
            "recomputed": 0,
            "graph": length,
            "evaluations": length,
            "memory": f"{length} step graphs, over {_bytes(length * carry)}",
        }
    plan = policy.plan(length, carry)
    forward = sum(a.stop - a.start for a in plan.forward if hasattr(a, "stop")) + 1
    recomputed = plan.evaluations - (forward - 1)
    return {
        "snapshots": plan.snapshots,
        "forward": forward,
        "recomputed": recomputed,
        "graph": length,
        "evaluations": forward + recomputed + length,
        "memory": _bytes(plan.snapshots * carry),
        "plan": plan,
    }


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _label(policy: Policy, length: int, carry: int) -> str:
    if isinstance(policy, StoreAll):
        return "store_all"
    if isinstance(policy, Uniform):
        every = policy.every or max(1, math.isqrt(length - 1) + 1)
        return f"sqrt (every {every})" if policy.every is None else f"uniform:{every}"
    if isinstance(policy, Binomial):
        return f"binomial:{policy.plan(length, carry).snapshots}"
    if policy.stores_all(length):
        return "auto (plain loop)"
    return f"auto ({policy.snapshots(length, carry)} snapshots)"


def plan_policies(length: int, snapshots: int | None) -> dict[str, Policy]:
    """The four policies compared by ``fmaml plan``, with ``--snapshots`` applied."""
    return {
        "store_all": StoreAll(),
        "sqrt": Uniform(),
        "binomial": Binomial(snapshots),
        "auto": Auto() if snapshots is None else Auto(max_snapshots=snapshots),
    }


def run_plan(args: argparse.Namespace) -> int:
    """``fmaml plan``: the cost table and the chosen policy's plan."""
    length = args.length
    if args.model_bytes is not None:
        model_bytes, what = args.model_bytes, f"{args.model_bytes:,} bytes (--model-bytes)"
    else:
        model_bytes, what = _model_bytes(args.model)
    carry = model_bytes * args.tasks
    tasks = f" x {args.tasks} tasks" if args.tasks > 1 else ""
    print(f"Checkpoint plans for {length} inner steps; carry {_bytes(carry)} ({what}{tasks})")
    print(
        "Step evaluations for one gradient (forward and backward pass): forward = run without a "
        "graph\nin the forward pass, recomputed = run again without a graph in the backward "
        "pass, with graph =\nrun with a graph (store_all: all in the forward pass), per step = "
        "their sum / K. Memory: the\nsnapshots held at most (carries); store_all holds every "
        "step's autograd graph instead, each\nlarger than a carry."
    )
    header = (
        f"  {'policy':<24}{'snapshots':>10}{'forward':>10}{'recomputed':>12}{'with graph':>12}"
        f"{'per step':>10}  memory"
    )
    print()
    print(header)
    chosen = None
    for name, policy in plan_policies(length, args.snapshots).items():
        cost = _cost(policy, length, carry)
        snaps = "-" if cost["snapshots"] is None else str(cost["snapshots"])
        marker = "*" if name == args.policy else " "
        print(
            f"{marker} {_label(policy, length, carry):<24}{snaps:>10}{cost['forward']:>10}"
            f"{cost['recomputed']:>12}{cost['graph']:>12}{cost['evaluations'] / length:>10.2f}"
            f"  {cost['memory']}"
        )
        if name == args.policy:
            chosen = cost
    print()
    assert chosen is not None
    if "plan" in chosen:
        print(f"The plan of {args.policy} (*):")
        print("  " + chosen["plan"].describe(head=6).replace("\n", "\n  "))
    else:
        print(
            f"{args.policy} (*) has no plan: every step runs once, with a graph that is kept for "
            "the backward pass."
        )
    return 0
