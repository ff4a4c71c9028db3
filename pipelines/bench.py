"""``instdiff bench --config configs/bench/NAME.yaml``: editing methods side by side, like InstDiffEdit's Table 1.

Every *run* (a method with its settings) edits the same input rows through the bulk job
(:func:`pipelines.batch.run_job`, Ray Data; or :func:`pipelines.batch.run_in_process` with ``engine:
in-process``), into its own output folder ``OUTPUT/<run>/`` — so an interrupted benchmark resumes where it
stopped. Then the outputs are aggregated into, under the ``results`` prefix (e.g. ``docs/results/table1-shapes``):

* ``PREFIX.md`` — a Markdown table shaped like the paper's Table 1 (time per image, UNet calls, IoU, C_m,
  C_non, C_m/C_non, LPIPS, FID, CSFID, text score, CLIPScore), one table per sweep shaped like Table 2
  (e.g. r × φ), the command that made them, the model, the machine and what every column means;
* ``PREFIX.json`` — the same numbers (``pipelines.runinfo.write_report``: machine, commit, time);
* ``PREFIX-iou-vs-time.png``, ``PREFIX-cm-vs-cnon.png``, ``PREFIX-lpips-vs-text.png`` — trade-off plots
  (Figure 5); sweeps are drawn as lines;
* ``PREFIX-contact.png`` — input, ground-truth mask, then predicted mask and edit for each shown run.

Config (YAML; every key but ``runs``/``sweeps`` optional)::

    name: table1-shapes
    output: out/bench/table1-shapes          # run outputs (local or s3://)
    results: docs/results/table1-shapes      # prefix of the table, JSON, plots and contact sheet
    engine: ray                              # ray (the bulk job) | in-process (same stages, no Ray)
    data: {make: shapes, n: 100, seed: 0, size: 64}
          # or {input: PARQUET, limit: N} or {format: editing-mask|flexit|prompt-pairs|listing, src: PATH,
          #     options: {...adapter keyword arguments}, generate: true}
    base:                                    # batch-job keys shared by every run (pipelines.config)
      model: {spec: default}
      method: {steps: 50, guidance: 7.5}
      actors: {batch_size: 10, num_cpus: 2}
    runs:                                    # each: a label plus batch-job keys on top of base
      - {label: SDEdit, method: {name: sdedit}}
      - {label: InstDiffEdit, method: {name: instdiffedit}}
    sweeps:                                  # each expands to the cartesian product of its grid
      - name: r-phi
        label: "InstDiffEdit r={method.strength} φ={method.mask.phi}"
        settings: {method: {name: instdiffedit}}
        grid: {method.strength: [0.4, 0.5, 0.6], method.mask.phi: [0.1, 0.2, 0.3]}
    metrics: {lpips: true, fid: true, class_key: target_phrase, ref_class_key: source_phrase,
              text_score: auto, clip_model: null}
    sheet: {rows: 8, runs: null}             # run labels shown in the contact sheet (default: the plain runs)

Metrics that need a model this machine lacks are reported as ``n/a`` with the reason (CLIPScore without
``metrics.clip_model``; the shapes text score on rows that are not shapes-world rows).
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import json
import logging
import math
import os
import re
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from instdiff.errors import InputNotFoundError
from pipelines import schema as S
from pipelines import storage
from pipelines.config import BatchConfig, ConfigError, apply_override, parse_assignment, parse_config, to_dict

log = logging.getLogger("instdiff.bench")

ENGINES = ("ray", "in-process")
TEXT_SCORES = ("auto", "shapes", "clip", "none")
DATA_FORMATS = ("editing-mask", "flexit", "prompt-pairs", "listing")
SHORT_NAMES = {"method.strength": "r", "method.mask.phi": "φ", "method.n_noises": "n", "method.steps": "steps",
               "method.guidance": "guidance", "method.name": "method", "method.diffedit_threshold": "DiffEdit thr"}
NO_CLIP = "n/a: no CLIP model given (metrics.clip_model)"


# ---- config -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """Where the benchmark's rows come from (exactly one of ``make``, ``input``, ``format``)."""

    make: str | None = None  # "shapes": pipelines.make_dataset.shapes_table(n, seed, size)
    n: int = 100
    seed: int = 0
    size: int = 64
    input: str | None = None  # a Parquet file/folder in the input schema (local or s3://)
    format: str | None = None  # a public format read by pipelines.datasets
    src: str | None = None  # its root folder or file
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the adapter
    generate: bool = False  # fill null images with generated sources (pipelines.datasets.generate_sources)
    limit: int | None = None  # keep the first N rows


@dataclass(frozen=True)
class RunSpec:
    """One method with its settings; ``settings`` are batch-job keys applied on top of the base."""

    label: str
    settings: dict[str, Any]
    sweep: str | None = None  # name of the sweep it came from
    params: dict[str, Any] = field(default_factory=dict)  # the sweep's grid values (dotted key → value)

    @property
    def slug(self) -> str:
        return slugify(self.label)


@dataclass(frozen=True)
class MetricSpec:
    lpips: bool = True  # LPIPS(input, edited), AlexNet
    fid: bool = True  # FID(edited, inputs) and CSFID over classes from meta
    class_key: str = "target_class"  # meta key: class of an edited image (CSFID)
    ref_class_key: str = "source_class"  # meta key: class of an input image (CSFID reference set)
    text_score: str = "auto"  # auto | shapes | clip | none
    clip_model: str | None = None  # a CLIP checkpoint (folder or hub id) for CLIPScore


@dataclass(frozen=True)
class SheetSpec:
    rows: int = 8
    runs: tuple[str, ...] | None = None


@dataclass(frozen=True)
class BenchConfig:
    name: str
    output: str
    results: str
    data: DataSpec
    base: dict[str, Any]
    runs: tuple[RunSpec, ...]
    engine: str = "ray"
    metrics: MetricSpec = field(default_factory=MetricSpec)
    sheet: SheetSpec = field(default_factory=SheetSpec)
    notes: tuple[str, ...] = ()  # printed under "Notes" in the Markdown (e.g. where settings differ from the paper)


_TOP_KEYS = ("name", "output", "results", "engine", "data", "base", "runs", "sweeps", "metrics", "sheet", "notes")


def slugify(text: str) -> str:
    """A file-name-safe form of a label: ``"InstDiffEdit r=0.4 φ=0.1"`` → ``"instdiffedit-r-0.4-phi-0.1"``."""
    text = text.replace("φ", "phi").replace("γ", "gamma").lower()
    return re.sub(r"[^a-z0-9.]+", "-", text).strip("-") or "run"


