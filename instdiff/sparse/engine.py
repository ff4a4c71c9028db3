"""Install / remove the sparse engine on a ``UNet2DConditionModel``, and the explicit state it runs on.

FISEdit §"Sparse Computation": ResNet blocks, transformer blocks and the convolutions between them compute only
the region of the difference mask at high resolutions, reading everything else from the cache of the previous
run at the same step; low-resolution layers stay dense (§"Sparsity Analysis").

Mechanism (no class is patched): eligible modules — selected by module path — are replaced by wrapper modules
that hold the original (``ResnetBlock2D`` → :class:`~instdiff.sparse.layers.SparseResnet`, ``Transformer2DModel``
→ :class:`~instdiff.sparse.layers.SparseTransformer`, the ``conv_in`` / ``conv_out`` / down- and upsampler
convolutions → :class:`~instdiff.sparse.layers.SparseConv`, ``conv_norm_out`` →
:class:`~instdiff.sparse.layers.SparseGroupNorm`); self-attention and cross-attention get recording processors
through ``set_attn_processor``; GroupNorm statistics and conv inputs are recorded by forward pre-hooks.
:func:`remove_sparse` undoes all of it.

A wrapped op returns a full-size tensor: the cached output of this step, with the active region overwritten in
place (the overwritten values are restored at :meth:`SparseState.end_step`), so the ops between wrappers (adds,
concatenations, interpolation) run unchanged.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from instdiff.sparse.blocks import BlockSet, ConvShape, TokenSet, choose_block_size, divides
from instdiff.sparse.cache import ActivationCache
from instdiff.sparse.config import SparseConfig, SparseMode
from instdiff.sparse.mask import resize_mask

log = logging.getLogger(__name__)

CATEGORIES = ("conv", "norm", "attention", "ff", "gather", "other")

_INSTALLED: weakref.WeakKeyDictionary[nn.Module, SparseState] = weakref.WeakKeyDictionary()


@dataclass
class CrossAttentionControl:
    """Prompt-to-prompt style control of cross-attention during the mask-detection steps (FISEdit §"Target
    Area Capture": keep the cached cross-attention maps of the unchanged words so that the latent difference
    concentrates where the words changed).

    ``mode``: "record" (store the conditional rows' maps) or "replace" (use the stored map of source token
    ``src[i]`` for target token ``dst[i]``). ``rows``: the batch rows that carry the prompt (the CFG
    conditional half). ``source``: the cache holding the recorded maps (for "replace").
    """

    mode: str
    rows: torch.Tensor
    src: torch.Tensor | None = None
    dst: torch.Tensor | None = None
    source: ActivationCache | None = None


class _Timer:
    __slots__ = ("state", "category", "t0")

    def __init__(self, state: SparseState, category: str) -> None:
        self.state, self.category, self.t0 = state, category, 0.0

    def __enter__(self) -> None:
        if self.state.profiling:
            self.state.sync()
            self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.state.profiling:
            self.state.sync()
            self.state.times[self.category] += time.perf_counter() - self.t0


class SparseState:
    """Everything the installed wrappers share: config, current step, mask, plans, cache binding, counters.

    Drive it per UNet call: ``begin_step(i, record=...)`` or ``begin_step(i, sparse=True)``, call the UNet,
    ``end_step()``. ``set_mask`` fixes the active region (N, H, W) at latent resolution for later sparse steps.
    """

    def __init__(self, unet: UNet2DConditionModel, cfg: SparseConfig) -> None:
        self.cfg = cfg
        self._unet_ref = weakref.ref(unet)
        self.step: int | None = None
        self.recording = False
        self.sparse_step = False
        self.cache: ActivationCache | None = None
        self.latent_hw: tuple[int, int] | None = None
        self.ca: CrossAttentionControl | None = None
        self.mask: torch.Tensor | None = None
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        self._plans: dict[tuple[str, int, int], Any] = {}
        self._persistent: set[int] = set()
        self._undo: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        self.used_keys: set[str] = set()
        self.macs: dict[str, list[float]] = {c: [0.0, 0.0] for c in CATEGORIES}
        self.times: dict[str, float] = {c: 0.0 for c in CATEGORIES}
        self.step_times: list[float] = []
        self._t_step = 0.0
        # installation records (filled by apply_sparse, consumed by remove_sparse)
        self._replaced: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._processors: dict[str, Any] | None = None

    # ---- mode ----------------------------------------------------------------------------
    @property
    def profiling(self) -> bool:
        return self.cfg.mode is SparseMode.PROFILE

    @property
    def device(self) -> torch.device:
        unet = self._unet_ref()
        return unet.device if unet is not None else torch.device("cpu")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, category: str) -> _Timer:
        return _Timer(self, category)

    # ---- per-step protocol ---------------------------------------------------------------
    def bind(self, cache: ActivationCache | None) -> None:
        """The cache that recording steps write to and sparse steps read from."""
        self.cache = cache

    def begin_step(self, step: int, *, sparse: bool = False, record: bool = False) -> None:
        """Start UNet call number ``step`` of a run: recording into the bound cache, or sparse from it."""
        if sparse and record:
            raise ValueError("a step either records the cache (dense) or reads it (sparse), not both")
        if (sparse or record) and self.cache is None:
            raise RuntimeError("bind a cache (SparseState.bind) before a recording or sparse step")
        if sparse and self.mask is None:
            raise RuntimeError("set_mask before a sparse step")
        self.step = step
        self.recording = record
        self.sparse_step = sparse and self.cfg.mode is not SparseMode.DENSE
        if self.sparse_step:
            assert self.cache is not None
            names = sorted(self.used_keys) if self.used_keys else None
            self.cache.prefetch(step, names)
            self.cache.prefetch(step + 1, names)
        if self.profiling:
            self.sync()
        self._t_step = time.perf_counter()

    def end_step(self) -> None:
        """Restore cached tensors overwritten in place, drop transient copies, close the step's timer."""
        for view, dim, pos, old in reversed(self._undo):
            view.index_copy_(dim, pos, old)
        self._undo.clear()
        self._persistent.clear()
        if self.cache is not None and self.step is not None:
            self.cache.release(self.step)
        if self.profiling:
            self.sync()
        self.step_times.append(time.perf_counter() - self._t_step)
        self.step = None
        self.recording = False
        self.sparse_step = False

    @contextmanager
    def run_step(self, step: int, *, sparse: bool = False, record: bool = False) -> Iterator[None]:
        self.begin_step(step, sparse=sparse, record=record)
        try:
            yield
        finally:
            self.end_step()

    def reset(self) -> None:
        """Forget mask, plans, cache binding, cross-attention control, counters and timers."""
        self.mask = None
        self._masks.clear()
        self._plans.clear()
        self.used_keys.clear()
        self.cache = None
        self.ca = None
        self.reset_counters()

    def reset_counters(self) -> None:
        self.macs = {c: [0.0, 0.0] for c in CATEGORIES}
        self.times = {c: 0.0 for c in CATEGORIES}
        self.step_times = []

    # ---- mask and plans ------------------------------------------------------------------
    def set_mask(self, mask: torch.Tensor) -> None:
        """Active region at latent resolution, shared by every batch row of the UNet call (e.g. the CFG rows of
        one image): (H, W) bool, or (N, H, W) bool with identical rows."""
        if mask.dtype != torch.bool or mask.dim() not in (2, 3):
            raise ValueError(
                "the sparse mask is (H, W) or (N, H, W) bool at latent resolution; "
                f"got {tuple(mask.shape)} {mask.dtype}"
            )
        if mask.dim() == 3:
            if not bool((mask == mask[:1]).all()):
                raise ValueError("all rows of one UNet call share one sparse mask; edit images with different "
                                 "masks in separate calls")
            mask = mask[0]
        self.mask = mask.to(self.device)
        self._masks.clear()
        self._plans.clear()
        self.used_keys.clear()

    def mask_at(self, height: int, width: int) -> torch.Tensor:
        """The mask max-pooled to an (height, width) feature map: (height, width) bool."""
        assert self.mask is not None
        key = (height, width)
        if key not in self._masks:
            self._masks[key] = resize_mask(self.mask[None], key)[0]
        return self._masks[key]

    def eligible_resolution(self, height: int) -> bool:
        """True if feature maps of this height may run sparsely (and are therefore cached)."""
        if self.latent_hw is None:
            return False
        return height >= self.cfg.min_resolution_ratio * self.latent_hw[0] - 1e-9

    def should_record(self, height: int) -> bool:
        return self.recording and self.eligible_resolution(height)

    def _dense_by_rule(self, mask: torch.Tensor) -> bool:
        return (not self.eligible_resolution(mask.shape[-2])) or float(mask.float().mean()) > self.cfg.dense_fraction

    def conv_plan(self, path: str, size: tuple[int, int], convs: list[ConvShape], needs: list[str]) -> BlockSet | None:
        """The APSC plan of a convolutional module at this output size: active tiles, or ``None`` for dense."""
        key = (path, *size)
        if key not in self._plans:
            self._plans[key] = self._make_conv_plan(path, size, convs, needs)
        return self._plans[key]

    def _make_conv_plan(
        self, path: str, size: tuple[int, int], convs: list[ConvShape], needs: list[str]
    ) -> BlockSet | None:
        if not self.cfg.sparse_conv or not self._has_all(needs):
            return None
        mask = self.mask_at(*size)
        if self._dense_by_rule(mask):
            return None
        if self.cfg.force_block is not None:
            fb = self.cfg.force_block
            block: int | None = fb if divides(fb, *size) else 1
        else:
            gamma = self.cfg.gather_cost_for(self.device.type)
            block, costs = choose_block_size(mask[None], convs, self.cfg.block_sizes, gamma, self.cfg.block_overhead)
            log.debug("plan %s %s: block %s (costs %s)", path, size, block, costs)
        if block is None:
            return None
        self.used_keys.update(needs)
        return BlockSet.from_mask(mask, block)

    def token_plan(self, path: str, size: tuple[int, int], needs: list[str]) -> TokenSet | None:
        """Active tokens of a transformer at this size, or ``None`` for dense."""
        key = (path, *size)
        if key not in self._plans:
            plan = None
            if self.cfg.sparse_attention and self._has_all(needs):
                mask = self.mask_at(*size)
                if not self._dense_by_rule(mask):
                    plan = TokenSet.from_mask(mask)
                    self.used_keys.update(needs)
            self._plans[key] = plan
        return self._plans[key]

    def affine_plan(self, path: str, size: tuple[int, int], needs: list[str]) -> bool:
        """Whether a stand-alone GroupNorm at this size uses its cached statistics (sparse) or runs dense."""
        key = (path, *size)
        if key not in self._plans:
            ok = self._has_all(needs) and not self._dense_by_rule(self.mask_at(*size))
            if ok:
                self.used_keys.update(needs)
            self._plans[key] = ok
        return self._plans[key]

    def _has_all(self, names: list[str]) -> bool:
        assert self.cache is not None and self.step is not None
        return all(self.cache.has(self.step, n) for n in names)

    def plans(self) -> dict[str, Any]:
        """Module path → chosen block size ('dense', 'tokens' for transformers), per feature-map size."""
        out: dict[str, Any] = {}
        for (path, h, w), plan in self._plans.items():
            if isinstance(plan, BlockSet):
                desc: Any = plan.block
            elif isinstance(plan, TokenSet):
                desc = "tokens"
            elif plan is True:
                desc = "cached-stats"
            else:
                desc = "dense"
            out[f"{path}@{h}x{w}"] = desc
        return out

    def active_fractions(self) -> dict[str, float]:
        """Active fraction of the mask at each feature-map size used so far ("HxW" → fraction)."""
        return {f"{h}x{w}": float(m.float().mean()) for (h, w), m in sorted(self._masks.items(), reverse=True)}

    # ---- cache I/O ----------------------------------------------------------------------
    def record(self, name: str, tensor: torch.Tensor) -> None:
        assert self.cache is not None and self.step is not None
        self.cache.put(self.step, name, tensor)

    def fetch(self, name: str) -> torch.Tensor:
        """The cached tensor of the current step (on the device). Writes into it must go through :meth:`write`."""
        assert self.cache is not None and self.step is not None
        t = self.cache.get(self.step, name)
        if self.cache.is_persistent(self.step, name):
            self._persistent.add(id(t))
        return t

    def write_flat(self, target: torch.Tensor, pos: torch.Tensor, vals: torch.Tensor) -> None:
        """Overwrite flat positions ``pos`` (M,) of ``target`` (N, C, H, W) with ``vals`` (N, C, M), in place."""
        n, c, h, w = target.shape
        self._index_copy(target, target.view(n, c, h * w), 2, pos, vals)

    def write_tokens(self, target: torch.Tensor, pos: torch.Tensor, vals: torch.Tensor) -> None:
        """Overwrite tokens ``pos`` (M,) of ``target`` (N, L, D) with ``vals`` (N, M, D), in place."""
        self._index_copy(target, target, 1, pos, vals)

    def _index_copy(
        self, base: torch.Tensor, view: torch.Tensor, dim: int, pos: torch.Tensor, vals: torch.Tensor
    ) -> None:
        if id(base) in self._persistent:  # a stored cache tensor: keep what is overwritten, restored at end_step
            self._undo.append((view, dim, pos, view.index_select(dim, pos)))
        view.index_copy_(dim, pos, vals.to(view.dtype))

    # ---- accounting ------------------------------------------------------------------------
    def count(self, category: str, dense: float, actual: float) -> None:
        """Add multiply-accumulates: what the dense op costs and what was computed."""
        m = self.macs[category]
        m[0] += dense
        m[1] += actual

    def macs_summary(self) -> dict[str, Any]:
        dense = sum(v[0] for v in self.macs.values())
        actual = sum(v[1] for v in self.macs.values())
        return {
            "dense": dense,
            "actual": actual,
            "ratio": dense / actual if actual else float("inf"),
            "by_category": {c: {"dense": v[0], "actual": v[1]} for c, v in self.macs.items() if v[0] or v[1]},
        }

    def stats(self) -> dict[str, Any]:
        return {
            "macs": self.macs_summary(),
            "active_fraction": self.active_fractions(),
            "plans": self.plans(),
            "times": dict(self.times),
            "step_times": list(self.step_times),
        }


