"""The scorers against the original LLaVA code's own (llava.eval.m4c_evaluator, eval_pope.py,
eval_science_qa.py, eval_textvqa.py from the llava-torch wheel) on awkward hand-made answers, and the
rules of the scorers that the wheel does not ship (MME's calculation.py, GQA, SEED, MMBench circular)."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest

from llava_jax.eval import choices, scorers, yes_no
from llava_jax.eval.vqa_accuracy import normalize_answer, vqa_score

llava_eval = pytest.importorskip("llava.eval.m4c_evaluator")
ORIGINAL = os.path.dirname(llava_eval.__file__)

AWKWARD = [
    "Two dogs.", "The cat's toy", "dont know", "1,000", "1,000 people.", "yes, it is", "a/b", "(a) red",
    "It's 3.5 m", "Ten!", "none", "A. B. C.", "." * 40 + "x", "won't", "hes here", "u.s.a.", "  The  Answer  ",
    "no; not", "3.14.", "a - b", "Yes\nit\tis", '"quoted"', "colour?", "an apple", "Id've", "wouldnt've", "3 , 4",
    "twenty one", "ONE", "it is 2:30", "100%", "#1", "it's the man's", "-5", "e-mail", "l'été", "Nope.",
]  # fmt: skip


def test_answer_normalisation_matches_m4c_evaluator():
    reference = llava_eval.EvalAIAnswerProcessor()
    for text in AWKWARD:
        assert normalize_answer(text) == reference(text), text


def test_vqa_score_matches_textvqa_evaluator():
    evaluator = llava_eval.TextVQAAccuracyEvaluator()
    humans = [["two", "2", "2", "two dogs", "3", "2.", "Two", "dogs", "2", "none"],
              ["yes"] * 10, ["no", "No.", "nope", "no", "yes", "yes", "yes", "yes", "yes", "yes"],
              ["1,000", "1000", "one thousand", "1,000.", "a thousand", "1000", "1k", "1000", "1 000", "1000"]]
    # fmt: skip
    for gts in humans:
        for pred in ["2", "two", "Two dogs", "3", "0", "dogs", "x", "Yes.", "no", "1000", "1,000", "None"]:
            with contextlib.redirect_stderr(io.StringIO()):
                expected = evaluator.eval_pred_list([{"pred_answer": pred, "gt_answers": gts}])
            assert vqa_score(pred, gts) == pytest.approx(expected, abs=1e-12), (pred, gts)


POPE_ANSWERS = ["Yes", "No", "Yes, there is a dog.", "There is no dog.", "No.", "I do not see one", "not sure",
                "Yes. But no cat.", "None", "no, it's not", "Nope", "Yes,no", "The answer is no", "NO", "yes"]


def _original_pope(answers, label_file):
    sys.path.insert(0, ORIGINAL)
    try:
        import eval_pope
    finally:
        sys.path.remove(ORIGINAL)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        eval_pope.eval_pope([dict(a) for a in answers], label_file)
    f1, acc, precision, recall, yes_ratio = map(float, out.getvalue().strip().splitlines()[-1].split(", "))
    return {"f1": f1, "accuracy": acc, "precision": precision, "recall": recall, "yes_ratio": yes_ratio}


def test_pope_matches_eval_pope(tmp_path):
    labels = {"random": ["yes", "no"] * 7 + ["yes"], "adversarial": ["no", "no", "yes"] * 5}
    questions, answers = [], []
    os.makedirs(tmp_path / "pope")
    qid = 0
    for category, cat_labels in labels.items():
        with open(tmp_path / "pope" / f"coco_pope_{category}.json", "w") as f:
            for i, label in enumerate(cat_labels):
                f.write(json.dumps({"question_id": i + 1, "label": label, "text": "q", "image": "x.jpg"}) + "\n")
        for i in range(len(cat_labels)):
            questions.append({"question_id": qid, "image": "x.jpg", "text": "q", "category": category})
            answers.append({"question_id": qid, "prompt": "q", "text": POPE_ANSWERS[(i * 7 + len(category)) % 15]})
            qid += 1
    write_jsonl(tmp_path / "q.jsonl", questions)
    write_jsonl(tmp_path / "a.jsonl", answers)
    ours = scorers.score("pope", str(tmp_path / "a.jsonl"), str(tmp_path / "pope"), str(tmp_path / "q.jsonl"))
    for category in labels:
        mine = [a for a, q in zip(answers, questions) if q["category"] == category]
        expected = _original_pope(mine, str(tmp_path / "pope" / f"coco_pope_{category}.json"))
        for k, v in expected.items():  # the original prints three decimals
            assert ours["categories"][category][k] / 100 == pytest.approx(v, abs=5e-4), (category, k)
    assert [yes_no.pope_label(t) for t in ["Yes. But no cat.", "None", "NO", "not sure", "no, it's not"]] == [
        "yes", "yes", "yes", "no", "no"]  # fmt: skip


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


SQA_ANSWERS = ["A", "B", "C. 12 cm", "The answer is B.", "B.", "E", "b", "C", "The answer is A. The answer is B.",
               "(A)", "D", "A. yes", "The answer is C", "", "B"]  # fmt: skip


def test_scienceqa_matches_eval_science_qa(tmp_path):
    problems, answers = {}, []
    for i, text in enumerate(SQA_ANSWERS):
        pid = str(100 + i)
        problems[pid] = {"choices": ["x", "y", "z"][: 2 + i % 2], "answer": i % 3 % (2 + i % 2)}
        if i != 5:  # one question left unanswered
            prompt = ("<image>\n" if i % 2 else "") + "Question?\nAnswer with the option's letter."
            answers.append({"question_id": pid, "prompt": prompt, "text": text})
    problems["999"] = {"choices": ["a", "b"], "answer": 0}  # not in the test split
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": [str(100 + i) for i in range(len(SQA_ANSWERS))]}))
    write_jsonl(tmp_path / "a.jsonl", answers)
    out = subprocess.run([sys.executable, os.path.join(ORIGINAL, "eval_science_qa.py"), "--base-dir", str(tmp_path),
                          "--result-file", str(tmp_path / "a.jsonl"), "--output-file", str(tmp_path / "o.json"),
                          "--output-result", str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    acc, img = map(float, re.search(r"Accuracy: ([\d.]+)%, IMG-Accuracy: ([\d.]+)%", out.stdout).groups())
    ours = scorers.score("scienceqa", str(tmp_path / "a.jsonl"), str(tmp_path))
    assert ours["accuracy"] == pytest.approx(json.loads((tmp_path / "r.json").read_text())["acc"])
    assert round(ours["accuracy"], 2) == acc and round(ours["img_accuracy"], 2) == img
    assert 0 < ours["accuracy"] < 100


def test_textvqa_matches_eval_textvqa(tmp_path):
    sys.path.insert(0, ORIGINAL)
    try:
        import eval_textvqa
    finally:
        sys.path.remove(ORIGINAL)
    data, answers = [], []
    preds = ["Coca Cola", "coca-cola", "the STOP sign.", "2,000", "twenty", "no idea", "Nike", "nike!"]
    for i, pred in enumerate(preds):
        question = f"What is written on thing {i}?"
        data.append({"image_id": f"img{i % 3}", "question": question,
                     "answers": ["coca cola", "stop", "2000", "nike", "coca-cola", "stop sign", "20", "2,000", "nike",
                                 "coca cola"]})  # fmt: skip
        suffix = "\nAnswer the question using a single word or phrase."
        prompt = question + ("\nReference OCR token: coca, cola" if i % 2 else "") + suffix
        answers.append({"question_id": f"img{i % 3}", "prompt": prompt, "text": pred})
    (tmp_path / "val.json").write_text(json.dumps({"data": data}))
    write_jsonl(tmp_path / "a.jsonl", answers)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        eval_textvqa.eval_single(str(tmp_path / "val.json"), str(tmp_path / "a.jsonl"))
    expected = float(re.search(r"Accuracy: ([\d.]+)%", out.getvalue()).group(1))
    ours = scorers.score("textvqa", str(tmp_path / "a.jsonl"), str(tmp_path / "val.json"))
    assert round(ours["accuracy"], 2) == expected and 0 < expected < 100


def test_mme_rules(tmp_path):
    """calculation.py: acc over questions, acc+ over images with both right, score = acc + acc+;
    an answer reads as yes/no when exact or in its first four characters."""
    root = tmp_path / "MME"
    (root / "count").mkdir(parents=True)
    (root / "artwork" / "images").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN").mkdir()
    (root / "code_reasoning").mkdir()
    q = "Are there two dogs? Please answer yes or no."
    (root / "count" / "1.txt").write_text(f"{q}\tYes\nAre there three dogs? Please answer yes or no.\tNo\n")
    (root / "count" / "2.txt").write_text(f"{q}\tNo\nIs there a dog?  Please answer yes or no.\tYes\n")
    artwork = root / "artwork" / "questions_answers_YN" / "10.txt"
    artwork.write_text(f"{q}\tNo\nIs it red? Please answer yes or no.\tYes\n")
    (root / "code_reasoning" / "5.txt").write_text(f"{q}\tYes\nIs it code? Please answer yes or no.\tNo\n")
    short = "\nAnswer the question using a single word or phrase."
    answers = [
        ("count/1.jpg", "Are there two dogs?" + short, "Yes"),  # right
        ("count/1.jpg", "Are there three dogs?" + short, "No, there are two"),  # right: "no" in "no, "
        ("count/2.jpg", "Are there two dogs?" + short, "yes"),  # wrong
        ("count/2.jpg", "Is there a dog?" + short, "There is a dog"),  # "other": wrong (double space in the file)
        ("artwork/10.jpg", q, "no"),  # right, MME's own prompt
        ("artwork/10.jpg", "Is it red?" + short, "YES."),  # right
        ("code_reasoning/5.png", "Are there two dogs?" + short, "Yes"),  # right
        ("code_reasoning/5.png", "Is it code?" + short, "Nope"),  # right: "no" in "nope"
    ]
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "prompt": p, "text": t} for i, p, t in answers])
    ours = scorers.score("mme", str(tmp_path / "a.jsonl"), str(root))
    assert ours["categories"]["count"] == {"acc": 50.0, "acc_plus": 50.0, "score": 100.0}
    assert ours["categories"]["artwork"]["score"] == 200.0
    assert ours["perception"] == 300.0 and ours["cognition"] == 200.0
    assert [yes_no.mme_label(t) for t in ["Yes", "NO", "nope", "yess", "I think yes", "not"]] == [
        "yes", "no", "no", "yes", "other", "no"]  # fmt: skip


def test_gqa_and_seed_exact_match(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": "1", "prompt": "", "text": "Yes."},
                                       {"question_id": "2", "prompt": "", "text": "Left side"},
                                       {"question_id": "3", "prompt": "", "text": "table."}])  # fmt: skip
    (tmp_path / "gqa.json").write_text(json.dumps({"1": {"answer": "yes"}, "2": {"answer": "left"},
                                                   "3": {"answer": "table"}, "4": {"answer": "no"}}))  # fmt: skip
    ours = scorers.score("gqa", str(tmp_path / "a.jsonl"), str(tmp_path / "gqa.json"))
    assert ours["accuracy"] == 50.0 and ours["missing"] == 1
    write_jsonl(tmp_path / "s.jsonl", [{"question_id": 1, "prompt": "", "text": "A"},
                                       {"question_id": 2, "prompt": "", "text": "B."},
                                       {"question_id": 3, "prompt": "", "text": "C"}])  # fmt: skip
    seed = {"question_type": {"Scene": 1, "Count": 2},
            "questions": [{"question_id": "1", "answer": "A", "question_type_id": 1, "data_type": "image"},
                          {"question_id": "2", "answer": "B", "question_type_id": 2, "data_type": "image"},
                          {"question_id": "3", "answer": "C", "question_type_id": 2, "data_type": "video"}]}
    # fmt: skip
    (tmp_path / "seed.json").write_text(json.dumps(seed))
    ours = scorers.score("seed", str(tmp_path / "s.jsonl"), str(tmp_path / "seed.json"))
    assert ours["accuracy"] == 50.0 and ours["types"] == {"Count": 0.0, "Scene": 100.0}


def test_mmbench_circular(tmp_path):
    """A question counts only when every rotation of its options (and every copy at index + k * 1e6) is right."""
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\timage\n"
    rows = ["0\tq0\tnan\tcat\tdog\tcow\t\tB\tx", "1\tq1\tnan\tred\tblue\t\t\tA\tx",
            "1000001\tq1\tnan\tblue\tred\t\t\tB\tx"]
    (tmp_path / "mmb.tsv").write_text(header + "\n".join(rows) + "\n")
    answers = [  # q0: answer "dog"; rounds shift the options left by one each time
        {"question_id": 0, "round_id": 0, "text": "B", "options": ["cat", "dog", "cow"]},
        {"question_id": 0, "round_id": 1, "text": "A. dog", "options": ["dog", "cow", "cat"]},
        {"question_id": 0, "round_id": 2, "text": "dog", "options": ["cow", "cat", "dog"]},
        {"question_id": 1, "round_id": 0, "text": "(A)", "options": ["red", "blue"]},
        {"question_id": 1000001, "round_id": 0, "text": "A", "options": ["blue", "red"]},  # wrong copy
    ]
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "", **a} for a in answers])
    ours = scorers.score("mmbench", str(tmp_path / "a.jsonl"), str(tmp_path / "mmb.tsv"))
    assert ours["accuracy"] == 50.0 and ours["single_pass_accuracy"] == 100.0 and ours["count"] == 2
    texts = ["B", "b", "(B) dog", "Dog.", "C", "cat or dog", "B:"]
    assert [choices.mmbench_choice(t, ["cat", "dog"]) for t in texts] == [1, -1, 1, 1, -1, -1, 1]


def test_score_command_prints_json_and_reports_mistakes(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": "1", "prompt": "", "text": "yes"}])
    (tmp_path / "gqa.json").write_text(json.dumps({"1": {"answer": "yes"}}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "llava_jax.eval", "score", "--task", "gqa", "--answers", str(tmp_path / "a.jsonl")]
    ok = subprocess.run(cmd + ["--annotations", str(tmp_path / "gqa.json")], capture_output=True, text=True, cwd=root)
    assert ok.returncode == 0 and json.loads(ok.stdout.strip().splitlines()[-1])["accuracy"] == 100.0
    bad = subprocess.run(cmd + ["--annotations", str(tmp_path / "nope.json")], capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and "nope.json" in bad.stderr and "Traceback" not in bad.stderr
