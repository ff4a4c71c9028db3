"""Rows, the bad-row policy and the table they become: what every dataset adapter shares.

An adapter turns each record of its format into a :class:`Row`, or into a ``(where, reason)`` pair when the
record is bad; :class:`Problems` collects the bad ones and applies the :class:`BadRowPolicy` at the end, and
:func:`rows_to_table` builds the table in :data:`pipelines.schema.INPUT_SCHEMA`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pyarrow as pa

from instdiff.errors import InstdiffError
from pipelines import schema

log = logging.getLogger(__name__)

SKIPPED_KEY = b"instdiff.skipped"  # schema metadata key: how many bad rows policy "skip" left out


class DatasetError(InstdiffError, ValueError):
    """A dataset that cannot be read as asked; the message counts the bad rows and names the first few (or says
    what is accepted)."""


class BadRowPolicy(StrEnum):
    """What an adapter does with bad rows (a missing or unreadable file, an empty field, a malformed line)."""

    ERROR = "error"  # raise DatasetError counting the bad rows and naming the first few
    SKIP = "skip"  # leave bad rows out, log their count and the first reasons


@dataclass
class Row:
    """One edit, before it becomes a table row.

    Attributes:
        id: the row's id, unique within the dataset.
        source_prompt: describes the input image.
        target_prompt: what the edited image should show.
        image: the input image's original encoded bytes; ``None`` when the source is to be generated.
        mask: the ground-truth edit mask as an 8-bit PNG (255 = edit), or ``None``.
        meta: the original fields of the record and notes; stored as JSON text.
        error: why the record cannot be edited (e.g. its download failed); the batch job writes such a row as
            an error row with this reason, so every record of the source is accounted for. ``None``: editable.
    """

    id: str
    source_prompt: str
    target_prompt: str
    image: bytes | None = None
    mask: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Problems:
    """Bad rows collected while reading; raised or logged at the end according to the policy.

    Args:
        source: what is being read, as shown in messages (e.g. ``"listing /data/edits.csv"``).
        policy: the bad-row policy.
    """

    def __init__(self, source: str, policy: BadRowPolicy) -> None:
        self.source = source
        self.policy = BadRowPolicy(policy)
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, reason: str) -> None:
        """Record one bad row.

        Args:
            where: its place in the source (``"line 3"``, ``"row 4"``).
            reason: what is wrong with it.
        """
        self.items.append((where, reason))

    def finish(self) -> int:
        """Apply the policy to the bad rows recorded so far.

        Returns:
            The number of bad rows (policy ``skip``; a warning lists the first reasons), 0 when there are none.

        Raises:
            DatasetError: policy ``error`` and at least one bad row; the one-line message counts them and names
                the first few.
        """
        if not self.items:
            return 0
        listing = schema.summarize_problems([f"{w}: {r}" for w, r in self.items], noun="bad row")
        if self.policy is BadRowPolicy.ERROR:
            raise DatasetError(
                f"{self.source}: {listing}; fix them, or pass on_bad_row='skip' (--on-bad-row skip) to leave them out"
            )
        log.warning("%s: skipped %s", self.source, listing)
        return len(self.items)


def problem_text(exc: BaseException) -> str:
    """The reason of a bad row from what went wrong reading it: the project's and I/O errors speak for
    themselves, anything else (a library's own error on a hostile file) is prefixed by its type."""
    if isinstance(exc, InstdiffError | ValueError | OSError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def collect(results: Sequence[Row | tuple[str, str]], problems: Problems) -> list[Row]:
    """Keep the rows of ``results`` and record every ``(where, reason)`` pair in ``problems``.

    Args:
        results: per-record outcomes, in order.
        problems: where the bad records go.

    Returns:
        The good rows, in order.
    """
    rows = []
    for r in results:
        if isinstance(r, Row):
            rows.append(r)
        else:
            problems.add(*r)
    return rows


def rows_to_table(rows: Sequence[Row], dataset: str, skipped: int = 0) -> pa.Table:
    """Rows as a table in :data:`pipelines.schema.INPUT_SCHEMA`.

    Args:
        rows: the good rows; ids must be unique.
        dataset: the value of the ``dataset`` column (and the name used in messages).
        skipped: how many bad rows were left out; stored in the schema metadata under :data:`SKIPPED_KEY`.

    Returns:
        The table; ``meta`` is each row's ``meta`` as JSON text (keys sorted).

    Raises:
        DatasetError: two rows share an id.
    """
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
            schema.ERROR: [r.error for r in rows],
        },
        schema=schema.INPUT_SCHEMA,
    )
    schema.validate_input_schema(table.schema, dataset)
    return table.replace_schema_metadata({SKIPPED_KEY: str(skipped).encode()})


def skipped_rows(table: pa.Table) -> int:
    """How many bad rows the adapter that built ``table`` left out (policy ``skip``).

    Args:
        table: a table returned by an adapter (or :func:`generate_sources
            <pipelines.datasets.prompt_pairs.generate_sources>`, which keeps the schema metadata).

    Returns:
        The count stored under :data:`SKIPPED_KEY`; 0 when the table has none.
    """
    meta = table.schema.metadata or {}
    return int(meta.get(SKIPPED_KEY, b"0"))
