"""Original LLaVA checkpoints (haotian-liu format): import, logits against the original code, bad input.

References: transformers' LlavaForConditionalGeneration / LlavaNextForConditionalGeneration holding
the same weights where the two formats mean the same model, and otherwise `OriginalReference`
(tests/original_reference.py): the original LLaVA's own vision tower, projector and
`prepare_inputs_labels_for_multimodal`, with transformers' LLaMA/Mistral as its language model.
"""

import json
import os
import sys
import types

import numpy as np
import pytest
import torch
import transformers

import llava_jax
from llava import mm_utils
from llava.model.multimodal_projector.builder import build_vision_projector
from llava_jax.checkpoints import torch_bin
from llava_jax.config import VisionConfig
from llava_jax.checkpoints.safetensors_io import CheckpointError
from llava_jax.convert import convert
from llava_jax.model import anyres
from tests import reference as R
from tests.reference import image, leaves, sequence
from tests.original_reference import OriginalReference, collapse_image_tokens, write_clip_dir, write_original

transformers.logging.set_verbosity_error()

TILE = 28
# as an original config.json lists them; the original reads each pair as (width, height)
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
SIZES = {"wide": (20, 70), "tall": (90, 30), "square": (50, 50), "small": (10, 12), "huge": (200, 150)}  # (h, w)


def right_pad(rows):
    width = max(len(r) for r in rows)
    ids = np.stack([np.pad(r, (0, width - len(r)), constant_values=R.PAD_TOKEN) for r in rows])
    return ids, np.stack([np.arange(width) < len(r) for r in rows]).astype(np.int64)


def original_pixels(images, clip_dir, **model_cfg):
    """What the original feeds its model: `process_images` with the CLIP directory's processor."""
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    return mm_utils.process_images(images, processor, types.SimpleNamespace(**model_cfg))


def compare_with_original(pipe, ref, rows_of_images, seed=0):
    """Our logits on expanded ids vs the original's on ids with one -200 per image (row r of the batch
    holds rows_of_images[r]); valid positions. Returns (our processed images, the original's pixels)."""
    rng = np.random.default_rng(seed)
    flat_images = [im for row in rows_of_images for im in row]
    ours_in = pipe.image_processor(flat_images)
    counts = [anyres.num_image_tokens(pipe.config, s) for s in ours_in["image_sizes"]]
    rows, k = [], 0
    for row in rows_of_images:
        rows.append(sequence(rng, pipe.config.image_token_id, counts[k : k + len(row)]))
        k += len(row)
    ids, mask = right_pad(rows)
    ours = pipe.logits(ids, ours_in["pixel_values"], ours_in["image_sizes"], attention_mask=mask)
    original_rows = [np.asarray(collapse_image_tokens(r, pipe.config.image_token_id)[0]) for r in rows]
    original_ids, original_mask = right_pad(original_rows)
    pixels = original_pixels(flat_images, ref.tower.vision_tower_name,
                             image_aspect_ratio=getattr(ref.config, "image_aspect_ratio", None),
                             image_grid_pinpoints=getattr(ref.config, "image_grid_pinpoints", None))  # fmt: skip
    sizes_wh = [im.size for im in flat_images]
    theirs, their_mask = ref.logits(original_ids, pixels, sizes_wh, attention_mask=original_mask)
    valid = mask.astype(bool)
    assert theirs.shape[:2] == ours.shape[:2] and (their_mask.astype(bool) == valid).all()
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=0)
    return ours_in, pixels


@pytest.fixture(scope="module")
def hf15():
    return R.build_llava(R.llava_hf_config())


# -- LLaVA 1.5 ----------------------------------------------------------------------------------------


