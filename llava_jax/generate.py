"""Generation: prefill prompts into a preallocated KV cache, then decode inside one jit.

Batch layout: prompts are left-padded to a bucketed length T, so every row's last prompt token
sits at slot T - 1 and one cache index serves the whole batch. Generated token k (k = 0 comes from
the prefill) is fed back at slot T + k. RoPE positions count real tokens only (transformers'
`attention_mask.cumsum(-1) - 1`), so the padding does not change any result. The cache holds
S = T + N slots, N >= max_new_tokens bucketed too: prompts and budgets of new lengths reuse the
compiled programs of their bucket.

The decode loop is a `lax.while_loop` over tokens that ends when every row is done or a step
limit is reached; `Generator.stream` runs it in chunks (one token for streaming) and checks stop
strings on the host between chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.data.prepare import PromptTooLong
from llava_jax.errors import ConfigError, InputError
from llava_jax.model import decode_layout
from llava_jax.model.decode_layout import LayerCache
from llava_jax.model.decoder import KVCache
from llava_jax.samplers import Greedy, Sampling

Sampler = Greedy | Sampling


class DecodeState(NamedTuple):
    """Everything the decode loop carries. B rows, S cache slots, N slots for new tokens."""

    caches: tuple[LayerCache, ...] | KVCache  # "copy": per layer [B * K, S, hd]; "scanned": [L, B, S, K, hd]
    tokens: jax.Array  # [B, N] int32 generated ids; pad_id after a row is done
    kv_valid: jax.Array  # [B, S] bool: the prompt's attention mask, then True for generated slots
    prompt_tokens: jax.Array  # [B] int32 real (unpadded) prompt length: the RoPE position of token 0
    step: jax.Array  # [] int32 how many entries of `tokens` are filled
    done: jax.Array  # [B] bool: emitted an end-of-sequence id (or stopped by the host)
    rng: jax.Array  # PRNG key; the draw for token k uses fold_in(rng, k)


def bucket(n: int, minimum: int = 16) -> int:
    """Rounds n up to one of four sizes per octave (16, 20, 24, 28, 32, 40, ..., 256, 320, 384, ...):
    few distinct shapes to compile, at most 25% padding."""
    n = max(int(n), minimum)
    step = max(1, 1 << max(0, n.bit_length() - 3))
    return -(-n // step) * step


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token rows -> (input_ids [B, length] int32, attention_mask [B, length] int32), left-padded."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row):] = row
            mask[i, length - len(row):] = 1
    return ids, mask


def prompt_rows(input_ids, attention_mask=None) -> list[np.ndarray]:
    """Each prompt's real tokens: input_ids [B, T] (or [T], or a list of ragged lists), with the
    attention mask's zeros (left or right padding) dropped."""
    if isinstance(input_ids, (list, tuple)) and input_ids and not np.isscalar(input_ids[0]):
        if attention_mask is not None:
            raise InputError("pass either ragged token lists or input_ids with an attention_mask, not both")
        return [np.asarray(r, np.int32).reshape(-1) for r in input_ids]
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise InputError(f"input_ids must be [B, T] or [T], got shape {ids.shape}")
    if attention_mask is None:
        return list(ids)
    mask = np.asarray(attention_mask).reshape(ids.shape).astype(bool)
    return [row[m] for row, m in zip(ids, mask)]


def _sample(sampler: Sampler, logits, rng, step, done, eos_ids, pad_id):
    """logits [B, V] -> (token [B], done [B]); rows already done emit pad_id."""
    token = sampler.sample(logits, jax.random.fold_in(rng, step))
    token = jnp.where(done, pad_id, token)
    return token, done | jnp.isin(token, jnp.asarray(eos_ids or (-1,), jnp.int32))


# -- the two weight layouts ----------------------------------------------------------------------
# "copy": the decoder's weights copied once into `decode_layout` (unstacked, [out, in]), which
#   XLA:CPU streams at close to memory bandwidth; it costs a second copy of the decoder's weights.
# "scanned": the model's own stacked weights and `Decoder.__call__` with its KVCache; no copy. On GPU
#   and TPU, XLA reads a scanned layer's weights in place, so this is the default there.
LAYOUTS = ("copy", "scanned")


