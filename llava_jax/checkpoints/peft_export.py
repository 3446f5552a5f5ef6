"""Writes a model's LoRA adapters as peft saves them for a llava-hf base model.

    DIR/adapter_config.json        peft's LoraConfig (peft_type LORA, r, lora_alpha, lora_dropout,
                                   target_modules as a regex over the base model's module names, ...)
    DIR/adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r]

`peft.PeftModel.from_pretrained(base, DIR)` then computes what the unmerged llava_jax model computes,
where `base` is the llava-hf export (`hf_export`) of the same model's base weights. Module names come
from the llava-hf rule table: the rule for `<path>.kernel` names the file key `<module>.weight`.
Only the adapters are written: parameters trained outside LoRA (the projector in LLaVA's LoRA recipe)
live in the base export, not here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

from llava_jax.checkpoints import hf
from llava_jax.checkpoints.hf_files import check_exportable
from llava_jax.checkpoints.safetensors_io import write_safetensors
from llava_jax.config import LlavaConfig
from llava_jax.errors import CheckpointError
from llava_jax.train.lora import LoraLinear, LoraSettings, lora_modules

PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def module_templates(config: LlavaConfig, paths: list[str]) -> dict[str, str]:
    """LoRA module path -> llava-hf module name, '{i}' standing for the layer index of stacked layers."""
    by_path = {r.path: r.key for r in hf.hf_rules(config)}
    out = {}
    for path in paths:
        key = by_path.get(f"{path.replace('/', '.')}.kernel")
        if key is None or not key.endswith(".weight"):
            raise CheckpointError(f"LoRA module {path} has no llava-hf Linear to attach to")
        out[path] = key[: -len(".weight")]
    return out


def target_regex(templates: list[str]) -> str:
    """A regex that peft's fullmatch against module names accepts for exactly these modules."""
    parts = sorted(re.escape(t).replace(re.escape("{i}"), r"\d+") for t in templates)
    return "(" + "|".join(parts) + ")"


def adapter_config(config: LlavaConfig, settings: LoraSettings, target_modules: str,
                   base_model_name_or_path: str | None) -> dict:  # fmt: skip
    """adapter_config.json with the fields peft's LoraConfig writes (the rest take peft's defaults)."""
    model_class = "LlavaNextForConditionalGeneration" if config.is_anyres else "LlavaForConditionalGeneration"
    module = "llava_next" if config.is_anyres else "llava"
    return {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": {"base_model_class": model_class, "parent_library": f"transformers.models.{module}.modeling_{module}"},
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": target_modules,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def adapter_entries(model: nnx.Module, templates: dict[str, str], dtype=None) -> dict[str, tuple]:
    """{peft key: (shape, dtype, produce)}: lora_A.weight = lora_a.T [r, in], lora_B.weight = lora_b.T [out, r]."""
    entries = {}
    for path, module in lora_modules(model):
        for name, var in (("lora_A", module.lora_a), ("lora_B", module.lora_b)):
            stacked = "{i}" in templates[path]
            layers = range(var.shape[0]) if stacked else [None]
            want = np.dtype(dtype or var.dtype)
            shape = var.shape[-2:][::-1]
            for i in layers:
                key = f"{PEFT_PREFIX}{templates[path].format(i=i)}.{name}.weight"

                def produce(var=var, i=i, want=want):
                    value = var.get_value() if i is None else var.get_value()[i]
                    return np.asarray(jax.device_get(value)).astype(want).T

                entries[key] = (shape, want, produce)
    return dict(sorted(entries.items()))


def export_peft(out: str, model: nnx.Module, config: LlavaConfig, settings: LoraSettings, *,
                base_model_name_or_path: str | None = None, dtype: str | None = None) -> dict:  # fmt: skip
    """Writes `model`'s adapters (its LoraLinear modules, unmerged) to the peft directory `out`."""
    check_exportable(config)
    modules = lora_modules(model)
    if not modules:
        raise CheckpointError("the model has no LoRA adapters to export (was it trained with LoRA, or merged?)")
    if any(abs(m.scale - settings.scale) > 1e-12 for _, m in modules if isinstance(m, LoraLinear)):
        raise CheckpointError(f"the model's LoRA scale differs from the settings' alpha / rank = {settings.scale}")
    templates = module_templates(config, [p for p, _ in modules])
    entries = adapter_entries(model, templates, dtype)
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"{out} already exists and is not empty; choose a new output directory")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    try:
        write_safetensors(os.path.join(tmp, WEIGHTS_NAME), entries, {"format": "pt"})
        cfg = adapter_config(config, settings, target_regex(list(templates.values())), base_model_name_or_path)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "format": "peft", "modules": len(modules), "tensors": len(entries), "rank": settings.rank}
