"""The train step: micro-batch invariance, frozen groups, supervised positions, skipped updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.model.llava import LlavaModel
from llava_jax.train import microbatch
from llava_jax.train.loss import IGNORE_INDEX, token_losses
from llava_jax.train.optimizer import Groups, make_optimizer, merge_params, split_params
from llava_jax.train.state import TrainState
from llava_jax.train.step import make_train_step

IMAGE = 60
CONFIG = LlavaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=32, patch_size=16),
    text=TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=8, max_position_embeddings=64),
    image_token_id=IMAGE, image_aspect_ratio="square",
)  # fmt: skip
TOKENS = CONFIG.tokens_per_tile  # 4


def make_batch(rows=8, length=20, seed=0, empty=False):
    """A batch in the data pipeline's layout: some rows with an image, uneven supervised counts per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, IMAGE, (rows, length)).astype(np.int32)
    labels = np.full((rows, length), IGNORE_INDEX, np.int32)
    mask = np.zeros((rows, length), np.int32)
    has_image = [r % 3 != 1 for r in range(rows)]
    for r in range(rows):
        n = int(rng.integers(10, length + 1))
        mask[r, :n] = 1
        if has_image[r]:
            ids[r, 1 : 1 + TOKENS] = IMAGE
        supervised = int(rng.integers(1, n - 1 - TOKENS))  # 1..: uneven counts
        if not empty:
            labels[r, n - supervised : n] = ids[r, n - supervised : n]
        ids[r, n:] = 0
    images = int(sum(has_image))
    pixels = np.zeros((rows, 3, 32, 32), np.float32)
    pixels[:images] = rng.normal(size=(images, 3, 32, 32))
    image_mask = np.zeros(rows, np.int32)
    image_mask[:images] = 1
    sizes = np.zeros((rows, 2), np.int32)
    sizes[:images] = 32
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels,
            "image_mask": image_mask, "image_sizes": sizes}  # fmt: skip


_SETUPS = {}


def setup(patterns, sgd=False):
    """(graphdef, optimizer, state, frozen, step): one jitted step per group set, so tests share compilations."""
    key = (tuple(patterns), sgd)
    if key not in _SETUPS:
        _SETUPS[key] = _setup(patterns, sgd)
    return _SETUPS[key]


def _setup(patterns, sgd, total_steps=10):
    model = LlavaModel(CONFIG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    groups = Groups(tuple(patterns))
    trainable, frozen = split_params(nnx.to_pure_dict(state), groups)
    optimizer, _ = make_optimizer(trainable, groups, total_steps=total_steps, warmup_ratio=0.0, weight_decay=0.1,
                                  clip_norm=1.0)  # fmt: skip
    if sgd:  # the update is then linear in the gradient: a split that changed the gradient would show
        optimizer = optax.sgd(1.0)
    step = make_train_step(graphdef, optimizer, donate=False)
    return graphdef, optimizer, TrainState.create(trainable, optimizer, 0), frozen, step


def run_step(step, state, frozen, batch, accumulation):
    micro = jax.tree.map(jnp.asarray, microbatch.split(batch, accumulation, CONFIG))
    return step(state, frozen, micro)


def reference_loss(graphdef, params, batch):
    """The mean cross-entropy over every supervised target of the batch, in numpy from the model's logits."""
    model = nnx.merge(graphdef, params)
    images = int(batch["image_mask"].sum())
    logits = np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixel_values"][:images]),
                              jnp.asarray(batch["attention_mask"])), np.float64)  # fmt: skip
    logits, targets = logits[:, :-1], batch["labels"][:, 1:]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    keep = targets != IGNORE_INDEX
    picked = np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], -1)[..., 0]
    return -picked[keep].sum() / keep.sum()


def test_micro_batch_split_does_not_change_loss_or_update():
    graphdef, optimizer, state, frozen, step = setup([(".*", 1.0)], sgd=True)
    batch = make_batch()
    assert len(set((batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist())) > 2  # uneven per row
    results = {a: run_step(step, state, frozen, batch, a) for a in (1, 4, 8)}
    expected = reference_loss(graphdef, merge_params(state.trainable, frozen), batch)
    for a, (new_state, metrics) in results.items():
        np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5, err_msg=f"accumulation {a}")
        assert int(metrics["tokens"]) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    base = jax.tree.leaves(results[1][0].trainable)
    for a in (4, 8):
        np.testing.assert_allclose(float(results[a][1]["grad_norm"]), float(results[1][1]["grad_norm"]), rtol=1e-5)
        for x, y in zip(jax.tree.leaves(results[a][0].trainable), base):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_frozen_parameters_unchanged_and_without_optimizer_state():
    graphdef, optimizer, state, frozen, step = setup([("projector/.*", 1e-2), ("decoder/layers/mlp/.*", 1e-3)])
    assert set(state.trainable) == {"projector", "decoder"} and "vision" in frozen and "embed" in frozen["decoder"]
    trainable_size = sum(x.size for x in jax.tree.leaves(state.trainable))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * trainable_size  # mu and nu of the trainable leaves only
    before = jax.tree.map(np.asarray, frozen)
    start = jax.tree.map(np.asarray, state.trainable)
    for seed in range(2):
        state, metrics = run_step(step, state, frozen, make_batch(seed=seed), 2)
        assert bool(metrics["applied"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), before)
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), state.trainable, start)
    assert all(jax.tree.leaves(changed))


