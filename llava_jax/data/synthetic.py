"""Coloured shapes on real PNG files, in LLaVA's JSON formats: a data set a tiny model can learn to see.

    python -m llava_jax.data.synthetic --out DIR --num N --seed S

writes
    DIR/images/*.png       48 x 48 images: 1-3 shapes on white, each in its own 16 px cell of a 3 x 3 grid
                           (one vision patch per cell at patch size 16: what let a from-scratch model learn)
    DIR/pretrain.json      one caption per training image, as blip_laion_cc_sbu_558k records:
                           {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                            {"from": "gpt", "value": caption}]}
    DIR/instruct.json      2-3 questions per training image with one- or two-word answers (colour, shape, count,
                           position), one question per record, as llava_v1_5_mix665k records
    DIR/heldout.json       one question per record on images never trained on (no held-out scene equals a
                           training scene, so mostly 2-3 shapes), with its "category"

Within an image, colours differ and shapes differ, so every question has exactly one answer.
Everything is drawn without anti-aliasing: each shape's pixels are exactly its palette colour, and the
answers can be read back from the pixels. The same seed gives the same files.
`score` measures a model's held-out accuracy with the real images and with blank ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 48
CELL = 16
GRID = IMAGE_SIZE // CELL
BACKGROUND = (255, 255, 255)
COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (235, 200, 20), "purple": (140, 50, 170),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "middle", "right")
COUNTS = {1: "one", 2: "two", 3: "three"}
CATEGORIES = ("color", "shape", "count", "position")
CAPTION_PROMPTS = ("<image>\nDescribe the image briefly.", "<image>\nWhat is in this picture?",
                   "Give a short caption of the image.\n<image>")  # fmt: skip
FILES = {"pretrain": "pretrain.json", "instruct": "instruct.json", "heldout": "heldout.json"}


@dataclasses.dataclass(frozen=True)
class Item:
    color: str
    shape: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def random_scene(rng: np.random.Generator) -> list[Item]:
    """1-3 shapes in distinct cells, with distinct colours and distinct shapes; in reading order."""
    n = int(rng.integers(1, 4))
    cells = sorted(rng.choice(GRID * GRID, n, replace=False).tolist())
    colors = rng.choice(list(COLORS), n, replace=False)
    shapes = rng.choice(SHAPES, n, replace=False)
    return [Item(str(c), str(s), cell // GRID, cell % GRID) for c, s, cell in zip(colors, shapes, cells)]


def draw(scene: Sequence[Item]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for item in scene:
        x0, y0 = item.col * CELL + 2, item.row * CELL + 2
        x1, y1 = x0 + CELL - 5, y0 + CELL - 5  # inclusive corners: 12 x 12 px, 2 px from the cell's edges
        fill = COLORS[item.color]
        if item.shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif item.shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pen.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    return image


def blank_image() -> Image.Image:
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)


def cell_name(row: int, col: int) -> str:
    """ "top left", "middle right", "center", ...: the grid cell's name in captions and questions."""
    return "center" if (row, col) == (1, 1) else f"{ROWS[row]} {COLUMNS[col]}"


def caption(scene: Sequence[Item]) -> str:
    """Each shape in reading order with its cell: "a red circle in the top left and a blue square in the center."."""
    parts = [f"a {item.name} in the {cell_name(item.row, item.col)}" for item in scene]
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


def questions(scene: Sequence[Item]) -> list[tuple[str, str, str]]:
    """Every question the scene answers: (category, question, answer). Questions name a shape by its content,
    never by its cell: a shape and its colour sit in the same patch token, so "What color is the circle?" is
    answered by attending to the circle's patch and reading its colour, a content-keyed lookup (a model trained
    on colour asked by cell answered it 0.41 held-out; configs/demo.py has the figures). Position is asked by
    colour and answered with the cell's name as the captions say it ("top left", "center")."""
    out = [("count", "How many shapes are there?", COUNTS[len(scene)])]
    for item in scene:
        out += [
            ("color", f"What color is the {item.shape}?", item.color),
            ("shape", f"What shape is the {item.color} one?", item.shape),
            ("position", f"Where is the {item.color} shape?", cell_name(item.row, item.col)),
        ]
    return out


def _turns(pairs: Sequence[tuple[str, str]]) -> list[dict]:
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question}, {"from": "gpt", "value": answer}]
    return turns


