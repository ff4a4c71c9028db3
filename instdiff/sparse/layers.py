"""Wrapper modules of the sparse engine (convolutions, GroupNorm, ResNet blocks, transformers).

Each wrapper holds the original module (``inner``) and, in a dense step, simply calls it (recording what later
sparse steps need when the step records). In a sparse step with a sparse plan it computes only the active
region, following FISEdit §"Sparse Computation":

* convolutions gather the active tiles with their halo and run densely on them, with the tile size chosen per
  layer by the APSC heuristic (§"Adaptive Pixel-Wise Sparse Convolution"); tile size 1 is a pixel-wise gather
  (an im2col matrix product);
* GroupNorm uses the cached per-(sample, channel) scale and shift of the dense run at the same step
  (§"Approximate Normalization"), applied to the gathered tiles together with the SiLU that follows;
* self-attention takes queries from the active tokens only and keys / values from the whole map, where the
  inactive tokens' keys / values come from the cache; cross-attention uses the new prompt; the feed-forward
  and the norms run on active tokens (§"Approximate Attention", Fig. 4; the attention itself is in
  :mod:`instdiff.sparse.processors`);
* the result is written into the cached full-size output of this step, which the wrapper returns.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from instdiff.sparse.blocks import BlockSet, ConvShape, TokenSet, gather_flat, gather_windows, tiles_to_flat
from instdiff.sparse.processors import active_self_attention, attention_supported, cross_attention
from instdiff.sparse.state import SparseState

log = logging.getLogger(__name__)


# ---- eligibility -------------------------------------------------------------------------------------
def conv_supported(conv: nn.Module) -> bool:
    """Square-kernel, ungrouped, undilated, zero-padded ``Conv2d`` with equal strides and paddings."""
    return (
        type(conv) is nn.Conv2d
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.stride[0] == conv.stride[1]
        and isinstance(conv.padding, tuple)
        and conv.padding[0] == conv.padding[1]
    )


def conv_shape(conv: nn.Conv2d) -> ConvShape:
    """The cost model's view of ``conv`` (channels, kernel, stride, padding)."""
    return ConvShape(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0])


def resnet_supported(r: ResnetBlock2D) -> bool:
    """Standard SD ResNet block: pre-norm GroupNorm → SiLU → 3×3 conv, twice; no up/down sampling inside."""
    return (
        r.upsample is None
        and r.downsample is None
        and r.time_embedding_norm in ("default", "scale_shift")
        and isinstance(r.norm1, nn.GroupNorm)
        and isinstance(r.norm2, nn.GroupNorm)
        and isinstance(r.nonlinearity, nn.SiLU)
        and conv_supported(r.conv1)
        and conv_supported(r.conv2)
        and r.conv1.kernel_size[0] == 3
        and r.conv1.stride[0] == 1
        and r.conv1.padding[0] == 1
        and r.conv2.kernel_size[0] == 3
        and r.conv2.stride[0] == 1
        and r.conv2.padding[0] == 1
        and (r.conv_shortcut is None or (conv_supported(r.conv_shortcut) and r.conv_shortcut.kernel_size[0] == 1))
    )


def transformer_supported(t: Transformer2DModel) -> bool:
    """Continuous-input SD transformer with layer-norm ``BasicTransformerBlock``s and plain attention."""
    if not (getattr(t, "is_input_continuous", False) and isinstance(t.norm, nn.GroupNorm)):
        return False
    for blk in t.transformer_blocks:
        if not (
            type(blk) is BasicTransformerBlock
            and blk.norm_type == "layer_norm"
            and blk.pos_embed is None
            and not blk.only_cross_attention
            and attention_supported(blk.attn1)
            and not blk.attn1.is_cross_attention
            and (blk.attn2 is None or attention_supported(blk.attn2))
            and not hasattr(blk, "fuser")
        ):
            return False
    return True


