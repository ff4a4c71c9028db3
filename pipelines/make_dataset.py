"""``instdiff make-dataset shapes --n 64 --out data/shapes-64.parquet``: editing sets in the batch input schema.

``shapes``: edit pairs from the synthetic shapes world (``instdiff.synthetic``) — the source image as PNG,
its caption and the edited caption, and the exact edit region as the ground-truth ``mask``; ``meta`` holds
the edit kind and the edited phrases as JSON. The same ``--seed`` gives the same rows (row ``i`` does not
depend on ``--n``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence

import pyarrow as pa

from instdiff.config import DEFAULT_MAX_PIXELS
from instdiff.errors import UsageError
from pipelines import schema as S
from pipelines import storage

log = logging.getLogger(__name__)

KINDS = ("shapes",)
MIN_SIZE = 16  # px
MAX_SIZE = math.isqrt(DEFAULT_MAX_PIXELS)  # px: the largest square the batch job accepts by default (4096)


def shapes_table(n: int, seed: int = 0, size: int = 64, kinds: Sequence[str] | None = None) -> pa.Table:
    """``n`` shapes-world edit pairs as a table in :data:`pipelines.schema.INPUT_SCHEMA`.

    Args:
        n: number of rows (row ``i`` does not depend on ``n``).
        seed: the world's seed.
        size: image side in pixels.
        kinds: edit kinds to draw from (``None``: every kind of ``instdiff.synthetic.EDIT_KINDS``).

    Returns:
        Rows with the source image and the exact edit region as PNG, both prompts, ``dataset="shapes"`` and a
        JSON ``meta`` (edit kind, edited phrases, seed, size).
    """
    from instdiff.imageio import encode_png
    from instdiff.synthetic import EDIT_KINDS, make_edit_pairs

    pairs = make_edit_pairs(n, seed=seed, size=size, kinds=tuple(kinds) if kinds else EDIT_KINDS)
    columns: dict[str, list] = {name: [] for name in S.INPUT_SCHEMA.names}
    for pair in pairs:
        columns[S.ID].append(pair.id)
        columns[S.IMAGE].append(encode_png(pair.source.image))
        columns[S.SOURCE_PROMPT].append(pair.source_prompt)
        columns[S.TARGET_PROMPT].append(pair.target_prompt)
        columns[S.MASK].append(encode_png(pair.edit_mask))
        columns[S.DATASET].append("shapes")
        columns[S.ERROR].append(None)
        columns[S.META].append(
            json.dumps(
                {
                    "kind": pair.kind,
                    "source_phrase": pair.source_phrase,
                    "target_phrase": pair.target_phrase,
                    "seed": seed,
                    "size": size,
                }
            )
        )
    return pa.Table.from_pydict(columns, schema=S.INPUT_SCHEMA)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``make-dataset`` subcommand to ``sub`` (its ``func`` is :func:`run`)."""
    p = sub.add_parser(
        "make-dataset",
        help="write a demo editing set in the batch input schema",
        description="Write an editing dataset (Parquet, batch input schema) with exact masks.",
    )
    p.add_argument("kind", choices=KINDS, help="shapes: the synthetic shapes world (exact ground-truth masks)")
    p.add_argument("--n", type=int, default=64, help="number of rows")
    p.add_argument("--seed", type=int, default=0, help="the world's seed (>= 0)")
    p.add_argument(
        "--size",
        type=int,
        default=64,
        help=f"image side in pixels, {MIN_SIZE} to {MAX_SIZE} (the embedded model works at 64)",
    )
    p.add_argument("--out", required=True, help="output Parquet file, local or s3://bucket/key.parquet")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the dataset and print ``{"out", "rows", "size", "seed"}`` as one JSON line.

    Returns:
        0.

    Raises:
        UsageError: ``--n`` below 1, ``--size`` outside [16, :data:`MAX_SIZE`], ``--seed`` below 0 or ``--out``
            not ending in ``.parquet``.
        StorageError: ``--out`` is a folder, or a file is in the way of its parent folders.
    """
    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    if not MIN_SIZE <= args.size <= MAX_SIZE:
        raise UsageError(f"--size must be in [{MIN_SIZE}, {MAX_SIZE}] px, got {args.size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if not args.out.endswith(".parquet"):
        raise UsageError(f"--out must end with .parquet, got {args.out!r}")
    storage.check_output(args.out, "--out")
    table = shapes_table(args.n, seed=args.seed, size=args.size)
    where = storage.write_table(table, args.out, row_group_size=64)
    log.info("wrote %d rows (%d px, seed %d) to %s", table.num_rows, args.size, args.seed, where)
    print(json.dumps({"out": where, "rows": table.num_rows, "size": args.size, "seed": args.seed}))
    return 0