def test_unsupervised_positions_do_not_count():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 6, 10)), jnp.float32)
    labels = jnp.asarray([[-100, -100, 3, 4, -100, -100], [-100, 1, -100, -100, 2, 5]])
    grads = jax.grad(lambda x: token_losses(x, labels).sum())(logits)
    # the logits at t predict labels[t + 1]: only t with a supervised labels[t + 1] get a gradient
    has_grad = np.abs(np.asarray(grads)).sum(-1) > 0
    np.testing.assert_array_equal(has_grad, [[0, 1, 1, 0, 0, 0], [1, 0, 0, 1, 1, 0]])


def test_batch_without_supervised_tokens_adds_nothing_and_is_counted():
    graphdef, optimizer, state, frozen, step = setup([(".*", 1e-2)])
    start = jax.tree.map(np.asarray, state.trainable)
    new, metrics = run_step(step, state, frozen, make_batch(empty=True), 4)
    assert float(metrics["loss"]) == 0.0 and not bool(metrics["applied"])
    assert (int(new.step), int(new.updates), int(new.empty), int(new.nonfinite)) == (1, 0, 1, 0)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new.trainable), start)


def test_non_finite_loss_skips_the_update_and_is_counted():
    graphdef, optimizer, state, frozen, step = setup([(".*", 1e-2)])
    start = jax.tree.map(np.asarray, state.trainable)
    batch = make_batch()
    batch["pixel_values"][0, 0, 0, 0] = np.nan
    new, metrics = run_step(step, state, frozen, batch, 4)
    assert not bool(metrics["finite"]) and not bool(metrics["applied"])
    assert (int(new.step), int(new.updates), int(new.nonfinite)) == (1, 0, 1)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new.trainable), start)
    opt_leaves = [np.asarray(x) for x in jax.tree.leaves(new.opt_state)]
    assert all(np.isfinite(x).all() for x in opt_leaves)


def test_micro_batches_carry_their_own_images():
    batch = make_batch()
    micro = microbatch.split(batch, 4, CONFIG)
    counts = microbatch.images_per_row(batch, CONFIG)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for a in range(4):
        n = starts[2 * a + 2] - starts[2 * a]
        np.testing.assert_array_equal(micro["pixel_values"][a, :n], batch["pixel_values"][starts[2 * a] : starts[2 * a + 2]])
        assert not micro["pixel_values"][a, n:].any()
        assert (micro["input_ids"][a] == IMAGE).sum() == n * TOKENS


@pytest.mark.parametrize("pairs", [[("(", 1.0)], [("x",)]])
def test_bad_group_patterns_are_config_errors(pairs):
    from llava_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="trainable"):
        Groups.from_config(pairs)


def test_schedule_warms_up_then_decays_as_hf_cosine():
    from llava_jax.train.optimizer import warmup_cosine, warmup_steps

    total, ratio, peak = 100, 0.03, 2e-5
    warm = warmup_steps(total, ratio)
    schedule = warmup_cosine(peak, warm, total)
    for step in (0, 1, 2, 3, 50, 99):  # transformers.get_cosine_schedule_with_warmup's formula
        if step < warm:
            expected = peak * step / warm
        else:
            progress = (step - warm) / (total - warm)
            expected = peak * 0.5 * (1 + np.cos(np.pi * progress))
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-12)


def test_supervised_only_logits_give_the_update_of_every_position_logits():
    """The step's default loss (LM head over the supervised positions, in chunks) against loss_chunk=0."""
    graphdef, optimizer, state, frozen, _ = setup([(".*", 1.0)], sgd=True)
    batch = make_batch(seed=3)
    results = [run_step(make_train_step(graphdef, optimizer, donate=False, loss_chunk=chunk), state, frozen, batch, 2)
               for chunk in (0, 4)]  # fmt: skip
    (full_state, full), (chunked_state, chunked) = results
    np.testing.assert_allclose(float(chunked["loss"]), float(full["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(chunked["grad_norm"]), float(full["grad_norm"]), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(chunked_state.trainable), jax.tree.leaves(full_state.trainable)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
