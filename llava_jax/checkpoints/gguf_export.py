"""Writes a LlavaModel as the GGUF pair llama.cpp reads: the language model and its mmproj.

The language model is what llama.cpp's convert_hf_to_gguf.py writes for a LLaMA text model
(general.architecture "llama", `llama.*` hyperparameters, the SentencePiece vocabulary as
`tokenizer.ggml.*`, attn_q / attn_k rows permuted for ggml's RoPE: `gguf.text_rules` in reverse).
The projector file is what tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py writes for a
LLaVA model (general.architecture "clip", projector type "mlp"): the tower's layers up to the feature
layer (post_layernorm dropped), `clip.vision.feature_layer`, CLIP's fc1 as `ffn_down` and fc2 as
`ffn_up` (that converter's names), the projector as `mm.0` / `mm.2`, image mean and std, and for
LLaVA-1.6 the grid pinpoints as (width, height) pairs, `image_aspect_ratio` "anyres", the merge type
and `model.image_newline`. As that converter does, the patch embedding and projector weights are
float16 and 1-D tensors float32 whatever the output type.

outtype: "f32", "f16" (2-D weights) or "q8_0" (2-D weights of the language model whose rows divide
into 32-blocks; quantized by the `gguf` package, bit-exact with ggml's reference). A model loaded
quantized (llava_jax.quant) is dequantized tensor by tensor first.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import gguf
import jax
import numpy as np
from flax import nnx

from llava_jax import quant
from llava_jax.checkpoints.gguf import text_rules, vision_rules
from llava_jax.checkpoints.hf import linear
from llava_jax.checkpoints.params import Rule, flat_variables
from llava_jax.config import LlavaConfig
from llava_jax.errors import CheckpointError, ConfigError

OUTTYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # general.file_type (llama_ftype)
# sentencepiece piece types, as GGUF's tokenizer.ggml.token_type stores them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class FloatView:
    """Host float32 arrays of a model state by parameter path, one layer at a time; a quantized
    kernel ("...kernel" where the state holds "...qvalue" and "...scale") is dequantized."""

    def __init__(self, state: nnx.State):
        self.variables = flat_variables(state)

    def get(self, path: str, layer: int | None = None) -> np.ndarray:
        if path in self.variables:
            value = self.variables[path].get_value()
            return np.asarray(jax.device_get(value if layer is None else value[layer]), np.float32)
        base = path.rsplit(".", 1)[0]
        q, s = self.variables[base + ".qvalue"].get_value(), self.variables[base + ".scale"].get_value()
        if layer is not None:
            q, s = q[layer], s[layer]
        return np.asarray(jax.device_get(quant.dequantize(q, s, np.float32)), np.float32)


def _tensors(rules: list[Rule], view: FloatView, layers: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(file key, array in the file's layout) for each rule; stacked rules for their first `layers`."""
    for rule in rules:
        if rule.stacked:
            for i in range(layers):
                yield rule.key.format(i=i), np.ascontiguousarray(rule.to_file(view.get(rule.path, i)))
        else:
            yield rule.key, np.ascontiguousarray(rule.to_file(view.get(rule.path)))


def _add(writer: gguf.GGUFWriter, name: str, array: np.ndarray, outtype: str, *, quantizable: bool = True) -> None:
    """A tensor in the output type: 1-D (norms, biases) in float32; q8_0 where the rows fit 32-blocks."""
    array = np.asarray(array, np.float32)
    if array.ndim == 1 or outtype == "f32":
        writer.add_tensor(name, array)
    elif outtype == "q8_0" and quantizable and array.shape[-1] % 32 == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, array.astype(np.float16))


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# -- the language model -------------------------------------------------------------------------------


