"""`python -m llava_jax.eval submit`: the files the test servers and GPT judges read, as the original
repository's scripts/convert_*_for_submission.py / convert_*_for_eval.py write them.

  vqav2      EvalAI test-dev/test json: [{"question_id", "answer"}] over the split's question file
             (--questions llava_vqav2_mscoco_test2015.jsonl), the answers EvalAI-normalised, '' where missing
  vizwiz     EvalAI test json: [{"image", "answer"}] (--questions: the VizWiz test question file)
  gqa        testdev_balanced_predictions.json: [{"questionId", "prediction"}] for GQA's eval.py
  mmbench    the server's .xlsx: the tsv's rows (--questions: the MMBench tsv) with a prediction column
  seed       the upload jsonl: {"question_id", "prediction"} per answer
  mmvet      MM-Vet's judge json: {"v1_<question_id>": answer}
  llava_bench  the answer jsonl itself, in question order (eval_gpt_review_bench.py reads it line by line)
"""

from __future__ import annotations

import json
import os

from llava_jax.errors import DataError
from llava_jax.eval.answer_file import read_answers, write_answers
from llava_jax.eval.tasks import read_tsv
from llava_jax.eval.vqa_accuracy import normalize_answer
from llava_jax.eval.xlsx import write_xlsx

MMBENCH_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")


def _questions(path: str | None, task: str) -> list[dict]:
    if not path or not os.path.isfile(path):
        raise DataError(f"submit --task {task} needs --questions, the split's question file ({path} is not a file)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dump(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)


def write_submission(task: str, answers_path: str, out: str, questions: str | None = None) -> dict:
    """Writes `out` for `task` from an answer file; returns a summary."""
    answers = read_answers(answers_path)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    texts = {a["question_id"]: a["text"] for a in answers}
    missing = 0
    if task == "vqav2":
        split = _questions(questions, task)
        missing = sum(q["question_id"] not in texts for q in split)
        _dump(out, [{"question_id": q["question_id"], "answer": normalize_answer(texts.get(q["question_id"], ""))}
                    for q in split])  # fmt: skip
    elif task == "vizwiz":
        split = _questions(questions, task)
        missing = sum(q["question_id"] not in texts for q in split)
        if missing:
            raise DataError(f"{answers_path} lacks {missing} of the {len(split)} questions of {questions}; "
                            "the VizWiz server needs all: finish the run")  # fmt: skip
        _dump(out, [{"image": q["image"], "answer": normalize_answer(texts[q["question_id"]])} for q in split])
    elif task == "gqa":
        _dump(out, [{"questionId": a["question_id"], "prediction": a["text"].rstrip(".").lower()} for a in answers])
    elif task in ("mmbench", "mmbench_cn"):
        if not questions:
            raise DataError("submit --task mmbench needs --questions, the MMBench tsv the answers are for")
        rows = read_tsv(questions)
        header = [c for c in rows[0] if c not in MMBENCH_DROPPED]
        header.insert(min(6, len(header)), "prediction")
        first = {a["question_id"]: a["text"] for a in answers if a.get("round_id", 0) == 0}
        missing = sum(int(r["index"]) not in first for r in rows)
        table = [[first.get(int(r["index"])) if c == "prediction" else _cell(r[c]) for c in header] for r in rows]
        write_xlsx(out, header, table)
    elif task == "seed":
        write_answers(out, [{"question_id": a["question_id"], "prediction": a["text"]} for a in answers])
    elif task == "mmvet":
        _dump(out, {f"v1_{a['question_id']}": a["text"] for a in answers})
    elif task == "llava_bench":
        write_answers(out, answers)
    else:
        raise DataError(f"{task} has no submission file; score it locally with `python -m llava_jax.eval score`")
    return {"task": task, "answers": len(answers), "missing": missing, "out": out}


def _cell(value: str):
    """A tsv cell as pandas would type it: integers as numbers, empty/'nan' as empty."""
    if value is None or value.strip().lower() in ("", "nan"):
        return None
    try:
        return int(value)
    except ValueError:
        return value
