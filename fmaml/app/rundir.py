"""Run directories of ``fmaml train``: created, resumed, locked, checked, cleaned.

A run directory holds ``config.json`` (the resolved options and the history of the sessions),
``state.pt`` (the resume state), ``params.pt``, ``metrics.jsonl``/``metrics.csv``, ``eval.json``
and figures; see ``docs/cli.md``. A directory is *unstarted* when it holds no more than what a
run writes before its first save (``config.json``, empty metrics, temporary files): a run
stopped that early can be started again in it, as a new run or with ``--resume``.

While a command works in a run directory it holds the directory's lock (``flock``, released by
the kernel when the process dies, so a killed run never wedges it), and it removes the temporary
files that killed writers left behind.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fmaml.app import jobs
from fmaml.app.errors import CLIError
from fmaml.app.files import is_temporary, remove_temporaries
from fmaml.app.loop import StateError, check_state, load_state
from fmaml.app.metrics import DAMAGED
from fmaml.app.options import check_config

__all__ = ["RUN_FILES", "locked", "new_run_dir", "read_run", "tidy"]

#: The files ``fmaml train`` writes in a run directory, besides its figures (``*.png``).
RUN_FILES = (
    "config.json",
    "state.pt",
    "params.pt",
    "metrics.jsonl",
    "metrics.csv",
    "eval.json",
    DAMAGED,
)


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock, or raise :class:`CLIError` if another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CLIError(
                f"another fmaml train is running in {run_dir}; wait for it to finish (or stop "
                "it), then run this command again"
            ) from None
        except OSError:  # a file system without locks: go on without
            pass
        yield
    finally:
        os.close(fd)


def tidy(run_dir: Path) -> list[str]:
    """Remove the temporary files killed writers left in ``run_dir`` (under its lock)."""
    return remove_temporaries(run_dir, of=_ours)


def _ours(name: str) -> bool:
    """Whether ``name`` is a file ``fmaml train`` writes (its temporaries are removable)."""
    return name in RUN_FILES or name.endswith(".png") or name == "write-test"


def unstarted(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing a run could continue from (see the module doc)."""
    for entry in run_dir.iterdir():
        name = entry.name
        if is_temporary(name) or name == "config.json":
            continue
        if name in ("metrics.jsonl", "metrics.csv") and entry.is_file() and _no_records(entry):
            continue
        return False
    return True


def _no_records(path: Path) -> bool:
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    return len(lines) <= (1 if path.suffix == ".csv" else 0)  # the CSV's header


def check_writable(run_dir: Path, flag: str) -> None:
    """Raise :class:`CLIError` unless a file can be created in ``run_dir``."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(
            f"{flag}: cannot write in {run_dir} ({e.strerror or e}); make it writable, or copy "
            f"it (cp -r {run_dir} NEW) and continue the copy with --resume NEW"
        ) from e


def read_run(
    run_dir: Path, task: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """A run directory to resume: its raw ``config.json``, its checked options, its state.

    The state is ``None`` when the run stopped before its first save (no ``state.pt``): it
    starts again from iteration 0, which gives the same run. Everything that could stop the
    run later is checked here, before anything is written.
    """
    flag = f"--resume {run_dir}"
    if not run_dir.is_dir():
        raise CLIError(
            f"{flag}: no such directory; pass a run directory that fmaml train wrote (it holds "
            "config.json and state.pt)"
        )
    config_path, state_path = run_dir / "config.json", run_dir / "state.pt"
    if not config_path.is_file():
        if state_path.is_file():
            raise CLIError(
                f"{flag}: state.pt without config.json; put the run's config.json back, or "
                "start a new run with --out NEW"
            )
        if unstarted(run_dir):
            raise CLIError(
                f"{flag}: the directory holds no run yet (stopped before it wrote config.json); "
                f"start the run in it with: fmaml train {task} --out {run_dir} ..."
            )
        raise CLIError(
            f"{flag}: not a resumable run directory (no config.json); pass a directory that "
            "fmaml train wrote, or start a new run without --resume"
        )
    try:
        saved = json.loads(config_path.read_bytes())
    except (OSError, ValueError) as e:
        raise CLIError(
            f"{flag}: cannot read config.json ({_first_line(e)}); restore it, or start a new "
            "run with --out NEW"
        ) from e
    if isinstance(saved, dict) and saved.get("task") in jobs.TASKS and saved["task"] != task:
        raise CLIError(
            f"{flag}: that is a {saved['task']!r} run, not {task!r}; use "
            f"fmaml train {saved['task']} --resume {run_dir}"
        )
    try:
        if isinstance(saved, dict) and saved.get("task") != task:
            raise ValueError(f"`task` is {saved.get('task')!r}, not one of {list(jobs.TASKS)}")
        options = check_config(saved, task)
    except ValueError as e:
        raise CLIError(
            f"{flag}: config.json is damaged: {e}; fix it in {config_path} (the value the run "
            "was started with), or start a new run with --out NEW"
        ) from e
    state = None
    if state_path.is_file():
        try:
            state = load_state(state_path)
            check_state(state)
        except StateError as e:
            raise CLIError(damaged_state(run_dir, task, str(e))) from e
        except Exception as e:
            why = f"{type(e).__name__}: {_first_line(e)}"
            raise CLIError(damaged_state(run_dir, task, why)) from e
    return saved, options, state


def damaged_state(run_dir: Path, task: str, why: str) -> str:
    """The error for a ``state.pt`` the run cannot continue from, and what to do."""
    return (
        f"--resume {run_dir}: state.pt is not a state this run can continue from ({why}); to "
        f"run it again from iteration 0, remove {run_dir / 'state.pt'} and run "
        f"fmaml train {task} --resume {run_dir}, or start a new run with --out NEW"
    )


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def new_run_dir(task: str, out: str | None) -> Path:
    """The run directory to create, checked to be creatable (nothing is created here).

    An ``--out`` that holds files is refused, unless it is unstarted (a run stopped before its
    first save; see :func:`unstarted`), which is started again.
    """
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
        if path.is_dir() and not unstarted(path):
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
