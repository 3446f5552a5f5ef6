"""Next-token cross-entropy over supervised positions only.

labels follow HF's convention: aligned with input_ids, IGNORE_INDEX (-100) wherever nothing is
supervised (image positions, prompts, padding); the logits at position t predict labels[t + 1].
The sum over a micro-batch is divided by the supervised tokens of the whole global batch (every
micro-batch of the accumulation), so the update does not depend on how the batch is split; a batch
without a supervised token gives loss 0 and zero gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def target_mask(labels: jax.Array) -> jax.Array:
    """[B, T-1] bool: which shifted targets are supervised. labels: [B, T]."""
    return labels[:, 1:] != IGNORE_INDEX


def supervised_tokens(labels) -> jax.Array:
    """The number of supervised targets in labels [..., B, T] (any leading axes), as int32."""
    return jnp.sum(labels[..., 1:] != IGNORE_INDEX, dtype=jnp.int32)


def token_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-target cross-entropy [B, T-1] in float32, 0 where not supervised.

    logits: [B, T, V] (any float dtype; the log-softmax runs in float32); labels: [B, T].
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(mask, logz - picked, 0.0)


def summed_loss(logits: jax.Array, labels: jax.Array, total_tokens: jax.Array) -> jax.Array:
    """sum of token losses / max(total_tokens, 1): this micro-batch's share of the global-batch mean."""
    return jnp.sum(token_losses(logits, labels)) / jnp.maximum(total_tokens, 1).astype(jnp.float32)
