"""`python -m llava_jax.eval run` on tiny models: the answer files' format, batched answers equal to
batch-size-1 answers (images of different sizes, LLaVA-NeXT tiles), resume after a kill, shards merged."""

import json
import os
import re

import pytest

import llava_jax
from llava_jax.data.conversation import render
from llava_jax.eval import runner
from llava_jax.eval.answer_file import read_answers
from llava_jax.eval.runner import run_questions
from llava_jax.eval.tasks import OPTION_LETTER, SHORT_ANSWER, load_questions
from tests import eval_fixtures as F

ANSWER_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
NEW = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("eval_data"))
    images = F.write_images(os.path.join(root, "images"), 7)
    F.write_jsonl_questions(os.path.join(root, "q.jsonl"), images)
    F.write_scienceqa_questions(os.path.join(root, "sqa.json"), images)
    F.write_mmbench_tsv(os.path.join(root, "mmbench.tsv"))
    return root


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, sp_model_proto):
    directory = F.tiny_model_dir(str(tmp_path_factory.mktemp("llava-v1.5-tiny")), sp_model_proto)
    return llava_jax.load(directory, dtype="float32")


@pytest.fixture(scope="module")
def next_pipe(tmp_path_factory, sp_model_proto):
    directory = F.tiny_model_dir(str(tmp_path_factory.mktemp("llava-next-tiny")), sp_model_proto, next_model=True)
    return llava_jax.load(directory, dtype="float32")


def task_questions(data, task):
    path = {"gqa": "q.jsonl", "scienceqa": "sqa.json", "mmbench": "mmbench.tsv"}[task]
    return load_questions(task, os.path.join(data, path), os.path.join(data, "images"))


def texts(path):
    return [a["text"] for a in read_answers(path)]


@pytest.mark.parametrize("task", ["gqa", "scienceqa", "mmbench"])
def test_batched_answers_equal_batch_size_one(pipe, data, tmp_path, task):
    questions = task_questions(data, task)
    assert len(questions) == 20
    one, four = str(tmp_path / "one.jsonl"), str(tmp_path / "four.jsonl")
    s1 = run_questions(pipe, questions, one, task=task, batch_size=1, max_new_tokens=NEW, progress=False)
    s4 = run_questions(pipe, questions, four, task=task, batch_size=4, max_new_tokens=NEW, progress=False)
    assert s1["answered"] == s4["answered"] == 20 and s1["template"] == "vicuna_v1"
    answers = read_answers(four)
    assert [a["question_id"] for a in answers] == [q.question_id for q in questions]
    for a, q in zip(answers, questions):
        assert ANSWER_KEYS <= set(a) and a["prompt"] == q.prompt and a["model_id"].startswith("llava-v1.5-tiny")
    assert texts(one) == texts(four)
    assert len(set(texts(one))) > 3  # the answers depend on the question


def test_answer_is_the_greedy_reply_to_the_original_prompt(pipe, data, tmp_path):
    """An answer is the model's greedy reply to the vicuna_v1 prompt of '<image>\\n' + text (+ suffix)."""
    q = task_questions(data, "gqa")[3]
    assert q.message == "<image>\n" + q.prompt and q.prompt.endswith("\n" + SHORT_ANSWER)
    text = render("vicuna_v1", [{"role": "user", "content": q.message}])
    assert text.startswith("A chat between a curious user") and text.endswith("ASSISTANT:")
    inputs = pipe.prepare(text, [F.picture(3, F.SIZES[3])])
    ids = pipe.generate(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], max_new_tokens=NEW)[0]
    expected = pipe.tokenizer.decode(ids).replace("</s>", "").strip()
    run_questions(pipe, [q], str(tmp_path / "a.jsonl"), max_new_tokens=NEW, progress=False)
    assert texts(str(tmp_path / "a.jsonl")) == [expected]


def test_every_task_reads_its_format(data):
    from llava_jax.eval.tasks import TASKS

    files = {"jsonl": "q.jsonl", "scienceqa": "sqa.json", "mmbench": "mmbench.tsv"}
    for name, task in TASKS.items():
        questions = load_questions(name, os.path.join(data, files[task.form]), os.path.join(data, "images"))
        assert len(questions) == 20 and all(q.prompt for q in questions)
        if task.suffix:
            assert all(q.message.endswith("\n" + task.suffix) for q in questions), name


def test_prompts_follow_the_original_scripts(data):
    sqa = task_questions(data, "scienceqa")
    assert sqa[0].image is None and not sqa[0].message.startswith("<image>")
    assert sqa[1].prompt.startswith("<image>\n") and sqa[1].prompt.endswith("\n" + OPTION_LETTER)
    mmb = task_questions(data, "mmbench")
    assert mmb[0].prompt.endswith("\nA. " + mmb[0].record["options"][0] + "\nB. " + mmb[0].record["options"][1])
    assert mmb[1].prompt.count("\n") >= 3  # a hint line before the question
    assert mmb[0].message == "<image>\n" + mmb[0].prompt + "\n" + OPTION_LETTER
    rounds = load_questions("mmbench", os.path.join(data, "mmbench.tsv"), all_rounds=True)
    first = [q for q in rounds if q.question_id == 1]
    assert [q.record["round_id"] for q in first] == [0, 1, 2]
    assert first[1].record["options"] == first[0].record["options"][1:] + first[0].record["options"][:1]


