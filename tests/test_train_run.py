"""train.py end to end on a tiny model: exact resume after SIGTERM, loading the run, user errors, divergence."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.train_data import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two CPU devices (data parallel); compilations cached across the runs of this module."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PLATFORMS": "cpu"}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")), num=12, text_only_every=5)


@pytest.fixture(scope="module")
def args(data, tokenizer_dir):
    files, images = data
    return ["--config", os.path.join(ROOT, "configs", "tiny.py"), f"--config.stages.main.data.files={files}",
            f"--config.stages.main.data.image_folder={images}", f"--config.stages.main.init.tokenizer={tokenizer_dir}",
            "--config.checkpoint_every=2", "--config.stages.main.epochs=2"]  # fmt: skip


def train(workdir, args, env, *extra, check=True):
    run = subprocess.run([sys.executable, "train.py", f"--workdir={workdir}", *args, *extra], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, args, env):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    run = train(workdir, args, env)
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["stages"][0]["steps"] == 6  # 12 records, batch 4, 2 epochs
    return workdir


def test_resume_after_sigterm_logs_identical_losses(tmp_path, args, env, uninterrupted):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(workdir, "run.json")):  # written once SIGTERM is handled
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM: saved" in stderr
    stopped_at = len(metrics(workdir))
    assert 1 <= stopped_at < 6
    train(workdir, args, env)
    resumed, expected = metrics(workdir), metrics(uninterrupted)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [r[key] for r in resumed] == [r[key] for r in expected], key

    # the run loads as a model, with the same parameters as the run never stopped
    import llava_jax

    a, b = llava_jax.load(workdir, dtype="float32"), llava_jax.load(uninterrupted, dtype="float32")
    assert b.tokenizer is not None and b.config.image_token_id == 512
    ids = np.asarray([b.tokenizer.encode("What colour is this?")])
    np.testing.assert_array_equal(a.logits(ids), b.logits(ids))

    # the same workdir with another config: one line naming the field, exit 2
    other = train(workdir, args, env, "--config.seed=7", check=False)
    assert other.returncode == 2
    assert other.stderr.strip().count("\n") == 0 and "seed" in other.stderr


@pytest.mark.parametrize("override, needle", [
    ("--config.stages.main.data.files=/no/such/file.json", "data.files"),
    ("--config.stages.main.data.image_folder=/no/such/dir", "image_folder"),
    ("--config.stages.main.global_batch_size=5", "global_batch_size"),
    ("--config.stages.main.init.kind=previous", "previous"),
    ("--config.stages.main.data.max_length=160", "length_buckets"),
])  # fmt: skip
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, env, override, needle):
    run = train(str(tmp_path / "run"), args, {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                override, check=False)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error:") and needle in run.stderr


def test_missing_config_field_is_one_line_and_exit_2(tmp_path, args, env):
    config = tmp_path / "config.py"
    config.write_text("from configs.tiny import get_config as base\n\n\ndef get_config():\n    c = base()\n"
                      "    del c['max_steps']\n    return c\n")  # fmt: skip
    run = train(str(tmp_path / "run"), ["--config", str(config), *args[2:]], env, check=False)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "max_steps" in run.stderr


def test_non_finite_steps_in_a_row_stop_naming_step_and_checkpoint(tmp_path, args, env):
    # an infinite learning rate turns every parameter non-finite at step 1; steps 2, 3, 4 are then skipped
    run = train(str(tmp_path / "run"), args, env, "--config.stages.main.trainable=(('.*', 1e39),)",
                "--config.stages.main.warmup_ratio=0.0", "--config.checkpoint_every=1", check=False)  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "step 4" in last and "3 steps in a row" in last and "checkpoints/3" in last
    records = metrics(str(tmp_path / "run"))
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 2, 3]


def test_two_stages_bf16_on_two_devices_freeze_what_they_should(tmp_path, data, tokenizer_dir, env):
    """Stage 1 trains the projector only, stage 2 starts from it; bfloat16 compute, remat, 2-way data parallel."""
    import jax
    from flax import nnx

    from llava_jax.model.llava import LlavaModel
    from llava_jax.train import run_dir

    files, images = data
    workdir = str(tmp_path / "run")
    args = ["--config", os.path.join(ROOT, "configs", "tiny.py") + ":two_stages", "--config.compute_dtype=bfloat16",
            "--config.remat=full", f"--config.stages.pretrain.init.tokenizer={tokenizer_dir}"]  # fmt: skip
    for stage in ("pretrain", "finetune"):
        args += [f"--config.stages.{stage}.data.files={files}", f"--config.stages.{stage}.data.image_folder={images}",
                 f"--config.stages.{stage}.epochs=1"]  # fmt: skip
    two_devices = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    first = train(workdir, args, two_devices)
    records = metrics(workdir)
    assert [r["stage"] for r in records] == ["pretrain"] * 3 + ["finetune"] * 3
    assert records[2]["skipped_records"] == 3  # plain leaves out the text-only records
    assert all(np.isfinite(r["loss"]) for r in records)

    pretrain = run_dir.read_stage(run_dir.stage_dir(workdir, "pretrain"))
    trained = run_dir.restore_stage_params(pretrain)
    init = nnx.to_pure_dict(nnx.state(LlavaModel(pretrain.config, rngs=nnx.Rngs(0))))
    for part in ("vision", "decoder"):
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trained[part]), jax.tree.map(np.asarray, init[part]))
    assert not np.array_equal(np.asarray(trained["projector"]["linears"][0]["kernel"]),
                              np.asarray(init["projector"]["linears"][0]["kernel"]))  # fmt: skip
    finetune = run_dir.restore_stage_params(run_dir.read_stage(run_dir.stage_dir(workdir, "finetune")))
    assert not np.array_equal(np.asarray(finetune["decoder"]["embed"]), np.asarray(trained["decoder"]["embed"]))

    again = train(workdir, args, two_devices)  # both stages done: nothing to run, the same summary
    assert json.loads(again.stdout.splitlines()[-1])["stages"] == json.loads(first.stdout.splitlines()[-1])["stages"]
    assert len(metrics(workdir)) == len(records)
