"""Model structure: scanned layers, presets, sharded execution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llava_jax
from llava_jax import sharding as shd
from configs.models import preset
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.model.llava import LlavaModel
from tests import reference as R


def tiny(layers: int) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=4, image_size=28,
                            patch_size=7),  # fmt: skip
        text=TextConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=layers, num_heads=6,
                        num_kv_heads=2, head_dim=8),  # fmt: skip
        image_token_id=95,
    )


def forward_hlo(cfg: LlavaConfig) -> str:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((1, 40), jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, 3, 28, 28), jnp.float32)
    fn = jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, p))
    return fn.lower(state, ids, pixels).as_text()


def test_program_size_does_not_grow_with_depth():
    small, deep = forward_hlo(tiny(2)), forward_hlo(tiny(24))
    assert len(deep) < 1.05 * len(small), (len(small), len(deep))
    assert deep.count("dot_general") == small.count("dot_general")


def test_from_hf_matches_the_llava_15_7b_preset():
    hf_config = {  # llava-hf/llava-1.5-7b-hf config.json, as published
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
        "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                        "torch_dtype": "float16", "vocab_size": 32064},
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
    }  # fmt: skip
    assert LlavaConfig.from_hf(hf_config) == preset("llava-1.5-7b", image_aspect_ratio="square")
    assert preset("llava-1.5-7b").tokens_per_tile == 576


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-1.5-13b"])
def test_preset_parameter_count_equals_transformers(name):
    cfg = preset(name)
    hf = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=cfg.vision.hidden_size, intermediate_size=cfg.vision.intermediate_size,
            num_hidden_layers=cfg.vision.num_layers, num_attention_heads=cfg.vision.num_heads,
            image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size),
        text_config=transformers.LlamaConfig(
            vocab_size=cfg.text.vocab_size, hidden_size=cfg.text.hidden_size,
            intermediate_size=cfg.text.intermediate_size, num_hidden_layers=cfg.text.num_layers,
            num_attention_heads=cfg.text.num_heads, num_key_value_heads=cfg.text.num_kv_heads),
    )  # fmt: skip
    with torch.device("meta"):
        expected = sum(p.numel() for p in transformers.LlavaForConditionalGeneration(hf).parameters())
    _, state = nnx.split(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0))))
    assert sum(x.size for x in jax.tree.leaves(state)) == expected
    assert expected > (7e9 if name.endswith("7b") else 13e9)


def test_config_json_round_trip(tmp_path):
    cfg = preset("llava-1.5-13b", vision_feature_layer=(-3, -1), image_grid_pinpoints=((336, 672), (672, 336)))
    cfg.to_json(tmp_path / "c.json")
    assert LlavaConfig.from_json(tmp_path / "c.json") == cfg


def test_bad_config_values():
    with pytest.raises(ValueError, match="unknown projector type"):
        LlavaConfig(projector_type="mlp2x_relu")
    with pytest.raises(ValueError, match="vision_feature_layer 30 is out of range"):
        LlavaConfig(vision_feature_layer=30)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TextConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(NotImplementedError, match="RoPE scaling type 'yarn'"):
        LlavaConfig.from_hf({"model_type": "llava", "text_config": {"rope_scaling": {"type": "yarn", "factor": 2}}})


def test_sharded_logits_equal_single_device(tmp_path):
    assert len(jax.devices()) == 8, "tests/conftest.py forces 8 CPU devices"
    hf_model = R.build_llava(R.llava_hf_config())
    directory = R.save(hf_model, str(tmp_path))
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = llava_jax.load(directory, dtype="float32", mesh=mesh)
    q_kernel = sharded._state["decoder"]["layers"]["attn"]["q_proj"]["kernel"].get_value()
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(q_kernel.addressable_shards) == 8 and q_kernel.addressable_shards[0].data.shape == (3, 24, 24)
    rng = np.random.default_rng(0)
    n = sharded.config.tokens_per_tile
    ids = np.stack([np.r_[rng.integers(1, 90, 4), np.full(n, R.IMAGE_TOKEN), rng.integers(1, 90, 6)] for _ in range(4)])
    pixels = rng.standard_normal((4, 3, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(sharded.logits(ids, pixels), R.reference_logits(hf_model, ids, pixels), atol=1e-4, rtol=0)
