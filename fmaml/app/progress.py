"""The progress line of ``fmaml train`` (no dependency: tqdm is not used)."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """A dependency-free progress line on ``stream``, refreshed in place on a terminal.

    ``  37%|███████▍            | 7400/20000 [00:27<00:46, 270.1 it/s] meta-loss 0.5123``.
    Off a terminal (a log file, a pipe) it writes a plain line every 30 seconds instead.
    """

    BAR = 20

    def __init__(
        self,
        total: int | None,
        budget_s: float | None,
        start: int,
        enabled: bool,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.budget_s, self.start = total, budget_s, start
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.last_draw = -math.inf
        self.width = 0

    def update(self, iteration: int, loss: float, elapsed: float, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        interval_s = 0.2 if self.tty else 30.0
        if not force and now - self.last_draw < interval_s:
            return
        self.last_draw = now
        line = self._line(iteration, loss, elapsed, now - self.t0)
        if self.tty:
            pad = " " * max(self.width - len(line), 0)
            self.stream.write("\r" + line + pad)
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, iteration: int, loss: float, elapsed: float) -> None:
        if not self.enabled:
            return
        self.last_draw = -math.inf
        self.update(iteration, loss, elapsed, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, iteration: int, loss: float, elapsed: float, wall: float) -> str:
        rate = (iteration - self.start) / wall if wall > 0 else 0.0
        fractions = []
        if self.total:
            fractions.append(iteration / self.total)
        if self.budget_s:
            fractions.append(elapsed / self.budget_s)
        frac = min(max(fractions, default=0.0), 1.0)
        if self.total is not None and (not self.budget_s or rate <= 0):
            left = (self.total - iteration) / rate if rate > 0 else math.nan
        elif self.budget_s:
            left = max(self.budget_s - elapsed, 0.0)
            if self.total is not None and rate > 0:
                left = min(left, (self.total - iteration) / rate)
        else:
            left = math.nan
        filled = frac * self.BAR
        full = int(filled)
        partial = " ▏▎▍▌▋▊▉"[int((filled - full) * 8)] if full < self.BAR else ""
        bar = ("█" * full + partial).ljust(self.BAR)
        count = f"{iteration}/{self.total}" if self.total is not None else f"{iteration}"
        return (
            f"{100 * frac:3.0f}%|{bar}| {count} [{_clock(elapsed)}<{_clock(left)}, "
            f"{rate:.1f} it/s] meta-loss {loss:.4f}"
        )


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"
