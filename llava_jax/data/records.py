"""LLaVA data files: JSON (one list of records) or JSONL (one record a line), and a compact store."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from llava_jax.errors import DataError, MissingInputError


def load_records(paths: Sequence[str]) -> list[Any]:
    """Records of LLaVA JSON (one list) and JSONL (one record a line) files, concatenated.

    A missing or malformed file raises DataError naming the file (and the line of a JSONL file).
    """
    records: list[Any] = []
    for path in paths:
        if not os.path.isfile(path):
            raise MissingInputError(f"data file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                if path.endswith(".jsonl"):
                    for number, line in enumerate(f, 1):
                        if line.strip():
                            records.append(_parse(line, path, number))
                    continue
                data = _parse(f.read(), path)
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e}); LLaVA data files are UTF-8 JSON") from None
        except OSError as e:
            raise DataError(f"cannot read data file {path}: {e}") from e
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or use .jsonl), got {type(data).__name__}")
        records += data
    return records


def _parse(text: str, path: str, line: int | None = None) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        where = f"{path} line {line}" if line is not None else path
        raise DataError(f"{where} is not valid JSON ({e}); fix or regenerate the data file") from None


class RecordStore:
    """Records kept as one bytes blob of JSON, cheap to hold and to pickle into worker processes."""

    def __init__(self, records: Sequence[Any]):
        encoded = [json.dumps(r, ensure_ascii=False).encode() for r in records]
        self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self._blob = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Any:
        return json.loads(self._blob[self._offsets[index] : self._offsets[index + 1]])
