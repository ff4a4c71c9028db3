"""Text/image agreement with CLIP: CLIPScore, image similarity, directional similarity, CLIP accuracy.

Built on ``transformers.CLIPModel`` (imported when a :class:`ClipScorer` is built, so importing this module
stays cheap).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from instdiff.errors import ImageInputError
from instdiff.metrics.inputs import ImageInput, to_tensor

if TYPE_CHECKING:
    from transformers import CLIPModel

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """CLIP-based editing metrics on top of ``transformers.CLIPModel``.

    Images are preprocessed with tensor ops only: resize so the short side equals the
    model's ``image_size`` (bicubic, antialiased), centre crop, normalise with the
    processor's mean/std (OpenAI CLIP values by default).  All embeddings are
    L2-normalised before use.

    Args:
        model_id_or_path: Hugging Face id or local directory with a CLIP checkpoint.
        device: Device for the model.
        local_files_only: Forbid network access when loading.
        dtype: Optional model dtype (e.g. ``torch.float16`` on GPU).
    """

    def __init__(
        self,
        model_id_or_path: str | Path,
        device: torch.device | str = "cpu",
        local_files_only: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        from transformers import AutoTokenizer, CLIPModel

        kwargs: dict[str, Any] = {"local_files_only": local_files_only}
        model_kwargs = dict(kwargs)
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        model = CLIPModel.from_pretrained(str(model_id_or_path), **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(model_id_or_path), **kwargs)
        mean, std = CLIP_MEAN, CLIP_STD
        try:
            from transformers import CLIPImageProcessor

            processor = CLIPImageProcessor.from_pretrained(str(model_id_or_path), **kwargs)
            mean = tuple(processor.image_mean)
            std = tuple(processor.image_std)
        except (OSError, ValueError, ImportError) as exc:
            log.info("No CLIP image processor config (%s); using OpenAI mean/std", exc)
        self._setup(model, tokenizer, device, mean, std, f"transformers:{model_id_or_path}")

    @classmethod
    def from_model(
        cls,
        model: CLIPModel,
        processor_or_tokenizer: Any,
        device: torch.device | str = "cpu",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
    ) -> ClipScorer:
        """Wrap an already constructed ``CLIPModel``.

        Args:
            model: The CLIP model.
            processor_or_tokenizer: A ``CLIPProcessor`` (its tokenizer and image mean/std
                are used) or a tokenizer.
            device: Device for the model.
            image_mean: Override of the normalisation mean.
            image_std: Override of the normalisation std.

        Returns:
            The scorer; its ``weights_source`` is ``"in-memory CLIPModel"``.
        """
        tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
        image_processor = getattr(processor_or_tokenizer, "image_processor", None)
        mean = image_mean or getattr(image_processor, "image_mean", None) or CLIP_MEAN
        std = image_std or getattr(image_processor, "image_std", None) or CLIP_STD
        scorer = cls.__new__(cls)
        scorer._setup(model, tokenizer, device, tuple(mean), tuple(std), "in-memory CLIPModel")
        return scorer

    def _setup(
        self,
        model: CLIPModel,
        tokenizer: Any,
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
        source: str,
    ) -> None:
        """Hold the model, tokenizer and normalisation shared by both constructors."""
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.max_text_length = int(
            min(
                getattr(tokenizer, "model_max_length", 77) or 77,
                model.config.text_config.max_position_embeddings,
            )
        )
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.weights_source = source

    # -- embeddings -------------------------------------------------------------------

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Resize (short side), centre-crop and normalise images for the vision tower.

        Args:
            images: Images in [0, 1] (any form :func:`~instdiff.metrics.inputs.to_tensor` accepts).

        Returns:
            (B, 3, S, S) float32 pixel values, S the model's ``image_size``.
        """
        x = to_tensor(images).clamp(0.0, 1.0)
        size = self.image_size
        height, width = x.shape[-2:]
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[..., top : top + size, left : left + size]
        return (x - self._mean) / self._std

    @staticmethod
    def _pooled(output: Any) -> torch.Tensor:
        """The pooled output of a CLIP text or vision tower."""
        pooled = getattr(output, "pooler_output", None)
        return pooled if pooled is not None else output[1]

    @torch.inference_mode()
    def embed_images(self, images: ImageInput, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised CLIP image embeddings.

        Args:
            images: Images in [0, 1] (any form :func:`~instdiff.metrics.inputs.to_tensor` accepts).
            batch_size: Images per forward pass.

        Returns:
            (B, D) float32 CPU tensor.
        """
        batch = to_tensor(images)
        dtype = next(self.model.parameters()).dtype
        out = []
        for start in range(0, batch.shape[0], batch_size):
            pixels = self.preprocess(batch[start : start + batch_size]).to(self.device, dtype)
            vision = self.model.vision_model(pixel_values=pixels)
            emb = self.model.visual_projection(self._pooled(vision))
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised CLIP text embeddings.

        Args:
            texts: The texts (a single string counts as one text), truncated to the model's text length.
            batch_size: Texts per forward pass.

        Returns:
            (B, D) float32 CPU tensor.
        """
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            )
            text = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
            emb = self.model.text_projection(self._pooled(text))
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    # -- metrics ----------------------------------------------------------------------

    def clip_score(self, images: ImageInput, texts: Sequence[str], weight: float = 100.0) -> torch.Tensor:
        """CLIPScore per image/text pair: ``weight · max(cos(E_I, E_T), 0)``.

        Hessel et al. (2021) define CLIP-S with ``w = 2.5``; the default ``w = 100`` is the
        convention of torchmetrics and most editing papers (so ``score/40`` is the
        Hessel value).

        Args:
            images: Images in [0, 1], one per text.
            texts: One text per image.
            weight: The scale w.

        Returns:
            (B,) float32 in [0, weight].

        Raises:
            ImageInputError: Different numbers of images and texts.
        """
        img = self.embed_images(images)
        txt = self.embed_texts(texts)
        self._check_pairs(img, txt)
        return weight * (img * txt).sum(-1).clamp_min(0.0)

    def image_similarity(self, images_a: ImageInput, images_b: ImageInput) -> torch.Tensor:
        """Cosine similarity of CLIP image embeddings per pair.

        Args:
            images_a: Images in [0, 1].
            images_b: As many images in [0, 1] (sizes may differ).

        Returns:
            (B,) float32 in [-1, 1].

        Raises:
            ImageInputError: Different numbers of images.
        """
        a = self.embed_images(images_a)
        b = self.embed_images(images_b)
        self._check_pairs(a, b)
        return (a * b).sum(-1)

    def directional_similarity(
        self,
        src_images: ImageInput,
        edited_images: ImageInput,
        src_texts: Sequence[str],
        tgt_texts: Sequence[str],
        min_norm: float = 1e-6,
    ) -> torch.Tensor:
        """Directional CLIP similarity ``cos(E_I(edited) − E_I(src), E_T(tgt) − E_T(src))``.

        As in StyleGAN-NADA and InstructPix2Pix, on L2-normalised embeddings.  The cosine
        is undefined when a direction vanishes (edited image identical to the source, or
        identical captions): such pairs return NaN (use :func:`~instdiff.metrics.summary.summarize`, which ignores
        NaNs, for averages).

        Args:
            src_images: Source images in [0, 1].
            edited_images: Edited images in [0, 1], one per source image.
            src_texts: Source caption per image.
            tgt_texts: Target caption per image.
            min_norm: Direction norms at or below this count as zero.

        Returns:
            (B,) float32 in [-1, 1] or NaN.

        Raises:
            ImageInputError: The images and captions differ in number.
        """
        d_img = self.embed_images(edited_images) - self.embed_images(src_images)
        d_txt = self.embed_texts(tgt_texts) - self.embed_texts(src_texts)
        self._check_pairs(d_img, d_txt)
        n_img, n_txt = d_img.norm(dim=-1), d_txt.norm(dim=-1)
        cos = (d_img * d_txt).sum(-1) / (n_img * n_txt).clamp_min(1e-12)
        degenerate = (n_img <= min_norm) | (n_txt <= min_norm)
        return torch.where(degenerate, torch.full_like(cos, math.nan), cos)

    def clip_accuracy(self, edited_images: ImageInput, src_texts: Sequence[str], tgt_texts: Sequence[str]) -> float:
        """Fraction of edited images closer (cosine) to the target text than to the source text.

        Ties count as failures.

        Args:
            edited_images: Edited images in [0, 1].
            src_texts: Source caption per image.
            tgt_texts: Target caption per image.

        Returns:
            The accuracy in [0, 1].

        Raises:
            ImageInputError: The images and captions differ in number.
        """
        img = self.embed_images(edited_images)
        src = self.embed_texts(src_texts)
        tgt = self.embed_texts(tgt_texts)
        self._check_pairs(img, src)
        self._check_pairs(img, tgt)
        hits = (img * tgt).sum(-1) > (img * src).sum(-1)
        return float(hits.double().mean())

    @staticmethod
    def _check_pairs(a: torch.Tensor, b: torch.Tensor) -> None:
        """Raise ImageInputError unless the two embedding batches pair up one to one."""
        if a.shape[0] != b.shape[0]:
            raise ImageInputError(f"paired inputs differ in length: {a.shape[0]} vs {b.shape[0]}")