# ---- installation ------------------------------------------------------------------------------------
def _eligible_modules(unet: UNet2DConditionModel) -> list[tuple[str, nn.Module, str]]:
    """(path, module, kind) of every module the engine can wrap, selected by module path."""
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.upsampling import Upsample2D

    from instdiff.sparse import layers

    found: list[tuple[str, nn.Module, str]] = []
    for path, mod in unet.named_modules():
        parts = path.split(".")
        if path in ("conv_in", "conv_out") and layers.conv_supported(mod):
            found.append((path, mod, "conv"))
        elif path == "conv_norm_out" and isinstance(mod, nn.GroupNorm):
            found.append((path, mod, "groupnorm"))
        elif len(parts) >= 2 and parts[-2] == "resnets" and type(mod) is ResnetBlock2D:
            if layers.resnet_supported(mod):
                found.append((path, mod, "resnet"))
        elif len(parts) >= 2 and parts[-2] == "attentions" and type(mod) is Transformer2DModel:
            if layers.transformer_supported(mod):
                found.append((path, mod, "transformer"))
        elif len(parts) >= 3 and parts[-3] == "downsamplers" and parts[-1] == "conv":
            owner = unet.get_submodule(".".join(parts[:-1]))
            if isinstance(owner, Downsample2D) and owner.padding > 0 and layers.conv_supported(mod):
                found.append((path, mod, "conv"))
        elif len(parts) >= 3 and parts[-3] == "upsamplers" and parts[-1] == "conv":
            owner = unet.get_submodule(".".join(parts[:-1]))
            if isinstance(owner, Upsample2D) and not owner.use_conv_transpose and layers.conv_supported(mod):
                found.append((path, mod, "conv"))
    # no nesting: keep outermost eligible modules only
    paths = [p for p, _, _ in found]
    return [(p, m, k) for p, m, k in found if not any(p != q and p.startswith(q + ".") for q in paths)]


