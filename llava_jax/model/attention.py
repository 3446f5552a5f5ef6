"""Attention kernels behind one function, `attend`, chosen by name (the config field `attention`).

- "xla": the reference. One einsum softmax over a dense [B, T, S] mask; holds float32 scores
  [B, H, T, S] per layer: fine for prompts, too much for 4096-token training of a 7B model.
- "blockwise": the same function in pure JAX on every backend (CPU included): keys are visited in
  blocks with an online softmax, so memory grows with T x block rather than T x S, and a custom VJP
  recomputes each block's probabilities in the backward pass (flash attention's recipe) instead of
  storing them. All query blocks are processed together, so causal blocks above the diagonal are
  computed and masked rather than skipped.
- "cudnn": cuDNN's fused flash attention through `jax.nn.dot_product_attention` (GPU only).
- "splash": Pallas splash attention (TPU; also runs interpreted on CPU, which the tests use).
- "auto": for self-attention (training, prefill, the vision tower) cudnn on GPU for half-precision
  inputs and splash on TPU; otherwise (float32 on GPU, CPU, decoding steps against a KV cache)
  blockwise for `BLOCKWISE_FROM` keys or more and xla below.

Masks are described compactly by `Mask` (causal over slots, keys marked valid, a sliding window,
packed-sequence segment ids) so that no kernel but the reference needs the dense [B, T, S] array.
A query that may attend to no key (a padding row) gets the uniform average of all values, as the
reference's finite mask floor gives; such rows are never read.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llava_jax.config import ATTENTION as IMPLEMENTATIONS
BLOCKWISE_FROM = 1024  # "auto" on CPU: sequences at least this long attend blockwise
BLOCK = 512  # blockwise: keys per block (and splash's block sizes)
MASKED = float(jnp.finfo(jnp.float32).min)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query may see, without building [B, T, S].

    q_slots: [T] and k_slots: [S] (int) order queries and keys in the sequence (or KV cache);
    kv_valid: [B, S] bool (the attention mask over keys) or None; q_segments: [B, T] and
    k_segments: [B, S] (int) or None: a query sees only keys of its own segment (packed samples);
    causal: a query sees keys at slots <= its own; sliding_window: and only the last this many.
    """

    q_slots: jax.Array
    k_slots: jax.Array
    kv_valid: jax.Array | None = None
    q_segments: jax.Array | None = None
    k_segments: jax.Array | None = None
    causal: bool = dataclasses.field(default=True, metadata=dict(static=True))
    sliding_window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def dense(self, start: int | jax.Array = 0, size: int | None = None) -> jax.Array:
        """[B or 1, T, size] bool over keys [start, start + size) (all keys by default)."""
        size = self.k_slots.shape[0] if size is None else size
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=-1)  # noqa: E731
        q, k = self.q_slots[:, None], take(self.k_slots)[None, :]
        mask = jnp.ones((1, q.shape[0], size), bool)
        if self.causal:
            mask &= (k <= q)[None]
        if self.sliding_window is not None:
            mask &= (k > q - self.sliding_window)[None]
        if self.kv_valid is not None:
            mask &= take(self.kv_valid).astype(bool)[:, None, :]
        if self.q_segments is not None:
            mask &= self.q_segments[:, :, None] == take(self.k_segments)[:, None, :]
        return mask


