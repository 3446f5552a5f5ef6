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

Batches are laid out as `batching.py` describes: input_ids, labels, attention_mask [B, T];
pixel_values [M, ...] with image_mask [M] and image_sizes [M, 2] (M = batch_size *
max_images_per_example, the batch's images in reading order); example_index [B]. With worker
processes, pixel_values arrives without a copy in shared memory (grain's SharedMemoryArray, an
ndarray subclass), released when the array is garbage collected.

With several hosts, each host picks T from its own rows; hosts must agree before building a global
array: take the maximum over processes and `pad_to_length` (buckets keep the number of shapes small).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from absl import flags

from llava_jax.data import sampling
from llava_jax.data.batching import BatchMaker, pad_to_length
from llava_jax.data.examples import ExampleBuilder, FixedImageTokens
from llava_jax.data.packing import METHODS as PACKING_METHODS
from llava_jax.data.image import ImageProcessor, load_image
from llava_jax.model import anyres
from llava_jax.data.records import RecordStore, load_records
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.errors import ConfigError

__all__ = ["DataConfig", "ImageStep", "LlavaDataset", "BatchIterator", "load_records", "pad_to_length"]

logger = logging.getLogger(__name__)

_MIN_SHARED_MEMORY_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it.

    data_path: JSON (a list of records) or JSONL files, read in order and concatenated.
    image_folder: image paths in records are relative to it.
    batch_size: rows per host (JAX process); the global batch is batch_size * process_count.
    length_buckets: the padded lengths T a batch can have; None: max_length / 8, / 4, / 2, max_length.
    num_epochs: None repeats forever. on_bad_record: "skip" (count and leave out) or "raise".
    overlong: "truncate" (keep the head, as the original) or "skip" records over max_length.
    packing: None (one example per row), "first_fit" or "best_fit": each step reads batch_size x
    examples_per_row records and packs them into batch_size rows of up to max_length tokens
    (batching.py); those that do not fit are left out and counted as "packing_overflow".
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
    packing: str | None = None
    examples_per_row: int = 4

    def __post_init__(self):
        if self.packing not in (None, *PACKING_METHODS):
            raise ConfigError(f"packing must be None, 'first_fit' or 'best_fit', got {self.packing!r}")
        if self.examples_per_row < 1:
            raise ConfigError(f"examples_per_row must be positive, got {self.examples_per_row}")
        if self.on_bad_record not in ("skip", "raise"):
            raise ConfigError(f"on_bad_record must be 'skip' or 'raise', got {self.on_bad_record!r}")
        if self.batch_size < 1 or self.max_images_per_example < 1:
            raise ConfigError("batch_size and max_images_per_example must be positive")
        buckets = self.buckets
        if buckets != tuple(sorted(set(buckets))) or buckets[-1] != self.max_length or buckets[0] < 1:
            raise ConfigError(
                f"data.length_buckets {buckets} must be increasing, positive and end at data.max_length "
                f"{self.max_length}: set length_buckets with max_length (e.g. length_buckets=({self.max_length},))"
            )

    @property
    def records_per_step(self) -> int:
        """Records each host reads per batch: batch_size, or batch_size x examples_per_row packed."""
        return self.batch_size * (self.examples_per_row if self.packing else 1)

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.data_path,) if isinstance(self.data_path, str) else tuple(self.data_path)

    @property
    def buckets(self) -> tuple[int, ...]:
        if self.length_buckets is not None:
            return tuple(self.length_buckets)
        return tuple(sorted({max(self.max_length // d, 1) for d in (8, 4, 2, 1)}))


# -- the image step: the one place images are read -------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageStep:
    """The pipeline's one image step: path -> (pixel_values, (height, width) of the original).

    pixel_values: float32 [C, S, S], or [n, C, S, S] for anyres (the base image, then the tiles),
    exactly what `ImageProcessor.process_one` gives (the checkpoint's preprocessing: CLIP resize and
    crop, LLaVA-1.5 'pad', or anyres tiling). Picklable, so grain workers can run it.
    """

    processor: ImageProcessor

    @classmethod
    def from_config(cls, config, checkpoint_dir: str | None = None) -> ImageStep:
        """From the checkpoint's preprocessor_config.json where there is one, else from the model config."""
        if checkpoint_dir and os.path.isfile(os.path.join(checkpoint_dir, "preprocessor_config.json")):
            return cls(ImageProcessor.from_pretrained(checkpoint_dir, config))
        return cls(ImageProcessor.from_config(config))

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """The largest pixel_values one image can give (anyres: the most tiles of any pinpoint)."""
        p = self.processor
        if p.output_hw is None:
            raise ValueError("the image processor's output size depends on the image (no crop, no fixed resize)")
        tile = (3, *p.output_hw)
        if p.aspect_ratio != "anyres":
            return tile
        pinpoints = anyres.pinpoints_hw(p.image_grid_pinpoints, p.semantics)
        return (1 + max((h // p.tile_size) * (w // p.tile_size) for h, w in pinpoints), *tile)

    def __call__(self, path: str) -> tuple[np.ndarray, tuple[int, int]]:
        return self.processor.process_one(load_image(path))


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
            raise ConfigError(
                f"{len(signed_lengths)} records make no batch of {config.records_per_step} x {process_count} hosts "
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
            megabatch = config.records_per_step * count
            if config.group_by_modality_length:
                order = sampling.modality_grouped_order(self._lengths, megabatch, count, rng)
            elif config.shuffle:
                order = rng.permutation(len(self._lengths))
            else:
                order = np.arange(len(self._lengths))
            self._cache = {epoch: sampling.host_batches(order, config.records_per_step, index, count,
                                                        config.drop_remainder)}  # fmt: skip
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
            if model_config.is_anyres:  # the model's own count for an image of that size
                num_image_tokens = functools.partial(anyres.num_image_tokens, model_config)
            else:
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
            tokenizer,
            config.template,
            model_config.image_token_id,
            num_image_tokens,
            config.max_length,
            config.overlong,
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
            packing=config.packing,
            packed_records=config.records_per_step,
        )

    @property
    def batches_per_epoch(self) -> int:
        return self._source.batches_per_epoch

    def as_grain(self) -> grain.IterDataset:
        """The grain pipeline: batch steps -> worker processes building batches."""
        workers = self.config.num_workers
        maker = dataclasses.replace(self._maker, shared_memory=workers > 0)
        dataset = grain.MapDataset.source(self._source).map(maker)
        dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if workers > 0:
            if not flags.FLAGS.is_parsed():
                # grain's worker machinery reads absl flags; outside an absl app, use their defaults.
                flags.FLAGS.mark_as_parsed()
            # Only pixel_values is worth shared memory; the small arrays travel pickled.
            options = grain.experimental.DatasetOptions(min_shm_size=_MIN_SHARED_MEMORY_BYTES)
            dataset = grain.experimental.WithOptionsIterDataset(dataset, options)
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=self.config.worker_buffer_size)
            )
        return dataset

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self.as_grain().__iter__())
