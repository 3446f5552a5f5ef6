"""The decoder's weights laid out for generation, and the forward pass that reads them.

The same function as `Decoder.__call__` + `Decoder.logits` (the generation tests hold the two to
transformers), arranged for memory-bound token-by-token decoding:

- Layers unstacked, one array per layer, run in a Python loop. Slicing a layer out of the stacked
  [L, ...] parameters inside a scan copies it on XLA:CPU, tripling the bytes moved per token.
- Kernels stored [out, in] with the activations feature-major ([D, tokens]), so every projection is
  `W @ X`: with the weights as the left operand XLA:CPU streams them at full memory bandwidth, also
  for several columns (batched decoding); `X @ W` runs at half that for more than one row.
- q/k/v and gate/up concatenated: four weight reads per layer.
- A one-column bfloat16 product takes a slow path on XLA:CPU; it gets two columns (`pad_columns`).

Each layer's KV cache is its own array, updated in place in the decode loop's carry.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llava_jax.config import TextConfig
from llava_jax.model.decoder import attention_mask
from llava_jax.model.layers import activation


class LayerCache(NamedTuple):
    """One layer's keys and values: k, v: [B * K, S, hd] (row b * K + kv_head)."""

    k: jax.Array
    v: jax.Array


def empty_caches(cfg: TextConfig, batch: int, length: int, dtype) -> tuple[LayerCache, ...]:
    shape = (batch * cfg.num_kv_heads, length, cfg.head_dim)
    return tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))


