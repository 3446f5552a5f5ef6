"""Export to the GGUF pair llama.cpp reads (`convert --to gguf`): read back by our importer with the source's
logits and tokenizer, the file layout of llama.cpp's converters (tests/gguf_reference.py, written from the
HF model independently of the exporter), and Q8_0 as the `gguf` package quantizes it.

llama.cpp itself judges the export in tests/test_llama_cpp.py (slow: needs llama-cpp-python)."""

import os

import gguf
import numpy as np
import pytest

import llava_jax
from llava_jax.checkpoints.gguf_file import GGUFFile
from llava_jax.convert import export_gguf
from llava_jax.data import tiny_tokenizer
from tests import reference as R
from tests.conftest import ADDED_TOKENS
from tests.gguf_reference import add_sentencepiece_vocab, mmproj_contents, round_f16_tensors, text_contents
from tests.reference import image
from tests.test_gguf import TEXTS

TEXT = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def source(tmp_path_factory, sp_model_proto):
    """A llava-hf directory (tokenizer included) and its transformers model."""
    directory = str(tmp_path_factory.mktemp("export_src"))
    ids = tiny_tokenizer.write_llava_hf_tokenizer(directory, sp_model_proto, added_tokens=ADDED_TOKENS)
    vocab = max(ids.values()) + 3
    hf = R.build_llava(R.llava_hf_config(text={**TEXT, "vocab_size": vocab}, image_token_index=ids["<image>"]),
                       seed=4, scale=0.3)  # fmt: skip
    round_f16_tensors(hf)  # the converter's float16 tensors (patch embedding, projector) hold float16 values
    R.save(hf, directory)
    return directory, hf, ids


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    directory, _, _ = source
    out = str(tmp_path_factory.mktemp("export_f32"))
    summary = export_gguf(directory, out, outtype="f32")
    return summary["model"], summary["mmproj"]


def test_export_reads_back_with_the_sources_logits(source, exported):
    directory, hf, ids = source
    model_path, mmproj_path = exported
    ours = llava_jax.load(model_path, mmproj=mmproj_path, dtype="float32")
    src = llava_jax.load(directory, dtype="float32")
    rng = np.random.default_rng(0)
    text_ids = np.array([[1] + list(rng.integers(3, 400, 30))], np.int32)
    np.testing.assert_allclose(ours.logits(text_ids), R.reference_logits(hf, text_ids), atol=2e-4, rtol=1e-4)
    # with an image: the tower's stored layers and the feature layer give the same features (a GGUF pair's
    # image token is the first id past the vocabulary, as for original checkpoints)
    a = src.prepare("USER: <image>\nWhat is it? ASSISTANT:", [image((40, 30), 1)])
    image_ids = np.where(a["input_ids"] == ids["<image>"], ours.config.image_token_id, a["input_ids"])
    np.testing.assert_allclose(ours.logits(image_ids, a["pixel_values"]), src.logits(**a), atol=2e-4, rtol=1e-4)
    for text in TEXTS:
        assert ours.tokenizer.encode(text) == src.tokenizer.encode(text), text
    # GGUF stores the mean as float32
    np.testing.assert_allclose(ours.image_processor.image_mean, src.image_processor.image_mean, rtol=1e-7)


def test_export_has_the_layout_of_llama_cpps_converters(source, exported):
    """Tensor names, shapes and float values as tests/gguf_reference.py (llama.cpp's converters) writes them."""
    directory, hf, _ = source
    vocab = hf.config.text_config.vocab_size
    text = text_contents(hf)
    add_sentencepiece_vocab(text, directory, vocab)
    projector = mmproj_contents(hf, feature_layers=[hf.config.vision_config.num_hidden_layers - 1])
    for path, reference in zip(exported, (text, projector)):
        f = GGUFFile(path)
        assert f.get("general.architecture") == reference.arch
        assert sorted(f.keys()) == sorted(reference.tensors), path
        for name, array in reference.tensors.items():
            np.testing.assert_allclose(f.read(name), np.asarray(array, np.float32), atol=1e-6, err_msg=name)
        for key, (value) in reference.metadata.items():
            if key.startswith(("general.", "tokenizer.ggml.pre")) or key == "clip.vision.projection_dim":
                continue  # projection_dim: CLIP's own projection, unused by LLaVA and not in our config
            got = f.get(key)
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                np.testing.assert_allclose(got, value, rtol=1e-6, err_msg=key)
            else:
                assert got == value, key


