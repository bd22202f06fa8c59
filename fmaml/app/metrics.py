"""The metrics of a run: ``metrics.jsonl`` (appended as the run logs), ``metrics.csv`` (the same
table, rewritten at each save) and ``training_curve.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from fmaml.app.files import atomic_write

__all__ = ["METRICS_FIELDS", "csv_bytes", "jsonl_bytes", "plot_training_curve", "read_metrics"]

METRICS_FIELDS = ("iteration", "meta_loss", "time", "cpu_time")


def read_metrics(path: Path, upto: int) -> list[dict[str, float]]:
    """The records of ``metrics.jsonl`` up to iteration ``upto`` (a resumed run drops the rest)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash: everything after it is redone
            break
        if record.get("iteration", math.inf) > upto:
            break
        records.append(record)
    return records


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
