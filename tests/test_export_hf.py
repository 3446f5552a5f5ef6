"""`--to hf` export: transformers' AutoModelForImageTextToText / AutoProcessor load it and agree with llava_jax."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

import llava_jax
from llava_jax import convert
from llava_jax.checkpoints import hf_files
from llava_jax.config import LlavaConfig
from llava_jax.data.image import ImageProcessor
from llava_jax.errors import CheckpointError, ConfigError
from tests import reference as R

IMAGE_ID, VOCAB = 512, 514  # sentencepiece pieces, then <image> and <pad> (conftest ADDED_TOKENS)
TEXT = "USER: <image>\nWhat is on the left? ASSISTANT: a red square</s>USER: and <image> here?"
IMAGES = [R.image((30, 44), seed=1), R.image((50, 23), seed=2)]
CLIP = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28},
        "crop_size": {"height": 28, "width": 28}, "do_center_crop": True}  # fmt: skip
PAD = {**CLIP, "image_processor_type": "LlavaImageProcessor", "do_pad": True}
NEXT = {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 28},
        "crop_size": {"height": 28, "width": 28}, "image_grid_pinpoints": R.PINPOINTS}  # fmt: skip


def hf_source(directory, tokenizer_dir, next_: bool, preprocessor: dict) -> str:
    """A tiny llava-hf checkpoint (random weights) with the test tokenizer and an image processor."""
    make = R.llava_next_hf_config if next_ else R.llava_hf_config
    model = R.build_llava(make(text=dict(vocab_size=VOCAB), image_token_index=IMAGE_ID))
    R.save(model, directory)
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, name), directory)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f)
    return directory


def assert_transformers_agrees(out: str, pipe, text=TEXT, images=IMAGES):
    """input_ids, pixel_values (and image_sizes) of AutoProcessor, and logits of the loaded model, equal llava_jax's."""
    processor = transformers.AutoProcessor.from_pretrained(out)
    model = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    ours = pipe.prepare(text, images)
    theirs = processor(text=text, images=images, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["pixel_values"], theirs["pixel_values"])
    kwargs = {}
    if "image_sizes" in theirs:
        np.testing.assert_array_equal(ours["image_sizes"], theirs["image_sizes"])
        kwargs["image_sizes"] = torch.as_tensor(theirs["image_sizes"])
    assert (ours["input_ids"] == IMAGE_ID).sum() > 0
    ref = R.reference_logits(model, theirs["input_ids"], theirs["pixel_values"], **kwargs)
    np.testing.assert_allclose(pipe.logits(**ours), ref, atol=1e-4, rtol=0)
    return model


@pytest.mark.parametrize("preprocessor", [CLIP, PAD], ids=["square", "pad"])
def test_llava_export_loads_in_transformers_with_equal_inputs_and_logits(tmp_path, make_tokenizer_dir, preprocessor):
    src = hf_source(str(tmp_path / "src"), make_tokenizer_dir(), False, preprocessor)
    out = str(tmp_path / "hf")
    summary = convert.to_hf(src, out, dtype="float32", max_shard_bytes=60_000, progress=False)
    assert summary["files"] > 2 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    pipe = llava_jax.load(src, dtype="float32")
    assert pipe.image_processor.aspect_ratio == ("pad" if preprocessor is PAD else "square")
    model = assert_transformers_agrees(out, pipe)
    # the same tensors as the source, under the names transformers' save_pretrained writes
    source = transformers.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    theirs, ours = source.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    # and the export reads back into llava_jax as the same model
    again = llava_jax.load(out, dtype="float32")
    assert again.config == pipe.config and again.image_processor == pipe.image_processor


def test_llava_next_export_from_a_llava_jax_model_dir(tmp_path, make_tokenizer_dir):
    src = hf_source(str(tmp_path / "src"), make_tokenizer_dir(), True, NEXT)
    model_dir = str(tmp_path / "jax")
    convert.convert(src, model_dir, dtype="float32", progress=False)
    out = str(tmp_path / "hf")
    summary = convert.to_hf(model_dir, out, dtype="float32", progress=False)
    assert summary["model_type"] == "llava_next" and os.path.isfile(os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert_transformers_agrees(out, llava_jax.load(model_dir, dtype="float32"))


def test_bfloat16_export_stores_bfloat16(tmp_path, make_tokenizer_dir):
    src = hf_source(str(tmp_path / "src"), make_tokenizer_dir(), False, CLIP)
    out = str(tmp_path / "hf")
    convert.to_hf(src, out, dtype="bfloat16", progress=False)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ref = transformers.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).state_dict()
    got = model.state_dict()
    for key in ("model.language_model.layers.1.self_attn.q_proj.weight", "model.vision_tower.embeddings.class_embedding"):
        torch.testing.assert_close(got[key], ref[key].to(torch.bfloat16), rtol=0, atol=0)


