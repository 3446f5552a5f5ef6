"""The supervised-only LM head (train.loss.chunked_summed_loss) against every position's logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.model.decoder import linear_logits, tied_logits
from llava_jax.train.loss import IGNORE_INDEX, chunked_summed_loss, summed_loss

B, T, D, V = 3, 37, 16, 50


def inputs(seed=0, keep=0.3):
    """hidden [B, T, D], untied head weights, labels [B, T] with scattered supervised targets; row 2 has none."""
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (B, T, D))
    weights = {"kernel": jax.random.normal(k[1], (D, V)), "bias": jax.random.normal(k[2], (V,))}
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, V, (B, T)).astype(np.int32)
    labels[rng.random((B, T)) > keep] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX
    return hidden, weights, labels


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_loss_and_gradients_equal_every_position_logits(chunk):
    hidden, weights, labels = inputs()
    head = functools.partial(linear_logits, jnp.float32)
    full = jax.value_and_grad(lambda w, h: summed_loss(head(w, h), labels, 7), argnums=(0, 1))
    chunked = jax.jit(jax.value_and_grad(lambda w, h: chunked_summed_loss(head, w, h, labels, 7, chunk), argnums=(0, 1)))
    (a, grads_a), (b, grads_b) = full(weights, hidden), chunked(weights, hidden)
    np.testing.assert_allclose(float(b), float(a), rtol=1e-6)
    assert float(jnp.abs(grads_a[1]).max()) > 0
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


def test_tied_head_and_a_batch_without_targets():
    hidden, _, labels = inputs(1)
    embed = jax.random.normal(jax.random.key(5), (V, D))
    full = jax.value_and_grad(lambda e, h: summed_loss(tied_logits(e, h), labels, 5), argnums=(0, 1))(embed, hidden)
    chunked = jax.value_and_grad(lambda e, h: chunked_summed_loss(tied_logits, e, h, labels, 5, 4), argnums=(0, 1))(
        embed, hidden)  # fmt: skip
    np.testing.assert_allclose(float(chunked[0]), float(full[0]), rtol=1e-6)
    for x, y in zip(full[1], chunked[1]):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    nothing = np.full((B, T), IGNORE_INDEX, np.int32)
    loss, (d_embed, d_hidden) = jax.value_and_grad(
        lambda e, h: chunked_summed_loss(tied_logits, e, h, nothing, 0, 4), argnums=(0, 1))(embed, hidden)  # fmt: skip
    assert float(loss) == 0.0 and not np.any(np.asarray(d_embed)) and not np.any(np.asarray(d_hidden))


def test_only_chunks_with_a_supervised_target_are_computed():
    """Targets only at the end of each row (as after a LLaVA prompt): the head runs over the chunks they
    fill once moved to the front, forward and backward, not over the whole row."""
    hidden, weights, _ = inputs()
    labels = np.full((B, T), IGNORE_INDEX, np.int32)
    labels[0, -5:] = 1  # 5 targets -> 2 chunks of 4 (of ceil(36 / 4) = 9)
    labels[1, -3:] = 2
    rows = []

    def counting_head(w, h):
        jax.debug.callback(lambda n: rows.append(int(n)), h.shape[1])
        return linear_logits(jnp.float32, w, h)

    loss, grads = jax.jit(jax.value_and_grad(lambda w, h: chunked_summed_loss(counting_head, w, h, labels, 8, 4),
                                             argnums=(0, 1)))(weights, hidden)  # fmt: skip
    jax.block_until_ready(grads)
    assert rows == [4] * 4  # 2 chunks forward, 2 recomputed backward
    full = summed_loss(linear_logits(jnp.float32, weights, hidden), labels, 8)
    np.testing.assert_allclose(float(loss), float(full), rtol=1e-6)
