"""The job's driver: plan the input, build the Ray Data pipeline, run it into the output, and summarise the run.

The pipeline (one read, three map stages, one write; rows stream through, nothing is materialised)::

    read_parquet (one read per set of files with the same columns) → read_stage (tasks: normalize + decode)
                 → EditStage (actor pool, model loaded once per actor)
                 → finalize_batch (tasks: PNG encoding, metrics) → PartSink (≤ max_rows_per_file, atomic parts)
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from instdiff.errors import ConfigError, InputNotFoundError, InstdiffError, ModelLoadError
from pipelines import schema as S
from pipelines import storage
from pipelines.batch.decode import DecodeOptions
from pipelines.batch.edit_stage import EditStage
from pipelines.batch.finalize import finalize_batch
from pipelines.batch.inputs import InputPlan, plan_input, read_stage
from pipelines.batch.progress import ProgressLine, configure_ray_console, restore_ray_console
from pipelines.batch.ray_cluster import check_resources, connect_ray
from pipelines.batch.resume import RUNS_DIR, PriorOutput, check_resumable, new_run_id, scan_output, set_aside
from pipelines.batch.stderr_filter import drop_false_restart_warning
from pipelines.config import BatchConfig, ModelConfig, fingerprint, to_dict
from pipelines.ray_connect import ClusterInfo, resolve_path, summary_fields, will_be_local

log = logging.getLogger(__name__)


@dataclass
class JobSummary:
    """What a run did; printed as one JSON line at the end and written to ``_runs/<run_id>.summary.json``.

    Attributes:
        run_id: the run.
        output: the output folder as shown to users.
        input_rows: rows in the input.
        skipped_ok: input ids skipped because the output holds them with status ok.
        skipped_error: input ids skipped because the output holds them as errors (0 with ``retry_errors``).
        written: rows this run wrote.
        ok: of them, with status ok.
        error: of them, with status error.
        seconds: wall seconds of the pipeline.
        rows_per_s: ``written / seconds``.
        files: data files this run wrote.
        top_errors: the ten most frequent error texts of this run and their counts.
        cluster: the Ray cluster the run used (kind, address, nodes, cpus, gpus; empty when nothing was edited).
    """

    run_id: str
    output: str
    input_rows: int
    skipped_ok: int
    skipped_error: int
    written: int
    ok: int
    error: int
    seconds: float
    rows_per_s: float
    files: int
    top_errors: dict[str, int]
    cluster: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain JSON-able data."""
        return asdict(self)


def build_dataset(
    cfg: BatchConfig,
    plan: InputPlan,
    in_fs: Any,
    skip: pa.Array | None,
    run_id: str,
    known_errors: pa.Array | None = None,
) -> Any:
    """The Ray Data pipeline up to (not including) the write.

    Args:
        cfg: the job config.
        plan: the input (:func:`plan_input`).
        in_fs: the input filesystem.
        skip: ids not to edit.
        run_id: written to every row.
        known_errors: ids already written as errors (not written again if they fail again).

    Returns:
        A lazy ``ray.data.Dataset`` of output rows (:data:`pipelines.schema.OUTPUT_SCHEMA`).
    """
    import ray

    skip_ref = ray.put(skip) if skip is not None and len(skip) else None
    errors_ref = ray.put(known_errors) if known_errors is not None and len(known_errors) else None
    a = cfg.actors
    task_cpus = cfg.ray.task_cpus
    # files whose columns agree are read together; read_stage brings every block to one schema
    parts = [
        ray.data.read_parquet(files, filesystem=in_fs, columns=read.names, schema=read, num_cpus=task_cpus)
        for files, read in plan.groups
    ]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(
        read_stage,
        batch_format="pyarrow",
        num_cpus=task_cpus,
        fn_kwargs={"opts": DecodeOptions.from_config(cfg), "skip_ids": skip_ref, "carry": plan.carry},
    )
    # blocks of batch_size rows, so that every actor of the pool gets work even from one big file
    ds = ds.repartition(target_num_rows_per_block=a.batch_size)
    ds = ds.map_batches(
        EditStage,
        batch_format="pyarrow",
        batch_size=a.batch_size,
        compute=ray.data.ActorPoolStrategy(size=a.pool_size),
        num_gpus=a.num_gpus,
        num_cpus=a.num_cpus,
        fn_constructor_kwargs={
            "model": cfg.model,
            "method": cfg.method,
            "image": cfg.image,
            "threads": max(1, round(a.num_cpus)) if a.num_gpus == 0 else None,
        },
    )
    return ds.map_batches(
        finalize_batch,
        batch_format="pyarrow",
        num_cpus=task_cpus,
        fn_kwargs={"run_id": run_id, "known_errors": errors_ref},
    )


