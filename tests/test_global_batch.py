"""How several processes' micro-batches make one global batch (llava_jax.train.global_batch), checked in one
process: the rows of two hosts laid side by side, as jax.make_array_from_process_local_data lays them out,
train as the same rows read by one host."""

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.model import anyres_merge
from llava_jax.train import global_batch, microbatch
from llava_jax.train.optimizer import merge_params
from tests.test_train_step import CONFIG, reference_loss, make_batch, setup


def side_by_side(*hosts: dict) -> dict:
    """Each host's micro-batches [A, b, ...] concatenated on the batch axis (axis 1)."""
    return {k: np.concatenate([h[k] for h in hosts], axis=1) for k in hosts[0]}


def rows_of(*batches: dict) -> dict:
    """One host's batch holding the rows of `batches` in order, its images real-first."""
    out = {k: np.concatenate([b[k] for b in batches]) for k in ("input_ids", "labels", "attention_mask")}
    real = [b["pixel_values"][b["image_mask"] == 1] for b in batches]
    out["pixel_values"] = np.concatenate(real + [np.zeros_like(b["pixel_values"][b["image_mask"] == 0]) for b in batches])
    out["image_mask"] = (np.arange(len(out["pixel_values"])) < sum(len(r) for r in real)).astype(np.int32)
    out["image_sizes"] = np.where(out["image_mask"][:, None] == 1, 32, 0).astype(np.int32)
    return out


def test_two_hosts_rows_train_as_one_hosts():
    graphdef, _, state, frozen, step = setup([(".*", 1.0)], sgd=True)
    first, second = make_batch(rows=4, seed=3), make_batch(rows=4, seed=4)
    # host 0's micro-batch ends in an empty image slot, ahead of host 1's images in the global array
    assert first["image_mask"].tolist() == [1, 1, 1, 0] and second["image_mask"].sum() == 3
    hosts = [microbatch.split(b, 2, CONFIG) for b in (first, second)]
    _, metrics = step(state, frozen, jax.tree.map(jnp.asarray, side_by_side(*hosts)))
    whole = rows_of(first, second)
    expected = reference_loss(graphdef, merge_params(state.trainable, frozen), whole)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)



NEXT = LlavaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=28, patch_size=7),
    text=TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8, max_position_embeddings=64),
    image_token_id=60, image_aspect_ratio="anyres", patch_merge_type="spatial_unpad",
    image_grid_pinpoints=((28, 56), (56, 28), (56, 56)),
)  # fmt: skip


def test_anyres_feature_index_of_two_hosts_reads_each_hosts_images_in_order():
    """The global index picks, from the hosts' tiles side by side, exactly each host's own features in turn."""
    rng = np.random.default_rng(0)
    slots, tiles, f, d = 3, 5, NEXT.tokens_per_tile, 4
    sizes = [np.array([[40, 70], [60, 30], [0, 0]]), np.array([[50, 50], [0, 0], [0, 0]])]  # 2 and 1 real images
    local = [microbatch.feature_index(NEXT, s, int((s > 0).all(1).sum()), tiles, slots) for s in sizes]
    table = [rng.normal(size=(slots, tiles, f, d)).astype(np.float32) for _ in sizes]
    newline = rng.normal(size=(d,)).astype(np.float32)

    index = global_batch.global_feature_index(np.stack(local)[:, None], slots * tiles * f)[0]
    got = np.asarray(anyres_merge.gather_features(jnp.asarray(np.concatenate(table)), jnp.asarray(newline),
                                                  jnp.asarray(index)))  # fmt: skip
    own = [np.asarray(anyres_merge.gather_features(jnp.asarray(t), jnp.asarray(newline), jnp.asarray(i)))[i >= 0]
           for t, i in zip(table, local)]  # fmt: skip
    valid = int((index >= 0).sum())
    assert valid == sum(len(o) for o in own) and (index[valid:] == -1).all()
    np.testing.assert_array_equal(got[:valid], np.concatenate(own))


def test_real_images_first_keeps_their_order():
    pixels = jnp.arange(6.0)[:, None]
    out = global_batch.real_images_first(pixels, jnp.asarray([1, 0, 1, 1, 0, 1]))
    np.testing.assert_array_equal(np.asarray(out)[:, 0], [0, 2, 3, 5, 1, 4])
