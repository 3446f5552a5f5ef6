"""LLaVA-NeXT 'anyres' geometry: how an image is tiled, and how many tokens it becomes.

Pure python on ints, shared by the image processor (once per image) and the model (at trace time,
with static sizes). Image sizes are (height, width) everywhere, whatever the semantics.

Two references disagree, and a checkpoint follows the code it was released with (`semantics`):

- "hf" (transformers' LlavaNext): a pinpoint pair is (height, width); unpadding rounds the scaled
  side to 7 decimals before truncating it.
- "original" (haotian-liu/LLaVA): the same config numbers are read as (width, height), so when
  candidates tie the chosen layout is transposed: e.g. any image smaller than one tile picks the first
  of the smallest pinpoints, [336, 672], which is 1 row x 2 tiles under "hf" and 2 rows x 1 tile under
  "original". Unpadding truncates the scaled side without rounding, which differs when floating point
  lands just below an integer (e.g. 38.99999999).

`config.image_grid_pinpoints` holds the numbers as the checkpoint's config lists them; `semantics`
says how to read them.
"""

from __future__ import annotations

import math
from typing import Sequence

Size = tuple[int, int]  # (height, width)
SEMANTICS = ("hf", "original")


def _check_size(image_size_hw: Sequence[int]) -> Size:
    if len(image_size_hw) != 2:
        raise ValueError(f"an image size is (height, width), got {tuple(image_size_hw)!r}")
    height, width = (int(v) for v in image_size_hw)
    if height < 1 or width < 1:
        raise ValueError(f"image size (height, width) must be positive, got {(height, width)}")
    return height, width


def pinpoints_hw(pinpoints: Sequence[Sequence[int]], semantics: str = "hf") -> tuple[Size, ...]:
    """The candidate resolutions as (height, width), in config order, read as `semantics` reads them."""
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if not pinpoints:
        raise ValueError("image_grid_pinpoints is empty; anyres needs at least one resolution")
    pairs = []
    for pair in pinpoints:
        if len(pair) != 2 or min(pair) < 1:
            raise ValueError(f"each image_grid_pinpoints entry must be two positive ints, got {pair!r}")
        pairs.append((int(pair[0]), int(pair[1])))
    if semantics == "original":  # the original code unpacks each pair as (width, height)
        pairs = [(b, a) for a, b in pairs]
    return tuple(pairs)


def check_pinpoints(pinpoints: Sequence[Sequence[int]], tile_size: int) -> None:
    """Raises unless every pinpoint side is a multiple of the tile size (both references assume it)."""
    for pair in pinpoints:
        if any(int(side) % tile_size for side in pair):
            raise ValueError(
                f"image_grid_pinpoints entry {tuple(pair)} is not a multiple of the tile size {tile_size}; "
                f"every pinpoint side must be a multiple of the vision tower's image size"
            )


def select_best_resolution(
    image_size_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], semantics: str = "hf"
) -> Size:
    """The pinpoint (height, width) an image is resized into.

    The candidate that keeps most of the image's pixels after an aspect-preserving fit (capped at
    the original pixel count) wins; among equals, the one with least padding; the first on ties.
    """
    height, width = _check_size(image_size_hw)
    best, best_kept, best_wasted = None, 0, math.inf
    for cand_h, cand_w in pinpoints_hw(pinpoints, semantics):
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_h * cand_w - kept
        if kept > best_kept or (kept == best_kept and wasted < best_wasted):
            best, best_kept, best_wasted = (cand_h, cand_w), kept, wasted
    return best


def fit_within(image_size_hw: Sequence[int], target_hw: Sequence[int]) -> Size:
    """(height, width) of the image scaled to fit inside `target_hw`, aspect kept (ceil, capped).

    The same rule in both references (`resize_and_pad_image` / `get_patch_output_size`).
    """
    height, width = _check_size(image_size_hw)
    target_h, target_w = target_hw
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def grid_shape(
    image_size_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int, semantics: str = "hf"
) -> Size:
    """(rows, cols) of tiles the image is cut into, not counting the base tile."""
    check_pinpoints(pinpoints, tile_size)
    best_h, best_w = select_best_resolution(image_size_hw, pinpoints, semantics)
    return best_h // tile_size, best_w // tile_size


