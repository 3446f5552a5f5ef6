"""Generation against transformers' `generate`, and the host-side machinery around the decode loop.

The tiny random llava-hf models of tests/reference.py; greedy outputs must be token-identical to
transformers for 32 new tokens, batches of prompts of different lengths included (left-padded, as
transformers generates them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llava_jax
from llava_jax import samplers
from llava_jax import sharding as shd
from llava_jax.data.prepare import PromptTooLong
from llava_jax.generate import bucket, cut_at_stop, find_stop
from llava_jax.model import decode_layout
from llava_jax.model.llava import ImageTokenMismatch
from tests import reference as R

F = 16  # image tokens per image of the tiny tower (28 px, patch 7)
NEW = 32


def left_padded(rows, pad=R.PAD_TOKEN):
    t = max(map(len, rows))
    ids = np.full((len(rows), t), pad, np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, row in enumerate(rows):
        ids[i, t - len(row):], mask[i, t - len(row):] = row, 1
    return ids, mask


def prompt(rng, n_text, n_images=1):
    return [1] + [R.IMAGE_TOKEN] * (F * n_images) + list(rng.integers(3, 90, n_text))


def hf_generate(model, rows, pixel_values=None, eos=None, new=NEW):
    """transformers' greedy continuation of each row, without the padding after eos."""
    ids, mask = left_padded(rows)
    model.generation_config.eos_token_id = eos
    images = {} if pixel_values is None else {"pixel_values": torch.as_tensor(pixel_values)}
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **images,
                             max_new_tokens=new, do_sample=False, pad_token_id=R.PAD_TOKEN)  # fmt: skip
    result = []
    for row in out[:, ids.shape[1]:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        result.append(row)
    return result


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = R.build_llava(R.llava_hf_config(), seed=1, scale=0.5)
    directory = R.save(model, str(tmp_path_factory.mktemp("llama")))
    return model, llava_jax.load(directory, dtype="float32")


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    rows = [prompt(rng, 5), prompt(rng, 13), prompt(rng, 2)]
    pixels = rng.standard_normal((3, 3, 28, 28)).astype(np.float32)
    return rows, pixels


def test_greedy_batch_matches_transformers(llama, batch):
    model, pipe = llama
    rows, pixels = batch
    expected = hf_generate(model, rows, pixels)
    ids, mask = left_padded(rows)
    assert pipe.generate(ids, pixels, attention_mask=mask, max_new_tokens=NEW, eos_ids=()) == expected
    # Ragged lists and right padding give the same rows.
    assert pipe.generate(rows, pixels, max_new_tokens=NEW, eos_ids=()) == expected
    right = np.zeros_like(ids)
    for i, row in enumerate(rows):
        right[i, : len(row)] = row
    assert pipe.generate(right, pixels, attention_mask=right != 0, max_new_tokens=NEW, eos_ids=()) == expected
    assert len({tuple(r) for r in expected}) == 3 and all(len(set(r)) > 3 for r in expected)  # a real test


def test_scanned_layout_matches_transformers(llama, batch, tmp_path):
    """The "scanned" layout (the model's own weights, no copy: the default off CPU) generates the same
    tokens, sliding window included."""
    model, pipe = llama
    scanned = llava_jax.load(pipe.directory, dtype="float32", generation_layout="scanned")
    assert scanned._generator.layout == "scanned" and scanned._generator.decode_params() is None
    rows, pixels = batch
    assert scanned.generate(rows, pixels, max_new_tokens=NEW) == hf_generate(model, rows, pixels)
    mistral = R.build_llava(R.llava_hf_config(text_model="mistral", text=dict(sliding_window=6)), seed=2, scale=0.5)
    text_rows = [[1] + list(np.random.default_rng(1).integers(3, 90, n)) for n in (9, 4, 40)]
    ours = llava_jax.load(R.save(mistral, str(tmp_path)), dtype="float32", generation_layout="scanned")
    assert ours.generate(text_rows, max_new_tokens=NEW, eos_ids=()) == hf_generate(mistral, text_rows)


def test_eos_ends_each_row_as_transformers(llama, batch):
    model, pipe = llama
    rows, pixels = batch
    free = hf_generate(model, rows, pixels)
    eos = free[1][6]  # a token the second row emits mid-way
    expected = hf_generate(model, rows, pixels, eos=eos)
    assert any(len(r) < NEW for r in expected)
    assert pipe.generate(rows, pixels, max_new_tokens=NEW, eos_ids=(eos,)) == expected


def test_long_prompts_match_transformers(llama, batch):
    """Prompts long enough for the block-causal prefill, with images and left padding."""
    model, pipe = llama
    rows, pixels = batch
    rng = np.random.default_rng(4)
    long_rows = [prompt(rng, 150), prompt(rng, 90)]
    assert max(map(len, long_rows)) >= 4 * decode_layout.CAUSAL_BLOCK_MIN
    expected = hf_generate(model, long_rows, pixels[:2], new=12)
    assert pipe.generate(long_rows, pixels[:2], max_new_tokens=12, eos_ids=()) == expected


def test_text_only_and_sliding_window_match_transformers(tmp_path):
    config = R.llava_hf_config(text=dict(sliding_window=6), text_model="mistral")
    model = R.build_llava(config, seed=2, scale=0.5)
    pipe = llava_jax.load(R.save(model, str(tmp_path)), dtype="float32")
    assert pipe.config.text.sliding_window == 6
    rng = np.random.default_rng(3)
    rows = [[1] + list(rng.integers(3, 90, n)) for n in (9, 3, 140)]
    assert pipe.generate(rows, max_new_tokens=NEW, eos_ids=()) == hf_generate(model, rows)


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("bfloat16", 0.25)])
def test_decode_layout_matches_the_model(dtype, atol):
    """The generation weights' layout (prefill and one decode step) against Decoder, in both dtypes
    and with the CPU paths (one-column padding, float32 cache) forced on."""
    cfg = llava_jax.LlavaConfig.from_hf(R.llava_hf_config().to_dict()).replace(dtype=dtype, param_dtype=dtype)
    model = llava_jax.pipeline.LlavaModel(cfg, rngs=nnx.Rngs(0))
    text = cfg.text
    dparams = decode_layout.decode_params(nnx.to_pure_dict(nnx.state(model.decoder)), text)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 90, (2, 11)))
    mask = jnp.ones((2, 11), bool).at[0, :3].set(False)
    positions = jnp.where(mask, jnp.cumsum(mask, -1) - 1, 0)
    expected = model.decoder.logits(model.decoder(model.embed(ids), positions, mask)[0])
    caches = decode_layout.empty_caches(text, 2, 16, jnp.float32)
    kv_valid = jnp.concatenate([mask[:, :10], jnp.ones((2, 6), bool)], axis=1)
    hidden, caches = decode_layout.forward(dparams, text, model.embed(ids[:, :10]), positions[:, :10], kv_valid,
                                           caches, 0, fresh=True, pad_columns=True)  # fmt: skip
    prefill = decode_layout.logits(dparams, hidden.reshape(20, -1), pad_columns=True).reshape(2, 10, -1)
    x = decode_layout.embed_lookup(dparams, ids[:, 10:]).astype(dtype)
    for b in range(2):  # one row at a time: the single-column path
        h, _ = decode_layout.forward(dparams, text, x[b : b + 1], positions[b : b + 1, 10:], kv_valid[b : b + 1],
                                     tuple(type(c)(c.k[b * text.num_kv_heads : (b + 1) * text.num_kv_heads],
                                                   c.v[b * text.num_kv_heads : (b + 1) * text.num_kv_heads])
                                           for c in caches), 10, pad_columns=True)  # fmt: skip
        step = decode_layout.logits(dparams, h[:, 0], pad_columns=True)
        np.testing.assert_allclose(step[0], expected[b, 10], atol=atol, rtol=0)
    valid = np.asarray(mask[:, :10])
    np.testing.assert_allclose(np.asarray(prefill)[valid], np.asarray(expected[:, :10])[valid], atol=atol, rtol=0)


