"""FISEdit's cache-based editing loop: generate once (recording the cache), edit the prompt, re-generate sparsely.

FISEdit §"Cache-Based Editing Pipeline" and Fig. 2: ``generate`` runs dense text-to-image (DDIM, classifier-free
guidance) and records, per step, the latents and the activations the sparse pass needs. ``edit`` re-runs from the
same initial latents with the new prompt: the first k steps dense, to find the difference mask (§"Target Area
Capture"; optionally with cross-attention control), then the remaining steps sparse; latents outside the mask
are the cached ones at every step, so the unchanged region is reproduced exactly.

The loop pieces are :mod:`instdiff.sampling`'s: the initial latents of a seed and classifier-free guidance are
the same functions :func:`instdiff.editing.generate` uses, so a session's generation equals ``generate``'s (up to
float rounding of the text encoder's batching: the session encodes ``["", prompt]`` in one call).

The session's settings (:class:`~instdiff.sparse.config.FISEditConfig`) and what a generation leaves for its
edits (:class:`~instdiff.sparse.cache.RunCache`) are defined next to the engine's settings and the activation
cache, and re-exported here.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from instdiff.bundle import ModelBundle
from instdiff.errors import ConfigError, EditInputError
from instdiff.inputs import check_prompts, check_seed, check_seeds
from instdiff.sampling import Clock, UNetCounter, guided_eps, initial_latents, make_scheduler
from instdiff.sparse.cache import LATENTS, ActivationCache, RunCache
from instdiff.sparse.config import FISEditConfig
from instdiff.sparse.engine import sparse_unet
from instdiff.sparse.mask import difference_mask, dilate, latent_difference, mask_to_latent
from instdiff.sparse.state import CrossAttentionControl
from instdiff.types import EditResult

log = logging.getLogger(__name__)


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

    Raises:
        ConfigError: ``cfg`` is not a :class:`FISEditConfig`.
    """

    def __init__(self, bundle: ModelBundle, cfg: FISEditConfig | None = None) -> None:
        if cfg is not None and not isinstance(cfg, FISEditConfig):
            raise ConfigError(f"cfg: expected a FISEditConfig; got {type(cfg).__name__}")
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
            seed: the integer seed of the initial latents (:func:`instdiff.sampling.initial_latents`).

        Returns:
            ``(image, cache)``: the image (1, 3, H, W) in [-1, 1] and what later edits need.

        Raises:
            EditInputError: a prompt that is not a string or is empty, a seed that is not an integer or out of
                range.
            ConfigError: an ``image_size`` that is not a multiple of the model's VAE factor.
        """
        b, cfg = self.bundle, self.cfg
        check_prompts(b, [prompt], "generation")
        seed = check_seed(seed)
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
            {"model": b.name, "cross_attention_steps": cfg.mask_steps if cfg.cross_attention_control else 0},
        )
        log.info("generated %r (seed %d): cache %.1f MB", prompt, seed, cache.nbytes() / 2**20)
        return image, run

    # ---- editing -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def edit(self, cache: RunCache, new_prompt: str, mask: torch.Tensor | None = None) -> EditResult:
        """Re-generate ``cache``'s image for ``new_prompt``, sparsely after the first k dense steps.

        Args:
            cache: a generation of this session's settings (see :meth:`check_cache`).
            new_prompt: the edited prompt.
            mask: the region to change, (H, W) / (1, H, W) / (1, 1, H, W) at image or latent resolution, bool or
                float (> 0.5 is set); it overrides the difference mask (and the dense detection steps).

        Returns:
            The edit: images (1, 3, H, W), masks (1, 1, H, W) bool, timings, UNet evaluations; extras hold the
            latent mask, the active fraction per feature-map size, the UNet MACs per sparse step (dense vs
            computed), the per-step UNet times and the cache summary.

        Raises:
            EditInputError: a cache this session cannot edit (:meth:`check_cache`), a prompt that is not a string
                or is empty, a mask of another shape or with values that are not finite.
        """
        b, cfg = self.bundle, self.cfg
        self.check_cache(cache)
        check_prompts(b, [new_prompt], "target")
        if mask is not None:
            self._check_mask(mask, cache)
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

        Raises:
            EditInputError: a cache this session cannot edit (:meth:`check_cache`), a prompt that is not a string
                or is empty.
        """
        b, cfg = self.bundle, self.cfg
        self.check_cache(cache)
        check_prompts(b, [new_prompt], "target")
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

    def check_cache(self, cache: RunCache) -> None:
        """Refuse a cache that this session cannot edit: one made with other steps or guidance, by another model,
        at another latent size, or without the cross-attention maps this session's control needs.

        Sparse settings need not agree: every mode records the same activations, and a layer whose cached
        activations are missing runs dense.

        Args:
            cache: a :class:`RunCache` from :meth:`generate`.

        Raises:
            EditInputError: naming what the cache was made with and what this session uses.
            ConfigError: this session's ``image_size`` is not a multiple of the model's VAE factor.
        """
        b, cfg = self.bundle, self.cfg
        if not isinstance(cache, RunCache):
            raise EditInputError(f"cache: expected a RunCache from FISEditSession.generate; got {type(cache).__name__}")
        if cache.num_steps != cfg.num_steps or cache.guidance_scale != cfg.guidance_scale:
            raise EditInputError(
                f"the cache was made with {cache.num_steps} steps and guidance {cache.guidance_scale}; this session "
                f"uses {cfg.num_steps} and {cfg.guidance_scale}"
            )
        model = cache.made_with.get("model", b.name)
        latents = cache.latents(0)
        dim = cache.embeddings.shape[-1]
        if model != b.name or latents.shape[1] != b.latent_channels or dim != b.text_encoder.config.hidden_size:
            raise EditInputError(
                f"the cache was made by model {model!r} ({latents.shape[1]} latent channels, text width {dim}); this "
                f"session's model is {b.name!r} ({b.latent_channels} latent channels, text width "
                f"{b.text_encoder.config.hidden_size})"
            )
        h, w = latents.shape[-2:]
        mine = self._latent_size()
        if (h, w) != mine:
            f = b.vae_scale_factor
            raise EditInputError(
                f"the cache holds {w}x{h} latents ({w * f}x{h * f} px); this session makes {mine[1]}x{mine[0]} "
                f"latents (image_size {cfg.image_size or b.resolution} px)"
            )
        recorded = int(cache.made_with.get("cross_attention_steps", 0))
        if cfg.cross_attention_control and recorded < cfg.mask_steps:
            raise EditInputError(
                f"the cache holds cross-attention maps of its first {recorded} steps; this session's cross-attention "
                f"control needs the first {cfg.mask_steps} (generate with cross_attention_control on and mask_steps "
                f">= {cfg.mask_steps})"
            )

    def _check_mask(self, mask: torch.Tensor, cache: RunCache) -> None:
        """Refuse a caller's mask that is not (H, W), (1, H, W) or (1, 1, H, W) at the cache's image or latent
        size, or that holds NaN or infinity."""
        latent = tuple(cache.latents(0).shape[-2:])
        image = tuple(cache.image.shape[-2:])
        if not isinstance(mask, torch.Tensor):
            raise EditInputError(f"mask must be a tensor (H, W), (1, H, W) or (1, 1, H, W); got {type(mask).__name__}")
        shape = tuple(mask.shape)
        if not 2 <= mask.ndim <= 4 or any(d != 1 for d in shape[:-2]) or shape[-2:] not in (latent, image):
            raise EditInputError(
                f"mask must be (H, W), (1, H, W) or (1, 1, H, W) at the image's {image[1]}x{image[0]} or the "
                f"latents' {latent[1]}x{latent[0]}; got shape {shape}"
            )
        if (mask.is_floating_point() or mask.is_complex()) and not bool(torch.isfinite(mask).all()):
            raise EditInputError("mask values must be finite (bool, or float where > 0.5 is set); got NaN or infinity")

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
        EditInputError: no pairs, prompt and seed counts that differ, prompts that are not strings or are empty,
            seeds that are not integers or out of range.
    """
    if len(source_prompts) != len(target_prompts):
        raise EditInputError(f"{len(source_prompts)} source prompts but {len(target_prompts)} target prompts")
    if not source_prompts:
        raise EditInputError("no prompt pairs given")
    n = len(source_prompts)
    seed_list = [check_seed(seeds)] * n if isinstance(seeds, int) else check_seeds(seeds, n, "prompt pairs")
    check_prompts(bundle, source_prompts, "source")
    check_prompts(bundle, target_prompts, "target")
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