def num_tiles(
    image_size_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int, semantics: str = "hf"
) -> int:
    """Tiles one image becomes: the base (whole image resized) plus rows * cols."""
    rows, cols = grid_shape(image_size_hw, pinpoints, tile_size, semantics)
    return 1 + rows * cols


def unpad_box(
    image_size_hw: Sequence[int], feature_hw: Sequence[int], semantics: str = "hf"
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the part of a [feature_h, feature_w] feature grid that shows the image.

    The tiles' features, laid out as one grid of feature_hw = (rows * grid, cols * grid), include the
    black padding of resize-and-pad; unpadding crops it away, symmetrically along one axis. Slice the
    grid as features[top:bottom, left:right].
    """
    height, width = _check_size(image_size_hw)
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    cur_h, cur_w = feature_hw
    # transformers rounds the scaled side to 7 decimals before truncating; the original truncates it.
    if width / height > cur_w / cur_h:  # wider than the grid: padding above and below
        scaled = height * (cur_w / width)
        new_h = int(round(scaled, 7)) if semantics == "hf" else int(scaled)
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    scaled = width * (cur_h / height)
    new_w = int(round(scaled, 7)) if semantics == "hf" else int(scaled)
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def unpadded_shape(image_size_hw: Sequence[int], feature_hw: Sequence[int], semantics: str = "hf") -> Size:
    """(height, width) of the feature grid after unpadding; see `unpad_box`."""
    top, bottom, left, right = unpad_box(image_size_hw, feature_hw, semantics)
    return bottom - top, right - left


def uses_anyres(config) -> bool:
    """Whether `config` (a LlavaConfig) tiles images, checking that its two anyres fields agree."""
    anyres = config.image_aspect_ratio == "anyres"
    if anyres != (config.image_grid_pinpoints is not None):
        raise ValueError(
            f"image_aspect_ratio={config.image_aspect_ratio!r} and image_grid_pinpoints="
            f"{config.image_grid_pinpoints!r} disagree: anyres needs pinpoints, and pinpoints need "
            f"image_aspect_ratio='anyres'"
        )
    return anyres


def anyres_feature_grid(config, image_size_hw: Sequence[int]) -> Size:
    """(rows * grid, cols * grid): the spatial feature grid of an image's tiles, before unpadding."""
    rows, cols = grid_shape(image_size_hw, config.image_grid_pinpoints, config.vision.image_size, config.semantics)
    grid = config.vision.grid_size
    return rows * grid, cols * grid


def num_image_tokens(config, image_size: tuple[int, int] | None = None) -> int:
    """Image tokens one image of `image_size` (height, width) becomes in the model.

    - not anyres: `config.tokens_per_tile`, whatever the size;
    - anyres, 'spatial_unpad': the base tile's features, then the unpadded feature grid of the other
      tiles with one `image_newline` at the end of each row: grid**2 + h * (w + 1);
    - anyres, 'flat' (original code only): every tile's features, the base first;
    - anyres, 'spatial' (original code only): the same count, the tiles laid out as one grid.
    """
    if not uses_anyres(config):
        return config.tokens_per_tile
    if image_size is None:
        raise ValueError("anyres configs need the image size (height, width) to count image tokens")
    if config.patch_merge_type != "flat" and config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"patch_merge_type={config.patch_merge_type!r} needs vision_feature_select_strategy='default': neither "
            "transformers nor the original LLaVA can lay out tiles that keep the CLS feature"
        )
    if config.patch_merge_type in ("flat", "spatial"):
        tiles = num_tiles(image_size, config.image_grid_pinpoints, config.vision.image_size, config.semantics)
        return tiles * config.tokens_per_tile
    h, w = unpadded_shape(image_size, anyres_feature_grid(config, image_size), config.semantics)
    return config.vision.grid_size**2 + h * (w + 1)
