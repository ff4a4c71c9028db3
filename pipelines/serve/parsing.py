"""Request bodies → checked fields and decoded images, on the ingress (before anything reaches the model).

One set of fields per endpoint, as frozen dataclasses parsed with the project's one parser
(:func:`instdiff.config.from_mapping`: unknown keys, missing ones and wrong types are refused naming the field and
what is accepted). The same fields come as JSON (images as base64 text or a ``data:`` URL) or as
``multipart/form-data`` (images as files; other values as text, read as JSON where the field is not text).
Images and masks are decoded by :func:`instdiff.imageio.decode_image` / :func:`~instdiff.imageio.decode_mask`,
the CLI's and the batch job's decoders.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import typing
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from instdiff import imageio
from instdiff.config import SEED_MAX, SEED_MIN, Method, from_mapping
from instdiff.errors import ConfigError
from pipelines.serve.config import LimitsConfig
from pipelines.serve.engine import EDIT_METHODS, EditRequest, check_method
from pipelines.serve.errors import RequestError

JSON = "application/json"
MULTIPART = "multipart/form-data"


@dataclass(frozen=True)
class EditFields:
    """``POST /v1/edits``: ``image`` and ``mask`` are base64 / ``data:`` URL text (JSON) or files (multipart)."""

    image: Any
    target_prompt: str
    source_prompt: str | None = None
    method: str = Method.INSTDIFFEDIT.value
    steps: int | None = None
    strength: float = 0.5
    guidance_scale: float | None = None
    seed: int = 0
    mask: Any = None


@dataclass(frozen=True)
class SessionFields:
    """``POST /v1/sessions``: generate ``prompt`` from ``seed``."""

    prompt: str
    seed: int = 0
    steps: int | None = None


@dataclass(frozen=True)
class SessionEditFields:
    """``POST /v1/sessions/{id}/edits``: the changed prompt, and optionally the region to recompute."""

    prompt: str
    mask: Any = None


def content_kind(content_type: str | None) -> str:
    """``JSON`` or ``MULTIPART`` from a ``Content-Type`` header.

    Raises:
        RequestError: 415 for any other type.
    """
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in (JSON, MULTIPART):
        return kind
    raise RequestError(
        415,
        "unsupported_media_type",
        f"content type {kind or '(none)'!r} is not accepted; send {JSON} (images as base64 or data: URLs) or "
        f"{MULTIPART} (images as files)",
    )


def check_body_size(declared: str | None, limits: LimitsConfig) -> None:
    """Refuse a body whose ``Content-Length`` is over ``limits.max_body_bytes`` (413) before reading it."""
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_large(f"request body is {int(declared)} bytes", limits)


def too_large(what: str, limits: LimitsConfig) -> RequestError:
    """The 413 error for a body over the limit."""
    return RequestError(413, "too_large", f"{what}, over this server's limit of {limits.max_body_bytes} bytes")


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object body.

    Raises:
        RequestError: 400 for invalid JSON or a top level that is not an object.
    """
    try:
        data = json.loads(body, object_pairs_hook=_unique_keys, parse_int=_parse_int)
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, "bad_json", f"request body is not valid JSON ({exc}); send a JSON object") from None
    except RecursionError:
        raise RequestError(400, "bad_json", "request body nests too deeply; send a flat JSON object") from None
    if not isinstance(data, dict):
        kind = "int" if isinstance(data, _LongInteger) else type(data).__name__
        raise RequestError(400, "bad_json", f"request body must be a JSON object; got {kind}")
    return data


MAX_INT_DIGITS = 40
"""Digits of the longest integer a request may hold (seeds have at most 20); Python itself refuses to read
integers over 4300 digits, with advice meant for programmers."""


class _LongInteger:
    """An integer too long to be any field's value: its digit count, for the message of the field it was in."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-+"))


def _parse_int(text: str) -> int | _LongInteger:
    """``json``'s ``parse_int``: an integer, or a :class:`_LongInteger` that the field's check refuses."""
    return _LongInteger(text) if len(text) > MAX_INT_DIGITS else int(text)


def _refuse_long(key: str, value: Any) -> None:
    """Refuse a field whose value is (or lists) an integer of more than :data:`MAX_INT_DIGITS` digits.

    Raises:
        RequestError: 422 naming the field and its accepted range.
    """
    items = value if isinstance(value, list) else [value]
    long = next((v for v in items if isinstance(v, _LongInteger)), None)
    if long is None:
        return
    accepted = (
        f"an integer from {SEED_MIN} to {SEED_MAX}"
        if key == "seed"
        else f"see the field's range in /openapi.json; integers here have at most {MAX_INT_DIGITS} digits"
    )
    raise RequestError(
        422, "invalid_field", f"{key}: a {long.digits}-digit integer is out of range; accepted: {accepted}"
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a key given twice (which one would win is not the client's to guess)
    and an integer too long to be any field's value.

    Raises:
        RequestError: 400 naming the repeated field; 422 naming the field with an overlong integer.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RequestError(400, "bad_json", f"field {key!r} is given twice; give each field once")
        _refuse_long(key, value)
        out[key] = value
    return out


def form_values(cls: type, form: Any) -> dict[str, Any]:
    """Multipart form → a mapping for ``cls``: files as bytes, text fields of non-text types read as JSON.

    An empty text value of an optional field counts as absent (HTML forms send empty inputs).

    Raises:
        RequestError: 400 for a field given twice; 422 for an integer over :data:`MAX_INT_DIGITS` digits.
    """
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in out:
            raise RequestError(400, "bad_multipart", f"form field {key!r} is given twice; give each field once")
        if hasattr(value, "file"):  # an upload
            out[key] = value.file.read()
            continue
        tp = hints.get(key)
        if tp is None or tp is str or tp == str | None or tp is Any:
            out[key] = value
            continue
        if value == "":
            continue
        try:
            out[key] = json.loads(value, parse_int=_parse_int)
        except ValueError:
            out[key] = value  # the parser names the field and the type it wanted
        _refuse_long(key, out[key])
    return out


def to_fields(cls: type, data: dict[str, Any]) -> Any:
    """Checked fields from a mapping (:func:`instdiff.config.from_mapping`); ``ConfigError`` on a bad one (422)."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a JSON object with keys {', '.join(f.name for f in fields(cls))}")
    return from_mapping(cls, data)


