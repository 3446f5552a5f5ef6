"""Weight-only int8/int4 (llava_jax.quant): formats, quality against float32, GGUF quants kept as they
are, stored quantized models, sharding, and the memory of the 7B/13B presets (abstract shapes)."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llava_jax
from llava_jax import quant
from llava_jax import sharding as shd
from llava_jax.config import preset
from llava_jax.errors import ConfigError
from llava_jax.model.llava import LlavaModel
from tests import reference as R
from tests.gguf_reference import mmproj_contents, round_f16_tensors, text_contents
from tests.test_gguf import write_pair

# 64-wide text model: every kernel's input dimension divides into int4's 32-blocks.
TEXT = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def kl(p_logits, q_logits) -> float:
    """Mean KL(p || q) over positions, of float64 log-softmaxes."""
    p = jax.nn.log_softmax(np.asarray(p_logits, np.float64), -1)
    q = jax.nn.log_softmax(np.asarray(q_logits, np.float64), -1)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = R.build_llava(R.llava_hf_config(text=TEXT), seed=1, scale=0.3)
    return R.save(model, str(tmp_path_factory.mktemp("quant")))


@pytest.fixture(scope="module")
def float32(tiny):
    return llava_jax.load(tiny, dtype="float32")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [[1] + list(rng.integers(3, 90, n)) for n in (5, 13, 2)]


# -- formats --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [quant.QuantSpec(8), quant.QuantSpec(8, 32), quant.QuantSpec(4, 32)])
def test_quantize_array_rounds_each_block_to_its_nearest_step(spec):
    w = np.random.default_rng(0).standard_normal((2, 64, 24)).astype(np.float32)  # [L, in, out]
    q, scale = quant.quantize_array(w, spec, np.float32)
    nb = 1 if spec.block is None else 64 // spec.block
    assert q.shape == w.shape and scale.shape == (2, nb, 24)
    assert q.dtype == (np.int8 if spec.bits == 8 else jnp.int4)
    for layer in range(2):  # a loop over blocks, written out: scale = amax / qmax, q = round(w / scale)
        for b in range(nb):
            rows = slice(b * 64 // nb, (b + 1) * 64 // nb)
            block = w[layer, rows]
            step = np.abs(block).max(0) / spec.qmax
            np.testing.assert_allclose(scale[layer, b], step, rtol=1e-6)
            np.testing.assert_array_equal(q[layer, rows].astype(np.int8), np.round(block / step))
    deq = np.asarray(quant.dequantize(jnp.asarray(q), jnp.asarray(scale), jnp.float32))
    bound = np.repeat(scale, 64 // nb, axis=1) / 2
    assert np.all(np.abs(deq - w) <= bound * (1 + 1e-5))


def test_int8_product_of_split_activations_matches_the_float_product():
    """The CPU decode product: int8 weights x activations split into two int8 parts."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.integers(-127, 128, (96, 64)), jnp.int8)
    scale = jnp.asarray(rng.random(96) * 0.01, jnp.float32)
    for n in (1, 3, 8, 70):  # 70 rows: the prefill orientation
        x = jnp.asarray(rng.standard_normal((n, 64)) * 3, jnp.float32)
        want = np.asarray(x, np.float64) @ (np.asarray(q, np.float64) * np.asarray(scale)[:, None]).T
        got = np.asarray(quant.int8_product(q, scale, x))
        # the split keeps about 15 bits of each activation: relative error ~ 1 / (127 * 254 * 2)
        np.testing.assert_allclose(got, want, atol=np.abs(want).max() * 2e-4)


def test_mode_errors_name_the_choices(tiny):
    with pytest.raises(ConfigError, match="int8"):
        llava_jax.load(tiny, dtype="float32", quantize="int3")


