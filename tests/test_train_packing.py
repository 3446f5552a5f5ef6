"""Packed rows in training: the data pipeline packs a step's records when data.packing asks, and a step on
packed rows has the loss and gradients of the same examples unpacked; a packed tiny run learns."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llava_jax.data.pipeline import DataConfig, LlavaDataset
from llava_jax.model.llava import LlavaModel
from llava_jax.train import microbatch, sources
from llava_jax.train.optimizer import Groups, split_params
from llava_jax.train.state import TrainState
from llava_jax.train.step import make_train_step
from tests.train_data import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE2 = Groups(((r"projector/.*", 1.0), (r"decoder/.*", 1.0)))  # the vision tower frozen, as in stage 2


def tiny_model_config():
    from configs import tiny

    return sources.model_config(tiny.get_config().stages.main.model.to_dict())


def first_batch(data, tokenizer, config, **fields) -> dict:
    files, images = data
    # examples of ~100-112 tokens: three fit a packed row of 384, one per row unpacked (T = 128)
    data_config = DataConfig(data_path=files, image_folder=images, max_length=384, length_buckets=(128, 384),
                             shuffle=False, group_by_modality_length=False, num_workers=0, **fields)  # fmt: skip
    iterator = iter(LlavaDataset(data_config, tokenizer=tokenizer, model_config=config))
    batch = next(iterator)
    assert iterator.stats["skipped"] == {}
    return batch


@pytest.mark.parametrize("method", ["first_fit", "best_fit"])
def test_packed_step_equals_unpacked(tmp_path, tokenizer, method):
    data = write_dataset(str(tmp_path), num=8, text_only_every=3)
    config = tiny_model_config()
    packed = first_batch(data, tokenizer, config, batch_size=3, packing=method, examples_per_row=3)  # 9 >= 8 records
    plain = first_batch(data, tokenizer, config, batch_size=8)
    assert sorted(packed["example_index"][packed["example_index"] >= 0]) == sorted(plain["example_index"]) == list(range(8))
    assert packed["segment_ids"].max() > 1 and packed["input_ids"].shape[0] < 8  # several examples share rows

    graphdef, state = nnx.split(LlavaModel(config, rngs=nnx.Rngs(0)))
    trainable, frozen = split_params(nnx.to_pure_dict(state), STAGE2)
    step = make_train_step(graphdef, optax.sgd(1.0), donate=False)  # the update is then minus the gradient
    start = TrainState.create(trainable, optax.sgd(1.0), 0)
    results = [step(start, frozen, jax.tree.map(jnp.asarray, microbatch.split(b, 1, config))) for b in (packed, plain)]
    (packed_state, packed_metrics), (plain_state, plain_metrics) = results
    assert int(packed_metrics["tokens"]) == int(plain_metrics["tokens"]) > 0
    np.testing.assert_allclose(float(packed_metrics["loss"]), float(plain_metrics["loss"]), rtol=1e-5)
    for a, b, before in zip(jax.tree.leaves(packed_state.trainable), jax.tree.leaves(plain_state.trainable),
                            jax.tree.leaves(trainable)):  # fmt: skip
        gradient_a, gradient_b = np.asarray(before) - np.asarray(a), np.asarray(before) - np.asarray(b)
        np.testing.assert_allclose(gradient_a, gradient_b, rtol=1e-5, atol=1e-5 * np.abs(gradient_b).max())


def test_packed_tiny_run_learns(tmp_path, tokenizer_dir):
    files, images = write_dataset(str(tmp_path / "data"), num=48, text_only_every=5)
    workdir = str(tmp_path / "run")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "train.py", f"--workdir={workdir}", "--config", "configs/tiny.py",
                          f"--config.stages.main.data.files={files}", f"--config.stages.main.data.image_folder={images}",
                          f"--config.stages.main.init.tokenizer={tokenizer_dir}", "--config.stages.main.epochs=2",
                          "--config.stages.main.global_batch_size=2", "--config.stages.main.data.packing=first_fit",
                          "--config.stages.main.data.examples_per_row=3", "--config.stages.main.data.max_length=384",
                          "--config.stages.main.data.length_buckets=(384,)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 16  # 48 records, 6 a step (2 rows x 3), 2 epochs
    assert all(r["skipped_records"] == 0 for r in records)
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
