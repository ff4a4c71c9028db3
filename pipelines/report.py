"""``instdiff report OUTPUT_DIR``: an HTML page and a PNG contact sheet of a batch job's output.

The page shows, for the first ``--limit`` ok rows (by id), the input image, the ground-truth mask (when the
input has one), the predicted mask and the edited image with the row's prompts and metrics; then a metrics
summary table (mean, std, min, max, count over ok rows), the status counts and the most common errors.
Input images are read from the job's input (recorded in ``OUTPUT_DIR/_runs/*.json``, or ``--input``).

Written to ``OUTPUT_DIR/_report/`` for a local output (``index.html``, ``contact_sheet.png``,
``summary.json``), or to ``--out``. The command ends with a one-line verdict (:func:`verdict`): rows ok, mean
IoU and, for shapes-world rows (whose ``meta`` names the target phrase), edit success as the shapes-world
scorer reads it (the target phrase found inside the ground-truth edit region); then the no-op edits, rows
whose edit changed less than 1/255 inside their own predicted mask (no ground truth needed).
"""

from __future__ import annotations

import argparse
import base64
import collections
import html
import json
import logging
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from instdiff.errors import InputNotFoundError, UsageError
from pipelines import schema as S
from pipelines import storage
from pipelines.contact_sheet import TILE, Panel, SheetRow, draw_contact_sheet, tile

log = logging.getLogger(__name__)

PANELS = ("input", "gt mask", "pred mask", "edited")
SUCCESS_ROWS = 256  # ok rows the verdict's edit success is measured on (the scorer reads each edited image)
NO_OP_CHANGE = 1.0 / 255.0  # an ok row whose change_inside_pred is below this left its own region as it was


def read_output(output: str, storage_cfg: storage.StorageConfig | None = None) -> pa.Table:
    """All rows of a batch output, one per id: an ok row wins over error rows, then the latest run.

    Args:
        output: the job's output folder (local or ``s3://``).
        storage_cfg: S3 settings (``None``: the AWS environment variables).

    Returns:
        The rows in the output schema (:func:`latest_rows`), sorted by id.

    Raises:
        InputNotFoundError: no readable Parquet files under ``output`` (unreadable ones are skipped with a warning).
        StorageError: ``output`` cannot be reached.
        SchemaError: the files are not in the batch output schema.
    """
    fs, path = storage.resolve(output, storage_cfg)
    files = storage.list_files(fs, path)
    if not files:
        raise InputNotFoundError(f"no Parquet files under {storage.display(fs, path)}")
    files, unreadable = storage.readable_parquet(fs, files)
    for f, reason in unreadable.items():
        log.warning("skipping unreadable file %s (%s); a re-run of the job moves it to _invalid/", f, reason)
    if not files:
        raise InputNotFoundError(f"no readable Parquet files under {storage.display(fs, path)}")
    with storage.reading(f"batch output {storage.display(fs, path)}"):
        table = pads.dataset(files, filesystem=fs, format="parquet").to_table()
    if S.CHANGE_INSIDE_PRED not in table.schema.names and S.ID in table.schema.names:
        # outputs written before the column existed (they had change_outside_pred): report them, no-op count unknown
        log.warning(
            "%s was written by an older instdiff (no %s column): the no-op edit count is not reported",
            output,
            S.CHANGE_INSIDE_PRED,
        )
        table = table.append_column(S.CHANGE_INSIDE_PRED, pa.nulls(table.num_rows, pa.float64()))
    problems = S.output_schema_problems(table.schema)
    if problems:
        raise S.SchemaError(f"{output} is not a batch output: {S.summarize_problems(problems)}")
    return latest_rows(table)


def latest_rows(table: pa.Table) -> pa.Table:
    """Keep one row per id (ok before error, then the highest run_id), sorted by id.

    Args:
        table: rows with at least the id, status and run_id columns.

    Returns:
        The kept rows, all columns.
    """
    if table.num_rows == 0:
        return table
    rank = pc.if_else(pc.equal(table[S.STATUS], S.STATUS_OK), 1, 0)
    order = pa.table(
        {"i": pa.array(range(table.num_rows)), S.ID: table[S.ID], "r": rank, "run": pc.fill_null(table[S.RUN_ID], "")}
    )
    order = order.sort_by([(S.ID, "ascending"), ("r", "descending"), ("run", "descending")])
    ids = order[S.ID].to_pylist()
    keep = [order["i"][k].as_py() for k in range(len(ids)) if k == 0 or ids[k] != ids[k - 1]]
    return table.take(pa.array(keep))


def summarize(table: pa.Table) -> dict[str, Any]:
    """Status counts, settings and metric statistics (ok rows; nulls and NaNs ignored).

    Args:
        table: output rows, one per id.

    Returns:
        ``rows``, ``ok``, ``error`` counts; the ``methods``, ``models`` and ``runs`` seen; ``metrics``: per
        metric column its mean, std, min, max (``None`` without values) and count; ``no_op``: ok rows whose
        ``change_inside_pred`` is below :data:`NO_OP_CHANGE` (edits that changed nothing inside their own
        mask; needs no ground truth); ``top_errors``: the 20 most common error messages with their counts.
    """
    status = table[S.STATUS].to_pylist()
    ok_mask = pc.equal(table[S.STATUS], S.STATUS_OK)
    ok = table.filter(ok_mask)
    metrics: dict[str, dict[str, float]] = {}
    for name in S.METRIC_COLUMNS:
        values = np.array([v for v in ok[name].to_pylist() if v is not None and not math.isnan(v)], dtype=float)
        if values.size:
            metrics[name] = {
                "mean": float(values.mean()),
                "std": float(values.std()),
                "min": float(values.min()),
                "max": float(values.max()),
                "count": int(values.size),
            }
        else:
            metrics[name] = {"mean": None, "std": None, "min": None, "max": None, "count": 0}
    inside = [v for v in ok[S.CHANGE_INSIDE_PRED].to_pylist() if v is not None and not math.isnan(v)]
    errors = collections.Counter(e for s, e in zip(status, table[S.ERROR].to_pylist(), strict=True) if s != S.STATUS_OK)
    return {
        "rows": table.num_rows,
        "ok": sum(1 for s in status if s == S.STATUS_OK),
        "error": sum(1 for s in status if s != S.STATUS_OK),
        "methods": sorted({m for m in table[S.METHOD].to_pylist() if m}),
        "models": sorted({m for m in table[S.MODEL].to_pylist() if m}),
        "runs": sorted({r for r in table[S.RUN_ID].to_pylist() if r}),
        "metrics": metrics,
        "no_op": sum(1 for v in inside if v < NO_OP_CHANGE),
        "top_errors": dict(errors.most_common(20)),
    }


def job_input(output: str, storage_cfg: storage.StorageConfig | None = None) -> str | None:
    """The input recorded by the latest run manifest of ``output``.

    Args:
        output: the job's output folder; manifests are ``OUTPUT/_runs/*.json``.
        storage_cfg: S3 settings.

    Returns:
        The input path or URI, or ``None`` when no readable manifest records one.
    """
    fs, path = storage.resolve(output, storage_cfg)
    manifests = [
        f
        for f in storage.list_files(fs, storage.join(path, "_runs"), suffix=".json")
        if not f.endswith(".summary.json")
    ]
    for f in reversed(manifests):
        try:
            return json.loads(storage.read_bytes(fs, f))["input"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def read_inputs(input_uri: str, ids: list[str], storage_cfg: storage.StorageConfig | None = None) -> dict[str, dict]:
    """The encoded input image and ground-truth mask of each of ``ids``.

    Args:
        input_uri: the job's input (Parquet file or folder, local or ``s3://``).
        ids: the row ids wanted.
        storage_cfg: S3 settings.

    Returns:
        ``{id: {"image": bytes, "mask": bytes | None, "meta": str | None}}``; empty when there are no ids or
        no input files.
    """
    fs, path = storage.resolve(input_uri, storage_cfg)
    files = storage.list_files(fs, path)
    if not files or not ids:
        return {}
    from pipelines.batch.inputs import read_input_table

    # as the job reads it: every file's columns, Image structs as bytes, dictionaries decoded
    table = read_input_table(fs, files, columns=(S.ID, S.IMAGE, S.MASK, S.META), ids=ids)
    out = {}
    for row in table.to_pylist():
        out[row[S.ID]] = {"image": row.get(S.IMAGE), "mask": row.get(S.MASK), "meta": row.get(S.META)}
    return out


def _panels(row: dict[str, Any], inp: dict[str, Any]) -> list[bytes | None]:
    """The encoded images of one row, in :data:`PANELS` order (a generated source replaces the input)."""
    source = row.get(S.GENERATED_SOURCE) or inp.get("image")
    return [source, inp.get("mask"), row.get(S.PRED_MASK), row.get(S.EDITED)]


def contact_sheet(rows: list[dict[str, Any]], inputs: dict[str, dict]) -> bytes:
    """PNG grid: one line per row (input | gt mask | pred mask | edited) under a header, ids on the left.

    Drawn by :func:`pipelines.contact_sheet.draw_contact_sheet` (300 px of labels: id, IoU, mask area and the
    row's source and target prompts, wrapped).

    Args:
        rows: output rows (``pipelines.schema`` output columns), in the order shown.
        inputs: ``{id: {"image": bytes, "mask": bytes | None}}`` from :func:`read_inputs`.

    Returns:
        PNG bytes.
    """
    lines = []
    for row in rows:
        iou = row.get(S.IOU)
        label = [
            row[S.ID][:28],
            f"iou {iou:.2f}" if iou is not None else "iou -",
            f"area {row.get(S.MASK_AREA) or 0:.2f}",
            *_wrap("from: " + (row.get(S.SOURCE_PROMPT) or "-")),
            *_wrap("to: " + (row.get(S.TARGET_PROMPT) or "-")),
        ]
        panels = [Panel(data, mask=k in (1, 2)) for k, data in enumerate(_panels(row, inputs.get(row[S.ID], {})))]
        lines.append(SheetRow("\n".join(label), panels))
    return draw_contact_sheet(PANELS, lines, label_width=LABEL_WIDTH, header_height=20)


LABEL_WIDTH = 300  # px of row labels on the contact sheet (about 48 characters of PIL's default font)


def _wrap(text: str, width: int = 48, lines: int = 4) -> list[str]:
    """``text`` in at most ``lines`` lines of ``width`` characters (the last one ends in '...' when cut)."""
    out = textwrap.wrap(text, width) or [""]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: width - 3] + "..."
    return out