def _section(cls: type, data: Any, key: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key}: expected a mapping; got {data!r}")
    names = [f for f in cls.__dataclass_fields__]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key; accepted keys in {key}: {', '.join(names)}")
    return cls(**dict(data))


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base`` (nested mappings merged; ``method: NAME`` sets ``method.name``)."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if key == "method" and isinstance(value, str):
            value = {"name": value}
        current = out.get(key)
        if key == "method" and isinstance(current, str):
            current = {"name": current}
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            out[key] = deep_merge(current, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _expand_sweep(sweep: Any, k: int) -> list[RunSpec]:
    where = f"sweeps[{k}]"
    if not isinstance(sweep, Mapping):
        raise ConfigError(f"{where}: expected a mapping with name, label, settings, grid")
    unknown = [key for key in sweep if key not in ("name", "label", "settings", "grid")]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; accepted: name, label, settings, grid")
    grid = sweep.get("grid")
    if not isinstance(grid, Mapping) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{where}.grid: expected a mapping of dotted keys to non-empty lists, e.g. "
                          "{method.strength: [0.4, 0.5, 0.6]}")
    name = str(sweep.get("name") or f"sweep{k}")
    label = str(sweep.get("label") or name + " " + " ".join(f"{key}={{{key}}}" for key in grid))
    settings = sweep.get("settings") or {}
    runs = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid.keys(), values, strict=True))
        run_settings = copy.deepcopy(dict(settings))
        text = label
        for key, value in params.items():
            apply_override(run_settings, key, value)
            text = text.replace("{" + key + "}", str(value))
        runs.append(RunSpec(text, run_settings, sweep=name, params=params))
    return runs


def parse_bench_config(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> BenchConfig:
    """A parsed YAML mapping → :class:`BenchConfig`; every run's batch config is validated here, up front."""
    if not isinstance(data, Mapping):
        raise ConfigError("a bench config must be a mapping of keys")
    data = copy.deepcopy(dict(data))
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key; accepted keys: {', '.join(_TOP_KEYS)}")
    name = str(data.get("name") or "bench")
    engine = data.get("engine", "ray")
    if engine not in ENGINES:
        raise ConfigError(f"engine: {engine!r} is not accepted; accepted: {', '.join(ENGINES)}")
    data_spec = _section(DataSpec, data.get("data"), "data")
    sources = [k for k in ("make", "input", "format") if getattr(data_spec, k)]
    if len(sources) != 1:
        raise ConfigError("data: give exactly one of make (shapes), input (a Parquet path) or format + src")
    if data_spec.make not in (None, "shapes"):
        raise ConfigError(f"data.make: {data_spec.make!r} is not accepted; accepted: shapes")
    if data_spec.format is not None and (data_spec.format not in DATA_FORMATS or not data_spec.src):
        raise ConfigError(f"data.format: needs one of {', '.join(DATA_FORMATS)} and data.src")
    metrics = _section(MetricSpec, data.get("metrics"), "metrics")
    if metrics.text_score not in TEXT_SCORES:
        raise ConfigError(f"metrics.text_score: {metrics.text_score!r}; accepted: {', '.join(TEXT_SCORES)}")
    sheet_data = dict(data.get("sheet") or {})
    if sheet_data.get("runs") is not None:
        sheet_data["runs"] = tuple(str(r) for r in sheet_data["runs"])
    sheet = _section(SheetSpec, sheet_data, "sheet")
    base = data.get("base") or {}
    if not isinstance(base, Mapping) or "input" in base or "output" in base:
        raise ConfigError("base: expected a mapping of batch-job keys without input/output (the bench sets them)")
    runs: list[RunSpec] = []
    for k, run in enumerate(data.get("runs") or []):
        if not isinstance(run, Mapping) or not run.get("label"):
            raise ConfigError(f"runs[{k}]: expected a mapping with a label and batch-job keys")
        settings = {key: value for key, value in run.items() if key != "label"}
        runs.append(RunSpec(str(run["label"]), settings))
    for k, sweep in enumerate(data.get("sweeps") or []):
        runs.extend(_expand_sweep(sweep, k))
    if not runs:
        raise ConfigError("runs/sweeps: the benchmark needs at least one run")
    slugs = [r.slug for r in runs]
    dupes = sorted({s for s in slugs if slugs.count(s) > 1})
    if dupes:
        raise ConfigError(f"runs: labels must be distinct (as file names); repeated: {', '.join(dupes)}")
    notes = data.get("notes") or []
    if isinstance(notes, str) or not all(isinstance(n, str) for n in notes):
        raise ConfigError("notes: expected a list of strings")
    cfg = BenchConfig(name=name, output=str(data.get("output") or f"out/bench/{slugify(name)}"),
                      results=str(data.get("results") or f"docs/results/bench-{slugify(name)}"),
                      data=data_spec, base=dict(base), runs=tuple(runs), engine=engine, metrics=metrics,
                      sheet=sheet, notes=tuple(notes))
    for run in cfg.runs:  # fail before anything runs
        try:
            batch_config(cfg, run, "input.parquet")
        except ConfigError as exc:
            raise ConfigError(f"run {run.label!r}: {exc}") from None
    return cfg


def load_bench_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> BenchConfig:
    """Read ``configs/bench/*.yaml`` and apply dotted ``overrides`` (e.g. ``{"data.n": 8}``)."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    return parse_bench_config(data or {}, overrides)


def run_output(cfg: BenchConfig, run: RunSpec) -> str:
    return storage.join(cfg.output, run.slug) if storage.is_remote(cfg.output) else str(Path(cfg.output) / run.slug)


def input_path(cfg: BenchConfig) -> str:
    return storage.join(cfg.output, "input.parquet") if storage.is_remote(cfg.output) else str(
        Path(cfg.output) / "input.parquet")


def batch_config(cfg: BenchConfig, run: RunSpec, input_uri: str) -> BatchConfig:
    """The batch-job config of one run: base, then the run's settings, then input/output."""
    merged = deep_merge(cfg.base, run.settings)
    merged.update(input=input_uri, output=run_output(cfg, run))
    return parse_config(merged)


# ---- data -------------------------------------------------------------------------------------------------------
def build_input(cfg: BenchConfig) -> tuple[str, pa.Table]:
    """Write the benchmark's rows to ``OUTPUT/input.parquet`` (or use ``data.input``); returns (uri, table)."""
    from pipelines import datasets

    spec = cfg.data
    if spec.make == "shapes":
        from pipelines.make_dataset import shapes_table

        table = shapes_table(spec.n, seed=spec.seed, size=spec.size)
    elif spec.format is not None:
        table = datasets.read_dataset(spec.format, spec.src, **spec.options)
    else:
        fs, path = storage.resolve(spec.input)
        files = storage.list_files(fs, path)
        if not files:
            raise InputNotFoundError(f"data.input: no Parquet files at {storage.display(fs, path)}")
        table = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files], promote_options="default")
        if spec.limit is None and not spec.generate:
            S.validate_input_schema(table.schema, f"data.input {spec.input}")
            return spec.input, table
    if spec.limit is not None:
        table = table.slice(0, spec.limit)
    if spec.generate and table.column(S.IMAGE).null_count:
        from instdiff.models import load_bundle

        model = cfg.base.get("model") or {}
        model = {"spec": model} if isinstance(model, str) else dict(model)
        bundle = load_bundle(model.get("spec", "default"), device=model.get("device", "auto"),
                             dtype=model.get("dtype", "auto"))
        method = cfg.base.get("method") if isinstance(cfg.base.get("method"), Mapping) else {}
        table = datasets.generate_sources(table, bundle, steps=int(method.get("steps", 50)),
                                          guidance=float(method.get("guidance", 7.5)),
                                          seed=int(cfg.base.get("seed", 0)))
    S.validate_input_schema(table.schema, f"benchmark input of {cfg.name}")
    uri = input_path(cfg)
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    if storage.exists(fs, path):
        old = pq.read_table(path, filesystem=fs, columns=[S.ID, S.SOURCE_PROMPT, S.TARGET_PROMPT])
        new = table.select([S.ID, S.SOURCE_PROMPT, S.TARGET_PROMPT])
        if not old.equals(new):
            log.warning("%s holds other rows than this config makes; earlier run outputs under %s will be "
                        "re-checked by id (rows with the same id are not redone)", uri, cfg.output)
    pq.write_table(table, path, filesystem=fs, compression="zstd")
    return uri, table