def test_next_batched_answers_equal_batch_size_one(next_pipe, data, tmp_path):
    questions = task_questions(data, "gqa")[:8]
    one, four = str(tmp_path / "one.jsonl"), str(tmp_path / "four.jsonl")
    run_questions(next_pipe, questions, one, batch_size=1, max_new_tokens=NEW, progress=False, template="vicuna_v1")
    run_questions(next_pipe, questions, four, batch_size=4, max_new_tokens=NEW, progress=False, template="vicuna_v1")
    assert texts(one) == texts(four) and len(set(texts(one))) > 2


def test_killed_run_resumes_without_duplicates(pipe, data, tmp_path, monkeypatch):
    questions = task_questions(data, "gqa")
    full = str(tmp_path / "full.jsonl")
    run_questions(pipe, questions, full, batch_size=3, max_new_tokens=NEW, progress=False)
    path = str(tmp_path / "killed.jsonl")
    calls = []
    real = runner.answer_batch

    def dies_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "answer_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_questions(pipe, questions, path, batch_size=3, max_new_tokens=NEW, progress=False)
    monkeypatch.setattr(runner, "answer_batch", real)
    assert len(read_answers(path)) == 6
    with open(path, "a") as f:  # a write torn by the kill
        f.write('{"question_id": 1006, "prompt": "wh')
    summary = run_questions(pipe, questions, path, batch_size=3, max_new_tokens=NEW, progress=False)
    assert summary["resumed"] == 6 and summary["answered"] == 14
    answers = read_answers(path)
    assert [a["question_id"] for a in answers] == [q.question_id for q in questions]
    assert texts(path) == texts(full)
    again = run_questions(pipe, questions, path, batch_size=3, max_new_tokens=NEW, progress=False)
    assert again["answered"] == 0 and len(read_answers(path)) == 20


def test_shards_merge_in_question_order(pipe, data, tmp_path):
    questions = task_questions(data, "gqa")[:7]
    path = str(tmp_path / "merged.jsonl")
    s1 = run_questions(pipe, questions, path, num_shards=3, shard=1, max_new_tokens=NEW, progress=False)
    assert not s1["merged"] and not os.path.exists(path)
    run_questions(pipe, questions, path, num_shards=3, shard=2, max_new_tokens=NEW, progress=False)
    s0 = run_questions(pipe, questions, path, num_shards=3, shard=0, max_new_tokens=NEW, progress=False,
                       merge_timeout=5)  # fmt: skip
    assert s0["merged"] and s0["answered"] == 3
    assert [a["question_id"] for a in read_answers(path)] == [q.question_id for q in questions]
    single = str(tmp_path / "single.jsonl")
    run_questions(pipe, questions, single, batch_size=7, max_new_tokens=NEW, progress=False)
    assert texts(path) == texts(single)


def test_answers_of_another_file_are_refused(pipe, data, tmp_path):
    from llava_jax.errors import DataError

    path = str(tmp_path / "a.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"question_id": 77, "text": "x"}) + "\n")
    with pytest.raises(DataError, match="another question file"):
        run_questions(pipe, task_questions(data, "gqa"), path, max_new_tokens=NEW, progress=False)


def test_run_command_killed_and_resumed(pipe, data, tmp_path):
    """The command, killed (SIGKILL) mid-run and run again: all 20 answers once each, in question order,
    equal to the library's; a progress bar with rate and ETA on stderr; one JSON summary line last; a
    wrong path is one line and status 2."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    answers = str(tmp_path / "cli.jsonl")
    cmd = [sys.executable, "-m", "llava_jax.eval", "run", "--task", "gqa", "--model", pipe.directory, "--dtype",
           "float32", "--questions", os.path.join(data, "q.jsonl"), "--images", os.path.join(data, "images"),
           "--answers", answers, "--max_new_tokens", str(NEW)]  # fmt: skip
    victim = subprocess.Popen(cmd + ["--batch_size", "1"], cwd=root, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None and len(read_answers(answers)) < 3:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL  # killed while answering, not finished
    killed_at = len(read_answers(answers))
    assert 3 <= killed_at < 20
    out = subprocess.run(cmd + ["--batch_size", "8"], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["resumed"] == killed_at and summary["answered"] == 20 - killed_at
    assert summary["questions_per_s"] > 0 and summary["answers"] == answers
    assert re.search(r"20/20 \[.*<.*(q/s|s/q)\]", out.stderr), out.stderr[-500:]  # rate and ETA
    questions = task_questions(data, "gqa")
    assert [a["question_id"] for a in read_answers(answers)] == [q.question_id for q in questions]
    library = str(tmp_path / "lib.jsonl")
    run_questions(pipe, questions, library, batch_size=5, max_new_tokens=NEW, progress=False)
    assert texts(answers) == texts(library)
    bad = subprocess.run(cmd[:11] + [os.path.join(data, "missing.jsonl")] + cmd[12:], capture_output=True, text=True,
                         cwd=root)  # fmt: skip
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr and "Traceback" not in bad.stderr
