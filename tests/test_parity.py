"""Logit parity with transformers' LlavaForConditionalGeneration on tiny random models."""

import numpy as np
import pytest

import llava_jax
from tests import reference as R

CASES = {
    "llama-gqa": dict(),
    "llama-mha-last-layer-full": dict(text=dict(num_key_value_heads=6), vision_feature_layer=-1,
                                      vision_feature_select_strategy="full"),
    "llama-mqa-tied-gelu": dict(text=dict(num_key_value_heads=1, tie_word_embeddings=True),
                                vision=dict(hidden_act="gelu"), tie_word_embeddings=True),
    "llama-rope-linear": dict(text=dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
    "llama-layer-list": dict(vision_feature_layer=[-3, -1]),
    "llama-positive-layer": dict(vision_feature_layer=1),
    "mistral-window": dict(text_model="mistral", text=dict(sliding_window=8, num_key_value_heads=3, head_dim=16)),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kwargs = dict(CASES[request.param])
    hf_model = R.build_llava(R.llava_hf_config(**kwargs))
    directory = R.save(hf_model, str(tmp_path_factory.mktemp(request.param)))
    return hf_model, llava_jax.load(directory, dtype="float32")


def prompt(rng, n_image_tokens, before=5, after=9, images=1):
    parts = [rng.integers(1, 90, before)]
    for _ in range(images):
        parts += [np.full(n_image_tokens, R.IMAGE_TOKEN), rng.integers(1, 90, after)]
    return np.concatenate(parts)


def test_one_image(case):
    hf_model, pipe = case
    rng = np.random.default_rng(0)
    ids = prompt(rng, pipe.config.tokens_per_tile)[None]
    pixels = rng.standard_normal((1, 3, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(pipe.logits(ids, pixels), R.reference_logits(hf_model, ids, pixels), atol=1e-4, rtol=0)


def test_two_images_in_one_sequence_and_text_only_padded_row(case):
    hf_model, pipe = case
    rng = np.random.default_rng(1)
    with_images = prompt(rng, pipe.config.tokens_per_tile, images=2)
    text_only = rng.integers(1, 90, len(with_images) - 11)
    ids = np.stack([with_images, np.pad(text_only, (0, 11), constant_values=R.PAD_TOKEN)])
    mask = np.stack([np.ones(len(with_images)), np.r_[np.ones(len(text_only)), np.zeros(11)]]).astype(np.int64)
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    ours = pipe.logits(ids, pixels, attention_mask=mask)
    ref = R.reference_logits(hf_model, ids, pixels, attention_mask=mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_text_only_batch(case):
    hf_model, pipe = case
    ids = np.random.default_rng(2).integers(1, 90, (3, 20))
    np.testing.assert_allclose(pipe.logits(ids), R.reference_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_bfloat16_close_to_float32_reference(tmp_path):
    """bfloat16 parameters and activations: max abs logit error within 2% of the logit range."""
    hf_model = R.build_llava(R.llava_hf_config())
    pipe = llava_jax.load(R.save(hf_model, str(tmp_path)), dtype="bfloat16")
    rng = np.random.default_rng(3)
    ids = prompt(rng, pipe.config.tokens_per_tile)[None]
    pixels = rng.standard_normal((1, 3, 28, 28)).astype(np.float32)
    ours, ref = pipe.logits(ids, pixels), R.reference_logits(hf_model, ids, pixels)
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    assert np.abs(ours - ref).max() <= 0.02 * (ref.max() - ref.min())
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
