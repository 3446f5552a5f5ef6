"""Writes that appear under their name only once complete: written aside, flushed to disk, renamed.

    with atomic_file("answers.jsonl") as tmp:        # a path beside the target
        write_answers(tmp)
    with atomic_dir("out", marker="llava_jax.json") as tmp:
        write_everything_but_the_marker(tmp)
        write_marker(os.path.join(tmp, "llava_jax.json"))   # last: a reader trusts a directory with it

A writer that fails removes its partial copy; one killed midway leaves only `<target>.partial` beside
the target, never a target that looks complete. The next write of a directory refuses to start while
that leftover exists and says how to clear it (`check_no_leftover`), and readers name it when the
target is missing (`leftover_hint`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

from llava_jax.errors import OutputExistsError, UserError

PARTIAL_SUFFIX = ".partial"


class InterruptedWriteError(UserError):
    """A file or directory left behind by a writer that did not finish (killed, out of disk, an error)."""


def partial_path(target: str) -> str:
    """Where a write of `target` happens before it is renamed into place."""
    return os.path.abspath(target).rstrip(os.sep) + PARTIAL_SUFFIX


def check_no_leftover(target: str) -> None:
    """Raises InterruptedWriteError if an earlier write of `target` was interrupted and left its partial copy."""
    partial = partial_path(target)
    if os.path.lexists(partial):
        raise InterruptedWriteError(
            f"{partial} was left by an interrupted write of {target} (or another writer is still running); "
            f"delete it (rm -r {partial}) and run again"
        )


def check_new_dir(target: str) -> None:
    """Raises unless `target` can be written by atomic_dir: absent or an empty directory, with no leftover
    of an interrupted write beside it. Commands call it before spending time on what they will write."""
    if os.path.isdir(target) and os.listdir(target):
        raise OutputExistsError(f"{target} already exists and is not empty; choose a new output directory")
    if os.path.exists(target) and not os.path.isdir(target):
        raise OutputExistsError(f"{target} exists and is a file; choose a new output directory")
    check_no_leftover(target)


def leftover_hint(target: str) -> str:
    """' (an interrupted write left ...)' for error messages about a missing `target`; '' if nothing was left."""
    partial = partial_path(target)
    if os.path.lexists(partial):
        return f" ({partial} is the unfinished output of an interrupted write: delete it and write {target} again)"
    return ""


def fsync_path(path: str) -> None:
    """Flushes a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)


@contextlib.contextmanager
def atomic_file(target: str, overwrite: bool = True) -> Iterator[str]:
    """Yields a path beside `target` to write; on success it is fsynced and renamed onto `target`.

    On an exception the partial file is removed and the exception propagates; `target` is untouched.
    overwrite=False refuses (FileExistsError) a `target` that exists before the write starts.
    """
    if not overwrite and os.path.exists(target):
        raise OutputExistsError(f"{target} already exists; choose another output path or delete it")
    tmp = partial_path(target)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_path(os.path.dirname(os.path.abspath(target)))


@contextlib.contextmanager
def atomic_dir(target: str, marker: str | None = None, commit: bool = True) -> Iterator[str]:
    """Yields an empty directory beside `target` to fill; on success it is fsynced and renamed to `target`.

    target: must not exist, or be an empty directory (it is replaced).
    marker: a file the caller writes last inside the yielded directory; checked before the rename, so a
      directory without it never appears under `target`.
    commit: False on all but one process of a multi-process job (the others write into the directory
      that one creates; it renames the directory once every writer has finished).
    On an exception nothing is renamed and the partial directory is removed. A writer killed outright
    leaves `<target>.partial`: the next write refuses to start until it is deleted (check_no_leftover),
    since another writer may still be running.
    """
    tmp = partial_path(target)
    if commit:  # the other processes leave creating it to this one (orbax synchronises them)
        check_new_dir(target)
        os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        if commit:  # ours alone: a failure (or Ctrl-C) leaves nothing; only a killed process leaves tmp
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not commit:
        return
    if marker is not None and not os.path.isfile(os.path.join(tmp, marker)):
        raise RuntimeError(f"atomic_dir: {marker} was not written in {tmp}; the write is incomplete")
    _fsync_tree(tmp)
    if os.path.isdir(target):
        os.rmdir(target)  # empty (checked above); rename cannot replace a directory on every platform
    os.rename(tmp, target)
    fsync_path(os.path.dirname(os.path.abspath(target)))


def remove_partial(target: str) -> None:
    """Deletes what an interrupted write of `target` left (for callers that own the target exclusively)."""
    partial = partial_path(target)
    if os.path.isdir(partial) and not os.path.islink(partial):
        shutil.rmtree(partial)
    elif os.path.lexists(partial):
        os.remove(partial)
