"""The bench config (``configs/bench/*.yaml``): typed sections, sweeps expanded into runs, every run validated.

Sections are built with the project's one parser (:func:`instdiff.config.from_mapping`); each run's batch-job
keys are ``base`` with the run's settings merged on top (:func:`deep_merge`) and parsed by
:func:`pipelines.config.parse_config`, so a bad run fails before anything runs.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instdiff.config import from_mapping, load_yaml
from instdiff.errors import ConfigError
from pipelines import storage
from pipelines.config import BatchConfig, apply_override, parse_config
from pipelines.datasets import FORMATS as DATA_FORMATS

ENGINES = ("ray", "in-process")
TEXT_SCORES = ("auto", "shapes", "clip", "none")

_TOP_KEYS = (
    "name",
    "output",
    "results",
    "engine",
    "data",
    "base",
    "runs",
    "sweeps",
    "metrics",
    "sheet",
    "notes",
    "earlier",
)
_SWEEP_KEYS = ("name", "label", "settings", "grid")
_JOB_PATHS = ("input", "output")  # batch-job keys the bench sets for every run


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
        """The run's folder name under the bench output (:func:`slugify` of the label)."""
        return slugify(self.label)


@dataclass(frozen=True)
class MetricSpec:
    """Which model-based metrics the aggregation computes, and the meta keys CSFID reads its classes from."""

    lpips: bool = True  # LPIPS(input, edited), AlexNet
    fid: bool = True  # FID(edited, inputs) and CSFID over classes from meta
    class_key: str = "target_class"  # meta key: class of an edited image (CSFID)
    ref_class_key: str = "source_class"  # meta key: class of an input image (CSFID reference set)
    text_score: str = "auto"  # auto | shapes | clip | none
    clip_model: str | None = None  # a CLIP checkpoint (folder or hub id) for CLIPScore


@dataclass(frozen=True)
class SheetSpec:
    """The contact sheet: how many input rows, and which run labels (``None``: the plain runs)."""

    rows: int = 8
    runs: tuple[str, ...] | None = None


@dataclass(frozen=True)
class BenchConfig:
    """A whole benchmark: its rows, the runs (sweeps expanded), the metrics and where everything goes."""

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
    # results JSON files of earlier runs of this benchmark, tabulated under "Earlier runs" for comparison
    earlier: tuple[str, ...] = ()


def load_earlier(path: str) -> dict[str, Any]:
    """An earlier run's results JSON (what ``instdiff bench`` wrote), checked for what the tables read.

    Args:
        path: the ``.json`` file.

    Returns:
        The parsed document: ``results`` a list of mappings, each with ``label`` and a ``params`` mapping.

    Raises:
        ConfigError: the file is missing or unreadable, not JSON, or not a benchmark results document.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"earlier: {path} does not exist (paths are relative to the working directory)")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"earlier: {path} is not a readable benchmark results file ({exc})") from None
    results = data.get("results") if isinstance(data, dict) else None
    ok = isinstance(results, list) and all(
        isinstance(r, dict)
        and isinstance(r.get("label"), str)
        and isinstance(r.get("params", {} if not r.get("sweep") else None), dict)
        for r in results
    )
    if not ok:
        raise ConfigError(
            f"earlier: {path} is not a readable benchmark results file (expected 'results': a list of runs, each "
            "with a 'label' and 'params', as instdiff bench writes)"
        )
    return data


def slugify(text: str) -> str:
    """A file-name-safe form of a label: ``"InstDiffEdit r=0.4 φ=0.1"`` → ``"instdiffedit-r-0.4-phi-0.1"``.

    Args:
        text: any label.

    Returns:
        Lower-case letters, digits, dots and dashes (``"run"`` when nothing is left).
    """
    text = text.replace("φ", "phi").replace("γ", "gamma").lower()
    return re.sub(r"[^a-z0-9.]+", "-", text).strip("-") or "run"


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: nested mappings merged, other values replaced (copies, inputs untouched).

    The batch config's shorthand ``method: NAME`` (for ``method: {name: NAME}``) is understood on either side,
    so ``method: sdedit`` in a run keeps the base's other ``method`` keys.

    Args:
        base: batch-job keys.
        over: batch-job keys that win.

    Returns:
        The merged mapping.
    """
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
    """The runs of ``sweeps[k]``: one per point of the cartesian product of its grid, labels filled in."""
    where = f"sweeps[{k}]"
    if not isinstance(sweep, Mapping):
        raise ConfigError(f"{where}: expected a mapping with name, label, settings, grid")
    unknown = [key for key in sweep if key not in _SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; accepted: {', '.join(_SWEEP_KEYS)}")
    grid = sweep.get("grid")
    if not isinstance(grid, Mapping) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(
            f"{where}.grid: expected a mapping of dotted keys to non-empty lists, e.g. "
            "{method.strength: [0.4, 0.5, 0.6]}"
        )
    for key in grid:
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"{where}.grid: {key!r} is not a dotted batch-job key (a string such as method.strength)")
        _refuse_job_paths({key.split(".", 1)[0]: None}, f"{where}.grid")
    name = str(sweep.get("name") or f"sweep{k}")
    label = str(sweep.get("label") or name + " " + " ".join(f"{key}={{{key}}}" for key in grid))
    settings = sweep.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{where}.settings: expected a mapping of batch-job keys; got {settings!r}")
    _refuse_job_paths(settings, f"{where}.settings")
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


