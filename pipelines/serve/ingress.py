"""The ingress deployment: HTTP API v1 on FastAPI, the web page, and every check made before the model.

Ray Serve shape (STYLE 9): an ingress deployment separate from the model deployment; it parses, validates and
decodes (:mod:`pipelines.serve.parsing`), enforces the limits, calls the model through its handle with a timeout,
and turns every problem into ``{"error": {"code", "message"}}`` with the fitting status
(:mod:`pipelines.serve.errors`). A session's calls carry its id as the handle's ``session_id``, which the model
deployment's consistent-hash router maps to the replica holding the session (see :mod:`pipelines.serve.app`).

Endpoints: ``POST /v1/edits``, ``POST /v1/sessions``, ``POST /v1/sessions/{id}/edits``, ``GET`` and ``DELETE
/v1/sessions/{id}``, ``GET /v1/models``, ``GET``/``HEAD /healthz``, the schema ``/openapi.json`` and its page
``/docs`` (the app's own, without a CDN), the page ``/`` and its assets ``/static/*`` (``pipelines/serve/static/``).
Paths take no trailing slash (a JSON 404 names the path without it).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from instdiff.errors import InstdiffError
from pipelines.serve.config import ServeArgs
from pipelines.serve.errors import RequestError, error_body
from pipelines.serve.parsing import (
    JSON,
    MULTIPART,
    EditFields,
    SessionEditFields,
    SessionFields,
    check_body_size,
    check_steps,
    content_kind,
    decode_mask_field,
    edit_request,
    form_values,
    parse_json,
    to_fields,
    too_large,
)
from pipelines.serve.sessions import check_session_id, new_session_id

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
REPLICA_HEADER = "X-Instdiff-Replica"
BATCH_HEADER = "X-Instdiff-Batch-Size"
HEALTH_TIMEOUT_S = 10.0

api = FastAPI(
    title="instdiff",
    version="1",
    description="Text-driven image editing (InstDiffEdit, DiffEdit, SDEdit) and FISEdit edit sessions. Images are "
    "PNG/JPEG/WebP/BMP/TIFF, sent as base64 or data: URLs in JSON, or as files in multipart/form-data. Errors are "
    '{"error": {"code", "message"}}.',
    # Swagger UI and ReDoc load their scripts from a CDN, which an offline server and its users cannot reach, and
    # no installed package ships them: /docs is the app's own page over /openapi.json (static/docs.html)
    docs_url=None,
    redoc_url=None,
    # a trailing slash is answered with the API's JSON 404 (naming the path without it), not an empty 307
    redirect_slashes=False,
)
api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

_EDIT_DOC = {
    "requestBody": {
        "content": {
            JSON: {"schema": {"type": "object", "required": ["image", "target_prompt"]}},
            MULTIPART: {"schema": {"type": "object", "required": ["image", "target_prompt"]}},
        }
    }
}


def error_response(exc: BaseException, retry_after: int | None = None) -> JSONResponse:
    """The JSON error answer for ``exc`` (``Retry-After`` on 503)."""
    body = error_body(exc)
    return _answer(body, retry_after)


def _answer(out: dict[str, Any], retry_after: int | None = None) -> JSONResponse:
    """A model answer (or error body) as an HTTP response, with the replica and batch-size headers."""
    out = dict(out)
    status = int(out.pop("status", 200))
    headers = {}
    if "replica" in out:
        headers[REPLICA_HEADER] = str(out.pop("replica"))
    if "batch_size" in out:
        headers[BATCH_HEADER] = str(out["batch_size"])
    if status == 503 and retry_after:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(out, status_code=status, headers=headers)


def _replay(body: bytes) -> Any:
    """An ASGI ``receive`` that hands over ``body`` once (the stream was already read for the size check)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _static_page(name: str) -> Any:
    """An HTML page of ``static/``, or the JSON 404 when the package was installed without it."""
    page = STATIC_DIR / name
    if not page.is_file():
        return JSONResponse({"error": {"code": "not_found", "message": f"the page {name} is not installed"}}, 404)
    return FileResponse(page, media_type="text/html")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    path = request.url.path
    shown = path if len(path) <= 100 else f"{path[:80]}... ({len(path)} characters)"
    hint = f"; paths take no trailing slash: {path.rstrip('/')}" if len(path) > 1 and path.endswith("/") else ""
    message = f"{request.method} {shown}: {exc.detail}{hint}; see /docs for the API"
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()))
    message = f"{where}: {first.get('msg', 'invalid value')}"
    return JSONResponse({"error": {"code": "invalid_field", "message": message}}, status_code=422)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP front of the app.

    Args:
        model: handle of the :class:`~pipelines.serve.model.EditModel` deployment.
        args: the app's settings (limits).
    """

    def __init__(self, model: Any, args: ServeArgs) -> None:
        self.model = model
        self.args = args
        self.limits = args.limits

    # ---- plumbing -----------------------------------------------------------------------------------------
    async def _body(self, request: Request, cls: type) -> Any:
        """Read, size-check and parse a JSON or multipart body into ``cls``'s checked fields."""
        kind = content_kind(request.headers.get("content-type"))
        check_body_size(request.headers.get("content-length"), self.limits)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > self.limits.max_body_bytes:
                raise too_large("request body is larger", self.limits)
        if kind == JSON:
            return to_fields(cls, parse_json(bytes(body)))
        form_request = Request(request.scope, _replay(bytes(body)))
        try:
            form = await form_request.form(max_files=4, max_fields=64, max_part_size=self.limits.max_body_bytes)
        except Exception as exc:  # noqa: BLE001 - a malformed multipart body is the client's error
            raise RequestError(400, "bad_multipart", f"cannot read the multipart/form-data body ({exc})") from None
        return to_fields(cls, form_values(cls, form))

    async def _call(self, method: str, *args: Any, session_id: str | None = None) -> JSONResponse:
        """Call the model deployment with the request timeout; backpressure → 503, too slow → 504."""
        handle = self.model.options(session_id=session_id) if session_id else self.model
        try:
            out = await asyncio.wait_for(getattr(handle, method).remote(*args), self.limits.request_timeout_s)
        except TimeoutError:
            raise RequestError(
                504,
                "timeout",
                f"the model did not answer within {self.limits.request_timeout_s:g} s (limits.request_timeout_s); "
                "retry, or ask for fewer steps or a smaller image",
            ) from None
        except Exception as exc:
            from ray.serve.exceptions import BackPressureError

            if isinstance(exc, BackPressureError):
                raise RequestError(
                    503, "queue_full", "the server's queue is full (replicas.max_queued_requests); retry later"
                ) from None
            raise
        return _answer(out, self.limits.retry_after_s)

    async def _guard(self, work: Any) -> JSONResponse:
        """Run an endpoint's work; any exception becomes its JSON error (a bug: 500, logged, no traceback)."""
        try:
            return await work
        except Exception as exc:  # noqa: BLE001 - every failure is answered in the one error shape
            if not isinstance(exc, InstdiffError):
                log.exception("request failed")
            return error_response(exc, self.limits.retry_after_s)

    # ---- page ---------------------------------------------------------------------------------------------
    @api.get("/", include_in_schema=False)
    async def page(self) -> Any:
        """The web page (``static/index.html``)."""
        return _static_page("index.html")

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> Any:
        """The API's endpoints, read from ``/openapi.json`` by the page itself (``static/docs.html``; no CDN)."""
        return _static_page("docs.html")

    # ---- API ----------------------------------------------------------------------------------------------
    @api.post("/v1/edits", openapi_extra=_EDIT_DOC)
    async def edits(self, request: Request) -> JSONResponse:
        """One edit. Fields: ``image``, ``target_prompt``, optional ``source_prompt``, ``method`` (instdiffedit,
        diffedit, sdedit), ``steps``, ``strength``, ``guidance_scale``, ``seed``, ``mask`` (the region allowed to
        change). Answers ``image`` and ``mask`` (PNG base64, the input's size), ``method``, ``seed``,
        ``unet_calls``, ``timings``, ``warnings`` and ``parameters`` (every value used)."""

        async def work() -> JSONResponse:
            fields = await self._body(request, EditFields)
            return await self._call("edit", edit_request(fields, self.limits))

        return await self._guard(work())

    @api.post("/v1/sessions")
    async def create_session(self, request: Request) -> JSONResponse:
        """Start a FISEdit session: generate ``prompt`` from ``seed`` (optional ``steps``); the server keeps the
        run's cache. Answers ``session_id``, ``image``, ``timings``."""

        async def work() -> JSONResponse:
            f = await self._body(request, SessionFields)
            check_steps(f.steps, self.limits)
            sid = new_session_id()
            return await self._call("create_session", sid, f.prompt, f.seed, f.steps, session_id=sid)

        return await self._guard(work())

    @api.post("/v1/sessions/{session_id}/edits")
    async def edit_session(self, session_id: str, request: Request) -> JSONResponse:
        """Edit a session's prompt (optional ``mask``: the region to recompute); only the changed region is
        recomputed. Answers ``image``, ``mask``, ``active_fraction``, ``unet_macs_ratio``, ``timings``."""

        async def work() -> JSONResponse:
            check_session_id(session_id)
            f = await self._body(request, SessionEditFields)
            mask = decode_mask_field(f.mask, None, self.limits)
            return await self._call("edit_session", session_id, f.prompt, mask, session_id=session_id)

        return await self._guard(work())

    @api.get("/v1/sessions/{session_id}")
    async def get_session(self, session_id: str) -> JSONResponse:
        """A session's prompt, seed, steps, edit count and latest image."""
        return await self._guard(self._session_call("get_session", session_id))

    @api.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str) -> JSONResponse:
        """Delete a session and free its cache."""
        return await self._guard(self._session_call("delete_session", session_id))

    async def _session_call(self, method: str, session_id: str) -> JSONResponse:
        """``method(session_id)`` on the replica holding the session, after the id's form is checked."""
        check_session_id(session_id)
        return await self._call(method, session_id, session_id=session_id)

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        """The served model: name, resolution, vocabulary note, methods, defaults."""

        return await self._guard(self._call("info"))

    @api.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self) -> JSONResponse:
        """200 once a model replica is loaded and its warm-up denoising step ran; 503 otherwise (``HEAD``: the same
        status without the body)."""
        try:
            out = await asyncio.wait_for(self.model.health.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - not ready, for whatever reason
            message = f"the model is not ready ({type(exc).__name__})"
            return JSONResponse({"error": {"code": "not_ready", "message": message}}, 503, {"Retry-After": "5"})
        if not out.get("ready"):
            return JSONResponse({"error": {"code": "not_ready", "message": "the model is loading"}}, 503)
        return JSONResponse({"status": "ok", "model_replica": out.get("replica")})


__all__ = ["BATCH_HEADER", "REPLICA_HEADER", "STATIC_DIR", "Ingress", "api", "error_response"]
