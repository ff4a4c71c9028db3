"""FISEdit: cache-enabled sparse re-generation for text-driven image edits (Yu et al., AAAI 2024).

Public API:

* engine: :class:`SparseConfig`, :class:`SparseMode`, :func:`apply_sparse` → :class:`SparseState`,
  :func:`remove_sparse`, :func:`sparse_unet` (context manager);
* cache: :class:`ActivationCache`;
* masks: :func:`difference_mask`, :func:`otsu_threshold`, :func:`opening`, :func:`dilate`, :func:`resize_mask`;
* block-size heuristic (APSC): :func:`choose_block_size`, :class:`ConvShape`;
* editing: :class:`FISEditConfig`, :class:`FISEditSession` (``generate`` / ``edit``), :class:`RunCache`,
  :func:`fisedit_edit_pairs`.
"""

from instdiff.sparse.blocks import BlockSet, ConvShape, TokenSet, choose_block_size
from instdiff.sparse.cache import ActivationCache
from instdiff.sparse.config import SparseConfig, SparseMode
from instdiff.sparse.editor import FISEditConfig, FISEditSession, RunCache, fisedit_edit_pairs, token_alignment
from instdiff.sparse.engine import SparseState, apply_sparse, installed_state, remove_sparse, sparse_unet
from instdiff.sparse.mask import (
    difference_mask,
    dilate,
    erode,
    latent_difference,
    mask_to_latent,
    opening,
    otsu_threshold,
    resize_mask,
)

__all__ = [
    "ActivationCache",
    "BlockSet",
    "ConvShape",
    "FISEditConfig",
    "FISEditSession",
    "RunCache",
    "SparseConfig",
    "SparseMode",
    "SparseState",
    "TokenSet",
    "apply_sparse",
    "choose_block_size",
    "difference_mask",
    "dilate",
    "erode",
    "fisedit_edit_pairs",
    "installed_state",
    "latent_difference",
    "mask_to_latent",
    "opening",
    "otsu_threshold",
    "remove_sparse",
    "resize_mask",
    "sparse_unet",
    "token_alignment",
]
