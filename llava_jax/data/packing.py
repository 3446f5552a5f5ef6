"""Packed sequences with images: several short examples in one row of up to `max_length` tokens.

Which examples share a row is decided by `pack` (first-fit: each example in the first row it fits;
best-fit: in the row it leaves the least room in), in the order given. `collate_packed` then lays
the rows out as the batch layout of llava_jax.data.batching with two more fields:

  segment_ids     int32 [B, T]   1, 2, ... for the examples of a row in order, 0 on padding
  positions       int32 [B, T]   RoPE positions, restarting at 0 for each example (0 on padding)

Each example keeps its images: pixel_values holds them in reading order (row 0's examples' images,
then row 1's, ...), so the k-th image fills the k-th run of image tokens, as LlavaModel splices them.
The model attends only within a segment (`LlavaModel(..., segment_ids=, positions=)`), so an
example's logits, and with them its loss, are those it has alone. The first token of each example
is never a target (labels IGNORE_INDEX), so that the last token of one example is not trained to
predict the first of the next; unpacked, nothing predicts it either.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llava_jax.data.examples import IGNORE_INDEX
from llava_jax.errors import DataError

METHODS = ("first_fit", "best_fit")


def pack(lengths: Sequence[int], max_length: int, method: str = "first_fit") -> list[list[int]]:
    """Rows of example indices (each row's lengths sum to at most max_length), in example order
    within a row, rows in the order they were opened."""
    if method not in METHODS:
        raise ValueError(f"packing method must be one of {METHODS}, got {method!r}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > max_length:
            raise DataError(f"example {i} has {n} tokens, more than the packed length {max_length}; "
                            "raise max_length or truncate examples to it")  # fmt: skip
        fits = [r for r, left in enumerate(room) if left >= n]
        if not fits:
            rows.append([i])
            room.append(max_length - n)
            continue
        r = fits[0] if method == "first_fit" else min(fits, key=lambda r: room[r])
        rows[r].append(i)
        room[r] -= n
    return rows


def padding_fraction(lengths: Sequence[int], batch_size: int, max_length: int, method: str | None) -> float:
    """The fraction of token slots that are padding: unpacked (method None: batches of `batch_size`
    examples in order, each padded to its longest) or packed into rows of max_length."""
    lengths = np.asarray(lengths)
    if method is None:
        slots = sum(len(chunk) * chunk.max() for chunk in np.array_split(lengths, -(-len(lengths) // batch_size)))
    else:
        slots = len(pack(lengths.tolist(), max_length, method)) * max_length
    return float(1 - lengths.sum() / slots)


def collate_packed(examples: Sequence[dict], images: Sequence[Sequence[np.ndarray]], rows: Sequence[Sequence[int]], *,
                   length: int, pad_id: int, image_slots: int, pixel_shape: tuple[int, ...],
                   image_sizes: Sequence[Sequence[tuple[int, int]]] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """The packed batch (module docstring) of `rows` (from `pack`) of `examples` ({"input_ids",
    "labels"} as ExampleBuilder gives) with `images[i]`: example i's pixel arrays, and image_sizes[i]
    their (height, width). length: T; image_slots: M."""
    b = len(rows)
    batch = {
        "input_ids": np.full((b, length), pad_id, np.int32),
        "labels": np.full((b, length), IGNORE_INDEX, np.int32),
        "attention_mask": np.zeros((b, length), np.int32),
        "segment_ids": np.zeros((b, length), np.int32),
        "positions": np.zeros((b, length), np.int32),
        "pixel_values": np.zeros((image_slots, *pixel_shape), np.float32),
        "image_mask": np.zeros((image_slots,), np.int32),
        "image_sizes": np.zeros((image_slots, 2), np.int32),
    }
    slot = 0
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row, start=1):
            ids, labels = np.asarray(examples[i]["input_ids"]), np.asarray(examples[i]["labels"])
            n = len(ids)
            if start + n > length:
                raise ValueError(f"row {r} holds {start + n} tokens, more than length {length}")
            span = slice(start, start + n)
            batch["input_ids"][r, span] = ids
            batch["labels"][r, span] = labels
            batch["labels"][r, start] = IGNORE_INDEX
            batch["attention_mask"][r, span] = 1
            batch["segment_ids"][r, span] = segment
            batch["positions"][r, span] = np.arange(n)
            start += n
            for k, image in enumerate(images[i]):
                if slot == image_slots:
                    raise ValueError(f"the packed rows hold more than image_slots={image_slots} images")
                batch["pixel_values"][slot][tuple(slice(0, d) for d in image.shape)] = image
                batch["image_mask"][slot] = 1
                if image_sizes is not None:
                    batch["image_sizes"][slot] = image_sizes[i][k]
                slot += 1
    return batch