def edit_success(rows: list[dict[str, Any]], inputs: dict[str, dict]) -> tuple[float | None, int]:
    """Share of shapes-world rows whose target phrase the shapes scorer finds inside the ground-truth mask.

    Rows count when their input's ``meta`` (JSON) holds a ``target_phrase`` and the input has a mask; the
    edited image is read at the mask's size (:func:`instdiff.scorer.phrase_present`).

    Args:
        rows: ok output rows.
        inputs: :func:`read_inputs` of their ids.

    Returns:
        ``(share or None without such rows, rows counted)``.
    """
    from instdiff.imageio import decode_image, decode_mask
    from instdiff.scorer import phrase_present

    hits = []
    for row in rows:
        inp = inputs.get(row[S.ID], {})
        try:
            phrase = json.loads(inp.get("meta") or "{}").get("target_phrase")
        except (ValueError, AttributeError):
            phrase = None
        if not phrase or inp.get("mask") is None or row.get(S.EDITED) is None:
            continue
        try:
            image, _ = decode_image(row[S.EDITED])
            region = decode_mask(inp["mask"], (image.shape[1], image.shape[0]))
            hits.append(bool(phrase_present(image, phrase, region=region)))
        except Exception as exc:  # noqa: BLE001 - a row the scorer cannot read is left out, not fatal
            log.warning("edit success: row %s left out (%s)", row[S.ID], exc)
    return (sum(hits) / len(hits), len(hits)) if hits else (None, 0)


def verdict(summary: dict[str, Any]) -> str:
    """The report's one-line verdict: rows ok, mean IoU, edit success (when measured), no-op edits.

    Args:
        summary: :func:`summarize`'s result, with ``edit_success`` and ``edit_success_rows`` when measured.

    Returns:
        e.g. ``verdict: 64/64 rows ok, mean IoU 0.62, edit success 0.70 (64 shapes rows), 2 no-op edits
        (change < 1/255 inside the predicted mask)``; the no-op count shows when rows have the measure.
    """
    iou = summary["metrics"].get(S.IOU, {}).get("mean")
    parts = [
        f"verdict: {summary['ok']}/{summary['rows']} rows ok",
        f"mean IoU {iou:.2f}" if iou is not None else "no IoU",
    ]
    if summary.get("edit_success") is not None:
        parts.append(f"edit success {summary['edit_success']:.2f} ({summary['edit_success_rows']} shapes rows)")
    if summary.get("no_op") is not None and summary["metrics"].get(S.CHANGE_INSIDE_PRED, {}).get("count"):
        parts.append(f"{summary['no_op']} no-op edits (change < 1/255 inside the predicted mask)")
    return ", ".join(parts)


