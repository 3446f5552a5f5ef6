"""One process's micro-batches -> the train step's global arrays, every process's rows and images in place.

Each process reads its own rows of the global batch (llava_jax.data.sampling) and splits them into
micro-batches (`microbatch.split`). Globally, micro-batch a then holds process 0's rows, then process 1's,
...; its image slots likewise: each process's real images first, then its empty slots. The model gives the
k-th image's features to the k-th run of image tokens, so the real images must come first:
- LLaVA-1.5 layouts: the step reorders the images on device by `image_mask` (`real_images_first`);
- anyres layouts: every process's `feature_index` is gathered (a small collective per step), moved to
  the global slots and compacted here, so each process holds the same replicated index.
The padded length T must agree across processes: `agree_length` pads every process's rows to the longest.
With one process all of this is the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import sharding as shd
from llava_jax.data.batching import pad_to_length
from llava_jax.train import hosts


def agree_length(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """The host batch with its [B, T] arrays padded to the longest T of any process."""
    length = batch["input_ids"].shape[1]
    longest = hosts.max_over_processes(length)
    return batch if longest == length else pad_to_length(batch, longest, pad_id)


def global_feature_index(gathered: np.ndarray, rows: int) -> np.ndarray:
    """anyres feature_index of the global micro-batches.

    gathered: [P, A, F] every process's index (into its own `rows` tile-feature rows, `rows` = its newline
    row, -1 = padding). Returns [A, P * F]: process p's rows offset by p * rows, the newline at P * rows,
    the valid entries first in process order (the global reading order), -1 after them.
    """
    count = gathered.shape[0]
    moved = [np.where(index == rows, count * rows, np.where(index >= 0, index + p * rows, -1))
             for p, index in enumerate(gathered)]  # fmt: skip
    index = np.concatenate(moved, axis=1).astype(np.int32)
    order = np.argsort(index < 0, axis=1, kind="stable")
    return np.take_along_axis(index, order, axis=1)


def real_images_first(pixel_values: jax.Array, image_mask: jax.Array) -> jax.Array:
    """pixel_values [N, ...] reordered so that the slots image_mask [N] marks come first, in order."""
    return jnp.take(pixel_values, jnp.argsort(image_mask == 0, stable=True), axis=0)


def to_global(micro: dict[str, np.ndarray], mesh, tokens_per_tile: int) -> dict[str, jax.Array]:
    """This process's micro-batches [A, b, ...] -> global arrays [A, b * P, ...] sharded over the batch
    axis (axis 1); feature_index [A, F] -> the replicated global index (`global_feature_index`)."""
    count = jax.process_count()
    out = {}
    for key, value in micro.items():
        if key == "feature_index":
            continue
        axes = (None, "batch") + (None,) * (value.ndim - 2)
        sharding = jax.sharding.NamedSharding(mesh, shd.logical_to_spec(axes, mesh))
        global_shape = (value.shape[0], value.shape[1] * count, *value.shape[2:])
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value), global_shape)
    if "feature_index" in micro:
        slots, tiles = micro["pixel_values"].shape[1:3]
        index = global_feature_index(hosts.gather(micro["feature_index"]), slots * tiles * tokens_per_tile)
        replicated = jax.sharding.NamedSharding(mesh, jax.P())
        out["feature_index"] = jax.make_array_from_process_local_data(replicated, index, index.shape)
    return out
