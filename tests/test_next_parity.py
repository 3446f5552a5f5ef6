"""LLaVA-NeXT: logit parity with transformers' LlavaNextForConditionalGeneration, llava-hf NeXT import.

Tiny random models with 28 px tiles and pinpoints [[28,56],[56,28],[56,56],[84,28],[28,84]]; both
models get the same pixel_values / image_sizes from transformers' LlavaNextImageProcessor.
"""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

import llava_jax
from llava_jax.config import LlavaConfig
from llava_jax.model import anyres, anyres_merge
from llava_jax.model.llava import ImageTokenMismatch
from tests import reference as R

transformers.logging.set_verbosity_error()

# (height, width): wide, tall, square, smaller than a tile (ties: the first of the smallest pinpoints),
# larger than every pinpoint
SIZES = {"wide": (20, 70), "tall": (90, 30), "square": (50, 50), "small": (10, 12), "huge": (200, 150)}

CASES = {
    "llama": dict(),
    "mistral-window": dict(text_model="mistral", text=dict(sliding_window=40, num_key_value_heads=3, head_dim=16)),
    # Yi-34B style: LLaMA text model, rope_theta 5e6, GQA, the image token inside the vocabulary
    "yi": dict(text=dict(vocab_size=128, rope_theta=5e6, num_key_value_heads=2), image_token_index=100),
}  # fmt: skip


def image(size_hw, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size_hw, 3), dtype=np.uint8))


def processed(sizes):
    out = R.next_image_processor()([image(s, i) for i, s in enumerate(sizes)], return_tensors="np")
    return out["pixel_values"], out["image_sizes"]


def sequence(rng, image_token, counts, text=(5, 3, 7)):
    """Text, then for each image its tokens and more text."""
    parts = [rng.integers(1, 90, text[0])]
    for i, n in enumerate(counts):
        parts += [np.full(n, image_token), rng.integers(1, 90, text[1 + i % 2])]
    return np.concatenate(parts)


def right_pad(rows):
    width = max(len(r) for r in rows)
    ids = np.stack([np.pad(r, (0, width - len(r)), constant_values=R.PAD_TOKEN) for r in rows])
    mask = np.stack([np.arange(width) < len(r) for r in rows]).astype(np.int64)
    return ids, mask


def reference(hf_model, ids, pixels, sizes, mask=None):
    return R.reference_logits(hf_model, ids, pixels, attention_mask=mask, image_sizes=torch.as_tensor(sizes))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kwargs = dict(CASES[request.param])
    hf_model = R.build_llava(R.llava_next_hf_config(**kwargs))
    directory = R.save(hf_model, str(tmp_path_factory.mktemp(request.param)))
    return hf_model, llava_jax.load(directory, dtype="float32")


