"""The decoder's weights laid out for generation, and the forward pass that reads them.

The same function as `Decoder.__call__` + `Decoder.logits` (tests/test_generate.py holds it to the
model and to transformers), arranged for memory-bound token-by-token decoding. Each choice below
was measured on XLA:CPU (bench/decode.py), where the defaults move two to three times the bytes:

- Layers unstacked, one array per layer, run in a Python loop: slicing a layer out of stacked
  [L, ...] parameters inside a scan copies it, tripling the bytes moved per token.
- Kernels stored [out, in], q/k/v and gate/up concatenated (four weight reads per layer). A
  projection of a few rows runs as W @ X^T (`product`), the orientation XLA:CPU streams at full
  bandwidth; X @ W^T runs at half of it for 2-8 rows.
- A one-row half-precision product takes a slow path; it is given two rows (`pad_columns`).
- Each layer's KV cache is its own [B * K, S, hd] array, updated in place in the decode loop's carry
  and read in place by the attention products (other layouts made XLA copy or transpose it).
- RoPE cos/sin come from a table: computed in the graph, XLA fuses them into their consumers and
  evaluates them for every element of q and k.
- A long prompt attends block-causally (`attention`), skipping 3/8 of its scores.
- Quantized kernels (llava_jax.quant) become `quant.Int8Weight`s, int8 per output channel: decoding
  runs int8 x int8 products (`quant.int8_product`), the one fast quantized product on XLA:CPU;
  prefill dequantizes each weight once and runs the float product.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llava_jax import quant
from llava_jax.config import TextConfig
from llava_jax.model.decoder import apply_rope, attention_mask, rope_tables
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
    "rope": (cos, sin) [max positions, hd] float32, "layers": [per-layer dict]} where a
    layer has attn_norm, mlp_norm [D]; qkv [(H + 2K) hd, D]; o [D, H hd]; gate_up [2F, D];
    down [D, F] (and the matching *_bias where the config has biases): a copy of the weights.
    """
    layers = decoder["layers"]
    attn, mlp = layers["attn"], layers["mlp"]

    @jax.jit
    def build(attn, mlp, input_norm, post_attn_norm, lm_head):
        stacked = {
            "attn_norm": input_norm,
            "mlp_norm": post_attn_norm,
            "qkv": _out_in([attn[n] for n in ("q_proj", "k_proj", "v_proj")]),
            "o": _out_in([attn["o_proj"]]),
            "gate_up": _out_in([mlp[n] for n in ("gate_proj", "up_proj")]),
            "down": _out_in([mlp["down_proj"]]),
        }
        if cfg.attention_bias:
            stacked["qkv_bias"] = jnp.concatenate([attn[n]["bias"] for n in ("q_proj", "k_proj", "v_proj")], axis=1)
            stacked["o_bias"] = attn["o_proj"]["bias"]
        if cfg.mlp_bias:
            stacked["gate_up_bias"] = jnp.concatenate([mlp[n]["bias"] for n in ("gate_proj", "up_proj")], axis=1)
            stacked["down_bias"] = mlp["down_proj"]["bias"]
        per_layer = [{k: jax.tree.map(lambda a: a[i], v) for k, v in stacked.items()} for i in range(cfg.num_layers)]
        head = None if lm_head is None else jax.tree.map(lambda a: a[0], _out_in([jax.tree.map(lambda a: a[None],
                                                                                              lm_head)]))  # fmt: skip
        return per_layer, head

    lm_head = None if cfg.tie_word_embeddings else decoder["lm_head"]
    per_layer, head = build(attn, mlp, layers["input_norm"]["scale"], layers["post_attn_norm"]["scale"], lm_head)
    embed = decoder["embed"]
    head = embed if head is None else head
    if embed.dtype.itemsize == 2:
        # Gathered as bits: XLA:CPU would otherwise convert the whole table to float32 for the
        # lookup and hoist that conversion out of the decode loop.
        embed = jax.jit(lambda e: jax.lax.bitcast_convert_type(e, jnp.uint16))(embed)
    positions = jnp.arange(cfg.max_position_embeddings)[None]
    rope = jax.jit(lambda p: tuple(t[0, :, 0] for t in rope_tables(p, cfg.head_dim, cfg.rope_theta,
                                                                   cfg.rope_scaling_factor)))(positions)  # fmt: skip
    return {"embed": embed, "norm": decoder["norm"]["scale"], "head": head, "layers": per_layer, "rope": rope}


