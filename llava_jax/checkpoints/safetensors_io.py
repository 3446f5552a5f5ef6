"""Reads safetensors files (single or sharded) one tensor at a time, bfloat16 included.

The `safetensors` package's numpy backend cannot represent bfloat16, so the format is read directly:
an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
raw little-endian bytes. Each tensor is read with one positioned read, so memory holds only the
tensors being converted (a memory map would keep every page it touched resident).
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from llava_jax.atomic import atomic_file
from llava_jax.errors import CheckpointError  # noqa: F401  (re-exported: readers import it from here)
from llava_jax.json_file import read_json_object

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}  # fmt: skip
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # as the safetensors package: a larger header is not read into memory


MAX_DIMS, MAX_DIM = 8, 1 << 48  # far beyond any real tensor; keeps numpy's allocation checks out of reach


def _is_count(value, limit: int = 1 << 63) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


class SafetensorsFile:
    """One .safetensors file: `keys()`, `shape(key)`, `read(key) -> np.ndarray`."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"cannot open safetensors file {path}: {e}") from e
        size = os.fstat(self._fd).st_size
        try:
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} exceeds the file size {size} or the {MAX_HEADER_BYTES}-byte limit")
            header = json.loads(os.pread(self._fd, n, 8))
        except (struct.error, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
            self.close()
            raise CheckpointError(f"{path} is not a valid safetensors file (bad header: {e}); download it again") from None
        self._header, self._data_start = header, 8 + n
        try:
            self._check_header(size)
        except CheckpointError:
            self.close()
            raise

    def _check_header(self, size: int) -> None:
        """Every entry {dtype, shape, data_offsets} well-formed and within the file (as the safetensors
        package validates: offsets contiguous, not overlapping, covering the data)."""
        header, path = self._header, self.path
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not isinstance(metadata, dict):
            raise CheckpointError(f"{path}: the safetensors __metadata__ is not an object")
        spans = []
        for key, info in header.items():
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
                raise CheckpointError(f"{path}: tensor {key!r} lacks dtype, shape or data_offsets in the header")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r}; known: {sorted(DTYPES)}")
            if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d, MAX_DIM) for d in shape):
                raise CheckpointError(f"{path}: tensor {key!r} has shape {shape!r}, not a list of at most {MAX_DIMS} "
                                      "non-negative ints")  # fmt: skip
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
                raise CheckpointError(f"{path}: tensor {key!r} has data_offsets {offsets!r}, not two non-negative ints")
            start, end = offsets
            expected = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
            if end - start != expected or self._data_start + end > size:
                raise CheckpointError(f"{path}: tensor {key!r} is truncated or corrupt (its data_offsets {offsets} "
                                      f"do not hold shape {shape} of {dtype} in a file of {size} bytes)")  # fmt: skip
            spans.append((start, end, key))
        position = 0
        for start, end, key in sorted(spans):
            if start != position:
                raise CheckpointError(f"{path}: tensor {key!r} starts at byte {start} of the data, expected {position} "
                                      "(tensors overlap or leave gaps): the file is corrupt")  # fmt: skip
            position = end

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def read(self, key: str) -> np.ndarray:
        info = self._header[key]
        start, end = info["data_offsets"]
        out = np.empty(info["shape"], DTYPES[info["dtype"]])
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < end - start:
            got = os.preadv(self._fd, [view[done:]], self._data_start + start + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file while reading {key}")
            done += got
        return out

    def close(self):
        os.close(self._fd)


class SafetensorsCheckpoint:
    """All tensors of a directory: `model.safetensors`, or the shards its index names, or every
    `*.safetensors` file there. `keys()`, `shape(key)`, `read(key)`."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise CheckpointError(f"checkpoint directory {directory} does not exist")
        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v == os.path.basename(v) and v for k, v in weight_map.items()
            ):  # fmt: skip
                raise CheckpointError(f"{index} has no weight_map object of tensor name -> file name in {directory}")
            names = sorted(set(weight_map.values()))
        else:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
            weight_map = None
        if not names:
            raise CheckpointError(f"no .safetensors files in {directory}")
        for name in names:
            if not os.path.exists(os.path.join(directory, name)):
                raise CheckpointError(f"{INDEX_FILE} in {directory} names {name}, which is missing")
        self.files = {name: SafetensorsFile(os.path.join(directory, name)) for name in names}
        self._where: dict[str, SafetensorsFile] = {}
        for name, f in self.files.items():
            for key in f.keys():
                if key in self._where:
                    raise CheckpointError(f"tensor {key} appears in more than one file of {directory}")
                if weight_map is not None and weight_map.get(key) != name:
                    raise CheckpointError(f"tensor {key} is in {name} but {INDEX_FILE} says {weight_map.get(key)}")
                self._where[key] = f
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self._where))
            if absent:
                raise CheckpointError(f"{INDEX_FILE} lists tensors that no shard holds: {absent[:5]}")

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)

    def close(self):
        for f in self.files.values():
            f.close()


def write_safetensors(path: str, tensors, metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` ({key: (shape, dtype, produce)} where produce() -> np.ndarray) to `path`.

    Arrays are produced and written one at a time, so a file larger than memory can be written.
    The file appears under its name only once complete.
    """
    names = {np.dtype(v): k for k, v in DTYPES.items()}
    header, offset = {}, 0
    for key, (shape, dtype, _) in tensors.items():
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": names[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps tensor data 8-byte aligned
    with atomic_file(path) as partial, open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, (shape, dtype, produce) in tensors.items():
            array = np.asarray(produce(), dtype=dtype, order="C")  # (ascontiguousarray makes scalars [1])
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {key}: produced shape {array.shape}, declared {tuple(shape)}")
            f.write(array.tobytes())
