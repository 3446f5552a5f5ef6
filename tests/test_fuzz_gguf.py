"""Fuzzing the GGUF reader (gguf_header.check_gguf_header + gguf-py, through GGUFFile).

Metadata round trips: whatever gguf-py's writer stores reads back equal. Damaged files (bytes
overwritten, huge counts and lengths planted, files cut short): CheckpointError, or a file whose
tensors all read as float32 arrays of their declared shapes, each case within the time bound.
"""

import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llava_jax.checkpoints.gguf_file import GGUFFile
from llava_jax.checkpoints.gguf_header import check_gguf_header
from llava_jax.errors import CheckpointError
from tests import gguf_reference
from tests.fuzzing import EXAMPLES, FUZZ, Tally

gguf = pytest.importorskip("gguf")  # the [gguf] extra, a third-party package

KEY = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
SCALARS = {
    "u8": (st.integers(0, 255), gguf.GGUFValueType.UINT8),
    "i32": (st.integers(-(2**31), 2**31 - 1), gguf.GGUFValueType.INT32),
    "u64": (st.integers(0, 2**64 - 1), gguf.GGUFValueType.UINT64),
    "f32": (st.floats(width=32, allow_nan=False), gguf.GGUFValueType.FLOAT32),
    "bool": (st.booleans(), gguf.GGUFValueType.BOOL),
    "str": (st.text(max_size=10), gguf.GGUFValueType.STRING),
}


@st.composite
def metadata_items(draw):
    """key -> (value, value type, array item type or None)."""
    items = {}
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(sorted(SCALARS)))
        values, vtype = SCALARS[kind]
        key = "k." + draw(KEY)
        if draw(st.booleans()):
            items[key] = (draw(st.lists(values, min_size=1, max_size=6)), gguf.GGUFValueType.ARRAY, vtype)  # (the writer refuses [])
        else:
            items[key] = (draw(values), vtype, None)
    return items


def write_gguf(path: str, items: dict, tensors: dict) -> None:
    writer = gguf.GGUFWriter(path, arch="llama")
    for key, (value, vtype, item_type) in items.items():
        if item_type is not None:
            writer.add_key_value(key, value, vtype, sub_type=item_type)
        else:
            writer.add_key_value(key, value, vtype)
    gguf_reference.finish(writer, tensors)


def base_tensors():
    rng = np.random.default_rng(0)
    q8 = gguf.quants.quantize(rng.normal(size=(2, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    return {"a.weight": rng.normal(size=(3, 4)).astype(np.float32), "b.weight": np.ones((5,), np.float16),
            "c.weight": (q8, gguf.GGMLQuantizationType.Q8_0)}  # fmt: skip


def read_everything(path: str):
    f = GGUFFile(path)
    for key in f.keys():
        array = f.read(key)
        assert array.dtype == np.float32 and array.shape == f.shape(key)
    return f


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return np.float32(a) == np.float32(b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_metadata_round_trips():
    tally = Tally("GGUF metadata round trip")

    @FUZZ
    @given(items=metadata_items())
    def case(items):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.gguf")
            write_gguf(path, items, base_tensors())
            f = tally.run(lambda: read_everything(path))
            assert not isinstance(f, CheckpointError), f
            for key, (value, _, _) in items.items():
                assert same(f.metadata[key], value), (key, f.metadata[key], value)

    case()
    tally.report(minimum=EXAMPLES // 2)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> bytes:
    path = str(tmp_path_factory.mktemp("gguf") / "valid.gguf")
    items = {"general.name": ("tiny", gguf.GGUFValueType.STRING, None),
             "tokenizer.ggml.tokens": (["<s>", "a", "bc"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
             "tokenizer.ggml.scores": ([0.0, -1.0, -2.0], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32),
             "llama.block_count": (2, gguf.GGUFValueType.UINT32, None)}  # fmt: skip
    write_gguf(path, items, base_tensors())
    read_everything(path)  # the undamaged file reads
    with open(path, "rb") as f:
        return f.read()


def length_fields(path: str) -> list[int]:
    """Offsets of the file's u64 lengths and counts: the tensor and key-value counts, each key's and string
    value's length, each array's item count, each tensor name's length."""
    reader = gguf.GGUFReader(path, "r")
    offsets = [8, 16]
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        offsets.append(field.offset)
        value = field.offset + 8 + len(name.encode()) + 4
        if field.types[0] == gguf.GGUFValueType.STRING:
            offsets.append(value)
        elif field.types[0] == gguf.GGUFValueType.ARRAY:
            offsets.append(value + 4)
            if field.types[1:] == [gguf.GGUFValueType.STRING]:
                offsets.append(value + 12)  # the first item's length
    offsets += [t.field.offset for t in reader.tensors]
    return offsets


def test_damaged_files(valid_file, tmp_path):
    """Bytes overwritten, lengths and counts replaced by huge values, files cut short."""
    tally = Tally("GGUF damaged headers")
    limit = min(len(valid_file), 640)  # the header (metadata and tensor infos) of the valid file
    (tmp_path / "valid.gguf").write_bytes(valid_file)
    lengths = length_fields(str(tmp_path / "valid.gguf"))
    assert len(lengths) >= 12

    @FUZZ
    @given(
        edits=st.lists(st.tuples(st.integers(0, limit - 1), st.binary(min_size=1, max_size=8)), max_size=3),
        huge=st.lists(st.tuples(st.sampled_from(lengths) | st.integers(4, limit - 8),
                                st.sampled_from([2**20, 2**31, 2**40, 2**60, 2**64 - 1])), max_size=2),
        truncate=st.integers(0, len(valid_file)) | st.just(0),
    )  # fmt: skip
    def case(edits, huge, truncate):
        data = bytearray(valid_file)
        for offset, blob in edits:
            data[offset : offset + len(blob)] = blob
        for offset, value in huge:
            data[offset : offset + 8] = struct.pack("<Q", value)
        if truncate:
            data = data[:-truncate]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "damaged.gguf")
            with open(path, "wb") as f:
                f.write(bytes(data))
            result = tally.run(lambda: read_everything(path))
            if isinstance(result, CheckpointError):
                assert path in str(result)

    case()
    tally.report(minimum=EXAMPLES // 2)


def test_header_check_refuses_before_allocating(tmp_path):
    """A count of 2**60 array items in a 100-byte file is refused at once (gguf-py alone would loop)."""
    body = struct.pack("<4sIQQ", b"GGUF", 3, 0, 1)
    key = b"tokenizer.ggml.tokens"
    body += struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 8, 2**60)
    path = tmp_path / "hostile.gguf"
    path.write_bytes(body + b"\0" * 40)
    with pytest.raises(CheckpointError, match=r"hostile.gguf.*item count of metadata 'tokenizer.ggml.tokens'"):
        check_gguf_header(str(path))
    with pytest.raises(CheckpointError, match="hostile.gguf"):
        GGUFFile(str(path))
