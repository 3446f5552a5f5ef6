"""LLaVA: image features written into the text embeddings at the image-token positions -> logits.

HF convention: the processor has already expanded each `<image>` into one `image_token_id` per
feature, so the k-th image token of the batch (row-major) receives the k-th feature row. For
LLaVA-NeXT the rows come from `anyres_merge` (base tile, unpadded grid, `image_newline`s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.config import LlavaConfig
from llava_jax.errors import InputError
from llava_jax.model import anyres, anyres_merge
from llava_jax.model.decoder import Decoder, KVCache
from llava_jax.model.layers import param
from llava_jax.model.projector import Projector
from llava_jax.model.vision import VisionTower


class ImageTokenMismatch(InputError):
    """The number of image tokens in input_ids differs from the number of image features."""


ORIGINAL_IMAGE_TOKEN_INDEX = -200  # what the original LLaVA's tokenizer_image_token puts once per image


def check_image_tokens(input_ids, image_token_id: int, num_features: int) -> None:
    """Raises ImageTokenMismatch unless input_ids holds exactly `num_features` image tokens."""
    if np.any(np.asarray(input_ids) == ORIGINAL_IMAGE_TOKEN_INDEX):
        raise ImageTokenMismatch(
            f"input_ids hold the original LLaVA's image marker {ORIGINAL_IMAGE_TOKEN_INDEX}; here every image "
            f"position is marked by image_token_id ({image_token_id}), repeated once per image feature: build "
            "the inputs with pipe.prepare(text, images)"
        )
    n_tokens = int(np.sum(np.asarray(input_ids) == image_token_id))
    if n_tokens != num_features:
        raise ImageTokenMismatch(
            f"input_ids hold {n_tokens} image tokens (id {image_token_id}) but the images give {num_features} "
            "features; expand each <image> to the model's image-token count (pipe.prepare does this) and pass "
            "one image per <image>"
        )


def scatter_image_features(embeds: jax.Array, is_image: jax.Array, features: jax.Array) -> jax.Array:
    """Writes feature rows into the image positions, in order.

    embeds: [B, T, D]; is_image: [B, T] bool; features: [M, D] with M >= the number of image
    positions (surplus rows, e.g. padding images, are ignored). Returns [B, T, D].
    """
    b, t = is_image.shape
    order = jnp.cumsum(is_image.reshape(-1)) - 1  # k-th image position -> feature row k
    rows = jnp.take(features, jnp.clip(order, 0, features.shape[0] - 1), axis=0).reshape(b, t, -1)
    return jnp.where(is_image[..., None], rows.astype(embeds.dtype), embeds)


class LlavaModel(nnx.Module):
    """Vision tower -> projector -> decoder.

    Parameter tree: vision.*, projector.linears.*, decoder.*, and image_newline for LLaVA-NeXT's
    'spatial_unpad' merge.
    """

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs, remat: str | bool = "none"):
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.vision = VisionTower(cfg.vision, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention=cfg.attention)
        self.projector = Projector(cfg.projector_type, cfg.projector_in_dim, cfg.text.hidden_size,
                                   bias=cfg.projector_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)  # fmt: skip
        self.decoder = Decoder(cfg.text, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat,
                               attention=cfg.attention)  # fmt: skip
        d = cfg.text.hidden_size
        self.image_newline = nnx.data(
            param(rngs, nnx.initializers.normal(d**-0.5), (d,), ("embed",), param_dtype)
            if cfg.has_image_newline else None
        )  # fmt: skip

    def tile_features(self, pixel_values: jax.Array) -> jax.Array:
        """Projected features of each tile. pixel_values: [N, C, H, W] -> [N, F, D_text]."""
        states = self.vision(pixel_values, self.cfg.feature_layers)
        if self.cfg.vision_feature_select_strategy == "default":
            states = [h[:, 1:] for h in states]
        return self.projector(jnp.concatenate(states, axis=-1))

    def image_features(self, pixel_values: jax.Array, image_sizes=None, feature_index=None) -> jax.Array:
        """All image features of a batch in order, one row per image token.

        LLaVA-1.5: pixel_values [N, C, H, W] -> [N * F, D_text].
        LLaVA-NeXT: pixel_values [N, P, C, H, W] (tiles zero-padded to P) with either image_sizes
        [N, 2] (height, width) as host values, giving exactly the image tokens' rows, or
        feature_index [M] from `anyres_merge.padded_feature_index` (computed on the host, so that jit
        compiles once per shape), giving [M, D_text] with arbitrary rows where the index is -1.
        """
        if not self.cfg.is_anyres:
            if pixel_values.ndim != 4:
                raise ValueError(f"pixel_values must be [N, C, H, W] for this model, got shape {pixel_values.shape}")
            features = self.tile_features(pixel_values)
            return features.reshape(-1, features.shape[-1])
        if pixel_values.ndim != 5:
            raise ValueError(
                f"pixel_values must be [N, P, C, H, W] (P tiles per image) for this LLaVA-NeXT model, got shape "
                f"{pixel_values.shape}; use the model's image processor (pipe.image_processor)"
            )
        n, p = pixel_values.shape[:2]
        if feature_index is None:
            feature_index = anyres_merge.feature_index(self.cfg, image_sizes, p, num_images=n)
        tiles = self.tile_features(pixel_values.reshape(n * p, *pixel_values.shape[2:]))
        tiles = tiles.reshape(n, p, *tiles.shape[1:])
        newline = None if self.image_newline is None else self.image_newline[...]
        return anyres_merge.gather_features(tiles, newline, jnp.asarray(feature_index))

    def num_image_features(self, pixel_values_shape: tuple[int, ...], image_sizes=None) -> int:
        """How many image tokens images of this shape (and, for NeXT, these sizes) fill; host values."""
        if not self.cfg.is_anyres:
            return pixel_values_shape[0] * self.cfg.tokens_per_tile
        n, p = pixel_values_shape[:2]
        sizes = anyres_merge.check_image_sizes(self.cfg, image_sizes, n, p)
        return sum(anyres.num_image_tokens(self.cfg, size) for size in sizes)

    def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None) -> jax.Array:
        """Token embeddings with image features written in. input_ids: [B, T] -> [B, T, D]."""
        is_image = input_ids == self.cfg.image_token_id
        embeds = self.decoder.embed_tokens(jnp.where(is_image, 0, input_ids))
        if image_features is None:
            return embeds
        return scatter_image_features(embeds, is_image, image_features)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None, attention_mask=None,
                 image_sizes=None, positions=None, feature_index=None, segment_ids=None) -> jax.Array:  # fmt: skip
        """Logits of a whole sequence (no cache): float32 [B, T, V]; the arguments as `hidden_states`'."""
        hidden = self.hidden_states(input_ids, pixel_values, attention_mask, image_sizes, positions, feature_index,
                                    segment_ids)  # fmt: skip
        return self.decoder.logits(hidden)

    def hidden_states(self, input_ids: jax.Array, pixel_values: jax.Array | None = None, attention_mask=None,
                      image_sizes=None, positions=None, feature_index=None, segment_ids=None) -> jax.Array:  # fmt: skip
        """The decoder's final-normed hidden states [B, T, D] of a whole sequence (no cache), the LM head's input.

        input_ids: [B, T] int; pixel_values: [N, C, H, W] (or the NeXT layout [N, P, C, H, W] with
        image_sizes or feature_index, see `image_features`); attention_mask: [B, T] (1 = token,
        0 = padding); positions: [B, T], default 0..T-1 as transformers uses without a cache;
        segment_ids: [B, T] for packed rows (llava_jax.data.packing): attention stays within a segment.
        """
        b, t = input_ids.shape
        features = None if pixel_values is None else self.image_features(pixel_values, image_sizes, feature_index)
        if not isinstance(input_ids, jax.core.Tracer):  # eager call: check what jit cannot
            n_features = 0 if features is None else features.shape[0]
            if feature_index is not None:
                n_features = anyres_merge.count_features(feature_index)
            check_image_tokens(input_ids, self.cfg.image_token_id, n_features)
        x = self.embed(input_ids, features)
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        hidden, _ = self.decoder(x, positions, attention_mask, segment_ids=segment_ids)
        return hidden

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        return KVCache.zeros(self.cfg.text, batch, length, dtype or jnp.dtype(self.cfg.dtype))
