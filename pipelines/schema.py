"""Parquet schema of the batch job: the one place that names columns and their Arrow types.

Input rows (one edit each)::

    id             string   required, unique, non-null
    image          binary   required column; encoded PNG/JPEG/WebP/BMP/TIFF bytes. Null only for methods
                            that generate the source from ``source_prompt`` (fisedit). A Hugging Face
                            ``datasets`` Image struct ``{bytes, path}`` is accepted too (its bytes are used).
    source_prompt  string   required column; describes the input image
    target_prompt  string   required column; what the edited image should show (non-empty)
    mask           binary   optional; ground-truth edit region as PNG (non-zero = edit), same size as the image
    dataset        string   optional; carried to the output
    meta           string   optional; JSON text, carried to the output
    error          string   optional; a row whose error is set is not edited but written as an error row
                            with this reason (``import-dataset`` writes failed downloads so)

String columns may be ``string``, ``large_string``, ``string_view`` or dictionary-encoded strings; binary
columns ``binary``, ``large_binary``, ``binary_view`` or the ``datasets`` Image struct (mask too). Several
files are read as one table: a column missing from some files is null there. Other columns are ignored
unless the job's ``carry`` option names them (then they are copied to the output rows unchanged).

Output rows carry the ids and prompts, the edited image and the predicted mask
as PNG, the settings that produced them, per-sample metrics that need no extra model, and a status with
the reason when the row could not be edited (see :data:`OUTPUT_SCHEMA`).

A row that cannot be edited is still written, with ``status = "error"`` and ``error`` saying why; nothing
is dropped. Output files are plain Parquet: ``pyarrow.parquet.read_table(output_dir)`` reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from instdiff.errors import InstdiffError

# ---- input columns --------------------------------------------------------------------------------------------
ID = "id"
IMAGE = "image"
SOURCE_PROMPT = "source_prompt"
TARGET_PROMPT = "target_prompt"
MASK = "mask"
DATASET = "dataset"
META = "meta"

# ---- output columns -------------------------------------------------------------------------------------------
METHOD = "method"
MODEL = "model"
SEED = "seed"
STATUS = "status"
ERROR = "error"
NOTES = "notes"
EDITED = "edited"
PRED_MASK = "pred_mask"
GENERATED_SOURCE = "generated_source"
WIDTH = "width"
HEIGHT = "height"
MASK_AREA = "mask_area"
CHANGE_INSIDE_PRED = "change_inside_pred"
IOU = "iou"
C_M = "c_m"
C_NON = "c_non"
UNET_CALLS = "unet_calls"
LATENCY_S = "latency_s"
BATCH_ROWS = "batch_rows"
RUN_ID = "run_id"

STATUS_OK = "ok"
STATUS_ERROR = "error"

# ---- columns between the job's stages (never written) -------------------------------------------------------
RGB = "_rgb"  # (H, W, 3) uint8 C-order bytes of the decoded (or generated) source image
GT_BITS = "_gt_bits"  # np.packbits of the (H, W) ground-truth mask
GENERATE = "_generate"  # True: no input image, the editor generates it from the source prompt
EDITED_RGB = "_edited_rgb"  # (H, W, 3) uint8 bytes of the edited image at the input's size
PRED_BITS = "_pred_bits"  # np.packbits of the (H, W) predicted mask at the input's size

INPUT_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary()),
        pa.field(SOURCE_PROMPT, pa.string()),
        pa.field(TARGET_PROMPT, pa.string()),
        pa.field(MASK, pa.binary()),
        pa.field(DATASET, pa.string()),
        pa.field(META, pa.string()),
        pa.field(ERROR, pa.string()),
    ]
)
REQUIRED_INPUT = (ID, IMAGE, SOURCE_PROMPT, TARGET_PROMPT)
OPTIONAL_INPUT = (MASK, DATASET, META, ERROR)

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(DATASET, pa.string()),
        pa.field(SOURCE_PROMPT, pa.string()),
        pa.field(TARGET_PROMPT, pa.string()),
        pa.field(METHOD, pa.string()),
        pa.field(MODEL, pa.string()),
        pa.field(SEED, pa.int64()),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(ERROR, pa.string()),
        pa.field(NOTES, pa.string()),
        pa.field(EDITED, pa.binary()),
        pa.field(PRED_MASK, pa.binary()),
        pa.field(GENERATED_SOURCE, pa.binary()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(MASK_AREA, pa.float64()),
        pa.field(CHANGE_INSIDE_PRED, pa.float64()),
        pa.field(IOU, pa.float64()),
        pa.field(C_M, pa.float64()),
        pa.field(C_NON, pa.float64()),
        pa.field(UNET_CALLS, pa.float64()),
        pa.field(LATENCY_S, pa.float64()),
        pa.field(BATCH_ROWS, pa.int32()),
        pa.field(META, pa.string()),
        pa.field(RUN_ID, pa.string()),
    ]
)

OUTPUT_DOC: dict[str, str] = {
    ID: "input id (unique in the output)",
    DATASET: "input dataset name",
    SOURCE_PROMPT: "input source prompt",
    TARGET_PROMPT: "input target prompt",
    METHOD: "editing method (instdiffedit, sdedit, diffedit, fisedit)",
    MODEL: "model name (bundle name: default, tiny, a hub id or folder)",
    SEED: "per-row seed; `instdiff edit --seed SEED` reproduces the row",
    STATUS: "'ok' or 'error'",
    ERROR: "why the row could not be edited (null when ok)",
    NOTES: "conversions applied to the input, '; '-separated (alpha composited, resized, ...)",
    EDITED: "edited image, PNG, at the input's size",
    PRED_MASK: "predicted edit mask, 8-bit PNG (255 = edited), at the input's size",
    GENERATED_SOURCE: "PNG of the source generated from source_prompt (prompt-only rows), else null",
    WIDTH: "image width in pixels",
    HEIGHT: "image height in pixels",
    MASK_AREA: "fraction of pixels inside the predicted mask",
    CHANGE_INSIDE_PRED: "mean |edited - input| inside the predicted mask, over RGB, in /255 units (null when the "
    "mask is empty); near 0 flags an edit that changed nothing where it meant to",
    IOU: "IoU of the predicted mask with the ground-truth mask (null without one)",
    C_M: "C_m: mean pixel change inside the ground-truth mask, /255 (InstDiffEdit Eq. II; higher = edited)",
    C_NON: "C_non: mean pixel change outside the ground-truth mask, /255 (Eq. III; lower = preserved)",
    UNET_CALLS: "UNet evaluations per image of the edit (CFG counts 2; a generated source is not counted)",
    LATENCY_S: "wall seconds of the editor call that produced the row (shared by batch_rows rows)",
    BATCH_ROWS: "rows edited together in that call",
    META: "input meta (JSON text)",
    RUN_ID: "the job run that wrote the row",
}

METRIC_COLUMNS = (MASK_AREA, CHANGE_INSIDE_PRED, IOU, C_M, C_NON, UNET_CALLS, LATENCY_S)


SHOWN_PROBLEMS = 5  # problems named in a one-line message; the rest are counted


class SchemaError(InstdiffError, ValueError):
    """An input table that does not match :data:`INPUT_SCHEMA`; the message counts and names the problems."""


@dataclass(frozen=True)
class _Kind:
    name: str
    accepts: Callable[[pa.DataType], bool]


def is_string_type(dtype: pa.DataType) -> bool:
    """``string``, ``large_string``, ``string_view``, or a dictionary of one of them."""
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def is_binary_type(dtype: pa.DataType) -> bool:
    """``binary``, ``large_binary``, ``binary_view``, or a dictionary of one of them."""
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype)


def is_image_struct(dtype: pa.DataType) -> bool:
    """Hugging Face ``datasets``' ``Image`` feature as Arrow stores it: ``struct<bytes: binary, path: string>``.

    Source: ``datasets.features.Image`` (its ``pa_type``); any binary flavour for ``bytes`` and any string
    flavour for ``path`` is accepted, and a struct with ``bytes`` alone.
    """
    if not pa.types.is_struct(dtype):
        return False
    names = {dtype.field(i).name: dtype.field(i).type for i in range(dtype.num_fields)}
    if "bytes" not in names or not is_binary_type(names["bytes"]):
        return False
    return set(names) <= {"bytes", "path"} and ("path" not in names or is_string_type(names["path"]))


_STRING = _Kind("string", is_string_type)
_BINARY = _Kind("binary", lambda t: is_binary_type(t) or is_image_struct(t))
_INPUT_KINDS = {
    ID: _STRING,
    IMAGE: _BINARY,
    SOURCE_PROMPT: _STRING,
    TARGET_PROMPT: _STRING,
    MASK: _BINARY,
    DATASET: _STRING,
    META: _STRING,
    ERROR: _STRING,
}


def describe_input_schema(one_line: bool = False) -> str:
    """The accepted input schema as text (``--help`` and error messages).

    Args:
        one_line: comma-separated on one line (for error messages) instead of one indented column a line.

    Returns:
        ``name: kind (required|optional)`` for every input column.
    """
    columns = []
    for name in REQUIRED_INPUT + OPTIONAL_INPUT:
        kind = _INPUT_KINDS[name].name
        need = "required" if name in REQUIRED_INPUT else "optional"
        columns.append(f"{name}: {kind} ({need})")
    return ", ".join(columns) if one_line else "\n".join(f"  {c}" for c in columns)


def input_schema_problems(schema: pa.Schema) -> list[str]:
    """Everything wrong with ``schema`` as an input schema (empty when it is accepted).

    String columns may be ``string``, ``large_string``, ``string_view`` or dictionary-encoded; binary columns
    ``binary``, ``large_binary``, ``binary_view``, dictionary-encoded or a ``datasets`` Image struct
    (:func:`is_image_struct`). An optional column of type ``null`` (all values null) is accepted.

    Args:
        schema: the Arrow schema to check.

    Returns:
        One message per missing or mistyped column, and one for repeated column names.
    """
    problems = []
    for name in REQUIRED_INPUT + OPTIONAL_INPUT:
        kind = _INPUT_KINDS[name]
        idx = schema.get_field_index(name)
        if idx < 0:
            if name in REQUIRED_INPUT:
                problems.append(f"missing column {name!r} ({kind.name})")
            continue
        dtype = schema.field(idx).type
        if kind.accepts(dtype) or (name in OPTIONAL_INPUT and pa.types.is_null(dtype)):
            continue
        problems.append(f"column {name!r} has type {dtype}, expected {kind.name}")
    names = schema.names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"duplicate column names: {', '.join(dupes)}")
    return problems


def validate_input_schema(schema: pa.Schema, source: str = "input") -> None:
    """Check ``schema`` against the input schema (see :func:`input_schema_problems`).

    Args:
        schema: the Arrow schema of an input table or dataset.
        source: what the schema belongs to, for the message (e.g. ``"input data/shapes.parquet"``).

    Raises:
        SchemaError: a column is missing or mistyped; the one-line message counts the problems, names the
            first :data:`SHOWN_PROBLEMS` and shows the accepted schema.
    """
    problems = input_schema_problems(schema)
    if problems:
        raise SchemaError(
            f"{source} does not match the instdiff input schema: {summarize_problems(problems)}; "
            f"accepted schema: {describe_input_schema(one_line=True)} (other columns are ignored)"
        )


def summarize_problems(problems: list[str], noun: str = "problem", shown: int = SHOWN_PROBLEMS) -> str:
    """A list of problems for a one-line message (the CLI's rule): how many, then the first few.

    Args:
        problems: one text per problem (non-empty).
        noun: what is counted (``"bad row"``).
        shown: how many to name.

    Returns:
        ``"N problem(s): a; b; c (and K more)"``.
    """
    text = f"{len(problems)} {noun}(s): " + "; ".join(problems[:shown])
    if len(problems) > shown:
        text += f" (and {len(problems) - shown} more)"
    return text


def output_table(columns: dict[str, list]) -> pa.Table:
    """Build an output table in :data:`OUTPUT_SCHEMA` (column order and types) from Python lists.

    Args:
        columns: column name → values, for every column of :data:`OUTPUT_SCHEMA` (others are ignored).

    Returns:
        The table.

    Raises:
        KeyError: a column of :data:`OUTPUT_SCHEMA` is missing (a programming error).
    """
    missing = [f.name for f in OUTPUT_SCHEMA if f.name not in columns]
    if missing:
        raise KeyError(f"output columns missing: {missing}")
    return pa.Table.from_pydict({f.name: columns[f.name] for f in OUTPUT_SCHEMA}, schema=OUTPUT_SCHEMA)


def output_schema_problems(schema: pa.Schema) -> list[str]:
    """Columns of :data:`OUTPUT_SCHEMA` that ``schema`` lacks or types differently (empty when it matches)."""
    problems = []
    for want in OUTPUT_SCHEMA:
        idx = schema.get_field_index(want.name)
        if idx < 0:
            problems.append(f"missing column {want.name!r} ({want.type})")
        elif schema.field(idx).type != want.type:
            problems.append(f"column {want.name!r} has type {schema.field(idx).type}, expected {want.type}")
    return problems