# -- quality -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["copy", "scanned"])
def test_int8_logits_and_greedy_tokens_follow_float32(tiny, float32, prompts, layout):
    pipe = llava_jax.load(tiny, dtype="float32", quantize="int8", generation_layout=layout)
    kernel = pipe._state["decoder"]["layers"]["mlp"]["up_proj"]
    assert kernel["qvalue"][...].dtype == jnp.int8 and "kernel" not in kernel
    ids = np.array([prompts[1]], np.int32)
    assert kl(float32.logits(ids), pipe.logits(ids)) < 1e-3  # measured 1.1e-4
    reference = float32.generate(prompts, max_new_tokens=16)
    generated = pipe.generate(prompts, max_new_tokens=16)
    # The first two prompts' continuations never come near a tie: the same 16 (or up to eos) tokens.
    assert generated[:2] == reference[:2]
    # Along each float32 continuation, int8 picks float32's token wherever float32's top-2 margin exceeds
    # twice int8's largest logit error there (the third prompt meets a near-tie, margin 0.026 < 0.04,
    # at its 6th token and then goes its own way).
    decided = agreed = 0
    for prompt, continuation in zip(prompts, reference):
        seq = np.array([prompt + continuation], np.int32)
        want = float32.logits(seq)[0, len(prompt) - 1 : -1]
        got = pipe.logits(seq)[0, len(prompt) - 1 : -1]
        top2 = np.sort(want, -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(want - got).max(-1)
        decided += clear.sum()
        agreed += (want.argmax(-1) == got.argmax(-1))[clear].sum()
    assert agreed == decided >= 30


def test_int4_keeps_32_blocks_and_its_kl_is_bounded(tiny, float32, prompts):
    pipe = llava_jax.load(tiny, dtype="float32", quantize="int4")
    up = pipe._state["decoder"]["layers"]["mlp"]["up_proj"]
    assert up["qvalue"][...].dtype == jnp.int4 and up["scale"][...].shape == (3, 64 // 32, 96)
    ids = np.array([prompts[1]], np.int32)
    divergence = kl(float32.logits(ids), pipe.logits(ids))
    print(f"int4 KL vs float32: {divergence:.2e}")
    assert divergence < 0.1  # measured 2.7e-2 on this random model (int8: 1.1e-4)
    # both layouts run the same quantized model (the copy layout re-quantizes int4 per channel to int8)
    copy = pipe.generate(prompts, max_new_tokens=4)
    assert all(len(r) == 4 for r in copy)


def test_vision_tower_projector_and_embeddings_stay_float(tiny):
    pipe = llava_jax.load(tiny, dtype="bfloat16", quantize="int8")
    state = pipe._state
    assert state["decoder"]["embed"][...].dtype == jnp.bfloat16
    for part in ("vision", "projector"):
        assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(state[part]))
    assert state["decoder"]["layers"]["attn"]["q_proj"]["scale"][...].dtype == jnp.bfloat16
    # bfloat16 activations through the int8 decode products (the "copy" layout on CPU)
    ids = [[1, 5, 9, 13, 17]]
    float_tokens = llava_jax.load(tiny, dtype="bfloat16").generate(ids, max_new_tokens=4, eos_ids=())
    assert len(pipe.generate(ids, max_new_tokens=4, eos_ids=())[0]) == 4
    assert pipe.generate(ids, max_new_tokens=1, eos_ids=()) == [float_tokens[0][:1]]


# -- GGUF quants ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_model():
    hf = R.build_llava(R.llava_hf_config(text=TEXT), seed=2, scale=0.3)
    round_f16_tensors(hf)
    return hf


@pytest.mark.parametrize("qtype, bits", [(gguf.GGMLQuantizationType.Q8_0, 8), (gguf.GGMLQuantizationType.Q4_0, 4)])
def test_gguf_quants_load_as_they_are_stored(gguf_model, tmp_path, qtype, bits):
    model_path, mmproj_path = write_pair(str(tmp_path), text_contents(gguf_model, quantize=qtype),
                                         mmproj_contents(gguf_model))  # fmt: skip
    dequantized = llava_jax.load(model_path, mmproj=mmproj_path, dtype="float32")
    kept = llava_jax.load(model_path, mmproj=mmproj_path, dtype="float32", quantize="auto")
    q_proj = kept._state["decoder"]["layers"]["attn"]["q_proj"]
    assert q_proj["qvalue"][...].dtype == (jnp.int8 if bits == 8 else jnp.int4)
    assert q_proj["scale"][...].shape == (3, 64 // 32, 64)
    # the file's integers and scales, Q/K rows un-permuted: the same weights gguf dequantizes
    float_kernel = dequantized._state["decoder"]["layers"]["attn"]["q_proj"]["kernel"][...]
    rebuilt = quant.dequantize(q_proj["qvalue"][...], q_proj["scale"][...], jnp.float32)
    np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(float_kernel))
    ids = np.array([[1] + list(range(5, 40))], np.int32)
    np.testing.assert_allclose(kept.logits(ids), dequantized.logits(ids), atol=1e-4, rtol=1e-4)
    assert kept.generate(ids, max_new_tokens=8) == dequantized.generate(ids, max_new_tokens=8)


def test_other_gguf_quants_are_requantized(gguf_model, tmp_path):
    """Q4_1 / Q5_0 (like the K-quants, which the gguf package cannot write) go through float to int4 / int8."""
    contents = text_contents(gguf_model)
    q41, q50 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q5_0
    for name, w in list(contents.tensors.items()):
        if w.ndim == 2 and name.startswith("blk."):
            qtype = q50 if "ffn_down" in name else q41
            contents.tensors[name] = (gguf.quants.quantize(w, qtype), qtype)
    model_path, mmproj_path = write_pair(str(tmp_path), contents, mmproj_contents(gguf_model))
    dequantized = llava_jax.load(model_path, mmproj=mmproj_path, dtype="float32")
    auto = llava_jax.load(model_path, mmproj=mmproj_path, dtype="float32", quantize="auto")
    layers = auto._state["decoder"]["layers"]
    assert layers["attn"]["q_proj"]["qvalue"][...].dtype == jnp.int4  # Q4_1 -> int4 32-blocks
    assert layers["mlp"]["down_proj"]["qvalue"][...].dtype == jnp.int8  # Q5_0 -> int8 per channel
    assert "kernel" in auto._state["decoder"]["lm_head"]  # output.weight is F32 in this file: stays float
    # re-quantized within one int4 step (half a block scale) of the file's own values
    q_proj = layers["attn"]["q_proj"]
    rebuilt = np.asarray(quant.dequantize(q_proj["qvalue"][...], q_proj["scale"][...], jnp.float32))
    want = np.asarray(dequantized._state["decoder"]["layers"]["attn"]["q_proj"]["kernel"][...])
    step = np.repeat(np.asarray(q_proj["scale"][...]), 32, axis=1)
    assert np.all(np.abs(rebuilt - want) <= step / 2 * (1 + 1e-5))
    assert quant.gguf_spec(["Q6_K", "Q4_K"], 4096) == quant.QuantSpec(8)
    assert quant.gguf_spec(["Q4_K", "Q4_K"], 4096) == quant.QuantSpec(4, 32)
    assert quant.gguf_spec(["Q4_0", "Q8_0"], 4096) == quant.QuantSpec(8)
    assert quant.gguf_spec(["F16", "Q8_0"], 4096) is None


# -- stored quantized, sharded ---------------------------------------------------------------------------


def test_convert_stores_quantized_and_loads_back(tiny, tmp_path, prompts):
    from llava_jax.convert import convert

    out = str(tmp_path / "int8")
    convert(tiny, out, dtype="float32", progress=False, quantize="int8")
    direct = llava_jax.load(tiny, dtype="float32", quantize="int8")
    stored = llava_jax.load(out, dtype="float32")
    assert stored._state["decoder"]["layers"]["mlp"]["down_proj"]["qvalue"][...].dtype == jnp.int8
    ids = np.array([prompts[0]], np.int32)
    np.testing.assert_array_equal(stored.logits(ids), direct.logits(ids))


def test_quantized_model_on_a_mesh_equals_one_device(tiny, prompts):
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    one = llava_jax.load(tiny, dtype="float32", quantize="int4")
    sharded = llava_jax.load(tiny, dtype="float32", quantize="int4", mesh=mesh, generation_layout="scanned")
    qvalue = sharded._state["decoder"]["layers"]["mlp"]["up_proj"]["qvalue"][...]
    assert qvalue.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    ids = np.array([prompts[1]], np.int32)
    np.testing.assert_allclose(sharded.logits(ids), one.logits(ids), atol=1e-5)


# -- memory ---------------------------------------------------------------------------------------------------


def decoder_bytes(config, mode):
    def build():
        model = LlavaModel(config, rngs=nnx.Rngs(0))
        return quant.quantize_model(model, mode) if mode else model

    state = nnx.state(nnx.eval_shape(build))
    return quant.parameter_bytes(state["decoder"]), quant.parameter_bytes(state)


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-1.5-13b"])
def test_memory_of_the_presets_from_abstract_shapes(name):
    config = preset(name, param_dtype="bfloat16", dtype="bfloat16")
    bf16, total16 = decoder_bytes(config, None)
    int8, total8 = decoder_bytes(config, "int8")
    int4, total4 = decoder_bytes(config, "int4")
    print(f"{name}: model bf16 {total16 / 1e9:.2f} GB, int8 {total8 / 1e9:.2f} GB, int4 {total4 / 1e9:.2f} GB; "
          f"decoder int8 {int8 / bf16:.3f}x, int4 {int4 / bf16:.3f}x")  # fmt: skip
    assert int8 <= 0.55 * bf16
    assert int4 <= 0.30 * bf16
    assert total16 - bf16 == total8 - int8 == total4 - int4  # vision tower and projector unchanged


def test_no_float_copy_of_a_quantized_kernel_stays_alive(tmp_path):
    """Kernels are quantized as they are read: after loading, no float array of a decoder kernel's shape
    exists anywhere in the process (this model's shapes are used by no other test)."""
    import gc

    text = dict(hidden_size=96, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
                num_hidden_layers=2)  # fmt: skip
    directory = R.save(R.build_llava(R.llava_hf_config(text=text), seed=5), str(tmp_path))
    pipe = llava_jax.load(directory, dtype="float32", quantize="int4", generation_layout="scanned")
    gc.collect()
    kernel_shapes = {(2, 96, 96), (2, 96, 160), (2, 160, 96)}
    live = [a for a in jax.live_arrays() if a.shape in kernel_shapes]
    assert live and all(a.dtype == jnp.int4 for a in live), [(a.shape, a.dtype) for a in live]
    assert pipe.generate([[1, 5, 7]], max_new_tokens=2)
