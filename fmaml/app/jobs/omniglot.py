"""``fmaml train omniglot``: N-way K-shot Omniglot classification (Finn et al., 2017, section 5.2).

The background characters (every ``images_background*.zip`` in ``--data-dir``) are split into
training and validation characters (a fixed, seeded split), and each part is augmented with the
90-degree rotations of its characters as new classes (Santoro et al., 2016). The model is conv4:
four blocks ``[Conv 3x3 (width), BatchNorm2d, ReLU, MaxPool 2]`` and a linear head to ``n_way``
classes; BatchNorm always normalises with the statistics of the batch it sees (as in MAML's
reference code), so the model has no running buffers. Evaluation: the query accuracy after 1 and
10 inner steps on validation episodes and on the 20 official 20-way one-shot runs of Lake et al.
(2015) (``all_runs.zip``), mean ± 1.96 std/sqrt(n) over tasks.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fmaml
from fmaml._typing import Params, Tasks
from fmaml.app.evaluation import evaluate_steps, interval
from fmaml.data import (
    OmniglotCharacters,
    as_tasks,
    load_background,
    load_one_shot_runs,
    rotate,
    sample_episodes,
    split,
)

__all__ = ["DEFAULTS", "OmniglotData", "OmniglotJob", "build_model", "load_data"]

#: The defaults of ``fmaml train omniglot``.
DEFAULTS: dict[str, Any] = {
    "iterations": 300,
    "time_budget": None,
    "meta_batch": 8,
    "meta_lr": 1e-3,
    "inner_steps": 1,
    "inner_lr": 0.1,
    "first_order": False,
    "checkpoint": "auto",
    "batching": "auto",
    "compile": "off",
    "eval_steps": [1, 10],
    "eval_inner_lr": None,
    "eval_tasks": 100,
    "eval_seed": 20170,
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "save_every": 20,
    "log_every": 5,
    "width": 64,
    "data_dir": None,
    "n_way": 20,
    "k_shot": 1,
    "queries": 5,
    "val_chars": 24,
    "rotate": True,
    "image_size": 28,
    "official_runs": True,
}

#: The seed of the training/validation character split (fixed: the same split for every run).
SPLIT_SEED = 0
#: Drawings per Omniglot character.
DRAWINGS = 20


class DataError(ValueError):
    """The data directory cannot give what the options ask for (usage error)."""


def build_model(config: dict[str, Any]) -> nn.Module:
    """conv4: 4 x [Conv 3x3 ``width``, BatchNorm2d (batch statistics), ReLU, MaxPool 2], Linear."""
    w, layers, channels = config["width"], [], 1
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, w, 3, padding=1),
            nn.BatchNorm2d(w, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = w
    size = config["image_size"]
    for _ in range(4):
        size //= 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(w * size * size, config["n_way"]))


class OmniglotData:
    """The classes a run trains and validates on, and the official runs (or ``None``)."""

    def __init__(
        self,
        train: OmniglotCharacters,
        val: OmniglotCharacters | None,
        runs: Tasks | None,
        n_characters: int,
    ) -> None:
        self.train, self.val, self.runs, self.n_characters = train, val, runs, n_characters

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must find again in ``--data-dir``."""
        return {
            "characters": self.n_characters,
            "train_classes": len(self.train),
            "val_classes": 0 if self.val is None else len(self.val),
            "train_names_hash": _names_hash(self.train.names),
        }


