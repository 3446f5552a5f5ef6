"""Writes a model as a llava-hf directory that transformers 5 loads (LLaVA or LLaVA-NeXT).

    DIR/config.json                      LlavaConfig / LlavaNextConfig (text_config, vision_config, ...)
    DIR/model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json,
                                         keys as transformers 5's save_pretrained writes them
    DIR/processor_config.json            LlavaProcessor / LlavaNextProcessor with its image processor
    DIR/preprocessor_config.json         the same image processor alone (older transformers, llava_jax.load)
    DIR/generation_config.json           bos / eos ids
    DIR/<tokenizer files>                copied from the source

The weights come from the llava-hf rule table (`hf.hf_rules`, each Rule's `to_file`), so the export is the
exact inverse of the import. The directory is written beside DIR under a temporary name and renamed
into place when complete.

Refused (ConfigError naming the field): models whose inputs transformers has no equivalent of:
original-LLaVA semantics (its prompts tokenize the text between images piece by piece around a marker
outside the vocabulary; its anyres reads pinpoints as width x height on ties and rounds unpadding
differently, so transformers would tile and count image tokens differently), merge types other than
'spatial_unpad', and projectors other than 'mlp2x_gelu'. A tokenizer whose `<image>` is not the model's
image_token_id is refused too (transformers' processor could not mark the image positions).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

from llava_jax.checkpoints import hf
from llava_jax.checkpoints.params import Rule, flat_variables
from llava_jax.checkpoints.safetensors_io import INDEX_FILE, write_safetensors
from llava_jax.config import LlavaConfig
from llava_jax.data.image import ImageProcessor
from llava_jax.errors import CheckpointError, ConfigError

DEFAULT_MAX_SHARD_BYTES = 50 * 10**9  # transformers 5's save_pretrained default ("50GB")
# transformers 5 module names -> the keys its save_pretrained writes.
SAVE_NAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.json", "chat_template.jinja",
)  # fmt: skip
IMAGE_TOKEN = "<image>"


def saved_key(key: str) -> str:
    for new, old in SAVE_NAMES:
        if key.startswith(new):
            return old + key[len(new) :]
    raise KeyError(key)


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


def shard_plan(entries: dict[str, tuple], max_shard_bytes: int) -> list[list[str]]:
    """Keys (sorted, as transformers writes them) grouped into shards of at most `max_shard_bytes`
    (a tensor larger than that gets a shard of its own)."""
    shards, current, size = [], [], 0
    for key in sorted(entries):
        shape, dtype, _ = entries[key]
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + ([current] if current else [])


def tensor_entries(rules: list[Rule], state: nnx.State, dtype=None) -> dict[str, tuple]:
    """{saved key: (shape, dtype, produce)} for `write_safetensors`; each array is copied from the
    device and converted only when its turn to be written comes."""
    variables = flat_variables(state)
    entries = {}
    for rule in rules:
        var = variables[rule.path]
        want = np.dtype(dtype or var.dtype)
        layer_shape = var.shape[1:] if rule.stacked else var.shape
        shape = rule.to_file(np.empty(layer_shape, np.uint8)).shape  # the rules only permute axes
        for i, key in enumerate(rule.keys(var.shape[0] if rule.stacked else 1)):
            def produce(var=var, rule=rule, i=i if rule.stacked else None, want=want):
                value = var.get_value() if i is None else var.get_value()[i]
                return rule.to_file(np.asarray(jax.device_get(value)).astype(want))

            entries[saved_key(key)] = (shape, want, produce)
    return entries


def write_weights(directory: str, entries: dict[str, tuple], max_shard_bytes: int) -> list[str]:
    """model.safetensors, or numbered shards + model.safetensors.index.json. Returns the file names."""
    shards = shard_plan(entries, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, "model.safetensors"), entries, meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for n, keys in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, name), {k: entries[k] for k in keys}, meta)
        weight_map.update({k: name for k in keys})
        names.append(name)
    total = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d, _ in entries.values())
    count = sum(int(np.prod(s)) for s, _, _ in entries.values())
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_parameters": count, "total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + [INDEX_FILE]


def export_hf(out: str, state: nnx.State, config: LlavaConfig, image_processor: ImageProcessor, *,
              tokenizer_dir: str | None, tokenizer=None, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:  # fmt: skip
    """Writes the llava-hf directory `out` from a plain (LoRA-merged) model state.

    tokenizer_dir: where the tokenizer files are copied from (None: none are copied; then
    AutoProcessor cannot load the export). tokenizer: the loaded tokenizer of that directory (checked
    for `<image>`, the source of bos/eos/pad ids, and written as tokenizer.json). dtype: the stored dtype (default: the state's).
    Returns a summary dict.
    """
    check_exportable(config)
    check_image_processor(config, image_processor)
    if any(str(path[-1]).startswith("lora_") for path, _ in nnx.to_flat_state(state)):
        raise ValueError("the state holds LoRA adapters: merge them first (train.lora.merge_lora), or pass "
                         "train.lora.base_state(model) to export the base weights alone")  # fmt: skip
    if tokenizer is not None:
        check_tokenizer(tokenizer, config)
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"{out} already exists and is not empty; choose a new output directory")
    entries = tensor_entries(hf.hf_rules(config), state, dtype)
    stored = {np.dtype(d).name for _, d, _ in entries.values()}
    dtype_name = stored.pop() if len(stored) == 1 else "float32"
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        files = write_weights(tmp, entries, max_shard_bytes)
        ids = {k: getattr(tokenizer, k, None) for k in ("bos_id", "eos_id", "pad_id")}
        if tokenizer is not None and tokenizer.pad_id == tokenizer.unk_id:  # pad_id falls back to unk
            ids["pad_id"] = None
        _write_json(tmp, "config.json", hf_config(config, dtype_name, ids["bos_id"], ids["eos_id"], ids["pad_id"]))
        _write_json(tmp, "generation_config.json",
                    {k: v for k, v in (("bos_token_id", ids["bos_id"]), ("eos_token_id", ids["eos_id"])) if v is not None})  # fmt: skip
        _write_json(tmp, "processor_config.json", processor_config(config, image_processor))
        _write_json(tmp, "preprocessor_config.json", image_processor_config(image_processor))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(tokenizer_dir, name)):
                    shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
        if tokenizer is not None:
            # transformers 5 builds a llava directory's tokenizer from tokenizer.json as written (and
            # from tokenizer.model alone it drops the first "▁"): ours, serialised, gives our ids there.
            with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
                f.write(tokenizer.to_json())
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "format": "hf", "model_type": "llava_next" if config.is_anyres else "llava",
            "dtype": dtype_name, "files": len(files), "tensors": len(entries)}  # fmt: skip


def _write_json(directory: str, name: str, obj) -> None:
    with open(os.path.join(directory, name), "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
