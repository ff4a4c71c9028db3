"""What every command-line entry point shares: model flags, logging set-up, and the error rule.

The rule: an :class:`~instdiff.errors.InstdiffError` (a problem with the user's input, config or environment)
is printed as one line ``PROG: error: MESSAGE`` on stderr with exit code 2; anything else is a bug and keeps
its traceback. ``instdiff`` (``pipelines.cli``) and ``python -m pipelines.batch`` both run their commands
through :func:`run_command`; subcommand modules import this module, never the CLI root.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable

from instdiff.errors import InstdiffError

NOISY_LOGGERS = ("urllib3", "filelock", "PIL", "matplotlib", "botocore", "s3fs", "fsspec")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model selection flags shared by subcommands that load a model (``instdiff.models.load_bundle``)."""
    p.add_argument(
        "--model",
        default="default",
        help="'default' (embedded shapes model), 'tiny' (random, tests), a diffusers folder or a hub id "
        "such as CompVis/stable-diffusion-v1-4",
    )
    p.add_argument(
        "--inpaint-model",
        default=None,
        help="inpainting checkpoint for the final step, e.g. runwayml/stable-diffusion-inpainting",
    )
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:1, mps or cpu")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on accelerators, fp32 on CPU), fp32, fp16, bf16")
    p.add_argument("--local-files-only", action="store_true", help="never contact the hub")


def address_arg(value: str) -> str:
    """``--address``'s type: the value when its form is one Ray takes (checked before the command starts).

    Raises:
        argparse.ArgumentTypeError: a dashboard URL or a malformed address (the message names the accepted forms;
            :func:`pipelines.ray_connect.check_address_form`). Whether anything answers there is checked when
            the command starts (:func:`pipelines.ray_connect.check_address`).
    """
    from pipelines.ray_connect import RayConnectError, check_address_form

    value = value.strip()
    try:
        check_address_form(value, "--address")
    except RayConnectError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_address_arg(p: argparse.ArgumentParser) -> None:
    """Add ``--address``: the Ray cluster a command joins (the rules: :func:`pipelines.ray_connect.connect`)."""
    p.add_argument(
        "--address",
        default=None,
        type=address_arg,
        help="Ray cluster to join: HOST:PORT of its head (GCS), 'auto', ray://HOST:PORT, or 'local' for a private "
        "cluster on this machine (default: RAY_ADDRESS, else a private local cluster)",
    )


def configure_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) to stderr with time, level and logger name; chatty libraries at WARNING."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def one_line(message: object) -> str:
    """A message on one line: its lines stripped, empty ones dropped, the rest joined with ``"; "``."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def run_command(prog: str, func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run ``func(args)``; an :class:`InstdiffError` becomes one line on stderr and exit code 2.

    Args:
        prog: the program name the line starts with (``instdiff edit``).
        func: the command.
        args: its parsed arguments.

    Returns:
        ``func``'s exit code (``None``: 0), or 2 after a project error (a multi-line message is printed on one
        line, see :func:`one_line`).
    """
    try:
        return int(func(args) or 0)
    except InstdiffError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2


__all__ = ["add_address_arg", "add_model_args", "address_arg", "configure_logging", "one_line", "run_command"]


MAX_INT_DIGITS = 20  # every integer flag here fits: seeds go up to 2**64 - 1


def int_arg(text: str) -> int:
    """An integer flag's type: the value, or argparse's one-line error in the project's words.

    Raises:
        argparse.ArgumentTypeError: not an integer, or more than :data:`MAX_INT_DIGITS` digits (the message never
            repeats a long value in full, nor Python's advice about its integer-conversion limit).
    """
    value = text.strip()
    shown = text if len(text) <= 30 else f"{text[:20]}... ({len(text)} characters)"
    if not re.fullmatch(r"[+-]?[0-9]+", value):
        raise argparse.ArgumentTypeError(f"expected an integer (ASCII digits, optional sign); got {shown!r}")
    digits = value.lstrip("+-")
    if len(digits) > MAX_INT_DIGITS:
        raise argparse.ArgumentTypeError(
            f"a {len(digits)}-digit integer is out of range; accepted: integers of at most {MAX_INT_DIGITS} digits"
        )
    return int(value)
