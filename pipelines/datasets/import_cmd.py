"""``instdiff import-dataset FORMAT SRC --out OUT.parquet``: a public editing dataset as an input Parquet file."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from instdiff.errors import UsageError
from pipelines import schema
from pipelines.datasets.formats import FORMATS, read_dataset
from pipelines.datasets.prompt_pairs import generate_sources
from pipelines.datasets.prompts import DEFAULT_CLASS_TEMPLATE
from pipelines.datasets.rows import BadRowPolicy, DatasetError, skipped_rows
from pipelines.storage import check_output, write_table

if TYPE_CHECKING:
    import argparse

LIMIT_FORMATS = ("prompt-pairs", "hf", "img2dataset")  # the formats that take --limit


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``import-dataset`` subcommand to the ``instdiff`` CLI.

    Args:
        sub: the CLI's subparsers; the new parser's ``func`` is :func:`run_import`.
    """
    from pipelines.commands import add_model_args, int_arg

    p = sub.add_parser(
        "import-dataset",
        help="turn a public editing dataset into an instdiff input Parquet file",
        description="Read FORMAT from SRC (local or s3://) and write the instdiff input schema to --out. Formats: "
        "editing-mask (ROOT with the list file, image/ and mask/), flexit (ROOT with the pair list "
        "and the images), prompt-pairs (JSONL with input/edit/output), listing (CSV/TSV/JSONL with "
        "image_path, source_prompt, target_prompt[, mask_path]), hf (Hugging Face datasets Parquet: a file or "
        "folder; InstructPix2Pix and other layouts recognised, others mapped with --columns), img2dataset "
        "(an img2dataset output folder, webdataset or parquet format; targets from --target-template or "
        "--targets). Layouts and examples: docs/inputs.md.",
    )
    p.add_argument("format", choices=FORMATS)
    p.add_argument(
        "src",
        help="dataset root folder (editing-mask, flexit, img2dataset), file (prompt-pairs, listing), or Parquet "
        "file or folder (hf)",
    )
    p.add_argument("--out", required=True, help="output Parquet file, local or s3://")
    p.add_argument(
        "--on-bad-row",
        default="error",
        choices=[m.value for m in BadRowPolicy],
        help="error: name the bad rows and write nothing (default); skip: leave them out, log a count",
    )
    p.add_argument("--list-file", default=None, help="editing-mask/flexit: the list file (default: found in SRC)")
    p.add_argument(
        "--image-dir",
        default=None,
        help="editing-mask/flexit: image folder under SRC; listing: folder relative paths are resolved against",
    )
    p.add_argument(
        "--class-template",
        default=DEFAULT_CLASS_TEMPLATE,
        help="editing-mask/flexit: prompt for a class name ({article} {name})",
    )
    p.add_argument("--dataset", default=None, help="value of the dataset column (default: per format)")
    p.add_argument(
        "--limit", type=int_arg, default=None, help="prompt-pairs, hf, img2dataset: keep the first N rows (N >= 1)"
    )
    p.add_argument(
        "--columns",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="hf: map an input field (id, image, mask, source_prompt, target_prompt, dataset) to a source "
        "column, e.g. --columns image=original_image (repeatable, or comma-separated)",
    )
    p.add_argument(
        "--source-template",
        default=None,
        help="hf, img2dataset: source_prompt from a rule over the record's fields, e.g. 'a photo of {label}' "
        "(img2dataset default: '{caption}')",
    )
    p.add_argument(
        "--target-template",
        default=None,
        help="hf, img2dataset: target_prompt from a rule, e.g. '{caption}, in winter'",
    )
    p.add_argument(
        "--targets",
        default=None,
        help="hf, img2dataset: prompt file joined by id/key (CSV/TSV/JSONL/Parquet with key and target_prompt)",
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="prompt-pairs: generate the source images now (else the image column stays null)",
    )
    add_model_args(p)
    p.add_argument("--steps", type=int_arg, default=50, help="--generate: DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="--generate: guidance scale")
    p.add_argument("--seed", type=int_arg, default=0, help="--generate: base seed (row seed as in the batch job)")
    p.set_defaults(func=run_import)


def parse_columns(items: list[str]) -> dict[str, str]:
    """``--columns`` values (``FIELD=COLUMN``, repeatable or comma-separated) as a mapping.

    Raises:
        UsageError: an item without ``=`` or with an empty side, or a field mapped twice (which column would win
            is not the user's to guess).
    """
    out: dict[str, str] = {}
    for item in (part.strip() for value in items for part in value.split(",")):
        if not item:
            continue
        field, sep, column = item.partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not field or not column:
            raise UsageError(f"--columns expects FIELD=COLUMN (e.g. image=original_image); got {item!r}")
        if field in out:
            raise UsageError(
                f"--columns maps field {field!r} twice ({field}={out[field]} and {field}={column}); map each field once"
            )
        out[field] = column
    return out


def run_import(args: argparse.Namespace) -> int:
    """Run ``instdiff import-dataset``: read, optionally generate the sources, write; print a JSON summary.

    Args:
        args: the parsed flags of :func:`register`'s parser.

    Returns:
        0; the summary line (format, rows, skipped, out, with_image, with_mask, with_error: rows kept as
        errors, e.g. failed downloads) goes to stdout.

    Raises:
        UsageError: ``--out`` does not end in ``.parquet``, ``--limit`` below 1 or with a format that does not
            take it, ``--columns`` with a format other than ``hf`` (or a field mapped twice), or ``--generate``
            with a format other than ``prompt-pairs``.
        StorageError: ``--out`` is a folder (or below a file), or SRC is a folder where a file is needed.
        DatasetError: the dataset cannot be read (see the adapters), or it gives no rows at all (nothing is
            written: an empty input file would make a batch job that silently does nothing).
    """
    if not args.out.endswith(".parquet"):
        raise UsageError(f"--out must end with .parquet, got {args.out!r}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    check_output(args.out, "--out")
    kw: dict[str, Any] = {"on_bad_row": args.on_bad_row}
    if args.dataset:
        kw["dataset"] = args.dataset
    if args.format in ("editing-mask", "flexit"):
        kw["class_template"] = args.class_template
        if args.list_file:
            kw["list_file" if args.format == "editing-mask" else "pairs_file"] = args.list_file
        if args.image_dir:
            kw["image_dir"] = args.image_dir
    elif args.format == "prompt-pairs":
        kw["limit"] = args.limit
    elif args.format == "hf":
        kw.update(columns=parse_columns(args.columns), limit=args.limit)
    elif args.format == "img2dataset":
        kw["limit"] = args.limit
    if args.limit is not None and args.format not in LIMIT_FORMATS:
        raise UsageError(f"--limit applies to {', '.join(LIMIT_FORMATS)}; {args.format} imports every row")
    if args.columns and args.format != "hf":
        raise UsageError(
            f"--columns applies to hf only; {args.format} has fixed columns"
            + (" (prompts: --source-template, --target-template, --targets)" if args.format == "img2dataset" else "")
        )
    if args.format in ("hf", "img2dataset"):
        kw.update(target_template=args.target_template, targets=args.targets)
        if args.source_template:
            kw["source_template"] = args.source_template
    elif args.source_template or args.target_template or args.targets:
        raise UsageError("--source-template, --target-template and --targets apply to hf and img2dataset")
    elif args.format == "listing" and args.image_dir:
        kw["image_root"] = args.image_dir
    if args.generate and args.format != "prompt-pairs":
        raise UsageError("--generate only applies to prompt-pairs")
    table = read_dataset(args.format, args.src, **kw)
    if table.num_rows == 0:  # an empty input file would make a batch job that does nothing, and say nothing
        skipped = skipped_rows(table)
        why = f"all {skipped} of its rows were bad and skipped (--on-bad-row skip)" if skipped else "it has no rows"
        raise DatasetError(f"{args.format} {args.src}: nothing to import, {why}; nothing written to {args.out}")
    if args.generate:
        from instdiff.models import load_bundle

        bundle = load_bundle(args.model, device=args.device, dtype=args.dtype, local_files_only=args.local_files_only)
        table = generate_sources(table, bundle, steps=args.steps, guidance=args.guidance, seed=args.seed)
    where = write_table(table, args.out)
    summary = {
        "format": args.format,
        "rows": table.num_rows,
        "skipped": skipped_rows(table),
        "out": where,
        "with_image": table.num_rows - table.column(schema.IMAGE).null_count,
        "with_mask": table.num_rows - table.column(schema.MASK).null_count,
        "with_error": table.num_rows - table.column(schema.ERROR).null_count,
    }
    print(json.dumps(summary))
    return 0
