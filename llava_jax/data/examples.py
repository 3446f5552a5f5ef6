"""LLaVA records -> training examples: `input_ids` with image positions, `labels` on the replies.

A record is LLaVA's JSON format:
  {"id": ..., "image": "path" | ["path", ...] (absent for text-only),
   "conversations": [{"from": "human" | "gpt", "value": "..."}, ...]}

What is supervised follows the original preprocess functions (LLaVA train.py): the assistant replies
and their end-of-turn marker ("</s>" for vicuna_v1/llava_v1, " </s>" for mistral_instruct and
llava_llama_2, "<|im_end|>" for chatml_direct); for `plain` (pretraining), the caption and its "\\n"
after the image. Everything else is IGNORE_INDEX. Rather than the original's bookkeeping of round
lengths (which silently drops a whole example on a "tokenization mismatch"), a token is supervised
when its characters overlap a reply span of the rendered text, so what is supervised cannot drift.

Tokenization follows the original `tokenizer_image_token`: the text is cut at each `<image>`, every
piece is tokenized as a string of its own (BOS only on the first), and each `<image>` becomes
`num_image_tokens((height, width))` copies of the model's image token id.

Single-image records are normalized as the original `preprocess_multimodal` does: in each turn that
mentions it, `<image>` moves to the front, followed by a newline. Multi-image records keep their
placeholders where they are; their count must equal the number of images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llava_jax.data import conversation
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.errors import DataError, UnsupportedError

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_SUPPORTED_STYLES = ("two", "llama_2", "mpt", "plain")
# The original's preprocess_v1 / preprocess_llama_2 mask each instruction up to its separator
# ("ASSISTANT: ", "[/INST] ") minus the one token the separator's trailing space becomes when tokenized
# alone: the space before a reply is supervised, so a token that is only that space ("▁" before a
# digit, which LLaMA's tokenizer splits off) is learned too, as in the original.
_SPACE_BEFORE_REPLY_STYLES = ("two", "llama_2")


class BadRecord(DataError):
    """A record that cannot become a training example.

    `reason` is a short tag the pipeline counts by: malformed, empty_conversation, roles, no_reply,
    empty_reply, image_count, too_many_images, missing_image, corrupt_image, too_long.
    """

    def __init__(self, reason: str, message: str, record_id: Any = None):
        self.reason = reason
        self.record_id = record_id
        prefix = f"record {record_id!r}: " if record_id is not None else ""
        super().__init__(f"{prefix}{message} [{reason}]")


@dataclasses.dataclass(frozen=True)
class FixedImageTokens:
    """num_image_tokens for models with one fixed-size tile per image (LLaVA 1.0/1.5: 576)."""

    count: int

    def __call__(self, image_size_hw: tuple[int, int]) -> int:
        return self.count


def record_images(record: dict) -> list[str]:
    """The record's image paths, in order ([] for text-only)."""
    image = record.get("image")
    if image is None:
        return []
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise BadRecord("malformed", f"'image' must be a path or a list of paths, got {image!r}", record.get("id"))
    return list(images)


def record_messages(record: dict, num_images: int) -> list[dict]:
    """The record's conversation as render() messages, normalized as the original's preprocessing."""
    record_id = record.get("id")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and isinstance(t.get("value"), str) and isinstance(t.get("from"), str) for t in turns
    ):
        raise BadRecord("malformed", "'conversations' must be a list of {'from': str, 'value': str}", record_id)
    if any(t["from"].lower() not in _ROLES for t in turns):
        roles = sorted({t["from"] for t in turns})
        raise BadRecord("roles", f"unknown speakers {roles}; expected 'human' and 'gpt'", record_id)
    messages = [{"role": _ROLES[t["from"].lower()], "content": t["value"]} for t in turns]
    if messages and messages[0]["role"] != "user":
        messages = messages[1:]  # the original skips a leading assistant turn
    if not messages:
        raise BadRecord("empty_conversation", "no conversation turns", record_id)
    for i, message in enumerate(messages):
        if message["role"] != ("user", "assistant")[i % 2]:
            raise BadRecord("roles", f"turn {i} is from {message['role']}; human and gpt must alternate", record_id)
        if num_images == 1 and IMAGE_PLACEHOLDER in message["content"]:
            text = message["content"].replace(IMAGE_PLACEHOLDER, "").strip()
            message["content"] = (IMAGE_PLACEHOLDER + "\n" + text).strip()
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if not replies:
        raise BadRecord("no_reply", "no gpt turn to learn from", record_id)
    if not all(replies):
        raise BadRecord("empty_reply", "a gpt turn is empty", record_id)
    return messages


