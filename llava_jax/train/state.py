"""The train state: the trainable parameters, their optimizer state, the step, the RNG and counters.

The model's parameters are split by the trainable groups (`optimizer.split_params`) into `trainable`,
which lives here, and `frozen`, which the step reads but never updates and the optimizer never sees.
Both are pure dicts of arrays (nnx.to_pure_dict); `nnx.merge(graphdef, merge_params(...))` rebuilds
the module inside the step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    """step: optimizer steps taken (batches consumed, applied or skipped); updates: the ones applied
    (the optimizer's schedules advance with these); nonfinite / empty: batches skipped because their
    loss or gradient was not finite / because they held no supervised token."""

    trainable: Any
    opt_state: Any
    rng: jax.Array
    step: jax.Array
    updates: jax.Array
    nonfinite: jax.Array
    empty: jax.Array

    @classmethod
    def create(cls, trainable, optimizer, seed: int) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        return cls(trainable=trainable, opt_state=optimizer.init(trainable), rng=jax.random.key_data(jax.random.key(seed)),
                   step=zero, updates=zero, nonfinite=zero, empty=zero)  # fmt: skip

    def counters(self) -> dict[str, int]:
        return {"step": int(self.step), "updates": int(self.updates), "nonfinite_steps": int(self.nonfinite),
                "empty_batches": int(self.empty)}  # fmt: skip
