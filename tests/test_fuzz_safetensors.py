"""Fuzzing the safetensors reader: arbitrary and near-valid headers, damaged lengths, truncated files.

Every case ends in CheckpointError or a file whose every tensor reads back as exactly the bytes its
header points at, in the declared shape and dtype (what the `safetensors` package would return).
"""

import json
import os
import struct
import tempfile

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llava_jax.checkpoints.safetensors_io import DTYPES, SafetensorsFile, write_safetensors
from llava_jax.errors import CheckpointError
from tests.fuzzing import EXAMPLES, FUZZ, Tally

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
DIM = st.integers(0, 5) | st.sampled_from([-1, 2**31, 2**63, 2**64 + 3]) | st.just("3") | st.just(True)


@st.composite
def near_valid_headers(draw):
    """Headers shaped like real ones, with each field sometimes wrong: dtype, shape, offsets, extra keys."""
    header, offset = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(DTYPES)) | st.sampled_from(["F4", "", "Q4_K"]) | st.integers(0, 3))
        shape = draw(st.lists(st.integers(0, 4), max_size=3) | st.lists(DIM, max_size=3) | JSON)
        itemsize = np.dtype(DTYPES[dtype]).itemsize if dtype in DTYPES else 1
        count = int(np.prod(shape)) if isinstance(shape, list) and all(type(d) is int and 0 <= d < 8 for d in shape) else 1
        size = count * itemsize
        offsets = draw(st.just([offset, offset + size]) | st.lists(st.integers(-3, 400), max_size=3) | JSON)
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        for field in draw(st.sets(st.sampled_from(["dtype", "shape", "data_offsets"]), max_size=1)):
            del entry[field]
        header[draw(st.text(min_size=1, max_size=5)) + str(i)] = entry if draw(st.booleans()) else draw(JSON | st.just(entry))
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2) | JSON)
    return header


def file_bytes(header, payload: bytes, length_delta: int = 0, truncate: int = 0) -> bytes:
    blob = json.dumps(header).encode()
    data = struct.pack("<Q", max(0, len(blob) + length_delta)) + blob + payload
    return data[: len(data) - truncate] if truncate else data


def open_and_read_all(path: str, data: bytes):
    """Opens the file; when it opens, every tensor must read back as the exact bytes its header names."""
    f = SafetensorsFile(path)
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        for key in f.keys():
            info = header[key]
            start, end = info["data_offsets"]
            array = f.read(key)
            assert array.shape == tuple(info["shape"]) and array.dtype == np.dtype(DTYPES[info["dtype"]])
            assert array.tobytes() == data[8 + n + start : 8 + n + end]
        assert sorted(f.keys()) == sorted(k for k in header if k != "__metadata__")
        return "ok"
    finally:
        f.close()


def run_case(tally, data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        result = tally.run(lambda: open_and_read_all(path, data))
        if isinstance(result, CheckpointError):
            assert path in str(result)  # the message names the file


def test_arbitrary_json_headers():
    tally = Tally("safetensors arbitrary JSON headers")

    @FUZZ
    @given(header=JSON, payload=st.binary(max_size=64))
    def case(header, payload):
        run_case(tally, file_bytes(header, payload))

    case()
    tally.report(minimum=EXAMPLES // 2)


def test_near_valid_headers():
    tally = Tally("safetensors near-valid headers")

    @FUZZ
    @given(header=near_valid_headers(), payload=st.binary(max_size=300))
    def case(header, payload):
        run_case(tally, file_bytes(header, payload))

    case()
    tally.report(minimum=EXAMPLES // 2)


def test_damaged_real_files():
    """Files our writer (a valid layout) made, then given a wrong header length and/or cut short."""
    tally = Tally("safetensors damaged lengths and truncation")

    @FUZZ
    @given(
        shapes=st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=1, max_size=3),
        length_delta=st.integers(-20, 20) | st.sampled_from([2**40, 2**63, -(2**10)]),
        truncate=st.integers(0, 40),
    )
    def case(shapes, length_delta, truncate):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "x.safetensors")
            tensors = {f"t{i}": (s, np.float32, lambda s=s: np.arange(int(np.prod(s)), dtype=np.float32).reshape(tuple(s)))
                       for i, s in enumerate(shapes)}  # fmt: skip
            write_safetensors(path, tensors)
            with open(path, "rb") as f:
                data = bytearray(f.read())
        (n,) = struct.unpack("<Q", data[:8])
        data[:8] = struct.pack("<Q", max(0, min(n + length_delta, 2**64 - 1)))
        if truncate:
            data = data[:-truncate]
        run_case(tally, bytes(data))

    case()
    tally.report(minimum=EXAMPLES // 4)
