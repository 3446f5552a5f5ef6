"""Original LLaVA checkpoints (haotian-liu/LLaVA: LlavaLlamaForCausalLM, LlavaMistralForCausalLM).

A directory holds config.json (a LLaMA or Mistral config plus `mm_*` keys), the tokenizer, and
weights (safetensors, or PyTorch .bin shards) under the original module names:

    model.embed_tokens.weight, model.layers.{i}.*, model.norm.weight, lm_head.weight
    model.mm_projector.{weight,bias}             'linear' (LLaVA 1.0)
    model.mm_projector.{0,2,4,..}.{weight,bias}  'mlpNx_gelu': Sequential(Linear, GELU, Linear, ...)
    model.image_newline                          'spatial_unpad' (LLaVA 1.6)
    model.vision_tower.vision_tower.vision_model.*   present where the tower was saved or fine-tuned

The vision tower's config, preprocessing and weights come from a separate CLIP directory
(`mm_vision_tower`, e.g. openai/clip-vit-large-patch14-336, a CLIPModel with `vision_model.*` keys;
or a CLIPVisionModel: `vision_model.*` keys, or bare `embeddings.*`, `encoder.*` ... as transformers 5
saves it). Tower weights in the checkpoint itself win over the CLIP directory's: a 1.6
checkpoint carries its fine-tuned tower (`unfreeze_mm_vision_tower`), a 1.5 one an unchanged copy.

Image positions: the original puts one IMAGE_TOKEN_INDEX (-200) per image into input_ids and splices
the features in inside the model. Here input_ids hold one image token per feature, as for llava-hf,
and its id is `vocab_size`: the first id past the embedding table, which no tokenizer of the
checkpoint produces, and the `image_token_index` llava-hf gave the converted releases (32000 for the
7B/13B Vicuna and Mistral models, 64000 for Yi-34B), so both kinds of checkpoint take the same ids.
"""

from __future__ import annotations

import ast
import json
import os
from typing import Any

import numpy as np

from llava_jax.checkpoints.hf import IGNORED, decoder_rules, linear, vision_rules
from llava_jax.checkpoints.params import Rule
from llava_jax.checkpoints.safetensors_io import CheckpointError
from llava_jax.checkpoints.torch_bin import has_weights, open_weights
from llava_jax.config import LlavaConfig, projector_depth, text_config_from_hf, vision_config_from_clip
from llava_jax.errors import ConfigError, UnsupportedError
from llava_jax.json_file import read_json_object

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
CLIP_PREFIX = "vision_model."  # a CLIPModel, or a CLIPVisionModel saved by transformers 4
# A CLIPVisionModel saved by transformers 5 has its vision_model.* keys without the prefix.
CLIP_BARE = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
# mm_vision_select_feature -> vision_feature_select_strategy
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
ASPECT_RATIOS = ("square", "pad", "anyres")
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
_TEXT_MODEL_TYPES = {"llava": "llama", "llava_llama": "llama", "llama": "llama",
                     "llava_mistral": "mistral", "mistral": "mistral"}  # fmt: skip
_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}


