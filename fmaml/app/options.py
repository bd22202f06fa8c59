"""The options of ``fmaml train``: one table, their argument types, the checkpoint spelling.

Every option is parsed with no default (``argparse.SUPPRESS``), so the options given on the
command line are known; the resolved configuration is the job's defaults, overridden by the saved
``config.json`` of a ``--resume``-d run, overridden by the options given.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fmaml._policy import Auto, Binomial, Policy, Uniform, resolve_policy
from fmaml.app import jobs

__all__ = [
    "FIXED_ON_RESUME",
    "TRAIN_OPTIONS",
    "Option",
    "add_train_options",
    "check_config",
    "int_at_least",
    "parse_policy",
    "positive_float",
    "show",
]

#: Options that shape the training trajectory: a ``--resume`` must not change them.
FIXED_ON_RESUME = (
    "seed",
    "meta_batch",
    "meta_lr",
    "inner_steps",
    "inner_lr",
    "first_order",
    "width",
    "k_shot",
    "k_query",
    "n_way",
    "queries",
    "val_chars",
    "rotate",
    "image_size",
    "log_every",
)


# --------------------------------------------------------------------------------------------
# argument types: text -> value, or argparse.ArgumentTypeError saying what is expected


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def positive_float(text: str) -> float:
    """A finite number ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def steps_list(text: str) -> list[int]:
    """Comma-separated step counts ``>= 0``, sorted and without repeats."""
    try:
        steps = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated step counts such as 0,1,10, got {text!r}"
        ) from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated step counts >= 0 such as 0,1,10, got {text!r}"
        )
    return sorted(set(steps))


#: ``--checkpoint NAME:N``: what the number means for each name that takes one, and the policy.
_NUMBERED: dict[str, tuple[str, Callable[[int], Policy]]] = {
    "binomial": ("the number of snapshots", lambda n: Binomial(snapshots=n)),
    "uniform": ("the steps between snapshots", lambda n: Uniform(every=n)),
    "sqrt": ("the steps between snapshots", lambda n: Uniform(every=n)),
    "auto": ("the most snapshots", lambda n: Auto(max_snapshots=n)),
}
_POLICY_SPELLINGS = (
    "store_all, sqrt, binomial, auto, binomial:S (S snapshots), uniform:N (a snapshot every N "
    "steps) or auto:S (at most S snapshots)"
)


def parse_policy(text: str) -> Policy:
    """A checkpoint policy from its command-line spelling.

    ``store_all``, ``sqrt``, ``binomial``, ``auto`` (the shorthands of :func:`fmaml.scan`), or
    with a number: ``binomial:S`` (``Binomial(snapshots=S)``), ``sqrt:N``/``uniform:N``
    (``Uniform(every=N)``), ``auto:S`` (``Auto(max_snapshots=S)``).
    """
    name, colon, number = text.partition(":")
    if not colon:
        try:
            return resolve_policy(name, owner="--checkpoint")
        except ValueError:
            pass
    elif name in _NUMBERED:
        meaning, make = _NUMBERED[name]
        try:
            n = int(number)
        except ValueError:
            n = 0
        if n < 1 or not number.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"in {text!r} the number after {name}: is {meaning}, an integer >= 1, got "
                f"{number!r}; for example {name}:4"
            )
        return make(n)
    elif name == "store_all":
        raise argparse.ArgumentTypeError(f"store_all takes no number, got {text!r}; use store_all")
    raise argparse.ArgumentTypeError(f"unknown policy {text!r}; use {_POLICY_SPELLINGS}")


def policy_text(text: str) -> str:
    """A checkpoint policy's spelling, checked (the configuration keeps the text)."""
    parse_policy(text)
    return text


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``."""
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def show(value: Any) -> str:
    """A configuration value as it is spelled on the command line."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


# --------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Option:
    """One option of ``fmaml train``.

    ``action`` is ``"store"`` (a value parsed by ``type``), ``"flag"`` (``--x`` sets True) or
    ``"switch"`` (``--x``/``--no-x``); ``tasks`` are the jobs that have it. A stored option with
    a ``const`` may be given bare (``--x`` means ``--x CONST``).
    """

    flag: str
    key: str
    help: str
    group: str
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    action: str = "store"
    choices: tuple[str, ...] | None = None
    tasks: tuple[str, ...] = jobs.TASKS
    const: str | None = None


