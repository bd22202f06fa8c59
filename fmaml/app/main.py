"""The ``fmaml`` command: ``python -m fmaml COMMAND`` or the ``fmaml`` console script.

Commands, one module each:
    demo    print checkpoint plans and an exact MAML meta-gradient under several policies.
    train   meta-train MAML on sinusoid regression or Omniglot, evaluate, write a run directory.
    plan    print what each checkpoint policy costs for a given number of inner steps.

Each command module has ``add_command(commands)``, which adds its subparser with a ``run``
default: the parsed arguments in, the exit status out. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from fmaml import __version__
from fmaml.app import demo, plan, train

__all__ = ["Parser", "build_parser", "main"]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``prog: error: message``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fmaml``, one subparser per command."""
    parser = Parser(prog="fmaml", description="Memory-efficient, exact MAML on torch.func.")
    parser.add_argument("--version", action="version", version=f"fmaml {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
    for command in (demo, train, plan):
        command.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fmaml`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # `fmaml plan | head`: the reader has gone, stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
