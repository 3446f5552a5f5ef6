"""The LLaVA-1.5 benchmark suite: each task's question format, prompt suffix and generation budget.

Question files are the original repository's (playground/data/eval/... of haotian-liu/LLaVA):

- jsonl tasks: one `{"question_id", "image", "text", ...}` per line; `text` is the user message
  (LLaVA's files already end it with the task's suffix; a file without it gets it appended);
- scienceqa: llava_test_CQM-A.json, a list of `{"id", "image"?, "conversations": [{"value"}, ...]}`;
- mmbench, mmbench_cn: the MMBench tsv (index, question, hint, A..D, image as base64, answer?).

Each question becomes the user message "<image>\\n" + text, rendered with the conversation template,
as `llava/eval/model_vqa_loader.py`, `model_vqa_science.py` and `model_vqa_mmbench.py` do.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import json
import math
import os
import sys
from typing import Any

from llava_jax.errors import DataError

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
OPTION_LETTER_CN = "请直接回答选项字母。"
OPTION_CHARS = ("A", "B", "C", "D")


@dataclasses.dataclass(frozen=True)
class Task:
    """How a benchmark's questions are read and asked.

    form: "jsonl", "scienceqa" or "mmbench"; suffix: appended to a question's text on its own line
    where the text does not already end with it ("" for none); max_new_tokens: the original script's.
    """

    form: str
    suffix: str = ""
    max_new_tokens: int = 128


TASKS: dict[str, Task] = {
    "vqav2": Task("jsonl", SHORT_ANSWER),
    "gqa": Task("jsonl", SHORT_ANSWER),
    "vizwiz": Task("jsonl", SHORT_ANSWER),
    "textvqa": Task("jsonl", SHORT_ANSWER),
    "pope": Task("jsonl", SHORT_ANSWER),
    "mme": Task("jsonl", SHORT_ANSWER),  # llava_mme.jsonl: MME's question, "Please answer yes or no." replaced
    "seed": Task("jsonl", OPTION_LETTER),
    "llava_bench": Task("jsonl", max_new_tokens=1024),
    "mmvet": Task("jsonl", max_new_tokens=1024),
    "scienceqa": Task("scienceqa", OPTION_LETTER, max_new_tokens=1024),
    "mmbench": Task("mmbench", OPTION_LETTER, max_new_tokens=1024),
    "mmbench_cn": Task("mmbench", OPTION_LETTER_CN, max_new_tokens=1024),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; pass --task as one of {', '.join(TASKS)}")
    return TASKS[name]


@dataclasses.dataclass(frozen=True)
class Question:
    """One question as the model is asked it.

    question_id: as the file has it (the answer file's key); prompt: what the answer file records
    under "prompt" (the original scripts' `cur_prompt`); message: the user message, with "<image>\\n"
    in front where there is an image; image: a path, the image's bytes (MMBench), a PIL image, a list
    of them (one per `<image>` in the message), or None;
    record: extra answer-file fields (MMBench: round_id, options, option_char).
    """

    question_id: Any
    prompt: str
    message: str
    image: Any
    record: dict = dataclasses.field(default_factory=dict)


def with_suffix(text: str, suffix: str) -> str:
    if not suffix or text.rstrip().endswith(suffix):
        return text
    return text + "\n" + suffix


def load_questions(task_name: str, path: str, images: str = "", all_rounds: bool = False) -> list[Question]:
    """The questions of `path` in file order (MMBench with `all_rounds`: each question once per option,
    the options rotated by one each round, as model_vqa_mmbench.py --all-rounds)."""
    task = get_task(task_name)
    if not os.path.isfile(path):
        raise DataError(f"question file {path} does not exist; pass --questions as the task's question file")
    if task.form == "jsonl":
        return _jsonl_questions(path, images, task.suffix)
    if task.form == "scienceqa":
        return _scienceqa_questions(path, images, task.suffix)
    return _mmbench_questions(path, task.suffix, all_rounds)


def _jsonl_questions(path: str, images: str, suffix: str) -> list[Question]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                qid, text = row["question_id"], row["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: expected a JSON object with question_id and text ({e})") from None
            text = with_suffix(text, suffix)
            image = os.path.join(images, row["image"]) if row.get("image") else None
            out.append(Question(qid, text, ("<image>\n" if image else "") + text, image))
    return out


def _scienceqa_questions(path: str, images: str, suffix: str) -> list[Question]:
    with open(path, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e}); pass the ScienceQA question file llava_test_CQM-A.json") from None
    out = []
    for row in rows:
        try:
            text = row["conversations"][0]["value"].replace("<image>", "").strip()
            qid = row["id"]
        except (KeyError, IndexError, TypeError):
            raise DataError(f"{path}: each entry needs id and conversations[0].value") from None
        image = os.path.join(images, row["image"]) if row.get("image") else None
        text = ("<image>\n" if image else "") + text
        text = with_suffix(text, suffix)
        out.append(Question(qid, text, text, image))
    return out


def is_missing(value) -> bool:
    """An empty MMBench cell, as pandas reads one (NaN) or as written out ("nan", "none")."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and value.strip().lower() in ("", "nan", "none"))  # fmt: skip


def read_tsv(path: str) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def mmbench_options(row: dict) -> list[str]:
    """The row's options A, B, ... up to the first empty one."""
    options = []
    for char in OPTION_CHARS:
        if is_missing(row.get(char)):
            break
        options.append(row[char])
    return options


def _mmbench_questions(path: str, suffix: str, all_rounds: bool) -> list[Question]:
    out = []
    for row in read_tsv(path):
        if "index" not in row or "question" not in row or "image" not in row:
            raise DataError(f"{path}: an MMBench tsv needs the columns index, question, image (and A, B, ...)")
        options = mmbench_options(row)
        chars = list(OPTION_CHARS[: len(options)])
        image = base64.b64decode(row["image"])
        for round_id in range(len(options) if all_rounds else 1):
            question = row["question"]
            if not is_missing(row.get("hint")):
                question = row["hint"] + "\n" + question
            for char, option in zip(OPTION_CHARS, options):
                question += "\n" + char + ". " + option
            record = {"round_id": round_id, "options": list(options), "option_char": list(chars)}
            message = with_suffix("<image>\n" + question, suffix)
            out.append(Question(int(row["index"]), question, message, image, record))
            options, chars = options[1:] + options[:1], chars[1:] + chars[:1]
    return out
