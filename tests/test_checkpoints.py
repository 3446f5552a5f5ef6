"""llava-hf import (both key layouts, sharded files), orbax model directories, and bad input."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import llava_jax
from llava_jax.checkpoints.safetensors_io import CheckpointError
from llava_jax.convert import convert
from llava_jax.model.llava import ImageTokenMismatch
from tests import reference as R
from tests.reference import leaves


@pytest.fixture(scope="module")
def hf_model():
    return R.build_llava(R.llava_hf_config())


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    return R.save(hf_model, str(tmp_path_factory.mktemp("hf")))


def assert_same_params(a, b):
    la, lb = leaves(a), leaves(b)
    assert sorted(la) == sorted(lb)
    for k in la:
        assert la[k].dtype == lb[k].dtype and la[k].shape == lb[k].shape, k
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


@pytest.mark.parametrize("layout", ["hub", "v5"])
def test_key_layouts_load_identically(hf_model, hf_dir, tmp_path, layout):
    """The published layout and transformers 5's module names both load to the same parameters
    as what transformers' own save_pretrained writes."""
    directory = R.save(hf_model, str(tmp_path / layout), layout=layout)
    keys = load_file(os.path.join(directory, "model.safetensors")).keys()
    if layout == "hub":
        assert {"language_model.lm_head.weight", "vision_tower.vision_model.pre_layrnorm.weight"} <= set(keys)
    else:
        assert {"lm_head.weight", "model.vision_tower.pre_layrnorm.weight"} <= set(keys)
    # transformers itself reads the file back to the same model: the layout is real
    reread = transformers.LlavaForConditionalGeneration.from_pretrained(directory).eval()
    ids = np.random.default_rng(0).integers(1, 90, (1, 12))
    np.testing.assert_array_equal(R.reference_logits(reread, ids), R.reference_logits(hf_model, ids))
    assert_same_params(llava_jax.load(directory, dtype="float32"), llava_jax.load(hf_dir, dtype="float32"))


def test_sharded_safetensors(hf_model, hf_dir, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 2
    assert_same_params(llava_jax.load(str(tmp_path), dtype="float32"), llava_jax.load(hf_dir, dtype="float32"))


def test_parameters_take_the_requested_dtype(hf_dir):
    for dtype in ("bfloat16", "float32"):
        assert {v.dtype for v in leaves(llava_jax.load(hf_dir, dtype=dtype)).values()} == {np.dtype(dtype)}


def test_orbax_round_trip_is_exact(hf_dir, tmp_path):
    out = str(tmp_path / "converted")
    summary = convert(hf_dir, out, "float32", progress=False)
    assert summary["parameters"] == sum(p.numel() for p in R.build_llava(R.llava_hf_config()).parameters())
    original, restored = llava_jax.load(hf_dir, dtype="float32"), llava_jax.load(out, dtype="float32")
    assert restored.config == original.config
    assert_same_params(original, restored)
    ids = np.random.default_rng(0).integers(1, 90, (1, 12))
    np.testing.assert_array_equal(original.logits(ids), restored.logits(ids))
    with pytest.raises(FileExistsError):
        convert(hf_dir, out, "float32", progress=False)


def test_convert_command_line(hf_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "llava_jax.convert", f"--src={hf_dir}", f"--out={out}", "--dtype=bfloat16"],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["dtype"] == "bfloat16" and summary["parameters"] > 0
    assert {v.dtype for v in leaves(llava_jax.load(str(out), dtype="bfloat16")).values()} == {np.dtype("bfloat16")}


# -- bad input ------------------------------------------------------------------------------------


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def rewrite_tensors(directory, edit):
    path = os.path.join(directory, "model.safetensors")
    tensors = dict(load_file(path))
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        llava_jax.load("/nonexistent/llava")


def test_directory_without_weights(hf_dir, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(os.path.join(hf_dir, "config.json"), d)
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        llava_jax.load(str(d))


def test_not_a_llava_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not a LLaVA model"):
        llava_jax.load(str(tmp_path))


def test_missing_tensor_is_named(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "m")
    rewrite_tensors(d, lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.language_model\.layers\.1\.mlp\.up_proj"):
        llava_jax.load(d)


def test_unknown_tensor_is_named(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "u")
    rewrite_tensors(d, lambda t: t.update({"language_model.model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): language_model\.model\.layers\.0\.extra"):
        llava_jax.load(d)


def test_extra_layers_in_the_file_are_reported(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "l")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["text_config"]["num_hidden_layers"] = 2
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*layers\.2\."):
        llava_jax.load(d)


def test_wrong_shape_is_named(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "s")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["text_config"]["intermediate_size"] = 64
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"mlp\.(down|gate|up)_proj\.weight has shape .*expects"):
        llava_jax.load(d)


def test_truncated_file(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "t")
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        llava_jax.load(d)


def test_garbage_file(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "g")
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        llava_jax.load(d)


def test_index_naming_a_missing_shard(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(n for n in os.listdir(tmp_path) if n.endswith(".safetensors"))[0]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=f"names {shard}, which is missing"):
        llava_jax.load(str(tmp_path))


def test_image_token_count_mismatch(hf_dir):
    pipe = llava_jax.load(hf_dir, dtype="float32")
    n = pipe.config.tokens_per_tile
    pixels = np.zeros((1, 3, 28, 28), np.float32)
    too_few = np.r_[[1, 2], np.full(n - 1, R.IMAGE_TOKEN), [3]][None]
    with pytest.raises(ImageTokenMismatch, match=f"{n - 1} image tokens .* {n} features"):
        pipe.logits(too_few, pixels)
    with pytest.raises(ImageTokenMismatch, match=f"{n} image tokens .* 0 features"):
        pipe.logits(np.r_[[1], np.full(n, R.IMAGE_TOKEN)][None])
    with pytest.raises(ImageTokenMismatch, match=f"{n} image tokens .* {2 * n} features"):
        pipe.logits(np.r_[[1], np.full(n, R.IMAGE_TOKEN)][None], np.zeros((2, 3, 28, 28), np.float32))


def test_wrong_image_size(hf_dir):
    pipe = llava_jax.load(hf_dir, dtype="float32")
    with pytest.raises(ValueError, match=r"do not fit the vision tower: expected \[N, 3, 28, 28\]"):
        pipe.model.image_features(jax.numpy.zeros((1, 3, 32, 32)))
