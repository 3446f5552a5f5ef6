"""LLaVA-NeXT feature merge: which tile feature (or `image_newline`) fills each image token.

The layout of an image's tokens depends on its size, a host value, so it is computed on the host
with numpy (from the geometry in `llava_jax.model.anyres`) as an index into a table of all tile
features, and the model only gathers rows. The index has a length that depends on the batch's
shapes alone (`max_image_features`), so images of new sizes reuse the compiled program: a training
or evaluation loop with fixed-shape batches compiles once, however the images' aspect ratios vary.
(Passing image sizes as static jit arguments instead would compile once per combination of sizes.)

Table rows: the tile features of pixel_values [N, P, ...] flattened to [N * P * F, D] (image i, tile
t, feature f at row (i * P + t) * F + f), then one row for `image_newline` (index N * P * F).
Padding entries are -1; they come after all real entries and the model ignores them.

Merge types, per image, the base tile (tile 0) first in each:
- 'spatial_unpad' (transformers, and original 1.6): the base tile's features, then the other tiles
  re-assembled into one [rows * g, cols * g] grid, cropped to the image (`anyres.unpad_box`), row by
  row with `image_newline` after each row;
- 'spatial' (original only): the same grid, uncropped, without newlines;
- 'flat' (original only): every tile's features in tile order.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.model import anyres

MERGE_TYPES = ("spatial_unpad", "spatial", "flat")


def check_image_sizes(config, image_sizes, num_images: int | None, tiles_per_image: int) -> list[tuple[int, int]]:
    """image_sizes as (height, width) pairs, checked against pixel_values [N, P, ...] (N: None skips it)."""
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT (anyres) models need image_sizes [N, 2] (height, width) with pixel_values")
    if isinstance(image_sizes, jax.core.Tracer):
        raise TypeError(
            "image_sizes is a traced value; the anyres token layout is computed on the host. Under jit, pass "
            "feature_index=anyres_merge.padded_feature_index(config, image_sizes, P) (an int32 array) instead"
        )
    sizes = [tuple(int(v) for v in row) for row in np.asarray(image_sizes).reshape(-1, 2)]
    if num_images is not None and len(sizes) != num_images:
        raise ValueError(f"image_sizes lists {len(sizes)} images but pixel_values holds {num_images}")
    for i, size in enumerate(sizes):
        needed = anyres.num_tiles(size, config.image_grid_pinpoints, config.vision.image_size, config.semantics)
        if needed > tiles_per_image:
            raise ValueError(
                f"image {i} of size (height, width) {size} is cut into {needed} tiles, but pixel_values holds "
                f"{tiles_per_image} per image; process the images with the model's image processor"
            )
    return sizes


def _one_image(config, size_hw: tuple[int, int], first_row: int, newline_row: int) -> np.ndarray:
    """Table rows of one image's tokens; its tile t starts at row first_row + t * F."""
    f = config.tokens_per_tile
    n_tiles = anyres.num_tiles(size_hw, config.image_grid_pinpoints, config.vision.image_size, config.semantics)
    if config.patch_merge_type == "flat":
        return first_row + np.arange(n_tiles * f)
    if config.vision_feature_select_strategy != "default":
        raise ValueError(f"patch_merge_type={config.patch_merge_type!r} needs vision_feature_select_strategy='default'")
    g = config.vision.grid_size
    rows, cols = anyres.grid_shape(size_hw, config.image_grid_pinpoints, config.vision.image_size, config.semantics)
    top, bottom, left, right = 0, rows * g, 0, cols * g
    if config.patch_merge_type == "spatial_unpad":
        top, bottom, left, right = anyres.unpad_box(size_hw, (rows * g, cols * g), config.semantics)
    y, x = np.mgrid[top:bottom, left:right]
    tile = 1 + (y // g) * cols + x // g
    grid = first_row + tile * f + (y % g) * g + x % g  # [h, w]
    if config.patch_merge_type == "spatial_unpad":
        grid = np.concatenate([grid, np.full((grid.shape[0], 1), newline_row)], axis=1)
    return np.concatenate([first_row + np.arange(f), grid.reshape(-1)])


def feature_index(config, image_sizes, tiles_per_image: int, num_images: int | None = None) -> np.ndarray:
    """int32 [M]: the table row of each image token of the batch, M = the batch's image-token count.

    image_sizes: [N, 2] (height, width) host values; tiles_per_image, num_images: P and N of
    pixel_values [N, P, ...].
    """
    if config.patch_merge_type not in MERGE_TYPES:
        raise ValueError(f"patch_merge_type must be one of {MERGE_TYPES}, got {config.patch_merge_type!r}")
    sizes = check_image_sizes(config, image_sizes, num_images, tiles_per_image)
    f = config.tokens_per_tile
    newline_row = len(sizes) * tiles_per_image * f
    parts = [_one_image(config, size, i * tiles_per_image * f, newline_row) for i, size in enumerate(sizes)]
    return np.concatenate(parts).astype(np.int32)


def max_image_features(config, num_images: int, tiles_per_image: int) -> int:
    """An upper bound on the image tokens of N images of at most P tiles each (depends on shapes only).

    'spatial_unpad': an image's tokens are F + h * (w + 1) with h <= rows * g, w <= cols * g and
    rows * cols <= P - 1, hence at most P * F + (P - 1) * g.
    """
    f, p = config.tokens_per_tile, tiles_per_image
    per_image = p * f + (p - 1) * config.vision.grid_size if config.patch_merge_type == "spatial_unpad" else p * f
    return num_images * per_image


def padded_feature_index(config, image_sizes, tiles_per_image: int, num_images: int | None = None) -> np.ndarray:
    """`feature_index` padded with -1 to `max_image_features` entries: one compiled shape per (N, P)."""
    index = feature_index(config, image_sizes, tiles_per_image, num_images)
    n = len(check_image_sizes(config, image_sizes, num_images, tiles_per_image))
    out = np.full(max_image_features(config, n, tiles_per_image), -1, np.int32)
    out[: len(index)] = index
    return out


def gather_features(tile_features: jax.Array, image_newline: jax.Array | None, index: jax.Array) -> jax.Array:
    """The image tokens' features in order.

    tile_features: [N, P, F, D]; image_newline: [D] or None; index: [M] int (-1 = padding, which
    gives an arbitrary row). Returns [M, D].
    """
    table = tile_features.reshape(-1, tile_features.shape[-1])
    if image_newline is not None:
        table = jnp.concatenate([table, image_newline[None].astype(table.dtype)], axis=0)
    return jnp.take(table, jnp.maximum(index, 0), axis=0)


def count_features(index: Sequence[int] | np.ndarray) -> int:
    """Image tokens a (possibly padded) feature index fills."""
    return int(np.sum(np.asarray(index) >= 0))