def default_layout(decoder_bytes: int = 0) -> str:
    """"copy" on CPU where the second copy of the decoder's weights fits in half the memory available
    now (a 7B model in bfloat16 would need 13.5 GB more), else "scanned"."""
    if jax.default_backend() != "cpu":
        return "scanned"
    available = available_memory_bytes()
    return "copy" if available is None or 2 * decoder_bytes <= available else "scanned"


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None (unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _embed(model, dparams, ids: jax.Array) -> jax.Array:
    if dparams is None:
        return model.decoder.embed_tokens(ids)
    return decode_layout.embed_lookup(dparams, ids).astype(jnp.dtype(model.cfg.dtype))


def _empty_caches(model, dparams, batch: int, length: int, dtype):
    if dparams is None:
        return KVCache.zeros(model.cfg.text, batch, length, dtype)
    return decode_layout.empty_caches(model.cfg.text, batch, length, dtype)


def _forward(model, dparams, x, positions, kv_valid, caches, cache_index, *, fresh, pad_columns):
    """x: [B, T, D] -> (final-normed hidden [B, T, D], caches), in either layout."""
    if dparams is None:
        return model.decoder(x, positions, kv_valid, caches, cache_index)
    return decode_layout.forward(dparams, model.cfg.text, x, positions, kv_valid, caches, cache_index, fresh=fresh,
                                 pad_columns=pad_columns)  # fmt: skip


def _logits(model, dparams, hidden: jax.Array, *, pad_columns: bool) -> jax.Array:
    """hidden: [B, D] -> float32 logits [B, V]."""
    if dparams is None:
        return model.decoder.logits(hidden[:, None])[:, 0]
    return decode_layout.logits(dparams, hidden, pad_columns=pad_columns)


def prefill(graphdef: nnx.GraphDef, params: nnx.State, dparams: dict | None, input_ids: jax.Array,
            attention_mask: jax.Array, features: jax.Array | None, rng: jax.Array, *, num_new: int,
            sampler: Sampler, eos_ids: tuple[int, ...], pad_id: int, pad_columns: bool,
            cache_dtype=None) -> DecodeState:  # fmt: skip
    """Runs the prompts through the decoder into fresh caches and samples the first new token.

    params: the LlavaModel's state; dparams: `decode_layout.decode_params` ("copy" layout) or None
    ("scanned"). input_ids, attention_mask: [B, T] left-padded; features: [M, D] image features
    (M >= the image tokens in input_ids) or None. The caches get T + num_new slots.
    """
    model = nnx.merge(graphdef, params)
    b, t = input_ids.shape
    mask = attention_mask.astype(bool)
    positions = jnp.where(mask, jnp.cumsum(mask, axis=-1) - 1, 0)
    kv_valid = jnp.concatenate([mask, jnp.ones((b, num_new), bool)], axis=1)
    caches = _empty_caches(model, dparams, b, t + num_new, cache_dtype or jnp.dtype(model.cfg.dtype))
    hidden, caches = _forward(model, dparams, model.embed(input_ids, features), positions, kv_valid, caches, 0,
                              fresh=True, pad_columns=pad_columns)  # fmt: skip
    logits = _logits(model, dparams, hidden[:, -1], pad_columns=pad_columns)
    done = jnp.zeros((b,), bool)
    token, done = _sample(sampler, logits, rng, 0, done, eos_ids, pad_id)
    tokens = jnp.full((b, num_new), pad_id, jnp.int32).at[:, 0].set(token)
    return DecodeState(caches, tokens, kv_valid, mask.sum(-1).astype(jnp.int32), jnp.int32(1), done, rng)


def decode(graphdef: nnx.GraphDef, params: nnx.State, dparams: dict | None, state: DecodeState, limit: jax.Array,
           *, sampler: Sampler, eos_ids: tuple[int, ...], pad_id: int, pad_columns: bool) -> DecodeState:  # fmt: skip
    """Generates tokens until `state.step` reaches `limit` (<= N) or every row is done.

    params: the LlavaModel's state; dparams: as for `prefill`."""
    model = nnx.merge(graphdef, params)
    prompt_length = state.kv_valid.shape[1] - state.tokens.shape[1]

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        last = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)  # [B, 1]
        positions = (s.prompt_tokens + s.step - 1)[:, None]
        hidden, caches = _forward(model, dparams, _embed(model, dparams, last), positions, s.kv_valid, s.caches,
                                  prompt_length + s.step - 1, fresh=False, pad_columns=pad_columns)  # fmt: skip
        logits = _logits(model, dparams, hidden[:, 0], pad_columns=pad_columns)
        token, done = _sample(sampler, logits, s.rng, s.step, s.done, eos_ids, pad_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1)
        return s._replace(caches=caches, tokens=tokens, step=s.step + 1, done=done)

    return jax.lax.while_loop(cond, body, state)


