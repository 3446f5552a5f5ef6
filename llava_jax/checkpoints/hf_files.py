"""The JSON files of a llava-hf directory, built from our config: config.json (LlavaConfig /
LlavaNextConfig with text and vision configs), the image processor and processor configs; and the
checks that refuse what transformers cannot compute the same way (see hf_export.py).

Field names and values are those transformers 5 writes with `save_pretrained`.
"""

from __future__ import annotations

from llava_jax.config import LlavaConfig
from llava_jax.data.image import ImageProcessor
from llava_jax.errors import CheckpointError, ConfigError

IMAGE_TOKEN = "<image>"


def check_exportable(config: LlavaConfig) -> None:
    """Raises ConfigError where transformers' LLaVA / LLaVA-NeXT cannot compute what this model computes."""
    if config.projector_type != "mlp2x_gelu":
        raise ConfigError(f"projector_type {config.projector_type!r} cannot be exported to llava-hf: transformers' "
                          "LLaVA projector is 'mlp2x_gelu' (linear_1, GELU, linear_2)")  # fmt: skip
    if config.semantics != "hf":
        raise ConfigError(
            "this model follows the original LLaVA's rules (semantics='original'): its prompts tokenize the text "
            "between images piece by piece with one image marker outside the vocabulary (image_token_id "
            f"{config.image_token_id}), and its anyres tiling (pinpoints as width x height on ties, unpad rounding) "
            "differs from transformers'; an export would not compute the same. For an original checkpoint use "
            "transformers' own conversion script (convert_llava_weights_to_hf.py) or the llava-hf release"
        )
    if config.is_anyres and config.patch_merge_type != "spatial_unpad":
        raise ConfigError(f"patch_merge_type {config.patch_merge_type!r} cannot be exported: transformers' "
                          "LLaVA-NeXT merges tiles as 'spatial_unpad'")  # fmt: skip


def text_config(config: LlavaConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None) -> dict:
    t = config.text
    rope = {"rope_theta": t.rope_theta, "rope_type": "default"}
    if t.rope_scaling_factor != 1.0:
        rope = {"rope_theta": t.rope_theta, "rope_type": "linear", "factor": t.rope_scaling_factor}
    out = {
        "model_type": "mistral" if t.sliding_window is not None else "llama",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim, "hidden_act": t.hidden_act, "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps, "rope_parameters": rope, "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
    }  # fmt: skip
    if t.sliding_window is not None:
        if t.attention_bias or t.mlp_bias:
            raise ConfigError("a Mistral text model (sliding_window set) with attention_bias or mlp_bias has no "
                              "transformers equivalent")  # fmt: skip
        out["sliding_window"] = t.sliding_window
    else:
        out.update(attention_bias=t.attention_bias, mlp_bias=t.mlp_bias)
    return out


def vision_config(config: LlavaConfig) -> dict:
    v = config.vision
    return {
        "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
        "patch_size": v.patch_size, "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act,
    }  # fmt: skip


def hf_config(config: LlavaConfig, dtype: str, bos_id=None, eos_id=None, pad_id=None) -> dict:
    """config.json of a LlavaForConditionalGeneration / LlavaNextForConditionalGeneration."""
    next_ = config.is_anyres
    layer = config.vision_feature_layer
    out = {
        "architectures": ["LlavaNextForConditionalGeneration" if next_ else "LlavaForConditionalGeneration"],
        "model_type": "llava_next" if next_ else "llava",
        "dtype": dtype,
        "image_token_index": config.image_token_id,
        "image_seq_length": config.tokens_per_tile,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": config.projector_bias,
        "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "tie_word_embeddings": config.text.tie_word_embeddings,
        "text_config": text_config(config, bos_id, eos_id, pad_id),
        "vision_config": vision_config(config),
    }
    if next_:
        out["image_grid_pinpoints"] = [list(p) for p in config.image_grid_pinpoints]
    return out


def image_processor_config(ip: ImageProcessor) -> dict:
    """The transformers image processor equal to `ip`: CLIPImageProcessor ('square'),
    LlavaImageProcessor with do_pad ('pad': LLaVA-1.5's expand to square), LlavaNextImageProcessor ('anyres')."""
    size = {"shortest_edge": ip.shortest_edge} if ip.size_hw is None else {"height": ip.size_hw[0], "width": ip.size_hw[1]}
    out = {
        "image_processor_type": {"square": "CLIPImageProcessor", "pad": "LlavaImageProcessor",
                                 "anyres": "LlavaNextImageProcessor"}[ip.aspect_ratio],  # fmt: skip
        "do_resize": ip.do_resize, "size": size, "resample": ip.resample,
        "do_center_crop": ip.do_center_crop, "do_rescale": ip.do_rescale, "rescale_factor": ip.rescale_factor,
        "do_normalize": ip.do_normalize, "image_mean": list(ip.image_mean), "image_std": list(ip.image_std),
        "do_convert_rgb": True,
    }  # fmt: skip
    if ip.crop_hw is not None:
        out["crop_size"] = {"height": ip.crop_hw[0], "width": ip.crop_hw[1]}
    if ip.aspect_ratio == "pad":
        out["do_pad"] = True
    if ip.aspect_ratio == "anyres":
        out.update(do_pad=True, image_grid_pinpoints=[list(p) for p in ip.image_grid_pinpoints])
    return out


def processor_config(config: LlavaConfig, ip: ImageProcessor) -> dict:
    return {
        "processor_class": "LlavaNextProcessor" if config.is_anyres else "LlavaProcessor",
        "image_processor": image_processor_config(ip),
        "image_token": IMAGE_TOKEN,
        "patch_size": config.vision.patch_size,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "num_additional_image_tokens": 1,  # CLIP's class token, dropped again under 'default'
    }


def check_image_processor(config: LlavaConfig, ip: ImageProcessor) -> None:
    if ip.semantics != "hf" and ip.aspect_ratio == "anyres":
        raise ConfigError("the image processor follows the original LLaVA's anyres rules; transformers' does not")
    if (ip.aspect_ratio == "anyres") != config.is_anyres:
        raise ConfigError(f"image processor aspect_ratio {ip.aspect_ratio!r} does not fit the model "
                          f"(image_grid_pinpoints {'set' if config.is_anyres else 'unset'})")  # fmt: skip


def check_tokenizer(tokenizer, config: LlavaConfig) -> None:
    """transformers' processor marks images by the `<image>` token: it must be the model's image_token_id."""
    try:
        token_id = tokenizer.token_to_id(IMAGE_TOKEN)
    except KeyError:
        token_id = None
    if token_id != config.image_token_id:
        raise CheckpointError(
            f"the tokenizer's {IMAGE_TOKEN} is {'absent' if token_id is None else f'id {token_id}'} but the model's "
            f"image_token_id is {config.image_token_id}; transformers' processor would not mark image positions. "
            "Export a model whose tokenizer has <image> added at image_token_id (llava-hf's convention)"
        )
