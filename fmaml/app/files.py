"""Atomic files: a run killed in the middle of a write leaves the previous version.

Every file of a run directory is written by :func:`atomic_write`: to a temporary file
``.NAME.XXXX.tmp`` in the same directory, flushed with ``fsync``, then ``os.replace``-d over the
old one, and the directory fsynced.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "WriteError",
    "atomic_save",
    "atomic_write",
    "is_temporary",
    "remove_temporaries",
    "write_json",
]


class WriteError(OSError):
    """A file could not be written (disk full, read-only, permissions); its old version is intact.

    Attributes:
        path: the file.
        reason: the operating system's words (``strerror``), e.g. "No space left on device".
    """

    def __init__(self, path: Path, error: OSError) -> None:
        self.path = Path(path)
        self.reason = error.strerror or str(error)
        super().__init__(error.errno, f"cannot write {self.path}: {self.reason}")

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, replace.

    If anything fails before ``os.replace`` the temporary file is removed and ``path`` keeps its
    previous content; an ``OSError`` becomes a :class:`WriteError` naming ``path``. A process
    killed (SIGKILL) between the two leaves the temporary file: :func:`remove_temporaries`.
    """
    path = Path(path)
    try:
        _write_then_replace(path, data)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, e) from e
    _fsync_dir(path.parent)


def _write_then_replace(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_SUFFIX, dir=path.parent)
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


_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


def is_temporary(name: str, of: Callable[[str], bool] | None = None) -> bool:
    """Whether ``name`` is a temporary file of :func:`atomic_write` (for a file ``of`` accepts)."""
    match = _TEMPORARY.match(name)
    return match is not None and (of is None or of(match["name"]))


def remove_temporaries(directory: Path, of: Callable[[str], bool] | None = None) -> list[str]:
    """Remove the temporary files that killed writers left in ``directory``; their names.

    Only while no other process writes there (``fmaml train`` holds the run directory's lock).
    """
    removed = []
    for entry in sorted(Path(directory).iterdir()):
        if entry.is_file() and is_temporary(entry.name, of):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            removed.append(entry.name)
    return removed


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
