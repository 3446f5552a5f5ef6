"""Record indices -> one padded, static-shape batch: images loaded, examples built, rows stacked.

Batch layout (B = batch_size, T = the smallest length bucket that fits the batch's longest example,
M = B * max_images_per_example image slots, pixel shape [C, S, S], or [P, C, S, S] for anyres with P
the most tiles an image can have):
  input_ids       int32 [B, T]   right-padded with the tokenizer's pad id
  labels          int32 [B, T]   IGNORE_INDEX (-100) except supervised tokens
  attention_mask  int32 [B, T]   1 on real tokens
  pixel_values    float32 [M, C, S, S] | [M, P, C, S, S]   the batch's images in reading order
                                 (row 0's images, then row 1's, ...), zeros in unused slots/tiles
  image_mask      int32 [M]      1 for slots holding an image
  image_sizes     int32 [M, 2]   (height, width) of each original image, 0 for empty slots
  example_index   int32 [B]      the record's position in the data files, -1 for an empty row
The k-th real image's features belong to the k-th run of image_token_id in input_ids, row-major,
which is how LlavaModel splices them. Rows left empty by bad records (and the short last batch of
an epoch) are all padding: attention_mask 0, labels -100.

Packed (`packing` "first_fit" or "best_fit", llava_jax.data.packing): a step's records (batch_size x
examples_per_row of them) are packed into the batch's B rows, in the layout of `collate_packed`
(segment_ids and positions [B, T] besides; M = the records' image slots; example_index [records], -1
for none). Examples that the B rows cannot hold are left out and counted ("packing_overflow").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from grain.multiprocessing import SharedMemoryArray
from PIL import Image

from llava_jax.data.examples import IGNORE_INDEX, BadRecord, ExampleBuilder, record_images
from llava_jax.data.image import UnreadableImageError
from llava_jax.data.packing import collate_packed, pack
from llava_jax.data.records import RecordStore


def load_pixels(image_step: Callable, path: str, record_id: Any) -> tuple[np.ndarray, tuple[int, int]]:
    """`image_step(path)`, with unreadable files turned into BadRecord."""
    try:
        return image_step(path)
    except FileNotFoundError:
        raise BadRecord("missing_image", f"image {path!r} does not exist", record_id) from None
    except (UnreadableImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRecord("corrupt_image", f"image {path!r} cannot be read: {e}", record_id) from None


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record left out of a batch."""

    index: int
    record_id: Any
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class BatchMaker:
    """(step, record indices) -> (batch dict as documented in this module, [Skipped]). Runs in workers."""

    records: RecordStore
    builder: ExampleBuilder
    image_step: Callable[[str], tuple[np.ndarray, tuple[int, int]]]
    pixel_shape: tuple[int, ...]
    image_folder: str
    batch_size: int
    max_images_per_example: int
    buckets: tuple[int, ...]
    pad_id: int
    raise_bad_records: bool
    shared_memory: bool = False  # in a grain worker: build pixel_values where the main process reads it
    packing: str | None = None  # None, "first_fit" or "best_fit"
    packed_records: int = 0  # records per batch when packing (batch_size rows hold up to this many examples)

    def __call__(self, element: tuple[int, np.ndarray]) -> tuple[dict[str, np.ndarray], list[Skipped]]:
        _, indices = element
        rows, skipped = [], []
        for index in indices.tolist():
            record = self.records[index]
            try:
                rows.append((index, *self._example(record)))
            except BadRecord as bad:
                if self.raise_bad_records:
                    raise
                skipped.append(Skipped(index, bad.record_id, bad.reason, str(bad)))
        if self.packing:
            return self._collate_packed(rows, skipped)
        return self._collate(rows), skipped

    def _example(self, record: Any) -> tuple[dict[str, np.ndarray], list[np.ndarray], list[tuple[int, int]]]:
        if not isinstance(record, dict):
            raise BadRecord("malformed", f"a record must be a JSON object, got {type(record).__name__}")
        record_id = record.get("id")
        paths = record_images(record)
        if len(paths) > self.max_images_per_example:
            raise BadRecord(
                "too_many_images",
                f"{len(paths)} images > max_images_per_example {self.max_images_per_example}",
                record_id,
            )
        loaded = [load_pixels(self.image_step, os.path.join(self.image_folder, p), record_id) for p in paths]
        sizes = [size for _, size in loaded]
        return self.builder(record, sizes), [pixels for pixels, _ in loaded], sizes

    def _collate(self, rows) -> dict[str, np.ndarray]:
        longest = max((len(example["input_ids"]) for _, example, _, _ in rows), default=0)
        length = next(b for b in self.buckets if b >= longest)
        slots = self.batch_size * self.max_images_per_example
        batch = {
            "input_ids": np.full((self.batch_size, length), self.pad_id, np.int32),
            "labels": np.full((self.batch_size, length), IGNORE_INDEX, np.int32),
            "attention_mask": np.zeros((self.batch_size, length), np.int32),
            "pixel_values": self._zeros((slots, *self.pixel_shape), np.float32),
            "image_mask": np.zeros((slots,), np.int32),
            "image_sizes": np.zeros((slots, 2), np.int32),
            "example_index": np.full((self.batch_size,), -1, np.int32),
        }
        slot = 0
        for row, (index, example, pixels, sizes) in enumerate(rows):
            n = len(example["input_ids"])
            batch["input_ids"][row, :n] = example["input_ids"]
            batch["labels"][row, :n] = example["labels"]
            batch["attention_mask"][row, :n] = 1
            batch["example_index"][row] = index
            for image, size in zip(pixels, sizes):
                batch["pixel_values"][slot][tuple(slice(0, d) for d in image.shape)] = image
                batch["image_mask"][slot] = 1
                batch["image_sizes"][slot] = size
                slot += 1
        return batch

    def _collate_packed(self, rows, skipped: list[Skipped]) -> tuple[dict[str, np.ndarray], list[Skipped]]:
        longest = self.buckets[-1]
        packed = pack([len(example["input_ids"]) for _, example, _, _ in rows], longest, self.packing)
        for row in packed[self.batch_size :]:
            for i in row:
                index, _, _, _ = rows[i]
                record = self.records[index]
                record_id = record.get("id") if isinstance(record, dict) else None
                skipped.append(Skipped(index, record_id, "packing_overflow", f"record {index} did not fit the "
                                       f"{self.batch_size} packed rows of its batch"))  # fmt: skip
        packed = packed[: self.batch_size] + [[] for _ in range(self.batch_size - len(packed))]
        used = max((sum(len(rows[i][1]["input_ids"]) for i in row) for row in packed), default=0)
        slots = self.packed_records * self.max_images_per_example
        batch = collate_packed([example for _, example, _, _ in rows], [pixels for _, _, pixels, _ in rows], packed,
                               length=next(b for b in self.buckets if b >= used), pad_id=self.pad_id,
                               image_slots=slots, pixel_shape=self.pixel_shape,
                               image_sizes=[sizes for _, _, _, sizes in rows])  # fmt: skip
        if self.shared_memory:
            shared = self._zeros(batch["pixel_values"].shape, np.float32)
            shared[...] = batch["pixel_values"]
            batch["pixel_values"] = shared
        batch["example_index"] = np.full((self.packed_records,), -1, np.int32)
        kept = [rows[i][0] for row in packed for i in row]
        batch["example_index"][: len(kept)] = kept
        return batch, skipped

    def _zeros(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        if not self.shared_memory:
            return np.zeros(shape, dtype)
        # New shared memory is zero-filled; grain hands it to the main process without a copy.
        return SharedMemoryArray(shape, dtype)


def pad_to_length(batch: dict[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """The batch with its [B, T] arrays right-padded to `length` (to agree on T across hosts)."""
    extra = length - batch["input_ids"].shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a batch of length {batch['input_ids'].shape[1]} to a shorter {length}")
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0, "segment_ids": 0, "positions": 0}
    return {k: np.pad(v, ((0, 0), (0, extra)), constant_values=fill[k]) if k in fill else v for k, v in batch.items()}
