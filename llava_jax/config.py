"""Model configuration: vision tower, projector, text decoder, and their LLaVA composition.

Configs are frozen dataclasses: hashable (usable as static jit arguments), serialisable to JSON with
`to_dict`/`from_dict`, and readable from a llava-hf `config.json` with `LlavaConfig.from_hf`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from llava_jax.errors import ConfigError, UnsupportedError
from llava_jax.json_file import read_json_object


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (HF `CLIPVisionConfig`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (exact erf)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of one image tile."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaMA-family decoder (LLaMA/Vicuna, Mistral, Yi): HF `LlamaConfig` / `MistralConfig`."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # linear RoPE scaling: positions are divided by this
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # Mistral: each token sees at most this many keys
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )


PROJECTOR_TYPES = ("linear", "identity", "mlpNx_gelu")
ATTENTION = ("auto", "xla", "blockwise", "cudnn", "splash")
_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


def projector_depth(projector_type: str) -> int:
    """Number of linear layers: 'linear' -> 1, 'identity' -> 0, 'mlp2x_gelu' -> 2, ..."""
    if projector_type == "linear":
        return 1
    if projector_type == "identity":
        return 0
    match = _MLP_GELU.match(projector_type)
    if not match or int(match.group(1)) < 1:
        raise ConfigError(f"unknown projector type {projector_type!r}; expected one of {PROJECTOR_TYPES}")
    return int(match.group(1))


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """A LLaVA model: vision tower -> projector -> decoder, plus how images become tokens.

    `vision_feature_layer` counts hidden states as HF does: 0 is the embeddings (after the
    pre-layernorm), i is the output of layer i, -1 the last; a tuple concatenates several.
    `image_grid_pinpoints` are the pairs as the checkpoint's config lists them: (height, width) under
    semantics "hf"; the original LLaVA code reads the same numbers as (width, height), so under
    semantics "original" they are kept as its config.json has them (see llava_jax.model.anyres).
    None means LLaVA 1.0/1.5 (one fixed-size tile per image).
    """

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"
    projector_bias: bool = True
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    image_token_id: int = 32000
    image_aspect_ratio: str = "pad"  # preprocessing: "square" (HF), "pad" (original 1.5), "anyres"
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    patch_merge_type: str = "flat"  # NeXT: "spatial_unpad" (image_newline per row), "spatial" or "flat"
    semantics: str = "hf"  # anyres rules of "hf" (transformers) or "original" (haotian-liu/LLaVA)
    model_max_length: int | None = None  # longest prompt trained on (original: tokenizer_model_max_length)
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations; attention softmax and norms run in float32
    attention: str = "auto"  # the attention kernel, one of ATTENTION (llava_jax.model.attention)

    def __post_init__(self):
        projector_depth(self.projector_type)
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                f"vision_feature_select_strategy must be 'default' or 'full', "
                f"got {self.vision_feature_select_strategy!r}"
            )
        n = self.vision.num_layers
        for layer in self.feature_layers:
            if not -(n + 1) <= layer <= n:
                raise ConfigError(f"vision_feature_layer {layer} is out of range for a {n}-layer vision tower")
        if self.attention not in ATTENTION:
            raise ConfigError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.semantics not in ("hf", "original"):
            raise ConfigError(f"semantics must be 'hf' or 'original', got {self.semantics!r}")
        if self.patch_merge_type not in ("flat", "spatial", "spatial_unpad"):
            raise ConfigError(
                f"patch_merge_type must be 'flat', 'spatial' or 'spatial_unpad', got {self.patch_merge_type!r}"
            )

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The selected vision hidden-state indices, as non-negative HF indices (0 = embeddings)."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        n = self.vision.num_layers
        return tuple(layer if layer >= 0 else n + 1 + layer for layer in layers)

    @property
    def is_anyres(self) -> bool:
        return self.image_grid_pinpoints is not None

    @property
    def has_image_newline(self) -> bool:
        """Whether the model holds `image_newline` (anyres with 'spatial_unpad')."""
        return self.is_anyres and self.patch_merge_type == "spatial_unpad"

    @property
    def tokens_per_tile(self) -> int:
        """Image features one vision tile yields (576 for CLIP-L/14 at 336 with 'default')."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    @property
    def context_length(self) -> int:
        """Positions the language model has (max_position_embeddings): prompt and reply together."""
        return self.text.max_position_embeddings

    @property
    def prompt_limit(self) -> int:
        """The longest prompt accepted: the length trained on where the checkpoint records it
        (model_max_length), else the context length."""
        return min(self.model_max_length or self.context_length, self.context_length)

    @property
    def projector_in_dim(self) -> int:
        return self.vision.hidden_size * len(self.feature_layers)

    def replace(self, **changes) -> "LlavaConfig":
        return dataclasses.replace(self, **changes)

    # -- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlavaConfig":
        d = dict(d)
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        if isinstance(d.get("vision_feature_layer"), list):
            d["vision_feature_layer"] = tuple(d["vision_feature_layer"])
        if d.get("image_grid_pinpoints") is not None:
            d["image_grid_pinpoints"] = tuple(tuple(p) for p in d["image_grid_pinpoints"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown LlavaConfig fields {sorted(unknown)}")
        return cls(vision=vision, text=text, **d)

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_json(cls, path: str) -> "LlavaConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str, **overrides) -> "LlavaConfig":
        """From a llava-hf `config.json` (a dict, the file, or its directory).

        Handles `model_type` "llava" and "llava_next" with llama or mistral text configs.
        """
        if isinstance(hf, str):
            path = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
            hf = read_json_object(path)
        model_type = hf.get("model_type")
        if model_type not in ("llava", "llava_next"):
            raise ConfigError(f"expected a llava-hf config with model_type 'llava' or 'llava_next', got {model_type!r}")
        text = text_config_from_hf(hf.get("text_config") or {})
        if hf.get("tie_word_embeddings") and not text.tie_word_embeddings:
            text = dataclasses.replace(text, tie_word_embeddings=True)
        act = hf.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise UnsupportedError(f"projector_hidden_act {act!r} is not supported (only 'gelu', exact erf)")
        layer = hf.get("vision_feature_layer", -2)
        kwargs: dict[str, Any] = dict(
            vision=vision_config_from_hf(hf.get("vision_config") or {}),
            text=text,
            projector_type="mlp2x_gelu",
            projector_bias=hf.get("multimodal_projector_bias", True),
            vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
            image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)),
            image_aspect_ratio="square",
            semantics="hf",
        )
        if model_type == "llava_next":
            pinpoints = hf.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
            kwargs.update(
                image_aspect_ratio="anyres",
                image_grid_pinpoints=tuple(tuple(p) for p in pinpoints),
                patch_merge_type="spatial_unpad",
            )
        kwargs.update(overrides)
        return cls(**kwargs)