def test_every_aspect_ratio_in_one_batch_and_two_images_in_one_sequence(case):
    """Row 0: two images of different sizes; rows 1-5: one image each, of every aspect ratio; right-padded."""
    hf_model, pipe = case
    sizes = [SIZES["tall"], SIZES["small"], *SIZES.values()]
    pixels, image_sizes = processed(sizes)
    counts = [anyres.num_image_tokens(pipe.config, s) for s in image_sizes]
    assert len(set(counts[2:])) == 5  # every aspect ratio a different layout
    rng = np.random.default_rng(0)
    rows = [sequence(rng, pipe.config.image_token_id, counts[:2])]
    rows += [sequence(rng, pipe.config.image_token_id, [n]) for n in counts[2:]]
    ids, mask = right_pad(rows)
    ours = pipe.logits(ids, pixels, image_sizes, attention_mask=mask)
    ref = reference(hf_model, ids, pixels, image_sizes, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return llava_jax.load(R.save(R.build_llava(R.llava_next_hf_config()), str(tmp_path_factory.mktemp("next"))),
                          dtype="float32")  # fmt: skip


def test_new_image_sizes_reuse_the_compiled_program(pipe):
    """The token layout is a host-computed index of a shape fixed by (N, P): two images with different
    grids (1 x 3 and 3 x 1 tiles) and different token counts run through one compiled forward."""
    (pix_a, size_a), (pix_b, size_b) = processed([SIZES["wide"]]), processed([SIZES["tall"]])
    assert pix_a.shape == pix_b.shape
    count_a, count_b = (anyres.num_image_tokens(pipe.config, s[0]) for s in (size_a, size_b))
    assert count_a != count_b
    rng = np.random.default_rng(2)
    ids, mask = right_pad([sequence(rng, pipe.config.image_token_id, [n]) for n in (count_a, count_b)])
    before = pipe._forward._cache_size()
    pipe.logits(ids[:1], pix_a, size_a, attention_mask=mask[:1])
    pipe.logits(ids[1:], pix_b, size_b, attention_mask=mask[1:])
    assert pipe._forward._cache_size() == before + 1


def test_feature_order_matches_pack_image_features():
    """Our gather index reproduces LlavaNextModel.pack_image_features on labelled features, for many sizes."""
    from transformers.models.llava_next import modeling_llava_next as hf_next

    cfg = LlavaConfig.from_hf(R.llava_next_hf_config().to_dict())
    hf_cfg = types_namespace(cfg)
    rng = np.random.default_rng(3)
    sizes = [tuple(int(v) for v in rng.integers(5, 300, 2)) for _ in range(40)]
    p = max(anyres.num_tiles(s, cfg.image_grid_pinpoints, 28) for s in sizes)
    f = cfg.tokens_per_tile
    labels = torch.arange(len(sizes) * p * f, dtype=torch.float64).reshape(len(sizes), p, f, 1)
    per_image = [labels[i, : anyres.num_tiles(s, cfg.image_grid_pinpoints, 28)] for i, s in enumerate(sizes)]
    packed, _ = hf_next.LlavaNextModel.pack_image_features(
        hf_cfg, per_image, torch.tensor(sizes), "default", image_newline=torch.tensor([-1.0], dtype=torch.float64)
    )
    index = anyres_merge.feature_index(cfg, sizes, p)
    expected = torch.cat(list(packed))[:, 0].numpy().astype(np.int64)
    np.testing.assert_array_equal(np.where(index == len(sizes) * p * f, -1, index), expected)


def types_namespace(cfg):
    import types

    return types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size),
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints]))  # fmt: skip


# -- bad input --------------------------------------------------------------------------------------


def test_next_input_errors(pipe):
    pixels, image_sizes = processed([SIZES["wide"], SIZES["square"]])
    n = sum(anyres.num_image_tokens(pipe.config, s) for s in image_sizes)
    ids = np.r_[[1], np.full(n, pipe.config.image_token_id), [2]][None]
    short = np.r_[[1], np.full(n - 1, pipe.config.image_token_id), [2]][None]
    with pytest.raises(ImageTokenMismatch, match=f"{n - 1} image tokens .* {n} features"):
        pipe.logits(short, pixels, image_sizes)
    with pytest.raises(ValueError, match="need image_sizes"):
        pipe.logits(ids, pixels)
    with pytest.raises(ValueError, match="lists 1 images but pixel_values holds 2"):
        pipe.logits(ids, pixels, image_sizes[:1])
    with pytest.raises(ValueError, match=r"cut into 5 tiles, but pixel_values holds 4"):
        pipe.logits(ids, pixels[:, :4], image_sizes)
    with pytest.raises(ValueError, match=r"must be \[N, P, C, H, W\]"):
        pipe.model.image_features(pixels[:, 0], image_sizes)


# -- import -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hub", "v5"])
def test_next_key_layouts_load_identically(tmp_path, layout):
    hf_model = R.build_llava(R.llava_next_hf_config())
    reference_dir = R.save(hf_model, str(tmp_path / "save_pretrained"))
    directory = R.save(hf_model, str(tmp_path / layout), layout=layout)
    a, b = llava_jax.load(reference_dir, dtype="float32"), llava_jax.load(directory, dtype="float32")
    flat = lambda pipe: {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(pipe._state)}  # noqa: E731
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb) and ("image_newline",) in fa
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key])
    np.testing.assert_array_equal(fa[("image_newline",)], hf_model.model.image_newline.detach().numpy())