def _refuse_job_paths(settings: Mapping[Any, Any], where: str) -> None:
    """Refuse ``input``/``output`` among a run's batch-job keys: the bench sets them for every run."""
    for key in _JOB_PATHS:
        if key in settings:
            raise ConfigError(f"{where}.{key}: not accepted here (the bench sets input and output of every run)")


def _as_list(data: Mapping[str, Any], key: str, what: str) -> list[Any]:
    """Top-level ``key`` as a list (absent or null: empty); anything else is a :class:`ConfigError`."""
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of {what}; got {value!r}")
    return value


def _section(data: Mapping[str, Any], cls: type, key: str) -> Any:
    """Section ``key`` of the config as dataclass ``cls`` (absent or null: the defaults)."""
    value = data.get(key)
    return from_mapping(cls, {} if value is None else value, key)


def _parse_data(data: Mapping[str, Any]) -> DataSpec:
    """The ``data`` section, with exactly one source of rows."""
    spec = _section(data, DataSpec, "data")
    sources = [k for k in ("make", "input", "format") if getattr(spec, k)]
    if len(sources) != 1:
        raise ConfigError("data: give exactly one of make (shapes), input (a Parquet path) or format + src")
    if spec.make not in (None, "shapes"):
        raise ConfigError(f"data.make: {spec.make!r} is not accepted; accepted: shapes")
    if spec.format is not None and (spec.format not in DATA_FORMATS or not spec.src):
        raise ConfigError(f"data.format: needs one of {', '.join(DATA_FORMATS)} and data.src")
    return spec


def _parse_sheet(data: Mapping[str, Any]) -> SheetSpec:
    """The ``sheet`` section (run labels read as strings, as ``runs[].label`` is)."""
    sheet = data.get("sheet")
    if isinstance(sheet, Mapping) and isinstance(sheet.get("runs"), list | tuple):
        sheet = {**sheet, "runs": [str(r) for r in sheet["runs"]]}  # labels are strings, as in runs[].label
    return from_mapping(SheetSpec, {} if sheet is None else sheet, "sheet")


def _parse_runs(data: Mapping[str, Any]) -> list[RunSpec]:
    """The plain runs, then every sweep's runs; at least one, with distinct slugs."""
    runs: list[RunSpec] = []
    for k, run in enumerate(_as_list(data, "runs", "runs (mappings with a label and batch-job keys)")):
        if not isinstance(run, Mapping) or not run.get("label"):
            raise ConfigError(f"runs[{k}]: expected a mapping with a label and batch-job keys")
        _refuse_job_paths(run, f"runs[{k}]")
        settings = {key: value for key, value in run.items() if key != "label"}
        runs.append(RunSpec(str(run["label"]), settings))
    for k, sweep in enumerate(_as_list(data, "sweeps", "sweeps (mappings with name, label, settings, grid)")):
        runs.extend(_expand_sweep(sweep, k))
    if not runs:
        raise ConfigError("runs/sweeps: the benchmark needs at least one run")
    slugs = [r.slug for r in runs]
    dupes = sorted({s for s in slugs if slugs.count(s) > 1})
    if dupes:
        raise ConfigError(f"runs: labels must be distinct (as file names); repeated: {', '.join(dupes)}")
    return runs