def test_15_pad_mlp2x_gelu_sharded_bin_equals_llava_hf_and_the_original(hf15, tmp_path):
    """Same weights in both formats -> the same parameters; logits equal transformers' and the original's.
    The CLIP directory is a full CLIPModel (as openai/clip-vit-large-patch14-336), found through a relative
    mm_vision_tower; the weights are PyTorch .bin shards."""
    directory = str(tmp_path / "llava-v1.5")
    write_clip_dir(os.path.join(directory, "clip"), hf15.model.vision_tower, TILE, full_clip=True)
    write_original(directory, hf15, os.path.join(directory, "clip"), weights="bin-sharded", mm_vision_tower="clip",
                   image_aspect_ratio="pad")  # fmt: skip
    assert os.path.exists(os.path.join(directory, "pytorch_model.bin.index.json"))
    pipe = llava_jax.load(directory, dtype="float32")
    hf_pipe = llava_jax.load(R.save(hf15, str(tmp_path / "hf")), dtype="float32")
    cfg = pipe.config
    assert (cfg.semantics, cfg.image_aspect_ratio, cfg.image_token_id, cfg.model_max_length) == ("original", "pad", 96, 2048)
    assert cfg.replace(semantics="hf", image_aspect_ratio="square", image_token_id=95, model_max_length=None) == hf_pipe.config
    ours, theirs = leaves(pipe), leaves(hf_pipe)
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)

    ref = OriginalReference(directory, os.path.join(directory, "clip"))
    images = [image(SIZES["wide"], 1), image(SIZES["tall"], 2), image(SIZES["small"], 3)]
    ours_in, pixels = compare_with_original(pipe, ref, [images[:2], images[2:]])
    np.testing.assert_array_equal(ours_in["pixel_values"], pixels.numpy())  # the original's 'pad' preprocessing
    # and transformers on the same pixels, image tokens renumbered to llava-hf's id
    rng = np.random.default_rng(5)
    ids = sequence(rng, 96, [16, 16])[None]
    hf_ids = np.where(ids == 96, 95, ids)
    np.testing.assert_allclose(pipe.logits(ids, ours_in["pixel_values"][:2]),
                               R.reference_logits(hf15, hf_ids, ours_in["pixel_values"][:2]), atol=1e-4, rtol=0)  # fmt: skip


def randomised(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen) / max(1, p.shape[-1]) ** 0.25)
    return module


def test_10_linear_projector_cls_patch_square(hf15, tmp_path):
    """LLaVA 1.0 style: 'linear' projector (model.mm_projector.weight), CLS kept ('cls_patch'), plain CLIP
    preprocessing (no image_aspect_ratio), safetensors weights, an absolute mm_vision_tower."""
    clip = write_clip_dir(str(tmp_path / "clip"), hf15.model.vision_tower, TILE)
    projector = randomised(build_vision_projector(types.SimpleNamespace(mm_projector_type="linear", mm_hidden_size=32,
                                                                        hidden_size=48)), 7)  # fmt: skip
    assert set(projector.state_dict()) == {"weight", "bias"}
    directory = write_original(str(tmp_path / "llava-v1"), hf15, clip, projector_type="linear",
                               projector_state=projector.state_dict(), mm_vision_select_feature="cls_patch")  # fmt: skip
    pipe = llava_jax.load(directory, dtype="float32")
    assert (pipe.config.projector_type, pipe.config.vision_feature_select_strategy) == ("linear", "full")
    assert (pipe.config.image_aspect_ratio, pipe.config.tokens_per_tile) == ("square", 17)
    ref = OriginalReference(directory, clip)
    compare_with_original(pipe, ref, [[image(SIZES["wide"], 1), image(SIZES["huge"], 2)]])


# -- LLaVA 1.6 (anyres) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def next_mistral():
    return R.build_llava(R.llava_next_hf_config(text_model="mistral", text=dict(sliding_window=None)))


