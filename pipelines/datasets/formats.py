"""The format registry: each public dataset format's name and the adapter that reads it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pipelines.datasets.editing_mask import read_editing_mask
from pipelines.datasets.flexit import read_flexit
from pipelines.datasets.hf import read_hf
from pipelines.datasets.img2dataset import read_img2dataset
from pipelines.datasets.listing import read_listing
from pipelines.datasets.prompt_pairs import read_prompt_pairs
from pipelines.datasets.rows import DatasetError

_READERS: dict[str, Callable[..., pa.Table]] = {
    "editing-mask": read_editing_mask,
    "flexit": read_flexit,
    "prompt-pairs": read_prompt_pairs,
    "listing": read_listing,
    "hf": read_hf,
    "img2dataset": read_img2dataset,
}
FORMATS = tuple(_READERS)  # the accepted format names, in the order they are documented


def read_dataset(fmt: str, src: str, **kw: Any) -> pa.Table:
    """Read a dataset with the adapter registered for its format.

    Args:
        fmt: one of :data:`FORMATS`.
        src: the dataset root folder (``editing-mask``, ``flexit``, ``img2dataset``), file (``prompt-pairs``,
            ``listing``), or Parquet file or folder (``hf``).
        **kw: the adapter's other arguments.

    Returns:
        The table in :data:`pipelines.schema.INPUT_SCHEMA`.

    Raises:
        DatasetError: an unknown format, or whatever the adapter raises.
    """
    if fmt not in _READERS:
        raise DatasetError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    return _READERS[fmt](src, **kw)
