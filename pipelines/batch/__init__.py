"""Bulk edits on Ray Data: Parquet (local or s3://) in, edited images + masks + metrics out.

Run it::

    instdiff batch --config configs/batch/demo.yaml [--input PATH] [--output PATH] [--set method.steps=20]
    python -m pipelines.batch --config configs/batch/demo.yaml          # the same thing

With ``--address`` or ``RAY_ADDRESS`` the job joins that cluster (under ``ray job submit``: the job's cluster),
otherwise it starts a private local one (:mod:`pipelines.ray_connect`), so the same command runs under Ray's
job API (input and output absolute or ``s3://`` there)::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.batch --config configs/batch/gpu-s3.yaml

The pipeline (one read, three map stages, one write; rows stream through, nothing is materialised)::

    read_parquet → read_stage (tasks: normalize types, decode) → EditStage (actor pool, model loaded once per actor)
                 → finalize_batch (tasks: PNG encoding, metrics) → PartSink (≤ max_rows_per_file, parts committed whole)

Modules, by responsibility: :mod:`~pipelines.batch.rows` (the rows between stages, per-row seed and error
text, carried columns), :mod:`~pipelines.batch.inputs` (many input files planned as one table, the read stage
that normalizes each block), :mod:`~pipelines.batch.decode`, :mod:`~pipelines.batch.edit_stage` and
:mod:`~pipelines.batch.finalize` (the three stages), :mod:`~pipelines.batch.runner` (the stages in one process,
without Ray), :mod:`~pipelines.batch.resume` (what an output already holds; unreadable parts set aside),
:mod:`~pipelines.batch.sink` (the Parquet parts, each committed by rename), :mod:`~pipelines.batch.progress`
(the console: one progress line, Ray Data's bars on a terminal only), :mod:`~pipelines.batch.ray_cluster`
(connecting to Ray, resource checks), :mod:`~pipelines.batch.driver` (input plan, dataset, :func:`run_job`,
run summary) and :mod:`~pipelines.batch.cli` (the command line). Only the edit stage loads torch models and
diffusers, inside its methods: the decode and finalize workers, which import this package, never do.

Every row comes out: a row that cannot be edited is written with ``status = "error"`` and the reason, its
batch-mates are unaffected; when a whole editor call fails (e.g. out of memory) its rows are retried one by
one first.

Resume: re-running with the same output skips the ids already written with status ok and, by default,
those already written as errors too, so no id is ever written twice; earlier files are never deleted or
overwritten (each run writes new ``part-<run_id>-*.parquet`` files). With ``retry_errors: true`` the error
ids are edited again: one that fails again is not rewritten, one that now succeeds gets an ok row next to
its earlier error row (readers keep the ok row: ``pipelines.report.latest_rows``). A resumed run must use
the settings of the earlier runs (model, method and its parameters, seed, image handling); the job refuses
otherwise. Each run leaves ``_runs/<run_id>.json`` (its settings) and ``_runs/<run_id>.summary.json`` next
to the data; Parquet readers skip ``_``-prefixed paths.
"""

from pipelines.batch.cli import config_from_args, main, register, run
from pipelines.batch.decode import GENERATING_METHODS, DecodeOptions, decode_batch, decode_row
from pipelines.batch.driver import JobSummary, build_dataset, run_job, summarize_run
from pipelines.batch.edit_stage import EditStage
from pipelines.batch.finalize import finalize_batch, finalize_row
from pipelines.batch.inputs import InputPlan, normalize_batch, plan_input, read_stage
from pipelines.batch.ray_cluster import check_resources, connect_ray
from pipelines.batch.resume import RUNS_DIR, PriorOutput, check_resumable, new_run_id, scan_output
from pipelines.batch.rows import DECODED_SCHEMA, EDITED_SCHEMA, RowError, row_seed
from pipelines.batch.runner import run_in_process

__all__ = [
    "DECODED_SCHEMA",
    "EDITED_SCHEMA",
    "GENERATING_METHODS",
    "RUNS_DIR",
    "DecodeOptions",
    "EditStage",
    "InputPlan",
    "JobSummary",
    "PriorOutput",
    "RowError",
    "build_dataset",
    "check_resources",
    "check_resumable",
    "config_from_args",
    "connect_ray",
    "decode_batch",
    "decode_row",
    "finalize_batch",
    "finalize_row",
    "main",
    "new_run_id",
    "normalize_batch",
    "plan_input",
    "read_stage",
    "register",
    "row_seed",
    "run",
    "run_in_process",
    "run_job",
    "scan_output",
    "summarize_run",
]