def _names_hash(names: tuple[str, ...]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _background(data_dir: str, mtimes: tuple[float, ...], image_size: int) -> OmniglotCharacters:
    return load_background(data_dir, image_size)


@functools.lru_cache(maxsize=4)
def _runs(data_dir: str, mtime: float, image_size: int) -> Tasks:
    return as_tasks(load_one_shot_runs(data_dir, image_size))


def load_data(config: dict[str, Any]) -> OmniglotData:
    """Read and check everything ``config`` needs from ``data_dir``; raise :class:`DataError`.

    Cached in-process by directory, file modification times and image size.
    """
    data_dir = Path(config["data_dir"])
    try:
        zips = sorted(data_dir.glob("images_background*.zip")) if data_dir.is_dir() else []
        mtimes = tuple(z.stat().st_mtime for z in zips)
        chars = _background(str(data_dir), mtimes, config["image_size"])
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise DataError(f"--data-dir {data_dir}: {_without_caller(e)}") from e
    n_val = config["val_chars"]
    if n_val >= len(chars):
        raise DataError(
            f"--val-chars {n_val} leaves no training characters out of the {len(chars)} in "
            f"{data_dir}; pass a smaller --val-chars"
        )
    if n_val:
        train, val = split(chars, [len(chars) - n_val, n_val], seed=SPLIT_SEED)
    else:
        train, val = chars, None
    if config["rotate"]:
        train = rotate(train)
        val = None if val is None else rotate(val)
    n_way = config["n_way"]
    hint = "pass a smaller --n-way" + ("" if config["rotate"] else " or drop --no-rotate")
    if n_way > len(train):
        raise DataError(
            f"--n-way {n_way} exceeds the {len(train)} training classes ({len(chars) - n_val} "
            f"characters{' x 4 rotations' if config['rotate'] else ''}); {hint}"
        )
    if val is not None and n_way > len(val):
        raise DataError(
            f"--n-way {n_way} exceeds the {len(val)} validation classes ({n_val} characters"
            f"{' x 4 rotations' if config['rotate'] else ''}); raise --val-chars or {hint}"
        )
    if config["k_shot"] + config["queries"] > DRAWINGS:
        raise DataError(
            f"--k-shot {config['k_shot']} + --queries {config['queries']} exceeds the "
            f"{DRAWINGS} drawings of an Omniglot character; lower one of them"
        )
    runs = None
    if config["official_runs"]:
        path = data_dir / "all_runs.zip"
        try:
            mtime = path.stat().st_mtime if path.is_file() else 0.0
            runs = _runs(str(data_dir), mtime, config["image_size"])
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise DataError(
                f"--data-dir {data_dir}: {_without_caller(e)} (or pass --no-official-runs to skip "
                "that evaluation)"
            ) from e
    return OmniglotData(train, val, runs, len(chars))


def _without_caller(error: Exception) -> str:
    """A library error's message without the function name it starts with."""
    return re.sub(r"^[\w.]+: ", "", str(error)).rstrip(".")


class OmniglotJob:
    """The Omniglot benchmark for :func:`fmaml.app.loop.train`."""

    def __init__(self, config: dict[str, Any], data: OmniglotData) -> None:
        self.config = config
        self.data = data
        self.device = torch.device(config["device"])
        self.train_chars = _on(data.train, self.device)

    def describe(self) -> str:
        c = self.config
        return (
            f"Omniglot {c['n_way']}-way {c['k_shot']}-shot ({c['queries']} queries per class), "
            f"{len(self.data.train)} training classes, conv4-{c['width']}, meta-batch "
            f"{c['meta_batch']}, {c['inner_steps']} inner step(s) of lr {c['inner_lr']}, "
            f"Adam {c['meta_lr']}"
        )

    def build_model(self) -> nn.Module:
        return build_model(self.config)

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def sample(self, generator: torch.Generator) -> Tasks:
        c = self.config
        return sample_episodes(
            self.train_chars, c["meta_batch"], c["n_way"], c["k_shot"], c["queries"], generator
        )

    def evaluate(self, model: nn.Module, params: Params) -> dict[str, Any]:
        c = self.config
        maml = fmaml.MAML(model, self.loss_fn, inner_lr=c["eval_inner_lr"], batching=c["batching"])

        def accuracy(p: Params, query: Any) -> torch.Tensor:
            x, y = query
            logits = functional_call(model, p, (x,))
            return (logits.argmax(-1) == y).to(torch.float32).mean()

        steps = c["eval_steps"]
        splits: dict[str, Any] = {}
        if self.data.val is not None:
            gen = torch.Generator().manual_seed(c["eval_seed"])
            val = _on(self.data.val, self.device)
            tasks = sample_episodes(
                val, c["eval_tasks"], c["n_way"], c["k_shot"], c["queries"], gen
            )
            acc = evaluate_steps(maml, params, tasks, steps, accuracy, chunk=10)
            splits["validation"] = {
                "description": (
                    f"{c['eval_tasks']} {c['n_way']}-way {c['k_shot']}-shot episodes "
                    f"({c['queries']} queries per class) from the {len(self.data.val)} classes "
                    f"of {c['val_chars']} held-out background characters (eval seed "
                    f"{c['eval_seed']})"
                ),
                "steps": {str(k): interval(acc[:, i]) for i, k in enumerate(steps)},
            }
        if self.data.runs is not None:
            n_runs = self.data.runs.support[0].shape[0]
            ways = self.data.runs.support[0].shape[1]
            if ways != c["n_way"]:
                splits["official_runs"] = {
                    "description": f"skipped: the official runs are {ways}-way; the model "
                    f"was trained {c['n_way']}-way (train with --n-way {ways})",
                    "steps": {},
                }
            else:
                runs = Tasks(*(tuple(t.to(self.device) for t in part) for part in self.data.runs))
                acc = evaluate_steps(maml, params, runs, steps, accuracy, chunk=n_runs)
                splits["official_runs"] = {
                    "description": (
                        f"the {n_runs} official {ways}-way one-shot runs of Lake et al. (2015), "
                        "all_runs.zip (accuracy per run; interval over runs)"
                    ),
                    "steps": {str(k): interval(acc[:, i]) for i, k in enumerate(steps)},
                }
        return {"metric": "query accuracy", "splits": splits}

    def summary(self, evaluation: dict[str, Any]) -> list[str]:
        c = self.config
        lines = [
            f"Omniglot {c['n_way']}-way {c['k_shot']}-shot: query accuracy "
            "(mean ± 95% interval over tasks)"
        ]
        names = {"validation": "validation", "official_runs": "official runs"}
        for key, split_ in evaluation["splits"].items():
            if not split_["steps"]:
                lines.append(f"  {names[key]}: {split_['description']}")
                continue
            parts = [
                f"{k} step{'' if k == '1' else 's'} {100 * s['mean']:.1f}% ± {100 * s['ci95']:.1f}"
                for k, s in split_["steps"].items()
            ]
            n = next(iter(split_["steps"].values()))["n"]
            lines.append(f"  {names[key] + ' (' + str(n) + ' tasks):':<27}" + ", ".join(parts))
        if not evaluation["splits"]:
            lines.append("  (no evaluation set: --val-chars 0 and --no-official-runs)")
        return lines

    def plot(self, run_dir: Path, model: nn.Module, params: Params) -> list[str]:
        return []


def _on(chars: OmniglotCharacters, device: torch.device) -> OmniglotCharacters:
    if chars.pixels.device == device:
        return chars
    return OmniglotCharacters(chars.pixels.to(device), chars.names)
