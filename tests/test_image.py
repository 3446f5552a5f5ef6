"""Image loading, preprocessing and anyres geometry against transformers and the original LLaVA code.

References: transformers' CLIP / LlavaNext / Llava image processors (the PIL backend: without
torchvision, `transformers.CLIPImageProcessor` *is* `CLIPImageProcessorPil`), LlavaNextProcessor's
token count and LlavaNextModel.pack_image_features; haotian-liu/LLaVA's `llava.mm_utils` and
`LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal`. Pixel values must be bitwise equal:
both sides resize with the same Pillow calls and run the same float64/float32 arithmetic.
"""

import io
import json
import types

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw

from llava_jax.config import LlavaConfig, VisionConfig
from llava_jax.data import image as image_lib
from llava_jax.data.image import ImageProcessor, UnreadableImageError, load_image
from llava_jax.model import anyres

transformers.logging.set_verbosity_error()  # the "no torchvision, using the PIL backend" notices

from llava import mm_utils  # noqa: E402
from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.model.llava_arch import LlavaMetaForCausalLM  # noqa: E402
from llava.model.llava_arch import unpad_image as original_unpad_image  # noqa: E402
from transformers.models.llava_next import modeling_llava_next as hf_next  # noqa: E402

PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

# (height, width): wide, tall, square, smaller than a tile, larger than every pinpoint, extreme aspects
SIZES = [(300, 700), (900, 500), (336, 336), (500, 500), (100, 80), (40, 41), (1500, 1200), (2100, 1700),
         (50, 2000), (1400, 90), (337, 673), (110, 352)]  # fmt: skip


