"""Packed sequences with images (llava_jax.data.packing): rows, layout, and per-example logits and
loss equal to each example run alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.data.examples import IGNORE_INDEX
from llava_jax.data.packing import collate_packed, pack, padding_fraction
from llava_jax.errors import DataError
from llava_jax.model.llava import LlavaModel
from tests.test_model import tiny


def test_first_fit_and_best_fit():
    lengths = [5, 4, 3, 6, 2]  # the last fits two rows: the first (room 4) or the tightest (room 2)
    assert pack(lengths, 8, "first_fit") == [[0, 2], [1, 4], [3]]
    assert pack(lengths, 8, "best_fit") == [[0, 2], [1], [3, 4]]
    with pytest.raises(DataError, match="example 1 has 9 tokens, more than the packed length 8"):
        pack([3, 9], 8)


@pytest.mark.parametrize("method", ["first_fit", "best_fit"])
def test_rows_hold_every_example_once_within_the_length(method):
    lengths = np.random.default_rng(0).integers(1, 100, 300).tolist()
    rows = pack(lengths, 128, method)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert all(row == sorted(row) for row in rows)
    assert padding_fraction(lengths, 8, 128, method) < 0.1 < padding_fraction(lengths, 8, 128, None)


IMAGE = 95


def example(rng, images: int, text: int):
    """input_ids [T] with `images` runs of 16 image tokens, labels on the last `text // 2` tokens."""
    parts = [rng.integers(1, 90, 3)]
    for _ in range(images):
        parts += [np.full(16, IMAGE), rng.integers(1, 90, 2)]
    parts.append(rng.integers(1, 90, text))
    ids = np.concatenate(parts).astype(np.int32)
    labels = np.where(np.arange(len(ids)) >= len(ids) - text // 2, ids, IGNORE_INDEX).astype(np.int32)
    return {"input_ids": ids, "labels": labels}


def per_token_loss(logits, labels):
    """Next-token cross-entropy at each position that predicts a supervised label ([T - 1]), 0 elsewhere."""
    logp = jax.nn.log_softmax(logits[:-1], axis=-1)
    target = labels[1:]
    nll = -jnp.take_along_axis(logp, jnp.maximum(target, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(target != IGNORE_INDEX, nll, 0.0)


def test_packed_examples_give_their_own_logits_and_loss():
    """Five examples (0-2 images each) packed first-fit and best-fit into rows of 64 tokens, against
    the same examples unpacked (one per row, right-padded): equal logits and per-example loss."""
    cfg = tiny(2)
    state = jax.jit(lambda: nnx.state(LlavaModel(cfg, rngs=nnx.Rngs(0))))()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0))))
    forward = jax.jit(lambda *args, **kwargs: nnx.merge(graphdef, state)(*args, **kwargs))
    rng = np.random.default_rng(0)
    shape = [(1, 6), (0, 9), (2, 4), (1, 12), (0, 5)]
    examples = [example(rng, n, text) for n, text in shape]
    images = [[rng.standard_normal((3, 28, 28)).astype(np.float32) for _ in range(n)] for n, _ in shape]
    lengths = [len(e["input_ids"]) for e in examples]
    one_each = [[i] for i in range(len(examples))]
    unpacked = collate_packed(examples, images, one_each, length=64, pad_id=0, image_slots=4, pixel_shape=(3, 28, 28))
    alone = forward(unpacked["input_ids"], unpacked["pixel_values"], unpacked["attention_mask"])
    for method in ("first_fit", "best_fit"):
        rows = pack(lengths, 64, method)
        assert len(rows) < len(examples) and any(len(row) > 1 for row in rows)
        batch = collate_packed(examples, images, rows, length=64, pad_id=0, image_slots=4, pixel_shape=(3, 28, 28))
        assert batch["image_mask"].sum() == 4
        packed = forward(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                         positions=batch["positions"], segment_ids=batch["segment_ids"])  # fmt: skip
        for r, row in enumerate(rows):
            start = 0
            for segment, i in enumerate(row, start=1):
                n = lengths[i]
                span = slice(start, start + n)
                assert (batch["segment_ids"][r, span] == segment).all()
                assert (batch["positions"][r, span] == np.arange(n)).all()
                np.testing.assert_allclose(packed[r, span], alone[i, :n], atol=2e-5, rtol=0)
                loss_packed = per_token_loss(packed[r, span], batch["labels"][r, span]).sum()
                loss_alone = per_token_loss(alone[i, :n], examples[i]["labels"]).sum()
                assert loss_alone > 0
                np.testing.assert_allclose(loss_packed, loss_alone, rtol=1e-5)
                start += n
        # The row-level loss never trains one example's last token on the next one's first.
        starts = np.diff(batch["segment_ids"], axis=1, prepend=0) > 0
        assert starts.sum() == len(examples) and (batch["labels"][starts] == IGNORE_INDEX).all()
