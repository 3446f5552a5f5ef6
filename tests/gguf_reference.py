"""Writes a llava-hf model as the GGUF pair llama.cpp's converters make of it (the tests' reference files).

Follows, independently of llava_jax, llama.cpp's convert_hf_to_gguf.py (LlamaModel: tensor names,
`llama.*` keys, the Q/K row permutation, the SentencePiece vocabulary with added tokens and [PAD]
padding) and tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py (`clip.*` keys, `v.*` / `mm.*`
names with fc1 -> ffn_down and fc2 -> ffn_up, post_layernorm skipped, the unused last layers dropped,
projector and patch-embedding weights always float16).

A pair is built as two `GGUFContents` (metadata + named arrays), which tests may edit before `write`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import gguf
import numpy as np
import sentencepiece

F16_ALWAYS = ("v.patch_embd.weight", "mm.0.weight", "mm.2.weight")  # the mmproj converter's float16 tensors


@dataclasses.dataclass
class GGUFContents:
    arch: str
    metadata: dict  # key -> (value, gguf.GGUFValueType or None for add_* by type)
    tensors: dict  # name -> np.ndarray (numpy/PyTorch order) or (raw bytes array, GGMLQuantizationType)

    def write(self, path: str) -> str:
        writer = gguf.GGUFWriter(path, arch=self.arch)
        for key, value in self.metadata.items():
            if isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            else:
                writer.add_array(key, list(value))
        finish(writer, self.tensors)
        return path


def finish(writer: gguf.GGUFWriter, tensors: dict) -> None:
    """Adds `tensors` (name -> array, or (raw bytes array, GGMLQuantizationType)) after the writer's metadata
    and writes the file."""
    for name, value in tensors.items():
        if isinstance(value, tuple):
            data, qtype = value
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, applied to attn_q (n_head, n_head) and attn_k (n_head, n_kv)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _np(t) -> np.ndarray:
    return t.detach().float().numpy().copy()


def round_f16_tensors(hf_model) -> None:
    """Rounds the weights the mmproj converter stores as float16 to float16 values, in place, so that the
    float16 file holds exactly the model transformers runs."""
    import torch

    vt, proj = hf_model.model.vision_tower, hf_model.model.multi_modal_projector
    with torch.no_grad():
        for p in (vt.embeddings.patch_embedding.weight, proj.linear_1.weight, proj.linear_2.weight):
            p.copy_(p.half().float())


def text_contents(hf_model, quantize: gguf.GGMLQuantizationType | None = None) -> GGUFContents:
    """The language model file; `quantize` stores 2-D weights whose rows fit its blocks in that type."""
    cfg = hf_model.config.text_config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    state = {k: _np(v) for k, v in hf_model.state_dict().items()}
    lm = "model.language_model."
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    tensors = {"token_embd.weight": state[lm + "embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        for theirs, ours in names.items():
            w = state[f"{lm}layers.{i}.{theirs}.weight"]
            if ours == "attn_q":
                w = llama_permute(w, heads, heads)
            elif ours == "attn_k":
                w = llama_permute(w, heads, kv)
            tensors[f"blk.{i}.{ours}.weight"] = w
    tensors["output_norm.weight"] = state[lm + "norm.weight"]
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    if quantize is not None:
        block = gguf.GGML_QUANT_SIZES[quantize][0]
        for name, w in list(tensors.items()):
            if w.ndim == 2 and w.shape[-1] % block == 0:
                tensors[name] = (gguf.quants.quantize(w, quantize), quantize)
    head_dim = cfg.hidden_size // heads
    metadata = {
        "general.name": "tiny-llava",
        "llama.vocab_size": cfg.vocab_size,
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.num_hidden_layers,
        "llama.feed_forward_length": cfg.intermediate_size,
        "llama.rope.dimension_count": head_dim,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv,
        "llama.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "llama.rope.freq_base": float(cfg.rope_parameters["rope_theta"]),
    }
    return GGUFContents("llama", metadata, tensors)


def add_sentencepiece_vocab(contents: GGUFContents, tokenizer_dir: str, vocab_size: int) -> None:
    """The tokenizer keys as convert_hf_to_gguf's _set_vocab_sentencepiece writes them."""
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [5] * vocab_size  # UNUSED
    for i in range(sp.vocab_size()):
        kind = 1
        if sp.IsUnknown(i):
            kind = 2
        elif sp.IsControl(i):
            kind = 3
        elif sp.IsUnused(i):
            kind = 5
        elif sp.IsByte(i):
            kind = 6
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), kind
    added_path = os.path.join(tokenizer_dir, "added_tokens.json")
    if os.path.isfile(added_path):
        for token, i in json.load(open(added_path)).items():
            if i < vocab_size:
                tokens[i], scores[i], types[i] = token, -1000.0, 4  # USER_DEFINED
    config = json.load(open(os.path.join(tokenizer_dir, "tokenizer_config.json")))
    for i, entry in config.get("added_tokens_decoder", {}).items():
        i = int(i)
        tokens[i], scores[i], types[i] = entry["content"], -1000.0, 3 if entry.get("special") else 4
    ids = {t: i for i, t in enumerate(tokens)}
    contents.metadata.update({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": ids[config["bos_token"]], "tokenizer.ggml.eos_token_id": ids[config["eos_token"]],
        "tokenizer.ggml.unknown_token_id": ids[config.get("unk_token", "<unk>")],
        "tokenizer.ggml.add_bos_token": bool(config.get("add_bos_token", True)),
        "tokenizer.ggml.add_eos_token": bool(config.get("add_eos_token", False)),
    })  # fmt: skip
    if config.get("pad_token") in ids:
        contents.metadata["tokenizer.ggml.padding_token_id"] = ids[config["pad_token"]]
    # GGUF types: token_type is an int32 array, scores a float32 array
    contents.metadata["tokenizer.ggml.scores"] = [float(s) for s in scores]