_RUN, _META, _EVAL = "run", "meta-learning", "evaluation"
_SIN, _OMNI = ("sinusoid",), ("omniglot",)

TRAIN_OPTIONS: tuple[Option, ...] = (
    Option("--out", "out", "run directory (default: runs/<task>-<timestamp>)", _RUN, metavar="DIR"),
    Option(
        "--resume",
        "resume",
        "continue the run in DIR from its last saved state (bitwise the same result as an "
        "uninterrupted run)",
        _RUN,
        metavar="DIR",
    ),
    Option("--iterations", "iterations", "meta-training iterations", _RUN, int_at_least(1)),
    Option(
        "--time-budget",
        "time_budget",
        "stop training after MINUTES of training time (without --iterations: no iteration limit)",
        _RUN,
        positive_float,
        metavar="MINUTES",
    ),
    Option("--save-every", "save_every", "save state.pt every N iterations", _RUN, int_at_least(1)),
    Option(
        "--log-every", "log_every", "log the meta-loss every N iterations", _RUN, int_at_least(1)
    ),
    Option("--seed", "seed", "seed of the model's initialisation and of the tasks", _RUN, int),
    Option("--device", "device", "cpu, cuda or cuda:N", _RUN, device, metavar="DEVICE"),
    Option("--threads", "threads", "torch CPU threads", _RUN, int_at_least(1)),
    Option("--quiet", "quiet", "print only the final lines", _RUN, action="flag"),
    Option("--meta-batch", "meta_batch", "tasks per meta-batch", _META, int_at_least(1)),
    Option(
        "--meta-lr", "meta_lr", "Adam learning rate of the meta-parameters", _META, positive_float
    ),
    Option("--inner-steps", "inner_steps", "inner SGD steps in training", _META, int_at_least(1)),
    Option("--inner-lr", "inner_lr", "inner SGD learning rate", _META, positive_float),
    Option(
        "--first-order",
        "first_order",
        "first-order MAML (no second derivatives)",
        _META,
        action="flag",
    ),
    Option(
        "--checkpoint",
        "checkpoint",
        "checkpoint policy of the inner loop: store_all, sqrt, binomial, auto, binomial:S, "
        "uniform:N or auto:S (see fmaml plan)",
        _META,
        policy_text,
        metavar="POLICY",
    ),
    Option(
        "--batching",
        "batching",
        "tasks vectorised (vmap), one by one (loop), or chosen from the model and the device "
        "(auto: fmaml.MAML's default)",
        _META,
        choices=("auto", "vmap", "loop"),
    ),
    Option(
        "--compile",
        "compile",
        "compile the meta-gradient with torch.compile: on (a bare --compile), off, or auto "
        "(where measured to win: small models); see docs/compile.md",
        _META,
        choices=("off", "on", "auto"),
        metavar="WHEN",
        const="on",
    ),
    Option("--width", "width", "hidden width of the model", _META, int_at_least(1)),
    Option(
        "--eval-steps",
        "eval_steps",
        "adaptation steps at which to evaluate, comma-separated",
        _EVAL,
        steps_list,
        metavar="LIST",
    ),
    Option(
        "--eval-inner-lr",
        "eval_inner_lr",
        "inner learning rate in evaluation (default: --inner-lr)",
        _EVAL,
        positive_float,
    ),
    Option("--eval-tasks", "eval_tasks", "held-out tasks to evaluate on", _EVAL, int_at_least(1)),
    Option("--eval-seed", "eval_seed", "seed of the held-out tasks", _EVAL, int),
    Option(
        "--k-shot", "k_shot", "support points per task (K)", "sinusoid", int_at_least(1), tasks=_SIN
    ),
    Option(
        "--k-query",
        "k_query",
        "query points per training task",
        "sinusoid",
        int_at_least(1),
        tasks=_SIN,
    ),
    Option(
        "--eval-query",
        "eval_query",
        "query points per held-out task",
        "sinusoid",
        int_at_least(1),
        tasks=_SIN,
    ),
    Option(
        "--data-dir",
        "data_dir",
        "folder with images_background*.zip and all_runs.zip (required, except with --resume)",
        "omniglot",
        metavar="DIR",
        tasks=_OMNI,
    ),
    Option("--n-way", "n_way", "classes per task (N)", "omniglot", int_at_least(2), tasks=_OMNI),
    Option(
        "--k-shot",
        "k_shot",
        "support drawings per class (K)",
        "omniglot",
        int_at_least(1),
        tasks=_OMNI,
    ),
    Option(
        "--queries", "queries", "query drawings per class", "omniglot", int_at_least(1), tasks=_OMNI
    ),
    Option(
        "--val-chars",
        "val_chars",
        "background characters held out for validation (0: none)",
        "omniglot",
        int_at_least(0),
        tasks=_OMNI,
    ),
    Option(
        "--rotate",
        "rotate",
        "add the 90/180/270-degree rotations of each character as new classes",
        "omniglot",
        action="switch",
        tasks=_OMNI,
    ),
    Option(
        "--image-size",
        "image_size",
        "image side in pixels",
        "omniglot",
        int_at_least(16),
        tasks=_OMNI,
    ),
    Option(
        "--official-runs",
        "official_runs",
        "evaluate on the 20 official one-shot runs (all_runs.zip)",
        "omniglot",
        action="switch",
        tasks=_OMNI,
    ),
)