def _img(data: bytes | None, alt: str) -> str:
    """An ``<img>`` with the picture inlined as a data URI (a gray box saying what is missing without one)."""
    if data is None:
        return f'<div class="missing">no {html.escape(alt)}</div>'
    b64 = base64.b64encode(data).decode()
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def _fmt(x: Any) -> str:
    """A table cell: 4 significant digits for floats, ``–`` for null or NaN, other values escaped."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4g}" if isinstance(x, float) else html.escape(str(x))


def render_html(
    output: str,
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    inputs: dict[str, dict],
    errors: list[dict[str, Any]],
) -> str:
    """The report page (self-contained: images inlined as data URIs).

    Args:
        output: the output folder, as shown in the title.
        summary: :func:`summarize` of all rows.
        rows: the ok rows shown as cards.
        inputs: their inputs (:func:`read_inputs`).
        errors: error rows (id and error) listed under "error rows".

    Returns:
        The HTML document.
    """
    metric_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(S.OUTPUT_DOC[name])}</td>"
        + "".join(f"<td>{_fmt(stats[k])}</td>" for k in ("mean", "std", "min", "max", "count"))
        + "</tr>"
        for name, stats in summary["metrics"].items()
    )
    error_rows = "".join(
        f"<tr><td>{n}</td><td>{html.escape(str(reason))}</td></tr>" for reason, n in summary["top_errors"].items()
    )
    error_ids = "".join(
        f"<tr><td>{html.escape(e[S.ID])}</td><td>{html.escape(e[S.ERROR] or '')}</td></tr>" for e in errors
    )
    cards = []
    for row in rows:
        inp = inputs.get(row[S.ID], {})
        figs = "".join(
            f"<figure>{_img(d, n)}<figcaption>{n}</figcaption></figure>"
            for n, d in zip(PANELS, _panels(row, inp), strict=True)
        )
        stats = " · ".join(
            f"{n} {_fmt(row.get(n))}" for n in (S.IOU, S.C_M, S.C_NON, S.MASK_AREA, S.CHANGE_INSIDE_PRED, S.LATENCY_S)
        )
        notes = f'<div class="notes">{html.escape(row[S.NOTES])}</div>' if row.get(S.NOTES) else ""
        cards.append(
            f'<div class="card"><div class="id">{html.escape(row[S.ID])}</div>'
            f'<div class="prompt">{html.escape(row.get(S.SOURCE_PROMPT) or "")} → '
            f"<b>{html.escape(row.get(S.TARGET_PROMPT) or '')}</b></div>"
            f'<div class="figs">{figs}</div><div class="stats">{stats}</div>{notes}</div>'
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>instdiff batch report: {html.escape(output)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
th {{ background: #f3f3f3; }} .card {{ border: 1px solid #ddd; padding: 8px; margin: 8px 0; }}
.figs {{ display: flex; gap: 8px; }} figure {{ margin: 0; text-align: center; font-size: 12px; }}
img {{ width: {TILE}px; height: {TILE}px; object-fit: contain; image-rendering: pixelated; background: #eee; }}
.missing {{ width: {TILE}px; height: {TILE}px; background: #eee; color: #888; font-size: 12px; }}
.id {{ font-family: monospace; }} .stats, .notes {{ font-size: 13px; color: #444; }}
</style></head><body>
<h1>instdiff batch report</h1>
<p>output: <code>{html.escape(output)}</code> · rows {summary["rows"]} · ok {summary["ok"]} ·
error {summary["error"]} · methods {html.escape(", ".join(summary["methods"]))} ·
models {html.escape(", ".join(summary["models"]))} · runs {len(summary["runs"])}</p>
<h2>Metrics (ok rows)</h2>
<table><tr><th>metric</th><th>meaning</th><th>mean</th><th>std</th><th>min</th><th>max</th><th>count</th></tr>
{metric_rows}</table>
<h2>Errors</h2>
<table><tr><th>rows</th><th>reason</th></tr>{error_rows or '<tr><td colspan="2">none</td></tr>'}</table>
{
        "<details><summary>error rows</summary><table><tr><th>id</th><th>error</th></tr>"
        + error_ids
        + "</table></details>"
        if error_ids
        else ""
    }
<h2>Rows (first {len(rows)} ok rows by id)</h2>
{"".join(cards)}
</body></html>
"""


def default_report_dir(output: str) -> str:
    """``OUTPUT/_report`` for a local output; ``report-<last part>`` in the working folder for a remote one."""
    if storage.is_remote(output):
        return f"report-{output.rstrip('/').rsplit('/', 1)[-1]}"
    return str(Path(output) / "_report")


