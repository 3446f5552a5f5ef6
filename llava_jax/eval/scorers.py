"""`python -m llava_jax.eval score`: an answer file against a benchmark's ground truth, by the rules
of the scorers the original LLaVA-1.5 scripts run. Every metric is in percent (MME: its score).

--annotations per task:
  vqav2     v2_mscoco_val2014_annotations.json (the val split; test-dev goes to the server: `submit`)
  vizwiz    val.json of VizWiz (with --questions, whose `image` ties question ids to it)
  textvqa   TextVQA_0.5.1_val.json (matched by image id and question, as eval_textvqa.py)
  gqa       testdev_balanced_questions.json (exact match after convert_gqa_for_eval.py's clean-up)
  pope      the folder of coco_pope_{adversarial,popular,random}.json (with --questions for categories)
  mme       MME_Benchmark_release_version/ (each category's question/answer .txt files)
  scienceqa the folder of problems.json and pid_splits.json (the test split)
  mmbench   the MMBench dev tsv (its answer column); circular over rounds and index % 1e6 copies
  seed      SEED-Bench.json (image questions)
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

from llava_jax.errors import DataError
from llava_jax.eval import choices, yes_no
from llava_jax.eval.answer_file import read_answers
from llava_jax.eval.tasks import SHORT_ANSWER, mmbench_options, read_tsv
from llava_jax.eval.vqa_accuracy import vqa_score


def score(task: str, answers_path: str, annotations: str, questions: str | None = None) -> dict:
    """The metrics of one answer file as a dict (`task`, `count`, and the task's metrics)."""
    answers = read_answers(answers_path)
    if not answers:
        raise DataError(f"{answers_path} holds no answers; pass the file `python -m llava_jax.eval run` wrote")
    if not os.path.exists(annotations):
        raise DataError(f"annotations {annotations} do not exist; pass --annotations (see `score --help`)")
    scorer = SCORERS.get(task)
    if scorer is None:
        raise DataError(f"{task} has no local scorer: its answers go to a GPT judge (`submit --task {task}`)")
    if task in ("pope", "vizwiz") and not questions:
        raise DataError(f"scoring {task} needs --questions, the question file the answers were made from")
    return {"task": task, **scorer(answers, annotations, questions)}


def _json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} as JSON ({e}); pass the file named in `score --help`") from None


def _jsonl(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} as JSON lines ({e})") from None


def _mean_percent(scores: list[float]) -> float:
    return 100 * sum(scores) / len(scores) if scores else 0.0


def _human_answers(entry: dict) -> list[str]:
    return [a["answer"] if isinstance(a, dict) else a for a in entry["answers"]]


def score_vqav2(answers, annotations, questions=None) -> dict:
    data = _json(annotations)
    truth = {a["question_id"]: _human_answers(a) for a in data.get("annotations", [])} if isinstance(data, dict) else {}
    if not truth:
        raise DataError(f"{annotations} has no 'annotations' list; pass v2_mscoco_val2014_annotations.json")
    return _vqa_against(answers, truth, annotations, lambda a: a["question_id"])


def score_vizwiz(answers, annotations, questions) -> dict:
    data = _json(annotations)
    truth = {entry["image"]: _human_answers(entry) for entry in data} if isinstance(data, list) else {}
    if not truth:
        raise DataError(f"{annotations} is not VizWiz's annotation list; pass val.json")
    image_of = {q["question_id"]: os.path.basename(q["image"]) for q in _jsonl(questions)}
    return _vqa_against(answers, truth, annotations, lambda a: image_of.get(a["question_id"]))


def _vqa_against(answers, truth, annotations, key) -> dict:
    scores = []
    for a in answers:
        k = key(a)
        if k not in truth:
            raise DataError(f"answer to question {a['question_id']!r} has no annotation in {annotations}; score the "
                            "answers of the split the annotations are for")  # fmt: skip
        scores.append(vqa_score(a["text"], truth[k]))
    return {"accuracy": _mean_percent(scores), "count": len(scores)}


