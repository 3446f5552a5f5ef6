"""The model directory this project writes: orbax parameters, our config, and the tokenizer files.

    DIR/llava_jax.json   {"format": "llava_jax", "version": 1, "config": LlavaConfig.to_dict()}
    DIR/params/          orbax checkpoint of the parameter tree (nested dict of arrays)
    DIR/<tokenizer and preprocessor files copied from the source checkpoint>
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from llava_jax.checkpoints.safetensors_io import CheckpointError
from llava_jax.config import LlavaConfig

MARKER = "llava_jax.json"
FORMAT_VERSION = 1
# Files a checkpoint directory may carry besides its weights, copied along on conversion.
SIDE_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
    "chat_template.jinja", "generation_config.json",
)  # fmt: skip


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def save_model_dir(directory: str, state: nnx.State, config: LlavaConfig, copy_from: str | None = None,
                   template: str | None = None, quantization: dict | None = None) -> None:  # fmt: skip
    """Writes parameters (as stored in `state`), config and side files. Refuses to overwrite.

    template: the conversation template chosen for the source checkpoint (its name is gone after
    conversion), recorded for `llava_jax.chat.checkpoint_template`.
    quantization: {kernel path: [bits, block or None]} of a quantized model (`quant.plan_to_json`).
    """
    params_dir = os.path.join(os.path.abspath(directory), "params")
    if os.path.exists(params_dir):
        raise FileExistsError(f"{params_dir} already exists; choose an empty output directory")
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(params_dir, nnx.to_pure_dict(state))
    if copy_from:
        for name in SIDE_FILES:
            src = os.path.join(copy_from, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(directory, name))
    if jax.process_index() == 0:
        with open(os.path.join(directory, MARKER), "w") as f:
            meta = {"format": "llava_jax", "version": FORMAT_VERSION, "config": config.to_dict()}
            if template is not None:
                meta["template"] = template
            if quantization:
                meta["quantization"] = quantization
            json.dump(meta, f, indent=2)


def read_config(directory: str) -> LlavaConfig:
    path = os.path.join(directory, MARKER)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if meta.get("format") != "llava_jax" or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a llava_jax model directory of version {FORMAT_VERSION}")
    return LlavaConfig.from_dict(meta["config"])


def read_quantization(directory: str) -> dict:
    """{kernel path: [bits, block]} of a model directory stored quantized ({} for a float one)."""
    with open(os.path.join(directory, MARKER)) as f:
        return json.load(f).get("quantization") or {}


def restore_params(directory: str, abstract: nnx.State, shardings: nnx.State | None = None, dtype=None) -> nnx.State:
    """Restores the parameters into the structure of `abstract`, cast to `dtype`, laid out by `shardings`."""
    params_dir = os.path.join(os.path.abspath(directory), "params")
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir} is missing: not a complete llava_jax model directory")
    pure = nnx.to_pure_dict(abstract)
    shard = nnx.to_pure_dict(shardings) if shardings is not None else jax.tree.map(lambda _: None, pure)

    def target(a, s):
        keep = jax.numpy.issubdtype(a.dtype, jax.numpy.integer)  # quantized values stay integers
        return jax.ShapeDtypeStruct(a.shape, a.dtype if keep else np.dtype(dtype or a.dtype),
                                    sharding=s or _default_sharding())  # fmt: skip

    with ocp.StandardCheckpointer() as checkpointer:
        try:
            restored = checkpointer.restore(params_dir, jax.tree.map(target, pure, shard))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"parameters in {params_dir} do not fit the model config: {e}") from e
    state = jax.tree.map(lambda v: v, abstract)
    nnx.replace_by_pure_dict(state, restored)
    return state


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
