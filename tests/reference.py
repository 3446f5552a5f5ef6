"""Tiny random llava-hf models built with transformers: the numerical reference of the tests."""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=7, hidden_act="quick_gelu", projection_dim=16)  # fmt: skip
TEXT = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)  # fmt: skip
IMAGE_TOKEN = 95
PAD_TOKEN = 0


def llava_hf_config(text: dict | None = None, vision: dict | None = None, text_model: str = "llama",
                    **kwargs) -> transformers.LlavaConfig:  # fmt: skip
    text_cfg = transformers.AutoConfig.for_model(text_model, **{**TEXT, **(text or {})})
    vision_cfg = transformers.CLIPVisionConfig(**{**VISION, **(vision or {})})
    kwargs = {"image_token_index": IMAGE_TOKEN, "vision_feature_layer": -2,
              "vision_feature_select_strategy": "default", **kwargs}  # fmt: skip
    return transformers.LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, **kwargs)


def build_llava(config: transformers.PretrainedConfig, seed: int = 0, scale: float = 0.3):
    """A float32 model in eval mode with random weights large enough to make logits differ.

    A LlavaNextConfig gives a LlavaNextForConditionalGeneration."""
    torch.manual_seed(seed)
    cls = (transformers.LlavaNextForConditionalGeneration if isinstance(config, transformers.LlavaNextConfig)
           else transformers.LlavaForConditionalGeneration)  # fmt: skip
    model = cls(config).eval()
    _randomise(model, seed, scale)
    return model


# LLaVA-NeXT at the tiny scale: 28 px tiles (4 x 4 patches of 7 px), pinpoints listed as (height, width).
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def llava_next_hf_config(text: dict | None = None, vision: dict | None = None, text_model: str = "llama",
                         **kwargs) -> transformers.LlavaNextConfig:  # fmt: skip
    base = llava_hf_config(text, vision, text_model)
    kwargs = {"image_token_index": IMAGE_TOKEN, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
              "image_grid_pinpoints": PINPOINTS, **kwargs}  # fmt: skip
    return transformers.LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config, **kwargs)


def next_image_processor(pinpoints=PINPOINTS, tile: int = 28) -> transformers.LlavaNextImageProcessor:
    return transformers.LlavaNextImageProcessor(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=[list(p) for p in pinpoints],
    )  # fmt: skip


def _randomise(model: torch.nn.Module, seed: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "layer_norm1.weight", "layer_norm2.weight", "norm.weight",
                              "pre_layrnorm.weight", "post_layernorm.weight")):  # fmt: skip
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen) / max(1, p.shape[-1]) ** 0.25)


def save(model, directory: str, layout: str = "save_pretrained") -> str:
    """Writes config.json + model.safetensors in one of the key layouts found in the wild.

    "save_pretrained": what transformers 5 itself writes (`language_model.model.*`, `vision_tower.*`);
    "hub": the published llava-hf layout (`language_model.model.*`, `vision_tower.vision_model.*`,
    `language_model.lm_head.weight`); "v5": transformers 5's module names (`model.language_model.*`,
    `model.vision_tower.*`, `lm_head.weight`), as a state_dict dump or a 4.5x save holds them.
    """
    model.save_pretrained(directory)
    if layout != "save_pretrained":
        from safetensors.torch import save_file

        rename = {"hub": to_hub, "v5": lambda k: k}[layout]
        tensors = {rename(k): v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            tensors.pop(rename("lm_head.weight"), None)
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return directory


def to_hub(key: str) -> str:
    """transformers 5 module name -> published llava-hf key."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline")):  # fmt: skip
        if key.startswith(new):
            return old + key[len(new) :]
    raise KeyError(key)


def reference_logits(model, input_ids, pixel_values=None, attention_mask=None, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
            pixel_values=None if pixel_values is None else torch.as_tensor(np.asarray(pixel_values)),
            attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)),
            **kwargs,
        )
    return out.logits.float().numpy()


def image(size_hw, seed=0):
    """A random RGB PIL image of (height, width)."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size_hw, 3), dtype=np.uint8))


def leaves(pipe) -> dict[str, np.ndarray]:
    """A Pipeline's parameters by dotted path."""
    from flax import nnx

    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(pipe._state)}


def sequence(rng, image_token, counts):
    """Token ids: text, then for each count that many image tokens followed by more text."""
    parts = [rng.integers(1, 90, 5)]
    for i, n in enumerate(counts):
        parts += [np.full(n, image_token), rng.integers(1, 90, 4 + 3 * (i % 2))]
    return np.concatenate(parts)
