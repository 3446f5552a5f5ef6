"""A run's config read into checked stage specs: data, batch geometry, groups, where each stage starts.

Config layout (see configs/ for complete files):

    seed, max_steps (-1: no cap), log_every, checkpoint_every, keep_checkpoints, max_nonfinite_in_a_row,
    compute_dtype, param_dtype (float32: master weights), remat (a policy of model.layers.REMAT_POLICIES), mfu_peak_tflops,
    loss_chunk (positions per chunk of the supervised-only LM head, train.loss.chunked_summed_loss; 0: every position),
    mesh.data, mesh.fsdp, mesh.tensor (-1: the rest of the devices),
    stage_order: the stage names in the order they run (ConfigDict sorts its keys, so the order is explicit),
    stages.<name>: one ConfigDict per stage:
        init.kind: "scratch" | "previous" | "run" | "checkpoint" | "components"
        init.path, init.tokenizer, init.vision_tower, init.language_model, init.mm_projector
        model: LlavaConfig fields (the whole model for "scratch"; overrides otherwise)
        data.files (comma-separated), data.image_folder, data.template, data.max_length,
        data.image_aspect_ratio ("" keeps the model's), data.group_by_modality_length, data.num_workers,
        data.length_buckets (padded lengths a batch may take; () for max_length / 8, / 4, / 2, max_length)
        data.packing ("" | "first_fit" | "best_fit": examples_per_row records packed into each row of
        max_length tokens; the batch sizes then count rows), data.examples_per_row
        global_batch_size, per_device_batch_size (0: global / data-parallel devices, no accumulation),
        epochs, trainable ((regex, lr), ...), warmup_ratio, weight_decay, clip_norm,
        lora.rank (0: off), lora.alpha, lora.dropout, lora.target, lora.lr
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from llava_jax.errors import ConfigError, DataError

NO_CAP = -1  # max_steps sentinel: run every stage to the end of its epochs
INIT_KINDS = ("scratch", "previous", "run", "checkpoint", "components")


def field(cfg, name: str, where: str):
    """cfg.name, or a ConfigError naming the missing field."""
    full = f"{where}.{name}" if where else name
    try:
        return cfg[name]
    except (KeyError, AttributeError):
        raise ConfigError(f"config field {full} is missing; add it to the config file or pass --config.{full}=VALUE") from None


def top(cfg, name: str):
    return field(cfg, name, "")


def to_dict(value) -> Any:
    """A ConfigDict (or nested) as plain Python values."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How one global batch is laid out: per host rows, micro-batches (accumulation), per device rows."""

    global_batch: int
    per_device: int
    accumulation: int
    host_batch: int  # rows this process reads per step


def batch_geometry(stage_cfg, name: str, data_parallel: int, process_count: int = 1) -> Geometry:
    where = f"stages.{name}"
    global_batch = int(field(stage_cfg, "global_batch_size", where))
    per_device = int(stage_cfg.get("per_device_batch_size", 0) or 0)
    if global_batch < 1:
        raise ConfigError(f"{where}.global_batch_size must be positive, got {global_batch}")
    if global_batch % data_parallel:
        raise ConfigError(
            f"{where}.global_batch_size {global_batch} is not divisible by the {data_parallel} data-parallel "
            f"devices (mesh.data x mesh.fsdp); choose a multiple of {data_parallel} or another mesh"
        )
    if per_device == 0:
        per_device = global_batch // data_parallel
    if global_batch % (per_device * data_parallel):
        raise ConfigError(
            f"{where}.global_batch_size {global_batch} is not a multiple of per_device_batch_size {per_device} x "
            f"{data_parallel} data-parallel devices; change either so that it divides"
        )
    if global_batch % process_count:
        raise ConfigError(f"{where}.global_batch_size {global_batch} does not split over {process_count} processes")
    return Geometry(global_batch, per_device, global_batch // (per_device * data_parallel), global_batch // process_count)


def data_files(stage_cfg, name: str) -> tuple[str, ...]:
    data = field(stage_cfg, "data", f"stages.{name}")
    files = tuple(f.strip() for f in str(field(data, "files", f"stages.{name}.data")).split(",") if f.strip())
    if not files:
        raise ConfigError(f"stages.{name}.data.files is empty; name the LLaVA JSON/JSONL file(s) to train on")
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"stages.{name}.data.files: {path} does not exist; download it or fix the path "
                            f"(--config.stages.{name}.data.files=PATH)")  # fmt: skip
    folder = str(data.get("image_folder", ""))
    if folder and not os.path.isdir(folder):
        raise DataError(f"stages.{name}.data.image_folder: {folder} is not a directory; fix the path "
                        f"(--config.stages.{name}.data.image_folder=DIR)")  # fmt: skip
    return files


def order(cfg) -> tuple[str, ...]:
    """The stages' names in the order they run."""
    names = top(cfg, "stage_order")
    names = tuple(n.strip() for n in names.split(",")) if isinstance(names, str) else tuple(names)
    known = tuple(top(cfg, "stages").keys())
    for name in names:
        if name not in known:
            raise ConfigError(f"stage_order names {name!r}, which config.stages lacks (it has {list(known)})")
    missing = [n for n in known if n not in names]
    if missing or not names:
        raise ConfigError(f"stage_order {list(names)} leaves out the stages {missing}; list every stage to run")
    return names


def check(cfg) -> None:
    """Fields every config has, with values that can work (ConfigError otherwise)."""
    for name in ("seed", "max_steps", "log_every", "checkpoint_every", "mesh", "stages"):
        top(cfg, name)
    for axis in ("data", "fsdp", "tensor"):
        field(cfg.mesh, axis, "mesh")
    from llava_jax.model.layers import REMAT_POLICIES

    if cfg.get("remat", "none") not in REMAT_POLICIES:
        raise ConfigError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {cfg.remat!r}")
    loss_chunk = cfg.get("loss_chunk", 0)
    if isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk < 0:
        raise ConfigError(f"loss_chunk must be an integer >= 0 (0: the logits of every position), got {loss_chunk!r}")
    for i, name in enumerate(order(cfg)):
        stage = cfg.stages[name]
        init = field(stage, "init", f"stages.{name}")
        kind = field(init, "kind", f"stages.{name}.init")
        if kind not in INIT_KINDS:
            raise ConfigError(f"stages.{name}.init.kind must be one of {INIT_KINDS}, got {kind!r}")
        if kind == "previous" and i == 0:
            raise ConfigError(f"stages.{name}.init.kind is 'previous' but {name} is the first stage; name a "
                              "checkpoint (init.kind='checkpoint', init.path=...) or a run (init.kind='run')")  # fmt: skip
        for f in ("global_batch_size", "epochs", "trainable", "data"):
            field(stage, f, f"stages.{name}")
        if not stage.trainable:
            raise ConfigError(f"stages.{name}.trainable is empty: nothing would train; give (regex, lr) pairs")
