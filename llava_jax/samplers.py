"""Next-token samplers: each a small frozen dataclass (hashable, so a static jit argument) with one
method, `sample(logits [B, V] float32, rng) -> [B] int32`.

`Sampling` applies its filters in transformers' order: temperature, then top-k, then top-p, so the
nucleus is cut from the tempered distribution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llava_jax.errors import ConfigError

_MASKED = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token (the first one on ties, as torch.argmax)."""

    def sample(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        del rng
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """A draw from softmax(logits / temperature), restricted to the top_k most likely tokens (0 = all)
    and then to the smallest set whose probability reaches top_p (1.0 = all)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 for sampling, got {self.temperature} (use Greedy for 0)")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    def sample(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        logits = filter_logits(logits, self.temperature, self.top_k, self.top_p)
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def filter_logits(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """logits [B, V] -> tempered logits with the tokens outside top-k, then outside the nucleus, at -inf
    (transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper in that order)."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        logits = keep_top_k(logits, top_k)
    if top_p < 1.0:
        logits = keep_top_p(logits, top_p)
    return logits


def keep_top_k(logits: jax.Array, k: int) -> jax.Array:
    """logits: [B, V]; everything below the k-th largest value is masked (ties with it are kept)."""
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits < kth, _MASKED, logits)


def keep_top_p(logits: jax.Array, p: float) -> jax.Array:
    """logits: [B, V]; keeps the most likely tokens until their probability reaches p (at least one)."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    keep = mass_before < p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, _MASKED, logits)


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Greedy | Sampling:
    """Greedy for temperature 0 (top_k and top_p are then irrelevant), else Sampling."""
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return Greedy()
    return Sampling(float(temperature), int(top_k), float(top_p))
