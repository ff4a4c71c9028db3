"""The explicit state of an installed sparse engine: step protocol, mask, per-layer plans, cache I/O, counters.

FISEdit (Yu et al., AAAI 2024) §"Sparse Computation": in a sparse step every wrapped layer computes only the
active region of the difference mask and reads the rest from the cache of the previous run at the same step.
:class:`SparseState` is what the wrappers (:mod:`instdiff.sparse.layers`) and the attention processors
(:mod:`instdiff.sparse.processors`) share; :func:`instdiff.sparse.engine.apply_sparse` creates it. It follows
the "config + apply/remove + explicit state with ``reset()``" shape of diffusers' hooks.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from instdiff.errors import EditInputError
from instdiff.sparse.blocks import BlockSet, ConvShape, TokenSet, choose_block_size, divides
from instdiff.sparse.cache import ActivationCache
from instdiff.sparse.config import SparseConfig, SparseMode
from instdiff.sparse.mask import pool_any

log = logging.getLogger(__name__)

CATEGORIES = ("conv", "norm", "attention", "ff", "gather", "other")
"""Layer types the MAC counters and the profile timers are kept for."""


@dataclass
class CrossAttentionControl:
    """Prompt-to-prompt style control of cross-attention during the mask-detection steps.

    FISEdit §"Target Area Capture": keep the cached cross-attention maps of the unchanged words so that the
    latent difference concentrates where the words changed. The session sets it on :attr:`SparseState.ca`
    for the mask steps; :class:`~instdiff.sparse.processors.CrossAttentionProcessor` applies it.

    Attributes:
        mode: ``"record"`` (store the conditional rows' maps) or ``"replace"`` (use the stored map of source
            token ``src[i]`` for target token ``dst[i]``).
        rows: (R,) long, the batch rows that carry the prompt (the CFG conditional half).
        src: (K,) long source-token positions of the unchanged words (``"replace"``).
        dst: (K,) long target-token positions of the same words (``"replace"``).
        source: the cache holding the recorded maps (``"replace"``).
    """

    mode: str
    rows: torch.Tensor
    src: torch.Tensor | None = None
    dst: torch.Tensor | None = None
    source: ActivationCache | None = None


class _Timer:
    """Synchronised wall-clock timer of one layer type, active only in profile mode."""

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
    ``end_step()`` (or ``with state.run_step(i, ...)``). ``set_mask`` fixes the active region at latent
    resolution for later sparse steps.

    Args:
        unet: the UNet the engine is installed on (held weakly, for its device).
        cfg: the engine's settings.
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
        """Whether every op is timed (``SparseMode.PROFILE``)."""
        return self.cfg.mode is SparseMode.PROFILE

    @property
    def device(self) -> torch.device:
        """The UNet's device (CPU once the UNet is gone)."""
        unet = self._unet_ref()
        return unet.device if unet is not None else torch.device("cpu")

    def sync(self) -> None:
        """Wait for the device (CUDA only), so that wall-clock timers measure finished work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, category: str) -> _Timer:
        """``with state.timed("conv"): ...`` adds the block's seconds to ``times[category]`` in profile mode."""
        return _Timer(self, category)

    # ---- per-step protocol ---------------------------------------------------------------
    def bind(self, cache: ActivationCache | None) -> None:
        """The cache that recording steps write to and sparse steps read from."""
        self.cache = cache

    def begin_step(self, step: int, *, sparse: bool = False, record: bool = False) -> None:
        """Start UNet call number ``step`` of a run: recording into the bound cache, or sparse from it.

        Args:
            step: the denoising step (the cache key).
            sparse: compute only the masked region (dense anyway in ``SparseMode.DENSE``).
            record: store what later sparse steps need.

        Raises:
            ValueError: both ``sparse`` and ``record``.
            RuntimeError: no cache bound, or no mask set for a sparse step.
        """
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
        """``with state.run_step(i, ...)``: :meth:`begin_step` before the block, :meth:`end_step` after it."""
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
        """Zero the MAC counters, the per-type times and the per-step times."""
        self.macs = {c: [0.0, 0.0] for c in CATEGORIES}
        self.times = {c: 0.0 for c in CATEGORIES}
        self.step_times = []

    # ---- mask and plans ------------------------------------------------------------------
    def set_mask(self, mask: torch.Tensor) -> None:
        """Fix the active region for the following sparse steps; plans are recomputed.

        Args:
            mask: (H, W) bool at latent resolution, or (N, H, W) bool with identical rows (one mask shared by
                every batch row of the UNet call, e.g. the CFG rows of one image).

        Raises:
            EditInputError: not a 2-D/3-D bool mask, or rows that differ.
        """
        if mask.dtype != torch.bool or mask.dim() not in (2, 3):
            raise EditInputError(
                "the sparse mask is (H, W) or (N, H, W) bool at latent resolution; "
                f"got {tuple(mask.shape)} {mask.dtype}"
            )
        if mask.dim() == 3:
            if not bool((mask == mask[:1]).all()):
                raise EditInputError(
                    "all rows of one UNet call share one sparse mask; edit images with different masks in separate "
                    "calls"
                )
            mask = mask[0]
        self.mask = mask.to(self.device)
        self._masks.clear()
        self._plans.clear()
        self.used_keys.clear()

    def mask_at(self, height: int, width: int) -> torch.Tensor:
        """The mask at a feature map's size: (height, width) bool, a cell active if any of its pixels is."""
        assert self.mask is not None
        key = (height, width)
        if key not in self._masks:
            self._masks[key] = pool_any(self.mask[None], key)[0]
        return self._masks[key]

    def eligible_resolution(self, height: int) -> bool:
        """True if feature maps of this height may run sparsely (and are therefore cached)."""
        if self.latent_hw is None:
            return False
        return height >= self.cfg.min_resolution_ratio * self.latent_hw[0] - 1e-9

    def should_record(self, height: int) -> bool:
        """Whether a layer with feature maps of this height stores its activations in the current step."""
        return self.recording and self.eligible_resolution(height)

    def _dense_by_rule(self, mask: torch.Tensor) -> bool:
        return (not self.eligible_resolution(mask.shape[-2])) or float(mask.float().mean()) > self.cfg.dense_fraction

    def conv_plan(self, path: str, size: tuple[int, int], convs: list[ConvShape], needs: list[str]) -> BlockSet | None:
        """The APSC plan of a convolutional module at this output size (memoised per mask).

        FISEdit §"Adaptive Pixel-Wise Sparse Convolution": the block size minimising the estimated cost of
        ``convs`` on the mask, unless ``cfg.force_block`` fixes it.

        Args:
            path: the module path (the memo key).
            size: (H, W) of the module's output.
            convs: the convolutions the module runs at that size.
            needs: cache names that must exist for this step to run sparsely.

        Returns:
            The active tiles, or ``None`` to run dense.
        """
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
        """Whether every name is cached for the current step."""
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
        """Store ``tensor`` in the bound cache under (current step, ``name``)."""
        assert self.cache is not None and self.step is not None
        self.cache.put(self.step, name, tensor)

    def fetch(self, name: str) -> torch.Tensor:
        """The cached tensor of the current step, on the device.

        Writes into it must go through :meth:`write_flat` / :meth:`write_tokens`, which keep an undo log for
        tensors the cache holds itself.
        """
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
        """``view.index_copy_(dim, pos, vals)``, remembering the old values when ``base`` is a stored tensor."""
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
        """Totals of the MAC counters: ``dense``, ``actual``, ``ratio`` (dense / actual) and ``by_category``."""
        dense = sum(v[0] for v in self.macs.values())
        actual = sum(v[1] for v in self.macs.values())
        return {
            "dense": dense,
            "actual": actual,
            "ratio": dense / actual if actual else float("inf"),
            "by_category": {c: {"dense": v[0], "actual": v[1]} for c, v in self.macs.items() if v[0] or v[1]},
        }
