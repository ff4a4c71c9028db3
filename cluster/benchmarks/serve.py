"""Serve benchmark: latency and throughput of the HTTP app against the same work in-process, and FISEdit sessions.

1. **Edits** — closed-loop load (each of C clients sends its next request when the previous one is answered) at
   each concurrency, with batching on (``max_batch_size`` = the largest C) and off (1), against the same requests
   run in-process through the same steps without Serve or HTTP (:func:`pipelines.serve.engine.prepare_edit` +
   :func:`~pipelines.serve.engine.run_edits` one at a time, PNG decoding and encoding included). Reports
   p50/p95/p99 latency and requests/s. Goals (issue 11): Serve's overhead at concurrency 1 ≤ 10 % of the
   in-process time per request; batching ≥ 1.5× the unbatched throughput at the largest concurrency.
2. **Sessions** — a session edit with a given mask of about ``--area`` of the image against regenerating the image
   for the new prompt, in-process (:class:`instdiff.sparse.session.FISEditSession`) and through HTTP
   (``POST /v1/sessions/{id}/edits`` vs ``POST /v1/sessions``), on the embedded model and on an SD-1.5-shaped UNet
   (random weights; a tiny text encoder and VAE) at 32×32 latents, the latent size of a 256-px SD-1.5 image. Goal:
   HTTP speed-up ≥ 0.9 × the in-process speed-up.

Everything listens on 127.0.0.1; a private local Ray is started. Writes JSON (machine, commit, parameters,
results) and Markdown::

    nice -n 10 python -m cluster.benchmarks.serve --out docs/results/serve.json --md docs/results/serve.md
    python -m cluster.benchmarks.serve --model default --concurrency 1 4 16 --steps 10    # the full edit sweep
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.runinfo import write_report

log = logging.getLogger(__name__)


# ---- requests ------------------------------------------------------------------------------------------------------
def scene_png(side: int, seed: int) -> bytes:
    """PNG of a grey scene with one coloured square (side × side px)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.full((side, side, 3), 128, np.uint8)
    a, b = sorted(rng.integers(side // 8, side - side // 8, 2))
    img[a:b, a:b] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 and mean of ``values`` (seconds)."""
    v = sorted(values)

    def q(p: float) -> float:
        return v[min(len(v) - 1, max(0, round(p * (len(v) - 1))))]

    return {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "mean": statistics.fmean(v), "n": len(v)}


# ---- edits ---------------------------------------------------------------------------------------------------------
def in_process_edits(spec: str, bodies: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """The same requests through the model deployment's steps, one at a time, without Serve or HTTP."""
    import torch

    from instdiff import imageio
    from instdiff.models import load_bundle
    from pipelines.serve.engine import EditRequest, prepare_edit, run_edits

    torch.set_num_threads(threads)
    bundle = load_bundle(spec, device="cpu", dtype="fp32")
    times = []
    for i, body in enumerate([bodies[0], *bodies]):  # the first is a warm-up
        t0 = time.perf_counter()
        array, notes = imageio.decode_image(base64.b64decode(body["image"]))
        fields = {k: v for k, v in body.items() if k != "image"}
        req = EditRequest(image=array, notes=notes, **fields)
        out = run_edits(bundle, [prepare_edit(bundle, spec, req, "model", "resize")])[0]
        json.dumps(out)
        if i:
            times.append(time.perf_counter() - t0)
    stats = percentiles(times)
    stats["rps"] = 1.0 / stats["mean"]
    return stats


def closed_loop(url: str, bodies: list[dict[str, Any]], clients: int, per_client: int) -> dict[str, Any]:
    """``clients`` threads, each sending ``per_client`` requests back to back; latency stats and requests/s."""
    import requests

    def client(c: int) -> list[tuple[float, int, int]]:
        out = []
        with requests.Session() as http:
            for k in range(per_client):
                body = bodies[(c * per_client + k) % len(bodies)]
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/edits", json=body, timeout=1800)
                out.append((time.perf_counter() - t0, r.status_code, int(r.headers.get("X-Instdiff-Batch-Size", 0))))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = [x for chunk in pool.map(client, range(clients)) for x in chunk]
    wall = time.perf_counter() - t0
    ok = [t for t, s, _ in rows if s == 200]
    stats = percentiles(ok) if ok else {}
    stats.update(
        rps=len(ok) / wall,
        errors=len(rows) - len(ok),
        mean_batch=statistics.fmean(b for _, s, b in rows if s == 200) if ok else 0.0,
        wall_s=wall,
    )
    return stats


# ---- sessions ------------------------------------------------------------------------------------------------------
def sd15_folder(out: Path) -> str:
    """Save a bundle with an SD-1.5-shaped random UNet (32×32 latents) and the tiny text encoder and VAE."""
    import torch
    from diffusers import UNet2DConditionModel

    from cluster.benchmarks.sparse import MODELS
    from instdiff.models import save_bundle
    from instdiff.tiny import tiny_bundle

    bundle = tiny_bundle(image_size=128)  # VAE factor 4: 128 px → 32×32 latents
    torch.manual_seed(0)
    cfg = dict(MODELS["sd15"], sample_size=32, cross_attention_dim=bundle.text_encoder.config.hidden_size)
    bundle.unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    bundle.name = "sd15-shaped"
    save_bundle(bundle, out)
    return str(out)


def rect_mask(side: int, area: float) -> np.ndarray:
    """(side, side) bool with a centred square of about ``area`` of the pixels."""
    k = max(1, round(side * area**0.5))
    m = np.zeros((side, side), bool)
    a = (side - k) // 2
    m[a : a + k, a : a + k] = True
    return m


def session_in_process(spec: str, steps: int, mask: np.ndarray, reps: int, threads: int) -> dict[str, Any]:
    """Generation (= regeneration cost) and masked edit times in-process."""
    import torch

    from instdiff.models import load_bundle
    from instdiff.sparse.session import FISEditSession
    from pipelines.serve.sessions import session_config

    torch.set_num_threads(threads)
    bundle = load_bundle(spec, device="cpu", dtype="fp32")
    session = FISEditSession(bundle, session_config(bundle, steps, None))
    _, cache = session.generate("a red square", 0)  # warm-up
    gen, edit = [], []
    for i in range(reps):
        t0 = time.perf_counter()
        _, cache = session.generate("a red square", i)
        gen.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        session.edit(cache, "a blue square", torch.from_numpy(mask))
        edit.append(time.perf_counter() - t0)
    g, e = statistics.median(gen), statistics.median(edit)
    return {"regenerate_s": g, "edit_s": e, "speedup": g / e}


def session_http(url: str, steps: int, mask_png: bytes, reps: int) -> dict[str, Any]:
    """The same through HTTP: ``POST /v1/sessions`` (a full generation) vs a masked session edit."""
    import requests

    m = base64.b64encode(mask_png).decode()
    requests.post(f"{url}/v1/sessions", json={"prompt": "a red square", "seed": 0, "steps": steps}, timeout=1800)
    gen, edit = [], []
    for i in range(reps):
        t0 = time.perf_counter()
        r = requests.post(
            f"{url}/v1/sessions", json={"prompt": "a red square", "seed": i, "steps": steps}, timeout=1800
        )
        gen.append(time.perf_counter() - t0)
        r.raise_for_status()
        sid = r.json()["session_id"]
        t0 = time.perf_counter()
        e = requests.post(f"{url}/v1/sessions/{sid}/edits", json={"prompt": "a blue square", "mask": m}, timeout=1800)
        edit.append(time.perf_counter() - t0)
        e.raise_for_status()
        active = e.json()["active_fraction"]
    g, ed = statistics.median(gen), statistics.median(edit)
    return {"regenerate_s": g, "edit_s": ed, "speedup": g / ed, "active_fraction": active}


# ---- run -----------------------------------------------------------------------------------------------------------
def app_args(spec: str, batch: int, threads: int, steps: int | None = None) -> dict[str, Any]:
    """The app's ``args`` for a benchmark deployment (CPU, one replica)."""
    return {
        "model": {"spec": spec, "device": "cpu", "dtype": "fp32"},
        "replicas": {"num_cpus": 0, "threads": threads, "max_ongoing_requests": max(batch, 16)},
        "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.05 if batch > 1 else 0.0},
        "limits": {"request_timeout_s": 1800, "max_steps": 1000},
        "sessions": {"steps": steps, "max_bytes": 2**33},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start Ray and Serve on 127.0.0.1, run both parts, shut down; returns the results."""
    import socket

    import ray
    from ray import serve

    from pipelines.serve.app import build_app

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {"edits": {}, "sessions": {}}
    try:
        from instdiff.models import load_bundle

        side = load_bundle(args.model, device="cpu").resolution
        bodies = [
            {
                "image": base64.b64encode(scene_png(side, i)).decode(),
                "target_prompt": "a blue square",
                "method": args.method,
                "steps": args.steps,
                "seed": i,
            }
            for i in range(8)
        ]
        # 1. edits: in-process, then one app with batching off, then on (Serve's reconfigure, no restart)
        results["edits"]["in_process"] = in_process_edits(args.model, bodies, args.threads)
        serve.run(
            build_app(app_args(args.model, max(args.concurrency), args.threads, args.session_steps)),
            name="bench",
            route_prefix="/bench",
        )
        model = serve.get_deployment_handle("EditModel", app_name="bench")
        for mode, batch in (("unbatched", 1), ("batched", max(args.concurrency))):
            model.reconfigure.remote(
                {"max_batch_size": batch, "batch_wait_timeout_s": 0.05 if batch > 1 else 0.0}
            ).result()
            closed_loop(f"{base}/bench", bodies[:1], 1, 1)  # warm-up
            results["edits"][mode] = {
                str(c): closed_loop(f"{base}/bench", bodies, c, max(args.per_client, args.min_requests // c))
                for c in args.concurrency
            }
            log.info("%s: %s", mode, results["edits"][mode])
        # 2. sessions
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.session_models:
                spec, steps = (
                    (sd15_folder(Path(tmp) / "sd15"), args.sd15_steps) if name == "sd15" else (name, args.session_steps)
                )
                side = load_bundle(spec, device="cpu").resolution
                mask = rect_mask(side, args.area)
                buf = io.BytesIO()
                from PIL import Image

                Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
                inproc = session_in_process(spec, steps, mask, args.reps, args.threads)
                if spec == args.model and steps == args.session_steps:  # the edit app serves these sessions too
                    http = session_http(f"{base}/bench", steps, buf.getvalue(), args.reps)
                else:
                    serve.run(build_app(app_args(spec, 1, args.threads, steps)), name="sessions", route_prefix="/s")
                    http = session_http(f"{base}/s", steps, buf.getvalue(), args.reps)
                    serve.delete("sessions")
                results["sessions"][name] = {
                    "side_px": side,
                    "steps": steps,
                    "mask_area": float(mask.mean()),
                    "in_process": inproc,
                    "http": http,
                    "ratio": http["speedup"] / inproc["speedup"],
                }
                log.info("session %s: %s", name, results["sessions"][name])
    finally:
        serve.shutdown()
        ray.shutdown()
    e = results["edits"]
    c1, cmax = str(min(args.concurrency)), str(max(args.concurrency))
    overhead = e["unbatched"][c1]["p50"] / e["in_process"]["p50"] - 1.0
    gain = e["batched"][cmax]["rps"] / e["unbatched"][cmax]["rps"]
    results["goals"] = {
        "overhead_c1": {"value": overhead, "goal": "<= 0.10", "met": overhead <= 0.10},
        "batching_gain": {"value": gain, "goal": ">= 1.5", "met": gain >= 1.5, "concurrency": int(cmax)},
        "session_speedup_kept": {
            name: {"value": s["ratio"], "goal": ">= 0.9", "met": s["ratio"] >= 0.9}
            for name, s in results["sessions"].items()
        },
    }
    return results


def markdown(doc: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    p, r = doc["params"], doc["results"]
    m = doc["machine"]
    lines = [
        "# Serve benchmark",
        "",
        f"Commit `{doc['commit']}`, {doc['created']}; machine: {m.get('cpu', m.get('platform', ''))}, "
        f"{m.get('cpu_count', '?')} CPUs; {p['note']}",
        "",
        f"## Edits ({p['model']} model, {p['method']}, {p['steps']} steps; closed loop)",
        "",
        "| mode | clients | p50 s | p95 s | p99 s | req/s | mean batch | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ip = r["edits"]["in_process"]
    lines.append(f"| in-process | 1 | {ip['p50']:.3f} | {ip['p95']:.3f} | {ip['p99']:.3f} | {ip['rps']:.2f} | 1 | 0 |")
    for mode in ("unbatched", "batched"):
        for c, s in r["edits"][mode].items():
            lines.append(
                f"| {mode} | {c} | {s['p50']:.3f} | {s['p95']:.3f} | {s['p99']:.3f} | {s['rps']:.2f} | "
                f"{s['mean_batch']:.1f} | {s['errors']} |"
            )
    g = r["goals"]
    lines += [
        "",
        "## Sessions (a masked edit against regenerating the image)",
        "",
        "| model | px | steps | mask area | in-process regen / edit s | speed-up | HTTP regen / edit s | speed-up "
        "| ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in r["sessions"].items():
        i, h = s["in_process"], s["http"]
        lines.append(
            f"| {name} | {s['side_px']} | {s['steps']} | {s['mask_area']:.3f} | {i['regenerate_s']:.2f} / "
            f"{i['edit_s']:.2f} | {i['speedup']:.2f}× | {h['regenerate_s']:.2f} / {h['edit_s']:.2f} | "
            f"{h['speedup']:.2f}× | {s['ratio']:.2f} |"
        )
    lines += [
        "",
        "## Goals",
        "",
        f"- Serve overhead at concurrency 1 (unbatched p50 / in-process p50 − 1): {g['overhead_c1']['value']:+.1%} "
        f"(goal ≤ 10 %): {'met' if g['overhead_c1']['met'] else 'not met'}",
        f"- batching gain at concurrency {g['batching_gain']['concurrency']} (batched / unbatched req/s): "
        f"{g['batching_gain']['value']:.2f}× (goal ≥ 1.5×): {'met' if g['batching_gain']['met'] else 'not met'}",
    ]
    for name, s in g["session_speedup_kept"].items():
        lines.append(
            f"- session speed-up kept through HTTP, {name}: {s['value']:.2f} (goal ≥ 0.9): "
            f"{'met' if s['met'] else 'not met'}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run, write JSON and Markdown."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="model of the edit sweep (default: the embedded one)")
    ap.add_argument("--method", default="sdedit", choices=["sdedit", "instdiffedit", "diffedit"])
    ap.add_argument("--steps", type=int, default=4, help="DDIM steps of each edit")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--per-client", type=int, default=1, help="requests per client (at least)")
    ap.add_argument("--min-requests", type=int, default=16, help="requests per level (at least)")
    ap.add_argument("--session-models", nargs="*", default=["default", "sd15"], help="default, tiny, sd15")
    ap.add_argument("--session-steps", type=int, default=10)
    ap.add_argument("--sd15-steps", type=int, default=4)
    ap.add_argument("--area", type=float, default=0.05, help="changed area of the session edit")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, in-process and per replica")
    ap.add_argument("--note", default="", help="a line on the conditions, into the report")
    ap.add_argument("--out", default="docs/results/serve.json")
    ap.add_argument("--md", default="docs/results/serve.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    results = run(args)
    params = {k: v for k, v in vars(args).items() if k not in ("out", "md")}
    path = write_report(args.out, params, results, wall_s=time.perf_counter() - t0)
    doc = json.loads(path.read_text())
    Path(args.md).write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
