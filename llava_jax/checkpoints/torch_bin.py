"""PyTorch `.bin` weights (the original LLaVA-1.5 releases and CLIP ship them), read without running pickle code.

`pytorch_model.bin`, or the shards `pytorch_model.bin.index.json` names, are opened only with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers. torch is
imported when such a file is met (it is a test extra, not a core dependency). Files are memory-mapped
where their format allows, so a shard costs memory only for the tensors read from it.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

from llava_jax.checkpoints.safetensors_io import INDEX_FILE as SAFETENSORS_INDEX
from llava_jax.checkpoints.safetensors_io import CheckpointError, SafetensorsCheckpoint
from llava_jax.errors import MissingDependencyError
from llava_jax.json_file import read_json_object

BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(
            "reading PyTorch .bin weights needs torch: `pip install torch` (CPU is enough; it is in the [test] "
            "extra), or convert the weights to safetensors first"
        ) from None
    return torch


def to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor -> numpy array of the same dtype (bfloat16 as ml_dtypes.bfloat16)."""
    torch = _torch()
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class TorchBinCheckpoint:
    """All tensors of `pytorch_model.bin` or of the shards its index names: `keys()`, `shape(key)`, `read(key)`."""

    def __init__(self, directory: str):
        index = os.path.join(directory, BIN_INDEX)
        if os.path.isfile(index):
            self._weight_map: dict[str, str] | None = read_json_object(index).get("weight_map")
            if not isinstance(self._weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v and v == os.path.basename(v)
                for k, v in self._weight_map.items()
            ):  # fmt: skip
                raise CheckpointError(f"{index} has no weight_map object of tensor name -> file name")
            names = sorted(set(self._weight_map.values()))
        elif os.path.isfile(os.path.join(directory, BIN_FILE)):
            self._weight_map, names = None, [BIN_FILE]
        else:
            raise CheckpointError(f"no {BIN_FILE} or {BIN_INDEX} in {directory}")
        for name in names:
            if not os.path.isfile(os.path.join(directory, name)):
                raise CheckpointError(f"{BIN_INDEX} in {directory} names {name}, which is missing")
        self.directory = directory
        self._files: dict[str, dict] = {}
        if self._weight_map is None:
            self._weight_map = {key: BIN_FILE for key in self._load(BIN_FILE)}

    @classmethod
    def from_file(cls, path: str) -> "TorchBinCheckpoint":
        """One .bin file of any name (e.g. the original LLaVA's mm_projector.bin)."""
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} does not exist")
        self = cls.__new__(cls)
        self.directory, name = os.path.split(os.path.abspath(path))
        self._files = {}
        self._weight_map = {key: name for key in self._load(name)}
        return self

    def _load(self, name: str) -> dict:
        if name not in self._files:
            torch = _torch()
            path = os.path.join(self.directory, name)
            try:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):  # files in the legacy (pre-zip) format cannot be mapped
                        raise
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 (torch raises many kinds: unpickling, zip, EOF)
                raise CheckpointError(
                    f"cannot read {path} as PyTorch weights ({type(e).__name__}: {e}); only files of tensors load "
                    "(torch.load with weights_only=True runs no pickled code)"
                ) from e
            if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
                raise CheckpointError(f"{path} does not hold a state dict of tensors")
            self._files[name] = state
        return self._files[name]

    def _tensor(self, key: str):
        name = self._weight_map[key]
        state = self._load(name)
        if key not in state:
            raise CheckpointError(f"{BIN_INDEX} in {self.directory} puts {key} in {name}, which lacks it")
        return state[key]

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def read(self, key: str) -> np.ndarray:
        return to_numpy(self._tensor(key))


def has_weights(directory: str) -> bool:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return any(n.endswith(".safetensors") or n in (BIN_FILE, BIN_INDEX) for n in names)


def open_weights(directory: str):
    """The weights of a directory: safetensors when it has any, else PyTorch .bin files."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    if SAFETENSORS_INDEX in names or any(n.endswith(".safetensors") for n in names):
        return SafetensorsCheckpoint(directory)
    if BIN_FILE in names or BIN_INDEX in names:
        return TorchBinCheckpoint(directory)
    raise CheckpointError(f"no weights in {directory}: expected .safetensors files or {BIN_FILE} / {BIN_INDEX}")
