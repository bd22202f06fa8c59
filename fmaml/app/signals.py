"""Signals in ``fmaml train``: SIGINT and SIGTERM, in the training loop and around it.

In the loop a signal sets a flag, checked between iterations: the run saves and stops
(:func:`stop_on_signals`). Elsewhere (start-up, evaluation, figures) SIGTERM raises as Ctrl-C
does (:func:`terminate_interrupts`), and the command says in one line what the interruption left
(:class:`Session`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmaml.app.errors import Interrupted

__all__ = ["Session", "stop_on_signals", "terminate_interrupts"]


@dataclass
class Session:
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
def terminate_interrupts() -> Iterator[None]:
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


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """SIGINT/SIGTERM set a flag that the loop checks between iterations (main thread only).

    A second signal stops at once with :class:`Interrupted` (the last save stays valid).
    """
    received: list[int] = []
    if not _in_main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        if received:  # a second Ctrl-C: stop at once
            raise Interrupted(signum)
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
