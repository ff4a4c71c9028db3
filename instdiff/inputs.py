"""Checks of what callers hand the editors and the FISEdit session: prompts and seeds.

Below :mod:`instdiff.editing` and :mod:`instdiff.sparse` (both import it; it imports only the bundle, the
config constants and the errors), so the editor contract and the FISEdit session refuse bad input with the
same messages. Image checks stay with the contract (:func:`instdiff.editing.check_images`). Also the choices
every front end (the CLI, the HTTP endpoint) makes the same way from a request: the model folder's default steps
and guidance (:func:`editor_defaults`), the size the image is edited at (:func:`working_size`) and whether a
source prompt is required (:func:`require_source`).

Callers that know their prompts by a name (the batch job: by row id) wrap the editor call in
:func:`prompt_labels`, so messages and log lines name prompts by it instead of by their batch position.
:func:`truncation` says what CLIP does not read of an over-long prompt, for a row's notes.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

from instdiff.bundle import ModelBundle
from instdiff.config import SEED_MAX, SEED_MIN, EditConfig, MaskPrompt, Method, TokenChoice
from instdiff.errors import EditInputError

log = logging.getLogger(__name__)

CUT_CHARS = 160
"""The longest cut text :func:`truncation` quotes (longer ones end with "…")."""

_LABELS: ContextVar[tuple[str, ...] | None] = ContextVar("instdiff_prompt_labels", default=None)


@contextlib.contextmanager
def prompt_labels(labels: Sequence[str]) -> Iterator[None]:
    """Within the block, name the prompts of an editor call by ``labels`` (e.g. row ids), not by position.

    :func:`check_prompts` (called by :func:`instdiff.editing.edit` and the FISEdit session) then says
    ``target prompt of 'row-7'`` instead of ``target prompt #0`` in its messages and log lines, for calls
    whose prompt count equals ``len(labels)``. The labels live in a :class:`contextvars.ContextVar`, so
    threads and tasks do not see each other's.

    Args:
        labels: one name per prompt of the calls in the block.

    Yields:
        Nothing; the labels are unset when the block ends.
    """
    token = _LABELS.set(tuple(str(x) for x in labels))
    try:
        yield
    finally:
        _LABELS.reset(token)


def _prompt_name(what: str, i: int, n: int) -> str:
    """``"target prompt of 'id'"`` under :func:`prompt_labels` with ``n`` labels, else ``"target prompt #i"``."""
    labels = _LABELS.get()
    if labels is not None and len(labels) == n:
        return f"{what} prompt of {labels[i]!r}"
    return f"{what} prompt #{i}"


def truncation(bundle: ModelBundle, prompt: str) -> tuple[int, str] | None:
    """What CLIP does not read of an over-long prompt.

    The text encoder reads ``tokenizer.model_max_length`` tokens (77 for CLIP: start, 75 word pieces, end;
    :func:`instdiff.bundle.token_ids` truncates the rest). The cut part is given in the prompt's own words:
    the longest run of whole words (split at white space) that fits is kept, the rest is cut — so its first
    word may be partly read.

    Args:
        bundle: the tokenizer.
        prompt: one prompt.

    Returns:
        ``None`` when the prompt fits; else ``(tokens, cut)``: its token count (start and end included) and
        the words not read in full, quoted up to :data:`CUT_CHARS` characters.
    """
    limit = bundle.tokenizer.model_max_length
    n = bundle.token_count(prompt)
    if n <= limit:
        return None
    words = prompt.split()
    fits, too_long = 0, len(words)  # words[:fits] fits in the limit, words[:too_long] does not
    while too_long - fits > 1:
        mid = (fits + too_long) // 2
        if bundle.token_count(" ".join(words[:mid])) <= limit:
            fits = mid
        else:
            too_long = mid
    cut = " ".join(words[fits:])
    if len(cut) > CUT_CHARS:
        cut = cut[: CUT_CHARS - 1] + "…"
    return n, cut


def check_prompts(bundle: ModelBundle, prompts: Sequence[str], what: str) -> None:
    """Refuse prompts that are not strings or are blank; warn about prompts longer than CLIP's 77 tokens (they
    are truncated; the warning quotes what is cut, :func:`truncation`). Prompts are named by position
    (``#i``), or by the labels of an enclosing :func:`prompt_labels`.

    Args:
        bundle: the tokenizer.
        prompts: the prompts to check (a sequence of strings, not one string).
        what: which prompts, for the message (``"source"``, ``"target"``, ``"generation"``).

    Raises:
        EditInputError: a single string instead of a sequence, a prompt that is not a string, a blank one, or
            one that is not valid Unicode (a lone surrogate).
    """
    if isinstance(prompts, str | bytes):
        raise EditInputError(f"{what} prompts must be a list of strings, one per image; got one string {prompts!r}")
    for i, p in enumerate(prompts):
        name = _prompt_name(what, i, len(prompts))
        if not isinstance(p, str):
            raise EditInputError(f"{name} must be a string; got {type(p).__name__} {p!r}")
        if not p.strip():
            raise EditInputError(f"{name} is empty; a non-empty text is required")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as exc:  # e.g. a lone surrogate ("\ud800" in JSON): no tokenizer reads it
            bad = p[exc.start : exc.end].encode("unicode_escape").decode("ascii")
            raise EditInputError(f"{name} is not valid Unicode text ({bad} at {exc.start}); send UTF-8 text") from None
        cut = truncation(bundle, p)
        if cut is not None:
            log.warning(
                "%s has %d tokens; CLIP reads %d, the rest is truncated: %r not read",
                name,
                cut[0],
                bundle.tokenizer.model_max_length,
                cut[1],
            )


def check_seed(seed: Any, what: str = "seed") -> int:
    """One seed as ``torch.Generator.manual_seed`` takes it.

    Args:
        seed: an integer (anything ``operator.index`` takes, e.g. a NumPy integer; not a bool) in
            [:data:`~instdiff.config.SEED_MIN`,
            :data:`~instdiff.config.SEED_MAX`] (negative seeds are used modulo 2^64).
        what: the seed's name in the message, e.g. ``"seed #2"``.

    Returns:
        The seed as a Python int.

    Raises:
        EditInputError: not an integer, or outside that range.
    """
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if value is None or isinstance(seed, bool):
        raise EditInputError(f"{what} must be an integer; got {type(seed).__name__} {seed!r}")
    if not SEED_MIN <= value <= SEED_MAX:
        raise EditInputError(
            f"{what} {value} is out of range; accepted: {SEED_MIN} to {SEED_MAX} (torch.Generator.manual_seed)"
        )
    return value


def check_seeds(seeds: Iterable[Any], n: int, what: str = "images") -> list[int]:
    """One seed per item, each checked with :func:`check_seed`.

    Args:
        seeds: the seeds (any iterable but a string).
        n: how many are needed.
        what: what they are for, in the message (``"images"``, ``"prompts"``).

    Returns:
        ``n`` Python ints.

    Raises:
        EditInputError: not a list, a count other than ``n``, or a bad seed.
    """
    try:
        if isinstance(seeds, str | bytes):
            raise TypeError
        values = list(seeds)
    except TypeError:
        raise EditInputError(f"seeds must be a list of integers, one each; got {type(seeds).__name__}") from None
    if len(values) != n:
        raise EditInputError(f"got {len(values)} seeds for {n} {what}")
    return [check_seed(s, f"seed #{i}") for i, s in enumerate(values)]


def editor_defaults(bundle: ModelBundle, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """Steps and guidance for an edit: the caller's, else the model folder's ``instdiff.json``, else the paper's.

    Args:
        bundle: the model (its ``defaults``, read from the folder's ``instdiff.json``).
        steps: DDIM steps the caller asked for, or ``None``.
        guidance: classifier-free guidance the caller asked for, or ``None``.

    Returns:
        ``(steps, guidance)``; the paper's values are 50 and 7.5. Ranges are checked by ``EditConfig``.
    """
    return (
        steps if steps is not None else int(bundle.defaults.get("steps", 50)),
        guidance if guidance is not None else float(bundle.defaults.get("guidance", 7.5)),
    )


def working_size(bundle: ModelBundle, model_spec: str, image_size: tuple[int, int], size: int | None) -> int | None:
    """The longer side an image is edited at: the caller's ``size``, else the embedded model's resolution.

    The embedded shapes model (spec ``"default"``) only knows its own resolution, so images of other sizes are
    resized to it (and back after the edit, :func:`instdiff.imageio.undo_fit`); other models edit at the
    image's own size unless the caller asks for one.

    Args:
        bundle: the loaded model (its ``resolution``, px).
        model_spec: the spec it was loaded from (``instdiff.models.load_bundle``).
        image_size: (W, H) of the decoded image, px.
        size: the longer side the caller asked for, px, or ``None``.

    Returns:
        The longer side to resize to (px), or ``None`` to keep the image's size.
    """
    if size is None and model_spec == "default" and max(image_size) != bundle.resolution:
        return bundle.resolution
    return size


def source_advice(cfg: EditConfig, source: str | None) -> str | None:
    """A warning when InstDiffEdit settings that read the source prompt get none (the embedded model's default).

    Those settings (``mask_prompt: source`` or ``mask.tokens: edit_span``) find the edited region from the words
    that differ between the two prompts; without a source prompt the mask falls back to the target prompt's maps,
    which on the embedded model often cover the background instead of the object.

    Args:
        cfg: the edit's settings.
        source: the source prompt given, or ``None`` / blank.

    Returns:
        The warning text, or ``None`` when there is nothing to say.
    """
    reads_source = cfg.mask_prompt is MaskPrompt.SOURCE or cfg.mask.tokens is TokenChoice.EDIT_SPAN
    if cfg.method is Method.INSTDIFFEDIT and reads_source and not (source or "").strip():
        return (
            "no source prompt: these InstDiffEdit settings find the edited region from the words that differ "
            "between the source and target prompts; without one the mask is often wrong - give a source prompt "
            "(a description of the input image)"
        )
    return None


def require_source(method: Method | str, source: str | None, what: str = "source_prompt") -> None:
    """Refuse a missing source prompt for a method that reads it (:meth:`Method.needs_source_prompt`).

    Args:
        method: the editing method.
        source: the source prompt given, or ``None``.
        what: the field's name in the message (``--source`` for the CLI, ``source_prompt`` for the endpoint).

    Raises:
        EditInputError: ``source`` is ``None`` and the method needs a description of the input image.
    """
    if source is None and Method(method).needs_source_prompt():
        raise EditInputError(f"{what} is required by {Method(method).value}: a description of the input image")


__all__ = [
    "CUT_CHARS",
    "check_prompts",
    "check_seed",
    "check_seeds",
    "editor_defaults",
    "prompt_labels",
    "require_source",
    "source_advice",
    "truncation",
    "working_size",
]
