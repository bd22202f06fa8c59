"""Run directories of ``fmaml train``: a new one checked to be creatable, a resumed one read.

A run directory holds ``config.json`` (the resolved options and the history of the sessions),
``state.pt`` (the resume state), ``params.pt``, ``metrics.jsonl``/``metrics.csv``, ``eval.json``
and figures; see ``docs/cli.md``.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from fmaml.app.errors import CLIError
from fmaml.app.loop import load_state

__all__ = ["new_run_dir", "read_run"]


def read_run(run_dir: Path, task: str) -> tuple[dict[str, Any], dict[str, Any]]:
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


def new_run_dir(task: str, out: str | None) -> Path:
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