def generate(out: str, num: int, seed: int = 0, num_heldout: int | None = None) -> dict[str, str]:
    """Writes the data set into `out` (see the module docstring); returns the JSON files' paths by split."""
    num_heldout = max(num // 10, 50) if num_heldout is None else num_heldout
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    train_rng, heldout_rng = (np.random.default_rng([seed, k]) for k in (0, 1))
    pretrain, instruct, heldout, seen = [], [], [], set()
    for i in range(num):
        scene = random_scene(train_rng)
        seen.add(tuple(scene))
        name = f"images/train_{i:06d}.png"
        draw(scene).save(os.path.join(out, name))
        prompt = CAPTION_PROMPTS[int(train_rng.integers(len(CAPTION_PROMPTS)))]
        pretrain.append({"id": f"train_{i:06d}", "image": name, "conversations": [
            {"from": "human", "value": prompt}, {"from": "gpt", "value": caption(scene)}]})  # fmt: skip
        asked = questions(scene)
        picks = train_rng.choice(len(asked), min(len(asked), int(train_rng.integers(2, 4))), replace=False)
        for k, pick in enumerate(picks):  # one question per record: short examples, the answer right after it
            instruct.append({"id": f"train_{i:06d}_{k}", "image": name, "conversations": _turns([asked[pick][1:]])})
    for i in range(num_heldout):
        scene = random_scene(heldout_rng)
        while tuple(scene) in seen:
            scene = random_scene(heldout_rng)
        name = f"images/heldout_{i:06d}.png"
        draw(scene).save(os.path.join(out, name))
        asked = questions(scene)
        category, question, answer = asked[int(heldout_rng.integers(len(asked)))]
        heldout.append({"id": f"heldout_{i:06d}", "image": name, "category": category,
                        "conversations": _turns([(question, answer)])})  # fmt: skip
    paths = {}
    for split, records in (("pretrain", pretrain), ("instruct", instruct), ("heldout", heldout)):
        paths[split] = os.path.join(out, FILES[split])
        with open(paths[split], "w") as f:
            json.dump(records, f, indent=1)
    return paths


def texts(out: str) -> list[str]:
    """Every caption, question and answer of a generated data set (to train a tokenizer on)."""
    lines = []
    for split in ("pretrain", "instruct"):
        with open(os.path.join(out, FILES[split])) as f:
            lines += [t["value"].replace("<image>", "").strip() for r in json.load(f) for t in r["conversations"]]
    return lines


def write_tokenizer(directory: str, data_dir: str, templates: Sequence[str] = ("mistral_instruct",),
                    vocab_size: int = 448) -> dict[str, int]:  # fmt: skip
    """A tiny LLaMA-style tokenizer for the data set: sentencepiece BPE (byte fallback, so 259 pieces are
    bytes and specials) trained on its texts and one conversation rendered with each chat template of
    `templates` (the plain template adds no text), `<image>` and `<pad>` added after
    the pieces, written as llava-hf files. Returns the added tokens' ids."""
    from llava_jax.data import conversation
    from llava_jax.data.tiny_tokenizer import train_sentencepiece, write_llava_hf_tokenizer

    lines = texts(data_dir)
    for name in templates:
        messages = [{"role": "user", "content": lines[1]}, {"role": "assistant", "content": lines[2]}]
        lines += [conversation.render(name, messages, add_generation_prompt=False)] * (len(lines) // 20 + 1)
    proto = train_sentencepiece(lines, vocab_size=vocab_size)
    return write_llava_hf_tokenizer(directory, proto, added_tokens=("<image>", "<pad>"))


# -- scoring ---------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """The lower-cased words of a text, without punctuation ("Top left." -> ["top", "left"])."""
    return re.findall(r"[a-z]+", text.lower())


def is_right(reply: str, answer: str) -> bool:
    """A reply is right when it starts with the answer's words ("Red." for "red", "top left" for "top left")."""
    expected = words(answer)
    return words(reply)[: len(expected)] == expected


def heldout_questions(out: str) -> list[dict]:
    """[{"image": path, "question", "answer", "category"}] of DIR/heldout.json."""
    with open(os.path.join(out, FILES["heldout"])) as f:
        records = json.load(f)
    return [{"image": os.path.join(out, r["image"]), "category": r["category"],
             "question": r["conversations"][0]["value"].replace("<image>", "").strip(),
             "answer": r["conversations"][1]["value"]} for r in records]  # fmt: skip


def score(answer: Callable, out: str, *, batch_size: int | None = None, limit: int | None = None) -> dict:
    """Held-out accuracy of `answer`, with each question's real image and with a blank image.

    answer(image: PIL.Image, question: str) -> reply, or with batch_size set,
    answer(images: list, questions: list) -> replies. A reply is right when it starts with the answer's words
    (`is_right`).
    Returns {"accuracy", "blank_accuracy", "per_category": {c: acc}, "blank_per_category", "num_questions"}.
    """
    items = heldout_questions(out)[:limit]
    results = {}
    for kind in ("real", "blank"):
        images = [Image.open(q["image"]).convert("RGB") if kind == "real" else blank_image() for q in items]
        prompts = [q["question"] for q in items]
        if batch_size is None:
            replies = [answer(image, prompt) for image, prompt in zip(images, prompts)]
        else:
            replies = []
            for start in range(0, len(items), batch_size):
                replies += list(answer(images[start : start + batch_size], prompts[start : start + batch_size]))
        results[kind] = [is_right(r, q["answer"]) for r, q in zip(replies, items)]

    def accuracy(right, category=None):
        picked = [r for r, q in zip(right, items) if category in (None, q["category"])]
        return sum(picked) / len(picked) if picked else None

    categories = sorted({q["category"] for q in items})
    return {
        "accuracy": accuracy(results["real"]),
        "blank_accuracy": accuracy(results["blank"]),
        "per_category": {c: accuracy(results["real"], c) for c in categories},
        "blank_per_category": {c: accuracy(results["blank"], c) for c in categories},
        "num_questions": len(items),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.data.synthetic", description=__doc__.split("\n\n")[0],
        epilog="Train with DIR/pretrain.json (stage 1) and DIR/instruct.json (stage 2), image folder DIR; "
               "score on DIR/heldout.json.",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--num", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--num_heldout", type=int, default=None, help="held-out images (default max(num/10, 50))")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num < 1:
        print("error: --num must be at least 1", file=sys.stderr)
        return 2
    paths = generate(args.out, args.num, args.seed, args.num_heldout)
    print(json.dumps({"out": args.out, "num": args.num, **paths}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
