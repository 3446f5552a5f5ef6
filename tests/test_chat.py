"""pipe.chat / ChatSession / infer.py on a tiny model with a real (tiny, sentencepiece) tokenizer,
against transformers' generate on the same prepared inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import llava_jax
from llava_jax.chat import ChatSession, stable_text
from llava_jax.data import tiny_tokenizer
from llava_jax.data.conversation import render
from llava_jax.data.image import UnreadableImageError
from llava_jax.data.prepare import ImageCountError
from llava_jax.generate import cut_at_stop
from tests import reference as R
from tests.conftest import ADDED_TOKENS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What color is the circle?"


def picture(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, sp_model_proto):
    directory = str(tmp_path_factory.mktemp("chat_model"))
    ids = tiny_tokenizer.write_llava_hf_tokenizer(directory, sp_model_proto, added_tokens=ADDED_TOKENS)
    config = R.llava_hf_config(text=dict(vocab_size=max(ids.values()) + 1), image_token_index=ids["<image>"])
    model = R.build_llava(config, seed=3, scale=0.5)
    R.save(model, directory)
    return model, directory, llava_jax.load(directory, dtype="float32")


def hf_reply(model, pipe, text, images, new):
    inputs = pipe.prepare(text, images)
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(inputs["input_ids"]),
                             attention_mask=torch.as_tensor(inputs["attention_mask"]),
                             pixel_values=torch.as_tensor(inputs["pixel_values"]), max_new_tokens=new,
                             do_sample=False)  # fmt: skip
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    return cut_at_stop(pipe.tokenizer.decode(ids), ("</s>",)).strip()


def test_chat_matches_transformers(chat_model):
    model, _, pipe = chat_model
    assert ChatSession(pipe).template == "llava_v1"  # llava-hf name without hints, LLaMA text config
    text = render("llava_v1", [{"role": "user", "content": "<image>\n" + QUESTION}])
    expected = hf_reply(model, pipe, text, [picture(0)], 24)
    assert len(expected) > 10
    assert pipe.chat(QUESTION, [picture(0)], max_new_tokens=24, temperature=0) == expected
    assert "".join(pipe.chat_stream(QUESTION, [picture(0)], max_new_tokens=24, temperature=0)) == expected


def test_stop_string_ends_generation_after_its_token(chat_model):
    _, _, pipe = chat_model
    inputs = pipe.prepare("USER: <image>\nHello ASSISTANT:", [picture(1)])
    args = (inputs["input_ids"], inputs["pixel_values"])
    free = pipe.generate(*args, max_new_tokens=30, eos_ids=())[0]
    text = pipe.tokenizer.decode(free)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip() and find(text, stop) < len(text)
    for stream in (False, True):
        run = pipe.generate_stream if stream else pipe.generate
        out = run(*args, max_new_tokens=30, eos_ids=(), stop=(stop,))
        ids = sum((step[0] for step in out), []) if stream else out[0]
        assert ids == free[: len(ids)] and len(ids) < len(free)
        assert stop in pipe.tokenizer.decode(ids) and stop not in pipe.tokenizer.decode(ids[:-1])


def find(text, s):
    return text.index(s)


def test_session_keeps_the_conversation_and_the_image_features(chat_model):
    model, _, pipe = chat_model
    calls = []
    compute = pipe.feature_cache.compute
    pipe.feature_cache.compute = lambda *a: calls.append(1) or compute(*a)
    try:
        pipe.feature_cache.clear()
        session = ChatSession(pipe, [picture(2)])
        first = session.ask(QUESTION, max_new_tokens=8, temperature=0)
        second = session.ask("And the square?", max_new_tokens=8, temperature=0)
        assert len(calls) == 1  # the second question reused the image's features
    finally:
        pipe.feature_cache.compute = compute
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert first and second  # an empty reply would make the comparisons below vacuous
    text = render("llava_v1", session.messages[:3])
    assert second == hf_reply(model, pipe, text, [picture(2)], 8)
    assert session.messages[1]["content"] == first


def test_chat_errors(chat_model, tmp_path):
    _, _, pipe = chat_model
    with pytest.raises(ImageCountError, match="2 <image> tags but the conversation has 1 images"):
        pipe.chat("<image> and <image>?", [picture(0)], max_new_tokens=2)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        pipe.chat(QUESTION, [str(tmp_path / "missing.png")])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UnreadableImageError, match="cannot read image"):
        pipe.chat(QUESTION, [str(tmp_path / "bad.png")])
    with pytest.raises(KeyError):
        pipe.chat(QUESTION, template="no_such_template")


def test_stable_text_holds_back_what_may_change():
    assert stable_text("Hello wor", ("</s>",)) == "Hello wor"
    assert stable_text("Hello </", ("</s>",)) == "Hello "
    assert stable_text("Hello</s> more", ("</s>",)) == "Hello"


def run_infer(*args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300, input=stdin)  # fmt: skip


def test_infer_answers_and_reports(chat_model, tmp_path):
    _, directory, pipe = chat_model
    image = tmp_path / "picture.png"
    picture(4).save(image)
    result = run_infer("--model", directory, "--image", str(image), "--prompt", QUESTION, "--temperature", "0",
                       "--max_new_tokens", "12", "--dtype", "float32")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["answer"]  # not empty: the comparison below must mean something
    assert summary["answer"] == pipe.chat(QUESTION, [str(image)], max_new_tokens=12, temperature=0)
    assert summary["template"] == "llava_v1"
    missing = run_infer("--model", directory, "--image", str(tmp_path / "nope.jpg"), "--prompt", QUESTION)
    assert missing.returncode == 2 and "image file not found" in missing.stderr


def test_infer_chats_turn_by_turn(chat_model, tmp_path):
    _, directory, pipe = chat_model
    image = tmp_path / "picture.png"
    picture(5).save(image)
    result = run_infer("--model", directory, "--image", str(image), "--temperature", "0", "--max_new_tokens", "6",
                       "--dtype", "float32", stdin=f"{QUESTION}\nAnd the square?\n\n")  # fmt: skip
    assert result.returncode == 0, result.stderr
    session = ChatSession(pipe, [str(image)])
    replies = [session.ask(q, max_new_tokens=6, temperature=0) for q in (QUESTION, "And the square?")]
    assert all(replies)  # an empty reply is "in" any output
    assert [line.split("ASSISTANT: ", 1)[1] for line in result.stdout.splitlines() if "ASSISTANT: " in line] == replies


def test_template_survives_conversion(tmp_path):
    """The source's name and config.json pick the template; a converted directory has neither, so the
    choice is recorded at conversion."""
    from llava_jax.chat import checkpoint_template
    from llava_jax.checkpoints import orbax
    from llava_jax.convert import convert

    model = R.build_llava(R.llava_hf_config(text_model="mistral"))
    source = R.save(model, str(tmp_path / "tiny"))  # no hint in the name: config.json's mistral decides
    pipe = llava_jax.load(source, dtype="float32")
    assert checkpoint_template(source, pipe.config) == "mistral_instruct"
    out = str(tmp_path / "converted")
    convert(source, out, "float32", progress=False)
    assert checkpoint_template(out, pipe.config) == "mistral_instruct"
    marker = os.path.join(out, orbax.MARKER)
    with open(marker) as f:
        meta = json.load(f)
    del meta["template"]  # a directory converted before the choice was recorded: the vocabulary decides
    with open(marker, "w") as f:
        json.dump(meta, f)
    assert checkpoint_template(out, pipe.config) == "llava_v1"
    named = str(tmp_path / "llava-v1.6-mistral-7b-jax")
    os.rename(out, named)
    assert checkpoint_template(named, pipe.config) == "mistral_instruct"  # the name's hint comes first
