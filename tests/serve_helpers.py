"""Shared by the Serve tests: a private Serve instance on 127.0.0.1, app deployment, PNG helpers."""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image

TINY_ARGS: dict[str, Any] = {
    "model": {"spec": "tiny", "device": "cpu", "dtype": "fp32"},
    "replicas": {"num_replicas": 1, "num_cpus": 0, "threads": 1, "max_ongoing_requests": 16, "max_queued_requests": 64},
    "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.25},
    "limits": {
        "max_body_bytes": 400_000,
        "max_image_pixels": 300 * 300,
        "max_image_side": 300,
        "max_steps": 50,
        "request_timeout_s": 60,
        "retry_after_s": 3,
    },
    "sessions": {"steps": 4, "max_sessions": 3, "ttl_s": 600},
}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_instance() -> Iterator[int]:
    """Ray (reused if running, else a private 127.0.0.1 one) with Serve's HTTP proxy on a free port; yields the
    port; shuts Serve (and the Ray it started) down afterwards."""
    import ray
    from ray import serve

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=2,
            object_store_memory=256 * 2**20,
            log_to_driver=False,
        )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def deploy(args: dict[str, Any], name: str, prefix: str) -> None:
    """Deploy the app built from ``args`` under ``name`` at ``prefix`` and wait until it runs."""
    from ray import serve

    from pipelines.serve.app import build_app

    serve.run(build_app(args), name=name, route_prefix=prefix)


def png(array: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image or (H, W) bool mask."""
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8) * 255 if array.dtype == bool else array).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    """Base64 text of bytes."""
    return base64.b64encode(data).decode("ascii")


def decode_b64png(text: str) -> np.ndarray:
    """Pixels of a base64 PNG (RGB (H, W, 3) uint8, or (H, W) uint8 for a grey mask)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def scene(w: int = 48, h: int = 40, seed: int = 0) -> np.ndarray:
    """A small synthetic RGB scene: a grey background with a coloured square."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 128, np.uint8)
    c = rng.integers(0, 255, 3)
    img[h // 4 : 3 * h // 4, w // 4 : w // 2] = c
    return img


def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    """Poll ``url/healthz`` until 200 (bounded)."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz not 200 within {timeout_s} s")


def bomb_png(w: int = 20_000, h: int = 20_000) -> bytes:
    """A PNG whose header declares ``w``×``h`` pixels (400 M by default, over PIL's bomb limit) and holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
