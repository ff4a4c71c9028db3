"""Stage 2 of the job (a Ray actor pool, one model replica per actor): edit batches of decoded rows.

The Ray Data shape for a model stage: a callable class that loads the model in ``__init__`` and runs under
``torch.inference_mode()`` in ``__call__``; its resources are set at the ``map_batches`` call. torch and the
editors are imported inside the methods, so importing this module (as the decode and finalize workers do
through the package) loads neither. The editors are looked up on :mod:`instdiff.editing` at call time.

Rows are named by their id in every log line (and, through :func:`instdiff.inputs.prompt_labels`, in the
editors' prompt warnings); a prompt longer than CLIP reads is noted on its row with the words cut.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from instdiff.config import EditConfig
from pipelines import schema as S
from pipelines.batch.rows import (
    DECODED_SCHEMA,
    EDITED_SCHEMA,
    error_text,
    join_notes,
    pack_mask,
    rgb_array,
    row_seed,
    with_carried,
)
from pipelines.config import ImageConfig, ModelConfig

if TYPE_CHECKING:  # torch/diffusers are imported where used: decode/finalize workers never load diffusers
    from instdiff import imageio

log = logging.getLogger(__name__)


def _ids(items: list[_Item], shown: int = 8) -> str:
    """The ids of ``items`` for a log line: up to ``shown`` of them, then how many more."""
    ids = ", ".join(str(it.row[S.ID]) for it in items[:shown])
    return ids + (f" and {len(items) - shown} more" if len(items) > shown else "")


@dataclass
class _Item:
    index: int  # row index in the batch
    row: dict[str, Any]
    seed: int
    prepared: imageio.Prepared | None  # None: generate the source
    original: np.ndarray | None = None  # (H, W, 3) uint8 as decoded; None: generate the source


class EditStage:
    """Callable class for ``map_batches``: loads the model once, then edits batches of decoded rows.

    Rows of one model-ready size are edited in one ``instdiff.editing.edit`` call; if that call fails, its
    rows are retried one by one, and a row that still fails gets ``status="error"`` with the reason.

    Args:
        model: which model to load (``instdiff.models.load_bundle``).
        method: the editing method and its parameters; ``method.seed`` is the job's base seed.
        image: how images are brought to the model's geometry.
        threads: torch CPU threads (``None``: torch's default).
    """

    def __init__(self, model: ModelConfig, method: EditConfig, image: ImageConfig, threads: int | None = None) -> None:
        import torch

        from instdiff.editing import size_multiple
        from instdiff.models import load_bundle

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        t0 = time.perf_counter()
        self.bundle = load_bundle(
            model.spec,
            device=model.device,
            dtype=model.dtype,
            local_files_only=model.local_files_only,
            inpaint=model.inpaint,
        )
        self.cfg = method
        self.image = image
        self.multiple = size_multiple(self.bundle)
        size = image.size
        self.size: int | None = self.bundle.resolution if size == "model" else size  # type: ignore[assignment]
        log.info(
            "edit stage: model %s on %s (%s) loaded in %.1f s; images to %s px, multiple of %d",
            self.bundle.name,
            self.bundle.device,
            str(self.bundle.dtype).replace("torch.", ""),
            time.perf_counter() - t0,
            self.size or "their own size",
            self.multiple,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Edit the ok rows of ``batch``; rows of one size (or all prompt-only rows) share an editor call.

        Args:
            batch: rows of :data:`~pipelines.batch.rows.DECODED_SCHEMA`.

        Returns:
            The same rows in :data:`~pipelines.batch.rows.EDITED_SCHEMA`: the edited image as (H, W, 3) uint8
            bytes and the predicted mask as packed bits at the input's size (the edit pasted onto the original
            pixels outside the mask, :func:`instdiff.composite.restore`), or ``status="error"``; columns of
            ``batch`` outside ``DECODED_SCHEMA`` (the job's ``carry``) follow unchanged.
        """
        import torch

        rows = batch.to_pylist()
        for row in rows:
            row.update(
                {
                    S.EDITED_RGB: None,
                    S.PRED_BITS: None,
                    S.METHOD: self.cfg.method.value,
                    S.MODEL: self.bundle.name,
                    S.SEED: row_seed(self.cfg.seed, row[S.ID]),
                    S.UNET_CALLS: None,
                    S.LATENCY_S: None,
                    S.BATCH_ROWS: None,
                }
            )
        groups: dict[tuple, list[_Item]] = collections.defaultdict(list)
        for i, row in enumerate(rows):
            if row[S.STATUS] != S.STATUS_OK:
                continue
            try:
                item = self._prepare(i, row)
            except Exception as exc:  # noqa: BLE001 - the row's error, not the batch's
                self._fail(row, exc)
                continue
            key = ("generate",) if item.prepared is None else item.prepared.array.shape
            groups[key].append(item)
        with torch.inference_mode():
            for items in groups.values():
                self._run(items)
        return with_carried(pa.Table.from_pylist(rows, schema=EDITED_SCHEMA), batch, DECODED_SCHEMA)

    def _prepare(self, index: int, row: dict[str, Any]) -> _Item:
        from instdiff import imageio

        seed = int(row[S.SEED])
        notes = self._truncation_notes(row)
        if row[S.GENERATE]:
            return _Item(index, row, seed, None)
        array = rgb_array(row[S.RGB], row[S.HEIGHT], row[S.WIDTH])
        prepared = imageio.fit_to_multiple(array, self.multiple, self.image.size_policy, self.size)
        notes += prepared.notes
        if notes:
            row[S.NOTES] = join_notes([row[S.NOTES] or "", *notes])
        return _Item(index, row, seed, prepared, array)

    def _truncation_notes(self, row: dict[str, Any]) -> list[str]:
        """Notes for the row's prompts that CLIP reads only in part (the words cut). (The editors' warning about
        them names the row by id, :func:`instdiff.inputs.prompt_labels`.)

        The target prompt always counts; the source prompt when the method reads it or it generates the input.
        """
        from instdiff.inputs import truncation

        columns = [S.TARGET_PROMPT]
        if self.cfg.needs_source_prompt or row[S.GENERATE]:
            columns.insert(0, S.SOURCE_PROMPT)
        notes = []
        for col in columns:
            cut = truncation(self.bundle, row[col] or "")
            if cut is not None:
                limit = self.bundle.tokenizer.model_max_length
                notes.append(f"{col} truncated: {cut[0]} tokens, CLIP reads {limit}; not read: {cut[1]!r}")
        return notes

    @staticmethod
    def _fail(row: dict[str, Any], exc: BaseException) -> None:
        row.update({S.STATUS: S.STATUS_ERROR, S.ERROR: error_text(exc), S.EDITED_RGB: None, S.PRED_BITS: None})

    def _run(self, items: list[_Item]) -> None:
        """Edit ``items`` together; on failure retry them one by one, then mark the rows that still fail."""
        try:
            self._edit(items)
        except Exception as exc:  # noqa: BLE001 - contained per row below
            if len(items) == 1:
                log.warning("row %s failed: %s", items[0].row[S.ID], error_text(exc))
                self._fail(items[0].row, exc)
                return
            log.warning("editor call on rows %s failed (%s); retrying them one by one", _ids(items), error_text(exc))
            self._release_memory()
            for item in items:
                self._run([item])

    def _release_memory(self) -> None:
        import torch

        if self.bundle.device.type == "cuda":
            torch.cuda.empty_cache()

    def _edit(self, items: list[_Item]) -> None:
        from instdiff import imageio
        from instdiff.composite import restore
        from instdiff.editing import edit, generate  # looked up at call time (tests replace them)
        from instdiff.inputs import prompt_labels

        t0 = time.perf_counter()
        seeds = [it.seed for it in items]
        sources = [it.row[S.SOURCE_PROMPT] or "" for it in items]
        targets = [it.row[S.TARGET_PROMPT] for it in items]
        with prompt_labels([it.row[S.ID] for it in items]):  # the editors' prompt messages name rows by id
            if items[0].prepared is None:
                images = generate(self.bundle, sources, steps=self.cfg.steps, guidance=self.cfg.guidance, seeds=seeds)
                generated = imageio.from_model_tensor(images)
            else:
                images = imageio.to_model_tensor([it.prepared.array for it in items])  # type: ignore[union-attr]
                generated = None
            result = edit(self.bundle, images, sources, targets, self.cfg, seeds=seeds)
        if generated is None:
            # each edit at its input's size, pasted onto the original pixels outside the mask (instdiff.composite)
            outputs = restore(result, [it.original for it in items], [it.prepared for it in items], self.cfg)
        else:  # generated sources are at the working size already
            outputs = list(zip(imageio.from_model_tensor(result.images), result.masks[:, 0].cpu().numpy(), strict=True))
        elapsed = time.perf_counter() - t0
        for j, it in enumerate(items):
            out, mask = outputs[j]
            if generated is not None:
                it.row.update({S.RGB: generated[j].tobytes(), S.HEIGHT: out.shape[0], S.WIDTH: out.shape[1]})
            it.row.update(
                {
                    S.EDITED_RGB: np.ascontiguousarray(out).tobytes(),
                    S.PRED_BITS: pack_mask(mask),
                    S.UNET_CALLS: float(result.unet_calls),
                    S.LATENCY_S: elapsed,
                    S.BATCH_ROWS: len(items),
                }
            )
