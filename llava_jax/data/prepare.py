"""Text with `<image>` tags, and images -> model inputs, as HF's LlavaProcessor / LlavaNextProcessor give them.

Each `<image>` becomes `num_image_tokens(config, image size)` copies of `config.image_token_id`, the
count the model fills with that image's features. The text around the tags is tokenized as the code
the checkpoint was released with does it (`config.semantics`):

- "hf" (llava-hf): the whole text at once, `<image>` being an added token of the tokenizer, which is
  what the processors do after repeating `<image>` (the repeats add nothing between them).
- "original" (haotian-liu/LLaVA): as its `tokenizer_image_token`: the pieces between tags are
  encoded one by one (so each starts a new text, with the tokenizer's leading "▁"), and when the
  tokenizer adds BOS, the first piece keeps it and the first token of every later piece is dropped.
  The original then puts one -200 per image; here the image's tokens go there instead.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from llava_jax.errors import ConfigError, InputError
from llava_jax.model.anyres import num_image_tokens

IMAGE_TAG = "<image>"


class ImageCountError(InputError):
    """The text's `<image>` tags and the images given do not pair up."""


class PromptTooLong(InputError):
    """The prompt, image tokens included, is longer than the model was trained on."""


def expand_image_tokens(ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> list[int]:
    """Replaces the i-th occurrence of `image_token_id` in `ids` with `counts[i]` copies of it."""
    out, i = [], 0
    for token in ids:
        if token == image_token_id:
            out.extend([image_token_id] * counts[i])
            i += 1
        else:
            out.append(token)
    if i != len(counts):
        raise ImageCountError(f"found {i} image tokens (id {image_token_id}) for {len(counts)} images")
    return out


def hf_ids(text: str, tokenizer, image_token_id: int, counts: Sequence[int]) -> list[int]:
    """LlavaProcessor / LlavaNextProcessor: encode, then repeat each image token."""
    ids = list(tokenizer.encode(text))
    found = sum(1 for t in ids if t == image_token_id)
    if found != len(counts):
        raise ImageCountError(
            f"the tokenizer turns the text's {text.count(IMAGE_TAG)} {IMAGE_TAG} tags into {found} image tokens "
            f"(id {image_token_id}); its vocabulary must hold {IMAGE_TAG} as an added token with that id"
        )
    return expand_image_tokens(ids, image_token_id, counts)


def original_ids(text: str, tokenizer, image_token_id: int, counts: Sequence[int]) -> list[int]:
    """The original `tokenizer_image_token`, with each image's tokens where it puts -200."""
    pieces = [list(tokenizer.encode(piece)) for piece in text.split(IMAGE_TAG)]
    bos = getattr(tokenizer, "bos_id", None)
    skip = 1 if bos is not None and pieces[0][:1] == [bos] else 0
    ids = list(pieces[0])
    for count, piece in zip(counts, pieces[1:]):
        ids += [image_token_id] * count + piece[skip:]
    return ids


def prepare_inputs(text: str, images: Any = (), *, tokenizer, image_processor, config) -> dict[str, np.ndarray | None]:
    """{"input_ids": int64 [1, T], "attention_mask": int64 [1, T], "pixel_values", "image_sizes"}.

    images: a PIL image or uint8 array, or a sequence of them, one per `<image>` in order.
    pixel_values / image_sizes are the image processor's (None without images).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be one string, got {type(text).__name__}")
    if tokenizer is None:
        raise ConfigError("this Pipeline has no tokenizer (the checkpoint directory has no tokenizer files); "
                         "pass tokenizer= to Pipeline")  # fmt: skip
    if not isinstance(images, (list, tuple)):
        images = [images]
    n_tags = text.count(IMAGE_TAG)
    if n_tags != len(images):
        raise ImageCountError(
            f"the text has {n_tags} {IMAGE_TAG} tags but {len(images)} images were given; put one {IMAGE_TAG} "
            "where each image goes, in order"
        )
    pixel_values = image_sizes = None
    counts: list[int] = []
    if images:
        if image_processor is None:
            raise ConfigError("this Pipeline has no image processor; pass image_processor= to Pipeline")
        processed = image_processor(list(images))
        pixel_values, image_sizes = processed["pixel_values"], processed["image_sizes"]
        counts = [num_image_tokens(config, tuple(int(v) for v in size)) for size in image_sizes]
    encode = original_ids if config.semantics == "original" else hf_ids
    ids = encode(text, tokenizer, config.image_token_id, counts)
    limit = config.prompt_limit
    if len(ids) > limit:
        what = ("the model was trained on (tokenizer_model_max_length; the original LLaVA would cut it silently)"
                if config.model_max_length else "of the model's context (max_position_embeddings)")  # fmt: skip
        raise PromptTooLong(
            f"the prompt is {len(ids)} tokens ({sum(counts)} of them image tokens), longer than the {limit} {what}; "
            "shorten the text or pass fewer or smaller images"
        )
    input_ids = np.asarray([ids], np.int64)
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }
