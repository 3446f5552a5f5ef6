"""LoRA adapters: a fresh adapter is the identity, merging preserves logits, stacking and sharding, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax import sharding as shd
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.errors import ConfigError
from llava_jax.model.layers import Linear
from llava_jax.model.llava import LlavaModel
from llava_jax.train import lora

LAYERS, RANK, ALPHA = 2, 4, 8.0


def tiny() -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=LAYERS, num_heads=4, image_size=28,
                            patch_size=7),  # fmt: skip
        text=TextConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=LAYERS, num_heads=6,
                        num_kv_heads=2, head_dim=8),  # fmt: skip
        image_token_id=95,
    )


def inputs():
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(1, 90, 5), np.full(16, 95), rng.integers(1, 90, 6)])[None]
    pixels = rng.normal(size=(1, 3, 28, 28)).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(pixels)


def logits(model, ids, pixels) -> np.ndarray:
    """The model's forward pass, jitted (eager nnx calls dispatch op by op and take seconds)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, p))(state, ids, pixels))


def randomise_lora_b(model, seed=1):
    for i, (_, m) in enumerate(lora.lora_modules(model)):
        m.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(seed + i), m.lora_b.shape)


def lora_model(targets=lora.DEFAULT_TARGETS, dropout=0.0):
    model = LlavaModel(tiny(), rngs=nnx.Rngs(0))
    return lora.apply_lora(model, rank=RANK, alpha=ALPHA, dropout=dropout, targets=targets, rngs=nnx.Rngs(1))


def test_fresh_adapters_leave_logits_unchanged():
    ids, pixels = inputs()
    model = LlavaModel(tiny(), rngs=nnx.Rngs(0))
    base = logits(model, ids, pixels)
    lora.apply_lora(model, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(logits(model, ids, pixels), base)


def test_default_targets_are_every_llm_linear_but_lm_head():
    model = lora_model()
    paths = {p for p, _ in lora.lora_modules(model)}
    expected = {f"decoder/layers/attn/{n}_proj" for n in "qkvo"}
    expected |= {f"decoder/layers/mlp/{n}_proj" for n in ("gate", "up", "down")}
    assert paths == expected
    assert type(model.decoder.lm_head) is Linear and type(model.projector.linears[0]) is Linear
    assert type(model.vision.layers.attn.q_proj) is Linear


def test_merged_equals_unmerged_and_dict_merge_agrees():
    ids, pixels = inputs()
    model = lora_model(targets=lora.DEFAULT_TARGETS + r"|projector/linears/0|vision/layers/mlp/fc1")
    randomise_lora_b(model)
    unmerged = logits(model, ids, pixels)
    settings = {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": lora.DEFAULT_TARGETS}  # as a run stores them
    merged_dict = lora.merge_lora_params(nnx.to_pure_dict(nnx.state(model)), settings)
    lora.merge_lora(model)
    assert not lora.lora_modules(model)
    merged = logits(model, ids, pixels)
    base = logits(LlavaModel(tiny(), rngs=nnx.Rngs(0)), ids, pixels)
    assert np.abs(unmerged - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(merged, unmerged, atol=2e-5, rtol=1e-5)
    # the merged model has the base model's tree, and the dict fold gives the same values
    plain = nnx.to_pure_dict(nnx.state(model))
    assert jax.tree.structure(plain) == jax.tree.structure(merged_dict)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, merged_dict)


def test_lora_forward_is_the_peft_formula():
    model = lora_model()
    randomise_lora_b(model)
    q = model.decoder.layers.attn.q_proj
    x = jax.random.normal(jax.random.key(3), (2, 48))
    layer = lambda a: a[0]
    sliced = nnx.merge(*(lambda g, s: (g, jax.tree.map(layer, s)))(*nnx.split(q)))
    want = x @ q.kernel[0] + (ALPHA / RANK) * (x @ q.lora_a[0]) @ q.lora_b[0]
    np.testing.assert_allclose(np.asarray(sliced(x)), np.asarray(want), atol=1e-5)


def test_adapters_are_stacked_initialised_as_peft_and_sharded_by_logical_axes():
    model = lora_model()
    q, down = model.decoder.layers.attn.q_proj, model.decoder.layers.mlp.down_proj
    assert q.lora_a.shape == (LAYERS, 48, RANK) and q.lora_b.shape == (LAYERS, RANK, 48)
    assert down.lora_a.shape == (LAYERS, 80, RANK) and down.lora_b.shape == (LAYERS, RANK, 48)
    assert q.lora_a.get_metadata()["axes"] == ("layers", "embed", None)
    assert q.lora_b.get_metadata()["axes"] == ("layers", None, "heads")
    assert down.lora_a.get_metadata()["axes"] == ("layers", "mlp", None)
    a = np.asarray(q.lora_a[...])
    assert np.abs(a).max() <= 48**-0.5 and np.abs(a).max() > 0.8 * 48**-0.5  # U(-1/sqrt(in), 1/sqrt(in))
    assert not np.any(np.asarray(q.lora_b[...]))
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = shd.state_shardings(nnx.state(model), mesh)
    flat = dict(nnx.to_flat_state(shardings))
    assert flat[("decoder", "layers", "attn", "q_proj", "lora_a")].spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert flat[("decoder", "layers", "attn", "q_proj", "lora_b")].spec == jax.sharding.PartitionSpec(None, None, "tensor")
    assert flat[("decoder", "layers", "mlp", "down_proj", "lora_a")].spec == jax.sharding.PartitionSpec(None, "tensor", None)


def test_sharded_lora_logits_equal_single_device():
    ids, pixels = inputs()
    model = lora_model()
    randomise_lora_b(model)
    want = logits(model, ids, pixels)
    graphdef, state = nnx.split(model)
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    state = jax.device_put(state, shd.state_shardings(state, mesh))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, p))(state, ids, pixels)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_lora_param_regex_selects_only_adapters():
    model = lora_model()
    pattern = __import__("re").compile(lora.LORA_PARAMS)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    chosen = [p for p in paths if pattern.fullmatch(p)]
    assert len(chosen) == 2 * 7 and all(p.endswith(("lora_a", "lora_b")) for p in chosen)


