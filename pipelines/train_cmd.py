"""``instdiff train-shapes --config configs/train/shapes.yaml --out DIR``: re-train the embedded model.

The subcommand runs :func:`instdiff.training.train_shapes` and prints a one-line JSON digest of its summary;
config errors (:class:`~instdiff.errors.TrainConfigError`) and a missing config file
(:class:`~instdiff.errors.InputNotFoundError`) reach the CLI's error rule (one line, exit code 2).
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train-shapes`` parser to the CLI's subparsers and point it at :func:`run`.

    Args:
        sub: the ``instdiff`` command's subparsers.
    """
    p = sub.add_parser(
        "train-shapes",
        help="train the SD-architecture shapes-world model (VAE, text encoder + UNet, inpainting UNet)",
        description="Train the embedded shapes-world model from a YAML config into a diffusers folder "
        "(loadable with --model DIR). Uses the GPU when present, the CPU otherwise.",
    )
    p.add_argument("--config", default="configs/train/shapes.yaml", help="training config (YAML)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--device", default=None, help="override the config's device (auto, cuda, cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train into ``args.out`` and print the summary's digest (name, seed, seconds, VAE PSNR, size) as JSON.

    Args:
        args: parsed flags ``config``, ``out`` and ``device``.

    Returns:
        Exit code 0.

    Raises:
        TrainConfigError: the config cannot be parsed or used.
        InputNotFoundError: the config file does not exist.
    """
    from instdiff.training import train_shapes

    summary = train_shapes(args.config, args.out, device=args.device)
    keys = ("name", "seed", "n_scenes", "seconds", "vae_psnr_db", "weights_mb")
    print(json.dumps({k: summary[k] for k in keys if k in summary} | {"out": args.out}, default=str))
    return 0
