"""The ``instdiff`` command. Each subcommand lives in its own module exposing ``register(subparsers)``.

The CLI sits in ``pipelines`` (not ``instdiff``) because some subcommands start Ray; the algorithms
package stays free of infrastructure.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from instdiff.errors import InstdiffError

# subcommand modules, each with register(subparsers) that sets ``func`` on its parser
SUBCOMMANDS = (
    "pipelines.edit_cmd",
    "pipelines.batch",
    "pipelines.make_dataset",
    "pipelines.report",
    "pipelines.datasets",
    "pipelines.bench",
    "pipelines.train_cmd",
)


class CliError(InstdiffError):
    """A command-line usage problem (flags that do not fit together); printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
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
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "filelock", "PIL", "matplotlib", "botocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except InstdiffError as exc:
        print(f"instdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        from instdiff.editing import EditInputError
        from instdiff.imageio import ImageInputError
        from instdiff.models import ModelLoadError

        if isinstance(exc, EditInputError | ImageInputError | ModelLoadError | FileNotFoundError) or (
            type(exc) is ValueError
        ):
            print(f"instdiff {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
