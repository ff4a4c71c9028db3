"""Install / remove the sparse engine on a ``UNet2DConditionModel`` (config + apply/remove + explicit state).

FISEdit §"Sparse Computation": ResNet blocks, transformer blocks and the convolutions between them compute only
the region of the difference mask at high resolutions, reading everything else from the cache of the previous
run at the same step; low-resolution layers stay dense (§"Sparsity Analysis").

Mechanism (no class is patched): eligible modules — selected by module path — are replaced by wrapper modules
that hold the original (``ResnetBlock2D`` → :class:`~instdiff.sparse.layers.SparseResnet`, ``Transformer2DModel``
→ :class:`~instdiff.sparse.layers.SparseTransformer`, the ``conv_in`` / ``conv_out`` / down- and upsampler
convolutions → :class:`~instdiff.sparse.layers.SparseConv`, ``conv_norm_out`` →
:class:`~instdiff.sparse.layers.SparseGroupNorm`); self-attention and cross-attention get recording processors
(:mod:`instdiff.sparse.processors`) through ``set_attn_processor``; GroupNorm statistics and conv inputs are
recorded by forward pre-hooks.
:func:`remove_sparse` undoes all of it.

The state the wrappers share is a :class:`~instdiff.sparse.state.SparseState`. A wrapped op returns a full-size
tensor: the cached output of this step, with the active region overwritten in place (the overwritten values
are restored at :meth:`~instdiff.sparse.state.SparseState.end_step`), so the ops between wrappers (adds,
concatenations, interpolation) run unchanged.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

from instdiff.sparse.config import SparseConfig, SparseMode
from instdiff.sparse.layers import (
    SparseConv,
    SparseGroupNorm,
    SparseResnet,
    SparseTransformer,
    conv_supported,
    resnet_supported,
    transformer_supported,
)
from instdiff.sparse.processors import CrossAttentionProcessor, SelfAttentionRecorder
from instdiff.sparse.state import SparseState

log = logging.getLogger(__name__)

_INSTALLED: weakref.WeakKeyDictionary[nn.Module, SparseState] = weakref.WeakKeyDictionary()


# ---- installation ------------------------------------------------------------------------------------
def _eligible_modules(unet: UNet2DConditionModel) -> list[tuple[str, nn.Module, str]]:
    """(path, module, kind) of every module the engine can wrap, selected by module path."""
    found: list[tuple[str, nn.Module, str]] = []
    for path, mod in unet.named_modules():
        parts = path.split(".")
        if path in ("conv_in", "conv_out") and conv_supported(mod):
            found.append((path, mod, "conv"))
        elif path == "conv_norm_out" and isinstance(mod, nn.GroupNorm):
            found.append((path, mod, "groupnorm"))
        elif len(parts) >= 2 and parts[-2] == "resnets" and type(mod) is ResnetBlock2D:
            if resnet_supported(mod):
                found.append((path, mod, "resnet"))
        elif len(parts) >= 2 and parts[-2] == "attentions" and type(mod) is Transformer2DModel:
            if transformer_supported(mod):
                found.append((path, mod, "transformer"))
        elif len(parts) >= 3 and parts[-3] == "downsamplers" and parts[-1] == "conv":
            owner = unet.get_submodule(".".join(parts[:-1]))
            if isinstance(owner, Downsample2D) and owner.padding > 0 and conv_supported(mod):
                found.append((path, mod, "conv"))
        elif len(parts) >= 3 and parts[-3] == "upsamplers" and parts[-1] == "conv":
            owner = unet.get_submodule(".".join(parts[:-1]))
            if isinstance(owner, Upsample2D) and not owner.use_conv_transpose and conv_supported(mod):
                found.append((path, mod, "conv"))
    # no nesting: keep outermost eligible modules only
    paths = [p for p, _, _ in found]
    return [(p, m, k) for p, m, k in found if not any(p != q and p.startswith(q + ".") for q in paths)]


def apply_sparse(unet: UNet2DConditionModel, cfg: SparseConfig | None = None) -> SparseState:
    """Install the sparse engine on ``unet`` and return its state. Undo with :func:`remove_sparse`.

    In dense steps the wrapped UNet computes exactly what the original computes (the wrappers call the original
    modules); only recording and sparse steps differ.

    Args:
        unet: the UNet to instrument, in place.
        cfg: engine settings; ``None`` uses the defaults.

    Returns:
        The state to drive steps with (``run_step``, ``set_mask``, ``bind``).

    Raises:
        RuntimeError: the engine is already installed on ``unet``.
    """
    if unet in _INSTALLED:
        raise RuntimeError("the sparse engine is already installed on this UNet; call remove_sparse first")
    cfg = cfg or SparseConfig()
    state = SparseState(unet, cfg)
    wrappers: list[tuple[str, nn.Module, nn.Module]] = []
    for path, mod, kind in _eligible_modules(unet):
        if kind == "resnet":
            wrapper: nn.Module = SparseResnet(mod, path, state)
        elif kind == "transformer":
            wrapper = SparseTransformer(mod, path, state)
        elif kind == "conv":
            wrapper = SparseConv(mod, path, state)
        else:
            wrapper = SparseGroupNorm(mod, path, state)
        wrappers.append((path, mod, wrapper))

    # 1. attention processors, named on the original tree
    originals = unet.attn_processors
    procs = dict(originals)
    for path, _, wrapper in wrappers:
        if isinstance(wrapper, SparseTransformer):
            for i in range(len(wrapper.inner.transformer_blocks)):
                name = f"{path}.transformer_blocks.{i}.attn1.processor"
                procs[name] = SelfAttentionRecorder(
                    state, f"{path}.transformer_blocks.{i}.attn1", originals[name], wrapper.is_recording
                )
    for name, proc in originals.items():
        if name.endswith("attn2.processor"):
            procs[name] = CrossAttentionProcessor(state, name[: -len(".processor")], proc)
    unet.set_attn_processor(procs)
    state._processors = originals

    # 2. hooks and module replacement
    state._hooks.append(unet.register_forward_pre_hook(_latent_size_hook(state), with_kwargs=True))
    if unet.time_embedding is not None:
        state._hooks.append(unet.time_embedding.register_forward_hook(_time_embedding_macs(state)))
    for path, mod, wrapper in wrappers:
        state._hooks.extend(wrapper.install_hooks())
        parent_path, _, name = path.rpartition(".")
        parent = unet.get_submodule(parent_path) if parent_path else unet
        setattr(parent, name, wrapper)
        state._replaced.append((parent, name, mod, wrapper))
    if cfg.mode is SparseMode.PROFILE:
        state._hooks.extend(_profile_hooks(unet, state))
    _INSTALLED[unet] = state
    log.info("sparse engine installed: %d modules wrapped (%s)", len(wrappers), cfg.mode.value)
    return state


def remove_sparse(unet: UNet2DConditionModel) -> None:
    """Undo :func:`apply_sparse`: original modules back in place, hooks removed, original processors restored.

    Raises:
        RuntimeError: the engine is not installed on ``unet``.
    """
    state = _INSTALLED.pop(unet, None)
    if state is None:
        raise RuntimeError("the sparse engine is not installed on this UNet")
    for handle in state._hooks:
        handle.remove()
    state._hooks.clear()
    for parent, name, original, _ in reversed(state._replaced):
        setattr(parent, name, original)
    state._replaced.clear()
    if state._processors is not None:
        unet.set_attn_processor(dict(state._processors))
        state._processors = None
    state.reset()


def installed_state(unet: UNet2DConditionModel) -> SparseState | None:
    """The state of the engine installed on ``unet``, if any."""
    return _INSTALLED.get(unet)


@contextmanager
def sparse_unet(unet: UNet2DConditionModel, cfg: SparseConfig | None = None) -> Iterator[SparseState]:
    """``with sparse_unet(unet, cfg) as state: ...`` — installed for the block, removed after it."""
    state = apply_sparse(unet, cfg)
    try:
        yield state
    finally:
        remove_sparse(unet)


# ---- hooks ---------------------------------------------------------------------------------------------
def _latent_size_hook(state: SparseState) -> Callable:
    """A UNet pre-hook that tells the state the latent's (H, W) of the call."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        state.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    return hook


def _time_embedding_macs(state: SparseState) -> Callable:
    """A forward hook counting the time embedding's multiply-accumulates (never sparse) as ``other``."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        n = output.shape[0]
        macs = sum(n * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
        state.count("other", macs, macs)

    return hook


def _profile_hooks(unet: nn.Module, state: SparseState) -> list[torch.utils.hooks.RemovableHandle]:
    """Synchronised timers around leaf modules of each layer type (dense code paths)."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    skip_under: list[str] = []
    for path, mod in unet.named_modules():
        if any(path.startswith(p + ".") for p in skip_under):
            continue
        if isinstance(mod, Attention):
            cat = "attention"
        elif isinstance(mod, FeedForward):
            cat = "ff"
        elif isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
            cat = "norm"
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            cat = "conv"
        else:
            continue
        if cat in ("attention", "ff"):
            skip_under.append(path)
        starts: list[float] = []

        def pre(module: nn.Module, args: tuple, starts: list[float] = starts) -> None:
            state.sync()
            starts.append(time.perf_counter())

        def post(module: nn.Module, args: tuple, out: Any, starts: list[float] = starts, cat: str = cat) -> None:
            state.sync()
            state.times[cat] += time.perf_counter() - starts.pop()

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    return handles
