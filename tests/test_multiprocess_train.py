"""train.py on two processes (gloo CPU collectives on loopback, 2 devices each) against one process with
4 devices: the same losses and parameters after three steps, and a collective checkpoint that each
process resumes from with its own data iterator."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.train_data import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # a hung process (e.g. a peer that died before a collective) fails the test, never hangs it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir: str, processes: int, devices: int, args: list[str], cache: str) -> list[subprocess.Popen]:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip
    if processes > 1:
        address = f"127.0.0.1:{free_port()}"
        env.update(JAX_COORDINATOR_ADDRESS=address, JAX_COORDINATOR_BIND_ADDRESS=address,
                   JAX_NUM_PROCESSES=str(processes))  # fmt: skip
    procs = []
    for i in range(processes):  # output to files: a full pipe would block a process that nobody reads yet
        out, err = (open(f"{workdir}.{i}.{name}", "w+") for name in ("out", "err"))
        procs.append(subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *args], cwd=ROOT,
                                      env={**env, "JAX_PROCESS_ID": str(i)} if processes > 1 else env,
                                      stdout=out, stderr=err, text=True))  # fmt: skip
        procs[-1].logs = (out, err)
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[str, str]]:
    """Waits for every process; their (stdout, stderr), all exited with 0. Once one fails (or TIMEOUT_S passes) the others are
    killed at once: a peer left waiting at a collective would otherwise wait for its own timeout."""
    deadline = time.time() + TIMEOUT_S
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outputs = []
    for p in procs:
        p.wait()
        for f in p.logs:
            f.seek(0)
        outputs.append(tuple(f.read() for f in p.logs))
        for f in p.logs:
            f.close()
    failed = [(p.returncode, stderr[-2000:]) for p, (_, stderr) in zip(procs, outputs) if p.returncode != 0]
    assert not failed, f"training processes failed or hung (killed): {failed}"
    return outputs


def summaries(outputs: list[tuple[str, str]]) -> list[dict]:
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]


def run(workdir: str, processes: int, devices: int, args: list[str], cache: str) -> list[dict]:
    """launch + finish -> summaries, launched again once where the coordinator's free port was taken meanwhile."""
    try:
        return summaries(finish(launch(workdir, processes, devices, args, cache)))
    except AssertionError as e:
        if "Failed to start RPC server" not in str(e):
            raise
        return summaries(finish(launch(workdir, processes, devices, args, cache)))


def losses(workdir: str) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def final_params(workdir: str) -> dict[str, np.ndarray]:
    from llava_jax.train.run_dir import read_run_params

    flat = jax.tree_util.tree_flatten_with_path(read_run_params(workdir, "float32").params)[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


# The vision tower's key bias has a zero gradient in exact arithmetic (it adds the same q.b to every key's
# score, which a softmax ignores): Adam turns its rounding-level gradients (~1e-10) into updates whose size
# does not depend on them, so it moves by noise that differs with the reduction order. Checked apart.
NOISE_ONLY = "['vision']['layers']['attn']['k_proj']['bias']"


def assert_params_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]):
    """Within 1e-5 of each tensor's largest value (single tiny elements differ more in their own terms)."""
    assert got.keys() == expected.keys()
    for name, b in expected.items():
        if name == NOISE_ONLY:  # noise far below what 3 steps at lr 1e-3 move a trained parameter
            assert np.abs(got[name]).max() < 1e-5 and np.abs(b).max() < 1e-5
            continue
        np.testing.assert_allclose(got[name], b, atol=1e-5 * np.abs(b).max(), rtol=0, err_msg=name)


@pytest.fixture(scope="module")
def args(tmp_path_factory, tokenizer_dir):
    # 12 records (every 5th text-only, so a process's micro-batch can hold an empty image slot), global
    # batch 4, one epoch: three steps; a checkpoint at step 2 and at the end.
    files, images = write_dataset(str(tmp_path_factory.mktemp("data")), num=12, text_only_every=5)
    return ["--config", os.path.join(ROOT, "configs", "tiny.py"), f"--config.stages.main.data.files={files}",
            f"--config.stages.main.data.image_folder={images}", f"--config.stages.main.init.tokenizer={tokenizer_dir}",
            "--config.checkpoint_every=2", "--config.stages.main.epochs=1"]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))  # compilations shared by this module's runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, args, cache):
    """Three steps on one process with 4 devices and, at the same time, on two processes with 2 each."""
    one, two = str(tmp_path_factory.mktemp("one")), str(tmp_path_factory.mktemp("two"))
    reference = launch(one, 1, 4, args, cache)
    pair = run(two, 2, 2, args, cache)
    (summary,) = summaries(finish(reference))
    assert summary["stages"][0]["steps"] == 3 and all(s["stages"][0]["steps"] == 3 for s in pair)
    return {"one": (losses(one), final_params(one)), "two": (losses(two), final_params(two)), "workdir": two}


def test_two_processes_train_as_one_and_resume_from_step_2(tmp_path, runs, args, cache):
    (expected, one_params), (uninterrupted, two_params) = runs["one"], runs["two"]
    assert [s for s, _ in uninterrupted] == [1, 2, 3]
    np.testing.assert_allclose([x for _, x in uninterrupted], [x for _, x in expected], rtol=1e-5)
    assert_params_close(two_params, one_params)

    two = str(tmp_path / "two")
    shutil.copytree(runs["workdir"], two)
    stage = os.path.join(two, "stages", "main")
    for step in (2, 3):  # each process saved its own iterator state in each checkpoint
        files = sorted(os.listdir(os.path.join(stage, "checkpoints", str(step), "data")))
        assert [f for f in files if f.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]

    # as if both processes were stopped after the step-2 checkpoint: the restarted run resumes there
    shutil.rmtree(os.path.join(stage, "checkpoints", "3"))
    os.remove(os.path.join(stage, "done.json"))
    assert all(s["stages"][0]["steps"] == 3 for s in run(two, 2, 2, args, cache))
    resumed_losses = losses(two)  # steps 1-2 kept from before the stop, step 3 run again
    assert [s for s, _ in resumed_losses] == [1, 2, 3]
    np.testing.assert_allclose(resumed_losses[2][1], uninterrupted[2][1], rtol=1e-6)
    assert_params_close(final_params(two), two_params)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, runs, args, cache):
    """SIGTERM reaches process 0 only (a preemption notice need not reach every host at once): both processes
    save at the same step and exit cleanly; the same command resumes, and the run ends where one never stopped
    ends."""
    stopped = str(tmp_path / "stopped")
    procs = launch(stopped, 2, 2, args, cache)
    deadline = time.time() + TIMEOUT_S
    while not os.path.exists(os.path.join(stopped, "run.json")):  # process 0 writes it once it handles SIGTERM
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "no run.json"
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGTERM)
    outputs = finish(procs)
    assert all("SIGTERM: saved" in stderr for _, stderr in outputs), [stderr[-500:] for _, stderr in outputs]
    saved = [s for s, _ in losses(stopped)]
    assert saved in ([1], [1, 2])  # the flag is read after each step: before step 3 starts on this machine
    checkpoints = os.path.join(stopped, "stages", "main", "checkpoints")
    assert sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit()) == [len(saved)]
    assert all(s["stages"][0]["steps"] == 3 for s in run(stopped, 2, 2, args, cache))
    whole_losses, whole_params = runs["two"]
    assert losses(stopped) == whole_losses
    assert_params_close(final_params(stopped), whole_params)