def add_train_options(parser: argparse.ArgumentParser, task: str) -> None:
    """Add the options of ``fmaml train TASK`` to ``parser``, in groups, without defaults."""
    defaults = jobs.defaults(task)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in TRAIN_OPTIONS:
        if task not in option.tasks:
            continue
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        groups[option.group].add_argument(
            option.flag,
            dest=option.key,
            default=argparse.SUPPRESS,
            **_argparse_kwargs(option, defaults),
        )


def _argparse_kwargs(option: Option, defaults: dict[str, Any]) -> dict[str, Any]:
    default = defaults.get(option.key)
    help = option.help
    if option.action == "flag":
        return {"action": "store_true", "help": help}
    if option.action == "switch":
        if default is not None:
            help = f"{help} (default: {'yes' if default else 'no'})"
        return {"action": argparse.BooleanOptionalAction, "help": help}
    if default is not None:
        help = f"{help} (default: {show(default)})"
    kw: dict[str, Any] = {"help": help}
    if option.choices is not None:
        kw["choices"] = option.choices
    if option.const is not None:
        kw["nargs"], kw["const"] = "?", option.const
    if option.type is not None:
        kw["type"] = option.type
        kw["metavar"] = option.metavar or ("X" if option.type is positive_float else "N")
    elif option.metavar is not None:
        kw["metavar"] = option.metavar
    return kw


# --------------------------------------------------------------------------------------------
# a saved configuration, checked with the same types


def check_config(config: Any, task: str) -> dict[str, Any]:
    """The options of a saved ``config.json``, each checked as its command-line option is.

    Returns the options of ``fmaml train TASK`` that ``config`` holds, with their checked values;
    raises ``ValueError`` naming the first bad one (``config`` not an object, a value of the
    wrong type or out of range, an option that shapes the trajectory missing).
    """
    if not isinstance(config, dict):
        raise ValueError(f"it holds a JSON {_json_type(config)}, not an object of options")
    defaults = jobs.defaults(task)
    checked: dict[str, Any] = {}
    for option in TRAIN_OPTIONS:
        key = option.key
        if task not in option.tasks or key not in defaults or key not in config:
            continue
        value = config[key]
        if value is None and (defaults[key] is None or key == "iterations"):
            checked[key] = None
        else:
            checked[key] = _check_value(option, value)
    missing = [k for k in FIXED_ON_RESUME if k in defaults and k not in config]
    if missing:
        raise ValueError(f"`{missing[0]}` is missing (the run's trajectory depends on it)")
    return checked


def _check_value(option: Option, value: Any) -> Any:
    key = option.key
    if option.action in ("flag", "switch"):
        if not isinstance(value, bool):
            raise ValueError(f"`{key}` is {value!r}; it must be true or false")
        return value
    if option.type is None or option.type in (device, policy_text) or option.choices:
        if not isinstance(value, str):
            raise ValueError(f"`{key}` is {value!r}; it must be a string")
        if option.choices and value not in option.choices:
            raise ValueError(f"`{key}` is {value!r}; it must be one of {', '.join(option.choices)}")
        text = value
    elif option.type is steps_list:
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            raise ValueError(f"`{key}` is {value!r}; it must be a list of step counts")
        text = ",".join(map(str, value))
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"`{key}` is {value!r}; it must be a number")
    else:
        text = str(value)
    try:
        return option.type(text) if option.type is not None else text
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"`{key}` is {value!r}: {e}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
