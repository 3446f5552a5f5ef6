"""Memory planner: will a training step fit, per device, on a given mesh? No weights needed.

    python -m llava_jax.plan --config configs/llava15_7b_finetune.py --mesh data=1,fsdp=8,tensor=1
    python -m llava_jax.plan --config configs/llava15_7b_finetune.py --mesh data=1,fsdp=8,tensor=1 \\
        --seq_len 4096 --per_device_batch 1 --attention xla --remat none --device_memory 80GiB

The stage's train step (llava_jax.train.step, with the stage's trainable groups and optimizer) is
compiled on abstract shapes for the mesh, and XLA's memory analysis of the compiled program gives
the per-device bytes: parameters, optimizer state, gradients (the float32 accumulation buffer of the
trainable parameters) and the rest of the step's temporaries (activations kept for the backward
pass, attention scores, workspace). On a machine without that many devices the mesh is made of
forced host (CPU) devices, so the figures are XLA:CPU's: the same shapes and shardings, but another
backend's fusion and scheduling; on the accelerator itself they are that backend's. The last line
is a JSON summary.
"""

from __future__ import annotations

import math
import os
import re

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A training config file (configs/*.py).", lock_config=False)
_MESH = flags.DEFINE_string("mesh", "data=1,fsdp=8,tensor=1", "Mesh axis sizes, e.g. data=1,fsdp=8,tensor=1.")
_MODEL = flags.DEFINE_string("model", "llava-1.5-7b", "Model dimensions: one of PLAN_MODELS.")
_STAGE = flags.DEFINE_string("stage", None, "The stage to plan (default: the config's last stage).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per sequence (default: the stage's data.max_length).")
_BATCH = flags.DEFINE_integer("per_device_batch", None, "Sequences per device per micro-batch (default: the "
                              "stage's per_device_batch_size).")  # fmt: skip
_ATTENTION = flags.DEFINE_string("attention", None, "Attention kernel (default: the config's model.attention or auto).")
_REMAT = flags.DEFINE_string("remat", None, "Remat policy (default: the config's remat).")
_MEMORY = flags.DEFINE_string("device_memory", "80GiB", "Memory of one device, e.g. 80GiB (an \"80 GB\" A100/H100), 95GiB, 32GB.")


def model_dims(name: str):
    """The LlavaConfig of a planning preset (dimensions only; the weights are never read)."""
    from llava_jax.config import LlavaConfig, TextConfig, VisionConfig, preset

    if name in ("llava-1.5-7b", "llava-1.5-13b"):
        return preset(name)
    if name == "llava-1.6-34b":  # llava-hf/llava-v1.6-34b-hf: CLIP-L/14-336 + Nous-Hermes-2-Yi-34B, anyres
        text = TextConfig(vocab_size=64064, hidden_size=7168, intermediate_size=20480, num_layers=60, num_heads=56,
                          num_kv_heads=8, rope_theta=5e6, max_position_embeddings=4096)  # fmt: skip
        return LlavaConfig(vision=VisionConfig(), text=text, image_token_id=64000, image_aspect_ratio="anyres",
                           image_grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
                           patch_merge_type="spatial_unpad")  # fmt: skip
    raise ValueError(f"unknown --model {name!r}; known: {PLAN_MODELS}")


PLAN_MODELS = ("llava-1.5-7b", "llava-1.5-13b", "llava-1.6-34b")


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit():
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs over data, fsdp, tensor")
        sizes[name.strip()] = int(value)
    return sizes


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|MiB|MB|TB|TiB)?\s*", text)
    if not match:
        raise ValueError(f"--device_memory {text!r}: expected a size such as 80GB or 95GiB")
    unit = {"GB": 1e9, "GiB": 2**30, "MB": 1e6, "MiB": 2**20, "TB": 1e12, "TiB": 2**40, None: 1}[match.group(2)]
    return int(float(match.group(1)) * unit)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays (ShapeDtypeStruct with .sharding); the largest shard."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def plan(model_config, stage_cfg, mesh, *, seq_len: int, per_device_batch: int, remat: str) -> dict:
    """Per-device bytes of one train step of `stage_cfg` (trainable groups, optimizer) for the model
    `model_config` on `mesh`, one micro-batch of per_device_batch x data-parallel sequences."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llava_jax import sharding as shd
    from llava_jax.model import anyres_merge
    from llava_jax.model.llava import LlavaModel
    from llava_jax.train.optimizer import Groups, make_optimizer, split_params
    from llava_jax.train.state import TrainState
    from llava_jax.train.step import make_train_step

    mesh = shd.auto_view(mesh)
    lora = stage_cfg.get("lora", None)
    lora = lora.to_dict() if lora is not None and int(lora.get("rank", 0)) > 0 else None

    def build():  # the stage's model as the trainer builds it, LoRA adapters included
        from llava_jax.train import run_dir

        model = LlavaModel(model_config, rngs=nnx.Rngs(0), remat=remat)
        return run_dir.add_lora(model, lora, 1) if lora else model

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = nnx.to_pure_dict(shd.state_shardings(abstract, mesh))
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), shardings)  # fmt: skip
    groups = Groups.from_config(stage_cfg.trainable)
    if lora:  # the adapters train at lora.lr, as in the trainer
        from llava_jax.train.lora import LORA_PARAMS

        groups = Groups(groups.patterns + ((LORA_PARAMS, float(lora["lr"])),))
    trainable, frozen = split_params(params, groups)
    optimizer, _ = make_optimizer(trainable, groups, total_steps=1000, warmup_ratio=float(stage_cfg.get("warmup_ratio", 0)),
                                  weight_decay=float(stage_cfg.get("weight_decay", 0)),
                                  clip_norm=float(stage_cfg.get("clip_norm", 1.0)))  # fmt: skip
    with shd.use_mesh(mesh):
        abstract_state = jax.eval_shape(lambda t: TrainState.create(t, optimizer, 0), trainable)
        trainable_shardings = jax.tree.map(lambda a: a.sharding, trainable)
        opt_shardings = shd.optimizer_state_shardings(abstract_state.opt_state, trainable, mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.P())
        layout = abstract_state.replace(
            trainable=trainable_shardings, opt_state=opt_shardings,
            **{k: replicated for k in ("rng", "step", "updates", "nonfinite", "empty")})  # fmt: skip
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, layout)
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        rows = per_device_batch * dp
        batch_axis = lambda rank: jax.sharding.NamedSharding(  # noqa: E731
            mesh, shd.logical_to_spec((None, "batch") + (None,) * (rank - 2), mesh, (1, rows) + (1,) * (rank - 2)))
        tokens = lambda: jax.ShapeDtypeStruct((1, rows, seq_len), jnp.int32, sharding=batch_axis(3))  # noqa: E731
        size = model_config.vision.image_size
        batch = {"input_ids": tokens(), "labels": tokens(), "attention_mask": tokens()}
        if model_config.is_anyres:
            tiles = 1 + max(h // size * (w // size) for h, w in model_config.image_grid_pinpoints)
            batch["pixel_values"] = jax.ShapeDtypeStruct((1, rows, tiles, 3, size, size), jnp.float32,
                                                         sharding=batch_axis(6))  # fmt: skip
            features = anyres_merge.max_image_features(model_config, rows, tiles)
            batch["feature_index"] = jax.ShapeDtypeStruct((1, features), jnp.int32,
                                                          sharding=jax.sharding.NamedSharding(mesh, jax.P()))  # fmt: skip
        else:
            batch["pixel_values"] = jax.ShapeDtypeStruct((1, rows, 3, size, size), jnp.float32, sharding=batch_axis(5))
        compiled = make_train_step(graphdef, optimizer).lower(state, frozen, batch).compile()
    memory = compiled.memory_analysis()
    params_bytes = per_device_bytes(params)
    opt_bytes = per_device_bytes(state.opt_state)
    grads_bytes = per_device_bytes(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding),
                                                trainable))  # fmt: skip
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
    return {
        "params": params_bytes, "optimizer_state": opt_bytes, "gradients": grads_bytes,
        "activations": max(memory.temp_size_in_bytes - grads_bytes, 0), "temp": memory.temp_size_in_bytes,
        "arguments": memory.argument_size_in_bytes, "total": total,
        "trainable_parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)),
    }  # fmt: skip


def main(argv):
    del argv
    sizes = parse_mesh(_MESH.value)
    devices = math.prod(sizes.values())
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}")
    import json

    import jax

    from llava_jax import sharding as shd
    from llava_jax.errors import ConfigError

    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required")
    name = _STAGE.value or tuple(cfg.stage_order)[-1]
    stage_cfg = cfg.stages[name]
    seq_len = _SEQ_LEN.value or int(stage_cfg.data.max_length)
    per_device = _BATCH.value or int(stage_cfg.get("per_device_batch_size", 0) or 1)
    remat = _REMAT.value or str(cfg.get("remat", "none"))
    model = model_dims(_MODEL.value)
    attention = _ATTENTION.value or str(stage_cfg.get("model", {}).get("attention", "auto"))
    model = model.replace(attention=attention, dtype=str(cfg.get("compute_dtype", "bfloat16")),
                          param_dtype=str(cfg.get("param_dtype", "float32")))  # fmt: skip
    if len(jax.devices()) < devices:
        raise ConfigError(f"--mesh {_MESH.value} needs {devices} devices; this process sees {len(jax.devices())}")
    mesh = shd.make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=jax.devices()[:devices])
    result = plan(model, stage_cfg, mesh, seq_len=seq_len, per_device_batch=per_device, remat=remat)
    budget = parse_bytes(_MEMORY.value)
    gib = lambda b: b / 2**30  # noqa: E731
    print(f"{_MODEL.value} stage {name!r} on mesh {sizes} ({jax.default_backend()} compile), {per_device} x "
          f"{seq_len} tokens per device, attention {attention}, remat {remat}")  # fmt: skip
    for key in ("params", "optimizer_state", "gradients", "activations", "total"):
        print(f"  {key:16s} {gib(result[key]):8.2f} GiB")
    fits = result["total"] <= budget
    print(f"  {'fits' if fits else 'does NOT fit'} in {_MEMORY.value} per device")
    print(json.dumps({"model": _MODEL.value, "stage": name, "mesh": sizes, "seq_len": seq_len, "per_device_batch": per_device,
                      "attention": attention, "remat": remat, "backend": jax.default_backend(),
                      **{k: round(gib(v), 3) if k != "trainable_parameters" else v for k, v in result.items()},
                      "device_memory_gib": round(gib(budget), 2), "fits": fits}))  # fmt: skip


if __name__ == "__main__":
    from llava_jax.errors import UserError

    def run(argv):
        try:
            main(argv)
        except (UserError, ValueError) as e:
            print(f"error: {e}")
            raise SystemExit(2) from None

    app.run(run)