def resolve(implementation: str, q: jax.Array, k: jax.Array) -> str:
    """The implementation "auto" stands for on this backend for q: [B, T, H, hd], k: [B, S, K, hd]."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    backend, self_attention = jax.default_backend(), q.shape[1] == k.shape[1]
    if backend == "gpu" and self_attention and q.dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "tpu" and self_attention:
        return "splash"
    return "blockwise" if k.shape[1] >= BLOCKWISE_FROM else "xla"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask | None, scale: float,
           implementation: str = "xla") -> jax.Array:  # fmt: skip
    """Grouped-query attention, softmax in float32.

    q: [B, T, H, hd]; k, v: [B, S, K, hd] with H a multiple of K; mask: a `Mask` or None (every
    query sees every key). Returns [B, T, H, hd] in q's dtype.
    """
    implementation = resolve(implementation, q, k)
    if implementation == "xla":
        return reference_attention(q, k, v, None if mask is None else mask.dense(), scale)
    if implementation == "blockwise":
        if mask is None:
            s = k.shape[1]
            mask = Mask(jnp.zeros(q.shape[1], jnp.int32), jnp.zeros(s, jnp.int32), causal=False)
        return blockwise_attention(q, k, v, mask, scale)
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, mask, scale)
    from llava_jax.model.splash import splash_attention  # Pallas: imported only where used

    return splash_attention(q, k, v, mask, scale)


def reference_attention(q, k, v, mask: jax.Array | None, scale: float) -> jax.Array:
    """The "xla" path. q: [B, T, H, hd]; k, v: [B, S, K, hd]; mask: [B or 1, T, S] bool (True = may
    attend) or None. Returns [B, T, H, hd] in q's dtype."""
    b, t, h, hd = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        # A finite floor rather than -inf: a fully masked row (a padding query) gives a uniform
        # average instead of NaN; such rows are never read.
        logits = jnp.where(mask[:, None, None], logits, MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


# -- blockwise (online softmax, recomputing backward) ---------------------------------------------


def blockwise_attention(q, k, v, mask: Mask, scale: float, block: int = BLOCK) -> jax.Array:
    """The "blockwise" path; the arguments as `attend`'s (mask not None). Keys are padded to a
    multiple of `block` (the padding masked out)."""
    b, t, h, hd = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    block = min(block, s)
    pad = -s % block
    if pad:
        k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
        valid = jnp.ones((b, s), bool) if mask.kv_valid is None else mask.kv_valid.astype(bool)
        mask = dataclasses.replace(
            mask, k_slots=jnp.pad(mask.k_slots, (0, pad)), kv_valid=jnp.pad(valid, ((0, 0), (0, pad))),
            k_segments=None if mask.k_segments is None else jnp.pad(mask.k_segments, ((0, 0), (0, pad))))  # fmt: skip
    q5 = q.reshape(b, t, kv_heads, h // kv_heads, hd)
    out = _flash(q5, k, v, mask, scale, block, s)
    return out.reshape(b, t, h, hd).astype(q.dtype)


def _scores(q, k_block, mask: Mask, start, block: int, scale: float, s_real: int):
    """Masked float32 scores of one key block: [B, K, G, T, block] (q: [B, T, K, G, hd]), and the mask
    (broadcastable to them). Masked keys score the reference's finite floor, so that a row with no
    visible key averages all keys as there."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_block, preferred_element_type=jnp.float32) * scale
    allowed = mask.dense(start, block)[:, None, None]  # [B or 1, 1, 1, T, block]
    scores = jnp.where(allowed, scores, MASKED)
    if s_real % block:  # keys past the real end (added by blockwise_attention) weigh nothing, even in
        scores = jnp.where(start + jnp.arange(block) < s_real, scores, -jnp.inf)  # fully masked rows
    return scores, allowed


def _blocks(x, block):
    """[B, S, ...] -> [S / block, B, block, ...] (scan over the leading axis)."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _unblocks(x):
    """The inverse of `_blocks`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, mask, scale, block, s_real):
    return _flash_forward(q, k, v, mask, scale, block, s_real)[0]


def _flash_forward(q, k, v, mask, scale, block, s_real):
    """q: [B, T, K, G, hd]; k, v: [B, S, K, hd] with S a multiple of block. Returns (out [B, T, K, G, hd],
    (row max, row sum) [B, K, G, T] float32): the softmax statistics, kept apart because the log-sum-exp
    m + log(l) rounds to m when m is the mask floor."""
    b, t, kh, g, hd = q.shape
    starts = jnp.arange(k.shape[1] // block) * block

    def step(carry, inputs):
        m, l, acc = carry
        start, k_block, v_block = inputs
        scores, _ = _scores(q, k_block, mask, start, block, scale, s_real)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.exp(scores - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v_block.dtype), v_block, preferred_element_type=jnp.float32)
        return (m_new, l, acc * correction[..., None] + pv), None

    init = (jnp.full((b, kh, g, t), MASKED, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
            jnp.zeros((b, kh, g, t, hd), jnp.float32))  # fmt: skip
    (m, l, acc), _ = jax.lax.scan(step, init, (starts, _blocks(k, block), _blocks(v, block)))
    out = (acc / l[..., None]).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, hd]
    return out.astype(q.dtype), (m, l)


def _flash_fwd(q, k, v, mask, scale, block, s_real):
    out, stats = _flash_forward(q, k, v, mask, scale, block, s_real)
    return out, (q, k, v, mask, out, stats)


def _flash_bwd(scale, block, s_real, residuals, d_out):
    q, k, v, mask, out, (m, l) = residuals
    d_out = d_out.astype(jnp.float32)
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out, out.astype(jnp.float32))  # rowsum(dO * O)
    starts = jnp.arange(k.shape[1] // block) * block

    def step(dq, inputs):
        start, k_block, v_block = inputs
        scores, allowed = _scores(q, k_block, mask, start, block, scale, s_real)
        p = jnp.exp(scores - m[..., None]) / l[..., None]  # [B, K, G, T, block]
        dv = jnp.einsum("bkgts,btkgd->bskd", p, d_out)
        dp = jnp.einsum("btkgd,bskd->bkgts", d_out, v_block.astype(jnp.float32))
        ds = jnp.where(allowed, p * (dp - delta[..., None]) * scale, 0.0)  # masked scores are constants
        dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, k_block.astype(jnp.float32))
        dk = jnp.einsum("bkgts,btkgd->bskd", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), (starts, _blocks(k, block), _blocks(v, block)))
    zeros = jax.tree.map(lambda x: None if x is None else _zero_cotangent(x), mask)
    return dq.astype(q.dtype), _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype), zeros


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return jnp.zeros(x.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- cuDNN ----------------------------------------------------------------------------------------


def cudnn_attention(q, k, v, mask: Mask | None, scale: float) -> jax.Array:
    """The "cudnn" path (GPU): cuDNN's fused kernel. A plain causal or sliding-window mask is passed
    as such; padding and segments as a dense [B, 1, T, S] mask."""
    kwargs = dict(scale=scale, implementation="cudnn")
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, **kwargs)
    plain = mask.kv_valid is None and mask.q_segments is None and q.shape[1] == k.shape[1]
    if plain and mask.causal:
        window = None if mask.sliding_window is None else (mask.sliding_window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window, **kwargs)
    dense = jnp.broadcast_to(mask.dense(), (q.shape[0], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=dense[:, None], **kwargs)
