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

Modules: :mod:`~pipelines.bench.config` (the YAML above, sweeps), :mod:`~pipelines.bench.runner` (input rows,
runs, job facts, aggregation), :mod:`~pipelines.bench.scoring` (per-run metrics),
:mod:`~pipelines.bench.render` (tables, plots, contact sheet), :mod:`~pipelines.bench.cli` (the subcommand).
"""

from pipelines.bench.cli import command_line, register, run
from pipelines.bench.config import (
    DATA_FORMATS,
    ENGINES,
    TEXT_SCORES,
    BenchConfig,
    DataSpec,
    MetricSpec,
    RunSpec,
    SheetSpec,
    batch_config,
    deep_merge,
    facts_path,
    input_path,
    load_bench_config,
    parse_bench_config,
    run_output,
    slugify,
)
from pipelines.bench.render import (
    PLOT_TITLES,
    SHORT_NAMES,
    TABLE1,
    TABLE2,
    Column,
    contact_sheet,
    markdown_table,
    na_notes,
    plot_files,
    render_markdown,
    trade_off_plot,
)
from pipelines.bench.runner import aggregate, build_input, execute, load_facts, run_bench
from pipelines.bench.scoring import (
    NO_CLIP,
    Inputs,
    Scorers,
    aggregate_run,
    read_run_rows,
    shapes_text_score,
    text_score_mode,
)

__all__ = [
    "DATA_FORMATS",
    "ENGINES",
    "NO_CLIP",
    "PLOT_TITLES",
    "SHORT_NAMES",
    "TABLE1",
    "TABLE2",
    "TEXT_SCORES",
    "BenchConfig",
    "Column",
    "DataSpec",
    "Inputs",
    "MetricSpec",
    "RunSpec",
    "Scorers",
    "SheetSpec",
    "aggregate",
    "aggregate_run",
    "batch_config",
    "build_input",
    "command_line",
    "contact_sheet",
    "deep_merge",
    "execute",
    "facts_path",
    "input_path",
    "load_bench_config",
    "load_facts",
    "markdown_table",
    "na_notes",
    "parse_bench_config",
    "plot_files",
    "read_run_rows",
    "register",
    "render_markdown",
    "run",
    "run_bench",
    "run_output",
    "shapes_text_score",
    "slugify",
    "text_score_mode",
    "trade_off_plot",
]
