"""ImageNet class editing as in FlexIT (image folders plus a list of class pairs) as instdiff input rows."""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Iterable
from pathlib import PurePosixPath

import pyarrow as pa

from pipelines import storage
from pipelines.datasets.files import (
    LIST_SEPARATOR,
    Location,
    list_lines,
    lookup,
    parallel,
    pick_file,
    read_file,
    read_text,
    split_list_line,
)
from pipelines.datasets.images import image_size
from pipelines.datasets.prompts import DEFAULT_CLASS_TEMPLATE, class_prompt
from pipelines.datasets.rows import BadRowPolicy, DatasetError, Problems, Row, collect, problem_text, rows_to_table
from pipelines.storage import StorageConfig

FLEXIT_LISTS = ("ImageNet_list.txt", "imagenet_list.txt", "pairs.txt", "pairs.csv", "pairs.tsv")
FLEXIT_IMAGE_DIRS = ("images", "image", "val")
_HEADER_NAMES = ("image", "file", "filename", "image_path", "path")


def _flexit_fields(name: str, text: str) -> Iterable[tuple[int, list[str]]]:
    """(line, fields) of a FlexIT pair list: '<>'-separated lines, or CSV/TSV (an optional header is skipped)."""
    if LIST_SEPARATOR in text:
        for n, line in list_lines(text):
            yield n, split_list_line(line)
        return
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = "\t" if name.endswith(".tsv") or "\t" in first else ","
    for n, fields_ in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
        if not fields_ or not "".join(fields_).strip() or fields_[0].strip().startswith("#"):
            continue
        fields_ = [f.strip() for f in fields_]
        if n == 1 and not PurePosixPath(fields_[0]).suffix and fields_[0].lower() in _HEADER_NAMES:
            continue  # header
        yield n, fields_


def read_flexit(
    root: str,
    pairs_file: str | None = None,
    image_dir: str | None = None,
    class_template: str = DEFAULT_CLASS_TEMPLATE,
    on_bad_row: BadRowPolicy | str = BadRowPolicy.ERROR,
    dataset: str = "imagenet-flexit",
    id_prefix: str = "",
    storage_cfg: StorageConfig | None = None,
) -> pa.Table:
    """Read an ImageNet class-editing set as in FlexIT (1092 val images, 273 classes, edit = a similar class).

    The pair list has one pair a line: ``file <> source class <> target class`` or the same three fields as
    CSV/TSV (an optional header is skipped). Images are looked up by file name (or stem) anywhere under the
    image folder, so flat folders and per-synset sub-folders both work. There are no masks. ``meta`` keeps
    ``file``, ``source_class``, ``target_class`` (the label CSFID groups by) and the line. An image listed
    twice (two target classes) gets ids ``<stem>``, ``<stem>-2``, ...

    Args:
        root: the dataset folder, local or ``s3://``.
        pairs_file: the pair list (relative to ``root``, absolute, or a URI); ``None``: one of
            :data:`FLEXIT_LISTS` in ``root``, else the only ``.txt``/``.csv``/``.tsv`` file there.
        image_dir: the image folder under ``root``; ``None``: the first of :data:`FLEXIT_IMAGE_DIRS` that
            exists, else ``root`` itself.
        class_template: the prompt of a class name (``{article}``, ``{name}``).
        on_bad_row: ``"error"`` or ``"skip"`` (:class:`~pipelines.datasets.rows.BadRowPolicy`).
        dataset: the value of the ``dataset`` column.
        id_prefix: prepended to every id.
        storage_cfg: S3 settings (``None``: the AWS environment variables).

    Returns:
        The table in :data:`pipelines.schema.INPUT_SCHEMA` (``mask`` null).

    Raises:
        DatasetError: the pair list is missing (or not the only candidate) or not UTF-8 text, or bad rows under
            policy ``error``.
        StorageError: the store cannot be reached.
    """
    loc = Location(root, storage_cfg)
    list_path = pick_file(loc, pairs_file, FLEXIT_LISTS, (".txt", ".csv", ".tsv"), "FlexIT pair list")
    text = read_text(loc.fs, list_path)
    if image_dir is None:
        image_dir = next((d for d in FLEXIT_IMAGE_DIRS if storage.is_dir(loc.fs, storage.join(loc.path, d))), "")
    images = loc.index(image_dir)
    folder = loc.shown(storage.join(loc.path, image_dir) if image_dir else loc.path)
    problems = Problems(f"FlexIT {loc.shown(list_path)}", BadRowPolicy(on_bad_row))
    try:
        items = list(_flexit_fields(posixpath.basename(list_path), text))
    except csv.Error as exc:  # NUL bytes, a field over the size limit: not a usable list
        raise DatasetError(f"{loc.shown(list_path)}: not a readable pair list ({exc})") from None
    ids: list[str] = []
    counts: dict[str, int] = {}
    for _, fields_ in items:
        stem = PurePosixPath(fields_[0]).stem if fields_ else ""
        counts[stem] = counts.get(stem, 0) + 1
        ids.append(f"{id_prefix}{stem}" if counts[stem] == 1 else f"{id_prefix}{stem}-{counts[stem]}")

    def load(k: int) -> Row | tuple[str, str]:
        n, parts = items[k]
        where = f"line {n}"
        try:
            if len(parts) != 3 or not all(parts):
                raise DatasetError(f"expected 3 non-empty fields (file, source class, target class); got {parts}")
            file, src, tgt = parts
            path = lookup(images, file, "image", folder)
            image = read_file(loc.fs, path)
            image_size(image)
        except Exception as exc:  # noqa: BLE001 - any problem with one record's files is that record's bad row
            return where, problem_text(exc)
        meta = {
            "format": "flexit",
            "line": n,
            "file": file,
            "source_class": src,
            "target_class": tgt,
            "edit_phrase": tgt,
            "image_file": posixpath.basename(path),
        }
        return Row(ids[k], class_prompt(src, class_template), class_prompt(tgt, class_template), image, None, meta)

    rows = collect(parallel(load, list(range(len(items)))), problems)
    return rows_to_table(rows, dataset, problems.finish())
