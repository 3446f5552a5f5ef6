"""llava_jax as an lmms-eval model (the optional `[lmms]` extra):

    lmms-eval --model llava_jax --model_args pretrained=DIR[,dtype=float32,template=vicuna_v1] \\
        --tasks mme --batch_size 8

It registers through the `lmms_eval.models` entry point group (setup.py), whose payload is
`manifest()`. Requests run through the same batched generation as `python -m llava_jax.eval run`:
left-padded batches whose answers equal batch-size-1 answers, each context rendered with the
conversation template as the user's message ("<image>\\n" in front where the task gave images and
the context has no tag), `until` strings honoured.

`loglikelihood` returns (negative log-likelihood of the continuation in nats, is_greedy): lmms-eval
0.7.3's multiple-choice scoring picks the choice with the *smallest* first value (np.argmin in
lmms_eval/api/task.py, "since we return the actual loss"), so a loss, not a log-probability, makes it
pick the most likely choice. (Its own llava_hf model returns the mean token loss; the sum is the
continuation's likelihood, and lmms-eval's acc_norm divides it by the choice's length.)
"""

from __future__ import annotations

import json

import numpy as np
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from llava_jax.data.conversation import render
from llava_jax.eval.runner import answer_batch, eval_template
from llava_jax.eval.tasks import Question
from llava_jax.generate import bucket

IMAGE_TAG = "<image>"


def manifest():
    """The entry point's payload: lmms-eval's ModelManifest for `--model llava_jax`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="llava_jax", simple_class_path="llava_jax.eval.lmms_model.LlavaJax")


def _skip_filelock_patch_without_filelock_api() -> None:
    """lmms-eval 0.7.3's simple_evaluate patches `filelock._api`, which filelock 4 no longer has, and
    fails on import. The patch only shares lock objects between processes' dataset loads; where it
    cannot apply it is marked done (this model runs in one process)."""
    import importlib.util

    if importlib.util.find_spec("filelock._api") is None:
        from lmms_eval import evaluator

        if hasattr(evaluator, "_enable_reentrant_filelocks"):
            evaluator._enable_reentrant_filelocks._patched = True


def _as_response(pair: tuple[float, bool]):
    """A loglikelihood result as the installed evaluator passes it on intact. lmms-eval 0.7.3 sends every
    response through `unwrap_generation_output`, which turns a (loss, is_greedy) tuple into its str (and
    the multiple-choice scoring then fails); wrapped as a GenerationResult the tuple comes out unchanged."""
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output

    return pair if unwrap_generation_output(pair)[0] == pair else GenerationResult(text=pair)


def _flatten(visuals) -> list:
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v] if v is not None else [])
    return out


class LlavaJax(lmms):
    """pretrained: any checkpoint `llava_jax.load` reads; dtype: "bfloat16" | "float32";
    template: the conversation template (default: as `python -m llava_jax.eval run`);
    batch_size: questions per generation batch; max_new_tokens: default where a task sets none."""

    def __init__(self, pretrained: str, dtype: str = "bfloat16", template: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int | str = 1024, **unused) -> None:  # fmt: skip
        super().__init__()
        import llava_jax

        _skip_filelock_patch_without_filelock_api()
        self.pipe = llava_jax.load(pretrained, dtype=dtype)
        self.template = template or eval_template(self.pipe)
        self.batch_size = int(batch_size or 1)
        self.max_new_tokens = int(max_new_tokens)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list[Image.Image]:
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id])) if doc_to_visual else []
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise ValueError(f"llava_jax takes images only; task {task} gave a {type(v).__name__}")
        return [v.convert("RGB") for v in visuals]

    def _question(self, context: str, visuals: list, doc_id) -> Question:
        message = context
        if visuals and IMAGE_TAG not in context:
            message = " ".join([IMAGE_TAG] * len(visuals)) + "\n" + context
        return Question(doc_id, context, message, list(visuals) or None)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):  # one generation setting per batch
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = {}
            if float(kwargs.get("temperature", 0) or 0) > 0 and kwargs.get("do_sample", True):
                sampling = {"temperature": float(kwargs["temperature"]), "top_p": float(kwargs.get("top_p") or 1.0)}
            new = int(kwargs.get("max_new_tokens") or self.max_new_tokens)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                questions = []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                    questions.append(self._question(context, self._visuals(doc_to_visual, doc_id, task, split), doc_id))
                for i, text in zip(batch, answer_batch(self.pipe, questions, self.template, new, until, **sampling)):
                    results[i] = text
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args[:6]
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            out.append(_as_response(self.continuation_loss(self._question(context, visuals, doc_id), continuation)))
        return out

    def continuation_loss(self, question: Question, continuation: str) -> tuple[float, bool]:
        """(-sum of log p(continuation tokens | prompt), whether greedy decoding gives exactly them)."""
        prompt = render(self.template, [{"role": "user", "content": question.message}])
        images = question.image or []
        context_ids = self.pipe.prepare(prompt, images)["input_ids"][0]
        inputs = self.pipe.prepare(prompt + continuation, images)
        ids = inputs["input_ids"][0]
        n = len(context_ids)
        if len(ids) <= n:
            return 0.0, True
        padded = np.zeros((1, bucket(len(ids))), np.int64)  # right padding: few compiled lengths, same logits
        padded[0, : len(ids)] = ids
        mask = (np.arange(padded.shape[1]) < len(ids))[None].astype(np.int32)
        logits = self.pipe.logits(padded, inputs["pixel_values"], inputs["image_sizes"], attention_mask=mask)[0]
        logits = logits[n - 1 : len(ids) - 1].astype(np.float64)
        log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        targets = ids[n:]
        loss = -float(log_probs[np.arange(len(targets)), targets].sum())
        return loss, bool((logits.argmax(-1) == targets).all())

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("llava_jax answers single-round tasks")
