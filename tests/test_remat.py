"""Rematerialisation policies by name (llava_jax.model.layers.REMAT_POLICIES): the same gradients, less
memory kept for the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.config import TextConfig
from llava_jax.model.decoder import Decoder
from llava_jax.model.layers import REMAT_POLICIES, remat_policy

CFG = TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=16)  # fmt: skip


def compiled_grad(remat: str):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(CFG, rngs=nnx.Rngs(0), remat=remat)))
    positions = jnp.broadcast_to(jnp.arange(256), (2, 256))
    weight = jax.random.normal(jax.random.key(1), (2, 256, 64))

    def loss(state, x):
        hidden, _ = nnx.merge(graphdef, state)(x, positions, jnp.ones((2, 256), jnp.int32))
        return jnp.sum(hidden * weight)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def test_policies_give_the_same_gradients_and_keep_less():
    state = jax.jit(lambda: nnx.state(Decoder(CFG, rngs=nnx.Rngs(0))))()
    x = jax.random.normal(jax.random.key(0), (2, 256, 64))
    grads, temp = {}, {}
    for name in REMAT_POLICIES:
        compiled = compiled_grad(name).lower(state, x).compile()
        grads[name], temp[name] = compiled(state, x), compiled.memory_analysis().temp_size_in_bytes
    for name in REMAT_POLICIES:
        for got, want in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(got, want, atol=1e-5 * max(float(jnp.abs(want).max()), 1e-6), rtol=0)
    # Keeping only each layer's input < also keeping the matmul outputs < keeping everything.
    assert temp["full"] < temp["dots"] < temp["none"], temp


def test_policy_names():
    assert remat_policy(True) == (True, REMAT_POLICIES["full"])
    assert remat_policy(False) == remat_policy("none") == (False, None)
    with pytest.raises(ValueError, match="remat must be one of"):
        remat_policy("everything")