def _write_json(fs: Any, path: str, data: dict) -> None:
    storage.write_bytes(fs, path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def check_steps(cfg: BatchConfig) -> None:
    """Refuse ``method.steps`` the model's scheduler cannot run, from its config alone, before anything is written.

    The same rule the editors apply (:func:`instdiff.sampling.set_steps`) on the DDIM scheduler built from the
    model folder's ``scheduler/scheduler_config.json`` (the embedded model, a local folder, the built-in tiny
    models). Hub ids and folders the driver cannot see are left to the actors (each row then reports it).

    Raises:
        ConfigError: ``method.steps`` past the scheduler's training steps.
    """
    from diffusers import DDIMScheduler

    from instdiff.errors import EditInputError
    from instdiff.model_defaults import builds_tiny, model_folder
    from instdiff.sampling import set_steps
    from instdiff.tiny import tiny_scheduler

    spec = cfg.model.spec
    if builds_tiny(spec):
        sched = tiny_scheduler()
    else:
        folder = model_folder(spec)
        if folder is None or not (folder / "scheduler" / "scheduler_config.json").is_file():
            return
        sched = DDIMScheduler.from_config(DDIMScheduler.load_config(str(folder), subfolder="scheduler"))
    try:
        set_steps(sched, cfg.method.steps)
    except EditInputError as exc:
        raise ConfigError(f"method.{exc}") from None


def check_model(model: ModelConfig, local: bool) -> None:
    """Check on the driver, before Ray starts, what can be checked of the model without loading it.

    The device and dtype names go through the loader's own :func:`instdiff.bundle.pick_device` and
    :func:`~instdiff.bundle.pick_dtype`; a spec that ``instdiff.models`` reads as a local path must exist. On a
    remote cluster (``local`` false) the workers may have a device or a folder the driver lacks, so only the
    names are checked there.

    Args:
        model: the job's model section.
        local: the actors run on this machine.

    Raises:
        ConfigError: a device or dtype name the loader does not accept.
        ModelLoadError: on a local cluster, a device that is not available or a local model folder that does
            not exist.
    """
    import torch

    from instdiff.bundle import parse_device, pick_device, pick_dtype
    from instdiff.models import looks_local

    try:
        pick_dtype(model.dtype, torch.device("cpu"))  # the name; "auto" resolves per device in the actor
    except InstdiffError as exc:
        raise type(exc)(f"model.dtype: {exc}") from None
    try:
        if model.device != "auto":
            parse_device(model.device)  # the name, wherever the actors run
        if local:
            pick_device(model.device)  # and this machine has it
        elif model.device != "auto":
            log.info("model.device %r is checked by the workers (remote cluster)", model.device)
    except InstdiffError as exc:
        raise type(exc)(f"model.device: {exc}") from None
    for key, spec in (("model.spec", model.spec), ("model.inpaint", model.inpaint)):
        if local and spec and looks_local(spec) and not Path(spec).expanduser().exists():
            raise ModelLoadError(
                f"{key}: model path {spec!r} does not exist; give a diffusers folder, a hub id, 'tiny' or 'default'"
            )


def _actor_cause(exc: Exception) -> str:
    """The last exception line of a remote traceback in a Ray error (``ModelLoadError: model path ...``)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = text.splitlines()
    for k in range(len(lines) - 1, -1, -1):
        if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*:", lines[k]):
            cause = " ".join(" ".join(lines[k:]).split())
            return re.sub(r"^(\w+\.)+", "", cause)  # instdiff.errors.ModelLoadError → ModelLoadError
    return " ".join(text.split())


def run_job(cfg: BatchConfig, run_id: str | None = None, address: str | None = None) -> JobSummary:
    """Run one bulk-edit job (resuming into ``cfg.output``) and return its summary.

    Everything that can be checked without Ray is checked first (the paths, the model's device, dtype and
    local folder, the input, what the output holds); the run's manifest ``_runs/<run_id>.json`` is written
    only after those checks and the cluster's resource check pass. Relative input and output paths are
    resolved against the directory the command was started from, and refused in a job started by ``ray job
    submit`` (:func:`pipelines.ray_connect.resolve_path`). Unreadable data files in the output are moved to
    ``_invalid/`` and their ids edited again.

    Args:
        cfg: the job config.
        run_id: the run's id (``None``: :func:`~pipelines.batch.resume.new_run_id`).
        address: the Ray cluster to join (``--address``; ``None``: ``RAY_ADDRESS``, else a private local
            cluster; :mod:`pipelines.ray_connect`).

    Returns:
        What the run did, read back from its files.

    Raises:
        InputNotFoundError: no input files, or files with no rows.
        StorageError: the output is a file (or below one), or the input or output cannot be read.
        SchemaError: the input schema or ids are not accepted.
        ConfigError: a device or dtype name that is not accepted; the output holds rows made with other
            settings, or data while ``resume`` is false; on a local cluster, a pool that cannot run.
        UsageError: a relative input or output path in a job started by ``ray job submit``.
        RayConnectError: the cluster named by ``address`` / ``RAY_ADDRESS`` cannot be joined.
        ModelLoadError: the editing actors cannot load the model (on a local cluster, a missing model folder
            or an unavailable device is found before Ray starts).
    """
    # Every module the driver needs is imported before Ray starts workers: under `ray job submit --working-dir`,
    # Ray may delete and re-extract the job's working directory (the driver's own code) when it sets up the
    # runtime environment of the job's first workers on the head node (Ray 2.60, working_dir overwrite=True);
    # an import at that moment fails with ModuleNotFoundError.
    from pipelines.batch.sink import PartSink

    run_id = run_id or new_run_id()
    cfg = cfg.with_(input=resolve_path(cfg.input, "input"), output=resolve_path(cfg.output, "output"))
    local = will_be_local(address)
    in_fs, in_path = storage.resolve(cfg.input, cfg.storage)
    out_fs, out_path = storage.resolve(cfg.output, cfg.storage)
    out_display = storage.display(out_fs, out_path)
    # 1. up-front checks: the output path and the model
    storage.check_output(cfg.output, "output", folder=True, storage_cfg=cfg.storage)
    check_model(cfg.model, local)
    check_steps(cfg)
    # 2. the input: schema, ids
    plan = plan_input(in_fs, in_path, storage.display(in_fs, in_path), carry=cfg.carry)
    if plan.rows == 0:
        raise InputNotFoundError(
            f"input {storage.display(in_fs, in_path)} holds no rows (its files are there, with 0 rows); nothing to "
            "edit — check the input path or the import that wrote it"
        )
    # 3. resume: what the output already holds, under which settings
    if cfg.resume:
        prior = scan_output(out_fs, out_path)
        check_resumable(prior, cfg, out_display)
        set_aside(out_fs, out_path, prior)
    elif storage.list_files(out_fs, out_path):
        raise ConfigError(f"resume: false but output {out_display} already holds data; use an empty output")
    else:
        prior = PriorOutput()
    done = set(prior.ok_ids) | (set() if cfg.retry_errors else prior.error_ids)
    input_ids = set(plan.ids.to_pylist())
    skip_ok = len(input_ids & prior.ok_ids)
    skip_err = len(input_ids & prior.error_ids) if not cfg.retry_errors else 0
    todo = plan.rows - skip_ok - skip_err
    log.info(
        "input %s: %d rows; output %s holds %d ok and %d error rows of them; %d to edit",
        cfg.input,
        plan.rows,
        out_display,
        skip_ok,
        len(input_ids & prior.error_ids),
        todo,
    )
    t0 = time.perf_counter()
    cluster: ClusterInfo | None = None
    if todo > 0:
        # 4. the pipeline: read → decode → edit (actors) → encode + metrics → write
        cluster = connect_ray(cfg, address)
        check_resources(cfg, local=cluster.local or (cluster.kind == "existing" and local))
        log.info("output: %s (run %s)", out_display, run_id)
        log.info(
            "method %s, preset %s: the resolved settings are recorded in _runs/%s.json",
            cfg.method.method.value,
            cfg.preset.value,
            run_id,
        )
        _write_manifest(out_fs, out_path, run_id, cfg)
        skip = pa.array(sorted(done & input_ids), type=pa.string()) if done else None
        retried = sorted(prior.error_ids & input_ids) if cfg.retry_errors else []
        sink = PartSink(out_fs, out_path, run_id, cfg.write.max_rows_per_file, cfg.write.compression)
        _execute(cfg, plan, in_fs, sink, skip, run_id, pa.array(retried, type=pa.string()), todo)
    else:
        _write_manifest(out_fs, out_path, run_id, cfg)
    seconds = time.perf_counter() - t0
    # 5. summary, read back from this run's files
    summary = summarize_run(out_fs, out_path, run_id, plan.rows, skip_ok, skip_err, seconds)
    summary.cluster = summary_fields(cluster)
    _write_json(out_fs, storage.join(out_path, RUNS_DIR, f"{run_id}.summary.json"), summary.to_dict())
    log.info(
        "run %s: %d ok, %d error, %d skipped; %.2f rows/s over %.1f s; output: %s",
        run_id,
        summary.ok,
        summary.error,
        skip_ok + skip_err,
        summary.rows_per_s,
        seconds,
        out_display,
    )
    return summary


def _write_manifest(fs: Any, out_path: str, run_id: str, cfg: BatchConfig) -> None:
    """``_runs/<run_id>.json``: the run's settings (what a later run must match to resume)."""
    _write_json(
        fs,
        storage.join(out_path, RUNS_DIR, f"{run_id}.json"),
        {
            "run_id": run_id,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "input": cfg.input,
            "fingerprint": fingerprint(cfg),
            "config": to_dict(cfg),
        },
    )


def _execute(
    cfg: BatchConfig,
    plan: InputPlan,
    in_fs: Any,
    sink: Any,
    skip: pa.Array | None,
    run_id: str,
    retried: pa.Array,
    todo: int,
) -> None:
    """Build the pipeline and write it into the output; an actor that cannot start becomes one error line.

    The console: Ray Data's progress bars on a terminal only, one instdiff progress line per interval
    (:mod:`pipelines.batch.progress`), and Ray core's false "actor restart will fail" line for the edit pool
    dropped (:mod:`pipelines.batch.stderr_filter`). Ray Data's per-operator stats go to
    ``_runs/<run_id>.stats.txt``.

    Raises:
        ModelLoadError: an editing actor died in its constructor (the model could not be loaded); the message
            carries the actor's own error. The run's manifest is removed when the run wrote no rows.
    """
    import ray

    out_fs, out_path = sink.fs, sink.path
    ctx = ray.data.DataContext.get_current()
    console = configure_ray_console(cfg.ray.progress_bars)
    previous_v2 = getattr(ctx, "use_datasource_v2", None)
    if previous_v2 is not None:
        ctx.use_datasource_v2 = cfg.ray.datasource_v2
    try:
        ds = build_dataset(cfg, plan, in_fs, skip, run_id, retried)
        with ProgressLine(out_fs, out_path, run_id, todo), drop_false_restart_warning():
            ds.write_datasink(sink)
        stats = _data_stats(ds)
        if stats:
            storage.write_bytes(out_fs, storage.join(out_path, RUNS_DIR, f"{run_id}.stats.txt"), stats.encode())
    except ray.exceptions.ActorDiedError as exc:
        if not exc.actor_init_failed:
            raise
        if not _run_files(out_fs, out_path, run_id):  # a run that wrote nothing leaves nothing behind
            with contextlib.suppress(OSError):
                out_fs.delete_file(storage.join(out_path, RUNS_DIR, f"{run_id}.json"))
        raise ModelLoadError(
            f"the editing actors could not load model {cfg.model.spec!r} (device {cfg.model.device!r}): "
            f"{_actor_cause(exc)}"
        ) from None
    finally:
        restore_ray_console(console)
        if previous_v2 is not None:
            ctx.use_datasource_v2 = previous_v2


def _data_stats(ds: Any) -> str:
    """Ray Data's per-operator stats of the write that just ran ("" when Ray does not expose them).

    ``Dataset.write_datasink`` keeps the executed write plan as ``_write_ds`` (Ray 2.60); its ``stats()`` is the
    public per-operator summary (tasks, wall and CPU time, rows, bytes, nodes used).
    """
    written = getattr(ds, "_write_ds", None)
    try:
        return str(written.stats()) if written is not None else ""
    except Exception as exc:  # noqa: BLE001 - stats are a by-product; the run's rows are already committed
        log.debug("no Ray Data stats: %s", exc)
        return ""


def summarize_run(
    fs: Any,
    path: str,
    run_id: str,
    input_rows: int,
    skipped_ok: int,
    skipped_error: int,
    seconds: float,
) -> JobSummary:
    """The summary of run ``run_id``, counted from the data files it wrote under ``path``.

    Args:
        fs: the output filesystem.
        path: the output folder inside ``fs``.
        run_id: the run.
        input_rows: rows in the input.
        skipped_ok: input ids skipped as already ok.
        skipped_error: input ids skipped as already errors.
        seconds: wall seconds of the pipeline.

    Returns:
        The run's summary.
    """
    files = _run_files(fs, path, run_id)
    if files:
        t = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=[S.STATUS, S.ERROR])
        status = t[S.STATUS].to_pylist()
        errors = collections.Counter(e for s, e in zip(status, t[S.ERROR].to_pylist(), strict=True) if s != S.STATUS_OK)
    else:
        status, errors = [], collections.Counter()
    ok = sum(1 for s in status if s == S.STATUS_OK)
    return JobSummary(
        run_id=run_id,
        output=storage.display(fs, path),
        input_rows=input_rows,
        skipped_ok=skipped_ok,
        skipped_error=skipped_error,
        written=len(status),
        ok=ok,
        error=len(status) - ok,
        seconds=round(seconds, 3),
        rows_per_s=round(len(status) / seconds, 3) if seconds > 0 and status else 0.0,
        files=len(files),
        top_errors=dict(errors.most_common(10)),
    )


def _run_files(fs: Any, path: str, run_id: str) -> list[str]:
    """The data files run ``run_id`` wrote under ``path``."""
    prefix = f"part-{run_id}-"
    return [f for f in storage.list_files(fs, path) if f.rsplit("/", 1)[-1].startswith(prefix)]
