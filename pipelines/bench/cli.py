"""``instdiff bench``: the subcommand's flags, the command line recorded with the results, and its entry point."""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Any

from instdiff.config import parse_assignment
from pipelines.bench.config import ENGINES, load_bench_config
from pipelines.bench.runner import run_bench
from pipelines.commands import add_address_arg


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``instdiff bench`` to the CLI's subparsers."""
    p = sub.add_parser(
        "bench",
        help="run several editing methods on the same rows and aggregate a Table-1-style report",
        description="Run every run and sweep point of a bench config through the bulk job (each into "
        "OUTPUT/<run>/, resumable), then write RESULTS.md (Table 1/Table 2 layout), RESULTS.json, "
        "trade-off plots and a contact sheet.",
    )
    p.add_argument("--config", required=True, help="configs/bench/*.yaml")
    p.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a bench key, e.g. --set data.n=8 --set base.method.steps=10 (repeatable)",
    )
    p.add_argument("--output", default=None, help="override output (run folders)")
    p.add_argument("--results", default=None, help="override the results prefix")
    p.add_argument("--engine", default=None, choices=ENGINES)
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="LABEL",
        help="run only these labels (others are still aggregated from earlier outputs)",
    )
    p.add_argument("--aggregate-only", action="store_true", help="do not run; re-render from existing outputs")
    add_address_arg(p)
    p.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> str:
    """The ``instdiff bench`` command that reproduces this invocation (recorded with the results).

    Args:
        args: the parsed ``instdiff bench`` flags.

    Returns:
        A shell-quoted command line.
    """
    parts = ["instdiff", "bench", "--config", str(args.config)]
    for a in args.assignments:
        parts += ["--set", a]
    for key in ("output", "results", "engine"):
        if getattr(args, key):
            parts += [f"--{key}", str(getattr(args, key))]
    for label in args.only or []:
        parts += ["--only", label]
    if args.aggregate_only:
        parts.append("--aggregate-only")
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    """Run ``instdiff bench``: load the config with the flags on top, run it, print the files as JSON on stdout.

    Raises:
        InputNotFoundError: the config file (or ``data.input``) does not exist.
        ConfigError: a bad config key or value, or a bad ``--set``.
    """
    overrides: dict[str, Any] = dict(parse_assignment(a) for a in args.assignments)
    for key in ("output", "results", "engine"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    cfg = load_bench_config(args.config, overrides)
    paths = run_bench(cfg, command_line(args), args.only, args.aggregate_only, getattr(args, "address", None))
    print(json.dumps(paths))
    return 0
