"""LLaVA data files: JSON (one list of records) or JSONL (one record a line), and a compact store."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def load_records(paths: Sequence[str]) -> list[Any]:
    """Records of LLaVA JSON (one list) and JSONL (one record a line) files, concatenated."""
    records: list[Any] = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                records += [json.loads(line) for line in f if line.strip()]
                continue
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records (or use .jsonl), got {type(data).__name__}")
        records += data
    return records


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
