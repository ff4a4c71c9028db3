"""FISEdit's cache-based editing loop: generate once (recording the cache), edit the prompt, re-generate sparsely.

FISEdit §"Cache-Based Editing Pipeline" and Fig. 2: ``generate`` runs dense text-to-image (DDIM, classifier-free
guidance) and records, per step, the latents and the activations the sparse pass needs. ``edit`` re-runs from the
same initial latents with the new prompt: the first k steps dense, to find the difference mask (§"Target Area
Capture"; optionally with cross-attention control), then the remaining steps sparse; latents outside the mask
are the cached ones at every step, so the unchanged region is reproduced exactly.

The loop pieces are :mod:`instdiff.sampling`'s: the initial latents of a seed and classifier-free guidance are
the same functions :func:`instdiff.editing.generate` uses, so a session's generation equals ``generate``'s (up to
float rounding of the text encoder's batching: the session encodes ``["", prompt]`` in one call).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from instdiff.bundle import ModelBundle
from instdiff.errors import ConfigError, EditInputError
from instdiff.sampling import Clock, UNetCounter, guided_eps, initial_latents, make_scheduler
from instdiff.sparse.cache import ActivationCache
from instdiff.sparse.config import SparseConfig
from instdiff.sparse.engine import sparse_unet
from instdiff.sparse.mask import difference_mask, dilate, latent_difference, mask_to_latent
from instdiff.sparse.state import CrossAttentionControl
from instdiff.types import EditResult

log = logging.getLogger(__name__)

LATENTS = "latents"
"""Cache name of the per-step UNet input latents."""


@dataclass(frozen=True)
class FISEditConfig:
    """Settings of a FISEdit session (Yu et al., AAAI 2024).

    Attributes:
        num_steps: DDIM steps (generation and edits share them).
        guidance_scale: classifier-free guidance scale; ≤ 1 runs the conditional branch alone.
        mask_steps: k, the dense steps of an edit that find the difference mask (paper: the difference is clear
            by steps 5–10 of 50).
        mask_from: the first step whose latent difference enters the map.
        threshold: ``None`` for Otsu, else a fixed fraction in (0, 1] of the map's maximum.
        open_radius: opening radius, in latent pixels.
        margin: dilation margin, in latent pixels.
        min_difference: an edit whose latents never differ by more than this (Σ over channels) from the cached
            run is "no change" and returns the cached image.
        dense_steps_with_mask: dense steps before going sparse when the caller gives the mask (0: all sparse).
        composite: paste the edited region into the cached image, so that pixels outside it are the cached ones
            exactly.
        composite_margin: dilation of the upsampled latent mask for the paste, in image pixels (``None``: the
            VAE factor).
        cross_attention_control: keep the cached cross-attention maps of unchanged words during the mask steps.
        cache_budget_bytes: accelerator memory for the cache; the rest goes to (pinned) host memory.
        image_size: generated side in pixels (``None``: the model's native size).
        sparse: the sparse engine's settings.

    Raises:
        ConfigError: steps or step ranges that do not fit together.
    """

    num_steps: int = 50
    guidance_scale: float = 7.5
    mask_steps: int = 10
    mask_from: int = 5
    threshold: float | None = None
    open_radius: int = 1
    margin: int = 1
    min_difference: float = 1e-4
    dense_steps_with_mask: int = 0
    composite: bool = True
    composite_margin: int | None = None
    cross_attention_control: bool = False
    cache_budget_bytes: int | None = None
    image_size: int | None = None
    sparse: SparseConfig = field(default_factory=SparseConfig)

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 1 <= self.mask_steps <= self.num_steps:
            raise ConfigError(f"mask_steps must lie in [1, num_steps={self.num_steps}], got {self.mask_steps}")
        if not 1 <= self.mask_from <= self.mask_steps:
            raise ConfigError(f"mask_from must lie in [1, mask_steps={self.mask_steps}], got {self.mask_from}")
        if not 0 <= self.dense_steps_with_mask < self.num_steps:
            raise ConfigError(f"dense_steps_with_mask must lie in [0, num_steps), got {self.dense_steps_with_mask}")


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


def token_alignment(source: Sequence[int], target: Sequence[int]) -> tuple[list[int], list[int]]:
    """Positions of the target tokens that are unchanged from the source (difflib's equal blocks).

    Args:
        source: the source prompt's token ids.
        target: the target prompt's token ids.

    Returns:
        ``(src, dst)``: equal-length position lists, ``target[dst[i]] == source[src[i]]``.
    """
    src: list[int] = []
    dst: list[int] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=list(source), b=list(target), autojunk=False).get_opcodes():
        if tag == "equal":
            src.extend(range(i1, i2))
            dst.extend(range(j1, j2))
    return src, dst


class FISEditSession:
    """Generate and edit with one bundle. The sparse engine is installed on ``bundle.unet`` only inside each call.

    ``generate(prompt, seed) -> (image, cache)`` and ``edit(cache, new_prompt, mask=None) -> EditResult``.

    Args:
        bundle: the models.
        cfg: the session's settings (``None``: the defaults).
    """

    def __init__(self, bundle: ModelBundle, cfg: FISEditConfig | None = None) -> None:
        self.bundle = bundle
        self.cfg = cfg or FISEditConfig()

    # ---- helpers ---------------------------------------------------------------------------------
    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (``guidance_scale > 1``)."""
        return self.cfg.guidance_scale > 1.0

    def _latent_size(self) -> tuple[int, int]:
        """(h, w) of the latents of the generated size."""
        size = self.cfg.image_size or self.bundle.resolution
        f = self.bundle.vae_scale_factor
        if size % f:
            raise ConfigError(f"image_size {size} is not a multiple of the VAE factor {f}")
        return size // f, size // f

    def _embed(self, prompt: str) -> torch.Tensor:
        """Conditioning rows (2, 77, D) = [uncond, cond] with guidance, else (1, 77, D)."""
        prompts = ["", prompt] if self.guided else [prompt]
        return self.bundle.encode_prompt(prompts)

    def _token_ids(self, prompt: str) -> list[int]:
        """The prompt's 77 token ids."""
        return [int(i) for i in self.bundle.tokenize([prompt])[0]]

    def _eps(self, counter: UNetCounter, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Guided model output (1, C, h, w) for latents x (1, C, h, w) and conditioning rows ``emb``."""
        uncond = emb[:1] if self.guided else None
        return guided_eps(counter, self.bundle.unet, x, t, emb[-1:], uncond, self.cfg.guidance_scale)

    def _cond_rows(self, rows: int) -> torch.Tensor:
        """(1,) long: the UNet batch row that carries the prompt."""
        return torch.tensor([1] if self.guided else [0], device=self.bundle.device)[:rows]

    # ---- generation -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt: str, seed: int) -> tuple[torch.Tensor, RunCache]:
        """Dense text-to-image (DDIM, CFG) from ``seed``, recording every step into a new cache.

        Args:
            prompt: the prompt to generate.
            seed: the seed of the initial latents (:func:`instdiff.sampling.initial_latents`).

        Returns:
            ``(image, cache)``: the image (1, 3, H, W) in [-1, 1] and what later edits need.
        """
        b, cfg = self.bundle, self.cfg
        clock = Clock(b.device)
        counter = UNetCounter(1)
        # 1. text conditioning and initial latents
        with clock.stage("encode"):
            emb = self._embed(prompt)
        sched = make_scheduler(b, cfg.num_steps)
        x = initial_latents(b, sched, [seed], (b.latent_channels, *self._latent_size()))
        cache = ActivationCache(b.device, cfg.cache_budget_bytes)
        # 2. denoise, recording every step
        with clock.stage("denoise"), sparse_unet(b.unet, cfg.sparse) as st:
            st.bind(cache)
            for i, t in enumerate(sched.timesteps):
                cache.put(i, LATENTS, x)
                if cfg.cross_attention_control and i < cfg.mask_steps:
                    st.ca = CrossAttentionControl("record", self._cond_rows(emb.shape[0]))
                with st.run_step(i, record=True):
                    eps = self._eps(counter, x, t, emb)
                st.ca = None
                x = sched.step(eps, t, x).prev_sample.to(b.dtype)
            cache.put(len(sched.timesteps), LATENTS, x)
        # 3. decode
        with clock.stage("decode"):
            image = b.decode_latents(x)
        run = RunCache(
            prompt,
            int(seed),
            self._token_ids(prompt),
            emb,
            sched.timesteps.clone(),
            cfg.guidance_scale,
            cache,
            image,
            clock.done(),
        )
        log.info("generated %r (seed %d): cache %.1f MB", prompt, seed, cache.nbytes() / 2**20)
        return image, run

    # ---- editing -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def edit(self, cache: RunCache, new_prompt: str, mask: torch.Tensor | None = None) -> EditResult:
        """Re-generate ``cache``'s image for ``new_prompt``, sparsely after the first k dense steps.

        Args:
            cache: a generation of this session's settings.
            new_prompt: the edited prompt.
            mask: the region to change, (H, W) / (1, H, W) / (1, 1, H, W) at image or latent resolution; it
                overrides the difference mask (and the dense detection steps).

        Returns:
            The edit: images (1, 3, H, W), masks (1, 1, H, W) bool, timings, UNet evaluations; extras hold the
            latent mask, the active fraction per feature-map size, the UNet MACs per sparse step (dense vs
            computed), the per-step UNet times and the cache summary.

        Raises:
            EditInputError: a cache made with other steps or guidance, or a mask of another shape.
        """
        b, cfg = self.bundle, self.cfg
        if cache.num_steps != cfg.num_steps or cache.guidance_scale != cfg.guidance_scale:
            raise EditInputError(
                f"the cache was made with {cache.num_steps} steps and guidance {cache.guidance_scale}; this session "
                f"uses {cfg.num_steps} and {cfg.guidance_scale}"
            )
        clock = Clock(b.device)
        counter = UNetCounter(1)
        # 1. text conditioning of the new prompt
        with clock.stage("encode"):
            emb = self._embed(new_prompt)
        sched = make_scheduler(b, cfg.num_steps)
        steps = cfg.num_steps
        x = cache.latents(0).clone()
        h, w = x.shape[-2:]
        extras: dict[str, Any] = {}
        with sparse_unet(b.unet, cfg.sparse) as st:
            st.bind(cache.activations)
            # 2. the difference mask: k dense steps compared with the cached latents, or the caller's mask
            with clock.stage("mask"):
                if mask is None:
                    st.ca = self._control(cache, new_prompt, emb.shape[0])
                    diffs = []
                    start = cfg.mask_steps
                    for i in range(start):
                        with st.run_step(i):
                            eps = self._eps(counter, x, sched.timesteps[i], emb)
                        x = sched.step(eps, sched.timesteps[i], x).prev_sample.to(b.dtype)
                        if i + 1 >= cfg.mask_from:
                            diffs.append(latent_difference(x, cache.latents(i + 1)))
                    st.ca = None
                    lat_mask = difference_mask(diffs, cfg.threshold, cfg.open_radius, cfg.margin, cfg.min_difference)
                    extras["mask_source"] = "difference"
                else:
                    lat_mask = mask_to_latent(mask.to(b.device), (h, w))[:1]
                    start = cfg.dense_steps_with_mask
                    for i in range(start):
                        with st.run_step(i):
                            eps = self._eps(counter, x, sched.timesteps[i], emb)
                        x = sched.step(eps, sched.timesteps[i], x).prev_sample.to(b.dtype)
                    extras["mask_source"] = "given"
            dense_step_times = list(st.step_times)
            st.reset_counters()
            # 3. the remaining steps, sparse, with the cached latents outside the mask
            with clock.stage("denoise"):
                keep = lat_mask[:, None]  # (1, 1, h, w)
                changed = bool(lat_mask.any())
                if changed:
                    x = torch.where(keep, x, cache.latents(start))
                    st.set_mask(lat_mask.expand(emb.shape[0], -1, -1))
                    for i in range(start, steps):
                        with st.run_step(i, sparse=True):
                            eps = self._eps(counter, x, sched.timesteps[i], emb)
                        x = sched.step(eps, sched.timesteps[i], x).prev_sample.to(b.dtype)
                        x = torch.where(keep, x, cache.latents(i + 1))
                else:
                    x = cache.latents(steps).clone()
            sparse_steps = steps - start if changed else 0
            macs = st.macs_summary()
            extras.update(
                active_fraction=st.active_fractions(),
                plans=st.plans(),
                macs={
                    "dense_per_step": macs["dense"] / max(sparse_steps, 1),
                    "sparse_per_step": macs["actual"] / max(sparse_steps, 1),
                    "ratio": macs["ratio"] if sparse_steps else 1.0,
                    "by_category": macs["by_category"],
                },
                step_times={"dense": dense_step_times, "sparse": list(st.step_times)},
            )
        # 4. decode, and paste into the cached image
        with clock.stage("decode"):
            if changed:
                image = b.decode_latents(x)
                img_mask = self._image_mask(lat_mask, image.shape[-2:])
                if cfg.composite:
                    image = torch.where(img_mask[:, None], image, cache.image)
            else:
                image = cache.image.clone()
                img_mask = torch.zeros((1, *cache.image.shape[-2:]), dtype=torch.bool, device=image.device)
        extras.update(
            latents=x,
            mask_latent=lat_mask[:, None],
            changed=changed,
            dense_steps=start,
            sparse_steps=sparse_steps,
            dense_equivalent_unet_calls=(
                emb.shape[0] * start + emb.shape[0] * sparse_steps / max(extras["macs"]["ratio"], 1e-12)
            ),
            cache=cache.summary(),
        )
        return EditResult(
            images=image, masks=img_mask[:, None], timings=clock.done(), unet_calls=float(counter.rows), extras=extras
        )

    @torch.inference_mode()
    def regenerate(self, cache: RunCache, new_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense baseline (the paper's SDTP): every step dense from ``cache``'s initial latents.

        With cross-attention control over the first ``mask_steps`` when the session enables it.

        Args:
            cache: a generation of this session's settings.
            new_prompt: the edited prompt.

        Returns:
            ``(image (1, 3, H, W) in [-1, 1], final latents (1, C, h, w))``.
        """
        b, cfg = self.bundle, self.cfg
        counter = UNetCounter(1)
        emb = self._embed(new_prompt)
        sched = make_scheduler(b, cfg.num_steps)
        x = cache.latents(0).clone()
        with sparse_unet(b.unet, cfg.sparse) as st:
            st.bind(cache.activations)
            for i, t in enumerate(sched.timesteps):
                st.ca = self._control(cache, new_prompt, emb.shape[0]) if i < cfg.mask_steps else None
                with st.run_step(i):
                    eps = self._eps(counter, x, t, emb)
                x = sched.step(eps, t, x).prev_sample.to(b.dtype)
            st.ca = None
        return b.decode_latents(x), x

    def _control(self, cache: RunCache, new_prompt: str, rows: int) -> CrossAttentionControl | None:
        """Cross-attention control replacing the maps of the words ``new_prompt`` shares with the cache's."""
        if not self.cfg.cross_attention_control:
            return None
        src, dst = token_alignment(cache.token_ids, self._token_ids(new_prompt))
        dev = self.bundle.device
        return CrossAttentionControl(
            "replace",
            self._cond_rows(rows),
            torch.tensor(src, device=dev),
            torch.tensor(dst, device=dev),
            cache.activations,
        )

    def _image_mask(self, lat_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The latent mask (1, h, w) at image size (1, H, W), dilated by the composite margin (image pixels)."""
        up = torch.nn.functional.interpolate(lat_mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0
        margin = self.cfg.composite_margin
        if margin is None:
            margin = self.bundle.vae_scale_factor
        return dilate(up, margin)


def fisedit_edit_pairs(
    bundle: ModelBundle,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    cfg: FISEditConfig | None = None,
    seeds: int | Sequence[int] = 0,
) -> EditResult:
    """For prompt-pair rows: generate each source prompt (recording its cache), then edit it to the target.

    Args:
        bundle: the models.
        source_prompts: B prompts to generate.
        target_prompts: B prompts to edit to.
        cfg: the session's settings.
        seeds: one seed for all pairs, or one per pair.

    Returns:
        One ``EditResult`` for the batch: images (B, 3, H, W), masks (B, 1, H, W), timings summed over rows
        (``generate`` included), ``unet_calls`` per image (generation + edit), and per-row extras under
        ``rows`` plus ``source_images`` (B, 3, H, W).

    Raises:
        EditInputError: no pairs, or prompt and seed counts that differ.
    """
    if len(source_prompts) != len(target_prompts):
        raise EditInputError(f"{len(source_prompts)} source prompts but {len(target_prompts)} target prompts")
    if not source_prompts:
        raise EditInputError("no prompt pairs given")
    seed_list = [int(seeds)] * len(source_prompts) if isinstance(seeds, int) else [int(s) for s in seeds]
    if len(seed_list) != len(source_prompts):
        raise EditInputError(f"{len(seed_list)} seeds for {len(source_prompts)} prompt pairs")
    session = FISEditSession(bundle, cfg)
    images, masks, sources, rows = [], [], [], []
    timings: dict[str, float] = {}
    calls = 0.0
    for src, tgt, seed in zip(source_prompts, target_prompts, seed_list, strict=True):
        source_image, cache = session.generate(src, seed)
        res = session.edit(cache, tgt)
        images.append(res.images)
        masks.append(res.masks)
        sources.append(source_image)
        timings["generate"] = timings.get("generate", 0.0) + cache.timings["total"]
        for k, v in res.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        calls += res.unet_calls + session.cfg.num_steps * (2 if session.guided else 1)
        rows.append({k: v for k, v in res.extras.items() if k != "latents"})
        del cache
    timings["total"] = timings.get("total", 0.0) + timings["generate"]
    return EditResult(
        images=torch.cat(images),
        masks=torch.cat(masks),
        timings=timings,
        unet_calls=calls / len(images),
        extras={"rows": rows, "source_images": torch.cat(sources), "method": "fisedit"},
    )


__all__ = ["FISEditConfig", "FISEditSession", "RunCache", "fisedit_edit_pairs", "token_alignment"]
