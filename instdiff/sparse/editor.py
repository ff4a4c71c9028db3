"""FISEdit's cache-based editing loop: generate once (recording the cache), edit the prompt, re-generate sparsely.

FISEdit §"Cache-Based Editing Pipeline" and Fig. 2: ``generate`` runs dense text-to-image (DDIM, classifier-free
guidance) and records, per step, the latents and the activations the sparse pass needs. ``edit`` re-runs from the
same initial latents with the new prompt: the first k steps dense, to find the difference mask (§"Target Area
Capture"; optionally with cross-attention control), then the remaining steps sparse; latents outside the mask
are the cached ones at every step, so the unchanged region is reproduced exactly.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from instdiff.sparse.cache import ActivationCache
from instdiff.sparse.config import SparseConfig
from instdiff.sparse.engine import CrossAttentionControl, SparseState, sparse_unet
from instdiff.sparse.mask import difference_mask, dilate, latent_difference, mask_to_latent

if TYPE_CHECKING:
    from instdiff.editing import EditResult
    from instdiff.models import ModelBundle

log = logging.getLogger(__name__)

LATENTS = "latents"


@dataclass(frozen=True)
class FISEditConfig:
    """Settings of a FISEdit session.

    ``num_steps`` / ``guidance_scale``: the DDIM run (generation and edits share them).
    ``mask_steps``: k, the dense steps of an edit that find the difference mask (paper: the difference is clear
    by steps 5–10 of 50); ``mask_from``: the first step whose latent difference enters the map.
    ``threshold``: ``None`` for Otsu, else a fixed fraction of the map's maximum. ``open_radius`` / ``margin``:
    opening radius and dilation margin, in latent pixels. ``min_difference``: an edit whose latents never differ
    by more than this (Σ over channels) from the cached run is "no change" and returns the cached image.
    ``dense_steps_with_mask``: dense steps before going sparse when the caller gives the mask (0: all sparse).
    ``composite`` / ``composite_margin``: paste the edited region (latent mask upsampled, dilated by this many
    image pixels) into the cached image, so that pixels outside it are the cached ones exactly.
    ``cross_attention_control``: keep the cached cross-attention maps of unchanged words during the mask steps.
    ``cache_budget_bytes``: accelerator memory for the cache; the rest goes to (pinned) host memory.
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
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 1 <= self.mask_steps <= self.num_steps:
            raise ValueError(f"mask_steps must lie in [1, num_steps={self.num_steps}], got {self.mask_steps}")
        if not 1 <= self.mask_from <= self.mask_steps:
            raise ValueError(f"mask_from must lie in [1, mask_steps={self.mask_steps}], got {self.mask_from}")
        if not 0 <= self.dense_steps_with_mask < self.num_steps:
            raise ValueError(f"dense_steps_with_mask must lie in [0, num_steps), got {self.dense_steps_with_mask}")


