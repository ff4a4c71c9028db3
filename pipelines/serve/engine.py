"""What the model deployment does with decoded requests, without Ray: prepare, group, edit, encode.

Kept apart from the deployment so the in-process benchmark baseline and the tests run the very same steps. Each
step is a call into ``instdiff``: the size the image is edited at and the default steps and guidance
(:func:`instdiff.inputs.working_size`, :meth:`~instdiff.config.EditConfig.for_model`), the source-prompt rule
(:func:`~instdiff.inputs.require_source`), prompt and seed checks (:func:`~instdiff.inputs.check_prompts`,
:func:`~instdiff.inputs.check_seed`), geometry (:func:`instdiff.imageio.fit_to_multiple` /
:func:`instdiff.composite.paste_back`), the editor contract (:func:`instdiff.editing.edit`) and PNG encoding
(:func:`instdiff.imageio.encode_png`).

Rows are checked one by one before batching, so one bad request never fails its batch-mates; rows that agree on
everything but image, prompts and seed (:func:`group_key`) are edited in one call; a group that fails is retried
row by row (a GPU out-of-memory error most of all), and a row that still runs out of memory is answered 503.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from instdiff import imageio
from instdiff.bundle import ModelBundle
from instdiff.config import EditConfig, Method, SizePolicy, to_plain
from instdiff.errors import EditInputError, InstdiffError
from instdiff.inputs import check_prompts, check_seed, require_source, source_advice, working_size
from pipelines.serve.errors import error_body, is_out_of_memory

log = logging.getLogger(__name__)


EDIT_METHODS = tuple(m.value for m in Method if m is not Method.FISEDIT)
"""Methods ``/v1/edits`` runs (FISEdit is served by sessions)."""


def check_method(method: str) -> None:
    """Refuse a method ``/v1/edits`` does not run.

    Raises:
        EditInputError: naming the accepted methods.
    """
    if method not in EDIT_METHODS:
        raise EditInputError(
            f"method {method!r} is unknown; accepted: {', '.join(EDIT_METHODS)} (FISEdit: /v1/sessions)"
        )


@dataclass
class EditRequest:
    """One decoded ``POST /v1/edits`` request, as the ingress hands it to the model.

    Attributes:
        image: (H, W, 3) uint8, as decoded.
        target_prompt: the wanted description.
        source_prompt: the input's description, or ``None``.
        method: ``instdiffedit``, ``diffedit`` or ``sdedit``.
        steps: DDIM steps, or ``None`` for the model's default.
        strength: noise strength r in (0, 1].
        guidance_scale: classifier-free guidance, or ``None`` for the model's default.
        seed: integer seed.
        mask: (H, W) bool region allowed to change, or ``None``.
        notes: what decoding changed (reported as warnings).
    """

    image: np.ndarray
    target_prompt: str
    source_prompt: str | None = None
    method: str = Method.INSTDIFFEDIT.value
    steps: int | None = None
    strength: float = 0.5
    guidance_scale: float | None = None
    seed: int = 0
    mask: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class PreparedEdit:
    """A checked edit ready for the contract: its config, model-sized pixels and what to undo afterwards."""

    request: EditRequest
    cfg: EditConfig
    prepared: imageio.Prepared
    seed: int
    source: str
    warnings: list[str]


def b64png(array: np.ndarray) -> str:
    """PNG of an (H, W, 3) uint8 image or (H, W) bool mask, base64 text (:func:`instdiff.imageio.encode_png`)."""
    return base64.b64encode(imageio.encode_png(array)).decode("ascii")


def prepare_edit(
    bundle: ModelBundle, model_spec: str, req: EditRequest, size: int | str | None, policy: str
) -> PreparedEdit:
    """Check one request and bring its image to the model's geometry, as ``instdiff edit`` does.

    Args:
        bundle: the loaded model.
        model_spec: the spec it was loaded from (``"default"`` edits at the embedded model's resolution).
        req: the decoded request.
        size: ``edits.size`` (``"model"``, px, or ``None``).
        policy: ``edits.size_policy``.

    Returns:
        The prepared edit.

    Raises:
        InstdiffError: a bad method, prompt, seed, step count, strength or guidance (ConfigError /
            EditInputError), or an image the model's geometry cannot take (ImageInputError).
    """
    check_method(req.method)
    method = Method(req.method)
    require_source(method, req.source_prompt)
    check_prompts(bundle, [req.target_prompt], "target")
    if req.source_prompt is not None and method.needs_source_prompt():
        check_prompts(bundle, [req.source_prompt], "source")
    seed = check_seed(req.seed)
    # the model folder's recommended settings (steps, guidance; the embedded model's InstDiffEdit variant), as the
    # CLI's default --preset model; the request's own values on top
    given = {"steps": req.steps, "guidance": req.guidance_scale}
    cfg = EditConfig.for_model(
        bundle.defaults,
        "model",
        method=method,
        strength=req.strength,
        seed=seed,
        **{k: v for k, v in given.items() if v is not None},
    )
    h, w = req.image.shape[:2]
    if size == "model":
        size = bundle.resolution
    size = working_size(bundle, model_spec, (w, h), size)  # type: ignore[arg-type]
    from instdiff.editing import size_multiple

    prepared = imageio.fit_to_multiple(req.image, size_multiple(bundle), SizePolicy(policy), size)
    source = req.source_prompt if req.source_prompt is not None else req.target_prompt
    advice = source_advice(cfg, req.source_prompt)
    warnings = list(req.notes) + list(prepared.notes) + ([advice] if advice else [])
    return PreparedEdit(req, cfg, prepared, seed, source, warnings)


def group_key(p: PreparedEdit) -> tuple[Any, ...]:
    """Rows with equal keys are edited in one contract call: the same config (seed aside) and model-sized shape."""
    return (p.cfg.with_(seed=0), p.prepared.array.shape)


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _respond(p: PreparedEdit, result: Any, row: int, batch_size: int, seconds: float) -> dict[str, Any]:
    """The JSON answer of one edited row: images back at the input's size, every parameter used."""
    from instdiff.composite import paste_back

    # back at the input's size, the original pixels kept outside the edit (as the CLI and the batch job do)
    edited, mask = paste_back(
        p.request.image,
        imageio.from_model_tensor(result.images[row : row + 1])[0],
        result.masks[row, 0].cpu().numpy().astype(bool),
        p.prepared,
        p.cfg.feather,
        p.cfg.paste_back,
    )
    if p.request.mask is not None:  # the caller's region bounds the change: outside it, the input's pixels
        mask = mask & p.request.mask
        edited = np.where(mask[..., None], edited, p.request.image)
    timings = {k: round(float(v), 4) for k, v in result.timings.items()}
    timings["batch_total"] = timings.pop("total", seconds)
    params = request_parameters(p.cfg)
    params.update(source_prompt=p.request.source_prompt, target_prompt=p.request.target_prompt, seed=p.seed)
    h, w = p.request.image.shape[:2]
    return {
        "image": b64png(np.ascontiguousarray(edited)),
        "mask": b64png(mask),
        "method": p.cfg.method.value,
        "seed": p.seed,
        "unet_calls": round(result.unet_calls),  # evaluations per image: a whole number
        "width": w,
        "height": h,
        "mask_area": float(mask.mean()),
        "timings": timings,
        "warnings": p.warnings,
        "parameters": params,
        "batch_size": batch_size,
    }


REQUEST_NAMES = {"guidance": "guidance_scale"}
"""``EditConfig`` keys the API names differently (the request's field names are the answer's)."""


def request_parameters(cfg: EditConfig) -> dict[str, Any]:
    """Every value of ``cfg`` as plain data, keyed by the request's field names where the API has one
    (``guidance`` → ``guidance_scale``), so an answer's ``parameters`` can be sent back as a request."""
    return {REQUEST_NAMES.get(k, k): v for k, v in to_plain(cfg).items()}


def run_edits(bundle: ModelBundle, prepared: list[PreparedEdit | dict[str, Any]]) -> list[dict[str, Any]]:
    """Edit checked rows in groups (:func:`group_key`); errors stay with their row.

    Args:
        bundle: the loaded model.
        prepared: per request a :class:`PreparedEdit`, or an error body already (passed through).

    Returns:
        Per request, in order: the answer (see :func:`_respond`) or an error body
        ``{"error": {...}, "status": int}`` (:func:`pipelines.serve.errors.error_body`).
    """
    from instdiff.editing import edit

    out: list[dict[str, Any] | None] = [p if isinstance(p, dict) else None for p in prepared]
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, p in enumerate(prepared):
        if isinstance(p, PreparedEdit):
            groups[group_key(p)].append(i)

    def run(rows: list[int]) -> None:
        items = [prepared[i] for i in rows]
        assert all(isinstance(p, PreparedEdit) for p in items)
        t0 = time.perf_counter()
        images = imageio.to_model_tensor([p.prepared.array for p in items])  # type: ignore[union-attr]
        cfg = items[0].cfg  # type: ignore[union-attr]
        result = edit(
            bundle,
            images,
            [p.source for p in items],  # type: ignore[union-attr]
            [p.request.target_prompt for p in items],  # type: ignore[union-attr]
            cfg,
            [p.seed for p in items],  # type: ignore[union-attr]
        )
        seconds = time.perf_counter() - t0
        for j, i in enumerate(rows):
            out[i] = _respond(items[j], result, j, len(rows), seconds)  # type: ignore[arg-type]

    for rows in groups.values():
        try:
            run(rows)
            continue
        except Exception as exc:  # noqa: BLE001 - a failing group is retried row by row, below
            if len(rows) == 1:
                out[rows[0]] = _row_error(exc)
                continue
            log.warning("a batch of %d edits failed (%s); retrying row by row", len(rows), type(exc).__name__)
            _free_accelerator_memory()
        for i in rows:
            try:
                run([i])
            except Exception as exc:  # noqa: BLE001 - the row's own error answer
                out[i] = _row_error(exc)
    return [o if o is not None else error_body(RuntimeError("no answer")) for o in out]


def _row_error(exc: BaseException) -> dict[str, Any]:
    """The error body of one failed row; out of memory frees the cache so the replica stays usable."""
    if is_out_of_memory(exc):
        _free_accelerator_memory()
    elif not isinstance(exc, InstdiffError):
        log.exception("edit failed", exc_info=exc)
    return error_body(exc)


def finite_or_none(x: float) -> float | None:
    """``x`` if finite, else ``None`` (JSON has no infinity)."""
    return x if math.isfinite(x) else None


__all__ = [
    "EDIT_METHODS",
    "check_method",
    "EditRequest",
    "PreparedEdit",
    "b64png",
    "finite_or_none",
    "group_key",
    "prepare_edit",
    "request_parameters",
    "run_edits",
]
