"""The synthetic shapes data: deterministic, valid LLaVA files, answers true to the pixels, and its scorer."""

import filecmp
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import synthetic
from llava_jax.data.pipeline import DataConfig, LlavaDataset
from tests.reference import TEXT, llava_hf_config

NUM = 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    assert synthetic.main(["--out", out, "--num", str(NUM), "--seed", "7", "--num_heldout", "30"]) == 0
    return out


def read(out, split):
    with open(os.path.join(out, synthetic.FILES[split])) as f:
        return json.load(f)


def test_same_seed_same_files_other_seed_other_files(data_dir, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    synthetic.generate(again, NUM, seed=7, num_heldout=30)
    synthetic.generate(other, NUM, seed=8, num_heldout=30)
    names = sorted(os.listdir(os.path.join(data_dir, "images")))
    assert len(names) == NUM + 30
    for split in synthetic.FILES.values():
        assert filecmp.cmp(os.path.join(data_dir, split), os.path.join(again, split), shallow=False)
    assert filecmp.cmpfiles(os.path.join(data_dir, "images"), os.path.join(again, "images"), names, shallow=False)[0] == names
    assert read(other, "instruct") != read(data_dir, "instruct")


def scene_from_pixels(image):
    """[(color, shape, row, col)] read back from the image: palette colour per cell, shape from the fill
    ratio of its bounding box (square 1, circle ~0.8, triangle ~0.5)."""
    image = Image.open(image) if isinstance(image, str) else image
    pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape == (48, 48, 3)
    palette = {v: k for k, v in synthetic.COLORS.items()}
    found = []
    for row in range(3):
        for col in range(3):
            cell = pixels[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16]
            drawn = np.any(cell != 255, axis=-1)
            if not drawn.any():
                continue
            colors = {tuple(c) for c in cell[drawn]}
            assert len(colors) == 1, colors  # no anti-aliasing: one exact palette colour
            ys, xs = np.nonzero(drawn)
            fill = drawn.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            shape = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
            found.append((palette[colors.pop()], shape, row, col))
    return found


def cell_words(row, col):
    return "center" if (row, col) == (1, 1) else ["top", "middle", "bottom"][row] + " " + ["left", "middle", "right"][col]


def answer_from_pixels(scene, question):
    if question == "How many shapes are there?":
        return {1: "one", 2: "two", 3: "three"}[len(scene)]
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        return next(c for c, s, _, _ in scene if s == m[1])
    if m := re.fullmatch(r"What shape is the (\w+) one\?", question):
        return next(s for c, s, _, _ in scene if c == m[1])
    if m := re.fullmatch(r"Where is the (\w+) shape\?", question):
        return next(cell_words(row, col) for c, _, row, col in scene if c == m[1])
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_and_captions_match_the_pixels(data_dir):
    for record in read(data_dir, "instruct") + read(data_dir, "heldout"):
        scene = scene_from_pixels(os.path.join(data_dir, record["image"]))
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        for q, a in zip(turns[::2], turns[1::2]):
            assert a["value"] == answer_from_pixels(scene, q["value"].replace("<image>\n", ""))
    for record in read(data_dir, "pretrain"):
        scene = scene_from_pixels(os.path.join(data_dir, record["image"]))
        caption = record["conversations"][1]["value"]
        assert caption == synthetic.caption([synthetic.Item(*s) for s in scene])
        phrases = re.split(r", | and ", caption.removesuffix("."))
        assert phrases == [f"a {color} {shape} in the {cell_words(row, col)}" for color, shape, row, col in scene]


def test_heldout_is_not_trained_on(data_dir):
    train_images = {r["image"] for r in read(data_dir, "instruct") + read(data_dir, "pretrain")}
    heldout = read(data_dir, "heldout")
    assert not train_images & {r["image"] for r in heldout}
    train_scenes = {tuple(scene_from_pixels(os.path.join(data_dir, p))) for p in train_images}
    assert not train_scenes & {tuple(scene_from_pixels(os.path.join(data_dir, r["image"]))) for r in heldout}
    assert {r["category"] for r in heldout} <= set(synthetic.CATEGORIES)


@pytest.mark.parametrize("split,template", [("pretrain", "plain"), ("instruct", "vicuna_v1")])
def test_loads_through_the_pipeline(data_dir, tokenizer, split, template):
    from llava_jax.config import LlavaConfig

    hf = llava_hf_config(vision={"image_size": 48, "patch_size": 16}, text={**TEXT, "vocab_size": 520})
    config = LlavaConfig.from_hf(hf.to_dict(), image_token_id=tokenizer.token_to_id("<image>"))
    data = DataConfig(data_path=os.path.join(data_dir, synthetic.FILES[split]), image_folder=data_dir, template=template,
                      batch_size=8, max_length=128, num_epochs=1, num_workers=0, on_bad_record="raise")  # fmt: skip
    it = iter(LlavaDataset(data, tokenizer=tokenizer, model_config=config, process_index=0, process_count=1))
    batches = list(it)
    assert it.stats["examples"] == len(read(data_dir, split)) >= NUM and not it.stats["skipped"]
    batch = batches[0]
    assert batch["pixel_values"].shape[1:] == (3, 48, 48)
    assert ((batch["input_ids"] == config.image_token_id).sum(1) == 9).all()
    assert ((batch["labels"] >= 0).sum(1) > 0).all()


def test_score_real_and_blank(data_dir):
    questions = synthetic.heldout_questions(data_dir)

    def oracle(image, question):  # reads the answer off the image, says "none" for a blank one
        scene = scene_from_pixels(image)
        return answer_from_pixels(scene, question).capitalize() + "." if scene else "none"

    result = synthetic.score(oracle, data_dir)
    assert result["accuracy"] == 1.0 and result["blank_accuracy"] == 0.0 and result["num_questions"] == 30
    assert set(result["per_category"]) <= set(synthetic.CATEGORIES)

    answers = [q["answer"] for q in questions]
    word = max(sorted(set(answers) - set(synthetic.COLORS)), key=answers.count)  # a frequent answer, not a colour

    def always_the_same(images, prompts):
        return [word for _ in images]

    batched = synthetic.score(always_the_same, data_dir, batch_size=7)
    expected = np.mean([answer == word for answer in answers])
    assert 0 < expected < 1
    assert batched["accuracy"] == batched["blank_accuracy"] == pytest.approx(expected)
    assert batched["per_category"].get("color", 0.0) == 0.0


def test_a_reply_is_right_when_it_starts_with_the_answer():
    assert synthetic.is_right("Red.", "red") and synthetic.is_right("red circle", "red")
    assert synthetic.is_right("Top left.", "top left") and synthetic.is_right("center", "center")
    assert not synthetic.is_right("top", "top left") and not synthetic.is_right("top middle", "top left")
    assert not synthetic.is_right("reddish", "red") and not synthetic.is_right("", "red")
    assert not synthetic.is_right("left", "top left")


def test_demo_tokenizer(data_dir, tmp_path):
    import transformers

    from llava_jax.data import conversation
    from llava_jax.data.tokenizer import load_tokenizer

    ids = synthetic.write_tokenizer(str(tmp_path), data_dir)
    assert ids == {"<image>": 448, "<pad>": 449}
    ours, reference = load_tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    record = read(data_dir, "instruct")[0]
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in record["conversations"]]  # fmt: skip
    text = conversation.render("mistral_instruct", messages, add_generation_prompt=False)
    assert ours.encode(text) == reference(text)["input_ids"]
    assert ours.encode(text).count(448) == 1 and ours.pad_id == 449
    # The data's words are single pieces, so examples stay short.
    assert len(ours.encode("a red circle in the top left and a blue square in the center.")) == 1 + 14 + 1  # <s>, words, "."
