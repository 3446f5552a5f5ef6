"""The errors a user can cause, one class per kind of input. Each message names the file or input and the fix.

Commands (`infer.py`, `train.py`, `python -m llava_jax.convert`, `python -m llava_jax.eval`) report a
`UserError` as one line and exit with status 2; anything else is a bug in the project and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave: a path, a file, a config field, an input."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


class ConfigError(UserError, ValueError):
    """A configuration field is missing or has a value that cannot work (names the field and the fix)."""


class DataError(UserError, ValueError):
    """A data file (LLaVA JSON/JSONL, question or answer file, image folder) is missing or malformed."""