def textvqa_question(prompt: str) -> str:
    """The question inside a TextVQA prompt, lowercased, as eval_textvqa.py's prompt_processor finds it."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = match.group(1) if match else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    if question is None:
        raise DataError(f"cannot find the question in the TextVQA prompt {prompt!r}; answer LLaVA's "
                        "llava_textvqa_val_v051_ocr.jsonl")  # fmt: skip
    return question.lower()


def score_textvqa(answers, annotations, questions=None) -> dict:
    data = _json(annotations)
    if not isinstance(data, dict) or "data" not in data:
        raise DataError(f"{annotations} has no 'data' list; pass TextVQA_0.5.1_val.json")
    truth = {(e["image_id"], e["question"].lower()): e["answers"] for e in data["data"]}
    scores = []
    for a in answers:
        k = (a["question_id"], textvqa_question(a["prompt"]))
        if k not in truth:
            raise DataError(f"no annotation in {annotations} for image {k[0]!r} and question {k[1]!r}")
        scores.append(vqa_score(a["text"], truth[k]))
    return {"accuracy": _mean_percent(scores), "count": len(scores)}


def score_gqa(answers, annotations, questions=None) -> dict:
    truth = _json(annotations)
    if not isinstance(truth, dict):
        raise DataError(f"{annotations} is not GQA's question dict; pass testdev_balanced_questions.json")
    predictions = {str(a["question_id"]): a["text"].rstrip(".").lower() for a in answers}
    right = [predictions.get(qid) == q["answer"] for qid, q in truth.items()]
    return {"accuracy": _mean_percent(right), "count": len(right),
            "missing": sum(qid not in predictions for qid in truth)}  # fmt: skip


def score_pope(answers, annotations, questions) -> dict:
    category_of = {q["question_id"]: q.get("category") for q in _jsonl(questions)}
    files = sorted(f for f in os.listdir(annotations) if f.startswith("coco_pope_") and f.endswith(".json"))
    if not files:
        raise DataError(f"{annotations} holds no coco_pope_*.json; pass the folder of POPE's annotation files")
    per_category = {}
    for name in files:
        category = name[len("coco_pope_") : -len(".json")]
        labels = [row["label"] for row in _jsonl(os.path.join(annotations, name))]
        mine = [a["text"] for a in answers if category_of.get(a["question_id"]) == category]
        if len(mine) != len(labels):
            raise DataError(f"{len(mine)} answers of category {category} for the {len(labels)} labels of {name}; "
                            "answer the whole POPE question file")  # fmt: skip
        per_category[category] = {k: (100 * v if k != "count" else v)
                                  for k, v in yes_no.pope_metrics(mine, labels).items()}  # fmt: skip
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {k: sum(m[k] for m in per_category.values()) / len(per_category) for k in keys}
    return {**mean, "count": sum(m["count"] for m in per_category.values()), "categories": per_category}


def mme_truth(root: str) -> dict:
    """{(category, question file, question): "Yes"/"No"} from MME's release folder (each category's
    .txt files of "question<TAB>answer" lines, in the category or its questions_answers_YN/)."""
    truth = {}
    for category in sorted(os.listdir(root)):
        folder = os.path.join(root, category)
        if not os.path.isdir(folder):
            continue
        qa = os.path.join(folder, "questions_answers_YN") if os.path.isdir(os.path.join(folder, "images")) else folder
        for name in os.listdir(qa):
            if name.endswith(".txt"):
                with open(os.path.join(qa, name), encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            question, answer = line.rstrip("\n").split("\t")[:2]
                            truth[category, name, question] = answer
    return truth


def mme_question(prompt: str, category: str, file: str, truth: dict) -> str:
    """The MME question an answer's prompt asks: the short-answer suffix dropped and MME's own
    "Please answer yes or no." put back, as LLaVA's convert_answer_to_mme.py does."""
    prompt = prompt.replace(SHORT_ANSWER, "").strip()
    if "Please answer yes or no." not in prompt:
        prompt += " Please answer yes or no."
        if (category, file, prompt) not in truth:
            prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
    return prompt