def sentencepiece_vocab(tokenizer_dir: str, vocab_size: int) -> dict:
    """tokenizer.ggml.* metadata of a checkpoint directory's tokenizer.model (+ added tokens from
    tokenizer_config.json / added_tokens.json), padded to the embedding size with unused [PAD{i}]."""
    import sentencepiece

    model_file = os.path.join(tokenizer_dir, "tokenizer.model")
    if not os.path.isfile(model_file):
        raise CheckpointError(f"{model_file} is missing: GGUF export writes the SentencePiece vocabulary, which needs "
                              "the checkpoint's tokenizer.model")  # fmt: skip
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    if sp.vocab_size() > vocab_size:
        raise CheckpointError(f"{model_file} has {sp.vocab_size()} pieces, more than the model's {vocab_size} "
                              "embeddings")  # fmt: skip
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        kind = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                else BYTE if sp.IsByte(i) else NORMAL)  # fmt: skip
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), float(sp.GetScore(i)), kind
    config = {}
    config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
    added_path = os.path.join(tokenizer_dir, "added_tokens.json")
    if os.path.isfile(added_path):
        with open(added_path) as f:
            for token, i in json.load(f).items():
                if i < vocab_size:
                    tokens[i], scores[i], types[i] = token, -1000.0, USER_DEFINED
    for i, entry in config.get("added_tokens_decoder", {}).items():  # these win, as in convert_hf_to_gguf
        if int(i) < vocab_size:
            tokens[int(i)], scores[int(i)] = entry["content"], -1000.0
            types[int(i)] = CONTROL if entry.get("special") else USER_DEFINED
    ids = {t: i for i, t in enumerate(tokens)}

    def special(name, default):
        value = config.get(name, default)
        value = value.get("content") if isinstance(value, dict) else value
        return ids.get(value)

    out = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
           "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
           "tokenizer.ggml.add_bos_token": bool(config.get("add_bos_token", True)),
           "tokenizer.ggml.add_eos_token": bool(config.get("add_eos_token", False))}  # fmt: skip
    for key, name, default in (("bos_token_id", "bos_token", sp.IdToPiece(sp.bos_id()) if sp.bos_id() >= 0 else None),
                               ("eos_token_id", "eos_token", sp.IdToPiece(sp.eos_id()) if sp.eos_id() >= 0 else None),
                               ("unknown_token_id", "unk_token", sp.IdToPiece(sp.unk_id())),
                               ("padding_token_id", "pad_token", None)):  # fmt: skip
        token_id = special(name, default)
        if token_id is not None:
            out[f"tokenizer.ggml.{key}"] = token_id
    return out


def write_language_model(path: str, state: nnx.State, config: LlavaConfig, tokenizer_dir: str | None,
                         outtype: str = "f16", name: str = "llava") -> str:  # fmt: skip
    text = config.text
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name(name)
    writer.add_file_type(OUTTYPES[outtype])
    writer.add_vocab_size(text.vocab_size)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_rope_dimension_count(text.head_dim)
    writer.add_head_count(text.num_heads)
    writer.add_head_count_kv(text.num_kv_heads)
    if text.head_dim != text.hidden_size // text.num_heads:
        writer.add_key_length(text.head_dim)
        writer.add_value_length(text.head_dim)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_rope_freq_base(text.rope_theta)
    if text.rope_scaling_factor != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(text.rope_scaling_factor)
    if text.sliding_window:
        writer.add_sliding_window(text.sliding_window)
    if tokenizer_dir is not None:
        for key, value in sentencepiece_vocab(tokenizer_dir, text.vocab_size).items():
            _add_metadata(writer, key, value)
    for key, array in _tensors(text_rules(config), FloatView(state), text.num_layers):
        _add(writer, key, array, outtype)
    _finish(writer)
    return path


