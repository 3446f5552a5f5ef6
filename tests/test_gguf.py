"""llama.cpp GGUF pairs: logits against transformers, quantized weights, the tokenizer, errors, infer.py.

The pairs are written by tests/gguf_reference.py from tiny random llava-hf models, following llama.cpp's
converters (its own Q/K permutation, names, dropped layers, float16 tensors) independently of the
reader under test.
"""

import json
import os
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

import llava_jax
from llava_jax.checkpoints.safetensors_io import CheckpointError
from llava_jax.data import tiny_tokenizer
from llava_jax.data.gguf_tokenizer import tokenizer_from_gguf
from llava_jax.data.tokenizer import load_tokenizer
from llava_jax.model import anyres
from tests import reference as R
from tests.reference import image, leaves, sequence
from tests.conftest import ADDED_TOKENS
from tests.gguf_reference import add_sentencepiece_vocab, mmproj_contents, round_f16_tensors, text_contents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"wide": (20, 70), "tall": (90, 30), "huge": (200, 150), "square": (50, 50)}  # (h, w)


def write_pair(directory, text, mmproj):
    os.makedirs(directory, exist_ok=True)
    return text.write(os.path.join(directory, "model.gguf")), mmproj.write(os.path.join(directory, "mmproj-model-f16.gguf"))


@pytest.fixture(scope="module")
def hf15():
    model = R.build_llava(R.llava_hf_config())  # llama text, 6 heads over 2 kv heads
    round_f16_tensors(model)
    return model


@pytest.fixture(scope="module")
def pair15(hf15, tmp_path_factory):
    return write_pair(str(tmp_path_factory.mktemp("gguf15")), text_contents(hf15), mmproj_contents(hf15))


# -- (a) logits --------------------------------------------------------------------------------------------


def test_llava15_pair_matches_transformers(hf15, pair15):
    """Legacy converter layout: no feature_layer key, the last CLIP layer dropped, fc1 named ffn_down."""
    model_path, mmproj_path = pair15
    pipe = llava_jax.load(model_path, mmproj=mmproj_path, dtype="float32")
    cfg = pipe.config
    assert (cfg.vision.num_layers, cfg.feature_layers, cfg.image_aspect_ratio, cfg.semantics) == (2, (2,), "pad", "original")
    assert (cfg.text.num_heads, cfg.text.num_kv_heads, cfg.image_token_id) == (6, 2, 96)
    images = [image(SIZES["wide"], 1), image(SIZES["tall"], 2)]
    pixels = pipe.image_processor(images)["pixel_values"]
    ids = sequence(np.random.default_rng(0), 96, [cfg.tokens_per_tile] * 2)[None]
    ours = pipe.logits(ids, pixels)
    theirs = R.reference_logits(hf15, np.where(ids == 96, R.IMAGE_TOKEN, ids), pixels)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    text_only = np.random.default_rng(1).integers(1, 90, (2, 9))
    np.testing.assert_allclose(pipe.logits(text_only), R.reference_logits(hf15, text_only), atol=1e-4, rtol=0)


def test_llava_next_pair_with_image_newline_matches_transformers(tmp_path):
    """LLaVA-1.6: anyres pinpoints, 'spatial_unpad' with model.image_newline, an explicit feature layer, the
    newer fc naming, and the mean/std of the metadata in the image processor."""
    hf = R.build_llava(R.llava_next_hf_config(), seed=1)
    round_f16_tensors(hf)
    mmproj = mmproj_contents(hf, feature_layers=[2], legacy_fc_names=False, image_mean=(0.5, 0.5, 0.5),
                             image_std=(0.5, 0.5, 0.5), image_grid_pinpoints=R.PINPOINTS, image_aspect_ratio="anyres",
                             mm_patch_merge_type="spatial_unpad")  # fmt: skip
    directory = str(tmp_path / "next")
    write_pair(directory, text_contents(hf), mmproj)
    pipe = llava_jax.load(directory, dtype="float32")  # the directory: its model and mmproj files are found
    cfg = pipe.config
    assert cfg.has_image_newline and cfg.image_grid_pinpoints == tuple(map(tuple, R.PINPOINTS))
    assert pipe.image_processor.image_mean == (0.5, 0.5, 0.5) and pipe.image_processor.aspect_ratio == "anyres"
    sizes = [SIZES["wide"], SIZES["tall"], SIZES["huge"]]
    for s in sizes:  # no ties: the original's and transformers' anyres agree on these
        assert anyres.num_image_tokens(cfg, s) == anyres.num_image_tokens(cfg.replace(semantics="hf"), s)
    inputs = R.next_image_processor()([image(s, i) for i, s in enumerate(sizes)], return_tensors="np")
    counts = [anyres.num_image_tokens(cfg, s) for s in inputs["image_sizes"]]
    ids = sequence(np.random.default_rng(3), 96, counts)[None]
    ours = pipe.logits(ids, inputs["pixel_values"], inputs["image_sizes"])
    theirs = R.reference_logits(hf, np.where(ids == 96, R.IMAGE_TOKEN, ids), inputs["pixel_values"],
                                image_sizes=torch.as_tensor(inputs["image_sizes"]))  # fmt: skip
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