# ---- running ----------------------------------------------------------------------------------------------------
def execute(cfg: BenchConfig, input_uri: str, only: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run every run (or those labelled in ``only``) through the bulk job; returns per-run job facts."""
    from pipelines import batch

    facts: dict[str, dict[str, Any]] = {}
    runs = [r for r in cfg.runs if not only or r.label in only or r.slug in only]
    started = False
    try:
        for k, run in enumerate(runs, start=1):
            bcfg = batch_config(cfg, run, input_uri)
            log.info("[%d/%d] %s: %s, %d steps, r=%.2f -> %s", k, len(runs), run.label, bcfg.method.method.value,
                     bcfg.method.steps, bcfg.method.strength, bcfg.output)
            t0 = time.perf_counter()
            load_before = os.getloadavg()[0]
            if cfg.engine == "ray":
                started = batch.connect_ray(bcfg) or started
                summary = batch.run_job(bcfg).to_dict()
            else:
                summary = _run_in_process(bcfg)
            summary["bench_seconds"] = round(time.perf_counter() - t0, 3)
            summary["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            facts[run.label] = summary
            if summary["written"] > 0:  # a resumed run with nothing left keeps the facts of the run that edited
                fs, path = storage.resolve(_facts_path(cfg, run))
                storage.write_bytes(fs, path, (json.dumps(summary, indent=2, default=str) + "\n").encode())
            log.info("[%d/%d] %s: %d written (%d ok) in %.1f s", k, len(runs), run.label, summary["written"],
                     summary["ok"], summary["bench_seconds"])
    finally:
        if started:
            import ray

            ray.shutdown()
    return facts


def _facts_path(cfg: BenchConfig, run: RunSpec) -> str:
    """Where the job facts of a run's last editing execution are kept (for ``--aggregate-only``)."""
    return storage.join(cfg.output, "_bench", f"{run.slug}.json") if storage.is_remote(cfg.output) else str(
        Path(cfg.output) / "_bench" / f"{run.slug}.json")


def load_facts(cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """The recorded job facts of every run that has them: the bench's own record, else the latest batch-job
    summary (``OUTPUT/<run>/_runs/*.summary.json``) that wrote rows."""
    out = {}
    for run in cfg.runs:
        fs, path = storage.resolve(_facts_path(cfg, run))
        candidates = [path] if storage.exists(fs, path) else []
        if not candidates:
            out_fs, out_path = storage.resolve(run_output(cfg, run))
            summaries = storage.list_files(out_fs, storage.join(out_path, "_runs"), suffix=".summary.json")
            fs, candidates = out_fs, sorted(summaries, reverse=True)
        for candidate in candidates:
            try:
                doc = json.loads(storage.read_bytes(fs, candidate))
            except (OSError, ValueError) as exc:
                log.warning("cannot read %s (%s)", candidate, exc)
                continue
            if doc.get("written"):
                doc.setdefault("bench_seconds", doc.get("seconds"))
                out[run.label] = doc
                break
    return out


def _run_in_process(bcfg: BatchConfig) -> dict[str, Any]:
    """The job's stages without Ray; writes ``OUTPUT/part-in-process.parquet`` (replacing an earlier one)."""
    from pipelines import batch

    in_fs, in_path = storage.resolve(bcfg.input, bcfg.storage)
    table = pa.concat_tables([pq.read_table(f, filesystem=in_fs) for f in storage.list_files(in_fs, in_path)])
    t0 = time.perf_counter()
    out = batch.run_in_process(bcfg, table, run_id=batch.new_run_id(), threads=int(bcfg.actors.num_cpus))
    seconds = time.perf_counter() - t0
    fs, path = storage.resolve(bcfg.output, bcfg.storage)
    for old in storage.list_files(fs, path):
        fs.delete_file(old)
    storage.write_bytes(fs, storage.join(path, "part-in-process.parquet"), _parquet_bytes(out))
    ok = sum(1 for s in out.column(S.STATUS).to_pylist() if s == S.STATUS_OK)
    return {"written": out.num_rows, "ok": ok, "error": out.num_rows - ok, "seconds": round(seconds, 3),
            "rows_per_s": round(out.num_rows / seconds, 3) if seconds > 0 else 0.0}


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


# ---- aggregation ------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """The benchmark's input rows, decoded once for every run's metrics."""

    ids: list[str]
    images: dict[str, np.ndarray]  # id → (H, W, 3) uint8 (null-image rows absent)
    masks: dict[str, np.ndarray]  # id → (H, W) bool
    meta: dict[str, dict[str, Any]]
    datasets: dict[str, str | None]
    target_prompts: dict[str, str]

    @classmethod
    def from_table(cls, table: pa.Table) -> Inputs:
        from instdiff.imageio import decode_image, decode_mask

        ids = table.column(S.ID).to_pylist()
        images, masks, meta, dsets, targets = {}, {}, {}, {}, {}
        cols = {c: table.column(c).to_pylist() for c in (S.IMAGE, S.MASK, S.META, S.DATASET, S.TARGET_PROMPT)
                if c in table.column_names}
        for i, rid in enumerate(ids):
            if cols[S.IMAGE][i] is not None:
                images[rid] = decode_image(cols[S.IMAGE][i])[0]
            if cols.get(S.MASK) and cols[S.MASK][i] is not None:
                masks[rid] = decode_mask(cols[S.MASK][i])
            text = (cols.get(S.META) or [None] * len(ids))[i]
            try:
                meta[rid] = json.loads(text) if text else {}
            except json.JSONDecodeError:
                meta[rid] = {}
            dsets[rid] = (cols.get(S.DATASET) or [None] * len(ids))[i]
            targets[rid] = cols[S.TARGET_PROMPT][i]
        return cls(ids, images, masks, meta, dsets, targets)


class Scorers:
    """Metric models, loaded once and only when needed; a model that cannot be loaded becomes an n/a reason."""

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        self._lpips: Any = None
        self._inception: Any = None
        self._clip: Any = None
        self.reasons: dict[str, str] = {}
        self.sources: dict[str, str] = {}
        self._ref_feats: dict[str, np.ndarray] = {}

    def lpips(self) -> Any:
        if self._lpips is None and "lpips" not in self.reasons:
            try:
                from instdiff.metrics import LPIPS

                self._lpips = LPIPS("alex")
                self.sources["lpips"] = self._lpips.weights_source
            except Exception as exc:  # noqa: BLE001 - any failure to load weights is reported, not fatal
                self.reasons["lpips"] = f"n/a: LPIPS weights unavailable ({type(exc).__name__}: {exc})"
                log.warning("%s", self.reasons["lpips"])
        return self._lpips

    def inception(self) -> Any:
        if self._inception is None and "fid" not in self.reasons:
            try:
                from instdiff.metrics import InceptionFeatures

                self._inception = InceptionFeatures()
                self.sources["fid"] = self._inception.weights_source
            except Exception as exc:  # noqa: BLE001
                self.reasons["fid"] = f"n/a: Inception weights unavailable ({type(exc).__name__}: {exc})"
                log.warning("%s", self.reasons["fid"])
        return self._inception

    def clip(self) -> Any:
        if self.spec.clip_model is None:
            self.reasons["clip_score"] = NO_CLIP
            return None
        if self._clip is None and "clip_score" not in self.reasons:
            try:
                from instdiff.metrics import ClipScorer

                self._clip = ClipScorer(self.spec.clip_model, local_files_only=True)
                self.sources["clip_score"] = str(self.spec.clip_model)
            except Exception as exc:  # noqa: BLE001
                self.reasons["clip_score"] = f"n/a: cannot load CLIP model {self.spec.clip_model!r} ({exc})"
                log.warning("%s", self.reasons["clip_score"])
        return self._clip

    def features(self, images: Sequence[np.ndarray], cache_key: str | None = None) -> np.ndarray | None:
        """Inception pool3 features of ``images`` (grouped by size), cached under ``cache_key``."""
        if cache_key is not None and cache_key in self._ref_feats:
            return self._ref_feats[cache_key]
        net = self.inception()
        if net is None:
            return None
        out = np.zeros((len(images), 2048), dtype=np.float64)
        by_shape: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(img.shape, []).append(i)
        for idx in by_shape.values():
            out[idx] = net(np.stack([images[i] for i in idx])).numpy()
        if cache_key is not None:
            self._ref_feats[cache_key] = out
        return out


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(kept)) if kept else None


def text_score_mode(spec: MetricSpec, inputs: Inputs) -> str:
    """Which text score applies: shapes (attribute scorer), clip, or none."""
    if spec.text_score != "auto":
        return spec.text_score
    shapes = all(inputs.datasets.get(i) == "shapes" and "target_phrase" in inputs.meta.get(i, {})
                 for i in inputs.ids)
    if shapes and inputs.masks:
        return "shapes"
    return "clip" if spec.clip_model else "none"


def shapes_text_score(edited: Mapping[str, np.ndarray], inputs: Inputs, ids: Sequence[str]) -> float | None:
    """Fraction of rows whose target phrase the shapes-world scorer finds inside the ground-truth edit region."""
    from instdiff import scorer

    hits = []
    for rid in ids:
        phrase = inputs.meta.get(rid, {}).get("target_phrase")
        region = inputs.masks.get(rid)
        if phrase is None or region is None or rid not in edited:
            continue
        try:
            hits.append(bool(scorer.phrase_present(edited[rid], phrase, region=region)))
        except (ValueError, scorer.PhraseError) as exc:
            log.debug("row %s: no text score (%s)", rid, exc)
    return float(np.mean(hits)) if hits else None


def read_run_rows(output: str) -> pa.Table | None:
    """One row per id of a run's output (None when it has none yet)."""
    from pipelines.report import read_output

    try:
        return read_output(output)
    except FileNotFoundError:
        return None


def aggregate_run(run: RunSpec, output: str, inputs: Inputs, scorers: Scorers, mode: str) -> dict[str, Any]:
    """Table 1 numbers of one run from its output folder."""
    from instdiff.imageio import decode_image

    res: dict[str, Any] = {"label": run.label, "slug": run.slug, "sweep": run.sweep, "params": run.params,
                           "output": output}
    table = read_run_rows(output)
    wanted = set(inputs.ids)
    rows = [r for r in (table.to_pylist() if table is not None else []) if r[S.ID] in wanted]
    ok = [r for r in rows if r[S.STATUS] == S.STATUS_OK]
    res.update(rows=len(inputs.ids), written=len(rows), ok=len(ok), error=len(rows) - len(ok),
               method=ok[0][S.METHOD] if ok else None, model=ok[0][S.MODEL] if ok else None)
    errors: dict[str, int] = {}
    for r in rows:
        if r[S.STATUS] != S.STATUS_OK:
            errors[r[S.ERROR] or "?"] = errors.get(r[S.ERROR] or "?", 0) + 1
    res["top_errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])
    if not ok:
        return res
    res["time_per_image_s"] = _mean([r[S.LATENCY_S] / max(1, r[S.BATCH_ROWS] or 1) for r in ok
                                     if r[S.LATENCY_S] is not None])
    res["unet_calls"] = _mean([r[S.UNET_CALLS] for r in ok])
    res["mask_area"] = _mean([r[S.MASK_AREA] for r in ok])
    res["iou"] = _mean([r[S.IOU] for r in ok])
    res["c_m"] = _mean([r[S.C_M] for r in ok])
    res["c_non"] = _mean([r[S.C_NON] for r in ok])
    res["ratio"] = res["c_m"] / res["c_non"] if res["c_m"] is not None and res["c_non"] else None
    # decoded pairs for the model-based metrics
    edited = {r[S.ID]: decode_image(r[S.EDITED])[0] for r in ok}
    sources = {r[S.ID]: (decode_image(r[S.GENERATED_SOURCE])[0] if r[S.GENERATED_SOURCE] else inputs.images.get(
        r[S.ID])) for r in ok}
    ids = [r[S.ID] for r in ok if sources.get(r[S.ID]) is not None
           and sources[r[S.ID]].shape == edited[r[S.ID]].shape]
    clock = {"start": time.perf_counter()}
    if scorers.spec.lpips and ids and scorers.lpips() is not None:
        values = []
        for shape_ids in _group_by_shape(ids, edited):
            a = np.stack([sources[i] for i in shape_ids])
            b = np.stack([edited[i] for i in shape_ids])
            values.extend(scorers.lpips()(a, b).tolist())
        res["lpips"] = _mean(values)
    clock["lpips"] = time.perf_counter()
    if scorers.spec.fid and len(ids) >= 2:
        _fid_metrics(res, ids, edited, sources, inputs, scorers)
    clock["fid"] = time.perf_counter()
    if mode == "shapes":
        res["text_score"] = shapes_text_score(edited, inputs, ids)
    clock["text"] = time.perf_counter()
    clip = scorers.clip() if mode == "clip" or scorers.spec.clip_model else None
    if clip is not None and ids:
        scores = clip.clip_score([edited[i] for i in ids], [inputs.target_prompts[i] for i in ids])
        res["clip_score"] = _mean(scores.tolist())
    clock["clip"] = time.perf_counter()
    log.info("scored %s (%d rows): lpips %.1f s, fid %.1f s, text score %.1f s, clip %.1f s", run.label, len(ids),
             clock["lpips"] - clock["start"], clock["fid"] - clock["lpips"], clock["text"] - clock["fid"],
             clock["clip"] - clock["text"])
    return res


def _group_by_shape(ids: Sequence[str], images: Mapping[str, np.ndarray]) -> list[list[str]]:
    groups: dict[tuple, list[str]] = {}
    for i in ids:
        groups.setdefault(images[i].shape, []).append(i)
    return list(groups.values())


def _fid_metrics(res: dict[str, Any], ids: Sequence[str], edited: Mapping[str, np.ndarray],
                 sources: Mapping[str, np.ndarray], inputs: Inputs, scorers: Scorers) -> None:
    """FID(edited, inputs) over the run's ok rows and CSFID (classes from meta), into ``res``."""
    from instdiff.metrics import csfid_from_features, frechet_distance

    ref_ids = [i for i in inputs.ids if i in inputs.images]
    ref = scorers.features([inputs.images[i] for i in ref_ids], cache_key="inputs")
    feats = scorers.features([edited[i] for i in ids])
    if ref is None or feats is None:
        return
    res["fid"] = frechet_distance(feats, ref)
    res["fid_n"] = [len(ids), len(ref_ids)]
    spec = scorers.spec
    classes = [inputs.meta.get(i, {}).get(spec.class_key) for i in ids]
    ref_classes = [inputs.meta.get(i, {}).get(spec.ref_class_key) for i in ref_ids]
    keep = [k for k, c in enumerate(classes) if c is not None]
    ref_keep = [k for k, c in enumerate(ref_classes) if c is not None]
    if not keep or not ref_keep:
        res["csfid_note"] = f"n/a: rows have no meta '{spec.class_key}'/'{spec.ref_class_key}' class labels"
        return
    result = csfid_from_features(feats[keep], [classes[k] for k in keep], ref[ref_keep],
                                 [ref_classes[k] for k in ref_keep])
    res["csfid"] = None if math.isnan(result.value) else result.value
    res["csfid_classes"] = len(result.per_class)
    if not result.per_class:
        res["csfid_note"] = "n/a: no class has >= 2 edited and >= 2 input images"


# ---- rendering --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    key: str
    header: str
    scale: float = 1.0
    digits: int = 2
    meaning: str = ""


TABLE1 = (
    Column("time_per_image_s", "Time/img (s) ↓", 1.0, 3, "editor wall time per image (latency_s / batch_rows), "
                                                          "model loading and I/O excluded"),
    Column("unet_calls", "UNet calls ↓", 1.0, 0, "UNet evaluations per image (CFG counts 2)"),
    Column("iou", "IoU (%) ↑", 100.0, 1, "IoU of the predicted edit mask with the ground-truth mask (Eq. I)"),
    Column("c_m", "C_m (%) ↑", 100.0, 1, "mean pixel change inside the ground-truth mask (Eq. II)"),
    Column("c_non", "C_non (%) ↓", 100.0, 1, "mean pixel change outside the ground-truth mask (Eq. III)"),
    Column("ratio", "C_m/C_non ↑", 1.0, 2, "ratio of the two means (the paper's 'rate')"),
    Column("lpips", "LPIPS ↓", 1.0, 3, "LPIPS(input, edited), AlexNet, v0.1"),
    Column("fid", "FID ↓", 1.0, 1, "FID between the edited images and all input images (Inception pool3)"),
    Column("csfid", "CSFID ↓", 1.0, 1, "mean per-class FID of edited images (target class) vs inputs of "
                                       "that class (source class); classes with < 2 images on a side skipped"),
    Column("text_score", "Text score (%) ↑", 100.0, 1, "shapes world: the target phrase is found inside the "
                                                        "edit region by the attribute scorer (instdiff.scorer)"),
    Column("clip_score", "CLIPScore ↑", 1.0, 3, "CLIPScore(edited, target prompt)"),
)
TABLE2 = tuple(c for c in TABLE1 if c.key in ("iou", "c_m", "c_non", "ratio", "text_score", "time_per_image_s",
                                             "unet_calls"))


def _cell(res: Mapping[str, Any], col: Column) -> str:
    value = res.get(col.key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * col.scale:.{col.digits}f}"


def _na_notes(results: Sequence[Mapping[str, Any]], scorers: Scorers, mode: str, inputs: Inputs) -> list[str]:
    notes = []
    if mode != "shapes":
        notes.append("Text score: n/a — the shapes-world attribute scorer applies only to shapes rows "
                     "(dataset 'shapes' with meta.target_phrase and a ground-truth mask).")
    if "clip_score" not in scorers.sources:
        notes.append(f"CLIPScore: {scorers.reasons.get('clip_score', NO_CLIP)}.")
    if not inputs.masks:
        notes.append("IoU, C_m, C_non: n/a — the input rows have no ground-truth masks.")
    if not scorers.spec.lpips:
        notes.append("LPIPS: not computed (metrics.lpips: false).")
    if not scorers.spec.fid:
        notes.append("FID, CSFID: not computed (metrics.fid: false).")
    for key in ("lpips", "fid"):
        if key in scorers.reasons:
            notes.append(f"{key.upper()}: {scorers.reasons[key]}.")
    csfid = {r.get("csfid_note") for r in results if r.get("csfid_note")}
    notes.extend(f"CSFID: {n}." for n in sorted(csfid))
    counted = [f"{r['label']} {r['csfid_classes']}" for r in results if r.get("csfid_classes")]
    if counted:
        notes.append("CSFID is the mean over the classes with >= 2 edited and >= 2 input images: "
                     + ", ".join(counted) + " classes; the rest are skipped.")
    loads = [x for r in results if r.get("job") for x in r["job"].get("load_avg_1m", [])]
    if loads:
        notes.append(f"Time/img was measured on a CPU shared with other work: 1-minute load average "
                     f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} logical CPUs while the runs ran; "
                     "compare times within this table only.")
    return notes


def markdown_table(results: Sequence[Mapping[str, Any]], columns: Sequence[Column],
                   params: Sequence[str] = ()) -> str:
    """A GitHub Markdown table: label (or sweep parameters), then ``columns``, then ok/rows."""
    head = ([SHORT_NAMES.get(p, p) for p in params] if params else ["Method"]) + [c.header for c in columns]
    head.append("ok / rows")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for res in results:
        first = [str(res["params"].get(p)) for p in params] if params else [res["label"]]
        cells = first + [_cell(res, c) for c in columns] + [f"{res.get('ok', 0)} / {res.get('rows', 0)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_files(prefix: str) -> dict[str, str]:
    return {"iou_vs_time": f"{prefix}-iou-vs-time.png", "cm_vs_cnon": f"{prefix}-cm-vs-cnon.png",
            "lpips_vs_text": f"{prefix}-lpips-vs-text.png", "contact": f"{prefix}-contact.png"}


def trade_off_plot(results: Sequence[Mapping[str, Any]], x: Column, y: Column, path: str, title: str) -> bool:
    """Scatter of ``y`` against ``x`` per run; runs of a sweep are joined by lines along its last grid key.
    Returns False (and writes nothing) when fewer than one run has both values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in results if r.get(x.key) is not None and r.get(y.key) is not None]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    palette = plt.get_cmap("tab10").colors
    plain = [r for r in points if not r.get("sweep")]
    for k, r in enumerate(plain):
        ax.scatter(r[x.key] * x.scale, r[y.key] * y.scale, s=70, marker="s", color=palette[k % 10], zorder=3)
        ax.annotate(r["label"], (r[x.key] * x.scale, r[y.key] * y.scale), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    n_lines = 0
    for sweep in dict.fromkeys(r["sweep"] for r in points if r.get("sweep")):
        members = [r for r in points if r.get("sweep") == sweep]
        keys = list(members[0]["params"])
        line_key, along = (keys[0], keys[-1]) if len(keys) > 1 else (None, keys[0])
        groups: dict[Any, list[Mapping[str, Any]]] = {}
        for r in members:
            groups.setdefault(r["params"].get(line_key) if line_key else sweep, []).append(r)
        for line, (value, rs) in enumerate(groups.items()):
            rs = sorted(rs, key=lambda r: r["params"][along])
            name = f"{SHORT_NAMES.get(line_key, line_key)}={value}" if line_key else sweep
            color = palette[(len(plain) + n_lines) % 10]
            n_lines += 1
            ax.plot([r[x.key] * x.scale for r in rs], [r[y.key] * y.scale for r in rs], marker="o", label=name,
                    color=color)
            for r in rs if line == 0 else ():  # the swept value on the first line only, to keep it legible
                ax.annotate(f"{SHORT_NAMES.get(along, along)}={r['params'][along]}",
                            (r[x.key] * x.scale, r[y.key] * y.scale), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, color="#555")
    if any(r.get("sweep") for r in points):
        ax.legend(fontsize=8)
    ax.set_xlabel(x.header)
    ax.set_ylabel(y.header)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def _latin1(text: str) -> str:
    """Text PIL's built-in bitmap font can draw (Greek letters spelled out, other symbols replaced)."""
    for a, b in (("φ", "phi"), ("γ", "gamma"), ("→", "->"), ("↑", "^"), ("↓", "v"), ("×", "x")):
        text = text.replace(a, b)
    return text.encode("latin-1", "replace").decode("latin-1")


def contact_sheet(cfg: BenchConfig, results: Sequence[Mapping[str, Any]], inputs: Inputs, path: str) -> bool:
    """PNG: per row, input | ground-truth mask | (predicted mask, edited) for each shown run."""
    from PIL import Image, ImageDraw

    from instdiff.imageio import encode_png
    from pipelines.report import TILE, tile

    shown_labels = cfg.sheet.runs or tuple(r.label for r in cfg.runs if r.sweep is None) or tuple(
        r.label for r in cfg.runs[:4])
    shown = [r for r in results if r["label"] in shown_labels]
    tables = {}
    for r in shown:
        t = read_run_rows(r["output"])
        if t is not None:
            tables[r["label"]] = {row[S.ID]: row for row in t.to_pylist() if row[S.STATUS] == S.STATUS_OK}
    shown = [r for r in shown if r["label"] in tables]
    if not shown:
        return False
    ids = [i for i in inputs.ids if all(i in tables[r["label"]] for r in shown)][: cfg.sheet.rows]
    if not ids:
        return False
    label_w, header_h, pad = 200, 34, 4
    columns = ["input", "gt mask"] + [f"{r['label']}\n{kind}" for r in shown for kind in ("mask", "edit")]
    width = label_w + len(columns) * (TILE + pad)
    sheet = Image.new("RGB", (width, header_h + len(ids) * (TILE + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, name in enumerate(columns):
        draw.multiline_text((label_w + k * (TILE + pad) + 2, 2), _latin1(name)[:44], fill=(0, 0, 0))
    for n, rid in enumerate(ids):
        y = header_h + n * (TILE + pad)
        meta = inputs.meta.get(rid, {})
        edit = meta.get("target_phrase") or meta.get("target_class") or inputs.target_prompts.get(rid, "")
        draw.multiline_text((4, y + 4), _latin1(f"{rid[:30]}\n-> {str(edit)[:28]}"), fill=(0, 0, 0))
        src = inputs.images.get(rid)
        gt = inputs.masks.get(rid)
        tiles = [tile(encode_png(src) if src is not None else None),
                 tile(encode_png(gt) if gt is not None else None, mask=True)]
        for r in shown:
            row = tables[r["label"]][rid]
            tiles += [tile(row[S.PRED_MASK], mask=True), tile(row[S.EDITED])]
        for k, t in enumerate(tiles):
            x = label_w + k * (TILE + pad)
            sheet.paste(Image.fromarray(t), (x, y))
            draw.rectangle((x - 1, y - 1, x + TILE, y + TILE), outline=(150, 150, 150))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return True


def _model_line(results: Sequence[Mapping[str, Any]], cfg: BenchConfig) -> str:
    from instdiff.models import embedded_model_available

    models = sorted({r["model"] for r in results if r.get("model")})
    spec = (cfg.base.get("model") or {}).get("spec", "default") if isinstance(cfg.base.get("model"), Mapping) \
        else (cfg.base.get("model") or "default")
    text = ", ".join(models) or spec
    if spec == "default" and not embedded_model_available():
        text += " — the embedded shapes model has not landed yet, so 'default' fell back to the random 'tiny' model"
    elif "tiny" in models:
        text += " (random weights: the numbers test the pipeline, not the methods)"
    elif "default" in models:
        text += " (the embedded SD-architecture model trained on the shapes world, 64 px)"
    return text


def render_markdown(cfg: BenchConfig, results: Sequence[Mapping[str, Any]], command: str, machine: Mapping[str, Any],
                    commit: str, notes: Sequence[str], plots: Mapping[str, str], settings: Mapping[str, Any],
                    sources: Mapping[str, str], wall_s: float | None) -> str:
    plain = [r for r in results if not r.get("sweep")]
    sweeps = list(dict.fromkeys(r["sweep"] for r in results if r.get("sweep")))
    name = Path(cfg.results).name
    out = [f"# Benchmark `{cfg.name}`", "",
           _made_with(command), "",
           f"* model: {_model_line(results, cfg)}",
           f"* rows: {results[0]['rows'] if results else 0} ({_data_line(cfg)}); engine: {cfg.engine}",
           f"* shared settings: `{json.dumps(settings, sort_keys=True)}`",
           f"* machine: {machine.get('cpu')} ({machine.get('cpu_count')} logical CPUs, shared), torch "
           f"{machine.get('torch')}; commit `{commit}`; {time.strftime('%Y-%m-%d %H:%M %Z')}"
           + (f"; the runs took {wall_s / 60:.1f} min in all" if wall_s else ""), ""]
    if plain:
        out += ["## Methods (Table 1 layout)", "", markdown_table(plain, TABLE1), ""]
    for sweep in sweeps:
        members = [r for r in results if r.get("sweep") == sweep]
        params = list(members[0]["params"])
        reference = [r for r in plain if r.get("method") == "sdedit"]
        out += [f"## Sweep `{sweep}` (Table 2 layout)", "", markdown_table(members, TABLE2, params), ""]
        if reference:
            out += ["Mask-free reference (the paper's `None` row): " + ", ".join(
                f"{r['label']}: IoU {_cell(r, TABLE1[2])} %, C_m {_cell(r, TABLE1[3])} %, "
                f"C_non {_cell(r, TABLE1[4])} %, C_m/C_non {_cell(r, TABLE1[5])}" for r in reference), ""]
    figures = [(k, v) for k, v in plots.items() if v]
    if figures:
        out += ["## Figures", ""]
        titles = {"iou_vs_time": "IoU vs time per image", "cm_vs_cnon": "C_m vs C_non (Figure 5 style)",
                  "lpips_vs_text": "LPIPS vs text score", "contact": "Contact sheet: masks and edits per method"}
        out += [f"![{titles[k]}]({Path(v).name})" + "  " for k, v in figures] + [""]
    out += ["## Columns", ""]
    out += [f"* **{c.header}**: {c.meaning}." for c in TABLE1]
    out += ["* Means over the rows each method edited without error; C_m, C_non, LPIPS on the input's pixel grid."]
    if sources:
        out += ["* Weights: " + "; ".join(f"{k}: {v}" for k, v in sorted(sources.items())) + "."]
    out += ["* FID/CSFID over ~100 images are strongly biased upwards (2048-d features); compare them only "
            "between rows of this table."]
    if notes:
        out += ["", "## Notes", ""] + [f"* {n}" for n in notes]
    errors = {k: v for r in results for k, v in r.get("top_errors", {}).items()}
    if errors:
        out += ["", "## Errors", ""] + [f"* {v} × {k}" for k, v in errors.items()]
    out += ["", f"Raw numbers: [{name}.json]({name}.json).", ""]
    return "\n".join(out)


def _made_with(command: str) -> str:
    """The command that made the runs (a ``--aggregate-only`` re-render is said as such)."""
    flag = " --aggregate-only"
    if flag in command:
        return (f"Made with: `{command.replace(flag, '')}` (tables and figures re-rendered from its outputs "
                f"with `{flag.strip()}`)")
    return f"Made with: `{command}`"


def _data_line(cfg: BenchConfig) -> str:
    d = cfg.data
    if d.make:
        return f"{d.make} world, {d.n} pairs, seed {d.seed}, {d.size} px"
    if d.format:
        return f"{d.format} from {d.src}" + (f", first {d.limit}" if d.limit else "")
    return f"{d.input}" + (f", first {d.limit}" if d.limit else "")


def aggregate(cfg: BenchConfig, inputs_table: pa.Table, command: str, facts: Mapping[str, Any] | None = None,
              wall_s: float | None = None) -> dict[str, str]:
    """Read every run's output and write the Markdown table, JSON, plots and contact sheet; returns paths."""
    facts = {**load_facts(cfg), **{k: v for k, v in (facts or {}).items() if v.get("written")}}
    if wall_s is None and facts:
        wall_s = sum(f.get("bench_seconds", 0.0) for f in facts.values())
    inputs = Inputs.from_table(inputs_table)
    scorers = Scorers(cfg.metrics)
    mode = text_score_mode(cfg.metrics, inputs)
    results = []
    for run in cfg.runs:
        log.info("scoring %s", run.label)
        res = aggregate_run(run, run_output(cfg, run), inputs, scorers, mode)
        res["job"] = facts.get(run.label)
        results.append(res)
    if mode == "shapes":
        baseline = shapes_text_score(inputs.images, inputs, inputs.ids)
        scorers.sources["text_score"] = "instdiff.scorer (analytic shapes-world attribute detector)"
    else:
        baseline = None
    files = _plot_files(cfg.results)
    plots: dict[str, str | None] = {}
    col = {c.key: c for c in TABLE1}
    plots["iou_vs_time"] = files["iou_vs_time"] if trade_off_plot(
        results, col["time_per_image_s"], col["iou"], files["iou_vs_time"], f"{cfg.name}: IoU vs time") else None
    plots["cm_vs_cnon"] = files["cm_vs_cnon"] if trade_off_plot(
        results, col["c_non"], col["c_m"], files["cm_vs_cnon"], f"{cfg.name}: C_m vs C_non") else None
    text_col = col["text_score"] if mode == "shapes" else col["clip_score"]
    plots["lpips_vs_text"] = files["lpips_vs_text"] if trade_off_plot(
        results, col["lpips"], text_col, files["lpips_vs_text"], f"{cfg.name}: {text_col.header} vs LPIPS") \
        else None
    plots["contact"] = files["contact"] if contact_sheet(cfg, results, inputs, files["contact"]) else None
    notes = list(cfg.notes) + _na_notes(results, scorers, mode, inputs)
    if baseline is not None:
        notes.append(f"Text score of the unedited inputs (scorer false-positive baseline): {baseline * 100:.1f} %.")
    from pipelines.runinfo import git_commit, machine_info, write_report

    machine = machine_info()
    commit = git_commit()
    settings = {k: v for k, v in cfg.base.items() if k not in ("ray", "storage")}
    md = render_markdown(cfg, results, command, machine, commit, notes, plots, settings, scorers.sources, wall_s)
    md_path = f"{cfg.results}.md"
    Path(md_path).parent.mkdir(parents=True, exist_ok=True)
    Path(md_path).write_text(md)
    params = {"command": command, "config": _config_dict(cfg), "text_score": mode,
              "batch_configs": {r.label: to_dict(batch_config(cfg, r, input_path(cfg))) for r in cfg.runs}}
    json_path = write_report(f"{cfg.results}.json", params, results, notes=notes, weights=scorers.sources,
                             plots={k: v for k, v in plots.items() if v}, wall_s=wall_s,
                             input_text_score=baseline)
    out = {"markdown": md_path, "json": str(json_path)}
    out.update({k: v for k, v in plots.items() if v})
    return out


def _config_dict(cfg: BenchConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["runs"] = [{"label": r.label, "sweep": r.sweep, "params": r.params, "settings": r.settings} for r in cfg.runs]
    return d


# ---- command line -----------------------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, command: str, only: Sequence[str] | None = None,
              aggregate_only: bool = False) -> dict[str, str]:
    """The whole benchmark: 1. input rows, 2. every run through the bulk job, 3. tables, plots, contact sheet."""
    t0 = time.perf_counter()
    # 1. the rows every method edits
    input_uri, table = build_input(cfg)
    log.info("benchmark %s: %d rows, %d runs, engine %s", cfg.name, table.num_rows, len(cfg.runs), cfg.engine)
    # 2. the runs (each resumes into its own output folder)
    facts = None if aggregate_only else execute(cfg, input_uri, only)
    log.info("runs done in %.1f min; scoring", (time.perf_counter() - t0) / 60)
    # 3. aggregate (time: the sum over runs of their last editing execution)
    return aggregate(cfg, table, command, facts)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``instdiff bench``."""
    p = sub.add_parser(
        "bench", help="run several editing methods on the same rows and aggregate a Table-1-style report",
        description="Run every run and sweep point of a bench config through the bulk job (each into "
                    "OUTPUT/<run>/, resumable), then write RESULTS.md (Table 1/Table 2 layout), RESULTS.json, "
                    "trade-off plots and a contact sheet.")
    p.add_argument("--config", required=True, help="configs/bench/*.yaml")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="override a bench key, e.g. --set data.n=8 --set base.method.steps=10 (repeatable)")
    p.add_argument("--output", default=None, help="override output (run folders)")
    p.add_argument("--results", default=None, help="override the results prefix")
    p.add_argument("--engine", default=None, choices=ENGINES)
    p.add_argument("--only", action="append", default=None, metavar="LABEL",
                   help="run only these labels (others are still aggregated from earlier outputs)")
    p.add_argument("--aggregate-only", action="store_true", help="do not run; re-render from existing outputs")
    p.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> str:
    """The ``instdiff bench`` command that reproduces this invocation (recorded with the results)."""
    parts = ["instdiff", "bench", "--config", str(args.config)]
    for a in args.assignments:
        parts += ["--set", a]
    for key in ("output", "results", "engine"):
        if getattr(args, key):
            parts += [f"--{key}", str(getattr(args, key))]
    for label in args.only or []:
        parts += ["--only", label]
    if args.aggregate_only:
        parts.append("--aggregate-only")
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = dict(parse_assignment(a) for a in args.assignments)
    for key in ("output", "results", "engine"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    cfg = load_bench_config(args.config, overrides)
    paths = run_bench(cfg, command_line(args), args.only, args.aggregate_only)
    print(json.dumps(paths))
    return 0
