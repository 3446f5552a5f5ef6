"""Writes a model as a llava-hf directory that transformers 5 loads (LLaVA or LLaVA-NeXT).

    DIR/config.json                      LlavaConfig / LlavaNextConfig (text_config, vision_config, ...)
    DIR/model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json,
                                         keys as transformers 5's save_pretrained writes them
    DIR/processor_config.json            LlavaProcessor / LlavaNextProcessor with its image processor
    DIR/preprocessor_config.json         the same image processor alone (older transformers, llava_jax.load)
    DIR/generation_config.json           bos / eos ids
    DIR/tokenizer.json                   our tokenizer, which transformers 5 then runs as written
    DIR/<tokenizer files>                copied from the source

The weights come from the llava-hf rule table (`hf.hf_rules`, each Rule's `to_file`), so the export is
the exact inverse of the import; the JSON files and the checks below live in hf_files.py. The directory
is written beside DIR under a temporary name and renamed into place when complete.

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
from llava_jax.checkpoints.hf_files import (check_exportable, check_image_processor, check_tokenizer, hf_config,
                                            image_processor_config, processor_config)  # fmt: skip
from llava_jax.checkpoints.params import Rule, flat_variables
from llava_jax.checkpoints.safetensors_io import INDEX_FILE, write_safetensors
from llava_jax.config import LlavaConfig
from llava_jax.data.image import ImageProcessor
from llava_jax.errors import CheckpointError

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


def saved_key(key: str) -> str:
    for new, old in SAVE_NAMES:
        if key.startswith(new):
            return old + key[len(new) :]
    raise KeyError(key)


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
