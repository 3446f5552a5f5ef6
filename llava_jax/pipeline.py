"""`llava_jax.load(path)` -> `Pipeline`: a model with its tokenizer and image processor, ready to run."""

from __future__ import annotations

import contextlib
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llava_jax import sharding as shd
from llava_jax.checkpoints import hf, orbax
from llava_jax.checkpoints.params import read_params
from llava_jax.checkpoints.safetensors_io import CheckpointError
from llava_jax.config import LlavaConfig
from llava_jax.model import anyres_merge
from llava_jax.model.llava import LlavaModel, check_image_tokens


def abstract_model(config: LlavaConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and parameter shapes, without allocating parameters."""
    return nnx.split(nnx.eval_shape(lambda: LlavaModel(config, rngs=nnx.Rngs(0))))


def checkpoint_kind(path: str) -> str:
    """'llava_jax' (our model directory), 'hf' (llava-hf) or 'original' (haotian-liu/LLaVA)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.isdir(path) and orbax.is_model_dir(path):
        return "llava_jax"
    config_path = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.isfile(config_path):
        with open(config_path) as f:
            cfg = json.load(f)
        if cfg.get("model_type") in ("llava", "llava_next"):
            return "hf"
        if "mm_vision_tower" in cfg or "mm_projector_type" in cfg or "mm_hidden_size" in cfg:
            return "original"
        raise CheckpointError(f"{config_path} has model_type {cfg.get('model_type')!r}, which is not a LLaVA model")
    raise CheckpointError(
        f"{path} is not a model: expected a llava-hf or original LLaVA directory (config.json + weights) "
        "or a directory written by `python -m llava_jax.convert`"
    )


def load_model(path: str, dtype: str = "bfloat16", mesh: Mesh | None = None, progress: bool = False):
    """Reads a checkpoint directory into a LlavaModel. Returns (model, config)."""
    kind = checkpoint_kind(path)
    if kind == "llava_jax":
        config = orbax.read_config(path)
    elif kind == "hf":
        config = LlavaConfig.from_hf(path)
    else:
        raise NotImplementedError(f"original LLaVA checkpoints ({path}) are not supported yet")
    config = config.replace(param_dtype=dtype, dtype=dtype)
    graphdef, abstract = abstract_model(config)
    shardings = shd.state_shardings(abstract, mesh) if mesh is not None else None
    if kind == "llava_jax":
        state = orbax.restore_params(path, abstract, shardings, dtype)
    else:
        tensors = hf.HFTensors(path)
        state = read_params(hf.hf_rules(config), abstract, tensors, dtype=dtype, shardings=shardings,
                            ignore=hf.hf_ignored(config), progress=progress)  # fmt: skip
    return nnx.merge(graphdef, state), config


def load(path: str, dtype: str = "bfloat16", mesh: Mesh | None = None) -> "Pipeline":
    """A Pipeline for a llava-hf directory or a model directory written by this project.

    dtype: parameters and activations ("float32" for exact parity, "bfloat16" for speed).
    mesh: a jax Mesh with axes from (data, fsdp, tensor); parameters are laid out on it directly.
    """
    model, config = load_model(path, dtype, mesh)
    return Pipeline(model, config, mesh=mesh, directory=path)


class Pipeline:
    """A loaded model and everything needed to run it (DESIGN.md, "Public interface")."""

    def __init__(self, model: LlavaModel, config: LlavaConfig, mesh: Mesh | None = None,
                 directory: str | None = None, tokenizer=None, image_processor=None):  # fmt: skip
        self.config = config
        self.mesh = mesh
        self.directory = directory
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self._graphdef, self._state = nnx.split(model)

    @property
    def model(self) -> LlavaModel:
        return nnx.merge(self._graphdef, self._state)

    def _device_input(self, x, axes):
        if x is None:
            return None
        x = jnp.asarray(x)
        if self.mesh is None:
            return x
        return jax.device_put(x, NamedSharding(self.mesh, shd.logical_to_spec(axes, self.mesh, x.shape)))

    @functools.cached_property
    def _forward(self):
        graphdef = self._graphdef

        @jax.jit
        def forward(state, input_ids, pixel_values, attention_mask, feature_index):
            model = nnx.merge(graphdef, state)
            return model(input_ids, pixel_values, attention_mask, feature_index=feature_index)

        return forward

    def logits(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None) -> np.ndarray:
        """Logits of whole sequences, as HF's `model(**inputs).logits`.

        input_ids: [B, T] (or [T]); pixel_values: [N, C, H, W] (NeXT: [N, P, C, H, W] with image_sizes
        [N, 2]); attention_mask: [B, T]. Returns np.float32 [B, T, V].
        """
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        model = self.model
        n_features = 0 if pixel_values is None else model.num_image_features(np.shape(pixel_values), image_sizes)
        check_image_tokens(input_ids, self.config.image_token_id, n_features)
        pixel_values = None if pixel_values is None else np.asarray(pixel_values, np.float32)
        feature_index = None
        if pixel_values is not None and self.config.is_anyres:  # the token layout, on the host
            feature_index = anyres_merge.padded_feature_index(self.config, image_sizes, pixel_values.shape[1])
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask, np.int32).reshape(input_ids.shape)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            out = self._forward(
                self._state,
                self._device_input(input_ids.astype(np.int32), ("batch", None)),
                self._device_input(pixel_values, ("batch",) + (None,) * (np.ndim(pixel_values) - 1)),
                self._device_input(attention_mask, ("batch", None)),
                None if feature_index is None else jnp.asarray(feature_index),
            )
        return np.asarray(jax.device_get(out), np.float32)
