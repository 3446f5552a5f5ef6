"""Model presets: the real dimensions of published checkpoints (LlavaConfig), and as config dicts.

    from configs.models import preset
    cfg = preset("llava-1.5-7b", dtype="bfloat16")
"""

from __future__ import annotations

import dataclasses

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig

CLIP_L14_336 = VisionConfig()
VICUNA_7B = TextConfig(vocab_size=32064, max_position_embeddings=4096)
VICUNA_13B = TextConfig(
    vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
    num_kv_heads=40, max_position_embeddings=4096,
)  # fmt: skip
# LLaVA-1.6 (NeXT) anyres: the pinpoints of llava-v1.6 releases, (height, width) as llava-hf lists them.
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

PRESETS: dict[str, LlavaConfig] = {
    "llava-1.5-7b": LlavaConfig(vision=CLIP_L14_336, text=VICUNA_7B, image_aspect_ratio="pad"),
    "llava-1.5-13b": LlavaConfig(vision=CLIP_L14_336, text=VICUNA_13B, image_aspect_ratio="pad"),
}


def preset(name: str, **overrides) -> LlavaConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def as_dict(config: LlavaConfig) -> dict:
    """A LlavaConfig as the `model` section of a training stage (plain values)."""
    return dataclasses.asdict(config)
