"""configs/demo.py: its data and tokenizer land in the workdir and its stages point at them; the
evaluation's answerer asks the held-out questions as the training data asked them."""

import importlib.util
import json
import os

import numpy as np
import pytest

from llava_jax import demo
from llava_jax.data import synthetic
from llava_jax.data.tokenizer import load_tokenizer

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")


def demo_config():
    spec = importlib.util.spec_from_file_location("demo_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_prepare_writes_data_and_tokenizer_once(tmp_path):
    config = demo_config()
    config.demo.num_images, config.demo.num_heldout = 12, 5
    workdir = str(tmp_path)
    demo.prepare(config, workdir)
    data = os.path.join(workdir, "data")
    assert config.stages.pretrain.data.files == os.path.join(data, "pretrain.json")
    assert config.stages.finetune.data.files == os.path.join(data, "instruct.json")
    assert config.stages.pretrain.data.image_folder == config.stages.finetune.data.image_folder == data
    assert config.stages.pretrain.init.tokenizer == os.path.join(workdir, "tokenizer")
    assert config.stages.finetune.init.tokenizer == ""  # starts from the previous stage
    tokenizer = load_tokenizer(config.stages.pretrain.init.tokenizer)
    model = config.stages.pretrain.model
    assert tokenizer.token_to_id("<image>") == model.image_token_id and tokenizer.pad_id < model.text.vocab_size
    assert len(json.load(open(os.path.join(data, "heldout.json")))) == 5
    stamp = os.path.getmtime(os.path.join(data, "images", "train_000000.png"))
    demo.prepare(demo_config(), workdir)  # present: left alone
    assert os.path.getmtime(os.path.join(data, "images", "train_000000.png")) == stamp


class FakePipe:
    """Records what the answerer sends; replies with the i-th word of a list."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = []

    def prepare(self, text, images):
        self.calls.append((text, images))
        return {"input_ids": np.asarray([self.tokenizer.encode(text)]), "pixel_values": np.zeros((1, 3, 48, 48))}

    def generate(self, ids, pixels, max_new_tokens):
        assert len(ids) == len(pixels) and max_new_tokens == 4
        return [self.tokenizer.encode(" red", add_bos=False) + [self.tokenizer.eos_id] for _ in ids]


def test_answerer_renders_the_training_template(tmp_path):
    config = demo_config()
    config.demo.num_images, config.demo.num_heldout = 4, 6
    demo.prepare(config, str(tmp_path))
    pipe = FakePipe(load_tokenizer(demo.tokenizer_dir(str(tmp_path))))
    result = synthetic.score(demo.answerer(pipe, config.demo.template), demo.data_dir(str(tmp_path)), batch_size=4)
    text, images = pipe.calls[0]
    question = synthetic.heldout_questions(demo.data_dir(str(tmp_path)))[0]["question"]
    assert text == f"[INST] <image>\n{question} [/INST]" and len(images) == 1
    expected = np.mean([q["answer"] == "red" for q in synthetic.heldout_questions(demo.data_dir(str(tmp_path)))])
    assert result["accuracy"] == result["blank_accuracy"] == expected


def test_inference_prompt_is_the_training_prompt(tmp_path):
    """What the trained model reads when the evaluation (or `llava_jax.load(WORKDIR)`) asks a question is
    token for token what it was trained on: the prefix of the training example before the answer. (With
    llava-hf tokenization the "▁" that starts the text after <image> in training is missing, every image token
    sits one position nearer the answer, and a trained model answers "left, middle or right" one column off.)"""
    from PIL import Image

    from llava_jax.data import conversation
    from llava_jax.data.examples import ExampleBuilder, FixedImageTokens
    from llava_jax.data.image import ImageProcessor
    from llava_jax.data.prepare import prepare_inputs
    from llava_jax.train.sources import model_config

    config = demo_config()
    config.demo.num_images, config.demo.num_heldout = 6, 2
    workdir = str(tmp_path)
    demo.prepare(config, workdir)
    model = model_config(config.stages.pretrain.model.to_dict())
    tokenizer = load_tokenizer(demo.tokenizer_dir(workdir))
    builder = ExampleBuilder(tokenizer, config.demo.template, model.image_token_id, FixedImageTokens(9))
    records = json.load(open(os.path.join(demo.data_dir(workdir), "instruct.json")))
    for record in records:
        example = builder(record, [(48, 48)])
        answer_start = int(np.flatnonzero(example["labels"] >= 0)[0])
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        prompt = conversation.render(config.demo.template, [{"role": "user", "content": "<image>\n" + question}])
        image = Image.open(os.path.join(demo.data_dir(workdir), record["image"]))
        inputs = prepare_inputs(prompt, [image], tokenizer=tokenizer, image_processor=ImageProcessor.from_config(model),
                                config=model)  # fmt: skip
        assert inputs["input_ids"][0].tolist() == example["input_ids"][:answer_start].tolist(), question


@pytest.mark.slow  # two compiles and a scoring pass; test_prepare_* and test_answerer_* cover the parts
def test_demo_command_trains_and_scores(tmp_path):
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    run = subprocess.run(
        [sys.executable, os.path.join(root, "train.py"), f"--config={CONFIG}", f"--workdir={tmp_path}",
         "--config.max_steps=2", "--config.demo.num_images=32", "--config.demo.num_heldout=8",
         "--config.demo.eval_batch_size=8", "--config.progress=False"],
        capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert [s["stage"] for s in summary["stages"]] == ["pretrain", "finetune"]
    evaluation = summary["evaluation"]
    assert evaluation["num_questions"] == 8 and 0 <= evaluation["accuracy"] <= 1
    assert set(evaluation["per_category"]) <= set(synthetic.CATEGORIES)
