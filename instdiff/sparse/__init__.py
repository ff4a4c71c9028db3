"""FISEdit: cache-enabled sparse re-generation for text-driven image edits (Yu et al., AAAI 2024).

Public API:

* engine: :class:`SparseConfig`, :class:`SparseMode`, :func:`apply_sparse` → :class:`SparseState`,
  :func:`remove_sparse`, :func:`sparse_unet` (context manager), :func:`installed_state`;
* cache: :class:`ActivationCache`;
* masks: :func:`difference_mask`, :func:`latent_difference`, :func:`otsu_threshold`, :func:`opening`,
  :func:`erode`, :func:`dilate`, :func:`pool_any` (a cell is active if any of its pixels is),
  :func:`mask_to_latent`;
* block-size heuristic (APSC): :func:`choose_block_size`, :class:`ConvShape`, :class:`BlockSet`,
  :class:`TokenSet`;
* editing: :class:`FISEditConfig`, :class:`FISEditSession` (``generate`` / ``edit``), :class:`RunCache`,
  :func:`fisedit_edit_pairs`, :func:`token_alignment`.

Modules: ``config`` (engine and session settings), ``blocks`` (tiles and the cost model), ``cache`` (the
activation cache and a generation's :class:`RunCache`), ``mask``, ``state`` (the explicit engine state),
``processors`` (attention), ``layers`` (wrapper modules), ``engine`` (apply / remove), ``session`` (the FISEdit
loop).
"""

from instdiff.sparse.blocks import BlockSet, ConvShape, TokenSet, choose_block_size
from instdiff.sparse.cache import ActivationCache, RunCache
from instdiff.sparse.config import FISEditConfig, SparseConfig, SparseMode
from instdiff.sparse.engine import apply_sparse, installed_state, remove_sparse, sparse_unet
from instdiff.sparse.mask import (
    difference_mask,
    dilate,
    erode,
    latent_difference,
    mask_to_latent,
    opening,
    otsu_threshold,
    pool_any,
)
from instdiff.sparse.session import FISEditSession, fisedit_edit_pairs, token_alignment
from instdiff.sparse.state import SparseState

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
    "pool_any",
    "remove_sparse",
    "sparse_unet",
    "token_alignment",
]
