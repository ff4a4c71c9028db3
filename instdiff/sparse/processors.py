"""Attention in the sparse engine: active-token attention, the self-attention recorder, cross-attention control.

FISEdit (Yu et al., AAAI 2024) §"Approximate Attention" (Fig. 4): in a sparse step, self-attention takes its
queries from the active tokens only and its keys / values from the whole map, where the inactive tokens' keys /
values are the cached ones of the same step; cross-attention reads the new prompt. §"Target Area Capture": during
the mask-detection steps, cross-attention maps of unchanged words may be replaced by the cached ones
(prompt-to-prompt's word swap, Hertz et al. 2023).

Every function here computes attention with :func:`instdiff.attention.multihead_attention`, the project's one
attention helper (the same heads, scale and SDPA as diffusers' ``AttnProcessor2_0``; explicit probabilities
where they are recorded or replaced). Processors are installed through ``set_attn_processor`` by
:func:`instdiff.sparse.engine.apply_sparse`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from instdiff.attention import multihead_attention
from instdiff.sparse.state import SparseState

log = logging.getLogger(__name__)


def attention_supported(attn: Attention) -> bool:
    """Whether the sparse engine can compute ``attn`` on active tokens.

    Plain multi-head attention only: no spatial / group / q-k norms, no residual inside, no output rescale, a
    linear output projection.
    """
    return (
        isinstance(attn, Attention)
        and attn.spatial_norm is None
        and attn.group_norm is None
        and getattr(attn, "norm_q", None) is None
        and getattr(attn, "norm_k", None) is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
        and getattr(attn, "norm_cross", None) is None
        and isinstance(attn.to_out[0], nn.Linear)
    )


def _project_out(attn: Attention, o: torch.Tensor) -> torch.Tensor:
    """``attn.to_out`` (linear, dropout) on (N, L, D) tokens."""
    return attn.to_out[1](attn.to_out[0](o))


def active_self_attention(
    state: SparseState, attn: Attention, path: str, x: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Self-attention of the active tokens over the whole map (FISEdit §"Approximate Attention").

    The cached keys / values of this step (``{path}:k``, ``{path}:v``, recorded by
    :class:`SelfAttentionRecorder`) get the active tokens' new ones written in (restored at the end of the step).

    Args:
        state: the engine state of the current sparse step.
        attn: the block's ``attn1``.
        path: the layer's module path (the cache key prefix).
        x: (N, M, D) normalised hidden states of the M active tokens.
        pos: (M,) long flat positions of the active tokens in the (H·W) map.

    Returns:
        (N, M, D) attention output after ``attn.to_out``.
    """
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (N, M, D)
    keys, values = state.fetch(f"{path}:k"), state.fetch(f"{path}:v")  # (N, HW, D)
    state.write_tokens(keys, pos, k)
    state.write_tokens(values, pos, v)
    return _project_out(attn, multihead_attention(attn, q, keys, values))


def cross_attention(attn: Attention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Cross-attention of active tokens with the prompt.

    Args:
        attn: the block's ``attn2``.
        x: (N, M, D) normalised hidden states of the active tokens.
        context: (N, T, Dc) text embeddings (the new prompt).

    Returns:
        (N, M, D) attention output after ``attn.to_out``.
    """
    o = multihead_attention(attn, attn.to_q(x), attn.to_k(context), attn.to_v(context))
    return _project_out(attn, o)


class SelfAttentionRecorder:
    """Processor of a wrapped transformer's self-attention.

    Identical to the original processor, except in recording steps of its transformer: then it computes the
    attention itself (:func:`multihead_attention`, the ops of ``AttnProcessor2_0``) to keep the keys / values
    (N, HW, D) that later sparse steps use for inactive tokens.

    Args:
        state: the engine state.
        path: the attention module's path (the cache key prefix).
        original: the processor it replaces.
        is_recording: tells whether its transformer records in the current call.
    """

    def __init__(self, state: SparseState, path: str, original: Any, is_recording: Callable[[], bool]) -> None:
        self.state = state
        self.path = path
        self.original = original
        self.is_recording = is_recording

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Run ``attn`` on ``hidden_states`` (N, HW, D); records keys and values when its transformer records."""
        plain = encoder_hidden_states is None and attention_mask is None and hidden_states.ndim == 3
        if not (self.is_recording() and plain):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)  # (N, HW, D)
        self.state.record(f"{self.path}:k", k)
        self.state.record(f"{self.path}:v", v)
        return _project_out(attn, multihead_attention(attn, q, k, v).to(q.dtype))


class CrossAttentionProcessor:
    """Processor of every cross-attention layer while the engine is installed.

    The original processor, except while cross-attention control is set on the state (FISEdit §"Target Area
    Capture", after prompt-to-prompt): then the probabilities are explicit (float32 softmax) and the conditional
    rows' maps (N', heads, HW, T) are recorded, or the maps of unchanged words replaced by the recorded ones.

    Args:
        state: the engine state (its ``ca`` and ``step``).
        path: the attention module's path (the cache key prefix).
        original: the processor it wraps.
    """

    def __init__(self, state: SparseState, path: str, original: Any) -> None:
        self.state = state
        self.path = path
        self.original = original

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Run ``attn`` on ``hidden_states`` (N, L, D) with the prompt ``encoder_hidden_states`` (N, T, Dc)."""
        ctl = self.state.ca
        if (
            ctl is None
            or self.state.step is None
            or encoder_hidden_states is None
            or attention_mask is not None
            or hidden_states.ndim != 3
            or not attention_supported(attn)
        ):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        name = f"{self.path}:probs"
        step = self.state.step

        def control(probs: torch.Tensor) -> torch.Tensor:  # (N, heads, L, T)
            if ctl.mode == "record":
                self.state.record(name, probs[ctl.rows])
            elif ctl.mode == "replace" and ctl.source is not None and ctl.source.has(step, name):
                src = ctl.source.get(step, name)  # (N', heads, L, T)
                cond = probs[ctl.rows]
                cond[..., ctl.dst] = src[..., ctl.src].to(cond.dtype)
                probs[ctl.rows] = cond
            return probs

        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        return _project_out(attn, multihead_attention(attn, q, k, v, on_probs=control, upcast=True))
