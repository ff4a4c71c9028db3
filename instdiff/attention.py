"""Cross-attention capture through diffusers' attention-processor extension point, and the one explicit
multi-head attention helper every processor of the project computes with.

``install_attention_capture(unet, store, selection)`` swaps the processor of the selected cross-attention
layers (``attn2`` in SD's transformer blocks) for :class:`RecordingAttnProcessor`, which computes the same
attention explicitly and adds the conditional half's probabilities, averaged over heads, into an explicit
:class:`AttentionStore`. Every other layer keeps its processor (SDPA by default).
``remove_attention_capture`` puts the original processor objects back, so the UNet is left exactly as it
was. Layers are chosen by module path and by spatial downsampling factor, never by call counting.

:func:`multihead_attention` (with :func:`split_heads`, :func:`merge_heads`, :func:`attention_probs`) is the
attention arithmetic shared by :class:`RecordingAttnProcessor`, the sparse engine's processors
(:mod:`instdiff.sparse.processors`) and, through subclassing, the grounding recorder: head split and merge,
the scale ``attn.scale``, and explicit probabilities where a caller needs to see or replace them (SDPA
otherwise, as diffusers' ``AttnProcessor2_0``).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from instdiff.errors import ConfigError

log = logging.getLogger(__name__)

ProbsHook = Callable[[torch.Tensor], torch.Tensor | None]
"""Sees attention probabilities (N, heads, L, S); returns replacement probabilities or ``None`` to keep them."""


# ---- the explicit attention helper ------------------------------------------------------------------
def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Split the channels of projected tokens into heads.

    Args:
        x: (N, L, heads·d) projected queries, keys or values.
        heads: number of attention heads.

    Returns:
        (N, heads, L, d) view-based tensor (diffusers' ``view(N, -1, heads, d).transpose(1, 2)``).
    """
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_heads`.

    Args:
        x: (N, heads, L, d) per-head outputs.

    Returns:
        (N, L, heads·d) tokens.
    """
    n, _, length, _ = x.shape
    return x.transpose(1, 2).reshape(n, length, -1)


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    upcast: bool = False,
    upcast_softmax: bool = False,
) -> torch.Tensor:
    """Attention probabilities softmax(q kᵀ · scale + mask) over the keys (Vaswani et al. 2017, Eq. 1).

    The upcasts follow diffusers' ``Attention.get_attention_scores``: ``upcast`` (a layer's
    ``upcast_attention``, set by SD 2.x) casts q and k to float32 before the product, so fp16 logits cannot
    overflow; ``upcast_softmax`` casts the logits to float32 before the softmax.

    Args:
        q: (N, heads, L, d) queries.
        k: (N, heads, S, d) keys.
        scale: the logit scale, ``attn.scale`` (1/√d for every SD model).
        mask: additive mask broadcastable to (N, heads, L, S), or ``None``.
        upcast: q kᵀ, the mask and the softmax in float32.
        upcast_softmax: the softmax in float32.

    Returns:
        (N, heads, L, S) probabilities in ``q.dtype``; each row sums to one.
    """
    dtype = q.dtype
    if upcast:
        q, k = q.float(), k.float()
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    if upcast_softmax:
        scores = scores.float()
    return scores.softmax(dim=-1).to(dtype)


def sdpa_scale(attn: Attention, head_dim: int) -> float | None:
    """The ``scale`` to pass to ``F.scaled_dot_product_attention`` for ``attn``.

    ``None`` (SDPA's default 1/√d, what ``AttnProcessor2_0`` uses) when ``attn.scale`` is that value; the
    layer's own scale otherwise.
    """
    return None if abs(attn.scale - head_dim**-0.5) < 1e-12 else attn.scale


def multihead_attention(
    attn: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    on_probs: ProbsHook | None = None,
    mask: torch.Tensor | None = None,
    upcast: bool = False,
    upcast_softmax: bool = False,
) -> torch.Tensor:
    """Multi-head attention of already projected tokens, the project's one implementation.

    Heads are split, ``attn.norm_q`` / ``attn.norm_k`` applied when the layer has them, and the heads merged
    again. Without ``on_probs`` and ``mask`` this is SDPA, as diffusers' ``AttnProcessor2_0``; with either,
    the probabilities are explicit (:func:`attention_probs` with ``attn.scale``) and ``on_probs`` may read or
    replace them before they weight the values.

    Args:
        attn: the diffusers ``Attention`` layer (heads, scale, optional q/k norms).
        q: (N, L, D) projected queries.
        k: (N, S, D) projected keys.
        v: (N, S, D) projected values.
        on_probs: called with the (N, heads, L, S) probabilities; returns replacements or ``None``.
        mask: additive attention mask broadcastable to (N, heads, L, S) (explicit path).
        upcast: logits and softmax in float32 (explicit path; a layer's ``upcast_attention``).
        upcast_softmax: softmax in float32 (explicit path; a layer's ``upcast_softmax``).

    Returns:
        (N, L, D) attention output before ``attn.to_out``.
    """
    heads = attn.heads
    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    if on_probs is None and mask is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=sdpa_scale(attn, q.shape[-1]))  # (N, heads, L, d)
        return merge_heads(out)
    probs = attention_probs(q, k, attn.scale, mask, upcast, upcast_softmax)  # (N, heads, L, S)
    if on_probs is not None:
        replaced = on_probs(probs)
        if replaced is not None:
            probs = replaced
    return merge_heads(probs.to(v.dtype) @ v)


# ---- recording cross-attention maps ------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionSelection:
    """Which cross-attention layers to record.

    Both filters apply. Selecting by spatial factor and module path, never by call order, follows the
    diffusers attention-processor extension point (layers are addressed by their processor path).

    Attributes:
        downsample: keep layers whose feature map is ``latent_size / downsample`` on a side (SD 1.x/2.x at
            512 px: ``4`` → the 16×16 maps InstDiffEdit reads, in down_blocks.2 and up_blocks.1); ``None``
            keeps every resolution.
        paths: fnmatch patterns on processor paths such as ``"up_blocks.1.*"``; ``None`` keeps all.
    """

    downsample: int | None = 4
    paths: tuple[str, ...] | None = None


@dataclass
class AttentionStore:
    """Sum of head-averaged cross-attention probabilities per step, for the rows asked for.

    The caller sets ``cond_rows`` (a slice of the UNet batch holding the conditional samples) and ``step``
    before each UNet call. This is the ``store`` protocol :class:`RecordingAttnProcessor` writes to:
    ``cond_rows``, ``wants()`` and ``add(probs, hw)``.

    Attributes:
        cond_rows: rows of the UNet batch to record.
        step: the current denoising step (a key of ``maps``).
        record_steps: steps to record; ``None`` records all.
        enabled: ``False`` records nothing (the processors still compute explicitly).
        maps: step → (R, HW, T) float32 sum over the recorded layers.
        counts: step → number of layers summed.
        shapes: step → (h, w) of the recorded maps.
    """

    cond_rows: slice = field(default_factory=lambda: slice(None))
    step: int = 0
    record_steps: set[int] | None = None
    enabled: bool = True
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    shapes: dict[int, tuple[int, int]] = field(default_factory=dict)

    def wants(self) -> bool:
        """Whether the current step is to be recorded."""
        return self.enabled and (self.record_steps is None or self.step in self.record_steps)

    def add(self, probs: torch.Tensor, hw: tuple[int, int]) -> None:
        """Add the head-averaged probabilities of one layer to the current step.

        Args:
            probs: (R, HW, T) probabilities of the ``cond_rows``, any float dtype (stored as float32).
            hw: (h, w) of the layer's feature map, h·w = HW.

        Raises:
            ConfigError: layers of two resolutions selected for one step.
        """
        prev = self.shapes.setdefault(self.step, hw)
        if prev != hw:
            raise ConfigError(f"attention maps of {hw} and {prev} selected for one step; select one resolution")
        probs = probs.float()
        if self.step in self.maps:
            self.maps[self.step] += probs
            self.counts[self.step] += 1
        else:
            self.maps[self.step] = probs.clone()
            self.counts[self.step] = 1

    def mean(self, step: int) -> torch.Tensor:
        """Layer-averaged maps of ``step``.

        Args:
            step: a recorded step.

        Returns:
            (R, T, h, w) float32, one map per token.
        """
        h, w = self.shapes[step]
        m = self.maps[step] / self.counts[step]  # (R, HW, T)
        return m.transpose(1, 2).reshape(m.shape[0], m.shape[2], h, w)

    def reset(self) -> None:
        """Forget every recorded step and return to step 0."""
        self.maps.clear()
        self.counts.clear()
        self.shapes.clear()
        self.step = 0


class RecordingAttnProcessor:
    """Attention with explicit softmax, recording cross-attention probabilities into a store.

    The same projections and scale as diffusers' SDPA processor, through :func:`multihead_attention`, so the
    output equals it to fp32 rounding; the layer's ``upcast_attention`` / ``upcast_softmax`` are honoured as
    in diffusers' ``AttnProcessor`` (``get_attention_scores``). Subclasses may swap the store (any object with
    ``cond_rows``, ``wants()`` and ``add(probs, hw)``; :mod:`instdiff.grounding` keeps the probabilities with
    their graph).

    Args:
        store: where head-averaged probabilities of the conditional rows go.
        hw: (h, w) of this layer's feature map; ``None`` infers a square map from the token count.
    """

    def __init__(self, store: AttentionStore, hw: tuple[int, int] | None = None) -> None:
        self.store = store
        self.hw = hw

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """Run ``attn`` on ``hidden_states`` (N, L, C) or (N, C, H, W); returns the same shape."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        def record(probs: torch.Tensor) -> None:  # (N, heads, HW, T)
            if is_cross and self.store.wants():
                hw = self.hw if self.hw is not None else _square(seq)
                self.store.add(probs[self.store.cond_rows].mean(dim=1), hw)  # (R, HW, T)

        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out = multihead_attention(
            attn,
            q,
            k,
            v,
            on_probs=record,
            mask=attention_mask,
            upcast=bool(getattr(attn, "upcast_attention", False)),
            upcast_softmax=bool(getattr(attn, "upcast_softmax", False)),
        )
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _square(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"cannot infer a square map from {n} tokens; pass hw to the processor")
    return side, side


# ---- layer selection -------------------------------------------------------------------------------------
_BLOCK = re.compile(r"^(down_blocks|up_blocks|mid_block)\.?(\d+)?")


def layer_downsample(unet: UNet2DConditionModel, path: str) -> int:
    """Downsampling factor, relative to the latent, of the feature map seen by the layer at ``path``.

    Args:
        unet: the UNet (its number of resolution levels).
        path: a module or processor path under ``down_blocks``, ``mid_block`` or ``up_blocks``.

    Returns:
        2^level: 1 for the latent's own resolution.

    Raises:
        ValueError: a path outside the UNet's blocks.
    """
    m = _BLOCK.match(path)
    if m is None:
        raise ValueError(f"unexpected attention path {path!r}")
    n = len(unet.config.block_out_channels)
    if m.group(1) == "mid_block":
        return 2 ** (n - 1)
    i = int(m.group(2))
    return 2**i if m.group(1) == "down_blocks" else 2 ** (n - 1 - i)


def cross_attention_paths(unet: UNet2DConditionModel) -> list[str]:
    """Processor paths of all cross-attention layers (``...attn2.processor``), in the UNet's order."""
    return [p for p in unet.attn_processors if p.endswith("attn2.processor")]


def select_layers(unet: UNet2DConditionModel, selection: AttentionSelection) -> list[str]:
    """Processor paths of the cross-attention layers matching ``selection``.

    Raises:
        ConfigError: no layer matches (the message lists the factors this UNet has).
    """
    paths = cross_attention_paths(unet)
    chosen = [
        p
        for p in paths
        if (selection.downsample is None or layer_downsample(unet, p) == selection.downsample)
        and (selection.paths is None or any(fnmatch.fnmatch(p, pat) for pat in selection.paths))
    ]
    if not chosen:
        factors = sorted({layer_downsample(unet, p) for p in paths})
        raise ConfigError(
            f"no cross-attention layer matches {selection}; this UNet has cross-attention at downsample "
            f"factors {factors}"
        )
    return chosen


def default_downsample(unet: UNet2DConditionModel, preferred: int = 4) -> int:
    """The factor InstDiffEdit reads: ``preferred`` (SD's 16×16 at 512 px) if present, else the closest.

    Ties go to the larger factor (the coarser map, as the paper's choice of 16×16 over 32×32).

    Raises:
        ConfigError: the UNet has no cross-attention layer.
    """
    factors = sorted({layer_downsample(unet, p) for p in cross_attention_paths(unet)})
    if not factors:
        raise ConfigError("this UNet has no cross-attention layers; InstDiffEdit needs a text-conditioned UNet")
    return min(factors, key=lambda f: (abs(f - preferred), -f))


# ---- install / remove -----------------------------------------------------------------------------------
def install_attention_capture(
    unet: UNet2DConditionModel,
    store: AttentionStore,
    selection: AttentionSelection | None = None,
    latent_hw: tuple[int, int] | None = None,
) -> dict[str, object]:
    """Install recorders on the selected layers.

    Args:
        unet: the UNet to instrument (its other processors are kept as they are).
        store: where the recorders write.
        selection: layers to record; ``None`` selects :func:`default_downsample`.
        latent_hw: (h, w) of the latent, to give each recorder its map size (``None``: square maps).

    Returns:
        The previous processors by path, for :func:`remove_attention_capture`.

    Raises:
        ConfigError: no layer matches ``selection``.
    """
    selection = selection or AttentionSelection(downsample=default_downsample(unet))
    chosen = set(select_layers(unet, selection))
    previous = dict(unet.attn_processors)
    new: dict[str, object] = {}
    for path, proc in previous.items():
        if path in chosen:
            hw = None
            if latent_hw is not None:
                f = layer_downsample(unet, path)
                hw = (-(-latent_hw[0] // f), -(-latent_hw[1] // f))
            new[path] = RecordingAttnProcessor(store, hw)
        else:
            new[path] = proc
    unet.set_attn_processor(new)
    return previous


def remove_attention_capture(unet: UNet2DConditionModel, previous: dict[str, object]) -> None:
    """Restore the processor objects returned by :func:`install_attention_capture`."""
    unet.set_attn_processor(dict(previous))


class capture_attention:  # noqa: N801 - used as a context manager, reads like a function
    """Context manager: ``with capture_attention(unet, store, selection): ...`` installs and removes.

    Args: as :func:`install_attention_capture`. ``__enter__`` returns the store.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        store: AttentionStore,
        selection: AttentionSelection | None = None,
        latent_hw: tuple[int, int] | None = None,
    ) -> None:
        self.unet, self.store, self.selection, self.latent_hw = unet, store, selection, latent_hw
        self.previous: dict[str, object] = {}

    def __enter__(self) -> AttentionStore:
        self.previous = install_attention_capture(self.unet, self.store, self.selection, self.latent_hw)
        return self.store

    def __exit__(self, *exc: object) -> None:
        remove_attention_capture(self.unet, self.previous)


def recorded_paths(unet: UNet2DConditionModel) -> Iterable[str]:
    """Paths whose processor is currently a recorder (useful in tests and logs)."""
    return [p for p, proc in unet.attn_processors.items() if isinstance(proc, RecordingAttnProcessor)]