def test_16_mistral_spatial_unpad_own_tower_matches_the_original(next_mistral, tmp_path):
    """Original semantics where they differ from transformers: an image smaller than a tile is cut into
    2 rows x 1 tile (transformers: 1 x 2). The checkpoint carries a fine-tuned tower, which must win over
    the CLIP directory's; pinpoints are given in their string form."""
    clip = write_clip_dir(str(tmp_path / "clip"), next_mistral.model.vision_tower, TILE)
    tuned = randomised(transformers.CLIPVisionModel(next_mistral.config.vision_config), 11).state_dict()
    directory = write_original(str(tmp_path / "llava-v1.6-mistral"), next_mistral, clip, tower_state=tuned,
                               image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                               image_grid_pinpoints=str([tuple(p) for p in PINPOINTS]))  # fmt: skip
    pipe = llava_jax.load(directory, dtype="float32")
    cfg = pipe.config
    assert (cfg.semantics, cfg.patch_merge_type, cfg.text.sliding_window) == ("original", "spatial_unpad", None)
    assert cfg.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
    assert anyres.grid_shape(SIZES["small"], PINPOINTS, TILE, "original") == (2, 1)
    np.testing.assert_array_equal(leaves(pipe)["vision.pos_embed"],
                                  tuned["embeddings.position_embedding.weight"].numpy())  # fmt: skip
    ref = OriginalReference(directory, clip)
    images = [image(SIZES[k], i) for i, k in enumerate(("small", "wide", "tall", "huge", "square"))]
    ours_in, pixels = compare_with_original(pipe, ref, [images[:2], images[2:3], images[3:4], images[4:]])
    for i, tiles in enumerate(pixels):  # the original's tiles, unpadded
        np.testing.assert_array_equal(ours_in["pixel_values"][i, : len(tiles)], tiles.numpy())


@pytest.mark.parametrize("merge", ["flat", "spatial"])
def test_16_flat_and_spatial_merges_match_the_original(next_mistral, tmp_path, merge):
    clip = write_clip_dir(str(tmp_path / "clip"), next_mistral.model.vision_tower, TILE)
    directory = write_original(str(tmp_path / merge), next_mistral, clip, image_aspect_ratio="anyres",
                               mm_patch_merge_type=merge, image_grid_pinpoints=PINPOINTS)  # fmt: skip
    pipe = llava_jax.load(directory, dtype="float32")
    assert pipe.config.patch_merge_type == merge and pipe.model.image_newline is None
    compare_with_original(pipe, OriginalReference(directory, clip),
                          [[image(SIZES["small"], 1), image(SIZES["wide"], 2)]])  # fmt: skip


def test_next_llava_hf_and_original_formats_agree_where_semantics_agree(tmp_path):
    """A llava-hf NeXT model written in the original format: the pinpoint set is symmetric, so the two
    semantics pick the same grids except on ties; on images without ties the logits equal transformers'."""
    hf_model = R.build_llava(R.llava_next_hf_config())
    clip = write_clip_dir(str(tmp_path / "clip"), hf_model.model.vision_tower, TILE)
    directory = write_original(str(tmp_path / "orig"), hf_model, clip, image_aspect_ratio="anyres",
                               mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=PINPOINTS)  # fmt: skip
    pipe = llava_jax.load(directory, dtype="float32")
    sizes = [SIZES["wide"], SIZES["tall"], SIZES["huge"]]
    for s in sizes:
        assert anyres.num_image_tokens(pipe.config, s) == anyres.num_image_tokens(pipe.config.replace(semantics="hf"), s)
    inputs = R.next_image_processor()([image(s, i) for i, s in enumerate(sizes)], return_tensors="np")
    counts = [anyres.num_image_tokens(pipe.config, s) for s in inputs["image_sizes"]]
    ids = sequence(np.random.default_rng(3), 96, counts)[None]
    ours = pipe.logits(ids, inputs["pixel_values"], inputs["image_sizes"])
    ref = R.reference_logits(hf_model, np.where(ids == 96, R.IMAGE_TOKEN, ids), inputs["pixel_values"],
                             image_sizes=torch.as_tensor(inputs["image_sizes"]))  # fmt: skip
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_convert_original_to_orbax_keeps_semantics_and_preprocessing(hf15, tmp_path):
    clip = write_clip_dir(str(tmp_path / "clip"), hf15.model.vision_tower, TILE)
    directory = write_original(str(tmp_path / "orig"), hf15, clip, weights="bin", image_aspect_ratio="pad")
    out = str(tmp_path / "converted")
    convert(directory, out, "float32", progress=False)
    a, b = llava_jax.load(directory, dtype="float32"), llava_jax.load(out, dtype="float32")
    assert a.config == b.config and b.config.semantics == "original"
    assert b.image_processor == a.image_processor and os.path.exists(os.path.join(out, "preprocessor_config.json"))
    la, lb = leaves(a), leaves(b)
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