@dataclass
class RunCache:
    """What a generation leaves for later edits: its inputs, per-step latents and activations, and its image.

    ``activations`` holds, per step i, ``latents`` (the UNet input x_i; step T holds the final latents) and the
    layer activations named by module path. ``embeddings``: the UNet's text conditioning (rows: [uncond, cond]
    with guidance, else [cond]).
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
        return int(self.timesteps.numel())

    def latents(self, step: int) -> torch.Tensor:
        """x_step (1, C, h, w): the UNet input of ``step``; ``step == num_steps`` gives the final latents."""
        return self.activations.get(step, LATENTS)

    def nbytes(self) -> int:
        return self.activations.nbytes()

    def summary(self) -> dict[str, Any]:
        return self.activations.summary()


def token_alignment(source: Sequence[int], target: Sequence[int]) -> tuple[list[int], list[int]]:
    """Positions (src, dst) of target tokens that are unchanged from the source (difflib's equal blocks)."""
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
    """

    def __init__(self, bundle: ModelBundle, cfg: FISEditConfig | None = None) -> None:
        self.bundle = bundle
        self.cfg = cfg or FISEditConfig()

    # ---- helpers ---------------------------------------------------------------------------------
    @property
    def guided(self) -> bool:
        return self.cfg.guidance_scale > 1.0

    def _latent_size(self) -> tuple[int, int]:
        size = self.cfg.image_size or self.bundle.resolution
        f = self.bundle.vae_scale_factor
        if size % f:
            raise ValueError(f"image_size {size} is not a multiple of the VAE factor {f}")
        return size // f, size // f

    def _embed(self, prompt: str) -> torch.Tensor:
        """Conditioning rows (2, 77, D) = [uncond, cond] with guidance, else (1, 77, D)."""
        prompts = ["", prompt] if self.guided else [prompt]
        return self.bundle.encode_prompt(prompts)

    def _token_ids(self, prompt: str) -> list[int]:
        return [int(i) for i in self.bundle.tokenize([prompt])[0]]

    def _scheduler(self) -> Any:
        sched = self.bundle.fresh_scheduler()
        sched.set_timesteps(self.cfg.num_steps, device=self.bundle.device)
        return sched

    def _eps(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Guided noise prediction for latents x (1, C, h, w)."""
        unet = self.bundle.unet
        rows = emb.shape[0]
        inp = x.expand(rows, -1, -1, -1)
        eps = unet(inp, t, encoder_hidden_states=emb, return_dict=False)[0]
        if not self.guided:
            return eps
        uncond, cond = eps.chunk(2)
        return uncond + self.cfg.guidance_scale * (cond - uncond)

    def _cond_rows(self, rows: int) -> torch.Tensor:
        return torch.tensor([1] if self.guided else [0], device=self.bundle.device)[: rows]

    # ---- generation -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt: str, seed: int) -> tuple[torch.Tensor, RunCache]:
        """Dense text-to-image (DDIM, CFG) from ``seed``; returns the image (1, 3, H, W) in [-1, 1] and the cache."""
        b, cfg = self.bundle, self.cfg
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        # 1. text conditioning and initial latents
        emb = self._embed(prompt)
        timings["encode"] = time.perf_counter() - t0
        h, w = self._latent_size()
        gen = torch.Generator("cpu").manual_seed(int(seed))
        x = torch.randn((1, b.latent_channels, h, w), generator=gen).to(b.device, b.dtype)
        sched = self._scheduler()
        x = x * sched.init_noise_sigma
        cache = ActivationCache(b.device, cfg.cache_budget_bytes)
        # 2. denoise, recording every step
        t1 = time.perf_counter()
        with sparse_unet(b.unet, cfg.sparse) as st:
            st.bind(cache)
            for i, t in enumerate(sched.timesteps):
                cache.put(i, LATENTS, x)
                if cfg.cross_attention_control and i < cfg.mask_steps:
                    st.ca = CrossAttentionControl("record", self._cond_rows(emb.shape[0]))
                with st.run_step(i, record=True):
                    eps = self._eps(x, t, emb)
                st.ca = None
                x = sched.step(eps, t, x).prev_sample.to(b.dtype)
            cache.put(len(sched.timesteps), LATENTS, x)
        timings["denoise"] = time.perf_counter() - t1
        # 3. decode
        t2 = time.perf_counter()
        image = b.decode_latents(x)
        timings["decode"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        run = RunCache(prompt, int(seed), self._token_ids(prompt), emb, sched.timesteps.clone(), cfg.guidance_scale,
                       cache, image, timings)
        log.info("generated %r (seed %d): cache %.1f MB", prompt, seed, cache.nbytes() / 2**20)
        return image, run

    # ---- editing -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def edit(self, cache: RunCache, new_prompt: str, mask: torch.Tensor | None = None) -> EditResult:
        """Re-generate ``cache``'s image for ``new_prompt``, sparsely outside the first k steps.

        ``mask``: the region to change, (H, W) / (1, H, W) / (1, 1, H, W) at image or latent resolution; it
        overrides the difference mask (and the dense detection steps). Returns an ``EditResult`` whose extras
        hold the latent mask, the active fraction per feature-map size, the UNet MACs per sparse step (dense vs
        computed), the per-step UNet times and the cache summary.
        """
        from instdiff.editing import EditResult

        b, cfg = self.bundle, self.cfg
        if cache.num_steps != cfg.num_steps or cache.guidance_scale != cfg.guidance_scale:
            raise ValueError(
                f"the cache was made with {cache.num_steps} steps and guidance {cache.guidance_scale}; this session "
                f"uses {cfg.num_steps} and {cfg.guidance_scale}"
            )
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        # 1. text conditioning of the new prompt
        emb = self._embed(new_prompt)
        timings["encode"] = time.perf_counter() - t0
        sched = self._scheduler()
        steps = cfg.num_steps
        x = cache.latents(0).clone()
        h, w = x.shape[-2:]
        unet_calls = 0.0
        extras: dict[str, Any] = {}
        with sparse_unet(b.unet, cfg.sparse) as st:
            st.bind(cache.activations)
            # 2. the difference mask: k dense steps compared with the cached latents, or the caller's mask
            t1 = time.perf_counter()
            if mask is None:
                st.ca = self._control(cache, new_prompt, emb.shape[0])
                diffs = []
                start = cfg.mask_steps
                for i in range(start):
                    with st.run_step(i):
                        eps = self._eps(x, sched.timesteps[i], emb)
                    x = sched.step(eps, sched.timesteps[i], x).prev_sample.to(b.dtype)
                    unet_calls += emb.shape[0]
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
                        eps = self._eps(x, sched.timesteps[i], emb)
                    x = sched.step(eps, sched.timesteps[i], x).prev_sample.to(b.dtype)
                    unet_calls += emb.shape[0]
                extras["mask_source"] = "given"
            timings["mask"] = time.perf_counter() - t1
            dense_step_times = list(st.step_times)
            st.reset_counters()
            # 3. the remaining steps, sparse, with the cached latents outside the mask
            t2 = time.perf_counter()
            keep = lat_mask[:, None]  # (1, 1, h, w)
            if bool(lat_mask.any()):
                x = torch.where(keep, x, cache.latents(start))
                st.set_mask(lat_mask.expand(emb.shape[0], -1, -1))
                for i in range(start, steps):
                    with st.run_step(i, sparse=True):
                        eps = self._eps(x, sched.timesteps[i], emb)
                    x = sched.step(eps, sched.timesteps[i], x).prev_sample.to(b.dtype)
                    x = torch.where(keep, x, cache.latents(i + 1))
                    unet_calls += emb.shape[0]
                changed = True
            else:
                x = cache.latents(steps).clone()
                changed = False
            timings["denoise"] = time.perf_counter() - t2
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
        t3 = time.perf_counter()
        if changed:
            image = b.decode_latents(x)
            img_mask = self._image_mask(lat_mask, image.shape[-2:])
            if cfg.composite:
                image = torch.where(img_mask[:, None], image, cache.image)
        else:
            image = cache.image.clone()
            img_mask = torch.zeros((1, *cache.image.shape[-2:]), dtype=torch.bool, device=image.device)
        timings["decode"] = time.perf_counter() - t3
        timings["total"] = time.perf_counter() - t0
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
        return EditResult(images=image, masks=img_mask[:, None], timings=timings, unet_calls=unet_calls, extras=extras)

    @torch.inference_mode()
    def regenerate(self, cache: RunCache, new_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense baseline (the paper's SDTP): all steps dense from ``cache``'s initial latents with the new
        prompt (with cross-attention control over the first ``mask_steps`` when the session enables it).
        Returns the image (1, 3, H, W) and the final latents (1, C, h, w)."""
        b, cfg = self.bundle, self.cfg
        emb = self._embed(new_prompt)
        sched = self._scheduler()
        x = cache.latents(0).clone()
        with sparse_unet(b.unet, cfg.sparse) as st:
            st.bind(cache.activations)
            for i, t in enumerate(sched.timesteps):
                st.ca = self._control(cache, new_prompt, emb.shape[0]) if i < cfg.mask_steps else None
                with st.run_step(i):
                    eps = self._eps(x, t, emb)
                x = sched.step(eps, t, x).prev_sample.to(b.dtype)
            st.ca = None
        return b.decode_latents(x), x

    def _control(self, cache: RunCache, new_prompt: str, rows: int) -> CrossAttentionControl | None:
        if not self.cfg.cross_attention_control:
            return None
        src, dst = token_alignment(cache.token_ids, self._token_ids(new_prompt))
        dev = self.bundle.device
        return CrossAttentionControl(
            "replace", self._cond_rows(rows), torch.tensor(src, device=dev), torch.tensor(dst, device=dev),
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

    Returns one ``EditResult`` for the batch: images (B, 3, H, W), masks (B, 1, H, W), timings summed over rows
    (``generate`` included), ``unet_calls`` per image (generation + edit), and per-row extras under ``rows``
    plus ``source_images`` (B, 3, H, W).
    """
    from instdiff.editing import EditResult

    if len(source_prompts) != len(target_prompts):
        raise ValueError(f"{len(source_prompts)} source prompts but {len(target_prompts)} target prompts")
    if not source_prompts:
        raise ValueError("no prompt pairs given")
    seed_list = [int(seeds)] * len(source_prompts) if isinstance(seeds, int) else [int(s) for s in seeds]
    if len(seed_list) != len(source_prompts):
        raise ValueError(f"{len(seed_list)} seeds for {len(source_prompts)} prompt pairs")
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


__all__ = ["FISEditConfig", "FISEditSession", "RunCache", "SparseState", "fisedit_edit_pairs", "token_alignment"]
