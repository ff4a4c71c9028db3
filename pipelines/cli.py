"""The ``instdiff`` command. Each subcommand lives in its own module exposing ``register(subparsers)``, which
adds its parser and sets ``func``; subcommand modules never import this root (shared pieces live in
:mod:`pipelines.commands`).

The CLI sits in ``pipelines`` (not ``instdiff``) because some subcommands start Ray; the algorithms
package stays free of infrastructure.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from instdiff.errors import UsageError
from pipelines.commands import configure_logging, run_command

# subcommand modules, each with register(subparsers) that sets ``func`` on its parser
SUBCOMMANDS = (
    "pipelines.edit_cmd",
    "pipelines.batch",
    "pipelines.make_dataset",
    "pipelines.report",
    "pipelines.datasets",
    "pipelines.bench",
    "pipelines.train_cmd",
    "pipelines.serve.cli",
)

CliError = UsageError  # the name this module exported before instdiff.errors existed


def build_parser() -> argparse.ArgumentParser:
    """The ``instdiff`` argument parser with every subcommand of :data:`SUBCOMMANDS` registered."""
    parser = argparse.ArgumentParser(
        prog="instdiff",
        description="Fast automatic text-driven image editing (InstDiffEdit, FISEdit) on SD-family models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``instdiff``; returns the exit code (2 for any user-facing error, one line on stderr)."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return run_command(f"instdiff {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
