"""Next-token cross-entropy over supervised positions only.

labels follow HF's convention: aligned with input_ids, IGNORE_INDEX (-100) wherever nothing is
supervised (image positions, prompts, padding); the logits at position t predict labels[t + 1].
The sum over a micro-batch is divided by the supervised tokens of the whole global batch (every
micro-batch of the accumulation), so the update does not depend on how the batch is split; a batch
without a supervised token gives loss 0 and zero gradients.

`chunked_summed_loss` is the training path: the same sum without the logits of unsupervised positions
(image tokens, prompts, padding: most of a LLaVA sequence), so the LM head costs what the supervised
targets need and [B, T, V] logits never exist at once.
"""

from __future__ import annotations

import functools
from typing import Callable

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


def chunked_summed_loss(head: Callable, weights, hidden: jax.Array, labels: jax.Array, total_tokens: jax.Array,
                        chunk: int) -> jax.Array:  # fmt: skip
    """`summed_loss(head(weights, hidden), labels, total_tokens)`, computing logits only where targets are supervised.

    head(weights, h [B, C, D]) -> float32 logits [B, C, V], a pure function of the LM head's weights
    (`Decoder.head`); hidden: [B, T, D] (its input); labels: [B, T]. Each row's supervised positions are
    moved (stably) to its front and the rows cut into chunks of `chunk` positions; only the leading
    chunks that hold a supervised target of some row are computed, forward and backward (the backward
    recomputes each chunk's logits instead of storing them). So the head runs over ceil(most supervised
    targets of a row / chunk) * chunk positions per row rather than T, and at most [B, chunk, V] logits
    exist at a time. Equal to `summed_loss` up to float32 summation order.
    """
    b, t, d = hidden.shape
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    order = jnp.argsort(~supervised, axis=1, stable=True)  # [B, T-1]: supervised positions first
    hidden = jnp.take_along_axis(hidden[:, :-1], order[..., None], axis=1)
    targets = jnp.take_along_axis(targets, order, axis=1)
    chunks = -(-(t - 1) // chunk)
    pad = chunks * chunk - (t - 1)
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, chunks, chunk, d).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    targets = targets.reshape(b, chunks, chunk).swapaxes(0, 1)  # [chunks, B, chunk]
    needed = jnp.max(jnp.sum(supervised, axis=1))
    count = (needed + chunk - 1) // chunk  # the chunks holding a supervised target
    summed = _leading_chunks_loss(head, weights, hidden, targets, count)
    return summed / jnp.maximum(total_tokens, 1).astype(jnp.float32)


def _chunk_loss(head, weights, h, y):
    """Summed cross-entropy of one chunk: h [B, C, D], y [B, C] (IGNORE_INDEX where unsupervised)."""
    logits = head(weights, h)
    mask = y != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(mask, y, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, logz - picked, 0.0))


# A custom VJP because the number of chunks computed is a traced value (a while loop, which reverse-mode
# autodiff cannot run backward): the backward pass is written out as its own loop over the same chunks.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _leading_chunks_loss(head, weights, hidden, targets, count):
    """The summed loss of chunks [0, count) of hidden [N, B, C, D] with targets [N, B, C]."""
    return _leading_chunks_fwd(head, weights, hidden, targets, count)[0]


def _leading_chunks_fwd(head, weights, hidden, targets, count):
    body = lambda i, total: total + _chunk_loss(head, weights, hidden[i], targets[i])  # noqa: E731
    return jax.lax.fori_loop(0, count, body, jnp.zeros((), jnp.float32)), (weights, hidden, targets, count)


def _leading_chunks_bwd(head, residuals, d_loss):
    weights, hidden, targets, count = residuals

    def body(i, grads):
        d_weights, d_hidden = grads
        _, vjp = jax.vjp(lambda w, h: _chunk_loss(head, w, h, targets[i]), weights, hidden[i])
        dw, dh = vjp(d_loss)
        return jax.tree.map(jnp.add, d_weights, dw), d_hidden.at[i].set(dh)

    zeros = (jax.tree.map(jnp.zeros_like, weights), jnp.zeros_like(hidden))
    d_weights, d_hidden = jax.lax.fori_loop(0, count, body, zeros)
    return d_weights, d_hidden, None, None


_leading_chunks_loss.defvjp(_leading_chunks_fwd, _leading_chunks_bwd)