def apply_sparse(unet: UNet2DConditionModel, cfg: SparseConfig | None = None) -> SparseState:
    """Install the sparse engine on ``unet`` and return its state. Undo with :func:`remove_sparse`.

    In dense steps the wrapped UNet computes exactly what the original computes (the wrappers call the original
    modules); only recording and sparse steps differ.
    """
    from instdiff.sparse import layers

    if unet in _INSTALLED:
        raise RuntimeError("the sparse engine is already installed on this UNet; call remove_sparse first")
    cfg = cfg or SparseConfig()
    state = SparseState(unet, cfg)
    wrappers: list[tuple[str, nn.Module, nn.Module]] = []
    for path, mod, kind in _eligible_modules(unet):
        if kind == "resnet":
            wrapper: nn.Module = layers.SparseResnet(mod, path, state)
        elif kind == "transformer":
            wrapper = layers.SparseTransformer(mod, path, state)
        elif kind == "conv":
            wrapper = layers.SparseConv(mod, path, state)
        else:
            wrapper = layers.SparseGroupNorm(mod, path, state)
        wrappers.append((path, mod, wrapper))

    # 1. attention processors, named on the original tree
    originals = unet.attn_processors
    procs = dict(originals)
    for path, _, wrapper in wrappers:
        if isinstance(wrapper, layers.SparseTransformer):
            for i in range(len(wrapper.inner.transformer_blocks)):
                name = f"{path}.transformer_blocks.{i}.attn1.processor"
                procs[name] = layers.SelfAttentionRecorder(
                    state, f"{path}.transformer_blocks.{i}.attn1", originals[name], wrapper
                )
    for name, proc in originals.items():
        if name.endswith("attn2.processor"):
            procs[name] = layers.CrossAttentionProcessor(state, name[: -len(".processor")], proc)
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
    """Undo :func:`apply_sparse`: original modules back in place, hooks removed, original processors restored."""
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
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        state.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    return hook


def _time_embedding_macs(state: SparseState) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        n = output.shape[0]
        macs = sum(n * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
        state.count("other", macs, macs)

    return hook


def _profile_hooks(unet: nn.Module, state: SparseState) -> list[torch.utils.hooks.RemovableHandle]:
    """Synchronised timers around leaf modules of each layer type (dense code paths)."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention

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
