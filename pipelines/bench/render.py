"""What a benchmark shows: the Markdown tables (InstDiffEdit Table 1 and Table 2 layouts), trade-off plots
(Figure 5 style) and the contact sheet of masks and edits per run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import schema as S
from pipelines.bench.config import BenchConfig, load_earlier
from pipelines.bench.scoring import NO_CLIP, Inputs, Scorers, read_run_rows
from pipelines.contact_sheet import Panel, SheetRow, draw_contact_sheet

SHORT_NAMES = {
    "method.strength": "r",
    "method.mask.phi": "φ",
    "method.n_noises": "n",
    "method.steps": "steps",
    "method.guidance": "guidance",
    "method.name": "method",
    "method.diffedit_threshold": "DiffEdit thr",
}


@dataclass(frozen=True)
class Column:
    """One table column: the result key, its header, the factor shown values are multiplied by, the decimals
    and what it means (listed under "Columns")."""

    key: str
    header: str
    scale: float = 1.0
    digits: int = 2
    meaning: str = ""


TABLE1 = (
    Column(
        "time_per_image_s",
        "Time/img (s) ↓",
        1.0,
        3,
        "editor wall time per image (latency_s / batch_rows), model loading and I/O excluded",
    ),
    Column("unet_calls", "UNet calls ↓", 1.0, 0, "UNet evaluations per image (CFG counts 2)"),
    Column("iou", "IoU (%) ↑", 100.0, 1, "IoU of the predicted edit mask with the ground-truth mask (Eq. I)"),
    Column("c_m", "C_m (%) ↑", 100.0, 1, "mean pixel change inside the ground-truth mask (Eq. II)"),
    Column("c_non", "C_non (%) ↓", 100.0, 1, "mean pixel change outside the ground-truth mask (Eq. III)"),
    Column("ratio", "C_m/C_non ↑", 1.0, 2, "ratio of the two means (the paper's 'rate')"),
    Column("lpips", "LPIPS ↓", 1.0, 3, "LPIPS(input, edited), AlexNet, v0.1"),
    Column("fid", "FID ↓", 1.0, 1, "FID between the edited images and all input images (Inception pool3)"),
    Column(
        "csfid",
        "CSFID ↓",
        1.0,
        1,
        "mean per-class FID of edited images (target class) vs inputs of "
        "that class (source class); classes with < 2 images on a side skipped",
    ),
    Column(
        "text_score",
        "Text score (%) ↑",
        100.0,
        1,
        "shapes world: the target phrase is found inside the edit region by the attribute scorer (instdiff.scorer)",
    ),
    Column("clip_score", "CLIPScore ↑", 1.0, 3, "CLIPScore(edited, target prompt)"),
)
TABLE2 = tuple(
    c for c in TABLE1 if c.key in ("iou", "c_m", "c_non", "ratio", "text_score", "time_per_image_s", "unet_calls")
)
PLOT_TITLES = {
    "iou_vs_time": "IoU vs time per image",
    "cm_vs_cnon": "C_m vs C_non (Figure 5 style)",
    "lpips_vs_text": "LPIPS vs text score",
    "contact": "Contact sheet: masks and edits per method",
}


def _cell(res: Mapping[str, Any], col: Column) -> str:
    """One table cell: the scaled value with the column's decimals, or ``n/a``."""
    value = res.get(col.key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * col.scale:.{col.digits}f}"


