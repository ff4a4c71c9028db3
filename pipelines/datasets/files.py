"""Finding and reading a dataset's files, local or on S3: folder indexes, list files, parallel reads.

Paths go through :mod:`pipelines.storage` (pyarrow filesystems), so a dataset root, a list file or a single
image may each be a local path or an ``s3://`` URI.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any

import pyarrow.fs as pafs

from instdiff.errors import InputNotFoundError, StorageError
from pipelines import storage
from pipelines.datasets.rows import DatasetError
from pipelines.storage import StorageConfig

LIST_SEPARATOR = "<>"  # field separator of the InstDiffEdit list files
_READ_THREADS = 16


class Location:
    """A folder (local or remote) that relative paths are resolved against.

    Args:
        uri: the folder, a local path or a URI (``s3://bucket/prefix``).
        cfg: S3 settings (``None``: the AWS environment variables).
    """

    def __init__(self, uri: str, cfg: StorageConfig | None) -> None:
        self.cfg = cfg
        self.fs, self.path = storage.resolve(uri, cfg)
        self._fs_cache: dict[str, tuple[pafs.FileSystem, str]] = {}

    def shown(self, path: str) -> str:
        """``path`` (inside this folder's filesystem) as shown in messages."""
        return storage.display(self.fs, path)

    def resolve(self, ref: str) -> tuple[pafs.FileSystem, str]:
        """Where a reference from a list file points.

        Args:
            ref: a path relative to this folder, an absolute local path, or a URI (``s3://...``).

        Returns:
            ``(filesystem, path inside it)``; one S3 filesystem is kept per bucket.
        """
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
        """Every file under ``sub`` (recursively; hidden ``.x`` files skipped), by name and by stem.

        Args:
            sub: a folder relative to this one (``""``: this folder).

        Returns:
            File name → path and stem → path; a name or stem that two files share maps to ``""`` (ambiguous),
            so :func:`lookup` can say so. Empty when ``sub`` is not a folder.
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


def read_file(fs: pafs.FileSystem, path: str) -> bytes:
    """A whole file.

    Args:
        fs: the filesystem.
        path: the path inside it.

    Returns:
        The file's bytes.

    Raises:
        InputNotFoundError: the file does not exist.
        StorageError: ``path`` is a folder, or the store cannot be reached.
    """
    kind = storage.file_info(fs, path).type
    if kind == pafs.FileType.NotFound:
        raise InputNotFoundError(f"{storage.display(fs, path)} does not exist")
    if kind == pafs.FileType.Directory:
        raise StorageError(f"{storage.display(fs, path)} is a folder; expected a file")
    with storage.reading(storage.display(fs, path)):
        return storage.read_bytes(fs, path)


def read_text(fs: pafs.FileSystem, path: str) -> str:
    """A whole text file (UTF-8, a byte-order mark dropped), for list files and listings.

    Args:
        fs: the filesystem.
        path: the path inside it.

    Returns:
        The file's text.

    Raises:
        InputNotFoundError: the file does not exist.
        StorageError: ``path`` is a folder, or the store cannot be reached.
        DatasetError: the file is not UTF-8 text.
    """
    data = read_file(fs, path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{storage.display(fs, path)} is not UTF-8 text (byte {exc.start}: {exc.reason}); expected a text file"
        ) from None


def lookup(index: dict[str, str], name: str, what: str, folder: str) -> str:
    """The path of a file named in a list, found in a folder index (:meth:`Location.index`).

    Args:
        index: the folder's index.
        name: a file name, or a stem (any suffix matches).
        what: what the file is, for messages (``"image"``, ``"mask"``).
        folder: the folder as shown in messages.

    Returns:
        The file's path.

    Raises:
        InputNotFoundError: no file has that name or stem, or several do.
    """
    for key in (name, PurePosixPath(name).stem):
        path = index.get(key)
        if path:
            return path
        if path == "":
            raise InputNotFoundError(f"{what} {name!r} is ambiguous in {folder} (several files share that name)")
    raise InputNotFoundError(f"{what} {name!r} not found in {folder}")


def pick_file(loc: Location, given: str | None, preferred: Sequence[str], suffixes: Sequence[str], what: str) -> str:
    """The list file of a dataset folder.

    Args:
        loc: the dataset's root folder.
        given: the file named by the user (relative to the root, absolute, or a URI), or ``None``.
        preferred: names looked for in the root, in order, when ``given`` is ``None``.
        suffixes: with no preferred name present, the only file in the root with one of these suffixes.
        what: what the file is, for messages.

    Returns:
        The list file's path inside ``loc.fs``.

    Raises:
        DatasetError: ``given`` does not exist, the root is not a folder, or no single candidate is found.
    """
    if given:
        fs, path = loc.resolve(given)
        if not storage.exists(fs, path):
            shown = storage.display(fs, given if storage.is_remote(given) else path)
            raise DatasetError(f"{what} {shown} does not exist")
        return path
    for name in preferred:
        path = storage.join(loc.path, name)
        if storage.exists(loc.fs, path):
            return path
    if not storage.is_dir(loc.fs, loc.path):
        raise DatasetError(f"{loc.shown(loc.path)} is not a folder")
    found = sorted(
        i.path
        for i in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
        if i.type == pafs.FileType.File and i.path.endswith(tuple(suffixes))
    )
    if len(found) == 1:
        return found[0]
    accepted = ", ".join(preferred)
    if not found:
        raise DatasetError(
            f"no {what} in {loc.shown(loc.path)}; expected one of {accepted} "
            f"(or any single {'/'.join(suffixes)} file), or name it explicitly"
        )
    raise DatasetError(
        f"several candidate {what}s in {loc.shown(loc.path)}: "
        f"{', '.join(posixpath.basename(f) for f in found)}; name one explicitly"
    )


def list_lines(text: str) -> Iterable[tuple[int, str]]:
    """The non-empty, non-comment (``#``) lines of a list file.

    Args:
        text: the file's text.

    Returns:
        ``(1-based line number, stripped line)`` pairs, in order.
    """
    for n, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield n, stripped


def split_list_line(line: str) -> list[str]:
    """The fields of a list line separated by :data:`LIST_SEPARATOR`, each stripped."""
    return [part.strip() for part in line.split(LIST_SEPARATOR)]


def parallel(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``fn`` over ``items`` on a thread pool (file reads dominate; S3 reads overlap).

    Args:
        fn: the per-item function.
        items: its inputs.

    Returns:
        ``[fn(i) for i in items]``, in order.
    """
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))