# -- (b) quantized tensors -----------------------------------------------------------------------------------


def q8_0_error_bound(w):
    return np.abs(w).max() / 127 * (0.5 + 127 / 2048)


def test_q8_0_weights_dequantize_as_gguf_does(tmp_path):
    hf = R.build_llava(R.llava_hf_config(text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)))
    round_f16_tensors(hf)
    text = text_contents(hf, quantize=gguf.GGMLQuantizationType.Q8_0)
    model_path, mmproj_path = write_pair(str(tmp_path), text, mmproj_contents(hf))
    reader = gguf.GGUFReader(model_path)
    stored = {t.name: t for t in reader.tensors}
    assert stored["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert stored["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    pipe = llava_jax.load(model_path, mmproj=mmproj_path, dtype="float32")
    ours = leaves(pipe)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    lm = "model.language_model."
    for i in range(2):
        # equal to gguf's own dequantization of the stored bytes
        up = gguf.quants.dequantize(stored[f"blk.{i}.ffn_up.weight"].data, gguf.GGMLQuantizationType.Q8_0)
        np.testing.assert_array_equal(ours["decoder.layers.mlp.up_proj.kernel"][i], up.T)
        # and within Q8_0's error (half a step of the block scale, amax / 127) of the float weights
        for ours_key, theirs_key in (("mlp.up_proj", "mlp.up_proj"), ("attn.q_proj", "self_attn.q_proj"),
                                     ("attn.k_proj", "self_attn.k_proj")):  # fmt: skip
            w = state[f"{lm}layers.{i}.{theirs_key}.weight"]
            diff = np.abs(ours[f"decoder.layers.{ours_key}.kernel"][i] - w.T)
            assert 0 < diff.max() <= q8_0_error_bound(w), ours_key
    embed = state[lm + "embed_tokens.weight"]
    assert 0 < np.abs(ours["decoder.embed"] - embed).max() <= q8_0_error_bound(embed)


# -- (c) tokenizer ------------------------------------------------------------------------------------------


TEXTS = [
    "USER: <image>\nWhat is the color of the circle? ASSISTANT: It is red.</s>",
    "<image>\n<image>\nCompare them.",
    "  two leading spaces, trailing  ",
    "line one\n\nline two\ttab 12345 items.",
    "ünïcödé 😀 bytes fall back",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory, sp_model_proto):
    """A tiny LLaVA whose vocabulary is a trained sentencepiece tokenizer's (with llava-hf's added tokens)."""
    directory = str(tmp_path_factory.mktemp("tok_model"))
    ids = tiny_tokenizer.write_llava_hf_tokenizer(directory, sp_model_proto, added_tokens=ADDED_TOKENS)
    vocab = max(ids.values()) + 3  # and two [PAD] rows, as llava-hf pads its embedding table
    hf = R.build_llava(R.llava_hf_config(text=dict(vocab_size=vocab), image_token_index=ids["<image>"]), seed=3, scale=0.5)
    round_f16_tensors(hf)
    text = text_contents(hf)
    add_sentencepiece_vocab(text, directory, vocab)
    paths = write_pair(os.path.join(directory, "gguf"), text, mmproj_contents(hf))
    return directory, paths


def test_gguf_tokenizer_gives_the_source_tokenizers_ids(tokenizer_model):
    directory, (model_path, _) = tokenizer_model
    source = load_tokenizer(directory)
    from llava_jax.checkpoints.gguf_file import GGUFFile

    ours = tokenizer_from_gguf(GGUFFile(model_path).metadata, model_path)
    for text in TEXTS:
        assert ours.encode(text) == source.encode(text), text
        assert ours.decode(ours.encode(text)) == source.decode(source.encode(text)), text
    assert source.encode(TEXTS[0])[0] == source.bos_id and source.token_to_id("<image>") == ours.token_to_id("<image>")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (source.bos_id, source.eos_id, source.pad_id)


def test_other_tokenizer_models_are_refused():
    with pytest.raises(NotImplementedError, match="tokenizer.ggml.model 'gpt2'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})


# -- (d) errors ---------------------------------------------------------------------------------------------


def test_missing_mmproj_and_ambiguous_directories(pair15, tmp_path):
    model_path, mmproj_path = pair15
    with pytest.raises(CheckpointError, match="mmproj=PATH"):
        llava_jax.load(model_path)
    with pytest.raises(CheckpointError, match="architecture 'clip'.*mmproj="):
        llava_jax.load(mmproj_path, mmproj=model_path)
    shutil.copy(model_path, tmp_path / "a.gguf")
    shutil.copy(model_path, tmp_path / "b.gguf")
    shutil.copy(mmproj_path, tmp_path / "mmproj-x.gguf")
    with pytest.raises(CheckpointError, match=r"2 language-model \.gguf file\(s\).*exactly one of each"):
        llava_jax.load(str(tmp_path))


def test_not_a_gguf_file(pair15, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf at all")
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        llava_jax.load(str(bad), mmproj=pair15[1])


def test_other_architecture(hf15, pair15, tmp_path):
    text = text_contents(hf15)
    text.arch = "qwen2"
    path = text.write(str(tmp_path / "qwen.gguf"))
    with pytest.raises(CheckpointError, match="general.architecture 'qwen2'"):
        llava_jax.load(path, mmproj=pair15[1])


@pytest.mark.parametrize("edit, message", [
    ("missing", r"missing tensors \(1\): blk\.1\.ffn_up\.weight"),
    ("unexpected", r"unexpected tensors \(1\): blk\.0\.attn_extra\.weight \(in .*model\.gguf\)"),
    ("misshaped", r"tensor blk\.0\.ffn_gate\.weight \(in .*\) has shape \(80, 40\)"),
    ("quant", r"v\.blk\.0\.attn_q\.weight in .* is stored as Q8_1"),
])  # fmt: skip
def test_tensor_errors_name_the_tensor(hf15, tmp_path, edit, message):
    text, mmproj = text_contents(hf15), mmproj_contents(hf15)
    if edit == "missing":
        del text.tensors["blk.1.ffn_up.weight"]
    elif edit == "unexpected":
        text.tensors["blk.0.attn_extra.weight"] = np.zeros((4, 4), np.float32)
    elif edit == "misshaped":
        text.tensors["blk.0.ffn_gate.weight"] = np.zeros((80, 40), np.float32)
    else:  # a type gguf-py cannot dequantize: raw Q8_1 blocks of 32 values
        block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]
        mmproj.tensors["v.blk.0.attn_q.weight"] = (np.zeros((32, block_bytes), np.uint8), gguf.GGMLQuantizationType.Q8_1)
    model_path, mmproj_path = write_pair(str(tmp_path), text, mmproj)
    with pytest.raises(CheckpointError, match=message):
        llava_jax.load(model_path, mmproj=mmproj_path, dtype="float32")


# -- (e) infer.py -------------------------------------------------------------------------------------------


def test_infer_runs_a_gguf_pair(tokenizer_model, tmp_path):
    _, (model_path, mmproj_path) = tokenizer_model
    picture = tmp_path / "picture.png"
    image((30, 40), 4).save(picture)
    args = ["--model", model_path, "--mmproj", mmproj_path, "--image", str(picture), "--prompt", "What is it?",
            "--temperature", "0", "--max_new_tokens", "4", "--dtype", "float32"]  # fmt: skip
    result = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *args], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    pipe = llava_jax.load(model_path, mmproj=mmproj_path, dtype="float32")
    assert summary["answer"] == pipe.chat("What is it?", [str(picture)], max_new_tokens=4, temperature=0)
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--model", model_path, "--prompt", "hi"],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                             timeout=300)  # fmt: skip
    assert missing.returncode == 2 and "mmproj" in missing.stderr


def test_convert_gguf_to_orbax_keeps_weights_tokenizer_and_preprocessing(tokenizer_model, tmp_path):
    from llava_jax.convert import convert

    _, (model_path, mmproj_path) = tokenizer_model
    out = str(tmp_path / "converted")
    convert(model_path, out, "float32", progress=False, mmproj=mmproj_path)
    a, b = llava_jax.load(model_path, mmproj=mmproj_path, dtype="float32"), llava_jax.load(out, dtype="float32")
    assert a.config == b.config and a.image_processor == b.image_processor
    for text in TEXTS:
        assert a.tokenizer.encode(text) == b.tokenizer.encode(text), text
    la, lb = leaves(a), leaves(b)
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


@pytest.mark.parametrize("directory, filename, expected", [
    ("ggml_llava-v1.5-7b", "ggml-model-f16.gguf", "llava_v1"),  # the hint is in the directory's name
    ("models", "llava-v1.6-mistral-7b.Q8_0.gguf", "mistral_instruct"),  # in the file's name
    ("models", "model.gguf", "llava_v1"),  # none: the LLaMA vocabulary decides
])
def test_chat_template_from_the_pair_names(hf15, pair15, tmp_path, directory, filename, expected):
    from llava_jax.chat import default_template

    folder = tmp_path / directory
    folder.mkdir()
    model_path, mmproj_path = str(folder / filename), str(folder / "mmproj-model-f16.gguf")
    shutil.copy(pair15[0], model_path)
    shutil.copy(pair15[1], mmproj_path)
    assert default_template(llava_jax.load(model_path, mmproj=mmproj_path, dtype="float32")) == expected
