"""Resume: what an output folder already holds, whether this job may add to it, and the names runs write.

Every run writes its own ``part-<run_id>-<write_id>-<task>-<i>.parquet`` files (:mod:`pipelines.batch.sink`)
and ``_runs/<run_id>.json`` (its settings), so no earlier file is ever overwritten; a re-run skips the ids
already written and refuses to mix rows made with other settings into the same output. A data file that
cannot be read (left by a writer of an older version, or damaged later) is moved to ``_invalid/`` so that
plain Parquet readers of the folder keep working, and its ids are edited again.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from instdiff.errors import ConfigError
from pipelines import schema as S
from pipelines import storage
from pipelines.config import BatchConfig, fingerprint

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"  # run manifests and summaries, next to the data (readers skip "_"-prefixed paths)
INVALID_DIR = "_invalid"  # unreadable data files, moved aside by a resuming run


def new_run_id() -> str:
    """A fresh run id ``<YYYYmmddTHHMMSS>-<6 hex>`` (local time, then random)."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_of(path: str) -> str | None:
    """The run id in a data file name ``part-<run_id>-...parquet`` (run ids are ``<timestamp>-<hex>``)."""
    name = path.rsplit("/", 1)[-1]
    if not name.startswith("part-"):
        return None
    parts = name[len("part-") :].split("-")
    return "-".join(parts[:2]) if len(parts) >= 3 else None


@dataclass
class PriorOutput:
    """What an output folder already holds.

    Attributes:
        ok_ids: ids written with status ok.
        error_ids: ids written only as errors.
        files: readable data files.
        unreadable: data files that could not be read (their rows are redone), where they were found.
        reasons: why each unreadable file could not be read.
        moved: where :func:`set_aside` moved unreadable files (``_invalid/...``).
        fingerprints: run id → settings fingerprint, of the runs that wrote data.
    """

    ok_ids: set[str] = field(default_factory=set)
    error_ids: set[str] = field(default_factory=set)
    files: int = 0
    unreadable: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    fingerprints: dict[str, dict] = field(default_factory=dict)


def scan_output(fs: Any, path: str) -> PriorOutput:
    """Read the ids and statuses already written under ``path`` and the settings of earlier runs.

    Args:
        fs: a pyarrow filesystem.
        path: the output folder inside ``fs`` (missing: nothing written yet).

    Returns:
        What the folder holds; unreadable data files are listed in ``unreadable`` (:func:`set_aside` moves them),
        unreadable run manifests are logged and skipped.
    """
    prior = PriorOutput()
    data_runs = set()
    for f in storage.list_files(fs, path):
        data_runs.add(run_of(f))
        try:
            t = pq.read_table(f, columns=[S.ID, S.STATUS], filesystem=fs)
        except (pa.ArrowException, OSError) as exc:
            prior.unreadable.append(f)
            prior.reasons.append(" ".join(str(exc).split()))
            continue
        prior.files += 1
        ids, status = t[S.ID].to_pylist(), t[S.STATUS].to_pylist()
        for i, s in zip(ids, status, strict=True):
            (prior.ok_ids if s == S.STATUS_OK else prior.error_ids).add(i)
    prior.error_ids -= prior.ok_ids
    for f in storage.list_files(fs, storage.join(path, RUNS_DIR), suffix=".json"):
        if f.endswith(".summary.json"):
            continue
        try:
            manifest = json.loads(storage.read_bytes(fs, f))
            if manifest["run_id"] in data_runs:  # a run that failed before writing rows constrains nothing
                prior.fingerprints[manifest["run_id"]] = manifest["fingerprint"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cannot read run manifest %s (%s); ignoring it", f, exc)
    return prior


def set_aside(fs: Any, path: str, prior: PriorOutput) -> None:
    """Move every unreadable data file of ``prior`` to ``_invalid/`` under ``path``, with a warning naming it.

    Plain Parquet readers of the folder (``pyarrow.parquet.read_table``, ``instdiff report``) then work again;
    ``_``-prefixed folders are not data to them. The files' ids are not in ``prior``, so the job edits them again.

    Args:
        fs: the output filesystem.
        path: the output folder inside ``fs``.
        prior: what :func:`scan_output` found (``moved`` is filled in).
    """
    for f, reason in zip(prior.unreadable, prior.reasons, strict=True):
        where = _move_aside(fs, path, f)
        if where:
            prior.moved.append(where)
        log.warning(
            "output file %s is unreadable (%s); %s; its ids will be edited again",
            storage.display(fs, f),
            reason,
            f"moved it to {storage.display(fs, where)}" if where else "it stays where readers of the folder fail on it",
        )


def _move_aside(fs: Any, root: str, f: str) -> str | None:
    """Move data file ``f`` (under ``root``) to ``root/_invalid/<its relative path>``; ``None`` if it failed."""
    rel = f[len(root.rstrip("/")) + 1 :] if f.startswith(root.rstrip("/") + "/") else f.rsplit("/", 1)[-1]
    dest = storage.join(root, INVALID_DIR, rel)
    try:
        if storage.exists(fs, dest):
            dest = f"{dest}.{uuid.uuid4().hex[:6]}"
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        fs.move(f, dest)
    except (OSError, pa.ArrowException) as exc:
        log.warning("could not move %s to %s: %s", storage.display(fs, f), storage.display(fs, dest), exc)
        return None
    return dest


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: earlier {a!r}, now {b!r}"]


def check_resumable(prior: PriorOutput, cfg: BatchConfig, output: str) -> None:
    """Refuse to mix rows made with different settings into one output.

    Args:
        prior: what the output holds (:func:`scan_output`).
        cfg: this job's config (compared through :func:`pipelines.config.fingerprint`).
        output: the output as shown to users.

    Raises:
        ConfigError: an earlier run that wrote rows used other settings (the message lists up to five).
    """
    now = json.loads(json.dumps(fingerprint(cfg)))
    for run_id, earlier in prior.fingerprints.items():
        diffs = _diff(earlier, now)
        if diffs:
            raise ConfigError(
                f"output {output} already holds rows of run {run_id} made with other settings ("
                + "; ".join(diffs[:5])
                + "). Use another output, or the same settings to resume."
            )