def _add_metadata(writer: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif value and isinstance(value[0], float):
        writer.add_array(key, [float(v) for v in value])
    else:
        writer.add_array(key, list(value))


# -- the projector ------------------------------------------------------------------------------------------


def check_exportable(config: LlavaConfig) -> None:
    if config.projector_type != "mlp2x_gelu":
        raise ConfigError(f"projector_type {config.projector_type!r} has no llama.cpp 'mlp' projector; GGUF export "
                          "supports LLaVA's 'mlp2x_gelu'")  # fmt: skip
    if config.vision_feature_select_strategy != "default":
        raise ConfigError("vision_feature_select_strategy 'full' (keeping CLS) has no llama.cpp equivalent; GGUF "
                          "export supports 'default'")  # fmt: skip
    if config.text.mlp_bias:
        raise ConfigError("a decoder with MLP biases is not a llama.cpp 'llama' model; GGUF export cannot write it")


def mmproj_rules(config: LlavaConfig) -> list[Rule]:
    """gguf.vision_rules under the converter's names: fc1 -> ffn_down, fc2 -> ffn_up; no post_ln."""
    rename = {".fc1.": ".ffn_down.", ".fc2.": ".ffn_up."}
    rules = []
    for rule in vision_rules():
        if rule.path.startswith("vision.post_norm"):
            continue
        key = rule.key
        for ours, theirs in rename.items():
            key = key.replace(ours, theirs)
        rules.append(Rule(rule.path, key, rule.to_model, rule.to_file))
    rules += linear("projector.linears.0", "mm.0", True) + linear("projector.linears.1", "mm.2", True)
    if config.has_image_newline:
        rules.append(Rule("image_newline", "model.image_newline"))
    return rules


F16_ALWAYS = ("v.patch_embd.weight", "mm.0.weight", "mm.2.weight")


def write_mmproj(path: str, state: nnx.State, config: LlavaConfig, image_mean, image_std, outtype: str = "f16",
                 name: str = "llava") -> str:  # fmt: skip
    check_exportable(config)
    vision = config.vision
    kept = max(config.feature_layers)  # the tower's layers that LLaVA's features come from
    writer = gguf.GGUFWriter(path, arch="clip")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_file_type(OUTTYPES["f32" if outtype == "f32" else "f16"])
    writer.add_name(name)
    writer.add_description("image encoder for LLaVA")
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", vision.image_size)
    writer.add_uint32("clip.vision.patch_size", vision.patch_size)
    writer.add_uint32("clip.vision.embedding_length", vision.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", vision.intermediate_size)
    # CLIP's own output projection (768 for ViT-L/14) is not part of LLaVA nor of our config; clip.cpp
    # requires the key, and the projector's output width is what it stands for in a LLaVA pair.
    writer.add_uint32("clip.vision.projection_dim", config.text.hidden_size)
    writer.add_uint32("clip.vision.attention.head_count", vision.num_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", vision.layer_norm_eps)
    writer.add_uint32("clip.vision.block_count", kept)
    if config.is_anyres:
        # clip.cpp reads each pair as (width, height), as the original LLaVA code does.
        pairs = config.image_grid_pinpoints
        if config.semantics == "hf":  # llava-hf configs list (height, width)
            pairs = tuple((w, h) for h, w in pairs)
        writer.add_array("clip.vision.image_grid_pinpoints", [int(x) for pair in pairs for x in pair])
        writer.add_string("clip.vision.image_aspect_ratio", "anyres")
        writer.add_string("clip.vision.mm_patch_merge_type", config.patch_merge_type)
    writer.add_array("clip.vision.feature_layer", [int(x) for x in config.feature_layers])
    writer.add_array("clip.vision.image_mean", [float(x) for x in image_mean])
    writer.add_array("clip.vision.image_std", [float(x) for x in image_std])
    writer.add_bool("clip.use_gelu", vision.hidden_act == "gelu")
    for key, array in _tensors(mmproj_rules(config), FloatView(state), kept):
        _add(writer, key, array, "f16" if key in F16_ALWAYS else ("f32" if outtype == "f32" else "f16"),
             quantizable=False)  # fmt: skip
    _finish(writer)
    return path


def export_gguf(directory: str, state: nnx.State, config: LlavaConfig, tokenizer_dir: str | None, image_mean,
                image_std, outtype: str = "f16", name: str = "llava") -> tuple[str, str]:  # fmt: skip
    """Writes DIR/model-{outtype}.gguf and DIR/mmproj-model-f16.gguf (f32 for outtype f32); returns the paths."""
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype!r} is not supported; use one of {sorted(OUTTYPES)}")
    check_exportable(config)
    os.makedirs(directory, exist_ok=True)
    model_path = os.path.join(directory, f"model-{outtype}.gguf")
    mmproj_path = os.path.join(directory, f"mmproj-model-{'f32' if outtype == 'f32' else 'f16'}.gguf")
    for path in (model_path, mmproj_path):
        if os.path.exists(path):
            raise FileExistsError(f"{path} already exists; choose an empty output directory")
    write_language_model(model_path, state, config, tokenizer_dir, outtype, name)
    write_mmproj(mmproj_path, state, config, image_mean, image_std, outtype, name)
    return model_path, mmproj_path