PUBLISHED_TEXT = {  # text_config of the llava-hf LLaVA-NeXT releases (as their config.json list them)
    "vicuna-7b": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "model_type": "llama",
                  "pad_token_id": 0, "rms_norm_eps": 1e-05, "vocab_size": 32064},
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "intermediate_size": 14336,
                   "max_position_embeddings": 32768, "model_type": "mistral", "num_key_value_heads": 8,
                   "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32064},
    "34b": {"architectures": ["LlamaForCausalLM"], "hidden_size": 7168, "intermediate_size": 20480,
            "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 56,
            "num_hidden_layers": 60, "num_key_value_heads": 8, "pad_token_id": 0, "rms_norm_eps": 1e-05,
            "rope_theta": 5000000.0, "vocab_size": 64064},
}  # fmt: skip
PUBLISHED_IMAGE_TOKEN = {"vicuna-7b": 32000, "mistral-7b": 32000, "34b": 64000}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TEXT))
def test_published_next_configs(name):
    hf = {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
          "ignore_index": -100, "image_token_index": PUBLISHED_IMAGE_TOKEN[name], "projector_hidden_act": "gelu",
          "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
          "text_config": PUBLISHED_TEXT[name], "use_image_newline_parameter": True,
          "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                            "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                            "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
          "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}  # fmt: skip
    cfg = LlavaConfig.from_hf(hf)
    text = PUBLISHED_TEXT[name]
    assert (cfg.image_token_id, cfg.text.vocab_size) == (PUBLISHED_IMAGE_TOKEN[name], text["vocab_size"])
    assert cfg.text.rope_theta == text.get("rope_theta", 10000.0)
    assert cfg.text.num_kv_heads == text.get("num_key_value_heads", cfg.text.num_heads)
    assert cfg.text.sliding_window is None and cfg.has_image_newline and cfg.semantics == "hf"
    assert cfg.text.head_dim == 128
    # the parameter count transformers gives the same config
    with torch.device("meta"):
        hf_model = transformers.LlavaNextForConditionalGeneration(transformers.LlavaNextConfig(**hf))
    expected = sum(p.numel() for p in hf_model.parameters())
    from llava_jax.pipeline import abstract_model

    _, state = abstract_model(cfg)
    assert sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(state)) == expected


@pytest.mark.parametrize("layout", ["copy", "scanned"])
def test_greedy_generation_matches_transformers(tmp_path_factory, layout):
    """A left-padded batch: two images of different sizes in row 0, one in row 1; 24 greedy tokens."""
    hf_model = R.build_llava(R.llava_next_hf_config(), seed=3, scale=0.5)
    directory = R.save(hf_model, str(tmp_path_factory.mktemp(f"next-gen-{layout}")))
    pipe = llava_jax.load(directory, dtype="float32", generation_layout=layout)
    pixels, image_sizes = processed([SIZES["wide"], SIZES["small"], SIZES["huge"]])
    counts = [anyres.num_image_tokens(pipe.config, s) for s in image_sizes]
    rng = np.random.default_rng(4)
    rows = [sequence(rng, pipe.config.image_token_id, counts[:2]), sequence(rng, pipe.config.image_token_id, counts[2:])]
    width = max(map(len, rows))
    ids = np.stack([np.pad(r, (width - len(r), 0), constant_values=R.PAD_TOKEN) for r in rows])
    mask = np.stack([np.arange(width) >= width - len(r) for r in rows]).astype(np.int64)
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                                pixel_values=torch.as_tensor(pixels), image_sizes=torch.as_tensor(image_sizes),
                                max_new_tokens=24, do_sample=False, pad_token_id=R.PAD_TOKEN, eos_token_id=None)  # fmt: skip
    expected = out[:, width:].tolist()
    assert pipe.generate(ids, pixels, image_sizes, attention_mask=mask, max_new_tokens=24, eos_ids=()) == expected
