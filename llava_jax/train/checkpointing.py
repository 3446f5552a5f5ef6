"""Checkpoints of one stage with orbax's CheckpointManager: parameters, train state and the data iterator.

    STAGE_DIR/checkpoints/<step>/params   every model parameter (trainable and frozen), a pure dict
    STAGE_DIR/checkpoints/<step>/train    TrainState without the trainable parameters (they are in params)
    STAGE_DIR/checkpoints/<step>/data/process_<i>-of-<n>.json   each process's grain iterator state

Every process takes part in every save and restore (orbax writes each array's shards from the processes
holding them); each process's data iterator reads its own rows, so each saves and restores its own state
(grain's orbax handler). Saves of arrays are asynchronous (the step loop goes on while they are written);
the iterator state is captured when the save starts. The manager keeps the last `keep` checkpoints.
`params` alone is what `llava_jax.load(WORKDIR)` restores.
"""

from __future__ import annotations

import os
from typing import Any

import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("params", "train", "data")


class StageCheckpoints:
    def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                               create=True)  # fmt: skip
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, params: dict, train: dict, iterator: Any | None) -> None:
        """iterator: the data iterator (a grain DatasetIterator: get_state / set_state), or None."""
        items = dict(params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train))
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_params: dict, abstract_train: dict, iterator: Any | None = None
                ) -> tuple[dict, dict]:  # fmt: skip
        """(params, train) of `step`, each array laid out as its abstract target; `iterator` (where given)
        continues where this process's iterator stood."""
        items = dict(params=ocp.args.StandardRestore(as_targets(abstract_params)),
                     train=ocp.args.StandardRestore(as_targets(abstract_train)))  # fmt: skip
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["params"], restored["train"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def as_targets(tree):
    """ShapeDtypeStructs (with each array's sharding, or one device's) for orbax to restore into."""

    def target(x):
        sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(target, tree)


def restore_params_only(step_dir: str, abstract_params: dict) -> dict:
    """The `params` item of one checkpoint step directory (for loading a run as a model). `step_dir` may be
    relative (`--workdir runs/demo`); orbax restores only from absolute paths."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(os.path.abspath(step_dir), "params"), as_targets(abstract_params))
