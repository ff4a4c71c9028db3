"""Dataset adapters: public editing benchmarks turned into the instdiff input schema (``pipelines.schema``).

Every adapter is a function that returns a ``pyarrow.Table`` in :data:`pipelines.schema.INPUT_SCHEMA`
(``id, image, source_prompt, target_prompt, mask, dataset, meta``); ``meta`` is JSON text holding the
original fields of the row, so nothing of the source format is lost. Paths may be local or ``s3://``
(through :mod:`pipelines.storage`; S3 settings from a :class:`~pipelines.storage.StorageConfig` or the
usual ``AWS_*`` variables). :func:`read_dataset` reads any of :data:`FORMATS` by name.

Formats (one module each):

* ``editing-mask`` (:mod:`~pipelines.datasets.editing_mask`, :func:`read_editing_mask`): InstDiffEdit's
  Editing-Mask, a list file with ``id <> caption <> source phrase <> target phrase`` (Imagen rows) and
  ``file <> source class <> target class`` (ImageNet rows), images in ``image/``, ground-truth masks in
  ``mask/`` (same stem).
* ``flexit`` (:mod:`~pipelines.datasets.flexit`, :func:`read_flexit`): ImageNet editing as in FlexIT, an
  image folder (flat or per-synset sub-folders) and a list of ``file <> source class <> target class`` (or
  CSV/TSV with those 3 fields).
* ``prompt-pairs`` (:mod:`~pipelines.datasets.prompt_pairs`, :func:`read_prompt_pairs`): InstructPix2Pix /
  LAION prompt pairs, JSONL objects with ``input``, ``edit`` and ``output`` captions; rows have no image
  (``image`` is null): fill it with :func:`generate_sources`, or let the job's ``fisedit`` method generate it.
* ``listing`` (:mod:`~pipelines.datasets.listing`, :func:`read_listing`): a generic CSV or JSONL with
  ``image_path, source_prompt, target_prompt`` and optional ``mask_path``, ``id``, ``dataset`` (other
  columns go to ``meta``).
* ``hf`` (:mod:`~pipelines.datasets.hf`, :func:`read_hf`): Hugging Face ``datasets`` Parquet (Image structs,
  ClassLabel names); InstructPix2Pix and other layouts recognised (:data:`HF_LAYOUTS`), any other mapped with
  ``columns`` and prompt rules.
* ``img2dataset`` (:mod:`~pipelines.datasets.img2dataset`, :func:`read_img2dataset`): an img2dataset output
  folder (webdataset tar shards with their metadata Parquet, or parquet shards); captions become source
  prompts, target prompts come from a rule or a joined file, failed downloads are kept as rows with ``error``.

Shared machinery: :mod:`~pipelines.datasets.rows` (rows, the bad-row policy, the table),
:mod:`~pipelines.datasets.files` (finding and reading files), :mod:`~pipelines.datasets.images` (image
headers, mask PNGs), :mod:`~pipelines.datasets.records` (prompt rules, joined prompt files, image cells),
:mod:`~pipelines.datasets.prompts` (class prompts, phrase replacement). The ``instdiff import-dataset``
command is :mod:`~pipelines.datasets.import_cmd`.

Bad rows: a row is *bad* when a file it names is missing, unreadable or a decompression bomb, a mask cannot be
decoded, a field is missing or empty, or a list line has the wrong number of fields (any problem with one record
or one file is a bad row; a problem with the source as a whole is one :class:`DatasetError` or
:class:`~instdiff.errors.StorageError`). The policy is chosen with ``on_bad_row``:

* ``"error"`` (default): nothing is returned; :class:`DatasetError` counts the bad rows and names the first
  few (line and reason). A benchmark should never silently run on a subset.
* ``"skip"``: bad rows are left out; a warning logs how many and the first few reasons, and the table's
  schema metadata (:data:`SKIPPED_KEY`, read by :func:`skipped_rows`) holds the count.

Masks are stored as 8-bit PNG (255 = edit). A mask whose size differs from its image is resized (nearest) to
the image's size; ``meta["notes"]`` says so. Images are carried as their original encoded bytes.
"""

from __future__ import annotations

from pipelines.datasets.editing_mask import EDITING_MASK_LISTS, read_editing_mask
from pipelines.datasets.files import LIST_SEPARATOR
from pipelines.datasets.flexit import FLEXIT_IMAGE_DIRS, FLEXIT_LISTS, read_flexit
from pipelines.datasets.formats import FORMATS, read_dataset
from pipelines.datasets.hf import HF_LAYOUTS, read_hf
from pipelines.datasets.images import image_size, mask_png
from pipelines.datasets.img2dataset import read_img2dataset
from pipelines.datasets.import_cmd import register, run_import
from pipelines.datasets.listing import LISTING_OPTIONAL, LISTING_REQUIRED, read_listing
from pipelines.datasets.prompt_pairs import PROMPT_PAIR_FIELDS, generate_sources, read_prompt_pairs
from pipelines.datasets.prompts import DEFAULT_CLASS_TEMPLATE, class_prompt, replace_phrase
from pipelines.datasets.rows import SKIPPED_KEY, BadRowPolicy, DatasetError, Row, rows_to_table, skipped_rows
from pipelines.storage import write_table

__all__ = [
    "DEFAULT_CLASS_TEMPLATE",
    "EDITING_MASK_LISTS",
    "FLEXIT_IMAGE_DIRS",
    "FLEXIT_LISTS",
    "FORMATS",
    "HF_LAYOUTS",
    "LISTING_OPTIONAL",
    "LISTING_REQUIRED",
    "LIST_SEPARATOR",
    "PROMPT_PAIR_FIELDS",
    "SKIPPED_KEY",
    "BadRowPolicy",
    "DatasetError",
    "Row",
    "class_prompt",
    "generate_sources",
    "image_size",
    "mask_png",
    "read_dataset",
    "read_editing_mask",
    "read_flexit",
    "read_hf",
    "read_img2dataset",
    "read_listing",
    "read_prompt_pairs",
    "register",
    "replace_phrase",
    "rows_to_table",
    "run_import",
    "skipped_rows",
    "write_table",
]