def _out_in(linears: list[dict]):
    """Stacked kernels [L, in, out] of linears that share an input -> one [L, sum(out), in] weight.
    Quantized ones (and their float partners) become a quant.Int8Weight (per-channel int8)."""
    if not any("qvalue" in p for p in linears):
        return jnp.concatenate([jnp.swapaxes(p["kernel"], 1, 2) for p in linears], axis=1)
    parts = [quant.per_channel_int8(p["qvalue"], p["scale"]) if "qvalue" in p
             else quant.per_channel_int8(*quant.quantize_array(p["kernel"], quant.QuantSpec(8), jnp.float32, xp=jnp))
             for p in linears]  # fmt: skip
    return quant.Int8Weight(jnp.concatenate([jnp.swapaxes(q, 1, 2) for q, _ in parts], axis=1),
                            jnp.concatenate([s for _, s in parts], axis=1))  # fmt: skip


def embed_lookup(params: dict, ids: jax.Array) -> jax.Array:
    """Embedding rows at ids [...] -> [..., D] in the embedding's dtype."""
    rows = jnp.take(params["embed"], ids, axis=0)
    if rows.dtype == jnp.uint16:
        rows = jax.lax.bitcast_convert_type(rows, params["norm"].dtype)
    return rows


def product(w: jax.Array, x: jax.Array, *, pad_columns: bool = False) -> jax.Array:
    """x: [N, D] @ w.T (w: [F, D]) -> [N, F] float32.

    Few rows (decoding) run as W @ X^T, the orientation in which XLA:CPU streams the weights
    fastest; the barrier keeps XLA from folding the transposes back into X @ W^T, which it runs at
    half the speed for 2-8 rows (10x slower for the LM head), and from upcasting half-precision
    weights. Many rows (prefill) run as X @ W^T, the faster orientation for large products.
    """
    n = x.shape[0]
    if isinstance(w, quant.Int8Weight):
        if n <= DECODE_ROWS:
            return quant.int8_product(w.q, w.scale, x, few_rows=DECODE_ROWS)
        # Prefill is compute-bound: the weight dequantized once beats twice the rows in int8.
        w = w.q.astype(x.dtype) * w.scale[:, None].astype(x.dtype)
        return jnp.einsum("nd,fd->nf", x, w, preferred_element_type=jnp.float32)
    x = x.astype(w.dtype)
    if n > DECODE_ROWS:
        return jnp.einsum("nd,fd->nf", x, w, preferred_element_type=jnp.float32)
    if pad_columns and n == 1:
        x = jnp.concatenate([x, x])
    y = jnp.einsum("fd,nd->fn", w, x, preferred_element_type=jnp.float32)  # not x.T: XLA would upcast w
    return jax.lax.optimization_barrier(y)[:, :n].T


def project(w: jax.Array, x: jax.Array, bias: jax.Array | None = None, *, pad_columns: bool = False) -> jax.Array:
    """A linear layer: x: [N, D] -> [N, F] in x's dtype (w: [F, D], bias: [F])."""
    y = product(w, x, pad_columns=pad_columns).astype(x.dtype)
    return y if bias is None else y + bias.astype(y.dtype)


DECODE_ROWS = 64  # up to this many rows a projection runs as W @ X^T (see `project`)


def attention(p: dict, h: jax.Array, cos, sin, mask, cache: LayerCache, cache_index, cfg: TextConfig, *,
              fresh: bool, pad_columns: bool) -> tuple[jax.Array, LayerCache]:  # fmt: skip
    """h: [B, T, D] -> ([B, T, D], updated cache). The T new keys/values go to slots
    [cache_index, cache_index + T); `fresh` (an empty cache) attends to the new ones only."""
    b, t, d = h.shape
    nh, nk, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = nh // nk
    qkv = project(p["qkv"], h.reshape(b * t, d), p.get("qkv_bias"), pad_columns=pad_columns).reshape(b, t, -1)
    q = apply_rope(qkv[..., : nh * hd].reshape(b, t, nh, hd), cos, sin)
    k = apply_rope(qkv[..., nh * hd : (nh + nk) * hd].reshape(b, t, nk, hd), cos, sin)
    v = qkv[..., (nh + nk) * hd :].reshape(b, t, nk, hd)
    # Caches are [B*K, S, hd]: a single batch axis, which XLA reads in place for any B.
    k_new = k.transpose(0, 2, 1, 3).reshape(b * nk, t, hd).astype(cache.k.dtype)
    v_new = v.transpose(0, 2, 1, 3).reshape(b * nk, t, hd).astype(cache.v.dtype)
    at = (0, cache_index, 0)
    cache = LayerCache(jax.lax.dynamic_update_slice(cache.k, k_new, at),
                       jax.lax.dynamic_update_slice(cache.v, v_new, at))  # fmt: skip
    keys, values = (k_new, v_new) if fresh else (cache.k, cache.v)
    q = q.reshape(b, t, nk, g, hd).transpose(0, 2, 3, 1, 4).reshape(b * nk, g, t, hd)
    if fresh and t >= 4 * CAUSAL_BLOCK_MIN and t % 4 == 0:
        # Causal prompt: query block i sees keys [0, (i + 1) t / 4) only, which skips 3/8 of the
        # scores and their softmax.
        c = t // 4
        out = jnp.concatenate([_attend(q[:, :, i * c : (i + 1) * c], keys[:, : (i + 1) * c], values[:, : (i + 1) * c],
                                       mask[:, i * c : (i + 1) * c, : (i + 1) * c], h.dtype)
                               for i in range(4)], axis=2)  # fmt: skip
    else:
        out = _attend(q, keys, values, mask, h.dtype)
    out = out.reshape(b, nk, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b * t, nh * hd)
    return project(p["o"], out, p.get("o_bias"), pad_columns=pad_columns).reshape(b, t, d), cache