def test_dropout_is_keyed_and_off_by_default():
    ids, pixels = inputs()
    model = lora_model(dropout=0.5)
    randomise_lora_b(model)
    off = logits(model, ids, pixels)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, key):
        m = nnx.merge(graphdef, state)
        lora.set_dropout(m, key)
        return m(ids, pixels)

    a, b = forward(state, jax.random.key(0)), forward(state, jax.random.key(0))
    c = forward(state, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4
    assert np.abs(np.asarray(a) - off).max() > 1e-4
    # layers of a stack draw different masks
    lora.set_dropout(model, jax.random.key(0))
    keys = np.asarray(model.decoder.layers.attn.q_proj.dropout_key[...])
    assert keys.shape == (LAYERS, 2) and not np.array_equal(keys[0], keys[1])
    lora.set_dropout(model, None)
    np.testing.assert_array_equal(logits(model, ids, pixels), off)


def test_dropout_zeroes_inputs_at_the_rate_and_rescales():
    x = jnp.ones((4000, 48))
    model = lora_model(dropout=0.25)
    q = model.decoder.layers.attn.q_proj
    q.lora_a[...] = jnp.broadcast_to(jnp.eye(48, RANK), q.lora_a.shape)
    q.lora_b[...] = jnp.broadcast_to(jnp.eye(RANK, 48), q.lora_b.shape)
    q.kernel[...] = jnp.zeros_like(q.kernel[...])
    lora.set_dropout(model, jax.random.key(5))
    sliced = nnx.merge(*(lambda g, s: (g, jax.tree.map(lambda a: a[0], s)))(*nnx.split(q)))
    y = np.asarray(sliced(x))[:, :RANK] / (ALPHA / RANK)  # each output = dropped-and-rescaled input
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-5)
    assert abs((y == 0).mean() - 0.25) < 0.02


def test_bad_settings_raise_config_error():
    model = LlavaModel(tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="match no Linear"):
        lora.apply_lora(model, rank=4, alpha=8, targets=r"decoder/nothing", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="rank"):
        lora.apply_lora(model, rank=0, alpha=8, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        lora.apply_lora(model, rank=4, alpha=8, targets="(", rngs=nnx.Rngs(0))


def test_settings_round_trip():
    s = lora.LoraSettings(rank=128, alpha=256, dropout=0.05)
    assert lora.LoraSettings.from_dict(s.to_dict()) == s and s.scale == 2.0
    section = {"rank": 128, "alpha": 256, "dropout": 0.05, "target": r"decoder/.*", "lr": 2e-4}  # a config's lora
    assert lora.LoraSettings.from_dict(section).targets == r"decoder/.*"


def test_train_step_pattern_gradients_reach_only_adapters_and_dropout_is_exact():
    """How a train step uses LoRA: adapters trainable, the rest frozen, dropout keyed by (seed, step)."""
    ids, pixels = inputs()
    model = lora_model(dropout=0.3)
    randomise_lora_b(model)
    graphdef, adapters, rest = nnx.split(model, lambda path, _: path[-1] in ("lora_a", "lora_b"), ...)

    @jax.jit
    def loss_and_grads(adapters, step):
        def loss(adapters):
            m = nnx.merge(graphdef, adapters, rest)
            lora.set_dropout(m, jax.random.fold_in(jax.random.key(0), step))
            return jnp.mean(m(ids, pixels) ** 2)

        return jax.value_and_grad(loss)(adapters)

    (l1, g1), (l1b, g1b), (l2, _) = loss_and_grads(adapters, 1), loss_and_grads(adapters, 1), loss_and_grads(adapters, 2)
    assert float(l1) == float(l1b) and float(l1) != float(l2)  # same step, same masks: a resumed run repeats it
    jax.tree.map(np.testing.assert_array_equal, g1, g1b)
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(g1)}
    assert len(flat) == 14 and all(np.all(np.isfinite(np.asarray(v))) for v in flat.values())
    assert np.abs(np.asarray(flat["decoder/layers/attn/q_proj/lora_a"])).max() > 0  # lora_b != 0: A gets gradient