def test_prompt_buckets_reuse_compiled_programs(llama):
    _, pipe = llama
    gen = pipe._generator
    rng = np.random.default_rng(5)
    pipe.generate([[1] + list(rng.integers(3, 90, 17))], max_new_tokens=5, eos_ids=())
    sizes = gen._prefill._cache_size(), gen._decode._cache_size()
    assert bucket(18) == bucket(20) and bucket(5) == bucket(7)
    pipe.generate([[1] + list(rng.integers(3, 90, 19))], max_new_tokens=7, eos_ids=())
    assert (gen._prefill._cache_size(), gen._decode._cache_size()) == sizes


def test_sampling_is_seeded(llama, batch):
    _, pipe = llama
    rows, pixels = batch
    kw = dict(max_new_tokens=12, temperature=1.5, eos_ids=())
    first = pipe.generate(rows, pixels, seed=7, **kw)
    assert pipe.generate(rows, pixels, seed=7, **kw) == first
    assert pipe.generate(rows, pixels, seed=8, **kw) != first
    greedy = pipe.generate(rows, pixels, max_new_tokens=12, eos_ids=())
    assert pipe.generate(rows, pixels, seed=7, top_k=1, **kw) == greedy
    assert pipe.generate(rows, pixels, seed=7, top_p=1e-6, **kw) == greedy


