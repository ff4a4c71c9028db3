"""``instdiff batch`` and ``python -m pipelines.batch``: the job's command line (flags over the YAML config)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from instdiff.errors import ConfigError
from pipelines import schema as S
from pipelines.batch.driver import run_job
from pipelines.commands import add_address_arg, add_model_args, configure_logging, int_arg, run_command
from pipelines.config import BatchConfig, load_config, parse_assignment

# dedicated flags → the config keys they set
_FLAG_KEYS = {
    "input": "input",
    "output": "output",
    "model": "model.spec",
    "inpaint_model": "model.inpaint",
    "device": "model.device",
    "dtype": "model.dtype",
    "local_files_only": "model.local_files_only",
    "method": "method.name",
    "preset": "method.preset",
    "steps": "method.steps",
    "strength": "method.strength",
    "seed": "seed",
    "batch_size": "actors.batch_size",
    "actors": "actors.pool_size",
    "num_gpus": "actors.num_gpus",
    "max_rows_per_file": "write.max_rows_per_file",
    "retry_errors": "retry_errors",
    "carry": "carry",
}


_PARSER_TEXT = {
    "description": "Edit every row of a Parquet dataset on Ray Data and write Parquet with the edited images, "
    "masks and metrics. Runs on the Ray cluster at --address or RAY_ADDRESS (under `ray job submit`: the job's "
    "cluster), else on a private local cluster. Relative paths are refused under `ray job submit`. "
    "Re-running with the same output resumes. Input schema:\n" + S.describe_input_schema(),
    "formatter_class": argparse.RawDescriptionHelpFormatter,
    "epilog": "examples:\n"
    "  instdiff batch --config configs/batch/demo.yaml\n"
    "  instdiff batch --config configs/batch/tiny.yaml --output out/tiny-8 --set method.steps=8\n"
    "  python -m pipelines.batch --config configs/batch/demo.yaml   # the same as instdiff batch\n"
    "  ray job submit --address http://HEAD:8265 --working-dir . -- \\\n"
    "      python -m pipelines.batch --config configs/batch/gpu-s3.yaml\n"
    "prints one JSON line: run_id, output, input_rows, skipped_ok, skipped_error, written, ok, error,\n"
    "seconds, rows_per_s, files, top_errors",
}
MODULE_PROG = "python -m pipelines.batch"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``batch`` subcommand to ``sub`` (its ``func`` is :func:`run`)."""
    p = sub.add_parser("batch", help="bulk-edit a Parquet dataset on Ray (local or s3://)", **_PARSER_TEXT)
    _add_arguments(p)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    """The job's flags (shared by ``instdiff batch`` and ``python -m pipelines.batch``); ``func`` is :func:`run`."""
    p.add_argument("--config", default=None, help="YAML job config (configs/batch/*.yaml); flags override it")
    p.add_argument("--input", default=None, help="input Parquet file or folder, local or s3://bucket/prefix")
    p.add_argument("--output", default=None, help="output folder, local or s3://bucket/prefix")
    add_address_arg(p)
    add_model_args(p)
    p.set_defaults(model=None, inpaint_model=None, device=None, dtype=None, local_files_only=None)
    p.add_argument("--method", default=None, help="instdiffedit, sdedit, diffedit or fisedit (method.name)")
    p.add_argument(
        "--preset",
        default=None,
        choices=["model", "paper"],
        help="where unset method settings come from (method.preset; default model): the model folder's "
        "instdiff.json (the embedded model: its measured best InstDiffEdit variant; SD checkpoints: the paper's), "
        "or the paper's InstDiffEdit (Eq. 6-9 and loop) with the folder's steps and guidance",
    )
    p.add_argument("--steps", type=int_arg, default=None, help="DDIM steps (method.steps)")
    p.add_argument("--strength", type=float, default=None, help="noise strength r (method.strength)")
    p.add_argument("--seed", type=int_arg, default=None, help="base seed (seed)")
    p.add_argument("--batch-size", type=int_arg, default=None, help="rows per editor call (actors.batch_size)")
    p.add_argument("--actors", type=int_arg, default=None, help="editing actors (actors.pool_size)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (actors.num_gpus)")
    p.add_argument("--max-rows-per-file", type=int_arg, default=None, help="write.max_rows_per_file")
    p.add_argument(
        "--retry-errors",
        action="store_true",
        default=None,
        help="also re-run ids whose earlier row is an error (retry_errors)",
    )
    p.add_argument(
        "--carry",
        action="append",
        default=None,
        metavar="COLUMN",
        help="copy this input column into the output rows unchanged (carry; repeatable), e.g. --carry url",
    )
    p.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set method.mask.phi=0.3 (repeatable)",
    )
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BatchConfig:
    """The job config: the YAML file, then ``--set`` assignments, then the dedicated flags.

    Args:
        args: parsed ``batch`` arguments.

    Returns:
        The validated config.

    Raises:
        ConfigError: neither ``--config`` nor both ``--input`` and ``--output``; a malformed ``--set``; any
            invalid key or value.
        InputNotFoundError: the ``--config`` file does not exist.
    """
    overrides: dict[str, Any] = dict(parse_assignment(a) for a in args.assignments)
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
    if args.config is None and ("input" not in overrides or "output" not in overrides):
        raise ConfigError("give --config FILE, or both --input and --output")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    """Run the job and print its summary as one JSON line; shuts down a Ray that this call started.

    Returns:
        0 (failures raise).
    """
    import ray

    running = ray.is_initialized()
    cfg = config_from_args(args)
    try:
        summary = run_job(cfg, address=getattr(args, "address", None))
    finally:
        if not running and ray.is_initialized():
            ray.shutdown()
    print(json.dumps(summary.to_dict()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.batch ARGS`` is ``instdiff batch ARGS``.

    Args:
        argv: the arguments after the program name (``None``: ``sys.argv[1:]``).

    Returns:
        The exit code (2 for any user-facing error, printed as one line on stderr).
    """
    parser = argparse.ArgumentParser(prog=MODULE_PROG, **_PARSER_TEXT)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(args.verbose)
    return run_command(MODULE_PROG, args.func, args)
