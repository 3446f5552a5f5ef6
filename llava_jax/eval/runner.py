"""The batched, resumable, sharded answering loop behind `python -m llava_jax.eval run`.

Questions are answered in file order, `batch_size` at a time, greedily; a batch's prompts are
left-padded by the generator, so each answer equals the one the question gets alone. Each batch's
answers are appended and flushed before the next starts; a rerun on the same answer file continues
after the last complete answer (see `answer_file`).

Sharding splits the questions into `num_shards` contiguous chunks, as the original scripts'
--num-chunks/--chunk-idx; shard k writes `ANSWERS.shard{k}of{n}` and, once every shard's file is
complete, the shards are merged into ANSWERS in question order (shard 0 waits for the others).
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from collections.abc import Sequence

import numpy as np
from PIL import Image

from llava_jax.chat import default_template
from llava_jax.data.conversation import get_model_name_from_path, get_template, render
from llava_jax.data.image import load_image
from llava_jax.errors import DataError
from llava_jax.eval.answer_file import append_answers, read_answers, write_answers
from llava_jax.eval.tasks import Question
from llava_jax.generate import cut_at_stop


def eval_template(pipe) -> str:
    """The template the original eval scripts use: vicuna_v1 for LLaVA-1.5 (and 1.0-style models),
    the checkpoint's own for LLaVA-1.6 (anyres) models."""
    return default_template(pipe) if pipe.config.is_anyres else "vicuna_v1"