def test_filters_match_transformers_warpers():
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32) * 3
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.3, 5, 1.0), (0.5, 0, 0.6), (2.0, 8, 0.7), (1.0, 3, 0.99)]:
        warpers = transformers.LogitsProcessorList([transformers.TemperatureLogitsWarper(temperature)])
        if top_k:
            warpers.append(transformers.TopKLogitsWarper(top_k))
        if top_p < 1:
            warpers.append(transformers.TopPLogitsWarper(top_p))
        expected = warpers(None, torch.as_tensor(logits)).softmax(-1).numpy()
        ours = jax.nn.softmax(samplers.filter_logits(jnp.asarray(logits), temperature, top_k, top_p), -1)
        np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_sampling_draws_follow_the_filtered_distribution():
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    sampler = samplers.Sampling(temperature=0.8, top_k=4, top_p=0.9)
    draws = jax.vmap(lambda k: sampler.sample(logits, k))(jax.random.split(jax.random.key(0), 20000))[:, 0]
    freq = np.bincount(np.asarray(draws), minlength=6) / draws.shape[0]
    expected = np.asarray(jax.nn.softmax(samplers.filter_logits(logits, 0.8, 4, 0.9))[0])
    assert expected[4] == expected[5] == 0 and expected[3] == 0  # the nucleus cut after the tempering
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_stream_yields_the_same_tokens_one_at_a_time(llama, batch):
    _, pipe = llama
    rows, pixels = batch
    chunks = list(pipe.generate_stream(rows, pixels, max_new_tokens=10, eos_ids=()))
    assert len(chunks) == 10 and all(len(c) == 1 for step in chunks for c in step)
    joined = [sum((step[i] for step in chunks), []) for i in range(3)]
    assert joined == pipe.generate(rows, pixels, max_new_tokens=10, eos_ids=())


