"""The per-step activation cache of a run, with an accelerator-memory budget and host overflow.

FISEdit §"Cache-Based Editing Pipeline": the sparse pass needs activations of every step of the previous run
(per step up to GBs at large sizes), so the cache keeps what fits in accelerator memory and spills the rest to
(pinned) host memory; transfers of the next step run asynchronously on a side stream while the current step
computes. Entries that did not fit are copied to the accelerator only for the step that uses them.

Accounting is exact: :meth:`ActivationCache.nbytes` sums ``numel · element_size`` over the tensors held.
:class:`RunCache` is what a FISEdit generation leaves for its edits: its inputs, an :class:`ActivationCache`
(per-step latents under :data:`LATENTS` and layer activations) and its image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


class ActivationCache:
    """Tensors keyed by (step, name), split between an accelerator tier and a host tier.

    ``device``: where consumers want the tensors. ``budget_bytes``: most bytes kept on ``device``
    (``None``: no limit); once reached, new entries go to the host tier (pinned memory when ``device`` is CUDA).
    On a CPU ``device`` the host tier is plain memory; the split still follows the budget, so the policy is the
    same (and testable) everywhere.

    Args:
        device: where consumers want the tensors.
        budget_bytes: most bytes kept on ``device``; ``None`` for no limit.
    """

    def __init__(self, device: torch.device | str, budget_bytes: int | None = None) -> None:
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self._device: dict[int, dict[str, torch.Tensor]] = {}
        self._host: dict[int, dict[str, torch.Tensor]] = {}
        self._device_bytes = 0
        self._host_bytes = 0
        self._staged: dict[int, tuple[dict[str, torch.Tensor], torch.cuda.Event | None]] = {}
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._put_events: dict[int, torch.cuda.Event] = {}

    # ---- writing ---------------------------------------------------------------------------
    def put(self, step: int, name: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (detached) for ``step`` under ``name``; replaces an existing entry."""
        self.drop(step, name)
        t = tensor.detach()
        size = t.numel() * t.element_size()
        if self.budget_bytes is None or self._device_bytes + size <= self.budget_bytes:
            self._device.setdefault(step, {})[name] = t.to(self.device)
            self._device_bytes += size
            return
        if self._cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._put_events[step] = ev
        else:
            host = t.to("cpu", copy=True)
        self._host.setdefault(step, {})[name] = host
        self._host_bytes += size

    def drop(self, step: int, name: str) -> None:
        """Forget the entry (step, name) if there is one."""
        for tier, attr in ((self._device, "_device_bytes"), (self._host, "_host_bytes")):
            t = tier.get(step, {}).pop(name, None)
            if t is not None:
                setattr(self, attr, getattr(self, attr) - t.numel() * t.element_size())

    # ---- reading ---------------------------------------------------------------------------
    def has(self, step: int, name: str) -> bool:
        """Whether (step, name) is stored in either tier."""
        return name in self._device.get(step, {}) or name in self._host.get(step, {})

    def is_persistent(self, step: int, name: str) -> bool:
        """True if :meth:`get` returns the stored tensor itself rather than a transient device copy.

        That holds for the device tier, and on a CPU device for the host tier too (no copy is needed there).
        Whoever writes into a persistent tensor in place must restore it (the engine keeps an undo log).
        """
        return name in self._device.get(step, {}) or (not self._cuda and name in self._host.get(step, {}))

    def prefetch(self, step: int, names: Iterable[str] | None = None) -> None:
        """Start copying ``step``'s host-tier entries (or only ``names``) to the device, on a side stream on CUDA."""
        host = self._host.get(step)
        if not host or step in self._staged:
            return
        wanted = [n for n in (host if names is None else names) if n in host]
        if not self._cuda:
            self._staged[step] = ({n: host[n] for n in wanted}, None)
            return
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            if step in self._put_events:
                self._stream.wait_event(self._put_events[step])
            staged = {n: host[n].to(self.device, non_blocking=True) for n in wanted}
            ev = torch.cuda.Event()
            ev.record(self._stream)
        self._staged[step] = (staged, ev)

    def get(self, step: int, name: str) -> torch.Tensor:
        """The tensor for (step, name) on the device; waits for its prefetch, or copies it now if none ran.

        Raises:
            KeyError: nothing stored under (step, name).
        """
        dev = self._device.get(step, {})
        if name in dev:
            return dev[name]
        if name not in self._host.get(step, {}):
            raise KeyError(f"nothing cached for step {step} under {name!r}")
        staged = self._staged.get(step)
        if staged is None or name not in staged[0]:
            t = self._host[step][name].to(self.device, non_blocking=False)
            if staged is not None:
                staged[0][name] = t
            return t
        tensors, ev = staged
        t = tensors[name]
        if ev is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            t.record_stream(cur)
        return t

    def release(self, step: int) -> None:
        """Forget the transient device copies made for ``step``."""
        self._staged.pop(step, None)

    # ---- accounting ------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps with at least one entry, ascending."""
        return sorted(set(self._device) | set(self._host))

    def names(self, step: int) -> list[str]:
        """Names stored for ``step``, sorted."""
        return sorted(set(self._device.get(step, {})) | set(self._host.get(step, {})))

    def items(self) -> Iterator[tuple[int, str, torch.Tensor]]:
        """Every stored tensor (both tiers; transient prefetch copies are not stored and not listed)."""
        for tier in (self._device, self._host):
            for step, entries in tier.items():
                for name, t in entries.items():
                    yield step, name, t

    @property
    def device_bytes(self) -> int:
        """Bytes held in the accelerator tier."""
        return self._device_bytes

    @property
    def host_bytes(self) -> int:
        """Bytes held in the host tier."""
        return self._host_bytes

    def nbytes(self) -> int:
        """Bytes held in both tiers (Σ numel · element_size)."""
        return self._device_bytes + self._host_bytes

    def bytes_per_step(self) -> dict[int, int]:
        """Bytes held per step, by ascending step."""
        out: dict[int, int] = {}
        for step, _, t in self.items():
            out[step] = out.get(step, 0) + t.numel() * t.element_size()
        return dict(sorted(out.items()))

    def summary(self) -> dict[str, object]:
        """Sizes for reports: totals per tier, per step, the largest step and the number of entries."""
        per_step = self.bytes_per_step()
        return {
            "total_bytes": self.nbytes(),
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "bytes_per_step": per_step,
            "max_step_bytes": max(per_step.values(), default=0),
            "entries": sum(1 for _ in self.items()),
        }

    def clear(self) -> None:
        """Drop every entry and staged copy."""
        self._device.clear()
        self._host.clear()
        self._staged.clear()
        self._put_events.clear()
        self._device_bytes = self._host_bytes = 0