def shard_bounds(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of shard `shard` of `num_shards` over n questions: contiguous chunks of
    ceil(n / num_shards), as the original's split_list (later shards may be empty)."""
    if not 0 <= shard < num_shards:
        raise DataError(f"--shard {shard} is outside 0..{num_shards - 1}; pass 0 <= --shard < --num_shards")
    size = math.ceil(n / num_shards) if n else 0
    return min(n, shard * size), min(n, (shard + 1) * size)


def shard_path(answers: str, shard: int, num_shards: int) -> str:
    return answers if num_shards == 1 else f"{answers}.shard{shard}of{num_shards}"


def batch_inputs(pipe, questions: Sequence[Question], template: str):
    """(token rows, pixel_values or None, image_sizes or None) for a batch: each question prepared
    alone (as pipe.prepare), the images stacked (anyres tiles zero-padded to the most in the batch)."""
    rows, pixels, sizes = [], [], []
    for q in questions:
        text = render(template, [{"role": "user", "content": q.message}])
        images = q.image if isinstance(q.image, list) else [] if q.image is None else [q.image]
        inputs = pipe.prepare(text, [im if isinstance(im, Image.Image) else load_image(im) for im in images])
        rows.append(inputs["input_ids"][0].tolist())
        if inputs["pixel_values"] is not None:
            pixels.append(inputs["pixel_values"])
            sizes.append(inputs["image_sizes"])
    if not pixels:
        return rows, None, None
    if pixels[0].ndim == 5:  # anyres [1, P, C, H, W]
        most = max(p.shape[1] for p in pixels)
        pixels = [np.pad(p, ((0, 0), (0, most - p.shape[1])) + ((0, 0),) * 3) for p in pixels]
    return rows, np.concatenate(pixels), np.concatenate(sizes)


def answer_batch(pipe, questions: Sequence[Question], template: str, max_new_tokens: int, stop: Sequence[str] = (),
                 **sampling) -> list[str]:  # fmt: skip
    """The answers to a batch of questions (greedy unless `sampling` says otherwise: generate's
    temperature, top_k, top_p, seed), cut at the first of `stop`, the template's stop string or the
    end-of-sequence text, and stripped."""
    rows, pixel_values, image_sizes = batch_inputs(pipe, questions, template)
    tokenizer = pipe.tokenizer
    eos = tokenizer.decode([tokenizer.eos_id]) if tokenizer.eos_id is not None else ""
    stop = tuple(dict.fromkeys(s for s in (*stop, get_template(template).stop_string, eos) if s))
    sampling = {"temperature": 0.0, **sampling}
    out = pipe.generate(rows, pixel_values, image_sizes, max_new_tokens=max_new_tokens, stop=stop, **sampling)
    return [cut_at_stop(tokenizer.decode(ids), stop).strip() for ids in out]


def answer_record(q: Question, text: str, model_id: str) -> dict:
    """One answer line in the original scripts' format."""
    return {"question_id": q.question_id, **({"round_id": q.record["round_id"]} if "round_id" in q.record else {}),
            "prompt": q.prompt, "text": text, **{k: v for k, v in q.record.items() if k != "round_id"},
            "answer_id": uuid.uuid4().hex[:22], "model_id": model_id, "metadata": {}}  # fmt: skip


def check_resumed(path: str, done: list[dict], questions: Sequence[Question]) -> None:
    """The answers already in `path` must be those of the first questions, in order."""
    if len(done) > len(questions):
        raise DataError(f"{path} holds {len(done)} answers for {len(questions)} questions; it belongs to another "
                        "question file or shard: pass another --answers or delete it")  # fmt: skip
    for a, q in zip(done, questions):
        if a.get("question_id") != q.question_id or a.get("round_id", 0) != q.record.get("round_id", 0):
            raise DataError(f"{path} answers question {a.get('question_id')!r} where question {q.question_id!r} "
                            "comes; it belongs to another question file or shard: pass another --answers or "
                            "delete it")  # fmt: skip


def run_questions(pipe, questions: Sequence[Question], answers: str, *, task: str = "", batch_size: int = 1,
                  max_new_tokens: int = 128, template: str | None = None, model_id: str | None = None,
                  shard: int = 0, num_shards: int = 1, progress: bool = True,
                  merge_timeout: float = 3600.0) -> dict:  # fmt: skip
    """Answers this shard's questions into its answer file (resuming), merges the shards when all are
    complete, and returns the run's summary."""
    start_time = time.time()
    if batch_size < 1:
        raise DataError(f"--batch_size must be at least 1, got {batch_size}")
    template = template or eval_template(pipe)
    get_template(template)
    model_id = model_id or get_model_name_from_path(pipe.directory or "model")
    begin, end = shard_bounds(len(questions), shard, num_shards)
    mine = questions[begin:end]
    path = shard_path(answers, shard, num_shards)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    done = read_answers(path, repair=True)
    check_resumed(path, done, mine)
    resumed = len(done)
    bar = _progress(len(mine), resumed, task, progress)
    for i in range(resumed, len(mine), batch_size):
        batch = mine[i : i + batch_size]
        texts = answer_batch(pipe, batch, template, max_new_tokens)
        append_answers(path, [answer_record(q, t, model_id) for q, t in zip(batch, texts)])
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    merged = merge_shards(answers, [len(questions[slice(*shard_bounds(len(questions), k, num_shards))])
                                    for k in range(num_shards)],
                          wait=merge_timeout if shard == 0 else 0.0)  # fmt: skip
    seconds = time.time() - start_time
    answered = len(mine) - resumed
    return {"task": task, "questions": len(questions), "shard": shard, "num_shards": num_shards,
            "answered": answered, "resumed": resumed, "batch_size": batch_size, "template": template,
            "seconds": round(seconds, 2), "questions_per_s": round(answered / seconds, 3) if answered else 0.0,
            "answers": answers if merged else path, "merged": merged}  # fmt: skip


def merge_shards(answers: str, counts: Sequence[int], wait: float = 0.0, poll: float = 2.0) -> bool:
    """Writes ANSWERS from the shard files once each holds its count of answers (waiting up to `wait`
    seconds for them); True when ANSWERS is complete."""
    if len(counts) == 1:
        return True
    paths = [shard_path(answers, k, len(counts)) for k in range(len(counts))]
    deadline = time.time() + wait
    while True:
        parts = [read_answers(p) for p in paths]
        if all(len(part) == n for part, n in zip(parts, counts)):
            write_answers(answers, [a for part in parts for a in part])
            return True
        if time.time() >= deadline:
            return False
        time.sleep(poll)


def _progress(total: int, initial: int, task: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="q", desc=task or "questions", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)  # fmt: skip
