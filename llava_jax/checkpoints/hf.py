"""llava-hf checkpoints (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration).

Three key layouts exist. The one published on the hub: `language_model.model.*`,
`language_model.lm_head.weight`, `vision_tower.vision_model.*`, `multi_modal_projector.*`,
`image_newline`. transformers 5's module names (what a state_dict holds, and what 4.5x releases
saved): `model.language_model.*`, `lm_head.weight`, `model.vision_tower.*` (4.5x kept
`vision_model.` below it), `model.multi_modal_projector.*`, `model.image_newline`. And what
transformers 5's `save_pretrained` writes: the hub names, but `vision_tower.*` without
`vision_model.`. Rules are written with transformers 5's module names; every key is renamed to them
on the way in.
"""

from __future__ import annotations

import numpy as np

from llava_jax.checkpoints.params import Rule, TensorSource, identity, transpose
from llava_jax.checkpoints.safetensors_io import CheckpointError, SafetensorsCheckpoint
from llava_jax.config import LlavaConfig, projector_depth

# (file prefix, canonical prefix), first match wins.
RENAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)
# Buffers some releases carry that are not parameters.
IGNORED = (r".*\.position_ids", r".*rotary_emb\.inv_freq")


def patch_to_model(w: np.ndarray) -> np.ndarray:
    """Conv weight [D, C, p, p] -> our patch kernel [p, p, C, D]."""
    return w.transpose(2, 3, 1, 0)


def patch_to_file(w: np.ndarray) -> np.ndarray:
    return w.transpose(3, 2, 0, 1)


def linear(path: str, key: str, bias: bool, rows_to_model=identity, rows_to_file=identity) -> list[Rule]:
    """A PyTorch Linear's weight [out, in] (and bias [out]) as our kernel [in, out] (and bias).
    rows_to_model / rows_to_file: a reordering of the output rows between file and model (GGUF's Q/K)."""
    rules = [Rule(f"{path}.kernel", f"{key}.weight", lambda w: rows_to_model(w).T, lambda k: rows_to_file(k.T))]
    return rules + ([Rule(f"{path}.bias", f"{key}.bias", rows_to_model, rows_to_file)] if bias else [])


def layer_norm(path: str, key: str) -> list[Rule]:
    return [Rule(f"{path}.scale", f"{key}.weight"), Rule(f"{path}.bias", f"{key}.bias")]


def vision_rules(prefix: str, path: str = "vision") -> list[Rule]:
    """CLIPVisionModel keys under `prefix` (e.g. 'model.vision_tower.')."""
    p, lp = prefix, f"{prefix}encoder.layers.{{i}}."
    rules = [
        Rule(f"{path}.patch_embed", f"{p}embeddings.patch_embedding.weight", patch_to_model, patch_to_file),
        Rule(f"{path}.class_embed", f"{p}embeddings.class_embedding"),
        Rule(f"{path}.pos_embed", f"{p}embeddings.position_embedding.weight"),
        *layer_norm(f"{path}.pre_norm", f"{p}pre_layrnorm"),
        *layer_norm(f"{path}.post_norm", f"{p}post_layernorm"),
        *layer_norm(f"{path}.layers.norm1", f"{lp}layer_norm1"),
        *layer_norm(f"{path}.layers.norm2", f"{lp}layer_norm2"),
        *linear(f"{path}.layers.mlp.fc1", f"{lp}mlp.fc1", True),
        *linear(f"{path}.layers.mlp.fc2", f"{lp}mlp.fc2", True),
    ]
    for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", "out_proj")):
        rules += linear(f"{path}.layers.attn.{ours}", f"{lp}self_attn.{theirs}", True)
    return rules


def decoder_rules(cfg: LlavaConfig, prefix: str, lm_head_key: str | None, path: str = "decoder") -> list[Rule]:
    """LlamaModel / MistralModel keys under `prefix` (e.g. 'model.language_model.')."""
    text, lp = cfg.text, f"{prefix}layers.{{i}}."
    rules = [
        Rule(f"{path}.embed", f"{prefix}embed_tokens.weight"),
        Rule(f"{path}.norm.scale", f"{prefix}norm.weight"),
        Rule(f"{path}.layers.input_norm.scale", f"{lp}input_layernorm.weight"),
        Rule(f"{path}.layers.post_attn_norm.scale", f"{lp}post_attention_layernorm.weight"),
    ]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules += linear(f"{path}.layers.attn.{name}", f"{lp}self_attn.{name}", text.attention_bias)
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules += linear(f"{path}.layers.mlp.{name}", f"{lp}mlp.{name}", text.mlp_bias)
    if not text.tie_word_embeddings:
        rules.append(Rule(f"{path}.lm_head.kernel", lm_head_key, transpose, transpose))
    return rules


def projector_rules(cfg: LlavaConfig, prefix: str, path: str = "projector") -> list[Rule]:
    return [r for i in range(projector_depth(cfg.projector_type))
            for r in linear(f"{path}.linears.{i}", f"{prefix}linear_{i + 1}", cfg.projector_bias)]  # fmt: skip


def hf_rules(cfg: LlavaConfig) -> list[Rule]:
    """Every parameter of a LlavaModel for `cfg`, in the transformers-5 key layout."""
    rules = vision_rules("model.vision_tower.")
    rules += decoder_rules(cfg, "model.language_model.", "lm_head.weight")
    rules += projector_rules(cfg, "model.multi_modal_projector.")
    if cfg.has_image_newline:
        rules.append(Rule("image_newline", "model.image_newline"))
    return rules


def hf_ignored(cfg: LlavaConfig) -> tuple[str, ...]:
    # transformers 4 saved the tied head too; it is the embedding again.
    return IGNORED + ((r"lm_head\.weight",) if cfg.text.tie_word_embeddings else ())


def canonical_key(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


class HFTensors:
    """A llava-hf safetensors directory with keys presented under transformers 5's module names."""

    def __init__(self, directory: str):
        self.source: TensorSource = SafetensorsCheckpoint(directory)
        self._original: dict[str, str] = {}
        for key in self.source.keys():
            name = canonical_key(key)
            if name in self._original:
                raise CheckpointError(f"{directory} holds both {self._original[name]} and {key}, which name the "
                                      "same parameter in different key layouts")  # fmt: skip
            self._original[name] = key

    def keys(self) -> list[str]:
        return list(self._original)

    def file_key(self, key: str) -> str:
        return self._original.get(key, key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(self._original[key])

    def read(self, key: str) -> np.ndarray:
        return self.source.read(self._original[key])