_CLIP_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu",
)  # fmt: skip
# llava-hf configs omit what equals LlavaConfig's CLIP defaults (CLIP-L/14 at 336).
_LLAVA_CLIP_DEFAULTS = dict(
    _CLIP_DEFAULTS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, image_size=336, patch_size=14,
)  # fmt: skip


def vision_config_from_clip(hf: dict[str, Any]) -> VisionConfig:
    """From a CLIP directory's config.json: a CLIPVisionModel's, or a full CLIPModel's (its vision_config).

    Unlike llava-hf configs, a CLIP config omits what equals transformers' CLIPVisionConfig defaults.
    """
    if hf.get("model_type") == "clip":
        hf = hf.get("vision_config") or {}
    return vision_config_from_hf({**_CLIP_DEFAULTS, **hf})


def vision_config_from_hf(hf: dict[str, Any]) -> VisionConfig:
    hf = {**_LLAVA_CLIP_DEFAULTS, **hf}
    mt = hf.get("model_type", "clip_vision_model")
    if mt not in ("clip_vision_model", "clip"):
        raise UnsupportedError(f"vision tower model_type {mt!r} is not supported (only CLIP ViT)")
    if hf["hidden_act"] not in ("quick_gelu", "gelu"):
        raise UnsupportedError(f"vision hidden_act {hf['hidden_act']!r} is not supported")
    return VisionConfig(
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        image_size=hf["image_size"],
        patch_size=hf["patch_size"],
        num_channels=hf["num_channels"],
        layer_norm_eps=hf["layer_norm_eps"],
        hidden_act=hf["hidden_act"],
    )


_LLAMA_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048, hidden_act="silu",
    tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
)  # fmt: skip
_MISTRAL_DEFAULTS = dict(
    _LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8, rms_norm_eps=1e-6,
    max_position_embeddings=4096 * 32, sliding_window=4096,
)  # fmt: skip


def _rope(hf: dict[str, Any]) -> tuple[float, float]:
    """(theta, linear factor) from either `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = params.get("factor", scaling.get("factor", 1.0))
    if kind == "default":
        return float(theta), 1.0
    if kind == "linear":
        return float(theta), float(factor)
    raise UnsupportedError(f"RoPE scaling type {kind!r} is not supported (only 'default' and 'linear')")


def text_config_from_hf(hf: dict[str, Any]) -> TextConfig:
    mt = hf.get("model_type", "llama")
    if mt not in ("llama", "mistral"):
        raise UnsupportedError(f"text model_type {mt!r} is not supported (llama or mistral)")
    hf = {**(_MISTRAL_DEFAULTS if mt == "mistral" else _LLAMA_DEFAULTS), **hf}
    heads = hf["num_attention_heads"]
    theta, factor = _rope(hf)
    return TextConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=theta,
        rope_scaling_factor=factor,
        max_position_embeddings=hf["max_position_embeddings"],
        sliding_window=hf.get("sliding_window") if mt == "mistral" else None,
        tie_word_embeddings=hf["tie_word_embeddings"],
        hidden_act=hf["hidden_act"],
        attention_bias=hf["attention_bias"],
        mlp_bias=hf["mlp_bias"],
    )


# -- presets: moved to configs/models.py (the model presets live with the run configs) ---------------


def _models():
    """configs/models.py of this source checkout."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models.py")
    if not os.path.isfile(path):
        raise ImportError(f"the model presets live in configs/models.py of a source checkout; {path} is missing")
    spec = importlib.util.spec_from_file_location("llava_jax_config_presets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preset(name: str, **overrides) -> LlavaConfig:
    """Compatibility: `configs.models.preset`."""
    return _models().preset(name, **overrides)


def __getattr__(name: str):
    if name == "PRESETS":
        return _models().PRESETS
    raise AttributeError(name)
