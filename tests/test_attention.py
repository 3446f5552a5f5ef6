"""Attention kernels (llava_jax.model.attention): each equals the reference einsum softmax in float32,
gradients included, under causal, padding, sliding-window and packed-segment masks; "auto" dispatches
by backend; the blockwise path's memory grows with T x block, not T^2."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax.model import attention as A
from llava_jax.model.llava import LlavaModel
from tests.test_model import tiny


def inputs(b=2, t=37, h=6, kv=2, hd=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, hd)), jnp.float32) for n in (h, kv, kv))
    valid = jnp.asarray(rng.random((b, t)) > 0.2)
    segments = jnp.asarray(np.sort(rng.integers(1, 4, (b, t)), axis=1))
    slots = jnp.arange(t)
    masks = {
        "full": None,
        "causal": A.Mask(slots, slots),
        "padding": A.Mask(slots, slots, kv_valid=valid),
        "window": A.Mask(slots, slots, kv_valid=valid, sliding_window=5),
        "segments": A.Mask(slots, slots, kv_valid=valid, q_segments=segments, k_segments=segments),
    }
    return (q, k, v), valid, masks


def loss(fn, weight):
    """A scalar that weighs every output element differently, so that gradients test the whole output."""
    return lambda q, k, v: jnp.sum(fn(q, k, v) ** 2 * weight)


def assert_matches_reference(fn, mask, qkv, rows=None, rtol=2e-6):
    """fn(q, k, v) equals the reference on `rows` ([B, T] bool, default all), and so do its gradients."""
    reference = lambda q, k, v: A.attend(q, k, v, mask, 0.3, "xla")  # noqa: E731
    weight = jnp.arange(1, qkv[0].shape[-1] + 1, dtype=jnp.float32)
    if rows is not None:
        weight = weight * rows[:, :, None, None]
    out, expected = fn(*qkv), reference(*qkv)
    sel = (slice(None),) if rows is None else (np.asarray(rows),)
    np.testing.assert_allclose(out[sel], expected[sel], atol=1e-6, rtol=0)
    got = jax.grad(loss(fn, weight), argnums=(0, 1, 2))(*qkv)
    want = jax.grad(loss(reference, weight), argnums=(0, 1, 2))(*qkv)
    for g, w in zip(got, want):
        assert float(jnp.abs(w).max()) > 0
        np.testing.assert_allclose(g, w, atol=rtol * float(jnp.abs(w).max()), rtol=0)


@pytest.mark.parametrize("block", [8, 16, 64])
@pytest.mark.parametrize("mask_name", ["full", "causal", "padding", "window", "segments"])
def test_blockwise_equals_the_reference(mask_name, block):
    """Blocks of 8 and 16 do not divide the 37 keys (padded and masked); 64 holds them in one block.
    Rows with no visible key (padding queries) average all keys, as in the reference."""
    qkv, _, masks = inputs()
    mask = masks[mask_name] or A.Mask(jnp.arange(37), jnp.arange(37), causal=False)
    assert_matches_reference(lambda q, k, v: A.blockwise_attention(q, k, v, mask, 0.3, block=block), masks[mask_name], qkv)


def test_blockwise_reads_a_kv_cache():
    """Queries at slots 5..8 against a 16-slot cache (decoding a chunk), GQA."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 4, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.float32) for _ in range(2))
    mask = A.Mask(5 + jnp.arange(4), jnp.arange(16), kv_valid=jnp.arange(16)[None].repeat(2, 0) >= jnp.array([[0], [3]]))
    assert_matches_reference(lambda q, k, v: A.blockwise_attention(q, k, v, mask, 0.3, block=8), mask, (q, k, v))


@pytest.mark.parametrize("mask_name", ["causal", "segments"])
def test_splash_equals_the_reference(mask_name):
    """Pallas splash attention, interpreted on CPU; padding query rows differ by design (they attend
    padding keys) and are left out. T = 100 is padded to 128 inside."""
    qkv, valid, masks = inputs(b=1, t=100, h=2, kv=1)
    from llava_jax.model.splash import splash_attention

    rows = valid if masks[mask_name].kv_valid is not None else None
    mask = masks[mask_name]
    if mask_name == "causal":
        mask = dataclasses.replace(mask, sliding_window=9)
    assert_matches_reference(lambda q, k, v: splash_attention(q, k, v, mask, 0.3), mask, qkv, rows=rows)