# ---- small tensor helpers -------------------------------------------------------------------------------
def group_norm_affine(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """Per-(sample, channel) scale and shift (2, N, C) float32 that turn ``x`` into ``norm(x)``:
    norm(x) = x·scale + shift, scale = γ·rstd_g, shift = β − mean_g·scale (Wu & He 2018, Eq. 1–2)."""
    n, c = x.shape[:2]
    g = norm.num_groups
    var, mean = torch.var_mean(x.float().reshape(n, g, -1), dim=2, unbiased=False)  # (N, G)
    rstd = torch.rsqrt(var + norm.eps)
    rstd_c = rstd.repeat_interleave(c // g, dim=1)  # (N, C)
    mean_c = mean.repeat_interleave(c // g, dim=1)
    gamma = norm.weight.float() if norm.weight is not None else torch.ones_like(rstd_c[0])
    beta = norm.bias.float() if norm.bias is not None else torch.zeros_like(rstd_c[0])
    scale = gamma * rstd_c
    return torch.stack([scale, beta - mean_c * scale])


def _conv_tiles(g: torch.Tensor, conv: nn.Conv2d, block: int) -> torch.Tensor:
    """Convolve windows (T, Cin, P, P) without padding → tiles (T, Cout, b, b). Tile size 1 → im2col GEMM."""
    if block == 1:
        w = conv.weight
        return F.linear(g.reshape(g.shape[0], -1), w.reshape(w.shape[0], -1), conv.bias)[:, :, None, None]
    return F.conv2d(g, conv.weight, conv.bias, stride=conv.stride)


def _affine(t: torch.Tensor, gn: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-(row, channel) affine of tiles (N·nb, C, P, P) with cached GroupNorm scale / shift ``gn`` (2, N, C)."""
    _, c, p, q = t.shape
    t5 = t.view(rows, -1, c, p, q)
    out = torch.addcmul(gn[1][:, None, :, None, None], t5, gn[0][:, None, :, None, None])
    return out.view(-1, c, p, q)


def _per_row(t: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    """Add a per-(row, channel) vector ``v`` (N, C) to tiles (N·nb, C, P, P)."""
    _, c, p, q = t.shape
    return (t.view(rows, -1, c, p, q) + v[:, None, :, None, None]).view(-1, c, p, q)


def _conv_macs(rows: int, h: int, w: int, conv: nn.Conv2d) -> float:
    """Hout·Wout·Cout·Cin·k² per batch row."""
    return float(rows * h * w * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])


def _linear_macs(tokens: int, layer: nn.Module) -> float:
    """Multiply-accumulates of every ``nn.Linear`` inside ``layer`` applied to ``tokens`` rows."""
    return float(sum(tokens * m.in_features * m.out_features for m in layer.modules() if isinstance(m, nn.Linear)))


class _Wrapper(nn.Module):
    """Base of the wrappers: the original module as ``inner``, the module path, and the shared state."""

    def __init__(self, inner: nn.Module, path: str, state: SparseState) -> None:
        super().__init__()
        self.inner = inner
        self.path = path
        self._state_ref = state  # a plain object, not a submodule

    @property
    def state(self) -> SparseState:
        """The engine state shared by every wrapper."""
        return self._state_ref

    def key(self, what: str) -> str:
        """Cache name of one of this module's tensors: ``"{path}:{what}"``."""
        return f"{self.path}:{what}"

    def install_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Forward pre-hooks on inner modules that record what sparse steps need; returns their handles."""
        return []

    def _norm_stats_hook(self, name: str) -> Any:
        """A pre-hook recording a GroupNorm's per-(sample, channel) affine under ``name`` in recording steps."""

        def hook(module: nn.GroupNorm, args: tuple) -> None:
            x = args[0]
            if self.state.should_record(x.shape[-2]):
                self.state.record(self.key(name), group_norm_affine(x, module))

        return hook

    def _input_hook(self, name: str) -> Any:
        """A pre-hook recording a module's input under ``name`` in recording steps."""

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self.state.should_record(x.shape[-2]):
                self.state.record(self.key(name), x)

        return hook


# ---- convolutions ----------------------------------------------------------------------------------------
class SparseConv(_Wrapper):
    """A ``Conv2d`` (``conv_in``, ``conv_out``, down- / upsampler convs) computed on active tiles.

    Cache per step: ``out`` (N, Cout, Hout, Wout).
    """

    inner: nn.Conv2d

    def __init__(self, inner: nn.Conv2d, path: str, state: SparseState) -> None:
        super().__init__(inner, path, state)
        self.shape = conv_shape(inner)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """Output (H, W) of the convolution on an (h, w) input."""
        s = self.shape
        return (h + 2 * s.padding - s.kernel) // s.stride + 1, (w + 2 * s.padding - s.kernel) // s.stride + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, Cin, H, W) → (N, Cout, Hout, Wout): dense, or active tiles written into the cached output."""
        st = self.state
        n, _, h, w = x.shape
        ho, wo = self.out_size(h, w)
        dense = _conv_macs(n, ho, wo, self.inner)
        plan = st.conv_plan(self.path, (ho, wo), [self.shape], [self.key("out")]) if st.sparse_step else None
        if plan is None:
            y = self.inner(x)
            st.count("conv", dense, dense)
            if st.should_record(ho):
                st.record(self.key("out"), y)
            return y
        return self._sparse(x, plan, dense)

    def _sparse(self, x: torch.Tensor, bs: BlockSet, dense: float) -> torch.Tensor:
        """Convolve the haloed windows of the active tiles and write them into this step's cached output."""
        st = self.state
        n = x.shape[0]
        win = bs.windows(self.shape, x.shape[-2], x.shape[-1])
        with st.timed("gather"):
            g = gather_windows(x, win, zero_outside=True)  # (N·nb, Cin, P, P)
        with st.timed("conv"):
            y = _conv_tiles(g, self.inner, bs.block)  # (N·nb, Cout, b, b)
        st.count("conv", dense, _conv_macs(n * bs.count, bs.block, bs.block, self.inner))
        with st.timed("gather"):
            out = st.fetch(self.key("out"))
            st.write_flat(out, bs.centers(), tiles_to_flat(y, n))
        return out


class SparseGroupNorm(_Wrapper):
    """A stand-alone ``GroupNorm`` (``conv_norm_out``): in sparse steps, the cached statistics of the dense run
    (FISEdit §"Approximate Normalization") applied to the whole map. Cache per step: ``gn`` (2, N, C)."""

    inner: nn.GroupNorm

    def install_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Forward hooks that record what later sparse steps read from the cache; returns their handles."""
        return [self.inner.register_forward_pre_hook(self._norm_stats_hook("gn"))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, C, H, W): the cached statistics in sparse steps, the original norm otherwise."""
        st = self.state
        if st.sparse_step and st.affine_plan(self.path, (x.shape[-2], x.shape[-1]), [self.key("gn")]):
            with st.timed("norm"):
                gn = st.fetch(self.key("gn")).to(x.dtype)  # (2, N, C)
                return torch.addcmul(gn[1][:, :, None, None], x, gn[0][:, :, None, None])
        return self.inner(x)


# ---- ResNet block ----------------------------------------------------------------------------------------
class SparseResnet(_Wrapper):
    """``ResnetBlock2D`` on active tiles: GN1+SiLU on haloed windows of the input (cached statistics) → conv1 →
    +temb → GN2+SiLU → written into the cached conv2 input → haloed windows → conv2 → + shortcut → written into
    the cached block output.

    Cache per step: ``gn1`` (2, N, Cin), ``gn2`` (2, N, Cout), ``act2`` (N, Cout, H, W) = conv2's input,
    ``out`` (N, Cout, H, W).
    """

    inner: ResnetBlock2D

    def __init__(self, inner: ResnetBlock2D, path: str, state: SparseState) -> None:
        super().__init__(inner, path, state)
        self.shape1 = conv_shape(inner.conv1)
        self.shape2 = conv_shape(inner.conv2)
        self.shapes = [self.shape1, self.shape2]
        if inner.conv_shortcut is not None:
            self.shapes.append(conv_shape(inner.conv_shortcut))
        self.shape_sc = ConvShape(inner.in_channels, inner.out_channels, 1, 1, 0)
        self._macs_memo: dict[tuple, float] = {}
        self.needs = [self.key(k) for k in ("gn1", "gn2", "act2", "out")]

    def install_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Forward hooks that record what later sparse steps read from the cache; returns their handles."""
        r = self.inner
        return [
            r.norm1.register_forward_pre_hook(self._norm_stats_hook("gn1")),
            r.norm2.register_forward_pre_hook(self._norm_stats_hook("gn2")),
            r.conv2.register_forward_pre_hook(self._input_hook("act2")),
        ]

    def dense_macs(self, n: int, h: int, w: int, temb: torch.Tensor | None) -> float:
        """Multiply-accumulates of the dense block on (n, ·, h, w) inputs (memoised)."""
        key = (n, h, w, temb is None)
        if key not in self._macs_memo:
            self._macs_memo[key] = self._dense_macs(n, h, w, temb)
        return self._macs_memo[key]

    def _dense_macs(self, n: int, h: int, w: int, temb: torch.Tensor | None) -> float:
        r = self.inner
        m = _conv_macs(n, h, w, r.conv1) + _conv_macs(n, h, w, r.conv2)
        if r.conv_shortcut is not None:
            m += _conv_macs(n, h, w, r.conv_shortcut)
        if temb is not None and r.time_emb_proj is not None:
            m += _linear_macs(n, r.time_emb_proj)
        return m

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """(N, Cin, H, W) and time embedding (N, Ct) → (N, Cout, H, W), dense or on active tiles."""
        st = self.state
        n, _, h, w = input_tensor.shape
        dense = self.dense_macs(n, h, w, temb)
        plan = st.conv_plan(self.path, (h, w), self.shapes, self.needs) if st.sparse_step else None
        if plan is None:
            out = self.inner(input_tensor, temb, *args, **kwargs)
            st.count("conv", dense, dense)
            if st.should_record(h):
                st.record(self.key("out"), out)
            return out
        return self._sparse(input_tensor, temb, plan, dense)

    def _sparse(self, x: torch.Tensor, temb: torch.Tensor | None, bs: BlockSet, dense: float) -> torch.Tensor:
        """The block on the active tiles of ``bs`` (see the class docstring), written into the cached output."""
        st, r = self.state, self.inner
        n, _, h, w = x.shape
        b = bs.block
        # 1. GN1 + SiLU on haloed input windows, conv1
        win1 = bs.windows(self.shape1, h, w)
        with st.timed("gather"):
            g = gather_windows(x, win1)  # (N·nb, Cin, P, P)
        with st.timed("norm"):
            a = F.silu(_affine(g, st.fetch(self.key("gn1")).to(x.dtype), n))
            valid = win1.valid_as(a)
            if valid is not None:  # conv1 zero-pads its input, i.e. after the norm and the SiLU
                a = (a.view(n, -1, *a.shape[1:]) * valid).view(a.shape)
        with st.timed("conv"):
            hid = _conv_tiles(a, r.conv1, b)  # (N·nb, Cout, b, b)
        # 2. time embedding, GN2 + SiLU
        with st.timed("norm"):
            gn2 = st.fetch(self.key("gn2")).to(hid.dtype)  # (2, N, Cout)
            t = None
            if r.time_emb_proj is not None and temb is not None:
                t = r.time_emb_proj(temb if r.skip_time_act else r.nonlinearity(temb))  # (N, Cout or 2·Cout)
            if r.time_embedding_norm == "default":
                if t is not None:
                    hid = _per_row(hid, t, n)
                hid = _affine(hid, gn2, n)
            else:
                hid = _affine(hid, gn2, n)
                if t is not None:
                    scale, shift = t.chunk(2, dim=1)
                    hid = _per_row(_affine(hid, torch.stack([1 + scale, torch.zeros_like(shift)]), n), shift, n)
            a2 = F.silu(hid)
        # 3. conv2 over haloed windows of (cached conv2 input with the active tiles overwritten)
        cpos = bs.centers()
        with st.timed("gather"):
            act2 = st.fetch(self.key("act2"))  # (N, Cout, H, W)
            st.write_flat(act2, cpos, tiles_to_flat(a2, n))
            g2 = gather_windows(act2, bs.windows(self.shape2, h, w), zero_outside=True)
        with st.timed("conv"):
            hid2 = _conv_tiles(g2, r.conv2, b)  # (N·nb, Cout2, b, b)
        # 4. shortcut and residual, written into the cached block output
        with st.timed("gather"):
            xc = gather_windows(x, bs.windows(self.shape_sc, h, w))  # (N·nb, Cin, b, b)
        with st.timed("conv"):
            if r.conv_shortcut is not None:
                xc = F.conv2d(xc, r.conv_shortcut.weight, r.conv_shortcut.bias)
            res = (xc + hid2) / r.output_scale_factor
        tiles = n * bs.count
        actual = (
            _conv_macs(tiles, b, b, r.conv1)
            + _conv_macs(tiles, b, b, r.conv2)
            + (_conv_macs(tiles, b, b, r.conv_shortcut) if r.conv_shortcut is not None else 0.0)
            + (_linear_macs(n, r.time_emb_proj) if t is not None else 0.0)
        )
        st.count("conv", dense, actual)
        with st.timed("gather"):
            out = st.fetch(self.key("out"))
            st.write_flat(out, cpos, tiles_to_flat(res, n))
        return out


# ---- transformer ----------------------------------------------------------------------------------------
class SparseTransformer(_Wrapper):
    """``Transformer2DModel`` on active tokens: GN (cached statistics) → proj_in → per block: LN → self-attention
    (queries from active tokens, keys / values of the whole map with inactive ones from the cache) → LN →
    cross-attention with the new prompt → LN → FF → proj_out → + input, written into the cached output.

    Cache per step: ``gn`` (2, N, C); per block ``…attn1:k`` and ``…attn1:v`` (N, HW, D); ``out`` (N, C, H, W).
    """

    inner: Transformer2DModel

    def __init__(self, inner: Transformer2DModel, path: str, state: SparseState) -> None:
        super().__init__(inner, path, state)
        self.attn_paths = [f"{path}.transformer_blocks.{i}.attn1" for i in range(len(inner.transformer_blocks))]
        self.needs = [self.key("gn"), self.key("out")]
        for p in self.attn_paths:
            self.needs += [f"{p}:k", f"{p}:v"]
        self.recording_now = False
        # multiply-accumulates per token (or per prompt token, or per query-key pair), from the layer shapes
        self.c_proj = _proj_macs(inner.proj_in, 1) + _proj_macs(inner.proj_out, 1)
        self.c_attn1 = [(_linear_macs(1, b.attn1), float(b.attn1.inner_dim)) for b in inner.transformer_blocks]
        self.c_attn2 = [
            (
                _linear_macs(1, b.attn2.to_q) + _linear_macs(1, b.attn2.to_out),
                _linear_macs(1, b.attn2.to_k) + _linear_macs(1, b.attn2.to_v),
                float(b.attn2.inner_dim),
            )
            if b.attn2 is not None
            else (0.0, 0.0, 0.0)
            for b in inner.transformer_blocks
        ]
        self.c_ff = sum(_linear_macs(1, b.ff) for b in inner.transformer_blocks)

    def install_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Forward hooks that record what later sparse steps read from the cache; returns their handles."""
        return [self.inner.norm.register_forward_pre_hook(self._norm_stats_hook("gn"))]

    def is_recording(self) -> bool:
        """Whether the current call records (its self-attention recorders then keep keys and values)."""
        return self.recording_now

    def macs(self, tokens: int, rows: int, hw: int, enc_len: int) -> dict[str, float]:
        """MACs of this transformer computing ``tokens`` query tokens over ``rows`` maps of ``hw`` tokens each
        (keys of self-attention: all ``hw``; of cross-attention: ``enc_len`` prompt tokens)."""
        attn = 0.0
        for lin, d in self.c_attn1:
            attn += tokens * lin + 2.0 * tokens * hw * d
        for per_q, per_kv, d in self.c_attn2:
            attn += tokens * per_q + rows * enc_len * per_kv + 2.0 * tokens * enc_len * d
        return {"conv": tokens * self.c_proj, "attention": attn, "ff": tokens * self.c_ff}

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """(N, C, H, W) → the inner transformer's output type; dense, or on active tokens in sparse steps."""
        st = self.state
        n, _, h, w = hidden_states.shape
        ehs = kwargs.get("encoder_hidden_states", args[0] if args else None)
        enc_len = ehs.shape[1] if ehs is not None else 0
        dense = self.macs(n * h * w, n, h * w, enc_len)
        plan = None
        if st.sparse_step and kwargs.get("attention_mask") is None and kwargs.get("encoder_attention_mask") is None:
            plan = st.token_plan(self.path, (h, w), self.needs)
        if plan is None:
            self.recording_now = st.should_record(h)
            try:
                result = self.inner(hidden_states, *args, **kwargs)
            finally:
                self.recording_now = False
            for cat, m in dense.items():
                st.count(cat, m, m)
            if st.should_record(h):
                st.record(self.key("out"), result[0] if isinstance(result, tuple) else result.sample)
            return result
        out = self._sparse(hidden_states, ehs, plan, dense)
        return Transformer2DModelOutput(sample=out) if kwargs.get("return_dict", True) else (out,)

    def _sparse(self, x: torch.Tensor, ehs: torch.Tensor | None, ts: TokenSet, dense: dict[str, float]) -> torch.Tensor:
        """The transformer on the active tokens of ``ts``, written into the cached output (N, C, H, W)."""
        st, t = self.state, self.inner
        n, c, h, w = x.shape
        pos = ts.pos
        with st.timed("gather"):
            xa = gather_flat(x, pos).transpose(1, 2)  # (N, M, C)
        with st.timed("norm"):
            gn = st.fetch(self.key("gn")).to(x.dtype)  # (2, N, C)
            hid = torch.addcmul(gn[1][:, None, :], xa, gn[0][:, None, :])
        with st.timed("conv"):
            hid = _proj(t.proj_in, hid)  # (N, M, D)
        for blk, apath in zip(t.transformer_blocks, self.attn_paths, strict=True):
            hid = self._block(blk, apath, hid, ehs, pos)
        with st.timed("conv"):
            y = _proj(t.proj_out, hid) + xa  # (N, M, C)
        actual = self.macs(n * ts.count, n, h * w, ehs.shape[1] if ehs is not None else h * w)
        for cat in dense:
            st.count(cat, dense[cat], actual[cat])
        with st.timed("gather"):
            out = st.fetch(self.key("out"))
            st.write_flat(out, pos, y.transpose(1, 2))
        return out

    def _block(
        self, blk: BasicTransformerBlock, apath: str, hid: torch.Tensor, ehs: torch.Tensor | None, pos: torch.Tensor
    ) -> torch.Tensor:
        """One ``BasicTransformerBlock`` on active tokens ``hid`` (N, M, D): self-attention, cross-attention, FF."""
        st = self.state
        # self-attention: queries of active tokens, keys / values of the whole map
        nh = blk.norm1(hid)  # (N, M, D)
        with st.timed("attention"):
            o = active_self_attention(st, blk.attn1, apath, nh, pos)
        hid = hid + o
        # cross-attention with the (new) prompt
        if blk.attn2 is not None:
            nh = blk.norm2(hid)
            enc = ehs if ehs is not None else nh
            with st.timed("attention"):
                o = cross_attention(blk.attn2, nh, enc)  # (N, M, D)
            hid = hid + o
        # feed-forward
        return hid + blk.ff(blk.norm3(hid))


def _proj(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution or a linear layer applied to token rows (M, Cin) → (M, Cout)."""
    if isinstance(layer, nn.Conv2d):
        return F.linear(x, layer.weight.view(layer.out_channels, layer.in_channels), layer.bias)
    return layer(x)


def _proj_macs(layer: nn.Module, tokens: int) -> float:
    """Multiply-accumulates of a 1×1 convolution or linear projection on ``tokens`` rows."""
    if isinstance(layer, nn.Conv2d):
        return float(tokens * layer.in_channels * layer.out_channels)
    return _linear_macs(tokens, layer)
