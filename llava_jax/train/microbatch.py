"""A host batch of the data pipeline -> A micro-batches with a leading axis, each with its own images.

The pipeline's batch (llava_jax.data.batching) holds rows [B, T] and the batch's images in reading
order [M, ...] (M = B * max_images_per_example, real images first). Splitting the rows into A
micro-batches of b = B / A rows also splits the images: micro-batch a gets the images of its rows,
in order, zero-padded to b * max_images_per_example slots, so every micro-batch has the same shapes
and the step can scan over them. For anyres models each micro-batch also gets its `feature_index`
(computed here, on the host, as `anyres_merge` describes).
"""

from __future__ import annotations

import numpy as np

from llava_jax.model import anyres, anyres_merge


def images_per_row(batch: dict[str, np.ndarray], config) -> np.ndarray:
    """How many of the batch's images belong to each row: [B] int, from the image tokens each row holds."""
    real = np.flatnonzero(batch["image_mask"])
    tokens = [anyres.num_image_tokens(config, tuple(batch["image_sizes"][i])) for i in real]
    row_tokens = (batch["input_ids"] == config.image_token_id).sum(axis=1)
    counts = np.zeros(len(row_tokens), np.int64)
    image = 0
    for row, need in enumerate(row_tokens.tolist()):
        while need > 0:
            if image >= len(tokens) or tokens[image] > need:
                raise ValueError(f"row {row}'s image tokens do not match the batch's images")
            need -= tokens[image]
            counts[row] += 1
            image += 1
    return counts


ROW_KEYS = ("input_ids", "labels", "attention_mask", "segment_ids", "positions")  # [B, T]; the last two packed only


def split(batch: dict[str, np.ndarray], accumulation: int, config) -> dict[str, np.ndarray]:
    """{input_ids, labels, attention_mask (and segment_ids, positions for packed rows): [A, b, T];
    pixel_values: [A, s, ...]; image_mask: [A, s] (1 on the slots holding an image, which come first);
    feature_index: [A, F] for anyres} with A = accumulation, b = B / A, s = b * max_images_per_example."""
    rows = batch["input_ids"].shape[0]
    if rows % accumulation:
        raise ValueError(f"a batch of {rows} rows does not split into {accumulation} micro-batches")
    b = rows // accumulation
    slots = batch["pixel_values"].shape[0] // rows * b
    out = {k: batch[k].reshape(accumulation, b, *batch[k].shape[1:]) for k in ROW_KEYS if k in batch}
    counts = images_per_row(batch, config)
    starts = np.concatenate([[0], np.cumsum(counts)])
    pixels = np.zeros((accumulation, slots, *batch["pixel_values"].shape[1:]), batch["pixel_values"].dtype)
    sizes = np.zeros((accumulation, slots, 2), np.int32)
    image_mask = np.zeros((accumulation, slots), np.int32)
    for a in range(accumulation):
        first, last = starts[a * b], starts[(a + 1) * b]
        pixels[a, : last - first] = batch["pixel_values"][first:last]
        sizes[a, : last - first] = batch["image_sizes"][first:last]
        image_mask[a, : last - first] = 1
    out["pixel_values"] = pixels
    out["image_mask"] = image_mask
    if config.is_anyres:
        out["feature_index"] = np.stack(
            [feature_index(config, sizes[a], int(counts[a * b : (a + 1) * b].sum()), pixels.shape[2], slots)
             for a in range(accumulation)]  # fmt: skip
        )
    return out


def feature_index(config, sizes: np.ndarray, n_real: int, tiles: int, slots: int) -> np.ndarray:
    """anyres feature_index of a micro-batch whose first n_real of `slots` image slots hold images."""
    size = anyres_merge.max_image_features(config, slots, tiles)
    out = np.full(size, -1, np.int32)
    if n_real == 0:
        return out
    index = anyres_merge.feature_index(config, sizes[:n_real], tiles, n_real)
    newline = n_real * tiles * config.tokens_per_tile
    index = np.where(index == newline, slots * tiles * config.tokens_per_tile, index)
    out[: len(index)] = index
    return out
