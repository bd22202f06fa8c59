"""The metrics of a run: ``metrics.jsonl`` (appended as the run logs), ``metrics.csv`` (the same
table, rewritten at each save) and ``training_curve.png``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from fmaml.app.files import atomic_write

__all__ = [
    "DAMAGED",
    "METRICS_FIELDS",
    "Recovered",
    "csv_bytes",
    "jsonl_bytes",
    "plot_training_curve",
    "recover_metrics",
]

METRICS_FIELDS = ("iteration", "meta_loss", "time", "cpu_time")


@dataclass
class Recovered:
    """The metrics of a run up to its saved iteration, read back from the run directory.

    Attributes:
        records: the records of ``log_every, 2 log_every, ...`` up to the saved iteration that
            were found, from ``metrics.jsonl`` or else from ``metrics.csv``, in order.
        damaged: the unreadable lines of ``metrics.jsonl`` (bytes, without the torn last line
            a crash leaves), to keep beside the log in ``metrics.jsonl.damaged``.
        warning: what was repaired or is missing, in one line; ``None`` when nothing was.
    """

    records: list[dict[str, float]]
    damaged: bytes = b""
    warning: str | None = None


#: Where :func:`recover_metrics`'s unreadable lines are kept.
DAMAGED = "metrics.jsonl.damaged"


def recover_metrics(run_dir: Path, upto: int, log_every: int) -> Recovered:
    """The records a resumed run keeps: every logged iteration up to ``upto``, or a warning.

    ``metrics.jsonl`` is appended as the run logs; ``metrics.csv`` holds the same records up
    to the last save (written atomically with it). A line of the log that cannot be read (a torn
    write, damage) is taken from the CSV; what neither file has is named in the warning, never
    skipped silently. Records after ``upto`` are dropped: the resumed run redoes them exactly.
    """
    lines, unreadable, torn = _log_lines(run_dir / "metrics.jsonl")
    found: dict[int, dict[str, float]] = {}
    for record in map(_record, lines):
        if record is not None:
            found.setdefault(int(record["iteration"]), record)
    expected = range(log_every, upto + 1, log_every)
    from_csv = []
    if any(i not in found for i in expected):
        for record in _csv_records(run_dir / "metrics.csv"):
            i = int(record["iteration"])
            if i in expected and i not in found:
                found[i] = record
                from_csv.append(i)
    records = [found[i] for i in expected if i in found]
    missing = [i for i in expected if i not in found]
    notes = []
    if unreadable:
        numbers = [n for n, _ in unreadable]
        notes.append(
            f"metrics.jsonl: {len(numbers)} unreadable line(s) ({_spans(numbers, 'line')}), kept "
            f"in {DAMAGED}"
        )
    if from_csv:
        recovered = _spans(sorted(from_csv), "iteration", log_every)
        notes.append(f"the records of {recovered} recovered from metrics.csv")
    if missing:
        notes.append(
            f"the records of {_spans(missing, 'iteration', log_every)} are in neither "
            "metrics.jsonl nor metrics.csv: missing from the log (the training is unaffected)"
        )
    damaged = b"".join(raw + b"\n" for _, raw in unreadable)
    del torn  # a crash's torn last line: its record comes after the saved state and is redone
    return Recovered(records, damaged, "; ".join(notes) or None)


def _log_lines(path: Path) -> tuple[list[bytes], list[tuple[int, bytes]], bytes]:
    """The complete lines of the log, the unreadable ones (numbered), and a torn last line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], [], b""
    *complete, torn = data.split(b"\n")  # the last piece has no newline: torn (or empty)
    good, bad = [], []
    for number, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        if _record(raw) is None:
            bad.append((number, raw))
        else:
            good.append(raw)
    return good, bad, torn


def _record(raw: bytes) -> dict[str, float] | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or set(record) != set(METRICS_FIELDS):
        return None
    iteration = record["iteration"]
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 1:
        return None
    for key in METRICS_FIELDS[1:]:
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
    return record


def _csv_records(path: Path) -> list[dict[str, float]]:
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for row in csv.DictReader(io.StringIO(text)):
        try:
            record = {"iteration": int(row["iteration"])}
            record.update({k: float(row[k]) for k in METRICS_FIELDS[1:]})
        except (KeyError, TypeError, ValueError):
            continue
        if record["iteration"] >= 1:
            records.append(record)
    return records


def _spans(numbers: list[int], noun: str, step: int = 1) -> str:
    """``[5, 6, 7, 9]`` -> ``"lines 5-7, 9"``: runs of ``step`` apart joined."""
    parts, i = [], 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] - numbers[j] == step:
            j += 1
        parts.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    return f"{noun}{'s' if len(numbers) > 1 else ''} {', '.join(parts)}"


def jsonl_bytes(records: list[dict[str, float]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def csv_bytes(records: list[dict[str, float]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRICS_FIELDS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: record.get(k) for k in METRICS_FIELDS})
    return out.getvalue().encode()


def plot_training_curve(path: Path, records: list[dict[str, float]], title: str) -> None:
    """``training_curve.png``: the logged meta-loss against the iteration (log scale)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    its = [r["iteration"] for r in records]
    losses = [r["meta_loss"] for r in records]
    ax.plot(its, losses, lw=1)
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("meta-loss (mean over the logging window)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
