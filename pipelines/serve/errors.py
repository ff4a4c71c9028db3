"""HTTP errors of the app: one JSON shape, the status chosen by the error's class.

Every error answer is ``{"error": {"code": ..., "message": ...}}``; the message is the project error's own (what
was wrong and what is accepted). The status follows the class: a bad image 400, a bad field, prompt or seed 422
(:class:`~instdiff.errors.ConfigError`, :class:`~instdiff.errors.EditInputError`), the app's own
:class:`RequestError` its ``status`` (404 unknown session, 413 too large, 415 wrong content type, 503 queue full,
504 too slow), an accelerator out of memory 503. Anything else is a bug: it is logged with its traceback on the
server and answered 500 with a message that names no internals.
"""

from __future__ import annotations

import logging
from typing import Any

from instdiff.errors import ConfigError, EditInputError, ImageInputError, InstdiffError, UsageError

log = logging.getLogger(__name__)


class RequestError(InstdiffError):
    """A request the app refuses, with the HTTP status and error code to answer.

    Args:
        status: the HTTP status (4xx, or 503/504 for capacity and time).
        code: a short machine-readable code (``too_large``, ``session_not_found``, …).
        message: what was wrong and what is accepted.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class SessionNotFoundError(RequestError):
    """A session id this replica does not hold (never made, deleted, expired or evicted)."""

    def __init__(self, message: str) -> None:
        super().__init__(404, "session_not_found", message)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reads as an accelerator out-of-memory error (checked by name: torch is not imported)."""
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def status_for(exc: BaseException) -> tuple[int, str]:
    """``(HTTP status, error code)`` for an exception (see the module docstring)."""
    if isinstance(exc, RequestError):
        return exc.status, exc.code
    if isinstance(exc, ImageInputError):
        return 400, "bad_image"
    if isinstance(exc, ConfigError | EditInputError | UsageError):
        return 422, "invalid_field"
    if isinstance(exc, InstdiffError):
        return 400, "bad_request"
    if is_out_of_memory(exc):
        return 503, "out_of_memory"
    return 500, "internal"


def error_body(exc: BaseException) -> dict[str, Any]:
    """The answer for ``exc``: ``{"error": {"code", "message"}, "status"}`` (``status`` is popped before sending).

    Project errors keep their message; out of memory says to retry; any other exception's text is not shown.
    """
    status, code = status_for(exc)
    if code == "out_of_memory":
        message = "the model ran out of accelerator memory for this request, even alone; retry later or ask less"
    elif code == "internal":
        log.error("request failed: %s", type(exc).__name__, exc_info=exc)  # the promise the message makes
        message = f"internal error ({type(exc).__name__}); the request was not completed and the server logged it"
    else:
        message = " ".join(str(exc).split()) or type(exc).__name__
    return {"error": {"code": code, "message": message}, "status": status}


__all__ = ["RequestError", "SessionNotFoundError", "error_body", "is_out_of_memory", "status_for"]
