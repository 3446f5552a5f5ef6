"""The memory planner (python -m llava_jax.plan): per-device bytes of a compiled train step on abstract shapes."""

import jax
import pytest

from configs import common
from llava_jax import plan as P
from llava_jax import sharding as shd


def test_parse_mesh_and_bytes():
    assert P.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
    assert P.parse_bytes("80GiB") == 80 * 2**30 and P.parse_bytes("32GB") == 32_000_000_000
    with pytest.raises(ValueError, match="axis=size"):
        P.parse_mesh("model=8")
    with pytest.raises(ValueError, match="80GB or 95GiB"):
        P.parse_bytes("lots")


def test_7b_stage2_at_4096_tokens_fits_80gib_with_blockwise_attention_only():
    """LLaVA-1.5-7B stage 2, one 4096-token sequence per device on 1x8x1, no remat: the blockwise step fits
    in 80 GiB, the plain one (float32 [heads, T, T] scores per layer kept for the backward pass) does not.
    Figures are XLA:CPU's memory analysis of the compiled step."""
    stage = common.llava15_finetune("unused")
    mesh = shd.make_mesh(1, 8, 1)
    sizes = {}
    for attention in ("blockwise", "xla"):
        model = P.model_dims("llava-1.5-7b").replace(attention=attention, dtype="bfloat16", param_dtype="float32")
        sizes[attention] = P.plan(model, stage, mesh, seq_len=4096, per_device_batch=1, remat="none")
    budget = 80 * 2**30
    assert sizes["blockwise"]["total"] <= budget < sizes["xla"]["total"], sizes
    blockwise = sizes["blockwise"]
    trainable = blockwise["trainable_parameters"]
    assert 6.5e9 < trainable < 7e9  # projector + LLM; the vision tower frozen
    # fsdp over 8: a float32 copy of the trainable parameters is an eighth per device, Adam's two moments two
    assert abs(blockwise["gradients"] - trainable * 4 / 8) < 0.01 * blockwise["gradients"]
    assert abs(blockwise["optimizer_state"] - 2 * blockwise["gradients"]) < 0.01 * blockwise["optimizer_state"]


def test_lora_stage_plans_the_adapters_and_the_projector():
    """LoRA r=128 on every LLM linear but lm_head, the projector trained, the base frozen: the trainable count is
    r x (in + out) per adapted linear plus the projector, and Adam's moments are twice their float32 bytes."""
    stage = common.llava15_lora("unused")
    model = P.model_dims("llava-1.5-7b").replace(dtype="bfloat16", param_dtype="float32")
    result = P.plan(model, stage, shd.make_mesh(1, 8, 1), seq_len=128, per_device_batch=1, remat="full")
    d, m, r, layers = 4096, 11008, 128, 32
    adapters = layers * r * (4 * (d + d) + 2 * (d + m) + (m + d))
    projector = 1024 * d + d + d * d + d  # mlp2x_gelu from CLIP-L's 1024 features
    assert result["trainable_parameters"] == adapters + projector
    assert abs(result["optimizer_state"] - 2 * result["gradients"]) < 0.01 * result["optimizer_state"]
