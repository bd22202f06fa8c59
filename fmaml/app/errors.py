"""One-line errors of the ``fmaml`` commands and their exit statuses.

Exit statuses: 0 success; 2 something to fix before running the command it names (a bad option,
path or data directory, an incompatible ``--resume``, a damaged or unwritable run directory, a
full disk); 1 the training failed (a non-finite meta-loss or meta-gradient); 130/143 stopped by
SIGINT/SIGTERM (in the training loop: after saving the state).
"""

from __future__ import annotations

import signal

__all__ = ["CLIError", "Interrupted", "RunStopped"]


class CLIError(Exception):
    """A one-line error for stderr, with the exit status (2: usage)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class RunStopped(Exception):
    """Training stopped early on purpose (a signal) or by failure; the last save is intact."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        #: whether every rank of a torchrun job stopped the same way (False: this rank alone)
        self.shared = True


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) outside the training loop, raised where Ctrl-C raises
    ``KeyboardInterrupt``; ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
