"""The "splash" attention path: Pallas splash attention (TPU; interpreted elsewhere, for tests).

Self-attention only (queries and keys the same T tokens, as in training and prefill): the causal or
sliding-window mask is the kernel's static block-sparse mask, so blocks above the diagonal are
skipped; padding and packed samples are segment ids. Padding tokens form their own segment (-1),
so a padding query attends padding keys rather than nothing (its row is never read). T is padded
to a multiple of 128 (the vision tower's 577 tokens become 640), the added tokens padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from llava_jax.model.attention import BLOCK, Mask


def splash_attention(q, k, v, mask: Mask | None, scale: float, *, interpret: bool | None = None) -> jax.Array:
    """q: [B, T, H, hd]; k, v: [B, T, K, hd]; mask: slots 0..T-1 for queries and keys. Returns
    [B, T, H, hd]. interpret: run the kernel interpreted (default: off TPU)."""
    b, t = q.shape[:2]
    if k.shape[1] != t:
        raise ValueError(f"splash attention is self-attention only (T == S); got T={t}, S={k.shape[1]}")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    valid = None if mask is None or mask.kv_valid is None else mask.kv_valid.astype(bool)
    pad = -t % 128
    if pad:
        valid = jnp.ones((b, t), bool) if valid is None else valid
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        out = _splash(q, k, v, mask, jnp.pad(valid, ((0, 0), (0, pad))), scale, interpret, t + pad)
        return out[:, :t]
    return _splash(q, k, v, mask, valid, scale, interpret, t)


def _splash(q, k, v, mask: Mask | None, valid, scale: float, interpret: bool, t: int) -> jax.Array:
    b, _, h, hd = q.shape
    kv_heads = k.shape[2]
    g = h // kv_heads
    if mask is None or not mask.causal:
        base = masks.FullMask((t, t))
    elif mask.sliding_window is None:
        base = masks.CausalMask((t, t))
    else:
        base = masks.LocalMask((t, t), window_size=(mask.sliding_window - 1, 0), offset=0)
    size = BLOCK if t % BLOCK == 0 else 128
    blocks = kernels.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size, block_q_dkv=size,
                                block_kv_dkv=size, block_kv_dkv_compute=size, block_q_dq=size, block_kv_dq=size)  # fmt: skip
    kernel = kernels.make_splash_mqa(masks.MultiHeadMask([base] * g), block_sizes=blocks, head_shards=1,
                                     q_seq_shards=1, interpret=interpret)  # fmt: skip
    segments = jnp.zeros((b, t), jnp.int32)
    if mask is not None and mask.q_segments is not None:
        segments = jnp.pad(mask.q_segments.astype(jnp.int32), ((0, 0), (0, t - mask.q_segments.shape[1])))
    if valid is not None:
        segments = jnp.where(valid, segments, -1)
    # [B, T, K, G, hd] -> per (batch, kv head): q [G, T, hd], k and v [T, hd]
    qg = (q * scale).reshape(b, t, kv_heads, g, hd).transpose(0, 2, 3, 1, 4)
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one(q1, k1, v1, seg):
        return kernel(q1, k1, v1, segment_ids=kernels.SegmentIds(q=seg, kv=seg))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(qg, kg, vg, segments)  # [B, K, G, T, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd).astype(q.dtype)