# -- bad input ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original_dir(hf15, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    clip = write_clip_dir(str(root / "clip"), hf15.model.vision_tower, TILE)
    return write_original(str(root / "orig"), hf15, clip, image_aspect_ratio="pad"), clip


def edited(directory, tmp_path, **changes):
    import shutil

    d = shutil.copytree(directory, tmp_path / "edited")
    cfg = json.load(open(d / "config.json"))
    cfg.update(changes)
    json.dump(cfg, open(d / "config.json", "w"))
    return str(d)


def test_original_image_marker_in_input_ids_is_explained(original_dir):
    from llava_jax.model.llava import ImageTokenMismatch

    pipe = llava_jax.load(original_dir[0], dtype="float32")
    pixels = pipe.image_processor([image(SIZES["wide"])])["pixel_values"]
    with pytest.raises(ImageTokenMismatch, match=r"original LLaVA's image marker -200.*image_token_id \(96\).*pipe.prepare"):
        pipe.logits(np.array([[1, 5, -200, 7]]), pixels)


def test_unknown_projector_type(original_dir, tmp_path):
    with pytest.raises(ValueError, match="mm_projector_type 'mlp2x_relu' is not supported"):
        llava_jax.load(edited(original_dir[0], tmp_path, mm_projector_type="mlp2x_relu"))


