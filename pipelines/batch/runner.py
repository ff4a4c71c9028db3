"""The job's three stages in one process, without Ray: the benchmark's baseline, and small jobs and tests."""

from __future__ import annotations

import pyarrow as pa

from pipelines import schema as S
from pipelines.batch.decode import DecodeOptions
from pipelines.batch.edit_stage import EditStage
from pipelines.batch.finalize import finalize_batch
from pipelines.batch.inputs import carry_schema, read_stage
from pipelines.config import BatchConfig


def run_in_process(
    cfg: BatchConfig,
    table: pa.Table,
    stage: EditStage | None = None,
    run_id: str = "in-process",
    threads: int | None = None,
) -> pa.Table:
    """Decode → edit → finalize ``table`` in this process, ``cfg.actors.batch_size`` rows at a time.

    Args:
        cfg: the job config (its ``input``, ``output``, ``actors`` pool and ``ray`` sections are not used,
            except ``actors.batch_size``).
        table: input rows (:data:`pipelines.schema.INPUT_SCHEMA` columns, any accepted flavour; the columns
            named by ``cfg.carry`` are copied to the output).
        stage: an edit stage with its model already loaded (``None``: load one from ``cfg``).
        run_id: written to every row's ``run_id``.
        threads: torch CPU threads of a stage loaded here (``None``: torch's default).

    Returns:
        The output rows (:data:`pipelines.schema.OUTPUT_SCHEMA`), one per input row, in input order.
    """
    stage = stage or EditStage(cfg.model, cfg.method, cfg.image, threads=threads)
    opts = DecodeOptions.from_config(cfg)
    carry = carry_schema(table.schema, cfg.carry)
    out = []
    bs = cfg.actors.batch_size
    for start in range(0, table.num_rows, bs):
        decoded = read_stage(table.slice(start, bs), opts=opts, carry=carry)
        out.append(finalize_batch(stage(decoded), run_id=run_id))
    return pa.concat_tables(out) if out else pa.schema(list(S.OUTPUT_SCHEMA) + list(carry)).empty_table()