def mmproj_contents(hf_model, feature_layers: list[int] | None = None, legacy_fc_names: bool = True,
                    image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
                    **vision_keys) -> GGUFContents:  # fmt: skip
    """The projector file. feature_layers: clip.vision.feature_layer (non-negative); without it the last
    layer is dropped. legacy_fc_names: fc1 -> ffn_down as the legacy converter names it (else ffn_up).
    vision_keys: extra clip.vision.* keys (image_grid_pinpoints as pairs, mm_patch_merge_type, ...)."""
    v = hf_model.config.vision_config
    state = {k: _np(t) for k, t in hf_model.state_dict().items()}
    vt = "model.vision_tower."
    n = v.num_hidden_layers
    kept = max(feature_layers) if feature_layers else n - 1
    fc1, fc2 = ("ffn_down", "ffn_up") if legacy_fc_names else ("ffn_up", "ffn_down")
    tensors = {
        "mm.0.weight": state["model.multi_modal_projector.linear_1.weight"].astype(np.float16),
        "mm.0.bias": state["model.multi_modal_projector.linear_1.bias"],
        "mm.2.weight": state["model.multi_modal_projector.linear_2.weight"].astype(np.float16),
        "mm.2.bias": state["model.multi_modal_projector.linear_2.bias"],
        "v.class_embd": state[vt + "embeddings.class_embedding"],
        "v.patch_embd.weight": state[vt + "embeddings.patch_embedding.weight"].astype(np.float16),
        "v.position_embd.weight": state[vt + "embeddings.position_embedding.weight"],
        "v.pre_ln.weight": state[vt + "pre_layrnorm.weight"],
        "v.pre_ln.bias": state[vt + "pre_layrnorm.bias"],
    }
    if "model.image_newline" in state:
        tensors["model.image_newline"] = state["model.image_newline"]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": fc1,
             "mlp.fc2": fc2}  # fmt: skip
    for i in range(kept):
        for theirs, ours in names.items():
            for part in ("weight", "bias"):
                tensors[f"v.blk.{i}.{ours}.{part}"] = state[f"{vt}encoder.layers.{i}.{theirs}.{part}"]
    metadata = {
        "clip.has_text_encoder": False, "clip.has_vision_encoder": True, "clip.has_llava_projector": True,
        "general.file_type": 1, "general.description": "image encoder for LLaVA", "clip.projector_type": "mlp",
        "clip.vision.image_size": v.image_size, "clip.vision.patch_size": v.patch_size,
        "clip.vision.embedding_length": v.hidden_size, "clip.vision.feed_forward_length": v.intermediate_size,
        "clip.vision.projection_dim": v.projection_dim, "clip.vision.attention.head_count": v.num_attention_heads,
        "clip.vision.attention.layer_norm_epsilon": float(v.layer_norm_eps), "clip.vision.block_count": kept,
        "clip.vision.image_mean": [float(x) for x in image_mean], "clip.vision.image_std": [float(x) for x in image_std],
        "clip.use_gelu": v.hidden_act == "gelu",
    }  # fmt: skip
    if feature_layers:
        metadata["clip.vision.feature_layer"] = list(feature_layers)
    for key, value in vision_keys.items():
        if key == "image_grid_pinpoints":
            value = [int(x) for pair in value for x in pair]
        metadata[f"clip.vision.{key}"] = value
    return GGUFContents("clip", metadata, tensors)
