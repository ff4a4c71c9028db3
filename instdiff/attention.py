"""Cross-attention capture through diffusers' attention-processor extension point.

``install_attention_capture(unet, store, selection)`` swaps the processor of the selected
cross-attention layers (``attn2`` in SD's transformer blocks) for :class:`RecordingAttnProcessor`, which
computes the same attention explicitly and adds the conditional half's probabilities, averaged over heads,
into an explicit :class:`AttentionStore`. Every other layer keeps its processor (SDPA by default).
``remove_attention_capture`` puts the original processor objects back, so the UNet is left exactly as it
was. Layers are chosen by module path and by spatial downsampling factor, never by call counting.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention


@dataclass(frozen=True)
class AttentionSelection:
    """Which cross-attention layers to record.

    ``downsample``: keep layers whose feature map is ``latent_size / downsample`` on a side (SD 1.x/2.x
    at 512 px: ``4`` → the 16×16 maps InstDiffEdit reads, in down_blocks.2 and up_blocks.1); ``None``
    keeps every resolution. ``paths``: fnmatch patterns on processor paths such as
    ``"up_blocks.1.*"``; ``None`` keeps all. Both filters apply.
    """

    downsample: int | None = 4
    paths: tuple[str, ...] | None = None


@dataclass
class AttentionStore:
    """Sum of head-averaged cross-attention probabilities per step, for the rows asked for.

    The caller sets ``cond_rows`` (a slice of the UNet batch holding the conditional samples) and
    ``step`` before each UNet call. ``record_steps`` limits the steps recorded (``None`` = all).
    ``maps[step]`` is a (R, HW, T) sum over recorded layers and ``counts[step]`` the number of layers.
    """

    cond_rows: slice = field(default_factory=lambda: slice(None))
    step: int = 0
    record_steps: set[int] | None = None
    enabled: bool = True
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    shapes: dict[int, tuple[int, int]] = field(default_factory=dict)

    def wants(self) -> bool:
        return self.enabled and (self.record_steps is None or self.step in self.record_steps)

    def add(self, probs: torch.Tensor, hw: tuple[int, int]) -> None:
        """Add head-averaged probabilities (R, HW, T) of one layer."""
        prev = self.shapes.setdefault(self.step, hw)
        if prev != hw:
            raise ValueError(f"attention maps of {hw} and {prev} selected for one step; select one resolution")
        probs = probs.float()
        if self.step in self.maps:
            self.maps[self.step] += probs
            self.counts[self.step] += 1
        else:
            self.maps[self.step] = probs.clone()
            self.counts[self.step] = 1

    def mean(self, step: int) -> torch.Tensor:
        """Layer-averaged maps of ``step`` as (R, T, h, w)."""
        h, w = self.shapes[step]
        m = self.maps[step] / self.counts[step]  # (R, HW, T)
        return m.transpose(1, 2).reshape(m.shape[0], m.shape[2], h, w)

    def reset(self) -> None:
        self.maps.clear()
        self.counts.clear()
        self.shapes.clear()
        self.step = 0


class RecordingAttnProcessor:
    """Attention with explicit softmax, recording cross-attention probabilities into a store.

    Output equals diffusers' SDPA processor (same projections, same scale) to fp32 rounding.
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

        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        head_dim = k.shape[-1] // attn.heads
        q = q.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, HW, d)
        k = k.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, T, d)
        v = v.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        scores = (q @ k.transpose(-1, -2)) * (head_dim**-0.5)  # (B, heads, HW, T)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1)
        if is_cross and self.store.wants():
            hw = self.hw if self.hw is not None else _square(seq)
            self.store.add(probs[self.store.cond_rows].mean(dim=1), hw)  # (R, HW, T)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
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


_BLOCK = re.compile(r"^(down_blocks|up_blocks|mid_block)\.?(\d+)?")


def layer_downsample(unet: UNet2DConditionModel, path: str) -> int:
    """Downsampling factor, relative to the latent, of the feature map seen by the layer at ``path``."""
    m = _BLOCK.match(path)
    if m is None:
        raise ValueError(f"unexpected attention path {path!r}")
    n = len(unet.config.block_out_channels)
    if m.group(1) == "mid_block":
        return 2 ** (n - 1)
    i = int(m.group(2))
    return 2**i if m.group(1) == "down_blocks" else 2 ** (n - 1 - i)


def cross_attention_paths(unet: UNet2DConditionModel) -> list[str]:
    """Processor paths of all cross-attention layers (``...attn2.processor``)."""
    return [p for p in unet.attn_processors if p.endswith("attn2.processor")]


def select_layers(unet: UNet2DConditionModel, selection: AttentionSelection) -> list[str]:
    """Processor paths matching ``selection``; raises with the available factors when none match."""
    paths = cross_attention_paths(unet)
    chosen = [
        p
        for p in paths
        if (selection.downsample is None or layer_downsample(unet, p) == selection.downsample)
        and (selection.paths is None or any(fnmatch.fnmatch(p, pat) for pat in selection.paths))
    ]
    if not chosen:
        factors = sorted({layer_downsample(unet, p) for p in paths})
        raise ValueError(
            f"no cross-attention layer matches {selection}; this UNet has cross-attention at downsample "
            f"factors {factors}"
        )
    return chosen


def default_downsample(unet: UNet2DConditionModel, preferred: int = 4) -> int:
    """The factor InstDiffEdit reads: ``preferred`` (SD's 16×16 at 512 px) if present, else the closest."""
    factors = sorted({layer_downsample(unet, p) for p in cross_attention_paths(unet)})
    if not factors:
        raise ValueError("this UNet has no cross-attention layers")
    return min(factors, key=lambda f: (abs(f - preferred), -f))


def install_attention_capture(
    unet: UNet2DConditionModel,
    store: AttentionStore,
    selection: AttentionSelection | None = None,
    latent_hw: tuple[int, int] | None = None,
) -> dict[str, object]:
    """Install recorders on the selected layers; returns the previous processors for removal."""
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
    """Context manager: ``with capture_attention(unet, store, selection): ...`` installs and removes."""

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
