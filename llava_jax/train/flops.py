"""Analytic FLOPs of one training step, for MFU.

Counted (2 per multiply-add) over real inputs only: the non-padding tokens of the decoder and the real
images of the vision tower (MaxText counts padded tokens; we do not). For each part (vision tower,
projector, decoder) with forward FLOPs F:
- forward: F;
- activation gradients: F wherever a gradient flows through the part. It flows through the decoder
  and the projector always (the loss is above them and the projector feeds the decoder), and through
  the vision tower only when some vision parameter trains;
- weight gradients: F x the share of the part's parameters that train.
So frozen weights cost forward + activation-gradient FLOPs but no weight-gradient FLOPs, and a frozen
vision tower under the projector costs its forward pass only. Attention scores count causal pairs
(n(n+1)/2 per sequence of n tokens) in the decoder and all pairs in the tower; norms, activations and
softmax are left out (as in MaxText and PaLM's MFU).
"""

from __future__ import annotations

import numpy as np

from llava_jax.config import LlavaConfig


def decoder_forward(cfg: LlavaConfig, lengths: np.ndarray) -> tuple[float, float]:
    """(matmul weight FLOPs, attention FLOPs) of the decoder's forward pass over sequences of `lengths`."""
    t = cfg.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    per_token = t.num_layers * (2 * t.hidden_size * q + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size)
    per_token += t.hidden_size * t.vocab_size
    tokens = float(np.sum(lengths))
    pairs = float(np.sum(lengths * (lengths + 1) / 2))
    return 2.0 * per_token * tokens, 4.0 * t.num_layers * q * pairs


def vision_forward(cfg: LlavaConfig, images: int) -> tuple[float, float]:
    """(matmul, attention) FLOPs of the tower's forward pass over `images` tiles, up to the deepest layer read."""
    v = cfg.vision
    layers = max(max(cfg.feature_layers), 1)
    n = v.num_patches + 1
    patch = 2.0 * v.num_patches * (v.patch_size**2 * v.num_channels) * v.hidden_size
    per_token = layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    return images * (patch + 2.0 * per_token * n), images * 4.0 * layers * v.hidden_size * n * n


def projector_forward(cfg: LlavaConfig, features: int) -> float:
    depth = max(int(cfg.projector_type[3]) if cfg.projector_type.startswith("mlp") else 1, 1)
    d = cfg.text.hidden_size
    return 2.0 * features * (cfg.projector_in_dim * d + (depth - 1) * d * d)


def step_flops(cfg: LlavaConfig, lengths: np.ndarray, images: int, trainable_fraction: dict[str, float]) -> float:
    """FLOPs of one step: forward + backward as the module docstring counts them.

    trainable_fraction: {"vision", "projector", "decoder"} -> the share of the part's parameters that train.
    """
    dec_w, dec_a = decoder_forward(cfg, lengths)
    vis_w, vis_a = vision_forward(cfg, images)
    proj = projector_forward(cfg, images * cfg.tokens_per_tile)
    total = 0.0
    # decoder and projector: activation gradients always flow (the loss is at the top, the projector feeds it)
    total += (dec_w + dec_a) * 2 + dec_w * trainable_fraction.get("decoder", 0.0)
    total += proj * 2 + proj * trainable_fraction.get("projector", 0.0)
    vision_trains = trainable_fraction.get("vision", 0.0) > 0
    total += (vis_w + vis_a) * (2 if vision_trains else 1) + vis_w * trainable_fraction.get("vision", 0.0)
    return total


def trainable_fractions(trainable: dict, frozen: dict) -> dict[str, float]:
    """The share of each part's parameter count that trains."""
    import jax

    def count(tree, part):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree.get(part, {})))

    out = {}
    for part in ("vision", "projector", "decoder"):
        t, f = count(trainable, part), count(frozen, part)
        out[part] = t / (t + f) if t + f else 0.0
    return out
