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


class ImageError(UserError, ValueError):
    """An image file cannot be read, or its content cannot be used (too large, unknown format)."""


class InputError(UserError, ValueError):
    """An input to the model does not fit it: image count, image tokens, a prompt longer than the context."""


class UnsupportedError(UserError, NotImplementedError):
    """A checkpoint or config uses a feature this project does not implement (names it and what is supported)."""


def one_line(error: BaseException) -> str:
    """`error: <message>` on one line (a message's own line breaks joined with ' | ')."""
    text = " | ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"error: {text or type(error).__name__}"


def report_user_errors(main):
    """Wraps an absl `main(argv)`: a UserError becomes one line on stderr and exit status 2; any other
    exception keeps its traceback (a bug in the project)."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except UserError as e:
            print(one_line(e), file=sys.stderr)
            sys.exit(2)

    return wrapped


def run_app(main) -> None:
    """`absl.app.run(main)` with user errors reported as one line and exit status 2 (report_user_errors)."""
    from absl import app

    app.run(report_user_errors(main))


class OutputExistsError(UserError, FileExistsError):
    """An output path that already holds something this command would overwrite."""


class MissingInputError(UserError, FileNotFoundError):
    """A path the user gave (checkpoint, data file, directory) does not exist."""


class UnknownNameError(ConfigError, KeyError):
    """A name (conversation template, preset) that is not among the known ones; the message lists them."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(UserError, ImportError):
    """An optional package a file needs is not installed (the message says which extra to install)."""
