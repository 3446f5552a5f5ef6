"""Stage checkpoints: a run's parameters restore from a relative workdir (the README's `--workdir runs/demo`)."""

import os

import numpy as np

from llava_jax.train.checkpointing import StageCheckpoints, restore_params_only


def test_params_restore_from_a_relative_step_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = {"layer": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    checkpoints = StageCheckpoints(os.path.join("run", "checkpoints"), keep=1, asynchronous=False)
    checkpoints.save(3, params, {"step": np.int32(3)}, None)
    checkpoints.close()
    restored = restore_params_only(os.path.join("run", "checkpoints", "3"), params)
    np.testing.assert_array_equal(np.asarray(restored["layer"]["kernel"]), params["layer"]["kernel"])