CAUSAL_BLOCK_MIN = 32  # prompts of at least 4x this many tokens attend block by block (see attention)


def _attend(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """q: [B*K, G, T, hd]; keys, values: [B*K, S, hd]; mask: [B, T, S] -> [B*K, G, T, hd] in dtype.
    As the model: float32 scores and softmax, probabilities rounded to the compute dtype."""
    n, g, t, hd = q.shape
    b = mask.shape[0]
    scores = jnp.einsum("nqd,nsd->nqs", q.reshape(n, g * t, hd).astype(keys.dtype), keys,
                        preferred_element_type=jnp.float32).reshape(b, n // b, g, t, -1)  # fmt: skip
    scores = jnp.where(mask[:, None, None], scores * hd**-0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(n, g * t, -1)
    out = jnp.einsum("nqs,nsd->nqd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return out.astype(dtype).reshape(n, g, t, hd)


def mlp(p: dict, h: jax.Array, cfg: TextConfig, *, pad_columns: bool) -> jax.Array:
    """SwiGLU on h: [N, D] -> [N, D]."""
    gate_up = project(p["gate_up"], h, p.get("gate_up_bias"), pad_columns=pad_columns)
    f = cfg.intermediate_size
    return project(p["down"], activation(cfg.hidden_act)(gate_up[:, :f]) * gate_up[:, f:], p.get("down_bias"),
                   pad_columns=pad_columns)  # fmt: skip


def forward(params: dict, cfg: TextConfig, x: jax.Array, positions: jax.Array, kv_valid: jax.Array,
            caches: tuple[LayerCache, ...], cache_index, *, fresh: bool = False,
            pad_columns: bool = False) -> tuple[jax.Array, tuple[LayerCache, ...]]:  # fmt: skip
    """The decoder layers and final norm on embeddings x: [B, T, D].

    positions: [B, T] (RoPE); kv_valid: [B, S] over cache slots; the T tokens go to slots
    [cache_index, cache_index + T). Returns (final-normed hidden [B, T, D], caches).
    """
    b, t, d = x.shape
    s = caches[0].k.shape[1]
    q_slots = cache_index + jnp.arange(t)
    k_slots = jnp.arange(t) if fresh else jnp.arange(s)
    mask = attention_mask(q_slots, k_slots, kv_valid[:, :t] if fresh else kv_valid, cfg.sliding_window)
    # Looked up, not computed: XLA fuses cos and sin into their consumers and so would evaluate them
    # for every element of q and k of every layer (a third of the prefill's attention time).
    cos, sin = (jnp.take(table, positions, axis=0)[:, :, None] for table in params["rope"])
    new_caches = []
    for p, cache in zip(params["layers"], caches):
        h, cache = attention(p, rms_norm(x, p["attn_norm"], cfg.rms_norm_eps), cos, sin, mask, cache, cache_index,
                             cfg, fresh=fresh, pad_columns=pad_columns)  # fmt: skip
        x = x + h
        h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps).reshape(b * t, d)
        x = x + mlp(p, h, cfg, pad_columns=pad_columns).reshape(b, t, d)
        new_caches.append(cache)
    return rms_norm(x, params["norm"], cfg.rms_norm_eps), tuple(new_caches)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF's LLaMA RMSNorm over the last axis (float32 statistics, cast back, then scaled)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def logits(params: dict, hidden: jax.Array, *, pad_columns: bool = False) -> jax.Array:
    """hidden: [N, D] -> logits [N, V] in float32."""
    return product(params["head"], hidden, pad_columns=pad_columns)