class Generator:
    """Host side of generation for one model: bucketing, the jitted prefill/decode, eos, stop strings.

    graphdef, params_fn() -> state: the split LlavaModel (the state is read at each call, so the
    owner may replace it); config: its LlavaConfig; decode_text: ids -> str, for stop strings only.
    layout: "copy" keeps the decoder's weights a second time in `decode_layout` (fast on CPU),
    "scanned" runs the model's own weights (no copy); "auto" picks by backend and, on CPU, by the
    memory available (`default_layout`).
    """

    def __init__(self, graphdef: nnx.GraphDef, params_fn: Callable[[], nnx.State], config, *, pad_id: int = 0,
                 decode_text: Callable[[list[int]], str] | None = None, layout: str = "auto"):  # fmt: skip
        if layout == "auto":
            decoder = jax.tree.leaves(params_fn()["decoder"])
            layout = default_layout(sum(a.size * a.dtype.itemsize for a in decoder))
        if layout not in LAYOUTS:
            raise ConfigError(f"generation layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.params_fn = params_fn
        self.config = config
        self.max_length = self.config.text.max_position_embeddings
        self.pad_id = pad_id
        self.decode_text = decode_text
        dtype = jnp.dtype(self.config.dtype)
        on_cpu = jax.default_backend() == "cpu"
        # XLA:CPU runs one-column half-precision products on a slow path, and converts half-precision
        # caches to float32 for attention at every step (see decode_layout). A float32 cache holds
        # the same (bfloat16-valued) keys exactly.
        copy = layout == "copy"
        self.pad_columns = copy and on_cpu and dtype.itemsize == 2
        self.cache_dtype = jnp.dtype(jnp.float32) if copy and on_cpu else dtype
        self._dparams = None
        self._dparams_source = None
        static = ("sampler", "eos_ids", "pad_id", "pad_columns")
        self._prefill = jax.jit(functools.partial(prefill, graphdef),
                                static_argnames=("num_new", "cache_dtype") + static)  # fmt: skip
        self._decode = jax.jit(functools.partial(decode, graphdef), donate_argnames=("state",),
                               static_argnames=static)  # fmt: skip

    def decode_params(self) -> dict | None:
        """The decoder's weights in decode layout, rebuilt when the model's state object changes
        (None for the "scanned" layout, which reads the model's own)."""
        if self.layout == "scanned":
            return None
        params = self.params_fn()
        if self._dparams_source is not params:
            self._dparams = None  # free the old copy first
            self._dparams = decode_layout.decode_params(nnx.to_pure_dict(params["decoder"]), self.config.text)
            self._dparams_source = params
        return self._dparams

    def start(self, rows: list[np.ndarray], features: jax.Array | None, *, max_new_tokens: int, sampler: Sampler,
              seed: int, eos_ids: tuple[int, ...]) -> tuple[DecodeState, int]:  # fmt: skip
        """Prefills ragged prompt rows; returns the state and the usable number of new tokens."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        longest = max(len(r) for r in rows)
        if min(len(r) for r in rows) == 0:
            raise InputError("an empty prompt cannot be continued; give at least one token (e.g. BOS)")
        if longest >= self.max_length:
            raise PromptTooLong(
                f"a prompt of {longest} tokens (image tokens included) does not fit the model's context of "
                f"{self.max_length} tokens; shorten the text or pass fewer images"
            )
        max_new_tokens = min(max_new_tokens, self.max_length - longest)  # generation ends at the context
        t, n = bucket(longest), bucket(max_new_tokens)
        input_ids, mask = left_pad(rows, t, self.pad_id)
        if features is not None:
            features = jnp.pad(features, ((0, bucket(features.shape[0]) - features.shape[0]), (0, 0)))
        state = self._prefill(self.params_fn(), self.decode_params(), input_ids, mask, features, jax.random.key(seed),
                              num_new=n, sampler=sampler, eos_ids=eos_ids, pad_id=self.pad_id,
                              pad_columns=self.pad_columns, cache_dtype=self.cache_dtype)  # fmt: skip
        return state, max_new_tokens

    def stream(self, rows: list[np.ndarray], features: jax.Array | None = None, *, max_new_tokens: int = 256,
               sampler: Sampler = Greedy(), seed: int = 0, eos_ids: tuple[int, ...] = (),
               stop: Sequence[str] = (), chunk: int | None = 1) -> Iterator[list[list[int]]]:  # fmt: skip
        """Yields each row's new ids since the last yield (an empty list once a row is finished),
        after every `chunk` tokens (None: once, at the end). A row finishes after an eos id (kept) or
        after the token that completes a stop string (kept; cut the text with `cut_at_stop`)."""
        if stop and self.decode_text is None:
            raise ConfigError("stop strings need a tokenizer to decode the ids; this pipeline has none")
        eos_ids = tuple(sorted({int(e) for e in eos_ids}))
        state, budget = self.start(rows, features, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                                   eos_ids=eos_ids)  # fmt: skip
        b = len(rows)
        out: list[list[int]] = [[] for _ in range(b)]
        finished = [False] * b
        emitted = 0
        while True:
            step = int(state.step)
            tokens, done = jax.device_get((state.tokens[:, emitted:step], state.done))
            new = [[] for _ in range(b)]
            for i in range(b):
                for tok in tokens[i]:
                    if finished[i]:
                        break
                    out[i].append(int(tok))
                    new[i].append(int(tok))
                    if int(tok) in eos_ids or len(out[i]) >= budget:
                        finished[i] = True
                if stop and new[i] and find_stop(self.decode_text(out[i]), stop) is not None:
                    finished[i] = True
                    out[i], new[i] = trim_to_stop(out[i], new[i], stop, self.decode_text)
            emitted = step
            yield new
            if all(finished) or step >= budget:
                return
            if any(f and not d for f, d in zip(finished, done)):  # stopped by a stop string
                state = state._replace(done=jnp.asarray(np.array(finished) | done))
            limit = budget if chunk is None else min(budget, step + chunk)
            state = self._decode(self.params_fn(), self.decode_params(), state, jnp.int32(limit), sampler=sampler,
                                 eos_ids=eos_ids, pad_id=self.pad_id, pad_columns=self.pad_columns)  # fmt: skip

    def generate(self, rows: list[np.ndarray], features: jax.Array | None = None, **kwargs) -> list[list[int]]:
        """Each row's new ids (see `stream`), computed with as few host round trips as possible."""
        chunk = 16 if kwargs.get("stop") else None
        out = [[] for _ in rows]
        for new in self.stream(rows, features, chunk=chunk, **kwargs):
            for row, ids in zip(out, new):
                row.extend(ids)
        return out


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """text up to (not including) its first stop string."""
    i = find_stop(text, stop)
    return text if i is None else text[:i]


def trim_to_stop(out: list[int], new: list[int], stop: Sequence[str], decode_text) -> tuple[list[int], list[int]]:
    """Drops the tokens after the one that completed the first stop string (a chunk may overshoot)."""
    keep = len(out) - len(new)
    while keep < len(out) and find_stop(decode_text(out[: keep + 1]), stop) is None:
        keep += 1
    kept = out[: keep + 1]
    return kept, new[: len(new) - (len(out) - len(kept))]