def decode_params(decoder: dict, cfg: TextConfig) -> dict:
    """Decode layout from the Decoder's parameters (`nnx.to_pure_dict(nnx.state(decoder))`).

    Returns {"embed": [V, D] (half precision as uint16 bits), "norm": [D], "head": [V, D],
    "layers": [per-layer dict]} where a
    layer has attn_norm, mlp_norm [D]; qkv [(H + 2K) hd, D]; o [D, H hd]; gate_up [2F, D];
    down [D, F] (and the matching *_bias where the config has biases): a copy of the weights.
    """
    layers = decoder["layers"]
    attn, mlp = layers["attn"], layers["mlp"]
    out_in = lambda kernel: jnp.swapaxes(kernel, 1, 2)  # [L, in, out] -> [L, out, in]

    @jax.jit
    def build(attn, mlp, input_norm, post_attn_norm, lm_head):
        stacked = {
            "attn_norm": input_norm,
            "mlp_norm": post_attn_norm,
            "qkv": jnp.concatenate([out_in(attn[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj")], axis=1),
            "o": out_in(attn["o_proj"]["kernel"]),
            "gate_up": jnp.concatenate([out_in(mlp[n]["kernel"]) for n in ("gate_proj", "up_proj")], axis=1),
            "down": out_in(mlp["down_proj"]["kernel"]),
        }
        if cfg.attention_bias:
            stacked["qkv_bias"] = jnp.concatenate([attn[n]["bias"] for n in ("q_proj", "k_proj", "v_proj")], axis=1)
            stacked["o_bias"] = attn["o_proj"]["bias"]
        if cfg.mlp_bias:
            stacked["gate_up_bias"] = jnp.concatenate([mlp[n]["bias"] for n in ("gate_proj", "up_proj")], axis=1)
            stacked["down_bias"] = mlp["down_proj"]["bias"]
        per_layer = [{k: v[i] for k, v in stacked.items()} for i in range(cfg.num_layers)]
        head = None if lm_head is None else lm_head["kernel"].T
        return per_layer, head

    lm_head = None if cfg.tie_word_embeddings else decoder["lm_head"]
    per_layer, head = build(attn, mlp, layers["input_norm"]["scale"], layers["post_attn_norm"]["scale"], lm_head)
    embed = decoder["embed"]
    head = embed if head is None else head
    if embed.dtype.itemsize == 2:
        # Gathered as bits: XLA:CPU would otherwise convert the whole table to float32 for the
        # lookup and hoist that conversion out of the decode loop.
        embed = jax.jit(lambda e: jax.lax.bitcast_convert_type(e, jnp.uint16))(embed)
    return {"embed": embed, "norm": decoder["norm"]["scale"], "head": head, "layers": per_layer}


def embed_lookup(params: dict, ids: jax.Array) -> jax.Array:
    """Embedding rows at ids [...] -> [..., D] in the embedding's dtype."""
    rows = jnp.take(params["embed"], ids, axis=0)
    if rows.dtype == jnp.uint16:
        rows = jax.lax.bitcast_convert_type(rows, params["head"].dtype)
    return rows


def project(w: jax.Array, x: jax.Array, bias: jax.Array | None = None, *, pad_columns: bool = False) -> jax.Array:
    """w: [F, D] @ x: [D, N] -> [F, N] in x's dtype, accumulated in float32."""
    n = x.shape[1]
    if pad_columns and n == 1:
        x = jnp.concatenate([x, x], axis=1)
    y = jnp.dot(w, x.astype(w.dtype), preferred_element_type=jnp.float32)[:, :n].astype(x.dtype)
    return y if bias is None else y + bias.astype(y.dtype)[:, None]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF's LLaMA RMSNorm over the feature axis of x: [D, N] (float32 statistics, cast, then scaled)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=0, keepdims=True) + eps)
    return scale.astype(x.dtype)[:, None] * y.astype(x.dtype)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x: [heads, hd, B, T] with cos, sin: [hd, B, T]."""
    half = x.shape[1] // 2
    rotated = jnp.concatenate([-x[:, half:], x[:, :half]], axis=1)
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


def rope_tables(positions: jax.Array, cfg: TextConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [hd, B, T] for positions [B, T] (float32), as `decoder.rope_tables`."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)) / cfg.rope_scaling_factor
    freqs = inv_freq[:, None, None] * positions.astype(jnp.float32)[None]
    angles = jnp.concatenate([freqs, freqs], axis=0)
    return jnp.cos(angles), jnp.sin(angles)


def attention(p: dict, h: jax.Array, cos, sin, mask, cache: LayerCache, cache_index, cfg: TextConfig, *,
              fresh: bool, pad_columns: bool) -> tuple[jax.Array, LayerCache]:  # fmt: skip
    """h: [D, B*T] -> ([D, B*T], updated cache). The T new keys/values go to slots
    [cache_index, cache_index + T); `fresh` (an empty cache) attends to the new ones only."""
    b, t = cos.shape[1:]
    nh, nk, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = project(p["qkv"], h, p.get("qkv_bias"), pad_columns=pad_columns)
    q = rope(qkv[: nh * hd].reshape(nh, hd, b, t), cos, sin)
    k = rope(qkv[nh * hd : (nh + nk) * hd].reshape(nk, hd, b, t), cos, sin)
    v = qkv[(nh + nk) * hd :].reshape(nk, hd, b, t)
    # Caches are [B*K, S, hd]: one batch axis, so that XLA reads them in place for any B.
    k_new = k.transpose(2, 0, 3, 1).reshape(b * nk, t, hd).astype(cache.k.dtype)
    v_new = v.transpose(2, 0, 3, 1).reshape(b * nk, t, hd).astype(cache.v.dtype)
    at = (0, cache_index, 0)
    cache = LayerCache(jax.lax.dynamic_update_slice(cache.k, k_new, at), jax.lax.dynamic_update_slice(cache.v, v_new, at))
    keys, values = (k_new, v_new) if fresh else (cache.k, cache.v)
    g = nh // nk
    q = q.reshape(nk, g, hd, b, t).transpose(3, 0, 1, 4, 2).reshape(b * nk, g * t, hd)
    scores = jnp.einsum("nqd,nsd->nqs", q.astype(keys.dtype), keys, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, nk, g, t, -1)
    scores = jnp.where(mask[:, None, None], scores * hd**-0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(h.dtype).reshape(b * nk, g * t, -1)  # rounded as the model
    out = jnp.einsum("nqs,nsd->nqd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    out = out.astype(h.dtype).reshape(b, nk, g, t, hd).transpose(1, 2, 4, 0, 3).reshape(nh * hd, b * t)
    return project(p["o"], out, p.get("o_bias"), pad_columns=pad_columns), cache


def mlp(p: dict, h: jax.Array, cfg: TextConfig, *, pad_columns: bool) -> jax.Array:
    """SwiGLU on h: [D, N] -> [D, N]."""
    gate_up = project(p["gate_up"], h, p.get("gate_up_bias"), pad_columns=pad_columns)
    f = cfg.intermediate_size
    return project(p["down"], activation(cfg.hidden_act)(gate_up[:f]) * gate_up[f:], p.get("down_bias"),
                   pad_columns=pad_columns)  # fmt: skip


def forward(params: dict, cfg: TextConfig, x: jax.Array, positions: jax.Array, kv_valid: jax.Array,
            caches: tuple[LayerCache, ...], cache_index, *, fresh: bool = False,
            pad_columns: bool = False) -> tuple[jax.Array, tuple[LayerCache, ...]]:  # fmt: skip
    """The decoder layers and final norm on embeddings x: [B, T, D].

    positions: [B, T] (RoPE); kv_valid: [B, S] over cache slots; the T tokens go to slots
    [cache_index, cache_index + T). Returns (final-normed hidden [D, B*T] feature-major, caches).
    """
    b, t, d = x.shape
    s = caches[0].k.shape[1]
    q_slots = cache_index + jnp.arange(t)
    k_slots = jnp.arange(t) if fresh else jnp.arange(s)
    mask = attention_mask(q_slots, k_slots, kv_valid[:, :t] if fresh else kv_valid, cfg.sliding_window)
    cos, sin = rope_tables(positions, cfg)
    x = x.reshape(b * t, d).T
    new_caches = []
    for p, cache in zip(params["layers"], caches):
        h, cache = attention(p, rms_norm(x, p["attn_norm"], cfg.rms_norm_eps), cos, sin, mask, cache, cache_index,
                             cfg, fresh=fresh, pad_columns=pad_columns)  # fmt: skip
        x = x + h
        x = x + mlp(p, rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps), cfg, pad_columns=pad_columns)
        new_caches.append(cache)
    return rms_norm(x, params["norm"], cfg.rms_norm_eps), tuple(new_caches)


def logits(params: dict, hidden: jax.Array, *, pad_columns: bool = False) -> jax.Array:
    """hidden: [D, N] -> logits [N, V] in float32."""
    n = hidden.shape[1]
    h = jnp.concatenate([hidden, hidden], axis=1) if pad_columns and n == 1 else hidden
    out = jnp.dot(params["head"], h.astype(params["head"].dtype), preferred_element_type=jnp.float32)
    # The barrier keeps XLA from folding the transpose into the product (turning it into X^T @ W^T,
    # which XLA:CPU runs ~10x slower for a few columns).
    return jax.lax.optimization_barrier(out)[:, :n].T
