"""Tiny models and 20-question files in each benchmark format, for the evaluation tests."""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
from PIL import Image

from llava_jax.data import tiny_tokenizer
from tests import reference as R
from tests.conftest import ADDED_TOKENS

WORDS = ["red", "circle", "left", "count", "blue", "square", "what", "is", "the", "colour", "shape", "there"]


def tiny_model_dir(directory: str, sp_model_proto: bytes, next_model: bool = False, seed: int = 3) -> str:
    """A llava-hf (or LLaVA-NeXT) directory with random weights and a sentencepiece tokenizer."""
    ids = tiny_tokenizer.write_llava_hf_tokenizer(directory, sp_model_proto, added_tokens=ADDED_TOKENS)
    text = dict(vocab_size=max(ids.values()) + 1)
    if next_model:
        config = R.llava_next_hf_config(text=text, image_token_index=ids["<image>"])
        R.next_image_processor().save_pretrained(directory)
    else:
        config = R.llava_hf_config(text=text, image_token_index=ids["<image>"])
    R.save(R.build_llava(config, seed=seed, scale=0.5), directory)
    return directory


def picture(seed: int, size_hw=(30, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size_hw, 3), dtype=np.uint8))


SIZES = [(30, 40), (28, 28), (60, 20), (20, 70), (45, 45)]


def sentence(rng, n=5) -> str:
    return " ".join(rng.choice(WORDS, n)) + "?"


def write_images(folder: str, n: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i}.png"
        picture(i, SIZES[i % len(SIZES)]).save(os.path.join(folder, name))
        names.append(name)
    return names


def write_jsonl_questions(path: str, images: list[str], n: int = 20, seed: int = 0, category=None) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {"question_id": 1000 + i, "image": images[i % len(images)], "text": sentence(rng, 3 + i % 5)}
        if category:
            row["category"] = category[i % len(category)]
        rows.append(row)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def write_scienceqa_questions(path: str, images: list[str], n: int = 20, seed: int = 1) -> list[dict]:
    """LLaVA's llava_test_CQM-A.json: every third question without an image."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        text = sentence(rng) + "\nContext: " + sentence(rng, 3) + "\nOptions: (A) red (B) blue"
        row = {"id": str(4000 + i), "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "A"}]}
        if i % 3:
            row["image"] = images[i % len(images)]
            row["conversations"][0]["value"] = "<image>\n" + text
        rows.append(row)
    with open(path, "w") as f:
        json.dump(rows, f)
    return rows


def write_mmbench_tsv(path: str, n: int = 20, seed: int = 2) -> list[dict]:
    """An MMBench tsv: base64 images, two to four options, some hints empty."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        picture(100 + i, SIZES[i % len(SIZES)]).save(buf, format="PNG")
        k = 2 + i % 3
        options = [str(w) for w in rng.choice(WORDS, k, replace=False)]
        row = {"index": str(i), "question": sentence(rng), "hint": sentence(rng, 2) if i % 2 else "nan",
               "A": "", "B": "", "C": "", "D": "", "answer": "ABCD"[i % k],
               "category": "c", "source": "s", "l2-category": "l", "comment": "nan", "split": "dev",
               "image": base64.b64encode(buf.getvalue()).decode()}  # fmt: skip
        for char, option in zip("ABCD", options):
            row[char] = option
        rows.append(row)
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
            "comment", "split"]  # fmt: skip
    with open(path, "w") as f:
        f.write("\t".join(cols) + "\n")
        for row in rows:
            f.write("\t".join(row[c] for c in cols) + "\n")
    return rows
