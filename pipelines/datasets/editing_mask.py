"""InstDiffEdit's Editing-Mask benchmark (200 images with human-labelled edit masks) as instdiff input rows."""

from __future__ import annotations

import posixpath
from pathlib import PurePosixPath
from typing import Any

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
from pipelines.datasets.images import image_size, mask_png
from pipelines.datasets.prompts import DEFAULT_CLASS_TEMPLATE, class_prompt, replace_phrase
from pipelines.datasets.rows import BadRowPolicy, DatasetError, Problems, Row, collect, problem_text, rows_to_table
from pipelines.storage import StorageConfig

EDITING_MASK_LISTS = ("Editing-Mask_list.txt", "editing_mask_list.txt", "list.txt")


def read_editing_mask(
    root: str,
    list_file: str | None = None,
    image_dir: str = "image",
    mask_dir: str = "mask",
    class_template: str = DEFAULT_CLASS_TEMPLATE,
    on_bad_row: BadRowPolicy | str = BadRowPolicy.ERROR,
    dataset: str = "editing-mask",
    id_prefix: str = "",
    storage_cfg: StorageConfig | None = None,
) -> pa.Table:
    """Read InstDiffEdit's Editing-Mask (200 images with human-labelled edit masks) into the input schema.

    ``root`` holds the list file (``Editing-Mask_list.txt`` by default), ``image/`` and ``mask/``. Lines:

    * ``id <> caption <> source phrase <> target phrase`` (Imagen rows): the image and mask are ``<id>.*``;
      ``source_prompt`` is the caption, ``target_prompt`` the caption with the phrase replaced
      (:func:`~pipelines.datasets.prompts.replace_phrase`).
    * ``file <> source class <> target class`` (ImageNet rows): the image is ``file``, the mask ``<stem>.*``;
      prompts are the classes through ``class_template`` (:func:`~pipelines.datasets.prompts.class_prompt`).

    Every row must have a mask (that is the point of the set). ``meta`` holds the line number, the row kind
    (``imagen``/``imagenet``), the original fields, ``edit_phrase`` (the target phrase or class, which is what
    the official code conditions on), ``target_class`` for ImageNet rows (for CSFID), the image and mask file
    names and any notes.

    Args:
        root: the dataset folder, local or ``s3://``.
        list_file: the list file (relative to ``root``, absolute, or a URI); ``None``: one of
            :data:`EDITING_MASK_LISTS` in ``root``, else the only ``.txt`` file there.
        image_dir: the image folder under ``root`` (searched recursively, by file name or stem).
        mask_dir: the mask folder under ``root``.
        class_template: the prompt of a class name (``{article}``, ``{name}``).
        on_bad_row: ``"error"`` or ``"skip"`` (:class:`~pipelines.datasets.rows.BadRowPolicy`).
        dataset: the value of the ``dataset`` column.
        id_prefix: prepended to every id (the image's stem).
        storage_cfg: S3 settings (``None``: the AWS environment variables).

    Returns:
        The table in :data:`pipelines.schema.INPUT_SCHEMA`.

    Raises:
        DatasetError: the list file is missing (or not the only candidate) or not UTF-8 text, duplicate ids,
            or bad rows under policy ``error``.
        StorageError: the store cannot be reached.
    """
    loc = Location(root, storage_cfg)
    list_path = pick_file(loc, list_file, EDITING_MASK_LISTS, (".txt",), "Editing-Mask list")
    text = read_text(loc.fs, list_path)
    problems = Problems(f"Editing-Mask {loc.shown(list_path)}", BadRowPolicy(on_bad_row))
    images = loc.index(image_dir)
    masks = loc.index(mask_dir)
    img_folder = loc.shown(storage.join(loc.path, image_dir))
    mask_folder = loc.shown(storage.join(loc.path, mask_dir))

    def load(item: tuple[int, str]) -> Row | tuple[str, str]:
        n, line = item
        where = f"line {n}"
        parts = split_list_line(line)
        try:
            if len(parts) == 4:
                key, caption, src, tgt = parts
                if not all(parts):
                    raise DatasetError("a field is empty")
                meta: dict[str, Any] = {
                    "format": "editing-mask",
                    "kind": "imagen",
                    "line": n,
                    "list_id": key,
                    "caption": caption,
                    "source_phrase": src,
                    "target_phrase": tgt,
                    "edit_phrase": tgt,
                }
                source_prompt, target_prompt = caption, replace_phrase(caption, src, tgt)
            elif len(parts) == 3:
                key, src, tgt = parts
                if not all(parts):
                    raise DatasetError("a field is empty")
                meta = {
                    "format": "editing-mask",
                    "kind": "imagenet",
                    "line": n,
                    "file": key,
                    "source_class": src,
                    "target_class": tgt,
                    "edit_phrase": tgt,
                }
                source_prompt, target_prompt = class_prompt(src, class_template), class_prompt(tgt, class_template)
            else:
                raise DatasetError(
                    f"expected 4 fields (id <> caption <> source phrase <> target phrase) or 3 "
                    f"(file <> source class <> target class) separated by '{LIST_SEPARATOR}'; "
                    f"got {len(parts)}"
                )
            img_path = lookup(images, key, "image", img_folder)
            image = read_file(loc.fs, img_path)
            size = image_size(image)
            mask_path = lookup(masks, PurePosixPath(key).stem, "mask", mask_folder)
            mask, note = mask_png(read_file(loc.fs, mask_path), size)
        except Exception as exc:  # noqa: BLE001 - any problem with one record's files is that record's bad row
            return where, problem_text(exc)
        meta.update(
            image_file=posixpath.basename(img_path),
            mask_file=posixpath.basename(mask_path),
            notes=[note] if note else [],
        )
        return Row(f"{id_prefix}{PurePosixPath(key).stem}", source_prompt, target_prompt, image, mask, meta)

    rows = collect(parallel(load, list(list_lines(text))), problems)
    return rows_to_table(rows, dataset, problems.finish())
