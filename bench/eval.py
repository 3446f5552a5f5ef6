"""Benchmark answering speed: `python -m llava_jax.eval run`'s loop against transformers' generate at
batch 1 (what the original LLaVA eval scripts run), on the ~300M LLaVA of bench/decode.py.

    python bench/eval.py [--questions 24] [--batches 1,4,8,16] [--max_new_tokens 16]

The model is bench/decode.py's (CLIP ViT-B/14 at 224, 12-layer 1024-wide LLaMA, vocab 32064; random
weights), with a small sentencepiece tokenizer: `<image>` is its first added id, and the LM head rows past
the tokenizer's pieces are zeroed so that greedy decoding stays within what it can decode. Questions are a
GQA-format file over images of several sizes; every side answers the same prompts (pipe.prepare's ids,
vicuna_v1 template) greedily, max_new_tokens each (random weights rarely say eos). Each llava_jax batch
size runs once untimed first (compilation), then the timed pass; transformers runs question by question.
Prints each side's questions/s, the ratio to transformers, whether the answers agree with
transformers' and with batch size 1, and a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench import decode  # noqa: E402


def build(directory: str):
    """bench/decode.py's model, with a tokenizer; returns (transformers model, llava_jax pipeline)."""
    import torch

    import llava_jax
    from llava_jax.data import tiny_tokenizer

    model = decode.build_hf(directory)
    proto = tiny_tokenizer.train_sentencepiece(tiny_tokenizer.corpus(num_lines=400, seed=0), vocab_size=512)
    ids = tiny_tokenizer.write_llava_hf_tokenizer(directory, proto, added_tokens=("<image>", "<pad>"))
    model.config.image_token_id = ids["<image>"]
    with torch.no_grad():
        model.lm_head.weight[min(ids.values()) :] = 0.0
    model.generation_config.eos_token_id = 2
    model.save_pretrained(directory)
    return model, llava_jax.load(directory, dtype="float32")


def write_questions(root: str, n: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(224, 224), (300, 400), (480, 360), (200, 500)]
    words = "what colour is the shape on left right of image how many are there".split()
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "q.jsonl"), "w") as f:
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            name = f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, "images", name))
            text = " ".join(rng.choice(words, 4 + i % 6)) + "?"
            f.write(json.dumps({"question_id": i, "image": name, "text": text}) + "\n")
    return os.path.join(root, "q.jsonl")


def hf_answers(model, pipe, questions, max_new_tokens: int) -> tuple[list[str], float]:
    """transformers' generate, one question at a time, on pipe.prepare's inputs; (answers, seconds)."""
    import torch

    from llava_jax.data.conversation import render
    from llava_jax.data.image import load_image

    answers, start = [], time.perf_counter()
    for q in questions:
        inputs = pipe.prepare(render("vicuna_v1", [{"role": "user", "content": q.message}]), [load_image(q.image)])
        with torch.no_grad():
            out = model.generate(input_ids=torch.as_tensor(inputs["input_ids"]),
                                 attention_mask=torch.as_tensor(inputs["attention_mask"]),
                                 pixel_values=torch.as_tensor(inputs["pixel_values"]),
                                 max_new_tokens=max_new_tokens, do_sample=False)  # fmt: skip
        ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        answers.append(pipe.tokenizer.decode(ids).replace("</s>", "").strip())
    return answers, time.perf_counter() - start


def jax_answers(pipe, questions, path: str, batch: int, max_new_tokens: int) -> tuple[list[str], float]:
    from llava_jax.eval.answer_file import read_answers
    from llava_jax.eval.runner import run_questions

    warm = path + ".warm"
    run_questions(pipe, questions[: 2 * batch], warm, batch_size=batch, max_new_tokens=max_new_tokens,
                  progress=False)  # fmt: skip  # compiles this batch size's shapes
    start = time.perf_counter()
    run_questions(pipe, questions, path, batch_size=batch, max_new_tokens=max_new_tokens, progress=False)
    seconds = time.perf_counter() - start
    return [a["text"] for a in read_answers(path)], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--batches", default="1,4,8,16", help="llava_jax batch sizes")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--skip_hf", action="store_true")
    args = parser.parse_args()

    import torch

    from llava_jax.eval.tasks import load_questions

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as root:
        model_dir = os.path.join(root, "model")
        model, pipe = build(model_dir)
        questions = load_questions("gqa", write_questions(root, args.questions), os.path.join(root, "images"))
        results = {}
        if not args.skip_hf:
            hf, seconds = hf_answers(model, pipe, questions, args.max_new_tokens)
            results["hf_b1"] = {"questions_per_s": len(questions) / seconds, "answers": hf}
        for b in (int(x) for x in args.batches.split(",")):
            answers, seconds = jax_answers(pipe, questions, os.path.join(root, f"a{b}.jsonl"), b, args.max_new_tokens)
            results[f"jax_b{b}"] = {"questions_per_s": len(questions) / seconds, "answers": answers}
    base = results.get("hf_b1")
    one = results["jax_b1"]["answers"] if "jax_b1" in results else None
    print(f"{'side':<8} {'questions/s':>12} {'x transformers b1':>18} {'= transformers':>15} {'= jax b1':>9}")
    summary = {"questions": len(questions), "max_new_tokens": args.max_new_tokens}
    for name, r in results.items():
        ratio = r["questions_per_s"] / base["questions_per_s"] if base else float("nan")
        same_hf = sum(a == b for a, b in zip(r["answers"], base["answers"])) if base else -1
        same_one = sum(a == b for a, b in zip(r["answers"], one)) if one else -1
        print(f"{name:<8} {r['questions_per_s']:>12.2f} {ratio:>18.2f} {same_hf:>11}/{len(questions)} "
              f"{same_one:>5}/{len(questions)}")  # fmt: skip
        summary[name] = {"questions_per_s": round(r["questions_per_s"], 3), "vs_hf_b1": round(ratio, 2),
                         "answers_equal_hf": same_hf, "answers_equal_jax_b1": same_one}  # fmt: skip
    jax_sides = {k: v for k, v in results.items() if k.startswith("jax")}
    summary["best_jax"] = max(jax_sides, key=lambda k: jax_sides[k]["questions_per_s"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
