"""llava_jax as an lmms-eval model, offline: a tiny dataset saved with `datasets`, tiny task YAMLs,
`lmms_eval.evaluator.simple_evaluate` on a tiny model. The answers equal `python -m llava_jax.eval run`'s
on the same questions; `loglikelihood` is the continuation's loss under transformers' model, and the
multiple-choice metric picks the likeliest choice."""

import os
import textwrap

import numpy as np
import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval")
datasets = pytest.importorskip("datasets")

import llava_jax  # noqa: E402
from llava_jax.data.conversation import render  # noqa: E402
from llava_jax.eval.answer_file import read_answers  # noqa: E402
from llava_jax.eval.runner import run_questions  # noqa: E402
from llava_jax.eval.tasks import SHORT_ANSWER, load_questions  # noqa: E402
from tests import eval_fixtures as F  # noqa: E402

NEW = 6
CHOICES = ["red", "blue circle", "the left one"]

UTILS = textwrap.dedent('''
    def doc_to_visual(doc):
        return [doc["image"].convert("RGB")]

    def doc_to_text(doc):
        return doc["question"] + "\\nAnswer the question using a single word or phrase."

    def doc_to_choice(doc):
        return ["red", "blue circle", "the left one"]
''')


def task_yaml(name, dataset, output_type, until="</s>"):
    common = f"task: {name}\ndataset_path: {dataset}\ndataset_kwargs:\n  load_from_disk: true\ntest_split: test\n" \
             "doc_to_visual: !function utils.doc_to_visual\ndoc_to_text: !function utils.doc_to_text\n"
    if output_type == "generate_until":
        return common + textwrap.dedent(f"""\
            output_type: generate_until
            doc_to_target: answer
            generation_kwargs:
              max_new_tokens: {NEW}
              until: ["{until}"]
              temperature: 0
            metric_list:
              - metric: exact_match
                aggregation: mean
                higher_is_better: true
            """)
    return common + textwrap.dedent("""\
        output_type: multiple_choice
        doc_to_choice: !function utils.doc_to_choice
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sp_model_proto):
    root = str(tmp_path_factory.mktemp("lmms"))
    model_dir = F.tiny_model_dir(os.path.join(root, "llava-tiny"), sp_model_proto)
    images = F.write_images(os.path.join(root, "images"), 5)
    rows = F.write_jsonl_questions(os.path.join(root, "q.jsonl"), images, n=8)  # gqa adds the suffix, as doc_to_text
    from PIL import Image

    table = {"question_id": [r["question_id"] for r in rows], "question": [r["text"] for r in rows],
             "image": [Image.open(os.path.join(root, "images", r["image"])).convert("RGB") for r in rows],
             "answer": ["red"] * len(rows), "label": [i % 3 for i in range(len(rows))]}  # fmt: skip
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(table)}).save_to_disk(os.path.join(root, "ds"))
    tasks = os.path.join(root, "tasks")
    os.makedirs(tasks)
    with open(os.path.join(tasks, "utils.py"), "w") as f:
        f.write(UTILS)
    for name, kind, until in (("tiny_llava_jax_gen", "generate_until", "</s>"),
                              ("tiny_llava_jax_until", "generate_until", "e"),
                              ("tiny_llava_jax_mc", "multiple_choice", None)):  # fmt: skip
        with open(os.path.join(tasks, name + ".yaml"), "w") as f:
            f.write(task_yaml(name, os.path.join(root, "ds"), kind, until))
    return root, model_dir, tasks


def evaluate(model_dir, tasks, task, batch_size, limit=None):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    from llava_jax.eval.lmms_model import manifest

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)  # what the entry point does once installed
    return simple_evaluate(model="llava_jax", model_args=f"pretrained={model_dir},dtype=float32", tasks=[task],
                           batch_size=batch_size, task_manager=TaskManager(include_path=tasks), log_samples=True,
                           limit=limit)  # fmt: skip


def responses(out, task):
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples]


def test_generation_equals_eval_run(setup, tmp_path):
    root, model_dir, tasks = setup
    out = evaluate(model_dir, tasks, "tiny_llava_jax_gen", batch_size=3)
    assert "exact_match,none" in out["results"]["tiny_llava_jax_gen"]
    lmms_answers = responses(out, "tiny_llava_jax_gen")
    pipe = llava_jax.load(model_dir, dtype="float32")
    questions = load_questions("gqa", os.path.join(root, "q.jsonl"), os.path.join(root, "images"))
    run_questions(pipe, questions, str(tmp_path / "a.jsonl"), batch_size=1, max_new_tokens=NEW, progress=False)
    run_answers = [a["text"] for a in read_answers(str(tmp_path / "a.jsonl"))]
    assert lmms_answers == run_answers and len(set(lmms_answers)) > 2
    # a task's `until` ends an answer at its first occurrence
    cut = responses(evaluate(model_dir, tasks, "tiny_llava_jax_until", batch_size=4), "tiny_llava_jax_until")
    assert cut == [a.split("e")[0].strip() for a in run_answers] and any("e" in a for a in run_answers)


def test_multiple_choice_picks_the_least_loss(setup):
    """loglikelihood returns the continuation's loss under transformers' model; lmms-eval's argmin then
    picks the choice transformers finds likeliest."""
    import transformers

    from llava_jax.eval.lmms_model import LlavaJax
    from llava_jax.eval.tasks import Question

    root, model_dir, tasks = setup
    out = evaluate(model_dir, tasks, "tiny_llava_jax_mc", batch_size=1, limit=4)
    samples = sorted(out["samples"]["tiny_llava_jax_mc"], key=lambda s: s["doc_id"])
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    lm = LlavaJax(model_dir, dtype="float32")
    data = datasets.load_from_disk(os.path.join(root, "ds"))["test"]
    picks_right = []
    for sample in samples:
        doc = data[sample["doc_id"]]
        message = "<image>\n" + doc["question"] + "\n" + SHORT_ANSWER
        prompt = render("vicuna_v1", [{"role": "user", "content": message}])
        losses = []
        for choice in CHOICES:
            inputs = lm.pipe.prepare(prompt + " " + choice, [doc["image"]])
            n = len(lm.pipe.prepare(prompt, [doc["image"]])["input_ids"][0])
            with torch.no_grad():
                logits = reference(input_ids=torch.as_tensor(inputs["input_ids"]),
                                   pixel_values=torch.as_tensor(inputs["pixel_values"])).logits[0].double()  # fmt: skip
            logp = torch.log_softmax(logits[n - 1 : -1], -1)
            target = torch.as_tensor(inputs["input_ids"][0][n:])
            expected = -float(logp[torch.arange(len(target)), target].sum())
            ours, _ = lm.continuation_loss(Question(0, "", message, [doc["image"]]), " " + choice)
            assert ours == pytest.approx(expected, rel=1e-4, abs=1e-4)
            losses.append(expected)
        picks_right.append(int(np.argmin(losses)) == doc["label"])
        assert sample["acc"] == float(int(np.argmin(losses)) == doc["label"])
    assert out["results"]["tiny_llava_jax_mc"]["acc,none"] == pytest.approx(np.mean(picks_right))


def test_entry_point_is_declared():
    """setup.py registers the model in lmms-eval's entry point group, with the payload lmms-eval loads."""
    import ast

    from lmms_eval.models.registry_v2 import ModelManifest

    from llava_jax.eval import lmms_model

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "setup.py")) as f:
        tree = ast.parse(f.read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    entry_points = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "entry_points"))
    assert entry_points == {"lmms_eval.models": ["llava_jax = llava_jax.eval.lmms_model:manifest"]}
    made = lmms_model.manifest()
    assert isinstance(made, ModelManifest) and made.model_id == "llava_jax"
    assert made.simple_class_path == "llava_jax.eval.lmms_model.LlavaJax"
