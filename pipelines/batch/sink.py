"""The job's Ray Data sink: each write task commits whole Parquet parts, named after the run, never half a file.

Ray Data's own ``write_parquet`` writes straight to the final name, so a writer killed midway (a lost node, an
out-of-memory kill) leaves a truncated part that breaks every reader of the folder. :class:`PartSink` writes
each part through :func:`pipelines.storage.write_parquet_part` (temporary hidden name, then rename).

File names are ``part-<run_id>-<write_id>-<task>-<i>.parquet``: the run id (resume and the run summary find a
run's files by it), an id of this write, the Ray Data task index and the part within the task. A task that Ray
retries after a failure writes the same names again, so a retry replaces its own parts and never adds rows.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import BlockAccessor

from pipelines import storage

log = logging.getLogger(__name__)


def part_name(run_id: str, write_id: str, task: int, index: int) -> str:
    """``part-<run_id>-<write_id>-<task:06d>-<index:03d>.parquet``."""
    return f"part-{run_id}-{write_id}-{task:06d}-{index:03d}.parquet"


class PartSink(Datasink):
    """Writes a run's rows as Parquet parts of at most ``max_rows_per_file`` rows, each committed atomically.

    Source: Ray Data's ``Datasink`` extension point (``write`` runs in the write tasks, once per task).

    Args:
        fs: the output filesystem (pyarrow; travels to the write tasks).
        path: the output folder inside ``fs``.
        run_id: the run (first part of every file name).
        max_rows_per_file: rows per part.
        compression: a Parquet codec.
    """

    def __init__(self, fs: Any, path: str, run_id: str, max_rows_per_file: int, compression: str) -> None:
        self.fs = fs
        self.path = path
        self.run_id = run_id
        self.write_id = uuid.uuid4().hex[:8]
        self.max_rows_per_file = max(1, int(max_rows_per_file))
        self.compression = compression

    def on_write_start(self, schema: Any = None) -> None:
        """Create the output folder (before any task writes)."""
        self.fs.create_dir(self.path, recursive=True)

    def write(self, blocks: Iterable[Any], ctx: Any) -> int:
        """Write this task's rows as parts; returns the number of rows written.

        Args:
            blocks: the task's blocks of output rows (:data:`pipelines.schema.OUTPUT_SCHEMA`).
            ctx: Ray Data's task context (its ``task_idx`` names the parts).
        """
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        n = self.max_rows_per_file
        for i, start in enumerate(range(0, table.num_rows, n)):
            name = part_name(self.run_id, self.write_id, int(ctx.task_idx), i)
            storage.write_parquet_part(
                self.fs, storage.join(self.path, name), table.slice(start, n), compression=self.compression
            )
        return table.num_rows

    def get_name(self) -> str:
        """The sink's name in Ray Data's plan and stats."""
        return "InstdiffParts"
