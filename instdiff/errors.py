"""The project's errors: one base class, user-facing by class.

Every error that ``instdiff``, ``pipelines`` or ``cluster`` raises on purpose derives from
:class:`InstdiffError`; its message says what was wrong and what is accepted, so a front end (the CLI, the
batch job's error rows, an HTTP endpoint) shows it as it is: the CLI prints one line and exits with code 2.
Anything else that escapes is a bug and keeps its traceback.

Each subclass also derives from the built-in exception that callers used to catch (``ValueError``,
``RuntimeError``, ``FileNotFoundError``), so ``except ValueError`` keeps working.

This module imports nothing of the project (a leaf: every other module may import it).
"""

from __future__ import annotations


class InstdiffError(Exception):
    """Base class of every error the project raises on purpose; the message is meant for the user."""


class ConfigError(InstdiffError, ValueError):
    """A configuration value or key that cannot be used; the message names the key and the accepted values."""


class TrainConfigError(ConfigError):
    """A training config (``configs/train/*.yaml``) that the trainer cannot use."""


class UsageError(InstdiffError, ValueError):
    """Command-line flags that are missing, out of range or do not fit together."""


class InputNotFoundError(InstdiffError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class StorageError(InstdiffError, OSError):
    """A file or store that exists but cannot be used: unreadable Parquet, unreachable endpoint, a folder
    where a file is needed (or the reverse)."""


class ImageInputError(InstdiffError, ValueError):
    """An image or mask that cannot be decoded or used (format, size, mode)."""


class EditInputError(InstdiffError, ValueError):
    """Input an editor cannot take (shapes, prompts, seeds, options)."""


class ModelLoadError(InstdiffError, RuntimeError):
    """A model bundle that cannot be loaded: missing folder, wrong layout, offline hub id, wrong channels."""


class DeviceError(ConfigError, ModelLoadError):
    """A device or dtype spec this machine cannot use (unknown name, CUDA or MPS absent); the message says what is
    accepted and what this machine has. Both a :class:`ConfigError` (the user's choice) and a
    :class:`ModelLoadError` (the model cannot be placed there), so either ``except`` catches it."""


class WeightsUnavailableError(InstdiffError, RuntimeError):
    """Metric weights (LPIPS trunk, Inception) that are neither cached nor downloadable."""


class PhraseError(InstdiffError, ValueError):
    """A shapes-world phrase the attribute scorer cannot parse."""


__all__ = [
    "ConfigError",
    "DeviceError",
    "EditInputError",
    "ImageInputError",
    "InputNotFoundError",
    "InstdiffError",
    "ModelLoadError",
    "PhraseError",
    "StorageError",
    "TrainConfigError",
    "UsageError",
    "WeightsUnavailableError",
]
