"""llama.cpp GGUF pairs: the language model (`*.gguf`) and its multimodal projector (`mmproj-*.gguf`).

The language model is what llama.cpp's convert_hf_to_gguf.py writes for a LLaMA/Mistral/Vicuna text
model (general.architecture "llama"): `token_embd.weight`, `blk.{i}.attn_norm|attn_q|attn_k|attn_v|
attn_output|ffn_norm|ffn_gate|ffn_up|ffn_down.weight`, `output_norm.weight`, `output.weight` (absent
when the head is tied), and `llama.*` hyperparameters. The converter permutes the rows of attn_q and
attn_k (per head, the two rotate-half halves are interleaved for ggml's RoPE); `rope_rows_to_hf`
undoes it.

The projector file is what examples/llava (now tools/mtmd/legacy-models) convert_image_encoder_to_gguf.py
writes (general.architecture "clip", clip.projector_type "mlp"): the CLIP tower as `v.patch_embd.weight`,
`v.class_embd`, `v.position_embd.weight`, `v.pre_ln.*`, `v.blk.{i}.{ln1,attn_q,attn_k,attn_v,attn_out,
ln2,ffn_up,ffn_down}.*`; the 'mlp2x_gelu' projector as `mm.0.*`, `mm.2.*`; LLaVA-1.6's
`model.image_newline` (newer llama.cpp names it `v.image_newline`); and `clip.vision.*` metadata. How
llama.cpp reads it, and so how it is read here:

- The converter drops the tower's layers past the one LLaVA reads (and post_layernorm): without
  `clip.vision.feature_layer` the features are the output of the last stored layer (LLaVA's -2 of
  the full tower). (llama.cpp's graph runs one layer fewer than it stores, llama.cpp issue #25817;
  the projector was trained on the layer stored last.) With `clip.vision.feature_layer` (HF indices,
  non-negative: 0 = the embeddings) those hidden states are concatenated.
- The old converter names CLIP's fc1 `ffn_down` and fc2 `ffn_up`; newer ones name them the other way
  round. As clip.cpp does, the tensor whose input dimension is the tower's width is fc1.
- `clip.vision.image_grid_pinpoints` is the flattened list of the original config's pairs, which
  clip.cpp reads as (width, height), as the original LLaVA code does: GGUF pairs are processed with
  the original LLaVA's semantics ('pad' for 1.5, its anyres for 1.6), like original checkpoints.
- The image token is the first id past the embedding table (as for original checkpoints); `<image>`
  in a prompt is replaced by it whatever the tokenizer makes of the text.

Tensors of any type the `gguf` package dequantizes (F16, BF16, Q8_0, Q4_K, ...) are read as float32
and cast to the parameter dtype.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import numpy as np

from llava_jax.checkpoints.gguf_file import GGUFFile, is_gguf
from llava_jax.checkpoints.hf import layer_norm, linear, patch_to_file, patch_to_model
from llava_jax.checkpoints.params import Rule, transpose
from llava_jax.checkpoints.safetensors_io import CheckpointError
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.errors import ConfigError, MissingInputError, UnsupportedError

IMAGE_NEWLINE_KEYS = ("model.image_newline", "v.image_newline")
POST_LN_KEYS = ("v.post_ln.weight", "v.post_ln.bias")
_VISION_LAYER = re.compile(r"v\.blk\.(\d+)\.")
_MERGE_TYPES = ("flat", "spatial", "spatial_unpad")


# -- finding the two files ------------------------------------------------------------------------


def is_gguf_checkpoint(path: str) -> bool:
    """A GGUF file, or a directory holding .gguf files."""
    if os.path.isdir(path):
        return bool(glob.glob(os.path.join(path, "*.gguf")))
    return path.endswith(".gguf") or is_gguf(path)


def find_pair(path: str, mmproj: str | None = None) -> tuple[str, str]:
    """(language model file, projector file) from a .gguf file plus `mmproj`, or a directory holding
    exactly one `mmproj*.gguf` and one other `.gguf`."""
    if os.path.isdir(path):
        if mmproj is not None:
            raise ConfigError(f"{path} is a directory; pass the language-model .gguf file as path with mmproj=")
        files = sorted(glob.glob(os.path.join(path, "*.gguf")))
        projectors = [f for f in files if os.path.basename(f).startswith("mmproj")]
        models = [f for f in files if f not in projectors]
        if len(projectors) != 1 or len(models) != 1:
            raise CheckpointError(
                f"{path} holds {len(models)} language-model .gguf file(s) {[os.path.basename(f) for f in models]} "
                f"and {len(projectors)} mmproj*.gguf file(s) {[os.path.basename(f) for f in projectors]}; a GGUF "
                "directory must hold exactly one of each, otherwise pass the model file as path and mmproj=FILE"
            )
        return models[0], projectors[0]
    if mmproj is None:
        raise CheckpointError(
            f"{path} is a GGUF language model; LLaVA also needs its multimodal projector file: pass "
            "mmproj=PATH/mmproj-*.gguf (infer.py: --mmproj), or put both files in one directory and pass that"
        )
    if not os.path.isfile(mmproj):
        raise MissingInputError(f"mmproj file {mmproj} does not exist")
    return path, mmproj


# -- the RoPE row permutation ------------------------------------------------------------------------


def rope_rows_to_hf(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes convert_hf_to_gguf's Q/K permutation. w: [num_heads * head_dim, ...] (weight or bias).

    Per head, the converter interleaves the rotate-half halves: its row 2j is HF row j, its row 2j+1
    HF row j + head_dim/2.
    """
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_rows_to_gguf(w: np.ndarray, num_heads: int) -> np.ndarray:
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- the two files as one tensor source ---------------------------------------------------------------


