"""Atomic writes (llava_jax.atomic): a writer killed or failing at any point leaves no target that looks
complete, the leftover is refused with what to do; commands report user errors as one line, exit 2."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import llava_jax
from llava_jax import atomic
from llava_jax.checkpoints import orbax
from llava_jax.convert import convert
from llava_jax.errors import CheckpointError, MissingInputError, OutputExistsError, UserError
from tests import reference as R

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.getcwd()}


def test_atomic_file_replaces_only_when_complete(tmp_path):
    target = tmp_path / "answers.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed midway")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["answers.jsonl"]
    with atomic.atomic_file(str(target)) as tmp:
        with open(tmp, "w") as f:
            f.write("new\n")
        assert target.read_text() == "old\n"  # not yet
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["answers.jsonl"]
    with pytest.raises(OutputExistsError, match="answers.jsonl"):
        with atomic.atomic_file(str(target), overwrite=False):
            pass


def test_atomic_dir_needs_its_marker_and_refuses_leftovers(tmp_path):
    target = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="marker.json"):
        with atomic.atomic_dir(target, marker="marker.json") as tmp:
            open(os.path.join(tmp, "weights"), "w").close()
    assert not os.path.exists(target) and os.path.isdir(target + ".partial")  # (the marker check is after the body)
    with pytest.raises(atomic.InterruptedWriteError, match=r"rm -r .*out\.partial"):
        with atomic.atomic_dir(target, marker="marker.json"):
            pass
    assert isinstance(atomic.InterruptedWriteError("x"), UserError)
    atomic.remove_partial(target)
    with atomic.atomic_dir(target, marker="marker.json") as tmp:
        open(os.path.join(tmp, "marker.json"), "w").close()
    assert os.listdir(target) == ["marker.json"] and not os.path.exists(target + ".partial")
    with pytest.raises(OutputExistsError, match="not empty"):
        atomic.check_new_dir(target)


WRITER = textwrap.dedent(
    """
    import os, sys, time
    from llava_jax.atomic import atomic_dir, atomic_file
    kind, target, stage = sys.argv[1:]
    def pause(here):
        if here == stage:
            print("ready", flush=True)
            time.sleep(60)
    if kind == "file":
        with atomic_file(target) as tmp:
            with open(tmp, "w") as f:
                f.write("x" * 1000)
                pause("writing")
                f.flush()
            pause("written")
    else:
        with atomic_dir(target, marker="done.json") as tmp:
            open(os.path.join(tmp, "weights"), "w").close()
            pause("weights")
            open(os.path.join(tmp, "done.json"), "w").close()
            pause("marker")
    pause("after")
    """
)


@pytest.mark.parametrize("kind,stage", [("file", "writing"), ("file", "written"), ("file", "after"),
                                        ("dir", "weights"), ("dir", "marker"), ("dir", "after")])  # fmt: skip
def test_sigkill_at_any_point_leaves_old_or_complete(tmp_path, kind, stage):
    """A writer process killed with SIGKILL at each point: the target is absent or complete, never partial."""
    target = str(tmp_path / ("t.json" if kind == "file" else "t"))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, target, stage], stdout=subprocess.PIPE, env=ENV,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if stage == "after":
        assert os.path.exists(target) and not os.path.exists(target + ".partial")
        assert os.path.getsize(target) == 1000 if kind == "file" else sorted(os.listdir(target)) == ["done.json", "weights"]
    else:
        assert not os.path.exists(target)
        assert os.path.exists(target + ".partial")
        if kind == "dir":
            with pytest.raises(atomic.InterruptedWriteError, match="delete it"):
                atomic.check_new_dir(target)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = R.save(R.build_llava(R.llava_hf_config()), str(tmp_path_factory.mktemp("hf")))
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:  # a side file conversion copies
        json.dump({}, f)
    return directory


@pytest.mark.parametrize("failing", ["params", "side_files", "marker"])
def test_interrupted_conversion_is_never_loaded(hf_dir, tmp_path, monkeypatch, failing):
    """Conversion failing while writing parameters, side files or the marker leaves nothing loadable at
    --out; loading names the leftover and converting again says to delete it."""
    out = str(tmp_path / "converted")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    if failing == "params":
        monkeypatch.setattr(orbax.ocp.StandardCheckpointer, "save", boom)
    elif failing == "side_files":
        monkeypatch.setattr(orbax.shutil, "copy2", boom)
    else:
        monkeypatch.setattr(orbax.json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_dir, out, "float32", progress=False)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # the failed writer removed its partial directory
    os.makedirs(out + ".partial")  # what a writer killed at that point leaves (the SIGKILL test above)
    with pytest.raises(MissingInputError, match=r"converted\.partial is the unfinished output.*delete it"):
        llava_jax.load(out)
    with pytest.raises(atomic.InterruptedWriteError, match=r"converted\.partial"):
        convert(hf_dir, out, "float32", progress=False)
    atomic.remove_partial(out)
    convert(hf_dir, out, "float32", progress=False)
    assert orbax.is_model_dir(out) and sorted(os.listdir(tmp_path)) == ["converted"]


def test_a_directory_without_marker_is_refused(hf_dir, tmp_path):
    """What an older, non-atomic writer left (parameters, no llava_jax.json) is not taken for a model."""
    out = str(tmp_path / "converted")
    convert(hf_dir, out, "float32", progress=False)
    os.remove(os.path.join(out, orbax.MARKER))
    with pytest.raises(CheckpointError, match=r"no llava_jax.json: an interrupted write.*delete it"):
        llava_jax.load(out)


def run_command(args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=300, **kwargs)


def test_commands_report_user_errors_in_one_line(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llava", "text_con')
    cases = [
        (["infer.py", f"--model={bad}", "--prompt=hi"], "config.json"),
        (["infer.py", f"--model={hf_dir}", f"--image={tmp_path / 'none.png'}", "--prompt=hi"], "none.png"),
        (["-m", "llava_jax.convert", f"--src={bad}", f"--out={tmp_path / 'o'}"], "config.json"),
        (["-m", "llava_jax.convert", f"--src={hf_dir}", f"--out={hf_dir}"], "--out"),
    ]
    for args, named in cases:
        run = run_command(args)
        assert run.returncode == 2, (args, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], (args, run.stderr)


def test_a_bug_keeps_its_traceback(tmp_path):
    script = tmp_path / "app.py"
    script.write_text("from llava_jax.errors import run_app\ndef main(argv):\n    raise KeyError('bug')\nrun_app(main)\n")
    run = run_command([str(script)])
    assert run.returncode == 1 and "Traceback" in run.stderr and "KeyError" in run.stderr


def test_one_line_joins_multiline_messages():
    from llava_jax.errors import ConfigError, one_line

    assert one_line(ConfigError("first\n  second\n")) == "error: first | second"
    assert json.dumps(one_line(ConfigError("x"))).count("\\n") == 0


KILLED_CONVERSION = textwrap.dedent(
    """
    import os, runpy, signal, sys
    from llava_jax.checkpoints import orbax

    stage = sys.argv.pop(1)
    save = orbax.ocp.StandardCheckpointer.save

    def save_then_die(self, *args, **kwargs):  # SIGKILL before the parameters are written, or right after
        if stage == "params_written":
            save(self, *args, **kwargs)
            self.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)

    orbax.ocp.StandardCheckpointer.save = save_then_die
    runpy.run_module("llava_jax.convert", run_name="__main__")
    """
)


@pytest.mark.parametrize("stage", ["params_begun", "params_written"])
def test_killed_conversion_leaves_nothing_loadable(hf_dir, tmp_path, stage):
    """`python -m llava_jax.convert` killed (SIGKILL) as it starts writing parameters, and once they are
    written but not the marker: --out never appears; the leftover is named and refused."""
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-c", KILLED_CONVERSION, stage, f"--src={hf_dir}", f"--out={out}"],
                          env=ENV, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert os.path.isdir(out + ".partial") and not os.path.exists(out)
    if stage == "params_written":
        assert os.path.isdir(os.path.join(out + ".partial", "params"))
    with pytest.raises(MissingInputError, match="unfinished output of an interrupted write"):
        llava_jax.load(out)
    with pytest.raises(atomic.InterruptedWriteError):
        convert(hf_dir, out, "float32", progress=False)
