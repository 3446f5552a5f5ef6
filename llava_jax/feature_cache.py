"""A cache of image features keyed by image content, so a new prompt about the same image does not
run the vision tower again (multi-turn chat, several questions per image in evaluation)."""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def image_key(pixel_values: np.ndarray, image_size=None) -> str:
    """A digest of one image's preprocessed pixels (and its original size, which anyres reads)."""
    h = hashlib.blake2b(digest_size=16)
    size = None if image_size is None else tuple(int(v) for v in image_size)
    h.update(repr((pixel_values.shape, str(pixel_values.dtype), size)).encode())
    h.update(np.ascontiguousarray(pixel_values).tobytes())
    return h.hexdigest()


class ImageFeatureCache:
    """Image features per image, least recently used dropped beyond `capacity` images.

    compute(pixel_values [n, ...] float32, image_sizes [n, 2] or None) -> a list of n features [F_i, D]:
    runs the vision tower and projector once on the images that are not cached yet.
    """

    def __init__(self, compute: Callable[[np.ndarray, np.ndarray | None], jax.Array], capacity: int = 16):
        self.compute = compute
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, jax.Array] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def features(self, pixel_values, image_sizes=None) -> jax.Array:
        """All images' features in order: pixel_values [N, ...] -> [M, D] (M = the sum of F)."""
        pixel_values = np.asarray(pixel_values, np.float32)
        sizes = None if image_sizes is None else np.asarray(image_sizes).reshape(len(pixel_values), -1)
        keys = [image_key(pixel_values[i], None if sizes is None else sizes[i]) for i in range(len(pixel_values))]
        missing = [i for i, key in enumerate(keys) if key not in self._entries and key not in keys[:i]]
        computed = {}
        if missing:  # one batched run of the vision tower for every new image
            features = self.compute(pixel_values[missing], None if sizes is None else sizes[missing])
            computed = {keys[i]: f for i, f in zip(missing, features, strict=True)}
        rows = [computed[key] if key in computed else self._entries[key] for key in keys]
        for key in keys:  # most recently used last; the oldest beyond capacity dropped
            self._entries[key] = computed.get(key, self._entries.get(key))
            self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=0)