class GGUFPair:
    """Both files' tensors under one set of keys, with the projector file's quirks resolved:

    - `v.blk.{i}.fc1.*` / `v.blk.{i}.fc2.*`: CLIP's fc1/fc2, whichever way the file names them;
    - `image_newline`: `model.image_newline` or `v.image_newline`;
    - `v.post_ln.*`: the file's, or an identity LayerNorm where the converter dropped it (LLaVA reads
      hidden states before it; the model holds the parameter, so something must fill it).
    """

    def __init__(self, model_path: str, mmproj_path: str):
        self.text = GGUFFile(model_path)
        self.mmproj = GGUFFile(mmproj_path)
        if self.text.get("general.architecture") == "clip":
            raise CheckpointError(f"{model_path} is a multimodal projector (architecture 'clip'); pass the language "
                                  "model .gguf as path and this file as mmproj=")  # fmt: skip
        self._where: dict[str, tuple[GGUFFile, str]] = {k: (self.text, k) for k in self.text.keys()}
        width = self.mmproj.get("clip.vision.embedding_length")
        projector_keys = set(self.mmproj.keys())
        for key in projector_keys:
            self._where[self._canonical(key, width, projector_keys)] = (self.mmproj, key)
        self._synthetic: dict[str, np.ndarray] = {}
        if width is not None:
            for key, fill in zip(POST_LN_KEYS, (np.ones, np.zeros)):
                if key not in self._where:
                    self._synthetic[key] = fill((int(width),), np.float32)

    def _canonical(self, key: str, width: int | None, keys: set[str]) -> str:
        if key in IMAGE_NEWLINE_KEYS:
            return "image_newline"
        match = re.fullmatch(r"(v\.blk\.\d+\.)ffn_(up|down)\.(weight|bias)", key)
        if not match:
            return key
        prefix, name, _ = match.groups()
        down = self.mmproj.shape(f"{prefix}ffn_down.weight") if f"{prefix}ffn_down.weight" in keys else None
        swapped = down is not None and down[-1] == width  # ffn_down takes the tower's width in: it is fc1
        fc = {("down", True): "fc1", ("up", True): "fc2", ("up", False): "fc1", ("down", False): "fc2"}[name, swapped]
        return key.replace(f"ffn_{name}", fc)

    def keys(self) -> list[str]:
        return [*self._where, *self._synthetic]

    def file_key(self, key: str) -> str:
        if key in self._synthetic:
            return f"{key} (absent from {self.mmproj.path}: an identity LayerNorm, unused by LLaVA)"
        if key not in self._where:
            return key
        source, file_key = self._where[key]
        return f"{file_key} (in {source.path})"

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._synthetic:
            return self._synthetic[key].shape
        source, file_key = self._where[key]
        return source.shape(file_key)

    def read_quantized(self, key: str, spec) -> tuple[np.ndarray, np.ndarray] | None:
        """See GGUFFile.read_quantized."""
        if key in self._synthetic:
            return None
        source, file_key = self._where[key]
        return source.read_quantized(file_key, spec)

    def quant_type(self, key: str) -> str:
        source, file_key = self._where[key]
        return source.quant_type(file_key)

    def read(self, key: str) -> np.ndarray:
        if key in self._synthetic:
            return self._synthetic[key]
        source, file_key = self._where[key]
        return source.read(file_key)