def score_mme(answers, annotations, questions=None) -> dict:
    truth = mme_truth(annotations)
    rows = []
    for a in answers:
        category = str(a["question_id"]).split("/")[0]
        file = os.path.splitext(str(a["question_id"]).split("/")[-1])[0] + ".txt"
        question = mme_question(a["prompt"], category, file, truth)
        if (category, file, question) not in truth:
            raise DataError(f"no MME ground truth for {a['question_id']!r} asking {question!r} in {annotations}")
        rows.append((category, file, truth[category, file, question], a["text"]))
    return {**yes_no.mme_scores(rows), "count": len(rows)}


def score_scienceqa(answers, annotations, questions=None) -> dict:
    folder = annotations if os.path.isdir(annotations) else os.path.dirname(annotations)
    problems = _json(os.path.join(folder, "problems.json"))
    split = _json(os.path.join(folder, "pid_splits.json"))["test"]
    predictions = {str(a["question_id"]): a for a in answers}
    right, right_img = [], []
    for pid in split:
        a = predictions.get(str(pid), {"text": "FAILED", "prompt": "Unknown"})
        ok = choices.scienceqa_choice(a["text"], len(problems[pid]["choices"])) == problems[pid]["answer"]
        right.append(ok)
        if "<image>" in a["prompt"]:
            right_img.append(ok)
    return {"accuracy": _mean_percent(right), "img_accuracy": _mean_percent(right_img), "count": len(right),
            "img_count": len(right_img)}  # fmt: skip


def score_mmbench(answers, annotations, questions=None) -> dict:
    rows = {int(r["index"]): r for r in read_tsv(annotations)}
    if not rows or "answer" not in next(iter(rows.values())):
        raise DataError(f"{annotations} has no answer column; score the dev split (test goes to `submit`)")
    groups: dict[int, list[bool]] = defaultdict(list)
    first = []
    for a in answers:
        row = rows.get(int(a["question_id"]))
        if row is None:
            raise DataError(f"question {a['question_id']!r} is not in {annotations}")
        options = mmbench_options(row)
        shift = int(a.get("round_id", 0))
        truth = ("ABCD".index(row["answer"]) - shift) % len(options)
        shown = a.get("options") or options[shift:] + options[:shift]
        ok = choices.mmbench_choice(a["text"], shown) == truth
        groups[int(a["question_id"]) % 1_000_000].append(ok)
        if shift == 0 and int(a["question_id"]) < 1_000_000:
            first.append(ok)
    return {"accuracy": choices.circular_correct(groups), "single_pass_accuracy": _mean_percent(first),
            "count": len(groups)}  # fmt: skip


def score_seed(answers, annotations, questions=None) -> dict:
    data = _json(annotations)
    predictions = {str(a["question_id"]): a["text"] for a in answers}
    names = {v: k for k, v in data.get("question_type", {}).items()}
    per_type: dict[str, list[bool]] = defaultdict(list)
    for q in data["questions"]:
        if q.get("data_type", "image") != "image":
            continue
        per_type[names.get(q["question_type_id"], str(q["question_type_id"]))].append(
            predictions.get(str(q["question_id"])) == q["answer"])  # fmt: skip
    right = [r for v in per_type.values() for r in v]
    return {"accuracy": _mean_percent(right), "count": len(right),
            "types": {k: _mean_percent(v) for k, v in sorted(per_type.items())}}  # fmt: skip


SCORERS = {
    "vqav2": score_vqav2, "vizwiz": score_vizwiz, "textvqa": score_textvqa, "gqa": score_gqa, "pope": score_pope,
    "mme": score_mme, "scienceqa": score_scienceqa, "mmbench": score_mmbench, "mmbench_cn": score_mmbench,
    "seed": score_seed,
}  # fmt: skip
