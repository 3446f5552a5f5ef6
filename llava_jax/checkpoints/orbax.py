"""The model directory this project writes: orbax parameters, our config, and the tokenizer files.

    DIR/llava_jax.json   {"format": "llava_jax", "version": 1, "config": LlavaConfig.to_dict()}
    DIR/params/          orbax checkpoint of the parameter tree (nested dict of arrays)
    DIR/<tokenizer and preprocessor files copied from the source checkpoint>
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from llava_jax.atomic import atomic_dir
from llava_jax.errors import CheckpointError
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
                   template: str | None = None, extra_files: Callable[[str], None] | None = None,
                   quantization: dict | None = None) -> None:  # fmt: skip
    """Writes parameters (as stored in `state`), config and side files. Refuses to overwrite.

    The directory is written aside (`<directory>.partial`) and renamed into place with its marker
    (llava_jax.json) written last, so a killed writer never leaves a directory that loads as a model.
    template: the conversation template chosen for the source checkpoint (its name is gone after
    conversion), recorded for `llava_jax.chat.checkpoint_template`.
    extra_files: called with the directory being written, before the marker, to add files of its own.
    quantization: {kernel path: [bits, block or None]} of a quantized model (`quant.plan_to_json`).
    """
    primary = jax.process_index() == 0
    with atomic_dir(directory, marker=MARKER, commit=primary) as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, "params"), nnx.to_pure_dict(state))
        if not primary:
            return
        if copy_from:
            for name in SIDE_FILES:
                src = os.path.join(copy_from, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, name))
        if extra_files is not None:
            extra_files(tmp)
        meta = {"format": "llava_jax", "version": FORMAT_VERSION, "config": config.to_dict()}
        if template is not None:
            meta["template"] = template
        if quantization:
            meta["quantization"] = quantization
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(meta, f, indent=2)


def incomplete_model_dir(path: str) -> bool:
    """A directory holding our parameters but no marker: what a writer that was not atomic left."""
    return os.path.isdir(os.path.join(path, "params")) and not is_model_dir(path)


def read_config(directory: str) -> LlavaConfig:
    path = os.path.join(directory, MARKER)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; convert the checkpoint again") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} is not a llava_jax model description (no config object); convert again")
    if meta.get("format") != "llava_jax" or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a llava_jax model directory of version {FORMAT_VERSION}")
    try:
        return LlavaConfig.from_dict(meta["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its config is invalid ({e}); convert the checkpoint again") from e


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
        except Exception as e:
            # tensorstore reports damaged array files as plain Exceptions; anything else is not the files'
            if not (type(e) is Exception or isinstance(e, (ValueError, KeyError, OSError))):
                raise
            message = " ".join(str(e).split())[:400]
            raise CheckpointError(f"the parameters in {params_dir} are damaged or do not fit the model config "
                                  f"({type(e).__name__}: {message}); convert the checkpoint again") from e  # fmt: skip
    state = jax.tree.map(lambda v: v, abstract)
    nnx.replace_by_pure_dict(state, restored)
    return state


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