def test_refusals(tmp_path, make_tokenizer_dir):
    cfg = LlavaConfig.from_hf(R.llava_next_hf_config().to_dict())
    with pytest.raises(ConfigError, match="original LLaVA's rules"):
        hf_files.check_exportable(cfg.replace(semantics="original"))
    with pytest.raises(ConfigError, match="projector_type"):
        hf_files.check_exportable(cfg.replace(projector_type="linear"))
    from llava_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(make_tokenizer_dir())
    with pytest.raises(CheckpointError, match="image_token_id is 95"):
        hf_files.check_tokenizer(tokenizer, cfg)  # <image> is 512 in this tokenizer
    src = hf_source(str(tmp_path / "src"), make_tokenizer_dir(), False, CLIP)
    os.makedirs(tmp_path / "taken")
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(CheckpointError, match="not empty"):
        convert.to_hf(src, str(tmp_path / "taken"), dtype="float32", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src", "taken"]  # no partial directory left behind


def test_image_processor_config_round_trips():
    cfg = LlavaConfig.from_hf(R.llava_next_hf_config().to_dict())
    ip = ImageProcessor.from_config(cfg, NEXT)
    assert ImageProcessor.from_config(cfg, hf_files.image_processor_config(ip)) == ip


@pytest.mark.parametrize("name, options", [("llava-hf", {}), ("legacy", {"legacy": True}),
                                           ("eos-no-bos", {"add_bos_token": False, "add_eos_token": True})])  # fmt: skip
def test_exported_tokenizer_json_gives_our_ids_in_transformers(tmp_path, make_tokenizer_dir, name, options):
    """transformers 5 runs a llava directory's tokenizer.json as written (TokenizersBackend)."""
    from llava_jax.data.tokenizer import load_tokenizer
    from tests.test_tokenizer import _texts

    source = make_tokenizer_dir(name, **options)
    ours = load_tokenizer(source)
    (tmp_path / "tokenizer.json").write_text(ours.to_json(), encoding="utf-8")
    shutil.copy2(os.path.join(source, "tokenizer_config.json"), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_files.hf_config(
        LlavaConfig.from_hf(R.llava_hf_config().to_dict()), "float32")))  # fmt: skip
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in _texts(n=100):
        assert theirs.encode(text) == ours.encode(text), text
    assert load_tokenizer(str(tmp_path)).encode(_texts()[-1]) == ours.encode(_texts()[-1])


def test_command_line(tmp_path, make_tokenizer_dir):
    import subprocess
    import sys

    src = hf_source(str(tmp_path / "src"), make_tokenizer_dir(), False, CLIP)
    run = lambda *args: subprocess.run([sys.executable, "-m", "llava_jax.convert", "--src", src, *args],  # noqa: E731
                                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))  # fmt: skip
    done = run("--out", str(tmp_path / "hf"), "--to", "hf", "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["format"] == "hf"
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
    again = run("--out", str(tmp_path / "hf"), "--to", "hf")  # a user's mistake: one line, exit 2
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not empty" in again.stderr
    wrong = run("--out", str(tmp_path / "p"), "--to", "hf", "--base_model", "x")
    assert wrong.returncode != 0 and "--base_model does not apply to --to hf" in wrong.stderr


@pytest.mark.parametrize("text_model, text", [
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=5e5, tie_word_embeddings=True)),
    ("mistral", dict(sliding_window=64)),
])  # fmt: skip
def test_config_json_round_trips_through_transformers(text_model, text):
    original = R.llava_hf_config(text=text, text_model=text_model, vision_feature_layer=[-2, -5])
    ours = LlavaConfig.from_hf(original.to_dict())
    written = hf_files.hf_config(ours, "float32")
    loaded = transformers.AutoConfig.for_model(**written)
    assert LlavaConfig.from_hf(loaded.to_dict()) == ours
    a, b = original.text_config, loaded.text_config
    for name in ("model_type", "vocab_size", "num_key_value_heads", "head_dim", "max_position_embeddings",
                 "tie_word_embeddings", "rope_parameters"):  # fmt: skip
        assert getattr(a, name) == getattr(b, name), name
    assert getattr(a, "sliding_window", None) == getattr(b, "sliding_window", None)
    assert loaded.vision_feature_layer == [-2, -5]