def image_bytes(value: Any, name: str) -> bytes:
    """Bytes of an image field: a file's bytes, or base64 text (``data:image/...;base64,`` prefix allowed).

    Raises:
        RequestError: 400 when the text is not base64 or the value is neither text nor a file.
    """
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str):
        raise RequestError(
            400,
            "bad_image",
            f"{name}: expected base64 text or a data: URL (JSON) or a file (multipart); got {type(value).__name__}",
        )
    text = value.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise RequestError(400, "bad_image", f"{name}: a data: URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            400, "bad_image", f"{name}: not valid base64; send the image file's bytes base64-encoded, or a data: URL"
        ) from None


def check_image_limits(raw: bytes, limits: LimitsConfig, name: str = "image") -> None:
    """Refuse an image whose header declares more pixels or a longer side than the limits allow (413).

    Only the header is read; an unreadable one is left to :func:`instdiff.imageio.decode_image` to report.
    """
    from PIL import Image

    accepted = f"this server accepts at most {limits.max_image_pixels} pixels and {limits.max_image_side} px a side"
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size
    except Image.DecompressionBombError:  # a header declaring more pixels than PIL opens at all
        raise RequestError(
            413, "too_large", f"{name}'s header declares over {2 * Image.MAX_IMAGE_PIXELS} pixels; {accepted}"
        ) from None
    except Exception:  # noqa: BLE001 - decode_image reports undecodable bytes with the accepted formats
        return
    if w * h > limits.max_image_pixels or max(w, h) > limits.max_image_side:
        raise RequestError(413, "too_large", f"{name} is {w}x{h} px; {accepted}")


def check_steps(steps: int | None, limits: LimitsConfig) -> None:
    """Refuse steps below 1 or above ``limits.max_steps`` (422)."""
    if steps is not None and not 1 <= steps <= limits.max_steps:
        raise ConfigError(f"steps: accepted: 1 to {limits.max_steps} (this server's limits.max_steps); got {steps}")


def decode_mask_field(
    value: Any, size: tuple[int, int] | None, limits: LimitsConfig | None = None
) -> np.ndarray | None:
    """The decoded mask field (:func:`instdiff.imageio.decode_mask`), or ``None`` when absent.

    Raises:
        RequestError: 400 bad base64; 413 a mask over ``limits`` (:func:`check_image_limits`).
        ImageInputError: bytes that are not an image, or a mask of another size than ``size``.
    """
    if value is None or value == b"" or value == "":
        return None
    raw = image_bytes(value, "mask")
    if limits is not None:
        check_image_limits(raw, limits, "mask")
    return imageio.decode_mask(raw, size=size)


def edit_request(f: EditFields, limits: LimitsConfig) -> EditRequest:
    """Checked fields → a decoded :class:`~pipelines.serve.engine.EditRequest` for the model.

    Raises:
        RequestError: 400 bad base64, 413 an image over the limits.
        ImageInputError: bytes that are not an image (400), a mask of another size.
        ConfigError / EditInputError: steps over the limit, an unknown method (422).
    """
    check_method(f.method)
    check_steps(f.steps, limits)
    raw = image_bytes(f.image, "image")
    check_image_limits(raw, limits)
    array, notes = imageio.decode_image(raw, max_pixels=limits.max_image_pixels)
    h, w = array.shape[:2]
    mask = decode_mask_field(f.mask, (w, h), limits)
    return EditRequest(
        image=array,
        target_prompt=f.target_prompt,
        source_prompt=f.source_prompt,
        method=f.method,
        steps=f.steps,
        strength=f.strength,
        guidance_scale=f.guidance_scale,
        seed=f.seed,
        mask=mask,
        notes=notes,
    )


__all__ = [
    "EDIT_METHODS",
    "JSON",
    "MAX_INT_DIGITS",
    "MULTIPART",
    "EditFields",
    "SessionEditFields",
    "SessionFields",
    "check_body_size",
    "check_image_limits",
    "check_steps",
    "content_kind",
    "decode_mask_field",
    "edit_request",
    "form_values",
    "image_bytes",
    "parse_json",
    "to_fields",
    "too_large",
]