def make_report(
    output: str,
    out_dir: str | None = None,
    input_uri: str | None = None,
    limit: int = 32,
    max_errors: int = 50,
    storage_cfg: storage.StorageConfig | None = None,
) -> dict[str, str]:
    """Write ``index.html``, ``contact_sheet.png`` and ``summary.json`` of a batch output.

    Args:
        output: the job's output folder (local or ``s3://``).
        out_dir: where to write (``None``: :func:`default_report_dir`).
        input_uri: the job's input (``None``: recorded in the run manifests; without one only outputs show).
        limit: ok rows shown (first by id).
        max_errors: error rows listed.
        storage_cfg: S3 settings.

    Returns:
        ``{file name: where it was written}`` and ``"verdict"``: the one-line verdict (:func:`verdict`; edit
        success over the first :data:`SUCCESS_ROWS` ok rows).

    Raises:
        InputNotFoundError: no Parquet files under ``output``.
        StorageError: ``output`` cannot be reached, a file under it is not Parquet, or the report folder is a
            file (or below one).
        SchemaError: the files are not in the batch output schema.
    """
    table = read_output(output, storage_cfg)
    report_dir = out_dir or default_report_dir(output)
    storage.check_output(report_dir, "report folder", folder=True, storage_cfg=storage_cfg)
    summary = summarize(table)
    ok = table.filter(pc.equal(table[S.STATUS], S.STATUS_OK))
    rows = ok.slice(0, limit).to_pylist()
    errors = table.filter(pc.not_equal(table[S.STATUS], S.STATUS_OK)).select([S.ID, S.ERROR])
    errors_list = errors.slice(0, max_errors).to_pylist()
    input_uri = input_uri or job_input(output, storage_cfg)
    inputs: dict[str, dict] = {}
    if input_uri:
        try:
            inputs = read_inputs(input_uri, [r[S.ID] for r in rows], storage_cfg)
        except (OSError, pa.ArrowException) as exc:
            log.warning("cannot read the input %s (%s); showing outputs only", input_uri, exc)
    else:
        log.warning("no input recorded for %s and no --input; showing outputs only", output)
    scored = ok.slice(0, SUCCESS_ROWS).to_pylist()
    if input_uri and scored:
        try:
            extra = (
                read_inputs(input_uri, [r[S.ID] for r in scored[len(rows) :]], storage_cfg)
                if len(scored) > len(rows)
                else {}
            )
        except (OSError, pa.ArrowException):
            extra = {}
        summary["edit_success"], summary["edit_success_rows"] = edit_success(scored, {**inputs, **extra})
    summary["verdict"] = verdict(summary)
    out_fs, out_path = storage.resolve(report_dir, storage_cfg)
    paths = {name: storage.join(out_path, name) for name in ("index.html", "contact_sheet.png", "summary.json")}
    storage.write_bytes(
        out_fs, paths["index.html"], render_html(output, summary, rows, inputs, errors_list).encode("utf-8")
    )
    storage.write_bytes(out_fs, paths["contact_sheet.png"], contact_sheet(rows, inputs))
    storage.write_bytes(
        out_fs, paths["summary.json"], json.dumps(summary, indent=2, default=str, allow_nan=True).encode("utf-8")
    )
    return {k: storage.display(out_fs, v) for k, v in paths.items()} | {"verdict": summary["verdict"]}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``instdiff report`` to the CLI's subparsers."""
    p = sub.add_parser(
        "report",
        help="HTML page + PNG contact sheet of a batch output",
        description="Render input / mask / edited triples with their metrics and a metrics summary.",
    )
    p.add_argument("output", help="batch output folder (local or s3://)")
    p.add_argument("--input", default=None, help="the job's input (default: recorded in OUTPUT/_runs)")
    p.add_argument("--out", default=None, help="report folder (default: OUTPUT/_report for local outputs)")
    p.add_argument("--limit", type=int, default=32, help="rows shown (first ok rows by id)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``instdiff report``: write the report and print its paths as JSON on stdout.

    Raises:
        UsageError: ``--limit`` below 1.
        InputNotFoundError: no Parquet files under the output.
    """
    if args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    paths = make_report(args.output, args.out, args.input, args.limit)
    log.info("report: %s (open it in a browser); contact sheet: %s", paths["index.html"], paths["contact_sheet.png"])
    line = paths.pop("verdict")
    print(json.dumps(paths))
    print(line, flush=True)
    return 0


__all__ = [
    "PANELS",
    "TILE",
    "contact_sheet",
    "default_report_dir",
    "edit_success",
    "job_input",
    "latest_rows",
    "make_report",
    "read_inputs",
    "read_output",
    "register",
    "render_html",
    "run",
    "summarize",
    "tile",
    "verdict",
]