# -- configuration from the metadata ------------------------------------------------------------------


def text_config_from_gguf(f: GGUFFile, vocab_size: int, tied: bool, attention_bias: bool) -> TextConfig:
    arch = f.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{f.path} has general.architecture {arch!r}; only 'llama' language models (LLaMA, Vicuna, Mistral, "
            "as llama.cpp converts LLaVA's) are supported"
        )
    heads = int(f.require("llama.attention.head_count"))
    hidden = int(f.require("llama.embedding_length"))
    head_dim = int(f.get("llama.attention.key_length", hidden // heads))
    rotary = int(f.get("llama.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise UnsupportedError(f"{f.path}: partial RoPE (rope.dimension_count {rotary} < head_dim {head_dim}) "
                                  "is not supported")  # fmt: skip
    if "rope_freqs.weight" in f.keys():
        raise UnsupportedError(f"{f.path} carries rope_freqs.weight (LLaMA-3 RoPE scaling), which is not supported")
    scaling = f.get("llama.rope.scaling.type", "none")
    factor = 1.0
    if scaling == "linear":
        factor = float(f.require("llama.rope.scaling.factor"))
    elif scaling != "none":
        raise UnsupportedError(f"{f.path}: RoPE scaling {scaling!r} is not supported (only none and linear)")
    if "llama.rope.scale_linear" in f.metadata:  # the older key
        factor = float(f.metadata["llama.rope.scale_linear"])
    window = f.get("llama.attention.sliding_window")
    return TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(f.require("llama.feed_forward_length")),
        num_layers=int(f.require("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(f.get("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(f.require("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(f.get("llama.rope.freq_base", 10000.0)),
        rope_scaling_factor=factor,
        max_position_embeddings=int(f.get("llama.context_length", 4096)),
        sliding_window=int(window) if window else None,
        tie_word_embeddings=tied,
        hidden_act="silu",
        attention_bias=attention_bias,
    )


def stored_vision_layers(f: GGUFFile) -> int:
    """How many encoder layers the projector file holds (the converter drops the unused last ones)."""
    indices = {int(m.group(1)) for k in f.keys() if (m := _VISION_LAYER.match(k))}
    return max(indices) + 1 if indices else 0


def vision_config_from_gguf(f: GGUFFile) -> VisionConfig:
    if f.get("general.architecture") != "clip":
        raise CheckpointError(f"{f.path} is not a multimodal projector: general.architecture is "
                              f"{f.get('general.architecture')!r}, expected 'clip'")  # fmt: skip
    if f.get("clip.has_vision_encoder") is False:
        raise CheckpointError(f"{f.path} holds no vision encoder (clip.has_vision_encoder is false)")
    return VisionConfig(
        hidden_size=int(f.require("clip.vision.embedding_length")),
        intermediate_size=int(f.require("clip.vision.feed_forward_length")),
        num_layers=stored_vision_layers(f),
        num_heads=int(f.require("clip.vision.attention.head_count")),
        image_size=int(f.require("clip.vision.image_size")),
        patch_size=int(f.require("clip.vision.patch_size")),
        layer_norm_eps=float(f.get("clip.vision.attention.layer_norm_epsilon", 1e-5)),
        hidden_act="gelu" if f.get("clip.use_gelu") else "quick_gelu",
    )


def _check_projector(f: GGUFFile) -> None:
    kind = f.get("clip.projector_type", "mlp")
    keys = set(f.keys())
    if kind != "mlp":
        raise UnsupportedError(f"{f.path}: clip.projector_type {kind!r} is not supported; LLaVA's is 'mlp'")
    if "mm.3.weight" in keys:
        raise UnsupportedError(f"{f.path}: the 'mlp' projector with layer norms (mm.1, mm.3, mm.4: Yi-VL style) "
                                  "is not supported; LLaVA's is mm.0 -> GELU -> mm.2")  # fmt: skip
    if "mm.0.weight" in keys and "mm.2.weight" not in keys:
        raise UnsupportedError(f"{f.path}: a one-layer projector (mm.0 without mm.2) is not supported; LLaVA's "
                                  "'mlp2x_gelu' is mm.0 -> GELU -> mm.2")  # fmt: skip


def _pinpoints(f: GGUFFile) -> tuple[tuple[int, int], ...] | None:
    flat = f.get("clip.vision.image_grid_pinpoints")
    if not flat:
        return None
    if len(flat) % 2:
        raise CheckpointError(f"{f.path}: clip.vision.image_grid_pinpoints has an odd number of values {flat}")
    return tuple((int(a), int(b)) for a, b in zip(flat[0::2], flat[1::2]))


def config_from_gguf(pair: GGUFPair) -> LlavaConfig:
    text, mmproj = pair.text, pair.mmproj
    if "token_embd.weight" not in text.keys():
        raise CheckpointError(f"{text.path} has no token_embd.weight")
    vocab_size = text.shape("token_embd.weight")[0]
    tied = "output.weight" not in text.keys()
    text_config = text_config_from_gguf(text, vocab_size, tied, "blk.0.attn_q.bias" in text.keys())
    vision = vision_config_from_gguf(mmproj)
    _check_projector(mmproj)
    feature_layer = mmproj.get("clip.vision.feature_layer")
    if feature_layer:
        layers = tuple(int(x) for x in feature_layer)
        layer: int | tuple[int, ...] = layers[0] if len(layers) == 1 else layers
    else:
        layer = -1  # the last stored layer (see the module docstring)
    pinpoints = _pinpoints(mmproj)
    aspect = mmproj.get("clip.vision.image_aspect_ratio") or ("anyres" if pinpoints else "pad")
    if aspect == "anyres" and pinpoints is None:
        raise CheckpointError(f"{mmproj.path}: image_aspect_ratio 'anyres' needs clip.vision.image_grid_pinpoints")
    merge = mmproj.get("clip.vision.mm_patch_merge_type", "flat") if aspect == "anyres" else "flat"
    if merge not in _MERGE_TYPES:
        raise UnsupportedError(f"{mmproj.path}: mm_patch_merge_type {merge!r} is not supported ({_MERGE_TYPES})")
    return LlavaConfig(
        vision=vision,
        text=text_config,
        projector_type="mlp2x_gelu",
        projector_bias=True,
        vision_feature_layer=layer,
        vision_feature_select_strategy="default",
        image_token_id=vocab_size,
        image_aspect_ratio=aspect,
        image_grid_pinpoints=pinpoints if aspect == "anyres" else None,
        patch_merge_type=merge,
        semantics="original",
    )


def image_processor_overrides(mmproj: GGUFFile) -> dict[str, Any]:
    """preprocessor_config.json-style fields from the projector's metadata (mean and std)."""
    out = {}
    for key in ("image_mean", "image_std"):
        value = mmproj.get(f"clip.vision.{key}")
        if value is not None:
            out[key] = [float(v) for v in value]
    return out


def side_metadata(path: str, mmproj: str | None = None) -> tuple[str, dict[str, Any] | None, dict[str, Any]]:
    """What a GGUF pair carries besides weights: (language model file, its metadata where it holds a
    tokenizer (`tokenizer.ggml.model`) else None, `image_processor_overrides` of the projector)."""
    model_path, mmproj_path = find_pair(path, mmproj)
    metadata = GGUFFile(model_path).metadata
    tokenizer_metadata = metadata if "tokenizer.ggml.model" in metadata else None
    return model_path, tokenizer_metadata, image_processor_overrides(GGUFFile(mmproj_path))


# -- rules ---------------------------------------------------------------------------------------------


def text_rules(cfg: LlavaConfig, path: str = "decoder") -> list[Rule]:
    text, lp = cfg.text, "blk.{i}."
    q_heads, kv_heads = text.num_heads, text.num_kv_heads
    rules = [
        Rule(f"{path}.embed", "token_embd.weight"),
        Rule(f"{path}.norm.scale", "output_norm.weight"),
        Rule(f"{path}.layers.input_norm.scale", f"{lp}attn_norm.weight"),
        Rule(f"{path}.layers.post_attn_norm.scale", f"{lp}ffn_norm.weight"),
        *linear(f"{path}.layers.attn.q_proj", f"{lp}attn_q", text.attention_bias,
                 lambda w: rope_rows_to_hf(w, q_heads), lambda w: rope_rows_to_gguf(w, q_heads)),
        *linear(f"{path}.layers.attn.k_proj", f"{lp}attn_k", text.attention_bias,
                 lambda w: rope_rows_to_hf(w, kv_heads), lambda w: rope_rows_to_gguf(w, kv_heads)),
        *linear(f"{path}.layers.attn.v_proj", f"{lp}attn_v", text.attention_bias),
        *linear(f"{path}.layers.attn.o_proj", f"{lp}attn_output", text.attention_bias),
        *linear(f"{path}.layers.mlp.gate_proj", f"{lp}ffn_gate", text.mlp_bias),
        *linear(f"{path}.layers.mlp.up_proj", f"{lp}ffn_up", text.mlp_bias),
        *linear(f"{path}.layers.mlp.down_proj", f"{lp}ffn_down", text.mlp_bias),
    ]  # fmt: skip
    if not text.tie_word_embeddings:
        rules.append(Rule(f"{path}.lm_head.kernel", "output.weight", transpose, transpose))
    return rules


def vision_rules(path: str = "vision") -> list[Rule]:
    lp = "v.blk.{i}."
    rules = [
        Rule(f"{path}.patch_embed", "v.patch_embd.weight", patch_to_model, patch_to_file),
        Rule(f"{path}.class_embed", "v.class_embd"),
        Rule(f"{path}.pos_embed", "v.position_embd.weight"),
        *layer_norm(f"{path}.pre_norm", "v.pre_ln"),
        *layer_norm(f"{path}.post_norm", "v.post_ln"),
        *layer_norm(f"{path}.layers.norm1", f"{lp}ln1"),
        *layer_norm(f"{path}.layers.norm2", f"{lp}ln2"),
        *linear(f"{path}.layers.mlp.fc1", f"{lp}fc1", True),
        *linear(f"{path}.layers.mlp.fc2", f"{lp}fc2", True),
    ]
    for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_out")):
        rules += linear(f"{path}.layers.attn.{ours}", f"{lp}{theirs}", True)
    return rules


def gguf_rules(cfg: LlavaConfig) -> list[Rule]:
    """Every parameter of a LlavaModel for `cfg`, under GGUFPair's keys."""
    rules = text_rules(cfg) + vision_rules()
    rules += linear("projector.linears.0", "mm.0", True) + linear("projector.linears.1", "mm.2", True)
    if cfg.has_image_newline:
        rules.append(Rule("image_newline", "image_newline"))
    return rules


def gguf_ignored(cfg: LlavaConfig) -> tuple[str, ...]:
    # An image_newline the merge type does not use (clip.cpp ignores it too).
    return () if cfg.has_image_newline else ("image_newline",)


def load_gguf(path: str, mmproj: str | None = None) -> tuple[LlavaConfig, GGUFPair]:
    """(config, tensors) of a GGUF pair (see find_pair for what `path` and `mmproj` may be)."""
    model_path, mmproj_path = find_pair(path, mmproj)
    pair = GGUFPair(model_path, mmproj_path)
    return config_from_gguf(pair), pair