def test_auto_layout_copies_only_what_memory_allows(llama, monkeypatch):
    """On CPU, "auto" keeps the decode copy of the decoder's weights only where it fits in half the
    available memory; otherwise it generates from the model's own weights."""
    from llava_jax import generate

    _, pipe = llama
    assert jax.default_backend() == "cpu"
    decoder_bytes = sum(a.nbytes for a in jax.tree.leaves(pipe._state["decoder"]))
    monkeypatch.setattr(generate, "available_memory_bytes", lambda: 2 * decoder_bytes)
    assert llava_jax.load(pipe.directory, dtype="float32")._generator.layout == "copy"
    monkeypatch.setattr(generate, "available_memory_bytes", lambda: 2 * decoder_bytes - 1)
    assert llava_jax.load(pipe.directory, dtype="float32")._generator.layout == "scanned"
    monkeypatch.setattr(generate, "available_memory_bytes", lambda: None)  # unknown: the fast layout
    assert llava_jax.load(pipe.directory, dtype="float32")._generator.layout == "copy"


@pytest.mark.parametrize("layout", ["copy", "scanned"])
def test_generation_on_a_mesh_equals_one_device(llama, batch, layout):
    """Parameters laid out over (data, fsdp, tensor): the same tokens, generated and streamed."""
    model, pipe = llama
    rows, pixels = batch
    rows, pixels = rows + rows[:1], np.concatenate([pixels, pixels[:1]])  # 4 rows: the data axis divides them
    expected = pipe.generate(rows, pixels, max_new_tokens=12, eos_ids=())
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = llava_jax.load(pipe.directory, dtype="float32", mesh=mesh, generation_layout=layout)
    assert sharded._generator.layout == layout
    kernel = sharded._state["decoder"]["layers"]["attn"]["q_proj"]["kernel"].get_value()
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    assert sharded.generate(rows, pixels, max_new_tokens=12, eos_ids=()) == expected
    steps = list(sharded.generate_stream(rows, pixels, max_new_tokens=5, eos_ids=()))
    assert [sum((step[i] for step in steps), []) for i in range(4)] == [r[:5] for r in expected]


def test_vision_tower_runs_once_per_image(llama, batch):
    _, pipe = llama
    rows, pixels = batch
    calls = []  # one entry per image the vision tower runs on
    compute = pipe.feature_cache.compute
    pipe.feature_cache.compute = lambda pixels, sizes: calls.extend([1] * len(pixels)) or compute(pixels, sizes)
    try:
        pipe.feature_cache.clear()
        first = pipe.generate(rows[:1], pixels[:1], max_new_tokens=3, eos_ids=())
        other_prompt = [rows[0][:-2] + [7, 8, 9]]
        pipe.generate(other_prompt, pixels[:1], max_new_tokens=3, eos_ids=())
        assert len(calls) == 1
        assert pipe.generate(rows[:1], pixels[:1], max_new_tokens=3, eos_ids=()) == first
        pipe.generate(rows[1:2], pixels[1:2], max_new_tokens=3, eos_ids=())
        assert len(calls) == 2
        pipe.generate(rows, pixels, max_new_tokens=3, eos_ids=())  # two cached, one new: one batched run
        assert len(calls) == 3
    finally:
        pipe.feature_cache.compute = compute


def test_length_limits_and_input_errors(llama, batch):
    _, pipe = llama
    rows, pixels = batch
    context = pipe.config.text.max_position_embeddings  # 256 in the tiny config
    near_end = [[1] + [5] * (context - 7)]
    assert len(pipe.generate(near_end, max_new_tokens=NEW, eos_ids=())[0]) == 6  # ends at the context
    with pytest.raises(PromptTooLong, match="context of 256 tokens"):
        pipe.generate([[1] + [5] * context], max_new_tokens=4)
    with pytest.raises(ImageTokenMismatch, match="16 image tokens .* 48 features"):
        pipe.generate(rows[:1], pixels, max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        pipe.generate([[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        pipe.generate(rows[:1], pixels[:1], max_new_tokens=4, stop=("x",))


def test_stop_helpers():
    assert find_stop("abc###def", ("###", "zz")) == 3 and find_stop("abc", ("#",)) is None
    assert cut_at_stop("a b</s>c", ("</s>",)) == "a b"
    assert [bucket(n) for n in (1, 16, 17, 33, 297, 300, 1000)] == [16, 16, 20, 40, 320, 320, 1024]
