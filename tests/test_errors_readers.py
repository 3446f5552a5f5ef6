"""Every reader turns a damaged file into the project's error naming the file (issue 14's list)."""

import json
import os
import shutil
import struct
import zlib

import pytest

import llava_jax
from llava_jax.checkpoints.safetensors_io import SafetensorsFile
from llava_jax.checkpoints.torch_bin import TorchBinCheckpoint
from llava_jax.convert import convert
from llava_jax.data.image import ImageProcessor, load_image
from llava_jax.data.records import load_records
from llava_jax.data.tokenizer import load_tokenizer
from llava_jax.errors import CheckpointError, DataError, ImageError, MissingInputError, UnsupportedError, UserError
from tests import reference as R


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, sp_model_proto):
    from llava_jax.data import tiny_tokenizer

    directory = R.save(R.build_llava(R.llava_hf_config()), str(tmp_path_factory.mktemp("hf")))
    tiny_tokenizer.write_llava_hf_tokenizer(directory, sp_model_proto)
    return directory


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("converted") / "model")
    convert(hf_dir, out, "float32", progress=False)
    return out


def damaged_copy(src, dst, name, content: bytes | None = None, truncate: bool = False) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, name)
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        with open(path, "wb") as f:
            f.write(content)
    return str(dst)


def load_fails(path, error=CheckpointError, names=None, **kwargs):
    with pytest.raises(error) as info:
        llava_jax.load(path, dtype="float32", **kwargs)
    assert isinstance(info.value, UserError)
    assert names in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "preprocessor_config.json"])
def test_truncated_json_names_the_file(hf_dir, tmp_path, name):
    if name == "preprocessor_config.json":
        shutil.copytree(hf_dir, tmp_path / "d")
        with open(tmp_path / "d" / name, "w") as f:
            json.dump({"crop_size": {"height": 28, "width": 28}, "size": {"shortest_edge": 28}, "image_mean": [0.5] * 3}, f)
        d = str(tmp_path / "d")
        with open(os.path.join(d, name), "r+b") as f:
            f.truncate(20)
    else:
        d = damaged_copy(hf_dir, tmp_path / "d", name, truncate=True)
    message = load_fails(d, names=os.path.join(d, name))
    assert "not valid JSON" in message and "truncated or corrupt" in message


def test_config_json_a_list_or_missing_fields(hf_dir, tmp_path):
    d = damaged_copy(hf_dir, tmp_path / "list", "config.json", b"[1, 2]")
    assert "holds a JSON list" in load_fails(d, names="config.json")
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    config["text_config"]["num_attention_heads"] = "six"
    d = damaged_copy(hf_dir, tmp_path / "field", "config.json", json.dumps(config).encode())
    assert "configuration field is missing or malformed" in load_fails(d, names="config.json")


def test_unsupported_feature_is_a_user_error(hf_dir, tmp_path):
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    config["projector_hidden_act"] = "relu"
    d = damaged_copy(hf_dir, tmp_path / "relu", "config.json", json.dumps(config).encode())
    load_fails(d, UnsupportedError, names="projector_hidden_act 'relu' is not supported")


def test_truncated_index(hf_dir, tmp_path):
    shutil.copytree(hf_dir, tmp_path / "d")
    index = tmp_path / "d" / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model.safe')
    load_fails(str(tmp_path / "d"), names=str(index))
    index.write_text('{"weight_map": ["model.safetensors"]}')
    load_fails(str(tmp_path / "d"), names="no weight_map object")
    index.write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    load_fails(str(tmp_path / "d"), names="no weight_map object")


def safetensors_bytes(header, payload=b"", length=None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + payload


@pytest.mark.parametrize(
    "data,message",
    [
        (safetensors_bytes([1, 2]), "header is a JSON list"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [2]}}), "lacks dtype, shape or data_offsets"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "truncated"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, length=2**62), "header length"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}), "not a list"),
        (safetensors_bytes({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}), "unsupported dtype"),
        (safetensors_bytes({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                            "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\0" * 3), "overlap"),
        (b"\x05\x00", "bad header"),
    ],
)  # fmt: skip
def test_damaged_safetensors(tmp_path, data, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=message) as info:
        SafetensorsFile(str(path))
    assert str(path) in str(info.value)


def test_damaged_safetensors_in_a_checkpoint(hf_dir, tmp_path):
    d = damaged_copy(hf_dir, tmp_path / "d", "model.safetensors", truncate=True)
    load_fails(d, names=os.path.join(d, "model.safetensors"))


def test_damaged_bin(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a zip at all")
    with pytest.raises(CheckpointError, match="cannot read .*pytorch_model.bin as PyTorch weights"):
        TorchBinCheckpoint(str(tmp_path))
    (tmp_path / "pytorch_model.bin.index.json").write_text('{"weight_map": 3}')
    with pytest.raises(CheckpointError, match="pytorch_model.bin.index.json has no weight_map"):
        TorchBinCheckpoint(str(tmp_path))


def test_damaged_gguf(tmp_path):
    from llava_jax.checkpoints.gguf_file import GGUFFile

    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 2**40))
    with pytest.raises(CheckpointError, match=r"model.gguf is not a valid GGUF file: key-value count"):
        GGUFFile(str(path))
    with pytest.raises(MissingInputError, match="no GGUF file"):
        GGUFFile(str(tmp_path / "absent.gguf"))


@pytest.mark.parametrize("name", ["llava_jax.json", "params/_METADATA", "params/manifest.ocdbt"])
def test_damaged_model_directory(converted, tmp_path, name):
    d = damaged_copy(converted, tmp_path / "d", name, truncate=True)
    where = os.path.join(d, name) if name == "llava_jax.json" else os.path.join(d, "params")
    message = load_fails(d, names=where)
    assert "convert" in message  # says what to do


def test_damaged_tokenizer_model(hf_dir, tmp_path):
    d = damaged_copy(hf_dir, tmp_path / "d", "tokenizer.model", b"\xff\xfe garbage \x00" * 10)
    with pytest.raises(CheckpointError, match="tokenizer.model is not a sentencepiece model"):
        load_tokenizer(d)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (no pixel data): what Pillow's size check sees first."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_one_line(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(20000, 20000))
    with pytest.raises(ImageError, match=r"cannot read image .*huge.png.*decompression bomb.*MAX_IMAGE_PIXELS"):
        load_image(str(path))
    with pytest.raises(ImageError, match="image file not found"):
        load_image(str(tmp_path / "absent.png"))


def test_image_processor_with_malformed_fields(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": "big", "crop_size": [1]}))
    config = llava_jax.LlavaConfig()
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(str(tmp_path), config)


def test_llava_data_files(tmp_path):
    (tmp_path / "a.json").write_text('[{"id": 1, "conversations": [')
    with pytest.raises(DataError, match=r"a.json is not valid JSON"):
        load_records([str(tmp_path / "a.json")])
    (tmp_path / "b.jsonl").write_text('{"id": 1}\n{"id": 2\n')
    with pytest.raises(DataError, match=r"b.jsonl line 2 is not valid JSON"):
        load_records([str(tmp_path / "b.jsonl")])
    (tmp_path / "c.json").write_bytes(b'["\xff"]')
    with pytest.raises(DataError, match=r"c.json is not UTF-8"):
        load_records([str(tmp_path / "c.json")])
    with pytest.raises(MissingInputError, match="does not exist"):
        load_records([str(tmp_path / "absent.json")])
