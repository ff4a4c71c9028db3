"""The model deployment: one bundle per replica, batched edits, FISEdit sessions kept where their cache is.

Ray Serve shape (Ray docs; STYLE 9): the model loads once in ``__init__``; ``edit`` goes through
``@serve.batch``, whose handler groups compatible requests (:func:`pipelines.serve.engine.group_key`) into one
call of the editor contract. The model runs on one worker thread (``_pool``), so the replica's event loop keeps
answering health checks and routing while an edit runs, and the UNet never runs two things at once (a FISEdit
session installs its sparse engine on the UNet for the length of a call).

Every method answers a plain dict; an expected problem is an error body (``{"error": ..., "status": ...}``,
:func:`pipelines.serve.errors.error_body`) rather than an exception, so no traceback crosses to the ingress.
Each answer names the replica that made it (``replica``), which the ingress sends as ``X-Instdiff-Replica``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from instdiff.errors import InstdiffError
from pipelines.serve.config import ServeArgs
from pipelines.serve.engine import EditRequest, prepare_edit, run_edits
from pipelines.serve.errors import error_body, is_out_of_memory
from pipelines.serve.sessions import (
    SessionStore,
    capacity_note,
    create_session,
    edit_session,
    estimate_session_bytes,
    session_config,
)

log = logging.getLogger(__name__)


@serve.deployment(name="EditModel")
class EditModel:
    """Loads the model, proves one denoising step runs, then serves edits and sessions.

    Args:
        args: the app's settings (model, batching, sessions).
    """

    def __init__(self, args: ServeArgs) -> None:
        import torch

        from instdiff.editing import generate
        from instdiff.models import load_bundle

        if args.replicas.threads:
            torch.set_num_threads(args.replicas.threads)
        self.args = args
        self.ready = False
        t0 = time.perf_counter()
        m = args.model
        self.bundle = load_bundle(
            m.spec, device=m.device, dtype=m.dtype, local_files_only=m.local_files_only, inpaint=m.inpaint
        )
        generate(self.bundle, ["warm up"], steps=1, guidance=1.0, seeds=[0])  # one tiny denoising step
        self.load_seconds = time.perf_counter() - t0
        self.replica = _replica_id()
        self.sessions = SessionStore(args.sessions.max_bytes, args.sessions.max_sessions, args.sessions.ttl_s)
        self.session_bytes = self._log_session_capacity()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="instdiff-model")
        self._edit_batch.set_max_batch_size(args.batching.max_batch_size)
        self._edit_batch.set_batch_wait_timeout_s(args.batching.batch_wait_timeout_s)
        self.ready = True
        log.info(
            "model %s ready on %s in %.1f s (replica %s)", m.spec, self.bundle.device, self.load_seconds, self.replica
        )

    def _log_session_capacity(self) -> int | None:
        """Measure one session's cache (:func:`~pipelines.serve.sessions.estimate_session_bytes`) and log how
        many the budget holds (a warning when none fits); ``None`` when the measurement fails (logged too)."""
        s = self.args.sessions
        try:
            nbytes = estimate_session_bytes(self.bundle, s.steps, s.mask_steps)
        except Exception as exc:  # noqa: BLE001 - edits still work; sessions will report their own errors
            log.warning("sessions: cannot measure a session's cache (%s: %s)", type(exc).__name__, exc)
            return None
        line, none_fits = capacity_note(nbytes, s.max_bytes, s.max_sessions)
        (log.warning if none_fits else log.info)(line)
        return nbytes

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's ``user_config`` hook: change batching without restarting the replica.

        Args:
            config: ``{"max_batch_size": int, "batch_wait_timeout_s": float}`` (either key; checked by
                :class:`~pipelines.serve.config.BatchingConfig`, and against ``max_ongoing_requests``).

        Raises:
            ConfigError: unknown keys or bad values.
        """
        from dataclasses import replace

        from instdiff.config import from_mapping
        from pipelines.serve.config import BatchingConfig

        merged = {**vars(self.args.batching), **dict(config)}
        self.args = replace(self.args, batching=from_mapping(BatchingConfig, merged, "user_config"))
        self._edit_batch.set_max_batch_size(self.args.batching.max_batch_size)
        self._edit_batch.set_batch_wait_timeout_s(self.args.batching.batch_wait_timeout_s)

    # ---- health -----------------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Ray Serve's health hook: raises until the model is loaded and its warm-up step ran."""
        if not self.ready:
            raise RuntimeError("model not loaded yet")

    async def health(self) -> dict[str, Any]:
        """Readiness, for ``GET /healthz``."""
        return {"ready": self.ready, "replica": self.replica, "load_seconds": round(self.load_seconds, 3)}

    async def info(self) -> dict[str, Any]:
        """The model's description, for ``GET /v1/models``."""
        from instdiff.config import Method
        from instdiff.editing import size_multiple

        b = self.bundle
        return {
            "name": b.name,
            "spec": self.args.model.spec,
            "resolution": b.resolution,
            "size_multiple": size_multiple(b),
            "device": str(b.device),
            "dtype": str(b.dtype).replace("torch.", ""),
            "defaults": {
                "steps": int(b.defaults.get("steps", 50)),
                "guidance_scale": float(b.defaults.get("guidance", 7.5)),
            },
            "methods": [m.value for m in Method if m is not Method.FISEDIT],
            "sessions": "fisedit",
            "session_cache_bytes": self.session_bytes,  # about one session's cache (None: not measured)
            "vocabulary": _vocabulary_note(self.args.model.spec),
            "replica": self.replica,
        }

    # ---- edits --------------------------------------------------------------------------------------------
    async def _run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the model thread; an exception becomes its error body."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        except Exception as exc:  # noqa: BLE001 - answered as an error body, never raised across Ray
            if is_out_of_memory(exc):  # answered 503; free what the failed call held so the replica goes on
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            elif not isinstance(exc, InstdiffError):
                log.exception("model call failed")
            return error_body(exc)

    async def edit(self, request: EditRequest) -> dict[str, Any]:
        """One edit (batched with others by ``@serve.batch``); the answer or an error body."""
        out = await self._edit_batch(request)
        out["replica"] = self.replica
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _edit_batch(self, requests: list[EditRequest]) -> list[dict[str, Any]]:
        out = await self._run(self._edits, requests)
        return out if isinstance(out, list) else [dict(out) for _ in requests]

    def _edits(self, requests: list[EditRequest]) -> list[dict[str, Any]]:
        """Check each request, then edit them in compatible groups (model thread)."""
        prepared: list[Any] = []
        for r in requests:
            try:
                e = self.args.edits
                prepared.append(prepare_edit(self.bundle, self.args.model.spec, r, e.size, e.size_policy.value))
            except Exception as exc:  # noqa: BLE001 - that request's error answer; its batch-mates go on
                prepared.append(error_body(exc))
        return run_edits(self.bundle, prepared)

    # ---- sessions -----------------------------------------------------------------------------------------
    async def create_session(self, sid: str, prompt: str, seed: int, steps: int | None) -> dict[str, Any]:
        """Generate and keep a new session; the answer (``session_id``, ``image``, …) or an error body."""

        def work() -> dict[str, Any]:
            cfg = session_config(self.bundle, steps or self.args.sessions.steps, self.args.sessions.mask_steps)
            session, answer = create_session(self.bundle, sid, prompt, seed, cfg)
            self.sessions.put(session)
            return answer

        return self._tag(await self._run(work))

    async def edit_session(self, sid: str, prompt: str, mask: np.ndarray | None) -> dict[str, Any]:
        """Edit a session held by this replica (FISEdit); the answer or an error body (404: not here)."""
        return self._tag(await self._run(lambda: edit_session(self.bundle, self.sessions.get(sid), prompt, mask)))

    async def get_session(self, sid: str) -> dict[str, Any]:
        """The session's description and latest image, or a 404 body."""
        from pipelines.serve.engine import b64png

        def work() -> dict[str, Any]:
            s = self.sessions.get(sid)
            return dict(s.describe(), image=b64png(s.image))

        return self._tag(await self._run(work))

    async def delete_session(self, sid: str) -> dict[str, Any]:
        """Delete the session, or a 404 body."""

        def work() -> dict[str, Any]:
            self.sessions.delete(sid)
            return {"session_id": sid, "deleted": True}

        return self._tag(await self._run(work))

    def _tag(self, out: dict[str, Any]) -> dict[str, Any]:
        out["replica"] = self.replica
        return out


def _replica_id() -> str:
    """This replica's unique id (``os.getpid()`` outside Serve)."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - outside a replica (direct use in tests)
        return f"pid-{os.getpid()}"


def _vocabulary_note(spec: str) -> str:
    """What prompts the model understands."""
    if spec == "default":
        return "the embedded shapes-world model knows its captions' words only: colours and shapes on backgrounds"
    if spec.startswith("tiny"):
        return "random test model: any words, meaningless images"
    return "a CLIP text encoder: free English text, 77 tokens read"


__all__ = ["EditModel"]