def test_unsupported_merge_type_and_aspect_ratio(original_dir, tmp_path):
    d = edited(original_dir[0], tmp_path, image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS,
               mm_patch_merge_type="spatial_unpad_anyres_max_9")  # fmt: skip
    with pytest.raises(NotImplementedError, match="mm_patch_merge_type 'spatial_unpad_anyres_max_9'"):
        llava_jax.load(d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(image_aspect_ratio="highres")
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(NotImplementedError, match="image_aspect_ratio 'highres'"):
        llava_jax.load(d)


def test_vision_tower_not_found(original_dir, tmp_path):
    directory, clip = original_dir
    d = edited(directory, tmp_path, mm_vision_tower="openai/clip-vit-large-patch14-336")
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14-336.*pass vision_tower=PATH"):
        llava_jax.load(d)
    with pytest.raises(FileNotFoundError, match="vision_tower='/nonexistent' is not a directory"):
        llava_jax.load(d, vision_tower="/nonexistent")
    assert llava_jax.load(d, dtype="float32", vision_tower=clip).config.vision.image_size == TILE


def test_vision_tower_for_a_llava_hf_checkpoint_is_refused(hf15, tmp_path):
    with pytest.raises(ValueError, match="vision_tower= is for original LLaVA checkpoints"):
        llava_jax.load(R.save(hf15, str(tmp_path)), vision_tower=str(tmp_path))


def test_mm_hidden_size_of_another_tower(original_dir, tmp_path):
    with pytest.raises(ValueError, match="mm_hidden_size 1024 but the vision tower gives 32"):
        llava_jax.load(edited(original_dir[0], tmp_path, mm_hidden_size=1024))


def test_missing_tensor_names_the_original_key(original_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = edited(original_dir[0], tmp_path)
    tensors = load_file(os.path.join(d, "model.safetensors"))
    tensors.pop("model.mm_projector.2.bias")
    save_file(tensors, os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.mm_projector\.2\.bias"):
        llava_jax.load(d)


class Payload:
    """Unpickling this would run code: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/llava_jax_pickle_ran",))


def test_bin_files_never_run_pickled_code(tmp_path):
    if os.path.exists("/tmp/llava_jax_pickle_ran"):
        os.remove("/tmp/llava_jax_pickle_ran")
    torch.save({"model.norm.weight": torch.ones(2), "evil": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        torch_bin.TorchBinCheckpoint(str(tmp_path)).keys()
    assert not os.path.exists("/tmp/llava_jax_pickle_ran")


def test_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "pytorch_model.bin")
    assert torch_bin.TorchBinCheckpoint(str(tmp_path)).read("w").dtype.name == "bfloat16"
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="reading PyTorch .bin weights needs torch"):
        torch_bin.TorchBinCheckpoint(str(tmp_path))


# -- published configs ----------------------------------------------------------------------------------

CLIP_L14_336 = {  # openai/clip-vit-large-patch14-336 config.json (a CLIPModel), the parts that matter
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
}  # fmt: skip
LLAMA_7B = {"hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 4096,
            "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
            "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 32000}  # fmt: skip
MM = {"mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
      "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
      "mm_vision_tower": "openai/clip-vit-large-patch14-336", "use_mm_proj": True}  # fmt: skip
NEXT = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "unfreeze_mm_vision_tower": True,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "tokenizer_model_max_length": 4096}  # fmt: skip
PUBLISHED = {  # config.json of haotian-liu's releases (their text and mm_* keys)
    "llava-v1.5-7b": {**LLAMA_7B, **MM, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
                      "image_aspect_ratio": "pad", "image_grid_pinpoints": None},
    "llava-v1.6-mistral-7b": {**LLAMA_7B, **MM, **NEXT, "architectures": ["LlavaMistralForCausalLM"],
                              "model_type": "llava_mistral", "intermediate_size": 14336, "num_key_value_heads": 8,
                              "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": None},
    "llava-v1.6-34b": {**LLAMA_7B, **MM, **NEXT, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
                       "hidden_size": 7168, "intermediate_size": 20480, "num_attention_heads": 56,
                       "num_hidden_layers": 60, "num_key_value_heads": 8, "rope_theta": 5000000.0, "vocab_size": 64000},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_original_configs(name):
    from llava_jax.checkpoints.original import config_from_original, original_rules

    cfg = config_from_original(PUBLISHED[name], CLIP_L14_336)
    # the image token id llava-hf gave the converted release
    assert cfg.image_token_id == {"llava-v1.5-7b": 32000, "llava-v1.6-mistral-7b": 32000, "llava-v1.6-34b": 64000}[name]
    assert cfg.vision == VisionConfig() and cfg.tokens_per_tile == 576 and cfg.semantics == "original"
    if name == "llava-v1.5-7b":
        assert (cfg.image_aspect_ratio, cfg.patch_merge_type, cfg.image_grid_pinpoints) == ("pad", "flat", None)
    else:
        assert (cfg.image_aspect_ratio, cfg.patch_merge_type, cfg.model_max_length) == ("anyres", "spatial_unpad", 4096)
        assert cfg.image_grid_pinpoints[0] == (336, 672)  # kept as written; the original reads (width, height)
        # a 640 x 480 (height x width) photo: the original picks 672 wide x 672 high ...
        assert anyres.grid_shape((640, 480), cfg.image_grid_pinpoints, 336, "original") == (2, 2)
    text = cfg.text
    if "mistral" in name:
        assert (text.rope_theta, text.num_kv_heads, text.sliding_window) == (1e6, 8, None)
    if "34b" in name:
        assert (text.vocab_size, text.rope_theta, text.num_heads, text.num_kv_heads, text.head_dim) == (64000, 5e6, 56, 8, 128)
    keys = {k for r in original_rules(cfg) for k in r.keys(2)}
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "lm_head.weight",
            "model.vision_tower.vision_tower.vision_model.encoder.layers.1.self_attn.out_proj.weight"} <= keys  # fmt: skip
    assert ("model.image_newline" in keys) == (name != "llava-v1.5-7b")
