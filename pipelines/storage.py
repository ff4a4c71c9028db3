"""Filesystem helpers: local paths and ``s3://`` URIs behind one pyarrow filesystem interface.

S3 settings come from :class:`StorageConfig` (the job config's ``storage:`` section) or, for each field
left unset, from the usual AWS environment variables: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``. Credentials found this way are resolved once, on the driver, and travel with the
filesystem object to the Ray workers (so workers need no environment of their own); with none found,
every process uses the AWS SDK's default chain (profile, instance role, ...).

Other URI schemes pyarrow knows (``gs://``, ``hdfs://``, ...) go through ``pyarrow.fs.FileSystem.from_uri``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from instdiff.errors import ConfigError, InstdiffError, StorageError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorageConfig:
    """S3 connection settings; ``None`` means: take it from the AWS environment variables."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 (MinIO, moto); None = AWS
    region: str | None = None
    access_key_id: str | None = None  # prefer the environment or an instance role to keys in a file
    secret_access_key: str | None = None
    session_token: str | None = None
    anonymous: bool = False  # public buckets


def is_s3(uri: str) -> bool:
    """True for ``s3://`` and ``s3a://`` URIs."""
    return uri.startswith(("s3://", "s3a://"))


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file`` (s3://, gs://, ...)."""
    scheme = urlparse(uri).scheme
    return len(scheme) > 1 and scheme != "file"


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def s3_filesystem(cfg: StorageConfig | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem from ``cfg`` with the AWS environment variables as fallback.

    Args:
        cfg: S3 settings; each field left ``None`` is read from the AWS environment variables.

    Returns:
        The filesystem, carrying the credentials found (none: the AWS SDK's default chain).

    Raises:
        ConfigError: an access key without a secret key, or the reverse.
    """
    cfg = cfg or StorageConfig()
    kw: dict = {}
    endpoint = cfg.endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kw["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kw["scheme"] = parsed.scheme or "https"
    region = cfg.region or _env("AWS_REGION", "AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    if cfg.anonymous:
        kw["anonymous"] = True
    else:
        key = cfg.access_key_id or _env("AWS_ACCESS_KEY_ID")
        secret = cfg.secret_access_key or _env("AWS_SECRET_ACCESS_KEY")
        if bool(key) != bool(secret):
            raise ConfigError(
                "S3 credentials are incomplete: set both storage.access_key_id and storage.secret_access_key "
                "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), or neither to use the AWS default chain"
            )
        if key:
            kw["access_key"] = key
            kw["secret_key"] = secret
            token = cfg.session_token or _env("AWS_SESSION_TOKEN")
            if token:
                kw["session_token"] = token
    return pafs.S3FileSystem(**kw)


def resolve(uri: str | Path, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """Turn a local path or URI into ``(filesystem, path inside it)``; local paths become absolute.

    Args:
        uri: a local path, ``file://`` URI, ``s3://bucket/key`` or another URI pyarrow knows.
        cfg: S3 settings (``None``: the AWS environment variables).

    Returns:
        The filesystem and the path inside it (``bucket/key`` for S3, without a trailing ``/``).

    Raises:
        ConfigError: an ``s3://`` URI without a bucket.
    """
    uri = str(uri)
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ConfigError(f"{uri!r} has no bucket; expected s3://BUCKET/PATH")
        return s3_filesystem(cfg), (parsed.netloc + parsed.path).rstrip("/")
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' (filesystem paths inside pyarrow filesystems are always '/'-separated)."""
    return posixpath.join(base, *parts)


def _cause(exc: BaseException) -> str:
    """An exception's message on one line (pyarrow and the AWS SDK write several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
    """Turn a pyarrow or OS error raised inside the block into a one-line :class:`StorageError`.

    Project errors pass through unchanged.

    Args:
        what: what is being read, for the message (e.g. ``"input /data/in.parquet"``).

    Raises:
        StorageError: ``cannot read WHAT: CAUSE``.
    """
    try:
        yield
    except InstdiffError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"cannot read {what}: {_cause(exc)}") from None


def file_info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    """``fs.get_file_info(path)``, with a store that cannot be reached reported as one line.

    Raises:
        StorageError: the filesystem could not be asked (unreachable endpoint, refused credentials, no
            permission); the message names the path and the cause (which names the endpoint).
    """
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"cannot access {display(fs, path)}: {_cause(exc)}") from None


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether ``path`` (a file or a folder) exists in ``fs`` (:func:`file_info`'s errors)."""
    return file_info(fs, path).type != pafs.FileType.NotFound


def is_dir(fs: pafs.FileSystem, path: str) -> bool:
    """Whether ``path`` is a folder in ``fs`` (:func:`file_info`'s errors)."""
    return file_info(fs, path).type == pafs.FileType.Directory


def check_output(uri: str, what: str, folder: bool = False, storage_cfg: StorageConfig | None = None) -> None:
    """Refuse a local output path that cannot be written, before any work is done.

    Remote outputs (``s3://``, ...) are not checked: object stores have no folders that could be in the way.

    Args:
        uri: the output path or URI.
        what: the flag or key that named it, for the message (``"--out"``, ``"output"``).
        folder: the output is a folder (else a file).
        storage_cfg: S3 settings (``None``: the AWS environment variables).

    Raises:
        StorageError: a file where a folder is wanted or the reverse, or a file in the way of the folders
            to create.
    """
    fs, path = resolve(uri, storage_cfg)
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    target = Path(path)
    if target.is_dir() and not folder:
        raise StorageError(f"{what} {path} is a folder; expected a file")
    if target.exists() and not target.is_dir() and folder:
        raise StorageError(f"{what} {path} is a file; expected a folder")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise StorageError(f"{what} {path}: {parent} is a file, so no folder can be made there")


def _hidden(rel: str) -> bool:
    """pyarrow's and Spark's convention: path parts starting with '_' or '.' are not data."""
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def list_files(fs: pafs.FileSystem, path: str, suffix: str = ".parquet") -> list[str]:
    """Data files under ``path`` (a file or a folder, recursively), sorted; hidden parts ('_x', '.x') skipped.

    A missing ``path`` gives an empty list.

    Raises:
        StorageError: the filesystem could not be asked (see :func:`file_info`).
    """
    info = file_info(fs, path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [path]
    try:
        items = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise StorageError(f"cannot list {display(fs, path)}: {_cause(exc)}") from None
    out = []
    for item in items:
        if item.type != pafs.FileType.File or not item.path.endswith(suffix):
            continue
        rel = item.path[len(path.rstrip("/")) + 1 :]
        if not _hidden(rel):
            out.append(item.path)
    return sorted(out)


def readable_parquet(fs: pafs.FileSystem, files: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split ``files`` into Parquet files whose footer reads and the others (e.g. truncated by a killed writer).

    Args:
        fs: the filesystem.
        files: Parquet file paths inside ``fs``.

    Returns:
        ``(readable, unreadable)``: the readable paths in order, and path → reason (one line) for the rest.
    """
    import pyarrow.parquet as pq

    readable, unreadable = [], {}
    for f in files:
        try:
            pq.read_metadata(f, filesystem=fs)
        except (pa.ArrowException, OSError) as exc:
            unreadable[f] = _cause(exc)
        else:
            readable.append(f)
    return readable, unreadable


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole content of the file ``path`` in ``fs``."""
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file (creating parent folders on local filesystems)."""
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_table(
    table: pa.Table,
    out: str,
    storage_cfg: StorageConfig | None = None,
    row_group_size: int | None = None,
    compression: str = "zstd",
) -> str:
    """Write ``table`` as one Parquet file, local or ``s3://`` (the project's one single-file table writer).

    Args:
        table: any Arrow table.
        out: a path or URI ending in ``.parquet``; parent folders are created on local disk.
        storage_cfg: S3 settings (``None``: the AWS environment variables).
        row_group_size: rows per row group (``None``: pyarrow's default).
        compression: a Parquet codec (``zstd``, ``snappy``, ``gzip``, ``none``, …).

    Returns:
        Where it went, as shown to users (``s3://bucket/key`` or the local path).

    Raises:
        UsageError: ``out`` does not end in ``.parquet``.
        StorageError: ``out`` is a folder, or a file is in the way of its parent folders (:func:`check_output`).
    """
    import pyarrow.parquet as pq

    if not out.endswith(".parquet"):
        raise UsageError(f"the output must be a .parquet file; got {out!r}")
    check_output(out, "output", storage_cfg=storage_cfg)
    fs, path = resolve(out, storage_cfg)
    parent = posixpath.dirname(path)
    if parent and isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
    pq.write_table(table, path, filesystem=fs, row_group_size=row_group_size, compression=compression)
    return display(fs, path)


def temporary_name(path: str) -> str:
    """Where :func:`write_parquet_part` writes ``path`` before committing it: a hidden name in the same folder.

    The name starts with ``.`` (hidden from :func:`list_files`, pyarrow's dataset discovery and Spark) and
    carries a random suffix, so concurrent writers never share one.
    """
    import uuid

    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")


def write_parquet_part(
    fs: pafs.FileSystem,
    path: str,
    table: pa.Table,
    compression: str = "zstd",
    row_group_size: int | None = None,
) -> None:
    """Write one Parquet part so that readers see the whole file or nothing (the job's part writer).

    On a local filesystem the file is written under :func:`temporary_name` and committed by renaming it to
    ``path`` (atomic on POSIX within one filesystem); a writer killed midway leaves only a hidden temporary
    file, which readers skip. Object stores (S3, GCS) publish an object only when its upload completes, so
    there the file is written in place. Parent folders are created.

    Args:
        fs: the filesystem.
        path: the final file path inside ``fs``.
        table: the rows.
        compression: a Parquet codec.
        row_group_size: rows per row group (``None``: pyarrow's default).
    """
    import pyarrow.parquet as pq

    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        pq.write_table(table, path, filesystem=fs, row_group_size=row_group_size, compression=compression)
        return
    tmp = temporary_name(path)
    try:
        pq.write_table(table, tmp, filesystem=fs, row_group_size=row_group_size, compression=compression)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def display(fs: pafs.FileSystem, path: str) -> str:
    """A URI for messages: ``s3://bucket/key`` for S3, the plain path locally."""
    if isinstance(fs, pafs.S3FileSystem):
        return f"s3://{path}"
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name}://{path}"
