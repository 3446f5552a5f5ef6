"""Stage-1 start from a CLIP directory and a LLaMA-family LM directory, against transformers' own models."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llava_jax.checkpoints import components
from llava_jax.checkpoints.params import flat_variables
from llava_jax.data.image import ImageProcessor
from llava_jax.data.tiny_tokenizer import write_llava_hf_tokenizer
from llava_jax.data.tokenizer import load_tokenizer
from llava_jax.errors import CheckpointError
from llava_jax.model.llava import LlavaModel
from tests.reference import TEXT, VISION, _randomise

SP_VOCAB = 512  # the conftest sentencepiece model's pieces
LM = {**TEXT, "vocab_size": SP_VOCAB}


def _save(model, directory, bin_format=False):
    if bin_format:
        os.makedirs(directory, exist_ok=True)
        model.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    else:
        model.save_pretrained(directory)
    return str(directory)


def make_clip(directory, full=False, bin_format=False, seed=1):
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(**VISION)
    if full:
        text = transformers.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                               projection_dim=16))  # fmt: skip
    else:
        model = transformers.CLIPVisionModel(vision)
    _randomise((model.vision_model if full else model).eval(), seed, 0.3)
    return model.eval(), _save(model, directory, bin_format)


def make_lm(directory, sp_model_proto, model_type="llama", bin_format=False, seed=2):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, **LM)
    model = (transformers.MistralForCausalLM if model_type == "mistral" else transformers.LlamaForCausalLM)(cfg).eval()
    _randomise(model, seed, 0.3)
    path = _save(model, directory, bin_format)
    write_llava_hf_tokenizer(path, sp_model_proto, added_tokens=(), pad_token=None)
    return model, path


@pytest.fixture(scope="module")
def llama_start(tmp_path_factory, sp_model_proto):
    root = tmp_path_factory.mktemp("components")
    clip, clip_dir = make_clip(root / "clip")
    lm, lm_dir = make_lm(root / "lm", sp_model_proto)
    out = str(root / "run")
    config, state = components.init_from_components(clip_dir, lm_dir, out, seed=3)
    return clip, lm, clip_dir, lm_dir, out, config, state


def _vision_states(model, pixels):
    return [np.asarray(h) for h in model.vision(pixels, tuple(range(model.cfg.vision.num_layers + 1)))]


def _check_against(clip_vision, lm, config, state):
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: LlavaModel(config, rngs=nnx.Rngs(0)))), state)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = clip_vision(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states
    ours = _vision_states(model, pixels)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)
    ids = np.random.default_rng(1).integers(0, SP_VOCAB, (2, 11))
    with torch.no_grad():
        ref_logits = lm(input_ids=torch.from_numpy(ids)).logits.numpy()
    logits = np.asarray(model(ids))
    assert logits.shape[-1] == config.text.vocab_size
    np.testing.assert_allclose(logits[..., :SP_VOCAB], ref_logits, atol=1e-4, rtol=1e-4)


def test_llama_and_clip_vision_model_match_transformers(llama_start):
    clip, lm, _, _, _, config, state = llama_start
    _check_against(clip, lm, config, state)


def test_embeddings_grow_as_the_llava_conversion(llama_start):
    _, lm, _, _, out, config, state = llama_start
    # <image> and <pad> take ids 512, 513; the table grows to 512 + 2 rounded up to a multiple of 64.
    assert config.image_token_id == SP_VOCAB and config.text.vocab_size == 576
    params = {k: np.asarray(v.get_value()) for k, v in flat_variables(state).items()}
    old = lm.model.embed_tokens.weight.detach().numpy().astype(np.float64)
    mean, std = old.mean(0), old.std(0)
    for name, original_rows in (("decoder.embed", old), ("decoder.lm_head.kernel", lm.lm_head.weight.detach().numpy())):
        table = params[name] if name == "decoder.embed" else params[name].T
        assert table.shape == (576, TEXT["hidden_size"])
        np.testing.assert_array_equal(table[:SP_VOCAB], np.asarray(original_rows, np.float32))
        new = table[SP_VOCAB:].astype(np.float64)
        # Around the old embeddings' mean (lm_head's too, as the script does), spread sqrt(1e-5) x theirs.
        np.testing.assert_allclose(new.mean(0), mean, atol=4 * np.sqrt(1e-5) * std.max() / np.sqrt(len(new)) * 3)
        ratio = new.std(0) / (np.sqrt(1e-5) * std)
        assert 0.7 < ratio.mean() < 1.3, ratio.mean()
        assert len(np.unique(new[:, 0])) == len(new)
    assert not np.array_equal(params["decoder.embed"][SP_VOCAB:], params["decoder.lm_head.kernel"].T[SP_VOCAB:])


def test_fresh_projector_is_torch_linear_default_and_seeded(llama_start, tmp_path):
    _, _, clip_dir, lm_dir, _, config, state = llama_start
    params = {k: np.asarray(v.get_value()) for k, v in flat_variables(state).items()}
    for i, fan_in in ((0, VISION["hidden_size"]), (1, TEXT["hidden_size"])):
        bound = 1 / np.sqrt(fan_in)
        kernel, bias = params[f"projector.linears.{i}.kernel"], params[f"projector.linears.{i}.bias"]
        assert kernel.shape == (fan_in, TEXT["hidden_size"])
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
        assert abs(kernel.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3)  # uniform, not normal
    again = flat_variables(components.init_from_components(clip_dir, lm_dir, str(tmp_path / "a"), seed=3)[1])
    other = flat_variables(components.init_from_components(clip_dir, lm_dir, str(tmp_path / "b"), seed=4)[1])
    for name in ("projector.linears.0.kernel", "decoder.embed"):
        np.testing.assert_array_equal(np.asarray(again[name].get_value()), params[name])
    assert not np.array_equal(np.asarray(other["projector.linears.0.kernel"].get_value()),
                              params["projector.linears.0.kernel"])  # fmt: skip


def test_written_tokenizer_and_processor(llama_start):
    _, _, _, _, out, config, _ = llama_start
    ours = load_tokenizer(out)
    reference = transformers.AutoTokenizer.from_pretrained(out)
    assert reference.convert_tokens_to_ids(["<image>", "<pad>"]) == [SP_VOCAB, SP_VOCAB + 1]
    assert reference.pad_token == "<pad>"
    text = "USER: <image>\nWhat color is the circle?<pad> ASSISTANT: red"
    assert ours.encode(text) == reference(text)["input_ids"]
    assert ours.encode(text).count(config.image_token_id) == 1 and ours.pad_id == SP_VOCAB + 1
    processor = ImageProcessor.from_pretrained(out, config)
    assert processor.output_hw == (28, 28)


def test_clip_model_mistral_and_bin_files(tmp_path, sp_model_proto):
    clip, clip_dir = make_clip(tmp_path / "clip", full=True, bin_format=True)
    lm, lm_dir = make_lm(tmp_path / "lm", sp_model_proto, model_type="mistral", bin_format=True)
    assert os.path.isfile(os.path.join(lm_dir, "pytorch_model.bin"))
    config, state = components.init_from_components(clip_dir, lm_dir, str(tmp_path / "out"), seed=0)
    assert config.text.sliding_window == lm.config.sliding_window
    _check_against(clip.vision_model, lm, config, state)


def test_anyres_image_newline(llama_start, tmp_path):
    _, _, clip_dir, lm_dir, _, _, _ = llama_start
    config, state = components.init_from_components(
        clip_dir, lm_dir, str(tmp_path), image_aspect_ratio="anyres", image_grid_pinpoints=[[28, 56], [56, 28]],
        patch_merge_type="spatial_unpad",
    )  # fmt: skip
    newline = np.asarray(flat_variables(state)["image_newline"].get_value())
    d = TEXT["hidden_size"]
    assert newline.shape == (d,) and 0.6 < newline.std() * np.sqrt(d) < 1.4


@pytest.mark.parametrize("projector_type", ["mlp2x_gelu", "linear"])
def test_load_mm_projector(llama_start, tmp_path, projector_type):
    _, _, clip_dir, lm_dir, _, _, _ = llama_start
    rng = np.random.default_rng(5)
    dv, dt = VISION["hidden_size"], TEXT["hidden_size"]
    shapes = ({"0": (dt, dv), "2": (dt, dt)} if projector_type == "mlp2x_gelu" else {"": (dt, dv)})
    tensors = {}
    for index, (out_dim, in_dim) in shapes.items():
        key = "model.mm_projector" + (f".{index}" if index else "")
        tensors[f"{key}.weight"] = torch.from_numpy(rng.standard_normal((out_dim, in_dim)).astype(np.float32))
        tensors[f"{key}.bias"] = torch.from_numpy(rng.standard_normal(out_dim).astype(np.float32))
    path = tmp_path / "mm_projector.bin"
    torch.save(tensors, path)
    config, state = components.init_from_components(clip_dir, lm_dir, str(tmp_path / "out"),
                                                     projector_type=projector_type, mm_projector=str(tmp_path), seed=3)  # fmt: skip
    params = {k: np.asarray(v.get_value()) for k, v in flat_variables(state).items()}
    for i, index in enumerate(shapes):
        key = "model.mm_projector" + (f".{index}" if index else "")
        np.testing.assert_array_equal(params[f"projector.linears.{i}.kernel"], tensors[f"{key}.weight"].numpy().T)
        np.testing.assert_array_equal(params[f"projector.linears.{i}.bias"], tensors[f"{key}.bias"].numpy())
    # The rest is untouched by the projector file.
    base = flat_variables(llama_start[-1])
    np.testing.assert_array_equal(params["decoder.embed"], np.asarray(base["decoder.embed"].get_value()))
    if projector_type == "mlp2x_gelu":
        with pytest.raises(CheckpointError, match="mm_projector.bin does not fit this model's linear projector"):
            linear = components.init_from_components(clip_dir, lm_dir, str(tmp_path / "o2"), projector_type="linear")
            components.load_mm_projector(nnx.to_pure_dict(linear[1]), linear[0], str(path))


def test_clear_errors(llama_start, tmp_path):
    _, _, clip_dir, lm_dir, _, _, _ = llama_start
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match="must be a CLIP directory"):
        components.init_from_components(lm_dir, lm_dir, out)
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(gpt2)
    with pytest.raises(CheckpointError, match="must be LLaMA-family"):
        components.init_from_components(clip_dir, str(gpt2), out)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        components.init_from_components(clip_dir, str(tmp_path / "nowhere"), out)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    with open(os.path.join(lm_dir, "config.json")) as f:
        (no_tokenizer / "config.json").write_text(f.read())
    with pytest.raises(CheckpointError, match="tokenizer.model is missing"):
        components.init_from_components(clip_dir, str(no_tokenizer), out)
    with pytest.raises(CheckpointError, match="no weights"):
        components.init_from_components(clip_dir, str(no_tokenizer), out, tokenizer_dir=lm_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        components.load_mm_projector(llama_start[6], llama_start[5], str(tmp_path / "mm_projector.bin"))
    json.dumps(llama_start[5].to_dict())  # the config of a start serialises (runs record it)


def test_stage1_start_as_the_trainer_calls_it(llama_start, tmp_path):
    import ml_collections

    from llava_jax.errors import ConfigError

    _, _, clip_dir, lm_dir, _, config, state = llama_start
    init = ml_collections.ConfigDict(dict(kind="components", path="", tokenizer="", vision_tower=clip_dir,
                                          language_model=lm_dir, mm_projector=""))  # fmt: skip
    start = components.stage1_start(init, {"projector_type": "mlp2x_gelu", "vision_feature_layer": [-2]}, seed=3,
                                    param_dtype="float32")  # fmt: skip
    assert start.config.replace(vision_feature_layer=-2) == config and start.template is None
    assert os.path.isfile(os.path.join(start.side_dir, "tokenizer.model"))
    np.testing.assert_array_equal(start.params["decoder"]["embed"], np.asarray(nnx.to_pure_dict(state)["decoder"]["embed"]))
    with pytest.raises(ConfigError, match="model.image_token_id cannot be set"):
        components.stage1_start(init, {"image_token_id": 3}, seed=0, param_dtype="float32")
    with pytest.raises(ConfigError, match="model.vision"):
        components.stage1_start(init, {"vision": {"hidden_size": 8}}, seed=0, param_dtype="float32")
    with pytest.raises(ConfigError, match="init.language_model is empty"):
        components.stage1_start(ml_collections.ConfigDict({**init.to_dict(), "language_model": ""}), {}, seed=0,
                                param_dtype="float32")
    # load_mm_projector on the trainer's pure dict
    dt, dv = TEXT["hidden_size"], VISION["hidden_size"]
    tensors = {"model.mm_projector.0.weight": torch.ones(dt, dv), "model.mm_projector.0.bias": torch.zeros(dt),
               "model.mm_projector.2.weight": torch.full((dt, dt), 2.0), "model.mm_projector.2.bias": torch.ones(dt)}  # fmt: skip
    torch.save(tensors, tmp_path / "mm_projector.bin")
    params = components.load_mm_projector(start.params, start.config, str(tmp_path / "mm_projector.bin"))
    assert (np.asarray(params["projector"]["linears"][1]["kernel"]) == 2.0).all()
    assert not (np.asarray(start.params["projector"]["linears"][1]["kernel"]) == 2.0).all()  # not changed in place
    np.testing.assert_array_equal(params["decoder"]["embed"], start.params["decoder"]["embed"])