def na_notes(results: Sequence[Mapping[str, Any]], scorers: Scorers, mode: str, inputs: Inputs) -> list[str]:
    """Notes saying why columns are n/a or how to read them (CSFID classes, CPU load while timing).

    Args:
        results: :func:`pipelines.bench.scoring.aggregate_run` of every run, with its ``job`` facts.
        scorers: the metric models (their n/a reasons).
        mode: the text score used.
        inputs: the input rows.

    Returns:
        One sentence per note.
    """
    notes = []
    if mode != "shapes":
        notes.append(
            "Text score: n/a — the shapes-world attribute scorer applies only to shapes rows "
            "(dataset 'shapes' with meta.target_phrase and a ground-truth mask)."
        )
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
        notes.append(
            "CSFID is the mean over the classes with >= 2 edited and >= 2 input images: "
            + ", ".join(counted)
            + " classes; the rest are skipped."
        )
    loads = [x for r in results if r.get("job") for x in r["job"].get("load_avg_1m", [])]
    if loads:
        notes.append(
            f"Time/img was measured on a CPU shared with other work: 1-minute load average "
            f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} logical CPUs while the runs ran; "
            "compare times within this table only."
        )
    return notes


def markdown_table(results: Sequence[Mapping[str, Any]], columns: Sequence[Column], params: Sequence[str] = ()) -> str:
    """A GitHub Markdown table: label (or sweep parameters), then ``columns``, then ok/rows.

    Args:
        results: one result mapping per table row.
        columns: the value columns.
        params: dotted sweep keys shown instead of the label (headers shortened by :data:`SHORT_NAMES`).

    Returns:
        The table, lines joined by newlines.
    """
    head = ([SHORT_NAMES.get(p, p) for p in params] if params else ["Method"]) + [c.header for c in columns]
    head.append("ok / rows")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for res in results:
        first = [str(res["params"].get(p)) for p in params] if params else [res["label"]]
        cells = first + [_cell(res, c) for c in columns] + [f"{res.get('ok', 0)} / {res.get('rows', 0)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_files(prefix: str) -> dict[str, str]:
    """The figure files of a results prefix, by kind (the keys of :data:`PLOT_TITLES`)."""
    return {
        "iou_vs_time": f"{prefix}-iou-vs-time.png",
        "cm_vs_cnon": f"{prefix}-cm-vs-cnon.png",
        "lpips_vs_text": f"{prefix}-lpips-vs-text.png",
        "contact": f"{prefix}-contact.png",
    }


def trade_off_plot(results: Sequence[Mapping[str, Any]], x: Column, y: Column, path: str, title: str) -> bool:
    """Scatter of ``y`` against ``x`` per run; runs of a sweep are joined by lines along its last grid key.

    Args:
        results: one result mapping per run.
        x: the column on the horizontal axis (values scaled as in the table).
        y: the column on the vertical axis.
        path: the PNG to write.
        title: the plot title.

    Returns:
        False (and nothing written) when no run has both values.
    """
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
        ax.annotate(
            r["label"], (r[x.key] * x.scale, r[y.key] * y.scale), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
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
            ax.plot(
                [r[x.key] * x.scale for r in rs],
                [r[y.key] * y.scale for r in rs],
                marker="o",
                label=name,
                color=color,
            )
            for r in rs if line == 0 else ():  # the swept value on the first line only, to keep it legible
                ax.annotate(
                    f"{SHORT_NAMES.get(along, along)}={r['params'][along]}",
                    (r[x.key] * x.scale, r[y.key] * y.scale),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                    color="#555",
                )
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
    """PNG: per row, input | ground-truth mask | (predicted mask, edited) for each shown run.

    Shown runs: ``sheet.runs``, else the plain (non-sweep) runs, else the first four; only runs with an output
    appear, and only the first ``sheet.rows`` input rows every shown run edited. Drawn by
    :func:`pipelines.contact_sheet.draw_contact_sheet` (200 px of labels: id and target phrase; framed tiles).

    Args:
        cfg: the bench config.
        results: :func:`pipelines.bench.scoring.aggregate_run` of every run (``label`` and ``output``).
        inputs: the input rows.
        path: the PNG to write.

    Returns:
        False (and nothing written) when no run or no row can be shown.
    """
    from instdiff.imageio import encode_png

    shown_labels = (
        cfg.sheet.runs or tuple(r.label for r in cfg.runs if r.sweep is None) or tuple(r.label for r in cfg.runs[:4])
    )
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
    columns = ["input", "gt mask"] + [f"{r['label']}\n{kind}" for r in shown for kind in ("mask", "edit")]
    lines = []
    for rid in ids:
        meta = inputs.meta.get(rid, {})
        edit = meta.get("target_phrase") or meta.get("target_class") or inputs.target_prompts.get(rid, "")
        src = inputs.images.get(rid)
        gt = inputs.masks.get(rid)
        panels = [
            Panel(encode_png(src) if src is not None else None),
            Panel(encode_png(gt) if gt is not None else None, mask=True),
        ]
        for r in shown:
            row = tables[r["label"]][rid]
            panels += [Panel(row[S.PRED_MASK], mask=True), Panel(row[S.EDITED])]
        lines.append(SheetRow(_latin1(f"{rid[:30]}\n-> {str(edit)[:28]}"), panels))
    png = draw_contact_sheet(
        [_latin1(name)[:44] for name in columns], lines, label_width=200, header_height=34, header_inset=2, frame=True
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png)
    return True


def _model_line(results: Sequence[Mapping[str, Any]], cfg: BenchConfig) -> str:
    """The model the runs used, with what its numbers mean (random weights, the embedded shapes model)."""
    from instdiff.models import embedded_model_available

    models = sorted({r["model"] for r in results if r.get("model")})
    model = cfg.base.get("model")
    spec = (model or {}).get("spec", "default") if isinstance(model, Mapping) else (model or "default")
    text = ", ".join(models) or spec
    if spec == "default" and not embedded_model_available():
        text += " — the embedded shapes model has not landed yet, so 'default' fell back to the random 'tiny' model"
    elif "tiny" in models:
        text += " (random weights: the numbers test the pipeline, not the methods)"
    elif "default" in models:
        text += " (the embedded SD-architecture model trained on the shapes world, 64 px)"
    return text


def render_markdown(
    cfg: BenchConfig,
    results: Sequence[Mapping[str, Any]],
    command: str,
    machine: Mapping[str, Any],
    commit: str,
    notes: Sequence[str],
    plots: Mapping[str, str | None],
    settings: Mapping[str, Any],
    sources: Mapping[str, str],
    wall_s: float | None,
) -> str:
    """The benchmark's Markdown page: header facts, Table 1 of the plain runs, a Table 2 per sweep, figures,
    what every column means, notes and errors.

    Args:
        cfg: the bench config.
        results: one result mapping per run (:func:`pipelines.bench.scoring.aggregate_run`).
        command: the command that made the runs.
        machine: :func:`pipelines.runinfo.machine_info`.
        commit: the git commit.
        notes: lines for the "Notes" section.
        plots: figure kind (:data:`PLOT_TITLES` keys) → file, ``None`` when not drawn.
        settings: the batch-job keys shared by every run.
        sources: metric → the weights it was computed with.
        wall_s: seconds the runs took in all, or ``None``.

    Returns:
        The Markdown document.
    """
    plain = [r for r in results if not r.get("sweep")]
    sweeps = list(dict.fromkeys(r["sweep"] for r in results if r.get("sweep")))
    name = Path(cfg.results).name
    out = [
        f"# Benchmark `{cfg.name}`",
        "",
        _made_with(command),
        "",
        f"* model: {_model_line(results, cfg)}",
        f"* rows: {results[0]['rows'] if results else 0} ({_data_line(cfg)}); engine: {cfg.engine}",
        f"* shared settings: `{json.dumps(settings, sort_keys=True)}`",
        f"* machine: {machine.get('cpu')} ({machine.get('cpu_count')} logical CPUs, shared), torch "
        f"{machine.get('torch')}; commit `{commit}`; {time.strftime('%Y-%m-%d %H:%M %Z')}"
        + (f"; the runs took {wall_s / 60:.1f} min in all" if wall_s else ""),
        "",
    ]
    if plain:
        out += ["## Methods (Table 1 layout)", "", markdown_table(plain, TABLE1), ""]
    for sweep in sweeps:
        members = [r for r in results if r.get("sweep") == sweep]
        params = list(members[0]["params"])
        reference = [r for r in plain if r.get("method") == "sdedit"]
        out += [f"## Sweep `{sweep}` (Table 2 layout)", "", markdown_table(members, TABLE2, params), ""]
        if reference:
            out += [
                "Mask-free reference (the paper's `None` row): "
                + ", ".join(
                    f"{r['label']}: IoU {_cell(r, TABLE1[2])} %, C_m {_cell(r, TABLE1[3])} %, "
                    f"C_non {_cell(r, TABLE1[4])} %, C_m/C_non {_cell(r, TABLE1[5])}"
                    for r in reference
                ),
                "",
            ]
    figures = [(k, v) for k, v in plots.items() if v]
    if figures:
        out += ["## Figures", ""]
        out += [f"![{PLOT_TITLES[k]}]({Path(v).name})" + "  " for k, v in figures] + [""]
    out += ["## Columns", ""]
    out += [f"* **{c.header}**: {c.meaning}." for c in TABLE1]
    out += ["* Means over the rows each method edited without error; C_m, C_non, LPIPS on the input's pixel grid."]
    if sources:
        out += ["* Weights: " + "; ".join(f"{k}: {v}" for k, v in sorted(sources.items())) + "."]
    out += [
        "* FID/CSFID over ~100 images are strongly biased upwards (2048-d features); compare them only "
        "between rows of this table."
    ]
    if notes:
        out += ["", "## Notes", ""] + [f"* {n}" for n in notes]
    out += earlier_runs(cfg.earlier)
    errors = {k: v for r in results for k, v in r.get("top_errors", {}).items()}
    if errors:
        out += ["", "## Errors", ""] + [f"* {v} × {k}" for k, v in errors.items()]
    out += ["", f"Raw numbers: [{name}.json]({name}.json).", ""]
    return "\n".join(out)


def earlier_runs(paths: Sequence[str]) -> list[str]:
    """The "Earlier runs" section: each earlier results JSON's tables, headed by its commit and date.

    Args:
        paths: results ``.json`` files written by earlier runs of the benchmark (the config's ``earlier``).

    Returns:
        Markdown lines (empty for no paths).

    Raises:
        ConfigError: a file that is missing or holds no benchmark results.
    """
    out: list[str] = []
    for path in paths:
        data = load_earlier(path)
        results = data["results"]
        plain = [r for r in results if not r.get("sweep")]
        swept = [r for r in results if r.get("sweep")]
        out += ["", f"## Earlier run: [{Path(path).name}]({Path(path).name})", ""]
        out += [f"Commit `{data.get('commit', '?')}`, {data.get('created', '?')}; kept for comparison.", ""]
        if plain:
            out += [markdown_table(plain, TABLE1), ""]
        if swept:
            out += [markdown_table(swept, TABLE2, list(swept[0]["params"])), ""]
    return out


def _made_with(command: str) -> str:
    """The command that made the runs (a ``--aggregate-only`` re-render is said as such)."""
    flag = " --aggregate-only"
    if flag in command:
        return (
            f"Made with: `{command.replace(flag, '')}` (tables and figures re-rendered from its outputs "
            f"with `{flag.strip()}`)"
        )
    return f"Made with: `{command}`"


def _data_line(cfg: BenchConfig) -> str:
    """Where the rows came from, in words."""
    d = cfg.data
    if d.make:
        return f"{d.make} world, {d.n} pairs, seed {d.seed}, {d.size} px"
    if d.format:
        return f"{d.format} from {d.src}" + (f", first {d.limit}" if d.limit else "")
    return f"{d.input}" + (f", first {d.limit}" if d.limit else "")
