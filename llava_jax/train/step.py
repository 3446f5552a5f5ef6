"""The jitted train step: gradient accumulation as a scan over micro-batches, then one AdamW update.

batch: every array with a leading micro-batch axis A (see `microbatch.split`): input_ids, labels,
attention_mask [A, b, T] (packed rows also segment_ids, positions [A, b, T]: attention stays within an
example, RoPE positions restart); pixel_values [A, m, ...] with image_mask [A, m]; feature_index [A, F]
for anyres models (`global_batch.to_global` lays them out across processes). The loss
of each micro-batch is its summed token cross-entropy divided by the supervised tokens of the whole
batch, so the accumulated gradient is the gradient of the global-batch mean whatever A is.

LoRA dropout (where the model has adapters) draws its masks from the state's RNG, folded with the
micro-batch index; the RNG is checkpointed, so a resumed run draws the same masks.

The update is skipped (parameters and optimizer state kept, a counter raised) when the batch holds no
supervised token or when the loss or the gradient norm is not finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llava_jax.train.global_batch import real_images_first
from llava_jax.train.loss import chunked_summed_loss, summed_loss, supervised_tokens
from llava_jax.train.optimizer import merge_params
from llava_jax.train.state import TrainState

LOSS_CHUNK = 64  # positions per chunk of the LM head and cross-entropy (loss.chunked_summed_loss)

# XLA:CPU hands dots to YNNPACK by default, which runs the train step's GEMMs (a few hundred rows against
# 1024-2816-wide weights) at 100-145 GFLOP/s on the 2-core benchmark machine where XLA's Eigen path and
# PyTorch reach 130-230, and the whole step takes ~13% longer (bench/train.py). Decoding's matrix-vector
# products go the other way (YNNPACK streams them faster), so this is the train step's setting alone.
CPU_COMPILER_OPTIONS = {"xla_cpu_use_xnnpack": False}


def set_lora_dropout(model: nnx.Module, key: jax.Array | None) -> None:
    """Turns the LoRA adapters' dropout on with `key` where the model has adapters."""
    try:
        from llava_jax.train.lora import lora_modules, set_dropout
    except ImportError:  # no LoRA in this checkout: no adapters to drop out
        return
    if key is not None and lora_modules(model):
        set_dropout(model, key)


def forward_loss(graphdef: nnx.GraphDef, trainable, frozen, micro: dict, total_tokens: jax.Array,
                 dropout_key: jax.Array | None = None, loss_chunk: int = LOSS_CHUNK) -> jax.Array:  # fmt: skip
    """This micro-batch's share of the global-batch mean loss (a float32 scalar). loss_chunk: positions per
    chunk of `chunked_summed_loss`; 0 computes the logits of every position (`summed_loss`)."""
    model = nnx.merge(graphdef, merge_params(trainable, frozen))
    set_lora_dropout(model, dropout_key)
    pixels, feature_index = micro.get("pixel_values"), micro.get("feature_index")
    if pixels is not None and feature_index is None and "image_mask" in micro:  # several processes' images
        pixels = real_images_first(pixels, micro["image_mask"])
    hidden = model.hidden_states(micro["input_ids"], pixels, micro["attention_mask"], feature_index=feature_index,
                                 positions=micro.get("positions"), segment_ids=micro.get("segment_ids"))  # fmt: skip
    head = model.decoder.head()
    if not loss_chunk or head is None:  # every position's logits (and LoRA on lm_head: not a pure head)
        return summed_loss(model.decoder.logits(hidden), micro["labels"], total_tokens)
    return chunked_summed_loss(*head, hidden, micro["labels"], total_tokens, loss_chunk)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *, donate: bool = True,
                    loss_chunk: int = LOSS_CHUNK):  # fmt: skip
    """A jitted `step(state, frozen, batch) -> (state, metrics)`.

    metrics: loss (global-batch mean), grad_norm (of the trainable gradient, before clipping),
    tokens (supervised targets in the batch), applied (whether the update was taken), finite.
    """

    def accumulate(trainable, frozen, batch, key):
        total = supervised_tokens(batch["labels"])
        grad_fn = jax.value_and_grad(lambda p, micro, k: forward_loss(graphdef, p, frozen, micro, total, k, loss_chunk))
        accumulation = batch["input_ids"].shape[0]
        if accumulation == 1:  # no accumulator to zero and add into
            micro = jax.tree.map(lambda a: a[0], batch)
            loss, grads = grad_fn(trainable, micro, jax.random.fold_in(key, 0))
            return loss, jax.tree.map(lambda g: g.astype(jnp.float32), grads), total

        def body(carry, inputs):
            loss_sum, grad_sum = carry
            micro, index = inputs
            loss, grads = grad_fn(trainable, micro, jax.random.fold_in(key, index))
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            return (loss_sum + loss, grad_sum), None

        init = (jnp.zeros((), jnp.float32), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable))
        (loss, grads), _ = jax.lax.scan(body, init, (batch, jnp.arange(accumulation)))
        return loss, grads, total

    def step(state: TrainState, frozen, batch):
        key, next_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        loss, grads, total = accumulate(state.trainable, frozen, batch, key)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        has_tokens = total > 0
        apply = finite & has_tokens
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.trainable)

        def update(trainable, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state

        # a branch, not a select of new and old values: a select keeps both alive, so XLA copies the donated
        # optimizer state before updating it (one more pass over every moment, ~0.4 s a step on CPU for 220M)
        trainable, opt_state = jax.lax.cond(apply, update, lambda t, o: (t, o), state.trainable, state.opt_state)
        one = jnp.ones((), jnp.int32)
        new_state = state.replace(
            trainable=trainable,
            opt_state=opt_state,
            rng=jax.random.key_data(next_key),
            step=state.step + one,
            updates=state.updates + apply.astype(jnp.int32),
            nonfinite=state.nonfinite + (~finite & has_tokens).astype(jnp.int32),
            empty=state.empty + (~has_tokens).astype(jnp.int32),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": total, "applied": apply, "finite": finite}
        return new_state, metrics

    options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(step, donate_argnums=(0,) if donate else (), compiler_options=options)
