"""LLaMA-family decoder (LLaMA/Vicuna, Mistral, Yi) with an optional preallocated KV cache.

Positions and slots are separate: `positions` [B, T] drive RoPE (they may skip padding), while the
causal and sliding-window masks compare slots (the index of a token in the sequence or the cache),
as transformers does.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.config import TextConfig
from llava_jax.model.attention import Mask, attend
from llava_jax.model.layers import Linear, RMSNorm, activation, param, scan_layers, stack_layers
from llava_jax.sharding import constrain


class KVCache(NamedTuple):
    """Keys and values of every layer: k, v: [L, B, S, K, hd]."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        return self.k.shape[2]


def rope_tables(positions: jax.Array, head_dim: int, theta: float, scaling_factor: float):
    """cos, sin: [B, T, 1, hd] for rotate-half RoPE at `positions` [B, T] (computed in float32)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    inv_freq = inv_freq / scaling_factor
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, H, hd] rotated in HF's rotate-half layout (first half paired with second half)."""
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention_mask(q_slots: jax.Array, k_slots: jax.Array, kv_valid: jax.Array, sliding_window: int | None) -> jax.Array:
    """[B, T, S] bool: causal over slots, keys marked valid, within the sliding window.

    q_slots: [T]; k_slots: [S]; kv_valid: [B, S] (the attention mask over keys).
    """
    return Mask(q_slots, k_slots, kv_valid, sliding_window=sliding_window).dense()


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype, attention: str = "xla"):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(bias=cfg.attention_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(d, cfg.num_heads * hd, ("embed", "heads"), **kw)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(cfg.num_heads * hd, d, ("heads", "embed"), **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.attention = attention

    def __call__(self, x, cos, sin, mask: Mask, cache: KVCache | None = None, layer=None, cache_index=None):
        """x: [B, T, D] -> [B, T, D]. With a cache, this layer's new keys and values are written at
        slots [cache_index, cache_index + T) of cache[layer] and attention reads the whole cache."""
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = constrain(q, ("batch", None, "act_heads", None))
        if cache is not None:
            at = (layer, 0, cache_index, 0, 0)
            cache = KVCache(jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at),
                            jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at))  # fmt: skip
            k, v = cache.k[layer].astype(q.dtype), cache.v[layer].astype(q.dtype)
        out = attend(q, k, v, mask, self.head_dim**-0.5, self.attention)
        return self.o_proj(out.reshape(b, t, -1)), cache


class MLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(bias=cfg.mlp_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(self.act(self.gate_proj(x)) * self.up_proj(x), ("batch", None, "act_mlp"))
        return self.down_proj(h)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype, attention: str = "xla"):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention=attention)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, mask, cache=None, layer=None, cache_index=None):
        h, cache = self.attn(self.input_norm(x), cos, sin, mask, cache, layer, cache_index)
        x = x + h
        x = x + self.mlp(self.post_attn_norm(x))
        return constrain(x, ("batch", None, None)), cache


class Decoder(nnx.Module):
    """Token embedding, stacked decoder layers (scanned), final norm and LM head.

    `attention` names the kernel (llava_jax.model.attention); `remat` the rematerialisation policy of
    the scanned layers (a name of `layers.REMAT_POLICIES`).
    """

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str | bool = "none", attention: str = "xla"):  # fmt: skip
        self.cfg, self.dtype, self.remat = cfg, dtype, remat
        self.embed = param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                           ("vocab", "embed"), param_dtype)  # fmt: skip
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype,
                                                          attention=attention), cfg.num_layers, rngs)  # fmt: skip
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.lm_head = nnx.data(None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, rngs=rngs, dtype=dtype,
            param_dtype=param_dtype))  # fmt: skip

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, T] -> [B, T, D]."""
        return jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, kv_valid: jax.Array, cache: KVCache | None = None,
                 cache_index: jax.Array | int = 0, segment_ids: jax.Array | None = None):  # fmt: skip
        """Runs the layers on embeddings and returns the final-normed hidden states and the cache.

        x: [B, T, D]; positions: [B, T] (RoPE); kv_valid: [B, S] which keys may be attended, where
        S = T without a cache and S = cache.length with one (then the T tokens go to slots
        [cache_index, cache_index + T)). segment_ids: [B, T] (no cache): packed samples, a token
        attends only to tokens of its own segment. Returns ([B, T, D], cache or None).
        """
        cfg = self.cfg
        t = x.shape[1]
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed sequences) are for whole sequences, not with a KV cache")
        q_slots = cache_index + jnp.arange(t)
        k_slots = jnp.arange(cache.length if cache is not None else t)
        mask = Mask(q_slots, k_slots, kv_valid, segment_ids, segment_ids, sliding_window=cfg.sliding_window)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor)
        x = constrain(x, ("batch", None, None))

        def body(layer, carry, index):
            h, c = carry
            return layer(h, cos, sin, mask, c, index, cache_index), None

        (x, cache), _ = scan_layers(self.layers, body, (x, cache), jnp.arange(cfg.num_layers), remat=self.remat)
        return self.norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [B, T, D] -> logits [B, T, V] in float32."""
        head = self.head()
        if head is None:  # lm_head is not a plain Linear (LoRA adapters on it)
            return constrain(self.lm_head(hidden).astype(jnp.float32), ("batch", None, "act_vocab"))
        fn, weights = head
        return fn(weights, hidden)

    def head(self):
        """The LM head as a pure function of its weights, for code that differentiates it on its own
        (train.loss.chunked_summed_loss): (fn, weights) with fn(weights, hidden [B, T, D]) -> float32
        logits [B, T, V]; weights: the embedding [V, D] when tied, else {"kernel": [D, V], "bias"?: [V]}.
        None when lm_head is not a plain Linear."""
        if self.lm_head is None:
            return tied_logits, self.embed[...]
        if type(self.lm_head) is not Linear:
            return None
        weights = {"kernel": self.lm_head.kernel[...]}
        if self.lm_head.bias is not None:
            weights["bias"] = self.lm_head.bias[...]
        return functools.partial(linear_logits, self.lm_head.dtype), weights


def tied_logits(embed: jax.Array, hidden: jax.Array) -> jax.Array:
    """Logits [B, T, V] (float32) of hidden [B, T, D] against the embedding [V, D] (tied LM head)."""
    out = jnp.dot(hidden, embed.astype(hidden.dtype).T, preferred_element_type=jnp.float32)
    return constrain(out, ("batch", None, "act_vocab"))


def linear_logits(dtype, weights: dict, hidden: jax.Array) -> jax.Array:
    """Logits [B, T, V] (float32) of hidden [B, T, D] through an untied LM head computing in `dtype`, as
    `Linear` does: weights {"kernel": [D, V], "bias"?: [V]}."""
    out = jnp.dot(hidden.astype(dtype), weights["kernel"].astype(dtype))
    if "bias" in weights:
        out = out + weights["bias"].astype(dtype)
    return constrain(out.astype(jnp.float32), ("batch", None, "act_vocab"))
