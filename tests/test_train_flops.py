"""The analytic FLOP count (MFU) against XLA's own count of the compiled forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.model.llava import LlavaModel
from llava_jax.train import flops

# One layer each: XLA counts the body of a scan (the stacked layers) once, whatever its length.
CONFIG = LlavaConfig(
    vision=VisionConfig(hidden_size=128, intermediate_size=512, num_layers=1, num_heads=4, image_size=64, patch_size=16),
    text=TextConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=1, num_heads=4, num_kv_heads=2,
                    head_dim=64, max_position_embeddings=256),
    image_token_id=2047, vision_feature_layer=-1,
)  # fmt: skip


def xla_flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def test_forward_flops_match_xla():
    graphdef, state = nnx.split(LlavaModel(CONFIG, rngs=nnx.Rngs(0)))
    b, t = 2, 64
    ids = jnp.ones((b, t), jnp.int32)
    pixels = jnp.zeros((b, 3, 64, 64), jnp.float32)
    decoder = xla_flops(lambda s, i: nnx.merge(graphdef, s).decoder.logits(
        nnx.merge(graphdef, s).decoder(nnx.merge(graphdef, s).embed(i), jnp.broadcast_to(jnp.arange(t), (b, t)),
                                       jnp.ones((b, t)))[0]), state, ids)  # fmt: skip
    weights, causal = flops.decoder_forward(CONFIG, np.full(b, t))
    # XLA multiplies the whole T x T score matrix; the analytic count keeps the causal half
    full_attention = causal * (t * t) / (t * (t + 1) / 2)
    np.testing.assert_allclose(weights + full_attention, decoder, rtol=0.05)
    vision = xla_flops(lambda s, p: nnx.merge(graphdef, s).tile_features(p), state, pixels)
    v_weights, v_attention = flops.vision_forward(CONFIG, b)
    projector = flops.projector_forward(CONFIG, b * CONFIG.tokens_per_tile)
    np.testing.assert_allclose(v_weights + v_attention + projector, vision, rtol=0.05)


def test_frozen_parts_cost_no_weight_gradients():
    lengths, images = np.asarray([100, 60]), 2
    none = flops.step_flops(CONFIG, lengths, images, {"projector": 1.0})
    all_ = flops.step_flops(CONFIG, lengths, images, {"vision": 1.0, "projector": 1.0, "decoder": 1.0})
    dec_w, dec_a = flops.decoder_forward(CONFIG, lengths)
    vis_w, vis_a = flops.vision_forward(CONFIG, images)
    # training the decoder adds its weight gradients; training the tower adds its backward pass
    np.testing.assert_allclose(all_ - none, dec_w + (vis_w + vis_a) + vis_w)
