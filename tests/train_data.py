"""Tiny training data for the training tests: coloured squares on PNG files and LLaVA JSON records."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_dataset(directory: str, num: int = 16, seed: int = 0, text_only_every: int = 0) -> tuple[str, str]:
    """Writes DIR/images/*.png and DIR/data.json; returns (json path, image folder).

    Answers differ in length, so rows hold uneven numbers of supervised tokens; every
    `text_only_every`-th record (0: none) has no image.
    """
    rng = np.random.default_rng(seed)
    images = os.path.join(directory, "images")
    os.makedirs(images, exist_ok=True)
    records = []
    for i in range(num):
        name = list(COLOURS)[i % len(COLOURS)]
        answer = f"It is {name}." + " Yes, it is." * int(rng.integers(0, 3))
        if text_only_every and i % text_only_every == 0:
            records.append({"id": str(i), "conversations": [
                {"from": "human", "value": "Say a colour."}, {"from": "gpt", "value": answer}]})  # fmt: skip
            continue
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[:] = COLOURS[name]
        pixels += rng.integers(0, 20, pixels.shape, dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(images, f"{i}.png"))
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": answer}]})  # fmt: skip
    path = os.path.join(directory, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path, images
