"""The ``fmaml`` command line: ``python -m fmaml COMMAND`` or the ``fmaml`` console script.

Commands:
    demo    print checkpoint plans and an exact MAML meta-gradient under several policies.
    train   meta-train MAML on sinusoid regression or Omniglot, evaluate, write a run directory.
    plan    print what each checkpoint policy costs for a given number of inner steps.

Each command is a subparser whose ``run`` default takes the parsed arguments and returns the exit
status. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fmaml import __version__, _cli, _demo

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fmaml``, one subparser per command."""
    parser = _cli.Parser(
        prog="fmaml",
        description="Memory-efficient, exact MAML on torch.func.",
    )
    parser.add_argument("--version", action="version", version=f"fmaml {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_cli.Parser
    )
    demo = commands.add_parser(
        "demo",
        help="checkpoint plans and an exact meta-gradient (a few seconds)",
        description=(
            "Print the checkpoint plans of a scan under the default policy and 'binomial', then "
            "compute a MAML meta-gradient with fmaml.scan under 'store_all', the default policy "
            "and 'binomial' and check that they agree."
        ),
    )
    _demo.add_arguments(demo)
    demo.set_defaults(run=_demo.run)
    _cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fmaml`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
