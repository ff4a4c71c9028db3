"""A model's recommended editor settings: the ``instdiff.json`` a model folder may carry, read without weights.

The embedded shapes model ships one (its sampling steps and guidance, and in its ``instdiffedit`` section the
InstDiffEdit variant measured best on it); SD checkpoints and hub ids have none. The loader
(:func:`instdiff.models.load_pretrained`) stores the file as ``ModelBundle.defaults``; a job driver that must
not load the model (the batch job resolving ``method.preset``) reads the same file here.
:meth:`instdiff.config.EditConfig.for_model` turns it into an ``EditConfig``.

A leaf module: standard library and :mod:`instdiff.errors` only, so configuration code can import it cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instdiff.errors import ModelLoadError

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_MODEL_DIR = ASSETS / "shapes"
DEFAULT_MODEL = "default"
DEFAULTS_FILE = "instdiff.json"
BUILT_IN = ("tiny", "tiny-inpaint")  # random models built in code: no folder, no defaults


def read_defaults_file(folder: str | Path) -> dict[str, Any]:
    """The ``instdiff.json`` of a model folder, or ``{}`` when the folder has none.

    Args:
        folder: a local diffusers model folder.

    Returns:
        The parsed mapping (top-level ``steps``, ``guidance``, ``attention_downsample``; an ``instdiffedit``
        section of EditConfig fields).

    Raises:
        ModelLoadError: the file exists but is not a JSON object.
    """
    path = Path(folder).expanduser() / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read the model's recommended settings ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: must hold a JSON object of settings; got {type(data).__name__}")
    return data


def model_folder(spec: str | None) -> Path | None:
    """The local folder :func:`instdiff.models.load_bundle` would read for ``spec``, without loading anything.

    ``default`` is the embedded model's folder (``None`` when it does not ship: the loader then builds
    ``tiny``), ``tiny``/``tiny-inpaint`` are built in code (``None``), an existing local folder is itself, and a
    hub id has no local folder (``None``).

    Args:
        spec: a model spec (``None``: ``default``).

    Returns:
        The folder, or ``None``.
    """
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        return EMBEDDED_MODEL_DIR if (EMBEDDED_MODEL_DIR / "model_index.json").exists() else None
    if spec in BUILT_IN:
        return None
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def builds_tiny(spec: str | None) -> bool:
    """Whether the loader builds the random tiny model for ``spec`` (``tiny``, or ``default`` when the embedded
    model does not ship)."""
    spec = spec or DEFAULT_MODEL
    return spec in BUILT_IN or (spec == DEFAULT_MODEL and model_folder(spec) is None)


def model_defaults(spec: str | None) -> dict[str, Any]:
    """The recommended settings of the model that :func:`instdiff.models.load_bundle` would load for ``spec``.

    The ``instdiff.json`` of :func:`model_folder` (the loader reads the file from local folders only): ``{}``
    for the built-in tiny models, hub ids and folders without the file.

    Args:
        spec: a model spec (``None``: ``default``).

    Returns:
        The settings mapping (``{}`` without a file).

    Raises:
        ModelLoadError: the folder's ``instdiff.json`` is not a JSON object.
    """
    folder = model_folder(spec)
    return read_defaults_file(folder) if folder is not None else {}
