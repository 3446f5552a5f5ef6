"""Checks a GGUF file's header against its size before the `gguf` package reads it.

gguf-py's GGUFReader trusts the counts and lengths it reads: an array count of 2**60 loops for ever,
a string length past the end of the file fails with an IndexError, nested arrays recurse without
bound. `check_gguf_header` walks the same layout (magic, version, tensor and key-value counts, the
key-values, the tensor infos) with every count, length and offset compared with the bytes left in the
file before it is used, so a damaged or hostile file costs time and memory bounded by its size and
ends in a CheckpointError naming the file and the field.

Layout (GGUF v2/v3, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): "GGUF", u32 version,
u64 tensor_count, u64 kv_count; kv_count x (string key, u32 type, value); tensor_count x (string
name, u32 n_dims, n_dims x u64, u32 ggml type, u64 offset); padding to general.alignment; data.
A string is u64 length + UTF-8 bytes; an array is u32 item type + u64 count + items.
"""

from __future__ import annotations

import mmap
import os
import struct

from llava_jax.errors import CheckpointError

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
STRING, ARRAY, UINT32 = 8, 9, 4
MAX_NESTING = 4  # arrays of arrays (llama.cpp itself reads none)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32


def _min_size(value_type: int) -> int:
    """The fewest bytes a value of this type takes (a string: its length; an array: type and count)."""
    return {STRING: 8, ARRAY: 12}.get(value_type, _SCALAR_SIZES.get(value_type, 1))


class _Cursor:
    def __init__(self, path: str, data, order: str):
        self.path, self.data, self.order, self.offset = path, data, order, 0

    def fail(self, what: str):
        raise CheckpointError(f"{self.path} is not a valid GGUF file: {what} (at byte {self.offset} of "
                              f"{len(self.data)}); the file is truncated or corrupt: download or convert it again")  # fmt: skip

    @property
    def left(self) -> int:
        return len(self.data) - self.offset

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        if size > self.left:
            self.fail(f"{what} runs past the end of the file")
        values = struct.unpack_from(self.order + fmt, self.data, self.offset)
        self.offset += size
        return values[0] if len(values) == 1 else values

    def count(self, what: str, item_bytes: int) -> int:
        n = self.unpack("Q", what)
        if n * item_bytes > self.left:
            self.fail(f"{what} {n} needs at least {n * item_bytes} bytes but {self.left} are left")
        return n

    def string(self, what: str, decode: bool = False) -> str | None:
        n = self.count(f"length of {what}", 1)
        start, self.offset = self.offset, self.offset + n
        if not decode:
            return None
        try:
            return bytes(self.data[start : self.offset]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, value_type: int, what: str, depth: int = 0):
        """Skips one value; returns it when it is a u32 (for general.alignment)."""
        if value_type == STRING:
            return self.string(what)
        if value_type == ARRAY:
            if depth >= MAX_NESTING:
                self.fail(f"{what} nests arrays deeper than {MAX_NESTING}")
            item_type = self.unpack("I", f"item type of {what}")
            if item_type != ARRAY and item_type != STRING and item_type not in _SCALAR_SIZES:
                self.fail(f"{what} has unknown item type {item_type}")
            n = self.count(f"item count of {what}", _min_size(item_type))
            if item_type in _SCALAR_SIZES:
                self.offset += n * _SCALAR_SIZES[item_type]  # within the file: count() checked it
            else:
                for _ in range(n):  # each item at least _min_size bytes: n is bounded by the file size
                    self.value(item_type, what, depth + 1)
            return None
        if value_type not in _SCALAR_SIZES:
            self.fail(f"{what} has unknown value type {value_type}")
        fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[_SCALAR_SIZES[value_type]]
        return self.unpack(fmt, what)


def _quant_sizes() -> dict[int, tuple[int, int]]:
    """ggml type -> (block size, bytes per block), from the gguf package when it is installed."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        return {}
    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def check_gguf_header(path: str) -> None:
    """Raises CheckpointError unless `path`'s GGUF header is consistent with the file's size."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise CheckpointError(f"{path} is not a valid GGUF file: {size} bytes is shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check(path, data, size)


def _check(path: str, data, size: int) -> None:
    if data[:4] != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with the bytes b'GGUF')")
    (version,) = struct.unpack_from("<I", data, 4)
    order = "<" if version & 0xFFFF else ">"  # as gguf-py: a zero low half means the other byte order
    cur = _Cursor(path, data, order)
    cur.offset = 4
    version = cur.unpack("I", "version")
    if version not in (2, 3):
        cur.fail(f"version {version} (only GGUF versions 2 and 3 are read)")
    n_tensors = cur.unpack("Q", "tensor count")
    n_kv = cur.count("key-value count", 8 + 4 + 1)
    if n_tensors * (8 + 4 + 4 + 8) > cur.left:
        cur.fail(f"tensor count {n_tensors} does not fit in the {cur.left} bytes left")
    alignment, keys = DEFAULT_ALIGNMENT, set()
    for _ in range(n_kv):
        key = cur.string("a metadata key", decode=True)
        if key in keys:
            cur.fail(f"metadata key {key!r} appears twice")
        keys.add(key)
        value_type = cur.unpack("I", f"type of {key!r}")
        value = cur.value(value_type, f"metadata {key!r}")
        if key == "general.alignment":
            if value_type != UINT32 or not value or value & (value - 1):
                cur.fail(f"general.alignment must be a power of two stored as u32, got {value!r}")
            alignment = value
    quant_sizes = _quant_sizes()
    tensors, names = [], set()
    for _ in range(n_tensors):
        name = cur.string("a tensor name", decode=True)
        if name in names:
            cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.unpack("I", f"dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            cur.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [cur.unpack("Q", f"dimensions of tensor {name!r}") for _ in range(n_dims)]
        ggml_type = cur.unpack("I", f"type of tensor {name!r}")
        offset = cur.unpack("Q", f"offset of tensor {name!r}")
        tensors.append((name, dims, ggml_type, offset))
    data_start = -(-cur.offset // alignment) * alignment
    for name, dims, ggml_type, offset in tensors:
        n = 1
        for d in dims:
            n *= d
        if quant_sizes:
            if ggml_type not in quant_sizes:
                cur.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
            block, block_bytes = quant_sizes[ggml_type]
            if dims and dims[0] % block:
                cur.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of its type's block size {block}")
            n_bytes = n // block * block_bytes
        else:
            n_bytes = 0
        if data_start + offset + n_bytes > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({n_bytes} bytes at offset {offset}) runs past the end of the file "
                f"({size} bytes); the file is truncated: download or convert it again"
            )
