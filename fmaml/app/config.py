"""The configuration of a ``fmaml train`` run: the job's defaults, overridden by a resumed run's
``config.json``, overridden by the options given; and the checks that come before any write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from argparse import ArgumentTypeError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fmaml.app import jobs, options
from fmaml.app.errors import CLIError
from fmaml.app.metrics import recover_metrics
from fmaml.app.options import FIXED_ON_RESUME, show
from fmaml.app.rundir import check_writable, locked, new_run_dir, read_run, tidy

__all__ = ["Prepared", "check", "requested_device", "resolve"]


def requested_device(args: argparse.Namespace) -> str:
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


@dataclass
class Prepared:
    """What rank 0 resolves for every rank before anything is written."""

    config: dict[str, Any]
    state: dict[str, Any] | None
    run_dir: Path
    records: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warning: str | None = None
    damaged: bytes = b""


def resolve(args: argparse.Namespace, hold: contextlib.ExitStack) -> Prepared:
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
        prepared = Prepared(config, None, new_run_dir(task, out))
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
        prepared = Prepared(config, state, run_dir)
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


def check(config: dict[str, Any], given: dict[str, Any]) -> None:
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
