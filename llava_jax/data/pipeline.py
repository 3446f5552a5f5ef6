"""LLaVA JSON/JSONL datasets -> padded, static-shape training batches, on grain.

    dataset = LlavaDataset(DataConfig(data_path="llava_v1_5_mix665k.json", image_folder="data/"),
                           tokenizer=load_tokenizer(ckpt), model_config=config)
    it = iter(dataset)            # a grain DatasetIterator: it.get_state() / it.set_state(state)
    batch = next(it)

Each host (JAX process) reads its own rows of every global batch (`sampling.py`); grain worker
processes load images and build whole batches; a record that cannot be used (missing or corrupt
image, empty conversation, too long, ...) is left out and counted in `it.stats` (or raised, with
`on_bad_record="raise"`), so a long run neither dies on one bad record nor drops a good one. Every
good record is seen exactly once per epoch.

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

With several hosts, each host picks T from its own rows; hosts must agree before building a global
array: take the maximum over processes and `pad_to_length` (buckets keep the number of shapes small).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from grain.multiprocessing import SharedMemoryArray
from PIL import Image

from llava_jax.data import sampling
from llava_jax.data.examples import IGNORE_INDEX, BadRecord, ExampleBuilder, FixedImageTokens, record_images
from llava_jax.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it.

    data_path: JSON (a list of records) or JSONL files, read in order and concatenated.
    image_folder: image paths in records are relative to it.
    batch_size: rows per host (JAX process); the global batch is batch_size * process_count.
    length_buckets: the padded lengths T a batch can have; None: max_length / 8, / 4, / 2, max_length.
    num_epochs: None repeats forever. on_bad_record: "skip" (count and leave out) or "raise".
    overlong: "truncate" (keep the head, as the original) or "skip" records over max_length.
    """

    data_path: str | tuple[str, ...]
    image_folder: str = ""
    template: str = "vicuna_v1"
    batch_size: int = 16
    max_length: int = 2048
    length_buckets: tuple[int, ...] | None = None
    max_images_per_example: int = 1
    group_by_modality_length: bool = True
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    drop_remainder: bool = False
    num_workers: int = 2
    worker_buffer_size: int = 2
    on_bad_record: str = "skip"
    overlong: str = "truncate"

    def __post_init__(self):
        if self.on_bad_record not in ("skip", "raise"):
            raise ValueError(f"on_bad_record must be 'skip' or 'raise', got {self.on_bad_record!r}")
        if self.batch_size < 1 or self.max_images_per_example < 1:
            raise ValueError("batch_size and max_images_per_example must be positive")
        buckets = self.buckets
        if buckets != tuple(sorted(set(buckets))) or buckets[-1] != self.max_length or buckets[0] < 1:
            raise ValueError(f"length_buckets {buckets} must be increasing, positive and end at max_length {self.max_length}")

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.data_path,) if isinstance(self.data_path, str) else tuple(self.data_path)

    @property
    def buckets(self) -> tuple[int, ...]:
        if self.length_buckets is not None:
            return tuple(self.length_buckets)
        return tuple(sorted({max(self.max_length // d, 1) for d in (8, 4, 2, 1)}))


# -- records -------------------------------------------------------------------------------------


def load_records(paths: Sequence[str]) -> list[Any]:
    """Records of LLaVA JSON (one list) and JSONL (one record a line) files, concatenated."""
    records: list[Any] = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                records += [json.loads(line) for line in f if line.strip()]
                continue
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records (or use .jsonl), got {type(data).__name__}")
        records += data
    return records


class RecordStore:
    """Records kept as one bytes blob of JSON, cheap to hold and to pickle into worker processes."""

    def __init__(self, records: Sequence[Any]):
        encoded = [json.dumps(r, ensure_ascii=False).encode() for r in records]
        self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self._blob = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Any:
        return json.loads(self._blob[self._offsets[index] : self._offsets[index + 1]])


# -- the image step ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageStep:
    """The pipeline's one image step: path -> (pixel_values, (height, width) of the original).

    pixel_values: float32 [C, S, S], or [n, C, S, S] for anyres (the base image, then the tiles).
    Stand-in until llava_jax.data.image lands: CLIP preprocessing with Pillow and numpy (optional
    pad-to-square with the mean colour, shortest side to S bicubic, centre crop, normalize) and an
    anyres tiling on the best-fitting (height, width) pinpoint.
    """

    size: int = 336
    pad_to_square: bool = False
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_config(cls, config) -> "ImageStep":
        return cls(
            size=config.vision.image_size,
            pad_to_square=config.image_aspect_ratio == "pad",
            grid_pinpoints=config.image_grid_pinpoints if config.is_anyres else None,
        )

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        tile = (3, self.size, self.size)
        if self.grid_pinpoints is None:
            return tile
        most_tiles = max((h // self.size) * (w // self.size) for h, w in self.grid_pinpoints)
        return (1 + most_tiles, *tile)

    def __call__(self, path: str) -> tuple[np.ndarray, tuple[int, int]]:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        size_hw = (image.height, image.width)
        if self.grid_pinpoints is not None:
            return np.stack([self._clip(tile) for tile in self._anyres_tiles(image)]), size_hw
        if self.pad_to_square:
            image = self._pad(image, max(image.size), max(image.size))
        return self._clip(image), size_hw

    def _pad(self, image: Image.Image, width: int, height: int) -> Image.Image:
        canvas = Image.new("RGB", (width, height), tuple(int(m * 255) for m in self.mean))
        canvas.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
        return canvas

    def _clip(self, image: Image.Image) -> np.ndarray:
        """[3, S, S]: shortest side to S (bicubic), centre crop, rescale and normalize."""
        scale = self.size / min(image.size)
        width, height = max(round(image.width * scale), self.size), max(round(image.height * scale), self.size)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - self.size) // 2, (height - self.size) // 2
        pixels = np.asarray(image.crop((left, top, left + self.size, top + self.size)), dtype=np.float32)
        pixels = (pixels * (1 / 255) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return pixels.transpose(2, 0, 1)

    def _anyres_tiles(self, image: Image.Image) -> list[Image.Image]:
        def score(hw):  # (effective resolution, -wasted pixels), as select_best_resolution
            scale = min(hw[1] / image.width, hw[0] / image.height)
            effective = min(int(image.width * scale) * int(image.height * scale), image.width * image.height)
            return effective, -(hw[0] * hw[1] - effective)

        height, width = max(self.grid_pinpoints, key=score)
        scale = min(width / image.width, height / image.height)
        resized = image.resize((max(int(image.width * scale), 1), max(int(image.height * scale), 1)), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (width, height), (0, 0, 0))
        canvas.paste(resized, ((width - resized.width) // 2, (height - resized.height) // 2))
        tiles = [
            canvas.crop((x, y, x + self.size, y + self.size))
            for y in range(0, height, self.size)
            for x in range(0, width, self.size)
        ]
        return [image.resize((self.size, self.size), Image.Resampling.BICUBIC), *tiles]


def load_pixels(image_step: Callable, path: str, record_id: Any) -> tuple[np.ndarray, tuple[int, int]]:
    """`image_step(path)`, with unreadable files turned into BadRecord."""
    try:
        return image_step(path)
    except FileNotFoundError:
        raise BadRecord("missing_image", f"image {path!r} does not exist", record_id) from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's ways of saying "broken file"
        raise BadRecord("corrupt_image", f"image {path!r} cannot be read: {e}", record_id) from None


# -- batches -------------------------------------------------------------------------------------


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
        return self._collate(rows), skipped

    def _example(self, record: Any) -> tuple[dict[str, np.ndarray], list[np.ndarray], list[tuple[int, int]]]:
        if not isinstance(record, dict):
            raise BadRecord("malformed", f"a record must be a JSON object, got {type(record).__name__}")
        record_id = record.get("id")
        paths = record_images(record)
        if len(paths) > self.max_images_per_example:
            raise BadRecord(
                "too_many_images", f"{len(paths)} images > max_images_per_example {self.max_images_per_example}", record_id
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
            "pixel_values": np.zeros((slots, *self.pixel_shape), np.float32),
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


def pad_to_length(batch: dict[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """The batch with its [B, T] arrays right-padded to `length` (to agree on T across hosts)."""
    extra = length - batch["input_ids"].shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a batch of length {batch['input_ids'].shape[1]} to a shorter {length}")
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {k: np.pad(v, ((0, 0), (0, extra)), constant_values=fill[k]) if k in fill else v for k, v in batch.items()}


# -- the dataset ---------------------------------------------------------------------------------


class HostBatches:
    """grain source: step -> (step, this host's record indices for that step), epoch after epoch."""

    def __init__(self, signed_lengths: np.ndarray, config: DataConfig, process_index: int, process_count: int):
        self._lengths = signed_lengths
        self._config = config
        self._process = (process_index, process_count)
        self._cache: dict[int, list[np.ndarray]] = {}
        self.batches_per_epoch = len(self._epoch(0))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(signed_lengths)} records make no batch of {config.batch_size} x {process_count} hosts "
                "with drop_remainder=True"
            )

    def __len__(self) -> int:
        epochs = self._config.num_epochs
        return self.batches_per_epoch * epochs if epochs is not None else sys.maxsize

    def __getitem__(self, step: int) -> tuple[int, np.ndarray]:
        epoch, position = divmod(step, self.batches_per_epoch)
        return step, self._epoch(epoch)[position]

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._cache:
            config, (index, count) = self._config, self._process
            rng = sampling.epoch_rng(config.seed, epoch)
            megabatch = config.batch_size * count
            if config.group_by_modality_length:
                order = sampling.modality_grouped_order(self._lengths, megabatch, count, rng)
            elif config.shuffle:
                order = rng.permutation(len(self._lengths))
            else:
                order = np.arange(len(self._lengths))
            self._cache = {epoch: sampling.host_batches(order, config.batch_size, index, count, config.drop_remainder)}
        return self._cache[epoch]

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}


class BatchIterator(grain.DatasetIterator):
    """Batches of the dataset; counts the records left out. Checkpointable: get_state / set_state
    (JSON-serializable, so grain's orbax CheckpointHandler can save it)."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.skipped: collections.Counter[str] = collections.Counter()
        self.examples = 0
        self.batches = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch, skipped = next(self._parent)
        # Worker batches arrive in shared memory, freed when collected; hand out ordinary arrays.
        batch = {k: np.array(v) if isinstance(v, SharedMemoryArray) else v for k, v in batch.items()}
        for item in skipped:
            self.skipped[item.reason] += 1
            logger.warning("skipping record %d (id %r): %s", item.index, item.record_id, item.message)
        self.examples += int((batch["example_index"] >= 0).sum())
        self.batches += 1
        return batch

    @property
    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "examples": self.examples, "skipped": dict(self.skipped)}

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), **self.stats}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.batches, self.examples = state["batches"], state["examples"]
        self.skipped = collections.Counter(state["skipped"])


class LlavaDataset:
    """The training data of one host: iterate it for batches (see the module docstring for the layout).

    Model-specific parts come from the caller: `model_config` (a LlavaConfig) gives the image token
    id and, by default, the image step and the number of tokens per image; `num_image_tokens` must be
    given for anyres models until the anyres token count lands. `process_index`/`process_count`
    default to JAX's.
    """

    def __init__(
        self,
        config: DataConfig,
        *,
        tokenizer: Tokenizer,
        model_config,
        image_step: Callable[[str], tuple[np.ndarray, tuple[int, int]]] | None = None,
        pixel_shape: tuple[int, ...] | None = None,
        num_image_tokens: Callable[[tuple[int, int]], int] | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if image_step is None:
            image_step = ImageStep.from_config(model_config)
        if pixel_shape is None:
            if not hasattr(image_step, "pixel_shape"):
                raise ValueError("pass pixel_shape for an image_step without a pixel_shape attribute")
            pixel_shape = tuple(image_step.pixel_shape)
        if num_image_tokens is None:
            if model_config.is_anyres:
                raise ValueError("anyres models need num_image_tokens=(height, width) -> count")
            num_image_tokens = FixedImageTokens(model_config.tokens_per_tile)
        if tokenizer.pad_id is None:
            raise ValueError("the tokenizer declares neither a pad nor an unk token to pad batches with")
        self.config = config
        records = load_records(config.paths)
        self.num_records = len(records)
        self._source = HostBatches(
            np.asarray([sampling.modality_length(r) for r in records], np.int64), config, process_index, process_count
        )
        builder = ExampleBuilder(
            tokenizer, config.template, model_config.image_token_id, num_image_tokens, config.max_length, config.overlong
        )
        self._maker = BatchMaker(
            records=RecordStore(records),
            builder=builder,
            image_step=image_step,
            pixel_shape=pixel_shape,
            image_folder=config.image_folder,
            batch_size=config.batch_size,
            max_images_per_example=config.max_images_per_example,
            buckets=config.buckets,
            pad_id=tokenizer.pad_id,
            raise_bad_records=config.on_bad_record == "raise",
        )

    @property
    def batches_per_epoch(self) -> int:
        return self._source.batches_per_epoch

    def as_grain(self) -> grain.IterDataset:
        """The grain pipeline: batch steps -> worker processes building batches."""
        dataset = grain.MapDataset.source(self._source).map(self._maker)
        dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.config.num_workers > 0:
            if not flags.FLAGS.is_parsed():
                # grain's worker machinery reads absl flags; outside an absl app, use their defaults.
                flags.FLAGS.mark_as_parsed()
            options = grain.MultiprocessingOptions(
                num_workers=self.config.num_workers, per_worker_buffer_size=self.config.worker_buffer_size
            )
            dataset = dataset.mp_prefetch(options)
        return dataset

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self.as_grain().__iter__())