@pytest.mark.parametrize("outtype, qtype", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_outtypes_store_weights_as_llama_cpp_does(source, tmp_path, outtype, qtype):
    directory, hf, _ = source
    summary = export_gguf(directory, str(tmp_path), outtype=outtype)
    f = GGUFFile(summary["model"])
    assert f.quant_type("blk.0.ffn_up.weight") == qtype and f.quant_type("blk.0.attn_norm.weight") == "F32"
    mmproj = GGUFFile(summary["mmproj"])
    assert mmproj.quant_type("mm.0.weight") == "F16" and mmproj.quant_type("v.blk.0.ffn_down.weight") == "F16"
    reference = text_contents(hf, quantize=gguf.GGMLQuantizationType.Q8_0 if outtype == "q8_0" else None)
    want = reference.tensors["blk.1.attn_q.weight"]
    got = f._tensors["blk.1.attn_q.weight"]
    if outtype == "q8_0":  # bit-exact: the same bytes as gguf's (ggml's reference) Q8_0 of the float weight
        np.testing.assert_array_equal(np.asarray(got.data), want[0])
    else:
        np.testing.assert_array_equal(np.asarray(got.data), want.astype(np.float16))
    pipe = llava_jax.load(summary["model"], mmproj=summary["mmproj"], dtype="float32", quantize="auto")
    assert ("qvalue" in pipe._state["decoder"]["layers"]["attn"]["q_proj"]) == (outtype == "q8_0")


def test_quantized_model_exports(source, tmp_path):
    directory, hf, _ = source
    from llava_jax.convert import convert

    stored = str(tmp_path / "int8")
    convert(directory, stored, dtype="float32", progress=False, quantize="int8")
    summary = export_gguf(stored, str(tmp_path / "gguf"), outtype="f32")
    back = llava_jax.load(summary["model"], mmproj=summary["mmproj"], dtype="float32")
    ids = np.array([[1] + list(range(5, 30))], np.int32)
    np.testing.assert_allclose(back.logits(ids), llava_jax.load(stored, dtype="float32").logits(ids), atol=1e-4)
    assert os.path.basename(summary["mmproj"]) == "mmproj-model-f32.gguf"


def test_commands_export_and_run_quantized(source, tmp_path):
    """`python -m llava_jax.convert --to gguf --outtype q8_0`, then `infer.py --quantize auto` on the pair."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    directory, _, _ = source
    out = str(tmp_path / "pair")
    command = [sys.executable, "-m", "llava_jax.convert", "--src", directory, "--out", out, "--to", "gguf",
               "--outtype", "q8_0"]  # fmt: skip
    convert = subprocess.run(command, capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert convert.returncode == 0, convert.stderr
    summary = json.loads(convert.stdout.strip().splitlines()[-1])
    assert os.path.basename(summary["model"]) == "model-q8_0.gguf"
    picture = tmp_path / "picture.png"
    image((30, 40), 4).save(picture)
    args = ["--model", out, "--image", str(picture), "--prompt", "What is it?", "--temperature", "0",
            "--max_new_tokens", "4", "--dtype", "float32", "--quantize", "auto"]  # fmt: skip
    infer = subprocess.run([sys.executable, os.path.join(root, "infer.py"), *args], capture_output=True, text=True,
                           cwd=root, env=env, timeout=300)  # fmt: skip
    assert infer.returncode == 0, infer.stderr
    pipe = llava_jax.load(out, dtype="float32", quantize="auto")
    assert json.loads(infer.stdout.strip().splitlines()[-1])["answer"] == pipe.chat(
        "What is it?", [str(picture)], max_new_tokens=4, temperature=0)
    command = [sys.executable, os.path.join(root, "infer.py"), "--model", out, "--prompt", "hi", "--quantize", "int3"]
    bad = subprocess.run(command, capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert bad.returncode != 0 and "int8" in bad.stderr
