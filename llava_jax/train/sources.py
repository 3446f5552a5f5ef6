"""Where a stage starts: the model (config + parameters), its tokenizer/processor files and its template.

init.kind:
- "scratch": a fresh model of `stage.model` (LlavaConfig fields), tokenizer files from init.tokenizer;
- "previous": the final parameters of the stage before it in this run;
- "run": the latest checkpoint of another run directory (init.path), e.g. a stage-1 run;
- "checkpoint": any model `llava_jax.load` reads (init.path: llava-hf, original, llava_jax, GGUF);
- "components": a CLIP vision directory (init.vision_tower) plus a LLaMA/Mistral LM directory
  (init.language_model) with a fresh projector (llava_jax.checkpoints.components).
init.mm_projector, where set, then replaces the projector with an original `mm_projector.bin`.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.errors import ConfigError


@dataclasses.dataclass
class Start:
    """params: pure dict (nnx.to_pure_dict) of the model's parameters; side_dir: the directory holding
    its tokenizer (and preprocessor) files; template: the chat template recorded for it (or None)."""

    config: LlavaConfig
    params: dict
    side_dir: str
    template: str | None


def model_config(values: dict) -> LlavaConfig:
    values = _tuples(values)
    try:
        vision = VisionConfig(**dict(values.pop("vision", {})))
        text = TextConfig(**dict(values.pop("text", {})))
        return LlavaConfig(vision=vision, text=text, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"stage model config: {e}") from None


def _tuples(values: dict) -> dict:
    """Lists from a ConfigDict back to the tuples LlavaConfig holds."""
    values = dict(values)
    if isinstance(values.get("vision_feature_layer"), list):
        values["vision_feature_layer"] = tuple(values["vision_feature_layer"])
    if values.get("image_grid_pinpoints") is not None:
        values["image_grid_pinpoints"] = tuple(tuple(p) for p in values["image_grid_pinpoints"])
    return values


def overrides(config: LlavaConfig, values: dict) -> LlavaConfig:
    """The model config with the stage's `model` fields applied (nested vision/text dicts too)."""
    values = _tuples(values)
    vision = dataclasses.replace(config.vision, **dict(values.pop("vision", {}) or {}))
    text = dataclasses.replace(config.text, **dict(values.pop("text", {}) or {}))
    return config.replace(vision=vision, text=text, **values)


def fresh_image_newline(config: LlavaConfig, seed: int):
    """A new LLaVA-NeXT image_newline [D], drawn as the original does (randn / sqrt(D)), for a 1.5 model
    that a stage turns into an anyres one."""
    import numpy as np

    d = config.text.hidden_size
    return (np.random.default_rng(seed).standard_normal(d) / np.sqrt(d)).astype(np.float32)


def require_path(value: str, field: str, what: str) -> str:
    if not value:
        raise ConfigError(f"{field} is empty; set it to {what}")
    if not os.path.exists(value):
        raise ConfigError(f"{field}: {value} does not exist; set it to {what}")
    return value


def start_of(stage_name: str, stage_cfg, *, seed: int, param_dtype: str, previous_stage_dir: str | None) -> Start:
    """The model a stage starts from (parameters in param_dtype), as its init section says."""
    from llava_jax.model.llava import LlavaModel
    from llava_jax.train import run_dir

    init = stage_cfg.init
    where = f"stages.{stage_name}.init"
    model_values = stage_cfg.get("model", None)
    model_values = model_values.to_dict() if hasattr(model_values, "to_dict") else dict(model_values or {})
    kind = init.kind
    if kind == "scratch":
        tokenizer = require_path(init.get("tokenizer", ""), f"{where}.tokenizer", "a directory with tokenizer files")
        config = model_config(model_values).replace(param_dtype=param_dtype)
        model = LlavaModel(config, rngs=nnx.Rngs(seed))
        return Start(config, nnx.to_pure_dict(nnx.state(model)), tokenizer, None)
    if kind == "previous":
        start = run_dir.read_stage_params(previous_stage_dir, param_dtype)
    elif kind == "run":
        path = require_path(init.get("path", ""), f"{where}.path", "a training run's workdir")
        start = run_dir.read_run_params(path, param_dtype)
    elif kind == "checkpoint":
        from llava_jax.chat import checkpoint_template
        from llava_jax.pipeline import load_model, side_directory

        path = require_path(init.get("path", ""), f"{where}.path", "a model directory or file llava_jax.load reads")
        model, config = load_model(path, dtype=param_dtype)
        start = Start(config, nnx.to_pure_dict(nnx.state(model)), side_directory(path), checkpoint_template(path, config))
    else:  # components
        try:
            from llava_jax.checkpoints import components
        except ImportError:
            raise ConfigError(f"{where}.kind 'components' needs llava_jax.checkpoints.components, which this "
                              "checkout lacks; start from a checkpoint (init.kind='checkpoint')") from None  # fmt: skip
        start = components.stage1_start(init, model_values, seed=seed, param_dtype=param_dtype)
    if kind != "components" and model_values:
        try:
            start.config = overrides(start.config, model_values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"stages.{stage_name}.model: {e}") from None
    if start.config.has_image_newline and "image_newline" not in start.params:
        start.params["image_newline"] = fresh_image_newline(start.config, seed)
    if init.get("mm_projector", ""):
        path = require_path(init.mm_projector, f"{where}.mm_projector", "an original mm_projector.bin")
        try:
            from llava_jax.checkpoints.components import load_mm_projector
        except ImportError:
            raise ConfigError(f"{where}.mm_projector needs llava_jax.checkpoints.components, which this checkout "
                              "lacks") from None  # fmt: skip
        start.params = load_mm_projector(start.params, start.config, path)
    start.params = jax.tree.map(lambda x: x.astype(param_dtype), start.params)
    return start