def is_original_config(cfg: dict[str, Any]) -> bool:
    """Whether a config.json dict is the original LLaVA's (its multimodal settings sit at the top level)."""
    return any(k in cfg for k in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size"))


def read_json(path: str) -> dict[str, Any]:
    return read_json_object(path, CheckpointError)


def find_vision_tower(directory: str, cfg: dict[str, Any], vision_tower: str | None = None) -> str:
    """The CLIP directory: `vision_tower` when given, else config.json's `mm_vision_tower` (an absolute
    path, or a path relative to the checkpoint directory)."""
    if vision_tower is not None:
        if not os.path.isdir(vision_tower):
            raise FileNotFoundError(
                f"vision_tower={vision_tower!r} is not a directory; pass the CLIP vision tower directory "
                "(config.json, preprocessor_config.json and weights), e.g. a copy of openai/clip-vit-large-patch14-336"
            )
        return vision_tower
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not name:
        raise CheckpointError(
            f"{directory}/config.json names no mm_vision_tower; pass vision_tower=PATH (a CLIP directory)"
        )
    path = name if os.path.isabs(name) else os.path.join(directory, name)
    if os.path.isdir(path):
        return path
    raise FileNotFoundError(
        f"the vision tower {name!r} that {directory}/config.json names (mm_vision_tower) is not a local directory "
        f"(looked for {path}); nothing is downloaded here: fetch {name} yourself and pass vision_tower=PATH to "
        "llava_jax.load"
    )


def _text_model_type(cfg: dict[str, Any]) -> str:
    model_type = cfg.get("model_type")
    architectures = cfg.get("architectures") or []
    if model_type in _TEXT_MODEL_TYPES:
        return _TEXT_MODEL_TYPES[model_type]
    for arch in architectures:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    raise UnsupportedError(
        f"original LLaVA model_type {model_type!r} (architectures {architectures}) is not supported; supported are "
        f"LLaMA/Vicuna/Yi (model_type llava, llava_llama) and Mistral (llava_mistral) text models"
    )


def _pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    """image_grid_pinpoints as written: a list of pairs, or its string form (the original accepts both)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"image_grid_pinpoints {value!r} is not a list of (a, b) pairs") from e
    try:
        return tuple((int(a), int(b)) for a, b in value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"image_grid_pinpoints {value!r} is not a list of (a, b) pairs") from e


def config_from_original(cfg: dict[str, Any], clip_config: dict[str, Any], **overrides) -> LlavaConfig:
    """A LlavaConfig from an original config.json dict and its CLIP directory's config.json dict."""
    text_type = _text_model_type(cfg)
    text = text_config_from_hf({**cfg, "model_type": text_type})
    vision = vision_config_from_clip(clip_config)
    projector_type = cfg.get("mm_projector_type", "linear")  # the original's default (LLaVA 1.0)
    try:
        projector_depth(projector_type)
    except ValueError:
        raise ConfigError(
            f"mm_projector_type {projector_type!r} is not supported; the original LLaVA builds 'linear', "
            "'mlpNx_gelu' (e.g. 'mlp2x_gelu') and 'identity'"
        ) from None
    if "mm_vision_select_layer" not in cfg:
        raise ConfigError("config.json lacks mm_vision_select_layer (the CLIP hidden state LLaVA reads, e.g. -2)")
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE:
        raise ConfigError(
            f"mm_vision_select_feature {feature!r} is not supported; expected one of {list(SELECT_FEATURE)}"
        )
    aspect = cfg.get("image_aspect_ratio") or "square"  # the original: anything else is plain CLIP preprocessing
    if aspect not in ASPECT_RATIOS:
        raise UnsupportedError(f"image_aspect_ratio {aspect!r} is not supported; expected one of {ASPECT_RATIOS}")
    merge = cfg.get("mm_patch_merge_type", "flat")
    if aspect == "anyres":
        if merge not in MERGE_TYPES:
            raise UnsupportedError(
                f"mm_patch_merge_type {merge!r} is not supported; the original LLaVA implements {MERGE_TYPES}"
            )
        if "image_grid_pinpoints" not in cfg:
            raise ConfigError("image_aspect_ratio 'anyres' needs image_grid_pinpoints in config.json")
        pinpoints = _pinpoints(cfg["image_grid_pinpoints"])
    else:
        # One tile per image: the original's features are then flat whatever mm_patch_merge_type says.
        merge, pinpoints = "flat", None
    if merge != "flat" and feature != "patch":
        raise ConfigError(
            f"mm_patch_merge_type {merge!r} needs mm_vision_select_feature 'patch' (the original asserts it)"
        )
    layer = cfg["mm_vision_select_layer"]
    kwargs: dict[str, Any] = dict(
        vision=vision,
        text=text,
        projector_type=projector_type,
        projector_bias=True,
        vision_feature_layer=tuple(layer) if isinstance(layer, list) else int(layer),
        vision_feature_select_strategy=SELECT_FEATURE[feature],
        image_token_id=text.vocab_size,
        image_aspect_ratio=aspect,
        image_grid_pinpoints=pinpoints,
        patch_merge_type=merge,
        semantics="original",
        model_max_length=cfg.get("tokenizer_model_max_length"),
    )
    kwargs.update(overrides)
    config = LlavaConfig(**kwargs)
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != config.projector_in_dim:
        raise ConfigError(
            f"config.json has mm_hidden_size {mm_hidden} but the vision tower gives {config.projector_in_dim} "
            "features per patch; is vision_tower the CLIP model this checkpoint was trained with?"
        )
    return config


def original_rules(cfg: LlavaConfig) -> list[Rule]:
    """Every parameter of a LlavaModel for `cfg`, under the original module names."""
    rules = vision_rules(VISION_PREFIX)
    rules += decoder_rules(cfg, "model.", "lm_head.weight")
    rules += mm_projector_rules(cfg)
    if cfg.has_image_newline:
        rules.append(Rule("image_newline", "model.image_newline"))
    return rules


def mm_projector_rules(cfg: LlavaConfig, prefix: str = "model.mm_projector") -> list[Rule]:
    """The projector under the original's names: `prefix.{weight,bias}` for 'linear', else
    Sequential(Linear, GELU, Linear, ...) with the linears at even indices `prefix.{0,2,..}.*`."""
    if cfg.projector_type == "linear":
        return linear("projector.linears.0", prefix, bias=True)
    return [r for i in range(projector_depth(cfg.projector_type))
            for r in linear(f"projector.linears.{i}", f"{prefix}.{2 * i}", bias=True)]  # fmt: skip


def original_ignored(cfg: LlavaConfig) -> tuple[str, ...]:
    # 'spatial_unpad' without anyres: the original creates image_newline but never uses it.
    return IGNORED + (() if cfg.has_image_newline else (r"model\.image_newline",))


class OriginalTensors:
    """A checkpoint's tensors plus its CLIP directory's `vision_model.*` ones, renamed to the checkpoint's
    `model.vision_tower.vision_tower.vision_model.*`; the checkpoint's own tower tensors win."""

    def __init__(self, directory: str, vision_dir: str):
        self.checkpoint = open_weights(directory)
        self._where: dict[str, tuple[Any, str, str]] = {}  # name -> (source, file key, directory)
        if has_weights(vision_dir):
            clip = open_weights(vision_dir)
            for key in clip.keys():  # a full CLIPModel also holds text_model.*, projections, logit_scale
                name = key[len(CLIP_PREFIX) :] if key.startswith(CLIP_PREFIX) else key
                if not name.startswith(CLIP_BARE):
                    continue
                if VISION_PREFIX + name in self._where:
                    raise CheckpointError(f"{vision_dir} holds {name} both with and without the {CLIP_PREFIX} prefix")
                self._where[VISION_PREFIX + name] = (clip, key, vision_dir)
        for key in self.checkpoint.keys():
            self._where[key] = (self.checkpoint, key, directory)
        if not any(k.startswith(VISION_PREFIX) for k in self._where):
            raise CheckpointError(
                f"no vision tower weights: {vision_dir} has no vision_model.* tensors (.safetensors or "
                f"pytorch_model.bin) and {directory} carries no {VISION_PREFIX}* ones"
            )

    def keys(self) -> list[str]:
        return list(self._where)

    def file_key(self, key: str) -> str:
        if key not in self._where:
            return key
        _, file_key, directory = self._where[key]
        return f"{file_key} (in {directory})"

    def shape(self, key: str) -> tuple[int, ...]:
        source, file_key, _ = self._where[key]
        return source.shape(file_key)

    def read(self, key: str) -> np.ndarray:
        source, file_key, _ = self._where[key]
        return source.read(file_key)


def load_original(directory: str, vision_tower: str | None = None) -> tuple[LlavaConfig, OriginalTensors, str]:
    """(config, tensors, CLIP directory) of an original checkpoint directory."""
    cfg = read_json(os.path.join(directory, "config.json"))
    vision_dir = find_vision_tower(directory, cfg, vision_tower)
    clip_config = read_json(os.path.join(vision_dir, "config.json"))
    config = config_from_original(cfg, clip_config)
    return config, OriginalTensors(directory, vision_dir), vision_dir
