"""A LoRA stage through train.py: adapters train, the base stays, the run resumes exactly and loads merged.

Needs llava_jax.train.lora (the LoRA modules); skipped where this checkout lacks them.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.test_train_run import ROOT, args, data, env, metrics, train  # noqa: F401 (fixtures)

LORA = ["--config.stages.main.lora.rank=4", "--config.stages.main.lora.alpha=8.0",
        "--config.stages.main.lora.dropout=0.1", "--config.stages.main.lora.lr=1e-2",
        "--config.stages.main.trainable=(('projector/.*', 1e-3),)"]  # fmt: skip


def test_lora_run_trains_adapters_resumes_exactly_and_loads_merged(tmp_path, args, env):  # noqa: F811
    import llava_jax
    from flax import nnx

    from llava_jax.model.llava import LlavaModel
    from llava_jax.train import run_dir
    from llava_jax.train.lora import merge_lora_params

    straight = str(tmp_path / "straight")
    train(straight, args + LORA, env)
    run = run_dir.read_run(straight)
    q = run.params["decoder"]["layers"]["attn"]["q_proj"]
    assert np.abs(np.asarray(q["lora_b"])).max() > 0  # adapters trained
    init = nnx.to_pure_dict(nnx.state(LlavaModel(run.config, rngs=nnx.Rngs(0))))
    np.testing.assert_array_equal(np.asarray(q["kernel"]), np.asarray(init["decoder"]["layers"]["attn"]["q_proj"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(run.params["vision"]["patch_embed"]), np.asarray(init["vision"]["patch_embed"]))

    # load merges the adapters: the same logits as the merged parameter tree put into a plain model
    pipe = llava_jax.load(straight, dtype="float32")
    merged = merge_lora_params(run.params, run.lora)
    graphdef = nnx.split(nnx.eval_shape(lambda: LlavaModel(run.config, rngs=nnx.Rngs(0))))[0]
    ids = np.asarray([pipe.tokenizer.encode("What colour is this?")])
    expected = np.asarray(nnx.merge(graphdef, merged)(jax.numpy.asarray(ids)))
    np.testing.assert_allclose(pipe.logits(ids), expected, rtol=1e-6, atol=1e-6)

    stopped = str(tmp_path / "stopped")
    proc = subprocess.Popen([sys.executable, "train.py", f"--workdir={stopped}", *args, *LORA], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    while not os.path.exists(os.path.join(stopped, "run.json")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    train(stopped, args + LORA, env)
    assert [r["loss"] for r in metrics(stopped)] == [r["loss"] for r in metrics(straight)]
