"""A training run's workdir, and reading it back as a model.

    WORKDIR/run.json                       {"format": "llava_jax_run", "config": the run's config, "stages": [...]}
    WORKDIR/metrics.jsonl                  one JSON object per logged step
    WORKDIR/tensorboard/                   TensorBoard event files
    WORKDIR/stages/<name>/stage.json       the stage's model config, chat template, LoRA settings
    WORKDIR/stages/<name>/side/            tokenizer and preprocessor files of the model
    WORKDIR/stages/<name>/checkpoints/<step>/{params,train,data}   (llava_jax.train.checkpointing)
    WORKDIR/stages/<name>/done.json        {"step": N} once the stage has finished

`llava_jax.load(WORKDIR)` loads the latest checkpoint of the last stage that has one, LoRA merged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx

from llava_jax.checkpoints.orbax import SIDE_FILES
from llava_jax.config import LlavaConfig
from llava_jax.errors import CheckpointError

RUN_FILE = "run.json"
STAGE_FILE = "stage.json"
DONE_FILE = "done.json"


def is_run_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, RUN_FILE))


def stage_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, "stages", name)


def checkpoints_dir(stage: str) -> str:
    return os.path.join(stage, "checkpoints")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def write_stage(stage: str, config: LlavaConfig, template: str | None, lora: dict | None, side_from: str | None) -> None:
    """stage.json and the side files, written once when a stage first starts, by process 0 (the others
    wait for it at a barrier before reading them)."""
    if jax.process_index() != 0:
        return
    side = os.path.join(stage, "side")
    os.makedirs(side, exist_ok=True)
    if side_from:
        for name in SIDE_FILES:
            src = os.path.join(side_from, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(side, name))
    write_json(os.path.join(stage, STAGE_FILE), {"config": config.to_dict(), "template": template, "lora": lora})


def step_dirs(stage: str) -> list[int]:
    """The checkpoint steps of a stage that finished writing, ascending."""
    directory = checkpoints_dir(stage)
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        # orbax writes into a temporary name and renames on commit: plain integer names are complete
        if name.isdigit() and os.path.isdir(os.path.join(directory, name, "params")):
            steps.append(int(name))
    return sorted(steps)


@dataclasses.dataclass
class StageInfo:
    directory: str
    config: LlavaConfig
    template: str | None
    lora: dict | None

    @property
    def side_dir(self) -> str:
        return os.path.join(self.directory, "side")


def read_stage(stage: str) -> StageInfo:
    meta = read_json(os.path.join(stage, STAGE_FILE))
    return StageInfo(stage, LlavaConfig.from_dict(meta["config"]), meta.get("template"), meta.get("lora"))


def latest_stage(workdir: str) -> StageInfo:
    """The last stage (in the run's order) that has a checkpoint."""
    run = read_json(os.path.join(workdir, RUN_FILE))
    for name in reversed(run.get("stages", [])):
        stage = stage_dir(workdir, name)
        if step_dirs(stage) and os.path.isfile(os.path.join(stage, STAGE_FILE)):
            return read_stage(stage)
    raise CheckpointError(f"the run in {workdir} has no checkpoint yet; train it first (python train.py ...)")


def abstract_params(config: LlavaConfig, lora: dict | None = None) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, pure dict of ShapeDtypeStructs) of the model, with LoRA adapters where `lora` says."""
    from llava_jax.model.llava import LlavaModel

    def build():
        model = LlavaModel(config, rngs=nnx.Rngs(0))
        return add_lora(model, lora, 1) if lora else model

    graphdef, state = nnx.split(nnx.eval_shape(build))
    return graphdef, nnx.to_pure_dict(state)


def add_lora(model, lora: dict, seed: int):
    """The model with LoRA adapters (llava_jax.train.lora) on the linears `lora["target"]` selects, in place.

    lora: a config's lora section {rank, alpha, dropout, target, lr}."""
    try:
        from llava_jax.train.lora import apply_lora
    except ImportError:
        raise CheckpointError("this run uses LoRA, which needs llava_jax.train.lora; this checkout lacks it") from None
    return apply_lora(model, rank=int(lora["rank"]), alpha=float(lora["alpha"]), dropout=float(lora.get("dropout", 0.0)),
                      targets=lora.get("target") or None, rngs=nnx.Rngs(seed))  # fmt: skip


def restore_stage_params(info: StageInfo, dtype: str | None = None, step: int | None = None) -> dict:
    """The params of a stage's checkpoint (default: its latest), cast to dtype, as a pure dict."""
    from llava_jax.train.checkpointing import restore_params_only

    steps = step_dirs(info.directory)
    if not steps:
        raise CheckpointError(f"{checkpoints_dir(info.directory)} holds no checkpoint")
    step = steps[-1] if step is None else step
    config = info.config if dtype is None else info.config.replace(param_dtype=dtype)
    _, abstract = abstract_params(info.config, info.lora)
    params = restore_params_only(os.path.join(checkpoints_dir(info.directory), str(step)), abstract)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(np.dtype(config.param_dtype)), params)
    return params


@dataclasses.dataclass
class RunModel:
    """What a run holds, for the exporters: parameters include unmerged LoRA adapters where lora is set."""

    config: LlavaConfig
    params: dict
    lora: dict | None
    side_dir: str
    template: str | None


def read_run(workdir: str, dtype: str | None = None) -> RunModel:
    """The run's latest checkpoint with its config, LoRA settings, side-file directory and template."""
    info = latest_stage(workdir)
    return RunModel(info.config, restore_stage_params(info, dtype), info.lora, info.side_dir, info.template)


def merged_params(run: RunModel) -> dict:
    """The run's parameters with LoRA adapters merged into the base weights (unchanged without LoRA)."""
    if not run.lora:
        return run.params
    from llava_jax.train.lora import merge_lora_params

    return merge_lora_params(run.params, run.lora)  # also drops the adapters' dropout keys


def read_stage_params(stage: str, dtype: str):
    """A later stage's start: the (LoRA-merged) params of this stage's latest checkpoint."""
    from llava_jax.train.sources import Start

    info = read_stage(stage)
    run = RunModel(info.config, restore_stage_params(info, dtype), info.lora, info.side_dir, info.template)
    return Start(info.config.replace(param_dtype=dtype), merged_params(run), info.side_dir, info.template)


def read_run_params(workdir: str, dtype: str):
    from llava_jax.train.sources import Start

    if not is_run_dir(workdir):
        raise CheckpointError(f"{workdir} is not a training run's workdir (no {RUN_FILE})")
    run = read_run(workdir, dtype)
    return Start(run.config.replace(param_dtype=dtype), merged_params(run), run.side_dir, run.template)
