"""Editors under one contract: ``edit(bundle, images, source_prompts, target_prompts, cfg) -> EditResult``.

* :mod:`~instdiff.editing.instdiffedit` — InstDiffEdit (Zou et al. 2024): instant masks from cross-attention
  during the denoising the edit runs anyway, blended denoising (Eq. 4/5), final inpainting inside the last mask.
* :mod:`~instdiff.editing.sdedit` — SDEdit (Meng et al. 2022): img2img at noise strength r; the mask is the
  whole image.
* :mod:`~instdiff.editing.diffedit` — DiffEdit (Couairon et al. 2023): noise-difference mask thresholded per
  image, DDIM inversion with the source prompt, masked decoding with the target prompt.
* :mod:`~instdiff.editing.fisedit` — FISEdit (Yu et al. 2024): an adapter over :mod:`instdiff.sparse`.

The contract, the registry and the image checks are in :mod:`~instdiff.editing.contract` (the prompt and
seed checks, shared with the FISEdit session, in :mod:`instdiff.inputs`); the loop pieces the
editors share (noise, guidance, schedule, inpainting, inversion) in :mod:`instdiff.sampling`. Importing this
package registers every editor (the editor functions are ``EDITORS[method]``, or e.g.
``instdiff.editing.sdedit.sdedit``). Images are (B, 3, H, W) float tensors in [-1, 1]; masks come back at image
resolution as bool.
"""

from instdiff.config import EditConfig, Inpaint, Method, PromptMode

# importing the editor modules registers each editor in EDITORS
from instdiff.editing import diffedit, fisedit, instdiffedit, sdedit  # noqa: F401
from instdiff.editing.contract import (
    EDITORS,
    EditorFn,
    check_images,
    edit,
    expected_unet_calls,
    generate,
    register,
    size_multiple,
)
from instdiff.editing.instdiffedit import edit_words
from instdiff.errors import EditInputError
from instdiff.inputs import check_prompts
from instdiff.sampling import ddim_invert, inpaint, make_noise, to_epsilon
from instdiff.types import EditResult

__all__ = [
    "EDITORS",
    "EditConfig",
    "EditInputError",
    "EditResult",
    "EditorFn",
    "Inpaint",
    "Method",
    "PromptMode",
    "check_images",
    "check_prompts",
    "ddim_invert",
    "edit",
    "edit_words",
    "expected_unet_calls",
    "generate",
    "inpaint",
    "make_noise",
    "register",
    "size_multiple",
    "to_epsilon",
]
