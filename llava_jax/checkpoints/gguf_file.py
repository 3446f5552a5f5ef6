"""One GGUF file (llama.cpp's format) as a TensorSource: metadata, and tensors dequantized to float32.

The file is memory-mapped by the `gguf` package's GGUFReader (the `gguf` extra); `read` touches only
the one tensor's bytes and returns a new float32 array, so memory holds the tensors being converted.
GGUF lists a tensor's dimensions innermost first (ggml's `ne`); `shape` and `read` give numpy order,
which for the files llama.cpp's converters write is the PyTorch order of the source tensor.
"""

from __future__ import annotations

import os
from typing import Any

import ml_dtypes
import numpy as np

from llava_jax.checkpoints.gguf_header import check_gguf_header
from llava_jax.errors import CheckpointError, MissingDependencyError, MissingInputError

GGUF_MAGIC = b"GGUF"


def is_gguf(path: str) -> bool:
    """Whether `path` is a file that starts with GGUF's magic bytes."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("reading GGUF files needs the `gguf` package: pip install -e '.[gguf]'") from None
    return gguf


class GGUFFile:
    """`keys()`, `shape(key)`, `read(key) -> float32 array`, and `metadata` (key -> Python value)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise MissingInputError(f"no GGUF file at {path}")
        if not is_gguf(path):
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with the bytes {GGUF_MAGIC!r})")
        gguf = _gguf()
        check_gguf_header(path)  # counts and lengths against the file size, before gguf-py trusts them
        try:
            reader = gguf.GGUFReader(path, "r")
            self.metadata: dict[str, Any] = {name: _value(field) for name, field in reader.fields.items()
                                             if not name.startswith("GGUF.")}  # fmt: skip
        except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as e:  # UnicodeDecodeError too
            raise CheckpointError(f"{path} is not a valid GGUF file ({type(e).__name__}: {e}); download or "
                                  "convert it again") from e  # fmt: skip
        self._gguf = gguf
        self._tensors = {t.name: t for t in reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise CheckpointError(f"{self.path} lacks the metadata key {key!r}")
        return self.metadata[key]

    def keys(self) -> list[str]:
        return list(self._tensors)

    def file_key(self, key: str) -> str:
        return f"{key} (in {self.path})"

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[key].shape.tolist()))

    def quant_type(self, key: str) -> str:
        return self._tensors[key].tensor_type.name

    def read_quantized(self, key: str, spec) -> tuple[np.ndarray, np.ndarray] | None:
        """A Q8_0 tensor as int8 32-blocks, a Q4_0 one as int4 32-blocks, when `spec` (a
        llava_jax.quant.QuantSpec) asks for that format: (q [rows, cols], scale [rows, cols / 32]
        float32) in numpy order with value = q * scale; else None. No float copy is made."""
        tensor = self._tensors[key]
        kind = (tensor.tensor_type.name, spec.bits, spec.block)
        if kind not in (("Q8_0", 8, 32), ("Q4_0", 4, 32)):
            return None
        rows, cols = self.shape(key)
        blocks = np.asarray(tensor.data).reshape(rows, cols // 32, -1)  # per block: f16 scale, then values
        scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        if spec.bits == 8:
            q = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
        else:  # 16 bytes: values 0-15 in the low nibbles, 16-31 in the high ones, offset by 8
            packed = blocks[..., 2:]
            q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.int8) - 8
            q = q.reshape(rows, cols).astype(ml_dtypes.int4)
        return q, scale

    def read(self, key: str) -> np.ndarray:
        """The tensor in numpy order, dequantized (F16, BF16, Q8_0, Q4_K, ...) to a new float32 array."""
        tensor = self._tensors[key]
        try:
            values = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"tensor {key} in {self.path} is stored as {tensor.tensor_type.name}, which the installed gguf "
                f"package cannot dequantize; re-quantize the model to a supported type (F32, F16, BF16, Q8_0, "
                "Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ*)"
            ) from None
        return np.array(values, dtype=np.float32).reshape(self.shape(key))


def _value(field) -> Any:
    """A metadata field as a Python str, number, bool, or list of them."""
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value