def record_spans(record: dict, template: str, num_images: int) -> list[conversation.Span]:
    """The record's training text as spans, the supervised ones marked."""
    record_id = record.get("id")
    if conversation.get_template(template).style != "plain":
        messages = record_messages(record, num_images)
        try:
            return conversation.render_spans(template, messages, add_generation_prompt=False)
        except ValueError as e:
            raise BadRecord("malformed", str(e), record_id) from None
    # preprocess_plain: exactly one human turn with the image(s), one gpt turn with the caption.
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, dict) for t in turns):
        raise BadRecord("malformed", "a plain (pretraining) record has one human and one gpt turn", record_id)
    caption = turns[1].get("value")
    if not isinstance(caption, str) or not caption:
        raise BadRecord("empty_reply", "the caption (gpt turn) is empty", record_id)
    if num_images == 0 or IMAGE_PLACEHOLDER not in str(turns[0].get("value")):
        raise BadRecord("image_count", "a plain (pretraining) record needs an image and '<image>'", record_id)
    separator = conversation.get_template(template).sep
    return [conversation.Span(IMAGE_PLACEHOLDER * num_images), conversation.Span(caption + separator, is_reply=True)]


@dataclasses.dataclass(frozen=True)
class ExampleBuilder:
    """record (+ its images' (height, width)) -> {"input_ids": int32 [T], "labels": int32 [T]}.

    `num_image_tokens((height, width))` is how many positions one image takes (the model config
    decides: 576 for LLaVA-1.5, size-dependent for anyres). `overlong` is what happens to a record
    longer than `max_length`: "truncate" keeps its head (as the original), unless that would cut an
    image or leave nothing supervised; "skip" rejects it. Both raise BadRecord("too_long").
    """

    tokenizer: Tokenizer
    template: str
    image_token_id: int
    num_image_tokens: Callable[[tuple[int, int]], int]
    max_length: int | None = None
    overlong: str = "truncate"

    def __post_init__(self):
        style = conversation.get_template(self.template).style
        if style not in _SUPPORTED_STYLES:
            raise UnsupportedError(
                f"training examples for template {self.template!r} ({style} style) are not supported; "
                "use vicuna_v1, llava_v1, mistral_instruct, llava_llama_2, chatml_direct, mpt or plain"
            )
        if self.overlong not in ("truncate", "skip"):
            raise ValueError(f"overlong must be 'truncate' or 'skip', got {self.overlong!r}")

    def __call__(self, record: dict, image_sizes: Sequence[tuple[int, int]] = ()) -> dict[str, np.ndarray]:
        if not isinstance(record, dict):
            raise BadRecord("malformed", f"a record is a JSON object, got {type(record).__name__}")
        record_id = record.get("id")
        num_images = len(record_images(record))
        if len(image_sizes) != num_images:
            raise ValueError(
                f"record {record_id!r} has {num_images} images but {len(image_sizes)} image sizes were given"
            )
        spans = record_spans(record, self.template, num_images)
        text = "".join(span.text for span in spans)
        chunks = text.split(IMAGE_PLACEHOLDER)
        if len(chunks) - 1 != num_images:
            raise BadRecord(
                "image_count", f"{len(chunks) - 1} '<image>' placeholders for {num_images} images", record_id
            )
        reply_chars = np.zeros(len(text), dtype=bool)
        start = 0
        space_joins_reply = conversation.get_template(self.template).style in _SPACE_BEFORE_REPLY_STYLES
        for span in spans:
            reply_chars[start : start + len(span.text)] = span.is_reply
            if span.is_reply and space_joins_reply and start > 0 and text[start - 1] == " ":
                reply_chars[start - 1] = True  # see _SPACE_BEFORE_REPLY_STYLES
            start += len(span.text)

        ids: list[int] = []
        supervised: list[bool] = []
        image_runs: list[tuple[int, int]] = []
        position = 0  # of the current chunk in `text`
        for k, chunk in enumerate(chunks):
            if k > 0:
                count = int(self.num_image_tokens(tuple(image_sizes[k - 1])))
                image_runs.append((len(ids), len(ids) + count))
                ids += [self.image_token_id] * count
                supervised += [False] * count
                position += len(IMAGE_PLACEHOLDER)
            chunk_ids, offsets = self.tokenizer.encode_with_offsets(chunk, add_bos=None if k == 0 else False)
            ids += chunk_ids
            supervised += [bool(reply_chars[position + s : position + e].any()) for s, e in offsets]
            position += len(chunk)
        if not any(supervised):
            raise BadRecord("no_reply", "no reply token survives tokenization", record_id)

        if self.max_length is not None and len(ids) > self.max_length:
            limit = self.max_length
            if self.overlong == "skip":
                raise BadRecord("too_long", f"{len(ids)} tokens > max_length {limit}", record_id)
            if any(end > limit for _, end in image_runs):
                raise BadRecord("too_long", f"{len(ids)} tokens: truncation to {limit} would cut an image", record_id)
            ids, supervised = ids[:limit], supervised[:limit]
            if not any(supervised):
                raise BadRecord("too_long", f"nothing supervised is left after truncation to {limit}", record_id)

        input_ids = np.asarray(ids, dtype=np.int32)
        labels = np.where(np.asarray(supervised), input_ids, IGNORE_INDEX).astype(np.int32)
        return {"input_ids": input_ids, "labels": labels}
