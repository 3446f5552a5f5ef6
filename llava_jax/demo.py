"""The from-scratch demo of configs/demo.py: its data and tokenizer, written into the workdir, and its score.

`prepare(config, workdir)` runs before training: it writes the synthetic shapes data set
(`llava_jax.data.synthetic`) to WORKDIR/data and a tokenizer trained on it to WORKDIR/tokenizer, unless
they are there already, and points the config's stages at them. `evaluate(config, workdir)` runs after
training: the run's model (`llava_jax.load(WORKDIR)`) answers the held-out questions greedily, with each
question's image and with a blank one.
"""

from __future__ import annotations

import os

import numpy as np

from llava_jax.data import conversation, synthetic


def data_dir(workdir: str) -> str:
    return os.path.join(workdir, "data")


def tokenizer_dir(workdir: str) -> str:
    return os.path.join(workdir, "tokenizer")


def prepare(config, workdir: str) -> None:
    """Writes the data and tokenizer where absent and sets the stages' data files, image folder and (for
    the first stage, from scratch) tokenizer. config.demo: num_images, num_heldout."""
    data, tokenizer = data_dir(workdir), tokenizer_dir(workdir)
    if not os.path.isfile(os.path.join(data, synthetic.FILES["heldout"])):  # written last
        synthetic.generate(data, int(config.demo.num_images), int(config.seed), int(config.demo.num_heldout))
    if not os.path.isfile(os.path.join(tokenizer, "tokenizer_config.json")):  # written last
        synthetic.write_tokenizer(tokenizer, data, templates=(str(config.demo.template),))
    for name, stage in config.stages.items():
        split = "pretrain" if stage.data.template == "plain" else "instruct"
        stage.data.files = os.path.join(data, synthetic.FILES[split])
        stage.data.image_folder = data
        if stage.init.kind == "scratch":
            stage.init.tokenizer = tokenizer


def answerer(pipe, template: str, max_new_tokens: int = 4):
    """answer(images, questions) -> replies: one greedy batch through `pipe` (a llava_jax Pipeline)."""

    def answer(images, questions):
        ids, pixels = [], []
        for image, question in zip(images, questions):
            prompt = conversation.render(template, [{"role": "user", "content": "<image>\n" + question}])
            inputs = pipe.prepare(prompt, [image])
            ids.append(np.asarray(inputs["input_ids"])[0])
            pixels.append(inputs["pixel_values"])
        out = pipe.generate(ids, np.concatenate(pixels), max_new_tokens=max_new_tokens)
        return [pipe.tokenizer.decode(o, skip_special_tokens=True) for o in out]

    return answer


def evaluate(config, workdir: str) -> dict:
    """Held-out accuracy of the run's model with the real and with blank images (synthetic.score)."""
    import llava_jax

    pipe = llava_jax.load(workdir, dtype="float32")
    answer = answerer(pipe, str(config.demo.template))
    return synthetic.score(answer, data_dir(workdir), batch_size=int(config.demo.eval_batch_size))
