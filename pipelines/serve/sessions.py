"""FISEdit edit sessions held by one model replica: generate once, then edit the prompt and recompute only the
region that changes (FISEdit, Yu et al. 2024, through :class:`instdiff.sparse.session.FISEditSession`).

A session keeps the :class:`~instdiff.sparse.cache.RunCache` of its generation (per-step latents and
activations). Every edit is computed against that cache, FISEdit's own design: the region that differs from the
generated image is recomputed, the rest is the cached run's, so edits can go on (``"a red square"`` → ``"a blue
square"`` → ``"a green square"``) and each one's cost depends on how far it is from the generation, never on how
many came before. The session holds the latest prompt and image for ``GET``.

:class:`SessionStore` bounds what a replica keeps: a byte budget over the caches and a count, least recently used
dropped first, and a time to live since last use. Ids of dropped sessions are remembered (a bounded list) so
their 404 can say why.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from instdiff import imageio
from instdiff.bundle import ModelBundle
from instdiff.errors import EditInputError
from instdiff.inputs import check_seed, editor_defaults
from pipelines.serve.engine import b64png, finite_or_none
from pipelines.serve.errors import RequestError, SessionNotFoundError

log = logging.getLogger(__name__)

START_NEW = "start a new session with POST /v1/sessions"


SESSION_ID_MAX = 64
"""The longest session id accepted in a path (the server's own are 32 hex digits)."""
_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_")


def new_session_id() -> str:
    """A fresh, unguessable session id (32 hex digits)."""
    return uuid.uuid4().hex


def check_session_id(sid: str) -> None:
    """Refuse a session id no server could have made: too long or with other characters (422), so neither a
    message nor a log line repeats what the client sent in full.

    Raises:
        RequestError: 422 naming the accepted form (the ``session_id`` ``POST /v1/sessions`` answered: 32 hex
            digits; at most :data:`SESSION_ID_MAX` letters, digits, ``-`` and ``_``).
    """
    if 0 < len(sid) <= SESSION_ID_MAX and set(sid) <= _ID_CHARS:
        return
    shown = f"{sid[:16]!r}... ({len(sid)} characters)" if len(sid) > 24 else repr(sid)
    raise RequestError(
        422,
        "invalid_field",
        f"session id {shown} is not a session id; accepted: the session_id that POST /v1/sessions answered "
        f"(32 hex digits; at most {SESSION_ID_MAX} letters, digits, '-' or '_')",
    )


@dataclass
class Session:
    """One session: its settings, its generation's cache, and its latest state.

    Attributes:
        session_id: the id.
        cfg: the FISEdit settings it was made with (``FISEditConfig``).
        cache: the generation's ``RunCache``.
        prompt: the latest prompt (the generated one until the first edit).
        image: the latest image, (H, W, 3) uint8.
        seed: the generation's seed.
        edits: how many edits ran.
        generate_seconds: the generation's time, the cost of a full regeneration.
        created: wall-clock time of creation (``time.time()``).
        last_used: monotonic time of the last use.
    """

    session_id: str
    cfg: Any
    cache: Any
    prompt: str
    image: np.ndarray
    seed: int
    edits: int = 0
    generate_seconds: float = 0.0
    created: float = field(default_factory=time.time)
    last_used: float = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes its cache holds."""
        return int(self.cache.nbytes())

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/sessions/{id}`` answers (no cache internals)."""
        h, w = self.image.shape[:2]
        return {
            "session_id": self.session_id,
            "prompt": self.prompt,
            "source_prompt": self.cache.prompt,
            "seed": self.seed,
            "steps": self.cfg.num_steps,
            "edits": self.edits,
            "width": w,
            "height": h,
            "cache_bytes": self.nbytes,
            "created": self.created,
        }


class SessionStore:
    """Sessions of one replica under a byte budget, a count and a time to live (LRU eviction).

    Args:
        max_bytes: cache bytes kept at most; the least recently used sessions go first.
        max_sessions: sessions kept at most (``None``: as many as the byte budget holds).
        ttl_s: a session unused this long is dropped, seconds.
        clock: monotonic time source (tests pass a fake one).
    """

    def __init__(
        self, max_bytes: int, max_sessions: int | None, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = int(max_bytes)
        self.max_sessions = None if max_sessions is None else int(max_sessions)
        self.ttl_s = float(ttl_s)
        self.clock = clock
        self._items: OrderedDict[str, Session] = OrderedDict()
        self._gone: deque[tuple[str, str]] = deque(maxlen=4096)  # (id, why) of dropped sessions

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, sid: str) -> bool:
        return sid in self._items

    @property
    def nbytes(self) -> int:
        """Bytes held by all sessions' caches."""
        return sum(s.nbytes for s in self._items.values())

    def _drop(self, sid: str, why: str) -> None:
        self._items.pop(sid, None)
        self._gone.append((sid, why))
        log.info("session %s dropped: %s", sid, why)

    def expire(self) -> None:
        """Drop sessions unused for longer than the time to live."""
        now = self.clock()
        for sid in [k for k, s in self._items.items() if now - s.last_used > self.ttl_s]:
            self._drop(sid, f"unused for more than {self.ttl_s:g} s (its time to live)")

    def put(self, session: Session) -> None:
        """Add a session, then evict the least recently used ones until the budget and count hold.

        Raises:
            RequestError: 413 when this one session alone is over the byte budget.
        """
        if session.nbytes > self.max_bytes:
            raise RequestError(
                413,
                "session_too_large",
                f"this session's cache needs {session.nbytes} bytes, over the replica's budget of {self.max_bytes} "
                "(sessions.max_bytes); ask for fewer steps",
            )
        self.expire()
        session.last_used = self.clock()
        self._items[session.session_id] = session
        self._items.move_to_end(session.session_id)
        over_count = self.max_sessions is not None and len(self._items) > self.max_sessions
        while over_count or self.nbytes > self.max_bytes:
            oldest = next(iter(self._items))
            self._drop(oldest, "evicted to make room for newer sessions (least recently used first)")
            over_count = self.max_sessions is not None and len(self._items) > self.max_sessions

    def get(self, sid: str) -> Session:
        """The session, marked as just used.

        Raises:
            SessionNotFoundError: unknown, deleted, expired or evicted (the message says which and what to do).
        """
        self.expire()
        session = self._items.get(sid)
        if session is None:
            why = next((w for s, w in reversed(self._gone) if s == sid), None)
            if why is None:
                raise SessionNotFoundError(f"session {sid!r} is unknown on this server; {START_NEW}")
            raise SessionNotFoundError(f"session {sid!r} is gone: {why}; {START_NEW}")
        session.last_used = self.clock()
        self._items.move_to_end(sid)
        return session

    def delete(self, sid: str) -> None:
        """Delete a session.

        Raises:
            SessionNotFoundError: as :meth:`get`.
        """
        self.get(sid)
        self._drop(sid, "deleted")


def session_config(bundle: ModelBundle, steps: int | None, mask_steps: int | None) -> Any:
    """FISEdit settings for a session of ``steps`` DDIM steps with the model's default guidance.

    ``mask_steps`` (dense steps finding the changed region) defaults to a fifth of the steps (the paper's 10 of
    50), the difference map starting halfway through them.

    Raises:
        ConfigError: steps or mask steps that do not fit together.
    """
    from instdiff.sparse.config import FISEditConfig

    steps, guidance = editor_defaults(bundle, steps, None)
    k = mask_steps if mask_steps is not None else max(1, steps // 5)
    k = min(k, steps)
    return FISEditConfig(num_steps=steps, guidance_scale=guidance, mask_steps=k, mask_from=max(1, (k + 1) // 2))


def estimate_session_bytes(bundle: ModelBundle, steps: int | None, mask_steps: int | None) -> int:
    """About how many bytes one session's cache takes with this model and these settings, from a 1-step run.

    A generation caches, per denoising step, the UNet input latents and the layer activations FISEdit reuses,
    plus the final latents (:class:`instdiff.sparse.cache.RunCache`); the per-step part does not depend on the
    step count. So a 1-step generation's step-0 bytes times the session's steps, plus its final latents, is the
    estimate: exact for the activations, a little high where step 0 also holds the cross-attention maps that only
    the mask-finding steps record. Costs one denoising step.

    Args:
        bundle: the loaded model.
        steps: ``sessions.steps`` (``None``: the model's default).
        mask_steps: ``sessions.mask_steps``.

    Returns:
        The estimated bytes of one session's cache.
    """
    from instdiff.sparse.session import FISEditSession

    total_steps = session_config(bundle, steps, mask_steps).num_steps
    _, cache = FISEditSession(bundle, session_config(bundle, 1, 1)).generate("a session size probe", 0)
    per_step = cache.activations.bytes_per_step()
    return int(per_step.get(0, 0) * total_steps + sum(b for i, b in per_step.items() if i > 0))


def capacity_note(session_bytes: int, max_bytes: int, max_sessions: int | None) -> tuple[str, bool]:
    """How many sessions a replica keeps with its budget, as one log line, and whether none fits.

    Args:
        session_bytes: one session's cache (:func:`estimate_session_bytes`).
        max_bytes: ``sessions.max_bytes``.
        max_sessions: ``sessions.max_sessions`` (``None``: no count limit).

    Returns:
        ``(line, none_fits)``.
    """
    held = max_bytes // max(session_bytes, 1)
    mib = 2**20
    line = (
        f"sessions: one session's cache is about {session_bytes / mib:.1f} MiB with this model, so sessions.max_bytes "
        f"({max_bytes / mib:.0f} MiB) holds about {held} per replica"
    )
    if max_sessions is not None:
        bound = "the byte budget" if held < max_sessions else "sessions.max_sessions"
        line += f"; sessions.max_sessions is {max_sessions}, so {bound} is the limit ({min(held, max_sessions)})"
    if held == 0:
        line += "; no session fits: POST /v1/sessions answers 413 until sessions.max_bytes is raised or steps lowered"
    return line, held == 0


def create_session(bundle: ModelBundle, sid: str, prompt: str, seed: Any, cfg: Any) -> tuple[Session, dict]:
    """Generate ``prompt`` from ``seed`` and keep the run's cache.

    Returns:
        ``(session, answer)``: the answer holds ``session_id``, ``image`` (PNG base64), ``seed``, ``steps``,
        ``timings``, ``unet_calls``, ``cache_bytes``.

    Raises:
        EditInputError: a blank prompt or a bad seed (:mod:`instdiff.inputs`).
    """
    from instdiff.sparse.session import FISEditSession

    seed = check_seed(seed)
    t0 = time.perf_counter()
    image, cache = FISEditSession(bundle, cfg).generate(prompt, seed)
    seconds = time.perf_counter() - t0
    pixels = imageio.from_model_tensor(image)[0]
    session = Session(sid, cfg, cache, prompt, pixels, seed, generate_seconds=seconds)
    answer = session.describe()
    answer.update(
        image=b64png(pixels),
        timings={k: round(float(v), 4) for k, v in cache.timings.items()},
        unet_calls=int(cfg.num_steps * (2 if cfg.guidance_scale > 1 else 1)),
    )
    return session, answer


def edit_session(bundle: ModelBundle, session: Session, prompt: str, mask: np.ndarray | None) -> dict[str, Any]:
    """Edit a session's generation for ``prompt`` (FISEdit), and make the result the session's latest state.

    Args:
        bundle: the model that made the session.
        session: the session.
        prompt: the changed prompt.
        mask: (H, W) bool region to recompute at the session's image size, or ``None`` to find it.

    Returns:
        ``image`` and ``mask`` (the recomputed region) as PNG base64, ``active_fraction`` (of the image),
        ``active_fraction_by_size`` (per feature-map size), ``unet_macs_ratio`` (dense / computed MACs of a
        sparse step), ``timings``, ``unet_calls``, ``regenerate_seconds`` (the generation's time, what a full
        regeneration costs) and ``speedup`` against it.

    Raises:
        EditInputError: a blank prompt, or a mask of another size.
    """
    import torch

    from instdiff.sparse.session import FISEditSession

    tensor = None
    if mask is not None:
        h, w = session.image.shape[:2]
        if mask.shape != (h, w):
            raise EditInputError(f"mask is {mask.shape[1]}x{mask.shape[0]}; this session's image is {w}x{h}")
        tensor = torch.from_numpy(np.ascontiguousarray(mask))
    t0 = time.perf_counter()
    result = FISEditSession(bundle, session.cfg).edit(session.cache, prompt, tensor)
    seconds = time.perf_counter() - t0
    pixels = imageio.from_model_tensor(result.images)[0]
    region = result.masks[0, 0].cpu().numpy().astype(bool)
    session.prompt, session.image = prompt, pixels
    session.edits += 1
    macs = result.extras.get("macs", {})
    return {
        "session_id": session.session_id,
        "prompt": prompt,
        "edits": session.edits,
        "image": b64png(pixels),
        "mask": b64png(region),
        "active_fraction": float(region.mean()),
        "active_fraction_by_size": result.extras.get("active_fraction", {}),
        "mask_source": result.extras.get("mask_source"),
        "unet_macs_ratio": finite_or_none(float(macs.get("ratio", 1.0))),
        "unet_calls": round(result.unet_calls),  # evaluations per image: a whole number
        "timings": {k: round(float(v), 4) for k, v in result.timings.items()},
        "seconds": round(seconds, 4),
        "regenerate_seconds": round(session.generate_seconds, 4),
        "speedup": round(session.generate_seconds / seconds, 3) if seconds > 0 else None,
    }


__all__ = [
    "START_NEW",
    "SESSION_ID_MAX",
    "Session",
    "SessionStore",
    "capacity_note",
    "check_session_id",
    "estimate_session_bytes",
    "create_session",
    "edit_session",
    "new_session_id",
    "session_config",
]