def parse_bench_config(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> BenchConfig:
    """A parsed YAML mapping → :class:`BenchConfig`; every run's batch config is validated here, up front.

    Args:
        data: the config's keys (see :mod:`pipelines.bench` for the layout).
        overrides: dotted keys set on top, e.g. ``{"data.n": 8, "base.method.steps": 10}``.

    Returns:
        The config, with sweeps expanded into runs.

    Raises:
        ConfigError: an unknown key or a bad value (the message names it and what is accepted), no run,
            repeated labels, or a run whose batch config does not parse (prefixed with ``run 'LABEL'``).
    """
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
    data_spec = _parse_data(data)
    metrics = _section(data, MetricSpec, "metrics")
    if metrics.text_score not in TEXT_SCORES:
        raise ConfigError(f"metrics.text_score: {metrics.text_score!r}; accepted: {', '.join(TEXT_SCORES)}")
    sheet = _parse_sheet(data)
    base = data.get("base") or {}
    if not isinstance(base, Mapping) or any(key in base for key in _JOB_PATHS):
        raise ConfigError("base: expected a mapping of batch-job keys without input/output (the bench sets them)")
    runs = _parse_runs(data)
    notes = data.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise ConfigError(f"notes: expected a list of strings; got {notes!r}")
    earlier = data.get("earlier") or []
    if not isinstance(earlier, list) or not all(isinstance(e, str) and e.endswith(".json") for e in earlier):
        raise ConfigError(f"earlier: expected a list of results .json paths of earlier runs; got {earlier!r}")
    for path in earlier:  # read now: a bad file must not surface after every run has been made
        load_earlier(path)
    cfg = BenchConfig(
        name=name,
        output=str(data.get("output") or f"out/bench/{slugify(name)}"),
        results=str(data.get("results") or f"docs/results/bench-{slugify(name)}"),
        data=data_spec,
        base=dict(base),
        runs=tuple(runs),
        engine=engine,
        metrics=metrics,
        sheet=sheet,
        notes=tuple(notes),
        earlier=tuple(earlier),
    )
    for run in cfg.runs:  # fail before anything runs
        try:
            batch_config(cfg, run, "input.parquet")
        except ConfigError as exc:
            raise ConfigError(f"run {run.label!r}: {exc}") from None
    return cfg


def load_bench_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> BenchConfig:
    """Read ``configs/bench/*.yaml`` and apply dotted ``overrides`` (e.g. ``{"data.n": 8}``).

    Args:
        path: the YAML file.
        overrides: dotted keys set on top of the file's.

    Returns:
        The parsed config (:func:`parse_bench_config`).

    Raises:
        InputNotFoundError: ``path`` does not exist.
        ConfigError: not valid YAML, not a mapping, or a bad key or value.
    """
    return parse_bench_config(load_yaml(path, "bench config"), overrides)


def _under_output(cfg: BenchConfig, *parts: str) -> str:
    """A path under the bench output: '/'-joined for a remote output, a local path otherwise."""
    if storage.is_remote(cfg.output):
        return storage.join(cfg.output, *parts)
    return str(Path(cfg.output).joinpath(*parts))


def run_output(cfg: BenchConfig, run: RunSpec) -> str:
    """The output folder of one run: ``OUTPUT/<slug>``."""
    return _under_output(cfg, run.slug)


def input_path(cfg: BenchConfig) -> str:
    """Where the benchmark's input rows are written: ``OUTPUT/input.parquet``."""
    return _under_output(cfg, "input.parquet")


def facts_path(cfg: BenchConfig, run: RunSpec) -> str:
    """Where the job facts of a run's last editing execution are kept (for ``--aggregate-only``)."""
    return _under_output(cfg, "_bench", f"{run.slug}.json")


def batch_config(cfg: BenchConfig, run: RunSpec, input_uri: str) -> BatchConfig:
    """The batch-job config of one run: base, then the run's settings, then input/output.

    Args:
        cfg: the bench config.
        run: one of its runs.
        input_uri: the job's input.

    Returns:
        The validated batch config.

    Raises:
        ConfigError: the merged keys do not parse as a batch config.
    """
    merged = deep_merge(cfg.base, run.settings)
    merged.update(input=input_uri, output=run_output(cfg, run))
    return parse_config(merged)