def test_cudnn_path_passes_the_right_mask(monkeypatch):
    """What cudnn_attention hands jax.nn.dot_product_attention, run by its XLA implementation here."""
    calls = []
    original = jax.nn.dot_product_attention

    def xla_instead(*args, implementation=None, **kwargs):
        calls.append((implementation, kwargs))
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
    qkv, valid, masks = inputs()
    for name in ("full", "causal", "window", "segments"):
        mask = masks[name]
        if name == "window":
            mask = dataclasses.replace(mask, kv_valid=None)
        out, expected = A.attend(*qkv, mask, 0.3, "cudnn"), A.attend(*qkv, mask, 0.3, "xla")
        rows = np.asarray(valid) if name == "segments" else slice(None)
        np.testing.assert_allclose(out[rows], expected[rows], atol=1e-6, rtol=0)
    assert [c[0] for c in calls] == ["cudnn"] * 4
    assert calls[1][1]["is_causal"] and calls[2][1]["local_window_size"] == (4, 0)
    assert calls[3][1]["mask"].shape == (2, 1, 37, 37)


@pytest.mark.parametrize(("backend", "dtype", "t", "s", "expected"), [
    ("cpu", jnp.float32, 64, 64, "xla"), ("cpu", jnp.bfloat16, 2048, 2048, "blockwise"),
    ("gpu", jnp.bfloat16, 64, 64, "cudnn"), ("gpu", jnp.float32, 64, 64, "xla"),
    ("gpu", jnp.bfloat16, 1, 4096, "blockwise"), ("tpu", jnp.bfloat16, 4096, 4096, "splash"),
    ("tpu", jnp.bfloat16, 1, 64, "xla"),
])  # fmt: skip
def test_auto_dispatch(monkeypatch, backend, dtype, t, s, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    q, k = jnp.zeros((1, t, 2, 8), dtype), jnp.zeros((1, s, 2, 8), dtype)
    assert A.resolve("auto", q, k) == expected
    assert A.resolve("splash", q, k) == "splash"
    with pytest.raises(ValueError, match="attention must be one of"):
        A.resolve("flash", q, k)


def peak_bytes(t: int, block: int | None = None) -> int:
    """Temporary bytes of the compiled forward + backward of causal attention over t tokens (4 heads):
    the reference for block None, else blockwise."""
    q = jax.ShapeDtypeStruct((1, t, 4, 64), jnp.float32)
    mask = A.Mask(jnp.arange(t), jnp.arange(t))
    if block is None:
        fn = lambda q, k, v: A.attend(q, k, v, mask, 0.125, "xla")  # noqa: E731
    else:
        fn = lambda q, k, v: A.blockwise_attention(q, k, v, mask, 0.125, block=block)  # noqa: E731
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))
    return jax.jit(grad).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_with_t_times_block():
    """At 4096 tokens the reference holds [H, T, T] float32 scores (256 MiB here, 813 MiB in all);
    blockwise holds a few [H, T, block] arrays per step (60 MiB at block 128), recomputed in the
    backward pass: linear in T and in the block."""
    xla, blockwise = peak_bytes(4096), peak_bytes(4096, 128)
    assert xla >= 4 * 4096 * 4096 * 4 and blockwise < xla / 8, (xla, blockwise)
    assert 1.8 < blockwise / peak_bytes(2048, 128) < 2.2
    assert 1.4 < peak_bytes(2048, 256) / peak_bytes(2048, 128) < 2.2  # plus a part that does not grow


def test_model_attention_choice_gives_the_same_logits():
    """The whole model, vision tower included, with blockwise attention and packed segments."""
    cfg = tiny(2)
    state = jax.jit(lambda: nnx.state(LlavaModel(cfg, rngs=nnx.Rngs(0))))()
    graphdefs = [nnx.graphdef(nnx.eval_shape(lambda c=c: LlavaModel(c, rngs=nnx.Rngs(0))))
                 for c in (cfg, cfg.replace(attention="blockwise"))]  # fmt: skip
    run = jax.jit(lambda graphdef, *args, **kwargs: nnx.merge(graphdef, state)(*args, **kwargs), static_argnums=0)
    model, blockwise = (functools.partial(run, g) for g in graphdefs)
    rng = np.random.default_rng(0)
    n = cfg.tokens_per_tile
    ids = jnp.asarray(np.r_[rng.integers(1, 90, 3), np.full(n, 95), rng.integers(1, 90, 20)][None])
    pixels = jnp.asarray(rng.standard_normal((1, 3, 28, 28)), jnp.float32)
    segments = jnp.asarray(np.r_[np.ones(3 + n + 8), np.full(12, 2)][None].astype(np.int32))
    positions = jnp.asarray(np.r_[np.arange(3 + n + 8), np.arange(12)][None])
    for kwargs in ({}, dict(segment_ids=segments, positions=positions)):
        np.testing.assert_allclose(blockwise(ids, pixels, **kwargs), model(ids, pixels, **kwargs), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="attention must be one of"):
        cfg.replace(attention="flash")
