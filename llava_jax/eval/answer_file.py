"""Answer files: JSON lines appended a batch at a time, each batch flushed to disk, resumable.

A run killed mid-write can leave a torn last line (no newline, or not JSON). `read_answers` keeps the
complete lines and cuts the file back to them, so a resumed run appends after the last whole answer:
no duplicates, no lost question. Merged files are written aside and renamed into place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from llava_jax.errors import DataError


def read_answers(path: str, repair: bool = False) -> list[dict]:
    """The complete answer lines of `path` ([] when there is no file). A torn last line (no newline, or
    not JSON) is dropped, and with `repair` cut from the file; a bad line before it is an error."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    lines.pop()  # what follows the last newline: b"" or a torn line
    answers, good = [], 0
    for n, line in enumerate(lines, 1):
        try:
            answers.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # the last line, never finished
                break
            raise DataError(f"{path}:{n}: not a JSON answer line; delete the file or the line to start again") from None
        good += len(line) + 1
    if repair and good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return answers


def append_answers(path: str, answers: Iterable[dict]) -> None:
    """Appends one line per answer and flushes them to disk before returning."""
    text = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_answers(path: str, answers: Iterable[dict]) -> None:
    """Writes a whole answer file aside and renames it into place (readers never see half of it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for a in answers:
            f.write(json.dumps(a, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
