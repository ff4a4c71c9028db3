"""Dataset adapters: public editing benchmarks turned into the instdiff input schema (``pipelines.schema``).

Every adapter is a function that returns a ``pyarrow.Table`` in :data:`pipelines.schema.INPUT_SCHEMA`
(``id, image, source_prompt, target_prompt, mask, dataset, meta``); ``meta`` is JSON text holding the
original fields of the row, so nothing of the source format is lost. Paths may be local or ``s3://``
(through :mod:`pipelines.storage`; S3 settings from a :class:`~pipelines.storage.StorageConfig` or the
usual ``AWS_*`` variables).

======================  =====================================================================================
adapter                 format
======================  =====================================================================================
:func:`read_editing_mask`  InstDiffEdit's Editing-Mask: a list file with ``id <> caption <> source phrase <>
                        target phrase`` (Imagen rows) and ``file <> source class <> target class`` (ImageNet
                        rows), images in ``image/``, ground-truth masks in ``mask/`` (same stem)
:func:`read_flexit`     ImageNet editing as in FlexIT: an image folder (flat or per-synset sub-folders) and a
                        list of ``file <> source class <> target class`` (or CSV/TSV with those 3 fields)
:func:`read_prompt_pairs`  InstructPix2Pix / LAION prompt pairs: JSONL objects with ``input``, ``edit`` and
                        ``output`` captions; rows have no image (``image`` is null) — fill it with
                        :func:`generate_sources`, or let the job's ``fisedit`` method generate it
:func:`read_listing`    a generic CSV or JSONL with ``image_path, source_prompt, target_prompt`` and optional
                        ``mask_path``, ``id``, ``dataset`` (other columns go to ``meta``)
======================  =====================================================================================

Bad rows
--------
A row is *bad* when a file it names is missing or unreadable, a mask cannot be decoded, a field is missing or
empty, or a list line has the wrong number of fields. The policy is chosen with ``on_bad_row``:

* ``"error"`` (default): nothing is returned; :class:`DatasetError` lists every bad row (line and reason).
  A benchmark should never silently run on a subset.
* ``"skip"``: bad rows are left out; a warning logs how many and the first few reasons, and the table's
  schema metadata (``b"instdiff.skipped"``) holds the count.

Masks are stored as 8-bit PNG (255 = edit). A mask whose size differs from its image is resized (nearest) to
the image's size; ``meta["notes"]`` says so. Images are carried as their original encoded bytes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from instdiff.errors import InputNotFoundError, InstdiffError
from pipelines import schema, storage
from pipelines.storage import StorageConfig

if TYPE_CHECKING:
    import argparse

    from instdiff.models import ModelBundle

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".JPEG", ".JPG", ".PNG")
LIST_SEPARATOR = "<>"
SKIPPED_KEY = b"instdiff.skipped"
DEFAULT_CLASS_TEMPLATE = "a photo of {article} {name}"
_READ_THREADS = 16
_SHOWN_PROBLEMS = 20
_ARTICLE_RE = re.compile(r"(?:^|\s)(a|an|the)\s*$", re.IGNORECASE)
_LEADING_ARTICLE_RE = re.compile(r"^(a|an|the)\s+", re.IGNORECASE)

FORMATS = ("editing-mask", "flexit", "prompt-pairs", "listing")


class DatasetError(InstdiffError, ValueError):
    """A dataset that cannot be read as asked; the message lists every bad row (or what is accepted)."""


class BadRowPolicy(StrEnum):
    ERROR = "error"  # raise DatasetError listing every bad row
    SKIP = "skip"  # leave bad rows out, log their count and the first reasons


@dataclass
class Row:
    """One edit, before it becomes a table row."""

    id: str
    source_prompt: str
    target_prompt: str
    image: bytes | None = None
    mask: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class _Problems:
    """Bad rows collected while reading; raised or logged at the end according to the policy."""

    def __init__(self, source: str, policy: BadRowPolicy) -> None:
        self.source = source
        self.policy = BadRowPolicy(policy)
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, reason: str) -> None:
        self.items.append((where, reason))

    def finish(self) -> int:
        """Raise (policy ``error``) or log (policy ``skip``); returns the number of bad rows."""
        if not self.items:
            return 0
        shown = "\n".join(f"  - {w}: {r}" for w, r in self.items[:_SHOWN_PROBLEMS])
        more = len(self.items) - _SHOWN_PROBLEMS
        if more > 0:
            shown += f"\n  ... and {more} more"
        if self.policy is BadRowPolicy.ERROR:
            raise DatasetError(
                f"{self.source}: {len(self.items)} bad row(s):\n{shown}\n"
                "fix them, or pass on_bad_row='skip' (--on-bad-row skip) to leave them out"
            )
        log.warning("%s: skipped %d bad row(s):\n%s", self.source, len(self.items), shown)
        return len(self.items)


# ---- file access ----------------------------------------------------------------------------------------------
class _Location:
    """A folder (local or remote) that relative paths are resolved against."""

    def __init__(self, uri: str, cfg: StorageConfig | None) -> None:
        self.cfg = cfg
        self.fs, self.path = storage.resolve(uri, cfg)
        self._fs_cache: dict[str, tuple[pafs.FileSystem, str]] = {}

    def shown(self, path: str) -> str:
        return storage.display(self.fs, path)

    def resolve(self, ref: str) -> tuple[pafs.FileSystem, str]:
        """``ref`` relative to this folder, or an absolute local path, or a URI (``s3://...``)."""
        if storage.is_s3(ref):
            scheme, rest = ref.split("://", 1)
            bucket = rest.split("/", 1)[0]
            if bucket not in self._fs_cache:
                self._fs_cache[bucket] = storage.resolve(f"{scheme}://{bucket}", self.cfg)
            return self._fs_cache[bucket][0], rest.rstrip("/")
        if storage.is_remote(ref) or ref.startswith("file://"):
            return storage.resolve(ref, self.cfg)
        if ref.startswith("/") and isinstance(self.fs, pafs.LocalFileSystem):
            return self.fs, posixpath.normpath(ref)
        return self.fs, posixpath.normpath(storage.join(self.path, ref))

    def index(self, sub: str) -> dict[str, str]:
        """Every file under ``sub`` (recursively): its name and its stem, each mapped to its path.

        A name or stem that two files share maps to ``""`` (ambiguous) so lookups can say so.
        """
        base = storage.join(self.path, sub) if sub else self.path
        if not storage.is_dir(self.fs, base):
            return {}
        out: dict[str, str] = {}
        for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            name = posixpath.basename(info.path)
            if name.startswith("."):
                continue
            for key in {name, PurePosixPath(name).stem}:
                out[key] = "" if key in out and out[key] != info.path else info.path
        return out


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    """Whole file; FileNotFoundError with the path when it does not exist."""
    if not storage.exists(fs, path):
        raise InputNotFoundError(f"{storage.display(fs, path)} does not exist")
    return storage.read_bytes(fs, path)


def _lookup(index: dict[str, str], name: str, what: str, folder: str) -> str:
    """Path of ``name`` (a file name, or a stem with any image suffix) in a folder index."""
    for key in (name, PurePosixPath(name).stem):
        path = index.get(key)
        if path:
            return path
        if path == "":
            raise InputNotFoundError(f"{what} {name!r} is ambiguous in {folder} (several files share that name)")
    raise InputNotFoundError(f"{what} {name!r} not found in {folder}")


def image_size(data: bytes) -> tuple[int, int]:
    """(W, H) from an encoded image's header, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__})") from None


def mask_png(data: bytes, size: tuple[int, int]) -> tuple[bytes, str | None]:
    """A mask file's bytes as an 8-bit PNG (255 = edit) at ``size`` (W, H); returns (png, note or None).

    Any mode is read (non-zero / alpha > 127 = edit, see :func:`instdiff.imageio.decode_mask`); JPEG masks
    are thresholded at 127, so compression noise does not leak in.
    """
    from instdiff.imageio import ImageInputError, decode_mask, encode_png, resize_bool

    try:
        mask = decode_mask(data)
    except ImageInputError as exc:
        raise ValueError(str(exc)) from None
    note = None
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        note = f"mask resized from {mask.shape[1]}x{mask.shape[0]} to the image's {size[0]}x{size[1]}"
        mask = resize_bool(mask, size)
    return encode_png(mask), note


# ---- prompts --------------------------------------------------------------------------------------------------
def class_prompt(name: str, template: str = DEFAULT_CLASS_TEMPLATE) -> str:
    """A class name as a prompt: ``template`` with ``{name}`` and ``{article}`` ('a'/'an') filled in.

    >>> class_prompt("Afghan hound")
    'a photo of an Afghan hound'
    """
    name = name.strip()
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return template.format(name=name, article=article)


def replace_phrase(caption: str, source_phrase: str, target_phrase: str) -> str:
    """The caption with ``source_phrase`` replaced by ``target_phrase`` (the paper's edit text in context).

    The match ignores case; an article already in the caption before the phrase is kept, and a leading
    article of the target phrase is then dropped ("a Shiba Inu dog" → "a raccoon", never "a a raccoon").
    Raises ValueError when the caption does not contain the phrase.
    """
    match = re.search(re.escape(source_phrase.strip()), caption, re.IGNORECASE)
    if match is None:
        raise ValueError(f"source phrase {source_phrase!r} is not in the caption")
    before, after = caption[: match.start()], caption[match.end():]
    target = target_phrase.strip()
    caption_article = _ARTICLE_RE.search(before)
    target_article = _LEADING_ARTICLE_RE.match(target)
    if caption_article and target_article:
        target = target[target_article.end():]
        word = caption_article.group(1)
        if word.lower() in ("a", "an"):
            article = "an" if target[:1].lower() in "aeiou" else "a"
            article = article.capitalize() if word[0].isupper() else article
            before = before[: caption_article.start(1)] + article + before[caption_article.end(1):]
    return before + target + after


# ---- table building -------------------------------------------------------------------------------------------
def rows_to_table(rows: Sequence[Row], dataset: str, skipped: int = 0) -> pa.Table:
    """Rows → a table in :data:`pipelines.schema.INPUT_SCHEMA`; ids must be unique."""
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, c in Counter(ids).items() if c > 1)
        raise DatasetError(f"{dataset}: duplicate ids {dupes[:10]}; every row needs a unique id")
    table = pa.table(
        {
            schema.ID: ids,
            schema.IMAGE: [r.image for r in rows],
            schema.SOURCE_PROMPT: [r.source_prompt for r in rows],
            schema.TARGET_PROMPT: [r.target_prompt for r in rows],
            schema.MASK: [r.mask for r in rows],
            schema.DATASET: [dataset] * len(rows),
            schema.META: [json.dumps(r.meta, sort_keys=True, ensure_ascii=False) for r in rows],
        },
        schema=schema.INPUT_SCHEMA,
    )
    schema.validate_input_schema(table.schema, dataset)
    return table.replace_schema_metadata({SKIPPED_KEY: str(skipped).encode()})


def skipped_rows(table: pa.Table) -> int:
    """How many bad rows the adapter that built ``table`` left out (policy ``skip``)."""
    meta = table.schema.metadata or {}
    return int(meta.get(SKIPPED_KEY, b"0"))


def _parallel(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``fn`` over ``items`` on a thread pool (file reads dominate; S3 reads overlap)."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def _split_list_line(line: str) -> list[str]:
    return [part.strip() for part in line.split(LIST_SEPARATOR)]


def _list_lines(text: str) -> Iterable[tuple[int, str]]:
    """(1-based line number, line) of the non-empty, non-comment lines."""
    for n, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield n, stripped


def _pick_file(loc: _Location, given: str | None, preferred: Sequence[str], suffixes: Sequence[str],
               what: str) -> str:
    """The list file: ``given`` (relative to the root, or absolute/URI), else a preferred name, else the only
    file in the root with one of ``suffixes``."""
    if given:
        fs, path = loc.resolve(given)
        if not storage.exists(fs, path):
            raise DatasetError(f"{what} {storage.display(fs, given if storage.is_remote(given) else path)} "
                               "does not exist")
        return path
    for name in preferred:
        path = storage.join(loc.path, name)
        if storage.exists(loc.fs, path):
            return path
    if not storage.is_dir(loc.fs, loc.path):
        raise DatasetError(f"{loc.shown(loc.path)} is not a folder")
    found = sorted(
        i.path for i in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
        if i.type == pafs.FileType.File and i.path.endswith(tuple(suffixes))
    )
    if len(found) == 1:
        return found[0]
    accepted = ", ".join(preferred)
    if not found:
        raise DatasetError(f"no {what} in {loc.shown(loc.path)}; expected one of {accepted} "
                           f"(or any single {'/'.join(suffixes)} file), or name it explicitly")
    raise DatasetError(f"several candidate {what}s in {loc.shown(loc.path)}: "
                       f"{', '.join(posixpath.basename(f) for f in found)}; name one explicitly")


# ---- Editing-Mask -----------------------------------------------------------------------------------------------
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
      (:func:`replace_phrase`).
    * ``file <> source class <> target class`` (ImageNet rows): the image is ``file``, the mask ``<stem>.*``;
      prompts are the classes through ``class_template`` (:func:`class_prompt`).

    Every row must have a mask (that is the point of the set). ``meta`` holds the line number, the row kind
    (``imagen``/``imagenet``), the original fields, ``edit_phrase`` (the target phrase or class, which is what
    the official code conditions on), ``target_class`` for ImageNet rows (for CSFID), the image and mask file
    names and any notes.
    """
    loc = _Location(root, storage_cfg)
    list_path = _pick_file(loc, list_file, EDITING_MASK_LISTS, (".txt",), "Editing-Mask list")
    text = _read(loc.fs, list_path).decode("utf-8-sig")
    problems = _Problems(f"Editing-Mask {loc.shown(list_path)}", BadRowPolicy(on_bad_row))
    images = loc.index(image_dir)
    masks = loc.index(mask_dir)
    img_folder, mask_folder = loc.shown(storage.join(loc.path, image_dir)), loc.shown(storage.join(loc.path, mask_dir))

    def load(item: tuple[int, str]) -> Row | tuple[str, str]:
        n, line = item
        where = f"line {n}"
        parts = _split_list_line(line)
        try:
            if len(parts) == 4:
                key, caption, src, tgt = parts
                if not all(parts):
                    raise ValueError("a field is empty")
                meta: dict[str, Any] = {"format": "editing-mask", "kind": "imagen", "line": n, "list_id": key,
                                        "caption": caption, "source_phrase": src, "target_phrase": tgt,
                                        "edit_phrase": tgt}
                source_prompt, target_prompt = caption, replace_phrase(caption, src, tgt)
            elif len(parts) == 3:
                key, src, tgt = parts
                if not all(parts):
                    raise ValueError("a field is empty")
                meta = {"format": "editing-mask", "kind": "imagenet", "line": n, "file": key, "source_class": src,
                        "target_class": tgt, "edit_phrase": tgt}
                source_prompt, target_prompt = class_prompt(src, class_template), class_prompt(tgt, class_template)
            else:
                raise ValueError(f"expected 4 fields (id <> caption <> source phrase <> target phrase) or 3 "
                                 f"(file <> source class <> target class) separated by '{LIST_SEPARATOR}'; "
                                 f"got {len(parts)}")
            img_path = _lookup(images, key, "image", img_folder)
            image = _read(loc.fs, img_path)
            size = image_size(image)
            mask_path = _lookup(masks, PurePosixPath(key).stem, "mask", mask_folder)
            mask, note = mask_png(_read(loc.fs, mask_path), size)
        except (ValueError, OSError) as exc:
            return where, str(exc)
        meta.update(image_file=posixpath.basename(img_path), mask_file=posixpath.basename(mask_path),
                    notes=[note] if note else [])
        return Row(f"{id_prefix}{PurePosixPath(key).stem}", source_prompt, target_prompt, image, mask, meta)

    rows = _collect(_parallel(load, list(_list_lines(text))), problems)
    return rows_to_table(rows, dataset, problems.finish())


def _collect(results: Sequence[Row | tuple[str, str]], problems: _Problems) -> list[Row]:
    rows = []
    for r in results:
        if isinstance(r, Row):
            rows.append(r)
        else:
            problems.add(*r)
    return rows


# ---- ImageNet (FlexIT protocol) ---------------------------------------------------------------------------------
FLEXIT_LISTS = ("ImageNet_list.txt", "imagenet_list.txt", "pairs.txt", "pairs.csv", "pairs.tsv")
FLEXIT_IMAGE_DIRS = ("images", "image", "val")


def _flexit_fields(name: str, text: str) -> Iterable[tuple[int, list[str]]]:
    """(line, fields) of a FlexIT pair list: '<>'-separated lines, or CSV/TSV (an optional header is skipped)."""
    if LIST_SEPARATOR in text:
        for n, line in _list_lines(text):
            yield n, _split_list_line(line)
        return
    delimiter = "\t" if name.endswith(".tsv") or "\t" in text.splitlines()[0] else ","
    for n, fields_ in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
        if not fields_ or not "".join(fields_).strip() or fields_[0].strip().startswith("#"):
            continue
        fields_ = [f.strip() for f in fields_]
        if n == 1 and not PurePosixPath(fields_[0]).suffix and fields_[0].lower() in ("image", "file", "filename",
                                                                                        "image_path", "path"):
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

    ``pairs_file`` (default: ``ImageNet_list.txt`` or ``pairs.{txt,csv,tsv}`` in ``root``) has one pair a
    line: ``file <> source class <> target class`` or the same three fields as CSV/TSV. Images are looked up
    by file name (or stem) anywhere under ``image_dir`` (default: ``images/``, ``image/`` or ``val/`` in
    ``root``, else ``root``), so flat folders and per-synset sub-folders both work. There are no masks.
    ``meta`` keeps ``file``, ``source_class``, ``target_class`` (the label CSFID groups by) and the line.
    An image listed twice (two target classes) gets ids ``<stem>``, ``<stem>-2``, ...
    """
    loc = _Location(root, storage_cfg)
    list_path = _pick_file(loc, pairs_file, FLEXIT_LISTS, (".txt", ".csv", ".tsv"), "FlexIT pair list")
    text = _read(loc.fs, list_path).decode("utf-8-sig")
    if image_dir is None:
        image_dir = next((d for d in FLEXIT_IMAGE_DIRS if storage.is_dir(loc.fs, storage.join(loc.path, d))), "")
    images = loc.index(image_dir)
    folder = loc.shown(storage.join(loc.path, image_dir) if image_dir else loc.path)
    problems = _Problems(f"FlexIT {loc.shown(list_path)}", BadRowPolicy(on_bad_row))
    items = list(_flexit_fields(posixpath.basename(list_path), text))
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
                raise ValueError(f"expected 3 non-empty fields (file, source class, target class); got {parts}")
            file, src, tgt = parts
            path = _lookup(images, file, "image", folder)
            image = _read(loc.fs, path)
            image_size(image)
        except (ValueError, OSError) as exc:
            return where, str(exc)
        meta = {"format": "flexit", "line": n, "file": file, "source_class": src, "target_class": tgt,
                "edit_phrase": tgt, "image_file": posixpath.basename(path)}
        return Row(ids[k], class_prompt(src, class_template), class_prompt(tgt, class_template), image, None, meta)

    rows = _collect(_parallel(load, list(range(len(items)))), problems)
    return rows_to_table(rows, dataset, problems.finish())


# ---- prompt pairs (InstructPix2Pix / LAION) ---------------------------------------------------------------------
PROMPT_PAIR_FIELDS = ("input", "edit", "output")


def read_prompt_pairs(
    jsonl_path: str,
    id_field: str = "id",
    limit: int | None = None,
    on_bad_row: BadRowPolicy | str = BadRowPolicy.ERROR,
    dataset: str = "prompt-pairs",
    storage_cfg: StorageConfig | None = None,
) -> pa.Table:
    """Read InstructPix2Pix-style prompt pairs (JSONL: ``{"input": ..., "edit": ..., "output": ...}``).

    Each line becomes a text-to-image edit: ``source_prompt = input``, ``target_prompt = output``, ``image``
    null (generate it with :func:`generate_sources`, or run ``fisedit``, which generates it itself). The id is
    the object's ``id_field`` when present, else ``<file stem>-<line>``. ``meta`` is the whole original object
    plus the line number. ``limit`` keeps the first N good rows.
    """
    fs, path = storage.resolve(jsonl_path, storage_cfg)
    text = _read(fs, path).decode("utf-8-sig")
    stem = PurePosixPath(path).stem
    problems = _Problems(f"prompt pairs {storage.display(fs, path)}", BadRowPolicy(on_bad_row))
    rows: list[Row] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.add(f"line {n}", f"not JSON ({exc.msg})")
            continue
        if not isinstance(obj, dict):
            problems.add(f"line {n}", f"expected a JSON object, got {type(obj).__name__}")
            continue
        bad = [k for k in PROMPT_PAIR_FIELDS if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if bad:
            problems.add(f"line {n}", f"missing or empty field(s) {', '.join(bad)}; each line needs "
                                      f"{', '.join(PROMPT_PAIR_FIELDS)} (strings)")
            continue
        rid = obj.get(id_field)
        rid = str(rid) if rid not in (None, "") else f"{stem}-{n:06d}"
        rows.append(Row(rid, obj["input"].strip(), obj["output"].strip(), None, None,
                        {"format": "prompt-pairs", "line": n, "edit_phrase": obj["edit"].strip(), **obj}))
    return rows_to_table(rows, dataset, problems.finish())


def generate_sources(
    table: pa.Table,
    bundle: ModelBundle,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 8,
) -> pa.Table:
    """Fill the null ``image`` cells by generating each row's ``source_prompt`` with ``bundle``.

    Text-to-image with :func:`instdiff.editing.generate` (DDIM, classifier-free guidance) at the model's
    resolution, seeded per row by the batch job's :func:`pipelines.batch.row_seed`, so a row's source is the
    same whatever else is in the table, and the same image the job's ``fisedit`` method generates for that row
    with the same seed, steps and guidance (up to batched float rounding). Rows with an image are left alone.
    ``meta["generated"]`` records model, steps, guidance and seed. Returns a new table (same schema and
    schema metadata).
    """
    from instdiff.editing import generate
    from instdiff.imageio import encode_png, from_model_tensor
    from pipelines.batch import row_seed

    images = table.column(schema.IMAGE).to_pylist()
    todo = [i for i, img in enumerate(images) if img is None]
    if not todo:
        return table
    ids = table.column(schema.ID).to_pylist()
    prompts = table.column(schema.SOURCE_PROMPT).to_pylist()
    metas = table.column(schema.META).to_pylist()
    log.info("generating %d source image(s) with %s (%d steps, guidance %.1f)", len(todo), bundle.name, steps,
             guidance)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        seeds = [row_seed(seed, ids[i]) for i in chunk]
        arrays = from_model_tensor(generate(bundle, [prompts[i] for i in chunk], steps, guidance, seeds))
        for i, s, arr in zip(chunk, seeds, arrays, strict=True):
            images[i] = encode_png(np.ascontiguousarray(arr))
            meta = json.loads(metas[i]) if metas[i] else {}
            meta["generated"] = {"model": bundle.name, "steps": steps, "guidance": guidance, "seed": s}
            metas[i] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    out = table.set_column(table.schema.get_field_index(schema.IMAGE), schema.IMAGE,
                           pa.array(images, pa.binary()))
    out = out.set_column(out.schema.get_field_index(schema.META), schema.META, pa.array(metas, pa.string()))
    return out.replace_schema_metadata(table.schema.metadata)


# ---- generic listing --------------------------------------------------------------------------------------------
LISTING_REQUIRED = ("image_path", "source_prompt", "target_prompt")
LISTING_OPTIONAL = ("mask_path", "id", "dataset")


def _listing_records(name: str, text: str) -> list[tuple[int, dict[str, Any]]]:
    lower = name.lower()
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                out.append((n, {"__error__": f"not JSON ({exc.msg})"}))
                continue
            out.append((n, obj if isinstance(obj, dict) else {"__error__": "expected a JSON object"}))
        return out
    if lower.endswith((".csv", ".tsv")):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if lower.endswith(".tsv") else ",")
        missing = [c for c in LISTING_REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{name}: header lacks column(s) {', '.join(missing)}; required: "
                               f"{', '.join(LISTING_REQUIRED)}; optional: {', '.join(LISTING_OPTIONAL)}")
        return [(reader.line_num, dict(rec)) for rec in reader]
    raise DatasetError(f"{name}: unknown listing format; accepted: .csv, .tsv, .jsonl (.ndjson)")


def read_listing(
    path: str,
    image_root: str | None = None,
    on_bad_row: BadRowPolicy | str = BadRowPolicy.ERROR,
    dataset: str | None = None,
    storage_cfg: StorageConfig | None = None,
) -> pa.Table:
    """Read a CSV/TSV/JSONL listing of ``image_path, source_prompt, target_prompt[, mask_path]``.

    Paths may be relative (to ``image_root``, default the listing's folder), absolute, or URIs (``s3://``);
    the listing itself may be on S3. Optional columns: ``id`` (default ``<listing stem>-<row>``), ``dataset``
    (default: the ``dataset`` argument, else the listing's stem); every other column goes into ``meta``.
    """
    fs, list_path = storage.resolve(path, storage_cfg)
    shown = storage.display(fs, list_path)
    text = _read(fs, list_path).decode("utf-8-sig")
    base = image_root if image_root is not None else (
        path.rsplit("/", 1)[0] if storage.is_remote(path) else posixpath.dirname(list_path))
    loc = _Location(base, storage_cfg)
    stem = PurePosixPath(list_path).stem
    records = _listing_records(posixpath.basename(list_path), text)
    problems = _Problems(f"listing {shown}", BadRowPolicy(on_bad_row))
    name = dataset or stem

    def load(item: tuple[int, dict[str, Any]]) -> tuple[Row, str] | tuple[str, str]:
        n, rec = item
        where = f"row {n}"
        if "__error__" in rec:
            return where, rec["__error__"]
        bad = [c for c in LISTING_REQUIRED if not isinstance(rec.get(c), str) or not rec[c].strip()]
        if bad:
            return where, f"missing or empty {', '.join(bad)}"
        try:
            img_fs, img_path = loc.resolve(rec["image_path"].strip())
            image = _read(img_fs, img_path)
            size = image_size(image)
            mask = note = None
            mask_ref = rec.get("mask_path")
            if isinstance(mask_ref, str) and mask_ref.strip():
                m_fs, m_path = loc.resolve(mask_ref.strip())
                mask, note = mask_png(_read(m_fs, m_path), size)
        except (ValueError, OSError) as exc:
            return where, str(exc)
        rid = rec.get("id")
        rid = str(rid) if rid not in (None, "") else f"{stem}-{n:06d}"
        meta = {k: v for k, v in rec.items() if k not in ("id", "dataset")}
        meta.update(format="listing", line=n, notes=[note] if note else [])
        row_ds = rec.get("dataset") if isinstance(rec.get("dataset"), str) and rec.get("dataset") else name
        return Row(rid, rec["source_prompt"].strip(), rec["target_prompt"].strip(), image, mask, meta), row_ds

    results = _parallel(load, records)
    rows, datasets = [], []
    for r in results:
        if isinstance(r[0], Row):
            rows.append(r[0])
            datasets.append(r[1])
        else:
            problems.add(*r)
    table = rows_to_table(rows, name, problems.finish())
    if datasets and any(d != name for d in datasets):
        table = table.set_column(table.schema.get_field_index(schema.DATASET), schema.DATASET,
                                 pa.array(datasets, pa.string()))
    return table


# ---- CLI: instdiff import-dataset -------------------------------------------------------------------------------
def read_dataset(fmt: str, src: str, **kw: Any) -> pa.Table:
    """Dispatch to the adapter for ``fmt`` (one of :data:`FORMATS`)."""
    readers: dict[str, Callable[..., pa.Table]] = {
        "editing-mask": read_editing_mask, "flexit": read_flexit, "prompt-pairs": read_prompt_pairs,
        "listing": read_listing,
    }
    if fmt not in readers:
        raise DatasetError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    return readers[fmt](src, **kw)


def write_table(table: pa.Table, out: str, storage_cfg: StorageConfig | None = None) -> str:
    """Write ``table`` as one Parquet file (local or ``s3://``); returns the path as shown to users."""
    import pyarrow.parquet as pq

    if not out.endswith(".parquet"):
        raise DatasetError(f"--out must end with .parquet, got {out!r}")
    fs, path = storage.resolve(out, storage_cfg)
    parent = posixpath.dirname(path)
    if parent and isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
    pq.write_table(table, path, filesystem=fs, compression="zstd")
    return storage.display(fs, path)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``instdiff import-dataset FORMAT SRC --out OUT.parquet``."""
    from pipelines.commands import add_model_args

    p = sub.add_parser(
        "import-dataset", help="turn a public editing dataset into an instdiff input Parquet file",
        description="Read FORMAT from SRC (local or s3://) and write the instdiff input schema to --out. Formats: "
                    "editing-mask (ROOT with the list file, image/ and mask/), flexit (ROOT with the pair list "
                    "and the images), prompt-pairs (JSONL with input/edit/output), listing (CSV/TSV/JSONL with "
                    "image_path, source_prompt, target_prompt[, mask_path]).")
    p.add_argument("format", choices=FORMATS)
    p.add_argument("src", help="dataset root folder (editing-mask, flexit) or file (prompt-pairs, listing)")
    p.add_argument("--out", required=True, help="output Parquet file, local or s3://")
    p.add_argument("--on-bad-row", default="error", choices=[m.value for m in BadRowPolicy],
                   help="error: list every bad row and write nothing (default); skip: leave them out, log a count")
    p.add_argument("--list-file", default=None, help="editing-mask/flexit: the list file (default: found in SRC)")
    p.add_argument("--image-dir", default=None, help="editing-mask/flexit: image folder under SRC; listing: "
                                                     "folder relative paths are resolved against")
    p.add_argument("--class-template", default=DEFAULT_CLASS_TEMPLATE,
                   help="editing-mask/flexit: prompt for a class name ({article} {name})")
    p.add_argument("--dataset", default=None, help="value of the dataset column (default: per format)")
    p.add_argument("--limit", type=int, default=None, help="prompt-pairs: keep the first N rows")
    p.add_argument("--generate", action="store_true",
                   help="prompt-pairs: generate the source images now (else the image column stays null)")
    add_model_args(p)
    p.add_argument("--steps", type=int, default=50, help="--generate: DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="--generate: guidance scale")
    p.add_argument("--seed", type=int, default=0, help="--generate: base seed (row seed as in the batch job)")
    p.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    """Entry point of ``instdiff import-dataset``; prints a one-line JSON summary."""
    return _import(args)


def _import(args: argparse.Namespace) -> int:
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
    elif args.format == "listing" and args.image_dir:
        kw["image_root"] = args.image_dir
    if args.generate and args.format != "prompt-pairs":
        raise DatasetError("--generate only applies to prompt-pairs")
    table = read_dataset(args.format, args.src, **kw)
    if args.generate:
        from instdiff.models import load_bundle

        bundle = load_bundle(args.model, device=args.device, dtype=args.dtype,
                             local_files_only=args.local_files_only)
        table = generate_sources(table, bundle, steps=args.steps, guidance=args.guidance, seed=args.seed)
    where = write_table(table, args.out)
    summary = {"format": args.format, "rows": table.num_rows, "skipped": skipped_rows(table), "out": where,
               "with_image": table.num_rows - table.column(schema.IMAGE).null_count,
               "with_mask": table.num_rows - table.column(schema.MASK).null_count}
    print(json.dumps(summary))
    return 0
