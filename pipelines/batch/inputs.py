"""The job's input side: many Parquet files planned as one table, and the stage that brings every block to one
set of column types before the rows are decoded.

Files written by different tools rarely agree on their Arrow types: pandas writes ``string``, polars
``large_string`` (or ``string_view``), a categorical column is dictionary-encoded, Hugging Face ``datasets``
stores images as a ``struct<bytes, path>``, and a column may be missing from some files. :func:`plan_input`
reads every file's footer (never only the first one), checks each column of each file against the input
schema and names the file and column of any mismatch; :func:`read_stage` then converts each block to the one
canonical form (:func:`normalize_batch`), so a column missing from a file is null there and no value is lost.

This module imports neither torch nor diffusers: the read workers import it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from instdiff.errors import ConfigError, InputNotFoundError
from pipelines import schema as S
from pipelines import storage
from pipelines.batch.decode import DecodeOptions, decode_batch
from pipelines.batch.rows import DECODED_SCHEMA, EDITED_SCHEMA, resolve_ids

log = logging.getLogger(__name__)

INPUT_COLUMNS = S.REQUIRED_INPUT + S.OPTIONAL_INPUT
_READ_THREADS = 16
_BINARY_COLUMNS = (S.IMAGE, S.MASK)
# the canonical type of each input column between the read and the decode
CANONICAL = {name: pa.large_binary() if name in _BINARY_COLUMNS else pa.string() for name in INPUT_COLUMNS}
PATH_ONLY = (
    "{column}: the datasets Image struct holds only a path ({path!r}), not the bytes; the batch job reads "
    "bytes only: turn the table into input rows with `instdiff import-dataset hf`, which reads the files"
)


@dataclass
class InputPlan:
    """The validated input of a job.

    Attributes:
        files: the Parquet files (paths inside the input filesystem), sorted.
        columns: the input columns present in at least one file, to read.
        rows: number of input rows (all files).
        ids: every row's id (non-null, unique).
        groups: ``(files, read_schema)`` pairs: files whose wanted columns have the same names and types, read
            together with that schema (view types replaced, see :func:`read_schema_of`).
        carry: the carried columns and their one type across the files (empty: nothing carried).
    """

    files: list[str]
    columns: list[str]
    rows: int
    ids: pa.Array
    groups: list[tuple[list[str], pa.Schema]] = field(default_factory=list)
    carry: pa.Schema = field(default_factory=lambda: pa.schema([]))


def check_carry_names(carry: Sequence[str]) -> None:
    """Refuse carried column names that the job writes itself or uses between its stages.

    Raises:
        ConfigError: a name of the output schema, of an input column (it is carried anyway, or replaced), or
            an internal ``_`` name, or a repeated name.
    """
    taken = set(S.OUTPUT_SCHEMA.names) | set(INPUT_COLUMNS) | set(EDITED_SCHEMA.names)
    for name in carry:
        if name in taken or name.startswith("_"):
            raise ConfigError(
                f"carry: column {name!r} cannot be carried: the output has a column of that name (or it is "
                f"internal); carry names other input columns, e.g. url or label"
            )
    if len(set(carry)) != len(carry):
        raise ConfigError(f"carry: names repeat in {list(carry)}")


def _threaded(fn: Callable[[str], Any], files: Sequence[str]) -> list[Any]:
    """``fn`` over ``files`` on a few threads (footer and id reads; on S3 each is a round trip), in order."""
    if len(files) <= 1:
        return [fn(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(files))) as pool:
        return list(pool.map(fn, files))


def _value_type(dtype: pa.DataType) -> pa.DataType:
    return dtype.value_type if pa.types.is_dictionary(dtype) else dtype


def carry_schema(schema: pa.Schema, carry: Sequence[str]) -> pa.Schema:
    """The carried columns of one table and their types (dictionaries decoded), for :func:`read_stage`.

    Raises:
        ConfigError: a carried column the table lacks, or a name that cannot be carried.
    """
    check_carry_names(carry)
    missing = [c for c in carry if schema.get_field_index(c) < 0]
    if missing:
        raise ConfigError(f"carry: column(s) {', '.join(missing)} not in the input; its columns: {schema.names}")
    return pa.schema([pa.field(c, _value_type(schema.field(c).type)) for c in carry])


def plan_input(fs: Any, path: str, display: str, carry: Sequence[str] = ()) -> InputPlan:
    """List the input files, check every file's schema and unify them, and validate the ids (non-null, unique).

    Args:
        fs: a pyarrow filesystem.
        path: a Parquet file or folder inside ``fs``.
        display: the input as shown to users.
        carry: input columns to copy into the output rows unchanged (the job's ``carry``).

    Returns:
        What to read.

    Raises:
        InputNotFoundError: no Parquet files at ``path``.
        StorageError: the input cannot be reached, or a file is not Parquet (the message names it).
        SchemaError: a column of some file with a type the schema does not accept (naming the file and the
            column), a required column in no file, ``id`` missing from a file, a carried column whose types
            differ between files, null or repeated ids.
        ConfigError: a carried column that is in no file, or a name that cannot be carried.
    """
    check_carry_names(carry)
    files = storage.list_files(fs, path)
    if not files:
        raise InputNotFoundError(f"no Parquet files at {display}")

    def footer(f: str) -> pa.Schema:
        with storage.reading(f"input {display}: {storage.display(fs, f)}"):
            return pq.read_schema(f, filesystem=fs)

    schemas = _threaded(footer, files)  # every footer, not only the first one's (S3: in parallel)
    problems: list[str] = []
    present: set[str] = set()
    carry_types: dict[str, list[tuple[str, pa.DataType]]] = {c: [] for c in carry}
    for f, sch in zip(files, schemas, strict=True):
        shown = storage.display(fs, f)
        # every column's type, file by file (the required ones are checked on the union below)
        typed = pa.schema([sch.field(i) for i in range(len(sch)) if sch.field(i).name in INPUT_COLUMNS])
        for p in S.input_schema_problems(typed):
            if not p.startswith("missing column"):
                problems.append(f"{shown}: {p}")
        if sch.get_field_index(S.ID) < 0:
            problems.append(f"{shown}: missing column {S.ID!r} (every file needs the ids)")
        present |= {n for n in INPUT_COLUMNS if sch.get_field_index(n) >= 0}
        for c in carry:
            if sch.get_field_index(c) >= 0:
                carry_types[c].append((shown, _value_type(sch.field(c).type)))
    for name in S.REQUIRED_INPUT:
        if name not in present:
            problems.append(f"missing column {name!r} (no file has it)")
    if problems:
        raise S.SchemaError(
            f"input {display} does not match the instdiff input schema: {S.summarize_problems(problems)}; "
            f"accepted schema: {S.describe_input_schema(one_line=True)} (other columns are ignored)"
        )
    carry_schema = _unify_carry(carry_types, display)
    ids = _read_ids(fs, files, display)
    columns = [c for c in INPUT_COLUMNS if c in present]
    groups: dict[tuple[tuple[str, str], ...], tuple[list[str], pa.Schema]] = {}
    for f, sch in zip(files, schemas, strict=True):
        wanted = read_schema_of(sch, columns + list(carry))
        key = tuple((x.name, str(x.type)) for x in wanted)
        groups.setdefault(key, ([], wanted))[0].append(f)
    return InputPlan(
        files=files, columns=columns, rows=len(ids), ids=ids, groups=list(groups.values()), carry=carry_schema
    )


def _no_views(dtype: pa.DataType) -> pa.DataType:
    """``dtype`` with ``string_view``/``binary_view`` replaced by ``large_string``/``large_binary`` (also inside
    structs and dictionaries): Ray 2.60 cannot move view arrays between its processes."""
    if pa.types.is_string_view(dtype):
        return pa.large_string()
    if pa.types.is_binary_view(dtype):
        return pa.large_binary()
    if pa.types.is_struct(dtype):
        return pa.struct(
            [pa.field(dtype.field(i).name, _no_views(dtype.field(i).type)) for i in range(dtype.num_fields)]
        )
    if pa.types.is_dictionary(dtype):
        return pa.dictionary(dtype.index_type, _no_views(dtype.value_type), dtype.ordered)
    return dtype


def read_schema_of(schema: pa.Schema, columns: Sequence[str]) -> pa.Schema:
    """The schema a file's wanted columns are read with: its own types, views replaced (:func:`_no_views`).

    Args:
        schema: the file's schema.
        columns: the wanted columns (those the file lacks are left out).

    Returns:
        The read schema, in ``columns`` order.
    """
    return pa.schema([pa.field(c, _no_views(schema.field(c).type)) for c in columns if schema.get_field_index(c) >= 0])


def _unify_carry(carry_types: dict[str, list[tuple[str, pa.DataType]]], display: str) -> pa.Schema:
    """One type per carried column: the files' types, dictionaries decoded, nulls ignored, promoted safely."""
    fields = []
    for name, seen in carry_types.items():
        if not seen:
            raise ConfigError(f"carry: column {name!r} is in no file of input {display}")
        typed = [(f, t) for f, t in seen if not pa.types.is_null(t)]
        if not typed:
            fields.append(pa.field(name, pa.null()))
            continue
        unified = typed[0][1]
        for f, t in typed[1:]:
            try:
                unified = (
                    pa.unify_schemas(
                        [pa.schema([pa.field(name, unified)]), pa.schema([pa.field(name, t)])],
                        promote_options="permissive",
                    )
                    .field(name)
                    .type
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                raise S.SchemaError(
                    f"input {display}: carried column {name!r} has type {t} in {f} but {typed[0][1]} in "
                    f"{typed[0][0]}; carried columns need one type in every file"
                ) from None
        fields.append(pa.field(name, unified))
    return pa.schema(fields)


def _read_ids(fs: Any, files: list[str], display: str) -> pa.Array:
    """Every id of every file as one ``string`` array; null and repeated ids are refused."""

    def read(f: str) -> pa.ChunkedArray:
        try:
            return _canonical(pq.read_table(f, filesystem=fs, columns=[S.ID])[S.ID], pa.string())
        except (pa.ArrowException, OSError) as exc:
            raise S.SchemaError(f"cannot read the id column of input file {storage.display(fs, f)}: {exc}") from None

    parts = [chunk for col in _threaded(read, files) for chunk in col.chunks]
    ids = pa.chunked_array(parts, type=pa.string()).combine_chunks()
    if ids.null_count:
        raise S.SchemaError(f"input {display}: {ids.null_count} rows have a null id; every row needs a unique id")
    counts = pc.value_counts(ids)
    dupes = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dupes):
        shown = ", ".join(repr(x) for x in dupes.to_pylist()[:5])
        raise S.SchemaError(
            f"input {display}: {len(dupes)} ids occur more than once (e.g. {shown}); ids must be unique"
        )
    return ids


def _canonical(col: pa.ChunkedArray | pa.Array, target: pa.DataType) -> pa.ChunkedArray | pa.Array:
    """``col`` as ``target``: dictionaries decoded, every string/binary flavour cast, a null column typed."""
    if pa.types.is_null(col.type):
        return pa.nulls(len(col), target)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col if col.type == target else col.cast(target)


def normalize_batch(batch: pa.Table, carry: pa.Schema | None = None) -> pa.Table:
    """One block of input rows in the canonical types, whatever the file that held it wrote.

    Input columns become ``string`` (texts) or ``large_binary`` (``image``, ``mask``); a ``datasets`` Image
    struct gives its ``bytes`` (a struct with only a ``path`` makes the row an error row: the job reads no
    files named inside rows); a missing column becomes nulls; carried columns are cast to the plan's type.

    Args:
        batch: rows as read from one file (any subset of the input columns, plus carried ones).
        carry: the carried columns and their unified types (``None``: none).

    Returns:
        Every input column (:data:`INPUT_COLUMNS`) in :data:`CANONICAL` types, then the carried columns.
    """
    n = batch.num_rows
    cols: dict[str, Any] = {}
    path_errors: list[str | None] = [None] * n
    for name in INPUT_COLUMNS:
        if name not in batch.column_names:
            cols[name] = pa.nulls(n, CANONICAL[name])
            continue
        col = batch[name]
        if S.is_image_struct(col.type):
            data = pc.struct_field(col, "bytes")
            if col.type.get_field_index("path") >= 0:
                paths = pc.struct_field(col, "path").to_pylist()
                for i, (b, p) in enumerate(zip(data.to_pylist(), paths, strict=True)):
                    if b is None and p:
                        path_errors[i] = path_errors[i] or PATH_ONLY.format(column=name, path=p)
            col = data
        cols[name] = _canonical(col, CANONICAL[name])
    if any(path_errors):
        given = cols[S.ERROR].to_pylist()
        cols[S.ERROR] = pa.array([g or p for g, p in zip(given, path_errors, strict=True)], pa.string())
    for f in carry or []:
        cols[f.name] = _canonical(batch[f.name], f.type) if f.name in batch.column_names else pa.nulls(n, f.type)
    return pa.table(cols)


def _error_rows(table: pa.Table) -> pa.Table:
    """Rows whose input ``error`` is set, as decoded rows with ``status = "error"`` and that reason."""
    rows = [
        {
            S.ID: r[S.ID],
            S.DATASET: r[S.DATASET],
            S.META: r[S.META],
            S.SOURCE_PROMPT: r[S.SOURCE_PROMPT],
            S.TARGET_PROMPT: r[S.TARGET_PROMPT],
            S.STATUS: S.STATUS_ERROR,
            S.ERROR: r[S.ERROR],
            S.GENERATE: False,
        }
        for r in table.select([S.ID, S.DATASET, S.META, S.SOURCE_PROMPT, S.TARGET_PROMPT, S.ERROR]).to_pylist()
    ]
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def read_stage(
    batch: pa.Table, *, opts: DecodeOptions, skip_ids: Any = None, carry: pa.Schema | None = None
) -> pa.Table:
    """Stage 1 (stateless): normalize a block (:func:`normalize_batch`), drop ``skip_ids``, decode the rows.

    Rows whose input ``error`` is set are not decoded: they leave as error rows with that reason. The other
    rows go through :func:`pipelines.batch.decode.decode_batch`. Carried columns follow their rows.

    Args:
        batch: input rows as read from one file.
        opts: what the decode checks.
        skip_ids: ids not to edit: a ``pa.Array``, a Ray object ref to one, or ``None``.
        carry: the carried columns and their types (``None``: none).

    Returns:
        The rows in :data:`~pipelines.batch.rows.DECODED_SCHEMA`, then the carried columns.
    """
    table = normalize_batch(batch, carry)
    skip = resolve_ids(skip_ids)
    if skip is not None and len(skip) and table.num_rows:
        table = table.filter(pc.invert(pc.is_in(table[S.ID], value_set=skip)))
    failed = pc.is_valid(table[S.ERROR])
    good, bad = table.filter(pc.invert(failed)), table.filter(failed)
    decoded = decode_batch(good.select(list(INPUT_COLUMNS)), opts=opts)
    out = pa.concat_tables([decoded, _error_rows(bad)]) if bad.num_rows else decoded
    if carry is not None and len(carry):
        both = pa.concat_tables([good, bad])
        for f in carry:
            out = out.append_column(f, both[f.name])
    return out


def read_input_table(
    fs: Any, files: Sequence[str], columns: Sequence[str] = INPUT_COLUMNS, ids: Sequence[str] | None = None
) -> pa.Table:
    """Input files read in this process, each brought to the canonical types (:func:`normalize_batch`).

    For readers outside the Ray pipeline (the report's contact sheet) that must see the input as the job does:
    every file's columns, Image structs as bytes, a column missing from a file as nulls.

    Args:
        fs: a pyarrow filesystem.
        files: Parquet files inside ``fs``.
        columns: the input columns wanted (of :data:`INPUT_COLUMNS`).
        ids: keep only these ids (``None``: all rows).

    Returns:
        ``columns`` of every file's rows, in :data:`CANONICAL` types.

    Raises:
        StorageError: a file cannot be read (the message names it).
    """
    wanted = set(columns) | {S.ID}
    keep = pa.array(list(ids), pa.string()) if ids is not None else None
    parts = []
    for f in files:
        with storage.reading(f"input {storage.display(fs, f)}"):
            names = pq.read_schema(f, filesystem=fs).names
            table = normalize_batch(pq.read_table(f, filesystem=fs, columns=[c for c in names if c in wanted]))
        if keep is not None:
            table = table.filter(pc.is_in(table[S.ID], value_set=keep))
        parts.append(table.select(list(columns)))
    if not parts:
        return pa.schema([pa.field(c, CANONICAL[c]) for c in columns]).empty_table()
    return pa.concat_tables(parts)
