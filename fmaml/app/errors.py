"""One-line errors of the ``fmaml`` commands and their exit statuses.

Exit statuses: 0 success; 2 a usage error (a bad option, path or data directory, an
incompatible ``--resume``); 1 a failure while training (a non-finite loss, a failed save);
130/143 stopped by SIGINT/SIGTERM after saving the state.
"""

from __future__ import annotations

__all__ = ["CLIError", "RunStopped"]


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