def drawn_image(height, width, seed=0, mode="RGB"):
    """Smooth gradients, shapes and noise: exercises every resampling tap."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(-40, 41, (height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 5, height // 5, width * 3 // 5, height * 4 // 5), fill=(250, 20, 30))
    draw.rectangle((width // 2, height // 3, width - 2, height // 2), fill=(10, 200, 60))
    return image.convert(mode) if mode != "RGB" else image


def png_bytes(image, **save_kwargs):
    buf = io.BytesIO()
    image.save(buf, "PNG", **save_kwargs)
    return buf.getvalue()


def hf_clip(**kwargs):
    kwargs = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, **kwargs}
    return transformers.CLIPImageProcessor(**kwargs)


def hf_next_processor(pinpoints=PINPOINTS, **kwargs):
    kwargs = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, **kwargs}
    return transformers.LlavaNextImageProcessor(image_grid_pinpoints=[list(p) for p in pinpoints], **kwargs)


def next_config(semantics="hf", merge="spatial_unpad", image_size=336, patch_size=14, pinpoints=PINPOINTS):
    return LlavaConfig(
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, num_layers=2),
        image_aspect_ratio="anyres",
        image_grid_pinpoints=pinpoints,
        patch_merge_type=merge,
        semantics=semantics,
    )


def assert_close(ours, ref):
    """Bit-identical float32 pixel values (README claims it; a tolerance would let a drift pass)."""
    ref = np.asarray(ref)
    assert ours.shape == ref.shape
    assert ours.dtype == np.float32 and ref.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


# -- CLIP ("square") -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES[:8])
def test_clip_matches_transformers(size):
    image = drawn_image(*size)
    ours = ImageProcessor()([image])
    for ref in (hf_clip(), transformers.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=336)):
        assert_close(ours["pixel_values"], ref([image], return_tensors="np")["pixel_values"])
    np.testing.assert_array_equal(ours["image_sizes"], [size])
    assert ours["image_sizes"].dtype == np.int64


def test_clip_other_settings_match_transformers():
    """224 crop of a 256 shortest edge, bilinear, another mean/std; and an exact (height, width) resize."""
    settings = dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 200}, resample=2,
                    image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])  # fmt: skip
    ours = ImageProcessor(shortest_edge=256, crop_hw=(224, 200), resample=2,
                          image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3))  # fmt: skip
    exact = ImageProcessor(shortest_edge=None, size_hw=(230, 250), do_center_crop=False, crop_hw=None)
    images = [drawn_image(300, 700), drawn_image(213, 100, seed=1)]
    assert_close(ours(images)["pixel_values"], hf_clip(**settings)(images, return_tensors="np")["pixel_values"])
    ref = hf_clip(size={"height": 230, "width": 250}, do_center_crop=False)(images, return_tensors="np")
    assert_close(exact(images)["pixel_values"], ref["pixel_values"])


def test_crop_larger_than_image_pads_like_transformers():
    ours = ImageProcessor(shortest_edge=100, crop_hw=(131, 120))
    image = drawn_image(100, 110)
    ref = hf_clip(size={"shortest_edge": 100}, crop_size={"height": 131, "width": 120})
    assert_close(ours([image])["pixel_values"], ref([image], return_tensors="np")["pixel_values"])


def test_numpy_inputs_match_transformers():
    rgb = np.asarray(drawn_image(120, 200))
    rgba = np.concatenate([rgb, np.arange(120 * 200, dtype=np.uint8).reshape(120, 200, 1)], -1)
    grey = rgb[..., :1]
    for array in (rgb, np.moveaxis(rgb, -1, 0), rgba, grey):
        ref = hf_clip()([array], return_tensors="np")["pixel_values"]
        assert_close(ImageProcessor()([array])["pixel_values"], ref)
    nxt = hf_next_processor()([rgb, rgba], return_tensors="np")
    ours = ImageProcessor(aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS)([rgb, rgba])
    assert_close(ours["pixel_values"], nxt["pixel_values"])
    np.testing.assert_array_equal(ours["image_sizes"], nxt["image_sizes"])


# -- LLaVA-1.5 "pad" -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(200, 500), (500, 201), (300, 300), (37, 90)])
def test_pad_matches_original_and_llava_image_processor(size):
    image = drawn_image(*size)
    ours = ImageProcessor(aspect_ratio="pad")([image])["pixel_values"]
    clip = hf_clip()
    original = mm_utils.process_images([image], clip, types.SimpleNamespace(image_aspect_ratio="pad"))
    assert_close(ours, original.numpy())
    # the same thing done by hand with the original's expand2square
    squared = mm_utils.expand2square(image, tuple(int(x * 255) for x in clip.image_mean))
    assert_close(ours, clip([squared], return_tensors="np")["pixel_values"])
    llava_hf = transformers.LlavaImageProcessor(do_pad=True, size={"shortest_edge": 336}, crop_size=336)
    assert_close(ours, llava_hf([image], return_tensors="np")["pixel_values"])


# -- LLaVA-1.6 "anyres" ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_anyres_matches_llava_next(size):
    image = drawn_image(*size)
    ours = ImageProcessor(aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS)([image])
    for ref_processor in (hf_next_processor(), transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 336}, crop_size=336, image_grid_pinpoints=[list(p) for p in PINPOINTS])):
        ref = ref_processor([image], return_tensors="np")
        assert_close(ours["pixel_values"], ref["pixel_values"])
        np.testing.assert_array_equal(ours["image_sizes"], ref["image_sizes"])
        assert ours["image_sizes"].dtype == ref["image_sizes"].dtype == np.int64


def test_anyres_batch_pads_tiles_like_llava_next():
    images = [drawn_image(100, 80), drawn_image(1500, 1200, seed=1), drawn_image(300, 700, seed=2)]
    ours = ImageProcessor(aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS)(images)
    ref = hf_next_processor()(images, return_tensors="np")
    assert ours["pixel_values"].shape == (3, 5, 3, 336, 336)
    assert_close(ours["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(ours["image_sizes"], ref["image_sizes"])


def test_anyres_small_tiles_and_other_pinpoints():
    pinpoints = ((48, 96), (96, 48), (96, 96), (144, 48), (48, 144), (144, 144))
    ours = ImageProcessor(aspect_ratio="anyres", shortest_edge=48, crop_hw=(48, 48), image_grid_pinpoints=pinpoints)
    ref = hf_next_processor(pinpoints, size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    images = [drawn_image(h, w, seed=i) for i, (h, w) in enumerate([(13, 200), (77, 31), (500, 480), (48, 48)])]
    out, expected = ours(images), ref(images, return_tensors="np")
    assert_close(out["pixel_values"], expected["pixel_values"])
    np.testing.assert_array_equal(out["image_sizes"], expected["image_sizes"])


@pytest.mark.parametrize("size", SIZES)
def test_original_anyres_matches_process_anyres_image(size):
    image = drawn_image(*size)
    ours, size_hw = ImageProcessor(
        aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS, semantics="original"
    ).process_one(image)
    ref = mm_utils.process_anyres_image(image, hf_clip(), [list(p) for p in PINPOINTS])
    assert_close(ours, ref.numpy())
    assert size_hw == size


def test_semantics_differ_on_ties_and_each_matches_its_reference():
    """An image smaller than a tile ties on the two smallest pinpoints: transformers takes one wide
    row of two tiles, the original one column of two tiles."""
    image = drawn_image(100, 80)
    hf_out, _ = ImageProcessor(aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS).process_one(image)
    orig_out, _ = ImageProcessor(
        aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS, semantics="original"
    ).process_one(image)
    assert_close(hf_out, hf_next_processor()([image], return_tensors="np")["pixel_values"][0])
    assert_close(orig_out, mm_utils.process_anyres_image(image, hf_clip(), [list(p) for p in PINPOINTS]).numpy())
    assert np.abs(hf_out[1:] - orig_out[1:]).max() > 1  # same tile count, different layout
    assert anyres.grid_shape((100, 80), PINPOINTS, 336, "hf") == (1, 2)
    assert anyres.grid_shape((100, 80), PINPOINTS, 336, "original") == (2, 1)


# -- geometry against both references --------------------------------------------------------------


def many_sizes(n=150, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [tuple(int(v) for v in rng.integers(1, 2500, 2)) for _ in range(n)]
    # unpad rounding differs between the references on these; ties on the small ones
    return sizes + [(110, 352), (352, 110), (205, 656), (396, 704), (47, 1128), (1, 1), (336, 672), (672, 336)]


def test_best_resolution_grid_and_tile_count_match_references():
    pins = [list(p) for p in PINPOINTS]
    for h, w in many_sizes():
        assert anyres.select_best_resolution((h, w), PINPOINTS, "hf") == tuple(
            transformers.image_processing_utils.select_best_resolution((h, w), pins)
        )
        # the original takes and returns (width, height)
        ow, oh = mm_utils.select_best_resolution((w, h), pins)
        assert anyres.select_best_resolution((h, w), PINPOINTS, "original") == (oh, ow)
        assert anyres.grid_shape((h, w), PINPOINTS, 336, "hf") == hf_next.get_anyres_image_grid_shape((h, w), pins, 336)
        cols, rows = mm_utils.get_anyres_image_grid_shape((w, h), pins, 336)
        assert anyres.grid_shape((h, w), PINPOINTS, 336, "original") == (rows, cols)
        assert anyres.num_tiles((h, w), PINPOINTS, 336, "hf") == hf_next.image_size_to_num_patches((h, w), pins, 336)


def test_unpad_box_matches_reference_slices():
    """The box selects the same feature cells as transformers' / the original's unpad_image."""
    for h, w in many_sizes(60):
        for semantics in ("hf", "original"):
            rows, cols = anyres.grid_shape((h, w), PINPOINTS, 336, semantics)
            grid = torch.arange(rows * 24 * cols * 24).reshape(1, rows * 24, cols * 24)
            if semantics == "hf":
                ref = hf_next.unpad_image(grid, (h, w))
            else:
                ref = original_unpad_image(grid, (w, h))  # the original passes image.size, (width, height)
            top, bottom, left, right = anyres.unpad_box((h, w), (rows * 24, cols * 24), semantics)
            np.testing.assert_array_equal(grid[0, top:bottom, left:right].numpy(), ref[0].numpy())


def hf_model_tokens(config, size_hw):
    """Tokens LlavaNextModel.pack_image_features makes for one image (zero features, width 1)."""
    fake = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(image_size=config.vision.image_size, patch_size=config.vision.patch_size),
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints]))  # fmt: skip
    tiles = hf_next.image_size_to_num_patches(size_hw, fake.config.image_grid_pinpoints, config.vision.image_size)
    features = [torch.zeros(tiles, config.vision.grid_size**2, 1)]
    _, lens = hf_next.LlavaNextModel.pack_image_features(
        fake, features, torch.tensor([size_hw]), "default", image_newline=torch.zeros(1)
    )
    return int(lens[0])


def hf_processor_tokens(config, sizes):
    """Tokens LlavaNextProcessor expands each <image> to (its _get_num_multimodal_tokens)."""
    from tokenizers import Tokenizer, models

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>")),
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    side = config.vision.image_size
    processor = transformers.LlavaNextProcessor(
        image_processor=hf_next_processor(config.image_grid_pinpoints, size={"shortest_edge": side},
                                          crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, patch_size=config.vision.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    return processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens


def original_model_tokens(config, size_hw):
    """Tokens the original LlavaMetaForCausalLM splices in for one image after one text token."""
    grid = config.vision.grid_size
    tower_config = types.SimpleNamespace(image_size=config.vision.image_size)
    tower = types.SimpleNamespace(num_patches_per_side=grid, config=tower_config)
    model = types.SimpleNamespace(image_newline=torch.zeros(1), embed_tokens=torch.nn.Embedding(2, 1))
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(
            mm_patch_merge_type=config.patch_merge_type, image_aspect_ratio="anyres",
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
            tune_mm_mlp_adapter=False, mm_use_im_start_end=False,
        ),
        model=model, device="cpu", get_model=lambda: model, get_vision_tower=lambda: tower,
        encode_images=lambda images: torch.zeros(images.shape[0], grid * grid, 1),
    )  # fmt: skip
    h, w = size_hw
    pins = fake.config.image_grid_pinpoints
    cols, rows = mm_utils.get_anyres_image_grid_shape((w, h), pins, config.vision.image_size)
    embeds = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal(
        fake, torch.tensor([[0, IMAGE_TOKEN_INDEX]]), None, None, None, None,
        torch.zeros(1, 1 + rows * cols, 3, 1, 1), image_sizes=[(w, h)],
    )[4]  # fmt: skip
    return embeds.shape[1] - 1


SMALL_PINPOINTS = ((48, 96), (96, 48), (96, 96), (144, 48), (48, 144), (144, 144))


@pytest.mark.parametrize("geometry", [(336, 14, PINPOINTS), (48, 16, SMALL_PINPOINTS)])
def test_num_image_tokens_hf_matches_processor_and_model(geometry):
    image_size, patch_size, pinpoints = geometry
    config = next_config("hf", image_size=image_size, patch_size=patch_size, pinpoints=pinpoints)
    sizes = many_sizes(80)
    ours = [anyres.num_image_tokens(config, s) for s in sizes]
    assert ours == hf_processor_tokens(config, sizes)
    assert ours == [hf_model_tokens(config, s) for s in sizes]


@pytest.mark.parametrize("merge", ["spatial_unpad", "flat"])
@pytest.mark.parametrize("geometry", [(336, 14, PINPOINTS), (48, 16, SMALL_PINPOINTS)])
def test_num_image_tokens_original_matches_model(merge, geometry):
    image_size, patch_size, pinpoints = geometry
    config = next_config("original", merge, image_size=image_size, patch_size=patch_size, pinpoints=pinpoints)
    for size in many_sizes(80):
        assert anyres.num_image_tokens(config, size) == original_model_tokens(config, size), size


def test_num_image_tokens_semantics_differ_where_references_differ():
    """(110, 352): the original truncates 110 * 48 / 352 = 14.999... to 14 rows, transformers rounds to 15."""
    hf, original = next_config("hf"), next_config("original")
    assert anyres.num_image_tokens(hf, (110, 352)) == hf_model_tokens(hf, (110, 352)) == 576 + 16 * 49
    assert anyres.num_image_tokens(original, (110, 352)) == original_model_tokens(original, (110, 352)) == 576 + 14 * 49


def test_num_image_tokens_without_anyres_matches_llava_processor():
    config = LlavaConfig(vision=VisionConfig(image_size=336, patch_size=14, num_layers=2), image_aspect_ratio="pad")
    from tokenizers import Tokenizer, models

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>")),
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    processor = transformers.LlavaProcessor(
        image_processor=hf_clip(), tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    expected = processor._get_num_multimodal_tokens(image_sizes=[(100, 80), (900, 500)]).num_image_tokens
    assert [anyres.num_image_tokens(config, s) for s in [(100, 80), (900, 500)]] == expected == [576, 576]
    assert anyres.num_image_tokens(config) == 576
    assert anyres.num_image_tokens(config.replace(vision_feature_select_strategy="full")) == 577


def test_num_image_tokens_from_hf_config():
    hf = transformers.LlavaNextConfig(
        vision_config={"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14},
        text_config={"model_type": "llama"},
    ).to_dict()
    config = LlavaConfig.from_hf(hf)
    sizes = [(300, 700), (100, 80), (2100, 1700)]
    assert [anyres.num_image_tokens(config, s) for s in sizes] == hf_processor_tokens(config, sizes)


# -- loading ----------------------------------------------------------------------------------------


def hf_convert(image):
    return transformers.image_transforms.convert_to_rgb(image, return_numpy=True)


def with_alpha(image, seed=0):
    alpha = np.random.default_rng(seed).integers(0, 256, image.size[::-1], dtype=np.uint8)
    alpha[:, :5] = 0
    alpha[:, -5:] = 255
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def test_rgba_composites_onto_white_like_transformers():
    rgba = with_alpha(drawn_image(60, 90))
    loaded = load_image(png_bytes(rgba))
    np.testing.assert_array_equal(np.asarray(loaded), hf_convert(rgba))
    assert (np.asarray(loaded)[:, :5] == 255).all()
    # so the processor gives for a loaded file what transformers gives for the RGBA image itself
    assert_close(ImageProcessor()([loaded])["pixel_values"], hf_clip()([rgba], return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("mode", ["LA", "P_transparent", "PA", "L", "1", "P", "CMYK"])
def test_modes_convert_like_transformers(mode, tmp_path):
    image = drawn_image(40, 70)
    if mode == "LA":
        image = with_alpha(image).convert("LA")
    elif mode == "PA":  # Pillow cannot save PA files: in memory only
        image = with_alpha(image).convert("PA")
        np.testing.assert_array_equal(np.asarray(image_lib.to_rgb(image)), hf_convert(image))
        return
    elif mode == "P_transparent":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 3
    else:
        image = image.convert(mode)
    path = tmp_path / "image.tiff" if mode == "CMYK" else tmp_path / "image.png"
    image.save(path)
    reopened = Image.open(path)
    assert reopened.mode == ("P" if mode == "P_transparent" else mode)
    np.testing.assert_array_equal(np.asarray(load_image(path)), hf_convert(Image.open(path)))
    assert load_image(str(path)).mode == "RGB"


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    """An 8-bit image stored as 16 bits (v * 257) loads back as the 8-bit image, for I;16 and I."""
    grey = np.asarray(drawn_image(30, 50).convert("L"))
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    path = tmp_path / "sixteen.png"
    sixteen.save(path)
    assert Image.open(path).mode == "I;16"
    expected = np.repeat(grey[..., None], 3, -1)
    np.testing.assert_array_equal(np.asarray(load_image(path)), expected)
    as_int32 = Image.fromarray(grey.astype(np.int32) * 257)
    assert as_int32.mode == "I"
    np.testing.assert_array_equal(np.asarray(image_lib.to_rgb(as_int32)), expected)


def test_exif_orientation_is_applied(tmp_path):
    upright = drawn_image(20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    path = tmp_path / "rotated.png"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes())
    assert Image.open(path).size == (20, 30)
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(upright))
    reference = transformers.image_utils.load_image(str(path))
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(reference))
    with open(path, "rb") as f:  # file objects and bytes too
        np.testing.assert_array_equal(np.asarray(load_image(f)), np.asarray(upright))
    np.testing.assert_array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(upright))


# -- errors and construction ------------------------------------------------------------------------


def test_missing_and_unreadable_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImageError, match="garbage.jpg"):
        load_image(str(garbage))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(drawn_image(64, 64))[:300])
    with pytest.raises(UnreadableImageError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(UnreadableImageError, match="bytes"):
        load_image(b"\x89PNG junk")


def test_bad_inputs_raise_clear_errors():
    processor = ImageProcessor()
    with pytest.raises(TypeError, match="uint8"):
        processor([np.zeros((10, 10, 3), np.float32)])
    with pytest.raises(ValueError, match="channel"):
        processor([np.zeros((10, 10, 7), np.uint8)])
    with pytest.raises(TypeError, match="PIL image or a numpy array"):
        processor(["image.png"])
    with pytest.raises(ValueError, match="no images"):
        processor([])
    with pytest.raises(ValueError, match="'F' mode"):
        processor([Image.new("F", (4, 4))])
    with pytest.raises(ValueError, match="aspect_ratio"):
        ImageProcessor(aspect_ratio="stretch")
    with pytest.raises(ValueError, match="multiple of the tile size"):
        ImageProcessor(aspect_ratio="anyres", image_grid_pinpoints=((336, 600),))
    with pytest.raises(ValueError, match="need the image size"):
        anyres.num_image_tokens(next_config())
    with pytest.raises(ValueError, match="disagree"):
        anyres.num_image_tokens(next_config().replace(image_aspect_ratio="pad"), (10, 10))
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        anyres.num_image_tokens(next_config().replace(vision_feature_select_strategy="full"), (10, 10))
    with pytest.raises(ValueError, match="positive"):
        anyres.select_best_resolution((0, 10), PINPOINTS)


def test_from_pretrained_reads_llava_next_preprocessor_config(tmp_path):
    hf_next_processor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.3, 0.35]).save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path, next_config())
    ref = transformers.LlavaNextImageProcessor.from_pretrained(tmp_path)
    images = [drawn_image(300, 700), drawn_image(100, 80, seed=1)]
    out, expected = ours(images), ref(images, return_tensors="np")
    assert_close(out["pixel_values"], expected["pixel_values"])
    np.testing.assert_array_equal(out["image_sizes"], expected["image_sizes"])
    other = next_config(pinpoints=((336, 672), (672, 336)))
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        ImageProcessor.from_pretrained(tmp_path, other)


def test_from_pretrained_reads_original_clip_preprocessor_config(tmp_path):
    """openai/clip-vit-large-patch14-336's file (old format: int sizes) as original LLaVA-1.5 uses it."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(image_lib.OPENAI_CLIP_MEAN),
        "image_std": list(image_lib.OPENAI_CLIP_STD), "resample": 3, "size": 336,
    }))  # fmt: skip
    config = LlavaConfig(vision=VisionConfig(num_layers=2), image_aspect_ratio="pad", semantics="original")
    ours = ImageProcessor.from_pretrained(tmp_path, config)
    clip = transformers.CLIPImageProcessor.from_pretrained(tmp_path)
    image = drawn_image(200, 500)
    ref = mm_utils.process_images([image], clip, types.SimpleNamespace(image_aspect_ratio="pad"))
    assert_close(ours([image])["pixel_values"], ref.numpy())


def test_from_config_and_construction_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path, next_config())
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ImageProcessor.from_pretrained(tmp_path, next_config())
    with pytest.raises(ValueError, match="vision tower takes 336x336"):
        ImageProcessor.from_config(next_config().replace(image_aspect_ratio="pad", image_grid_pinpoints=None),
                                   {"crop_size": {"height": 224, "width": 224}})
    processor = ImageProcessor.from_config(next_config("original"))
    assert (processor.aspect_ratio, processor.semantics, processor.tile_size) == ("anyres", "original", 336)