LATENTS = "latents"
"""Cache name of the per-step UNet input latents."""


@dataclass
class RunCache:
    """What a generation leaves for later edits: its inputs, per-step latents and activations, and its image.

    Attributes:
        prompt: the generated prompt.
        seed: its seed.
        token_ids: its 77 token ids (for cross-attention control's word alignment).
        embeddings: (2, 77, D) text conditioning rows [uncond, cond] with guidance, else (1, 77, D) [cond].
        timesteps: (T,) the DDIM timesteps.
        guidance_scale: the guidance it was made with.
        activations: per step i, ``latents`` (the UNet input x_i; step T holds the final latents) and the layer
            activations named by module path.
        image: (1, 3, H, W) the generated image in [-1, 1].
        timings: seconds per stage.
        made_with: what an edit of it must agree on besides steps and guidance: ``model`` (the bundle's name)
            and ``cross_attention_steps`` (the steps whose cross-attention maps were recorded: ``mask_steps``
            with cross-attention control, else 0). The latent size is the cached latents'.
    """

    prompt: str
    seed: int
    token_ids: list[int]
    embeddings: torch.Tensor
    timesteps: torch.Tensor
    guidance_scale: float
    activations: ActivationCache
    image: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    made_with: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        """T, the number of denoising steps."""
        return int(self.timesteps.numel())

    def latents(self, step: int) -> torch.Tensor:
        """x_step (1, C, h, w): the UNet input of ``step``; ``step == num_steps`` gives the final latents."""
        return self.activations.get(step, LATENTS)

    def nbytes(self) -> int:
        """Bytes held by the cache (both tiers)."""
        return self.activations.nbytes()

    def summary(self) -> dict[str, Any]:
        """The cache's size summary (:meth:`~instdiff.sparse.cache.ActivationCache.summary`)."""
        return self.activations.summary()
